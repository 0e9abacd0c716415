//! The command line: `run` a node, and the client commands (`put`, `get`, `stat`, `ls`, `rm`,
//! `members`).
//!
//! Client commands connect with the flags of [`Connection`] (or their `GOUTUBE_CLIENT_…`
//! variables). Progress bars draw on stderr only when it is a terminal. `bench` lives in [`bench`].

mod bench;
mod commands;

use commands::{certs, get, ls, members_change, members_list, put, rm, stat, url};

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use tracing_subscriber::EnvFilter;

use goutube::client::{Client, ClientError, ClientOptions, ClientTls, DEFAULT_CHUNK, Progress};
use goutube::config::Config;
use goutube::node::{Listeners, Node};
use goutube::proto::ListMembersResponse;

#[derive(Debug, Parser)]
#[command(
    name = "goutube",
    version,
    about = "Stores named append-only byte streams and streams them back over gRPC"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a node (without --config: a standalone node on 127.0.0.1 with ./goutube-data).
    Run {
        /// TOML configuration file; `GOUTUBE_…` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Upload a file as a new point (verified: the point is the file). A point that has bytes
    /// already is refused unless --resume or --append says what to do with it.
    Put {
        file: PathBuf,
        point: String,
        /// Continue an interrupted upload: the point's bytes are checked to be the start of the
        /// file, then the rest is sent.
        #[arg(long, conflicts_with = "append")]
        resume: bool,
        /// Add the file after what the point holds.
        #[arg(long)]
        append: bool,
        /// Bytes per frame.
        #[arg(long, default_value_t = DEFAULT_CHUNK)]
        chunk_size: usize,
        /// Media type of a new point (`video/mp4`); without it readers see a sniffed one.
        #[arg(long)]
        content_type: Option<String>,
        #[command(flatten)]
        connection: Connection,
    },
    /// Download a point into a file, from several replicas in parallel, verified.
    Get {
        point: String,
        file: PathBuf,
        /// Continue an interrupted download from FILE.part (what in it is verified is kept).
        #[arg(long)]
        resume: bool,
        /// Replace FILE if it exists.
        #[arg(long)]
        force: bool,
        /// Never fetch a slow range a second time from another replica (saves bandwidth; a
        /// stalled replica then stalls the download until it fails).
        #[arg(long)]
        no_hedge: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show a point's size, checksum and workers.
    Stat {
        point: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// List point ids.
    Ls {
        /// Only ids starting with this prefix.
        #[arg(default_value = "")]
        prefix: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Delete a point.
    Rm {
        point: String,
        #[command(flatten)]
        connection: Connection,
    },
    /// Show the cluster as a node sees it: the ring's members and every live member; or change
    /// a member (`goutube members drain NODE`).
    Members {
        /// `drain`: NODE hands every point it owns to the point's next owner, then leaves the
        /// ring (`left`) and may be stopped. `cleanup`: NODE deletes now the copies it handed
        /// over (kept, serving reads, until their new owner holds them replicated). Both are
        /// asked of NODE itself, found through --addr. `forget`: NODE, a dead primary, is
        /// forgotten (asked of the --addr node); its points are taken over from its followers'
        /// copies, and if it ever returns it steps down. `voters`: NODE is the list of the
        /// controller's voters wanted, comma-separated (1, 3 or 5 live primaries): each new one
        /// catches the controller's log up, then the list is committed. `transfer`: NODE, the
        /// leader of a replica group, hands it to a member of its in-sync set (--to, else the
        /// one least behind) without failing a write; asked of NODE itself. `elect`: NODE is a
        /// replica group's slot whose leader is lost with no in-sync member live; --to, one of
        /// its followers, leads it from now on, outside the in-sync set: acknowledged writes
        /// only the lost members held are lost, so it needs --unclean.
        #[arg(value_enum, requires = "node")]
        action: Option<MembersAction>,
        /// The member to change (`voters`: the voters, comma-separated; `elect`: the slot).
        node: Option<String>,
        /// `transfer`, `elect`: the member to lead instead.
        #[arg(long)]
        to: Option<String>,
        /// `elect`: the operator knows that acknowledged writes may be lost.
        #[arg(long)]
        unclean: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Print a signed URL of the node's HTTP gateway for a point (or, with `--pages`, of its
    /// pages): a browser or a player can read it, without a certificate, until it expires.
    Url {
        #[arg(required_unless_present = "pages")]
        point: Option<String>,
        /// How long the URL is valid (`90s`, `30m`, `1h`, `7d`).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// The player page (`/v1/player/…`) rather than the bytes.
        #[arg(long)]
        player: bool,
        /// The pages (`/v1/pages/points`, and from there the cluster page) rather than a point.
        #[arg(long, conflicts_with_all = ["point", "player"])]
        pages: bool,
        #[command(flatten)]
        connection: Connection,
    },
    /// Write a development CA, node and client certificates (PEM) and a cluster key (keys 0600).
    Certs {
        /// Directory to write to; an existing CA there is reused.
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Node names, one certificate each (common name `node:<name>`). Without --node and
        /// --client: the host name; with --client only, none.
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Extra host names or IP addresses the node certificates are valid for (besides
        /// localhost, 127.0.0.1, ::1 and the node name).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Client subjects, one certificate each; default: root and nobody.
        #[arg(long = "client")]
        clients: Vec<String>,
        /// Validity of node and client certificates, in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Replace existing files (and the CA).
        #[arg(long)]
        force: bool,
    },
    /// Measure throughput and resources against baselines (build with --release).
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Work on this node's controller files, the node stopped (`docs/controller.md`).
    #[command(subcommand)]
    Controller(ControllerCommand),
}

/// `goutube controller …`.
#[derive(Debug, Subcommand)]
pub(crate) enum ControllerCommand {
    /// After a permanent loss of the controller's quorum only: makes this node the controller's
    /// only voter, keeping every decision it holds. Decisions the lost voters made that never
    /// reached it are lost. Run on the surviving voter that is furthest ahead, its node
    /// stopped; start it, then add voters with `goutube members voters`.
    Recover {
        /// The node's TOML configuration (its name and data_dir); `GOUTUBE_…` override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Confirms that decisions may be lost.
        #[arg(long)]
        yes: bool,
    },
}

/// How client commands reach a node.
#[derive(Debug, Args)]
pub(crate) struct Connection {
    /// Address of the node's gRPC API.
    #[arg(long, env = "GOUTUBE_CLIENT_ADDR", default_value = "127.0.0.1:8400")]
    pub addr: String,
    /// CA certificate (PEM) to verify the node with; enables TLS.
    #[arg(long, env = "GOUTUBE_CLIENT_CA", requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM); its common name is the subject the node authorizes.
    #[arg(long, env = "GOUTUBE_CLIENT_CERT", requires = "ca")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    #[arg(long, env = "GOUTUBE_CLIENT_KEY", requires = "ca")]
    pub key: Option<PathBuf>,
    /// Name to verify the node's certificate against (default: the host of --addr).
    #[arg(long, env = "GOUTUBE_CLIENT_SERVER_NAME")]
    pub server_name: Option<String>,
}

impl Connection {
    fn options(&self) -> ClientOptions {
        let tls = match (&self.ca, &self.cert, &self.key) {
            (Some(ca), Some(cert), Some(key)) => Some(ClientTls {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
                server_name: self.server_name.clone(),
            }),
            _ => None,
        };
        ClientOptions {
            addr: self.addr.clone(),
            tls,
        }
    }

    async fn connect(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.options()).await?)
    }
}

/// What `goutube members` does to a member.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum MembersAction {
    Drain,
    Cleanup,
    Forget,
    Voters,
    Transfer,
    Elect,
}

impl Command {
    /// The connection flags of a client command.
    fn connection(&self) -> Option<&Connection> {
        match self {
            Command::Put { connection, .. }
            | Command::Get { connection, .. }
            | Command::Stat { connection, .. }
            | Command::Ls { connection, .. }
            | Command::Rm { connection, .. }
            | Command::Members { connection, .. }
            | Command::Url { connection, .. } => Some(connection),
            Command::Run { .. }
            | Command::Certs { .. }
            | Command::Bench(_)
            | Command::Controller(_) => None,
        }
    }
}

/// Explains the usual causes of a failure that says little by itself: a connection dropped
/// during the handshake (plaintext against a TLS node, or TLS against a plaintext one), and an
/// answer in plain HTTP (the node's HTTP port, not its gRPC one). Statuses the node sent are
/// left as they are: they say what happened.
fn hint(error: anyhow::Error, connection: Option<(String, bool)>) -> anyhow::Error {
    let Some((addr, tls)) = connection else {
        return error;
    };
    let hint = match error.downcast_ref::<ClientError>() {
        Some(ClientError::Status(status))
            if status.message().contains("grpc-status header missing") =>
        {
            Some(format!(
                "{addr} answered in plain HTTP, not gRPC: is it a node's HTTP port? A node's gRPC \
                 API is on its rpc_port (8400 unless configured)"
            ))
        }
        // No status from the node: the connection itself failed.
        Some(ClientError::Status(status))
            if std::error::Error::source(status).is_some() && !tls =>
        {
            Some(format!(
                "{addr} closed the connection; if the node requires TLS, pass --ca, --cert and --key"
            ))
        }
        Some(ClientError::Connect { source, .. })
            if tls && format!("{source:?}").contains("InvalidContentType") =>
        {
            Some(format!(
                "{addr} does not speak TLS: leave out --ca, --cert and --key for a node without [tls]"
            ))
        }
        _ => None,
    };
    match hint {
        Some(hint) => error.context(hint),
        None => error,
    }
}

pub(crate) async fn execute(cli: Cli) -> anyhow::Result<()> {
    let connection = cli
        .command
        .connection()
        .map(|c| (c.addr.clone(), c.ca.is_some()));
    command(cli.command).await.map_err(|e| hint(e, connection))
}

async fn command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => run(config).await,
        Command::Put {
            file,
            point,
            resume,
            append,
            chunk_size,
            content_type,
            connection,
        } => {
            put(
                file,
                point,
                resume,
                append,
                chunk_size,
                content_type,
                connection,
            )
            .await
        }
        Command::Get {
            point,
            file,
            resume,
            force,
            no_hedge,
            connection,
        } => get(point, file, resume, force, no_hedge, connection).await,
        Command::Stat { point, connection } => stat(point, connection).await,
        Command::Ls { prefix, connection } => ls(prefix, connection).await,
        Command::Certs {
            out,
            nodes,
            sans,
            clients,
            days,
            force,
        } => certs(out, nodes, sans, clients, days, force),
        Command::Bench(bench) => {
            init_client_logging();
            bench::run(bench).await
        }
        Command::Rm { point, connection } => rm(point, connection).await,
        Command::Controller(ControllerCommand::Recover { config, yes }) => {
            recover_controller(config, yes)
        }
        Command::Members {
            action: None,
            connection,
            ..
        } => members_list(connection).await,
        Command::Members {
            action: Some(action),
            node,
            to,
            unclean,
            connection,
        } => members_change(action, node, (to, unclean), connection).await,
        Command::Url {
            point,
            ttl,
            player,
            pages,
            connection,
        } => url(point, ttl, player, pages, connection).await,
    }
}

