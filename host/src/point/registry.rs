//! The registry of points: the [`Store`]'s map of every point it holds, the calls that find,
//! create, append to, read, list and delete points by id, the store-wide event broadcast, and
//! the bound on open files (least recently used points closed, idle points closed).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{MutexGuard, broadcast};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::*;

impl Store {
    /// Opens the store in `config.dir` and its catalogue beside it (no point is read: each is
    /// found in the catalogue when asked for, and its files opened on first use), and starts
    /// the background sync, close and checkpoint tasks.
    pub async fn open(config: StoreConfig) -> Result<Self, StorageError> {
        let dir = config.dir.clone();
        let (fsync, catalogue_dir) = (config.fsync, catalogue_dir(&config.dir));
        let (catalogue, stopped_cleanly) = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&dir).map_err(StorageError::io("creating", &dir))?;
            let stopped_cleanly = files::take_clean_stop(&dir)
                .map_err(StorageError::io("reading the clean-stop mark of", &dir))?;
            let catalogue = catalogue::Catalogue::open(&catalogue_dir, &dir, fsync)?;
            Ok::<_, StorageError>((catalogue, stopped_cleanly))
        })
        .await
        .map_err(join_error)??;
        let shared = Arc::new(Shared {
            config,
            catalogue: Arc::new(catalogue),
            epoch: Instant::now(),
            opened_at: std::time::SystemTime::now(),
            open: StdMutex::new(HashMap::new()),
            open_count: AtomicUsize::new(0),
            uses: AtomicU64::new(0),
            generation: AtomicU64::new(0),
            askers: crate::askers::Askers::new("storage", MAX_ASKERS),
            #[cfg(test)]
            fail_next_journal_write: Default::default(),
        });
        let sweep_above = sweep_threshold(&shared, 0);
        let store = Store {
            inner: Arc::new(Inner {
                shared,
                live: RwLock::new(HashMap::new()),
                sweep_above: AtomicUsize::new(sweep_above),
                recording: AtomicBool::new(false),
                events: broadcast::channel(4096).0,
                lent: Arc::default(),
                ownership_changed: tokio::sync::Notify::new(),
                shutdown: CancellationToken::new(),
                tasks: TaskTracker::new(),
                stopped_cleanly,
            }),
        };
        store.spawn_background();
        Ok(store)
    }

    /// Whether this store was stopped cleanly before it opened (`close` ended with every point
    /// closed and synced). After a crash, a `kill -9` or on a new disk it was not: a copy may
    /// hold less than it held (a tail damaged on disk is cut at recovery), so a member in an
    /// in-sync set leaves it before it holds a session (`docs/failover.md`).
    pub fn stopped_cleanly(&self) -> bool {
        self.inner.stopped_cleanly
    }

    /// How the store runs.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.shared.config
    }

    /// A number that changes whenever a point is created, and only then: a walker that listed
    /// the points at one generation has every point held while it holds (a removal is told by
    /// [`StoreEvent::Removed`]; changes to the points listed are seen through their rows and
    /// the handover index).
    pub fn generation(&self) -> u64 {
        self.inner.shared.generation.load(Ordering::Acquire)
    }

    /// Number of points (0 if the catalogue cannot be read).
    pub fn len(&self) -> usize {
        match self.inner.shared.catalogue.len() {
            Ok(len) => len as usize,
            Err(error) => {
                tracing::error!(%error, "counting points");
                0
            }
        }
    }

    /// Whether it holds no point.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Points with open file handles.
    pub fn open_points(&self) -> usize {
        self.inner.shared.open_count.load(Ordering::Relaxed)
    }

    /// Appends `bytes` at the end of `id`, creating the point if needed, committed at once.
    pub async fn append(&self, id: &PointId, bytes: Bytes) -> Result<Appended, AppendError> {
        let mut appended = self.append_batch(id, vec![bytes], Visibility::Now).await?;
        Ok(appended.pop().expect("one result per frame"))
    }

    /// A client's write of `frames` to `id`, as the write gate admitted it (`write`: where it
    /// must start, how it is served, the leader epoch it was admitted at). The one way client
    /// bytes reach the store; the methods above are it with no leader epoch.
    pub async fn write(
        &self,
        id: &PointId,
        frames: Vec<Bytes>,
        write: ClientWrite,
    ) -> Result<Vec<Appended>, AppendError> {
        let origin = Origin::Client {
            leader_epoch: write.leader_epoch,
        };
        self.append_inner(id, frames, write.expected_start, origin, write.visibility)
            .await
    }

    /// Appends `frames` in order at the end of `id` as one batch: one journal write and, with
    /// `fsync = "always"`, one sync for all of them (group commit). Returns one result per
    /// frame. Consumers are served them as `visibility` says.
    pub async fn append_batch(
        &self,
        id: &PointId,
        frames: Vec<Bytes>,
        visibility: Visibility,
    ) -> Result<Vec<Appended>, AppendError> {
        let write = ClientWrite {
            visibility,
            ..ClientWrite::default()
        };
        self.write(id, frames, write).await
    }

    /// [`append_batch`](Self::append_batch), only if `id` currently ends at `start` (a produce
    /// frame with an `expected_offset`). A refusal for a point that does not exist does not
    /// create it.
    pub async fn append_batch_at(
        &self,
        id: &PointId,
        start: u64,
        frames: Vec<Bytes>,
        visibility: Visibility,
    ) -> Result<Vec<Appended>, AppendError> {
        let write = ClientWrite {
            expected_start: Some(start),
            visibility,
            leader_epoch: 0,
        };
        self.write(id, frames, write).await
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
        visibility: Visibility,
    ) -> Result<Vec<Appended>, AppendError> {
        let (frames, crcs) = frames.into_iter().unzip();
        let origin = Origin::Replication { crcs };
        self.append_inner(id, frames, Some(start), origin, visibility)
            .await
    }

    /// The committed end of `id` ([`Snapshot::committed`]; 0 for a point not held, or whose
    /// row a crash left stale and that was not opened since): from the point if it is in use,
    /// else from its catalogue row, without taking it into use (a walk over every point asks).
    pub fn committed(&self, id: &PointId) -> u64 {
        if let Some(point) = self.inner.live.read().expect("poisoned").get(id) {
            return point.snapshot().committed;
        }
        match self.inner.shared.catalogue.row(id) {
            Ok(Some(row)) if !row.stale => row.committed,
            Ok(_) => 0,
            Err(error) => {
                tracing::warn!(point = %id, %error, "reading a point's committed end");
                0
            }
        }
    }

    /// Commits `id` up to `up_to` ([`Snapshot::committed`]): the appends made
    /// [`Visibility::OnCommit`] that end there or before are served to consumers, and those
    /// still to come up to it will be as they are stored. Nothing for a point not held.
    pub fn commit(&self, id: &PointId, up_to: u64) {
        // A point at rest whose row is committed that far already stays at rest (the
        // followers' confirmations and the controller's agent commit many points at once).
        let further = |row: &catalogue::Row| row.stale || row.committed < up_to;
        if let Ok(Some(point)) = self.found_if(id, further) {
            point.commit(up_to);
        }
    }

    /// Completes at the next change of any point's ownership record. Create it (and `enable`
    /// it) before looking at the record, then await it.
    pub fn ownership_changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.inner.ownership_changed.notified()
    }

    pub(super) async fn append_inner(
        &self,
        id: &PointId,
        frames: Vec<Bytes>,
        expected_start: Option<u64>,
        origin: Origin,
        visibility: Visibility,
    ) -> Result<Vec<Appended>, AppendError> {
        let shared = &self.inner.shared;
        if let Some(expected) = expected_start.filter(|&start| start > 0)
            && !self.holds(id)?
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
        let mut frames = frames;
        let appending = |frames| Appending {
            frames,
            known_crcs: origin.known_crcs(),
            visibility,
            expected_start,
        };
        let appended = loop {
            let point = self.get_or_insert(id)?;
            let mut state = point.state.lock().await;
            if state.deleted {
                continue;
            }
            if point.is_new(&state) {
                let created = point
                    .create_and_write(shared, &mut state, appending(frames))
                    .await;
                match created {
                    Ok(Created::Written(appended)) => break appended,
                    Ok(Created::NotNew(given_back)) => frames = given_back,
                    Err(error) => {
                        self.forget_uncreated(id, &mut state);
                        return Err(error);
                    }
                }
            }
            if !self.open_locked(id, &point, &mut state).await? {
                continue;
            }
            if let Origin::Client { leader_epoch } = &origin {
                let meta = point.meta(&mut state).await?;
                if let Some(handover) = &meta.ownership.handover
                    && !handover.accepts_writes()
                {
                    // Checked under the point's lock: a fence set by `set_ownership` is exact.
                    return Err(AppendError::Handover {
                        point: id.clone(),
                        handover: handover.clone(),
                    });
                }
                self.record_leader_epoch(id, &point, &mut state, *leader_epoch)
                    .await?;
            }
            break point.write(shared, &mut state, appending(frames)).await?;
        };
        shared.evict_over_limit().await;
        if let (Some(first), Some(last)) = (appended.first(), appended.last()) {
            let bytes = lent
                .and_then(|frames| LiveBytes::lend(&self.inner.lent, first.start, frames))
                .map(Arc::new);
            let _ = self.inner.events.send(StoreEvent::Grew {
                point: id.clone(),
                end: last.end,
                crc: last.crc,
                bytes,
            });
        }
        Ok(appended)
    }

    /// The point `id`, its snapshot known: from its catalogue row, or recovered from its files
    /// if a crash left the row behind them (its files are opened when it is read).
    pub async fn point(&self, id: &PointId) -> Result<Arc<Point>, ReadError> {
        let point = self.get(id)?;
        {
            let state = point.state.lock().await;
            if state.deleted {
                return Err(ReadError::NotFound(id.clone()));
            }
            if state.recovered {
                drop(state);
                return Ok(point);
            }
        }
        point.files(&self.inner.shared).await?;
        Ok(point)
    }

    /// Size and checksum of `id`, without opening its files unless its row is stale.
    pub async fn metadata(&self, id: &PointId) -> Result<Snapshot, ReadError> {
        Ok(self.point(id).await?.snapshot())
    }

    /// The end of every point held, read now (a point that cannot be read is left out: its
    /// reader is told why when it reads it).
    pub async fn ends(&self) -> Vec<(PointId, u64)> {
        self.summaries()
            .await
            .into_iter()
            .map(|summary| (summary.id, summary.snapshot.end))
            .collect()
    }

    /// Every point held, in ascending order, with its snapshot, ownership and leader epochs:
    /// the points at rest from their catalogue rows in one read (none taken into use), the
    /// points in use and those a crash left with a stale row from themselves. A point that
    /// cannot be read is left out (its reader is told why when it reads it), and so is the
    /// whole catalogue if it cannot be read (logged): a walk answers with what it has.
    pub async fn summaries(&self) -> Vec<Summary> {
        let in_use: HashSet<PointId> = self
            .inner
            .live
            .read()
            .expect("poisoned")
            .keys()
            .cloned()
            .collect();
        let catalogue = self.inner.shared.catalogue.clone();
        let read = tokio::task::spawn_blocking(move || catalogue.summaries(&in_use))
            .await
            .map_err(join_error)
            .and_then(|read| read);
        let (mut summaries, asked) = match read {
            Ok(read) => read,
            Err(error) => {
                tracing::error!(%error, "reading the catalogue's rows");
                (Vec::new(), Vec::new())
            }
        };
        for id in asked {
            let summary = async {
                let snapshot = self.metadata(&id).await?;
                let ownership = self.ownership(&id).await?;
                let leader_epochs = self.leader_epochs(&id).await?;
                Ok::<_, ReadError>((snapshot, ownership, leader_epochs))
            };
            match summary.await {
                Ok((snapshot, ownership, leader_epochs)) => summaries.push(Summary {
                    id,
                    snapshot,
                    ownership,
                    leader_epochs,
                }),
                Err(ReadError::NotFound(_)) => {}
                Err(error) => {
                    tracing::warn!(point = %id, %error, "left out of a walk over every point")
                }
            }
        }
        summaries.sort_by(|a, b| a.id.cmp(&b.id));
        summaries
    }

    /// The content type given for `id`, if any.
    pub async fn content_type(&self, id: &PointId) -> Result<Option<String>, ReadError> {
        let point = self.point(id).await?;
        let mut state = point.state.lock().await;
        Ok(point.meta(&mut state).await?.content_type.clone())
    }

    /// The media type of `id`: the one given, else what its first bytes look like (kept in its
    /// catalogue row once it has all the bytes sniffing looks at).
    pub async fn media_type(&self, id: &PointId) -> Result<String, ReadError> {
        let point = self.point(id).await?;
        {
            let mut state = point.state.lock().await;
            let meta = point.meta(&mut state).await?;
            if let Some(given) = &meta.content_type {
                return Ok(given.clone());
            }
            if let Some(sniffed) = &state.sniffed {
                return Ok(sniffed.clone());
            }
        }
        let end = point.snapshot().end;
        let head = point
            .read(self, 0, end.min(crate::content::SNIFF_LEN))
            .await?;
        let sniffed = crate::content::sniff(&head).to_owned();
        if end >= crate::content::SNIFF_LEN {
            point.state.lock().await.sniffed = Some(sniffed.clone());
        }
        Ok(sniffed)
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

    pub(super) async fn describe(
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
    pub(super) async fn lock_open<'a>(
        &self,
        id: &PointId,
        point: &'a Arc<Point>,
    ) -> Result<Option<MutexGuard<'a, State>>, StorageError> {
        let mut state = point.state.lock().await;
        match self.open_locked(id, point, &mut state).await? {
            true => Ok(Some(state)),
            false => Ok(None),
        }
    }

    /// [`lock_open`](Self::lock_open) with the lock held: `false` if the point was deleted.
    async fn open_locked(
        &self,
        id: &PointId,
        point: &Arc<Point>,
        state: &mut State,
    ) -> Result<bool, StorageError> {
        if state.deleted {
            return Ok(false);
        }
        if let Err(error) = point.ensure_open(&self.inner.shared, state).await {
            self.forget_uncreated(id, state);
            return Err(error);
        }
        Ok(true)
    }

    /// After a new point's files could not be created: it is forgotten again.
    fn forget_uncreated(&self, id: &PointId, state: &mut State) {
        if !state.recovered {
            state.deleted = true;
            self.inner.live.write().expect("poisoned").remove(id);
            self.inner.shared.catalogue.removed(id);
        }
    }

    /// Makes every byte written to `id` so far durable, whatever `storage.fsync` says (a
    /// handover commits only bytes that survive a crash).
    pub async fn sync(&self, id: &PointId) -> Result<(), ReadError> {
        let point = self.get(id)?;
        // Opened (recovered first if its row is stale), or already open.
        let files = point.files(&self.inner.shared).await?;
        point.sync(Some(files)).await?;
        Ok(())
    }

    /// Opens `id` (creating it if needed) and, under its lock, writes the `point.meta` that
    /// `change` makes of the current one and of what the point holds (`None`: unchanged).
    /// Returns whether it changed.
    pub(super) async fn update_meta(
        &self,
        id: &PointId,
        change: impl FnOnce(&Meta, Snapshot) -> Result<Option<(Meta, Fsync)>, AppendError>,
    ) -> Result<bool, AppendError> {
        loop {
            let point = self.get_or_insert(id)?;
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
            point
                .replace_meta(&self.inner.shared, &mut state, meta, fsync)
                .await?;
            return Ok(true);
        }
    }

    /// The CRC32C of `[0, end)` of `id`: from the journal record of the last append within it,
    /// continued over the bytes after that record (at most one append's worth).
    pub async fn crc_at(&self, id: &PointId, end: u64) -> Result<u32, ReadError> {
        let point = self.get(id)?;
        if let entry::Source::Packed { .. } = point.source(&self.inner.shared).await? {
            // A packed point is small: the CRC32C of its bytes, read, without giving it files.
            let held = point.snapshot().end;
            if end > held {
                return Err(ReadError::OutOfRange {
                    point: id.clone(),
                    offset: 0,
                    limit: end,
                    end: held,
                });
            }
            return Ok(crc32c::crc32c(&point.read(self, 0, end).await?));
        }
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
        if end < crate::content::SNIFF_LEN {
            state.sniffed = None;
        }
        point.cut_commits(end, crc);
        let meta = point.meta(&mut state).await?;
        let mut epochs = meta.leader_epochs.clone();
        epochs.cut(end);
        if epochs != meta.leader_epochs {
            let meta = Meta {
                leader_epochs: epochs,
                ..meta.clone()
            };
            let fsync = self.inner.shared.config.fsync;
            point
                .replace_meta(&self.inner.shared, &mut state, meta, fsync)
                .await?;
        }
        Ok(end)
    }

    /// Before a client write to `point` (locked open) admitted at leader epoch `epoch` (0:
    /// none): records where that epoch began in it if this is its first write at it past its
    /// first bytes (one
    /// `point.meta` write per point and leader epoch). Synced as `storage.fsync` says: a start
    /// lost in a crash only makes a later cut longer, never wrong (the CRC32C at a cut is
    /// checked). Replication describes the point again (a `StoreEvent::Owned`).
    async fn record_leader_epoch(
        &self,
        id: &PointId,
        point: &Point,
        state: &mut State,
        epoch: u64,
    ) -> Result<(), AppendError> {
        let end = state.end;
        let meta = point.meta(state).await?;
        let Some(start) = meta.leader_epochs.to_record(epoch, end) else {
            return Ok(());
        };
        let mut meta = meta.clone();
        meta.leader_epochs.record(start);
        let fsync = self.inner.shared.config.fsync;
        point
            .replace_meta(&self.inner.shared, state, meta, fsync)
            .await?;
        tracing::debug!(point = %id, epoch, start = end, "a new leader epoch begins in the point");
        let _ = self
            .inner
            .events
            .send(StoreEvent::Owned { point: id.clone() });
        Ok(())
    }

    /// Where each leader epoch began in `id` ([`LeaderEpochs`]), without opening its files.
    pub async fn leader_epochs(&self, id: &PointId) -> Result<LeaderEpochs, ReadError> {
        self.read_meta_field(id, |meta| meta.leader_epochs.clone())
            .await
    }

    /// What `pick` takes from `point.meta` of `id`, read once and without opening the point's
    /// files.
    pub(super) async fn read_meta_field<T>(
        &self,
        id: &PointId,
        pick: impl FnOnce(&Meta) -> T,
    ) -> Result<T, ReadError> {
        let point = self.get(id)?;
        let mut state = point.state.lock().await;
        if state.deleted {
            return Err(ReadError::NotFound(id.clone()));
        }
        Ok(pick(point.meta(&mut state).await?))
    }

    /// Replaces where each leader epoch began in `id` with its leader's list (a follower's copy
    /// takes its leader's word, also about bytes it has yet to receive). Synced as
    /// `storage.fsync` says.
    pub async fn set_leader_epochs(
        &self,
        id: &PointId,
        epochs: LeaderEpochs,
    ) -> Result<(), AppendError> {
        let fsync = self.inner.shared.config.fsync;
        self.update_meta(id, |meta, _| {
            if meta.leader_epochs == epochs {
                return Ok(None);
            }
            let meta = Meta {
                leader_epochs: epochs,
                ..meta.clone()
            };
            Ok(Some((meta, fsync)))
        })
        .await
        .map(|_| ())
    }

    /// Reads `[offset, offset + len)` of `id`.
    pub async fn read(&self, id: &PointId, offset: u64, len: u64) -> Result<Bytes, ReadError> {
        let point = self.point(id).await?;
        point.read(self, offset, len).await
    }

    /// Ids in ascending byte order that start with `prefix` and sort after `start_after`, at
    /// most `max`: a range of the catalogue (empty, and said, if it cannot be read).
    pub fn list(&self, prefix: &str, start_after: Option<&str>, max: usize) -> Vec<PointId> {
        match self.inner.shared.catalogue.list(prefix, start_after, max) {
            Ok(ids) => ids,
            Err(error) => {
                tracing::error!(%error, "listing points");
                Vec::new()
            }
        }
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
    pub(super) async fn take_out(
        &self,
        id: &PointId,
        files: impl FnOnce(PathBuf) -> Result<(), StorageError> + Send + 'static,
    ) -> Result<u64, DeleteError> {
        let catalogue = &self.inner.shared.catalogue;
        let point = self
            .found(id)?
            .ok_or_else(|| DeleteError::NotFound(id.clone()))?;
        // Under the point's lock, which whoever writes its row holds (a write, a close, a
        // compaction moving its needle): a row written before is taken away, and none is
        // written after, since they find it deleted.
        let mut state = point.state.lock().await;
        if state.deleted {
            return Err(DeleteError::NotFound(id.clone()));
        }
        let due = {
            // Under the lock of the points in use, so that nobody finds the point's row between
            // the point leaving them and its row going: it is named in the touch log first, so
            // that a crash before its files are gone finds it again.
            let mut live = self.inner.live.write().expect("poisoned");
            catalogue.touch(id)?;
            let due = catalogue.remove(id);
            live.remove(id);
            due
        };
        state.deleted = true;
        if due {
            let catalogue = catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.flush())
                .await
                .map_err(join_error)??;
        }
        let shared = &self.inner.shared;
        let size = if state.recovered { state.end } else { 0 };
        if state.files.take().is_some() {
            shared.forget_open(&point.id);
        }
        point.snapshot.send_modify(|s| s.deleted = true);
        let dir = point.dir.clone();
        let removing = catalogue.clone();
        let id_removed = id.clone();
        tokio::task::spawn_blocking(move || {
            // Whether it was ever packed or not: a needle of it written since the last
            // checkpoint must not bring it back after a crash (`segment.rs`).
            removing.segments().remove(&id_removed)?;
            files(dir)
        })
        .await
        .map_err(join_error)??;
        catalogue.removed(id);
        let _ = self
            .inner
            .events
            .send(StoreEvent::Removed { point: id.clone() });
        Ok(size)
    }

    /// A receiver of every append to any point (replication follows the store with it). A
    /// receiver that falls behind gets `Lagged` and should rescan.
    pub fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
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
            .live
            .read()
            .expect("poisoned")
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
        if let Some(error) = first_error {
            return Err(error);
        }
        let catalogue = self.inner.shared.catalogue.clone();
        tokio::task::spawn_blocking(move || catalogue.checkpoint(true))
            .await
            .map_err(join_error)??;
        let dir = self.inner.shared.config.dir.clone();
        tokio::task::spawn_blocking(move || files::mark_clean_stop(&dir))
            .await
            .map_err(join_error)?
            .map_err(StorageError::io(
                "marking the clean stop of",
                self.inner.shared.config.dir.clone(),
            ))
    }

    /// Compacts the segment most worth it, if any (`Catalogue::compactable`): every needle a
    /// row still names is written again at the end of the current segment, under its point's
    /// lock; a checkpoint makes the copies and their rows durable; then the segment is removed
    /// and its space given back. Returns the segment compacted.
    pub async fn compact(&self) -> Result<Option<u32>, StorageError> {
        let catalogue = self.inner.shared.catalogue.clone();
        let Some(number) = tokio::task::spawn_blocking(move || catalogue.compactable())
            .await
            .map_err(join_error)??
        else {
            return Ok(None);
        };
        let catalogue = self.inner.shared.catalogue.clone();
        let needles = tokio::task::spawn_blocking(move || {
            catalogue.seal_segment(number)?;
            catalogue.segments().needles(number)
        })
        .await
        .map_err(join_error)??;
        let mut moved = 0;
        for (id, event) in needles {
            if let segment::Event::Packed { needle, .. } = event
                && self.move_needle(&id, needle).await?
            {
                moved += 1;
            }
        }
        let catalogue = self.inner.shared.catalogue.clone();
        tokio::task::spawn_blocking(move || {
            // The copies and the rows naming them durable before the old needles go.
            catalogue.checkpoint(false)?;
            catalogue.retire_segment(number)
        })
        .await
        .map_err(join_error)??;
        tracing::info!(segment = number, moved, "compacted a segment");
        Ok(Some(number))
    }

    /// Writes `id`'s `needle` again at the end of the current segment if it is still the one
    /// the point is packed in (not removed, not given files, not moved already).
    pub(super) async fn move_needle(
        &self,
        id: &PointId,
        needle: segment::Needle,
    ) -> Result<bool, StorageError> {
        let Ok(point) = self.get(id) else {
            return Ok(false);
        };
        let shared = &self.inner.shared;
        let mut state = point.state.lock().await;
        if state.deleted || state.files.is_some() || state.packed != Some(needle) {
            return Ok(false);
        }
        let row = point.row(shared, &state);
        let (catalogue, moving) = (shared.catalogue.clone(), id.clone());
        let (moved, due) = shared
            .blocking(move || catalogue.repack(&moving, row, needle))
            .await??;
        state.packed = Some(moved);
        state.row_committed = point.snapshot().committed;
        drop(state);
        if due {
            let catalogue = shared.catalogue.clone();
            tokio::task::spawn_blocking(move || catalogue.flush())
                .await
                .map_err(join_error)??;
        }
        Ok(true)
    }

    /// The point `id`: the one in use, else one made from its catalogue row.
    pub(super) fn get(&self, id: &PointId) -> Result<Arc<Point>, ReadError> {
        if let Some(point) = self.inner.live.read().expect("poisoned").get(id) {
            return Ok(point.clone());
        }
        self.found(id)?
            .ok_or_else(|| ReadError::NotFound(id.clone()))
    }

    /// [`get`](Self::get), or a new point (its files are created when it is locked open).
    pub(super) fn get_or_insert(&self, id: &PointId) -> Result<Arc<Point>, StorageError> {
        if let Some(point) = self.inner.live.read().expect("poisoned").get(id) {
            return Ok(point.clone());
        }
        let mut live = self.inner.live.write().expect("poisoned");
        if let Some(point) = live.get(id) {
            return Ok(point.clone());
        }
        let point = match self.inner.shared.catalogue.row(id)? {
            Some(row) => Point::from_row(&self.inner.shared, id.clone(), row),
            None => Point::new(&self.inner.shared, id.clone()),
        };
        let point = Arc::new(point);
        live.insert(id.clone(), point.clone());
        self.sweep_if_many(&mut live);
        Ok(point)
    }

    /// The point `id` made from its catalogue row and taken into use, if it has one. Under the
    /// lock of the points in use, so that a removal (which takes the row away under it) is
    /// seen whole or not at all.
    fn found(&self, id: &PointId) -> Result<Option<Arc<Point>>, StorageError> {
        self.found_if(id, |_| true)
    }

    /// [`found`](Self::found), but a point at rest is taken into use only if `wanted` says so
    /// of its row (one read of the row either way).
    fn found_if(
        &self,
        id: &PointId,
        wanted: impl FnOnce(&catalogue::Row) -> bool,
    ) -> Result<Option<Arc<Point>>, StorageError> {
        let mut live = self.inner.live.write().expect("poisoned");
        if let Some(point) = live.get(id) {
            return Ok(Some(point.clone()));
        }
        let Some(row) = self.inner.shared.catalogue.row(id)? else {
            return Ok(None);
        };
        if !wanted(&row) {
            return Ok(None);
        }
        let point = Arc::new(Point::from_row(&self.inner.shared, id.clone(), row));
        live.insert(id.clone(), point.clone());
        self.sweep_if_many(&mut live);
        Ok(Some(point))
    }

    /// Whether the store holds `id` (in use, or with a catalogue row).
    fn holds(&self, id: &PointId) -> Result<bool, StorageError> {
        if self.inner.live.read().expect("poisoned").contains_key(id) {
            return Ok(true);
        }
        Ok(self.inner.shared.catalogue.row(id)?.is_some())
    }

    /// Lets go of the points nobody uses: closed, settled in the catalogue, and held by no one
    /// but the map of points in use. A point committed further since it closed is written to
    /// its row first (and let go of at the next sweep).
    async fn let_go_of_unused(&self) {
        let unrecorded = {
            let mut live = self.inner.live.write().expect("poisoned");
            let unrecorded = let_go(&mut live);
            self.inner.sweep_above.store(
                sweep_threshold(&self.inner.shared, live.len()),
                Ordering::Relaxed,
            );
            unrecorded
        };
        self.record(unrecorded).await;
    }

    /// Writes the rows of points committed further since their rows were written, so that
    /// the next sweep lets go of them.
    async fn record(&self, unrecorded: Vec<Arc<Point>>) {
        for point in unrecorded {
            if let Err(error) = point.close(&self.inner.shared, Closing::Idle).await {
                tracing::error!(point = %point.id, %error, "recording a commit");
            }
        }
    }

    /// After a point was taken into use: lets go of unused ones at once when there are many
    /// (a walk over many points at rest, `stat` after `stat`, between two idle sweeps). Those
    /// committed further since their rows were written (a follower's new copies, whose commit
    /// arrives after their bytes) have their rows written by a task, which then sweeps again:
    /// a catch-up of many points keeps in memory those of the last moments, not of every
    /// moment since the last idle sweep.
    fn sweep_if_many(&self, live: &mut HashMap<PointId, Arc<Point>>) {
        if live.len() > self.inner.sweep_above.load(Ordering::Relaxed) {
            let unrecorded = let_go(live);
            self.inner.sweep_above.store(
                sweep_threshold(&self.inner.shared, live.len()),
                Ordering::Relaxed,
            );
            // Not once the store is closing: its close writes every row left.
            if !unrecorded.is_empty()
                && !self.inner.shutdown.is_cancelled()
                && !self.inner.recording.swap(true, Ordering::AcqRel)
            {
                let store = self.clone();
                self.inner.tasks.spawn(async move {
                    store.record(unrecorded).await;
                    store.let_go_of_unused().await;
                    store.inner.recording.store(false, Ordering::Release);
                });
            }
        }
    }

    pub(super) fn spawn_background(&self) {
        let config = &self.inner.shared.config;
        if config.fsync == Fsync::Interval {
            self.every(config.fsync_interval, |store| async move {
                for point in store.inner.shared.open_points() {
                    if let Err(error) = point.sync(None).await {
                        tracing::error!(point = %point.id, %error, "group commit");
                    }
                }
                let catalogue = store.inner.shared.catalogue.clone();
                let synced = tokio::task::spawn_blocking(move || catalogue.segments().sync()).await;
                if let Ok(Err(error)) = synced {
                    tracing::error!(%error, "group commit of the segments");
                }
            });
        }
        let idle = config.idle_close;
        self.every(
            (idle / 2).max(Duration::from_millis(50)),
            move |store| async move {
                let shared = &store.inner.shared;
                let (now, idle_ms) = (shared.now_ms(), idle.as_millis() as u64);
                for point in shared.open_points() {
                    if now.saturating_sub(point.last_used_ms.load(Ordering::Relaxed)) < idle_ms {
                        continue;
                    }
                    if let Err(error) = point.close(shared, Closing::Idle).await {
                        tracing::error!(point = %point.id, %error, "closing idle point");
                    }
                }
                store.let_go_of_unused().await;
            },
        );
        self.every(COMPACT_EVERY, |store| async move {
            if let Err(error) = store.compact().await {
                tracing::error!(%error, "compacting a segment");
            }
        });
        self.every(catalogue::CHECKPOINT_EVERY, |store| async move {
            let catalogue = store.inner.shared.catalogue.clone();
            match tokio::task::spawn_blocking(move || catalogue.checkpoint(false)).await {
                Ok(Ok(())) => {}
                Ok(Err(error)) => tracing::error!(%error, "checkpointing the catalogue"),
                Err(error) => tracing::error!(%error, "checkpointing the catalogue"),
            }
        });
    }

    /// Runs `work` on the store every `period` (a late tick is delayed, not bunched) until the
    /// store shuts down or is dropped; the task holds the store only while `work` runs.
    fn every<F, Fut>(&self, period: Duration, work: F)
    where
        F: Fn(Store) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let store = Arc::downgrade(&self.inner);
        let token = self.inner.shutdown.clone();
        self.inner.tasks.spawn(async move {
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = ticker.tick() => {}
                }
                let Some(inner) = store.upgrade() else { return };
                work(Store { inner }).await;
            }
        });
    }
}

