//! The HTTP range gateway: `GET`/`HEAD /v1/points/{id}` serve a point's bytes to browsers, media
//! players and curl, with byte ranges, strong ETags and content types, and `/v1/player/{id}` a
//! page that plays it; `/v1/pages/…` are the pages for people ([`super::pages`]). `docs/http.md`
//! has the rules; each is a test in `tests/tests/gateway.rs` and `tests/tests/pages.rs`.
//!
//! - **Who reads.** One `consume` decision per request, by the same authorizer as gRPC, for the
//!   subject of the client certificate or of a signed URL ([`crate::signed_url`]). With TLS a
//!   request with neither is refused; without TLS the subject is `anonymous`.
//! - **What is served** is the point as it is when the request arrives, up to its committed
//!   end (one snapshot: length, checksum and ETag agree; `docs/failover.md`), read a frame at
//!   a time as hyper asks for it ([`Point::frames`]): nothing is read ahead of the socket, and
//!   when the client goes away the body is dropped and nothing more is read. `?follow=1` keeps
//!   streaming a growing point.
//! - **In a cluster**, a node that does not hold the point, or holds less than the range asks
//!   for, answers `307` to the owner (or, with the owner down, to one of its followers), never a
//!   short answer; `hop=1` on the redirected request stops a second redirect.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Path, Query, RawQuery, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use headers::{ETag, HeaderMapExt, IfNoneMatch, IfRange};
use serde::Deserialize;
use tokio_stream::StreamExt;

use super::pages::{self, Catalog, Playing, Viewer};
use super::range::{self, Answer};
use crate::access::Action;
use crate::metrics;
use crate::net::{NO_CERTIFICATE, PeerInfo};
use crate::point::{FilePiece, Point, PointId, ReadError, Span, Store, StreamError};
use crate::reshard::gate::{self, Holder};
use crate::services::Services;
use crate::signed_url::{Resource, encode_path};
use crate::text::bounded;

/// What the gateway's handlers share.
pub(crate) struct Gateway {
    /// What every subsystem of the node shares (access, placement, the URL signer, the API
    /// address, the node's lifetime: shutdown ends `?follow=1` streams, abort every read).
    pub services: Services,
    /// The node's points; `None` on a balancer, which stores nothing and redirects every request.
    pub store: Option<Store>,
    /// Bytes per read: a frame of the body, about what a viewer whose socket is full holds of
    /// the node's memory.
    pub chunk: u64,
    /// Whether this gateway speaks HTTPS (redirects keep the scheme).
    pub tls: bool,
    /// A point that grew less than this long ago is served with `Cache-Control: no-cache`.
    pub writing_window: Duration,
    /// The node's own gRPC service, which the pages ask as their viewer.
    pub catalog: Arc<dyn Catalog>,
}

/// The router's state.
struct Served {
    gateway: Gateway,
}

/// The query of a request: a signed URL's fields, `follow`, the redirect marker, and the
/// points page's search.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Params {
    expires: Option<String>,
    subject: Option<String>,
    sig: Option<String>,
    follow: Option<String>,
    hop: Option<String>,
    prefix: Option<String>,
    after: Option<String>,
}

impl Params {
    fn follow(&self) -> bool {
        matches!(self.follow.as_deref(), Some("1" | "true" | "yes"))
    }
}

/// The gateway's routes, as `goutube_http_request_duration_seconds` labels them.
pub(crate) const ROUTES: &[&str] = &[
    POINT,
    PLAYER,
    NO_POINT,
    NO_PLAYER,
    pages::POINTS,
    pages::CLUSTER,
    HOME,
];
const POINT: &str = "/v1/points/{*id}";
const PLAYER: &str = "/v1/player/{*id}";
const NO_POINT: &str = "/v1/points/";
const NO_PLAYER: &str = "/v1/player/";
/// `/`: the points page.
const HOME: &str = "/";

pub(crate) fn router(gateway: Gateway) -> Router {
    Router::new()
        .route(POINT, get(point))
        .route(PLAYER, get(player))
        .route(NO_POINT, get(no_point))
        .route(NO_PLAYER, get(no_point))
        .route(pages::POINTS, get(points_page))
        .route(pages::CLUSTER, get(cluster_page))
        .route(HOME, get(home))
        .fallback(elsewhere)
        .with_state(Arc::new(Served { gateway }))
}

