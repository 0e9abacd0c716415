//! One point of the registry: its lock-protected write state, its published snapshot, its
//! files opened lazily, and its reads, streams, writes, syncs and closing. Everything here is
//! about one point; the registry decides which point and when.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Mutex, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::segment::Needle;
use super::*;

/// One point: its lock-protected write state and its published snapshot.
pub struct Point {
    pub(super) id: PointId,
    pub(super) dir: PathBuf,
    pub(super) state: Mutex<State>,
    pub(super) snapshot: watch::Sender<Snapshot>,
    /// When the point was last used (ms since the store opened), for idle close.
    pub(super) last_used_ms: AtomicU64,
    /// The store's use counter at the last use, for LRU order.
    pub(super) last_use: AtomicU64,
    /// When the point last grew (ms since the store opened, + 1; 0: not since the store opened).
    pub(super) last_append_ms: AtomicU64,
    /// Its data file's modification time (Unix ms, + 1; 0: not read yet), for a point that has
    /// not grown since the store opened ([`Point::modified`]).
    file_modified_ms: AtomicU64,
    /// What is committed and what waits for it ([`Snapshot::committed`]). Its lock is also
    /// held while the snapshot changes, so that an append and a commit publish in order.
    pub(super) commits: std::sync::Mutex<Commits>,
}

/// The appends of a point stored but not committed yet, and how far a commit reached.
#[derive(Debug, Default)]
pub(super) struct Commits {
    /// The furthest end a commit named (it may name bytes still arriving).
    target: u64,
    /// The end and the point's CRC32C after each append not committed yet, in order.
    pending: std::collections::VecDeque<(u64, u32)>,
}

/// Who appends: a client's write is refused while the point's handover does not take writes
/// here; a copy this node receives (replication, a handover) is applied regardless, and comes
/// with the CRC32C of each frame, which its receiver checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Origin {
    /// Admitted by the write gate at `leader_epoch` (0: none), recorded in the point
    /// ([`LeaderEpochs`](super::LeaderEpochs)).
    Client {
        leader_epoch: u64,
    },
    Replication {
        crcs: Vec<u32>,
    },
}

/// What a caller asks a point to append.
pub(super) struct Appending {
    pub(super) frames: Vec<Bytes>,
    /// The CRC32C of each frame, when the caller checked them already: spares a pass over the
    /// bytes.
    pub(super) known_crcs: Option<Vec<u32>>,
    /// How consumers are served the frames.
    pub(super) visibility: Visibility,
    /// Where the point must end for the frames to be taken (`None`: wherever it ends).
    pub(super) expected_start: Option<u64>,
}

impl Origin {
    /// The CRC32C of each frame, when the writer checked them already (a leader's records).
    pub(super) fn known_crcs(&self) -> Option<Vec<u32>> {
        match self {
            Origin::Client { .. } => None,
            Origin::Replication { crcs } => Some(crcs.clone()),
        }
    }
}

#[derive(Default)]
pub(super) struct State {
    pub(super) files: Option<Arc<Files>>,
    /// `end`, `crc`, `durable` and `journal_len` are known (from the point's catalogue row, or
    /// its files were opened once).
    pub(super) recovered: bool,
    /// Its files were opened (and recovered) since the store opened.
    pub(super) verified: bool,
    pub(super) end: u64,
    pub(super) crc: u32,
    pub(super) durable: u64,
    pub(super) journal_len: u64,
    /// Bytes written since the last fsync.
    pub(super) dirty: bool,
    /// Set by the first failed write; the point refuses writes from then on.
    pub(super) failed: Option<String>,
    pub(super) deleted: bool,
    /// `point.meta`, once read.
    pub(super) meta: Option<Meta>,
    /// The committed end the journal's last record says (`journal::Record::behind`): when the
    /// committed end moved past it, closing the point writes a marker.
    pub(super) recorded_committed: u64,
    /// The catalogue has a row for the point.
    pub(super) catalogued: bool,
    /// Its files were opened since its row was last written: the row is written again when
    /// they close ([`catalogue::Catalogue::settle`]).
    pub(super) unsettled: bool,
    /// The committed end its row says: a commit that reached further while its files were
    /// closed is written to the row when the point closes or is let go of.
    pub(super) row_committed: u64,
    /// The media type its first bytes look like, once it has all the bytes sniffing reads.
    pub(super) sniffed: Option<String>,
    /// Where its bytes are while it is packed in a segment (it has no files then; opening
    /// them first gives it files of its own: [`Point::ensure_open`]).
    pub(super) packed: Option<Needle>,
}

impl State {
    /// Whether the catalogue's row says what the point holds (committed end included).
    pub(super) fn settled(&self, committed: u64) -> bool {
        self.catalogued && !self.unsettled && (!self.recovered || committed == self.row_committed)
    }
}

pub(super) struct Files {
    pub(super) data: File,
    pub(super) journal: File,
}

/// Why a write to a point's files failed, and what that leaves of the point.
enum WriteFailure {
    /// The disk is full, and the files were cut back to where they were: the point is as
    /// before, and takes writes again once there is space.
    Undone(StorageError),
    /// Anything else (or the files could not be cut back): what they hold is not known, so the
    /// point refuses writes until the node restarts and recovers it (`docs/storage.md`).
    Stop(StorageError),
}

/// A batch of appends planned under the point's lock ([`Point::write`]), written on the
/// blocking pool: alone, or right after a new point's files were created ([`First`]).
struct Batch {
    frames: Vec<Bytes>,
    /// The CRC32C of each frame, when the caller checked them already.
    known_crcs: Option<Vec<u32>>,
    /// Where the batch starts, and the point's CRC32C and durable end there.
    start: u64,
    previous_crc: u32,
    durable: u64,
    /// Where its records go in the journal.
    journal_offset: u64,
    /// The committed end its records are measured against (`Visibility::OnCommit`).
    committed: Option<u64>,
    always: bool,
    dir: PathBuf,
    #[cfg(test)]
    inject_failure: bool,
}

