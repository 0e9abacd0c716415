//! The file layer of a point: the names and layout of `point.data`, `point.journal` and
//! `point.meta` (its format: `meta.rs`) in its directory, opening with crash recovery,
//! directory creation and removal that survive a power loss, and the scan that finds every
//! point at start-up (`docs/storage.md`). Plain blocking I/O: callers run it on the blocking
//! pool.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};

use super::meta::META_FILE;
use super::*;

pub(super) const DATA_FILE: &str = "point.data";
pub(super) const JOURNAL_FILE: &str = "point.journal";
/// How a point's files were found when they were opened.
pub(super) enum Opened {
    /// Its directory was made now: its files are new and empty, and it has no `point.meta`.
    Made,
    /// They still match what this process last saw: nothing to recover.
    Known,
    /// Read up to their last good record (or created in a directory that was there).
    Recovered(journal::Recovered),
}

impl Opened {
    /// What the files hold, unless they match what this process last saw.
    pub(super) fn recovered(self) -> Option<journal::Recovered> {
        match self {
            Opened::Made => Some(journal::Recovered::empty()),
            Opened::Known => None,
            Opened::Recovered(recovered) => Some(recovered),
        }
    }
}

/// Where a point's files stood before they were opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Found {
    /// Its directory was made now.
    Made,
    /// It has no journal (its directory may be there: a creation a crash interrupted).
    NoJournal,
    /// It has a journal.
    Journal,
}

