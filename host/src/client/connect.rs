//! Connecting to a node: the channel (HTTP/2 windows and frame size as the server's, a default
//! port for an address without one), with TLS the rustls connector that presents the client's
//! certificate, and the [`Pool`] of connections to many nodes.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::proto::streaming_client::StreamingClient;
use crate::proto::{CONNECTION_WINDOW, H2_FRAME, STREAM_WINDOW};

use super::*;

pub(super) fn streaming_client(channel: Channel) -> StreamingClient<Channel> {
    StreamingClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024 + 64 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024 + 64 * 1024)
}

/// A tuned channel to `options.addr`.
pub async fn channel(options: &ClientOptions) -> Result<Channel, ClientError> {
    let connect_error = |source| ClientError::Connect {
        addr: options.addr.clone(),
        source,
    };
    let endpoint = endpoint(options)?;
    match tls_connect(options)? {
        None => endpoint.connect().await,
        Some(connect) => endpoint.connect_with_connector(connect).await,
    }
    .map_err(connect_error)
}

/// A tuned channel to `options.addr` that connects on first use.
pub fn lazy_channel(options: &ClientOptions) -> Result<Channel, ClientError> {
    let endpoint = endpoint(options)?;
    Ok(match tls_connect(options)? {
        None => endpoint.connect_lazy(),
        Some(connect) => endpoint.connect_with_connector_lazy(connect),
    })
}

/// The tuned endpoint of `options.addr` (not connected yet). TLS is the connector's business
/// ([`TlsConnect`]), so the endpoint's URI always says `http`: tonic refuses an `https` URI unless
/// its own TLS connector runs.
pub(super) fn endpoint(options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let url = format!("http://{}", with_default_port(&options.addr));
    let connect_error = |source| ClientError::Connect {
        addr: options.addr.clone(),
        source,
    };
    Ok(Endpoint::from_shared(url)
        .map_err(connect_error)?
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(H2_FRAME)
        .connect_timeout(Duration::from_secs(10))
        .tcp_nodelay(true))
}

/// `address` (`host:port`, a host, an IP, or a URL) as `host:port`, with [`DEFAULT_PORT`] when
/// it names no port: `localhost` is the node on this machine, not port 80.
pub fn with_default_port(address: &str) -> String {
    let address = address
        .strip_prefix("https://")
        .or_else(|| address.strip_prefix("http://"))
        .unwrap_or(address)
        .trim_end_matches('/');
    if address.parse::<std::net::SocketAddr>().is_ok() {
        return address.to_owned();
    }
    if let Ok(ip) = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<std::net::IpAddr>()
    {
        return std::net::SocketAddr::new(ip, DEFAULT_PORT).to_string();
    }
    match address.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => address.to_owned(),
        _ => format!("{address}:{DEFAULT_PORT}"),
    }
}

/// The connector of a TLS channel, if `options` ask for TLS.
pub(super) fn tls_connect(options: &ClientOptions) -> Result<Option<TlsConnect>, ClientError> {
    let Some(tls) = &options.tls else {
        return Ok(None);
    };
    let mut config = crate::tls::client_config(
        ("CA certificate", &tls.ca),
        ("client certificate", &tls.cert),
        ("client key", &tls.key),
    )
    .map_err(|error| {
        // The node's errors name config keys; a client's name the files it was given.
        ClientError::Tls(match error {
            crate::tls::TlsError::File { key, path, message } => {
                format!("{key} {path}: {message}")
            }
            crate::tls::TlsError::Invalid { key, message } => format!("{key}: {message}"),
        })
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(TlsConnect {
        connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
        server_name: tls.server_name.clone(),
    }))
}

/// Opens a channel's connections: TCP, then TLS over a read buffer. tonic's own TLS connector
/// lets rustls read the socket 4 KiB at a time; with the buffer (`tls::READ_BUFFER`) a download
/// over mTLS makes one system call where it made up to 64.
#[derive(Clone)]
pub(super) struct TlsConnect {
    pub(super) connector: tokio_rustls::TlsConnector,
    /// The name the server's certificate must hold (default: the address's host).
    pub(super) server_name: Option<String>,
}

pub(super) type TlsIo =
    tokio_rustls::client::TlsStream<tokio::io::BufReader<tokio::net::TcpStream>>;

impl tonic::codegen::Service<tonic::codegen::http::Uri> for TlsConnect {
    type Response = hyper_util::rt::TokioIo<TlsIo>;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: tonic::codegen::http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let invalid =
                |message: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, message);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("{uri} names no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let port = uri.port_u16().unwrap_or(443);
            let name = this.server_name.unwrap_or_else(|| host.clone());
            let name = rustls::pki_types::ServerName::try_from(name)
                .map_err(|e| invalid(format!("server name: {e}")))?;
            let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let buffered = tokio::io::BufReader::with_capacity(crate::tls::READ_BUFFER, tcp);
            let stream = this.connector.connect(name, buffered).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// Connections to many nodes, one per address, made on first use and reused (a tonic channel
/// multiplexes calls).
pub struct Pool {
    tls: Option<ClientTls>,
    clients: tokio::sync::Mutex<std::collections::HashMap<String, Client>>,
}

impl Pool {
    /// An empty pool whose connections use `tls`.
    pub fn new(tls: Option<ClientTls>) -> Self {
        Self {
            tls,
            clients: Default::default(),
        }
    }

    /// The connection to `addr`, connecting (lazily: the first call connects) if there is none.
    pub async fn client(&self, addr: &str) -> Result<Client, ClientError> {
        let mut clients = self.clients.lock().await;
        if let Some(client) = clients.get(addr) {
            return Ok(client.clone());
        }
        let client = Client::lazy(ClientOptions {
            addr: addr.to_owned(),
            tls: self.tls.clone(),
        })?;
        clients.insert(addr.to_owned(), client.clone());
        Ok(client)
    }
}
