//! The node's HTTP endpoints (axum over the connections of [`crate::net::accept`], plaintext or
//! TLS): `GET /metrics` in the Prometheus text format on the metrics listener, and the range
//! gateway ([`gateway`]) on `http_port`.

pub(crate) mod gateway;
pub(crate) mod range;

use std::net::SocketAddr;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::net::{self, Connection, PeerInfo};
use crate::service::{Handle, Service};

/// Serves the range gateway on `listener` until the handle is shut down or `token` is
/// cancelled. With TLS, client certificates are asked for but not required.
pub(crate) fn start_gateway(
    gateway: gateway::Gateway,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
) -> std::io::Result<Handle> {
    let service = Service::new("gateway", token);
    let incoming = Incoming {
        local_addr: listener.local_addr()?,
        connections: net::accept(
            listener,
            tls,
            net::ClientCertificates::Optional,
            &service.spawner(),
            "http",
        ),
    };
    let app = gateway::router(gateway, service.spawner());
    let shutdown = service.token().clone();
    service.spawn("serve", async move {
        let serving = axum::serve(
            incoming,
            app.into_make_service_with_connect_info::<PeerInfo>(),
        )
        .with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = serving.await {
            tracing::error!(%error, "the HTTP gateway failed");
        }
    });
    Ok(service.handle())
}

/// The peer of each request, as the accept loop identified it.
impl Connected<IncomingStream<'_, Incoming>> for PeerInfo {
    fn connect_info(stream: IncomingStream<'_, Incoming>) -> Self {
        stream.io().peer().clone()
    }
}

/// Serves `GET /metrics` on `listener` until the handle is shut down or `token` is cancelled.
pub(crate) fn start_metrics(
    handle: PrometheusHandle,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
) -> std::io::Result<Handle> {
    let service = Service::new("metrics", token);
    let incoming = Incoming {
        local_addr: listener.local_addr()?,
        connections: net::accept(
            listener,
            tls,
            net::ClientCertificates::Required,
            &service.spawner(),
            "metrics",
        ),
    };
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    let shutdown = service.token().clone();
    service.spawn("serve", async move {
        if let Err(error) = axum::serve(incoming, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%error, "metrics endpoint failed");
        }
    });
    Ok(service.handle())
}

/// Accepted connections as an axum listener.
pub struct Incoming {
    pub connections: ReceiverStream<std::io::Result<Connection>>,
    pub local_addr: SocketAddr,
}

impl axum::serve::Listener for Incoming {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Connection, SocketAddr) {
        loop {
            match self.connections.next().await {
                Some(Ok(connection)) => {
                    let addr = connection.peer().addr;
                    return (connection, addr);
                }
                Some(Err(error)) => tracing::warn!(%error, "HTTP connection failed"),
                // The accept loop stopped (shutdown): wait for axum's graceful shutdown.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}
