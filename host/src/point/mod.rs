//! The point store: named, append-only byte streams on local disk.
//!
//! Each point is a directory (see [`id`] for how ids become paths) holding `point.data`, the raw
//! bytes, so a read is one positional read, `point.journal`, one record per append (see
//! [`journal`]), and once a content type was given, `point.meta` (JSON). Opening a point recovers it: the data file is cut back to the last complete,
//! checksum-valid append. Appends to one point are serialised by the point's lock; reads take no
//! lock and never look past the published end. File handles are opened lazily and bounded: the
//! least recently used points are closed when more than `max_open` are open, and idle points are
//! closed after `idle_close`. After an I/O error a point refuses writes until the node restarts.
//!
//! The format is documented in `docs/storage.md`.

pub mod error;
pub mod id;
pub mod journal;
pub mod ownership;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, MutexGuard, broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{AppendError, DeleteError, ReadError, StorageError, TruncateError};
pub use id::{InvalidPointId, PointId};
use journal::Record;
pub use ownership::{Handover, Ownership};

use crate::metrics;

const DATA_FILE: &str = "point.data";
const JOURNAL_FILE: &str = "point.journal";
const META_FILE: &str = "point.meta";

/// When appended bytes are fsynced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fsync {
    /// Before an append becomes visible or is acknowledged.
    Always,
    /// In the background, every `fsync_interval`: a crash loses at most that window.
    Interval,
    /// Never by the store during normal operation (the OS flushes); closing a point still syncs.
    Never,
}

/// How the store is run.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Directory holding the points (created if missing).
    pub dir: PathBuf,
    pub fsync: Fsync,
    pub fsync_interval: Duration,
    /// Most points with open file handles at once (each holds two descriptors).
    pub max_open: usize,
    /// Points not used for this long are closed.
    pub idle_close: Duration,
}

/// Why a point's files are closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closing {
    /// Idle, or evicted to stay within `max_open`.
    Idle,
    /// The store is closing: everything must be on disk.
    Shutdown,
}

/// Size and checksum of a point at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    pub end: u64,
    /// CRC32C of `[0, end)`.
    pub crc: u32,
    /// The point was deleted: no more bytes will come.
    pub deleted: bool,
    /// A copy still arriving in a handover (`docs/resharding.md`): not served to clients until
    /// the handover commits. Kept here so readers need not take the point's lock to know.
    pub arriving: bool,
}

/// The outcome of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    pub start: u64,
    pub end: u64,
    pub crc: u32,
}

/// A point grew, or was removed: published to [`Store::subscribe`].
#[derive(Debug, Clone)]
pub struct AppendEvent {
    pub point: PointId,
    pub end: u64,
    /// The point was deleted (`end` is then 0).
    pub removed: bool,
    /// The point's ownership record changed (its epoch, or a handover): replication describes
    /// the point again to connected followers.
    pub ownership: bool,
    /// The bytes of the append, while the store's budget for them lasts: replication sends them
    /// to connected followers without reading them back.
    pub bytes: Option<Arc<LiveBytes>>,
}

/// Most bytes of appends lent to subscribers at once, store-wide: beyond it, events carry no
/// bytes and replication reads them from the point.
pub const LIVE_BUDGET: u64 = 64 * 1024 * 1024;

/// The bytes of one append, `[start, start + len)` of its point, counted against
/// [`LIVE_BUDGET`] until the last holder drops them.
#[derive(Debug)]
pub struct LiveBytes {
    pub start: u64,
    pub frames: Vec<Bytes>,
    len: u64,
    lent: Arc<AtomicU64>,
}

