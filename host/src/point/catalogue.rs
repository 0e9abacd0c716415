//! The catalogue: one row per point the store holds, with what `stat`, `ls` and routing need
//! (its end and CRC32C, committed end, content type, ownership, leader epochs, last write), in
//! an embedded, crash-safe B-tree (redb). Start-up reads no point, `stat` of a point at rest
//! opens none of its files, `ls` is a range of the tree, and memory holds only points in use.
//!
//! A point's own files stay the truth; its row is derived from them and rewritten when the
//! point closes. Rows are written to the B-tree in batches without a sync, and made durable
//! together at each checkpoint (every [`CHECKPOINT_EVERY`], and when the store closes). What a crash
//! may leave behind a row is named by the touch log: before a point's files are opened (the
//! only way they change) or removed, its id is appended to the current log, and a checkpoint
//! starts a new log holding every point still open before it commits and removes the old one.
//! At start-up, each point a log names gets its row from its files again on first use, or
//! loses it if its files are gone (`docs/storage.md`, "The catalogue").

use std::collections::{BTreeMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use serde::{Deserialize, Serialize};

use bytes::Bytes;

use super::files::{JOURNAL_FILE, scan, segments_dir, sync_dir};
use super::journal::Record;
use super::meta::{Meta, read_meta};
use super::row_bytes::encode;
use super::segment::{Event, Needle, Position, Segments};
use super::{Fsync, Handover, PointId, Snapshot, StorageError, Summary};

/// How often rows become durable and the touch log starts again.
pub(super) const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// The B-tree's file, in the catalogue's directory.
const TREE_FILE: &str = "points.redb";

/// The table of rows: a point's id to its [`Row`] (JSON).
const POINTS: TableDefinition<&str, &[u8]> = TableDefinition::new("points");

/// The table of rows as one read of the B-tree sees it.
type RowsRead = ReadOnlyTable<&'static str, &'static [u8]>;

/// The ids of the points whose row has a handover record (`ownership.rs`): what the mover's
/// cleanup and planning look at, without a walk over every point.
const HANDOVERS: TableDefinition<&str, ()> = TableDefinition::new("handovers");

/// The ids of the points whose handover is under way (copying, sealed or incoming; not
/// moved): what the mover plans with after every move, so a drain does not read back every
/// point it handed over and not yet cleaned up, once per move.
const UNDER_WAY: TableDefinition<&str, ()> = TableDefinition::new("handovers-under-way");

/// How far the segments are covered by the rows of a durable commit ([`Position`], JSON,
/// under [`COVERED_KEY`]): after a crash, the needles from there on are read again.
const SEGMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("segments");
const COVERED_KEY: &str = "covered";

/// The bytes of each segment that rows name (live needles), kept with the rows (`Tables::put`):
/// a segment mostly dead is compacted ([`Catalogue::compactable`]).
const SEGMENT_LIVE: TableDefinition<u32, u64> = TableDefinition::new("segments-live");

/// A segment is compacted once less than this share of it is live.
const COMPACT_BELOW_LIVE: f64 = 0.5;

/// The segment written to is compacted (the next begun first) only past this size.
const COMPACT_CURRENT_FROM: u64 = 64 * 1024 * 1024;

/// Which points in a handover [`Catalogue::handovers`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Handovers {
    /// Every one, handed over (moved) included.
    All,
    /// Those whose handover is under way: copying, sealed or incoming.
    UnderWay,
}

impl Handovers {
    /// Whether a point in `handover` is named.
    fn names(self, handover: &Handover) -> bool {
        match self {
            Handovers::All => true,
            Handovers::UnderWay => handover.is_under_way(),
        }
    }

    fn table(self) -> TableDefinition<'static, &'static str, ()> {
        match self {
            Handovers::All => HANDOVERS,
            Handovers::UnderWay => UNDER_WAY,
        }
    }
}

/// The B-tree's page cache: rows of points in use stay in memory, the rest are read back.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// What the catalogue knows of one point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Row {
    /// Its end, CRC32C, committed end and its CRC32C ([`super::Snapshot`]).
    pub(super) end: u64,
    pub(super) crc: u32,
    pub(super) committed: u64,
    pub(super) committed_crc: u32,
    /// How much of it is known to be synced.
    pub(super) durable: u64,
    /// The length of its journal, and the committed end its last record says: a point whose
    /// files still match them opens without recovery.
    pub(super) journal_len: u64,
    pub(super) recorded_committed: u64,
    /// When it last grew (Unix ms; 0: not known, its data file's time is read).
    pub(super) modified_ms: u64,
    /// Its `point.meta`.
    pub(super) meta: Meta,
    /// The media type its first bytes look like, once sniffed (`Store::media_type`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) sniffed: Option<String>,
    /// Where its bytes are, if it is packed in a segment (`segment.rs`): it has no files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) needle: Option<Needle>,
    /// Its files may differ from the above (a crash came while it was open, or it came from a
    /// directory written before the catalogue): it is recovered from them on first use.
    pub(super) stale: bool,
}

impl Row {
    /// Whether the point is part of a handover (`ownership.rs`).
    fn in_handover(&self) -> bool {
        self.meta.ownership.handover.is_some()
    }

    /// Whether its handover is under way (not moved).
    fn under_way(&self) -> bool {
        self.meta
            .ownership
            .handover
            .as_ref()
            .is_some_and(Handover::is_under_way)
    }

    /// The handover the point is part of, if any.
    fn handover(&self) -> Option<Handover> {
        self.meta.ownership.handover.clone()
    }

    /// The snapshot a point at rest has (its row not stale).
    pub(super) fn snapshot(&self) -> Snapshot {
        Snapshot {
            end: self.end,
            crc: self.crc,
            committed: self.committed,
            committed_crc: self.committed_crc,
            deleted: false,
            arriving: self.meta.ownership.is_arriving(),
        }
    }

    /// The row of a packed point found again in its segment after a crash: its end and CRC32C
    /// from its needle's record, committed as far as the record says (all of it, or nothing).
    fn packed(needle: Needle, record: &Record, written_ms: u64) -> Row {
        let (committed, committed_crc) = match record.behind {
            0 => (record.end, record.point_crc),
            _ => (0, 0),
        };
        Row {
            end: record.end,
            crc: record.point_crc,
            committed,
            committed_crc,
            durable: record.durable,
            recorded_committed: committed,
            modified_ms: written_ms,
            needle: Some(needle),
            ..Row::default()
        }
    }

    /// The row of a point known only by its files.
    fn stale(meta: Meta) -> Row {
        Row {
            meta,
            stale: true,
            ..Row::default()
        }
    }
}

/// The catalogue of a store; see the module's documentation.
pub(super) struct Catalogue {
    db: RwLock<Tree>,
    /// Where the B-tree is (`dir/`[`TREE_FILE`]).
    path: PathBuf,
    /// One read of the rows, shared by the lookups of single rows ([`row`](Self::row)) until
    /// the next write commits: a point's creation looks its row up two or three times, and a
    /// read transaction of its own for each cost more than the lookup. Let go of after every
    /// commit of rows, before they leave `pending`, so a lookup that misses them there finds
    /// them here; and when the tree is lost or closed.
    rows_read: Mutex<Option<Arc<RowsRead>>>,
    dir: PathBuf,
    fsync: Fsync,
    log: Mutex<TouchLog>,
    /// How far the touch log is known to be synced; held through its sync, so that points
    /// touched at once share one (a group commit, `touch`).
    log_synced: Mutex<Synced>,
    /// Held through a checkpoint (one at a time; tests hold it to copy a crash image).
    checkpointing: Mutex<()>,
    /// Rows written and not in the B-tree yet (`None`: a row taken away), read before it:
    /// written to it together, [`FLUSH_ROWS`] at a time or at the next checkpoint, so that a
    /// point's creation or closing costs no transaction of its own.
    pending: Mutex<BTreeMap<PointId, Option<Row>>>,
    /// Held through a flush, so that an older batch never lands over a newer one.
    flushing: Mutex<()>,
    /// Rows written to the B-tree without a sync since the last checkpoint: if it is lost
    /// (a failed write), they wait again in `pending`.
    unsynced: Mutex<BTreeMap<PointId, Option<Row>>>,
    /// The packed points' bytes ([`Catalogue::pack`]).
    segments: Segments,
    /// How far the last durable commit covers the segments.
    covered: Mutex<Position>,
}

