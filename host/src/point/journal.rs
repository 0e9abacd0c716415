//! The journal of a point: one fixed-width record per append, and recovery after a crash.
//!
//! Layout (all integers little-endian; see `docs/storage.md`):
//!
//! ```text
//! header (16 bytes):  magic "GTJOURNL" | version u32 = 1 | crc32c(magic, version) u32
//! record (32 bytes):  end u64 | durable u64 | append_crc u32 | point_crc u32 | behind u32
//!                     | crc32c(previous 28 bytes) u32
//! ```
//!
//! `end` is the size of the point after the append, `append_crc` the CRC32C of the appended bytes,
//! `point_crc` the CRC32C of the whole point `[0, end)`. `durable` is the point size that was
//! already fsynced (data and journal) when the record was written: everything up to it is known to
//! be on disk, so recovery only has to verify the records after it. `behind` is how far the
//! point's committed end (what consumers are served, `docs/failover.md`) was behind `end` when the
//! record was written, at most `u32::MAX` (0 in journals written before the field, where the
//! reserved bytes were zero): recovery commits up to the last record at or before `end - behind`,
//! never more than was committed. A *sync marker* is a record with `end == durable` and no bytes,
//! written when a point is closed after a sync or after its committed end moved, so that a clean
//! restart verifies nothing and finds the committed end.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The first bytes of every journal.
pub const MAGIC: &[u8; 8] = b"GTJOURNL";
/// The journal format this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the header: magic, version, CRC32C of both.
pub const HEADER_LEN: u64 = 16;
/// Bytes of one record.
pub const RECORD_LEN: u64 = 32;

/// One journal record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Record {
    /// The point's end after the append.
    pub end: u64,
    /// The end known durable when it was written.
    pub durable: u64,
    /// The CRC32C of the append's bytes.
    pub append_crc: u32,
    /// The CRC32C of the point's bytes up to `end`.
    pub point_crc: u32,
    /// How far the committed end was behind `end` (`end - committed`, at most `u32::MAX`).
    pub behind: u32,
}

