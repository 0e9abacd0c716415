//! `goutube bench http --against-nginx`: the gateway against nginx serving the same bytes from a
//! file, in the same rounds, on the same machine (issue 28).
//!
//! nginx comes from the Debian package (`nginx-light`): the bench writes its configuration
//! (`sendfile on`, access log off, one worker per core) and starts it on 127.0.0.1 itself, and
//! says so plainly when it is missing. The point is read once through the gateway into the file
//! nginx serves, so both serve exactly the same bytes under the same path. Loads, each run on
//! goutube then on nginx, round after round:
//!
//! - **whole**: one `GET` of the whole point;
//! - **ranges**: `clients` clients at once, each reading random 1 MiB ranges over its own
//!   kept-alive connection (time to first byte, throughput);
//! - **viewers**: many players at once, each reading at a steady rate (as a player buffers ahead)
//!   and seeking now and then (a new request at a random place, on a new connection, as a
//!   browser aborts a response): delivered rate, time to first byte, and the server's CPU
//!   seconds per delivered GiB and peak memory (PSS, so nginx's workers are not counted twice).
//!
//! With `--hog` the whole and ranges loads run again beside a busy loop on one core. With
//! `--tls` every load is over TLS 1.3 with client certificates, on both servers: the node with
//! `[tls]`, nginx with the same certificate, asking for client certificates as the gateway does
//! (neither can use `sendfile` then: the bytes are encrypted in the server's memory).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Empty};
use rand::Rng;

use bytes::Bytes;

use super::http::{connection, get_range};
use super::{
    BenchPki, Server, Workload, connect_with, cpu_seconds, median, percentile, produce, storage,
};

const POINT: &str = "bench/nginx";
const MIB: u64 = 1024 * 1024;
const GIB: f64 = (1u64 << 30) as f64;

/// What `bench http --against-nginx` runs.
pub(super) struct Plan {
    pub mib: u64,
    pub rounds: usize,
    /// Client counts of the random-range loads.
    pub clients: Vec<usize>,
    /// Ranges each client reads.
    pub requests: usize,
    pub viewers: usize,
    /// Each viewer's rate, in kbit/s.
    pub viewer_kbps: u64,
    /// Seconds each viewers' round lasts.
    pub viewer_seconds: u64,
    /// Also run whole and ranges beside a busy loop on one core.
    pub hog: bool,
    /// Everything over TLS, on both servers.
    pub tls: bool,
}

pub(super) async fn run(plan: Plan) -> anyhow::Result<()> {
    let nginx_binary = nginx_binary()?;
    let work = tempfile::tempdir()?;
    let certs = work.path().join("certs");
    let mut config = storage("never");
    let mut rpc_tls = None;
    if plan.tls {
        let pki = BenchPki::write(&certs)?;
        config.push_str(&pki.node_config());
        rpc_tls = Some(pki.client());
    }
    let tls = plan.tls.then(|| client_tls(&certs)).transpose()?;
    let node = Server::node(work.path(), &config)?;
    let gateway = Dial {
        addr: node.http.parse().context("the node's http= address")?,
        tls: tls.clone(),
    };
    let client = connect_with(&node.rpc, rpc_tls).await?;
    let workload = Workload::new(plan.mib, 256 * 1024);
    let total = workload.total;
    produce(&client, POINT, &workload.pool, workload.frames).await?;

    // nginx serves the bytes the gateway serves, read through it, at the same path.
    let root = work.path().join("nginx-root");
    let file = root.join("v1/points").join(POINT);
    std::fs::create_dir_all(file.parent().expect("a path with a parent"))?;
    let copied = get_whole(&gateway, Some(&file)).await?;
    if copied != total {
        bail!("read {copied} bytes of the {total}-byte point through the gateway");
    }
    let nginx = Nginx::start(
        &nginx_binary,
        work.path(),
        &root,
        plan.tls.then_some(&*certs),
    )?;
    let servers = [
        Target {
            name: "goutube",
            dial: gateway.clone(),
            pids: Pids::One(node.pid()),
        },
        Target {
            name: "nginx",
            dial: Dial {
                addr: nginx.addr,
                tls,
            },
            pids: Pids::Tree(nginx.pid()),
        },
    ];
    println!(
        "goutube gateway at {}, nginx {} at {} (sendfile on, {} workers), {} MiB point{}\n",
        gateway.addr,
        nginx_version(&nginx_binary),
        nginx.addr,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        plan.mib,
        if plan.tls {
            ", TLS 1.3 (AES-128-GCM) with client certificates on both"
        } else {
            ""
        }
    );

    whole_and_ranges(&plan, &servers, total, "").await?;
    viewers(&plan, &servers, total).await?;
    if plan.hog {
        let hog = Hog::start()?;
        whole_and_ranges(&plan, &servers, total, ", beside a busy loop on one core").await?;
        drop(hog);
    }
    drop(nginx);
    node.stop()
}

