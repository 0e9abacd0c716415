//! A disk that fills up under a node (a small filesystem of its own): a write that finds no
//! space gets `ResourceExhausted` and leaves nothing of itself, no acknowledged byte is lost, the
//! node goes on serving reads, and once space returns the same points and new ones take writes
//! again, before and after a restart.

use goutube::proto::{ListPointsRequest, MetadataResponse};
use goutube_tests::{
    SmallDisk, consume, data, eventually_some, metadata, produce, start_in, window,
};
use tonic::Code;

const KIB: usize = 1024;

async fn read_all(
    client: &mut goutube::proto::streaming_client::StreamingClient<tonic::transport::Channel>,
    point: &str,
) -> Vec<u8> {
    consume(client, window(point, 0, 0, 64 * KIB as u64))
        .await
        .unwrap_or_else(|status| panic!("reading {point}: {status}"))
        .concat()
}

async fn listed(
    client: &mut goutube::proto::streaming_client::StreamingClient<tonic::transport::Channel>,
) -> Vec<String> {
    client
        .list_points(ListPointsRequest::default())
        .await
        .expect("listing")
        .into_inner()
        .points
}

#[tokio::test]
async fn a_full_disk_refuses_new_writes_keeps_every_acknowledged_byte_and_recovers() {
    let disk = SmallDisk::mount(24 * 1024 * 1024);
    let dir = disk.path().join("node");
    let node = start_in(&dir, |_| {}).await;
    let mut client = goutube_tests::raw_client(&node.rpc_addr().to_string()).await;

    // Before: a point at rest and one being written.
    let kept = data(1, 300 * KIB + 7);
    produce(&mut client, "videos/kept", std::slice::from_ref(&kept))
        .await
        .unwrap();
    let mut growing = Vec::new();
    for seed in 0..4 {
        let frame = data(10 + seed, 200 * KIB + seed as usize);
        produce(&mut client, "videos/growing", std::slice::from_ref(&frame))
            .await
            .unwrap();
        growing.extend_from_slice(&frame);
    }

    // The disk fills up (another program took the space).
    let ballast = disk.fill("ballast");
    assert!(ballast > 8 * 1024 * 1024, "{ballast} bytes of ballast");
    // Appends that find no space are refused, whole: nothing is acknowledged, nothing kept.
    let mut refused = 0;
    for seed in 0..8 {
        let frame = data(100 + seed, 96 * KIB + seed as usize);
        match produce(&mut client, "videos/growing", std::slice::from_ref(&frame)).await {
            Ok(_) => growing.extend_from_slice(&frame),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 7,
        "{refused} of 8 appends refused on a full disk"
    );
    // A new point cannot be made either, and none is left half made.
    let status = produce(&mut client, "videos/new", &[data(200, 50 * KIB)])
        .await
        .expect_err("a new point on a full disk");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
    assert_eq!(listed(&mut client).await, ["videos/growing", "videos/kept"]);
    assert_eq!(
        metadata(&mut client, "videos/new")
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );

    // Reads go on, exactly what was acknowledged.
    assert_eq!(read_all(&mut client, "videos/kept").await, kept);
    assert_eq!(read_all(&mut client, "videos/growing").await, growing);
    let MetadataResponse { size, .. } = metadata(&mut client, "videos/growing").await.unwrap();
    assert_eq!(size, growing.len() as u64);

    // Space returns: the same point and a new one take writes again, with no restart.
    std::fs::remove_file(disk.path().join("ballast")).unwrap();
    let after = data(300, 150 * KIB + 3);
    eventually_some("the point takes writes again", || {
        let (mut client, after) = (client.clone(), after.clone());
        async move { produce(&mut client, "videos/growing", &[after]).await.ok() }
    })
    .await;
    growing.extend_from_slice(&after);
    let new = data(400, 70 * KIB + 1);
    produce(&mut client, "videos/new", std::slice::from_ref(&new))
        .await
        .unwrap();
    assert_eq!(read_all(&mut client, "videos/growing").await, growing);
    assert_eq!(read_all(&mut client, "videos/new").await, new);

    // And after a restart, every acknowledged byte is there, and nothing else.
    node.shutdown().await.expect("clean shutdown");
    let node = start_in(&dir, |_| {}).await;
    let mut client = goutube_tests::raw_client(&node.rpc_addr().to_string()).await;
    assert_eq!(
        listed(&mut client).await,
        ["videos/growing", "videos/kept", "videos/new"]
    );
    assert_eq!(read_all(&mut client, "videos/kept").await, kept);
    assert_eq!(read_all(&mut client, "videos/growing").await, growing);
    assert_eq!(read_all(&mut client, "videos/new").await, new);
    node.shutdown().await.expect("clean shutdown");
}

/// The same with small points packed into a segment (`storage.packed_max`): a new point the
/// full disk refuses leaves nothing in the segment, the packed points read on, and once space
/// returns new ones are packed after them, before and after a restart.
#[tokio::test]
async fn a_full_disk_refuses_new_packed_points_and_keeps_the_packed_ones() {
    let disk = SmallDisk::mount(24 * 1024 * 1024);
    let dir = disk.path().join("node");
    let packed = |config: &mut goutube::config::Config| config.storage.packed_max = 64 * KIB as u64;
    let node = start_in(&dir, packed).await;
    let mut client = goutube_tests::raw_client(&node.rpc_addr().to_string()).await;
    let name = |i: u64| format!("small/{i:03}");
    let mut kept = Vec::new();
    for i in 0..20 {
        let bytes = data(500 + i, (i as usize * 3001) % (60 * KIB) + 1);
        produce(&mut client, &name(i), std::slice::from_ref(&bytes))
            .await
            .unwrap();
        kept.push((name(i), bytes));
    }
    let segments = dir.join("segments");
    assert!(segments.exists(), "the points were packed");

    let ballast = disk.fill("ballast");
    assert!(ballast > 8 * 1024 * 1024, "{ballast} bytes of ballast");
    let mut refused = 0;
    for i in 20..28 {
        let bytes = data(500 + i, 40 * KIB + i as usize);
        match produce(&mut client, &name(i), std::slice::from_ref(&bytes)).await {
            Ok(_) => kept.push((name(i), bytes)),
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
                refused += 1;
            }
        }
    }
    assert!(
        refused >= 7,
        "{refused} of 8 new points refused on a full disk"
    );
    let names: Vec<String> = kept.iter().map(|(name, _)| name.clone()).collect();
    assert_eq!(listed(&mut client).await, names);
    for (name, bytes) in &kept {
        assert_eq!(read_all(&mut client, name).await, *bytes);
    }

    std::fs::remove_file(disk.path().join("ballast")).unwrap();
    let after = data(900, 30 * KIB);
    eventually_some("a new point is packed again", || {
        let (mut client, after) = (client.clone(), after.clone());
        async move { produce(&mut client, "small/after", &[after]).await.ok() }
    })
    .await;
    kept.push(("small/after".into(), after));
    node.shutdown().await.expect("clean shutdown");
    let node = start_in(&dir, packed).await;
    let mut client = goutube_tests::raw_client(&node.rpc_addr().to_string()).await;
    let names: Vec<String> = kept.iter().map(|(name, _)| name.clone()).collect();
    assert_eq!(listed(&mut client).await, names);
    for (name, bytes) in &kept {
        assert_eq!(read_all(&mut client, name).await, *bytes);
    }
    node.shutdown().await.expect("clean shutdown");
}
