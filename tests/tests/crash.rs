//! Crash safety: a `goutube run` process is killed with SIGKILL at random moments while a client
//! produces with `fsync = "always"`. After every restart, every acknowledged byte is present and
//! intact, no unacknowledged frame is half-visible, and the node's running CRC matches the bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use goutube_tests::{
    NodeProcess, consume, data, metadata, produce, raw_client, window, write_config,
};
use rand::{Rng, SeedableRng};

const KILLS: usize = 24;

/// Frames are numbered; frame `n` is `data(n, len(n))`.
fn frame(n: u64) -> Vec<u8> {
    let len = 1 + (n * 7919 % 60_000) as usize;
    data(n, len)
}

#[derive(Default)]
struct Progress {
    /// Frames acknowledged by a ProduceStream response, in order.
    acked: u64,
    /// Frames sent in the stream that was open when the node died.
    in_flight: Vec<u64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "[storage]\nfsync = \"always\"\n");
    let seed: u64 = rand::rng().random();
    eprintln!("crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    // Frames whose bytes are on the node, all of them (acknowledged or found after a restart).
    let mut present: u64 = 0;
    for kill in 0..=KILLS {
        let node = NodeProcess::spawn(&config);
        let mut client = raw_client(&node.rpc).await;

        // Everything acknowledged before the last kill is there, byte for byte; beyond it, only
        // whole frames of the stream that was in flight, in order.
        let got = match consume(&mut client, window("crash", 0, 0, 0)).await {
            Ok(frames) => frames.concat(),
            // Nothing was ever acknowledged: the point may not exist yet.
            Err(status) if status.code() == tonic::Code::NotFound && present == 0 => Vec::new(),
            Err(status) => panic!("kill {kill}: {status:?}"),
        };
        let acked: Vec<u8> = (0..present).flat_map(frame).collect();
        assert!(
            got.len() >= acked.len(),
            "kill {kill}: lost acknowledged bytes ({} < {})",
            got.len(),
            acked.len()
        );
        assert_eq!(
            got[..acked.len()],
            acked[..],
            "kill {kill}: acknowledged bytes changed"
        );
        let mut extra = got.len() - acked.len();
        let mut next = present;
        while extra > 0 {
            let f = frame(next);
            assert!(extra >= f.len(), "kill {kill}: a frame is half-visible");
            let at = got.len() - extra;
            assert_eq!(
                got[at..at + f.len()],
                f[..],
                "kill {kill}: unacknowledged bytes are not the sent frame"
            );
            extra -= f.len();
            next += 1;
        }
        present = next;
        if present > 0 {
            let meta = metadata(&mut client, "crash").await.unwrap();
            assert_eq!(meta.size, got.len() as u64);
            assert_eq!(
                meta.crc32c,
                crc32c::crc32c(&got),
                "kill {kill}: running CRC"
            );
        }
        if kill == KILLS {
            node.kill();
            break;
        }

        // Produce short streams until the node is killed at a random moment.
        let progress = Arc::new(Mutex::new(Progress {
            acked: present,
            in_flight: Vec::new(),
        }));
        let producer = tokio::spawn({
            let progress = progress.clone();
            let mut rng = rand::rngs::StdRng::seed_from_u64(rng.random());
            async move {
                loop {
                    let first = progress.lock().unwrap().acked;
                    let count = rng.random_range(1..=4);
                    let numbers: Vec<u64> = (first..first + count).collect();
                    progress.lock().unwrap().in_flight = numbers.clone();
                    let frames: Vec<Vec<u8>> = numbers.iter().map(|&n| frame(n)).collect();
                    if produce(&mut client, "crash", &frames).await.is_err() {
                        return;
                    }
                    let mut progress = progress.lock().unwrap();
                    progress.acked = first + count;
                    progress.in_flight.clear();
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..120))).await;
        node.kill();
        producer.await.unwrap();
        let progress = progress.lock().unwrap();
        assert!(progress.acked >= present);
        present = progress.acked;
    }
    eprintln!("{present} frames written across {KILLS} kills");
    assert!(
        present > KILLS as u64,
        "too few writes were acknowledged to test anything"
    );
}
