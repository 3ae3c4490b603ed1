//! Prometheus metrics (one owned registry, bounded labels only — never a path, user, IP or
//! token) and the observing layer that also writes the access log.

use crate::body::Body;
use http::{Method, Request, Response};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Layer, Service};

/// Which kind of route answered (a metrics label and an access-log field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    Proxied,
    SkipAuth,
    Flow,
    ForwardAuth,
    /// `/healthz` and `/readyz` on the main listener: probes, kept out of the login figures.
    Health,
}

impl RouteKind {
    const ALL: [RouteKind; 5] = [
        RouteKind::Proxied,
        RouteKind::SkipAuth,
        RouteKind::Flow,
        RouteKind::ForwardAuth,
        RouteKind::Health,
    ];
    pub fn label(self) -> &'static str {
        match self {
            RouteKind::Proxied => "proxied",
            RouteKind::SkipAuth => "skip_auth",
            RouteKind::Flow => "flow",
            RouteKind::ForwardAuth => "forward_auth",
            RouteKind::Health => "health",
        }
    }
}

const METHODS: [&str; 8] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::PATCH => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

/// Facts the inner layers leave on the response for the observer.
#[derive(Debug, Clone, Default)]
pub struct ResponseFacts {
    pub route: Option<RouteKind>,
    /// When the request left for the upstream (read if the client abandons it meanwhile).
    pub upstream_start: Option<Instant>,
    pub upstream_time: Option<Duration>,
    pub user: Option<Arc<str>>,
    /// When the response was ready, if its handler already read the clock.
    pub end: Option<Instant>,
    /// Why the upstream exchange failed (kind, error): logged with the request's id.
    pub upstream_failure: Option<Arc<(&'static str, String)>>,
}

thread_local! {
    /// What a layer knew of a request dropped unanswered (the client went away), left for the
    /// observer, which drops the request on this thread and reads it right after.
    static ABANDONED: std::cell::Cell<Option<ResponseFacts>> = const { std::cell::Cell::new(None) };
}

/// Leaves `facts` for the observer when dropped armed: a request's step that waits (on the
/// upstream, on the provider) says what it knew if the client abandons the request then, so
/// the 499 is counted under its route, with its user, and the wait on the upstream is not
/// taken for the gateway's own time. Nothing is allocated for answered requests.
pub struct AbandonGuard(Option<ResponseFacts>);

impl AbandonGuard {
    pub fn arm(facts: ResponseFacts) -> Self {
        Self(Some(facts))
    }

