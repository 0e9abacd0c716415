//! The `goutube` binary itself: it starts, and refuses bad configuration naming the key.
//!
//! Being an integration test of this package, this file also makes `cargo test` build the binary
//! that the workspace's process-level tests (`tests/`) run.

use std::process::{Command, Output};

fn goutube(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_goutube"))
        .args(args)
        .output()
        .expect("running goutube")
}

#[test]
fn it_reports_its_version_and_commands() {
    let version = goutube(&["--version"]);
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).contains(env!("CARGO_PKG_VERSION")));
    let help = String::from_utf8_lossy(&goutube(&["--help"]).stdout).into_owned();
    for command in ["run", "put", "get", "stat", "ls", "rm", "certs", "bench"] {
        assert!(
            help.contains(command),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    for (body, key) in [
        ("rpc_prot = 1\n", "rpc_prot"),
        ("[storage]\nfsync = \"sometimes\"\n", "storage.fsync"),
        ("max_chunk_size = 0\n", "max_chunk_size"),
        ("[replication]\nack = { replicas = 2 }\n", "replication.ack"),
        (
            "[plugins.authorizer]\nsource = \"builtin:nope\"\n",
            "plugins.authorizer.source",
        ),
        (
            "[tls]\nca = \"/nonexistent/ca.pem\"\ncert = \"c\"\nkey = \"k\"\n",
            "tls.ca",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(
            &path,
            format!("data_dir = {:?}\n{body}", dir.path().join("data")),
        )
        .unwrap();
        let run = goutube(&["run", "--config", path.to_str().unwrap()]);
        assert!(!run.status.success(), "{body}");
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(stderr.contains(key), "{body}: {stderr}");
    }
    let run = goutube(&["run", "--config", "/nonexistent/goutube.toml"]);
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--config"));
}
