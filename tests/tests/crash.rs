//! Crash safety: a `goutube run` process is killed with SIGKILL at random moments while a client
//! produces with `fsync = "always"`. After every restart, every acknowledged byte is present and
//! intact, no unacknowledged frame is half-visible, and the node's running CRC matches the bytes.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use goutube::proto::streaming_client::StreamingClient;
use goutube_tests::{
    NodeProcess, consume, data, metadata, produce, raw_client, window, write_config,
};
use rand::{Rng, SeedableRng};
use tonic::transport::Channel;

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

/// What a worker of the packed-points test asks the node.
#[derive(Debug, Clone)]
enum Op {
    Create(String, Vec<u8>),
    Append(String, Vec<u8>),
    Delete(String),
}

/// What the packed-points test knows the node holds: each point acknowledged with its bytes,
/// the points whose removal was acknowledged, and what was in flight when the node died.
#[derive(Default)]
struct Known {
    points: std::collections::BTreeMap<String, Vec<u8>>,
    deleted: std::collections::BTreeSet<String>,
    in_flight: Vec<Op>,
}

/// Small points packed into segments (`storage.packed_max`, `docs/storage.md`): two streams
/// create points, grow some (which gives them files of their own) and delete some, while the
/// node is killed at random moments, under `fsync = "never"` and `"always"` in turn. After every
/// restart each acknowledged point reads back exactly, each acknowledged removal stays removed,
/// and what was in flight is there whole or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_small_points_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    // The same data directory, restarted with each policy in turn.
    let config = |fsync: &str| {
        write_config(
            dir.path(),
            &format!("[storage]\nfsync = \"{fsync}\"\npacked_max = 65536\n"),
        )
    };
    let seed: u64 = rand::rng().random();
    eprintln!("packed crash test seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let known = Arc::new(Mutex::new(Known::default()));
    const PACKED_KILLS: usize = 8;
    for kill in 0..=PACKED_KILLS {
        let node = NodeProcess::spawn(&config(["never", "always"][kill % 2]));
        let mut client = raw_client(&node.rpc).await;
        check_known(&mut client, &known, kill).await;
        if kill == PACKED_KILLS {
            node.kill();
            break;
        }
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                let known = known.clone();
                let mut rng = rand::rngs::StdRng::seed_from_u64(rng.random());
                let addr = node.rpc.clone();
                tokio::spawn(async move {
                    let mut client = raw_client(&addr).await;
                    let mut n = 0u64;
                    loop {
                        let mine: Vec<String> = known
                            .lock()
                            .unwrap()
                            .points
                            .keys()
                            .filter(|name| name.starts_with(&format!("w{worker}/")))
                            .cloned()
                            .collect();
                        let choice = rng.random_range(0..100);
                        let op = match (choice, mine.is_empty()) {
                            (0..70, _) | (_, true) => {
                                n += 1;
                                let name = format!("w{worker}/{kill}-{n}");
                                let len = rng.random_range(1..20_000);
                                Op::Create(name, data(rng.random(), len))
                            }
                            (70..85, false) => {
                                let name = mine[rng.random_range(0..mine.len())].clone();
                                Op::Append(name, data(rng.random(), rng.random_range(1..5_000)))
                            }
                            _ => Op::Delete(mine[rng.random_range(0..mine.len())].clone()),
                        };
                        known.lock().unwrap().in_flight.push(op.clone());
                        let done = match &op {
                            Op::Create(name, bytes) | Op::Append(name, bytes) => {
                                produce(&mut client, name, std::slice::from_ref(bytes))
                                    .await
                                    .map(drop)
                            }
                            Op::Delete(name) => client
                                .delete_point(goutube::proto::DeletePointRequest {
                                    point: name.clone(),
                                })
                                .await
                                .map(drop),
                        };
                        if done.is_err() {
                            return;
                        }
                        let mut known = known.lock().unwrap();
                        known.in_flight.retain(|other| !same_op(other, &op));
                        match op {
                            Op::Create(name, bytes) => {
                                known.points.insert(name, bytes);
                            }
                            Op::Append(name, bytes) => {
                                known
                                    .points
                                    .get_mut(&name)
                                    .unwrap()
                                    .extend_from_slice(&bytes);
                            }
                            Op::Delete(name) => {
                                known.points.remove(&name);
                                known.deleted.insert(name);
                            }
                        }
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..400))).await;
        node.kill();
        for worker in workers {
            worker.await.unwrap();
        }
    }
    let known = known.lock().unwrap();
    eprintln!(
        "{} points held and {} removed across {PACKED_KILLS} kills",
        known.points.len(),
        known.deleted.len()
    );
    assert!(
        known.points.len() + known.deleted.len() > 50,
        "too few writes were acknowledged to test anything"
    );
    // They were packed: the segments hold their needles.
    let packed: u64 = std::fs::read_dir(dir.path().join("data").join("segments"))
        .unwrap()
        .map(|segment| segment.unwrap().metadata().unwrap().len())
        .sum();
    assert!(packed > 1024 * 1024, "{packed} bytes in segments");
}

