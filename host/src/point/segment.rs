//! Small points packed into shared segment files: a point created with all it holds in one
//! batch of at most `storage.packed_max` bytes is written as one **needle** at the end of the
//! current segment (`<data_dir>/segments/<n>.seg`) instead of a directory and two files of its
//! own, and its catalogue row says where the needle is. A deletion appends a **removal** needle.
//! Segments are only appended to; a needle is never changed in place. Anything else a packed
//! point does first gives it files of its own (`entry.rs`, promotion).
//!
//! After a crash, the needles past what the last checkpoint's commit covered are read again
//! ([`Segments::open`]): the catalogue rebuilds their rows, and the first torn or damaged
//! needle ends the segment, which is cut back to it (`docs/storage.md`, "Small points packed
//! into segments"). A segment mostly dead is compacted: its live needles written again at the
//! end of the current one, then the file removed (`Store::compact`). Plain blocking I/O:
//! callers run it on the blocking pool.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::files::{count_sync, create_dirs, read_exact_at, sync_dir};
use super::journal::{RECORD_LEN, Record};
use super::{Fsync, PointId, StorageError};

/// A segment past this size is not written to any more: the next needle starts a new one.
pub(super) const SEGMENT_MAX: u64 = 1024 * 1024 * 1024;

/// The first bytes of every needle.
const MAGIC: &[u8; 4] = b"GTn1";

/// A needle's fixed header: magic, kind, a zero byte, the id's length (u16), the bytes' length
/// (u32), when it was written (Unix ms, u64), how many journal records follow the id (u32), and
/// the CRC32C of all of that, of the id and of the records. The bytes follow the records.
const HEADER_LEN: u64 = 4 + 1 + 1 + 2 + 4 + 8 + 4 + 4;

/// Where a packed point's bytes are: `len` bytes from `offset` in segment `segment`, after
/// the journal records of its appends (`records` of them, right before its bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Needle {
    pub(super) segment: u32,
    pub(super) offset: u64,
    pub(super) len: u64,
    pub(super) records: u32,
}

/// A place in the segments: `offset` bytes into segment `segment`. Ordered as written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(super) struct Position {
    pub(super) segment: u32,
    pub(super) offset: u64,
}

/// What a needle says happened to a point, found again after a crash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Event {
    /// The point was created with these bytes: the record of its last append, and when.
    Packed {
        needle: Needle,
        record: Record,
        written_ms: u64,
    },
    /// The point was deleted.
    Removed,
}

/// What a needle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Packed = 1,
    Removed = 2,
}

/// The segments of a store: the one written to, and every one read from.
pub(super) struct Segments {
    dir: PathBuf,
    fsync: Fsync,
    writer: Mutex<Writer>,
    /// How far the current segment is known synced (an earlier one is synced whole).
    synced: Mutex<Position>,
    files: RwLock<BTreeMap<u32, Arc<File>>>,
}

/// The segment written to, and its length: the next needle goes there.
struct Writer {
    number: u32,
    file: Arc<File>,
    len: u64,
}