/// The B-tree, as the catalogue holds it.
enum Tree {
    Open(Database),
    /// A write to it failed (a full disk): redb refuses everything after an I/O error, so it
    /// is opened again at its next use, as it was at its last checkpoint.
    Lost,
    /// The store closed (it may be opened again in this process).
    Closed,
}

/// Most rows waiting for the B-tree before they are written to it.
const FLUSH_ROWS: usize = 4096;

/// The current touch log and what it, and the store, know about touched points.
struct TouchLog {
    file: Arc<File>,
    /// How much of the file holds whole records: the next one is written there (over what a
    /// failed write left behind).
    len: u64,
    generation: u64,
    /// Points named in the current log (durably, unless `fsync = "never"`).
    named: HashSet<PointId>,
    /// Points touched whose row is not rewritten yet (open, or being removed): carried into
    /// the next log at a checkpoint.
    unsettled: HashSet<PointId>,
}

/// The end of the touch log known to be synced: records before `len` in the log of
/// `generation` are durable, and so is every record of an older log (a new log is synced with
/// the ids it carries before it is used).
#[derive(Debug, Clone, Copy)]
struct Synced {
    generation: u64,
    len: u64,
}

impl Catalogue {
    /// Opens the catalogue in `dir` for the points in `points`. On first start over points
    /// written before the catalogue, finds them once (a walk of `points`) and gives each a
    /// row recovered on first use. After a crash, the points named in the touch logs get theirs
    /// again from their files. Blocking.
    pub(super) fn open(dir: &Path, points: &Path, fsync: Fsync) -> Result<Catalogue, StorageError> {
        std::fs::create_dir_all(dir).map_err(StorageError::io("creating", dir))?;
        let path = dir.join(TREE_FILE);
        let existed = path.exists();
        Self::start(open_tree(&path)?, existed, dir, points, fsync)
    }

    /// [`open`](Self::open) on a B-tree opened already (`existed`: found, not created).
    fn start(
        db: Database,
        existed: bool,
        dir: &Path,
        points: &Path,
        fsync: Fsync,
    ) -> Result<Catalogue, StorageError> {
        let path = dir.join(TREE_FILE);
        let indexed = {
            let read = db.begin_read().map_err(catalogue_error("reading", &path))?;
            let mut indexed = true;
            for table in [HANDOVERS, UNDER_WAY] {
                match read.open_table(table) {
                    Ok(_) => {}
                    Err(redb::TableError::TableDoesNotExist(_)) => indexed = false,
                    Err(error) => return Err(catalogue_error("reading", &path)(error)),
                }
            }
            indexed
        };
        {
            let write = db
                .begin_write()
                .map_err(catalogue_error("writing", &path))?;
            {
                let mut tables = Tables::open(&write, &path)?;
                if existed && !indexed {
                    // A catalogue from before the handover indexes: built once.
                    tables.index_handovers()?;
                }
            }
            write.commit().map_err(catalogue_error("writing", &path))?;
        }
        if !existed {
            migrate(&db, &path, points)?;
        }
        let covered = {
            let read = db.begin_read().map_err(catalogue_error("reading", &path))?;
            let table = read
                .open_table(SEGMENTS)
                .map_err(catalogue_error("reading", &path))?;
            let covered = table
                .get(COVERED_KEY)
                .map_err(catalogue_error("reading", &path))?;
            match covered {
                Some(covered) => serde_json::from_slice(covered.value()).map_err(|error| {
                    StorageError::io("decoding the segments covered in", &path)(
                        std::io::Error::other(error),
                    )
                })?,
                None => Position::default(),
            }
        };
        let (segments, events) = Segments::open(&segments_dir(points), fsync, covered)?;
        let logs = touch_logs(dir)?;
        let touched: HashSet<PointId> = logs
            .iter()
            .map(|(_, path)| read_touch_log(path))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .collect();
        if !touched.is_empty() || !events.is_empty() {
            tracing::info!(
                points = touched.len(),
                needles = events.len(),
                "the store did not stop cleanly: the points it had open are recovered on first use"
            );
            // What each needle past the covered position says last.
            let last: BTreeMap<PointId, Event> = events.into_iter().collect();
            let ids: std::collections::BTreeSet<&PointId> =
                touched.iter().chain(last.keys()).collect();
            let write = db
                .begin_write()
                .map_err(catalogue_error("writing", &path))?;
            {
                let mut tables = Tables::open(&write, &path)?;
                for id in ids {
                    let point_dir = points.join(id.relative_dir());
                    let row = match (point_dir.join(JOURNAL_FILE).exists(), last.get(id)) {
                        // Its files were made after any needle of it (a promotion).
                        (true, _) => Some(Row::stale(read_meta(&point_dir)?)),
                        (
                            false,
                            Some(Event::Packed {
                                needle,
                                record,
                                written_ms,
                            }),
                        ) => Some(Row::packed(*needle, record, *written_ms)),
                        (false, Some(Event::Removed)) => None,
                        // Packed before the covered position, and not removed since (a
                        // promotion the crash interrupted before its files were in place).
                        (false, None) => match tables.get(id)? {
                            Some(row) if row.needle.is_some() => continue,
                            _ => None,
                        },
                    };
                    tables.put(id, row.as_ref())?;
                }
            }
            write.commit().map_err(catalogue_error("writing", &path))?;
        }
        let generation = logs.last().map_or(0, |(generation, _)| generation + 1);
        let (file, len) = create_touch_log(dir, generation, [], fsync)?;
        remove_touch_logs_before(dir, generation)?;
        Ok(Catalogue {
            db: RwLock::new(Tree::Open(db)),
            path,
            rows_read: Mutex::new(None),
            dir: dir.to_owned(),
            fsync,
            log: Mutex::new(TouchLog {
                file: Arc::new(file),
                len,
                generation,
                named: HashSet::new(),
                unsettled: HashSet::new(),
            }),
            log_synced: Mutex::new(Synced { generation, len }),
            checkpointing: Mutex::new(()),
            pending: Mutex::default(),
            flushing: Mutex::new(()),
            unsynced: Mutex::default(),
            segments,
            covered: Mutex::new(covered),
        })
    }

    /// The segments the packed points are in.
    pub(super) fn segments(&self) -> &Segments {
        &self.segments
    }

    /// Writes a new point's `frames` as one needle in the current segment, and `row` (its
    /// needle filled in) with the rows waiting, before the next needle can be written: a
    /// checkpoint that covers the needle commits its row. Synced with `fsync = "always"`
    /// (one sync for every point packed meanwhile). Returns where the bytes are, and whether
    /// a [`flush`](Self::flush) is due. Blocking.
    pub(super) fn pack(
        &self,
        id: &PointId,
        mut row: Row,
        records: &[Record],
        frames: &[Bytes],
    ) -> Result<(Needle, bool), StorageError> {
        let (end, (needle, due)) =
            self.segments
                .pack(id, records, frames, row.modified_ms, |needle| {
                    row.needle = Some(needle);
                    (needle, self.write(id, Some(row)))
                })?;
        if self.fsync == Fsync::Always
            && let Err(error) = self.segments.sync_to(end)
        {
            // Not acknowledged: not listed either.
            self.write(id, None);
            return Err(error);
        }
        Ok((needle, due))
    }

