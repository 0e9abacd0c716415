//! `point.meta`: what a point knows about itself besides its bytes (its content type, its
//! ownership and handover record, its leader epochs), and the file that keeps it.
//!
//! The file holds two slots of equal size, each able to hold one whole record:
//!
//! ```text
//! slot:  magic "GTm1" | sequence u64 | length u32 | crc32c(sequence, length, body) u32 | body
//!        (the body is the record as JSON; the rest of the slot is zeros)
//! ```
//!
//! A new record goes into the slot that does not hold the newest one, with the next sequence,
//! and is synced there (`fdatasync`: the file keeps its size and blocks, so no directory and no
//! inode change has to be made durable). A crash in the middle of that write leaves a slot that
//! fails its checksum, and the other slot, untouched, still holds the record before it. Reading
//! takes the whole slot with the highest sequence. A record too large for its slot, a point
//! without the file, and a file in the earlier format (the JSON alone) get a whole new file:
//! written beside it, synced, renamed over it, its directory synced. So a data directory of an
//! earlier release opens unchanged, and each point moves to the slotted file the first time its
//! record changes (`docs/storage.md`, "`point.meta`").
//!
//! An ownership record is written three times on the old owner in a move of a point and twice
//! on the new one; rewritten in place, each costs one data sync instead of a new inode, a rename
//! and two syncs.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{Fsync, LeaderEpochs, Ownership, StorageError};

pub(super) const META_FILE: &str = "point.meta";

/// What a point knows about itself besides its bytes (`point.meta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Meta {
    /// The media type given with the point's first bytes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) content_type: Option<String>,
    /// Its epoch and handover (`ownership.rs`); absent in files written before epochs.
    #[serde(flatten)]
    pub(super) ownership: Ownership,
    /// Where each leader epoch began in it (`leader_epochs.rs`); absent until a second leader
    /// wrote it.
    #[serde(default, skip_serializing_if = "LeaderEpochs::is_empty")]
    pub(super) leader_epochs: LeaderEpochs,
}

const MAGIC: &[u8; 4] = b"GTm1";
/// Magic, sequence, length and checksum.
const SLOT_HEADER: usize = 4 + 8 + 4 + 4;
/// Slots are a whole number of sectors, so that writing one never rewrites a sector of the
/// other.
const SECTOR: usize = 512;

/// The newest whole record of a slotted file, and where it is.
#[derive(Debug, PartialEq, Eq)]
struct Newest<'a> {
    slot: usize,
    sequence: u64,
    body: &'a [u8],
}

/// Why the bytes of a `point.meta` give no record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum Unreadable {
    #[error("neither slot holds a whole record")]
    NoWholeSlot,
    #[error("a slotted file of {0} bytes (not two whole slots)")]
    Size(usize),
}

/// The point's `point.meta`, or the empty one if it has none.
pub(super) fn read_meta(dir: &Path) -> Result<Meta, StorageError> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => decode(&bytes, &path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
        Err(error) => Err(StorageError::io("reading", path)(error)),
    }
}

/// The record in the `point.meta` at `path`, as JSON, in either format: for tools and tests
/// that look into a data directory.
pub fn inspect(path: &Path) -> Result<serde_json::Value, StorageError> {
    let bytes = std::fs::read(path).map_err(StorageError::io("reading", path))?;
    decode(&bytes, path)
}

/// The record in `bytes`, read from the `point.meta` at `path`, in either format.
fn decode<T: DeserializeOwned>(bytes: &[u8], path: &Path) -> Result<T, StorageError> {
    let body = match is_earlier_format(bytes) {
        true => Ok(bytes),
        false => newest(bytes).map(|newest| newest.body),
    };
    body.map_err(std::io::Error::other)
        .and_then(|body| serde_json::from_slice(body).map_err(std::io::Error::other))
        .map_err(StorageError::io("decoding", path))
}

/// A file written before slots: the record's JSON alone (an object, so it begins with `{`; a
/// slot begins with its magic, or with what a torn write left, never with `{`).
fn is_earlier_format(bytes: &[u8]) -> bool {
    bytes.first() == Some(&b'{')
}

/// The slot holding the whole record with the highest sequence.
fn newest(bytes: &[u8]) -> Result<Newest<'_>, Unreadable> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(2 * SECTOR) {
        return Err(Unreadable::Size(bytes.len()));
    }
    let capacity = bytes.len() / 2;
    (0..2)
        .filter_map(|slot| {
            let at = &bytes[slot * capacity..(slot + 1) * capacity];
            let (sequence, body) = whole_record(at)?;
            Some(Newest {
                slot,
                sequence,
                body,
            })
        })
        .max_by_key(|newest| newest.sequence)
        .ok_or(Unreadable::NoWholeSlot)
}