impl Segments {
    /// Opens the segments in `dir` (creating it), and reads every needle from `covered` on:
    /// what the catalogue's last durable commit may not have (after a clean stop, nothing).
    /// A torn or damaged needle ends its segment, which is cut back to it. Blocking.
    pub(super) fn open(
        dir: &Path,
        fsync: Fsync,
        covered: Position,
    ) -> Result<(Segments, Vec<(PointId, Event)>), StorageError> {
        create_dirs(dir, fsync).map_err(StorageError::io("creating", dir))?;
        let mut numbers = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(StorageError::io("listing", dir))? {
            let entry = entry.map_err(StorageError::io("listing", dir))?;
            let name = entry.file_name();
            let number = name
                .to_str()
                .and_then(|name| name.strip_suffix(".seg"))
                .and_then(|number| number.parse::<u32>().ok());
            match number {
                Some(number) => numbers.push(number),
                None => tracing::warn!(file = ?name, "not a segment; left alone"),
            }
        }
        numbers.sort_unstable();
        let mut files = BTreeMap::new();
        let mut events = Vec::new();
        for &number in &numbers {
            let path = segment_path(dir, number);
            let file = open_segment(&path)?;
            if number >= covered.segment {
                let from = match number == covered.segment {
                    true => covered.offset,
                    false => 0,
                };
                let (found, end) = scan(&file, number, from, &path)?;
                events.extend(found);
                let len = file
                    .metadata()
                    .map_err(StorageError::io("inspecting", &path))?
                    .len();
                if end < len {
                    tracing::warn!(
                        segment = %path.display(), end, len,
                        "a needle was torn or damaged (a crash in its write): the segment is cut back to the needles before it"
                    );
                    file.set_len(end)
                        .and_then(|()| file.sync_all())
                        .map_err(StorageError::io("cutting back", &path))?;
                }
            }
            files.insert(number, Arc::new(file));
        }
        let (number, file) = match files.last_key_value() {
            Some((number, file)) => (*number, file.clone()),
            None => {
                let file = Arc::new(create_segment(dir, 1, fsync)?);
                files.insert(1, file.clone());
                (1, file)
            }
        };
        let len = file
            .metadata()
            .map_err(StorageError::io("inspecting", segment_path(dir, number)))?
            .len();
        let segments = Segments {
            dir: dir.to_owned(),
            fsync,
            writer: Mutex::new(Writer { number, file, len }),
            synced: Mutex::new(Position {
                segment: number,
                offset: len,
            }),
            files: RwLock::new(files),
        };
        Ok((segments, events))
    }

    /// Where the next needle goes: every needle before it is written (and `then` of
    /// [`pack`](Self::pack) ran for it).
    pub(super) fn position(&self) -> Position {
        let writer = self.writer.lock().expect("poisoned");
        Position {
            segment: writer.number,
            offset: writer.len,
        }
    }

    /// Writes `frames` of `id` as one needle with `records` (the journal record of each of
    /// its appends), then runs `then` with where the bytes are, before the next needle can be
    /// written (the catalogue puts the point's row with those waiting, so a checkpoint that
    /// finds the needle written finds its row too). Returns where the needle ends, for
    /// [`sync_to`](Self::sync_to). Nothing is synced here. A write the disk refuses leaves the
    /// segment as it was.
    pub(super) fn pack<T>(
        &self,
        id: &PointId,
        records: &[Record],
        frames: &[Bytes],
        written_ms: u64,
        then: impl FnOnce(Needle) -> T,
    ) -> Result<(Position, T), StorageError> {
        let len: u64 = frames.iter().map(|frame| frame.len() as u64).sum();
        let mut needle = encode_header(Kind::Packed, id, len, written_ms, records);
        let header = needle.len() as u64;
        needle.reserve(len as usize);
        for frame in frames {
            needle.extend_from_slice(frame);
        }
        let mut writer = self.writer.lock().expect("poisoned");
        let at = self.append(&mut writer, &needle)?;
        let placed = Needle {
            segment: writer.number,
            offset: at + header,
            len,
            records: records.len() as u32,
        };
        let then = then(placed);
        Ok((
            Position {
                segment: writer.number,
                offset: writer.len,
            },
            then,
        ))
    }

    /// Appends a removal needle for `id`: a crash after it does not bring back a packed point
    /// written before it. Synced with `fsync = "always"`.
    pub(super) fn remove(&self, id: &PointId) -> Result<(), StorageError> {
        let needle = encode_header(Kind::Removed, id, 0, 0, &[]);
        let end = {
            let mut writer = self.writer.lock().expect("poisoned");
            self.append(&mut writer, &needle)?;
            Position {
                segment: writer.number,
                offset: writer.len,
            }
        };
        match self.fsync {
            Fsync::Always => self.sync_to(end),
            Fsync::Interval | Fsync::Never => Ok(()),
        }
    }

