//! A point's ownership record: its epoch and, while the point is handed from one owner to
//! another, where that handover stands (the state machine is in `docs/resharding.md`). Kept in
//! `point.meta` with the point, and always synced whatever `storage.fsync` says: two copies of a
//! point are decided by their epochs, so an epoch anyone was told about must survive a crash.
//!
//! The store's side lives here too: reading and replacing a point's record, fencing it for a
//! handover, and quarantine (a copy taken out of the store for an operator).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::catalogue::Handovers;
use super::files::{DATA_FILE, JOURNAL_FILE, remove_point_files, sync_dir};
use super::meta::{META_FILE, Meta};
use super::{
    AppendError, DeleteError, Fsync, PointId, ReadError, StorageError, Store, StoreEvent,
    join_error,
};

/// The epoch of a point created by its owner (and of points stored before epochs existed).
pub const FIRST_EPOCH: u64 = 1;

/// Who may write a point, as this node's copy records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ownership {
    /// One more at every handover: the higher epoch decides between two copies.
    #[serde(default = "first_epoch")]
    pub epoch: u64,
    /// The member that committed `epoch` by taking the point over in a handover; `None` for a
    /// point created by its owner, and for the copies followers hold. A copy committed here is
    /// written here whatever the ring says until the ring catches up (`docs/resharding.md`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    /// The handover this copy is part of, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handover: Option<Handover>,
}

/// Where a point was sealed for its handover: its final bytes on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealedAt {
    /// Its end when writes were fenced.
    pub end: u64,
    /// CRC32C of `[0, end)`.
    pub crc: u32,
}

impl Ownership {
    /// Whether this copy is still arriving in a handover: neither written nor served here.
    pub fn is_arriving(&self) -> bool {
        matches!(self.handover, Some(Handover::Incoming { .. }))
    }
}

impl Default for Ownership {
    fn default() -> Self {
        Self {
            epoch: FIRST_EPOCH,
            owner: None,
            handover: None,
        }
    }
}

fn first_epoch() -> u64 {
    FIRST_EPOCH
}

/// Where a handover stands on one side of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Handover {
    /// Old owner: `to` catches up as a learner; writes are still accepted here and flow to it.
    Copying {
        /// The new owner.
        to: String,
        /// The version of the ring that gives it the point.
        target_ring: u64,
    },
    /// Old owner: writes are fenced; the point's final bytes here are `[0, end)`, CRC32C `crc`.
    Sealed {
        /// The new owner.
        to: String,
        /// The point's final end here.
        end: u64,
        /// The CRC32C of `[0, end)`.
        crc: u32,
        /// The version of the ring that gives it the point.
        target_ring: u64,
    },
    /// Old owner: `to` owns the point at `epoch`; writes are redirected there, reads served
    /// here until cleanup.
    Moved {
        /// The new owner.
        to: String,
        /// The epoch it owns the point at.
        epoch: u64,
    },
    /// New owner: a learner copy from `from`, which owns the point at `epoch`; neither written
    /// nor read here until the handover commits.
    Incoming {
        /// The old owner.
        from: String,
        /// The epoch it owns the point at.
        epoch: u64,
    },
}

impl Handover {
    /// Whether a client's write is accepted here: only before the fence.
    pub fn accepts_writes(&self) -> bool {
        matches!(self, Handover::Copying { .. })
    }

    /// Whether the handover is under way: copying, sealed or incoming, not moved.
    pub fn is_under_way(&self) -> bool {
        !matches!(self, Handover::Moved { .. })
    }

    /// The member a refused write should go to (or wait for).
    pub fn peer(&self) -> &str {
        match self {
            Handover::Copying { to, .. }
            | Handover::Sealed { to, .. }
            | Handover::Moved { to, .. } => to,
            Handover::Incoming { from, .. } => from,
        }
    }
}

impl std::fmt::Display for Handover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handover::Copying { to, .. } => write!(f, "is being copied to member {to}"),
            Handover::Sealed { to, .. } => {
                write!(
                    f,
                    "is being handed to member {to}; writes wait for the switch"
                )
            }
            Handover::Moved { to, epoch } => {
                write!(
                    f,
                    "was handed to member {to} (epoch {epoch}); write it there"
                )
            }
            Handover::Incoming { from, .. } => write!(
                f,
                "is being handed to this node by member {from}, which takes its writes until then"
            ),
        }
    }
}

/// A copy of a point kept in quarantine (`docs/resharding.md`, forget), or the tail of one
/// (`docs/failover.md`: a deposed leader's copy cut back to where its successor began).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The epoch of the copy.
    pub epoch: u64,
    /// Where its bytes began in the point: 0 for a whole copy, else the offset of a tail
    /// (kept in `<epoch>+<from>/`).
    pub from: u64,
    /// Its bytes.
    pub size: u64,
    /// Where its files are.
    pub dir: PathBuf,
}

// The store's side of ownership and quarantine: reading and replacing a point's record,
// fencing it for a handover, and taking a copy out of the store for an operator.
impl Store {
    /// The ownership record of `id`: its epoch and the handover it is part of, if any.
    /// Reads `point.meta` once, without opening the point's files: the mover looks at every
    /// point's record, and must not churn the open-file budget doing so.
    pub async fn ownership(&self, id: &PointId) -> Result<Ownership, ReadError> {
        self.read_meta_field(id, |meta| meta.ownership.clone())
            .await
    }