/// The bench's TLS client: the bench CA's roots, the `root` client certificate, AES-128-GCM
/// first (the suite the node prefers), HTTP/1.1.
fn client_tls(certs: &Path) -> anyhow::Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.join("ca.pem"))? {
        roots.add(cert?)?;
    }
    let chain = CertificateDer::pem_file_iter(certs.join("client-root.pem"))?
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_file(certs.join("client-root-key.pem"))?;
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Where a server listens, and whether over TLS.
#[derive(Clone)]
struct Dial {
    addr: SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Dial {
    async fn connect(
        &self,
    ) -> anyhow::Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
        connection(self.addr, self.tls.as_ref()).await
    }
}

/// One server under test.
struct Target {
    name: &'static str,
    dial: Dial,
    pids: Pids,
}

/// The processes whose CPU and memory a server costs.
#[derive(Clone, Copy)]
enum Pids {
    /// One process (a goutube node).
    One(u32),
    /// A master process and its children (nginx's workers).
    Tree(u32),
}

impl Pids {
    fn all(self) -> Vec<u32> {
        match self {
            Pids::One(pid) => vec![pid],
            Pids::Tree(pid) => {
                let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default();
                std::iter::once(pid)
                    .chain(children.split_whitespace().filter_map(|p| p.parse().ok()))
                    .collect()
            }
        }
    }

    /// CPU seconds (user and system) used so far.
    fn cpu_seconds(self) -> f64 {
        self.all().into_iter().map(cpu_seconds).sum()
    }

    /// Proportional set size, in bytes (shared pages split between the processes).
    fn pss(self) -> u64 {
        self.all().into_iter().map(pss).sum()
    }
}

fn pss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|rollup| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

async fn whole_and_ranges(
    plan: &Plan,
    servers: &[Target; 2],
    total: u64,
    beside: &str,
) -> anyhow::Result<()> {
    println!(
        "## A whole GET of {} MiB{beside}: {} rounds, median (slowest–fastest)\n",
        plan.mib, plan.rounds
    );
    println!("| server | throughput | CPU s per GiB | ratio to nginx |");
    println!("|---|---|---|---|");
    let mut rates = [Vec::new(), Vec::new()];
    let mut cpu = [Vec::new(), Vec::new()];
    for _ in 0..plan.rounds {
        for (i, server) in servers.iter().enumerate() {
            let before = server.pids.cpu_seconds();
            let started = Instant::now();
            let read = get_whole(&server.dial, None).await?;
            let seconds = started.elapsed().as_secs_f64();
            if read != total {
                bail!("{} served {read} of {total} bytes", server.name);
            }
            rates[i].push(total as f64 / seconds);
            cpu[i].push((server.pids.cpu_seconds() - before) / (total as f64 / GIB));
        }
    }
    for (i, server) in servers.iter().enumerate() {
        println!(
            "| {} | {} | {:.2} | {:.2}x |",
            server.name,
            rate_spread(&rates[i]),
            median(&cpu[i]),
            median(&rates[i]) / median(&rates[1])
        );
    }

    for &clients in &plan.clients {
        println!(
            "\n## {clients} clients at once, {} random 1 MiB ranges each{beside}: {} rounds\n",
            plan.requests, plan.rounds
        );
        println!(
            "| server | throughput, median (slowest–fastest) | first byte p50 | p99 | ratio to nginx |"
        );
        println!("|---|---|---|---|---|");
        let mut loads: [Vec<Load>; 2] = [Vec::new(), Vec::new()];
        for _ in 0..plan.rounds {
            for (i, server) in servers.iter().enumerate() {
                loads[i].push(ranges(&server.dial, clients, plan.requests, total).await?);
            }
        }
        let throughput = |loads: &[Load]| loads.iter().map(|l| l.rate).collect::<Vec<_>>();
        let nginx = median(&throughput(&loads[1]));
        for (i, server) in servers.iter().enumerate() {
            let rates = throughput(&loads[i]);
            let p50: Vec<f64> = loads[i].iter().map(|l| l.first_byte_p50).collect();
            let p99: Vec<f64> = loads[i].iter().map(|l| l.first_byte_p99).collect();
            println!(
                "| {} | {} | {:.2} ms | {:.2} ms | {:.2}x |",
                server.name,
                rate_spread(&rates),
                median(&p50) * 1e3,
                median(&p99) * 1e3,
                median(&rates) / nginx
            );
        }
    }
    println!();
    Ok(())
}

