//! Journal recovery against truncated and corrupted files: a real node is stopped, its files are
//! damaged the way a crash (or a disk) would damage them, and the restarted node serves exactly the
//! last complete, checksum-valid append of each point, keeps accepting appends, and keeps serving
//! the points that were not damaged.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use goutube::point::PointId;
use goutube::point::journal::{HEADER_LEN, RECORD_LEN};
use goutube_tests::{TestNode, consume, data, metadata, produce, window};
use tonic::Code;

fn frames(seed: u64) -> Vec<Vec<u8>> {
    (0..5)
        .map(|i| data(seed * 10 + i, 1000 + i as usize * 111))
        .collect()
}

fn point_dir(node_dir: &Path, id: &str) -> PathBuf {
    node_dir
        .join("points")
        .join(PointId::new(id).unwrap().relative_dir())
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}

fn truncate(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

fn flip_byte(path: &Path, offset: u64) {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x5A], offset).unwrap();
}

/// Drops the sync marker a clean shutdown wrote, as if the node had crashed before closing.
fn drop_marker(dir: &Path) {
    let journal = dir.join("point.journal");
    let len = file_len(&journal);
    assert_eq!((len - HEADER_LEN) % RECORD_LEN, 0);
    assert_eq!(
        (len - HEADER_LEN) / RECORD_LEN,
        6,
        "five appends and a marker"
    );
    truncate(&journal, len - RECORD_LEN);
}

#[tokio::test]
async fn damaged_points_recover_to_their_last_valid_append() {
    // fsync = never: no record is known durable, so recovery verifies every append. Each
    // point in files of its own (packed_max = 0), which this test damages; a damaged needle of
    // a packed point is `point::segment`'s and `point::tests`' to test.
    let node = TestNode::start(|c| {
        c.storage.fsync = goutube::point::Fsync::Never;
        c.storage.packed_max = 0;
    })
    .await;
    let mut client = node.client().await;
    let names = [
        "intact-no-marker",
        "torn-journal",
        "flipped-record",
        "short-data",
        "flipped-data",
        "garbage-tail",
        "bad-header",
        "untouched",
    ];
    for (seed, name) in names.iter().enumerate() {
        produce(&mut client, name, &frames(seed as u64))
            .await
            .unwrap();
    }
    let TestNode { node, dir } = node;
    node.shutdown().await.unwrap();
    let root = dir.path();
    let prefix_end = |seed: u64, n: usize| {
        frames(seed)[..n]
            .iter()
            .map(|f| f.len() as u64)
            .sum::<u64>()
    };

    for name in &names[..6] {
        drop_marker(&point_dir(root, name));
    }
    let torn = point_dir(root, "torn-journal").join("point.journal");
    truncate(&torn, file_len(&torn) - 10);
    let record = point_dir(root, "flipped-record").join("point.journal");
    flip_byte(&record, file_len(&record) - RECORD_LEN + 3);
    let short = point_dir(root, "short-data").join("point.data");
    truncate(&short, prefix_end(3, 4) + 50);
    let flipped = point_dir(root, "flipped-data").join("point.data");
    flip_byte(&flipped, prefix_end(4, 3) + 7);
    for file in ["point.data", "point.journal"] {
        let path = point_dir(root, "garbage-tail").join(file);
        let end = file_len(&path);
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&data(777, 100), end).unwrap();
    }
    let header = point_dir(root, "bad-header").join("point.journal");
    flip_byte(&header, 0);

    let node = goutube_tests::start_in(root, |_| {}).await;
    let mut client = goutube_tests::raw_client(&node.rpc_addr().to_string()).await;
    let expected = [
        ("intact-no-marker", 0, 5),
        ("torn-journal", 1, 4),
        ("flipped-record", 2, 4),
        ("short-data", 3, 4),
        ("flipped-data", 4, 3),
        ("garbage-tail", 5, 5),
        ("untouched", 7, 5),
    ];
    for (name, seed, kept) in expected {
        let want = frames(seed)[..kept].concat();
        let got = consume(&mut client, window(name, 0, 0, 0))
            .await
            .unwrap()
            .concat();
        assert_eq!(got, want, "{name}");
        let meta = metadata(&mut client, name).await.unwrap();
        assert_eq!(
            (meta.size, meta.crc32c),
            (want.len() as u64, crc32c::crc32c(&want)),
            "{name}"
        );
        // The point continues from where it recovered.
        let more = data(seed * 1000, 321);
        let response = produce(&mut client, name, std::slice::from_ref(&more))
            .await
            .unwrap();
        assert_eq!(response.records[0].offset, want.len() as u64, "{name}");
        let got = consume(&mut client, window(name, want.len() as u64, 0, 0))
            .await
            .unwrap()
            .concat();
        assert_eq!(got, more, "{name}");
    }
    // A journal that is not ours is refused loudly, not wiped; the node keeps serving.
    let status = consume(&mut client, window("bad-header", 0, 0, 0))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(status.message().contains("journal"), "{}", status.message());
    let got = consume(&mut client, window("untouched", 0, 0, 0))
        .await
        .unwrap();
    assert!(!got.is_empty());
    node.shutdown().await.unwrap();
    drop(dir);
}
