//! The client subcommands (`put`, `get`, `stat`, `ls`, `rm`, `members`, `url`) and `certs`:
//! each parses nothing (clap did), calls the client library and prints what happened.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use goutube::client::{ClientError, GetOptions, PutMode, PutOptions};
use goutube::config::Config;

use super::{
    Bar, Connection, MembersAction, init_client_logging, interrupted, print_members, print_rate,
    progress_bar,
};

/// `goutube put`: uploads a file as a point (new, resumed or appended) and reports what was verified.
pub(super) async fn put(
    file: PathBuf,
    point: String,
    resume: bool,
    append: bool,
    chunk_size: usize,
    content_type: Option<String>,
    connection: Connection,
) -> anyhow::Result<()> {
    init_client_logging();
    anyhow::ensure!(chunk_size > 0, "--chunk-size must be at least 1");
    let mode = match (resume, append) {
        (true, _) => PutMode::Resume,
        (_, true) => PutMode::Append,
        _ => PutMode::New,
    };
    let options = PutOptions {
        chunk: chunk_size,
        content_type,
        mode,
    };
    let client = connection.connect().await?;
    let started = Instant::now();
    let progress = Arc::new(Bar(progress_bar()));
    let put = client.put(&point, &file, &options, progress.clone()).await;
    progress.0.finish_and_clear();
    let report = match put {
        Err(ClientError::Exists { size, .. }) => anyhow::bail!(
            "point {point} already has {size} bytes; nothing was written. `goutube put \
             {file} {point} --resume` continues an interrupted upload of this file (the \
             point's bytes are checked against its start), `--append` adds the file after \
             them",
            file = file.display()
        ),
        other => other?,
    };
    let record = report.record;
    if let Some(owner) = &report.redirected {
        println!(
            "{point}: written to member {} at {}, which takes its writes",
            owner.member, owner.rpc_addr
        );
    }
    if report.retries > 0 {
        println!(
            "{point}: resumed {} time(s) after failures; no byte was written twice",
            report.retries
        );
    }
    match mode {
        PutMode::Append => println!(
            "{point}: appended {} bytes at {}; the point now has {} bytes, crc32c {:08x} \
             (verified: its first {} bytes, then the file)",
            report.bytes, report.start, record.end, record.crc32c, report.start
        ),
        PutMode::New | PutMode::Resume => {
            if report.resumed > 0 {
                println!(
                    "{point}: its {} bytes were the start of the file; sent the rest",
                    report.resumed
                );
            }
            println!(
                "{point}: {} bytes, crc32c {:08x} (verified: the point is the file)",
                record.end, record.crc32c
            );
        }
    }
    print_rate(report.bytes - report.resumed, started);
    Ok(())
}

/// `goutube get`: downloads a point into a file with verified multi-stream reads.
pub(super) async fn get(
    point: String,
    file: PathBuf,
    resume: bool,
    force: bool,
    no_hedge: bool,
    connection: Connection,
) -> anyhow::Result<()> {
    init_client_logging();
    let client = connection.connect().await?;
    let started = Instant::now();
    let progress = Arc::new(Bar(progress_bar()));
    let options = GetOptions {
        resume,
        hedge: !no_hedge,
        overwrite: force,
        interrupt: interrupted()?,
    };
    let got = client.get(&point, &file, &options, progress.clone()).await;
    progress.0.finish_and_clear();
    let report = match got {
        Err(ClientError::FileExists(path)) => anyhow::bail!(
            "{} exists already; nothing was downloaded (--force replaces it)",
            path.display()
        ),
        Err(error @ ClientError::Interrupted { .. }) => anyhow::bail!(
            "{error}; `goutube get {point} {} --resume` continues from there",
            file.display()
        ),
        other => other?,
    };
    println!(
        "{point}: {} bytes into {} from {} worker(s), crc32c {:08x} verified",
        report.size,
        file.display(),
        report.workers,
        report.crc32c
    );
    if report.resumed > 0 {
        println!(
            "resumed: {} bytes were already verified, {} fetched",
            report.resumed, report.fetched
        );
    }
    if report.retries + report.hedges > 0 {
        println!(
            "{} range(s) continued elsewhere, {} hedged",
            report.retries, report.hedges
        );
    }
    print_rate(report.size - report.resumed, started);
    Ok(())
}

/// `goutube stat`: a point's facts and its replicas.
pub(super) async fn stat(point: String, connection: Connection) -> anyhow::Result<()> {
    init_client_logging();
    let meta = connection.connect().await?.stat(&point).await?;
    println!("point:   {point}");
    println!("size:    {}", meta.size);
    if let Some(stored) = meta.stored_size.filter(|stored| *stored != meta.size) {
        // Bytes written but not committed yet (docs/failover.md): not served to consumers.
        println!(
            "stored:  {stored} (the last {} not committed yet)",
            stored - meta.size
        );
    }
    println!("type:    {}", meta.content_type);
    println!("crc32c:  {:08x}", meta.crc32c);
    println!("epoch:   {}", meta.epoch);
    println!("owner:   {}", meta.owner);
    println!("node:    {} ({})", meta.node, meta.role);
    println!("workers: {}", meta.workers.join(", "));
    for replica in meta.replicas {
        println!(
            "replica: {} at {} {}, confirmed {} bytes, lag {} bytes",
            replica.follower,
            replica.rpc_addr,
            if replica.connected {
                "connected"
            } else {
                "NOT CONNECTED"
            },
            replica.end,
            replica.lag
        );
    }
    Ok(())
}

