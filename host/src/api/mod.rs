//! The gRPC API of a node: the generated `streaming.v1` types and the server that serves them.
//!
//! [`serve`] assembles the services (streaming, resolver helpers, health, reflection) on one
//! listener with tuned HTTP/2 windows and runs them until shutdown. The handlers live in
//! [`streaming`]; every error they return goes through `From<Error> for Status`.

pub mod streaming;

use std::sync::Arc;

use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::net::Connection;
use crate::node::NodeState;

/// Generated from `schema/proto/streaming/v1/streaming.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("streaming.v1");
}

/// The encoded descriptor set that server reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/streaming_descriptor.bin"));

/// HTTP/2 flow-control windows: large enough that a 256 KiB frame never waits for a window
/// update (STACK.md measured ~7x throughput over the defaults).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 8 * 1024 * 1024;

/// A server builder with the transport settings every goutube gRPC server uses.
pub fn server_builder() -> Server {
    Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .tcp_nodelay(true)
}

/// Serves the client API on `incoming` until `shutdown` is cancelled, then waits for open calls
/// (which end themselves once the node's grace period is over).
pub async fn serve(
    state: Arc<NodeState>,
    incoming: impl Stream<Item = std::io::Result<Connection>> + Send + 'static,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<proto::streaming_server::StreamingServer<streaming::StreamingService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the embedded descriptor sets are valid");

    // Room for the largest frame plus the message envelope.
    let max_message = state.config.max_frame_size as usize + 64 * 1024;
    let streaming = proto::streaming_server::StreamingServer::new(
        streaming::StreamingService::new(state.clone()),
    )
    .max_decoding_message_size(max_message)
    .max_encoding_message_size(max_message);
    let servers = proto::lb_resolver_helper_server::LbResolverHelperServer::new(
        streaming::ResolverService::new(state.clone()),
    );
    let followers = proto::follower_resolver_helper_server::FollowerResolverHelperServer::new(
        streaming::ResolverService::new(state.clone()),
    );

    server_builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .add_service(health_service)
        .add_service(reflection)
        .add_service(streaming)
        .add_service(servers)
        .add_service(followers)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}
