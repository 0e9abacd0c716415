//! The gRPC API of a node: the generated `streaming.v1` types and the server that serves them.
//!
//! [`start`] assembles the services (streaming, resolver helpers, health, reflection) on one
//! listener with tuned HTTP/2 windows and runs them until shutdown. The handlers live in
//! [`streaming`] and share a [`Context`]; every error they return goes through
//! `From<Error> for Status`.

mod calls;
pub mod context;
pub mod resolver;
pub mod streaming;
pub mod transfer;

use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

pub use context::Context;

use crate::controller::ControllerService;
use crate::net;
use crate::proto::controller::controller_server::ControllerServer;
use crate::proto::{self, CONNECTION_WINDOW, H2_FRAME, STREAM_WINDOW};
use crate::service::{Handle, Service};

/// The encoded descriptor set that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/streaming_descriptor.bin"));

/// What the API serves: the client API's handlers, the resolver helpers, and on a voter the
/// controller's service.
pub struct Handlers<S, R> {
    /// `streaming.v1.Streaming`: a storage node's, or a balancer's forwarding one.
    pub streaming: S,
    /// The resolver helpers (`LbResolverHelper`, `FollowerResolverHelper`).
    pub resolver: R,
    /// `goutube.controller.v1.Controller`, on a voter.
    pub controller: Option<ControllerServer<ControllerService>>,
}

/// A server builder with the transport settings every goutube gRPC server uses.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(H2_FRAME)
        .tcp_nodelay(true)
}

/// Serves the client API (`streaming`, the resolver helpers, health, reflection; the
/// controller's service on a voter) on `listener`
/// until `token` is cancelled; then waits for open calls (which end themselves once the node's
/// grace period is over). Storage nodes serve [`streaming::StreamingService`]; balancers their
/// forwarding service. Health answers `NOT_SERVING` until `ready` resolves (the node sees a
/// formed ring), then `SERVING`.
pub fn start<S, R>(
    handlers: Handlers<S, R>,
    max_frame_size: u64,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
    ready: impl std::future::Future<Output = ()> + Send + 'static,
) -> Handle
where
    S: proto::streaming_server::Streaming,
    R: proto::lb_resolver_helper_server::LbResolverHelper
        + proto::follower_resolver_helper_server::FollowerResolverHelper
        + Clone,
{
    let service = Service::new("api", token);
    // Every method is on the metrics endpoint from the start.
    calls::register(&[FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET]);
    let incoming = net::accept(
        listener,
        tls,
        net::ClientCertificates::Required,
        &service.spawner(),
        "rpc",
        None,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    let spawner = service.spawner();
    let shutdown = service.token().clone();
    service.spawn("serve", async move {
        // tonic's reporter starts with the whole server SERVING: say NOT_SERVING before the
        // first call is answered, or a probe at start-up sees a node without a ring as ready.
        report(&health, tonic_health::ServingStatus::NotServing).await;
        let stop = shutdown.clone();
        spawner.spawn("health", async move {
            tokio::select! {
                () = ready => {}
                () = stop.cancelled() => return,
            }
            report(&health, tonic_health::ServingStatus::Serving).await;
            // Operators (and the README's test) wait for this line.
            tracing::info!("ready: the ring is formed; health reports SERVING");
        });
        let served = serve(handlers, max_frame_size, incoming, health_service, shutdown);
        if let Err(error) = served.await {
            tracing::error!(%error, "the API server failed");
        }
    });
    service.handle()
}

/// Reports `status` for the whole server ("") and the streaming service together.
async fn report(
    health: &tonic_health::server::HealthReporter,
    status: tonic_health::ServingStatus,
) {
    for name in ["", proto::streaming_server::SERVICE_NAME] {
        health.set_service_status(name, status).await;
    }
}

async fn serve<S, R>(
    Handlers {
        streaming,
        resolver,
        controller,
    }: Handlers<S, R>,
    max_frame_size: u64,
    incoming: impl tokio_stream::Stream<Item = std::io::Result<net::Connection>> + Send + 'static,
    health_service: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error>
where
    S: proto::streaming_server::Streaming,
    R: proto::lb_resolver_helper_server::LbResolverHelper
        + proto::follower_resolver_helper_server::FollowerResolverHelper
        + Clone,
{
    // Reflection v1, and v1alpha for the clients that ask only that one (grpcurl before 1.8.8,
    // grpcui, Postman, Evans).
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .expect("the embedded descriptor sets are valid");
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .expect("the embedded descriptor sets are valid");

    // Room for the largest frame plus the message envelope.
    let max_message = max_frame_size as usize + 64 * 1024;
    let streaming = proto::streaming_server::StreamingServer::new(streaming)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let servers = proto::lb_resolver_helper_server::LbResolverHelperServer::new(resolver.clone());
    let followers =
        proto::follower_resolver_helper_server::FollowerResolverHelperServer::new(resolver);

    server_builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .layer(calls::CallMetricsLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(streaming)
        .add_service(servers)
        .add_service(followers)
        .add_optional_service(controller)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