async fn viewers(plan: &Plan, servers: &[Target; 2], total: u64) -> anyhow::Result<()> {
    let rate = plan.viewer_kbps * 1000 / 8;
    println!(
        "## {} viewers at {} kbit/s each ({:.0} MB/s asked in all), seeking now and then: {} s \
         per round, {} rounds\n",
        plan.viewers,
        plan.viewer_kbps,
        (plan.viewers as u64 * rate) as f64 / 1e6,
        plan.viewer_seconds,
        plan.rounds
    );
    println!(
        "| server | delivered MB/s | of asked | first byte p50 | p99 | CPU s per GiB | peak PSS | CPU / nginx's |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut watched: [Vec<Watched>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..plan.rounds {
        for (i, server) in servers.iter().enumerate() {
            watched[i].push(watch(server, plan, rate, total).await?);
        }
    }
    let cpu = |w: &[Watched]| median(&w.iter().map(|w| w.cpu_per_gib).collect::<Vec<_>>());
    let nginx_cpu = cpu(&watched[1]);
    let asked = (plan.viewers as u64 * rate) as f64;
    for (i, server) in servers.iter().enumerate() {
        let w = &watched[i];
        let delivered = median(&w.iter().map(|w| w.rate).collect::<Vec<_>>());
        let p50 = median(&w.iter().map(|w| w.first_byte_p50).collect::<Vec<_>>());
        let p99 = median(&w.iter().map(|w| w.first_byte_p99).collect::<Vec<_>>());
        let peak = w.iter().map(|w| w.peak_pss).max().unwrap_or(0);
        // CPU is counted in ticks of 10 ms: a short load may show none for nginx.
        let to_nginx = if nginx_cpu > 0.0 {
            format!("{:.2}x", cpu(w) / nginx_cpu)
        } else {
            "(too short to count)".into()
        };
        println!(
            "| {} | {:.0} | {:.2} | {:.2} ms | {:.2} ms | {:.2} | {} MiB | {to_nginx} |",
            server.name,
            delivered / 1e6,
            delivered / asked,
            p50 * 1e3,
            p99 * 1e3,
            cpu(w),
            peak / MIB,
        );
    }
    println!();
    Ok(())
}

/// What one viewers' round measured on one server.
struct Watched {
    rate: f64,
    first_byte_p50: f64,
    first_byte_p99: f64,
    cpu_per_gib: f64,
    peak_pss: u64,
}