impl LiveBytes {
    /// `frames`, appended at `start`, if the budget has room for them.
    fn lend(lent: &Arc<AtomicU64>, start: u64, frames: Vec<Bytes>) -> Option<Self> {
        let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
        let before = lent.fetch_add(len, Ordering::Relaxed);
        if before + len > LIVE_BUDGET {
            lent.fetch_sub(len, Ordering::Relaxed);
            return None;
        }
        Some(Self {
            start,
            frames,
            len,
            lent: lent.clone(),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

impl Drop for LiveBytes {
    fn drop(&mut self) {
        self.lent.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    shared: Arc<Shared>,
    points: RwLock<BTreeMap<PointId, Arc<Point>>>,
    events: broadcast::Sender<AppendEvent>,
    /// Bytes lent to subscribers now ([`LiveBytes`]).
    lent: Arc<AtomicU64>,
    /// Woken at every change of a point's ownership record (a fenced write waits on it).
    ownership_changed: tokio::sync::Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// What every point needs from the store.
struct Shared {
    config: StoreConfig,
    epoch: Instant,
    /// Open points and when each was last used (ms since `epoch`).
    open: StdMutex<HashMap<PointId, Arc<Point>>>,
    open_count: AtomicUsize,
    /// Incremented on every use of a point: orders points for LRU eviction.
    uses: AtomicU64,
    /// Tests make the next journal write fail, as a full or failing disk would.
    #[cfg(test)]
    fail_next_journal_write: std::sync::atomic::AtomicBool,
}

/// One point: its lock-protected write state and its published snapshot.
pub struct Point {
    id: PointId,
    dir: PathBuf,
    state: Mutex<State>,
    snapshot: watch::Sender<Snapshot>,
    /// When the point was last used (ms since the store opened), for idle close.
    last_used_ms: AtomicU64,
    /// The store's use counter at the last use, for LRU order.
    last_use: AtomicU64,
    /// When the point last grew (ms since the store opened, + 1; 0: not since the store opened).
    last_append_ms: AtomicU64,
}

/// Who appends: a client's write is refused while the point's handover does not take writes
/// here; a copy this node receives (replication, a handover) is applied regardless, and comes
/// with the CRC32C of each frame, which its receiver checked.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Client,
    Replication { crcs: Vec<u32> },
}

/// What a point knows about itself besides its bytes (`point.meta`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// The media type given with the point's first bytes, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    content_type: Option<String>,
    /// Its epoch and handover (`ownership.rs`); absent in files written before epochs.
    #[serde(flatten)]
    ownership: Ownership,
}

/// A byte range of a point to stream: `[offset, stop)` in frames of at most `chunk` bytes. With
/// `follow`, the stream waits at the end of the point for new bytes (until `stop`; `None`: until
/// the receiver goes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub stop: Option<u64>,
    pub chunk: u64,
    pub follow: bool,
}

/// How a [`Point::stream`] ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error("the node is shutting down")]
    ShuttingDown,
}

#[derive(Default)]
struct State {
    files: Option<Arc<Files>>,
    /// `end`, `crc`, `durable` and `journal_len` are known (the point was opened once).
    recovered: bool,
    end: u64,
    crc: u32,
    durable: u64,
    journal_len: u64,
    /// Bytes written since the last fsync.
    dirty: bool,
    /// Set by the first failed write; the point refuses writes from then on.
    failed: Option<String>,
    deleted: bool,
    /// `point.meta`, once read.
    meta: Option<Meta>,
}

struct Files {
    data: File,
    journal: File,
}

impl Store {
    /// Opens the store in `config.dir`, registering every point found there (their files are
    /// opened and recovered lazily, on first use), and starts the background sync and close tasks.
    pub async fn open(config: StoreConfig) -> Result<Self, StorageError> {
        let dir = config.dir.clone();
        let found = tokio::task::spawn_blocking(move || scan(&dir))
            .await
            .map_err(join_error)?
            .map_err(StorageError::io("scanning", config.dir.clone()))?;
        let shared = Arc::new(Shared {
            config,
            epoch: Instant::now(),
            open: StdMutex::new(HashMap::new()),
            open_count: AtomicUsize::new(0),
            uses: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_journal_write: Default::default(),
        });
        let points = found
            .into_iter()
            .map(|id| {
                let point = Arc::new(Point::new(&shared, id.clone()));
                (id, point)
            })
            .collect();
        let store = Store {
            inner: Arc::new(Inner {
                shared,
                points: RwLock::new(points),
                events: broadcast::channel(4096).0,
                lent: Arc::default(),
                ownership_changed: tokio::sync::Notify::new(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
            }),
        };
        store.spawn_background();
        Ok(store)
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.shared.config
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.inner.points.read().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Points with open file handles.
    pub fn open_points(&self) -> usize {
        self.inner.shared.open_count.load(Ordering::Relaxed)
    }

    /// Appends `bytes` at the end of `id`, creating the point if needed.
    pub async fn append(&self, id: &PointId, bytes: Bytes) -> Result<Appended, AppendError> {
        let mut appended = self
            .append_inner(id, vec![bytes], None, Origin::Client)
            .await?;
        Ok(appended.pop().expect("one result per frame"))
    }

    /// Appends `frames` in order at the end of `id` as one batch: one journal write and, with
    /// `fsync = "always"`, one sync for all of them (group commit). Returns one result per frame.
    pub async fn append_batch(
        &self,
        id: &PointId,
        frames: Vec<Bytes>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.append_inner(id, frames, None, Origin::Client).await
    }

    /// [`append_batch`](Self::append_batch), only if `id` currently ends at `start` (a produce
    /// frame with an `expected_offset`). A refusal for a point that does not exist does not
    /// create it.
    pub async fn append_batch_at(
        &self,
        id: &PointId,
        start: u64,
        frames: Vec<Bytes>,
    ) -> Result<Vec<Appended>, AppendError> {
        self.append_inner(id, frames, Some(start), Origin::Client)
            .await
    }

    /// [`append_batch_at`](Self::append_batch_at) for a copy this node receives (replication,
    /// a handover): exactly once, never with a gap, and whatever the point's handover says about
    /// clients' writes. Each frame comes with its CRC32C, which the caller checked against what
    /// the sender sent (the journal takes it as it is).
    pub async fn apply_replicated(
        &self,
        id: &PointId,
        start: u64,
        frames: Vec<(Bytes, u32)>,
    ) -> Result<Vec<Appended>, AppendError> {
        let (frames, crcs) = frames.into_iter().unzip();
        self.append_inner(id, frames, Some(start), Origin::Replication { crcs })
            .await
    }

    /// Completes at the next change of any point's ownership record. Create it (and `enable`
    /// it) before looking at the record, then await it.
    pub fn ownership_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.ownership_changed.notified()
    }

    async fn append_inner(
        &self,
        id: &PointId,
        frames: Vec<Bytes>,
        expected_start: Option<u64>,
        origin: Origin,
    ) -> Result<Vec<Appended>, AppendError> {
        let shared = &self.inner.shared;
        if let Some(expected) = expected_start.filter(|&start| start > 0)
            && !self.inner.points.read().unwrap().contains_key(id)
        {
            // A point that does not exist ends at 0; refusing must not create it.
            return Err(AppendError::OffsetMismatch {
                point: id.clone(),
                expected,
                end: 0,
            });
        }
        // Only subscribers need the bytes (a clone of the list, not of the bytes).
        let lent = (self.inner.events.receiver_count() > 0).then(|| frames.clone());
        let appended = loop {
            let point = self.get_or_insert(id);
            let Some(mut state) = self.lock_open(id, &point).await? else {
                continue;
            };
            if origin == Origin::Client
                && let Some(handover) = &point.meta(&mut state).await?.ownership.handover
                && !handover.accepts_writes()
            {
                // Checked under the point's lock: a fence set by `set_ownership` is exact.
                return Err(AppendError::Handover {
                    point: id.clone(),
                    handover: handover.clone(),
                });
            }
            let known_crcs = match &origin {
                Origin::Client => None,
                Origin::Replication { crcs } => Some(crcs.clone()),
            };
            break point
                .write(shared, &mut state, frames, known_crcs, expected_start)
                .await?;
        };
        shared.evict_over_limit().await;
        if let (Some(first), Some(last)) = (appended.first(), appended.last()) {
            let bytes = lent
                .and_then(|frames| LiveBytes::lend(&self.inner.lent, first.start, frames))
                .map(Arc::new);
            let _ = self.inner.events.send(AppendEvent {
                point: id.clone(),
                end: last.end,
                removed: false,
                ownership: false,
                bytes,
            });
        }
        Ok(appended)
    }

    /// The point `id`, opened (and recovered if this is its first use).
    pub async fn point(&self, id: &PointId) -> Result<Arc<Point>, ReadError> {
        let point = self.get(id)?;
        point.files(&self.inner.shared).await?;
        Ok(point)
    }

    /// Size and checksum of `id`.
    pub async fn metadata(&self, id: &PointId) -> Result<Snapshot, ReadError> {
        Ok(self.point(id).await?.snapshot())
    }

    /// The content type given for `id`, if any.
    pub async fn content_type(&self, id: &PointId) -> Result<Option<String>, ReadError> {
        let point = self.point(id).await?;
        let mut state = point.state.lock().await;
        Ok(point.meta(&mut state).await?.content_type.clone())
    }

    /// The media type of `id`: the one given, else what its first bytes look like.
    pub async fn media_type(&self, id: &PointId) -> Result<String, ReadError> {
        if let Some(given) = self.content_type(id).await? {
            return Ok(given);
        }
        let point = self.point(id).await?;
        let len = point.snapshot().end.min(crate::content::SNIFF_LEN);
        let head = point.read(self, 0, len).await?;
        Ok(crate::content::sniff(&head).to_owned())
    }

    /// Gives `id` its content type, creating the point if needed. A point has one content type,
    /// given with its first bytes: giving it another one, or one to a point that has bytes
    /// already, is refused.
    pub async fn set_content_type(&self, id: &PointId, wanted: &str) -> Result<(), AppendError> {
        self.describe(id, wanted, true).await
    }

    /// [`set_content_type`](Self::set_content_type) as a follower applies its leader's: also to
    /// a point that has bytes (the leader's word is final).
    pub async fn set_replicated_content_type(
        &self,
        id: &PointId,
        wanted: &str,
    ) -> Result<(), AppendError> {
        self.describe(id, wanted, false).await
    }

    async fn describe(
        &self,
        id: &PointId,
        wanted: &str,
        first_bytes_only: bool,
    ) -> Result<(), AppendError> {
        let fsync = self.inner.shared.config.fsync;
        self.update_meta(id, |meta, written| {
            let has_bytes = written.end > 0;
            match &meta.content_type {
                Some(current) if current == wanted => return Ok(None),
                Some(current) => {
                    return Err(AppendError::ContentType {
                        point: id.clone(),
                        current: current.clone(),
                        wanted: wanted.to_owned(),
                    });
                }
                None if first_bytes_only && has_bytes => {
                    return Err(AppendError::ContentType {
                        point: id.clone(),
                        current: String::new(),
                        wanted: wanted.to_owned(),
                    });
                }
                None => {}
            }
            let meta = Meta {
                content_type: Some(wanted.to_owned()),
                ..meta.clone()
            };
            Ok(Some((meta, fsync)))
        })
        .await
        .map(|_| ())
    }

    /// Locks `point` (the one `id` names) with its files open, creating them for a new point.
    /// `None` when it was deleted while this waited: look `id` up again, which creates it anew.
    /// A new point whose files cannot be created is forgotten again.
    async fn lock_open<'a>(
        &self,
        id: &PointId,
        point: &'a Arc<Point>,
    ) -> Result<Option<MutexGuard<'a, State>>, StorageError> {
        let mut state = point.state.lock().await;
        if state.deleted {
            return Ok(None);
        }
        if let Err(error) = point.ensure_open(&self.inner.shared, &mut state).await {
            if !state.recovered {
                state.deleted = true;
                self.inner.points.write().unwrap().remove(id);
            }
            return Err(error);
        }
        Ok(Some(state))
    }

    /// The ownership record of `id`: its epoch and the handover it is part of, if any.
    /// Reads `point.meta` once, without opening the point's files: the mover looks at every
    /// point's record, and must not churn the open-file budget doing so.
    pub async fn ownership(&self, id: &PointId) -> Result<Ownership, ReadError> {
        let point = self.get(id)?;
        let mut state = point.state.lock().await;
        if state.deleted {
            return Err(ReadError::NotFound(id.clone()));
        }
        Ok(point.meta(&mut state).await?.ownership.clone())
    }

    /// Replaces the ownership record of `id`, creating the point if needed (a follower learns a
    /// point's epoch before its first bytes). Synced before this returns, whatever
    /// `storage.fsync` says.
    pub async fn set_ownership(
        &self,
        id: &PointId,
        ownership: Ownership,
    ) -> Result<(), AppendError> {
        let changed = self
            .update_meta(id, |meta, _| {
                if meta.ownership == ownership {
                    return Ok(None);
                }
                let meta = Meta {
                    ownership,
                    ..meta.clone()
                };
                Ok(Some((meta, Fsync::Always)))
            })
            .await?;
        if changed {
            self.ownership_event(id);
        }
        Ok(())
    }

    /// Fences client writes of `id` for its handover to `to` (the point exists: its handover
    /// is under way): under the point's lock, writes the `sealed` record with the point's end
    /// and CRC32C at that moment (its final bytes here), and returns them.
    pub async fn seal(
        &self,
        id: &PointId,
        to: &str,
        target_ring: u64,
    ) -> Result<(u64, u32), AppendError> {
        let mut sealed = (0, 0);
        self.update_meta(id, |meta, written| {
            sealed = (written.end, written.crc);
            let handover = Handover::Sealed {
                to: to.to_owned(),
                end: written.end,
                crc: written.crc,
                target_ring,
            };
            let ownership = Ownership {
                handover: Some(handover),
                ..meta.ownership.clone()
            };
            let meta = Meta {
                ownership,
                ..meta.clone()
            };
            Ok(Some((meta, Fsync::Always)))
        })
        .await?;
        self.ownership_event(id);
        Ok(sealed)
    }

    /// Wakes the writes waiting at a fence and tells subscribers that `id`'s ownership record
    /// changed.
    fn ownership_event(&self, id: &PointId) {
        self.inner.ownership_changed.notify_waiters();
        let end = self
            .inner
            .points
            .read()
            .unwrap()
            .get(id)
            .map_or(0, |point| point.snapshot().end);
        let _ = self.inner.events.send(AppendEvent {
            point: id.clone(),
            end,
            removed: false,
            ownership: true,
            bytes: None,
        });
    }

    /// Makes every byte written to `id` so far durable, whatever `storage.fsync` says (a
    /// handover commits only bytes that survive a crash).
    pub async fn sync(&self, id: &PointId) -> Result<(), ReadError> {
        let point = self.point(id).await?;
        point.sync().await?;
        Ok(())
    }

    /// Opens `id` (creating it if needed) and, under its lock, writes the `point.meta` that
    /// `change` makes of the current one and of what the point holds (`None`: unchanged).
    /// Returns whether it changed.
    async fn update_meta(
        &self,
        id: &PointId,
        change: impl FnOnce(&Meta, Snapshot) -> Result<Option<(Meta, Fsync)>, AppendError>,
    ) -> Result<bool, AppendError> {
        loop {
            let point = self.get_or_insert(id);
            let Some(mut state) = self.lock_open(id, &point).await? else {
                continue;
            };
            let written = Snapshot {
                end: state.end,
                crc: state.crc,
                ..Snapshot::default()
            };
            let Some((meta, fsync)) = change(point.meta(&mut state).await?, written)? else {
                return Ok(false);
            };
            point.replace_meta(&mut state, meta, fsync).await?;
            return Ok(true);
        }
    }

    /// The CRC32C of `[0, end)` of `id`: from the journal record of the last append within it,
    /// continued over the bytes after that record (at most one append's worth).
    pub async fn crc_at(&self, id: &PointId, end: u64) -> Result<u32, ReadError> {
        let point = self.get(id)?;
        // Open files stay valid if the point is closed meanwhile.
        let files = point.files(&self.inner.shared).await?;
        let state = point.state.lock().await;
        if end > state.end {
            return Err(ReadError::OutOfRange {
                point: id.clone(),
                offset: 0,
                limit: end,
                end: state.end,
            });
        }
        if end == state.end {
            return Ok(state.crc);
        }
        let slots = state.journal_len.saturating_sub(journal::HEADER_LEN) / journal::RECORD_LEN;
        let dir = point.dir.clone();
        let crc = tokio::task::spawn_blocking(move || {
            let base = journal::record_at_or_before(&files.journal, slots, end)
                .map_err(StorageError::io("reading", dir.join(JOURNAL_FILE)))?
                .map_or((0, 0), |(_, record)| (record.end, record.point_crc));
            let rest = journal::crc_of_range(&files.data, base.0, end - base.0)
                .map_err(StorageError::io("reading", dir.join(DATA_FILE)))?;
            Ok::<_, StorageError>(crc32c::crc32c_combine(
                base.1,
                rest,
                (end - base.0) as usize,
            ))
        })
        .await
        .map_err(join_error)??;
        drop(state);
        Ok(crc)
    }

    /// Cuts `id` back to the end of its last append that ends at or before `at_most`, and
    /// returns its new end: how a follower drops bytes that are not its leader's (its copy is
    /// sent again from there). Durable before this returns: the journal is cut first, then the
    /// data, so a crash in between recovers to the same end. Subscribers are not told (a copy
    /// that is cut is a copy this node follows, not one it replicates).
    pub async fn truncate(&self, id: &PointId, at_most: u64) -> Result<u64, TruncateError> {
        let point = self
            .get(id)
            .map_err(|_| TruncateError::NotFound(id.clone()))?;
        let Some(mut state) = self.lock_open(id, &point).await? else {
            return Err(TruncateError::NotFound(id.clone()));
        };
        if let Some(reason) = &state.failed {
            return Err(TruncateError::Refused {
                point: id.clone(),
                reason: reason.clone(),
            });
        }
        if at_most >= state.end {
            return Ok(state.end);
        }
        let files = state.files.clone().expect("locked open");
        let slots = state.journal_len.saturating_sub(journal::HEADER_LEN) / journal::RECORD_LEN;
        let dir = point.dir.clone();
        let cut = tokio::task::spawn_blocking(move || {
            let journal_path = dir.join(JOURNAL_FILE);
            let base = journal::record_at_or_before(&files.journal, slots, at_most)
                .map_err(StorageError::io("reading", journal_path.clone()))?;
            let (records, end, crc) = base.map_or((0, 0, 0), |(index, record)| {
                (index + 1, record.end, record.point_crc)
            });
            let journal_len = journal::HEADER_LEN + records * journal::RECORD_LEN;
            files
                .journal
                .set_len(journal_len)
                .and_then(|()| files.journal.sync_data())
                .map_err(StorageError::io("truncating", journal_path))?;
            files
                .data
                .set_len(end)
                .and_then(|()| files.data.sync_data())
                .map_err(StorageError::io("truncating", dir.join(DATA_FILE)))?;
            Ok::<_, StorageError>((end, crc, journal_len))
        })
        .await
        .map_err(join_error)
        .and_then(|cut| cut);
        let (end, crc, journal_len) = match cut {
            Ok(cut) => cut,
            Err(error) => {
                tracing::error!(point = %id, %error, "truncation failed; the point now refuses writes");
                state.failed = Some(error.to_string());
                return Err(error.into());
            }
        };
        tracing::warn!(point = %id, from = state.end, to = end, "cut the point back");
        state.end = end;
        state.crc = crc;
        state.durable = end;
        state.dirty = false;
        state.journal_len = journal_len;
        point.snapshot.send_modify(|snapshot| {
            snapshot.end = end;
            snapshot.crc = crc;
        });
        Ok(end)
    }

    /// Reads `[offset, offset + len)` of `id`.
    pub async fn read(&self, id: &PointId, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let point = self.point(id).await?;
        point.read(self, offset, len).await
    }

    /// Ids in ascending byte order that start with `prefix` and sort after `start_after`, at
    /// most `max`.
    pub fn list(&self, prefix: &str, start_after: Option<&str>, max: usize) -> Vec<PointId> {
        let points = self.inner.points.read().unwrap();
        let lower = match start_after {
            Some(after) if after >= prefix => Bound::Excluded(after.to_owned()),
            _ => Bound::Included(prefix.to_owned()),
        };
        points
            .range::<str, _>((lower.as_ref().map(String::as_str), Bound::Unbounded))
            .map(|(id, _)| id)
            .take_while(|id| id.as_str().starts_with(prefix))
            .take(max)
            .cloned()
            .collect()
    }

    /// Removes `id` and its files; returns the size it had.
    pub async fn delete(&self, id: &PointId) -> Result<u64, DeleteError> {
        let root = self.inner.shared.config.dir.clone();
        self.take_out(id, move |dir| remove_point_files(&root, &dir))
            .await
    }

    /// Takes `id` out of the store and closes it, then runs `files` on its directory under the
    /// point's lock (on the blocking pool), and tells subscribers it is gone. Returns the size
    /// it had.
    async fn take_out(
        &self,
        id: &PointId,
        files: impl FnOnce(PathBuf) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<u64, DeleteError> {
        let point = self
            .inner
            .points
            .write()
            .unwrap()
            .remove(id)
            .ok_or_else(|| DeleteError::NotFound(id.clone()))?;
        let shared = &self.inner.shared;
        let mut state = point.state.lock().await;
        let size = if state.recovered { state.end } else { 0 };
        state.deleted = true;
        if state.files.take().is_some() {
            shared.forget_open(&point.id);
        }
        point.snapshot.send_modify(|s| s.deleted = true);
        let dir = point.dir.clone();
        tokio::task::spawn_blocking(move || files(dir))
            .await
            .map_err(join_error)??;
        let _ = self.inner.events.send(AppendEvent {
            point: id.clone(),
            end: 0,
            removed: true,
            ownership: false,
            bytes: None,
        });
        Ok(size)
    }

    /// Takes `id` out of the store without deleting it: its files move to
    /// `<data_dir>/quarantine/<point>/<epoch>/`, where nothing serves them and only an operator
    /// deletes them (`docs/resharding.md`: what a forgotten member alone holds). Returns that
    /// directory.
    pub async fn quarantine(&self, id: &PointId, epoch: u64) -> Result<PathBuf, DeleteError> {
        let root = self.inner.shared.config.dir.clone();
        let target = self.quarantine_dir(id).join(epoch.to_string());
        let moved = target.clone();
        self.take_out(id, move |dir| {
            std::fs::create_dir_all(&moved).map_err(StorageError::io("creating", moved.clone()))?;
            // File by file: a point's directory may hold the directories of other points.
            for name in [JOURNAL_FILE, DATA_FILE, META_FILE] {
                let from = dir.join(name);
                match std::fs::rename(&from, moved.join(name)) {
                    Ok(()) => {}
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => return Err(StorageError::io("quarantining", from)(error)),
                }
            }
            sync_dir(&moved).map_err(StorageError::io("syncing", moved.clone()))?;
            sync_dir(&dir).map_err(StorageError::io("syncing", dir.clone()))?;
            remove_point_files(&root, &dir)
        })
        .await?;
        Ok(target)
    }

    /// Where the quarantined copies of `id` are kept, one directory per epoch.
    fn quarantine_dir(&self, id: &PointId) -> PathBuf {
        let points = &self.inner.shared.config.dir;
        points.with_file_name("quarantine").join(id.relative_dir())
    }

    /// The quarantined copies of `id`: (epoch, bytes, directory), oldest epoch first.
    pub fn quarantined(&self, id: &PointId) -> Vec<(u64, u64, PathBuf)> {
        let dir = self.quarantine_dir(id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut copies: Vec<(u64, u64, PathBuf)> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let epoch: u64 = path.file_name()?.to_str()?.parse().ok()?;
                let size = std::fs::metadata(path.join(DATA_FILE)).ok()?.len();
                Some((epoch, size, path))
            })
            .collect();
        copies.sort();
        copies
    }

    /// How many quarantined copies this node keeps.
    pub fn quarantined_count(&self) -> usize {
        let root = self.inner.shared.config.dir.with_file_name("quarantine");
        let mut count = 0;
        let mut pending = vec![root];
        while let Some(dir) = pending.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.join(DATA_FILE).exists() || path.join(JOURNAL_FILE).exists() {
                    count += 1;
                } else if path.is_dir() {
                    pending.push(path);
                }
            }
        }
        count
    }

    /// A receiver of every append to any point (replication follows the store with it). A
    /// receiver that falls behind gets `Lagged` and should rescan.
    pub fn subscribe(&self) -> broadcast::Receiver<AppendEvent> {
        self.inner.events.subscribe()
    }

    /// Stops the background tasks, then syncs and closes every point. Called on shutdown; the
    /// store must not be used afterwards.
    pub async fn close(&self) -> Result<(), StorageError> {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
        let points: Vec<_> = self
            .inner
            .points
            .read()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let mut first_error = None;
        for point in points {
            if let Err(error) = point.close(&self.inner.shared, Closing::Shutdown).await {
                tracing::error!(point = %point.id, %error, "closing point");
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    fn get(&self, id: &PointId) -> Result<Arc<Point>, ReadError> {
        self.inner
            .points
            .read()
            .unwrap()
            .get(id)
            .cloned()
            .ok_or_else(|| ReadError::NotFound(id.clone()))
    }

    fn get_or_insert(&self, id: &PointId) -> Arc<Point> {
        if let Some(point) = self.inner.points.read().unwrap().get(id) {
            return point.clone();
        }
        self.inner
            .points
            .write()
            .unwrap()
            .entry(id.clone())
            .or_insert_with(|| Arc::new(Point::new(&self.inner.shared, id.clone())))
            .clone()
    }

    fn spawn_background(&self) {
        let shared = &self.inner.shared;
        let token = self.inner.shutdown.clone();
        if shared.config.fsync == Fsync::Interval {
            let store = Arc::downgrade(&self.inner);
            let period = shared.config.fsync_interval;
            let token = token.clone();
            self.inner.tasks.spawn(async move {
                let mut ticker = tokio::time::interval(period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = token.cancelled() => return,
                        _ = ticker.tick() => {}
                    }
                    let Some(inner) = store.upgrade() else { return };
                    let open: Vec<_> = inner
                        .shared
                        .open
                        .lock()
                        .unwrap()
                        .values()
                        .cloned()
                        .collect();
                    for point in open {
                        if let Err(error) = point.sync().await {
                            tracing::error!(point = %point.id, %error, "group commit");
                        }
                    }
                }
            });
        }
        let store = Arc::downgrade(&self.inner);
        let idle = shared.config.idle_close;
        self.inner.tasks.spawn(async move {
            let mut ticker = tokio::time::interval((idle / 2).max(Duration::from_millis(50)));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let Some(inner) = store.upgrade() else { return };
                let now = inner.shared.now_ms();
                let idle_ms = idle.as_millis() as u64;
                let stale: Vec<_> = inner
                    .shared
                    .open
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|p| {
                        now.saturating_sub(p.last_used_ms.load(Ordering::Relaxed)) >= idle_ms
                    })
                    .cloned()
                    .collect();
                for point in stale {
                    if let Err(error) = point.close(&inner.shared, Closing::Idle).await {
                        tracing::error!(point = %point.id, %error, "closing idle point");
                    }
                }
            }
        });
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn remember_open(&self, point: &Arc<Point>) {
        let mut open = self.open.lock().unwrap();
        if open.insert(point.id.clone(), point.clone()).is_none() {
            let count = self.open_count.fetch_add(1, Ordering::Relaxed) + 1;
            ::metrics::gauge!(metrics::OPEN_POINTS).set(count as f64);
        }
    }

    fn forget_open(&self, id: &PointId) {
        if self.open.lock().unwrap().remove(id).is_some() {
            let count = self.open_count.fetch_sub(1, Ordering::Relaxed) - 1;
            ::metrics::gauge!(metrics::OPEN_POINTS).set(count as f64);
        }
    }

    /// Closes least recently used points until at most `max_open` are open. Called with no
    /// point lock held, so it can take the victims' locks.
    async fn evict_over_limit(&self) {
        while self.open_count.load(Ordering::Relaxed) > self.config.max_open {
            let Some(victim) = self.least_recently_used() else {
                return;
            };
            if let Err(error) = victim.close(self, Closing::Idle).await {
                tracing::error!(point = %victim.id, %error, "closing least recently used point");
                return;
            }
        }
    }

    fn least_recently_used(&self) -> Option<Arc<Point>> {
        self.open
            .lock()
            .unwrap()
            .values()
            .min_by_key(|p| p.last_use.load(Ordering::Relaxed))
            .cloned()
    }
}