/// Opens (creating if needed) the files of the point in `dir`. `known` is the `(end,
/// journal_len)` this process last saw; if the files still match it, recovery is skipped.
/// `catalogued`: the point has a row, so its files are expected to be there; a point without
/// one is expected to be new, and its directory is made before anything is looked up (a new
/// point then costs no lookup of files that are not there).
pub(super) fn open_files(
    dir: &Path,
    fsync: Fsync,
    known: Option<(u64, u64)>,
    catalogued: bool,
) -> Result<(Files, Opened), StorageError> {
    let made = match catalogued {
        true => false,
        false => match std::fs::create_dir(dir) {
            Ok(()) => true,
            // There already (a creation a crash interrupted), or a parent is missing (made
            // below with it).
            Err(error)
                if matches!(
                    error.kind(),
                    std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotFound
                ) =>
            {
                false
            }
            Err(error) => return Err(StorageError::io("creating", dir)(error)),
        },
    };
    let found = match made {
        true => Found::Made,
        false if dir.join(JOURNAL_FILE).exists() => Found::Journal,
        false => Found::NoJournal,
    };
    let opened = open_or_create(dir, fsync, known, found);
    if opened.is_err() && found != Found::Journal {
        // Not created after all (a full disk): nothing of it stays behind. Its empty
        // parent directories may stay; they hold no point.
        for name in [JOURNAL_FILE, DATA_FILE] {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }
    opened
}

/// [`open_files`], the files having been `found` so.
fn open_or_create(
    dir: &Path,
    fsync: Fsync,
    known: Option<(u64, u64)>,
    found: Found,
) -> Result<(Files, Opened), StorageError> {
    let journal_path = dir.join(JOURNAL_FILE);
    let data_path = dir.join(DATA_FILE);
    let created = found != Found::Journal;
    match found {
        Found::Made if fsync != Fsync::Never => dir
            .parent()
            .map_or(Ok(()), sync_dir)
            .map_err(StorageError::io("syncing", dir))?,
        Found::NoJournal => create_dirs(dir, fsync).map_err(StorageError::io("creating", dir))?,
        Found::Made | Found::Journal => {}
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
    let journal_len = match found {
        // A file just made in a directory just made.
        Found::Made => 0,
        _ => journal_file
            .metadata()
            .map_err(StorageError::io("inspecting", &journal_path))?
            .len(),
    };
    if journal_len < journal::HEADER_LEN {
        // New, or its creation was interrupted before the header was complete. An empty file
        // is not truncated: ext4 flushes a file truncated to nothing when it is closed (its
        // `auto_da_alloc`), a write-back per new point for nothing.
        let cut = match journal_len {
            0 => Ok(()),
            _ => journal_file.set_len(0),
        };
        cut.and_then(|()| journal_file.write_all_at(&journal::encode_header(), 0))
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
    if found == Found::Made {
        return Ok((files, Opened::Made));
    }
    if created && files.lengths(dir)?.0 == 0 {
        // Nothing to recover: the journal holds its header only, and no data file was left
        // behind without a journal.
        return Ok((files, Opened::Recovered(journal::Recovered::empty())));
    }

    if let Some((end, journal_len)) = known
        && files.lengths(dir)? == (end, journal_len)
    {
        return Ok((files, Opened::Known));
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
    Ok((files, Opened::Recovered(recovered)))
}

/// The journal of a point being given files of its own, until they hold all of it.
const PROMOTING_JOURNAL: &str = "point.journal.promoting";

/// Gives a packed point (`segment.rs`) files of its own in `dir`: its `bytes` as its data
/// file, and a journal with `records`, those of its appends. The journal is written under
/// another name and renamed into place last (each synced first unless `fsync = "never"`): a
/// point's files exist, for recovery, only once they hold all of it; a crash before leaves its
/// needle the truth. Anything a crash left in `dir` without a row is written over.
pub(super) fn promote(
    dir: &Path,
    bytes: &[u8],
    records: &[journal::Record],
    fsync: Fsync,
) -> Result<(), StorageError> {
    let synced = fsync != Fsync::Never;
    create_dirs(dir, fsync).map_err(StorageError::io("creating", dir))?;
    let meta = dir.join(META_FILE);
    match std::fs::remove_file(&meta) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => return Err(StorageError::io("removing", meta)(error)),
    }
    let write = |name: &str, contents: &[u8]| {
        let path = dir.join(name);
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .and_then(|file| {
                file.write_all_at(contents, 0)?;
                match synced {
                    true => file.sync_data(),
                    false => Ok(()),
                }
            });
        file.map_err(StorageError::io("writing", path))
    };
    write(DATA_FILE, bytes)?;
    let mut journal = journal::encode_header().to_vec();
    journal.extend(records.iter().flat_map(journal::Record::encode));
    write(PROMOTING_JOURNAL, &journal)?;
    std::fs::rename(dir.join(PROMOTING_JOURNAL), dir.join(JOURNAL_FILE))
        .map_err(StorageError::io("renaming", dir.join(PROMOTING_JOURNAL)))?;
    if synced {
        sync_dir(dir).map_err(StorageError::io("syncing", dir))?;
    }
    Ok(())
}

/// Creates `dir` and any missing parents, fsyncing each new directory's parent so the entries
/// survive a power loss.
pub(super) fn create_dirs(dir: &Path, fsync: Fsync) -> std::io::Result<()> {
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

/// Counts one sync of a point's files or of a segment, begun at `started`
/// (`goutube_fsyncs_total`, `goutube_fsync_seconds`).
pub(super) fn count_sync(started: std::time::Instant) {
    ::metrics::counter!(crate::metrics::FSYNCS).increment(1);
    ::metrics::histogram!(crate::metrics::FSYNC_SECONDS).record(started.elapsed().as_secs_f64());
}

pub(super) fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory of the catalogue of the store in `points` (`catalogue.rs`), beside it.
pub(super) fn catalogue_dir(points: &Path) -> PathBuf {
    points.with_file_name("catalogue")
}

/// Where the segments of packed points are, beside the points directory (`segment.rs`).
pub(super) fn segments_dir(points: &Path) -> PathBuf {
    points.with_file_name("segments")
}

/// The file a store writes beside its points directory once every point was closed and synced
/// (`Store::close`), and takes away when it opens again: present at start-up only after a
/// clean stop.
fn clean_stop_file(points: &Path) -> PathBuf {
    points.with_file_name("clean-stop")
}

/// Whether the store in `points` was stopped cleanly last time; takes the mark away (durably),
/// so that a crash from now on is found at the next start.
pub(super) fn take_clean_stop(points: &Path) -> std::io::Result<bool> {
    let file = clean_stop_file(points);
    match std::fs::remove_file(&file) {
        Ok(()) => {
            if let Some(parent) = file.parent() {
                sync_dir(parent)?;
            }
            Ok(true)
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(error) => Err(error),
    }
}

/// Marks the store in `points` stopped cleanly (every point closed and synced).
pub(super) fn mark_clean_stop(points: &Path) -> std::io::Result<()> {
    let file = clean_stop_file(points);
    File::create(&file)?.sync_all()?;
    match file.parent() {
        Some(parent) => sync_dir(parent),
        None => Ok(()),
    }
}

/// Removes the files of the point in `dir`, then every directory from `dir` up to (excluding)
/// `root` that is left empty. A directory that still holds another point's continuation stays.
pub(super) fn remove_point_files(root: &Path, dir: &Path) -> Result<(), StorageError> {
    for name in [JOURNAL_FILE, DATA_FILE, META_FILE, PROMOTING_JOURNAL] {
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
pub(super) fn scan(dir: &Path) -> std::io::Result<Vec<PointId>> {
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
pub(super) fn read_exact_at(file: &File, offset: u64, len: usize) -> std::io::Result<Bytes> {
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

/// Like [`read_exact_at`], but only from the page cache (`preadv2` with `RWF_NOWAIT`), so it may
/// run on an async thread: `None` if any of it would wait for the disk, or the filesystem cannot
/// say (the caller reads it on the blocking pool instead).
pub(super) fn read_cached_at(
    file: &File,
    offset: u64,
    len: usize,
) -> std::io::Result<Option<Bytes>> {
    use std::os::fd::AsRawFd;
    let mut buf = BytesMut::with_capacity(len);
    while buf.len() < len {
        let (want, at) = (len - buf.len(), offset + buf.len() as u64);
        let spare = buf.spare_capacity_mut();
        let target = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: want,
        };
        // SAFETY: the one iovec covers `want` writable bytes of `spare`; preadv2 writes at most
        // that many and reports how many, and only those are marked initialised below.
        let read = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &target,
                1,
                at as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        match read {
            -1 => {
                let error = std::io::Error::last_os_error();
                match error.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS) => return Ok(None),
                    _ => return Err(error),
                }
            }
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            // SAFETY: preadv2 initialised `read` bytes of the spare capacity.
            read => unsafe { buf.set_len(buf.len() + read as usize) },
        }
    }
    Ok(Some(buf.freeze()))
}

pub(super) fn join_error(error: tokio::task::JoinError) -> StorageError {
    unfinished(error)
}

/// Blocking file work that did not run to its end (it panicked, or its runtime stopped).
pub(super) fn unfinished(why: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StorageError {
    StorageError::Io {
        op: "running blocking I/O",
        path: PathBuf::new(),
        source: std::io::Error::other(why),
    }
}

/// `cachestat(2)` (Linux 6.5): the same number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

/// Whether all of `file`'s `[offset, offset + len)` is in the page cache, so that copying it
/// (with `sendfile`) will not wait for the disk. `false` when the kernel cannot say
/// (before Linux 6.5): the caller loads it on the blocking pool first ([`load`]).
pub(super) fn is_cached(file: &File, offset: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    if len == 0 {
        return true;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    let pages = (offset + len).div_ceil(page) - offset / page;
    let range = Range { off: offset, len };
    let mut stat = Stat::default();
    // SAFETY: the kernel reads one `cachestat_range` and writes one `cachestat`, both of the
    // layout above, which live across the call.
    let done = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            file.as_raw_fd(),
            &range as *const Range,
            &mut stat as *mut Stat,
            0,
        )
    };
    done == 0 && stat.nr_cache >= pages
}

/// Reads `file`'s `[offset, offset + len)` into the page cache (`readahead(2)`, which returns
/// once it is there). Blocking: for the blocking pool.
pub(super) fn load(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: readahead only reads the descriptor's file into the page cache.
    let done = unsafe { libc::readahead(file.as_raw_fd(), offset as libc::off64_t, len as usize) };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
