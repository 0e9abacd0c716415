//! The benchmark harness: server child processes (a node or the baseline), their resources read
//! from `/proc` (RSS, descriptors, an RSS sampler), their metrics, and clients connected to them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use goutube::client::{Client, ClientOptions, ClientTls};
use goutube::process::NodeProcess;
use goutube::proto::LocatePointRequest;

pub(super) async fn connect(addr: &str) -> anyhow::Result<Client> {
    connect_with(addr, None).await
}

pub(super) async fn connect_with(addr: &str, tls: Option<ClientTls>) -> anyhow::Result<Client> {
    Ok(Client::connect(&ClientOptions {
        addr: addr.to_owned(),
        tls,
    })
    .await?)
}

/// A CA with a node certificate (`node:bench`) and a client certificate (`root`) in `dir`, for
/// a bench that runs a node with `[tls]`.
pub(super) struct BenchPki {
    pub dir: PathBuf,
}

impl BenchPki {
    pub(super) fn write(dir: &Path) -> anyhow::Result<BenchPki> {
        goutube::certs::write(&goutube::certs::Request {
            out: dir,
            nodes: &["bench".to_owned()],
            sans: &[],
            clients: &["root".to_owned()],
            days: 1,
            force: false,
        })?;
        Ok(BenchPki {
            dir: dir.to_owned(),
        })
    }

    /// The `[tls]` and `[cluster]` sections of the node's configuration.
    pub(super) fn node_config(&self) -> String {
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}\n",
            self.dir.join("ca.pem"),
            self.dir.join("node-bench.pem"),
            self.dir.join("node-bench-key.pem"),
            self.dir.join(goutube::certs::CLUSTER_KEY_FILE)
        )
    }

    /// The `root` client, for gRPC.
    pub(super) fn client(&self) -> ClientTls {
        ClientTls {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join("client-root.pem"),
            key: self.dir.join("client-root-key.pem"),
            server_name: None,
        }
    }
}

/// The member that owns `point` in the ring, as the node behind `client` ranks it.
pub(super) async fn owner(client: &Client, point: &str) -> anyhow::Result<String> {
    let request = LocatePointRequest {
        point: point.to_owned(),
        replicas: 1,
    };
    let located = client.raw().locate_point(request).await?.into_inner();
    let first = located.owners.into_iter().next().context("no owner")?;
    Ok(first.name)
}

/// The sum of the samples of metric `name` (all its labels) on `server`'s metrics endpoint.
pub(super) async fn metric(server: &Server, name: &str) -> anyhow::Result<f64> {
    sample(&scrape(server).await?, name)
}

/// What `server`'s metrics endpoint exports now (Prometheus text).
pub(super) async fn scrape(server: &Server) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(&server.metrics).await?;
    socket
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\n\r\n")
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response)
}

/// The sum of the samples of metric `name` (all its labels) in `exported`;
/// `name{label="value"}` sums those with that one label only. A node exports every metric
/// from its start (at zero), so finding none is an error (a metric or label renamed), not 0.
pub(super) fn sample(exported: &str, name: &str) -> anyhow::Result<f64> {
    let samples: Vec<f64> = exported
        .lines()
        .filter(|line| {
            line.strip_prefix(name).is_some_and(|rest| {
                rest.starts_with(' ') || (!name.ends_with('}') && rest.starts_with('{'))
            })
        })
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .collect();
    anyhow::ensure!(!samples.is_empty(), "the node exports no metric {name}");
    Ok(samples.iter().sum())
}

/// A server child process (a goutube node or the baseline), through the shared harness.
pub(super) struct Server {
    pub(super) process: NodeProcess,
    pub(super) rpc: String,
    /// The replication address (nodes only).
    pub(super) replication: String,
    /// The HTTP gateway (nodes only).
    pub(super) http: String,
    /// The gossip address (nodes only).
    pub(super) gossip: String,
    /// The metrics endpoint (nodes only).
    pub(super) metrics: String,
}

impl Server {
    /// A node with its data in `dir`, configured by the TOML `settings` (sections of its own).
    pub(super) fn node(dir: &Path, settings: &str) -> anyhow::Result<Server> {
        Self::node_at(dir, "bench", "127.0.0.1", None, settings)
    }