/// The frames of a batch written, with their journal records.
type Written = (Vec<Bytes>, Vec<Record>);

/// What [`Point::create_and_write`] did.
pub(super) enum Created {
    Written(Vec<Appended>),
    /// The files were not a new point's: nothing was written, here are the frames.
    NotNew(Vec<Bytes>),
}

/// What became of a batch given to [`Point::open_then`].
enum First {
    Written(Result<Written, WriteFailure>),
    /// The files held bytes already (not a point just created): the batch was not written.
    Unwritten(Batch),
}

impl Batch {
    /// The journal record of each non-empty frame, in order.
    fn records(&self) -> Vec<Record> {
        let behind = |end: u64| {
            self.committed.map_or(0, |committed| {
                u32::try_from(end.saturating_sub(committed)).unwrap_or(u32::MAX)
            })
        };
        let mut records = Vec::with_capacity(self.frames.len());
        let (mut end, mut crc) = (self.start, self.previous_crc);
        for (index, frame) in self.frames.iter().enumerate() {
            if frame.is_empty() {
                continue;
            }
            // Two hardware passes are cheaper than one pass and a combine.
            let append_crc = match &self.known_crcs {
                Some(crcs) => crcs[index],
                None => crc32c::crc32c(frame),
            };
            crc = crc32c::crc32c_append(crc, frame);
            end += frame.len() as u64;
            records.push(Record {
                end,
                durable: self.durable,
                append_crc,
                point_crc: crc,
                behind: behind(end),
            });
        }
        records
    }

    /// Writes the data in order, then the records in one journal write, then (with `fsync =
    /// "always"`) syncs both. A failure past the point's end is cut back if the disk is full.
    fn write(self, files: &Files) -> Result<Written, WriteFailure> {
        let records = self.records();
        let Batch {
            frames,
            start,
            journal_offset,
            always,
            dir,
            ..
        } = self;
        let undo = |error| files.cut_back(&dir, (start, journal_offset), error);
        let mut end = start;
        for frame in &frames {
            files
                .data
                .write_all_at(frame, end)
                .map_err(StorageError::io("writing", dir.join(DATA_FILE)))
                .map_err(undo)?;
            end += frame.len() as u64;
        }
        #[cfg(test)]
        if self.inject_failure {
            let error = std::io::Error::from_raw_os_error(libc::EIO);
            return Err(WriteFailure::Stop(StorageError::io(
                "writing",
                dir.join(JOURNAL_FILE),
            )(error)));
        }
        let journal: Vec<u8> = records.iter().flat_map(Record::encode).collect();
        files
            .journal
            .write_all_at(&journal, journal_offset)
            .map_err(StorageError::io("writing", dir.join(JOURNAL_FILE)))
            .map_err(undo)?;
        if always && !records.is_empty() {
            files.sync(&dir).map_err(WriteFailure::Stop)?;
        }
        Ok((frames, records))
    }
}

/// The file a point's bytes are read from: its own data file, or the segment it is packed in,
/// from where its needle's bytes begin. It stays open while held.
#[derive(Clone)]
pub(super) enum Source {
    Files(Arc<Files>),
    /// `len` bytes from `base` in `segment`: all the point held when it was found packed.
    Packed {
        segment: Arc<File>,
        base: u64,
        len: u64,
    },
}

impl Source {
    fn file(&self) -> &File {
        match self {
            Source::Files(files) => &files.data,
            Source::Packed { segment, .. } => segment,
        }
    }

    /// Where the point's byte `offset` is in the file.
    fn at(&self, offset: u64) -> u64 {
        match self {
            Source::Files(_) => offset,
            Source::Packed { base, .. } => base + offset,
        }
    }
}

/// A piece of the file holding a point's durable bytes (its data file, or the segment it is
/// packed in), for a caller that copies them to a socket itself ([`Point::pieces`]). The file
/// stays open while the piece is held, even if the point is closed, evicted or deleted
/// meanwhile.
pub struct FilePiece {
    source: Source,
    /// Where the piece starts in the file.
    pub offset: u64,
    /// Its length.
    pub len: u64,
}

impl FilePiece {
    /// The file, to copy from.
    pub fn file(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.source.file().as_fd()
    }

    /// Whether all of the piece is in the page cache: copying it will not wait for the disk.
    pub fn is_cached(&self) -> bool {
        files::is_cached(self.source.file(), self.offset, self.len)
    }

    /// Reads the piece into the page cache. Blocking: on the blocking pool.
    pub fn load(&self) -> std::io::Result<()> {
        files::load(self.source.file(), self.offset, self.len)
    }
}

impl Commits {
    /// Commits every pending append that ends at or before the target; the last one's end and
    /// CRC32C, if any.
    fn advance(&mut self) -> Option<(u64, u32)> {
        let mut committed = None;
        while let Some(&(end, crc)) = self.pending.front()
            && end <= self.target
        {
            committed = Some((end, crc));
            self.pending.pop_front();
        }
        committed
    }
}

impl Point {
    pub(super) fn new(shared: &Shared, id: PointId) -> Self {
        Self {
            dir: shared.config.dir.join(id.relative_dir()),
            id,
            state: Mutex::new(State::default()),
            snapshot: watch::Sender::new(Snapshot::default()),
            last_used_ms: AtomicU64::new(0),
            last_use: AtomicU64::new(0),
            last_append_ms: AtomicU64::new(0),
            file_modified_ms: AtomicU64::new(0),
            commits: Default::default(),
        }
    }