    /// Writes `needle` at the end of the current segment (a new one first if it is full);
    /// where it starts.
    fn append(&self, writer: &mut Writer, needle: &[u8]) -> Result<u64, StorageError> {
        if writer.len >= SEGMENT_MAX {
            self.roll(writer)?;
        }
        let at = writer.len;
        if let Err(error) = writer.file.write_all_at(needle, at) {
            // Nothing of it stays (cutting needs no space); if even that fails, the next
            // needle is written over it, and a crash before then ends the segment there.
            let _ = writer.file.set_len(at);
            return Err(StorageError::io(
                "writing",
                segment_path(&self.dir, writer.number),
            )(error));
        }
        writer.len += needle.len() as u64;
        Ok(at)
    }

    /// Starts the next segment, the current one synced whole first, whatever `fsync` says: a
    /// checkpoint syncs only the current segment before its commit covers it (once a GiB).
    fn roll(&self, writer: &mut Writer) -> Result<(), StorageError> {
        sync_segment(&writer.file, &segment_path(&self.dir, writer.number))?;
        let number = writer.number + 1;
        let file = Arc::new(create_segment(&self.dir, number, self.fsync)?);
        self.files
            .write()
            .expect("poisoned")
            .insert(number, file.clone());
        *writer = Writer {
            number,
            file,
            len: 0,
        };
        Ok(())
    }

    /// Makes every needle before `end` durable: nothing to do if a sync since covered it;
    /// else the current segment is synced as far as it is written now, for every needle
    /// before (a group commit for every point packed at once).
    pub(super) fn sync_to(&self, end: Position) -> Result<(), StorageError> {
        let mut synced = self.synced.lock().expect("poisoned");
        if *synced >= end {
            return Ok(());
        }
        let (file, written) = {
            let writer = self.writer.lock().expect("poisoned");
            if writer.number > end.segment {
                // Synced whole when the next one began.
                return Ok(());
            }
            (
                writer.file.clone(),
                Position {
                    segment: writer.number,
                    offset: writer.len,
                },
            )
        };
        sync_segment(&file, &segment_path(&self.dir, written.segment))?;
        *synced = written;
        Ok(())
    }

    /// Makes every needle written so far durable (`fsync = "interval"`, and a clean stop).
    pub(super) fn sync(&self) -> Result<(), StorageError> {
        let end = self.position();
        self.sync_to(end)
    }

    /// The segment holding `needle`, to read from (it stays open while held).
    pub(super) fn file(&self, needle: &Needle) -> Result<Arc<File>, StorageError> {
        self.file_of(needle.segment)
    }

    /// The journal records of `needle`'s appends and its bytes, read in one call and checked
    /// against each other: the last record ends at the needle's length and carries the CRC of
    /// its bytes. What promotion and compaction copy elsewhere.
    pub(super) fn load(&self, needle: &Needle) -> Result<(Vec<Record>, Bytes), StorageError> {
        let damaged = || StorageError::Recovery {
            path: self.path(needle),
            source: super::journal::RecoveryError::PackedChecksum,
        };
        let file = self.file(needle)?;
        let records_len = u64::from(needle.records) * RECORD_LEN;
        let mut both = read_exact_at(
            &file,
            needle.offset - records_len,
            (records_len + needle.len) as usize,
        )
        .map_err(StorageError::io("reading", self.path(needle)))?;
        let bytes = both.split_off(records_len as usize);
        let records = decode_records(&both).ok_or_else(damaged)?;
        match records.last() {
            Some(last) if last.end == needle.len && last.point_crc == crc32c::crc32c(&bytes) => {
                Ok((records, bytes))
            }
            _ => Err(damaged()),
        }
    }

    /// The needles of segment `number`, from its start to its last whole one (a segment no
    /// longer written to: what compaction moves).
    pub(super) fn needles(&self, number: u32) -> Result<Vec<(PointId, Event)>, StorageError> {
        let file = self.file_of(number)?;
        let (needles, _) = scan(&file, number, 0, &segment_path(&self.dir, number))?;
        Ok(needles)
    }