    /// Writes packed point `id`'s needle `from` again at the end of the current segment, with
    /// `row` naming the copy (compaction; the caller holds the point's lock and `row` is its
    /// row as it is). The old needle's bytes are checked first. Not synced: the old needle
    /// stays the durable one until the checkpoint that ends the compaction. Returns the copy,
    /// and whether a flush is due. Blocking.
    pub(super) fn repack(
        &self,
        id: &PointId,
        mut row: Row,
        from: Needle,
    ) -> Result<(Needle, bool), StorageError> {
        let (records, bytes) = self.segments.load(&from)?;
        let (_, moved) = self.segments.pack(
            id,
            &records,
            std::slice::from_ref(&bytes),
            row.modified_ms,
            |needle| {
                row.needle = Some(needle);
                (needle, self.write(id, Some(row)))
            },
        )?;
        Ok(moved)
    }

    /// The segment most worth compacting, if any: less than half of it live, and wholly
    /// covered by the last durable commit (no needle of it is read again after a crash). The
    /// one written to counts once it is past [`COMPACT_CURRENT_FROM`], or, smaller, once none
    /// of it is live and the last durable commit covers it to its end (every point packed in
    /// it was removed: its space is given back however little was written). The next is begun
    /// first. Blocking.
    pub(super) fn compactable(&self) -> Result<Option<u32>, StorageError> {
        let (lengths, current) = self.segments.lengths()?;
        let covered = *self.covered.lock().expect("poisoned");
        let live: BTreeMap<u32, u64> = self.with_db(|db, path| {
            let read = db.begin_read().map_err(catalogue_error("reading", path))?;
            let table = read
                .open_table(SEGMENT_LIVE)
                .map_err(catalogue_error("reading", path))?;
            let mut live = BTreeMap::new();
            for entry in table.iter().map_err(catalogue_error("reading", path))? {
                let (segment, bytes) = entry.map_err(catalogue_error("reading", path))?;
                live.insert(segment.value(), bytes.value());
            }
            Ok(live)
        })?;
        let live_in = |number: u32| live.get(&number).copied().unwrap_or(0);
        let worth = lengths
            .into_iter()
            .filter(|&(number, len)| match number == current {
                true => {
                    let all_dead = live_in(number) == 0
                        && covered
                            == Position {
                                segment: number,
                                offset: len,
                            };
                    len > 0 && (len >= COMPACT_CURRENT_FROM || all_dead)
                }
                false => number < covered.segment && len > 0,
            })
            .map(|(number, len)| (number, live_in(number) as f64 / len as f64))
            .filter(|&(_, share)| share < COMPACT_BELOW_LIVE)
            .min_by(|a, b| a.1.total_cmp(&b.1));
        Ok(worth.map(|(number, _)| number))
    }

    /// Gets segment `number` ready for compaction: if it is the one written to, the next is
    /// begun and a checkpoint covers it whole. Blocking.
    pub(super) fn seal_segment(&self, number: u32) -> Result<(), StorageError> {
        let covered = *self.covered.lock().expect("poisoned");
        if number < covered.segment {
            return Ok(());
        }
        self.segments.roll_past(number)?;
        self.checkpoint(false)
    }

    /// Removes segment `number`, compacted: every needle a row named was written again and
    /// made durable by a checkpoint since. Blocking.
    pub(super) fn retire_segment(&self, number: u32) -> Result<(), StorageError> {
        self.segments.retire(number)?;
        self.with_db(|db, path| {
            let write = db.begin_write().map_err(catalogue_error("writing", path))?;
            {
                let mut live = write
                    .open_table(SEGMENT_LIVE)
                    .map_err(catalogue_error("writing", path))?;
                live.remove(number)
                    .map_err(catalogue_error("writing", path))?;
            }
            write.commit().map_err(catalogue_error("writing", path))
        })
    }

    /// Runs `op` on the B-tree (opened again first if a write lost it), unless the store
    /// closed.
    fn with_db<T>(
        &self,
        op: impl FnOnce(&Database, &Path) -> Result<T, StorageError>,
    ) -> Result<T, StorageError> {
        let path = &self.path;
        if matches!(*self.db.read().expect("poisoned"), Tree::Lost) {
            let mut tree = self.db.write().expect("poisoned");
            if matches!(*tree, Tree::Lost) {
                *tree = Tree::Open(open_tree(path)?);
                tracing::info!(path = %path.display(), "the catalogue is open again");
            }
        }
        match &*self.db.read().expect("poisoned") {
            Tree::Open(db) => op(db, path),
            Tree::Lost | Tree::Closed => Err(StorageError::io("using", path)(
                std::io::Error::other("the store is closed"),
            )),
        }
    }

    /// The shared read of the rows (`rows_read`), begun if there is none.
    fn read_rows(&self, db: &Database, path: &Path) -> Result<Arc<RowsRead>, StorageError> {
        let mut shared = self.rows_read.lock().expect("poisoned");
        if let Some(read) = &*shared {
            return Ok(read.clone());
        }
        let read = db.begin_read().map_err(catalogue_error("reading", path))?;
        let table = Arc::new(
            read.open_table(POINTS)
                .map_err(catalogue_error("reading", path))?,
        );
        *shared = Some(table.clone());
        Ok(table)
    }

    /// Lets go of the shared read of the rows: a write committed, or the tree is going (the
    /// caller holds it for writing then, so no lookup holds the read meanwhile).
    fn forget_rows_read(&self) {
        *self.rows_read.lock().expect("poisoned") = None;
    }

    /// After a write to the B-tree failed: closed (redb refuses every later use), to be opened
    /// again at its next use; the rows written to it since the last checkpoint, which it will
    /// not have then, wait again with the rest.
    fn lose_tree(&self, error: &StorageError) {
        tracing::error!(%error, "a write to the catalogue failed; it is opened again at its next use");
        let mut tree = self.db.write().expect("poisoned");
        if let Tree::Open(_) = *tree {
            // Its reads first: the file is opened again only once nothing holds it.
            self.forget_rows_read();
            *tree = Tree::Lost;
        }
        drop(tree);
        let unsynced = std::mem::take(&mut *self.unsynced.lock().expect("poisoned"));
        let mut pending = self.pending.lock().expect("poisoned");
        for (id, row) in unsynced {
            pending.entry(id).or_insert(row);
        }
    }

    /// The row of `id`, if the store holds it.
    pub(super) fn row(&self, id: &PointId) -> Result<Option<Row>, StorageError> {
        if let Some(row) = self.pending.lock().expect("poisoned").get(id) {
            return Ok(row.clone());
        }
        self.with_db(|db, path| {
            let table = self.read_rows(db, path)?;
            let row = table
                .get(id.as_str())
                .map_err(catalogue_error("reading", path))?;
            row.map(|row| decode(row.value(), path)).transpose()
        })
    }

