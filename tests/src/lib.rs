//! Helpers for the integration tests: real nodes on `127.0.0.1:0` with temporary data
//! directories, non-periodic test data, waiting on conditions with a deadline, and the `goutube`
//! binary for tests that run nodes as child processes.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use goutube::client::{Client, ClientOptions};
use goutube::config::Config;
use goutube::node::{Listeners, Node};
use goutube::proto::streaming_client::StreamingClient;
use goutube::proto::{
    ConsumeRequest, ListMembersRequest, ListMembersResponse, LocatePointRequest, MetadataRequest,
    MetadataResponse, ProduceRequest, ProduceResponse,
};
use tempfile::TempDir;
use tonic::Status;
use tonic::transport::Channel;

pub mod browser;
pub mod upgrade;

/// How long any wait in a test may take before it fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Test bytes that never repeat with a short period (xorshift64, a different sequence per
/// seed): offset bugs cannot hide in them.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    state |= 1;
    let mut bytes = Vec::with_capacity(len + 8);
    while bytes.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        bytes.extend_from_slice(&state.to_le_bytes());
    }
    bytes.truncate(len);
    bytes
}

/// With `GOUTUBETEST_LOG` set (a `tracing` filter such as `goutube=info`), the nodes a test
/// starts, in its process or as children, log to stderr: what to read when a test fails.
pub fn log() {
    if let Ok(filter) = std::env::var("GOUTUBETEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

/// A configuration for a node on 127.0.0.1 with every port 0 and its data in `dir`.
pub fn config(dir: &Path) -> Config {
    Config {
        node_name: "test-node".into(),
        data_dir: dir.to_owned(),
        bind_addr: "127.0.0.1:0".parse().unwrap(),
        rpc_port: 0,
        replication_port: 0,
        metrics_port: 0,
        http_port: 0,
        shutdown_grace_ms: 2_000,
        ..Config::default()
    }
}

/// A node running in this process, with its own temporary data directory.
pub struct TestNode {
    pub node: Node,
    pub dir: TempDir,
}

impl TestNode {
    /// Starts a node with the test defaults changed by `configure`.
    pub async fn start(configure: impl FnOnce(&mut Config)) -> TestNode {
        let dir = tempfile::tempdir().expect("temporary directory");
        let node = start_in(dir.path(), configure).await;
        TestNode { node, dir }
    }

    pub fn addr(&self) -> String {
        self.node.rpc_addr().to_string()
    }

    pub async fn client(&self) -> StreamingClient<Channel> {
        raw_client(&self.addr()).await
    }

    /// Shuts the node down and starts a new one on the same data directory.
    pub async fn restart(self, configure: impl FnOnce(&mut Config)) -> TestNode {
        let TestNode { node, dir } = self;
        node.shutdown().await.expect("clean shutdown");
        let node = start_in(dir.path(), configure).await;
        TestNode { node, dir }
    }

    pub async fn shutdown(self) {
        self.node.shutdown().await.expect("clean shutdown");
    }
}

/// Starts a node whose data lives in `dir`.
pub async fn start_in(dir: &Path, configure: impl FnOnce(&mut Config)) -> Node {
    log();
    let mut config = config(dir);
    configure(&mut config);
    config.validate().expect("test configuration is valid");
    let listeners = Listeners::bind(&config).await.expect("binding port 0");
    Node::start(config, listeners).await.expect("node starts")
}

/// The generated client, connected to `addr` (h2c).
pub async fn raw_client(addr: &str) -> StreamingClient<Channel> {
    Client::connect(&ClientOptions {
        addr: addr.to_owned(),
        tls: None,
    })
    .await
    .expect("connecting")
    .raw()
}

/// Produces `frames` to `point` in one stream.
pub async fn produce(
    client: &mut StreamingClient<Channel>,
    point: &str,
    frames: &[Vec<u8>],
) -> Result<ProduceResponse, Status> {
    let requests: Vec<ProduceRequest> = frames
        .iter()
        .map(|frame| ProduceRequest {
            point: point.to_owned(),
            frame: Bytes::copy_from_slice(frame),
            ..Default::default()
        })
        .collect();
    Ok(client
        .produce_stream(tokio_stream::iter(requests))
        .await?
        .into_inner())
}

/// Every frame of a ConsumeStream call, or the status it ended with.
pub async fn consume(
    client: &mut StreamingClient<Channel>,
    request: ConsumeRequest,
) -> Result<Vec<Bytes>, Status> {
    let mut stream = client.consume_stream(request).await?.into_inner();
    let mut frames = Vec::new();
    while let Some(response) = stream.message().await? {
        frames.push(response.frame);
    }
    Ok(frames)
}

/// GetMetadata of `point`.
pub async fn metadata(
    client: &mut StreamingClient<Channel>,
    point: &str,
) -> Result<MetadataResponse, Status> {
    Ok(client
        .get_metadata(MetadataRequest {
            point: point.into(),
        })
        .await?
        .into_inner())
}

/// The cluster as `node` sees it (`ListMembers`).
pub async fn members(node: &TestNode) -> ListMembersResponse {
    node.client()
        .await
        .list_members(ListMembersRequest {})
        .await
        .expect("ListMembers")
        .into_inner()
}

/// Whether `node` holds a formed ring and sees `live` live members.
pub async fn sees(node: &TestNode, live: usize) -> bool {
    let view = members(node).await;
    !view.ring.is_empty() && view.members.iter().filter(|m| m.live).count() == live
}

/// Whether `nodes` agree on one view and one formed ring of `primaries` primaries, each of them
/// active and owning a range: from then on every node names the same owner for a point.
pub async fn one_ring(nodes: &[&TestNode], primaries: usize) -> bool {
    let mut views = Vec::with_capacity(nodes.len());
    for node in nodes {
        views.push(members(node).await);
    }
    views.iter().all(|view| {
        let owners = view
            .members
            .iter()
            .filter(|m| m.live && m.state == "active" && m.owns_range)
            .count();
        view.view == views[0].view
            && view.ring == views[0].ring
            && !view.ring.is_empty()
            && owners == primaries
    })
}

/// The member that owns `point` in the ring, as `node` locates it.
pub async fn owner(node: &TestNode, point: &str) -> String {
    owner_through(node.client().await, point).await
}

/// The member that owns `point` in the ring, as the node `client` is connected to locates it.
pub async fn owner_through(mut client: StreamingClient<Channel>, point: &str) -> String {
    client
        .locate_point(LocatePointRequest {
            point: point.into(),
            replicas: 1,
        })
        .await
        .expect("LocatePoint")
        .into_inner()
        .owners[0]
        .name
        .clone()
}

/// Asserts that every one of `statuses` is PermissionDenied, with `reason` in its message.
pub fn assert_denied(statuses: impl IntoIterator<Item = Status>, reason: &str) {
    for status in statuses {
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(reason), "{}", status.message());
    }
}

/// A ConsumeStream request for `[offset, limit)` of `point`.
pub fn window(point: &str, offset: u64, limit: u64, chunk_size: u64) -> ConsumeRequest {
    ConsumeRequest {
        point: point.into(),
        offset,
        limit,
        chunk_size,
        follow: false,
    }
}

/// Appends `bytes` to `point` at `offset` only (`expected_offset`).
pub async fn append_at(
    client: &mut StreamingClient<Channel>,
    point: &str,
    offset: u64,
    bytes: &[u8],
) -> Result<(), Status> {
    let request = ProduceRequest {
        point: point.into(),
        frame: Bytes::copy_from_slice(bytes),
        expected_offset: Some(offset),
        ..Default::default()
    };
    client
        .produce_stream(tokio_stream::iter([request]))
        .await
        .map(|_| ())
}

/// The controller's ring epoch as the node behind `client` reports it in `ListMembers`, once the
/// controller decided the ring: a change decided after this is at a higher epoch.
pub async fn ring_epoch(client: StreamingClient<Channel>) -> u64 {
    eventually_some("the controller to decide the ring", || {
        let mut client = client.clone();
        async move {
            let members = client.list_members(ListMembersRequest {}).await.ok()?;
            let controller = members.into_inner().controller?;
            Some(controller.ring_epoch).filter(|epoch| *epoch > 0)
        }
    })
    .await
}

/// Polls `condition` until it holds; fails the test after [`DEADLINE`].
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(what, DEADLINE, condition).await
}

