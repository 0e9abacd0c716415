//! The point store: named, append-only byte streams on local disk.
//!
//! Each point is a directory (see [`id`] for how ids become paths) holding `point.data`, the raw
//! bytes, so a read is one positional read, `point.journal`, one record per append (see
//! [`journal`]), and once a content type was given, `point.meta` (JSON). Opening a point after
//! a crash recovers it: the data file is cut back to the last complete, checksum-valid append.
//! The catalogue ([`catalogue`]) holds a row per point with what `stat`, `ls` and routing need,
//! so the store reads no point at start-up and keeps in memory only the points in use. Appends to one point are serialised by the point's lock; reads take no
//! lock and never look past the published end. File handles are opened lazily and bounded: the
//! least recently used points are closed when more than `max_open` are open, and idle points are
//! closed after `idle_close`. After an I/O error a point refuses writes until the node restarts.
//! A small new point may be packed instead ([`segment`]): its bytes in a shared segment file and
//! no files of its own, until anything but a read or its removal gives it files.
//!
//! The format is documented in `docs/storage.md`.

mod catalogue;
mod entry;
pub mod error;
mod files;
pub mod id;
pub mod journal;
pub mod leader_epochs;
mod meta;
pub mod ownership;
mod registry;
mod row_bytes;
mod segment;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use error::{AppendError, DeleteError, ReadError, StorageError, TruncateError};
pub use id::{InvalidPointId, PointId};
use journal::Record;
pub use leader_epochs::{EpochStart, LeaderEpochs};
pub use meta::inspect as inspect_meta;
pub use ownership::{Handover, Ownership, SealedAt};

use entry::{Appending, Created, Files, Origin, State};
pub use entry::{FilePiece, Point};
use files::*;
use meta::{Meta, read_meta, write_meta};

use crate::metrics;

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
    /// When appended bytes are synced (`storage.fsync`).
    pub fsync: Fsync,
    /// How often with `fsync = "interval"`.
    pub fsync_interval: Duration,
    /// Most points with open file handles at once (each holds two descriptors).
    pub max_open: usize,
    /// Points not used for this long are closed.
    pub idle_close: Duration,
    /// A new point whose first batch is all it holds and at most this many bytes is packed
    /// into a segment (`segment.rs`); 0: never.
    pub packed_max: u64,
}

/// The most a point packed into a segment may hold (`storage.packed_max`).
pub const MAX_PACKED: u64 = 1024 * 1024;

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
    /// Its published end: every byte before it is stored (and synced, with `fsync =
    /// "always"`). Writers append here; replication copies up to here.
    pub end: u64,
    /// CRC32C of `[0, end)`.
    pub crc: u32,
    /// Its committed end, at most `end`: what consumers are served. Bytes appended
    /// [`Visibility::OnCommit`] count only once [`Store::commit`] reached them (on a group's
    /// leader, once acknowledged under `ack = { replicas = N }`; on a follower, once its leader
    /// said so), so that no consumer reads a tail a failover could cut (`docs/failover.md`).
    pub committed: u64,
    /// CRC32C of `[0, committed)`.
    pub committed_crc: u32,
    /// The point was deleted: no more bytes will come.
    pub deleted: bool,
    /// A copy still arriving in a handover (`docs/resharding.md`): not served to clients until
    /// the handover commits. Kept here so readers need not take the point's lock to know.
    pub arriving: bool,
}

/// What a walk over every point reads of one ([`Store::summaries`]): what a follower offers its
/// leader, what a leader starts a follower's session from, where a leadership transfer waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The point.
    pub id: PointId,
    /// Its end, CRC32C and committed end.
    pub snapshot: Snapshot,
    /// Its epoch, owner and handover record.
    pub ownership: Ownership,
    /// Where each leader epoch began in it.
    pub leader_epochs: LeaderEpochs,
}

/// How a client's write was admitted ([`Store::write`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientWrite {
    /// Where the point must end for the write to be taken (a produce frame's
    /// `expected_offset`); `None`: wherever it ends. A refusal for a point that does not exist
    /// does not create it.
    pub expected_start: Option<u64>,
    /// When its bytes are served to consumers.
    pub visibility: Visibility,
    /// The leader epoch the write gate admitted it at (0: none known), recorded in the point
    /// before its first write at that epoch ([`LeaderEpochs`]).
    pub leader_epoch: u64,
}

/// When the bytes of an append are served to consumers ([`Snapshot::committed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// As soon as they are stored: a point nobody else holds a copy of that could be named
    /// leader, or a copy the sender has committed already (a handover).
    #[default]
    Now,
    /// Once [`Store::commit`] reaches their end: a group leader's write under `ack = {
    /// replicas = N }`, or a follower's copy of its leader's.
    OnCommit,
}