/// `/v1/points/` and `/v1/player/` name no point.
async fn no_point() -> Response {
    count(
        Refusal::BadRequest("no point id in the path: /v1/points/{id} or /v1/player/{id}".into())
            .into_response(),
    )
}

/// Any other path: a line saying what this port serves; a gRPC client (which sent a request
/// with a gRPC content type) gets a gRPC status naming the port its call belongs on.
async fn elsewhere(State(served): State<Arc<Served>>, headers: HeaderMap) -> Response {
    let grpc = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("application/grpc"));
    if !grpc {
        return count(
            Refusal::NotFound(
                "no such page: this port serves /v1/points/{id}, /v1/player/{id}, \
                 /v1/pages/points and /v1/pages/cluster"
                    .into(),
            )
            .into_response(),
        );
    }
    let message = format!(
        "this is the HTTP gateway of the node; its gRPC API listens at {}",
        served.gateway.services.rpc_addr
    );
    let encoded =
        percent_encoding::utf8_percent_encode(&message, percent_encoding::NON_ALPHANUMERIC);
    let mut response = StatusCode::OK.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    // UNIMPLEMENTED: there is no such gRPC method on this port.
    headers.insert("grpc-status", HeaderValue::from_static("12"));
    if let Ok(value) = HeaderValue::try_from(encoded.to_string()) {
        headers.insert("grpc-message", value);
    }
    count(response)
}

/// Why a request is not answered with the point: one line of text for people, the right status
/// for programs.
enum Refusal {
    BadRequest(String),
    Forbidden(String),
    NotFound(String),
    Unavailable(String),
    Redirect(String),
    Internal(String),
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Refusal::BadRequest(text) => (StatusCode::BAD_REQUEST, text),
            Refusal::Forbidden(text) => (StatusCode::FORBIDDEN, text),
            Refusal::NotFound(text) => (StatusCode::NOT_FOUND, text),
            Refusal::Unavailable(text) => (StatusCode::SERVICE_UNAVAILABLE, text),
            Refusal::Internal(text) => (StatusCode::INTERNAL_SERVER_ERROR, text),
            Refusal::Redirect(location) => {
                let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
                if let Ok(value) = HeaderValue::try_from(location) {
                    response.headers_mut().insert(header::LOCATION, value);
                }
                return response;
            }
        };
        let one_line = bounded(&text.replace(['\r', '\n'], " "));
        (
            status,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            one_line + "\n",
        )
            .into_response()
    }
}

impl From<ReadError> for Refusal {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::NotFound(id) => Refusal::NotFound(format!("point {id} not found")),
            other => Refusal::Internal(other.to_string()),
        }
    }
}

/// One request, with what every handler needs of it.
struct Request {
    id: PointId,
    params: Params,
    raw_query: Option<String>,
    path: &'static str,
}

async fn point(
    State(served): State<Arc<Served>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    method: Method,
    Path(id): Path<String>,
    params: Result<Query<Params>, QueryRejection>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let gateway = &served.gateway;
    let answer = async {
        let request = gateway.request("points", id, params, raw_query)?;
        gateway.serve(&peer, &method, &request, &headers).await
    }
    .await;
    let response = answered(answer);
    tracing::debug!(peer = %peer.addr, %method, %range, status = response.status().as_u16(), "gateway request");
    response
}

async fn player(
    State(served): State<Arc<Served>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    Path(id): Path<String>,
    params: Result<Query<Params>, QueryRejection>,
    RawQuery(raw_query): RawQuery,
) -> Response {
    let gateway = &served.gateway;
    let page = async {
        let request = gateway.request("player", id, params, raw_query)?;
        gateway.page(&peer, &request).await
    }
    .await;
    answered(page)
}

/// `/`: the points page, with the same query (a signed URL's fields).
async fn home(RawQuery(raw_query): RawQuery) -> Response {
    let location = match raw_query {
        Some(query) if !query.is_empty() => format!("{}?{query}", pages::POINTS),
        _ => pages::POINTS.to_owned(),
    };
    count(Refusal::Redirect(location).into_response())
}

