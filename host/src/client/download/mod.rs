//! Multi-stream downloads: a point read from several replicas at once into `<out>.part`,
//! verified against the whole point's CRC32C, made durable, then renamed into place.
//!
//! - **Pinned.** The download is of `[0, size)` with the size and CRC32C of one `GetMetadata`
//!   (a resumed one, of its journal): a point that grows meanwhile does not move it, and every
//!   range is asked for with that end as its limit.
//! - **Ranges.** Each worker (a replica `GetMetadata` named, over one pooled connection) takes
//!   a range; every frame must start where the range stands. When a worker has nothing left,
//!   the largest remaining range is split in two and it takes the second half; when nothing can
//!   be split, the slowest range is *hedged*: its rest is fetched again by the idle worker, the
//!   first to finish wins, the other is stopped. A worker that fails gives its range back from
//!   the offset it reached and backs off; one that fails three times in a row is dropped.
//! - **Resumable.** `<out>.part.journal` lists the pieces in the file and their CRC32C: finished
//!   ranges, and what running ranges wrote so far, rewritten after a write of the download at
//!   most every [`CHECKPOINT`] (a few MiB apart at full speed) and once more when the download
//!   is interrupted ([`GetOptions::interrupt`], Ctrl-C in the CLI). With `resume`, pieces whose
//!   bytes in `.part` still match are kept and only the rest is fetched.
//! - **Durable.** Frames are written in batches (4 MiB, frame by frame, never copied into one
//!   buffer), each batch by a blocking task while the next fills (it computes the CRC too),
//!   and written back while the download runs; before success is reported the file is synced,
//!   renamed, and its directory synced.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::{Client, ClientError, Pool, Progress};
use crate::proto::{ConsumeRequest, MetadataResponse};

mod plan;

use plan::{Job, Plan};

/// Ranges smaller than twice this are not split further.
const MIN_SPLIT: u64 = 8 * 1024 * 1024;
/// Bytes gathered before one write to the file.
const WRITE_BATCH: usize = 4 * 1024 * 1024;
/// A range is only judged slow once it has run this long.
const HEDGE_AFTER: Duration = Duration::from_millis(300);
/// Consecutive failures after which a worker is dropped.
const MAX_FAILURES: u32 = 3;
/// How often, at most, the journal is rewritten with the progress of running ranges.
const CHECKPOINT: Duration = Duration::from_millis(50);

/// How a download runs.
#[derive(Debug, Clone)]
pub struct GetOptions {
    /// Continue from `<out>.part` and its journal (pieces whose bytes still match are kept).
    pub resume: bool,
    /// Fetch the rest of a slow range again from another worker.
    pub hedge: bool,
    /// Replace `out` if it exists (else the download is refused before it starts).
    pub overwrite: bool,
    /// Cancelled to stop the download: what is in `.part` is journaled and kept for `resume`
    /// ([`ClientError::Interrupted`]).
    pub interrupt: CancellationToken,
}

impl Default for GetOptions {
    fn default() -> Self {
        Self {
            resume: false,
            hedge: true,
            overwrite: false,
            interrupt: CancellationToken::new(),
        }
    }
}

/// What a download did.
#[derive(Debug, Clone, Default)]
pub struct GetReport {
    /// The point's size.
    pub size: u64,
    /// Its CRC32C, verified.
    pub crc32c: u32,
    /// Replicas that served ranges.
    pub workers: usize,
    /// Ranges that failed and went on elsewhere.
    pub retries: usize,
    /// Ranges split so an idle worker could take half.
    pub splits: usize,
    /// Ranges fetched twice because one worker was slow.
    pub hedges: usize,
    /// Bytes a resumed download found verified in `.part`.
    pub resumed: u64,
    /// Bytes fetched by this run (hedged bytes count twice).
    pub fetched: u64,
}

/// The journal of a download: what is pinned and which pieces are done.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct Journal {
    point: String,
    size: u64,
    crc32c: u32,
    done: Vec<Piece>,
}

/// `[start, end)` of the point, with its CRC32C.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct Piece {
    start: u64,
    end: u64,
    crc32c: u32,
}

fn part_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part", out.display()))
}

fn journal_path(out: &Path) -> PathBuf {
    PathBuf::from(format!("{}.part.journal", out.display()))
}