    /// Ids in ascending byte order that start with `prefix` and sort after `start_after`, at
    /// most `max`: the B-tree's range and the rows waiting for it, merged.
    pub(super) fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<PointId>, StorageError> {
        use std::ops::Bound;
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after),
            _ => Bound::Included(prefix),
        };
        let in_range = |id: &str| match lower {
            Bound::Excluded(after) => id > after,
            _ => id >= prefix,
        };
        // Rows waiting: taken away ones hide the B-tree's, new ones join it.
        let pending: BTreeMap<String, bool> = self
            .pending
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|(id, _)| in_range(id.as_str()) && id.as_str().starts_with(prefix))
            .map(|(id, row)| (id.as_str().to_owned(), row.is_some()))
            .collect();
        self.with_db(|db, path| {
            let read = db.begin_read().map_err(catalogue_error("reading", path))?;
            let table = read
                .open_table(POINTS)
                .map_err(catalogue_error("reading", path))?;
            let range = table
                .range((lower, Bound::<&str>::Unbounded))
                .map_err(catalogue_error("reading", path))?;
            let mut stored = Vec::new();
            for row in range {
                if stored.len() == max.saturating_add(pending.len()) {
                    break;
                }
                let (id, _) = row.map_err(catalogue_error("reading", path))?;
                let id = id.value();
                if !id.starts_with(prefix) {
                    break;
                }
                stored.push(id.to_owned());
            }
            let mut ids: Vec<String> = stored
                .into_iter()
                .filter(|id| !pending.contains_key(id))
                .chain(
                    pending
                        .iter()
                        .filter(|(_, held)| **held)
                        .map(|(id, _)| id.clone()),
                )
                .collect();
            ids.sort();
            ids.truncate(max);
            Ok(ids
                .into_iter()
                .filter_map(|id| PointId::new(id).ok())
                .collect())
        })
    }

    /// The points whose row has a handover record (`which` of them), with it, in ascending
    /// order: the rows the index names, merged with the rows waiting (a row is written whenever
    /// a point's record changes, so it is current for open points too).
    pub(super) fn handovers(
        &self,
        which: Handovers,
    ) -> Result<Vec<(PointId, Handover)>, StorageError> {
        let pending: BTreeMap<PointId, Option<Handover>> = self
            .pending
            .lock()
            .expect("poisoned")
            .iter()
            .map(|(id, row)| (id.clone(), row.as_ref().and_then(Row::handover)))
            .collect();
        let mut handovers = self.with_db(|db, path| {
            let read = db.begin_read().map_err(catalogue_error("reading", path))?;
            let index = read
                .open_table(which.table())
                .map_err(catalogue_error("reading", path))?;
            let rows = read
                .open_table(POINTS)
                .map_err(catalogue_error("reading", path))?;
            let mut found = Vec::new();
            for entry in index.iter().map_err(catalogue_error("reading", path))? {
                let (id, _) = entry.map_err(catalogue_error("reading", path))?;
                let Ok(id) = PointId::new(id.value()) else {
                    continue;
                };
                if pending.contains_key(&id) {
                    continue;
                }
                let row = rows
                    .get(id.as_str())
                    .map_err(catalogue_error("reading", path))?;
                if let Some(handover) = row
                    .map(|row| decode(row.value(), path))
                    .transpose()?
                    .and_then(|row| row.handover())
                {
                    found.push((id, handover));
                }
            }
            Ok(found)
        })?;
        handovers.extend(
            pending
                .into_iter()
                .filter_map(|(id, handover)| Some((id, handover?)))
                .filter(|(_, handover)| which.names(handover)),
        );
        handovers.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(handovers)
    }

    /// Every point with a row: the summary of each from its row, in one read of the B-tree
    /// (and the rows waiting; not in order, `Store::summaries` sorts once with the rest). The points to be asked themselves are named
    /// apart: those in `in_use` (their row may be behind them) and those whose row is stale
    /// (their files are the truth until they are recovered).
    pub(super) fn summaries(
        &self,
        in_use: &HashSet<PointId>,
    ) -> Result<(Vec<Summary>, Vec<PointId>), StorageError> {
        let pending = self.pending.lock().expect("poisoned").clone();
        let rows = self.with_db(|db, path| {
            let read = db.begin_read().map_err(catalogue_error("reading", path))?;
            let table = read
                .open_table(POINTS)
                .map_err(catalogue_error("reading", path))?;
            let mut rows = Vec::new();
            for entry in table.iter().map_err(catalogue_error("reading", path))? {
                let (id, row) = entry.map_err(catalogue_error("reading", path))?;
                let Ok(id) = PointId::new(id.value()) else {
                    continue;
                };
                if pending.contains_key(&id) {
                    continue;
                }
                rows.push((id, decode(row.value(), path)?));
            }
            Ok(rows)
        })?;
        let waiting = pending.into_iter().filter_map(|(id, row)| Some((id, row?)));
        let (mut summaries, mut asked) = (Vec::new(), Vec::new());
        for (id, row) in rows.into_iter().chain(waiting) {
            if row.stale || in_use.contains(&id) {
                asked.push(id);
                continue;
            }
            summaries.push(Summary {
                id,
                snapshot: row.snapshot(),
                ownership: row.meta.ownership,
                leader_epochs: row.meta.leader_epochs,
            });
        }
        Ok((summaries, asked))
    }

    /// How many points have a row.
    pub(super) fn len(&self) -> Result<u64, StorageError> {
        let pending = self.pending.lock().expect("poisoned").clone();
        self.with_db(|db, path| {
            let read = db.begin_read().map_err(catalogue_error("reading", path))?;
            let table = read
                .open_table(POINTS)
                .map_err(catalogue_error("reading", path))?;
            let mut len = table.len().map_err(catalogue_error("reading", path))?;
            for (id, row) in &pending {
                let stored = table
                    .get(id.as_str())
                    .map_err(catalogue_error("reading", path))?
                    .is_some();
                match (stored, row.is_some()) {
                    (false, true) => len += 1,
                    (true, false) => len -= 1,
                    _ => {}
                }
            }
            Ok(len)
        })
    }

    /// Names `id` in the touch log before its files are opened or removed (synced first unless
    /// `fsync = "never"`). Blocking.
    ///
    /// The record is written under the log's lock and synced after it is let go of, by
    /// [`sync_log`](Self::sync_log): points touched at once from many threads share one sync.
    pub(super) fn touch(&self, id: &PointId) -> Result<(), StorageError> {
        let (file, generation, end) = {
            let mut log = self.log.lock().expect("poisoned");
            log.unsettled.insert(id.clone());
            if log.named.contains(id) {
                return Ok(());
            }
            let record = touch_record(id);
            log.file
                .write_all_at(&record, log.len)
                .map_err(StorageError::io(
                    "writing",
                    touch_log_path(&self.dir, log.generation),
                ))?;
            log.len += record.len() as u64;
            if self.fsync == Fsync::Never {
                log.named.insert(id.clone());
                return Ok(());
            }
            (log.file.clone(), log.generation, log.len)
        };
        self.sync_log(&file, generation, end)?;
        // Named once durable: until then, another touch of `id` writes (and syncs) it again.
        // A log started meanwhile carries `id` (it is unsettled) and names it already.
        let mut log = self.log.lock().expect("poisoned");
        if log.generation == generation {
            log.named.insert(id.clone());
        }
        Ok(())
    }

    /// Makes the touch log of `generation` durable up to `end` at least: nothing to do if a
    /// sync since covered it (another thread's, or a new log's); else syncs it as far as it
    /// is written now, for every record written before.
    fn sync_log(&self, file: &File, generation: u64, end: u64) -> Result<(), StorageError> {
        let mut synced = self.log_synced.lock().expect("poisoned");
        let covered = synced.generation > generation
            || (synced.generation == generation && synced.len >= end);
        if covered {
            return Ok(());
        }
        let written = {
            let log = self.log.lock().expect("poisoned");
            if log.generation != generation {
                // A checkpoint started a new log, synced with every unsettled id (ours).
                return Ok(());
            }
            log.len
        };
        file.sync_data().map_err(StorageError::io(
            "syncing",
            touch_log_path(&self.dir, generation),
        ))?;
        *synced = Synced {
            generation,
            len: written,
        };
        Ok(())
    }

    /// Writes the row of `id` (visible at once, durable at the next checkpoint): its files are
    /// closed and the row says what they hold. Returns whether [`flush`](Self::flush) is due.
    pub(super) fn settle(&self, id: &PointId, row: &Row) -> bool {
        let due = self.write(id, Some(row.clone()));
        self.log.lock().expect("poisoned").unsettled.remove(id);
        due
    }

    /// Writes the row of a point that is still open (a new point): visible at once; it stays
    /// named in the touch log until it is settled. Returns whether a flush is due.
    pub(super) fn update(&self, id: &PointId, row: &Row) -> bool {
        self.write(id, Some(row.clone()))
    }

    /// Takes away the row of `id`, whose files are being removed (it was touched first).
    /// Returns whether a flush is due.
    pub(super) fn remove(&self, id: &PointId) -> bool {
        self.write(id, None)
    }

    /// After the files of a removed point are gone.
    pub(super) fn removed(&self, id: &PointId) {
        self.log.lock().expect("poisoned").unsettled.remove(id);
    }

    /// Puts `row` of `id` with those waiting for the B-tree; whether there are [`FLUSH_ROWS`].
    fn write(&self, id: &PointId, row: Option<Row>) -> bool {
        let mut pending = self.pending.lock().expect("poisoned");
        pending.insert(id.clone(), row);
        pending.len() >= FLUSH_ROWS
    }

    /// Writes the rows waiting into the B-tree, without a sync (durable at the next
    /// checkpoint). Blocking.
    pub(super) fn flush(&self) -> Result<(), StorageError> {
        self.write_pending(Durability::None, None)
    }

    /// Writes the rows waiting into the B-tree in one transaction (`durability`), then lets go
    /// of those not written again meanwhile (they are read from the B-tree from then on). If
    /// the write fails, they stay waiting, with those written since the last checkpoint.
    /// With `covered`, the commit also says the segments are covered by its rows up to there.
    fn write_pending(
        &self,
        durability: Durability,
        covered: Option<Position>,
    ) -> Result<(), StorageError> {
        let _one = self.flushing.lock().expect("poisoned");
        let rows = self.pending.lock().expect("poisoned").clone();
        let written = self.with_db(|db, path| {
            let mut write = db.begin_write().map_err(catalogue_error("writing", path))?;
            write
                .set_durability(durability)
                .map_err(catalogue_error("writing", path))?;
            {
                let mut tables = Tables::open(&write, path)?;
                for (id, row) in &rows {
                    tables.put(id, row.as_ref())?;
                }
                if let Some(covered) = covered {
                    tables.cover(covered)?;
                }
            }
            write.commit().map_err(catalogue_error("writing", path))
        });
        if let Err(error) = written {
            self.lose_tree(&error);
            return Err(error);
        }
        // Before the rows leave `pending` (below): a lookup that no longer finds them there
        // reads a tree that has them.
        self.forget_rows_read();
        if let (Durability::Immediate, Some(covered)) = (durability, covered) {
            *self.covered.lock().expect("poisoned") = covered;
        }
        let mut unsynced = self.unsynced.lock().expect("poisoned");
        match durability {
            Durability::None => {
                unsynced.extend(rows.iter().map(|(id, row)| (id.clone(), row.clone())))
            }
            _ => unsynced.clear(),
        }
        drop(unsynced);
        let mut pending = self.pending.lock().expect("poisoned");
        for (id, row) in rows {
            if pending.get(&id) == Some(&row) {
                pending.remove(&id);
            }
        }
        Ok(())
    }

    /// Makes every row written so far durable: a new touch log naming the points still
    /// unsettled, the rows waiting written in a synced commit, then the old log removed. With `closing`, the B-tree is
    /// closed, and no log stays if every point is settled (a clean stop). Blocking.
    pub(super) fn checkpoint(&self, closing: bool) -> Result<(), StorageError> {
        let _one = self.checkpointing.lock().expect("poisoned");
        let old = {
            let mut log = self.log.lock().expect("poisoned");
            let old = log.generation;
            let carried: Vec<PointId> = log.unsettled.iter().cloned().collect();
            let (file, len) = create_touch_log(&self.dir, old + 1, carried.iter(), self.fsync)?;
            (log.file, log.len) = (Arc::new(file), len);
            log.generation = old + 1;
            log.named = carried.into_iter().collect();
            old
        };
        // Every needle before it has its row waiting already (`pack`).
        let covered = self.segments.position();
        // Its rows are made durable now: so are its needles, first (one sync for every point
        // packed since the last checkpoint, whatever `fsync` says).
        self.segments.sync_to(covered)?;
        self.write_pending(Durability::Immediate, Some(covered))?;
        // The log before (and any a failed checkpoint left).
        remove_touch_logs_before(&self.dir, old + 1)?;
        if closing {
            let log = self.log.lock().expect("poisoned");
            if log.unsettled.is_empty() {
                let current = touch_log_path(&self.dir, log.generation);
                std::fs::remove_file(&current).map_err(StorageError::io("removing", &current))?;
                sync_dir(&self.dir).map_err(StorageError::io("syncing", &self.dir))?;
            }
            drop(log);
            let mut tree = self.db.write().expect("poisoned");
            self.forget_rows_read();
            *tree = Tree::Closed;
        }
        Ok(())
    }
}

