//! The controller's durable Raft log, vote and committed index, in `<data_dir>/controller/`.
//!
//! The log is one append-only file of records, each `[length u32][CRC32C u32][JSON]`: an entry,
//! or the id of the last entry purged (after a snapshot). An append is synced before openraft
//! hears it is done, so an entry is never acknowledged before it is on disk. At start, a record
//! cut short or damaged by a crash ends the log there (it was never acknowledged: the append
//! that wrote it had not returned), and the file is cut to its good part. Truncating a suffix
//! (a leader's conflicting entries) or purging a prefix rewrites the file atomically (a new file
//! synced, then renamed over the old one, then the directory synced): the log is kilobytes of
//! topology decisions, not data. The vote is one small file replaced the same way.
//!
//! The files are written with blocking calls on the Raft task: entries are rare (a topology
//! step, a handover's commit), small, and a Raft heartbeat writes nothing.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use serde::{Deserialize, Serialize};

use super::files::{read_json, replace, sync_dir};
use super::raft::{NodeId, TypeConfig};

/// The log file, in the controller's directory.
pub(super) const LOG_FILE: &str = "log";
const VOTE_FILE: &str = "vote.json";
const COMMITTED_FILE: &str = "committed.json";
/// Locked while a node (or `goutube controller recover`) has the files open: one at a time.
const LOCK_FILE: &str = "lock";

/// One record of the log file.
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    /// Every entry up to this one was purged (it is in a snapshot).
    Purged(LogId<NodeId>),
    /// An entry.
    Entry(Entry<TypeConfig>),
}

/// What the log holds, shared by the store and its readers.
#[derive(Debug, Default)]
struct Held {
    entries: BTreeMap<u64, Entry<TypeConfig>>,
    purged: Option<LogId<NodeId>>,
}

/// The durable log (openraft's log store); cheap to clone, clones share the files.
#[derive(Debug, Clone)]
pub(super) struct LogStore {
    dir: PathBuf,
    held: Arc<Mutex<Held>>,
    file: Arc<Mutex<File>>,
    /// The lock on the directory, held as long as a clone lives.
    _lock: Arc<File>,
}