async fn points_page(
    State(served): State<Arc<Served>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    params: Result<Query<Params>, QueryRejection>,
) -> Response {
    let gateway = &served.gateway;
    let page = async {
        let (viewer, params) = gateway.page_viewer(&peer, params)?;
        let (prefix, after) = (
            params.prefix.as_deref().unwrap_or_default(),
            params.after.as_deref().unwrap_or_default(),
        );
        let signer = &gateway.services.signer;
        Ok::<_, Refusal>(pages::points(&*gateway.catalog, signer, &viewer, prefix, after).await)
    }
    .await;
    answered(page)
}

async fn cluster_page(
    State(served): State<Arc<Served>>,
    ConnectInfo(peer): ConnectInfo<PeerInfo>,
    params: Result<Query<Params>, QueryRejection>,
) -> Response {
    let gateway = &served.gateway;
    let page = async {
        let (viewer, _) = gateway.page_viewer(&peer, params)?;
        let shares = gateway
            .services
            .placement
            .shares(pages::SHARE_SAMPLES)
            .await;
        Ok::<_, Refusal>(pages::cluster(&*gateway.catalog, &viewer, shares).await)
    }
    .await;
    answered(page)
}

/// A handler's answer: the response, or its refusal's; counted.
fn answered(answer: Result<Response, Refusal>) -> Response {
    count(answer.unwrap_or_else(IntoResponse::into_response))
}

fn count(response: Response) -> Response {
    ::metrics::counter!(metrics::HTTP_REQUESTS, "status" => response.status().as_str().to_owned())
        .increment(1);
    response
}

impl Gateway {
    fn request(
        &self,
        path: &'static str,
        id: String,
        params: Result<Query<Params>, QueryRejection>,
        raw_query: Option<String>,
    ) -> Result<Request, Refusal> {
        let id =
            PointId::new(id).map_err(|e| Refusal::BadRequest(format!("invalid point id: {e}")))?;
        let Query(params) =
            params.map_err(|e| Refusal::BadRequest(format!("malformed query: {e}")))?;
        Ok(Request {
            id,
            params,
            raw_query,
            path,
        })
    }

    /// The one authorization decision of a request: for the signed URL's subject if the request
    /// carries one, else for the client certificate's.
    async fn authorize(&self, peer: &PeerInfo, request: &Request) -> Result<(), Refusal> {
        let id = request.id.as_str();
        let reader = self.viewer(peer, &request.params, Resource::Point(id))?;
        self.services
            .access
            .authorize(&reader.peer, Action::Consume, id)
            .await
            .map_err(|denied| Refusal::Forbidden(denied.to_string()))
    }

    /// Who a page is for (a signed URL of the pages' subject, or the client certificate's), and
    /// the page's query. What the page shows is authorized call by call ([`pages::Catalog`]).
    fn page_viewer(
        &self,
        peer: &PeerInfo,
        params: Result<Query<Params>, QueryRejection>,
    ) -> Result<(Viewer, Params), Refusal> {
        let Query(params) =
            params.map_err(|e| Refusal::BadRequest(format!("malformed query: {e}")))?;
        let viewer = self.viewer(peer, &params, Resource::Pages)?;
        Ok((viewer, params))
    }

    /// Who a request for `resource` is for: the subject of its signed URL if it carries one,
    /// else of its client certificate.
    fn viewer(
        &self,
        peer: &PeerInfo,
        params: &Params,
        resource: Resource<'_>,
    ) -> Result<Viewer, Refusal> {
        let signed = params.sig.is_some() || params.expires.is_some() || params.subject.is_some();
        if signed {
            let grant = self
                .services
                .signer
                .verify(
                    resource,
                    params.expires.as_deref(),
                    params.subject.as_deref(),
                    params.sig.as_deref(),
                )
                .map_err(|e| Refusal::Forbidden(e.to_string()))?;
            Ok(Viewer {
                peer: PeerInfo {
                    addr: peer.addr,
                    subject: grant.subject.as_str().into(),
                },
                grant: Some(grant),
            })
        } else if &*peer.subject == NO_CERTIFICATE {
            let command = match resource {
                Resource::Point(_) => "goutube url",
                Resource::Pages => "goutube url --pages",
            };
            Err(Refusal::Forbidden(format!(
                "no client certificate and no signed URL (`{command}` makes one)"
            )))
        } else {
            Ok(Viewer {
                peer: peer.clone(),
                grant: None,
            })
        }
    }