#[cfg(test)]
impl Catalogue {
    /// Holds checkpoints off while the guard lives.
    pub(super) fn hold_checkpoints(&self) -> std::sync::MutexGuard<'_, ()> {
        self.checkpointing.lock().expect("poisoned")
    }
}

/// Gives every point found in `points` a row to recover on first use (a store written before
/// the catalogue). One walk, once.
fn migrate(db: &Database, path: &Path, points: &Path) -> Result<(), StorageError> {
    let found = scan(points).map_err(StorageError::io("scanning", points))?;
    if found.is_empty() {
        return Ok(());
    }
    tracing::info!(
        points = found.len(),
        "catalogueing the points of a store written before the catalogue (once)"
    );
    for batch in found.chunks(10_000) {
        let write = db.begin_write().map_err(catalogue_error("writing", path))?;
        {
            let mut tables = Tables::open(&write, path)?;
            for id in batch {
                let meta = read_meta(&points.join(id.relative_dir()))?;
                tables.put(id, Some(&Row::stale(meta)))?;
            }
        }
        write.commit().map_err(catalogue_error("writing", path))?;
    }
    Ok(())
}

/// Opens (creating if needed) the B-tree at `path`; after a crash or a failed write, redb
/// repairs it first.
fn open_tree(path: &Path) -> Result<Database, StorageError> {
    Database::builder()
        .set_cache_size(CACHE_BYTES)
        .create(path)
        .map_err(catalogue_error("opening", path))
}

/// The tables of a write transaction, written together.
struct Tables<'txn> {
    points: redb::Table<'txn, &'static str, &'static [u8]>,
    handovers: redb::Table<'txn, &'static str, ()>,
    under_way: redb::Table<'txn, &'static str, ()>,
    segments: redb::Table<'txn, &'static str, &'static [u8]>,
    live: redb::Table<'txn, u32, u64>,
    path: &'txn Path,
}

impl<'txn> Tables<'txn> {
    fn open(write: &'txn redb::WriteTransaction, path: &'txn Path) -> Result<Self, StorageError> {
        Ok(Tables {
            points: write
                .open_table(POINTS)
                .map_err(catalogue_error("writing", path))?,
            handovers: write
                .open_table(HANDOVERS)
                .map_err(catalogue_error("writing", path))?,
            under_way: write
                .open_table(UNDER_WAY)
                .map_err(catalogue_error("writing", path))?,
            segments: write
                .open_table(SEGMENTS)
                .map_err(catalogue_error("writing", path))?,
            live: write
                .open_table(SEGMENT_LIVE)
                .map_err(catalogue_error("writing", path))?,
            path,
        })
    }

