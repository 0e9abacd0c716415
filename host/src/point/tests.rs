//! Store behaviour against real files in temporary directories.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;

use super::meta::META_FILE;
use super::ownership::FIRST_EPOCH;
use super::*;

fn config(dir: &Path) -> StoreConfig {
    StoreConfig {
        dir: dir.join("points"),
        fsync: Fsync::Always,
        fsync_interval: Duration::from_millis(20),
        max_open: 64,
        idle_close: Duration::from_secs(60),
        packed_max: 64 * 1024,
    }
}

/// [`config`] with no point packed into a segment: every point has files of its own, for
/// tests of those files.
fn files_config(dir: &Path) -> StoreConfig {
    StoreConfig {
        packed_max: 0,
        ..config(dir)
    }
}

/// Non-periodic test bytes: a different pseudo-random sequence for every seed.
fn bytes(seed: u64, len: usize) -> Bytes {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A frame with its CRC32C, as replication applies it.
fn with_crc(frame: Bytes) -> (Bytes, u32) {
    let crc = crc32c::crc32c(&frame);
    (frame, crc)
}

/// Where the point ends after each of `frames`, appended in order.
fn ends_of(frames: &[Bytes]) -> Vec<u64> {
    frames
        .iter()
        .scan(0, |end, frame| {
            *end += frame.len() as u64;
            Some(*end)
        })
        .collect()
}

/// The committed end of `p` and its CRC32C ([`Snapshot::committed`]).
fn committed_of(store: &Store, p: &PointId) -> (u64, u32) {
    let snapshot = store.get(p).unwrap().snapshot();
    (snapshot.committed, snapshot.committed_crc)
}

fn id(s: &str) -> PointId {
    PointId::new(s).unwrap()
}

/// Waits for `condition` with a deadline.
async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn appends_read_back_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let frames: Vec<Bytes> = (0..10).map(|i| bytes(i, 300 + i as usize * 17)).collect();
    let mut expected_start = 0;
    for frame in &frames {
        let appended = store.append(&id("video"), frame.clone()).await.unwrap();
        assert_eq!(appended.start, expected_start);
        expected_start = appended.end;
    }
    let all: Vec<u8> = frames.concat();
    let meta = store.metadata(&id("video")).await.unwrap();
    assert_eq!(meta.end, all.len() as u64);
    assert_eq!(meta.crc, crc32c::crc32c(&all));
    assert_eq!(store.read(&id("video"), 0, meta.end).await.unwrap(), all);
    assert_eq!(
        store.read(&id("video"), 301, 17).await.unwrap(),
        all[301..318]
    );
    assert!(matches!(
        store.read(&id("video"), 10, meta.end).await,
        Err(ReadError::OutOfRange { .. })
    ));
    store.close().await.unwrap();

    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.list("", None, 10), vec![id("video")]);
    assert_eq!(
        store.read(&id("video"), 0, all.len() as u64).await.unwrap(),
        all
    );
    assert_eq!(
        store.metadata(&id("video")).await.unwrap().crc,
        crc32c::crc32c(&all)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_points_last_write_is_known_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(files_config(dir.path())).await.unwrap();
    let before = std::time::SystemTime::now();
    store.append(&id("log"), bytes(1, 100)).await.unwrap();
    let point = store.point(&id("log")).await.unwrap();
    let written = point.modified(&store).await.unwrap();
    let after = std::time::SystemTime::now();
    // Kept in ms: it may read up to a millisecond before `before`.
    assert!(
        written + Duration::from_millis(1) >= before && written <= after,
        "{written:?} between {before:?} and {after:?}"
    );
    store.close().await.unwrap();

    // Not written since the store opened: the time its catalogue row keeps, not its file's.
    let store = Store::open(files_config(dir.path())).await.unwrap();
    let point = store.point(&id("log")).await.unwrap();
    let file = point.dir.join(DATA_FILE);
    let known = point.modified(&store).await.unwrap();
    assert_eq!(known, written);
    std::fs::File::options()
        .write(true)
        .open(&file)
        .unwrap()
        .set_modified(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(point.modified(&store).await, Some(known));
    store.close().await.unwrap();
}

#[tokio::test]
async fn clean_close_leaves_nothing_to_verify() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    for i in 0..5 {
        store.append(&id("p"), bytes(i, 1000)).await.unwrap();
    }
    store.close().await.unwrap();
    let point_dir = config.dir.join(id("p").relative_dir());
    let journal = File::open(point_dir.join(JOURNAL_FILE)).unwrap();
    let data = File::open(point_dir.join(DATA_FILE)).unwrap();
    let recovered = journal::recover(&journal, &data).unwrap();
    assert_eq!(recovered.end, 5000);
    assert_eq!(
        recovered.verified_bytes, 0,
        "the sync marker makes the whole point trusted"
    );
}

#[tokio::test]
async fn append_batch_at_applies_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let (a, b) = (bytes(1, 100), bytes(2, 50));
    store
        .append_batch_at(&id("r"), 0, vec![a.clone()], Visibility::Now)
        .await
        .unwrap();
    // A duplicate and a gap are both refused, with the real end.
    for start in [0, 150] {
        match store
            .append_batch_at(&id("r"), start, vec![b.clone()], Visibility::Now)
            .await
        {
            Err(AppendError::OffsetMismatch { expected, end, .. }) => {
                assert_eq!((expected, end), (start, 100));
            }
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }
    store
        .append_batch_at(&id("r"), 100, vec![b.clone()], Visibility::Now)
        .await
        .unwrap();
    assert_eq!(store.metadata(&id("r")).await.unwrap().end, 150);
    let content = store.read(&id("r"), 0, 150).await.unwrap();
    assert_eq!(content, [a, b].concat());
    store.close().await.unwrap();
}

#[tokio::test]
async fn open_handles_are_bounded_and_idle_points_close() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 8;
    config.idle_close = Duration::from_millis(200);
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    for i in 0..100 {
        store
            .append(&id(&format!("p{i}")), bytes(i, 64))
            .await
            .unwrap();
        assert!(
            store.open_points() <= 8,
            "{} points open",
            store.open_points()
        );
    }
    // Every point still reads back, reopening as needed.
    for i in 0..100 {
        let got = store.read(&id(&format!("p{i}")), 0, 64).await.unwrap();
        assert_eq!(got, bytes(i, 64));
        assert!(store.open_points() <= 8);
    }
    eventually("idle points to close", || store.open_points() == 0).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_points_closed_for_room_are_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = files_config(dir.path());
    config.max_open = 128;
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    let name = |i: usize| id(&format!("p{i}"));
    for i in 0..128 {
        store.append(&name(i), bytes(i as u64, 64)).await.unwrap();
    }
    // p0 is used again: now the most recent of the first 128.
    store.append(&name(0), bytes(1000, 64)).await.unwrap();
    for i in 128..200 {
        store.append(&name(i), bytes(i as u64, 64)).await.unwrap();
        assert!(store.open_points() <= 128, "{} open", store.open_points());
    }
    let open: std::collections::HashSet<PointId> = store
        .inner
        .shared
        .open
        .lock()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    assert!(open.contains(&name(0)), "p0 was used after p1..p127");
    for i in 128..200 {
        assert!(open.contains(&name(i)), "p{i} is among the newest");
    }
    // Of p1..p127, the ones closed are older than every one left open.
    let kept: Vec<usize> = (1..128).filter(|&i| open.contains(&name(i))).collect();
    let closed: Vec<usize> = (1..128).filter(|&i| !open.contains(&name(i))).collect();
    assert!(!closed.is_empty());
    if let (Some(newest_closed), Some(oldest_kept)) = (closed.last(), kept.first()) {
        assert!(
            newest_closed < oldest_kept,
            "closed {closed:?}, kept {kept:?}"
        );
    }
    // Closed points read back, reopened.
    assert_eq!(store.read(&name(1), 0, 64).await.unwrap(), bytes(1, 64));
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_data_file_left_without_its_journal_is_not_taken_for_the_point() {
    let dir = tempfile::tempdir().unwrap();
    let config = files_config(dir.path());
    // Bytes where a point's data would be, with no journal (nothing says they were written).
    let point_dir = config.dir.join(id("orphan").relative_dir());
    std::fs::create_dir_all(&point_dir).unwrap();
    std::fs::write(point_dir.join(DATA_FILE), bytes(7, 300)).unwrap();
    let store = Store::open(config).await.unwrap();
    let appended = store.append(&id("orphan"), bytes(8, 100)).await.unwrap();
    assert_eq!((appended.start, appended.end), (0, 100));
    assert_eq!(
        store.read(&id("orphan"), 0, 100).await.unwrap(),
        bytes(8, 100)
    );
    store.close().await.unwrap();
    assert_eq!(
        std::fs::metadata(point_dir.join(DATA_FILE)).unwrap().len(),
        100
    );
}