    /// The points in a handover, each with its handover record, in ascending order: from the
    /// catalogue's handover index and the rows it names, without a walk over every point and
    /// without taking any point into use.
    pub async fn handovers(&self) -> Result<Vec<(PointId, Handover)>, ReadError> {
        self.handovers_of(Handovers::All).await
    }

    /// [`handovers`](Self::handovers) under way only (copying, sealed, incoming): a drain's
    /// planning reads these after every move, not every point it handed over and not yet
    /// cleaned up.
    pub async fn handovers_under_way(&self) -> Result<Vec<(PointId, Handover)>, ReadError> {
        self.handovers_of(Handovers::UnderWay).await
    }

    async fn handovers_of(&self, which: Handovers) -> Result<Vec<(PointId, Handover)>, ReadError> {
        let catalogue = self.inner.shared.catalogue.clone();
        Ok(
            tokio::task::spawn_blocking(move || catalogue.handovers(which))
                .await
                .map_err(join_error)??,
        )
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
    ) -> Result<SealedAt, AppendError> {
        let mut sealed = SealedAt { end: 0, crc: 0 };
        self.update_meta(id, |meta, written| {
            sealed = SealedAt {
                end: written.end,
                crc: written.crc,
            };
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
    pub(super) fn ownership_event(&self, id: &PointId) {
        self.inner.ownership_changed.notify_waiters();
        let _ = self
            .inner
            .events
            .send(StoreEvent::Owned { point: id.clone() });
    }

    /// Takes `id` out of the store without deleting it: its files move to
    /// `<data_dir>/quarantine/<point>/<epoch>/`, where nothing serves them and only an operator
    /// deletes them (`docs/resharding.md`: what a forgotten member alone holds), counted in
    /// `goutube_quarantined_points`. Returns that directory.
    pub async fn quarantine(&self, id: &PointId, epoch: u64) -> Result<PathBuf, DeleteError> {
        let root = self.inner.shared.config.dir.clone();
        let target = self.quarantine_dir(id).join(epoch.to_string());
        let moved = target.clone();
        // A packed point is given files first (`segment.rs`): they are what quarantine keeps.
        if let Ok(point) = self.get(id) {
            drop(self.lock_open(id, &point).await?);
        }
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
        ::metrics::gauge!(crate::metrics::QUARANTINED_POINTS).set(self.quarantined_count() as f64);
        Ok(target)
    }

    /// Copies the bytes of `id` from `from` to its end into quarantine, in
    /// `<data_dir>/quarantine/<point>/<epoch>+<from>/point.data` (`epoch`: its ownership
    /// epoch), before they are cut (`Store::truncate`): a deposed leader's tail that its
    /// successor never had. Counted in `goutube_quarantined_points` like a whole copy; only an
    /// operator deletes it. Returns the directory and the bytes kept. Copying again after a
    /// crash replaces the file with the same bytes.
    pub async fn quarantine_tail(
        &self,
        id: &PointId,
        from: u64,
    ) -> Result<(PathBuf, u64), ReadError> {
        let point = self.point(id).await?;
        // A packed point is given files first (`segment.rs`): the tail is copied from them.
        point.files(&self.inner.shared).await?;
        let end = point.snapshot().end;
        let epoch = self.ownership(id).await?.epoch;
        let target = self.quarantine_dir(id).join(format!("{epoch}+{from}"));
        let source = point.dir.join(DATA_FILE);
        let kept = target.clone();
        let len = end.saturating_sub(from);
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Seek};
            std::fs::create_dir_all(&kept).map_err(StorageError::io("creating", kept.clone()))?;
            let partial = kept.join("point.data.partial");
            let copy = || -> std::io::Result<()> {
                let mut data = std::fs::File::open(&source)?;
                data.seek(std::io::SeekFrom::Start(from))?;
                let mut file = std::fs::File::create(&partial)?;
                let copied = std::io::copy(&mut data.take(len), &mut file)?;
                if copied != len {
                    return Err(std::io::Error::other(format!(
                        "{copied} of the {len} bytes of the tail could be read"
                    )));
                }
                file.sync_all()?;
                std::fs::rename(&partial, kept.join(DATA_FILE))?;
                sync_dir(&kept)
            };
            copy().map_err(StorageError::io("quarantining", source.clone()))
        })
        .await
        .map_err(join_error)??;
        ::metrics::gauge!(crate::metrics::QUARANTINED_POINTS).set(self.quarantined_count() as f64);
        Ok((target, len))
    }

    /// Where the quarantined copies of `id` are kept, one directory per epoch.
    pub(super) fn quarantine_dir(&self, id: &PointId) -> PathBuf {
        let points = &self.inner.shared.config.dir;
        points.with_file_name("quarantine").join(id.relative_dir())
    }

    /// The quarantined copies of `id`, oldest epoch first.
    pub fn quarantined(&self, id: &PointId) -> Vec<Quarantined> {
        let dir = self.quarantine_dir(id);
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return Vec::new();
        };
        let mut copies: Vec<Quarantined> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let name = path.file_name()?.to_str()?;
                let (epoch, from) = match name.split_once('+') {
                    Some((epoch, from)) => (epoch.parse().ok()?, from.parse().ok()?),
                    None => (name.parse().ok()?, 0),
                };
                let size = std::fs::metadata(path.join(DATA_FILE)).ok()?.len();
                Some(Quarantined {
                    epoch,
                    from,
                    size,
                    dir: path,
                })
            })
            .collect();
        copies.sort_by_key(|copy| (copy.epoch, copy.from));
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
}