    /// The row of `id` in the B-tree.
    fn get(&self, id: &PointId) -> Result<Option<Row>, StorageError> {
        let row = self
            .points
            .get(id.as_str())
            .map_err(catalogue_error("reading", self.path))?;
        row.map(|row| decode(row.value(), self.path)).transpose()
    }

    /// Records that the rows of this commit cover the segments up to `covered`.
    fn cover(&mut self, covered: Position) -> Result<(), StorageError> {
        let value = serde_json::to_vec(&covered).expect("a position serializes");
        self.segments
            .insert(COVERED_KEY, value.as_slice())
            .map(drop)
            .map_err(catalogue_error("writing", self.path))
    }

    /// Writes the row of `id` (`None`: takes it away), and its place in the handover indexes.
    /// The live bytes of the segments follow: the needle the row named before is dead, the
    /// one it names now live.
    fn put(&mut self, id: &PointId, row: Option<&Row>) -> Result<(), StorageError> {
        let before = match row {
            Some(row) => self.points.insert(id.as_str(), encode(row).as_slice()),
            None => self.points.remove(id.as_str()),
        }
        .map_err(catalogue_error("writing", self.path))?
        .map(|before| decode(before.value(), self.path))
        .transpose()?
        .and_then(|before| before.needle);
        let after = row.and_then(|row| row.needle);
        if before != after {
            for (needle, live) in [(before, false), (after, true)] {
                if let Some(needle) = needle {
                    self.count_live(id, &needle, live)?;
                }
            }
        }
        self.index(id.as_str(), row)
            .map_err(catalogue_error("writing", self.path))
    }

    /// Counts `needle` of `id` as live in its segment, or no longer.
    fn count_live(
        &mut self,
        id: &PointId,
        needle: &Needle,
        live: bool,
    ) -> Result<(), StorageError> {
        let size = super::segment::needle_size(id.as_str(), needle);
        let held = self
            .live
            .get(needle.segment)
            .map_err(catalogue_error("reading", self.path))?
            .map_or(0, |held| held.value());
        let now = match live {
            true => held + size,
            false => held.saturating_sub(size),
        };
        self.live
            .insert(needle.segment, now)
            .map(drop)
            .map_err(catalogue_error("writing", self.path))
    }

    /// Names `id` in the handover indexes its `row` belongs in, and takes it out of the others.
    fn index(&mut self, id: &str, row: Option<&Row>) -> Result<(), redb::StorageError> {
        for (table, named) in [
            (&mut self.handovers, row.is_some_and(Row::in_handover)),
            (&mut self.under_way, row.is_some_and(Row::under_way)),
        ] {
            match named {
                true => table.insert(id, ())?,
                false => table.remove(id)?,
            };
        }
        Ok(())
    }

    /// Fills the handover indexes from every row (a catalogue written before them).
    fn index_handovers(&mut self) -> Result<(), StorageError> {
        let mut found = Vec::new();
        for row in self
            .points
            .iter()
            .map_err(catalogue_error("reading", self.path))?
        {
            let (id, row) = row.map_err(catalogue_error("reading", self.path))?;
            let row = decode(row.value(), self.path)?;
            if row.in_handover() {
                found.push((id.value().to_owned(), row));
            }
        }
        for (id, row) in found {
            self.index(&id, Some(&row))
                .map_err(catalogue_error("writing", self.path))?;
        }
        Ok(())
    }
}

fn decode(bytes: &[u8], path: &Path) -> Result<Row, StorageError> {
    super::row_bytes::decode(bytes)
        .map_err(|error| StorageError::io("decoding a row of", path)(std::io::Error::other(error)))
}

fn catalogue_error<E: Into<redb::Error>>(
    op: &'static str,
    path: &Path,
) -> impl FnOnce(E) -> StorageError {
    let path = path.to_owned();
    move |error| StorageError::Catalogue {
        op,
        path,
        source: Box::new(error.into()),
    }
}

fn touch_log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("touched.{generation}"))
}

/// The touch logs in `dir`, oldest first.
fn touch_logs(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let mut logs = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(StorageError::io("reading", dir))? {
        let entry = entry.map_err(StorageError::io("reading", dir))?;
        let name = entry.file_name();
        if let Some(generation) = name
            .to_str()
            .and_then(|name| name.strip_prefix("touched."))
            .and_then(|generation| generation.parse().ok())
        {
            logs.push((generation, entry.path()));
        }
    }
    logs.sort();
    Ok(logs)
}

/// A new touch log naming `ids` (replacing what a failed attempt left), synced with its
/// directory entry unless `fsync = "never"`; with its length.
fn create_touch_log<'a>(
    dir: &Path,
    generation: u64,
    ids: impl IntoIterator<Item = &'a PointId>,
    fsync: Fsync,
) -> Result<(File, u64), StorageError> {
    let path = touch_log_path(dir, generation);
    let records: Vec<u8> = ids.into_iter().flat_map(touch_record).collect();
    let create = || -> std::io::Result<File> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)?;
        file.write_all(&records)?;
        if fsync != Fsync::Never {
            file.sync_data()?;
            sync_dir(dir)?;
        }
        Ok(file)
    };
    let file = create().map_err(StorageError::io("creating", &path))?;
    Ok((file, records.len() as u64))
}

/// Removes the touch logs older than `generation`.
fn remove_touch_logs_before(dir: &Path, generation: u64) -> Result<(), StorageError> {
    for (_, old) in touch_logs(dir)?
        .into_iter()
        .filter(|(older, _)| *older < generation)
    {
        std::fs::remove_file(&old).map_err(StorageError::io("removing", &old))?;
    }
    Ok(())
}

/// One record of a touch log: the id's length (u16, little-endian), the id, and the CRC32C of
/// both.
fn touch_record(id: &PointId) -> Vec<u8> {
    let id = id.as_str().as_bytes();
    let mut record = Vec::with_capacity(id.len() + 6);
    record.extend_from_slice(&(id.len() as u16).to_le_bytes());
    record.extend_from_slice(id);
    let crc = crc32c::crc32c(&record);
    record.extend_from_slice(&crc.to_le_bytes());
    record
}

