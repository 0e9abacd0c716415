//! The node's HTTP endpoints (axum over the connections of [`crate::net::accept`], plaintext or
//! TLS): `GET /metrics` in the Prometheus text format on the metrics listener.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::net::{self, Connection};
use crate::service::{Handle, Service};

/// Serves `GET /metrics` on `listener` until the handle is shut down or `token` is cancelled.
pub fn start_metrics(
    handle: PrometheusHandle,
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    token: CancellationToken,
) -> std::io::Result<Handle> {
    let service = Service::new("metrics", token);
    let incoming = Incoming {
        local_addr: listener.local_addr()?,
        connections: net::accept(listener, tls, &service.spawner(), "metrics"),
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
