//! `goutube bench http`: the HTTP range gateway against gRPC `ConsumeStream` of the same point,
//! on the same node (a child process, `fsync = "never"`), in the same run.
//!
//! - Reading a whole point: consecutive 16 MiB ranges over one kept-alive HTTP/1.1 connection,
//!   against one `ConsumeStream` of the whole point.
//! - Many players: `clients` clients at once, each reading `requests` random 1 MiB ranges over
//!   its own connection: time to first byte (p50, p99) and total throughput, against the same
//!   load as `ConsumeStream` calls of `[offset, offset + 1 MiB)`, each client on its own channel.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use rand::Rng;

use goutube::client::Client;
use goutube::proto::ConsumeRequest;

use super::{Server, Workload, connect, consume, percentile, produce, ratio_row, storage};

const POINT: &str = "bench/http";
const RANGE: u64 = 16 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

pub(super) async fn run(
    mib: u64,
    rounds: usize,
    clients: usize,
    requests: usize,
) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let node = Server::node(work.path(), &storage("never"))?;
    let http: SocketAddr = node.http.parse().context("the node's http= address")?;
    let client = connect(&node.rpc).await?;
    let workload = Workload::new(mib, 256 * 1024);
    let total = workload.total;
    produce(&client, POINT, &workload.pool, workload.frames).await?;

    println!("## Reading {mib} MiB: {rounds} rounds, median (slowest–fastest)\n");
    println!("| measurement | gRPC ConsumeStream | HTTP gateway | ratio |");
    println!("|---|---|---|---|");
    let (mut grpc, mut gateway) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        grpc.push(consume(&client, POINT, total).await?);
        gateway.push(read_whole(http, total).await?);
    }
    ratio_row(
        "whole point (HTTP: 16 MiB ranges, one connection)",
        total,
        &grpc,
        &gateway,
    );

    println!("\n## {clients} clients at once, {requests} random 1 MiB ranges each\n");
    println!("| transport | time to first byte p50 | p99 | throughput |");
    println!("|---|---|---|---|");
    let rpc = node.rpc.clone();
    let grpc = players(clients, requests, total, move |offsets| {
        let rpc = rpc.clone();
        async move {
            let client = connect(&rpc).await?;
            let mut samples = Vec::with_capacity(offsets.len());
            for offset in offsets {
                samples.push(grpc_range(&client, offset).await?);
            }
            Ok(samples)
        }
    })
    .await?;
    let gateway = players(clients, requests, total, move |offsets| async move {
        let mut sender = connection(http, None).await?;
        let mut samples = Vec::with_capacity(offsets.len());
        for offset in offsets {
            samples.push(get_range(&mut sender, http, POINT, offset, offset + MIB).await?);
        }
        Ok(samples)
    })
    .await?;
    for (name, load) in [("gRPC ConsumeStream", &grpc), ("HTTP gateway", &gateway)] {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.0} MB/s |",
            load.first_byte_p50 * 1e3,
            load.first_byte_p99 * 1e3,
            load.throughput / 1e6
        );
    }
    println!(
        "\nratio HTTP / gRPC: throughput {:.2}x, p50 time to first byte {:.2}x, p99 {:.2}x",
        gateway.throughput / grpc.throughput,
        gateway.first_byte_p50 / grpc.first_byte_p50,
        gateway.first_byte_p99 / grpc.first_byte_p99
    );
    node.stop()
}

/// An HTTP/1.1 connection (to the gateway, or to nginx in `bench http --against-nginx`), over
/// TLS with `tls`.
pub(super) async fn connection(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> anyhow::Result<http1::SendRequest<Empty<Bytes>>> {
    use tokio_util::either::Either;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let io = match tls {
        None => Either::Left(tcp),
        Some(connector) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            Either::Right(connector.connect(name, tcp).await?)
        }
    };
    let (sender, connection) = http1::handshake(hyper_util::rt::TokioIo::new(io)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// `GET` of `[start, end)` of `point`; returns the seconds to the first body byte and the bytes
/// read.
pub(super) async fn get_range(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    addr: SocketAddr,
    point: &str,
    start: u64,
    end: u64,
) -> anyhow::Result<(f64, u64)> {
    let request = hyper::Request::get(format!("/v1/points/{point}"))
        .header("host", addr.to_string())
        .header("range", format!("bytes={start}-{}", end - 1))
        .body(Empty::new())?;
    let started = Instant::now();
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    if response.status() != hyper::StatusCode::PARTIAL_CONTENT {
        bail!("{addr} answered {}", response.status());
    }
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut received = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            first_byte.get_or_insert_with(|| started.elapsed().as_secs_f64());
            received += data.len() as u64;
        }
    }
    if received != end - start {
        bail!("read {received} bytes of a {}-byte range", end - start);
    }
    Ok((first_byte.unwrap_or_default(), received))
}

/// Seconds to read `[0, total)` in consecutive ranges over one connection.
async fn read_whole(addr: SocketAddr, total: u64) -> anyhow::Result<f64> {
    let mut sender = connection(addr, None).await?;
    let started = Instant::now();
    let mut position = 0;
    while position < total {
        let end = (position + RANGE).min(total);
        get_range(&mut sender, addr, POINT, position, end).await?;
        position = end;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// One 1 MiB range over gRPC.
async fn grpc_range(client: &Client, offset: u64) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let request = ConsumeRequest {
        point: POINT.into(),
        offset,
        limit: offset + MIB,
        chunk_size: 0,
        follow: false,
    };
    let mut stream = client.raw().consume_stream(request).await?.into_inner();
    let mut first_byte = None;
    let mut received = 0;
    while let Some(response) = stream.message().await? {
        first_byte.get_or_insert_with(|| started.elapsed().as_secs_f64());
        received += response.frame.len() as u64;
    }
    if received != MIB {
        bail!("read {received} bytes of a 1 MiB range");
    }
    Ok((first_byte.unwrap_or_default(), received))
}

struct Load {
    first_byte_p50: f64,
    first_byte_p99: f64,
    /// Bytes per second over the whole load.
    throughput: f64,
}

/// `clients` tasks at once, each given `requests` random 1 MiB-aligned offsets to read with
/// `client` (one connection per task, kept for all of its reads).
async fn players<F, Fut>(
    clients: usize,
    requests: usize,
    total: u64,
    client: F,
) -> anyhow::Result<Load>
where
    F: Fn(Vec<u64>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<Vec<(f64, u64)>>> + Send + 'static,
{
    let ranges = total / MIB;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let offsets: Vec<u64> = (0..requests)
            .map(|_| rand::rng().random_range(0..ranges) * MIB)
            .collect();
        tasks.push(tokio::spawn(client.clone()(offsets)));
    }
    let mut first_bytes = Vec::new();
    let mut bytes = 0;
    for task in tasks {
        for (first_byte, received) in task.await?? {
            first_bytes.push(first_byte);
            bytes += received;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    first_bytes.sort_by(f64::total_cmp);
    Ok(Load {
        first_byte_p50: percentile(&first_bytes, 50),
        first_byte_p99: percentile(&first_bytes, 99),
        throughput: bytes as f64 / seconds,
    })
}
