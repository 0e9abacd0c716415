//! A connected follower receives new appends from the bytes the leader's clients sent, not from
//! reads of the point. Its own test binary: it reads the process-wide replication metrics, which
//! other replication tests running alongside would move.

use goutube::metrics::{REPLICATED_BYTES, REPLICATION_READ_BACK};
use goutube_tests::{
    consume, data, eventually, leader_and_follower, metadata, metric, produce, window,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_keeps_up_is_sent_the_produced_bytes_without_a_read_back() {
    let (leader, follower) = leader_and_follower().await;

    // 8 MiB in frames of different sizes, within what a replicator keeps for its follower.
    let frames: Vec<Vec<u8>> = (0..32)
        .map(|i| data(i, 200_000 + 7_919 * i as usize))
        .collect();
    let total: u64 = frames.iter().map(|f| f.len() as u64).sum();
    let mut to_leader = leader.client().await;
    for frame in &frames {
        produce(&mut to_leader, "live", std::slice::from_ref(frame))
            .await
            .unwrap();
    }
    let mut to_follower = follower.client().await;
    eventually("the follower to hold every byte", || {
        let mut to_follower = to_follower.clone();
        async move {
            metadata(&mut to_follower, "live")
                .await
                .is_ok_and(|m| m.size == total)
        }
    })
    .await;
    let got = consume(&mut to_follower, window("live", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(got.concat(), frames.concat());

    let scrape = goutube::metrics::handle().render();
    let sent = metric(&scrape, REPLICATED_BYTES).unwrap_or(0.0);
    assert!(sent >= total as f64, "replicated {sent} of {total} bytes");
    assert_eq!(metric(&scrape, REPLICATION_READ_BACK).unwrap_or(0.0), 0.0);
    follower.shutdown().await;
    leader.shutdown().await;
}