/// The outcome of one append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Appended {
    /// Where the append starts in the point.
    pub start: u64,
    /// The point's end after it.
    pub end: u64,
    /// The CRC32C of the point's bytes up to `end`.
    pub crc: u32,
}

/// What happened to a point: published to [`Store::subscribe`].
#[derive(Debug, Clone)]
pub enum StoreEvent {
    /// The point grew to `end`.
    Grew {
        /// The point.
        point: PointId,
        /// Its new end.
        end: u64,
        /// The CRC32C of its bytes up to `end`: which copy of the point grew (one deleted and
        /// made again is another).
        crc: u32,
        /// The bytes of the append, while the store's budget for them lasts: replication sends
        /// them to connected followers without reading them back.
        bytes: Option<Arc<LiveBytes>>,
    },
    /// The point's ownership record changed (its epoch, or a handover): replication describes
    /// the point again to connected followers.
    Owned {
        /// The point.
        point: PointId,
    },
    /// The point was deleted.
    Removed {
        /// The point.
        point: PointId,
    },
}

impl StoreEvent {
    /// The point it happened to.
    pub fn point(&self) -> &PointId {
        match self {
            StoreEvent::Grew { point, .. }
            | StoreEvent::Owned { point }
            | StoreEvent::Removed { point } => point,
        }
    }
}

/// Most bytes of appends lent to subscribers at once, store-wide: beyond it, events carry no
/// bytes and replication reads them from the point.
pub const LIVE_BUDGET: u64 = 64 * 1024 * 1024;

/// The bytes of one append, `[start, start + len)` of its point, counted against
/// [`LIVE_BUDGET`] until the last holder drops them.
#[derive(Debug)]
pub struct LiveBytes {
    /// Where the append starts in its point.
    pub start: u64,
    /// Its frames, as appended.
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

    /// Its bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it ends in its point.
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
    /// The points in use (open, referenced, or not settled in the catalogue yet): the others
    /// are read from the catalogue when asked for, and dropped from here when unused.
    live: RwLock<HashMap<PointId, Arc<Point>>>,
    /// Taking a point into use past this many sweeps the unused ones out at once.
    sweep_above: AtomicUsize,
    /// Whether a sweep's task is writing the rows of points committed further since their
    /// rows were written (one at a time: the next sweep finds those it has not reached).
    recording: AtomicBool,
    events: broadcast::Sender<StoreEvent>,
    /// Bytes lent to subscribers now ([`LiveBytes`]).
    lent: Arc<AtomicU64>,
    /// Woken at every change of a point's ownership record (a fenced write waits on it).
    ownership_changed: tokio::sync::Notify,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Whether the store was stopped cleanly before this start (`Store::stopped_cleanly`).
    stopped_cleanly: bool,
}

/// What every point needs from the store.
struct Shared {
    config: StoreConfig,
    /// A row per point held ([`catalogue`]).
    catalogue: Arc<catalogue::Catalogue>,
    epoch: Instant,
    /// The wall-clock time at `epoch` (a point's last write, [`Point::modified`], is kept as ms
    /// since `epoch`).
    opened_at: std::time::SystemTime,
    /// Open points and when each was last used (ms since `epoch`).
    open: StdMutex<HashMap<PointId, Arc<Point>>>,
    open_count: AtomicUsize,
    /// Incremented on every use of a point: orders points for LRU eviction.
    uses: AtomicU64,
    /// Incremented when a point is created ([`Store::generation`]).
    generation: AtomicU64,
    /// Where a point's file work runs under `fsync = "never"` ([`Shared::blocking`]).
    askers: crate::askers::Askers,
    /// Tests make the next journal write fail, as a full or failing disk would.
    #[cfg(test)]
    fail_next_journal_write: AtomicBool,
}

/// A byte range of a point to stream: `[offset, stop)` in frames of at most `chunk` bytes. With
/// `follow`, the stream waits at the end of the point for new bytes (until `stop`; `None`: until
/// the receiver goes away).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// The first byte.
    pub offset: u64,
    /// The end (exclusive); `None`: the point's end, or never with `follow`.
    pub stop: Option<u64>,
    /// Most bytes per frame.
    pub chunk: u64,
    /// Wait at the end for new bytes.
    pub follow: bool,
}

/// How a [`Point::stream`] ended early.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the point failed.
    #[error(transparent)]
    Read(#[from] ReadError),
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
}
