//! The node's HTTP endpoints (axum routers served by [`serve`] on the connections of
//! [`crate::net::accept`], plaintext or TLS): `GET /metrics` in the Prometheus text format on the
//! metrics listener, and the range gateway ([`gateway`]) on `http_port`, with its cap on
//! connections and its timeouts.

pub(crate) mod gateway;
mod h1;
pub(crate) mod range;
mod serve;

pub(crate) use serve::Limits;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HttpSection;
use crate::net::{self, Cap};
use crate::service::{Handle, Service};

/// Most bytes the gateway reads at once for a client: about what a viewer whose socket is full
/// holds of the node's memory (`docs/http.md`, "The hot path").
pub(crate) const FRAME: u64 = 128 * 1024;

/// Bytes of a response hyper keeps queued before it asks the body for its next frame: hyper
/// asks only once the last frame is nearly written, so a viewer holds about one frame.
const WRITE_BUFFER: usize = 16 * 1024;

/// Serves the range gateway on `listener` until the handle is shut down or `token` is
/// cancelled, at most `http.max_connections` connections at once. With TLS, client
/// certificates are asked for but not required.
pub(crate) fn start_gateway(
    gateway: gateway::Gateway,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
) -> std::io::Result<Handle> {
    let service = Service::new("gateway", token);
    let section = &gateway.services.config.http;
    let limits = Limits::of(section, WRITE_BUFFER);
    let cap = Cap::new(section.max_connections);
    let abort = gateway.services.lifetime.abort.clone();
    let connections = net::accept(
        listener,
        tls,
        net::ClientCertificates::Optional,
        &service.spawner(),
        "http",
        Some(cap),
    );
    let app = gateway::router(gateway);
    serve::serve(connections, app, limits, &service.spawner(), abort);
    Ok(service.handle())
}

/// Serves `GET /metrics` on `listener` until the handle is shut down or `token` is cancelled,
/// with the gateway's timeouts.
pub(crate) fn start_metrics(
    handle: PrometheusHandle,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    section: &HttpSection,
    token: CancellationToken,
) -> std::io::Result<Handle> {
    let service = Service::new("metrics", token);
    let connections = net::accept(
        listener,
        tls,
        net::ClientCertificates::Required,
        &service.spawner(),
        "metrics",
        None,
    );
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    // A scrape is small: shutdown ends it with the rest.
    let abort = service.token().clone();
    serve::serve(
        connections,
        app,
        Limits::of(section, WRITE_BUFFER),
        &service.spawner(),
        abort,
    );
    Ok(service.handle())
}