    /// The point if this node holds it (never on a balancer); else the redirect to a node that
    /// does, or why not.
    async fn find(
        &self,
        request: &Request,
        reaches_past: impl Fn(u64) -> bool,
    ) -> Result<(Store, Arc<Point>), Refusal> {
        let local = match &self.store {
            None => None,
            Some(store) => match store.point(&request.id).await {
                // A copy still arriving in a handover is not served: its old owner serves it.
                Ok(point) if point.snapshot().arriving => None,
                Ok(point) => Some((store.clone(), point)),
                Err(ReadError::NotFound(_)) => None,
                Err(error) => return Err(error.into()),
            },
        };
        let lacking = local
            .as_ref()
            .is_none_or(|(_, point)| reaches_past(point.snapshot().committed));
        if lacking
            && request.params.hop.is_none()
            && let Some(location) = self.elsewhere(request).await
        {
            return Err(Refusal::Redirect(location));
        }
        match local {
            Some(found) => Ok(found),
            None => match self.owner_down(&request.id).await {
                Some(owner) => Err(Refusal::Unavailable(format!(
                    "point {} belongs to member {owner}, which is down, and no live replica was found",
                    request.id
                ))),
                None => Err(Refusal::NotFound(format!("point {} not found", request.id))),
            },
        }
    }

    /// Where a copy at least as complete as this node's lives (the gate's holder: the owner if
    /// it is live, as it holds every acknowledged byte; else a live follower of the owner).
    async fn elsewhere(&self, request: &Request) -> Option<String> {
        let Holder::Member(target) =
            gate::holder(&self.services.placement, request.id.as_str()).await
        else {
            return None;
        };
        if target.http_addr.is_empty() {
            return None;
        }
        let scheme = if self.tls { "https" } else { "http" };
        let query = match &request.raw_query {
            Some(query) if !query.is_empty() => format!("{query}&hop=1"),
            _ => "hop=1".into(),
        };
        Some(format!(
            "{scheme}://{}/v1/{}/{}?{query}",
            target.http_addr,
            request.path,
            encode_path(request.id.as_str())
        ))
    }

    /// The owner of `id` if it is down and no live follower of it is known.
    async fn owner_down(&self, id: &PointId) -> Option<String> {
        match gate::holder(&self.services.placement, id.as_str()).await {
            Holder::Down(owner) => Some(owner),
            Holder::Nobody | Holder::Member(_) => None,
        }
    }

