//! mTLS with real certificates: who gets in (the handshake refuses no certificate, another CA and
//! expired certificates; plaintext is refused), who may do what (the default policy, a prefix
//! policy, an ACL), and `goutube certs` output working end to end with a node and the CLI.

use std::path::PathBuf;
use std::time::Duration;

use goutube::certs::{Authority, Validity};
use goutube::client::{Client, ClientOptions};
use goutube::config::PluginSection;
use goutube::proto::streaming_client::StreamingClient;
use goutube_tests::{
    Pki, TestNode, assert_denied, consume, counter, data, goutube_bin, metadata, produce, window,
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

async fn connect(options: &ClientOptions) -> Result<StreamingClient<Channel>, String> {
    Client::connect(options)
        .await
        .map(|c| c.raw())
        .map_err(|e| e.to_string())
}

/// A call through `options` fails before reaching any service: the handshake was refused.
async fn assert_refused(options: &ClientOptions, what: &str) {
    let before = handshake_failures();
    let outcome = match connect(options).await {
        Err(error) => Err(error),
        Ok(mut client) => metadata(&mut client, "p")
            .await
            .map(|_| ())
            .map_err(|status| format!("{status:?}")),
    };
    let error = outcome.expect_err(what);
    assert!(
        !error.contains("PermissionDenied") && !error.contains("NotFound"),
        "{what}: reached a service: {error}"
    );
    goutube_tests::eventually(
        &format!("{what}: the refused handshake to be counted"),
        || async { handshake_failures() > before },
    )
    .await;
}

/// An error and its causes, as an operator reads them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn handshake_failures() -> f64 {
    // The node runs in this process: read its registry directly.
    counter(goutube::metrics::TLS_HANDSHAKE_FAILURES)
}

async fn tls_node(pki: &Pki, configure: impl FnOnce(&mut goutube::config::Config)) -> TestNode {
    let tls = pki.node("test-node");
    let key = pki.cluster_key();
    TestNode::start(move |c| {
        c.tls = Some(tls);
        c.cluster.key_file = Some(key);
        configure(c);
    })
    .await
}

#[tokio::test]
async fn the_handshake_refuses_strangers() {
    let pki = Pki::new();
    let node = tls_node(&pki, |_| {}).await;

    // No client certificate at all.
    let endpoint = Endpoint::from_shared(format!("https://{}", node.addr()))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&pki.ca.pem().cert_pem)),
        )
        .unwrap()
        .connect_timeout(Duration::from_secs(5));
    let before = handshake_failures();
    let result = match endpoint.connect().await {
        Err(error) => Err(error.to_string()),
        Ok(channel) => metadata(&mut StreamingClient::new(channel), "p")
            .await
            .map(|_| ())
            .map_err(|s| format!("{s:?}")),
    };
    assert!(result.is_err(), "a client without a certificate got in");
    goutube_tests::eventually("the refused handshake to be counted", || async {
        handshake_failures() > before
    })
    .await;

    // A certificate from another CA.
    let other = Authority::new("another CA", Validity::days(1)).unwrap();
    let stranger = pki.client_options_from(&other, "root", Validity::days(1), &node.addr());
    assert_refused(&stranger, "another CA").await;

    // An expired certificate from the right CA.
    let expired = pki.client_options_from(&pki.ca, "expired", Validity::expired(), &node.addr());
    assert_refused(&expired, "expired certificate").await;

    // Plaintext to a TLS listener.
    let plaintext = ClientOptions {
        addr: node.addr(),
        tls: None,
    };
    let outcome = match Client::connect(&plaintext).await {
        Err(error) => Err(error.to_string()),
        Ok(client) => client
            .stat("p")
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
    };
    let error = outcome.expect_err("plaintext got in");
    assert!(!error.contains("NotFound"), "{error}");

    // The node still serves a proper client.
    let mut root = pki.client("root", &node.addr()).await;
    produce(&mut root, "p", &[data(1, 10)]).await.unwrap();
    node.shutdown().await;
}

