//! What operators rely on: the standard health service, server reflection and Prometheus metrics.

use goutube::proto::ProduceRequest;
use goutube_tests::{TestNode, consume, data, metric, produce, scrape_metrics, window};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(node: &TestNode) -> tonic::transport::Channel {
    goutube::client::channel(&goutube::client::ClientOptions {
        addr: node.addr(),
        tls: None,
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn health_reports_serving() {
    let node = TestNode::start(|_| {}).await;
    let health = HealthClient::new(channel(&node).await);
    // Serving once its ring is formed (a standalone node forms it alone, at once).
    for service in ["", "streaming.v1.Streaming"] {
        goutube_tests::eventually(&format!("{service:?} to serve"), || {
            let mut health = health.clone();
            async move {
                let response = health
                    .check(HealthCheckRequest {
                        service: service.into(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                response.status() == ServingStatus::Serving
            }
        })
        .await;
    }
    node.shutdown().await;
}

/// The services a node lists through reflection.
const LISTED: [&str; 4] = [
    "streaming.v1.Streaming",
    "streaming.v1.LBResolverHelper",
    "streaming.v1.FollowerResolverHelper",
    "grpc.health.v1.Health",
];

#[tokio::test]
async fn reflection_lists_the_services_in_v1_and_v1alpha() {
    let node = TestNode::start(|_| {}).await;
    let mut reflection = ServerReflectionClient::new(channel(&node).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in LISTED {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }

    // The same through v1alpha, the only one older clients ask.
    use tonic_reflection::pb::v1alpha;
    let mut reflection =
        v1alpha::server_reflection_client::ServerReflectionClient::new(channel(&node).await);
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            v1alpha::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected v1alpha reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for want in LISTED {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?} (v1alpha)"
        );
    }
    node.shutdown().await;
}

#[tokio::test]
async fn metrics_count_traffic_and_errors() {
    let node = TestNode::start(|_| {}).await;
    let metrics_addr = node.node.metrics_addr().to_string();
    let before = scrape_metrics(&metrics_addr).await;
    let base = |name: &str| metric(&before, name).unwrap_or(0.0);
    let (produced, consumed, fsyncs, not_found) = (
        base("goutube_produce_bytes_total"),
        base("goutube_consume_bytes_total"),
        base("goutube_fsyncs_total"),
        base("goutube_errors_total"),
    );

    let mut client = node.client().await;
    produce(&mut client, "m", &[data(1, 1000), data(2, 2000)])
        .await
        .unwrap();
    consume(&mut client, window("m", 0, 0, 0)).await.unwrap();
    consume(&mut client, window("absent", 0, 0, 0))
        .await
        .unwrap_err();
    let _ = client
        .produce_stream(tokio_stream::iter([ProduceRequest {
            point: String::new(),
            frame: vec![1].into(),
            ..Default::default()
        }]))
        .await;

    let after = scrape_metrics(&metrics_addr).await;
    assert!(
        after.starts_with("HTTP/1.0 200") || after.starts_with("HTTP/1.1 200"),
        "{after}"
    );
    // Other tests in this process share the registry: compare with at-least.
    assert!(metric(&after, "goutube_produce_bytes_total").unwrap() >= produced + 3000.0);
    assert!(metric(&after, "goutube_consume_bytes_total").unwrap() >= consumed + 3000.0);
    // Both frames may share one sync (group commit).
    assert!(metric(&after, "goutube_fsyncs_total").unwrap() >= fsyncs + 1.0);
    assert!(metric(&after, "goutube_errors_total").unwrap() >= not_found + 2.0);
    assert!(
        after.contains("goutube_errors_total{code=\"NotFound\"}"),
        "{after}"
    );
    assert!(after.contains("goutube_fsync_seconds_bucket"), "{after}");
    assert!(metric(&after, "goutube_open_points").is_some());
    node.shutdown().await;
}
