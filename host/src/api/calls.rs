//! Requests and their latency per gRPC method, as operators know them from go-grpc-prometheus:
//! `goutube_grpc_server_started_total`, `goutube_grpc_server_handled_total` (with the call's
//! `grpc_code`) and `goutube_grpc_server_handling_seconds`, labelled `grpc_service` and
//! `grpc_method`. A tower layer on the API's tonic server ([`CallMetricsLayer`]): a call is
//! started when its request arrives and handled when its response ends, with the status of its
//! trailers (streaming calls too, at their last message); a call whose client went away first
//! counts as `Cancelled`. Every method of the served descriptor set is registered at zero at
//! start ([`register`]), so dashboards see each one on a fresh node.

use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Instant;

use hyper::body::{Body, Frame, SizeHint};
use hyper::http;
use prost::Message;
use tower::{Layer, Service};

use crate::metrics;

/// The gRPC status codes, by number, as the `grpc_code` label spells them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// Registers every method of the services in `descriptor_sets` (encoded `FileDescriptorSet`s)
/// at zero: started, handled with each code, and an empty latency histogram.
pub(super) fn register(descriptor_sets: &[&[u8]]) {
    for encoded in descriptor_sets {
        let Ok(set) = prost_types::FileDescriptorSet::decode(*encoded) else {
            continue;
        };
        for file in &set.file {
            for service in &file.service {
                let name = match file.package() {
                    "" => service.name().to_owned(),
                    package => format!("{package}.{}", service.name()),
                };
                for method in &service.method {
                    let labels = [
                        ("grpc_service", name.clone()),
                        ("grpc_method", method.name().to_owned()),
                    ];
                    ::metrics::counter!(metrics::GRPC_STARTED, &labels).absolute(0);
                    for code in CODES {
                        let mut labels = labels.to_vec();
                        labels.push(("grpc_code", code.to_owned()));
                        ::metrics::counter!(metrics::GRPC_HANDLED, &labels).absolute(0);
                    }
                    let _ = ::metrics::histogram!(metrics::GRPC_HANDLING_SECONDS, &labels);
                }
            }
        }
    }
}

/// Counts and times every call of the service it wraps.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CallMetricsLayer;

impl<S> Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;

    fn layer(&self, inner: S) -> CallMetrics<S> {
        CallMetrics { inner }
    }
}

/// [`CallMetricsLayer`] around a service.
#[derive(Debug, Clone)]
pub(super) struct CallMetrics<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for CallMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Observed<R>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = Call::start(request.uri().path());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = match response.await {
                Ok(response) => response,
                Err(error) => {
                    call.finish("Unknown");
                    return Err(error);
                }
            };
            let (parts, body) = response.into_parts();
            // A trailers-only response (an error before any message) has its status here.
            let call = match status(&parts.headers) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(http::Response::from_parts(parts, Observed { body, call }))
        })
    }
}

/// The `grpc_code` of a `grpc-status` header or trailer.
fn status(headers: &http::HeaderMap) -> Option<&'static str> {
    let value = headers.get("grpc-status")?;
    let number: usize = value.to_str().ok()?.parse().ok()?;
    Some(CODES.get(number).copied().unwrap_or("Unknown"))
}

/// One call being served.
struct Call {
    service: String,
    method: String,
    started: Instant,
    finished: bool,
}

impl Call {
    /// A call to `path` (`/package.Service/Method`), counted as started.
    fn start(path: &str) -> Call {
        let (service, method) = path
            .trim_start_matches('/')
            .split_once('/')
            .unwrap_or(("unknown", "unknown"));
        let call = Call {
            service: service.to_owned(),
            method: method.to_owned(),
            started: Instant::now(),
            finished: false,
        };
        ::metrics::counter!(metrics::GRPC_STARTED, "grpc_service" => call.service.clone(), "grpc_method" => call.method.clone())
            .increment(1);
        call
    }

    /// Counts the call as handled with `code`, once.
    fn finish(mut self, code: &'static str) {
        self.record(code);
    }

    fn record(&mut self, code: &'static str) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let (service, method) = (self.service.clone(), self.method.clone());
        ::metrics::counter!(
            metrics::GRPC_HANDLED,
            "grpc_service" => service.clone(),
            "grpc_method" => method.clone(),
            "grpc_code" => code,
        )
        .increment(1);
        ::metrics::histogram!(
            metrics::GRPC_HANDLING_SECONDS,
            "grpc_service" => service,
            "grpc_method" => method,
        )
        .record(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Dropped before its status was sent: the client went away, or the server stopped.
        self.record("Canceled");
    }
}

/// A response body that counts its call as handled when its trailers go out.
pub(super) struct Observed<B> {
    body: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for Observed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &polled {
            Some(Ok(frame)) => {
                if let Some(code) = frame.trailers_ref().and_then(status)
                    && let Some(call) = self.call.take()
                {
                    call.finish(code);
                }
            }
            Some(Err(_)) => {
                if let Some(call) = self.call.take() {
                    call.finish("Unknown");
                }
            }
            // The end without a status: a response that is not gRPC's (reflection, health and the
            // API all send one); counted as answered.
            None => {
                if let Some(call) = self.call.take() {
                    call.finish("OK");
                }
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