impl Point {
    fn new(shared: &Shared, id: PointId) -> Self {
        Self {
            dir: shared.config.dir.join(id.relative_dir()),
            id,
            state: Mutex::new(State::default()),
            snapshot: watch::Sender::new(Snapshot::default()),
            last_used_ms: AtomicU64::new(0),
            last_use: AtomicU64::new(0),
            last_append_ms: AtomicU64::new(0),
        }
    }

    pub fn id(&self) -> &PointId {
        &self.id
    }

    /// The published size and checksum (valid once the point was opened through the store).
    pub fn snapshot(&self) -> Snapshot {
        *self.snapshot.borrow()
    }

    /// Follows the published snapshot: changes after every append and on deletion.
    pub fn watch(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    /// Whether the point grew less than `within` ago (a point still being written).
    pub fn written_within(&self, store: &Store, within: Duration) -> bool {
        match self.last_append_ms.load(Ordering::Relaxed) {
            0 => false,
            at => {
                let now = store.inner.shared.now_ms() + 1;
                now.saturating_sub(at) < within.as_millis() as u64
            }
        }
    }

    /// Writes `meta` as the point's `point.meta` (synced unless `fsync` is `never`), then keeps
    /// it as the one in memory.
    async fn replace_meta(
        &self,
        state: &mut State,
        meta: Meta,
        fsync: Fsync,
    ) -> Result<(), StorageError> {
        let (dir, written) = (self.dir.clone(), meta.clone());
        tokio::task::spawn_blocking(move || write_meta(&dir, &written, fsync))
            .await
            .map_err(join_error)??;
        let arriving = meta.ownership.is_arriving();
        self.snapshot.send_if_modified(|snapshot| {
            std::mem::replace(&mut snapshot.arriving, arriving) != arriving
        });
        state.meta = Some(meta);
        Ok(())
    }

    /// `point.meta`, read once.
    async fn meta<'a>(&self, state: &'a mut State) -> Result<&'a Meta, StorageError> {
        if state.meta.is_none() {
            let dir = self.dir.clone();
            let meta = tokio::task::spawn_blocking(move || read_meta(&dir))
                .await
                .map_err(join_error)??;
            state.meta = Some(meta);
        }
        Ok(state.meta.as_ref().expect("just read"))
    }

    /// Sends `span` of the point into `frames` as `(offset, bytes)` until the span is done, the
    /// receiver is gone (a client that left: nothing more is read), the point is deleted
    /// (`NotFound`) or `shutdown` is cancelled while following. The one read loop of
    /// `ConsumeStream` and of the HTTP gateway.
    pub async fn stream(
        self: Arc<Self>,
        store: Store,
        span: Span,
        frames: mpsc::Sender<Result<(u64, Bytes), StreamError>>,
        shutdown: CancellationToken,
    ) {
        let mut changes = self.watch();
        let mut position = span.offset;
        loop {
            if Some(position) == span.stop {
                return;
            }
            let current = *changes.borrow_and_update();
            if current.deleted {
                let _ = frames
                    .send(Err(ReadError::NotFound(self.id.clone()).into()))
                    .await;
                return;
            }
            if position < current.end {
                let end = span.stop.map_or(current.end, |stop| stop.min(current.end));
                let len = span.chunk.min(end - position);
                let frame = match self.read(&store, position, len).await {
                    Ok(frame) => frame,
                    Err(error) => {
                        let _ = frames.send(Err(error.into())).await;
                        return;
                    }
                };
                if frames.send(Ok((position, frame))).await.is_err() {
                    return;
                }
                position += len;
                continue;
            }
            if !span.follow {
                return;
            }
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                _ = frames.closed() => return,
                _ = shutdown.cancelled() => {
                    let _ = frames.send(Err(StreamError::ShuttingDown)).await;
                    return;
                }
            }
        }
    }

    /// Reads `[offset, offset + len)`, which must lie within the published end.
    pub async fn read(
        self: &Arc<Self>,
        store: &Store,
        offset: u64,
        len: u64,
    ) -> Result<Bytes, ReadError> {
        let snapshot = self.snapshot();
        let limit = offset.saturating_add(len);
        if limit > snapshot.end {
            return Err(ReadError::OutOfRange {
                point: self.id.clone(),
                offset,
                limit,
                end: snapshot.end,
            });
        }
        let files = self.files(&store.inner.shared).await?;
        let path = self.dir.join(DATA_FILE);
        let bytes =
            tokio::task::spawn_blocking(move || read_exact_at(&files.data, offset, len as usize))
                .await
                .map_err(join_error)?
                .map_err(StorageError::io("reading", path))?;
        Ok(bytes)
    }

    /// The open files, opening them if needed.
    async fn files(self: &Arc<Self>, shared: &Arc<Shared>) -> Result<Arc<Files>, ReadError> {
        let mut state = self.state.lock().await;
        if state.deleted {
            // Never reopen (and so recreate) a deleted point.
            return Err(ReadError::NotFound(self.id.clone()));
        }
        let files = self.ensure_open(shared, &mut state).await?;
        drop(state);
        shared.evict_over_limit().await;
        Ok(files)
    }

    async fn ensure_open(
        self: &Arc<Point>,
        shared: &Arc<Shared>,
        state: &mut State,
    ) -> Result<Arc<Files>, StorageError> {
        self.last_used_ms.store(shared.now_ms(), Ordering::Relaxed);
        self.last_use.store(
            shared.uses.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if let Some(files) = &state.files {
            return Ok(files.clone());
        }
        let dir = self.dir.clone();
        let fsync = shared.config.fsync;
        let known = state.recovered.then_some((state.end, state.journal_len));
        let (files, recovered) =
            tokio::task::spawn_blocking(move || open_files(&dir, fsync, known))
                .await
                .map_err(join_error)??;
        if let Some(recovered) = recovered {
            if recovered.verified_bytes > 0 || recovered.dropped_records > 0 {
                tracing::info!(
                    point = %self.id,
                    end = recovered.end,
                    verified_bytes = recovered.verified_bytes,
                    dropped_records = recovered.dropped_records,
                    "recovered point"
                );
            }
            state.recovered = true;
            state.end = recovered.end;
            state.crc = recovered.point_crc;
            state.durable = recovered.end;
            state.journal_len = recovered.journal_len;
            let arriving = self.meta(state).await?.ownership.is_arriving();
            self.snapshot.send_replace(Snapshot {
                end: recovered.end,
                crc: recovered.point_crc,
                deleted: false,
                arriving,
            });
        }
        let files = Arc::new(files);
        state.files = Some(files.clone());
        shared.remember_open(self);
        Ok(files)
    }

    /// Writes a batch of appends under the point's lock: the data in order, then their journal
    /// records in one write, then (with `fsync = "always"`) one sync for the whole batch. The
    /// appends become visible together, once durable. `known_crcs`, the CRC32C of each frame
    /// when the caller checked them already, spares a pass over the bytes.
    async fn write(
        &self,
        shared: &Arc<Shared>,
        state: &mut State,
        frames: Vec<Bytes>,
        known_crcs: Option<Vec<u32>>,
        expected_start: Option<u64>,
    ) -> Result<Vec<Appended>, AppendError> {
        if let Some(reason) = &state.failed {
            return Err(AppendError::Refused {
                point: self.id.clone(),
                reason: reason.clone(),
            });
        }
        let start = state.end;
        if let Some(expected) = expected_start
            && expected != start
        {
            return Err(AppendError::OffsetMismatch {
                point: self.id.clone(),
                expected,
                end: start,
            });
        }
        let files = state.files.clone().expect("write on an open point");
        let always = shared.config.fsync == Fsync::Always;
        let (previous_crc, durable, journal_offset) = (state.crc, state.durable, state.journal_len);
        let dir = self.dir.clone();
        #[cfg(test)]
        let inject_failure = shared.fail_next_journal_write.swap(false, Ordering::SeqCst);
        let written = tokio::task::spawn_blocking(move || {
            let mut records = Vec::with_capacity(frames.len());
            let (mut end, mut crc) = (start, previous_crc);
            for (index, frame) in frames.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
                files
                    .data
                    .write_all_at(frame, end)
                    .map_err(StorageError::io("writing", dir.join(DATA_FILE)))?;
                // Two hardware passes are cheaper than one pass and a combine.
                let append_crc = match &known_crcs {
                    Some(crcs) => crcs[index],
                    None => crc32c::crc32c(frame),
                };
                crc = crc32c::crc32c_append(crc, frame);
                end += frame.len() as u64;
                records.push(Record {
                    end,
                    durable,
                    append_crc,
                    point_crc: crc,
                });
            }
            #[cfg(test)]
            if inject_failure {
                let error = std::io::Error::from_raw_os_error(28); // ENOSPC
                return Err(StorageError::io("writing", dir.join(JOURNAL_FILE))(error));
            }
            let journal: Vec<u8> = records.iter().flat_map(Record::encode).collect();
            files
                .journal
                .write_all_at(&journal, journal_offset)
                .map_err(StorageError::io("writing", dir.join(JOURNAL_FILE)))?;
            if always && !records.is_empty() {
                files.sync(&dir)?;
            }
            Ok::<_, StorageError>((frames, records))
        })
        .await
        .map_err(join_error)
        .and_then(|result| result);
        let (frames, records) = match written {
            Ok(written) => written,
            Err(error) => {
                tracing::error!(point = %self.id, %error, "append failed; the point now refuses writes");
                state.failed = Some(error.to_string());
                return Err(error.into());
            }
        };
        let mut appended = Vec::with_capacity(frames.len());
        let mut next_record = records.iter();
        let (mut end, mut crc) = (state.end, state.crc);
        for frame in &frames {
            let start = end;
            if !frame.is_empty() {
                let record = next_record.next().expect("one record per non-empty frame");
                (end, crc) = (record.end, record.point_crc);
                state.journal_len += journal::RECORD_LEN;
            }
            appended.push(Appended { start, end, crc });
        }
        if end != state.end {
            self.last_append_ms
                .store(shared.now_ms() + 1, Ordering::Relaxed);
            ::metrics::counter!(metrics::APPENDS).increment(records.len() as u64);
            ::metrics::counter!(metrics::APPENDED_BYTES).increment(end - state.end);
            state.end = end;
            state.crc = crc;
            if always {
                state.durable = end;
            } else {
                state.dirty = true;
            }
            self.snapshot.send_modify(|snapshot| {
                snapshot.end = end;
                snapshot.crc = crc;
            });
        }
        Ok(appended)
    }

    /// Fsyncs what was written since the last sync (group commit). The lock is not held while
    /// syncing, so writers carry on; only what was written before the sync started is recorded
    /// as durable.
    async fn sync(&self) -> Result<(), StorageError> {
        let (files, end) = {
            let mut state = self.state.lock().await;
            if !state.dirty || state.failed.is_some() {
                return Ok(());
            }
            let Some(files) = state.files.clone() else {
                return Ok(());
            };
            state.dirty = false;
            (files, state.end)
        };
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || files.sync(&dir))
            .await
            .map_err(join_error)
            .and_then(|result| result);
        let mut state = self.state.lock().await;
        match result {
            Ok(()) => {
                state.durable = state.durable.max(end);
                Ok(())
            }
            Err(error) => {
                state.failed = Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Closes the files. At shutdown, and when the policy syncs at all, unsynced appends are
    /// synced first and a sync marker is written, so a restart verifies nothing; under
    /// `fsync = "never"` an idle close leaves them to the OS (and to recovery).
    async fn close(&self, shared: &Shared, closing: Closing) -> Result<(), StorageError> {
        let mut state = self.state.lock().await;
        let Some(files) = state.files.take() else {
            return Ok(());
        };
        shared.forget_open(&self.id);
        let clean = state.durable == state.end && !state.dirty;
        let skip_sync = closing == Closing::Idle && shared.config.fsync == Fsync::Never;
        if state.failed.is_some() || clean || skip_sync {
            return Ok(());
        }
        let marker = Record {
            end: state.end,
            durable: state.end,
            append_crc: 0,
            point_crc: state.crc,
        };
        let offset = state.journal_len;
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            files
                .data
                .sync_data()
                .map_err(StorageError::io("syncing", dir.join(DATA_FILE)))?;
            files
                .journal
                .write_all_at(&marker.encode(), offset)
                .map_err(StorageError::io("writing", dir.join(JOURNAL_FILE)))?;
            files
                .journal
                .sync_data()
                .map_err(StorageError::io("syncing", dir.join(JOURNAL_FILE)))
        })
        .await
        .map_err(join_error)
        .and_then(|result| result);
        match result {
            Ok(()) => {
                state.journal_len += journal::RECORD_LEN;
                state.durable = state.end;
                state.dirty = false;
                Ok(())
            }
            Err(error) => {
                state.failed = Some(error.to_string());
                Err(error)
            }
        }
    }
}