#[tokio::test]
async fn a_new_point_is_created_and_written_in_one_go_and_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let frames: Vec<Bytes> = (0..3).map(|i| bytes(40 + i, 700 + i as usize)).collect();
    let appended = store
        .append_batch(&id("fresh"), frames.clone(), Visibility::Now)
        .await
        .unwrap();
    assert_eq!(appended.len(), 3);
    assert_eq!(appended[0].start, 0);
    assert_eq!(appended[2].end, 2103);
    assert_eq!(
        store.read(&id("fresh"), 0, 2103).await.unwrap(),
        frames.concat()
    );
    assert_eq!(store.metadata(&id("fresh")).await.unwrap().end, 2103);
    store.close().await.unwrap();
    // Its journal says so after a restart.
    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.metadata(&id("fresh")).await.unwrap().end, 2103);
    assert_eq!(
        store.read(&id("fresh"), 0, 2103).await.unwrap(),
        frames.concat()
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_write_expected_past_the_start_of_a_point_in_use_but_not_created_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    // In use (as while another caller creates it), with no files yet: the store holds it.
    let point = store.get_or_insert(&id("early")).unwrap();
    let write = ClientWrite {
        expected_start: Some(5),
        ..ClientWrite::default()
    };
    let refused = store
        .write(&id("early"), vec![bytes(60, 10)], write)
        .await
        .unwrap_err();
    assert!(
        matches!(refused, AppendError::OffsetMismatch { end: 0, .. }),
        "{refused:?}"
    );
    assert!(point.state.lock().await.deleted, "forgotten again");
    assert!(!point.dir.exists(), "no files were created");
    assert!(matches!(
        store.metadata(&id("early")).await,
        Err(ReadError::NotFound(_))
    ));
    store.close().await.unwrap();
}

#[tokio::test]
async fn files_found_without_a_row_are_appended_to_not_written_over() {
    // A point's files (with a `point.meta`) in a store whose catalogue has no row for it.
    let source = tempfile::tempdir().unwrap();
    let store = Store::open(config(source.path())).await.unwrap();
    let (first, second) = (bytes(50, 900), bytes(51, 300));
    store
        .set_content_type(&id("found"), "video/mp4")
        .await
        .unwrap();
    store.append(&id("found"), first.clone()).await.unwrap();
    store.close().await.unwrap();
    let target = tempfile::tempdir().unwrap();
    Store::open(config(target.path()))
        .await
        .unwrap()
        .close()
        .await
        .unwrap();
    let relative = id("found").relative_dir();
    let copied = config(target.path()).dir.join(&relative);
    std::fs::create_dir_all(&copied).unwrap();
    for name in [DATA_FILE, JOURNAL_FILE, META_FILE] {
        std::fs::copy(
            config(source.path()).dir.join(&relative).join(name),
            copied.join(name),
        )
        .unwrap();
    }

    let store = Store::open(config(target.path())).await.unwrap();
    let appended = store.append(&id("found"), second.clone()).await.unwrap();
    assert_eq!((appended.start, appended.end), (900, 1200));
    assert_eq!(
        store.read(&id("found"), 0, 1200).await.unwrap(),
        [first, second].concat()
    );
    assert_eq!(
        store.content_type(&id("found")).await.unwrap().as_deref(),
        Some("video/mp4")
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_failed_write_refuses_further_writes_until_reopened() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    store.append(&id("p"), bytes(1, 100)).await.unwrap();
    store
        .inner
        .shared
        .fail_next_journal_write
        .store(true, Ordering::SeqCst);
    assert!(matches!(
        store.append(&id("p"), bytes(2, 100)).await,
        Err(AppendError::Storage(StorageError::Io { .. }))
    ));
    assert!(matches!(
        store.append(&id("p"), bytes(3, 100)).await,
        Err(AppendError::Refused { .. })
    ));
    // Reads keep working up to the last good append; other points keep working.
    assert_eq!(store.read(&id("p"), 0, 100).await.unwrap(), bytes(1, 100));
    assert!(store.read(&id("p"), 0, 101).await.is_err());
    store.append(&id("other"), bytes(4, 10)).await.unwrap();
    store.close().await.unwrap();

    // Reopening recovers: the half-written append (data without journal) is cut away.
    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.metadata(&id("p")).await.unwrap().end, 100);
    store.append(&id("p"), bytes(5, 7)).await.unwrap();
    assert_eq!(store.read(&id("p"), 100, 7).await.unwrap(), bytes(5, 7));
    store.close().await.unwrap();
}

#[tokio::test]
async fn delete_removes_files_and_hostile_ids_stay_inside() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let long = "é".repeat(127);
    for raw in ["../x", "a/b", ".", "..", long.as_str(), "a"] {
        store.append(&id(raw), bytes(9, 10)).await.unwrap();
    }
    // Nothing was written outside the points directory and the catalogue and segments beside it.
    let mut entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    entries.sort();
    assert_eq!(entries, ["catalogue", "points", "segments"]);
    assert_eq!(store.list("", None, 100).len(), 6);
    assert_eq!(store.list("a", None, 100), vec![id("a"), id("a/b")]);
    assert_eq!(store.list("", Some("a"), 1), vec![id("a/b")]);

    let point = store.point(&id("a")).await.unwrap();
    assert_eq!(store.delete(&id("a")).await.unwrap(), 10);
    assert!(point.snapshot().deleted);
    assert!(matches!(
        store.read(&id("a"), 0, 1).await,
        Err(ReadError::NotFound(_))
    ));
    assert!(matches!(
        store.delete(&id("a")).await,
        Err(DeleteError::NotFound(_))
    ));
    assert!(!config(dir.path()).dir.join("a").exists());
    // The point that lives "inside" a's directory name space is untouched.
    assert_eq!(store.read(&id("a/b"), 0, 10).await.unwrap(), bytes(9, 10));
    store.close().await.unwrap();

    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.len(), 5);
    assert_eq!(store.read(&id(&long), 0, 10).await.unwrap(), bytes(9, 10));
    store.close().await.unwrap();
}