    /// A point the catalogue has a row for: known without opening its files, unless the row is
    /// stale (it is recovered from them on first use).
    pub(super) fn from_row(shared: &Shared, id: PointId, row: catalogue::Row) -> Self {
        let mut point = Point::new(shared, id);
        if row.modified_ms > 0 {
            point
                .file_modified_ms
                .store(row.modified_ms + 1, Ordering::Relaxed);
        }
        let mut state = State {
            catalogued: true,
            ..State::default()
        };
        if !row.stale {
            state.recovered = true;
            state.row_committed = row.committed;
            state.end = row.end;
            state.crc = row.crc;
            state.durable = row.durable.min(row.end);
            state.journal_len = row.journal_len;
            state.recorded_committed = row.recorded_committed;
            state.packed = row.needle;
            if row.committed < row.end {
                *point.commits.lock().expect("poisoned") = Commits {
                    target: row.committed,
                    pending: [(row.end, row.crc)].into(),
                };
            }
            point.snapshot.send_replace(row.snapshot());
        }
        state.meta = Some(row.meta);
        state.sniffed = row.sniffed;
        *point.state.get_mut() = state;
        point
    }

    /// The catalogue row of the point as `state` has it (its files closed, or just created).
    pub(super) fn row(&self, shared: &Shared, state: &State) -> catalogue::Row {
        let snapshot = self.snapshot();
        catalogue::Row {
            end: state.end,
            crc: state.crc,
            committed: snapshot.committed,
            committed_crc: snapshot.committed_crc,
            durable: state.durable,
            journal_len: state.journal_len,
            recorded_committed: state.recorded_committed,
            modified_ms: self.modified_ms(shared).unwrap_or(0),
            meta: state.meta.clone().unwrap_or_default(),
            sniffed: state.sniffed.clone(),
            needle: state.packed,
            stale: false,
        }
    }