    async fn serve(
        &self,
        peer: &PeerInfo,
        method: &Method,
        request: &Request,
        headers: &HeaderMap,
    ) -> Result<Response, Refusal> {
        self.authorize(peer, request).await?;
        let follow = request.params.follow();
        let spec = headers
            .get(header::RANGE)
            .and_then(|value| value.to_str().ok())
            .and_then(range::parse);
        let (store, point) = self
            .find(request, |len| {
                !follow && spec.is_some_and(|s| s.reaches_past(len))
            })
            .await?;
        let snapshot = point.snapshot();
        let len = snapshot.committed;
        let etag = format!("\"{len:x}-{:08x}\"", snapshot.committed_crc);
        let typed_etag: ETag = etag.parse().expect("a quoted hexadecimal ETag parses");
        let content_type = store.media_type(&request.id).await?;

        let mut response = Response::builder()
            .header(header::ACCEPT_RANGES, "bytes")
            .header(header::ETAG, &etag)
            .header(header::CONTENT_TYPE, content_type.as_str());
        if follow || point.written_within(&store, self.writing_window) {
            response = response.header(header::CACHE_CONTROL, "no-cache");
        }
        if follow {
            // As it grows, until the client leaves: no length, chunked.
            let span = self.span(0, None, true);
            let body = self.body(method, store, point, span);
            return Ok(response
                .status(StatusCode::OK)
                .body(body)
                .expect("valid response"));
        }
        if headers
            .typed_get::<IfNoneMatch>()
            .is_some_and(|condition| !condition.precondition_passes(&typed_etag))
        {
            return Ok(response
                .status(StatusCode::NOT_MODIFIED)
                .body(Body::empty())
                .expect("valid response"));
        }
        // If-Range: the range holds only for the representation the client already has.
        let range_holds = headers
            .typed_get::<IfRange>()
            .is_none_or(|condition| !condition.is_modified(Some(&typed_etag), None));
        let answer = match spec {
            Some(spec) if range_holds => spec.resolve(len),
            _ => Answer::Full,
        };
        let (status, start, stop) = match answer {
            Answer::Full => (StatusCode::OK, 0, len),
            Answer::Partial { start, end } => {
                response =
                    response.header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}"));
                (StatusCode::PARTIAL_CONTENT, start, end + 1)
            }
            Answer::Unsatisfiable => {
                // The line of text is not the point's type.
                if let Some(headers) = response.headers_mut() {
                    headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; charset=utf-8"),
                    );
                }
                return Ok(response
                    .status(StatusCode::RANGE_NOT_SATISFIABLE)
                    .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                    .body(Body::from(format!(
                        "range not satisfiable: the point has {len} bytes\n"
                    )))
                    .expect("valid response"));
            }
        };
        let span = self.span(start, Some(stop), false);
        let mut response = response
            .status(status)
            .header(header::CONTENT_LENGTH, stop - start);
        if method == Method::GET && stop > start {
            response = response.extension(FileBody {
                point: point.clone(),
                store: store.clone(),
                span,
                shutdown: self.services.lifetime.shutdown.clone(),
            });
        }
        let body = self.body(method, store, point, span);
        Ok(response.body(body).expect("valid response"))
    }

    fn span(&self, offset: u64, stop: Option<u64>, follow: bool) -> Span {
        Span {
            offset,
            stop,
            chunk: self.chunk,
            follow,
        }
    }

    /// The bytes of `span`, each frame read when hyper asks for it, so a client holds at most
    /// a frame and hyper's write buffer of the node's memory (nothing for `HEAD`). A client
    /// that leaves drops the body, and the reading stops.
    fn body(&self, method: &Method, store: Store, point: Arc<Point>, span: Span) -> Body {
        if method == Method::HEAD || span.stop == Some(span.offset) {
            return Body::empty();
        }
        let shutdown = self.services.lifetime.shutdown.clone();
        Body::from_stream(point.frames(store, span, shutdown).map(|frame| {
            frame
                .map(|(_, bytes)| {
                    ::metrics::counter!(metrics::HTTP_BYTES).increment(bytes.len() as u64);
                    bytes
                })
                .map_err(std::io::Error::other)
        }))
    }

    /// The player page: the point in a `<video>` or `<audio>` element, with its metadata.
    async fn page(&self, peer: &PeerInfo, request: &Request) -> Result<Response, Refusal> {
        self.authorize(peer, request).await?;
        let (store, point) = self.find(request, |_| false).await?;
        let snapshot = point.snapshot();
        let content_type = store.media_type(&request.id).await?;
        let query = request
            .raw_query
            .as_deref()
            .filter(|q| !q.is_empty())
            .map(|q| format!("?{q}"))
            .unwrap_or_default();
        let source = format!("/v1/points/{}{query}", encode_path(request.id.as_str()));
        Ok(pages::player(&Playing {
            id: request.id.as_str(),
            source,
            content_type: &content_type,
            size: snapshot.committed,
            crc32c: snapshot.committed_crc,
        }))
    }
}

/// A response's body as a span of a point's data file. A plaintext HTTP/1.1 connection sends
/// it from the page cache with `sendfile` ([`super::h1`]) instead of the response's body, which
/// reads the same bytes through the node's memory (for TLS and HTTP/2).
#[derive(Clone)]
pub(crate) struct FileBody {
    point: Arc<Point>,
    store: Store,
    span: Span,
    shutdown: tokio_util::sync::CancellationToken,
}

impl FileBody {
    /// The span's pieces, [`PIECE`] bytes at most each: as the body's frames, without reading.
    pub(crate) fn pieces(
        self,
    ) -> impl futures::Stream<Item = Result<FilePiece, StreamError>> + Send + 'static {
        let span = Span {
            chunk: PIECE,
            ..self.span
        };
        self.point.pieces(self.store, span, self.shutdown)
    }
}

/// Bytes of a point sent with one `sendfile` at most: between two, the point is checked for
/// having been deleted.
const PIECE: u64 = 1024 * 1024;