/// `goutube controller recover`: the loud warning, then the recovery if confirmed.
fn recover_controller(config_file: Option<PathBuf>, yes: bool) -> anyhow::Result<()> {
    let config = Config::load(config_file.as_deref())?;
    let dir = config.controller_dir();
    eprintln!(
        "WARNING: this makes {} the controller's only voter, with the decisions its files in {} \
         hold. Use it only when a quorum of voters is lost for good: decisions that the lost \
         voters committed and that never reached this node are LOST. Other voters that survive \
         keep their files: add them back with `goutube members voters` once this node runs.",
        config.node_name,
        dir.display()
    );
    if !yes {
        anyhow::bail!("nothing changed: add --yes to recover");
    }
    let recovered = goutube::controller::recover(&dir, &config.node_name)?;
    println!(
        "{}: the controller's only voter now (was: {}), at entry {} of term {}, ring epoch {}. \
         Start the node, then add voters: goutube members voters {},B,C",
        config.node_name,
        recovered.voters_before.join(","),
        recovered.index,
        recovered.term,
        recovered.ring_epoch,
        config.node_name,
    );
    Ok(())
}

/// The node's log filter: `log.level`, with openraft's own records off unless the level names
/// openraft (it logs every retry to a voter that is down, several a second, as an error). The
/// controller logs its decisions and its storage failures itself; its status says who leads.
fn log_filter(level: &str) -> String {
    if level.contains("openraft") {
        level.to_owned()
    } else {
        format!("{level},openraft=off")
    }
}