    /// The length of every segment, and which one is written to.
    pub(super) fn lengths(&self) -> Result<(BTreeMap<u32, u64>, u32), StorageError> {
        let current = self.writer.lock().expect("poisoned").number;
        let files = self.files.read().expect("poisoned");
        let mut lengths = BTreeMap::new();
        for (number, file) in files.iter() {
            let len = file
                .metadata()
                .map_err(StorageError::io(
                    "inspecting",
                    segment_path(&self.dir, *number),
                ))?
                .len();
            lengths.insert(*number, len);
        }
        Ok((lengths, current))
    }

    /// Starts the next segment now if `number` is still the one written to (compaction of
    /// the current segment, once it is mostly dead).
    pub(super) fn roll_past(&self, number: u32) -> Result<(), StorageError> {
        let mut writer = self.writer.lock().expect("poisoned");
        match writer.number == number {
            true => self.roll(&mut writer),
            false => Ok(()),
        }
    }

    /// Removes segment `number`, which no row names any more (its readers keep their handle).
    pub(super) fn retire(&self, number: u32) -> Result<(), StorageError> {
        if self.writer.lock().expect("poisoned").number == number {
            return Ok(());
        }
        self.files.write().expect("poisoned").remove(&number);
        let path = segment_path(&self.dir, number);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StorageError::io("removing", path)(error)),
        }
        sync_dir(&self.dir).map_err(StorageError::io("syncing", &self.dir))
    }

    fn file_of(&self, number: u32) -> Result<Arc<File>, StorageError> {
        self.files
            .read()
            .expect("poisoned")
            .get(&number)
            .cloned()
            .ok_or_else(|| {
                StorageError::io("reading", segment_path(&self.dir, number))(std::io::Error::from(
                    std::io::ErrorKind::NotFound,
                ))
            })
    }

    /// The path of the segment holding `needle` (for errors).
    pub(super) fn path(&self, needle: &Needle) -> PathBuf {
        segment_path(&self.dir, needle.segment)
    }
}

/// The bytes a needle of `id` takes in its segment, header to its last byte.
pub(super) fn needle_size(id: &str, needle: &Needle) -> u64 {
    HEADER_LEN + id.len() as u64 + u64::from(needle.records) * RECORD_LEN + needle.len
}

/// Syncs a segment's bytes, counted with the syncs of points' files.
fn sync_segment(file: &File, path: &Path) -> Result<(), StorageError> {
    let started = std::time::Instant::now();
    file.sync_data()
        .map_err(StorageError::io("syncing", path))?;
    count_sync(started);
    Ok(())
}

/// The file of segment `number`.
fn segment_path(dir: &Path, number: u32) -> PathBuf {
    dir.join(format!("{number:08}.seg"))
}

fn open_segment(path: &Path) -> Result<File, StorageError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(StorageError::io("opening", path))
}

/// Creates segment `number`, its directory entry synced unless `fsync = "never"`.
fn create_segment(dir: &Path, number: u32, fsync: Fsync) -> Result<File, StorageError> {
    let path = segment_path(dir, number);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(StorageError::io("creating", &path))?;
    if fsync != Fsync::Never {
        sync_dir(dir).map_err(StorageError::io("syncing", dir))?;
    }
    Ok(file)
}

