//! The layer around every route: it counts the request for `/metrics` and gives axum's own
//! rejections the JSON error shape.
//!
//! Written as a plain tower service rather than two `axum::middleware` functions: those box
//! every request's future and clone the inner route per request, which cost a heartbeat
//! about as much as checking its signature.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;
use futures_util::future::BoxFuture;
use tower::{Layer, Service};

use crate::metrics::Metrics;

/// Wraps each route in [`Observe`].
#[derive(Clone)]
pub(crate) struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// A route, counted and with its rejections rewritten; see the module documentation.
#[derive(Clone)]
pub(crate) struct Observe<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S> Service<Request> for Observe<S>
where
    S: Service<Request, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        // Counted by route template, never by raw path, which would let clients create
        // unbounded label values. `MatchedPath` is shared, so keeping it copies nothing.
        let route = request.extensions().get::<MatchedPath>().cloned();
        let method = method_label(request.method());
        Observed {
            handling: self.inner.call(request),
            rewriting: None,
            metrics: self.metrics.clone(),
            route,
            method,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response of an [`Observe`]d route.
    pub(crate) struct Observed<F> {
        #[pin]
        handling: F,
        // Only axum's plain-text rejections get here: rewriting reads their body.
        rewriting: Option<BoxFuture<'static, Response>>,
        // What the finished request is counted under.
        metrics: Arc<Metrics>,
        route: Option<MatchedPath>,
        method: &'static str,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response, Infallible>>,
{
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let response = loop {
            if let Some(rewriting) = this.rewriting.as_mut() {
                break ready!(rewriting.as_mut().poll(cx));
            }
            let Ok(response) = ready!(this.handling.as_mut().poll(cx));
            if crate::error::is_plain_rejection(&response) {
                *this.rewriting = Some(Box::pin(crate::error::json_rejection(response)));
            } else {
                break response;
            }
        };
        let route = this.route.as_ref().map_or("unmatched", MatchedPath::as_str);
        this.metrics
            .request(this.method, route, response.status().as_u16());
        Poll::Ready(Ok(response))
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}