    /// Answered: nothing to leave; the facts go back to the caller, for the response.
    pub fn disarm(mut self) -> ResponseFacts {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for AbandonGuard {
    fn drop(&mut self) {
        if let Some(mut facts) = self.0.take() {
            if let Some(start) = facts.upstream_start {
                facts.upstream_time = Some(start.elapsed());
            }
            // Not during the thread's teardown, when its locals are gone. Guards may nest (a
            // handler's, knowing the user, inside the router's, knowing the route): each fills
            // in what the others did not know, whichever drops first.
            let _ = ABANDONED.try_with(|a| {
                let merged = match a.take() {
                    Some(other) => other.or(facts),
                    None => facts,
                };
                a.set(Some(merged));
            });
        }
    }
}

impl ResponseFacts {
    /// These facts, with what they lack taken from `other`.
    fn or(self, other: ResponseFacts) -> ResponseFacts {
        ResponseFacts {
            route: self.route.or(other.route),
            upstream_start: self.upstream_start.or(other.upstream_start),
            upstream_time: self.upstream_time.or(other.upstream_time),
            user: self.user.or(other.user),
            end: self.end.or(other.end),
            upstream_failure: self.upstream_failure.or(other.upstream_failure),
        }
    }
}

/// Names the signed-in user of a response the gateway answered itself (a flow endpoint, a
/// denial, a 503), for its access-log line: the same subject a proxied request logs.
pub fn answered_for(resp: &mut Response<Body>, user: Arc<str>) {
    let ext = resp.extensions_mut();
    match ext.get_mut::<ResponseFacts>() {
        Some(f) => f.user = Some(user),
        None => {
            ext.insert(ResponseFacts {
                user: Some(user),
                ..Default::default()
            });
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    /// requests_total, resolved once: [route][method][status class].
    requests: Vec<IntCounter>,
    gateway_seconds: Vec<Histogram>,
    pub upstream_seconds: Histogram,
    pub upstream_errors: IntCounterVec,
    pub in_flight: IntGauge,
    pub connections: IntGauge,
    pub login_flows: IntCounterVec,
    pub refreshes: IntCounterVec,
    pub cookies_rejected: IntCounterVec,
    pub provider_seconds: HistogramVec,
    pub config_reloads: IntCounterVec,
    pub logouts: IntCounterVec,
    pub revocations: IntCounterVec,
    /// When each loaded certificate chain expires, by config key (see `server::tls`).
    pub tls_cert_expiry: IntGaugeVec,
    build_info: IntGaugeVec,
    /// Brought up to [`crate::logging::dropped_lines`] at each scrape.
    log_lines_dropped: IntCounter,
    /// Set when the shutdown timeout ran out: a request dropped from then on was cut by the
    /// gateway, not abandoned by its client.
    cut_off: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Up to 60 s: the default `timeouts.upstream_response` (a slow upstream's time must not land
/// in +Inf alone).
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let r = Registry::new_custom(Some("portcullis".into()), None)?;
        let requests_vec = IntCounterVec::new(
            Opts::new(
                "requests_total",
                "Requests answered, by route kind, method and status class.",
            ),
            &["route", "method", "status"],
        )?;
        let gateway_vec = HistogramVec::new(
            HistogramOpts::new(
                "request_duration_seconds",
                "Time the gateway itself added to a request (total minus the upstream's time to response headers).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let upstream_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "upstream_duration_seconds",
                "Time from forwarding a request to the upstream's response headers.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )?;
        let upstream_errors = IntCounterVec::new(
            Opts::new(
                "upstream_errors_total",
                "Failed upstream requests, by kind.",
            ),
            &["kind"],
        )?;
        let in_flight = IntGauge::new("requests_in_flight", "Requests being served.")?;
        let connections = IntGauge::new("connections_open", "Open client connections.")?;
        let login_flows = IntCounterVec::new(
            Opts::new(
                "login_flows_total",
                "Login flows started, completed and failed (by reason).",
            ),
            &["event", "reason"],
        )?;
        let refreshes = IntCounterVec::new(
            Opts::new("refreshes_total", "Access-token refreshes, by outcome."),
            &["outcome"],
        )?;
        let cookies_rejected = IntCounterVec::new(
            Opts::new(
                "session_cookies_rejected_total",
                "Session cookies that did not open, by reason.",
            ),
            &["reason"],
        )?;
        let provider_seconds = HistogramVec::new(
            HistogramOpts::new(
                "provider_request_duration_seconds",
                "Calls to the OpenID provider, by endpoint.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["endpoint"],
        )?;
        let config_reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "Configuration reloads, by result."),
            &["result"],
        )?;
        let logouts = IntCounterVec::new(
            Opts::new("logouts_total", "Sessions ended by sign-out, by kind."),
            &["kind"],
        )?;
        let revocations = IntCounterVec::new(
            Opts::new(
                "token_revocations_total",
                "Tokens of signed-out sessions revoked at the provider, by outcome.",
            ),
            &["outcome"],
        )?;
        let tls_cert_expiry = IntGaugeVec::new(
            Opts::new(
                "tls_certificate_expiry_timestamp_seconds",
                "When the first certificate of the chain loaded from a file expires (Unix time), by config key.",
            ),
            &["file"],
        )?;
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "Build information; always 1."),
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let log_lines_dropped = IntCounter::new(
            "log_lines_dropped_total",
            "Log lines dropped because the log's reader (standard error's pipe) did not keep up.",
        )?;
        for c in [
            Box::new(requests_vec.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(gateway_vec.clone()),
            Box::new(upstream_seconds.clone()),
            Box::new(upstream_errors.clone()),
            Box::new(in_flight.clone()),
            Box::new(connections.clone()),
            Box::new(login_flows.clone()),
            Box::new(refreshes.clone()),
            Box::new(cookies_rejected.clone()),
            Box::new(provider_seconds.clone()),
            Box::new(config_reloads.clone()),
            Box::new(logouts.clone()),
            Box::new(revocations.clone()),
            Box::new(tls_cert_expiry.clone()),
            Box::new(build_info.clone()),
            Box::new(log_lines_dropped.clone()),
        ] {
            r.register(c)?;
        }
        let mut requests = Vec::new();
        let mut gateway_seconds = Vec::new();
        for route in RouteKind::ALL {
            gateway_seconds.push(gateway_vec.with_label_values(&[route.label()]));
            for m in METHODS {
                for c in CLASSES {
                    requests.push(requests_vec.with_label_values(&[route.label(), m, c]));
                }
            }
        }
        // Pre-create the label sets dashboards expect, so they read 0 rather than absent.
        for k in ["connect", "timeout", "reset", "other"] {
            upstream_errors.with_label_values(&[k]);
        }
        for o in [
            "success",
            "reused",
            "invalid_grant",
            "rejected",
            "unavailable",
            "too_large",
        ] {
            refreshes.with_label_values(&[o]);
        }
        for reason in ["tampered", "expired", "unknown_key", "oversize", "revoked"] {
            cookies_rejected.with_label_values(&[reason]);
        }
        for e in ["token", "jwks", "discovery", "userinfo", "revocation"] {
            provider_seconds.with_label_values(&[e]);
        }
        login_flows.with_label_values(&["started", ""]);
        login_flows.with_label_values(&["completed", ""]);
        for r in ["success", "failure"] {
            config_reloads.with_label_values(&[r]);
        }
        for k in ["user", "backchannel"] {
            logouts.with_label_values(&[k]);
        }
        for o in ["revoked", "refused", "unavailable"] {
            revocations.with_label_values(&[o]);
        }
        Ok(Self {
            registry: r,
            requests,
            gateway_seconds,
            upstream_seconds,
            upstream_errors,
            in_flight,
            connections,
            login_flows,
            refreshes,
            cookies_rejected,
            provider_seconds,
            config_reloads,
            logouts,
            revocations,
            tls_cert_expiry,
            build_info,
            log_lines_dropped,
            cut_off: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The shutdown timeout ran out: the requests still in flight are about to be dropped
    /// by the gateway, and are counted and logged as `SHUT_DOWN`, not as clients gone.
    pub fn cut_off_in_flight(&self) {
        self.cut_off
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    fn record(&self, route: RouteKind, method: &Method, status: u16, gateway: Duration) {
        self.record_at(route, method_index(method), status, gateway);
    }

    fn record_at(&self, route: RouteKind, method: usize, status: u16, gateway: Duration) {
        let r = RouteKind::ALL.iter().position(|x| *x == route).unwrap_or(0);
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        let idx = (r * METHODS.len() + method) * CLASSES.len() + class;
        if let Some(c) = self.requests.get(idx) {
            c.inc();
        }
        if let Some(h) = self.gateway_seconds.get(r) {
            h.observe(gateway.as_secs_f64());
        }
    }

    /// A request the HTTP/1 parser refused (a malformed or oversized head): no layer saw it,
    /// but it is counted (method "other") and logged like any other, so that attack traffic
    /// shows.
    pub fn refused(&self, status: http::StatusCode, client: std::net::IpAddr) {
        let other = METHODS.len() - 1;
        self.record_at(RouteKind::Proxied, other, status.as_u16(), Duration::ZERO);
        tracing::info!(
            target: "access",
            request_id = "-",
            method = "-",
            path = "-",
            client = %client,
            route = RouteKind::Proxied.label(),
            status = status.as_u16(),
            gateway_ms = 0.0,
            user = "-",
            "request refused by the parser"
        );
    }

    pub fn flow_failed(&self, reason: &str) {
        self.login_flows
            .with_label_values(&["failed", reason])
            .inc();
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let dropped = crate::logging::dropped_lines();
        let counted = self.log_lines_dropped.get();
        if dropped > counted {
            self.log_lines_dropped.inc_by(dropped - counted);
        }
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        let _ = &self.build_info;
        buf
    }
}

#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
    request_id: http::HeaderName,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>, request_id: http::HeaderName) -> Self {
        Self {
            metrics,
            request_id,
        }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            metrics: self.metrics.clone(),
            request_id: self.request_id.clone(),
            inner,
        }
    }
}

/// Counts and times every request and writes its access-log line.
#[derive(Clone)]
pub struct Observe<S> {
    metrics: Arc<Metrics>,
    request_id: http::HeaderName,
    inner: S,
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        // `None` once dropped early, so that a request abandoned by its client is dropped
        // before it is logged (its layers leave what they knew: see `AbandonGuard`).
        #[pin]
        inner: Option<F>,
        start: Instant,
        method: Method,
        request_id: Option<http::HeaderValue>,
        // Read only when the access log is on.
        access: Option<Box<Access>>,
        metrics: Arc<Metrics>,
        // Set when the response was counted; a request dropped before (the client went away)
        // is counted on drop.
        done: bool,
    }
    impl<F> PinnedDrop for Observed<F> {
        fn drop(this: Pin<&mut Self>) {
            let mut this = this.project();
            if !*this.done {
                let take = || ABANDONED.try_with(|a| a.take()).ok().flatten();
                take();
                this.inner.set(None);
                let facts = take();
                let status = if this.metrics.cut_off.load(std::sync::atomic::Ordering::Relaxed) {
                    SHUT_DOWN
                } else {
                    CLIENT_CLOSED
                };
                finish(this.metrics, this.method, this.request_id, this.access.as_deref(), *this.start, status, facts.as_ref());
            }
        }
    }
}

/// The status a request is counted and logged with when the client went away before its
/// response (nginx's convention); never sent.
const CLIENT_CLOSED: u16 = 499;

/// The status a request is counted and logged with when the shutdown timeout cut it: the
/// gateway gave up on it (as a 503 would say), the client did not; never sent.
const SHUT_DOWN: u16 = 503;

/// Milliseconds to the microsecond, so that a log line reads `0.02`, not `0.019860999999999997`.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Who asked for what, for the access log: the peer's address and the path (never the query,
/// which may carry a code or a token).
pub struct Access {
    client: Option<std::net::IpAddr>,
    path: Box<str>,
}

/// The longest path an access line holds whole: over HTTP/2 a client repeats a long path for
/// a byte or two (HPACK), and its log lines must not outgrow its traffic by hundreds of times.
const LOGGED_PATH: usize = 1024;

fn logged_path(path: &str) -> Box<str> {
    if path.len() <= LOGGED_PATH {
        return path.into();
    }
    format!("{}…", crate::logging::at_most(path, LOGGED_PATH)).into()
}

/// Counts and logs one request, answered or abandoned.
fn finish(
    metrics: &Metrics,
    method: &Method,
    request_id: &Option<http::HeaderValue>,
    access: Option<&Access>,
    start: Instant,
    status: u16,
    facts: Option<&ResponseFacts>,
) {
    metrics.in_flight.dec();
    let end = facts.and_then(|f| f.end).unwrap_or_else(Instant::now);
    let total = end.saturating_duration_since(start);
    let route = facts.and_then(|f| f.route).unwrap_or(RouteKind::Proxied);
    let upstream = facts.and_then(|f| f.upstream_time);
    let gateway = total.saturating_sub(upstream.unwrap_or_default());
    metrics.record(route, method, status, gateway);
    let request_id = || {
        request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
    };
    if let Some((kind, error)) = facts.and_then(|f| f.upstream_failure.as_deref()) {
        tracing::warn!(
            request_id = request_id(),
            kind = *kind,
            error = error.as_str(),
            "upstream request failed"
        );
    }
    if tracing::enabled!(target: "access", tracing::Level::INFO) {
        tracing::info!(
            target: "access",
            request_id = request_id(),
            method = %method,
            path = access.map_or("-", |a| &*a.path),
            client = access.and_then(|a| a.client).map(tracing::field::display),
            route = route.label(),
            status,
            gateway_ms = millis(gateway),
            upstream_ms = upstream.map(millis),
            user = facts.and_then(|f| f.user.as_deref()).unwrap_or("-"),
        );
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_pin_mut() else {
            return Poll::Pending;
        };
        let resp = match inner.poll(cx) {
            Poll::Ready(Ok(r)) => r,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        };
        *this.done = true;
        let facts = resp.extensions().get::<ResponseFacts>();
        let status = resp.status().as_u16();
        finish(
            this.metrics,
            this.method,
            this.request_id,
            this.access.as_deref(),
            *this.start,
            status,
            facts,
        );
        Poll::Ready(Ok(resp))
    }
}

impl<S, B> Service<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let request_id = req.headers().get(&self.request_id).cloned();
        self.observe(req, request_id)
    }
}

impl<S> Observe<S> {
    fn observe<B>(
        &mut self,
        req: Request<B>,
        request_id: Option<http::HeaderValue>,
    ) -> Observed<S::Future>
    where
        S: Service<Request<B>>,
    {
        self.metrics.in_flight.inc();
        let access = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
            Box::new(Access {
                client: req
                    .extensions()
                    .get::<crate::proxy::forward::ConnInfo>()
                    .map(|c| c.remote.ip()),
                path: logged_path(req.uri().path()),
            })
        });
        Observed {
            start: Instant::now(),
            method: req.method().clone(),
            request_id,
            access,
            metrics: self.metrics.clone(),
            inner: Some(self.inner.call(req)),
            done: false,
        }
    }
}

/// A service told the request's id by the layer that has just set it (`RequestId`): the id's
/// header name is a custom one, hashed a byte at a time, and need not be looked up again.
pub trait CallWithId<R>: Service<R> {
    /// `call`, for a request whose id header holds `id` and nothing else.
    fn call_with_id(&mut self, req: R, id: &http::HeaderValue) -> Self::Future;
}

impl<S, B> CallWithId<Request<B>> for Observe<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = Infallible>,
{
    fn call_with_id(&mut self, req: Request<B>, id: &http::HeaderValue) -> Self::Future {
        self.observe(req, Some(id.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_in_the_access_log() {
        assert_eq!(&*logged_path("/a/b"), "/a/b");
        let long = format!("/{}", "é".repeat(1000));
        let cut = logged_path(&long);
        assert!(cut.len() <= LOGGED_PATH + "…".len(), "{}", cut.len());
        assert!(cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')));
    }

    #[test]
    fn log_durations_are_milliseconds_to_the_microsecond() {
        assert_eq!(millis(Duration::from_nanos(19_861)).to_string(), "0.02");
        assert_eq!(
            millis(Duration::from_micros(1_234_567)).to_string(),
            "1234.567"
        );
        assert_eq!(millis(Duration::ZERO).to_string(), "0");
    }

    /// A handler's guard (the user) inside the router's (the route): the 499 has both,
    /// whichever is dropped first.
    #[test]
    fn nested_abandon_guards_leave_what_each_knew() {
        for inner_first in [true, false] {
            ABANDONED.with(|a| a.take());
            let outer = AbandonGuard::arm(ResponseFacts {
                route: Some(RouteKind::ForwardAuth),
                ..Default::default()
            });
            let inner = AbandonGuard::arm(ResponseFacts {
                user: Some("alice".into()),
                ..Default::default()
            });
            if inner_first {
                drop(inner);
                drop(outer);
            } else {
                drop(outer);
                drop(inner);
            }
            let left = ABANDONED.with(|a| a.take()).unwrap();
            assert_eq!(left.route, Some(RouteKind::ForwardAuth));
            assert_eq!(left.user.as_deref(), Some("alice"));
        }
    }

    /// Upstream and provider calls are bounded by their default timeouts: a bucket covers
    /// each, so that a slow call is told apart from one that timed out.
    #[test]
    fn latency_buckets_cover_the_default_timeouts() {
        let t = crate::config::raw::RawTimeouts::default();
        let top = LATENCY_BUCKETS.last().copied().unwrap_or_default();
        for (what, d) in [
            ("upstream_response", t.upstream_response),
            ("provider", t.provider),
        ] {
            assert!(top >= d.as_secs_f64(), "{what}: {d:?} > {top} s");
        }
        assert!(LATENCY_BUCKETS.contains(&30.0), "{LATENCY_BUCKETS:?}");
        assert!(LATENCY_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn exposition_has_the_families() {
        let m = Metrics::new().unwrap();
        m.record(
            RouteKind::Proxied,
            &Method::GET,
            200,
            Duration::from_micros(20),
        );
        let text = String::from_utf8(m.render()).unwrap();
        for name in [
            "portcullis_requests_total{method=\"GET\",route=\"proxied\",status=\"2xx\"} 1",
            "portcullis_request_duration_seconds_bucket",
            "portcullis_build_info{version=",
            "portcullis_refreshes_total{outcome=\"invalid_grant\"} 0",
            // Events that may never happen read 0 from start-up rather than being absent.
            "portcullis_config_reloads_total{result=\"success\"} 0",
            "portcullis_config_reloads_total{result=\"failure\"} 0",
            "portcullis_logouts_total{kind=\"user\"} 0",
            "portcullis_logouts_total{kind=\"backchannel\"} 0",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