    /// Node `name` listening on `ip` (every port chosen by the kernel), run inside network
    /// namespace `namespace` if one is given.
    pub(super) fn node_at(
        dir: &Path,
        name: &str,
        ip: &str,
        namespace: Option<&str>,
        settings: &str,
    ) -> anyhow::Result<Server> {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_name = {name:?}\ndata_dir = {:?}\nbind_addr = \"{ip}:0\"\nrpc_port = 0\nreplication_port = 0\nmetrics_port = 0\nhttp_port = 0\n{settings}\n[log]\nlevel = \"warn\"\n",
                dir.join(format!("{name}-data"))
            ),
        )?;
        let mut command = match namespace {
            Some(namespace) => {
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", namespace])
                    .arg(std::env::current_exe()?);
                command
            }
            None => Command::new(std::env::current_exe()?),
        };
        command.args(["run", "--config"]).arg(&config);
        Self::spawn(command)
    }

    pub(super) fn baseline() -> anyhow::Result<Server> {
        let mut command = Command::new(std::env::current_exe()?);
        command.args(["bench", "baseline-server"]);
        Self::spawn(command)
    }

    pub(super) fn spawn(command: Command) -> anyhow::Result<Server> {
        let process = NodeProcess::start(command, Duration::from_secs(120))?;
        let rpc = process
            .field("rpc")
            .context("no rpc= on the listening line")?
            .to_owned();
        let replication = process.field("replication").unwrap_or_default().to_owned();
        let http = process.field("http").unwrap_or_default().to_owned();
        let gossip = process.field("gossip").unwrap_or_default().to_owned();
        let metrics = process.field("metrics").unwrap_or_default().to_owned();
        Ok(Server {
            process,
            rpc,
            replication,
            http,
            gossip,
            metrics,
        })
    }

    pub(super) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// SIGTERM and wait for a clean exit.
    pub(super) fn stop(self) -> anyhow::Result<()> {
        let status = self.process.terminate(Duration::from_secs(120))?;
        if !status.success() {
            bail!("server exited with {status}");
        }
        Ok(())
    }
}

pub(super) fn proc_path(pid: u32, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{name}"))
}

/// User and system CPU time `pid` has used, in seconds.
pub(super) fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(proc_path(pid, "stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name (which may hold spaces) end with ')'.
            let rest = stat.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let user: u64 = fields.get(11)?.parse().ok()?;
            let system: u64 = fields.get(12)?.parse().ok()?;
            Some(user + system)
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a system constant.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / per_second as f64
}

/// Resident set size of `pid`, in bytes.
pub(super) fn rss(pid: u32) -> u64 {
    std::fs::read_to_string(proc_path(pid, "status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub(super) fn descriptors(pid: u32) -> usize {
    std::fs::read_dir(proc_path(pid, "fd")).map_or(0, |d| d.count())
}

/// Samples the RSS of a process every 20 ms until stopped; returns the peak.
pub(super) struct RssSampler {
    pub(super) stop: Arc<AtomicBool>,
    pub(super) peak: Arc<AtomicU64>,
    pub(super) thread: std::thread::JoinHandle<()>,
}

impl RssSampler {
    pub(super) fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let peak = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, peak) = (stop.clone(), peak.clone());
            move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss(pid), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        });
        Self { stop, peak, thread }
    }

    pub(super) fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.thread.join();
        self.peak.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::sample;

    #[test]
    fn a_sample_is_summed_over_labels_or_picked_by_one_and_a_missing_one_is_an_error() {
        let exported = "# TYPE goutube_blocking_trips_total counter\n\
            goutube_blocking_trips_total{queue=\"plugins\"} 7\n\
            goutube_blocking_trips_total{queue=\"storage\"} 3\n\
            goutube_blocking_trips_total_other 100\n\
            goutube_replicated_bytes_total 12\n";
        let trips = "goutube_blocking_trips_total";
        assert_eq!(sample(exported, trips).unwrap(), 10.0);
        assert_eq!(
            sample(exported, &format!("{trips}{{queue=\"storage\"}}")).unwrap(),
            3.0
        );
        assert_eq!(
            sample(exported, "goutube_replicated_bytes_total").unwrap(),
            12.0
        );
        // A label value nobody exports, and a name nobody exports.
        assert!(sample(exported, &format!("{trips}{{queue=\"disk\"}}")).is_err());
        assert!(sample(exported, "goutube_blocking_trips").is_err());
    }
}