/// The client library makes its own TLS connections (a read buffer under rustls): it must still
/// check that the node's certificate holds the name it expects, and name a missing file.
#[tokio::test]
async fn the_client_checks_the_node_certificate_name() {
    let pki = Pki::new();
    let node = tls_node(&pki, |_| {}).await;
    let root = pki.client_options("root", &node.addr());
    let with_name = |name: &str, addr: String| {
        let mut options = root.clone();
        options.addr = addr;
        options.tls.as_mut().unwrap().server_name = Some(name.to_owned());
        options
    };

    // The node's certificate holds "localhost"; the address may carry a scheme.
    let client = Client::connect(&with_name("localhost", format!("https://{}", node.addr())))
        .await
        .expect("connect with the node's name");
    produce(&mut client.raw(), "named", &[data(3, 4096)])
        .await
        .unwrap();
    assert_eq!(client.stat("named").await.unwrap().size, 4096);

    // Another name: the client refuses the node before any call reaches it.
    let error = match Client::connect(&with_name("elsewhere.example", node.addr())).await {
        Err(error) => chain(&error),
        Ok(client) => client
            .stat("named")
            .await
            .map(|_| ())
            .map_err(|e| chain(&e))
            .expect_err("a node with another name was trusted"),
    };
    assert!(
        error.contains("certificate") && !error.contains("NotFound"),
        "{error}"
    );

    // A missing key file is named.
    let mut missing = root.clone();
    missing.tls.as_mut().unwrap().key = pki.path("no-such-key.pem");
    let error = Client::connect(&missing)
        .await
        .err()
        .expect("connected without a key");
    let error = error.to_string();
    assert!(
        error.contains("client key") && error.contains("no-such-key.pem"),
        "{error}"
    );
    node.shutdown().await;
}