/// The ids a touch log names, up to its first incomplete or damaged record (a crash in the
/// middle of one: its point's files were not opened yet).
fn read_touch_log(path: &Path) -> Result<Vec<PointId>, StorageError> {
    let bytes = std::fs::read(path).map_err(StorageError::io("reading", path))?;
    let mut ids = Vec::new();
    let mut rest = bytes.as_slice();
    while rest.len() >= 2 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let Some(record) = rest.get(..2 + len + 4) else {
            break;
        };
        let (body, crc) = record.split_at(2 + len);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            break;
        }
        match std::str::from_utf8(&body[2..])
            .ok()
            .and_then(|id| PointId::new(id).ok())
        {
            Some(id) => ids.push(id),
            None => break,
        }
        rest = &rest[record.len()..];
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, Ordering};

    use redb::StorageBackend;
    use redb::backends::FileBackend;

    use super::*;

    /// A file backend that crashes after a given number of writes, syncs and resizes: that one
    /// and every later one fail, as if the process had died there.
    #[derive(Debug)]
    struct Crashing {
        file: FileBackend,
        left: Arc<AtomicI64>,
    }

    impl Crashing {
        fn step(&self) -> Result<(), redb::BackendError> {
            match self.left.fetch_sub(1, Ordering::SeqCst) {
                left if left > 0 => Ok(()),
                _ => Err(redb::BackendError::Io(std::io::Error::other("crashed"))),
            }
        }
    }

    impl StorageBackend for Crashing {
        fn len(&self) -> Result<u64, redb::BackendError> {
            self.file.len()
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), redb::BackendError> {
            self.file.read(offset, out)
        }
        fn set_len(&self, len: u64) -> Result<(), redb::BackendError> {
            self.step()?;
            self.file.set_len(len)
        }
        fn sync_data(&self) -> Result<(), redb::BackendError> {
            self.step()?;
            self.file.sync_data()
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), redb::BackendError> {
            self.step()?;
            self.file.write(offset, data)
        }
        fn close(&self) -> Result<(), redb::BackendError> {
            self.file.close()
        }
        fn try_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.file.try_lock_range(start, end)
        }
        fn try_lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.file.try_lock_shared_range(start, end)
        }
        fn lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.lock_range(start, end)
        }
        fn lock_shared_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.lock_shared_range(start, end)
        }
        fn unlock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<(), redb::BackendError> {
            self.file.unlock_range(start, end)
        }
        fn query_lock_range(
            &self,
            start: std::ops::Bound<u64>,
            end: std::ops::Bound<u64>,
        ) -> Result<bool, redb::BackendError> {
            self.file.query_lock_range(start, end)
        }
    }

    fn point(i: usize) -> PointId {
        PointId::new(format!("a/{i:02}")).unwrap()
    }

    fn row(i: usize, end: u64) -> Row {
        Row {
            end,
            crc: i as u32,
            committed: end,
            journal_len: 16 + 32 * end,
            ..Row::default()
        }
    }

    #[test]
    fn rows_written_in_json_by_an_older_node_are_read_and_written_anew_in_format_1() {
        let dir = tempfile::tempdir().unwrap();
        let (catalogue_dir, points) = (dir.path().join("catalogue"), dir.path().join("points"));
        let catalogue = Catalogue::open(&catalogue_dir, &points, Fsync::Always).unwrap();
        for i in 0..3 {
            catalogue.settle(&point(i), &row(i, 100));
        }
        catalogue.checkpoint(true).unwrap();
        drop(catalogue);
        // The rows as a node before format 1 wrote them.
        let db = Database::create(catalogue_dir.join(TREE_FILE)).unwrap();
        let write = db.begin_write().unwrap();
        {
            let mut table = write.open_table(POINTS).unwrap();
            for i in 0..3 {
                let json = serde_json::to_vec(&row(i, 100)).unwrap();
                table.insert(point(i).as_str(), json.as_slice()).unwrap();
            }
        }
        write.commit().unwrap();
        drop(db);

        let catalogue = Catalogue::open(&catalogue_dir, &points, Fsync::Always).unwrap();
        for i in 0..3 {
            assert_eq!(catalogue.row(&point(i)).unwrap(), Some(row(i, 100)));
        }
        let (summaries, _) = catalogue.summaries(&HashSet::new()).unwrap();
        assert_eq!(summaries.len(), 3);
        catalogue.settle(&point(1), &row(1, 200));
        catalogue.checkpoint(true).unwrap();
        drop(catalogue);
        let db = Database::create(catalogue_dir.join(TREE_FILE)).unwrap();
        let read = db.begin_read().unwrap();
        let table = read.open_table(POINTS).unwrap();
        let first_bytes: Vec<u8> = (0..3)
            .map(|i| table.get(point(i).as_str()).unwrap().unwrap().value()[0])
            .collect();
        assert_eq!(
            first_bytes,
            [b'{', 1, b'{'],
            "only the row changed is rewritten"
        );
    }

    /// Before: rows of a/00..a/09, durable. Then, on a B-tree that crashes after `budget`
    /// writes: a/10..a/19 created, a/01 grown, a/00 removed, and a checkpoint. Returns how many
    /// writes that took (with a budget it did not exhaust).
    fn crash_after(dir: &Path, budget: i64) -> i64 {
        let (catalogue_dir, points) = (dir.join("catalogue"), dir.join("points"));
        let create = |i: usize| {
            let point_dir = points.join(point(i).relative_dir());
            std::fs::create_dir_all(&point_dir).unwrap();
            File::create(point_dir.join(JOURNAL_FILE)).unwrap();
        };
        (0..10).for_each(create);
        let catalogue = Catalogue::open(&catalogue_dir, &points, Fsync::Always).unwrap();
        for i in 0..10 {
            catalogue.touch(&point(i)).unwrap();
            catalogue.settle(&point(i), &row(i, 100));
        }
        catalogue.checkpoint(true).unwrap();
        drop(catalogue);

        let left = Arc::new(AtomicI64::new(budget));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(catalogue_dir.join(TREE_FILE))
            .unwrap();
        let backend = Crashing {
            file: FileBackend::new(file),
            left: left.clone(),
        };
        // Opening writes too: a crash there leaves the changes undone.
        let opened = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create_with_backend(backend)
            .map_err(catalogue_error("opening", dir))
            .and_then(|db| Catalogue::start(db, true, &catalogue_dir, &points, Fsync::Always));
        let Ok(catalogue) = opened else {
            return budget - left.load(Ordering::SeqCst);
        };
        let changes = || -> Result<(), StorageError> {
            for i in 10..20 {
                catalogue.touch(&point(i))?;
                create(i);
                catalogue.update(&point(i), &row(i, 0));
                catalogue.settle(&point(i), &row(i, 7));
            }
            catalogue.touch(&point(1))?;
            catalogue.settle(&point(1), &row(1, 250));
            catalogue.touch(&point(0))?;
            catalogue.remove(&point(0));
            std::fs::remove_dir_all(points.join(point(0).relative_dir())).unwrap();
            catalogue.removed(&point(0));
            catalogue.flush()?;
            catalogue.checkpoint(false)
        };
        let _ = changes();
        drop(catalogue);
        budget - left.load(Ordering::SeqCst)
    }

    #[test]
    fn a_crash_anywhere_in_a_catalogue_commit_loses_no_point_and_keeps_no_removed_one() {
        let dry = tempfile::tempdir().unwrap();
        let writes = crash_after(dry.path(), i64::MAX / 2);
        assert!(writes > 2, "{writes} writes");
        for budget in 0..=writes {
            let dir = tempfile::tempdir().unwrap();
            crash_after(dir.path(), budget);
            let points = dir.path().join("points");
            let catalogue = Catalogue::open(&dir.path().join("catalogue"), &points, Fsync::Always)
                .unwrap_or_else(|error| panic!("crash after {budget} writes: {error}"));
            // Every point whose files exist has a row, and no other.
            let ids = catalogue.list("", None, 100).unwrap();
            let on_disk: Vec<PointId> = (0..20)
                .map(point)
                .filter(|id| points.join(id.relative_dir()).join(JOURNAL_FILE).exists())
                .collect();
            assert_eq!(ids, on_disk, "budget {budget}");
            if on_disk.contains(&point(0)) {
                // The crash came before the changes began.
                continue;
            }
            // Untouched rows are exact; touched ones exact or stale (read from their files).
            for i in 2..10 {
                assert_eq!(catalogue.row(&point(i)).unwrap(), Some(row(i, 100)));
            }
            for (i, end) in [(1, 250)].into_iter().chain((10..20).map(|i| (i, 7))) {
                let found = catalogue.row(&point(i)).unwrap().unwrap();
                assert!(
                    found.stale || found == row(i, end),
                    "budget {budget}: {found:?}"
                );
            }
        }
    }

    /// A tmpfs of `bytes` on a temporary directory (root, as the suite's network tests need),
    /// unmounted when dropped.
    struct Tmpfs(tempfile::TempDir);

    impl Tmpfs {
        fn mount(bytes: u64) -> Tmpfs {
            let dir = tempfile::tempdir().unwrap();
            let status = std::process::Command::new("mount")
                .args([
                    "-t",
                    "tmpfs",
                    "-o",
                    &format!("size={bytes}"),
                    "goutube-test",
                ])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "mounting a tmpfs (needs root): {status}");
            Tmpfs(dir)
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.0.path())
                .status();
        }
    }

    #[test]
    fn a_lookup_reads_every_row_a_flush_or_checkpoint_moved_from_pending_to_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (catalogue_dir, points) = (dir.path().join("catalogue"), dir.path().join("points"));
        let catalogue = Catalogue::open(&catalogue_dir, &points, Fsync::Never).unwrap();
        // A lookup that finds nothing leaves a shared read of the tree behind.
        assert_eq!(catalogue.row(&point(1)).unwrap(), None);
        catalogue.settle(&point(1), &row(1, 10));
        catalogue.flush().unwrap();
        assert!(
            catalogue.pending.lock().unwrap().is_empty(),
            "read from the tree"
        );
        assert_eq!(catalogue.row(&point(1)).unwrap(), Some(row(1, 10)));
        catalogue.remove(&point(1));
        catalogue.flush().unwrap();
        assert_eq!(catalogue.row(&point(1)).unwrap(), None);
        catalogue.settle(&point(2), &row(2, 5));
        catalogue.checkpoint(false).unwrap();
        assert_eq!(catalogue.row(&point(2)).unwrap(), Some(row(2, 5)));

        // Lookups racing the flushes: a row written before a lookup starts is found, whether
        // it still waits in `pending` or was moved to the tree meanwhile.
        let catalogue = Arc::new(catalogue);
        let written = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        const ROWS: usize = 3_000;
        let writer = {
            let (catalogue, written) = (catalogue.clone(), written.clone());
            std::thread::spawn(move || {
                for i in 10..ROWS {
                    catalogue.settle(&point(i), &row(i, i as u64));
                    written.store(i, Ordering::SeqCst);
                    if i % 7 == 0 {
                        catalogue.flush().unwrap();
                    }
                }
            })
        };
        let mut looked = 0;
        while written.load(Ordering::SeqCst) < ROWS - 1 {
            let last = written.load(Ordering::SeqCst);
            if last < 10 {
                continue;
            }
            for i in [last, (last + 10) / 2, 10] {
                let found = catalogue.row(&point(i)).unwrap();
                assert_eq!(found, Some(row(i, i as u64)), "{}", point(i));
                looked += 1;
            }
        }
        writer.join().unwrap();
        assert!(looked > 0);
    }

    #[test]
    fn a_full_disk_fails_a_write_of_the_b_tree_and_loses_no_row() {
        let disk = Tmpfs::mount(32 * 1024 * 1024);
        let (dir, points) = (
            disk.0.path().join("catalogue"),
            disk.0.path().join("points"),
        );
        let catalogue = Catalogue::open(&dir, &points, Fsync::Always).unwrap();
        let mut rows = BTreeMap::new();
        let mut add = |catalogue: &Catalogue, i: usize| {
            let mut row = row(i, i as u64);
            row.meta.content_type = Some(format!("video/{}", "x".repeat(400)));
            catalogue.settle(&point(i), &row);
            rows.insert(point(i), row);
        };
        (0..100).for_each(|i| add(&catalogue, i));
        catalogue.checkpoint(false).unwrap();

        // Another program takes the space left; rows go on being written (without a sync: redb
        // keeps them in its cache) until the B-tree must grow.
        let mut ballast = File::create(disk.0.path().join("ballast")).unwrap();
        while ballast.write_all(&[0x5A; 4096]).is_ok() {}
        let mut next = 100;
        let error = loop {
            for i in next..next + 50 {
                add(&catalogue, i);
            }
            next += 50;
            assert!(next < 100_000, "the B-tree never ran out of space");
            if let Err(error) = catalogue.flush() {
                break error;
            }
        };
        assert!(error.is_disk_full(), "{error}");
        assert!(next > 200, "some rows were written before: {next}");
        // Every row written is there: the B-tree opened again, the rows it lost waiting.
        let check = |catalogue: &Catalogue| {
            let ids: Vec<PointId> = rows.keys().cloned().collect();
            assert_eq!(catalogue.list("", None, usize::MAX).unwrap(), ids);
            for (id, row) in &rows {
                assert_eq!(catalogue.row(id).unwrap().as_ref(), Some(row), "{id}");
            }
        };
        check(&catalogue);

        // Space returns: the next checkpoint makes every row durable.
        drop(ballast);
        std::fs::remove_file(disk.0.path().join("ballast")).unwrap();
        catalogue.checkpoint(true).unwrap();
        drop(catalogue);
        let catalogue = Catalogue::open(&dir, &points, Fsync::Always).unwrap();
        check(&catalogue);
    }

    #[test]
    fn points_touched_at_once_from_many_threads_are_all_in_the_log_across_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let catalogue_dir = dir.path().join("catalogue");
        let catalogue =
            Catalogue::open(&catalogue_dir, &dir.path().join("points"), Fsync::Always).unwrap();
        let touching = AtomicI64::new(8);
        let checkpoints = AtomicI64::new(0);
        let touched: Vec<PointId> = std::thread::scope(|scope| {
            // New logs keep starting while the points are touched (and share syncs).
            scope.spawn(|| {
                while touching.load(Ordering::SeqCst) > 0 {
                    catalogue.checkpoint(false).unwrap();
                    checkpoints.fetch_add(1, Ordering::SeqCst);
                }
            });
            let touchers: Vec<_> = (0..8)
                .map(|thread| {
                    let (catalogue, touching) = (&catalogue, &touching);
                    scope.spawn(move || {
                        let ids: Vec<PointId> = (0..60)
                            .map(|i| PointId::new(format!("t{thread}/{i:02}")).unwrap())
                            .collect();
                        for id in &ids {
                            catalogue.touch(id).unwrap();
                        }
                        touching.fetch_sub(1, Ordering::SeqCst);
                        ids
                    })
                })
                .collect();
            touchers
                .into_iter()
                .flat_map(|toucher| toucher.join().unwrap())
                .collect()
        });
        assert!(checkpoints.load(Ordering::SeqCst) > 0);
        // None is settled: a crash now finds every one in the one log left.
        let logs = touch_logs(&catalogue_dir).unwrap();
        assert_eq!(logs.len(), 1, "{logs:?}");
        let named: HashSet<PointId> = read_touch_log(&logs[0].1).unwrap().into_iter().collect();
        let missing: Vec<&PointId> = touched.iter().filter(|id| !named.contains(*id)).collect();
        assert!(missing.is_empty(), "not in the log: {missing:?}");
    }

    #[test]
    fn a_touch_log_is_read_up_to_its_first_torn_or_damaged_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("touched.0");
        let ids: Vec<PointId> = ["a", "videos/b", "c"]
            .into_iter()
            .map(|id| PointId::new(id).unwrap())
            .collect();
        let mut bytes: Vec<u8> = ids.iter().flat_map(touch_record).collect();
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_touch_log(&path).unwrap(), ids);
        // A crash in the middle of the last record: it is not there.
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_touch_log(&path).unwrap(), ids[..2]);
        // A damaged record ends the log where it is.
        let second = touch_record(&ids[0]).len() + 3;
        bytes[second] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(read_touch_log(&path).unwrap(), ids[..1]);
    }
}