#[tokio::test]
async fn interval_policy_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = files_config(dir.path());
    config.fsync = Fsync::Interval;
    let store = Store::open(config).await.unwrap();
    store.append(&id("p"), bytes(1, 100)).await.unwrap();
    let point = store.point(&id("p")).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let state = point.state.lock().await;
        if !state.dirty && state.durable == 100 {
            break;
        }
        drop(state);
        assert!(Instant::now() < deadline, "group commit never ran");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_ownership_record_is_kept_with_the_point_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // The record is synced even where the bytes are not.
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    let point = id("videos/moving");
    store.append(&point, bytes(1, 5000)).await.unwrap();
    assert_eq!(
        store.ownership(&point).await.unwrap(),
        Ownership::default(),
        "a new point is at the first epoch, not moving"
    );
    store
        .set_content_type(&point, "video/mp4")
        .await
        .unwrap_err(); // It has bytes already.
    store
        .set_replicated_content_type(&point, "video/mp4")
        .await
        .unwrap();
    let sealed = Ownership {
        epoch: 4,
        owner: None,
        handover: Some(Handover::Sealed {
            to: "node-b".into(),
            end: 5000,
            crc: 0xdead_beef,
            target_ring: 17,
        }),
    };
    store.set_ownership(&point, sealed.clone()).await.unwrap();
    // A point a follower learns the epoch of before its bytes: created, empty.
    let learned = Ownership {
        epoch: 7,
        owner: None,
        handover: None,
    };
    store
        .set_ownership(&id("learned"), learned.clone())
        .await
        .unwrap();
    assert_eq!(store.metadata(&id("learned")).await.unwrap().end, 0);
    store.close().await.unwrap();

    let store = Store::open(config.clone()).await.unwrap();
    assert_eq!(store.ownership(&point).await.unwrap(), sealed);
    assert_eq!(store.ownership(&id("learned")).await.unwrap(), learned);
    assert_eq!(
        store.content_type(&point).await.unwrap().as_deref(),
        Some("video/mp4"),
        "setting the ownership kept the content type"
    );
    let moved = Ownership {
        epoch: 4,
        owner: None,
        handover: Some(Handover::Moved {
            to: "node-b".into(),
            epoch: 5,
        }),
    };
    store.set_ownership(&point, moved.clone()).await.unwrap();
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert_eq!(store.ownership(&point).await.unwrap(), moved);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_point_stored_before_epochs_is_at_the_first_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let point = id("old");
    store.set_content_type(&point, "text/plain").await.unwrap();
    store.append(&point, bytes(2, 100)).await.unwrap();
    store.close().await.unwrap();
    // The meta file as an earlier release wrote it.
    let meta = walk(&dir.path().join("points"))
        .into_iter()
        .find(|path| path.ends_with(META_FILE))
        .expect("the point has a meta file");
    std::fs::write(&meta, br#"{"content_type":"text/plain"}"#).unwrap();

    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.ownership(&point).await.unwrap().epoch, FIRST_EPOCH);
    assert_eq!(
        store.content_type(&point).await.unwrap().as_deref(),
        Some("text/plain")
    );
    store.close().await.unwrap();
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn a_handover_gates_clients_writes_but_not_the_copy_arriving() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let point = id("p");
    let first = bytes(3, 1000);
    store.append(&point, first.clone()).await.unwrap();
    let with = |handover| Ownership {
        epoch: 2,
        owner: None,
        handover: Some(handover),
    };
    let refused = [
        with(Handover::Sealed {
            to: "b".into(),
            end: 1000,
            crc: crc32c::crc32c(&first),
            target_ring: 1,
        }),
        with(Handover::Moved {
            to: "b".into(),
            epoch: 3,
        }),
        with(Handover::Incoming {
            from: "a".into(),
            epoch: 2,
        }),
    ];
    for ownership in refused {
        store
            .set_ownership(&point, ownership.clone())
            .await
            .unwrap();
        let error = store.append(&point, bytes(4, 10)).await.unwrap_err();
        assert!(
            matches!(&error, AppendError::Handover { handover, .. } if Some(handover) == ownership.handover.as_ref()),
            "{error}"
        );
        let error = store
            .append_batch_at(&point, 1000, vec![bytes(4, 10)], Visibility::Now)
            .await
            .unwrap_err();
        assert!(matches!(error, AppendError::Handover { .. }), "{error}");
        assert_eq!(
            store.metadata(&point).await.unwrap().end,
            1000,
            "nothing written"
        );
    }
    // A copy arriving (replication, a handover) is applied whatever the record says.
    store
        .apply_replicated(&point, 1000, vec![with_crc(bytes(5, 500))], Visibility::Now)
        .await
        .unwrap();
    // Before the fence, clients write.
    store
        .set_ownership(
            &point,
            with(Handover::Copying {
                to: "b".into(),
                target_ring: 1,
            }),
        )
        .await
        .unwrap();
    store.append(&point, bytes(6, 10)).await.unwrap();
    assert_eq!(store.metadata(&point).await.unwrap().end, 1510);
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_crc_of_any_prefix_comes_from_the_journal_and_the_bytes_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let frames: Vec<Bytes> = (0..6)
        .map(|i| bytes(20 + i, 1000 + i as usize * 311))
        .collect();
    for frame in &frames {
        store.append(&id("p"), frame.clone()).await.unwrap();
    }
    let all = frames.concat();
    for end in [0, 1, 999, 1000, 1001, 2500, all.len() - 1, all.len()] {
        let crc = store.crc_at(&id("p"), end as u64).await.unwrap();
        assert_eq!(crc, crc32c::crc32c(&all[..end]), "at {end}");
    }
    assert!(matches!(
        store.crc_at(&id("p"), all.len() as u64 + 1).await,
        Err(ReadError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn truncation_cuts_back_to_an_append_boundary_durably() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let frames: Vec<Bytes> = (0..5)
        .map(|i| bytes(40 + i, 700 + i as usize * 97))
        .collect();
    for frame in &frames {
        store.append(&id("p"), frame.clone()).await.unwrap();
    }
    let ends = ends_of(&frames);
    // Within the fourth append: cut back to the end of the third.
    let end = store.truncate(&id("p"), ends[3] - 1).await.unwrap();
    assert_eq!(end, ends[2]);
    let kept = frames[..3].concat();
    let meta = store.metadata(&id("p")).await.unwrap();
    assert_eq!((meta.end, meta.crc), (end, crc32c::crc32c(&kept)));
    // Past the end: nothing to cut.
    assert_eq!(store.truncate(&id("p"), u64::MAX).await.unwrap(), end);
    // Appends continue from the cut, and a reopen recovers the same point.
    store.append(&id("p"), frames[4].clone()).await.unwrap();
    store.close().await.unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let want = [kept, frames[4].to_vec()].concat();
    let meta = store.metadata(&id("p")).await.unwrap();
    assert_eq!(
        (meta.end, meta.crc),
        (want.len() as u64, crc32c::crc32c(&want))
    );
    let read = store.read(&id("p"), 0, meta.end).await.unwrap();
    assert_eq!(read, want);
    // Before the first append's end: empty, and still a point.
    assert_eq!(store.truncate(&id("p"), 10).await.unwrap(), 0);
    assert_eq!(store.metadata(&id("p")).await.unwrap().end, 0);
    assert!(matches!(
        store.truncate(&id("missing"), 0).await,
        Err(TruncateError::NotFound(_))
    ));
}

#[tokio::test]
async fn bytes_held_for_a_commit_are_served_once_it_reaches_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let p = id("held");
    let frames: Vec<Bytes> = (0..4)
        .map(|i| bytes(60 + i, 300 + i as usize * 41))
        .collect();
    let ends = ends_of(&frames);
    let crc_to = |n: usize| crc32c::crc32c(&frames[..n].concat());
    let committed = |store: &Store| committed_of(store, &p);
    // Two appends held: stored, not served.
    store
        .append_batch(&p, frames[..2].to_vec(), Visibility::OnCommit)
        .await
        .unwrap();
    assert_eq!(store.metadata(&p).await.unwrap().end, ends[1]);
    assert_eq!(committed(&store), (0, 0));
    // A commit between two appends' ends reaches the first only.
    store.commit(&p, ends[1] - 1);
    assert_eq!(committed(&store), (ends[0], crc_to(1)));
    // A commit ahead of the bytes: they are served as they are stored.
    store.commit(&p, ends[2]);
    assert_eq!(committed(&store), (ends[1], crc_to(2)));
    store
        .apply_replicated(
            &p,
            ends[1],
            vec![with_crc(frames[2].clone())],
            Visibility::OnCommit,
        )
        .await
        .unwrap();
    assert_eq!(committed(&store), (ends[2], crc_to(3)));
    // A commit never goes back; a point not held takes none.
    store.commit(&p, 1);
    assert_eq!(committed(&store).0, ends[2]);
    store.commit(&id("missing"), 100);
    assert!(store.get(&id("missing")).is_err());
    // An append served at once serves what was held before it too.
    store
        .append_batch(&p, vec![frames[3].clone()], Visibility::Now)
        .await
        .unwrap();
    assert_eq!(committed(&store), (ends[3], crc_to(4)));

    // A cut takes the committed end back with it; what was held past it is gone.
    let q = id("cut");
    store
        .append_batch(&q, frames[..3].to_vec(), Visibility::Now)
        .await
        .unwrap();
    store
        .append_batch(&q, vec![frames[3].clone()], Visibility::OnCommit)
        .await
        .unwrap();
    store.truncate(&q, ends[1]).await.unwrap();
    let snapshot = store.get(&q).unwrap().snapshot();
    assert_eq!(
        (snapshot.end, snapshot.committed, snapshot.committed_crc),
        (ends[1], ends[1], crc_to(2))
    );
    store.close().await.unwrap();

    // What a point holds when it is opened again is served.
    let store = Store::open(config(dir.path())).await.unwrap();
    let snapshot = store.metadata(&p).await.unwrap();
    assert_eq!((snapshot.committed, snapshot.end), (ends[3], ends[3]));
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_consumer_reads_up_to_the_committed_end_and_follows_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let p = id("followed");
    let (a, b) = (bytes(70, 500), bytes(71, 700));
    store
        .append_batch(&p, vec![a.clone()], Visibility::Now)
        .await
        .unwrap();
    store
        .append_batch(&p, vec![b.clone()], Visibility::OnCommit)
        .await
        .unwrap();
    let point = store.point(&p).await.unwrap();
    let (frames, mut received) = tokio::sync::mpsc::channel(8);
    let span = Span {
        offset: 0,
        stop: None,
        chunk: 4096,
        follow: true,
    };
    let reader = tokio::spawn(point.stream(store.clone(), span, frames, CancellationToken::new()));
    let (offset, first) = received.recv().await.unwrap().unwrap();
    assert_eq!((offset, first.clone()), (0, a.clone()));
    // The held bytes do not come until the commit reaches them.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), received.recv())
            .await
            .is_err(),
        "served bytes that are not committed"
    );
    store.commit(&p, 1200);
    let (offset, second) = received.recv().await.unwrap().unwrap();
    assert_eq!((offset, second), (500, b));
    drop(received);
    reader.abort();
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_leader_records_where_its_epoch_began_and_a_cut_keeps_the_tail_in_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let point = id("epochs/p");
    let (first, second, third) = (bytes(1, 700), bytes(2, 500), bytes(3, 300));
    let at_epoch = |leader_epoch| ClientWrite {
        leader_epoch,
        ..ClientWrite::default()
    };
    // A point's first bytes, and a write admitted at no leader epoch: nothing recorded.
    store
        .write(&point, vec![first.clone()], at_epoch(4))
        .await
        .unwrap();
    store
        .write(&point, vec![second.clone()], at_epoch(0))
        .await
        .unwrap();
    assert!(store.leader_epochs(&point).await.unwrap().is_empty());
    // The first write past them at epoch 4 records where it began, once.
    store
        .write(&point, vec![third.clone()], at_epoch(4))
        .await
        .unwrap();
    let fourth = bytes(4, 90);
    store
        .write(&point, vec![fourth.clone()], at_epoch(4))
        .await
        .unwrap();
    let recorded = [EpochStart {
        epoch: 4,
        start: 1_200,
    }];
    assert_eq!(
        store.leader_epochs(&point).await.unwrap().starts(),
        recorded
    );
    // Replicated bytes record nothing: the leader's list comes with its description.
    let copy = id("epochs/copy");
    for (start, frame) in [(0, &first), (700, &second)] {
        let frames = vec![with_crc(frame.clone())];
        store
            .apply_replicated(&copy, start, frames, Visibility::Now)
            .await
            .unwrap();
    }
    assert!(store.leader_epochs(&copy).await.unwrap().is_empty());
    let leaders = LeaderEpochs::new(recorded.to_vec()).unwrap();
    store
        .set_leader_epochs(&copy, leaders.clone())
        .await
        .unwrap();

    // Reopened: the record is in point.meta.
    store.close().await.unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(store.leader_epochs(&point).await.unwrap(), leaders);
    assert_eq!(store.leader_epochs(&copy).await.unwrap(), leaders);

    // A deposed leader's tail from 700: kept in quarantine byte for byte, then cut; the epoch
    // that began at the cut is forgotten with its bytes.
    let (kept_in, kept) = store.quarantine_tail(&point, 700).await.unwrap();
    assert_eq!(kept, 890);
    let tail = std::fs::read(kept_in.join(DATA_FILE)).unwrap();
    assert_eq!(tail, [&second[..], &third[..], &fourth[..]].concat());
    assert_eq!(store.truncate(&point, 700).await.unwrap(), 700);
    assert!(store.leader_epochs(&point).await.unwrap().is_empty());
    let quarantined = store.quarantined(&point);
    assert_eq!(quarantined.len(), 1);
    assert_eq!(
        (
            quarantined[0].epoch,
            quarantined[0].from,
            quarantined[0].size
        ),
        (FIRST_EPOCH, 700, 890)
    );
    assert_eq!(store.read(&point, 0, 700).await.unwrap(), first);
    store.close().await.unwrap();
}