impl Files {
    /// The lengths of the data file and of the journal.
    fn lengths(&self, dir: &Path) -> Result<(u64, u64), StorageError> {
        let length = |file: &File, name: &str| {
            file.metadata()
                .map(|m| m.len())
                .map_err(StorageError::io("inspecting", dir.join(name)))
        };
        Ok((
            length(&self.data, DATA_FILE)?,
            length(&self.journal, JOURNAL_FILE)?,
        ))
    }

    fn sync(&self, dir: &Path) -> Result<(), StorageError> {
        let started = Instant::now();
        self.data
            .sync_data()
            .map_err(StorageError::io("syncing", dir.join(DATA_FILE)))?;
        self.journal
            .sync_data()
            .map_err(StorageError::io("syncing", dir.join(JOURNAL_FILE)))?;
        ::metrics::counter!(metrics::FSYNCS).increment(1);
        ::metrics::histogram!(metrics::FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// Opens (creating if needed) the files of the point in `dir`. `known` is the `(end,
/// journal_len)` this process last saw; if the files still match it, recovery is skipped and
/// `None` is returned.
fn open_files(
    dir: &Path,
    fsync: Fsync,
    known: Option<(u64, u64)>,
) -> Result<(Files, Option<journal::Recovered>), StorageError> {
    let journal_path = dir.join(JOURNAL_FILE);
    let data_path = dir.join(DATA_FILE);
    let created = !journal_path.exists();
    if created {
        create_dirs(dir, fsync).map_err(StorageError::io("creating", dir))?;
    }
    let open = |path: &Path| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(StorageError::io("opening", path))
    };
    let journal_file = open(&journal_path)?;
    if journal_file
        .metadata()
        .map_err(StorageError::io("inspecting", &journal_path))?
        .len()
        < journal::HEADER_LEN
    {
        // New, or its creation was interrupted before the header was complete.
        journal_file
            .set_len(0)
            .and_then(|()| journal_file.write_all_at(&journal::encode_header(), 0))
            .and_then(|()| match fsync {
                Fsync::Never => Ok(()),
                _ => journal_file.sync_all(),
            })
            .map_err(StorageError::io("initialising", &journal_path))?;
    }
    let data_file = open(&data_path)?;
    if created && fsync != Fsync::Never {
        sync_dir(dir).map_err(StorageError::io("syncing", dir))?;
    }
    let files = Files {
        data: data_file,
        journal: journal_file,
    };

    if let Some((end, journal_len)) = known
        && files.lengths(dir)? == (end, journal_len)
    {
        return Ok((files, None));
    }

    let recovered =
        journal::recover(&files.journal, &files.data).map_err(|source| StorageError::Recovery {
            path: dir.to_owned(),
            source,
        })?;
    let (data_len, journal_len) = files.lengths(dir)?;
    if data_len != recovered.end || journal_len != recovered.journal_len {
        files
            .data
            .set_len(recovered.end)
            .and_then(|()| files.data.sync_all())
            .map_err(StorageError::io("truncating", &data_path))?;
        files
            .journal
            .set_len(recovered.journal_len)
            .and_then(|()| files.journal.sync_all())
            .map_err(StorageError::io("truncating", &journal_path))?;
    }
    ::metrics::counter!(metrics::RECOVERED_BYTES).increment(recovered.verified_bytes);
    Ok((files, Some(recovered)))
}

/// Creates `dir` and any missing parents, fsyncing each new directory's parent so the entries
/// survive a power loss.
fn create_dirs(dir: &Path, fsync: Fsync) -> std::io::Result<()> {
    let mut missing = Vec::new();
    let mut cursor = dir;
    while !cursor.exists() {
        missing.push(cursor.to_owned());
        match cursor.parent() {
            Some(parent) => cursor = parent,
            None => break,
        }
    }
    for new_dir in missing.iter().rev() {
        match std::fs::create_dir(new_dir) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(error),
        }
        if fsync != Fsync::Never
            && let Some(parent) = new_dir.parent()
        {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The point's `point.meta`, or the empty one if it has none.
fn read_meta(dir: &Path) -> Result<Meta, StorageError> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|error| StorageError::io("decoding", &path)(std::io::Error::other(error))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Meta::default()),
        Err(error) => Err(StorageError::io("reading", path)(error)),
    }
}

/// Replaces `point.meta`: a temporary file (synced unless `fsync = "never"`), renamed over it.
fn write_meta(dir: &Path, meta: &Meta, fsync: Fsync) -> Result<(), StorageError> {
    let path = dir.join(META_FILE);
    let temporary = dir.join("point.meta.tmp");
    let bytes = serde_json::to_vec(meta).expect("the meta of a point serializes");
    let write = || -> std::io::Result<()> {
        let mut file = File::create(&temporary)?;
        std::io::Write::write_all(&mut file, &bytes)?;
        if fsync != Fsync::Never {
            file.sync_all()?;
        }
        std::fs::rename(&temporary, &path)?;
        if fsync != Fsync::Never {
            sync_dir(dir)?;
        }
        Ok(())
    };
    write().map_err(StorageError::io("writing", path))
}

/// Removes the files of the point in `dir`, then every directory from `dir` up to (excluding)
/// `root` that is left empty. A directory that still holds another point's continuation stays.
fn remove_point_files(root: &Path, dir: &Path) -> Result<(), StorageError> {
    for name in [JOURNAL_FILE, DATA_FILE, META_FILE] {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StorageError::io("removing", path)(error)),
        }
    }
    let mut cursor = Some(dir);
    while let Some(current) = cursor {
        if current == root || !current.starts_with(root) {
            break;
        }
        if std::fs::remove_dir(current).is_err() {
            break;
        }
        cursor = current.parent();
    }
    Ok(())
}

