//! The node's HTTP endpoints (axum routers served by [`serve`] on the connections of
//! [`crate::net::accept`], plaintext or TLS): `GET /metrics` in the Prometheus text format on the
//! metrics listener, and the range gateway ([`gateway`]) with the pages for people ([`pages`]) on
//! `http_port`, with its cap on connections and its timeouts.

pub(crate) mod gateway;
mod h1;
pub(crate) mod pages;
pub(crate) mod range;
mod serve;

pub(crate) use serve::Limits;

use tokio_util::sync::CancellationToken;

use crate::config::HttpSection;
use crate::net::{self, Cap};
use crate::service::{Handle, Service};

/// Most bytes the gateway reads at once for a client over TLS (or HTTP/2, or a followed point):
/// about what a viewer whose socket is full holds of the node's memory (`docs/http.md`, "The hot
/// path"). Plaintext HTTP/1.1 sends a point's bytes with `sendfile` and holds no frame.
pub(crate) const FRAME: u64 = 64 * 1024;

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
    let app = timed(gateway::router(gateway), gateway::ROUTES);
    serve::serve(connections, app, limits, &service.spawner(), abort);
    Ok(service.handle())
}

/// Serves `GET /metrics` on `listener` until the handle is shut down or `token` is cancelled,
/// with the gateway's timeouts.
pub(crate) fn start_metrics(
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
    // The registry is process-wide (`metrics::handle`); rendering also reads the process metrics.
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { crate::metrics::render() }),
    );
    let app = timed(app, &["/metrics"]);
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

/// `router` with each request timed into `goutube_http_request_duration_seconds{route}` (the
/// route's pattern, `other` for a path no route matched), to the response's head: a download's
/// body is not part of it. `routes` are registered at start, empty.
fn timed(router: axum::Router, routes: &[&'static str]) -> axum::Router {
    for route in routes.iter().chain(&[OTHER_ROUTE]) {
        let _ = ::metrics::histogram!(crate::metrics::HTTP_REQUEST_SECONDS, "route" => *route);
    }
    router.layer(axum::middleware::from_fn(time_request))
}

/// The `route` of a request that matched no route.
const OTHER_ROUTE: &str = "other";

async fn time_request(
    route: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let route = route.map_or_else(|| OTHER_ROUTE.to_owned(), |r| r.as_str().to_owned());
    let response = next.run(request).await;
    ::metrics::histogram!(crate::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