    /// Writes the point's row (with those waiting for the catalogue's B-tree, written there
    /// on the blocking pool when enough wait).
    async fn write_row(
        &self,
        shared: &Shared,
        state: &mut State,
        settle: bool,
    ) -> Result<(), StorageError> {
        let row = self.row(shared, state);
        let catalogue = &shared.catalogue;
        let due = match settle {
            true => catalogue.settle(&self.id, &row),
            false => catalogue.update(&self.id, &row),
        };
        state.catalogued = true;
        state.row_committed = row.committed;
        if settle {
            state.unsettled = false;
        }
        if due {
            let catalogue = catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.flush())
                .await
                .map_err(join_error)??;
        }
        Ok(())
    }

    /// Its id.
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

    /// When the point last grew: kept in memory since the store opened; before that, its data
    /// file's modification time, read once. `None` when the file cannot be read.
    pub async fn modified(&self, store: &Store) -> Option<std::time::SystemTime> {
        let unix = |ms: u64| std::time::UNIX_EPOCH + Duration::from_millis(ms - 1);
        if let Some(ms) = self.modified_ms(&store.inner.shared) {
            return Some(std::time::UNIX_EPOCH + Duration::from_millis(ms));
        }
        let data = self.dir.join(super::files::DATA_FILE);
        let modified = tokio::fs::metadata(data).await.ok()?.modified().ok()?;
        let ms = modified
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_millis() as u64
            + 1;
        self.file_modified_ms.store(ms, Ordering::Relaxed);
        Some(unix(ms))
    }

    /// When the point last grew (Unix ms), if known without reading its file's time.
    fn modified_ms(&self, shared: &Shared) -> Option<u64> {
        match self.last_append_ms.load(Ordering::Relaxed) {
            0 => {}
            at => {
                let at = shared.opened_at + Duration::from_millis(at - 1);
                let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
                return Some(since.as_millis() as u64);
            }
        }
        match self.file_modified_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms - 1),
        }
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
    /// it as the one in memory and in its catalogue row (the handover index follows it at
    /// once, not when the point closes).
    pub(super) async fn replace_meta(
        &self,
        shared: &Shared,
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
        if state.catalogued {
            self.write_row(shared, state, false).await?;
        }
        Ok(())
    }

    /// `point.meta`, read once.
    pub(super) async fn meta<'a>(&self, state: &'a mut State) -> Result<&'a Meta, StorageError> {
        if state.meta.is_none() {
            let dir = self.dir.clone();
            let meta = tokio::task::spawn_blocking(move || read_meta(&dir))
                .await
                .map_err(join_error)??;
            state.meta = Some(meta);
        }
        Ok(state.meta.as_ref().expect("just read"))
    }

    /// `span` of the point as `(offset, bytes)` frames, each read when it is asked for: until
    /// the span is done, the point is deleted (`NotFound`) or `shutdown` is cancelled while
    /// following. Nothing is read ahead of the consumer, and dropping the stream stops the
    /// reading. The one read loop of `ConsumeStream` ([`Point::stream`]) and of the HTTP gateway.
    pub fn frames(
        self: Arc<Self>,
        store: Store,
        span: Span,
        shutdown: CancellationToken,
    ) -> impl futures::Stream<Item = Result<(u64, Bytes), StreamError>> + Send + 'static {
        let reading = Reading::new(self, store, span, shutdown);
        futures::stream::unfold(reading, |mut reading| async move {
            let (at, len) = match reading.next().await? {
                Ok(next) => next,
                Err(error) => return Some((Err(error), reading)),
            };
            let frame = match reading.point.read(&reading.store, at, len).await {
                Ok(frame) => Ok((at, frame)),
                Err(error) => {
                    reading.ended = true;
                    Err(error.into())
                }
            };
            Some((frame, reading))
        })
    }

    /// `span` of the point as pieces of its data file ([`FilePiece`]), for a caller that moves
    /// the bytes itself (the gateway's `sendfile`): the same span, order, ends and errors as
    /// [`Point::frames`], without reading a byte.
    pub fn pieces(
        self: Arc<Self>,
        store: Store,
        span: Span,
        shutdown: CancellationToken,
    ) -> impl futures::Stream<Item = Result<FilePiece, StreamError>> + Send + 'static {
        let reading = Reading::new(self, store, span, shutdown);
        futures::stream::unfold(reading, |mut reading| async move {
            let (at, len) = match reading.next().await? {
                Ok(next) => next,
                Err(error) => return Some((Err(error), reading)),
            };
            let piece = match reading.point.piece(&reading.store, at, len).await {
                Ok(piece) => Ok(piece),
                Err(error) => {
                    reading.ended = true;
                    Err(error.into())
                }
            };
            Some((piece, reading))
        })
    }

    /// Sends [`Point::frames`] into `frames` until they end or the receiver is gone (a client
    /// that left: nothing more is read, even while waiting for the point to grow).
    pub async fn stream(
        self: Arc<Self>,
        store: Store,
        span: Span,
        frames: mpsc::Sender<Result<(u64, Bytes), StreamError>>,
        shutdown: CancellationToken,
    ) {
        use futures::StreamExt;
        let read = self.frames(store, span, shutdown);
        let mut read = std::pin::pin!(read);
        loop {
            let frame = tokio::select! {
                frame = read.next() => frame,
                () = frames.closed() => return,
            };
            let Some(frame) = frame else { return };
            if frames.send(frame).await.is_err() {
                return;
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
        let source = self.published(store, offset, len).await?;
        let path = match &source {
            Source::Files(_) => self.dir.join(DATA_FILE),
            Source::Packed { .. } => segments_dir(&store.inner.shared.config.dir),
        };
        let at = source.at(offset);
        // Bytes in the page cache are copied here, without a trip to the blocking pool (a
        // thread hand-off per frame); the rest is read there.
        if len <= MAX_CACHED_READ {
            match read_cached_at(source.file(), at, len as usize) {
                Ok(Some(bytes)) => return Ok(bytes),
                Ok(None) => {}
                Err(error) => return Err(StorageError::io("reading", path)(error).into()),
            }
        }
        let bytes =
            tokio::task::spawn_blocking(move || read_exact_at(source.file(), at, len as usize))
                .await
                .map_err(join_error)?
                .map_err(StorageError::io("reading", path))?;
        Ok(bytes)
    }

    /// The data file's `[offset, offset + len)`, which must lie within the published end, open
    /// for the caller to copy from (the file stays open while the piece is held).
    pub async fn piece(
        self: &Arc<Self>,
        store: &Store,
        offset: u64,
        len: u64,
    ) -> Result<FilePiece, ReadError> {
        let source = self.published(store, offset, len).await?;
        Ok(FilePiece {
            offset: source.at(offset),
            source,
            len,
        })
    }

    /// The file to read from, once `[offset, offset + len)` is checked to lie within the
    /// published end.
    async fn published(
        self: &Arc<Self>,
        store: &Store,
        offset: u64,
        len: u64,
    ) -> Result<Source, ReadError> {
        let limit = offset.saturating_add(len);
        loop {
            // Opened first: a point opened for the first time since its row was written is
            // checked against its files (damage made while the node was stopped is cut back
            // then).
            let source = self.source(&store.inner.shared).await?;
            let snapshot = self.snapshot();
            if limit > snapshot.end {
                return Err(ReadError::OutOfRange {
                    point: self.id.clone(),
                    offset,
                    limit,
                    end: snapshot.end,
                });
            }
            match source {
                // Given files and grown since it was found packed: read from its files.
                Source::Packed { len: held, .. } if limit > held => continue,
                source => return Ok(source),
            }
        }
    }

    /// Where its bytes are read from: the segment it is packed in, or its files, opened if
    /// needed. Reading a packed point leaves it packed.
    pub(super) async fn source(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
    ) -> Result<Source, ReadError> {
        {
            let state = self.state.lock().await;
            if state.deleted {
                return Err(ReadError::NotFound(self.id.clone()));
            }
            if let (None, Some(needle)) = (&state.files, &state.packed) {
                self.last_used_ms.store(shared.now_ms(), Ordering::Relaxed);
                let segment = shared.catalogue.segments().file(needle)?;
                return Ok(Source::Packed {
                    segment,
                    base: needle.offset,
                    len: needle.len,
                });
            }
        }
        Ok(Source::Files(self.files(shared).await?))
    }

    /// The open files, opening them if needed (a packed point is given files of its own).
    pub(super) async fn files(
        self: &Arc<Self>,
        shared: &Arc<Shared>,
    ) -> Result<Arc<Files>, ReadError> {
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

    pub(super) async fn ensure_open(
        self: &Arc<Point>,
        shared: &Arc<Shared>,
        state: &mut State,
    ) -> Result<Arc<Files>, StorageError> {
        let (files, _) = self.open_then(shared, state, None).await?;
        Ok(files)
    }

    /// [`ensure_open`](Self::ensure_open), writing `first` in the same trip to the blocking
    /// pool if the files are opened now and hold nothing yet.
    async fn open_then(
        self: &Arc<Point>,
        shared: &Arc<Shared>,
        state: &mut State,
        first: Option<Batch>,
    ) -> Result<(Arc<Files>, Option<First>), StorageError> {
        self.last_used_ms.store(shared.now_ms(), Ordering::Relaxed);
        self.last_use.store(
            shared.uses.fetch_add(1, Ordering::Relaxed),
            Ordering::Relaxed,
        );
        if let Some(files) = &state.files {
            return Ok((files.clone(), first.map(First::Unwritten)));
        }
        let dir = self.dir.clone();
        let fsync = shared.config.fsync;
        // A packed point is given files of its own first: its bytes and the records of its
        // appends, synced unless `fsync = "never"` (`files::promote`); the last record says
        // how far it is committed now.
        let promoting = state.packed.map(|needle| {
            let committed = self.snapshot.borrow().committed;
            let durable = match fsync {
                Fsync::Never => 0,
                Fsync::Always | Fsync::Interval => state.end,
            };
            let behind = u32::try_from(state.end - committed).unwrap_or(u32::MAX);
            (needle, durable, behind)
        });
        // Recovered once per process: a point known from its row is still checked against its
        // files at its first open (damage made while the node was stopped is found then).
        let known = match promoting {
            Some((needle, ..)) => Some((
                state.end,
                journal::HEADER_LEN + u64::from(needle.records) * journal::RECORD_LEN,
            )),
            None => (state.recovered && state.verified).then_some((state.end, state.journal_len)),
        };
        let (catalogue, id) = (shared.catalogue.clone(), self.id.clone());
        let catalogued = state.catalogued;
        let read_meta_too = state.meta.is_none();
        let (files, recovered, meta, first) = shared
            .blocking(move || {
                // Named in the touch log before its files can change (`catalogue.rs`).
                catalogue.touch(&id)?;
                if let Some((needle, durable, behind)) = promoting {
                    let (mut records, bytes) = catalogue.segments().load(&needle)?;
                    if let Some(last) = records.last_mut() {
                        last.behind = behind;
                    }
                    for record in &mut records {
                        record.durable = durable;
                    }
                    promote(&dir, &bytes, &records, fsync)?;
                }
                let opened = open_files(&dir, fsync, known, catalogued);
                if opened.is_err() && !catalogued {
                    // Not created after all (`open_files` took away what it made).
                    catalogue.removed(&id);
                }
                let (files, opened) = opened?;
                // Its `point.meta`, in the same trip to the blocking pool, if not known yet
                // (a directory made now has none).
                let meta = read_meta_too.then(|| match opened {
                    Opened::Made => Ok(Meta::default()),
                    _ => read_meta(&dir),
                });
                let recovered = opened.recovered();
                // A point just created: nothing in its files, nothing in a `point.meta`.
                let empty = recovered.as_ref().is_some_and(journal::Recovered::is_empty)
                    && matches!(&meta, Some(Ok(meta)) if *meta == Meta::default());
                let first = first.map(|batch| match empty {
                    true => First::Written(batch.write(&files)),
                    false => First::Unwritten(batch),
                });
                Ok::<_, StorageError>((files, recovered, meta, first))
            })
            .await??;
        state.unsettled = true;
        state.verified = true;
        if let Some((needle, durable, behind)) = promoting {
            state.packed = None;
            state.journal_len =
                journal::HEADER_LEN + u64::from(needle.records) * journal::RECORD_LEN;
            state.recorded_committed = state.end - u64::from(behind);
            state.durable = durable;
            state.dirty = false;
        }
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
            state.recorded_committed = recovered.committed;
            if let Some(meta) = meta {
                state.meta = Some(meta?);
            }
            let arriving = self.meta(state).await?.ownership.is_arriving();
            // Committed as far as the journal's last record says; the rest, one append as far
            // as commits are concerned, once a commit reaches its end (`docs/failover.md`).
            let mut commits = self.commits.lock().expect("poisoned");
            let pending = match recovered.committed < recovered.end {
                true => [(recovered.end, recovered.point_crc)].into(),
                false => Default::default(),
            };
            *commits = Commits {
                target: recovered.committed,
                pending,
            };
            self.snapshot.send_replace(Snapshot {
                end: recovered.end,
                crc: recovered.point_crc,
                committed: recovered.committed,
                committed_crc: recovered.committed_crc,
                deleted: false,
                arriving,
            });
        }
        if !state.catalogued {
            // A new point: listed from now on.
            self.write_row(shared, state, false).await?;
            shared.generation.fetch_add(1, Ordering::AcqRel);
        }
        let files = Arc::new(files);
        state.files = Some(files.clone());
        shared.remember_open(self);
        Ok((files, first))
    }

    /// Writes a batch of appends under the point's lock: the data in order, then their journal
    /// records in one write, then (with `fsync = "always"`) one sync for the whole batch. The
    /// appends become visible together, once durable.
    pub(super) async fn write(
        &self,
        shared: &Arc<Shared>,
        state: &mut State,
        appending: Appending,
    ) -> Result<Vec<Appended>, AppendError> {
        let visibility = appending.visibility;
        let batch = self.plan(shared, state, appending)?;
        let files = state.files.clone().expect("write on an open point");
        let written = shared
            .blocking(move || batch.write(&files))
            .await
            .map_err(WriteFailure::Stop)
            .and_then(|result| result);
        self.finish_write(shared, state, written, visibility)
    }

    /// The first batch of a point that has no files and no row yet: its files are created and
    /// the batch written in one trip to the blocking pool (a new point costs one trip, not
    /// two). A point with nothing to check before its first bytes (no handover, no leader
    /// epoch): if its files turn out not to be a new point's (left behind by a crash, or with
    /// a `point.meta`), nothing is written and the frames come back, the files open, for the
    /// ordinary way ([`write`](Self::write) after the checks).
    pub(super) async fn create_and_write(
        self: &Arc<Point>,
        shared: &Arc<Shared>,
        state: &mut State,
        appending: Appending,
    ) -> Result<Created, AppendError> {
        debug_assert!(self.is_new(state));
        let size: u64 = appending
            .frames
            .iter()
            .map(|frame| frame.len() as u64)
            .sum();
        if size > 0 && size <= shared.config.packed_max {
            return self.create_packed(shared, state, appending).await;
        }
        // Planned against a point just created (`open_files`): empty, its journal a header.
        // A write expected elsewhere than at 0 is refused before anything is created.
        state.journal_len = journal::HEADER_LEN;
        let visibility = appending.visibility;
        let batch = self.plan(shared, state, appending)?;
        let (_, first) = self.open_then(shared, state, Some(batch)).await?;
        match first.expect("a batch was given") {
            First::Written(written) => Ok(Created::Written(
                self.finish_write(shared, state, written, visibility)?,
            )),
            First::Unwritten(batch) => Ok(Created::NotNew(batch.frames)),
        }
    }

    /// The first batch of a point that has no files and no row yet, small enough to be packed:
    /// written as one needle at the end of the current segment, its row put with those waiting
    /// as it is (`segment.rs`, `Catalogue::pack`). No directory, no file, no touch record:
    /// after a crash, the needle itself names the point. Synced with `fsync = "always"`.
    /// Files found where its own would be (a journal a crash left without a row, or put there
    /// by hand) are not written over: nothing is packed, and the frames come back for the
    /// ordinary way, as from [`create_and_write`](Self::create_and_write).
    async fn create_packed(
        self: &Arc<Point>,
        shared: &Arc<Shared>,
        state: &mut State,
        appending: Appending,
    ) -> Result<Created, AppendError> {
        let visibility = appending.visibility;
        state.journal_len = 0;
        let batch = self.plan(shared, state, appending)?;
        let records = batch.records();
        let last = *records.last().expect("a packed point holds bytes");
        let (end, crc) = (last.end, last.point_crc);
        let (committed, committed_crc) = match visibility {
            Visibility::Now => (end, crc),
            Visibility::OnCommit => (0, 0),
        };
        let durable = match shared.config.fsync {
            Fsync::Always => end,
            Fsync::Interval | Fsync::Never => 0,
        };
        let modified_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64);
        let row = catalogue::Row {
            end,
            crc,
            committed,
            committed_crc,
            durable,
            journal_len: 0,
            recorded_committed: committed,
            modified_ms,
            meta: Meta::default(),
            sniffed: sniff(&batch.frames),
            needle: None,
            stale: false,
        };
        let (catalogue, id, dir) = (shared.catalogue.clone(), self.id.clone(), self.dir.clone());
        let frames = batch.frames;
        let packed = shared
            .blocking(move || {
                if dir.join(JOURNAL_FILE).exists() {
                    return Ok(Err(frames));
                }
                catalogue
                    .pack(&id, row, &records, &frames)
                    .map(|packed| Ok((packed, frames, records)))
            })
            .await
            .and_then(|packed| packed);
        let ((needle, due), frames, records) = match packed {
            Ok(Ok(packed)) => packed,
            Ok(Err(frames)) => return Ok(Created::NotNew(frames)),
            Err(error) => {
                tracing::warn!(point = %self.id, %error, "new point refused; nothing of it was kept");
                return Err(error.into());
            }
        };
        state.catalogued = true;
        state.recovered = true;
        state.verified = true;
        state.packed = Some(needle);
        state.meta = Some(Meta::default());
        state.row_committed = committed;
        if due {
            let catalogue = shared.catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.flush())
                .await
                .map_err(join_error)??;
        }
        shared.generation.fetch_add(1, Ordering::AcqRel);
        let appended = self.finish_write(shared, state, Ok((frames, records)), visibility)?;
        // Its needle is all it holds: no journal, nothing for a sync of files to do.
        state.journal_len = 0;
        state.dirty = false;
        Ok(Created::Written(appended))
    }

    /// Whether the point has no files and no row yet: its first use creates it.
    pub(super) fn is_new(&self, state: &State) -> bool {
        state.files.is_none() && !state.catalogued && !state.recovered && !state.deleted
    }

    /// A batch of appends to the point as `state` has it: refused if the point refuses writes
    /// or does not end at the expected start.
    fn plan(
        &self,
        shared: &Shared,
        state: &State,
        Appending {
            frames,
            known_crcs,
            visibility,
            expected_start,
        }: Appending,
    ) -> Result<Batch, AppendError> {
        if let Some(reason) = &state.failed {
            return Err(AppendError::Refused {
                point: self.id.clone(),
                reason: reason.clone(),
            });
        }
        if let Some(expected) = expected_start
            && expected != state.end
        {
            return Err(AppendError::OffsetMismatch {
                point: self.id.clone(),
                expected,
                end: state.end,
            });
        }
        // How far each record says the committed end is behind it: nowhere for bytes committed
        // as they are stored; else from what is committed, or named by a commit, now.
        let committed = match visibility {
            Visibility::Now => None,
            Visibility::OnCommit => {
                let target = self.commits.lock().expect("poisoned").target;
                Some(target.max(self.snapshot.borrow().committed))
            }
        };
        Ok(Batch {
            frames,
            known_crcs,
            start: state.end,
            previous_crc: state.crc,
            durable: state.durable,
            journal_offset: state.journal_len,
            committed,
            always: shared.config.fsync == Fsync::Always,
            dir: self.dir.clone(),
            #[cfg(test)]
            inject_failure: shared.fail_next_journal_write.swap(false, Ordering::SeqCst),
        })
    }

    /// After a batch's trip to the blocking pool: a failure stops the point or leaves it as it
    /// was; bytes written are published.
    fn finish_write(
        &self,
        shared: &Shared,
        state: &mut State,
        written: Result<Written, WriteFailure>,
        visibility: Visibility,
    ) -> Result<Vec<Appended>, AppendError> {
        let (frames, records) = match written {
            Ok(written) => written,
            Err(WriteFailure::Undone(error)) => {
                tracing::warn!(point = %self.id, %error, "append refused; nothing of it was kept");
                return Err(error.into());
            }
            Err(WriteFailure::Stop(error)) => {
                tracing::error!(point = %self.id, %error, "append failed; the point now refuses writes");
                state.failed = Some(error.to_string());
                return Err(error.into());
            }
        };
        if state.end == 0 && state.sniffed.is_none() {
            state.sniffed = sniff(&frames);
        }
        Ok(self.publish(shared, state, (&frames, &records), visibility))
    }

    /// After a batch was written: the appends' ends and CRCs, and the point's new end
    /// published (durable already with `fsync = "always"`, else marked dirty), committed now or
    /// when a commit reaches it (`visibility`).
    fn publish(
        &self,
        shared: &Shared,
        state: &mut State,
        (frames, records): (&[Bytes], &[Record]),
        visibility: Visibility,
    ) -> Vec<Appended> {
        let always = shared.config.fsync == Fsync::Always;
        let mut appended = Vec::with_capacity(frames.len());
        let mut next_record = records.iter();
        let (mut end, mut crc) = (state.end, state.crc);
        for frame in frames {
            let start = end;
            if !frame.is_empty() {
                let record = next_record.next().expect("one record per non-empty frame");
                (end, crc) = (record.end, record.point_crc);
                state.journal_len += journal::RECORD_LEN;
            }
            appended.push(Appended { start, end, crc });
        }
        if let Some(last) = records.last() {
            state.recorded_committed = last.end - u64::from(last.behind);
        }
        if end != state.end {
            self.last_append_ms
                .store(shared.now_ms() + 1, Ordering::Relaxed);
            let hot = metrics::hot();
            hot.appends.increment(records.len() as u64);
            hot.appended_bytes.increment(end - state.end);
            state.end = end;
            state.crc = crc;
            if always {
                state.durable = end;
            } else {
                state.dirty = true;
            }
            let mut commits = self.commits.lock().expect("poisoned");
            let committed = match visibility {
                Visibility::Now => {
                    // Everything before is committed with it.
                    commits.pending.clear();
                    commits.target = commits.target.max(end);
                    Some((end, crc))
                }
                Visibility::OnCommit => {
                    let ends = records.iter().map(|r| (r.end, r.point_crc));
                    commits.pending.extend(ends);
                    commits.advance()
                }
            };
            self.snapshot.send_modify(|snapshot| {
                snapshot.end = end;
                snapshot.crc = crc;
                if let Some((end, crc)) = committed {
                    snapshot.committed = end;
                    snapshot.committed_crc = crc;
                }
            });
        }
        appended
    }

    /// Commits the point up to `up_to` (at most its end; later appends up to it are committed
    /// as they come).
    pub(super) fn commit(&self, up_to: u64) {
        let mut commits = self.commits.lock().expect("poisoned");
        commits.target = commits.target.max(up_to);
        if let Some((end, crc)) = commits.advance() {
            self.snapshot.send_modify(|snapshot| {
                snapshot.committed = end;
                snapshot.committed_crc = crc;
            });
        }
    }

    /// After the point was cut back to `end` (CRC32C `crc`): nothing past it is committed or
    /// waits.
    pub(super) fn cut_commits(&self, end: u64, crc: u32) {
        let mut commits = self.commits.lock().expect("poisoned");
        commits.pending.retain(|(pending, _)| *pending <= end);
        self.snapshot.send_modify(|snapshot| {
            snapshot.end = end;
            snapshot.crc = crc;
            if snapshot.committed > end {
                snapshot.committed = end;
                snapshot.committed_crc = crc;
            }
        });
    }

    /// Fsyncs what was written since the last sync (group commit). The lock is not held while
    /// syncing, so writers carry on; only what was written before the sync started is recorded
    /// as durable. A point known durable to its end syncs nothing; one found again with bytes an
    /// earlier close left unsynced (`fsync = "never"`) is not dirty, but not durable either.
    /// `opened`: files the caller opened for this (they stay valid if the point closes
    /// meanwhile); without them, a point whose files are closed syncs nothing.
    pub(super) async fn sync(&self, opened: Option<Arc<Files>>) -> Result<(), StorageError> {
        let (files, end) = {
            let mut state = self.state.lock().await;
            if (!state.dirty && state.durable >= state.end) || state.failed.is_some() {
                return Ok(());
            }
            let Some(files) = state.files.clone().or(opened) else {
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
    /// Its catalogue row is written last, once the files say what it says.
    pub(super) async fn close(
        &self,
        shared: &Shared,
        closing: Closing,
    ) -> Result<(), StorageError> {
        let mut state = self.state.lock().await;
        let Some(files) = state.files.take() else {
            if state.catalogued && !state.deleted && !state.settled(self.snapshot().committed) {
                // Committed further since its files closed.
                self.write_row(shared, &mut state, true).await?;
            }
            return Ok(());
        };
        shared.forget_open(&self.id);
        self.close_files(shared, &mut state, files, closing).await?;
        if state.failed.is_none() {
            self.write_row(shared, &mut state, true).await?;
        }
        Ok(())
    }

    /// [`close`](Self::close)'s syncing and marking of `files`, taken from `state`.
    async fn close_files(
        &self,
        shared: &Shared,
        state: &mut State,
        files: Arc<Files>,
        closing: Closing,
    ) -> Result<(), StorageError> {
        let committed = self.snapshot.borrow().committed;
        let clean = state.durable == state.end && !state.dirty;
        let commits_recorded = committed == state.recorded_committed.min(state.end);
        let skip_sync = closing == Closing::Idle && shared.config.fsync == Fsync::Never;
        if state.failed.is_some() || (clean && commits_recorded) || skip_sync {
            return Ok(());
        }
        let marker = Record {
            end: state.end,
            durable: state.end,
            append_crc: 0,
            point_crc: state.crc,
            behind: u32::try_from(state.end - committed).unwrap_or(u32::MAX),
        };
        let (end, offset) = (state.end, state.journal_len);
        let dir = self.dir.clone();
        let result = tokio::task::spawn_blocking(move || {
            files
                .data
                .sync_data()
                .map_err(StorageError::io("syncing", dir.join(DATA_FILE)))
                .map_err(WriteFailure::Stop)?;
            files
                .journal
                .write_all_at(&marker.encode(), offset)
                .map_err(StorageError::io("writing", dir.join(JOURNAL_FILE)))
                .map_err(|error| files.cut_back(&dir, (end, offset), error))?;
            files
                .journal
                .sync_data()
                .map_err(StorageError::io("syncing", dir.join(JOURNAL_FILE)))
                .map_err(WriteFailure::Stop)
        })
        .await
        .map_err(|error| WriteFailure::Stop(join_error(error)))
        .and_then(|result| result);
        match result {
            Ok(()) => {
                state.journal_len += journal::RECORD_LEN;
                state.durable = state.end;
                state.dirty = false;
                state.recorded_committed = committed;
                Ok(())
            }
            // Closed unmarked: opened again, it is checked against its journal as before.
            Err(WriteFailure::Undone(error)) => Err(error),
            Err(WriteFailure::Stop(error)) => {
                state.failed = Some(error.to_string());
                Err(error)
            }
        }
    }
}

impl Files {
    /// The lengths of the data file and of the journal.
    pub(super) fn lengths(&self, dir: &Path) -> Result<(u64, u64), StorageError> {
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

    /// After `error` from a write past the point's end: if the disk is full, the data file
    /// and the journal are cut back to `(end, journal_len)`, dropping what the write left past
    /// them, so that the point is as it was ([`WriteFailure::Undone`]).
    fn cut_back(
        &self,
        dir: &Path,
        (end, journal_len): (u64, u64),
        error: StorageError,
    ) -> WriteFailure {
        if !error.is_disk_full() {
            return WriteFailure::Stop(error);
        }
        let cut = self
            .data
            .set_len(end)
            .and_then(|()| self.journal.set_len(journal_len));
        match cut {
            Ok(()) => WriteFailure::Undone(error),
            Err(cut) => {
                tracing::error!(dir = %dir.display(), error = %cut, "cutting back a write the full disk stopped");
                WriteFailure::Stop(error)
            }
        }
    }

    pub(super) fn sync(&self, dir: &Path) -> Result<(), StorageError> {
        let started = Instant::now();
        self.data
            .sync_data()
            .map_err(StorageError::io("syncing", dir.join(DATA_FILE)))?;
        self.journal
            .sync_data()
            .map_err(StorageError::io("syncing", dir.join(JOURNAL_FILE)))?;
        files::count_sync(started);
        Ok(())
    }
}

/// The largest read copied from the page cache on an async thread (a copy of 1 MiB takes tens
/// of microseconds).
const MAX_CACHED_READ: u64 = 1024 * 1024;

/// Where [`Point::frames`] is in its span.
struct Reading {
    point: Arc<Point>,
    store: Store,
    span: Span,
    changes: watch::Receiver<Snapshot>,
    position: u64,
    shutdown: CancellationToken,
    /// An error was the last frame.
    ended: bool,
    /// The point's files were opened for this reading.
    opened: bool,
}

impl Reading {
    fn new(point: Arc<Point>, store: Store, span: Span, shutdown: CancellationToken) -> Reading {
        Reading {
            changes: point.watch(),
            position: span.offset,
            point,
            store,
            span,
            shutdown,
            ended: false,
            opened: false,
        }
    }

    /// Where the next frame is, `(offset, len)`, waiting for the point to grow when following;
    /// `None` at the end. The caller reads it (and sets `ended` if that fails).
    async fn next(&mut self) -> Option<Result<(u64, u64), StreamError>> {
        if self.ended {
            return None;
        }
        if !self.opened {
            // Its files opened before the first frame is placed: the span is measured against
            // what they hold ([`Point::published`]).
            self.opened = true;
            if let Err(error) = self.point.source(&self.store.inner.shared).await {
                self.ended = true;
                return Some(Err(error.into()));
            }
        }
        loop {
            if Some(self.position) == self.span.stop {
                return None;
            }
            let current = *self.changes.borrow_and_update();
            if current.deleted {
                self.ended = true;
                return Some(Err(ReadError::NotFound(self.point.id.clone()).into()));
            }
            if self.position < current.committed {
                let end = self
                    .span
                    .stop
                    .map_or(current.committed, |stop| stop.min(current.committed));
                let len = self.span.chunk.min(end - self.position);
                let at = self.position;
                self.position += len;
                return Some(Ok((at, len)));
            }
            if !self.span.follow {
                return None;
            }
            tokio::select! {
                changed = self.changes.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                }
                () = self.shutdown.cancelled() => {
                    self.ended = true;
                    return Some(Err(StreamError::ShuttingDown));
                }
            }
        }
    }
}

/// The media type of a point whose first bytes are `frames`, if the first frame has the bytes
/// sniffing reads: kept, so that `stat` need not read them back.
fn sniff(frames: &[Bytes]) -> Option<String> {
    let first = frames.first()?;
    let head = first.get(..crate::content::SNIFF_LEN as usize)?;
    Some(crate::content::sniff(head).to_owned())
}