impl Record {
    /// The record's bytes, with its own CRC32C.
    pub fn encode(&self) -> [u8; RECORD_LEN as usize] {
        let mut buf = [0u8; RECORD_LEN as usize];
        buf[0..8].copy_from_slice(&self.end.to_le_bytes());
        buf[8..16].copy_from_slice(&self.durable.to_le_bytes());
        buf[16..20].copy_from_slice(&self.append_crc.to_le_bytes());
        buf[20..24].copy_from_slice(&self.point_crc.to_le_bytes());
        buf[24..28].copy_from_slice(&self.behind.to_le_bytes());
        let crc = crc32c::crc32c(&buf[0..28]);
        buf[28..32].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// The record in `buf`, or `None` if its checksum does not match (a torn or damaged slot).
    pub fn decode(buf: &[u8; RECORD_LEN as usize]) -> Option<Self> {
        let stored = u32::from_le_bytes(buf[28..32].try_into().expect("a fixed-size field"));
        if crc32c::crc32c(&buf[0..28]) != stored {
            return None;
        }
        Some(Self {
            end: u64::from_le_bytes(buf[0..8].try_into().expect("a fixed-size field")),
            durable: u64::from_le_bytes(buf[8..16].try_into().expect("a fixed-size field")),
            append_crc: u32::from_le_bytes(buf[16..20].try_into().expect("a fixed-size field")),
            point_crc: u32::from_le_bytes(buf[20..24].try_into().expect("a fixed-size field")),
            behind: u32::from_le_bytes(buf[24..28].try_into().expect("a fixed-size field")),
        })
    }
}

/// The header's bytes.
pub fn encode_header() -> [u8; HEADER_LEN as usize] {
    let mut buf = [0u8; HEADER_LEN as usize];
    buf[0..8].copy_from_slice(MAGIC);
    buf[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&buf[0..12]);
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The state a point is in after recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recovered {
    /// Size of the point: the data file is truncated to it.
    pub end: u64,
    /// CRC32C of `[0, end)`.
    pub point_crc: u32,
    /// Length the journal is truncated to.
    pub journal_len: u64,
    /// Bytes whose checksums had to be verified (those not known to be durable).
    pub verified_bytes: u64,
    /// Journal records dropped because they were torn, damaged or pointed at missing data.
    pub dropped_records: u64,
    /// The committed end the last record says (`Record::behind`), at an append's end.
    pub committed: u64,
    /// The CRC32C of `[0, committed)`.
    pub committed_crc: u32,
}

impl Recovered {
    /// A journal that holds its header only, over no data: a point just created.
    pub fn empty() -> Self {
        Recovered {
            journal_len: HEADER_LEN,
            ..Recovered::default()
        }
    }

    /// Whether it is [`Recovered::empty`]'s: no bytes, no record.
    pub fn is_empty(&self) -> bool {
        self.end == 0 && self.journal_len == HEADER_LEN
    }
}

/// Why a journal cannot be recovered.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    /// Not a goutube journal.
    #[error("journal header is not a goutube journal (bad magic or checksum)")]
    BadHeader,
    /// A format this build does not read.
    #[error("journal version {0} is not supported (this build reads version {VERSION})")]
    UnsupportedVersion(u32),
    /// Reading it failed.
    #[error("journal I/O: {0}")]
    Io(#[from] io::Error),
    /// A packed point's bytes in its segment do not match its checksum (`segment.rs`).
    #[error("the packed bytes do not match their CRC32C (damaged on disk)")]
    PackedChecksum,
}

/// Finds the last complete, checksum-valid append described by `journal` over `data`.
///
/// Nothing is modified: the caller truncates both files to the returned lengths. A journal shorter
/// than its header is a point whose creation was interrupted: it recovers as empty.
pub fn recover(journal: &File, data: &File) -> Result<Recovered, RecoveryError> {
    let journal_len = journal.metadata()?.len();
    let data_len = data.metadata()?.len();
    if journal_len < HEADER_LEN {
        return Ok(Recovered {
            journal_len: 0,
            ..Recovered::default()
        });
    }
    let mut header = [0u8; HEADER_LEN as usize];
    journal.read_exact_at(&mut header, 0)?;
    if &header[0..8] != MAGIC
        || crc32c::crc32c(&header[0..12])
            != u32::from_le_bytes(header[12..16].try_into().expect("a fixed-size field"))
    {
        return Err(RecoveryError::BadHeader);
    }
    let version = u32::from_le_bytes(header[8..12].try_into().expect("a fixed-size field"));
    if version != VERSION {
        return Err(RecoveryError::UnsupportedVersion(version));
    }

    let slots = (journal_len - HEADER_LEN) / RECORD_LEN;
    let read_slot = |index: u64| -> io::Result<Option<Record>> {
        let mut buf = [0u8; RECORD_LEN as usize];
        journal.read_exact_at(&mut buf, HEADER_LEN + index * RECORD_LEN)?;
        Ok(Record::decode(&buf))
    };

    // The newest intact record says how much was known durable when it was written.
    let mut newest = None;
    for index in (0..slots).rev() {
        if let Some(record) = read_slot(index)? {
            newest = Some((index, record));
            break;
        }
    }
    let Some((newest_index, newest_record)) = newest else {
        return Ok(Recovered {
            journal_len: HEADER_LEN,
            dropped_records: slots,
            ..Recovered::default()
        });
    };

    // Base: the last intact record within the durable prefix that the data file still covers.
    // Records up to it were fsynced before `newest_record` was written, so they are trusted.
    let trusted_end = newest_record.durable.min(data_len);
    let mut base_index = None;
    let mut base = Record::default();
    for index in (0..=newest_index).rev() {
        if let Some(record) = read_slot(index)?
            && record.end <= trusted_end
        {
            base_index = Some(index);
            base = record;
            break;
        }
    }

    // Verify every later record against the data, stopping at the first that fails.
    let mut accepted = base;
    let mut accepted_slots = base_index.map_or(0, |index| index + 1);
    let mut verified_bytes = 0;
    let first_unverified = accepted_slots;
    for index in first_unverified..=newest_index {
        let Some(record) = read_slot(index)? else {
            break;
        };
        if record.end < accepted.end || record.end > data_len {
            break;
        }
        let len = record.end - accepted.end;
        let append_crc = crc_of_range(data, accepted.end, len)?;
        if append_crc != record.append_crc
            || crc32c::crc32c_combine(accepted.point_crc, append_crc, len as usize)
                != record.point_crc
        {
            break;
        }
        verified_bytes += len;
        accepted = record;
        accepted_slots = index + 1;
    }

    // The committed end: the last record's, rounded down to an append's end (the only places
    // whose CRC32C the journal holds); 0 if a record on the way cannot be read.
    let (committed, committed_crc) = match accepted.behind {
        0 => (accepted.end, accepted.point_crc),
        behind => {
            let target = accepted.end.saturating_sub(u64::from(behind));
            record_at_or_before(journal, accepted_slots, target)
                .ok()
                .flatten()
                .map_or((0, 0), |(_, record)| (record.end, record.point_crc))
        }
    };
    Ok(Recovered {
        end: accepted.end,
        point_crc: accepted.point_crc,
        journal_len: HEADER_LEN + accepted_slots * RECORD_LEN,
        verified_bytes,
        dropped_records: slots - accepted_slots,
        committed,
        committed_crc,
    })
}

/// The last of the first `slots` records of `journal` that ends at or before `end`, with its
/// index; `None` when every record ends after `end` (the point's start, 0, is the answer). A
/// binary search: records end where the point ended after each append, so they never decrease.
pub fn record_at_or_before(
    journal: &File,
    slots: u64,
    end: u64,
) -> io::Result<Option<(u64, Record)>> {
    let read_slot = |index: u64| -> io::Result<Record> {
        let mut buf = [0u8; RECORD_LEN as usize];
        journal.read_exact_at(&mut buf, HEADER_LEN + index * RECORD_LEN)?;
        Record::decode(&buf).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("journal record {index} is damaged"),
            )
        })
    };
    let (mut low, mut high) = (0, slots);
    let mut found = None;
    while low < high {
        let middle = low + (high - low) / 2;
        let record = read_slot(middle)?;
        if record.end <= end {
            found = Some((middle, record));
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    Ok(found)
}

/// CRC32C of `len` bytes of `file` from `offset`, read in bounded chunks.
pub fn crc_of_range(file: &File, offset: u64, len: u64) -> io::Result<u32> {
    const CHUNK: u64 = 1 << 20;
    let mut buf = vec![0u8; CHUNK.min(len) as usize];
    let mut crc = 0;
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.read_exact_at(&mut buf[..n], offset + done)?;
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        done += n as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// Writes `appends` to fresh data and journal files the way a point does, with `durable`
    /// giving each record's durable mark.
    fn build(appends: &[&[u8]], durable: impl Fn(usize, u64) -> u64) -> (File, File) {
        let mut data = tempfile::tempfile().unwrap();
        let mut journal = tempfile::tempfile().unwrap();
        journal.write_all(&encode_header()).unwrap();
        let (mut end, mut crc) = (0u64, 0u32);
        for (i, bytes) in appends.iter().enumerate() {
            data.write_all(bytes).unwrap();
            let record = Record {
                end: end + bytes.len() as u64,
                durable: durable(i, end),
                append_crc: crc32c::crc32c(bytes),
                point_crc: crc32c::crc32c_append(crc, bytes),
                behind: 0,
            };
            journal.write_all(&record.encode()).unwrap();
            end = record.end;
            crc = record.point_crc;
        }
        (journal, data)
    }

    fn appends() -> Vec<Vec<u8>> {
        (0..5u8)
            .map(|i| {
                (0..100 + u32::from(i) * 37)
                    .map(|j| (j * 7 + u32::from(i)) as u8)
                    .collect()
            })
            .collect()
    }

    #[test]
    fn intact_files_recover_fully() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        let (journal, data) = build(&slices, |_, _| 0);
        let r = recover(&journal, &data).unwrap();
        let all: Vec<u8> = appends.concat();
        assert_eq!(r.end, all.len() as u64);
        assert_eq!(r.point_crc, crc32c::crc32c(&all));
        assert_eq!(r.verified_bytes, all.len() as u64);
        assert_eq!(r.dropped_records, 0);
    }

    #[test]
    fn durable_prefix_is_not_reverified() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        // Every record written after an fsync of everything before it (fsync = always).
        let (journal, data) = build(&slices, |_, end_before| end_before);
        let r = recover(&journal, &data).unwrap();
        assert_eq!(r.verified_bytes, appends[4].len() as u64);
        assert_eq!(r.end, appends.concat().len() as u64);
    }

    #[test]
    fn torn_journal_tail_is_dropped() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        let (journal, data) = build(&slices, |_, _| 0);
        let len = journal.metadata().unwrap().len();
        journal.set_len(len - 5).unwrap();
        let r = recover(&journal, &data).unwrap();
        assert_eq!(r.end, appends[..4].concat().len() as u64);
        assert_eq!(r.journal_len, HEADER_LEN + 4 * RECORD_LEN);
    }

    #[test]
    fn corrupted_data_in_unsynced_append_is_cut() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        let (journal, data) = build(&slices, |_, _| 0);
        let offset = appends[..2].concat().len() as u64 + 3;
        data.write_all_at(&[0xAA ^ appends[2][3]], offset).unwrap();
        let r = recover(&journal, &data).unwrap();
        assert_eq!(r.end, appends[..2].concat().len() as u64);
        assert_eq!(r.dropped_records, 3);
    }

    #[test]
    fn truncated_data_file_falls_back_to_what_it_covers() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        let (journal, data) = build(&slices, |_, end_before| end_before);
        data.set_len(appends[..3].concat().len() as u64 + 1)
            .unwrap();
        let r = recover(&journal, &data).unwrap();
        assert_eq!(r.end, appends[..3].concat().len() as u64);
        assert_eq!(r.point_crc, crc32c::crc32c(&appends[..3].concat()));
    }

    #[test]
    fn the_record_at_or_before_an_offset_is_found() {
        let appends = appends();
        let slices: Vec<&[u8]> = appends.iter().map(Vec::as_slice).collect();
        let (journal, _) = build(&slices, |_, _| 0);
        let ends: Vec<u64> = (1..=appends.len())
            .map(|n| appends[..n].concat().len() as u64)
            .collect();
        let slots = ends.len() as u64;
        assert_eq!(
            record_at_or_before(&journal, slots, ends[0] - 1).unwrap(),
            None
        );
        for (index, &end) in ends.iter().enumerate() {
            for at in [end, end + 1] {
                let (found, record) = record_at_or_before(&journal, slots, at).unwrap().unwrap();
                if at == end || index + 1 == ends.len() || at < ends[index + 1] {
                    assert_eq!((found, record.end), (index as u64, end), "at {at}");
                }
            }
        }
        assert_eq!(
            record_at_or_before(&journal, slots, u64::MAX)
                .unwrap()
                .unwrap()
                .0,
            slots - 1
        );
        assert_eq!(
            record_at_or_before(&journal, slots, u64::MAX)
                .unwrap()
                .unwrap()
                .1
                .point_crc,
            crc32c::crc32c(&appends.concat())
        );
    }

    #[test]
    fn bad_header_is_refused_and_short_header_is_empty() {
        let (journal, data) = build(&[b"abc"], |_, _| 0);
        journal.write_all_at(b"X", 0).unwrap();
        assert!(matches!(
            recover(&journal, &data),
            Err(RecoveryError::BadHeader)
        ));
        journal.set_len(7).unwrap();
        assert_eq!(recover(&journal, &data).unwrap(), Recovered::default());
    }
}