/// Copies every file under `from` into `to` (a crash image of a running store's directory).
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

#[tokio::test]
async fn the_committed_end_survives_a_restart_and_a_crash_never_serves_more() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let p = id("committed/after-restart");
    let frames: Vec<Bytes> = (0..3)
        .map(|i| bytes(80 + i, 500 + i as usize * 37))
        .collect();
    let ends = ends_of(&frames);
    let crc_to = |n: usize| crc32c::crc32c(&frames[..n].concat());
    let committed = |store: &Store| committed_of(store, &p);
    for frame in &frames {
        store
            .append_batch(&p, vec![frame.clone()], Visibility::OnCommit)
            .await
            .unwrap();
    }
    store.commit(&p, ends[0]);
    assert_eq!(committed(&store), (ends[0], crc_to(1)));
    // A crash now: the journal's last record was written with nothing committed.
    let crashed = tempfile::tempdir().unwrap();
    {
        let _held = store.inner.shared.catalogue.hold_checkpoints();
        copy_tree(dir.path(), crashed.path());
    }
    // A clean stop: the marker says the committed end.
    store.close().await.unwrap();

    let reopened = Store::open(config(dir.path())).await.unwrap();
    reopened.metadata(&p).await.unwrap();
    assert_eq!(committed(&reopened), (ends[0], crc_to(1)));
    // The rest is held until a commit reaches it (whole: one append as far as commits go).
    reopened.commit(&p, ends[1]);
    assert_eq!(committed(&reopened).0, ends[0]);
    reopened.commit(&p, ends[2]);
    assert_eq!(committed(&reopened), (ends[2], crc_to(3)));
    reopened.close().await.unwrap();
    let again = Store::open(config(dir.path())).await.unwrap();
    again.metadata(&p).await.unwrap();
    assert_eq!(committed(&again), (ends[2], crc_to(3)), "all committed");
    again.close().await.unwrap();

    // After the crash: no more than was committed when the last record was written.
    let after_crash = Store::open(config(crashed.path())).await.unwrap();
    assert_eq!(after_crash.metadata(&p).await.unwrap().end, ends[2]);
    assert_eq!(committed(&after_crash), (0, 0));
    // Appends served at once record that everything is committed with them.
    let q = id("committed/local");
    after_crash.append(&q, frames[0].clone()).await.unwrap();
    after_crash.close().await.unwrap();
    let local = Store::open(config(crashed.path())).await.unwrap();
    local.metadata(&q).await.unwrap();
    let snapshot = local.get(&q).unwrap().snapshot();
    assert_eq!(snapshot.committed, ends[0]);
    local.close().await.unwrap();
}

/// The catalogue's touch logs in the store at `dir`, by generation.
fn touch_logs(dir: &Path) -> Vec<String> {
    let mut logs: Vec<String> = std::fs::read_dir(dir.join("catalogue"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.starts_with("touched."))
        .collect();
    logs.sort();
    logs
}

#[tokio::test]
async fn a_store_written_before_the_catalogue_is_catalogued_on_its_first_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    for i in 0..20 {
        store
            .append(&id(&format!("old/{i:02}")), bytes(i, 100 + i as usize))
            .await
            .unwrap();
    }
    store
        .set_content_type(&id("old/typed"), "video/mp4")
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    // The layout before the catalogue: point directories only.
    std::fs::remove_dir_all(dir.path().join("catalogue")).unwrap();

    let store = Store::open(config(dir.path())).await.unwrap();
    let listed = store.list("old/", None, 100);
    assert_eq!(listed.len(), 21);
    for i in 0..20u64 {
        let point = id(&format!("old/{i:02}"));
        let meta = store.metadata(&point).await.unwrap();
        assert_eq!(meta.end, 100 + i);
        assert_eq!(meta.crc, crc32c::crc32c(&bytes(i, 100 + i as usize)));
    }
    assert_eq!(
        store
            .content_type(&id("old/typed"))
            .await
            .unwrap()
            .as_deref(),
        Some("video/mp4")
    );
    store.close().await.unwrap();
    drop(store);

    // Rows written: the next start knows every point without opening one.
    let store = Store::open(config(dir.path())).await.unwrap();
    for i in 0..20u64 {
        let meta = store.metadata(&id(&format!("old/{i:02}"))).await.unwrap();
        assert_eq!(meta.end, 100 + i);
    }
    assert_eq!(store.open_points(), 0, "stat opened a point's files");
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_crash_leaves_no_point_behind_its_catalogue_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    let (settled, open, gone) = (id("crash/settled"), id("crash/open"), id("crash/gone"));
    store.append(&settled, bytes(1, 300)).await.unwrap();
    store.append(&gone, bytes(2, 300)).await.unwrap();
    store.append(&open, bytes(3, 300)).await.unwrap();
    store
        .get(&settled)
        .unwrap()
        .close(&store.inner.shared, Closing::Idle)
        .await
        .unwrap();
    // A checkpoint: rows durable, a new touch log naming the points still open.
    let before = touch_logs(dir.path());
    eventually("a checkpoint", || touch_logs(dir.path()) != before).await;
    // Changes after it: the open point grows, one is deleted, one is new.
    store.append(&open, bytes(4, 200)).await.unwrap();
    store.delete(&gone).await.unwrap();
    let new = id("crash/new");
    store.append(&new, bytes(5, 50)).await.unwrap();
    // A crash now, as `kill -9` leaves the files (the page cache survives).
    let crashed = tempfile::tempdir().unwrap();
    {
        let _held = store.inner.shared.catalogue.hold_checkpoints();
        copy_tree(dir.path(), crashed.path());
    }
    store.close().await.unwrap();

    let mut config = config.clone();
    config.dir = crashed.path().join("points");
    let store = Store::open(config).await.unwrap();
    assert!(!store.stopped_cleanly());
    assert_eq!(
        store.list("crash/", None, 10),
        vec![new.clone(), open.clone(), settled.clone()]
    );
    let whole = [bytes(3, 300), bytes(4, 200)].concat();
    let meta = store.metadata(&open).await.unwrap();
    assert_eq!((meta.end, meta.crc), (500, crc32c::crc32c(&whole)));
    assert_eq!(store.metadata(&new).await.unwrap().end, 50);
    assert_eq!(store.metadata(&settled).await.unwrap().end, 300);
    assert!(matches!(
        store.metadata(&gone).await,
        Err(ReadError::NotFound(_))
    ));
    assert_eq!(store.read(&open, 0, 500).await.unwrap(), whole);
    // A walk over every point sees the same (the stale rows asked of the points' files).
    let walked: Vec<(PointId, u64)> = store
        .summaries()
        .await
        .into_iter()
        .map(|summary| (summary.id, summary.snapshot.end))
        .collect();
    assert_eq!(
        walked,
        vec![
            (new.clone(), 50),
            (open.clone(), 500),
            (settled.clone(), 300)
        ]
    );
    store.close().await.unwrap();
    assert!(
        touch_logs(crashed.path()).is_empty(),
        "a clean stop leaves no touch log"
    );
}