/// `plan.viewers` players on `server` for `plan.viewer_seconds`, started over a second.
async fn watch(server: &Target, plan: &Plan, rate: u64, total: u64) -> anyhow::Result<Watched> {
    let until = Instant::now() + Duration::from_secs(plan.viewer_seconds) + Duration::from_secs(1);
    let pids = server.pids;
    let sampling = Arc::new(AtomicBool::new(true));
    let peak = Arc::new(AtomicU64::new(0));
    let sampler = std::thread::spawn({
        let (sampling, peak) = (sampling.clone(), peak.clone());
        move || {
            while sampling.load(Ordering::Relaxed) {
                peak.fetch_max(pids.pss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(250));
            }
        }
    });
    let cpu_before = pids.cpu_seconds();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(plan.viewers);
    for n in 0..plan.viewers {
        let start = started + Duration::from_secs(1) * n as u32 / plan.viewers as u32;
        tasks.push(tokio::spawn(viewer(
            server.dial.clone(),
            start,
            until,
            rate,
            total,
        )));
    }
    let (mut first_bytes, mut bytes) = (Vec::new(), 0);
    for task in tasks {
        let (samples, read) = task.await??;
        first_bytes.extend(samples);
        bytes += read;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = pids.cpu_seconds() - cpu_before;
    sampling.store(false, Ordering::Relaxed);
    let _ = sampler.join();
    first_bytes.sort_by(f64::total_cmp);
    if first_bytes.is_empty() {
        bail!("no viewer got a byte from {}", server.name);
    }
    Ok(Watched {
        rate: bytes as f64 / seconds,
        first_byte_p50: percentile(&first_bytes, 50),
        first_byte_p99: percentile(&first_bytes, 99),
        cpu_per_gib: cpu / (bytes as f64 / GIB),
        peak_pss: peak.load(Ordering::Relaxed),
    })
}

/// One player: from `start` until `until`, reads from a random place at `rate` bytes per
/// second, and every 5 to 15 s seeks (a new request on a new connection). Returns the time to
/// the first byte of each request and the bytes read.
async fn viewer(
    dial: Dial,
    start: Instant,
    until: Instant,
    rate: u64,
    total: u64,
) -> anyhow::Result<(Vec<f64>, u64)> {
    tokio::time::sleep_until(start.into()).await;
    let (mut first_bytes, mut read) = (Vec::new(), 0);
    while Instant::now() < until {
        let (offset, watch_for) = {
            let mut rng = rand::rng();
            (
                rng.random_range(0..total / MIB) * MIB,
                Duration::from_millis(rng.random_range(5_000..15_000)),
            )
        };
        let stop = (Instant::now() + watch_for).min(until);
        let mut sender = dial.connect().await?;
        let request = hyper::Request::get(format!("/v1/points/{POINT}"))
            .header("host", dial.addr.to_string())
            .header("range", format!("bytes={offset}-"))
            .body(Empty::new())?;
        let asked = Instant::now();
        let response = sender.send_request(request).await?;
        if response.status() != hyper::StatusCode::PARTIAL_CONTENT {
            bail!("{} answered {}", dial.addr, response.status());
        }
        let mut body = response.into_body();
        let mut this = 0u64;
        while Instant::now() < stop {
            let Some(frame) = body.frame().await else {
                break;
            };
            if let Ok(data) = frame?.into_data() {
                if this == 0 {
                    first_bytes.push(asked.elapsed().as_secs_f64());
                }
                this += data.len() as u64;
                // Keep to the rate: wait until the bytes read are due.
                let due = asked + Duration::from_secs_f64(this as f64 / rate as f64);
                tokio::time::sleep_until(due.min(stop).into()).await;
            }
        }
        read += this;
        // Dropping the body and the connection is the player's seek.
    }
    Ok((first_bytes, read))
}

struct Load {
    rate: f64,
    first_byte_p50: f64,
    first_byte_p99: f64,
}

/// `clients` clients, each `requests` random 1 MiB ranges over its own connection.
async fn ranges(dial: &Dial, clients: usize, requests: usize, total: u64) -> anyhow::Result<Load> {
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for _ in 0..clients {
        let offsets: Vec<u64> = (0..requests)
            .map(|_| rand::rng().random_range(0..total / MIB) * MIB)
            .collect();
        let dial = dial.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = dial.connect().await?;
            let mut samples = Vec::with_capacity(offsets.len());
            for offset in offsets {
                let range = (offset, offset + MIB);
                samples.push(get_range(&mut sender, dial.addr, POINT, range.0, range.1).await?);
            }
            anyhow::Ok(samples)
        }));
    }
    let (mut first_bytes, mut bytes) = (Vec::new(), 0);
    for task in tasks {
        for (first_byte, read) in task.await?? {
            first_bytes.push(first_byte);
            bytes += read;
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    first_bytes.sort_by(f64::total_cmp);
    Ok(Load {
        rate: bytes as f64 / seconds,
        first_byte_p50: percentile(&first_bytes, 50),
        first_byte_p99: percentile(&first_bytes, 99),
    })
}

/// One `GET` of the whole point, written into `file` if one is given; the bytes read.
async fn get_whole(dial: &Dial, file: Option<&Path>) -> anyhow::Result<u64> {
    use tokio::io::AsyncWriteExt;
    let mut sender = dial.connect().await?;
    let request = hyper::Request::get(format!("/v1/points/{POINT}"))
        .header("host", dial.addr.to_string())
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    if response.status() != hyper::StatusCode::OK {
        bail!("{} answered {}", dial.addr, response.status());
    }
    let mut out = match file {
        Some(file) => Some(tokio::fs::File::create(file).await?),
        None => None,
    };
    let mut body = response.into_body();
    let mut read = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if let Some(out) = &mut out {
                out.write_all(&data).await?;
            }
            read += data.len() as u64;
        }
    }
    if let Some(out) = &mut out {
        out.flush().await?;
    }
    Ok(read)
}