/// The sequence and body of the record in `slot`, if it holds a whole one.
fn whole_record(slot: &[u8]) -> Option<(u64, &[u8])> {
    let header = slot.get(..SLOT_HEADER)?;
    if &header[..4] != MAGIC {
        return None;
    }
    let sequence = u64::from_le_bytes(header[4..12].try_into().ok()?);
    let length = u32::from_le_bytes(header[12..16].try_into().ok()?) as usize;
    let stored = u32::from_le_bytes(header[16..20].try_into().ok()?);
    let body = slot.get(SLOT_HEADER..SLOT_HEADER + length)?;
    (checksum(sequence, body) == stored).then_some((sequence, body))
}

fn checksum(sequence: u64, body: &[u8]) -> u32 {
    let crc = crc32c::crc32c(&sequence.to_le_bytes());
    let crc = crc32c::crc32c_append(crc, &(body.len() as u32).to_le_bytes());
    crc32c::crc32c_append(crc, body)
}

/// One slot of `capacity` bytes holding `body` at `sequence`.
fn encode_slot(sequence: u64, body: &[u8], capacity: usize) -> Vec<u8> {
    let mut slot = Vec::with_capacity(capacity);
    slot.extend_from_slice(MAGIC);
    slot.extend_from_slice(&sequence.to_le_bytes());
    slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
    slot.extend_from_slice(&checksum(sequence, body).to_le_bytes());
    slot.extend_from_slice(body);
    slot.resize(capacity, 0);
    slot
}

/// The slot size for a record of `length` bytes: whole sectors, with room for it to grow to
/// twice its size before the file is made again.
fn capacity_for(length: usize) -> usize {
    (SLOT_HEADER + 2 * length).div_ceil(SECTOR) * SECTOR
}

/// Makes `meta` the point's `point.meta` (synced unless `fsync = "never"`): in place, in the
/// slot not holding the newest record, when the file is slotted and the record fits; otherwise
/// as a new file renamed over it. The file is opened once, to read where the newest record is
/// and to write the other slot.
pub(super) fn write_meta(dir: &Path, meta: &Meta, fsync: Fsync) -> Result<(), StorageError> {
    let path = dir.join(META_FILE);
    let body = serde_json::to_vec(meta).expect("the meta of a point serializes");
    let write = || -> std::io::Result<()> {
        let mut file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return replace(dir, &path, &body, 1, fsync);
            }
            Err(error) => return Err(error),
        };
        let mut current = Vec::new();
        file.read_to_end(&mut current)?;
        // Where the newest whole record is; none in a file of the earlier format or with no
        // whole slot (both then get a new file).
        let slotted = match is_earlier_format(&current) {
            true => None,
            false => newest(&current).ok(),
        }
        .map(|newest| (newest.slot, newest.sequence, current.len() / 2));
        match slotted {
            Some((slot, sequence, capacity)) if SLOT_HEADER + body.len() <= capacity => {
                let record = encode_slot(sequence + 1, &body, capacity);
                file.write_all_at(&record, ((1 - slot) * capacity) as u64)?;
                if fsync != Fsync::Never {
                    file.sync_data()?;
                }
                Ok(())
            }
            _ => {
                let sequence = slotted.map_or(1, |(_, sequence, _)| sequence + 1);
                replace(dir, &path, &body, sequence, fsync)
            }
        }
    };
    write().map_err(StorageError::io("writing", path))
}