#[tokio::test]
async fn points_not_in_use_are_let_go_and_stat_opens_none() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 8;
    config.idle_close = Duration::from_millis(100);
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    for i in 0..200 {
        store
            .append(&id(&format!("many/{i:03}")), bytes(i, 64 + i as usize))
            .await
            .unwrap();
    }
    let live = |store: &Store| store.inner.live.read().unwrap().len();
    eventually("unused points let go", || live(&store) == 0).await;
    // A commit of points committed that far already (many at once, as the followers'
    // confirmations and the controller's agent make) leaves them at rest.
    for i in 0..200u64 {
        store.commit(&id(&format!("many/{i:03}")), 64 + i);
    }
    assert_eq!(live(&store), 0, "a commit took points into use");
    for i in 0..200u64 {
        let meta = store.metadata(&id(&format!("many/{i:03}"))).await.unwrap();
        assert_eq!(meta.end, 64 + i);
        assert_eq!(store.open_points(), 0, "stat opened a point's files");
    }
    assert_eq!(store.len(), 200);
    eventually("stat points let go", || live(&store) == 0).await;
    // A point let go of is found again, whole.
    let point = id("many/123");
    assert_eq!(store.read(&point, 0, 187).await.unwrap(), bytes(123, 187));
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_handovers_sync_covers_bytes_an_idle_close_left_unsynced() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.idle_close = Duration::from_millis(100);
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    let point = id("arriving");
    store.append(&point, bytes(1, 5000)).await.unwrap();
    let live = |store: &Store| store.inner.live.read().unwrap().len();
    eventually("the point let go", || live(&store) == 0).await;
    // Found again from its row: nothing written since it was opened, yet not durable.
    store.sync(&point).await.unwrap();
    let found = store.inner.live.read().unwrap().get(&point).cloned();
    let found = found.expect("the sync took the point into use");
    let state = found.state.lock().await;
    assert_eq!((state.end, state.durable), (5000, 5000));
    drop(state);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_sniffed_media_type_is_kept_and_stat_opens_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 8;
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    for i in 0..50 {
        store
            .append(&id(&format!("sniff/{i:02}")), bytes(i, 4096))
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    drop(store);
    // Sniffed from the first append's bytes: kept in the row, no point is opened to answer.
    let store = Store::open(config).await.unwrap();
    for i in 0..50 {
        let point = id(&format!("sniff/{i:02}"));
        let head = bytes(i, 4096);
        let sniffed = crate::content::sniff(&head[..crate::content::SNIFF_LEN as usize]);
        assert_eq!(store.media_type(&point).await.unwrap(), sniffed);
        store.metadata(&point).await.unwrap();
    }
    assert_eq!(store.open_points(), 0);
    assert_eq!(
        store.inner.shared.uses.load(Ordering::Relaxed),
        0,
        "a point was opened"
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_walk_over_many_points_at_rest_keeps_few_in_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 8;
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    for i in 0..2500 {
        store
            .append(&id(&format!("walk/{i:04}")), bytes(i, 10))
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    drop(store);
    // No idle sweep within the walk: points are let go of as the walk takes new ones.
    let store = Store::open(config).await.unwrap();
    let bound = registry::sweep_threshold(&store.inner.shared, 0) + 1;
    let mut most = 0;
    for i in 0..2500u64 {
        let meta = store.metadata(&id(&format!("walk/{i:04}"))).await.unwrap();
        assert_eq!(meta.end, 10);
        most = most.max(store.inner.live.read().unwrap().len());
    }
    assert!(most <= bound, "{most} points in memory, more than {bound}");
    assert_eq!(store.open_points(), 0);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_followers_copies_committed_after_their_bytes_are_let_go_of_without_an_idle_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 8;
    config.fsync = Fsync::Never;
    // No idle sweep in this test: only the sweeps of points taken into use let go.
    config.idle_close = Duration::from_secs(3600);
    let store = Store::open(config).await.unwrap();
    // As a follower's catch-up makes them: each copy's bytes held, then its commit. Its row
    // was written before the commit, so the row says less than the point: it stays in memory
    // until a row says what it holds.
    let count = 8000u64;
    let bound = registry::sweep_threshold(&store.inner.shared, 0) + 1;
    let live = |store: &Store| store.inner.live.read().unwrap().len();
    let mut most = 0;
    for i in 0..count {
        let point = id(&format!("copy/{i:04}"));
        let frame = bytes(i, 100 + (i % 7) as usize);
        let end = frame.len() as u64;
        store
            .append_batch(&point, vec![frame], Visibility::OnCommit)
            .await
            .unwrap();
        store.commit(&point, end);
        most = most.max(live(&store));
    }
    assert!(
        most <= 4 * bound,
        "{most} of {count} copies in memory at once, more than {}",
        4 * bound
    );
    // The rows say what each holds: after a restart, every copy is served whole.
    store.close().await.unwrap();
    drop(store);
    let mut config = self::config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    for i in (0..count).step_by(97) {
        let point = id(&format!("copy/{i:04}"));
        let frame = bytes(i, 100 + (i % 7) as usize);
        let snapshot = store.metadata(&point).await.unwrap();
        assert_eq!(
            (snapshot.committed, snapshot.end),
            (frame.len() as u64, frame.len() as u64)
        );
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn the_handover_indexes_name_exactly_the_points_in_a_handover_and_those_under_way() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 4;
    let store = Store::open(config.clone()).await.unwrap();
    for i in 0..40 {
        store
            .append(&id(&format!("p/{i:02}")), bytes(i, 100))
            .await
            .unwrap();
    }
    let with = |handover| Ownership {
        epoch: 3,
        owner: None,
        handover: Some(handover),
    };
    let copying = Handover::Copying {
        to: "b".into(),
        target_ring: 9,
    };
    let sealed = Handover::Sealed {
        to: "b".into(),
        end: 100,
        crc: 7,
        target_ring: 9,
    };
    let moved = Handover::Moved {
        to: "b".into(),
        epoch: 4,
    };
    let incoming = Handover::Incoming {
        from: "c".into(),
        epoch: 2,
    };
    for (point, handover) in [
        ("p/03", &sealed),
        ("p/17", &moved),
        ("p/29", &moved),
        ("p/33", &copying),
        ("p/38", &incoming),
    ] {
        store
            .set_ownership(&id(point), with(handover.clone()))
            .await
            .unwrap();
    }
    // At once, while the points are still open.
    let expected = vec![
        (id("p/03"), sealed.clone()),
        (id("p/17"), moved.clone()),
        (id("p/29"), moved.clone()),
        (id("p/33"), copying.clone()),
        (id("p/38"), incoming.clone()),
    ];
    assert_eq!(store.handovers().await.unwrap(), expected);
    let under_way = vec![
        (id("p/03"), sealed.clone()),
        (id("p/33"), copying.clone()),
        (id("p/38"), incoming.clone()),
    ];
    assert_eq!(store.handovers_under_way().await.unwrap(), under_way);
    // A record cleared, a point removed, a handover ended (sealed to moved): out of the
    // points under way, and of the index for the first two.
    store
        .set_ownership(
            &id("p/03"),
            Ownership {
                epoch: 3,
                owner: None,
                handover: None,
            },
        )
        .await
        .unwrap();
    store.delete(&id("p/29")).await.unwrap();
    store
        .set_ownership(&id("p/38"), with(moved.clone()))
        .await
        .unwrap();
    let expected = vec![
        (id("p/17"), moved.clone()),
        (id("p/33"), copying.clone()),
        (id("p/38"), moved.clone()),
    ];
    let under_way = vec![(id("p/33"), copying.clone())];
    let check = |store: Store| {
        let (expected, under_way) = (expected.clone(), under_way.clone());
        async move {
            assert_eq!(store.handovers().await.unwrap(), expected);
            assert_eq!(store.handovers_under_way().await.unwrap(), under_way);
            store.close().await.unwrap();
        }
    };
    check(store).await;
    // From the B-tree, after a clean stop.
    check(Store::open(config.clone()).await.unwrap()).await;

    // A catalogue from before the indexes (or with the first only) gets them at its first
    // start.
    for tables in [
        &["handovers", "handovers-under-way"][..],
        &["handovers-under-way"],
    ] {
        {
            let db = redb::Database::create(dir.path().join("catalogue/points.redb")).unwrap();
            let write = db.begin_write().unwrap();
            for table in tables {
                let table: redb::TableDefinition<&str, ()> = redb::TableDefinition::new(table);
                assert!(write.delete_table(table).unwrap());
            }
            write.commit().unwrap();
        }
        check(Store::open(config.clone()).await.unwrap()).await;
    }
}

#[tokio::test]
async fn a_walk_over_every_point_reads_the_rows_and_takes_none_into_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.max_open = 4;
    config.idle_close = Duration::from_millis(100);
    config.fsync = Fsync::Never;
    let store = Store::open(config).await.unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..60u64 {
        let (point, frame) = (id(&format!("sum/{i:02}")), bytes(i, 50 + i as usize));
        store.append(&point, frame.clone()).await.unwrap();
        expected.insert(
            point,
            (frame.len() as u64, crc32c::crc32c(&frame), FIRST_EPOCH),
        );
    }
    let later = Ownership {
        epoch: 7,
        owner: Some("b".into()),
        handover: None,
    };
    store
        .set_ownership(&id("sum/13"), later.clone())
        .await
        .unwrap();
    expected.get_mut(&id("sum/13")).unwrap().2 = 7;
    let starts = vec![
        EpochStart { epoch: 2, start: 0 },
        EpochStart {
            epoch: 5,
            start: 40,
        },
    ];
    let epochs = LeaderEpochs::new(starts).unwrap();
    store
        .set_leader_epochs(&id("sum/21"), epochs.clone())
        .await
        .unwrap();
    store.delete(&id("sum/40")).await.unwrap();
    expected.remove(&id("sum/40"));
    let live = |store: &Store| store.inner.live.read().unwrap().len();
    eventually("unused points let go", || live(&store) == 0).await;

    // At rest: every answer from the rows, no point taken into use.
    let uses = store.inner.shared.uses.load(Ordering::Relaxed);
    let walked = store.summaries().await;
    let found: BTreeMap<PointId, (u64, u32, u64)> = walked
        .iter()
        .map(|s| {
            (
                s.id.clone(),
                (s.snapshot.end, s.snapshot.crc, s.ownership.epoch),
            )
        })
        .collect();
    assert_eq!(found, expected);
    assert!(walked.windows(2).all(|pair| pair[0].id < pair[1].id));
    let of = |walked: &[Summary], point: &str| {
        walked
            .iter()
            .find(|s| s.id.as_str() == point)
            .cloned()
            .unwrap()
    };
    assert_eq!(of(&walked, "sum/13").ownership, later);
    assert_eq!(of(&walked, "sum/21").leader_epochs, epochs);
    assert_eq!(live(&store), 0, "the walk took points into use");
    assert_eq!(store.inner.shared.uses.load(Ordering::Relaxed), uses);
    // So does a committed end asked of a point at rest (a leader's session start asks).
    for (point, (end, _, _)) in &expected {
        assert_eq!(store.committed(point), *end, "{point}");
    }
    assert_eq!(store.committed(&id("sum/40")), 0, "removed");
    assert_eq!(
        live(&store),
        0,
        "asking for committed ends took points into use"
    );

    // A point in use answers for itself (its row may be behind it); one taken into use but
    // never created is not a point, and the walk does not create it.
    let grown = id("sum/07");
    let more = bytes(99, 30);
    store.append(&grown, more.clone()).await.unwrap();
    let ghost = id("sum/ghost");
    let _held = store.get_or_insert(&ghost).unwrap();
    let walked = store.summaries().await;
    let whole = [bytes(7, 57), more].concat();
    let summary = of(&walked, "sum/07").snapshot;
    assert_eq!((summary.end, summary.crc), (87, crc32c::crc32c(&whole)));
    assert!(walked.iter().all(|s| s.id != ghost));
    assert_eq!(walked.len(), expected.len());
    assert!(!store.inner.shared.config.dir.join("sum/ghost").exists());
    store.close().await.unwrap();
}

/// The segment files of the store at `dir` (`segment.rs`), with their lengths.
fn segment_files(dir: &Path) -> Vec<(String, u64)> {
    let mut found: Vec<(String, u64)> = std::fs::read_dir(dir.join("segments"))
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let len = entry.metadata().unwrap().len();
            (entry.file_name().into_string().unwrap(), len)
        })
        .collect();
    found.sort();
    found
}

