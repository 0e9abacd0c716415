//! A catalogue row's bytes in the B-tree (`catalogue.rs`): its numbers at fixed places, so that
//! a walk of every row (a follower's session, a leader's answer to it) and each row written
//! for a new point cost no text to format or parse.
//!
//! Layout (little-endian), format 1:
//!
//! ```text
//! 0   u8   format (1; a row in JSON, as nodes before it wrote them, starts with '{')
//! 1   u64  end              9   u32  crc
//! 13  u64  committed        21  u32  committed CRC
//! 25  u64  durable          33  u64  journal length
//! 41  u64  recorded committed end
//! 49  u64  modified (Unix ms)
//! 57  u64  ownership epoch
//! 65  u8   flags: 1 stale, 2 packed, 4 sniffed, 8 the rest of the meta follows
//! 66  if packed:  segment u32, offset u64, len u64, records u32
//!     if sniffed: length u32, then the media type (UTF-8)
//!     if the rest of the meta follows: the whole `point.meta` record (JSON) to the end
//! ```
//!
//! A point's meta is its epoch alone unless it has a content type, an owner that took it
//! over, a handover or leader epochs: rare, and then its JSON follows whole. Rows in JSON are
//! still read (a catalogue written before format 1 opens unchanged); each is written anew in
//! format 1 the next time its point changes.

use super::catalogue::Row;
use super::meta::Meta;
use super::ownership::Ownership;
use super::segment::Needle;

/// The first byte of a row in this layout.
const FORMAT: u8 = 1;
/// The bytes before the optional parts.
const FIXED: usize = 66;

const STALE: u8 = 1;
const PACKED: u8 = 2;
const SNIFFED: u8 = 4;
const META: u8 = 8;

/// Why bytes are not a row.
#[derive(Debug, thiserror::Error)]
pub(super) enum Undecodable {
    #[error("a row of {0} bytes, cut short")]
    Short(usize),
    #[error("a row of unknown format {0}")]
    Format(u8),
    #[error("a row's media type is not UTF-8")]
    Sniffed,
    #[error("a row's meta: {0}")]
    Json(#[from] serde_json::Error),
}

/// The bytes of `row`.
pub(super) fn encode(row: &Row) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(FIXED + 64);
    bytes.push(FORMAT);
    bytes.extend_from_slice(&row.end.to_le_bytes());
    bytes.extend_from_slice(&row.crc.to_le_bytes());
    bytes.extend_from_slice(&row.committed.to_le_bytes());
    bytes.extend_from_slice(&row.committed_crc.to_le_bytes());
    for number in [
        row.durable,
        row.journal_len,
        row.recorded_committed,
        row.modified_ms,
        row.meta.ownership.epoch,
    ] {
        bytes.extend_from_slice(&number.to_le_bytes());
    }
    let whole_meta = !epoch_only(&row.meta);
    let mut flags = 0;
    if row.stale {
        flags |= STALE;
    }
    if row.needle.is_some() {
        flags |= PACKED;
    }
    if row.sniffed.is_some() {
        flags |= SNIFFED;
    }
    if whole_meta {
        flags |= META;
    }
    bytes.push(flags);
    if let Some(needle) = &row.needle {
        bytes.extend_from_slice(&needle.segment.to_le_bytes());
        bytes.extend_from_slice(&needle.offset.to_le_bytes());
        bytes.extend_from_slice(&needle.len.to_le_bytes());
        bytes.extend_from_slice(&needle.records.to_le_bytes());
    }
    if let Some(sniffed) = &row.sniffed {
        bytes.extend_from_slice(&(sniffed.len() as u32).to_le_bytes());
        bytes.extend_from_slice(sniffed.as_bytes());
    }
    if whole_meta {
        serde_json::to_writer(&mut bytes, &row.meta).expect("a point's meta serializes");
    }
    bytes
}

/// The row `bytes` hold, in this layout or in JSON.
pub(super) fn decode(bytes: &[u8]) -> Result<Row, Undecodable> {
    match bytes.first() {
        Some(b'{') => return Ok(serde_json::from_slice(bytes)?),
        Some(&FORMAT) => {}
        Some(&other) => return Err(Undecodable::Format(other)),
        None => return Err(Undecodable::Short(0)),
    }
    let mut reader = Reader { bytes, at: 1 };
    let end = reader.u64()?;
    let crc = reader.u32()?;
    let committed = reader.u64()?;
    let committed_crc = reader.u32()?;
    let durable = reader.u64()?;
    let journal_len = reader.u64()?;
    let recorded_committed = reader.u64()?;
    let modified_ms = reader.u64()?;
    let epoch = reader.u64()?;
    let flags = reader.take(1)?[0];
    let needle = match flags & PACKED {
        0 => None,
        _ => Some(Needle {
            segment: reader.u32()?,
            offset: reader.u64()?,
            len: reader.u64()?,
            records: reader.u32()?,
        }),
    };
    let sniffed = match flags & SNIFFED {
        0 => None,
        _ => {
            let len = reader.u32()? as usize;
            let text = std::str::from_utf8(reader.take(len)?).map_err(|_| Undecodable::Sniffed)?;
            Some(text.to_owned())
        }
    };
    let meta = match flags & META {
        0 => Meta {
            ownership: Ownership {
                epoch,
                ..Ownership::default()
            },
            ..Meta::default()
        },
        _ => serde_json::from_slice(&bytes[reader.at..])?,
    };
    Ok(Row {
        end,
        crc,
        committed,
        committed_crc,
        durable,
        journal_len,
        recorded_committed,
        modified_ms,
        meta,
        sniffed,
        needle,
        stale: flags & STALE != 0,
    })
}