/// `goutube ls`: the points under a prefix, and the members whose points are missing.
pub(super) async fn ls(prefix: String, connection: Connection) -> anyhow::Result<()> {
    init_client_logging();
    let listing = connection.connect().await?.list(&prefix).await?;
    for point in &listing.points {
        println!("{}", goutube::text::escaped(point));
    }
    for member in &listing.missing {
        eprintln!(
            "warning: member {member} is down and none of its followers is up: its \
             points are not listed"
        );
    }
    Ok(())
}

/// `goutube certs`: a development PKI, and the config lines that use it.
pub(super) fn certs(
    out: PathBuf,
    mut nodes: Vec<String>,
    sans: Vec<String>,
    mut clients: Vec<String>,
    days: i64,
    force: bool,
) -> anyhow::Result<()> {
    // Asked for client certificates only, no node certificate is made.
    if nodes.is_empty() && clients.is_empty() {
        nodes.push(Config::default().node_name);
    }
    if clients.is_empty() {
        clients = vec!["root".into(), "nobody".into()];
    }
    anyhow::ensure!(days > 0, "--days must be at least 1");
    let written = goutube::certs::write(&goutube::certs::Request {
        out: &out,
        nodes: &nodes,
        sans: &sans,
        clients: &clients,
        days,
        force,
    })?;
    for path in &written {
        println!("wrote {}", path.display());
    }
    if let Some(node) = nodes.first() {
        println!(
            "\nnode config:\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}",
            out.join("ca.pem"),
            out.join(format!("node-{node}.pem")),
            out.join(format!("node-{node}-key.pem")),
            out.join(goutube::certs::CLUSTER_KEY_FILE)
        );
    }
    if let Some(client) = clients.first() {
        println!(
            "\nclient flags: --ca {} --cert {} --key {}",
            out.join("ca.pem").display(),
            out.join(format!("client-{client}.pem")).display(),
            out.join(format!("client-{client}-key.pem")).display()
        );
    }
    Ok(())
}

/// `goutube rm`: deletes a point.
pub(super) async fn rm(point: String, connection: Connection) -> anyhow::Result<()> {
    init_client_logging();
    let size = connection.connect().await?.delete(&point).await?;
    println!("{point}: deleted ({size} bytes)");
    Ok(())
}

/// `goutube members`: the table of members.
pub(super) async fn members_list(connection: Connection) -> anyhow::Result<()> {
    init_client_logging();
    let members = connection.connect().await?.members().await?;
    print_members(&members);
    Ok(())
}

/// `goutube members drain|cleanup|forget|transfer NODE`, `goutube members voters A,B,C`,
/// `goutube members elect SLOT --to M --unclean`.
pub(super) async fn members_change(
    action: MembersAction,
    node: Option<String>,
    (to, unclean): (Option<String>, bool),
    connection: Connection,
) -> anyhow::Result<()> {
    init_client_logging();
    let node = node.expect("clap requires the node with an action");
    if to.is_some() && !matches!(action, MembersAction::Transfer | MembersAction::Elect) {
        anyhow::bail!(
            "--to names the member to lead after a transfer or an election: only `transfer` \
             and `elect` take it"
        );
    }
    if unclean && !matches!(action, MembersAction::Elect) {
        anyhow::bail!("--unclean is for `elect` only");
    }
    let client = connection.connect().await?;
    let options = connection.options();
    match action {
        MembersAction::Drain => {
            let state = client.drain(&node, &options).await?;
            println!(
                "{node}: {state}; it hands its points to their next owners, then leaves \
                 the ring (watch `goutube members`)"
            );
        }
        MembersAction::Cleanup => {
            let cleaned = client.cleanup(&node, &options).await?;
            println!(
                "{node}: deleted {} handed-over copies ({} bytes)",
                cleaned.points, cleaned.bytes
            );
        }
        MembersAction::Forget => {
            let state = client.forget(&node).await?;
            println!(
                "{node}: {state}; its new owners take its points over from its \
                 followers' copies (watch `goutube members`)"
            );
        }
        MembersAction::Transfer => {
            let handed = client.transfer(&node, to.as_deref(), &options).await?;
            for transfer in handed.transfers {
                println!(
                    "{}: led by {} now (writes held back {} ms)",
                    transfer.slot, transfer.to, transfer.held_ms
                );
            }
        }
        MembersAction::Elect => {
            let Some(to) = to else {
                anyhow::bail!("`elect` needs --to: the follower of {node}'s group to lead it");
            };
            if !unclean {
                anyhow::bail!(
                    "naming {to} the leader of {node} outside its in-sync set loses the \
                     acknowledged writes that only the lost members held; if that is what you \
                     want, run it again with --unclean"
                );
            }
            eprintln!(
                "warning: {to} leads {node} outside its in-sync set: acknowledged writes that \
                 only the lost members held are lost"
            );
            let elected = client.elect_unclean(&node, &to).await?;
            println!(
                "{node}: led by {} now, at epoch {}",
                elected.leader, elected.leader_epoch
            );
        }
        MembersAction::Voters => {
            let wanted: Vec<String> = node
                .split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect();
            let voters = client.set_voters(&wanted).await?;
            println!("the controller's voters: {}", voters.join(","));
        }
    }
    Ok(())
}

/// `goutube url`: a signed gateway URL for a point, or for the pages.
pub(super) async fn url(
    point: Option<String>,
    ttl: std::time::Duration,
    player: bool,
    pages: bool,
    connection: Connection,
) -> anyhow::Result<()> {
    init_client_logging();
    let client = connection.connect().await?;
    let (url, expires) = match point {
        Some(point) if !pages => client.sign_url(&point, ttl, player).await?,
        _ => client.sign_pages_url(ttl).await?,
    };
    println!("{url}");
    eprintln!("valid until {} (Unix seconds)", expires);
    Ok(())
}