#[tokio::test]
async fn a_small_new_point_is_packed_read_in_place_and_given_files_when_it_changes() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = Store::open(config.clone()).await.unwrap();
    let frames: Vec<Bytes> = (0..3)
        .map(|i| bytes(90 + i, 700 + i as usize * 13))
        .collect();
    let ends = ends_of(&frames);
    let whole = frames.concat();
    let (small, grows, typed) = (id("packed/small"), id("packed/grows"), id("packed/typed"));
    store.append(&small, bytes(1, 4096)).await.unwrap();
    let appended = store
        .append_batch(&grows, frames.clone(), Visibility::Now)
        .await
        .unwrap();
    assert_eq!(
        appended.iter().map(|a| a.end).collect::<Vec<_>>(),
        ends,
        "each frame is an append"
    );
    store.append(&typed, bytes(2, 10)).await.unwrap();
    // Past `packed_max`: files of its own from the start.
    let large = id("packed/large");
    store
        .append(&large, bytes(3, config.packed_max as usize + 1))
        .await
        .unwrap();
    let has_files = |p: &PointId| config.dir.join(p.relative_dir()).exists();
    assert!(!has_files(&small) && !has_files(&grows) && !has_files(&typed));
    assert!(has_files(&large));
    assert_eq!(
        store.open_points(),
        1,
        "only the large point has open files"
    );

    // Read, listed and stat'd where they are.
    assert_eq!(store.read(&small, 0, 4096).await.unwrap(), bytes(1, 4096));
    assert_eq!(
        store.read(&grows, 700, 900).await.unwrap(),
        whole[700..1600]
    );
    let snapshot = store.metadata(&grows).await.unwrap();
    assert_eq!(
        (snapshot.end, snapshot.crc, snapshot.committed),
        (ends[2], crc32c::crc32c(&whole), ends[2])
    );
    assert_eq!(
        store.list("packed/", None, 10),
        [grows.clone(), large, small.clone(), typed.clone()]
    );
    let point = store.point(&grows).await.unwrap();
    let mut pieces = std::pin::pin!(point.clone().pieces(
        store.clone(),
        Span {
            offset: 100,
            stop: Some(ends[2]),
            chunk: 1000,
            follow: false,
        },
        CancellationToken::new(),
    ));
    let mut through_pieces = Vec::new();
    while let Some(piece) = futures::StreamExt::next(&mut pieces).await {
        let piece = piece.unwrap();
        let mut buf = vec![0; piece.len as usize];
        let file = File::from(piece.file().try_clone_to_owned().unwrap());
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, piece.offset).unwrap();
        through_pieces.extend_from_slice(&buf);
    }
    assert_eq!(through_pieces, whole[100..]);
    assert_eq!(
        store.crc_at(&grows, ends[0]).await.unwrap(),
        crc32c::crc32c(&whole[..ends[0] as usize])
    );
    assert!(!has_files(&grows), "reading leaves a point packed");

    // A second append gives it files, its appends' boundaries kept.
    let more = bytes(94, 333);
    store.append(&grows, more.clone()).await.unwrap();
    assert!(has_files(&grows));
    let grown = [whole.as_slice(), &more].concat();
    assert_eq!(
        store.read(&grows, 0, grown.len() as u64).await.unwrap(),
        grown
    );
    assert_eq!(
        store.crc_at(&grows, ends[1]).await.unwrap(),
        crc32c::crc32c(&whole[..ends[1] as usize])
    );
    assert_eq!(store.truncate(&grows, ends[1] + 5).await.unwrap(), ends[1]);
    // So does a change of its `point.meta`.
    let epochs = LeaderEpochs::new(vec![EpochStart { epoch: 3, start: 0 }]).unwrap();
    store
        .set_leader_epochs(&typed, epochs.clone())
        .await
        .unwrap();
    assert!(has_files(&typed));
    assert_eq!(store.read(&typed, 0, 10).await.unwrap(), bytes(2, 10));
    store.close().await.unwrap();

    let store = Store::open(config.clone()).await.unwrap();
    assert_eq!(store.read(&small, 0, 4096).await.unwrap(), bytes(1, 4096));
    assert_eq!(
        store.read(&grows, 0, ends[1]).await.unwrap(),
        whole[..ends[1] as usize]
    );
    assert_eq!(store.leader_epochs(&typed).await.unwrap(), epochs);
    let point = store.point(&small).await.unwrap();
    assert!(
        point.modified(&store).await.is_some(),
        "its last write is in its row"
    );
    assert_eq!(store.delete(&small).await.unwrap(), 4096);
    assert!(matches!(
        store.read(&small, 0, 1).await,
        Err(ReadError::NotFound(_))
    ));
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert!(matches!(
        store.metadata(&small).await,
        Err(ReadError::NotFound(_))
    ));
    assert_eq!(store.len(), 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_crash_finds_packed_points_again_from_their_needles_and_keeps_no_removed_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    let p = |name: &str| id(&format!("crash/{name}"));
    // Before a checkpoint: in the B-tree, covered.
    store.append(&p("early"), bytes(1, 100)).await.unwrap();
    store
        .append(&p("early-removed"), bytes(2, 100))
        .await
        .unwrap();
    store
        .append(&p("early-promoted"), bytes(3, 100))
        .await
        .unwrap();
    let before = touch_logs(dir.path());
    eventually("a checkpoint", || touch_logs(dir.path()) != before).await;
    // After it: only the needles say so.
    let held = [(p("late"), bytes(4, 3000))];
    store.append(&held[0].0, held[0].1.clone()).await.unwrap();
    store
        .append(&p("late-removed"), bytes(5, 100))
        .await
        .unwrap();
    store.delete(&p("late-removed")).await.unwrap();
    store.delete(&p("early-removed")).await.unwrap();
    store.append(&p("late-again"), bytes(6, 100)).await.unwrap();
    store.delete(&p("late-again")).await.unwrap();
    store.append(&p("late-again"), bytes(7, 200)).await.unwrap();
    // Promoted, then removed: its needle must not bring it back.
    store
        .append(&p("late-promoted"), bytes(8, 100))
        .await
        .unwrap();
    store
        .append(&p("late-promoted"), bytes(9, 100))
        .await
        .unwrap();
    store.delete(&p("late-promoted")).await.unwrap();
    store
        .append(&p("early-promoted"), bytes(10, 50))
        .await
        .unwrap();
    let crashed = tempfile::tempdir().unwrap();
    {
        let _held = store.inner.shared.catalogue.hold_checkpoints();
        copy_tree(dir.path(), crashed.path());
    }
    store.close().await.unwrap();
    // A promotion the crash interrupted before its journal was in place: its data file only.
    let interrupted = crashed
        .path()
        .join("points")
        .join(p("early").relative_dir());
    std::fs::create_dir_all(&interrupted).unwrap();
    std::fs::write(interrupted.join(DATA_FILE), bytes(11, 40)).unwrap();

    let mut config = config.clone();
    config.dir = crashed.path().join("points");
    let store = Store::open(config.clone()).await.unwrap();
    assert_eq!(
        store.list("crash/", None, 10),
        [p("early"), p("early-promoted"), p("late"), p("late-again")]
    );
    assert_eq!(
        store.read(&p("early"), 0, 100).await.unwrap(),
        bytes(1, 100)
    );
    assert_eq!(
        store.read(&p("late"), 0, 3000).await.unwrap(),
        bytes(4, 3000)
    );
    assert_eq!(
        store.read(&p("late-again"), 0, 200).await.unwrap(),
        bytes(7, 200)
    );
    let promoted = [bytes(3, 100), bytes(10, 50)].concat();
    assert_eq!(
        store.read(&p("early-promoted"), 0, 150).await.unwrap(),
        promoted
    );
    let late = store.metadata(&p("late")).await.unwrap();
    assert_eq!(
        (late.end, late.crc, late.committed),
        (3000, crc32c::crc32c(&bytes(4, 3000)), 3000)
    );
    // The interrupted promotion runs again, over what it left.
    store.append(&p("early"), bytes(12, 10)).await.unwrap();
    let grown = [bytes(1, 100), bytes(12, 10)].concat();
    assert_eq!(store.read(&p("early"), 0, 110).await.unwrap(), grown);
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert_eq!(store.len(), 4);
    assert_eq!(store.read(&p("early"), 0, 110).await.unwrap(), grown);
    store.close().await.unwrap();
}