/// Whether `meta` is its epoch alone (the rest as a new point's).
fn epoch_only(meta: &Meta) -> bool {
    meta.content_type.is_none()
        && meta.ownership.owner.is_none()
        && meta.ownership.handover.is_none()
        && meta.leader_epochs.is_empty()
}

/// Reads a row's fields in order.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, len: usize) -> Result<&'a [u8], Undecodable> {
        let taken = self
            .bytes
            .get(self.at..self.at.saturating_add(len))
            .ok_or(Undecodable::Short(self.bytes.len()))?;
        self.at += len;
        Ok(taken)
    }

    fn u64(&mut self) -> Result<u64, Undecodable> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("eight bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, Undecodable> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("four bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::leader_epochs::{EpochStart, LeaderEpochs};
    use crate::point::ownership::Handover;

    /// A new packed point's row, as `create_packed` writes it.
    fn packed() -> Row {
        Row {
            end: 4096,
            crc: 0xdead_beef,
            committed: 4096,
            committed_crc: 0xdead_beef,
            durable: 0,
            journal_len: 0,
            recorded_committed: 4096,
            modified_ms: 1_765_000_000_123,
            meta: Meta::default(),
            sniffed: Some("application/octet-stream".to_owned()),
            needle: Some(Needle {
                segment: 7,
                offset: 1 << 33,
                len: 4096,
                records: 1,
            }),
            stale: false,
        }
    }

    #[test]
    fn every_kind_of_row_reads_back_as_written() {
        let mut rows = vec![packed(), Row::default()];
        let mut stale = packed();
        stale.stale = true;
        stale.needle = None;
        stale.sniffed = None;
        rows.push(stale);
        let mut typed = packed();
        typed.meta.content_type = Some("video/mp4".to_owned());
        rows.push(typed);
        let mut taken_over = packed();
        taken_over.meta.ownership = Ownership {
            epoch: 9,
            owner: Some("node-b".to_owned()),
            handover: None,
        };
        rows.push(taken_over);
        let mut moving = packed();
        moving.meta.ownership.handover = Some(Handover::Incoming {
            from: "node-a".to_owned(),
            epoch: 3,
        });
        rows.push(moving);
        let mut led = packed();
        led.meta.leader_epochs = LeaderEpochs::new(vec![
            EpochStart { epoch: 2, start: 0 },
            EpochStart {
                epoch: 5,
                start: 100,
            },
        ])
        .unwrap();
        rows.push(led);
        let mut epoch = Row::default();
        epoch.meta.ownership.epoch = u64::MAX;
        epoch.end = u64::MAX;
        rows.push(epoch);
        for row in rows {
            let bytes = encode(&row);
            assert_eq!(bytes[0], FORMAT);
            assert_eq!(decode(&bytes).unwrap(), row, "{bytes:?}");
        }
    }

    #[test]
    fn a_new_points_row_takes_less_than_half_of_its_json() {
        let row = packed();
        let json = serde_json::to_vec(&row).unwrap();
        let bytes = encode(&row);
        assert!(
            bytes.len() * 2 < json.len(),
            "{} vs {}",
            bytes.len(),
            json.len()
        );
    }

    #[test]
    fn a_row_in_json_as_older_nodes_wrote_it_still_reads() {
        let row = packed();
        let json = serde_json::to_vec(&row).unwrap();
        assert_eq!(decode(&json).unwrap(), row);
        // As written before packing and content sniffing existed.
        let old = br#"{"end":5,"crc":1,"committed":5,"committed_crc":1,"durable":5,"journal_len":64,"recorded_committed":5,"modified_ms":0,"meta":{"epoch":2},"stale":false}"#;
        let read = decode(old).unwrap();
        assert_eq!((read.end, read.meta.ownership.epoch), (5, 2));
    }

    #[test]
    fn bytes_cut_short_or_of_another_format_are_an_error_not_a_row() {
        let bytes = encode(&packed());
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        let mut other = bytes.clone();
        other[0] = 2;
        assert!(matches!(decode(&other), Err(Undecodable::Format(2))));
    }
}
