//! What the benchmarks send and how: frame pools, produce and consume loops, scratch writes
//! (the disk's own ceiling), and the raw TCP copies that measure the machine's ceiling.

use std::path::Path;
use std::time::Instant;

use anyhow::bail;
use bytes::Bytes;
use rand::RngCore;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use goutube::client::Client;
use goutube::proto::{ConsumeRequest, ProduceRequest};

/// Writes into most of the machine's available memory once. On a virtual machine the first touch
/// of a page costs far more than a copy (10 GiB took 26 s on this machine kind, 0.4 GB/s), and
/// the page cache a measured write fills (a follower's copy, a download) would pay it on
/// whichever measurement comes first; after this, measurements find memory the hypervisor
/// backs, as a long-running node does. This machine kind hands freed memory back to its host,
/// so the effect wears off (docs/benchmarks.md): benchmarks warm once, at their start.
pub(super) fn warm_memory() -> anyhow::Result<()> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let available_kib: u64 = meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let size = (available_kib * 1024).saturating_sub(4 << 30).min(16 << 30);
    let started = Instant::now();
    let touched = vec![0xa5u8; size as usize];
    std::hint::black_box(&touched);
    drop(touched);
    println!(
        "warmed {:.1} GiB of memory in {:.1} s",
        size as f64 / (1u64 << 30) as f64,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// What stands between the sender and the receiver of a raw copy.
#[derive(Clone, Copy)]
pub(super) enum Relay<'a> {
    /// Nothing: one loopback connection.
    None,
    /// A thread of its own that reads the bytes from one connection and writes them to another
    /// (1 MiB at a time, nothing parsed): the least a relay can cost, the ceiling of a
    /// balancer's relay on the same machine.
    Forward,
    /// The same thread also writes what it reads into a new file here (removed afterwards)
    /// before forwarding it: the least a leader that waits for its follower can cost.
    WriteAndForward(&'a Path),
}

/// Seconds to send `frames` frames from `pool` through `relay` over loopback TCP. With `sink`,
/// the receiver also writes what it reads to a new file there (deleted afterwards), as a follower
/// must.
pub(super) async fn raw_tcp_copy(
    pool: &[Bytes],
    frames: u64,
    sink: Option<&Path>,
    relay: Relay<'_>,
) -> anyhow::Result<f64> {
    use tokio::io::AsyncWriteExt;
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let mut addr = listener.local_addr()?;
    let total = frames * pool[0].len() as u64;
    let relayed = match relay {
        Relay::None => None,
        Relay::Forward | Relay::WriteAndForward(_) => {
            let front = std::net::TcpListener::bind("127.0.0.1:0")?;
            let to = addr;
            addr = front.local_addr()?;
            let copy = match relay {
                Relay::WriteAndForward(dir) => Some(tempfile::NamedTempFile::new_in(dir)?),
                _ => None,
            };
            Some(std::thread::spawn(move || {
                let (mut from, _) = front.accept()?;
                let mut onward = std::net::TcpStream::connect(to)?;
                let mut buffer = vec![0u8; 1024 * 1024];
                pass_on(
                    &mut from,
                    &mut buffer,
                    u64::MAX,
                    copy.as_ref(),
                    Some(&mut onward),
                )
            }))
        }
    };
    // Removed when the receiver drops it, inside the timed copy.
    let file = sink.map(tempfile::NamedTempFile::new_in).transpose()?;
    let receiver = std::thread::spawn(move || {
        let (mut socket, _) = listener.accept()?;
        let mut buffer = vec![0u8; 256 * 1024];
        let received = pass_on(&mut socket, &mut buffer, total, file.as_ref(), None)?;
        drop(file);
        Ok::<_, std::io::Error>(received)
    });
    let started = Instant::now();
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    for i in 0..frames as usize {
        socket.write_all(&pool[i % pool.len()]).await?;
    }
    socket.flush().await?;
    drop(socket);
    let received = tokio::task::spawn_blocking(move || receiver.join())
        .await?
        .map_err(|_| anyhow::anyhow!("the raw copy's receiver panicked"))??;
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(relay) = relayed {
        tokio::task::spawn_blocking(move || relay.join())
            .await?
            .map_err(|_| anyhow::anyhow!("the raw copy's relay panicked"))??;
    }
    if received != total {
        bail!("the raw copy received {received} of {total} bytes");
    }
    Ok(elapsed)
}

/// Reads `socket` until its end or `limit` bytes, writing what it reads into `copy` and on to
/// `onward` when given. Returns the bytes read.
pub(super) fn pass_on(
    socket: &mut std::net::TcpStream,
    buffer: &mut [u8],
    limit: u64,
    copy: Option<&tempfile::NamedTempFile>,
    mut onward: Option<&mut std::net::TcpStream>,
) -> std::io::Result<u64> {
    use std::io::{Read, Write};
    use std::os::unix::fs::FileExt;
    let mut read = 0u64;
    while read < limit {
        let n = socket.read(buffer)?;
        if n == 0 {
            break;
        }
        if let Some(copy) = copy {
            copy.as_file().write_all_at(&buffer[..n], read)?;
        }
        if let Some(onward) = onward.as_mut() {
            onward.write_all(&buffer[..n])?;
        }
        read += n as u64;
    }
    Ok(read)
}

/// What a throughput benchmark sends: `frames` frames, `total` bytes, cycled from `pool`.
pub(super) struct Workload {
    pub(super) total: u64,
    pub(super) frames: u64,
    pub(super) pool: Vec<Bytes>,
}

impl Workload {
    pub(super) fn new(mib: u64, frame: usize) -> Self {
        let total = mib * 1024 * 1024;
        Self {
            total,
            frames: total / frame as u64,
            pool: frame_pool(frame),
        }
    }
}

/// 64 different random frames, cycled through: the node cannot dedupe or compress them.
pub(super) fn frame_pool(frame: usize) -> Vec<Bytes> {
    (0..64)
        .map(|_| {
            let mut bytes = vec![0u8; frame];
            rand::rng().fill_bytes(&mut bytes);
            Bytes::from(bytes)
        })
        .collect()
}

/// The `[storage]` section of a benchmark node.
pub(super) fn storage(fsync: &str) -> String {
    format!("[storage]\nfsync = \"{fsync}\"\n")
}

/// Seconds to produce `frames` frames from `pool` to `point` in one stream.
pub(super) async fn produce(
    client: &Client,
    point: &str,
    pool: &[Bytes],
    frames: u64,
) -> anyhow::Result<f64> {
    produce_frames(client, point, pool, frames, false).await
}

/// [`produce`], each frame with its `expected_offset` when `at` is set (as `goutube put` sends).
pub(super) async fn produce_frames(
    client: &Client,
    point: &str,
    pool: &[Bytes],
    frames: u64,
    at: bool,
) -> anyhow::Result<f64> {
    let (tx, rx) = mpsc::channel(8);
    let expected = frames * pool[0].len() as u64;
    let pool = pool.to_vec();
    let point = point.to_owned();
    let started = Instant::now();
    let feeder = tokio::spawn(async move {
        let mut offset = 0;
        for i in 0..frames as usize {
            let frame = pool[i % pool.len()].clone();
            let request = ProduceRequest {
                point: point.clone(),
                expected_offset: at.then_some(offset),
                frame,
                ..Default::default()
            };
            offset += request.frame.len() as u64;
            if tx.send(request).await.is_err() {
                return;
            }
        }
    });
    let response = client.raw().produce_stream(ReceiverStream::new(rx)).await?;
    let elapsed = started.elapsed().as_secs_f64();
    feeder.await?;
    let end = response.into_inner().records.first().map_or(0, |r| r.end);
    if end < expected {
        bail!("produce ended at {end}, expected at least {expected}");
    }
    Ok(elapsed)
}

/// Seconds to write `frames` frames from `pool` to a new file in `dir` with `pwrite` (then
/// deleted): the warm-up that recycles page-cache pages, and the cold-memory measurement.
pub(super) fn disk_write(dir: &Path, pool: &[Bytes], frames: u64) -> anyhow::Result<f64> {
    write_scratch(dir, pool, frames, false)
}

/// The same as [`disk_write`], timed until `fdatasync` returns: the file system's own rate for
/// a durable file.
pub(super) fn durable_write(dir: &Path, pool: &[Bytes], frames: u64) -> anyhow::Result<f64> {
    write_scratch(dir, pool, frames, true)
}

/// Syncs per second the file system in `dir` takes from `at_once` threads, each rewriting 4 KiB
/// in place in a file of its own and syncing it (`fdatasync`), for `lasting`: the ceiling of
/// anything that waits for syncs one after another, `at_once` at a time (the records of moves).
pub(super) fn synced_rewrites(
    dir: &Path,
    at_once: usize,
    lasting: std::time::Duration,
) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let started = Instant::now();
    let counts = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..at_once)
            .map(|i| {
                scope.spawn(move || -> anyhow::Result<u64> {
                    let path = dir.join(format!("bench-sync-{i}"));
                    let file = std::fs::File::create(&path)?;
                    let mut page = [0u8; 4096];
                    let mut count = 0u64;
                    while started.elapsed() < lasting {
                        page[..8].copy_from_slice(&count.to_le_bytes());
                        file.write_all_at(&page, 0)?;
                        file.sync_data()?;
                        count += 1;
                    }
                    std::fs::remove_file(&path)?;
                    Ok(count)
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|thread| thread.join().expect("a sync thread panicked"))
            .collect::<anyhow::Result<Vec<u64>>>()
    })?;
    Ok(counts.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64())
}

pub(super) fn write_scratch(
    dir: &Path,
    pool: &[Bytes],
    frames: u64,
    synced: bool,
) -> anyhow::Result<f64> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(dir)?;
    let path = dir.join("bench-scratch");
    let file = std::fs::File::create(&path)?;
    let started = Instant::now();
    let mut offset = 0;
    for i in 0..frames as usize {
        let frame = &pool[i % pool.len()];
        file.write_all_at(frame, offset)?;
        offset += frame.len() as u64;
    }
    if synced {
        file.sync_data()?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(elapsed)
}

/// Seconds to consume `[0, total)` of `point`.
pub(super) async fn consume(client: &Client, point: &str, total: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let request = ConsumeRequest {
        point: point.into(),
        offset: 0,
        limit: total,
        chunk_size: 0,
        follow: false,
    };
    let mut stream = client.raw().consume_stream(request).await?.into_inner();
    let mut received = 0u64;
    while let Some(response) = stream.message().await? {
        received += response.frame.len() as u64;
    }
    if received != total {
        bail!("consumed {received} bytes, expected {total}");
    }
    Ok(started.elapsed().as_secs_f64())
}