#[tokio::test]
async fn the_default_policy_admits_root_and_denies_nobody() {
    let pki = Pki::new();
    let node = tls_node(&pki, |_| {}).await;
    let mut root = pki.client("root", &node.addr()).await;
    let mut nobody = pki.client("nobody", &node.addr()).await;

    produce(&mut root, "videos/a", &[data(1, 1000)])
        .await
        .unwrap();
    assert_eq!(
        consume(&mut root, window("videos/a", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(1, 1000)
    );
    metadata(&mut root, "videos/a").await.unwrap();

    assert_denied(
        [
            produce(&mut nobody, "videos/a", &[data(2, 10)])
                .await
                .unwrap_err(),
            consume(&mut nobody, window("videos/a", 0, 0, 0))
                .await
                .unwrap_err(),
            metadata(&mut nobody, "videos/a").await.unwrap_err(),
        ],
        "nobody may not",
    );
    // A certificate may not pass itself off as a plaintext client.
    let anonymous = pki.ca.client("anonymous", Validity::days(1));
    assert!(anonymous.is_err(), "goutube certs refuses to make one");
    node.shutdown().await;
}

#[tokio::test]
async fn prefix_rights_from_a_polar_policy() {
    let pki = Pki::new();
    let policy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/prefixes.polar");
    let node = tls_node(&pki, |c| c.plugins.policy_file = Some(policy)).await;
    let mut root = pki.client("root", &node.addr()).await;
    let mut alice = pki.client("alice", &node.addr()).await;
    produce(&mut root, "videos/cat", &[data(1, 100)])
        .await
        .unwrap();
    produce(&mut root, "music/song", &[data(2, 100)])
        .await
        .unwrap();

    assert_eq!(
        consume(&mut alice, window("videos/cat", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(1, 100)
    );
    metadata(&mut alice, "videos/cat").await.unwrap();
    assert_denied(
        [
            consume(&mut alice, window("music/song", 0, 0, 0))
                .await
                .unwrap_err(),
            produce(&mut alice, "videos/cat", &[data(3, 10)])
                .await
                .unwrap_err(),
            metadata(&mut alice, "music/song").await.unwrap_err(),
        ],
        "alice may not",
    );
    node.shutdown().await;
}

#[tokio::test]
async fn an_acl_lets_alice_consume_videos_only() {
    let pki = Pki::new();
    let acl = "root, *, *\nalice, videos/*, consume\n";
    let node = tls_node(&pki, |c| {
        c.plugins.authorizer = PluginSection {
            source: "builtin:acl-authorizer".into(),
            config: acl.into(),
            ..PluginSection::default()
        }
    })
    .await;
    let mut root = pki.client("root", &node.addr()).await;
    let mut alice = pki.client("alice", &node.addr()).await;
    produce(&mut root, "videos/cat", &[data(1, 100)])
        .await
        .unwrap();
    produce(&mut root, "private/diary", &[data(2, 100)])
        .await
        .unwrap();

    assert_eq!(
        consume(&mut alice, window("videos/cat", 0, 0, 0))
            .await
            .unwrap()
            .concat(),
        data(1, 100)
    );
    assert_denied(
        [
            consume(&mut alice, window("private/diary", 0, 0, 0))
                .await
                .unwrap_err(),
            produce(&mut alice, "videos/dog", &[data(3, 10)])
                .await
                .unwrap_err(),
            metadata(&mut alice, "videos/cat").await.unwrap_err(),
        ],
        "no ACL line allows alice",
    );
    node.shutdown().await;
}

async fn goutube(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(goutube_bin())
        .args(args)
        .output()
        .await
        .expect("running goutube")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goutube_certs_output_works_with_a_node_and_the_cli() {
    let work = tempfile::tempdir().unwrap();
    let certs = work.path().join("certs");
    let certs_arg = certs.to_str().unwrap();
    let made = goutube(&[
        "certs", "--out", certs_arg, "--node", "n1", "--client", "root", "--client", "nobody",
    ])
    .await;
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for key in [
            "ca-key.pem",
            "node-n1-key.pem",
            "client-root-key.pem",
            "client-nobody-key.pem",
            "cluster.key",
        ] {
            let mode = std::fs::metadata(certs.join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
    }
    // Nothing is overwritten without --force.
    let again = goutube(&["certs", "--out", certs_arg, "--node", "n1"]).await;
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    let config = goutube_tests::write_node_config(
        work.path(),
        "n1",
        &format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[cluster]\nkey_file = {:?}\n",
            certs.join("ca.pem"),
            certs.join("node-n1.pem"),
            certs.join("node-n1-key.pem"),
            certs.join("cluster.key")
        ),
    );
    let node = goutube_tests::NodeProcess::spawn(&config);
    let input = work.path().join("in.bin");
    std::fs::write(&input, data(9, 2 * 1024 * 1024 + 5)).unwrap();
    let output = work.path().join("out.bin");
    let flags = |subject: &str| {
        vec![
            "--addr".to_string(),
            node.rpc.clone(),
            "--ca".into(),
            certs.join("ca.pem").display().to_string(),
            "--cert".into(),
            certs
                .join(format!("client-{subject}.pem"))
                .display()
                .to_string(),
            "--key".into(),
            certs
                .join(format!("client-{subject}-key.pem"))
                .display()
                .to_string(),
        ]
    };
    let run = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        goutube(&args).await
    };
    let put = run([
        vec![
            "put".into(),
            input.display().to_string(),
            "tls/movie".into(),
        ],
        flags("root"),
    ]
    .concat())
    .await;
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let get = run([
        vec![
            "get".into(),
            "tls/movie".into(),
            output.display().to_string(),
        ],
        flags("root"),
    ]
    .concat())
    .await;
    assert!(
        get.status.success(),
        "{}",
        String::from_utf8_lossy(&get.stderr)
    );
    assert_eq!(
        std::fs::read(&output).unwrap(),
        std::fs::read(&input).unwrap()
    );
    let stat = run([vec!["stat".into(), "tls/movie".into()], flags("nobody")].concat()).await;
    assert!(!stat.status.success());
    assert!(
        String::from_utf8_lossy(&stat.stderr).contains("PermissionDenied: nobody may not metadata"),
        "{}",
        String::from_utf8_lossy(&stat.stderr)
    );
    // The same flags through GOUTUBE_CLIENT_* variables.
    let env_stat = tokio::process::Command::new(goutube_bin())
        .args(["stat", "tls/movie"])
        .env("GOUTUBE_CLIENT_ADDR", &node.rpc)
        .env("GOUTUBE_CLIENT_CA", certs.join("ca.pem"))
        .env("GOUTUBE_CLIENT_CERT", certs.join("client-root.pem"))
        .env("GOUTUBE_CLIENT_KEY", certs.join("client-root-key.pem"))
        .output()
        .await
        .unwrap();
    assert!(
        env_stat.status.success(),
        "{}",
        String::from_utf8_lossy(&env_stat.stderr)
    );
    assert!(
        String::from_utf8_lossy(&env_stat.stdout)
            .contains(&format!("size:    {}", 2 * 1024 * 1024 + 5))
    );
    assert!(node.terminate());
}
