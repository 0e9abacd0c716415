//! The conventions operators expect of a Prometheus target (issue 27): every documented metric
//! present from the start, build information and process metrics, requests and latency per gRPC
//! method and per HTTP route, and a Grafana dashboard (`docs/grafana/goutube.json`) that
//! queries only series a fresh node has. The nodes of this file share one registry (one
//! process): the per-call checks compare counts before and after.

use std::path::PathBuf;

use goutube::proto::MetadataRequest;
use goutube_tests::{TestNode, data, http, produce, scrape_metrics};

/// Labels of documented metrics whose series come with their first event: what they name
/// comes and goes (`docs/operations.md`, "Metrics").
const EVENT_LABELS: &[&str] = &[
    "code", "status", "plugin", "follower", "listener", "task", "found", "state",
];

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is in the repository")
        .to_owned()
}

/// Whether `scrape` has a sample of `name` (a histogram's buckets, sum or count count).
fn has_series(scrape: &str, name: &str) -> bool {
    scrape.lines().filter(|l| !l.starts_with('#')).any(|line| {
        let Some(rest) = line.strip_prefix(name) else {
            return false;
        };
        let rest = rest
            .strip_prefix("_bucket")
            .or_else(|| rest.strip_prefix("_count"))
            .or_else(|| rest.strip_prefix("_sum"))
            .unwrap_or(rest);
        rest.starts_with('{') || rest.starts_with(' ')
    })
}

/// The value of the sample of `name` whose labels include every one of `labels`
/// (`grpc_method="GetMetadata"`), or 0 if there is none.
fn sample(scrape: &str, name: &str, labels: &[&str]) -> f64 {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix('{')?;
            let (set, value) = rest.rsplit_once("} ")?;
            labels
                .iter()
                .all(|label| set.split(',').any(|l| l == *label))
                .then(|| value.trim().parse::<f64>().ok())?
        })
        .sum()
}

/// Metric names (`goutube_*`, `process_*`) in a PromQL expression.
fn names_in(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut word = String::new();
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
            continue;
        }
        if word.starts_with("goutube_") || word.starts_with("process_") {
            names.push(std::mem::take(&mut word));
        }
        word.clear();
    }
    names
}

/// Every `expr` in a dashboard.
fn exprs(value: &serde_json::Value, out: &mut Vec<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("expr", serde_json::Value::String(expr)) => out.push(expr.clone()),
                    _ => exprs(value, out),
                }
            }
        }
        serde_json::Value::Array(values) => values.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

async fn scrape(node: &TestNode) -> String {
    scrape_metrics(&node.node.metrics_addr().to_string()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_has_every_series_the_dashboard_queries_and_every_documented_metric() {
    let node = TestNode::start(|_| {}).await;
    let scrape = scrape(&node).await;

    let dashboard = std::fs::read_to_string(repository().join("docs/grafana/goutube.json"))
        .expect("the dashboard");
    let dashboard: serde_json::Value = serde_json::from_str(&dashboard).expect("valid JSON");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 30, "{} queries", queries.len());
    let mut missing = Vec::new();
    for query in &queries {
        let names = names_in(query);
        assert!(!names.is_empty(), "a query of no goutube metric: {query}");
        for name in names {
            if !has_series(&scrape, &name) {
                missing.push(format!("{name} (in {query})"));
            }
        }
    }
    assert!(missing.is_empty(), "not on a fresh node: {missing:#?}");

    let operations = std::fs::read_to_string(repository().join("docs/operations.md"))
        .expect("docs/operations.md");
    let mut documented = 0;
    let mut absent = Vec::new();
    for row in operations.lines().filter(|l| l.starts_with("| `")) {
        let first_cell = row.split(" | ").next().unwrap_or_default();
        for entry in first_cell.split('`').skip(1).step_by(2) {
            let (name, labels) = entry.split_once('{').unwrap_or((entry, ""));
            if !(name.starts_with("goutube_") || name.starts_with("process_")) {
                continue;
            }
            documented += 1;
            let labels = labels.trim_end_matches('}');
            if labels.split(',').any(|label| EVENT_LABELS.contains(&label)) {
                continue;
            }
            if !has_series(&scrape, name) {
                absent.push(entry.to_owned());
            }
        }
    }
    assert!(documented >= 40, "{documented} documented metrics found");
    assert!(
        absent.is_empty(),
        "documented, not on a fresh node: {absent:#?}"
    );

    // Build and process.
    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&scrape, "goutube_build_info", &[&version]), 1.0);
    let rss = scrape
        .lines()
        .find_map(|l| l.strip_prefix("process_resident_memory_bytes "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("process_resident_memory_bytes");
    assert!(rss > 1e6, "{rss} bytes resident");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_requests_are_counted_per_method_and_route_with_their_outcome() {
    let node = TestNode::start(|_| {}).await;
    let mut client = node.client().await;
    let service = "grpc_service=\"streaming.v1.Streaming\"";
    let handled = |scrape: &str, method: &str, code: &str| {
        let method = format!("grpc_method=\"{method}\"");
        let code = format!("grpc_code=\"{code}\"");
        sample(
            scrape,
            "goutube_grpc_server_handled_total",
            &[service, &method, &code],
        )
    };
    let timed = |scrape: &str, method: &str| {
        let method = format!("grpc_method=\"{method}\"");
        sample(
            scrape,
            "goutube_grpc_server_handling_seconds_count",
            &[service, &method],
        )
    };
    let route = |scrape: &str, route: &str| {
        let route = format!("route=\"{route}\"");
        sample(
            scrape,
            "goutube_http_request_duration_seconds_count",
            &[&route],
        )
    };

    let before = scrape(&node).await;
    produce(&mut client, "counted", &[data(27, 1000)])
        .await
        .expect("produce");
    let missing = client
        .get_metadata(MetadataRequest {
            point: "no-such-point".into(),
        })
        .await
        .expect_err("no such point");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let found = http(
        node.node.http_addr(),
        "GET",
        "/v1/points/counted",
        &[],
        None,
    )
    .await;
    assert_eq!(found.status, 200);
    let elsewhere = http(node.node.http_addr(), "GET", "/no/such/page", &[], None).await;
    assert_eq!(elsewhere.status, 404);

    // Counted when each call's response ended, which the client saw first: wait for them.
    let deadline = std::time::Instant::now() + goutube_tests::DEADLINE;
    loop {
        let after = scrape(&node).await;
        let grown = |f: &dyn Fn(&str) -> f64| f(&after) - f(&before);
        let counts = [
            grown(&|s| handled(s, "ProduceStream", "OK")),
            grown(&|s| handled(s, "GetMetadata", "NotFound")),
            grown(&|s| timed(s, "GetMetadata")),
            grown(&|s| route(s, "/v1/points/{*id}")),
            grown(&|s| route(s, "other")),
        ];
        if counts.iter().all(|&c| c >= 1.0) {
            assert_eq!(
                counts, [1.0; 5],
                "each call and request counted once, in its method or route"
            );
            assert_eq!(
                grown(&|s| handled(s, "GetMetadata", "OK")),
                0.0,
                "the NotFound is not an OK"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not counted: {counts:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    node.shutdown().await;
}