async fn run(config_file: Option<PathBuf>) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};

    let config = Config::load(config_file.as_deref())?;
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new(log_filter(&config.log.level)))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    // Plugins first (compiled, or taken from the compile cache): their errors are not hidden
    // behind a port in use, and a large one is ready before the node says it is.
    let plugins = goutube::node::load_plugins(&config).await?;
    let listeners = Listeners::bind(&config).await?;
    let addresses = listeners.addresses(&config)?;
    let node = Node::start_with(config, listeners, plugins).await?;
    // The handlers come before the listening line: a SIGTERM sent by whoever waited for the
    // line must reach the graceful shutdown, not the default action.
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    // One line on stdout with every bound address (ports may have been 0), once the node
    // serves: scripts and tests wait for it.
    println!("{}", addresses.listening_line());
    let ended = node.ended();
    tokio::pin!(ended);
    let broken = loop {
        tokio::select! {
            _ = interrupt.recv() => break None,
            _ = terminate.recv() => break None,
            _ = hangup.recv() => reload(&node, config_file.as_deref()).await,
            why = &mut ended => break Some(why),
        }
    };
    if let Some(why) = &broken {
        tracing::error!(%why, "a subsystem ended; shutting the node down");
    }
    node.shutdown().await.context("shutting down")?;
    match broken {
        Some(why) => anyhow::bail!("the node stopped: {why}"),
        None => Ok(()),
    }
}