/// A new slotted file holding `body` at `sequence` in its first slot: written beside `path`,
/// synced, renamed over it, its directory synced (unless `fsync = "never"`).
fn replace(
    dir: &Path,
    path: &Path,
    body: &[u8],
    sequence: u64,
    fsync: Fsync,
) -> std::io::Result<()> {
    let capacity = capacity_for(body.len());
    let mut bytes = encode_slot(sequence, body, capacity);
    bytes.resize(2 * capacity, 0);
    let temporary = dir.join("point.meta.tmp");
    let mut file = File::create(&temporary)?;
    std::io::Write::write_all(&mut file, &bytes)?;
    if fsync != Fsync::Never {
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if fsync != Fsync::Never {
        super::files::sync_dir(dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::point::Handover;

    fn meta(epoch: u64) -> Meta {
        Meta {
            content_type: Some("video/mp4".into()),
            ownership: Ownership {
                epoch,
                owner: None,
                handover: Some(Handover::Copying {
                    to: "node-b".into(),
                    target_ring: epoch * 3,
                }),
            },
            leader_epochs: LeaderEpochs::default(),
        }
    }

    fn write(dir: &Path, meta: &Meta) {
        write_meta(dir, meta, Fsync::Always).unwrap();
    }

    fn decoded(bytes: &[u8]) -> Meta {
        decode(bytes, Path::new(META_FILE)).unwrap()
    }

    fn file(dir: &Path) -> Vec<u8> {
        std::fs::read(dir.join(META_FILE)).unwrap()
    }

    #[test]
    fn records_alternate_slots_and_the_newest_is_read() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), Meta::default());
        let inode = || {
            use std::os::unix::fs::MetadataExt;
            std::fs::metadata(dir.path().join(META_FILE)).unwrap().ino()
        };
        write(dir.path(), &meta(1));
        let made = inode();
        for epoch in 1..=5 {
            if epoch > 1 {
                write(dir.path(), &meta(epoch));
            }
            // The same file throughout: every record after the first was written in place.
            assert_eq!(inode(), made);
            assert_eq!(read_meta(dir.path()).unwrap(), meta(epoch));
            let bytes = file(dir.path());
            let newest = newest(&bytes).unwrap();
            assert_eq!(
                (newest.sequence, newest.slot),
                (epoch, (epoch as usize + 1) % 2)
            );
        }
        // The file kept its size, and no temporary file is left.
        assert_eq!(
            file(dir.path()).len(),
            2 * capacity_for(serde_json::to_vec(&meta(1)).unwrap().len())
        );
        assert!(!dir.path().join("point.meta.tmp").exists());
    }

    /// Every way a crash can leave the slot being written: cut after each byte (what is left
    /// of it is the new bytes up to there, then the old ones), or with a byte of it changed.
    #[test]
    fn a_torn_or_damaged_slot_reads_as_the_record_before_it() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &meta(1));
        write(dir.path(), &meta(2));
        let before = file(dir.path());
        write(dir.path(), &meta(3));
        let after = file(dir.path());
        let changed: Vec<usize> = (0..before.len())
            .filter(|&i| before[i] != after[i])
            .collect();
        assert!(!changed.is_empty());
        let body_end = *changed.last().unwrap();
        for cut in changed[0]..body_end {
            let mut torn = after.clone();
            torn[cut..=body_end].copy_from_slice(&before[cut..=body_end]);
            assert_eq!(decoded(&torn), meta(2), "cut at byte {cut}");
        }
        for &damaged in &changed {
            let mut torn = after.clone();
            torn[damaged] ^= 0x40;
            assert_eq!(decoded(&torn), meta(2), "byte {damaged} changed");
        }
        assert_eq!(decoded(&after), meta(3));
    }

    #[test]
    fn a_file_with_no_whole_slot_is_an_error_not_an_empty_record() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &meta(1));
        let mut bytes = file(dir.path());
        bytes[SLOT_HEADER] ^= 1;
        std::fs::write(dir.path().join(META_FILE), &bytes).unwrap();
        let error = read_meta(dir.path()).unwrap_err().to_string();
        assert!(
            error.contains("neither slot holds a whole record"),
            "{error}"
        );
        std::fs::write(dir.path().join(META_FILE), &bytes[..700]).unwrap();
        assert!(read_meta(dir.path()).is_err());
    }

    #[test]
    fn a_file_of_the_earlier_format_is_read_then_replaced_by_a_slotted_one() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = serde_json::to_vec(&meta(4)).unwrap();
        std::fs::write(dir.path().join(META_FILE), &earlier).unwrap();
        assert_eq!(read_meta(dir.path()).unwrap(), meta(4));
        write(dir.path(), &meta(5));
        let bytes = file(dir.path());
        assert_eq!(newest(&bytes).unwrap().sequence, 1);
        assert_eq!(read_meta(dir.path()).unwrap(), meta(5));
    }

    #[test]
    fn a_record_that_outgrows_its_slot_gets_a_larger_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &meta(1));
        let small = file(dir.path()).len();
        let mut large = meta(2);
        large.ownership.handover = Some(Handover::Sealed {
            to: "n".repeat(2 * small),
            end: 9,
            crc: 7,
            target_ring: 4,
        });
        write(dir.path(), &large);
        assert!(file(dir.path()).len() > small);
        assert_eq!(read_meta(dir.path()).unwrap(), large);
        // The sequence goes on from the file it replaced.
        assert_eq!(newest(&file(dir.path())).unwrap().sequence, 2);
        write(dir.path(), &meta(3));
        assert_eq!(read_meta(dir.path()).unwrap(), meta(3));
        assert_eq!(newest(&file(dir.path())).unwrap().sequence, 3);
    }
}
