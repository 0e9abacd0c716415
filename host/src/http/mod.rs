//! The node's HTTP endpoints (axum over the connections of [`crate::net::accept`], plaintext or
//! TLS): `GET /metrics` in the Prometheus text format on the metrics listener, and the range
//! gateway ([`gateway`]) on `http_port`.

pub(crate) mod gateway;
pub(crate) mod range;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::key::InvalidKey;
use crate::net::{self, Connection, PeerInfo};
use crate::secret::Secret;
use crate::service::{Handle, Service};

/// The `[http]` section of the configuration: the gateway's signed URLs and caching.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// The start of the URLs `SignUrl` hands out, as clients reach the gateway (a load balancer's
    /// name, say); default: `http(s)://<bind ip>:<http_port>`.
    pub public_url: Option<String>,
    /// Keys that sign URLs: the first signs, every one verifies (rotation). Prefer
    /// `url_key_files` or `GOUTUBE_HTTP__URL_KEYS`.
    pub url_keys: Vec<Secret>,
    /// Files that hold such keys, in the same order after `url_keys`.
    pub url_key_files: Vec<PathBuf>,
    /// Longest life of a signed URL, in seconds.
    pub max_url_ttl_s: u64,
    /// A point that grew less than this long ago is served with `Cache-Control: no-cache`.
    pub writing_window_ms: u64,
}

impl Default for HttpSection {
    fn default() -> Self {
        Self {
            public_url: None,
            url_keys: Vec::new(),
            url_key_files: Vec::new(),
            max_url_ttl_s: 7 * 24 * 3600,
            writing_window_ms: 60_000,
        }
    }
}

/// Shortest URL signing key accepted.
pub(crate) const MIN_URL_KEY_LEN: usize = 16;

impl HttpSection {
    /// Checks what serde cannot; errors name the key.
    pub fn validate(&self) -> Result<(), InvalidKey> {
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(InvalidKey::new(
                "http.public_url",
                format!("{url:?} must start with http:// or https://"),
            ));
        }
        if self.max_url_ttl_s < 60 {
            return Err(InvalidKey::new("http.max_url_ttl_s", "must be at least 60"));
        }
        if self
            .url_keys
            .iter()
            .any(|key| key.0.len() < MIN_URL_KEY_LEN)
        {
            return Err(InvalidKey::new(
                "http.url_keys",
                format!("every key must be at least {MIN_URL_KEY_LEN} bytes"),
            ));
        }
        self.url_key_bytes().map(|_| ())
    }

    /// The signing keys, `url_keys` then `url_key_files`.
    pub fn url_key_bytes(&self) -> Result<Vec<Vec<u8>>, InvalidKey> {
        let mut keys: Vec<Vec<u8>> = self
            .url_keys
            .iter()
            .map(|key| key.0.as_bytes().to_vec())
            .collect();
        for path in &self.url_key_files {
            let key = crate::secret::read_file(path).map_err(|e| {
                InvalidKey::new("http.url_key_files", format!("{}: {e}", path.display()))
            })?;
            if key.len() < MIN_URL_KEY_LEN {
                return Err(InvalidKey::new(
                    "http.url_key_files",
                    format!(
                        "{} must hold at least {MIN_URL_KEY_LEN} bytes",
                        path.display()
                    ),
                ));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// The longest a signed URL may live (`http.max_url_ttl_s`).
    pub fn max_url_ttl(&self) -> Duration {
        Duration::from_secs(self.max_url_ttl_s)
    }
}

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