/// Polls `condition` until it holds; fails the test after `within` (for work whose size, not a
/// fault, decides how long it takes, such as replicating a gibibyte on a loaded machine).
pub async fn eventually_within<F, Fut>(what: &str, within: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let holds = || {
        let holds = condition();
        async move { holds.await.then_some(()) }
    };
    eventually_some_within(what, within, holds).await
}

/// Polls `poll` until it gives a value, and returns it; fails the test after [`DEADLINE`].
pub async fn eventually_some<T, F, Fut>(what: &str, poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_some_within(what, DEADLINE, poll).await
}

/// Polls `poll` until it gives a value, and returns it; fails the test after `within`.
async fn eventually_some_within<T, F, Fut>(what: &str, within: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a poll of long work saw: finished, or not yet and how far it has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advance {
    /// The work is finished.
    Done,
    /// Not finished; this far (bytes copied, say). A mark that grows is progress.
    At(u64),
}

/// Polls `poll` until it reports [`Advance::Done`]; fails the test when its mark has not grown for
/// `stall`. For work whose size, not a fault, sets the pace (a gibibyte through a slow disk): a
/// slow machine makes it slower, only a stuck one fails it.
pub async fn eventually_advancing<F, Fut>(what: &str, stall: Duration, mut poll: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Advance>,
{
    let mut best = None;
    let mut deadline = Instant::now() + stall;
    loop {
        match poll().await {
            Advance::Done => return,
            Advance::At(mark) => {
                if best.is_none_or(|best| mark > best) {
                    best = Some(mark);
                    deadline = Instant::now() + stall;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: no progress for {stall:?} (stuck at {best:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `goutube` binary built next to these tests (`cargo test` builds it with the workspace).
pub fn goutube_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("goutube");
    assert!(
        bin.exists(),
        "{} is missing: `cargo test --workspace` builds it (host/tests/binary.rs makes cargo build the binary)",
        bin.display()
    );
    bin
}

/// Runs the `goutube` command line with `args` in `dir` (never against the environment's
/// `GOUTUBE_CLIENT_ADDR`) and returns what it did.
pub async fn goutube_cli(dir: &Path, args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(goutube_bin())
        .args(args)
        .current_dir(dir)
        .env_remove("GOUTUBE_CLIENT_ADDR")
        .output()
        .await
        .expect("running goutube")
}

/// What a command printed on stdout.
pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What a command printed on stderr.
pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A plaintext leader `leader` and its follower `f1`, connected.
pub async fn leader_and_follower() -> (TestNode, TestNode) {
    let leader = TestNode::start(|c| {
        c.node_name = "leader".into();
        c.role = goutube::config::Role::Leader;
    })
    .await;
    let address = leader.node.replication_addr().to_string();
    let follower = TestNode::start(move |c| {
        c.node_name = "f1".into();
        c.role = goutube::config::Role::Follower;
        c.leader_addresses = vec![address];
    })
    .await;
    eventually("the follower to connect", || async {
        connected_followers(&leader.addr()).await == 1
    })
    .await;
    (leader, follower)
}

/// A `goutube run` child process (the library's [`goutube::process`] harness), with the
/// addresses its listening line announced.
pub struct NodeProcess {
    pub process: goutube::process::NodeProcess,
    pub addresses: goutube::node::Addresses,
    /// The `rpc=` address it printed.
    pub rpc: String,
    pub metrics: String,
}

impl NodeProcess {
    /// Runs `goutube run --config <config>` and waits for its `goutube listening` line.
    pub fn spawn(config: &Path) -> NodeProcess {
        NodeProcess::spawn_with_env(config, &[])
    }

    /// [`NodeProcess::spawn`] with more environment variables.
    pub fn spawn_with_env(config: &Path, env: &[(&str, &str)]) -> NodeProcess {
        NodeProcess::spawn_binary(&goutube_bin(), config, env)
    }

    /// [`NodeProcess::spawn_with_env`] of the `goutube` binary at `bin` (another version's).
    pub fn spawn_binary(bin: &Path, config: &Path, env: &[(&str, &str)]) -> NodeProcess {
        NodeProcess::spawn_command(Command::new(bin), config, env)
    }

    /// [`NodeProcess::spawn`] in `node`'s network namespace of `namespaces`.
    pub fn spawn_in(
        namespaces: &goutube::netns::Namespaces,
        node: &str,
        config: &Path,
    ) -> NodeProcess {
        NodeProcess::spawn_command(namespaces.command(node, goutube_bin()), config, &[])
    }

    /// Runs `command` (a `goutube` binary, or a command that runs one) with the arguments of
    /// `goutube run --config <config>`.
    fn spawn_command(mut command: Command, config: &Path, env: &[(&str, &str)]) -> NodeProcess {
        // With GOUTUBETEST_LOG set, the children log at that level too.
        let level = std::env::var("GOUTUBETEST_LOG").unwrap_or_else(|_| "warn".into());
        command
            .args(["run", "--config"])
            .arg(config)
            .env("GOUTUBE_LOG__LEVEL", level)
            .envs(env.iter().copied())
            .stderr(Stdio::inherit());
        let process = goutube::process::NodeProcess::start(command, DEADLINE)
            .expect("goutube run printed its listening line");
        let addresses = process
            .addresses()
            .unwrap_or_else(|| panic!("a full listening line: {}", process.line()));
        NodeProcess {
            process,
            rpc: addresses.rpc.to_string(),
            metrics: addresses.metrics.to_string(),
            addresses,
        }
    }

    /// Waits for the process to exit by itself; returns whether it exited with status 0.
    pub fn exited(mut self) -> bool {
        self.process
            .wait(DEADLINE)
            .expect("the node exits by itself")
            .success()
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(self) {
        self.process.kill().expect("SIGKILL");
    }

    /// SIGTERM, then waits for a graceful exit; returns whether it exited with status 0.
    pub fn terminate(self) -> bool {
        self.process
            .terminate(DEADLINE)
            .expect("goutube exits after SIGTERM")
            .success()
    }

    /// Sends `signal` (`HUP`, `STOP`, `CONT`, `TERM`). A `STOP` returns once every thread of
    /// the node is stopped: the kernel stops them one by one after kill(2) returned, and on a
    /// busy machine a thread may still answer a call meanwhile.
    pub fn signal(&self, signal: &str) {
        let number = match signal {
            "HUP" => libc::SIGHUP,
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            "TERM" => libc::SIGTERM,
            other => panic!("no such signal in the tests: {other}"),
        };
        self.process.signal(number).expect("signalling the node");
        if number == libc::SIGSTOP {
            self.wait_stopped();
        }
    }

    /// Waits (at most 5 s) until every thread of the node is in the stopped state.
    fn wait_stopped(&self) {
        let pid = self.process.pid();
        let tasks = PathBuf::from(format!("/proc/{pid}/task"));
        // The state follows the command name, which is in parentheses and may hold any byte.
        let state = |task: &Path| {
            let stat = std::fs::read_to_string(task.join("stat")).ok()?;
            let (_, rest) = stat.rsplit_once(')')?;
            rest.trim_start().chars().next()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stopped = std::fs::read_dir(&tasks).is_ok_and(|entries| {
                entries
                    .flatten()
                    .all(|task| matches!(state(&task.path()), Some('T' | 't')))
            });
            if stopped {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "node {pid} not stopped 5 s after SIGSTOP"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// Writes a node config file for a child process with its data in `dir`.
pub fn write_config(dir: &Path, extra: &str) -> PathBuf {
    write_node_config(dir, "child", extra)
}

/// Writes the config file of child node `name` with its data in `dir`, every port 0. `extra`
/// holds top-level keys and sections of its own.
pub fn write_node_config(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let path = dir.join("node.toml");
    let body = format!(
        "node_name = {name:?}\ndata_dir = {:?}\nbind_addr = \"127.0.0.1:0\"\nrpc_port = 0\nreplication_port = 0\nmetrics_port = 0\nhttp_port = 0\n{extra}\n",
        dir.join("data")
    );
    std::fs::write(&path, body).expect("writing the config");
    path
}

/// `GET /metrics` from a node's metrics address.
pub async fn scrape_metrics(addr: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await
        .expect("metrics request");
    let mut body = String::new();
    stream
        .read_to_string(&mut body)
        .await
        .expect("metrics response");
    body
}

/// A counter of the nodes running in this test process (they share one registry), summed over
/// its label sets; 0 before its first increment.
pub fn counter(name: &str) -> f64 {
    metric(&goutube::metrics::handle().render(), name).unwrap_or(0.0)
}

/// The value of a metric line `name{labels} value` (summed over label sets), if present.
pub fn metric(scrape: &str, name: &str) -> Option<f64> {
    metric_where(scrape, name, "")
}

/// The sum of the samples of metric `name` whose labels include `label` (`cause="unclean"`;
/// empty: every sample) in a Prometheus text scrape; `None` if it has none.
pub fn metric_where(scrape: &str, name: &str, label: &str) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((key, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (base, labels) = key.split_once('{').unwrap_or((key, ""));
        if base == name && labels.contains(label) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// A test PKI in a temporary directory: a CA, node certificates (`node:<name>`) and client
/// certificates, made with `goutube::certs`.
pub struct Pki {
    pub dir: TempDir,
    pub ca: goutube::certs::Authority,
    /// Held while a certificate is issued and written: a test's tasks (and the processes they
    /// start) read the files while others ask for certificates.
    issuing: std::sync::Mutex<u64>,
}

impl Pki {
    pub fn new() -> Pki {
        use goutube::certs::{Authority, Validity};
        let dir = tempfile::tempdir().expect("temporary directory");
        let ca = Authority::new("test CA", Validity::days(1)).expect("a CA");
        std::fs::write(dir.path().join("ca.pem"), &ca.pem().cert_pem).expect("writing the CA");
        Pki {
            dir,
            ca,
            issuing: std::sync::Mutex::new(0),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `issued` as `<name>.pem` and `<name>-key.pem`, each whole or not at all (a
    /// reader never sees a file half written), the key first: once the certificate is there,
    /// so is its key.
    fn write(&self, name: &str, issued: &goutube::certs::Issued) {
        let whole = |file: String, body: &str| {
            let partial = self.path(&format!("{file}.partial"));
            std::fs::write(&partial, body).expect("writing a certificate or key");
            std::fs::rename(&partial, self.path(&file)).expect("renaming a certificate or key");
        };
        whole(format!("{name}-key.pem"), &issued.key_pem);
        whole(format!("{name}.pem"), &issued.cert_pem);
    }

    /// The `[tls]` section of node `name` (its certificate is made on first use).
    pub fn node(&self, name: &str) -> goutube::config::TlsSection {
        self.node_at(name, &[])
    }

    /// [`Pki::node`], its certificate valid also for `sans` (host names or IPs) when made.
    pub fn node_at(&self, name: &str, sans: &[String]) -> goutube::config::TlsSection {
        let file = format!("node-{name}");
        let _issuing = self.issuing.lock().expect("poisoned");
        if !self.path(&format!("{file}.pem")).exists() {
            let issued = self
                .ca
                .node(name, sans, goutube::certs::Validity::days(1))
                .expect("a node certificate");
            self.write(&file, &issued);
        }
        goutube::config::TlsSection {
            ca: self.path("ca.pem"),
            cert: self.path(&format!("{file}.pem")),
            key: self.path(&format!("{file}-key.pem")),
            peer: None,
        }
    }

    /// The cluster key file of the test cluster (gossip must be sealed when TLS is on).
    pub fn cluster_key(&self) -> PathBuf {
        let path = self.path("cluster.key");
        if !path.exists() {
            std::fs::write(&path, "the cluster key of the tests\n").expect("writing the key");
        }
        path
    }

    /// The `[tls]` section of node `name` and the `[cluster]` key, as TOML for child processes.
    pub fn node_toml(&self, name: &str) -> String {
        self.node_toml_at(name, &[])
    }

    /// [`Pki::node_toml`], the certificate valid also for `sans` when made.
    pub fn node_toml_at(&self, name: &str, sans: &[String]) -> String {
        let tls = self.node_at(name, sans);
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}\n",
            tls.ca,
            tls.cert,
            tls.key,
            self.cluster_key()
        )
    }

    /// Client options for `subject` (its certificate is made on first use) to `addr`.
    pub fn client_options(&self, subject: &str, addr: &str) -> ClientOptions {
        let file = format!("client-{subject}");
        let _issuing = self.issuing.lock().expect("poisoned");
        if !self.path(&format!("{file}.pem")).exists() {
            let validity = goutube::certs::Validity::days(1);
            let issued = self
                .ca
                .client(subject, validity)
                .expect("a client certificate");
            self.write(&file, &issued);
        }
        self.client_files(&file, addr)
    }

    /// Client options with a certificate for `subject` issued now by `ca` (another CA in tests
    /// of refusals), valid for `validity`: files of their own, so that the certificate
    /// [`Pki::client_options`] gives stays as it is.
    pub fn client_options_from(
        &self,
        ca: &goutube::certs::Authority,
        subject: &str,
        validity: goutube::certs::Validity,
        addr: &str,
    ) -> ClientOptions {
        let mut issued_before = self.issuing.lock().expect("poisoned");
        *issued_before += 1;
        let file = format!("client-{subject}-{}", *issued_before);
        let issued = ca.client(subject, validity).expect("a client certificate");
        self.write(&file, &issued);
        self.client_files(&file, addr)
    }

    /// Client options to `addr` with the certificate and key in `<file>.pem`, `<file>-key.pem`.
    fn client_files(&self, file: &str, addr: &str) -> ClientOptions {
        ClientOptions {
            addr: addr.to_owned(),
            tls: Some(goutube::client::ClientTls {
                ca: self.path("ca.pem"),
                cert: self.path(&format!("{file}.pem")),
                key: self.path(&format!("{file}-key.pem")),
                server_name: None,
            }),
        }
    }

    /// The generated client for `subject`, over mTLS.
    pub async fn client(&self, subject: &str, addr: &str) -> StreamingClient<Channel> {
        Client::connect(&self.client_options(subject, addr))
            .await
            .expect("connecting over mTLS")
            .raw()
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

/// A port that was free a moment ago (for nodes that must keep their address across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("binding port 0")
        .local_addr()
        .expect("local address")
        .port()
}

/// The part of a URL after the host: what a browser would request.
pub fn url_target(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    rest.find('/')
        .map_or_else(|| "/".to_owned(), |at| rest[at..].to_owned())
}

/// A whole HTTP/1.1 answer.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl HttpAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// An HTTP/1.1 request to `addr` (plaintext, or TLS with `tls`), answered whole. `target` is
/// the path and query, sent as written.
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> HttpAnswer {
    use http_body_util::BodyExt;
    let response = http_response(addr, method, target, headers, tls).await;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .expect("reading the body")
        .to_bytes()
        .to_vec();
    HttpAnswer {
        status,
        headers,
        body,
    }
}

/// The answer to an HTTP/1.1 request, its body still to be read (dropping it closes the
/// connection).
pub async fn http_response(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> hyper::Response<hyper::body::Incoming> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connecting to the gateway");
    match tls {
        None => send(tcp, addr, method, target, headers).await,
        Some(config) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the gateway");
            send(stream, addr, method, target, headers).await
        }
    }
}

async fn send<Io>(
    io: Io,
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
) -> hyper::Response<hyper::body::Incoming>
where
    Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string());
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Empty::<Bytes>::new())
        .expect("a valid request");
    sender.send_request(request).await.expect("an HTTP answer")
}

/// `id` as a URL path (each character that needs it percent-encoded, `/` kept).
pub fn url_path(id: &str) -> String {
    const SET: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'/')
        .remove(b'-')
        .remove(b'_')
        .remove(b'.');
    percent_encoding::utf8_percent_encode(id, SET).to_string()
}

impl Pki {
    /// A TLS client configuration that trusts the test CA, with the client certificate of
    /// `subject` or none.
    pub fn https(&self, subject: Option<&str>) -> std::sync::Arc<rustls::ClientConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(self.path("ca.pem")).expect("the CA"))
            .expect("a root");
        let builder = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots);
        let config = match subject {
            None => builder.with_no_client_auth(),
            Some(subject) => {
                let tls = self.client_options(subject, "").tls.expect("client TLS");
                let chain = CertificateDer::pem_file_iter(&tls.cert)
                    .expect("the certificate")
                    .collect::<Result<Vec<_>, _>>()
                    .expect("PEM certificates");
                let key = PrivateKeyDer::from_pem_file(&tls.key).expect("the key");
                builder
                    .with_client_auth_cert(chain, key)
                    .expect("a client certificate")
            }
        };
        std::sync::Arc::new(config)
    }
}

/// The live followers the leader reached with `options` reports (`GetFollowers`).
pub async fn followers_of(options: &ClientOptions) -> Vec<goutube::proto::Server> {
    use goutube::proto::GetFollowersRequest;
    use goutube::proto::follower_resolver_helper_client::FollowerResolverHelperClient;
    let channel = goutube::client::channel(options).await.unwrap();
    FollowerResolverHelperClient::new(channel)
        .get_followers(GetFollowersRequest {})
        .await
        .unwrap()
        .into_inner()
        .servers
}

/// How many followers the leader at `addr` (plaintext) reports connected.
pub async fn connected_followers(addr: &str) -> usize {
    followers_of(&ClientOptions {
        addr: addr.to_owned(),
        tls: None,
    })
    .await
    .len()
}

/// A leader running in this process with followers running as processes (so that they can be
/// killed and stopped), and a balancer: the shape of the tests of reads that survive a replica.
pub struct ProcessReplicas {
    pub leader: TestNode,
    /// `None` once killed.
    pub followers: Vec<Option<NodeProcess>>,
    pub balancer: TestNode,
    dirs: Vec<TempDir>,
}

impl ProcessReplicas {
    /// Starts the leader, `followers` follower processes and the balancer, and waits until the
    /// followers are connected and the balancer sees every member and the ring.
    pub async fn start(followers: usize) -> ProcessReplicas {
        use goutube::config::Role;
        let leader = TestNode::start(|c| {
            c.node_name = "leader".into();
            c.role = Role::Leader;
        })
        .await;
        let seed = leader.node.gossip_addr().to_string();
        let mut dirs = Vec::new();
        let mut processes = Vec::new();
        for i in 0..followers {
            let dir = tempfile::tempdir().unwrap();
            let config = write_node_config(
                dir.path(),
                &format!("follower-{i}"),
                &format!(
                    "role = \"follower\"\nleader_addresses = [\"{}\"]\nseed_addresses = [\"{seed}\"]\n[storage]\nfsync = \"never\"",
                    leader.node.replication_addr()
                ),
            );
            processes.push(Some(NodeProcess::spawn(&config)));
            dirs.push(dir);
        }
        let balancer = TestNode::start(move |c| {
            c.node_name = "balancer".into();
            c.role = Role::Balancer;
            c.seed_addresses = vec![seed];
        })
        .await;
        let replicas = ProcessReplicas {
            leader,
            followers: processes,
            balancer,
            dirs,
        };
        eventually("the followers connected", || async {
            replicas.connected_followers().await == followers
        })
        .await;
        eventually("the balancer sees every member", || {
            sees(&replicas.balancer, followers + 2)
        })
        .await;
        replicas
    }

    /// How many followers the leader reports connected.
    pub async fn connected_followers(&self) -> usize {
        connected_followers(&self.leader.addr()).await
    }

    /// Writes `size` bytes of a non-periodic point through the leader (frames of 256 KiB) and
    /// waits until every follower holds all of it. Returns the bytes.
    pub async fn point_everywhere(&self, point: &str, size: usize) -> Vec<u8> {
        let frames: Vec<Vec<u8>> = (0..size / (256 * 1024))
            .map(|i| data(i as u64 + 7, 256 * 1024))
            .collect();
        produce(&mut self.leader.client().await, point, &frames)
            .await
            .unwrap();
        for follower in self.followers.iter().flatten() {
            eventually("the follower's copy", || async {
                metadata(&mut raw_client(&follower.rpc).await, point)
                    .await
                    .is_ok_and(|m| m.size == size as u64)
            })
            .await;
        }
        frames.concat()
    }

    /// Stops the in-process nodes; the follower processes die with their handles.
    pub async fn shutdown(self) {
        self.balancer.shutdown().await;
        self.leader.shutdown().await;
        drop(self.followers);
        drop(self.dirs);
    }
}

/// A small filesystem of its own (a `tmpfs` of a given size, mounted on a temporary
/// directory), for tests of a disk that fills up. Needs root, as the rest of the suite's
/// network tests do; unmounted when dropped.
pub struct SmallDisk {
    dir: TempDir,
}

impl SmallDisk {
    /// Mounts a filesystem of `bytes`.
    pub fn mount(bytes: u64) -> SmallDisk {
        let dir = tempfile::tempdir().expect("temporary directory");
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "goutube-test",
            ])
            .arg(dir.path())
            .status()
            .expect("running mount");
        assert!(status.success(), "mounting a tmpfs (needs root): {status}");
        SmallDisk { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills what space is left with the file `name` (it is removed to give the space back).
    pub fn fill(&self, name: &str) -> u64 {
        use std::io::Write;
        let mut file = std::fs::File::create(self.path().join(name)).expect("creating ballast");
        let chunk = vec![0x5Au8; 4096];
        let mut written = 0;
        loop {
            match file.write(&chunk) {
                Ok(0) => return written,
                Ok(n) => written += n as u64,
                Err(error) if error.raw_os_error() == Some(28) => return written,
                Err(error) => panic!("filling the disk: {error}"),
            }
        }
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
