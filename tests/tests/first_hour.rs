//! A user's first hour, as the README leads it: nothing a user retries corrupts a point, an
//! interrupted download resumes with what it has, every node answers for the whole cluster,
//! every error says what to do, a node is ready when it says so, and the scripts work from
//! wherever they are run. Each case failed on the release before these changes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use goutube::config::Role;
use goutube::plugins::PluginSection;
use goutube_tests::{
    DEADLINE, NodeProcess, TestNode, data, eventually, goutube_bin, goutube_cli,
    leader_and_follower, metadata, one_ring, produce, stderr, stdout, window,
};
use tokio::process::Command;
use tonic::Code;

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_put_never_corrupts_the_point() {
    let node = TestNode::start(|_| {}).await;
    let addr = node.addr();
    let work = tempfile::tempdir().unwrap();
    let bytes = data(1, 5 * 1024 * 1024 + 333);
    let file = write(work.path(), "big.bin", &bytes);
    let file = file.to_str().unwrap();
    // What an interrupted `put` leaves: the start of the file.
    let cut = 2 * 1024 * 1024 + 17;
    produce(
        &mut node.client().await,
        "videos/int",
        &[bytes[..cut].to_vec()],
    )
    .await
    .unwrap();

    // The obvious retry writes nothing, and says what to do.
    let retry = goutube_cli(work.path(), &["put", file, "videos/int", "--addr", &addr]).await;
    assert!(!retry.status.success());
    let said = stderr(&retry);
    assert!(
        said.contains(&format!("already has {cut} bytes"))
            && said.contains("--resume")
            && said.contains("--append"),
        "{said}"
    );
    let meta = metadata(&mut node.client().await, "videos/int")
        .await
        .unwrap();
    assert_eq!(meta.size, cut as u64);

    // --resume checks the start and sends the rest: the point is the file.
    let resumed = goutube_cli(
        work.path(),
        &["put", file, "videos/int", "--resume", "--addr", &addr],
    )
    .await;
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(
        stdout(&resumed).contains(&format!("its {cut} bytes were the start of the file"))
            && stdout(&resumed).contains("(verified: the point is the file)"),
        "{}",
        stdout(&resumed)
    );
    let meta = metadata(&mut node.client().await, "videos/int")
        .await
        .unwrap();
    assert_eq!(
        (meta.size, meta.crc32c),
        (bytes.len() as u64, crc32c::crc32c(&bytes))
    );

    // Another file is not resumed onto it.
    let other = write(work.path(), "other.bin", &data(2, bytes.len() + 10));
    let refused = goutube_cli(
        work.path(),
        &[
            "put",
            other.to_str().unwrap(),
            "videos/int",
            "--resume",
            "--addr",
            &addr,
        ],
    )
    .await;
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("are not the start of"),
        "{}",
        stderr(&refused)
    );

    // An empty file makes an empty point.
    let empty = write(work.path(), "empty.bin", b"");
    let put = goutube_cli(
        work.path(),
        &[
            "put",
            empty.to_str().unwrap(),
            "videos/empty",
            "--addr",
            &addr,
        ],
    )
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    let meta = metadata(&mut node.client().await, "videos/empty")
        .await
        .unwrap();
    assert_eq!(meta.size, 0);

    // A real interruption (SIGINT at a random moment), then the same retry: never a byte twice.
    let mut child = std::process::Command::new(goutube_bin())
        .args([
            "put",
            file,
            "videos/sigint",
            "--addr",
            &addr,
            "--chunk-size",
            "65536",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let wait = Duration::from_millis(rand::random_range(0..300));
    tokio::time::sleep(wait).await;
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    child.wait().unwrap();
    let again = goutube_cli(
        work.path(),
        &["put", file, "videos/sigint", "--resume", "--addr", &addr],
    )
    .await;
    let held = metadata(&mut node.client().await, "videos/sigint").await;
    match held {
        Ok(meta) => {
            assert!(again.status.success(), "{}", stderr(&again));
            assert_eq!(
                (meta.size, meta.crc32c),
                (bytes.len() as u64, crc32c::crc32c(&bytes)),
                "after a SIGINT at {wait:?} and a resume"
            );
        }
        // Interrupted before its first frame: there is nothing to resume.
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_allowed_only_to_produce_can_put() {
    let work = tempfile::tempdir().unwrap();
    let acl = write(work.path(), "acl.txt", b"anonymous, up/*, produce\n");
    let node = TestNode::start(move |c| {
        c.plugins.authorizer = PluginSection {
            source: "builtin:acl-authorizer".into(),
            config_file: Some(acl),
            ..PluginSection::default()
        };
    })
    .await;
    let file = write(work.path(), "f.bin", &data(3, 300_000));
    let put = goutube_cli(
        work.path(),
        &[
            "put",
            file.to_str().unwrap(),
            "up/x",
            "--addr",
            &node.addr(),
        ],
    )
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(stdout(&put).contains("(verified"), "{}", stdout(&put));
    node.shutdown().await;
}

/// The bytes a download's journal says are in its `.part` file.
fn journaled(journal: &Path) -> u64 {
    let Ok(text) = std::fs::read(journal) else {
        return 0;
    };
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(&text) else {
        return 0;
    };
    value["done"]
        .as_array()
        .map(|pieces| {
            pieces
                .iter()
                .map(|p| p["end"].as_u64().unwrap() - p["start"].as_u64().unwrap())
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_get_resumes_with_only_what_is_missing() {
    let node = TestNode::start(|_| {}).await;
    let addr = node.addr();
    let size = 160 * 1024 * 1024;
    let bytes = data(4, size);
    let frames: Vec<Vec<u8>> = bytes.chunks(4 * 1024 * 1024).map(<[u8]>::to_vec).collect();
    produce(&mut node.client().await, "films/long", &frames)
        .await
        .unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("copy.bin");
    let journal = work.path().join("copy.bin.part.journal");
    let mut interrupted = 0;
    for round in 0..3 {
        let _ = std::fs::remove_file(&out);
        // Somewhere between a tenth and nine tenths in.
        let target = size as u64 * rand::random_range(10..90) / 100;
        let mut child = std::process::Command::new(goutube_bin())
            .args(["get", "films/long", out.to_str().unwrap(), "--addr", &addr])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while journaled(&journal) < target && child.try_wait().unwrap().is_none() {
            assert!(started.elapsed() < DEADLINE, "round {round}: no progress");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let ended = child.wait_with_output().unwrap();
        if ended.status.success() {
            // It finished before the signal: nothing to resume this round.
            continue;
        }
        interrupted += 1;
        let said = stderr(&ended);
        assert!(
            said.contains("interrupted") && said.contains("--resume"),
            "round {round}: {said}"
        );
        let kept = journaled(&journal);
        assert!(
            kept >= target,
            "round {round}: kept {kept} of the {target} seen"
        );
        let resumed = goutube_cli(
            work.path(),
            &["get", "films/long", "copy.bin", "--resume", "--addr", &addr],
        )
        .await;
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        let text = stdout(&resumed);
        let numbers: Vec<u64> = text
            .lines()
            .find(|l| l.starts_with("resumed:"))
            .unwrap_or_else(|| panic!("round {round}: {text}"))
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        let (verified, fetched) = (numbers[0], numbers[1]);
        assert!(verified >= kept, "round {round}: {text}");
        // One worker, no hedging: only what was missing crossed the wire.
        assert_eq!(verified + fetched, size as u64, "round {round}: {text}");
        assert!(std::fs::read(&out).unwrap() == bytes, "round {round}");
    }
    assert!(interrupted > 0, "no round was interrupted mid-way");

    // An existing file is not replaced unless asked.
    let again = goutube_cli(
        work.path(),
        &["get", "films/long", "copy.bin", "--addr", &addr],
    )
    .await;
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("exists already") && stderr(&again).contains("--force"),
        "{}",
        stderr(&again)
    );
    let forced = goutube_cli(
        work.path(),
        &["get", "films/long", "copy.bin", "--force", "--addr", &addr],
    )
    .await;
    assert!(forced.status.success(), "{}", stderr(&forced));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_answers_for_the_whole_cluster() {
    let a = TestNode::start(|c| {
        c.node_name = "a".into();
        c.cluster.bootstrap_expect = 3;
    })
    .await;
    let seed = a.node.gossip_addr().to_string();
    let joining = |name: &'static str| {
        let seed = seed.clone();
        move |c: &mut goutube::config::Config| {
            c.node_name = name.into();
            c.seed_addresses = vec![seed];
            c.cluster.bootstrap_expect = 3;
        }
    };
    let b = TestNode::start(joining("b")).await;
    let c = TestNode::start(joining("c")).await;
    let nodes = [&a, &b, &c];
    eventually("the three to agree on one ring", || one_ring(&nodes, 3)).await;
    let work = tempfile::tempdir().unwrap();
    let mut points = Vec::new();
    for i in 0..20 {
        let point = format!("pts/p{i:02}");
        let bytes = data(100 + i, 10_000 + i as usize * 101);
        let file = write(work.path(), &format!("p{i}.bin"), &bytes);
        // Through any node: the write lands on the owner.
        let put = goutube_cli(
            work.path(),
            &[
                "put",
                file.to_str().unwrap(),
                &point,
                "--addr",
                &nodes[i as usize % 3].addr(),
            ],
        )
        .await;
        assert!(put.status.success(), "{}", stderr(&put));
        points.push((point, bytes));
    }
    for (point, bytes) in &points {
        for node in nodes {
            // stat and get through every node, owner or not.
            let stat = goutube_cli(work.path(), &["stat", point, "--addr", &node.addr()]).await;
            assert!(stat.status.success(), "{}", stderr(&stat));
            assert!(
                stdout(&stat).contains(&format!("size:    {}", bytes.len())),
                "{}",
                stdout(&stat)
            );
        }
        let get = goutube_cli(
            work.path(),
            &["get", point, "copy.bin", "--force", "--addr", &c.addr()],
        )
        .await;
        assert!(get.status.success(), "{}", stderr(&get));
        assert!(std::fs::read(work.path().join("copy.bin")).unwrap() == *bytes);
        // A node that does not hold the point names the one that does, for any client.
        for node in nodes {
            let read = node
                .client()
                .await
                .consume_stream(window(point, 0, 0, 0))
                .await;
            if let Err(status) = read {
                assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
                let holder = goutube::client::owner_of(&status)
                    .expect("names the holder")
                    .member;
                let holder = nodes
                    .iter()
                    .find(|n| n.node.config().node_name == holder)
                    .unwrap();
                let served =
                    goutube_tests::consume(&mut holder.client().await, window(point, 0, 0, 0))
                        .await
                        .unwrap();
                assert!(served.concat() == *bytes);
            }
        }
    }
    // `ls` lists the whole cluster, from any node.
    let mut all: Vec<&str> = points.iter().map(|(p, _)| p.as_str()).collect();
    all.sort();
    for node in nodes {
        let ls = goutube_cli(work.path(), &["ls", "pts/", "--addr", &node.addr()]).await;
        assert!(ls.status.success(), "{}", stderr(&ls));
        let listed: Vec<String> = stdout(&ls).lines().map(str::to_owned).collect();
        assert_eq!(listed, all, "through {}", node.addr());
    }
    // `rm` through a node that does not hold the point deletes it at the one that does.
    for (point, bytes) in points.iter().take(3) {
        let mut stranger = None;
        for node in nodes {
            let asked = node
                .client()
                .await
                .get_metadata(goutube::proto::MetadataRequest {
                    point: point.clone(),
                })
                .await;
            if asked.is_err() {
                stranger = Some(node);
            }
        }
        let stranger = stranger.expect("a node that does not hold the point");
        let rm = goutube_cli(work.path(), &["rm", point, "--addr", &stranger.addr()]).await;
        assert!(rm.status.success(), "{}", stderr(&rm));
        assert!(
            stdout(&rm).contains(&format!("({} bytes)", bytes.len())),
            "{}",
            stdout(&rm)
        );
        let stat = goutube_cli(work.path(), &["stat", point, "--addr", &stranger.addr()]).await;
        assert!(!stat.status.success(), "{point} is gone: {}", stdout(&stat));
    }
    for node in [c, b, a] {
        node.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_errors_are_said_once_naming_the_key_as_written() {
    let work = tempfile::tempdir().unwrap();
    let cases = [
        (
            "rpc_port = \"x\"\n",
            vec![],
            "config key `rpc_port` in",
            "invalid type",
        ),
        (
            "rcp_port = 5\n",
            vec![],
            "config key `rcp_port`",
            "did you mean `rpc_port`?",
        ),
        (
            "[storage]\nfsync = \"nevr\"\n",
            vec![],
            "config key `storage.fsync`",
            "did you mean `never`?",
        ),
        (
            "",
            vec![("GOUTUBE_RPC_PORT", "x")],
            "config key `GOUTUBE_RPC_PORT`",
            "invalid type",
        ),
        (
            "[plugins.authorizer]\nsource = \"nowhere.wasm\"\n",
            vec![],
            "plugins.authorizer.source",
            "file nowhere.wasm not found",
        ),
    ];
    for (text, env, key, what) in cases {
        let config = write(work.path(), "node.toml", text.as_bytes());
        let output = Command::new(goutube_bin())
            .args(["run", "--config", config.to_str().unwrap()])
            .current_dir(work.path())
            .envs(env)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{text}");
        let said = stderr(&output);
        assert!(said.contains(key) && said.contains(what), "{text}: {said}");
        assert_eq!(
            said.matches(what).count(),
            1,
            "{text}: said more than once: {said}"
        );
        assert!(!said.contains("default."), "{text}: {said}");
        assert!(!said.contains("listening"), "{text}: {said}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_said_once_and_does_not_hide_a_plugin_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let work = tempfile::tempdir().unwrap();
    let config =
        goutube_tests::write_node_config(work.path(), "busy", &format!("rpc_port = {port}\n"));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("rpc_port = 0\n", "");
    std::fs::write(&config, &text).unwrap();
    let output = goutube_cli(work.path(), &["run", "--config", config.to_str().unwrap()]).await;
    let said = stderr(&output);
    assert!(said.contains("config key `rpc_port`"), "{said}");
    assert_eq!(said.matches("Address already in use").count(), 1, "{said}");
    // The same with a plugin that does not exist: the plugin is what is said.
    std::fs::write(
        &config,
        format!("{text}[plugins.bundler]\nsource = \"missing.wasm\"\n"),
    )
    .unwrap();
    let output = goutube_cli(work.path(), &["run", "--config", config.to_str().unwrap()]).await;
    let said = stderr(&output);
    assert!(
        said.contains("plugins.bundler.source") && !said.contains("already in use"),
        "{said}"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_send_people_the_right_way() {
    let work = tempfile::tempdir().unwrap();
    let file = write(work.path(), "f.bin", &data(5, 100_000));
    let file = file.to_str().unwrap();
    // A put sent to a follower lands on its leader.
    let (leader, follower) = leader_and_follower().await;
    let put = goutube_cli(
        work.path(),
        &["put", file, "to/leader", "--addr", &follower.addr()],
    )
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(
        stdout(&put).contains(&format!("written to member leader at {}", leader.addr())),
        "{}",
        stdout(&put)
    );
    // A refusal the node sent gets no TLS hint (a follower that never reached its leader).
    let orphan = TestNode::start(|c| {
        c.node_name = "orphan".into();
        c.role = Role::Follower;
        c.leader_addresses = vec!["127.0.0.1:9".into()];
    })
    .await;
    let put = goutube_cli(work.path(), &["put", file, "x", "--addr", &orphan.addr()]).await;
    let said = stderr(&put);
    assert!(
        said.contains("Unavailable") && !said.contains("TLS"),
        "{said}"
    );
    // A gRPC client at the HTTP port is told where the gRPC API is.
    let stat = goutube_cli(
        work.path(),
        &["stat", "x", "--addr", &leader.node.http_addr().to_string()],
    )
    .await;
    let said = stderr(&stat);
    assert!(
        said.contains(&format!("gRPC API listens at {}", leader.addr())),
        "{said}"
    );
    // Ids with control characters are refused.
    let put = goutube_cli(
        work.path(),
        &["put", file, "bad\x1bid", "--addr", &leader.addr()],
    )
    .await;
    let said = stderr(&put);
    assert!(
        said.contains("InvalidArgument") && said.contains("control character"),
        "{said}"
    );
    // HTTP refusals carry a line of text.
    let http = leader.node.http_addr();
    let none = goutube_tests::http(http, "GET", "/v1/points/", &[], None).await;
    assert_eq!(none.status, 400);
    assert!(!none.body.is_empty());
    let far = goutube_tests::http(
        http,
        "GET",
        "/v1/points/to/leader",
        &[("range", "bytes=999999-")],
        None,
    )
    .await;
    assert_eq!(far.status, 416);
    assert!(
        String::from_utf8_lossy(&far.body).contains("the point has 100000 bytes"),
        "{:?}",
        far.body
    );
    for node in [orphan, follower, leader] {
        node.shutdown().await;
    }
}

#[tokio::test]
async fn client_certificates_alone_are_made_alone() {
    let work = tempfile::tempdir().unwrap();
    let made = goutube_cli(work.path(), &["certs", "--out", "c", "--client", "alice"]).await;
    assert!(made.status.success(), "{}", stderr(&made));
    let mut files: Vec<String> = std::fs::read_dir(work.path().join("c"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "ca-key.pem",
            "ca.pem",
            "client-alice-key.pem",
            "client-alice.pem",
            "cluster.key"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_serving_only_once_the_ring_is_formed() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let a = TestNode::start(|c| {
        c.node_name = "a".into();
        c.cluster.bootstrap_expect = 2;
    })
    .await;
    let status = |node: &TestNode| {
        let addr = node.addr();
        async move {
            let channel =
                goutube::client::channel(&goutube::client::ClientOptions { addr, tls: None })
                    .await
                    .unwrap();
            HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .status()
        }
    };
    assert_eq!(status(&a).await, ServingStatus::NotServing);
    let seed = a.node.gossip_addr().to_string();
    let b = TestNode::start(move |c| {
        c.node_name = "b".into();
        c.seed_addresses = vec![seed];
        c.cluster.bootstrap_expect = 2;
    })
    .await;
    eventually("a to serve once the ring formed", || async {
        status(&a).await == ServingStatus::Serving
    })
    .await;
    b.shutdown().await;
    a.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_runs_in_two_gib_of_address_space() {
    use std::os::unix::process::CommandExt;
    let work = tempfile::tempdir().unwrap();
    let config = goutube_tests::write_config(work.path(), "");
    let mut command = std::process::Command::new(goutube_bin());
    command
        .args(["run", "--config", config.to_str().unwrap()])
        .stderr(Stdio::inherit());
    // SAFETY: setrlimit is async-signal-safe; it limits only the child.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 2 << 30,
                rlim_max: 2 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let process = goutube::process::NodeProcess::start(command, DEADLINE)
        .expect("the node says it listens under the limit");
    let addr = process.addresses().unwrap().rpc.to_string();
    let mut client = goutube_tests::raw_client(&addr).await;
    let bytes = data(6, 2_000_000);
    produce(&mut client, "limited", std::slice::from_ref(&bytes))
        .await
        .unwrap();
    let read = goutube_tests::consume(&mut client, window("limited", 0, 0, 0))
        .await
        .unwrap();
    assert!(read.concat() == bytes);
    let node = NodeProcess {
        rpc: addr,
        metrics: String::new(),
        addresses: process.addresses().unwrap(),
        process,
    };
    assert!(node.terminate());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_work_from_any_directory_and_leave_an_installed_toolchain_alone() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    // Installed already (the tests were built with it): nothing is fetched, no network needed.
    let setup = Command::new(repo.join("scripts/setup"))
        .env("RUSTUP_DIST_SERVER", "http://127.0.0.1:9")
        .env("RUSTUP_UPDATE_ROOT", "http://127.0.0.1:9")
        .output()
        .await
        .unwrap();
    assert!(setup.status.success(), "{}", stderr(&setup));

    // Run from a directory of the user's: relative paths are the user's.
    let work = tempfile::tempdir().unwrap();
    std::fs::write(
        work.path().join("node.toml"),
        "data_dir = \"my-data\"\nbind_addr = \"127.0.0.1:0\"\nrpc_port = 0\nreplication_port = 0\nmetrics_port = 0\nhttp_port = 0\n",
    )
    .unwrap();
    let mut command = std::process::Command::new(repo.join("scripts/node"));
    command
        .args(["--config", "node.toml"])
        .current_dir(work.path())
        .env("GOUTUBE_BIN", goutube_bin())
        .stderr(Stdio::inherit());
    let process = goutube::process::NodeProcess::start(command, DEADLINE)
        .expect("scripts/node runs a node from another directory");
    assert!(
        work.path().join("my-data").is_dir(),
        "the data is where the user ran it"
    );
    let node = NodeProcess {
        rpc: process.addresses().unwrap().rpc.to_string(),
        metrics: String::new(),
        addresses: process.addresses().unwrap(),
        process,
    };
    assert!(node.terminate());
}