impl Client {
    /// Downloads `point` into `out` from the workers `GetMetadata` names (this connection's node
    /// when it names none). See the module documentation.
    pub async fn get(
        &self,
        point: &str,
        out: &Path,
        options: &GetOptions,
        progress: Arc<dyn Progress>,
    ) -> Result<GetReport, ClientError> {
        // A point that cannot be read is said before a file that is in the way.
        let meta = self.stat(point).await?;
        if !options.overwrite && out.exists() {
            return Err(ClientError::FileExists(out.to_owned()));
        }
        let part = part_path(out);
        let journal_file = journal_path(out);
        let (journal, file) = open_part(point, &meta, &part, &journal_file, options.resume).await?;
        write_journal(&journal_file, &journal)?;
        let resumed: u64 = journal.done.iter().map(|p| p.end - p.start).sum();
        progress.start(journal.size, resumed);

        let mut addresses = meta.workers.clone();
        if addresses.is_empty() {
            addresses.push(self.options.addr.clone());
        }
        let download = Arc::new(Download {
            point: point.to_owned(),
            file,
            journal_file: journal_file.clone(),
            plan: Mutex::new(Plan::new(&journal)),
            checkpointed: Mutex::new(Instant::now()),
            changed: Notify::new(),
            progress,
            hedge: options.hedge,
        });
        let pool = Pool::new(self.options.tls.clone());
        let mut tasks = Vec::new();
        for (index, address) in addresses.iter().enumerate() {
            let worker = pool.client(address).await?;
            let download = download.clone();
            let address = address.clone();
            tasks.push(tokio::spawn(async move {
                download.work(index, &address, &worker).await
            }));
        }
        let aborts: Vec<_> = tasks.iter().map(JoinHandle::abort_handle).collect();
        let outcomes = tokio::select! {
            outcomes = futures::future::join_all(tasks) => outcomes,
            () = options.interrupt.cancelled() => {
                aborts.iter().for_each(tokio::task::AbortHandle::abort);
                let journal = download.checkpoint(true)?;
                let kept = journal.done.iter().map(|p| p.end - p.start).sum();
                return Err(ClientError::Interrupted { kept, part });
            }
        };
        let mut last_error = None;
        for outcome in outcomes {
            if let Err(error) = outcome
                .map_err(|e| ClientError::Verify(format!("a download worker failed: {e}")))?
            {
                last_error = Some(error);
            }
        }
        let plan = download.plan.lock().expect("poisoned").summary();
        if !plan.complete {
            return Err(last_error.unwrap_or_else(|| {
                ClientError::Verify("every worker failed; the download is incomplete".into())
            }));
        }
        let crc = plan.crc;
        if crc != journal.crc32c {
            // Bytes that do not add up are not worth resuming from.
            let _ = std::fs::remove_file(&journal_file);
            return Err(ClientError::Verify(format!(
                "downloaded bytes have CRC32C {crc:08x}, the point {:08x}; {} kept for inspection",
                journal.crc32c,
                part.display()
            )));
        }
        publish(download.file.clone(), &part, out).await?;
        let _ = std::fs::remove_file(&journal_file);
        Ok(GetReport {
            size: journal.size,
            crc32c: crc,
            workers: plan.workers,
            retries: plan.retries,
            splits: plan.splits,
            hedges: plan.hedges,
            resumed,
            fetched: plan.fetched,
        })
    }
}

fn read_journal(path: &Path) -> Option<Journal> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn write_journal(path: &Path, journal: &Journal) -> Result<(), ClientError> {
    let temporary = PathBuf::from(format!("{}.tmp", path.display()));
    let bytes = serde_json::to_vec(journal).expect("a journal serializes");
    std::fs::write(&temporary, bytes)
        .and_then(|()| std::fs::rename(&temporary, path))
        .map_err(|source| ClientError::Io {
            path: path.to_owned(),
            source,
        })
}