/// A needle's header, id and records.
fn encode_header(
    kind: Kind,
    id: &PointId,
    len: u64,
    written_ms: u64,
    records: &[Record],
) -> Vec<u8> {
    let id = id.as_str().as_bytes();
    let records: Vec<u8> = records.iter().flat_map(Record::encode).collect();
    let mut buf = Vec::with_capacity(HEADER_LEN as usize + id.len() + records.len());
    buf.extend_from_slice(MAGIC);
    buf.push(kind as u8);
    buf.push(0);
    buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
    buf.extend_from_slice(&(len as u32).to_le_bytes());
    buf.extend_from_slice(&written_ms.to_le_bytes());
    buf.extend_from_slice(&((records.len() as u64 / RECORD_LEN) as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c_append(crc32c::crc32c(&buf), id), &records);
    buf.extend_from_slice(&crc.to_le_bytes());
    buf.extend_from_slice(id);
    buf.extend_from_slice(&records);
    buf
}

/// The records in `bytes`, each checked (`None`: one is damaged).
fn decode_records(bytes: &[u8]) -> Option<Vec<Record>> {
    bytes
        .chunks_exact(RECORD_LEN as usize)
        .map(|record| Record::decode(record.try_into().expect("a whole record")))
        .collect()
}

/// Reads the needles of segment `number` from `from`: each whole one with valid checksums,
/// up to the first that is not (or the file's end). Returns them and where they end.
fn scan(
    file: &File,
    number: u32,
    from: u64,
    path: &Path,
) -> Result<(Vec<(PointId, Event)>, u64), StorageError> {
    let len = file
        .metadata()
        .map_err(StorageError::io("inspecting", path))?
        .len();
    let mut events = Vec::new();
    let mut at = from;
    while let Some((id, event, next)) = read_needle(file, number, at, len, path)? {
        events.push((id, event));
        at = next;
    }
    Ok((events, at.min(len)))
}

/// The needle at `at`, and where the next begins; `None` if there is no whole, valid one.
fn read_needle(
    file: &File,
    number: u32,
    at: u64,
    len: u64,
    path: &Path,
) -> Result<Option<(PointId, Event, u64)>, StorageError> {
    let read = |from: u64, count: u64| {
        read_exact_at(file, from, count as usize).map_err(StorageError::io("reading", path))
    };
    if at + HEADER_LEN > len {
        return Ok(None);
    }
    let header = read(at, HEADER_LEN)?;
    let field = |from: usize, to: usize| &header[from..to];
    let number_at =
        |from: usize| u32::from_le_bytes(field(from, from + 4).try_into().expect("four bytes"));
    if field(0, 4) != MAGIC {
        return Ok(None);
    }
    let kind = match header[4] {
        1 => Kind::Packed,
        2 => Kind::Removed,
        _ => return Ok(None),
    };
    let id_len = u64::from(u16::from_le_bytes(
        field(6, 8).try_into().expect("two bytes"),
    ));
    let bytes_len = u64::from(number_at(8));
    let written_ms = u64::from_le_bytes(field(12, 20).try_into().expect("eight bytes"));
    let count = number_at(20);
    let stored = number_at(24);
    let records_at = at + HEADER_LEN + id_len;
    let data_at = records_at + u64::from(count) * RECORD_LEN;
    let next = data_at + bytes_len;
    if next > len {
        return Ok(None);
    }
    let id_and_records = read(at + HEADER_LEN, data_at - at - HEADER_LEN)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(field(0, 24)), &id_and_records);
    if crc != stored {
        return Ok(None);
    }
    let (id_bytes, records) = id_and_records.split_at(id_len as usize);
    let Some(id) = std::str::from_utf8(id_bytes)
        .ok()
        .and_then(|id| PointId::new(id).ok())
    else {
        return Ok(None);
    };
    let event = match kind {
        Kind::Removed => Event::Removed,
        Kind::Packed => {
            let Some(last) = decode_records(records).and_then(|records| records.last().copied())
            else {
                return Ok(None);
            };
            let bytes = read(data_at, bytes_len)?;
            if last.end != bytes_len || crc32c::crc32c(&bytes) != last.point_crc {
                return Ok(None);
            }
            Event::Packed {
                needle: Needle {
                    segment: number,
                    offset: data_at,
                    len: bytes_len,
                    records: count,
                },
                record: last,
                written_ms,
            }
        }
    };
    Ok(Some((id, event, next)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(name: &str) -> PointId {
        PointId::new(name).unwrap()
    }

    /// A packed point's record: all of `bytes` in one append from nothing.
    fn record(bytes: &[u8]) -> Record {
        let crc = crc32c::crc32c(bytes);
        Record {
            end: bytes.len() as u64,
            durable: 0,
            append_crc: crc,
            point_crc: crc,
            behind: 0,
        }
    }

    fn frames(seed: u8, len: usize) -> Vec<Bytes> {
        let bytes: Vec<u8> = (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 7) as u8)
            .collect();
        vec![Bytes::from(bytes)]
    }

    /// Packs three points and removes one; returns where each ended.
    fn write_some(segments: &Segments) -> Vec<Position> {
        let mut ends = Vec::new();
        for (name, seed, len) in [("a", 1, 300), ("b", 2, 5000), ("c", 3, 1)] {
            let frames = frames(seed, len);
            let (end, ()) = segments
                .pack(&id(name), &[record(&frames[0])], &frames, 7, |_| ())
                .unwrap();
            ends.push(end);
        }
        segments.remove(&id("b")).unwrap();
        ends.push(segments.position());
        ends
    }

    #[test]
    fn needles_are_read_back_in_order_from_any_covered_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segments");
        let (segments, found) = Segments::open(&path, Fsync::Always, Position::default()).unwrap();
        assert!(found.is_empty());
        let ends = write_some(&segments);
        drop(segments);
        let (_, found) = Segments::open(&path, Fsync::Always, Position::default()).unwrap();
        let names: Vec<(&str, bool)> = found
            .iter()
            .map(|(id, event)| (id.as_str(), matches!(event, Event::Removed)))
            .collect();
        assert_eq!(
            names,
            [("a", false), ("b", false), ("c", false), ("b", true)]
        );
        let Event::Packed {
            needle,
            record: r,
            written_ms,
        } = &found[1].1
        else {
            panic!("b is packed")
        };
        assert_eq!(*written_ms, 7);
        assert_eq!(*r, record(&frames(2, 5000)[0]));
        let (segments, after_a) = Segments::open(&path, Fsync::Always, ends[0]).unwrap();
        assert_eq!(after_a.len(), 3);
        let (records, bytes) = segments.load(needle).unwrap();
        assert_eq!(records, [*r]);
        assert_eq!(bytes, frames(2, 5000)[0]);
        let (_, none) = Segments::open(&path, Fsync::Always, ends[3]).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn a_needle_cut_or_damaged_anywhere_ends_the_segment_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segments");
        let (segments, _) = Segments::open(&path, Fsync::Never, Position::default()).unwrap();
        let ends = write_some(&segments);
        drop(segments);
        let file = segment_path(&path, 1);
        let whole = std::fs::read(&file).unwrap();
        // The second needle ("b", 5,000 bytes) cut after each of its bytes (every 97th, and
        // the last ones), then each byte changed: only "a" is left, and the file ends after it.
        let (start, end) = (ends[0].offset, ends[1].offset);
        let cuts = (start..end).step_by(97).chain(end - 3..end);
        for cut in cuts {
            std::fs::write(&file, &whole[..cut as usize]).unwrap();
            let (_, found) = Segments::open(&path, Fsync::Never, Position::default()).unwrap();
            assert_eq!(found.len(), 1, "cut at {cut}");
            assert_eq!(std::fs::metadata(&file).unwrap().len(), start);
        }
        for flip in (start..end).step_by(41).chain(end - 1..end) {
            let mut damaged = whole.clone();
            damaged[flip as usize] ^= 0x20;
            std::fs::write(&file, &damaged).unwrap();
            let (_, found) = Segments::open(&path, Fsync::Never, Position::default()).unwrap();
            assert_eq!(found.len(), 1, "byte {flip} changed");
            assert_eq!(std::fs::metadata(&file).unwrap().len(), start);
        }
    }

    #[test]
    fn a_full_segment_starts_the_next_and_both_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("segments");
        let (segments, _) = Segments::open(&path, Fsync::Always, Position::default()).unwrap();
        write_some(&segments);
        // As if the segment had grown to its limit.
        segments.writer.lock().unwrap().len = SEGMENT_MAX;
        let frames = frames(9, 100);
        let (end, needle) = segments
            .pack(&id("d"), &[record(&frames[0])], &frames, 0, |needle| needle)
            .unwrap();
        assert_eq!(end.segment, 2);
        segments.sync_to(end).unwrap();
        assert_eq!(segments.load(&needle).unwrap().1, frames[0]);
        drop(segments);
        // The first file really ends where its last needle does; reopened, all are found.
        let (_, found) = Segments::open(&path, Fsync::Always, Position::default()).unwrap();
        let names: Vec<&str> = found.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "b", "d"]);
    }
}