impl LogStore {
    /// Opens (or creates) the log in `dir`, dropping a torn tail. Fails if another process has
    /// it open.
    pub(super) fn open(dir: &Path) -> io::Result<LogStore> {
        std::fs::create_dir_all(dir)?;
        let lock = File::create(dir.join(LOCK_FILE))?;
        if let Err(error) = lock.try_lock() {
            return Err(io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "another process has the controller's files open (is the node running?): {error}"
                ),
            ));
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .open(dir.join(LOG_FILE))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut held = Held::default();
        let mut good = 0;
        while let Some((record, next)) = decode(&bytes[good..]) {
            good += next;
            match record {
                Record::Purged(id) => {
                    held.entries.retain(|index, _| *index > id.index);
                    held.purged = Some(id);
                }
                Record::Entry(entry) => {
                    held.entries.split_off(&entry.log_id.index);
                    held.entries.insert(entry.log_id.index, entry);
                }
            }
        }
        if good < bytes.len() {
            tracing::warn!(
                kept = good,
                dropped = bytes.len() - good,
                "the controller log ends in a record cut short by a crash: dropped"
            );
            file.set_len(good as u64)?;
            file.sync_all()?;
        }
        sync_dir(dir)?;
        file.seek(io::SeekFrom::Start(good as u64))?;
        Ok(LogStore {
            dir: dir.to_owned(),
            held: Arc::new(Mutex::new(held)),
            file: Arc::new(Mutex::new(file)),
            _lock: Arc::new(lock),
        })
    }

    /// The entries held (after the last one purged into the snapshot), in order.
    pub(super) fn entries(&self) -> Vec<Entry<TypeConfig>> {
        let held = self.held.lock().expect("poisoned");
        held.entries.values().cloned().collect()
    }

    /// Ends the log at `last`, as purged (a recovery's snapshot holds everything up to it), and
    /// records it as committed.
    pub(super) fn reset(&self, last: LogId<NodeId>) -> io::Result<()> {
        let mut held = self.held.lock().expect("poisoned");
        held.entries.clear();
        held.purged = Some(last);
        self.rewrite(&held)?;
        let committed = serde_json::to_vec(&Some(last)).map_err(io::Error::other)?;
        replace(&self.dir.join(COMMITTED_FILE), &committed)
    }

    /// Rewrites the log file from what is held (after a truncation or a purge).
    fn rewrite(&self, held: &Held) -> io::Result<()> {
        let mut bytes = Vec::new();
        if let Some(purged) = held.purged {
            encode(&Record::Purged(purged), &mut bytes)?;
        }
        for entry in held.entries.values() {
            encode(&Record::Entry(entry.clone()), &mut bytes)?;
        }
        let path = self.dir.join(LOG_FILE);
        replace(&path, &bytes)?;
        let mut file = OpenOptions::new().read(true).write(true).open(&path)?;
        file.seek(io::SeekFrom::End(0))?;
        *self.file.lock().expect("poisoned") = file;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        let held = self.held.lock().expect("poisoned");
        Ok(held
            .entries
            .range(range)
            .map(|(_, entry)| entry.clone())
            .collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let held = self.held.lock().expect("poisoned");
        let last = held.entries.values().next_back().map(|e| e.log_id);
        Ok(LogState {
            last_purged_log_id: held.purged,
            last_log_id: last.or(held.purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let bytes = serde_json::to_vec(vote).map_err(|e| write_error(io::Error::other(e)))?;
        replace(&self.dir.join(VOTE_FILE), &bytes).map_err(write_error)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        read_json(&self.dir.join(VOTE_FILE)).map_err(read_error)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not needed for safety (a restarted node learns the committed index again): written
        // without a sync, so that entries are applied again at start without waiting.
        let bytes = serde_json::to_vec(&committed).map_err(|e| write_error(io::Error::other(e)))?;
        let path = self.dir.join(COMMITTED_FILE);
        let temporary = path.with_extension("tmp");
        std::fs::write(&temporary, bytes)
            .and_then(|()| std::fs::rename(&temporary, &path))
            .map_err(write_error)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(
            read_json::<Option<LogId<NodeId>>>(&self.dir.join(COMMITTED_FILE))
                .map_err(read_error)?
                .flatten(),
        )
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut bytes = Vec::new();
        let mut appended = Vec::new();
        for entry in entries {
            encode(&Record::Entry(entry.clone()), &mut bytes).map_err(write_error)?;
            appended.push(entry);
        }
        let written = {
            let mut file = self.file.lock().expect("poisoned");
            let end = file.stream_position().map_err(write_error)?;
            let written = file.write_all(&bytes).and_then(|()| file.sync_data());
            if written.is_err() {
                // A part of the records may be in the file: cut it off, or the next append would
                // land behind it and be lost at the next start, which stops at a torn record.
                file.set_len(end)
                    .and_then(|()| file.seek(io::SeekFrom::Start(end)).map(drop))
                    .map_err(write_error)?;
            }
            written
        };
        if let Err(error) = written {
            tracing::error!(%error, "the controller log could not be written");
            callback.log_io_completed(Err(io::Error::new(error.kind(), error.to_string())));
            return Err(write_error(error));
        }
        let mut held = self.held.lock().expect("poisoned");
        for entry in appended {
            held.entries.insert(entry.log_id.index, entry);
        }
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut held = self.held.lock().expect("poisoned");
        held.entries.split_off(&log_id.index);
        self.rewrite(&held).map_err(write_error)
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut held = self.held.lock().expect("poisoned");
        held.entries.retain(|index, _| *index > log_id.index);
        held.purged = Some(log_id);
        self.rewrite(&held).map_err(write_error)
    }
}

fn encode(record: &Record, out: &mut Vec<u8>) -> io::Result<()> {
    let json = serde_json::to_vec(record).map_err(io::Error::other)?;
    let length = u32::try_from(json.len()).map_err(io::Error::other)?;
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&json).to_le_bytes());
    out.extend_from_slice(&json);
    Ok(())
}

/// The record at the start of `bytes` and its length, or `None` where the good part ends.
fn decode(bytes: &[u8]) -> Option<(Record, usize)> {
    let header = bytes.get(..8)?;
    let length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    let json = bytes.get(8..8 + length)?;
    if crc32c::crc32c(json) != crc {
        return None;
    }
    let record = serde_json::from_slice(json).ok()?;
    Some((record, 8 + length))
}

fn write_error(error: io::Error) -> StorageError<NodeId> {
    StorageIOError::write(&error).into()
}

fn read_error(error: io::Error) -> StorageError<NodeId> {
    StorageIOError::read(&error).into()
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    fn entry(index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 7), index),
            payload: EntryPayload::Blank,
        }
    }

    fn indexes(store: &LogStore) -> Vec<u64> {
        store.held.lock().unwrap().entries.keys().copied().collect()
    }

    /// A crash can leave the last record cut short or its bytes damaged: the log ends at the
    /// last good record (never acknowledged past it), and the file is cut there.
    #[test]
    fn a_torn_or_damaged_tail_ends_the_log_at_the_last_good_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LOG_FILE);
        let mut good = Vec::new();
        for index in 1..=3 {
            encode(&Record::Entry(entry(index)), &mut good).unwrap();
        }
        let mut fourth = Vec::new();
        encode(&Record::Entry(entry(4)), &mut fourth).unwrap();
        let cases: [(&str, Vec<u8>); 3] = [
            ("cut short", fourth[..fourth.len() - 3].to_vec()),
            ("a damaged byte", {
                let mut damaged = fourth.clone();
                let last = damaged.len() - 2;
                damaged[last] ^= 0x40;
                damaged
            }),
            ("a header only", fourth[..6].to_vec()),
        ];
        for (what, tail) in cases {
            std::fs::write(&path, [good.as_slice(), tail.as_slice()].concat()).unwrap();
            let store = LogStore::open(dir.path()).unwrap();
            assert_eq!(indexes(&store), [1, 2, 3], "{what}");
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                good.len() as u64,
                "{what}: the file is cut at the good part"
            );
        }
    }

    #[tokio::test]
    async fn truncation_and_purge_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = Vec::new();
        for index in 1..=6 {
            encode(&Record::Entry(entry(index)), &mut bytes).unwrap();
        }
        std::fs::write(dir.path().join(LOG_FILE), bytes).unwrap();
        let mut store = LogStore::open(dir.path()).unwrap();
        store.truncate(entry(5).log_id).await.unwrap();
        store.purge(entry(2).log_id).await.unwrap();
        assert_eq!(indexes(&store), [3, 4]);
        let busy = LogStore::open(dir.path()).unwrap_err();
        assert_eq!(
            busy.kind(),
            io::ErrorKind::ResourceBusy,
            "one process at a time"
        );
        drop(store);
        let mut reopened = LogStore::open(dir.path()).unwrap();
        assert_eq!(indexes(&reopened), [3, 4]);
        let state = reopened.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(entry(2).log_id));
        assert_eq!(state.last_log_id, Some(entry(4).log_id));
        let read = reopened.try_get_log_entries(3..5).await.unwrap();
        assert_eq!(read.len(), 2);
    }
}