/// The pieces whose bytes in `file` still have their CRC32C.
async fn verify_pieces(file: &Arc<File>, pieces: &[Piece]) -> Result<Vec<Piece>, ClientError> {
    let file = file.clone();
    let pieces = pieces.to_vec();
    tokio::task::spawn_blocking(move || {
        let mut buffer = vec![0u8; WRITE_BATCH];
        pieces
            .into_iter()
            .filter(|piece| {
                let mut crc = 0u32;
                let mut at = piece.start;
                while at < piece.end {
                    let len = ((piece.end - at) as usize).min(buffer.len());
                    if file.read_exact_at(&mut buffer[..len], at).is_err() {
                        return false;
                    }
                    crc = crc32c::crc32c_append(crc, &buffer[..len]);
                    at += len as u64;
                }
                crc == piece.crc32c
            })
            .collect()
    })
    .await
    .map_err(|e| ClientError::Verify(format!("verifying the part file: {e}")))
}

/// One download in progress, shared by its workers.
struct Download {
    point: String,
    file: Arc<File>,
    journal_file: PathBuf,
    plan: Mutex<Plan>,
    /// When the journal was last written; held while it is written (one writer at a time).
    checkpointed: Mutex<Instant>,
    /// Wakes idle workers when work appears or ends.
    changed: Notify,
    progress: Arc<dyn Progress>,
    hedge: bool,
}

impl Download {
    /// A worker: takes jobs until there is nothing left; gives up after repeated failures.
    async fn work(
        self: &Arc<Self>,
        index: usize,
        address: &str,
        client: &Client,
    ) -> Result<(), ClientError> {
        let mut failures = 0;
        loop {
            let job = self.plan.lock().expect("poisoned").next(self.hedge);
            match job {
                Job::Finished => return Ok(()),
                Job::Wait => {
                    // Woken when work changes hands; rechecked for hedging meanwhile.
                    let _ = tokio::time::timeout(HEDGE_AFTER / 3, self.changed.notified()).await;
                }
                Job::Fetch {
                    id,
                    start,
                    end,
                    stop,
                } => {
                    self.plan
                        .lock()
                        .expect("poisoned")
                        .workers_used
                        .insert(index);
                    let outcome = self.fetch(client, address, id, (start, end), &stop).await;
                    match outcome {
                        Ok(()) => {
                            failures = 0;
                            let (journal, advanced) = {
                                let mut plan = self.plan.lock().expect("poisoned");
                                plan.finish(id);
                                (plan.journal.clone(), plan.covered_since_reported())
                            };
                            self.progress.advance(advanced);
                            self.write_checkpoint(&journal)?;
                        }
                        Err(error) => {
                            self.plan.lock().expect("poisoned").fail(id);
                            failures += 1;
                            if fatal(&error) || failures >= MAX_FAILURES {
                                self.changed.notify_waiters();
                                tracing::warn!(worker = %address, %error, "worker dropped");
                                return Err(error);
                            }
                            tracing::warn!(worker = %address, %error, "range failed; it goes on elsewhere");
                            tokio::time::sleep(Duration::from_millis(100 << failures)).await;
                        }
                    }
                    self.changed.notify_waiters();
                }
            }
        }
    }

    /// Fetches `[start, end)` (or less, if the range is split meanwhile) from `client` into the
    /// file. Returns once the range's current end is reached, or `stop` (a hedge won). Whatever
    /// arrived is written before it returns, even on failure, so the plan's positions only
    /// ever count bytes that are in the file.
    async fn fetch(
        self: &Arc<Self>,
        client: &Client,
        address: &str,
        id: u64,
        (start, end): (u64, u64),
        stop: &CancellationToken,
    ) -> Result<(), ClientError> {
        let mut batch = Batch::new(start);
        let mut writing = None;
        let received = self
            .receive(
                client,
                address,
                id,
                (start, end),
                stop,
                &mut batch,
                &mut writing,
            )
            .await;
        let written = match writing {
            Some(write) => joined(write.await),
            None => Ok(()),
        };
        let (offset, bytes) = batch.take();
        let last = self.commit(id, offset, bytes).await;
        received.and(written).and(last)
    }