#[tokio::test]
// The guard holds checkpoints off while points are written; no append takes it.
#[allow(clippy::await_holding_lock)]
async fn a_needle_torn_by_a_crash_is_cut_and_the_ones_before_it_stay() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    // No checkpoint covers them: only their needles say they exist.
    let held = store.inner.shared.catalogue.hold_checkpoints();
    for i in 0..5 {
        store
            .append(&id(&format!("torn/{i}")), bytes(20 + i, 1000))
            .await
            .unwrap();
    }
    let crashed = tempfile::tempdir().unwrap();
    copy_tree(dir.path(), crashed.path());
    drop(held);
    store.close().await.unwrap();
    // The last needle's write cut short.
    let [(name, len)] = segment_files(crashed.path()).try_into().unwrap();
    let segment = crashed.path().join("segments").join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(len - 300)
        .unwrap();
    let mut config = config.clone();
    config.dir = crashed.path().join("points");
    let store = Store::open(config).await.unwrap();
    let found = store.list("torn/", None, 10);
    assert_eq!(found.len(), 4, "{found:?}");
    for (i, p) in found.iter().enumerate() {
        assert_eq!(
            store.read(p, 0, 1000).await.unwrap(),
            bytes(20 + i as u64, 1000)
        );
    }
    // The next needle is written where the torn one began.
    store
        .append(&id("torn/again"), bytes(26, 10))
        .await
        .unwrap();
    assert_eq!(
        store.read(&id("torn/again"), 0, 10).await.unwrap(),
        bytes(26, 10)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn points_packed_from_many_tasks_through_checkpoints_are_all_found_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    let acknowledged = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let writers: Vec<_> = (0..4)
        .map(|task| {
            let (store, acknowledged, stop) = (store.clone(), acknowledged.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while !stop.is_cancelled() {
                    let p = id(&format!("many/{task}/{n:05}"));
                    store
                        .append(&p, bytes(task * 100_000 + n, 200))
                        .await
                        .unwrap();
                    acknowledged.lock().unwrap().push((p, task * 100_000 + n));
                    n += 1;
                }
            })
        })
        .collect();
    // Through a few checkpoints, then a crash image while the writers go on.
    for _ in 0..3 {
        let before = touch_logs(dir.path());
        eventually("a checkpoint", || touch_logs(dir.path()) != before).await;
    }
    let crashed = tempfile::tempdir().unwrap();
    let acknowledged_before = acknowledged.lock().unwrap().clone();
    {
        let _held = store.inner.shared.catalogue.hold_checkpoints();
        copy_tree(dir.path(), crashed.path());
    }
    stop.cancel();
    for writer in writers {
        writer.await.unwrap();
    }
    store.close().await.unwrap();
    assert!(
        acknowledged_before.len() > 100,
        "{} points",
        acknowledged_before.len()
    );

    let mut config = config.clone();
    config.dir = crashed.path().join("points");
    let store = Store::open(config).await.unwrap();
    for (p, seed) in &acknowledged_before {
        assert_eq!(
            store.read(p, 0, 200).await.unwrap(),
            bytes(*seed, 200),
            "{p}"
        );
    }
    store.close().await.unwrap();
}

