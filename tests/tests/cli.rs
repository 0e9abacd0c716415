//! The command line, run as a real process: put, get (verified), stat, ls, rm, and config errors
//! that name the key at fault.

use std::process::Output;

use goutube_tests::{TestNode, data, goutube_bin};
use tokio::process::Command;

async fn goutube(args: &[&str]) -> Output {
    Command::new(goutube_bin())
        .args(args)
        .env_remove("GOUTUBE_CLIENT_ADDR")
        .output()
        .await
        .expect("running goutube")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
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
    assert!(stdout(&put).contains("(verified)"), "{}", stdout(&put));
    // Appending the same file again extends the point, still verified.
    let put = goutube(&[
        "put",
        input.to_str().unwrap(),
        "films/movie",
        "--addr",
        &addr,
        "--chunk-size",
        "100000",
    ])
    .await;
    assert!(put.status.success(), "{}", stderr(&put));
    assert!(stdout(&put).contains("(verified)"));
    let doubled = [bytes.clone(), bytes.clone()].concat();

    let stat = goutube(&["stat", "films/movie", "--addr", &addr]).await;
    assert!(stat.status.success(), "{}", stderr(&stat));
    let text = stdout(&stat);
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