/// Walks `dir` and returns the id of every point directory (one holding a journal).
fn scan(dir: &Path) -> std::io::Result<Vec<PointId>> {
    std::fs::create_dir_all(dir)?;
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current)? {
            let entry = entry?;
            if entry.file_type()?.is_dir() {
                pending.push(entry.path());
            } else if entry.file_name() == JOURNAL_FILE {
                let relative = current.strip_prefix(dir).unwrap_or(&current);
                match PointId::from_relative_dir(relative) {
                    Some(id) => found.push(id),
                    None => {
                        tracing::warn!(dir = %current.display(), "ignoring a directory that is not a point")
                    }
                }
            }
        }
    }
    Ok(found)
}

/// Reads exactly `len` bytes at `offset` into a new buffer, without zeroing it first (for large
/// reads the zeroing cost as much as the read).
fn read_exact_at(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let (want, at) = (len - buf.len(), offset + buf.len() as u64);
        let spare = buf.spare_capacity_mut();
        // SAFETY: `spare` has at least `want` writable bytes; pread writes at most `want` of them
        // and reports how many, and only those are marked initialised below.
        let read = unsafe {
            libc::pread(
                file.as_raw_fd(),
                spare.as_mut_ptr().cast(),
                want,
                at as libc::off_t,
            )
        };
        match read {
            -1 => {
                let error = std::io::Error::last_os_error();
                if error.kind() != std::io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            // SAFETY: pread initialised `read` bytes of the spare capacity.
            read => unsafe { buf.set_len(buf.len() + read as usize) },
        }
    }
    Ok(buf.freeze())
}

fn join_error(error: tokio::task::JoinError) -> StorageError {
    StorageError::Io {
        op: "running blocking I/O",
        path: PathBuf::new(),
        source: std::io::Error::other(error),
    }
}