    /// Receives frames of the range into `batch`. A full batch is written by a task of its own
    /// (`writing`) while the next one fills; one write at a time, in order.
    #[allow(clippy::too_many_arguments)]
    async fn receive(
        self: &Arc<Self>,
        client: &Client,
        address: &str,
        id: u64,
        (start, end): (u64, u64),
        stop: &CancellationToken,
        batch: &mut Batch,
        writing: &mut Option<JoinHandle<Result<(), ClientError>>>,
    ) -> Result<(), ClientError> {
        let request = ConsumeRequest {
            point: self.point.clone(),
            offset: start,
            limit: end,
            chunk_size: 0,
            follow: false,
        };
        let mut raw = client.raw();
        let mut stream = tokio::select! {
            stream = raw.consume_stream(request) => stream?.into_inner(),
            () = stop.cancelled() => return Ok(()),
        };
        let mut position = start;
        loop {
            let response = tokio::select! {
                response = stream.message() => response?,
                () = stop.cancelled() => return Ok(()),
            };
            let Some(response) = response else {
                return Err(ClientError::Verify(format!(
                    "worker {address} ended the range [{start}, {end}) at {position}"
                )));
            };
            if response.offset != position || response.frame.is_empty() {
                return Err(ClientError::Verify(format!(
                    "worker {address} sent {} bytes at {} where {position} was due",
                    response.frame.len(),
                    response.offset
                )));
            }
            // The range's end may have been lowered: another worker took its second half.
            let (take, current_end) = {
                let mut plan = self.plan.lock().expect("poisoned");
                let Some(active) = plan.active.get(&id) else {
                    return Ok(()); // Stopped: a hedge won.
                };
                let current_end = active.end;
                let take = current_end
                    .saturating_sub(position)
                    .min(response.frame.len() as u64);
                plan.fetched += take;
                (take, current_end)
            };
            position += take;
            batch.push(response.frame.slice(..take as usize));
            let reached = position >= current_end;
            if reached {
                return Ok(()); // The caller writes the rest.
            }
            if batch.len() >= WRITE_BATCH {
                if let Some(previous) = writing.take() {
                    joined(previous.await)?;
                }
                let (offset, bytes) = batch.take();
                let download = self.clone();
                *writing = Some(tokio::spawn(async move {
                    download.commit(id, offset, bytes).await
                }));
            }
        }
    }

    /// Writes `frames` at `offset` (as much of them as the range still holds), then moves the
    /// range's position and CRC over what was written. Frames that do not start at the range's
    /// position are dropped: an earlier write of the range failed, the range goes on elsewhere.
    async fn commit(&self, id: u64, offset: u64, frames: Vec<Bytes>) -> Result<(), ClientError> {
        let frames = {
            let plan = self.plan.lock().expect("poisoned");
            let Some(active) = plan.active.get(&id).filter(|a| a.position == offset) else {
                return Ok(()); // Stopped (a hedge won), or after a failed write.
            };
            prefix(frames, active.end.saturating_sub(offset))
        };
        let len: u64 = frames.iter().map(|f| f.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        let (frames, crc) = self.write(offset, frames).await?;
        let mut plan = self.plan.lock().expect("poisoned");
        if let Some(active) = plan.active.get_mut(&id) {
            // The end may have been lowered while writing; bytes past it belong to another range
            // (they are the same bytes, the point is pinned).
            let keep = active.end.saturating_sub(active.position).min(len);
            let crc = if keep == len {
                crc
            } else {
                prefix(frames, keep)
                    .iter()
                    .fold(0, |crc, frame| crc32c::crc32c_append(crc, frame))
            };
            active.crc = crc32c::crc32c_combine(active.crc, crc, keep as usize);
            active.position += keep;
        }
        let advanced = plan.covered_since_reported();
        drop(plan);
        if advanced > 0 {
            self.progress.advance(advanced);
        }
        self.checkpoint(false)?;
        Ok(())
    }

    /// Writes the journal with the progress of running ranges, if the last write is
    /// [`CHECKPOINT`] old (or `now`). Returns what it holds.
    fn checkpoint(&self, now: bool) -> Result<Journal, ClientError> {
        let mut checkpointed = self.checkpointed.lock().expect("poisoned");
        let journal = self.plan.lock().expect("poisoned").checkpoint();
        if now || checkpointed.elapsed() >= CHECKPOINT {
            write_journal(&self.journal_file, &journal)?;
            *checkpointed = Instant::now();
        }
        Ok(journal)
    }

    /// Writes `journal` (a range finished), one writer at a time.
    fn write_checkpoint(&self, journal: &Journal) -> Result<(), ClientError> {
        let mut checkpointed = self.checkpointed.lock().expect("poisoned");
        write_journal(&self.journal_file, journal)?;
        *checkpointed = Instant::now();
        Ok(())
    }

    /// Writes `frames` one after the other from `offset` (no copy into one buffer), starts
    /// writing them back so the final sync is short, and returns them with their CRC32C, computed
    /// on the same blocking thread.
    async fn write(
        &self,
        offset: u64,
        frames: Vec<Bytes>,
    ) -> Result<(Vec<Bytes>, u32), ClientError> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let (mut at, mut crc) = (offset, 0u32);
            for frame in &frames {
                file.write_all_at(frame, at)?;
                crc = crc32c::crc32c_append(crc, frame);
                at += frame.len() as u64;
            }
            write_back(&file, offset, at - offset);
            Ok::<_, std::io::Error>((frames, crc))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| ClientError::Io {
            path: PathBuf::from(format!("<download of {}>", self.point)),
            source,
        })
    }
}

