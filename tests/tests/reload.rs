//! SIGHUP reloads plugins and policies on a running `goutube run` process: later calls follow the
//! new policy, open streams keep flowing, and a reload that fails keeps the old plugins.

use std::path::Path;

use goutube::proto::ConsumeRequest;
use goutube_tests::{DEADLINE, NodeProcess, data, eventually, produce, raw_client, scrape_metrics};
use tonic::Code;

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

async fn reloads(node: &NodeProcess, result: &str) -> f64 {
    let scrape = scrape_metrics(&node.metrics).await;
    let line = format!("goutube_plugin_reloads_total{{result=\"{result}\"}}");
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(&line))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_new_plugins_and_policies() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl.txt");
    let policy = dir.path().join("policy.polar");
    write(&acl, "anonymous, open/*, *\n");
    let acl_config = format!(
        "[plugins]\ndecision_cache_ms = 60000\n[plugins.authorizer]\nsource = \"builtin:acl-authorizer\"\nconfig_file = {acl:?}\n"
    );
    let config = goutube_tests::write_config(dir.path(), &acl_config);
    let node = NodeProcess::spawn(&config);
    let mut client = raw_client(&node.rpc).await;

    produce(&mut client, "open/tail", &[data(1, 100)])
        .await
        .unwrap();
    let status = produce(&mut client, "closed/x", &[data(2, 10)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    // A follow stream opened before the reloads must keep flowing through them.
    let mut follow = client
        .consume_stream(ConsumeRequest {
            point: "open/tail".into(),
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(follow.message().await.unwrap().unwrap().frame.len(), 100);

    // 1. A changed ACL file.
    write(&acl, "anonymous, open/*, *\nanonymous, closed/*, *\n");
    node.signal("HUP");
    eventually("the new ACL to apply", || {
        let mut client = client.clone();
        async move {
            produce(&mut client, "closed/x", &[data(2, 10)])
                .await
                .is_ok()
        }
    })
    .await;

    // 2. A broken ACL: the reload fails and the old plugins stay.
    write(&acl, "this is not an ACL\n");
    node.signal("HUP");
    eventually("the failed reload to be counted", || async {
        reloads(&node, "error").await >= 1.0
    })
    .await;
    produce(&mut client, "closed/y", &[data(3, 10)])
        .await
        .unwrap();

    // 3. Another authorizer and a Polar policy that only lets anonymous read.
    write(&policy, "allow(\"anonymous\", \"consume\", _point);\n");
    let polar_config = format!(
        "[plugins]\npolicy_file = {policy:?}\n[plugins.authorizer]\nsource = \"builtin:polar-authorizer\"\n"
    );
    write(
        &config,
        &std::fs::read_to_string(&config)
            .unwrap()
            .replace(&acl_config, &polar_config),
    );
    node.signal("HUP");
    eventually("the Polar policy to apply", || {
        let mut client = client.clone();
        async move {
            produce(&mut client, "open/z", &[data(4, 10)])
                .await
                .is_err_and(|s| s.code() == Code::PermissionDenied)
        }
    })
    .await;
    // 4. The policy file changes: anonymous may write again.
    write(&policy, "allow(\"anonymous\", _action, _point);\n");
    node.signal("HUP");
    eventually("the changed policy to apply", || {
        let mut client = client.clone();
        async move {
            produce(&mut client, "open/tail", &[data(5, 50)])
                .await
                .is_ok()
        }
    })
    .await;

    // The follow stream opened before all of this delivers the append made after it.
    let frame = tokio::time::timeout(DEADLINE, follow.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(frame.offset, 100);
    assert_eq!(frame.frame.as_ref(), data(5, 50).as_slice());
    assert!(reloads(&node, "ok").await >= 3.0);
    drop(follow);
    assert!(node.terminate());
}