fn same_op(a: &Op, b: &Op) -> bool {
    match (a, b) {
        (Op::Create(x, _), Op::Create(y, _))
        | (Op::Append(x, _), Op::Append(y, _))
        | (Op::Delete(x), Op::Delete(y)) => x == y,
        _ => false,
    }
}

/// Checks what the node holds against `known`, then settles what was in flight as the node
/// has it.
async fn check_known(client: &mut StreamingClient<Channel>, known: &Mutex<Known>, kill: usize) {
    let (points, deleted, in_flight) = {
        let known = known.lock().unwrap();
        (
            known.points.clone(),
            known.deleted.clone(),
            known.in_flight.clone(),
        )
    };
    let read = |client: &mut StreamingClient<Channel>, name: String| {
        let mut client = client.clone();
        async move {
            match consume(&mut client, window(&name, 0, 0, 0)).await {
                Ok(frames) => Some(frames.concat()),
                Err(status) if status.code() == tonic::Code::NotFound => None,
                Err(status) => panic!("kill {kill}: {name}: {status:?}"),
            }
        }
    };
    let mut settled = points.clone();
    for (name, bytes) in &points {
        let got = read(client, name.clone()).await;
        let appended = in_flight.iter().find_map(|op| match op {
            Op::Append(other, more) if other == name => Some([bytes.as_slice(), more].concat()),
            _ => None,
        });
        let removing = in_flight
            .iter()
            .any(|op| matches!(op, Op::Delete(other) if other == name));
        match got {
            Some(got) if got == *bytes => {}
            Some(got) if Some(&got) == appended.as_ref() => {
                settled.insert(name.clone(), got);
            }
            None if removing => {
                settled.remove(name);
            }
            got => panic!(
                "kill {kill}: {name} holds {:?} bytes, acknowledged {}",
                got.map(|got| got.len()),
                bytes.len()
            ),
        }
    }
    for name in &deleted {
        let recreated = settled.contains_key(name);
        if !recreated {
            assert_eq!(
                read(client, name.clone()).await,
                None,
                "kill {kill}: {name} came back"
            );
        }
    }
    for op in &in_flight {
        if let Op::Create(name, bytes) = op {
            // Not acknowledged: there whole, or not at all.
            if let Some(got) = read(client, name.clone()).await {
                assert_eq!(got, *bytes, "kill {kill}: {name} is not what was sent");
                settled.insert(name.clone(), got);
            }
        }
    }
    let mut known = known.lock().unwrap();
    known.deleted.extend(
        points
            .keys()
            .filter(|name| !settled.contains_key(*name))
            .cloned(),
    );
    known.points = settled;
    known.in_flight.clear();
}