/// SIGHUP: re-reads the configuration and reloads the plugins and policies. A reload that fails
/// keeps the current plugins and says why.
async fn reload(node: &Node, config_file: Option<&Path>) {
    let result = match Config::load(config_file) {
        Ok(config) => {
            let mut unchanged = node.config().clone();
            unchanged.plugins = config.plugins.clone();
            if unchanged != config {
                tracing::warn!(
                    "reload applies [plugins] only; restart the node to apply the other changes"
                );
            }
            node.reload(&config).await.map_err(|e| e.to_string())
        }
        Err(error) => Err(error.to_string()),
    };
    let outcome = match result {
        Ok(()) => "ok",
        Err(error) => {
            tracing::error!(%error, "reload failed; keeping the current plugins");
            "error"
        }
    };
    metrics::counter!(goutube::metrics::PLUGIN_RELOADS, "result" => outcome).increment(1);
}

fn init_client_logging() {
    let filter =
        EnvFilter::try_from_env("GOUTUBE_CLIENT_LOG").unwrap_or_else(|_| EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `goutube members`: one row per member, then the view and the ring.
fn print_members(members: &ListMembersResponse) {
    let rows: Vec<[String; 7]> = members
        .members
        .iter()
        .map(|m| {
            let mut tags: Vec<String> = m.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            tags.sort();
            let role = match m.leader.as_str() {
                "" => m.role.clone(),
                leader => format!("{} of {leader}", m.role),
            };
            let ring = match (m.in_ring, m.owns_range) {
                (true, true) => "owner",
                (true, false) => "no range",
                (false, _) => "-",
            };
            let mut state = match m.moving {
                0 => m.state.clone(),
                moving => format!("{}, handing over {moving}", m.state),
            };
            if !m.handed.is_empty() {
                state = format!("{state}, handed {}", m.handed);
            }
            [
                m.name.clone(),
                role,
                state,
                if m.live { "up" } else { "DOWN" }.into(),
                ring.into(),
                m.rpc_addr.clone(),
                tags.join(","),
            ]
        })
        .collect();
    let header = ["NAME", "ROLE", "STATE", "LIVE", "RING", "RPC", "TAGS"];
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    println!();
    println!("view {} (seen by {})", members.view, members.node);
    match members.ring.as_str() {
        "" => println!("ring not formed yet"),
        ring => println!("ring {ring}"),
    }
    if !members.conflict.is_empty() {
        println!("CONFLICT: {}", members.conflict);
    }
    match &members.controller {
        None => println!("controller not known yet"),
        Some(controller) => {
            let leader = match controller.leader.as_str() {
                "" => "NO LEADER (no quorum: topology changes wait)",
                leader => leader,
            };
            println!(
                "controller: voters {} · leader {leader} · term {} · applied {} · ring epoch {}",
                controller.voters.join(","),
                controller.term,
                controller.applied,
                controller.ring_epoch
            );
            for group in &controller.groups {
                let list = |names: &[String]| match names {
                    [] => "none".to_owned(),
                    names => names.join(","),
                };
                println!(
                    "group {}: leader {} (epoch {}) · followers {} · in sync {} · failover {}",
                    group.slot,
                    group.leader,
                    group.leader_epoch,
                    list(&group.followers),
                    list(&group.in_sync),
                    group.failover
                );
                if group.leader_unclean {
                    println!(
                        "  {} came back from a stop that was not clean: it takes no writes until \
                         the controller names a member of the in-sync set leader",
                        group.leader
                    );
                }
            }
        }
    }
}

/// A token cancelled by the first Ctrl-C (SIGINT) or SIGTERM: a download then journals what
/// it holds and stops.
fn interrupted() -> anyhow::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = tokio_util::sync::CancellationToken::new();
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

/// A progress bar fed by the client's progress reports.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn start(&self, total: u64, done: u64) {
        self.0.set_length(total);
        self.0.set_position(done);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .expect("static template"),
    );
    bar
}

fn print_rate(bytes: u64, started: Instant) {
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{:.1} MiB in {:.2} s ({:.1} MiB/s)",
        bytes as f64 / 1048576.0,
        seconds,
        bytes as f64 / 1048576.0 / seconds.max(1e-9)
    );
}
