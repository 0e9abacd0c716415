//! Plugins in the languages policy authors use, each in a real node: the Python authorizer
//! (`plugins/python/regex-authorizer`, built by componentize-py) and the JavaScript one
//! (`plugins/javascript/grants-authorizer`, built by ComponentizeJS), both built by
//! `scripts/test-tools` into `target/plugin-languages/`. For each: its decisions are enforced
//! through gRPC, with its reasons; a rule that runs away (a regular expression that backtracks
//! exponentially) ends at the node's deadline as a denial while the node serves everyone else; a
//! reload with new rules is enforced, and a reload with rules the plugin refuses keeps the old
//! ones and says why.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use goutube::config::Config;
use goutube::node::{Listeners, Node, StartError};
use goutube::plugins::PluginSection;
use goutube::proto::ConsumeRequest;
use goutube_tests::{TestNode, consume, data, produce};
use tonic::Code;

/// A component built by `scripts/test-tools`; a missing one fails the test with how to build it.
fn component(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugin-languages")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: scripts/test-tools builds it (scripts/plugin-languages)",
        path.display()
    );
    path
}

/// A language's authorizer and its configuration texts: `first` lets anonymous produce under
/// `ok/` and under `a`, read under `ok/` and points of `a`s only (by a regular expression that
/// backtracks exponentially on `aaa…ab`), and see metadata; `second` lets it produce under
/// `new/` only; `broken` is refused by the plugin's `configure` with `refusal` in its message.
struct Language {
    name: &'static str,
    component: &'static str,
    first: &'static str,
    second: &'static str,
    broken: &'static str,
    refusal: &'static str,
    /// What the plugin's denial of a produce of `no/1` says.
    denial: &'static str,
}

const PYTHON: Language = Language {
    name: "Python",
    component: "regex-authorizer",
    first: "anonymous produce ^(ok/|a)\nanonymous consume ^ok/\nanonymous consume ^(a|aa)+$\n* metadata .*\n",
    second: "anonymous produce ^new/\n",
    broken: "anonymous consume ^(unclosed\n",
    refusal: "bad regex",
    denial: "no rule lets anonymous produce 'no/1'",
};

const JAVASCRIPT: Language = Language {
    name: "JavaScript",
    component: "grants-authorizer",
    first: r#"{"grants": [
        {"subjects": ["anonymous"], "actions": ["produce"], "prefixes": ["ok/", "a"]},
        {"subjects": ["anonymous"], "actions": ["consume"], "prefixes": ["ok/"], "match": "^(a|aa)+$"},
        {"subjects": ["*"], "actions": ["metadata"], "prefixes": [""]}
    ]}"#,
    second: r#"{"grants": [{"subjects": ["anonymous"], "actions": ["produce"], "prefixes": ["new/"]}]}"#,
    broken: r#"{"grants": [{"subjects": ["anonymous"], "actions": ["fly"], "prefixes": [""]}]}"#,
    refusal: "no such action \"fly\"",
    denial: "no grant lets anonymous produce \"no/1\"",
};

/// The node's deadline for one authorizer call.
const TIMEOUT_MS: u64 = 300;

fn authorizer(language: &Language, config: &str) -> PluginSection {
    PluginSection {
        source: component(language.component).display().to_string(),
        config: config.into(),
        timeout_ms: TIMEOUT_MS,
        ..PluginSection::default()
    }
}

fn configure(config: &mut Config, language: &Language) {
    config.plugins.authorizer = authorizer(language, language.first);
    // Every call asks the plugin: what is tested is the plugin, not the cache.
    config.plugins.decision_cache_ms = 0;
}

async fn enforced(language: &Language) {
    let what = language.name;
    let node = TestNode::start(|c| configure(c, language)).await;
    let mut client = node.client().await;

    // Its decisions, and its reasons, reach the client.
    produce(&mut client, "ok/1", &[data(1, 100)])
        .await
        .unwrap_or_else(|e| panic!("{what}: a permitted produce: {e}"));
    let denied = produce(&mut client, "no/1", &[data(2, 10)])
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied, "{what}: {denied:?}");
    assert!(
        denied.message().contains(language.denial),
        "{what}: the plugin's reason reaches the client: {}",
        denied.message()
    );
    let read = consume(&mut client, goutube_tests::window("ok/1", 0, 0, 0))
        .await
        .unwrap();
    assert_eq!(read.concat(), data(1, 100), "{what}");

    // A rule that runs away ends at the deadline, as a denial of that call only.
    let runaway = format!("{}b", "a".repeat(40));
    produce(&mut client, &runaway, &[data(3, 10)])
        .await
        .unwrap_or_else(|e| panic!("{what}: produce of {runaway}: {e}"));
    let started = Instant::now();
    let status = consume(
        &mut client,
        ConsumeRequest {
            point: runaway.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    let took = started.elapsed();
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");
    assert!(
        status.message().contains("ran out of time"),
        "{what}: the deadline ended the call: {}",
        status.message()
    );
    assert!(
        took < Duration::from_millis(TIMEOUT_MS) * 10,
        "{what}: the runaway call took {took:?} against a deadline of {TIMEOUT_MS} ms"
    );
    // The node, and the plugin's next instance, serve everyone else.
    produce(&mut client, "ok/2", &[data(4, 10)])
        .await
        .unwrap_or_else(|e| panic!("{what}: a produce after the runaway call: {e}"));

    // A reload with new rules is enforced at once.
    let mut config = node.node.config().clone();
    config.plugins.authorizer = authorizer(language, language.second);
    node.node
        .reload(&config)
        .await
        .unwrap_or_else(|e| panic!("{what}: reload: {e}"));
    produce(&mut client, "new/1", &[data(5, 10)])
        .await
        .unwrap_or_else(|e| panic!("{what}: produce after the reload: {e}"));
    let status = produce(&mut client, "ok/3", &[data(6, 10)])
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{what}: {status:?}");

    // Rules the plugin refuses: the reload fails with its reason; the rules in force stay.
    config.plugins.authorizer = authorizer(language, language.broken);
    let error = node.node.reload(&config).await.unwrap_err().to_string();
    assert!(
        error.contains(language.refusal),
        "{what}: the plugin's refusal: {error}"
    );
    produce(&mut client, "new/2", &[data(7, 10)])
        .await
        .unwrap_or_else(|e| panic!("{what}: the rules in force after a failed reload: {e}"));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_authorizer_is_enforced_bounded_and_reloaded() {
    enforced(&PYTHON).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_javascript_authorizer_is_enforced_bounded_and_reloaded() {
    enforced(&JAVASCRIPT).await;
}

/// Rules that do not parse stop the node's start, with the plugin's reason and the key.
#[tokio::test]
async fn rules_a_language_plugin_refuses_stop_the_start() {
    for language in [&PYTHON, &JAVASCRIPT] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = goutube_tests::config(dir.path());
        config.plugins.authorizer = authorizer(language, language.broken);
        let listeners = Listeners::bind(&config).await.unwrap();
        let error = match Node::start(config, listeners).await {
            Err(error @ StartError::Plugin(_)) => error.to_string(),
            Err(other) => panic!("{}: expected a plugin error, got {other}", language.name),
            Ok(node) => {
                node.shutdown().await.unwrap();
                panic!(
                    "{}: a node started with rules its plugin refuses",
                    language.name
                )
            }
        };
        assert!(
            error.contains("plugins.authorizer") && error.contains(language.refusal),
            "{}: {error}",
            language.name
        );
    }
}
