//! The command line, run as a real process: put, get (verified), stat, ls, rm, and config errors
//! that name the key at fault.

use std::path::Path;
use std::process::Output;

use goutube_tests::{TestNode, data, goutube_bin, goutube_cli, stderr, stdout};

async fn goutube(args: &[&str]) -> Output {
    goutube_cli(Path::new("."), args).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_stat_ls_rm() {
    let node = TestNode::start(|_| {}).await;
    let addr = node.addr();
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("movie.bin");
    let bytes = data(42, 3 * 1024 * 1024 + 17);
    std::fs::write(&input, &bytes).unwrap();

    let put = goutube(&[
        "put",
        input.to_str().unwrap(),
        "films/movie",
        "--addr",
        &addr,
    ])
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(
        stdout(&put).contains("(verified: the point is the file)"),
        "{}",
        stdout(&put)
    );
    // The same command again (a user's retry) writes nothing: it says what to do instead.
    let again = goutube(&[
        "put",
        input.to_str().unwrap(),
        "films/movie",
        "--addr",
        &addr,
    ])
    .await;
    assert!(!again.status.success());
    let refusal = stderr(&again);
    assert!(
        refusal.contains(&format!("already has {} bytes", bytes.len()))
            && refusal.contains("--resume")
            && refusal.contains("--append"),
        "{refusal}"
    );
    let meta = goutube_tests::metadata(&mut node.client().await, "films/movie")
        .await
        .unwrap();
    assert_eq!(meta.size, bytes.len() as u64, "nothing was appended");
    // Appending the same file on purpose extends the point, still verified.
    let put = goutube(&[
        "put",
        input.to_str().unwrap(),
        "films/movie",
        "--append",
        "--addr",
        &addr,
        "--chunk-size",
        "100000",
    ])
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(
        stdout(&put).contains("(verified: its first"),
        "{}",
        stdout(&put)
    );
    let doubled = [bytes.clone(), bytes.clone()].concat();

    let stat = goutube(&["stat", "films/movie", "--addr", &addr]).await;
    assert!(stat.status.success(), "{}", stderr(&stat));
    let text = stdout(&stat);
    assert!(text.contains("type:    application/octet-stream"), "{text}");
    assert!(
        text.contains("epoch:   1\n"),
        "created by its owner: {text}"
    );
    assert!(
        text.contains(&format!("size:    {}", doubled.len())),
        "{text}"
    );
    assert!(
        text.contains(&format!("{:08x}", crc32c::crc32c(&doubled))),
        "{text}"
    );

    let output = work.path().join("copy.bin");
    let get = goutube(&[
        "get",
        "films/movie",
        output.to_str().unwrap(),
        "--addr",
        &addr,
    ])
    .await;
    assert!(get.status.success(), "{}", stderr(&get));
    assert!(stdout(&get).contains("verified"));
    assert_eq!(std::fs::read(&output).unwrap(), doubled);
    assert!(!work.path().join("copy.bin.part").exists());

    let ls = goutube(&["ls", "films/", "--addr", &addr]).await;
    assert_eq!(stdout(&ls), "films/movie\n");

    let rm = goutube(&["rm", "films/movie", "--addr", &addr]).await;
    assert!(rm.status.success(), "{}", stderr(&rm));
    let get = goutube(&[
        "get",
        "films/movie",
        output.to_str().unwrap(),
        "--addr",
        &addr,
    ])
    .await;
    assert!(!get.status.success());
    assert!(
        stderr(&get).contains("NotFound: point films/movie not found"),
        "{}",
        stderr(&get)
    );
    node.shutdown().await;
}

#[tokio::test]
async fn client_commands_report_an_unreachable_node() {
    let stat = goutube(&["stat", "x", "--addr", "127.0.0.1:1"]).await;
    assert!(!stat.status.success());
    assert!(
        stderr(&stat).contains("cannot connect to 127.0.0.1:1"),
        "{}",
        stderr(&stat)
    );
}

/// `goutube members` prints the ring and the live members; a node's log on a pipe carries no
/// colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_table_and_plain_logs() {
    let work = tempfile::tempdir().unwrap();
    let config = goutube_tests::write_node_config(work.path(), "solo", "[log]\nlevel = \"info\"");
    let log = work.path().join("node.log");
    let mut command = std::process::Command::new(goutube_bin());
    command
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap());
    let node = goutube::process::NodeProcess::start(command, goutube_tests::DEADLINE).unwrap();
    let addr = node.addresses().unwrap().rpc.to_string();
    // The node serves once it has formed its ring (at once: bootstrap_expect = 1, no seeds).
    goutube_tests::eventually("the node serves", || async {
        goutube(&["members", "--addr", &addr])
            .await
            .status
            .success()
    })
    .await;
    let members = goutube(&["members", "--addr", &addr]).await;
    let table = stdout(&members);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("NAME"), "{table}");
    let solo: Vec<&str> = rows[1].split_whitespace().collect();
    assert_eq!(
        solo[..5],
        ["solo", "standalone", "active", "up", "owner"],
        "{table}"
    );
    assert!(table.contains("\nview "), "{table}");
    assert!(table.contains("\nring "), "{table}");
    assert!(node.terminate(goutube_tests::DEADLINE).unwrap().success());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("store opened"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "colour codes in a log that is not a terminal: {log:?}"
    );
}

/// `goutube put --content-type` gives a point its type, and `goutube url --player` prints a
/// signed URL of the player page that a client without any credential can open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_type_and_signed_player_url() {
    let node = TestNode::start(|c| {
        c.http.url_keys = vec![goutube::secret::Secret("a url key of the cli test".into())];
    })
    .await;
    let addr = node.addr();
    let work = tempfile::tempdir().unwrap();
    let input = work.path().join("clip.webm");
    std::fs::write(&input, data(5, 10_000)).unwrap();
    let put = goutube(&[
        "put",
        input.to_str().unwrap(),
        "clips/one",
        "--content-type",
        "video/webm",
        "--addr",
        &addr,
    ])
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    let stat = goutube(&["stat", "clips/one", "--addr", &addr]).await;
    assert!(
        stdout(&stat).contains("type:    video/webm"),
        "{}",
        stdout(&stat)
    );

    let url = goutube(&[
        "url",
        "clips/one",
        "--player",
        "--ttl",
        "10m",
        "--addr",
        &addr,
    ])
    .await;
    assert!(url.status.success(), "{}", stderr(&url));
    let url = stdout(&url).trim().to_owned();
    let prefix = format!("http://{}/v1/player/clips/one?", node.node.http_addr());
    assert!(url.starts_with(&prefix), "{url}");
    let target = &url[prefix.len() - "/v1/player/clips/one?".len()..];
    let page = goutube_tests::http(node.node.http_addr(), "GET", target, &[], None).await;
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("<video id=\"player\""), "{html}");
    assert!(html.contains("video/webm"), "{html}");
    node.shutdown().await;
}