/// The first `keep` bytes of `frames`.
fn prefix(mut frames: Vec<Bytes>, keep: u64) -> Vec<Bytes> {
    let mut left = keep;
    frames.retain_mut(|frame| {
        let take = left.min(frame.len() as u64);
        frame.truncate(take as usize);
        left -= take;
        take > 0
    });
    frames
}

/// Starts the kernel writing `[offset, offset + len)` of `file` back to disk, without waiting.
fn write_back(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range on a descriptor this function borrows; it only schedules I/O.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Contiguous frames waiting to be written, and where.
struct Batch {
    offset: u64,
    frames: Vec<Bytes>,
    len: usize,
}

impl Batch {
    fn new(offset: u64) -> Self {
        Self {
            offset,
            frames: Vec::new(),
            len: 0,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn push(&mut self, frame: Bytes) {
        self.len += frame.len();
        self.frames.push(frame);
    }

    fn take(&mut self) -> (u64, Vec<Bytes>) {
        let offset = self.offset;
        self.offset += self.len as u64;
        self.len = 0;
        (offset, std::mem::take(&mut self.frames))
    }
}

/// The outcome of a write task.
fn joined(
    outcome: Result<Result<(), ClientError>, tokio::task::JoinError>,
) -> Result<(), ClientError> {
    outcome.map_err(|e| ClientError::Verify(format!("a write of the download failed: {e}")))?
}

/// Errors no other worker can do better on.
fn fatal(error: &ClientError) -> bool {
    matches!(error, ClientError::Status(status)
        if matches!(status.code(), Code::NotFound | Code::PermissionDenied | Code::InvalidArgument))
}

/// The `.part` file and its journal: the interrupted download of `point` if `resume` finds
/// one (its pieces verified again), else a new file of the point's size.
async fn open_part(
    point: &str,
    meta: &MetadataResponse,
    part: &Path,
    journal_file: &Path,
    resume: bool,
) -> Result<(Journal, Arc<File>), ClientError> {
    let previous = if resume {
        read_journal(journal_file).filter(|j| j.point == point)
    } else {
        None
    };
    let found = match previous {
        Some(journal) if part.exists() => {
            if meta.size < journal.size {
                return Err(ClientError::Verify(format!(
                    "point {point} has {} bytes, fewer than the {} the interrupted download started from: it was replaced",
                    meta.size, journal.size
                )));
            }
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(part)
                .map_err(io(part))?;
            file.set_len(journal.size).map_err(io(part))?;
            let file = Arc::new(file);
            let verified = verify_pieces(&file, &journal.done).await?;
            (
                Journal {
                    done: verified,
                    ..journal
                },
                file,
            )
        }
        _ => {
            let file = File::create(part).map_err(io(part))?;
            file.set_len(meta.size).map_err(io(part))?;
            let journal = Journal {
                point: point.to_owned(),
                size: meta.size,
                crc32c: meta.crc32c,
                done: Vec::new(),
            };
            (journal, Arc::new(file))
        }
    };
    Ok(found)
}

/// Makes the verified `.part` file durable and renames it to `out` (its directory synced).
async fn publish(file: Arc<File>, part: &Path, out: &Path) -> Result<(), ClientError> {
    tokio::task::spawn_blocking(move || file.sync_all())
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(io(part))?;
    std::fs::rename(part, out).map_err(io(out))?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))?;
    }
    Ok(())
}

/// The error of an I/O call on `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClientError {
    let path = path.to_owned();
    move |source| ClientError::Io { path, source }
}