/// Takes out of `live` the points nobody uses (closed, settled, held by no one else: checked
/// under the map's lock, so that nobody takes one meanwhile); returns those committed further
/// since they closed, whose rows must be written first.
fn let_go(live: &mut HashMap<PointId, Arc<Point>>) -> Vec<Arc<Point>> {
    let mut unrecorded = Vec::new();
    live.retain(|_, point| {
        if Arc::strong_count(point) > 1 {
            return true;
        }
        let Ok(state) = point.state.try_lock() else {
            return true;
        };
        if state.files.is_some() || state.deleted {
            return state.files.is_some();
        }
        if !state.catalogued {
            // Never created (its creation failed): no row, no files.
            return false;
        }
        if !state.settled(point.snapshot().committed) {
            unrecorded.push(point.clone());
            return true;
        }
        false
    });
    unrecorded
}

/// How many points in use make the next one taken into use sweep: twice as many as remain after
/// a sweep, and never fewer than four per open file allowed.
pub(super) fn sweep_threshold(shared: &Shared, remaining: usize) -> usize {
    (2 * remaining).max(4 * shared.config.max_open).max(1024)
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// How often the segment most worth compacting, if any, is compacted.
const COMPACT_EVERY: Duration = Duration::from_secs(10);

/// Most threads of the blocking pool running the file work of points at once under
/// `fsync = "never"` (`crate::askers`).
const MAX_ASKERS: usize = 64;

impl Shared {
    /// Runs `work`, the file work of a point, on the blocking pool. Under `fsync = "never"` it
    /// syncs nothing and is short (unless the disk is slow), so it shares the trip with the
    /// work asked at the same time (`crate::askers`): a stream creating small points costs a
    /// thread hand-off per batch of points, not per point. Otherwise a sync may take
    /// milliseconds, and it takes a trip of its own.
    pub(super) async fn blocking<R: Send + 'static>(
        &self,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, StorageError> {
        match self.config.fsync {
            Fsync::Never => (self.askers.ask(work).await)
                .ok_or_else(|| files::unfinished("the work did not end (it panicked)")),
            _ => tokio::task::spawn_blocking(work).await.map_err(join_error),
        }
    }

    /// The points whose files are open now.
    pub(super) fn open_points(&self) -> Vec<Arc<Point>> {
        self.open
            .lock()
            .expect("poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub(super) fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub(super) fn remember_open(&self, point: &Arc<Point>) {
        let mut open = self.open.lock().expect("poisoned");
        if open.insert(point.id.clone(), point.clone()).is_none() {
            let count = self.open_count.fetch_add(1, Ordering::Relaxed) + 1;
            ::metrics::gauge!(metrics::OPEN_POINTS).set(count as f64);
        }
    }

    pub(super) fn forget_open(&self, id: &PointId) {
        if self.open.lock().expect("poisoned").remove(id).is_some() {
            let count = self.open_count.fetch_sub(1, Ordering::Relaxed) - 1;
            ::metrics::gauge!(metrics::OPEN_POINTS).set(count as f64);
        }
    }

    /// Closes least recently used points until at most `max_open` are open. Called with no
    /// point lock held, so it can take the victims' locks.
    pub(super) async fn evict_over_limit(&self) {
        loop {
            let over = self
                .open_count
                .load(Ordering::Relaxed)
                .saturating_sub(self.config.max_open);
            if over == 0 {
                return;
            }
            // One look over the open points closes a few more than needed (1/64 of the
            // limit), so that the next opens find room without looking again: many new
            // points in a row cost one scan per batch, not one per point.
            let victims = self.least_recently_used(over + self.config.max_open / 64);
            if victims.is_empty() {
                return;
            }
            for victim in victims {
                if let Err(error) = victim.close(self, Closing::Idle).await {
                    tracing::error!(point = %victim.id, %error, "closing least recently used point");
                    return;
                }
            }
        }
    }

    /// The `count` open points used least recently, the least first.
    pub(super) fn least_recently_used(&self, count: usize) -> Vec<Arc<Point>> {
        let open = self.open.lock().expect("poisoned");
        let mut oldest: Vec<_> = open
            .values()
            .map(|point| (point.last_use.load(Ordering::Relaxed), point))
            .collect();
        if count < oldest.len() {
            oldest.select_nth_unstable_by_key(count, |(last_use, _)| *last_use);
            oldest.truncate(count);
        }
        oldest.sort_unstable_by_key(|(last_use, _)| *last_use);
        oldest.into_iter().map(|(_, point)| point.clone()).collect()
    }
}