#[tokio::test]
async fn quarantine_keeps_the_bytes_of_a_packed_point() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    let (whole, tail) = (id("packed/whole"), id("packed/tail"));
    store.append(&whole, bytes(30, 900)).await.unwrap();
    store.append(&tail, bytes(31, 900)).await.unwrap();
    let kept_in = store.quarantine(&whole, FIRST_EPOCH).await.unwrap();
    assert_eq!(
        std::fs::read(kept_in.join(DATA_FILE)).unwrap(),
        bytes(30, 900)
    );
    assert!(matches!(
        store.metadata(&whole).await,
        Err(ReadError::NotFound(_))
    ));
    let (kept_in, kept) = store.quarantine_tail(&tail, 600).await.unwrap();
    assert_eq!(kept, 300);
    assert_eq!(
        std::fs::read(kept_in.join(DATA_FILE)).unwrap(),
        bytes(31, 900)[600..]
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_clean_stop_leaves_no_needle_to_read_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    for i in 0..3 {
        store
            .append(&id(&format!("clean/{i}")), bytes(40 + i, 500))
            .await
            .unwrap();
    }
    store.close().await.unwrap();
    // Damage in the first needle, which a reading of the segment would find and cut back to.
    let [(name, len)] = segment_files(dir.path()).try_into().unwrap();
    let segment = dir.path().join("segments").join(name);
    let mut damaged = std::fs::read(&segment).unwrap();
    damaged[0] ^= 0xff;
    std::fs::write(&segment, &damaged).unwrap();
    let store = Store::open(config(dir.path())).await.unwrap();
    assert_eq!(
        std::fs::metadata(&segment).unwrap().len(),
        len,
        "the segment was read again"
    );
    assert_eq!(store.len(), 3);
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_mostly_dead_segment_is_compacted_and_its_space_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = Store::open(config.clone()).await.unwrap();
    let name = |i: u64| id(&format!("compact/{i:03}"));
    let size = |i: u64| 2000 + (i as usize * 37) % 1500;
    for i in 0..90 {
        store
            .append(&name(i), bytes(600 + i, size(i)))
            .await
            .unwrap();
    }
    // Points with files of their own, and one promoted, are not the segment's to move.
    store.append(&name(1), bytes(700, 10)).await.unwrap();
    let catalogue = store.inner.shared.catalogue.clone();
    assert_eq!(store.compact().await.unwrap(), None, "nothing dead yet");
    // Two in three removed: the first segment is mostly dead.
    for i in (0..90).filter(|i| i % 3 != 0) {
        store.delete(&name(i)).await.unwrap();
    }
    // The segment written to is compacted only once large; here it is ended by hand.
    catalogue.segments().roll_past(1).unwrap();
    catalogue.checkpoint(false).unwrap();
    let before = segment_files(dir.path());
    assert_eq!(
        before
            .iter()
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>(),
        ["00000001.seg", "00000002.seg"]
    );
    assert_eq!(store.compact().await.unwrap(), Some(1));
    let after = segment_files(dir.path());
    assert_eq!(after.len(), 1, "{after:?}");
    assert!(after[0].1 < before[0].1 / 2, "{after:?} against {before:?}");
    let check = |store: Store| async move {
        for i in (0..90).filter(|i| i % 3 == 0) {
            assert_eq!(
                store.read(&name(i), 0, size(i) as u64).await.unwrap(),
                bytes(600 + i, size(i)),
                "{i}"
            );
        }
        assert_eq!(store.len(), 30);
        store
    };
    let store = check(store).await;
    assert_eq!(store.compact().await.unwrap(), None, "what is left is live");
    store.close().await.unwrap();
    let store = check(Store::open(config).await.unwrap()).await;
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_small_segment_whose_points_were_all_removed_is_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = Store::open(config.clone()).await.unwrap();
    let name = |i: u64| id(&format!("gone/{i:03}"));
    let size = |i: u64| 1000 + (i as usize * 53) % 2000;
    for i in 0..40 {
        store
            .append(&name(i), bytes(900 + i, size(i)))
            .await
            .unwrap();
    }
    let catalogue = store.inner.shared.catalogue.clone();
    catalogue.checkpoint(false).unwrap();
    assert_eq!(store.compact().await.unwrap(), None, "every point is live");
    for i in 0..40 {
        store.delete(&name(i)).await.unwrap();
    }
    // Far below the size at which the segment written to is compacted when mostly dead; once
    // the removals are durable, nothing in it is live.
    catalogue.checkpoint(false).unwrap();
    let before = segment_files(dir.path());
    assert_eq!(before.len(), 1, "{before:?}");
    assert!(before[0].1 > 40_000, "{before:?}");
    assert_eq!(store.compact().await.unwrap(), Some(1));
    let after = segment_files(dir.path());
    assert!(after.iter().all(|(_, len)| *len == 0), "{after:?}");
    // The next segment, empty, is not compacted again and again.
    assert_eq!(store.compact().await.unwrap(), None);
    // New points go on, and everything holds after a restart.
    store.append(&name(50), bytes(950, size(50))).await.unwrap();
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert_eq!(store.len(), 1);
    assert_eq!(
        store.read(&name(50), 0, size(50) as u64).await.unwrap(),
        bytes(950, size(50))
    );
    assert!(matches!(
        store.read(&name(3), 0, 1).await,
        Err(ReadError::NotFound(_))
    ));
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_crash_in_the_middle_of_a_compaction_loses_no_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.fsync = Fsync::Never;
    let store = Store::open(config.clone()).await.unwrap();
    let name = |i: u64| id(&format!("moving/{i:02}"));
    for i in 0..40 {
        store.append(&name(i), bytes(800 + i, 1000)).await.unwrap();
    }
    for i in 0..30 {
        store.delete(&name(i)).await.unwrap();
    }
    let catalogue = store.inner.shared.catalogue.clone();
    catalogue.seal_segment(1).unwrap();
    // Half the live needles moved, nothing checkpointed since: a crash now.
    let needles = catalogue.segments().needles(1).unwrap();
    let mut moved = 0;
    for (id, event) in needles {
        if let segment::Event::Packed { needle, .. } = event
            && moved < 5
            && store.move_needle(&id, needle).await.unwrap()
        {
            moved += 1;
        }
    }
    assert_eq!(moved, 5);
    let crashed = tempfile::tempdir().unwrap();
    {
        let _held = catalogue.hold_checkpoints();
        copy_tree(dir.path(), crashed.path());
    }
    store.close().await.unwrap();
    let mut config = config.clone();
    config.dir = crashed.path().join("points");
    let store = Store::open(config.clone()).await.unwrap();
    for i in 30..40 {
        assert_eq!(
            store.read(&name(i), 0, 1000).await.unwrap(),
            bytes(800 + i, 1000)
        );
    }
    assert_eq!(store.len(), 10);
    // The compaction runs again, whole.
    assert_eq!(store.compact().await.unwrap(), Some(1));
    for i in 30..40 {
        assert_eq!(
            store.read(&name(i), 0, 1000).await.unwrap(),
            bytes(800 + i, 1000)
        );
    }
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert_eq!(store.len(), 10);
    assert_eq!(
        store.read(&name(35), 0, 1000).await.unwrap(),
        bytes(835, 1000)
    );
    store.close().await.unwrap();
}

#[tokio::test]
async fn a_point_removed_while_its_needle_moves_stays_removed() {
    // Found by `bench points`: a compaction moving a needle wrote the point's row again after
    // a removal had taken it away, and the removed point came back in listings.
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let store = Store::open(config.clone()).await.unwrap();
    let p = id("moving/removed");
    store.append(&p, bytes(900, 1000)).await.unwrap();
    let point = store.get(&p).unwrap();
    let held = point.state.lock().await;
    let needle = held.packed.expect("a small point is packed");
    // The move asks for the point's lock first, the removal second; both wait on it.
    let mut moving = std::pin::pin!(store.move_needle(&p, needle));
    assert!(futures::poll!(&mut moving).is_pending());
    let mut removing = std::pin::pin!(store.delete(&p));
    assert!(futures::poll!(&mut removing).is_pending());
    drop(held);
    let (moved, removed) = tokio::join!(moving, removing);
    assert!(moved.unwrap(), "the needle moved before the removal");
    assert_eq!(removed.unwrap(), 1000);
    assert!(matches!(
        store.metadata(&p).await,
        Err(ReadError::NotFound(_))
    ));
    assert!(
        store.list("moving/", None, 10).is_empty(),
        "listed after removal"
    );
    drop(point);
    store.close().await.unwrap();
    let store = Store::open(config).await.unwrap();
    assert!(
        store.list("moving/", None, 10).is_empty(),
        "back after a restart"
    );
    store.close().await.unwrap();
}