fn rate_spread(rates: &[f64]) -> String {
    let slowest = rates.iter().copied().fold(f64::MAX, f64::min);
    let fastest = rates.iter().copied().fold(f64::MIN, f64::max);
    format!(
        "{:.0} MB/s ({:.0}–{:.0})",
        median(rates) / 1e6,
        slowest / 1e6,
        fastest / 1e6
    )
}

/// The nginx binary: on `PATH`, or where Debian puts it.
fn nginx_binary() -> anyhow::Result<PathBuf> {
    let on_path = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("nginx"))
            .find(|candidate| candidate.is_file())
    });
    on_path
        .or_else(|| Some(PathBuf::from("/usr/sbin/nginx")).filter(|p| p.is_file()))
        .context(
            "nginx is missing: `apt-get install nginx-light` (or nginx) to compare the gateway \
             with it; the bench starts it itself on 127.0.0.1",
        )
}

fn nginx_version(binary: &Path) -> String {
    Command::new(binary)
        .arg("-v")
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stderr).trim().to_owned())
        .and_then(|line| line.rsplit('/').next().map(str::to_owned))
        .unwrap_or_else(|| "(unknown version)".into())
}

/// nginx started by the bench with a configuration of its own; stopped when dropped.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    /// nginx serving `root`, over TLS with the bench's node certificate when `certs` is given.
    fn start(
        binary: &Path,
        work: &Path,
        root: &Path,
        certs: Option<&Path>,
    ) -> anyhow::Result<Nginx> {
        // A free port: bound and given back; nginx binds it a moment later.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let prefix = work.join("nginx");
        std::fs::create_dir_all(prefix.join("temp"))?;
        let config = prefix.join("nginx.conf");
        let tls = match certs {
            None => String::new(),
            Some(certs) => format!(
                "    ssl_protocols TLSv1.3;\n    ssl_certificate {};\n    \
                 ssl_certificate_key {};\n    ssl_client_certificate {};\n    \
                 ssl_verify_client optional;\n",
                certs.join("node-bench.pem").display(),
                certs.join("node-bench-key.pem").display(),
                certs.join("ca.pem").display(),
            ),
        };
        std::fs::write(
            &config,
            format!(
                "daemon off;\nworker_processes auto;\npid {pid};\nerror_log {log} warn;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n  \
                 keepalive_requests 1000000;\n  default_type application/octet-stream;\n  \
                 client_body_temp_path {temp};\n  proxy_temp_path {temp};\n  \
                 fastcgi_temp_path {temp};\n  uwsgi_temp_path {temp};\n  scgi_temp_path {temp};\n  \
                 server {{\n    listen {addr}{ssl} backlog=4096;\n    root {root};\n{tls}  }}\n}}\n",
                pid = prefix.join("nginx.pid").display(),
                log = prefix.join("error.log").display(),
                temp = prefix.join("temp").display(),
                root = root.display(),
                ssl = if certs.is_some() { " ssl" } else { "" },
            ),
        )?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(&prefix)
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut nginx = Nginx { child, addr };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = nginx.child.try_wait()? {
                bail!(
                    "nginx exited with {status} (its log: {})",
                    prefix.join("error.log").display()
                );
            }
            if Instant::now() > deadline {
                bail!("nginx did not listen on {addr} within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGQUIT is nginx's graceful stop; a kill if it lingers.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A busy loop on one core, in a process of its own, until dropped.
struct Hog(Child);

impl Hog {
    fn start() -> anyhow::Result<Hog> {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdin(Stdio::null())
            .spawn()
            .context("starting a busy loop")?;
        Ok(Hog(child))
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
