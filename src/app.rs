//! What every request handler shares, built once from the config.

/// Declares a tower layer `$layer` (built from the shared `App`) and the service it wraps an
/// inner service in, `$service<S> { app, inner }`: every step of the request path has this
/// shape, only its `Service` impl differs.
macro_rules! app_layer {
    ($(#[$doc:meta])* $layer:ident => $service:ident) => {
        #[derive(Clone)]
        pub struct $layer {
            app: std::sync::Arc<$crate::app::App>,
        }

        impl $layer {
            pub fn new(app: std::sync::Arc<$crate::app::App>) -> Self {
                Self { app }
            }
        }

        impl<S> tower::Layer<S> for $layer {
            type Service = $service<S>;
            fn layer(&self, inner: S) -> $service<S> {
                $service {
                    app: self.app.clone(),
                    inner,
                }
            }
        }

        $(#[$doc])*
        #[derive(Clone)]
        pub struct $service<S> {
            app: std::sync::Arc<$crate::app::App>,
            inner: S,
        }
    };
}
pub(crate) use app_layer;

use crate::config::Config;
use crate::oidc::Provider;
use crate::proxy::headers::Spoofable;
use crate::session::SessionCookies;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// What outlives a configuration reload: counters, in-flight refreshes, spent states.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Set on SIGTERM: readiness turns false while connections drain.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub used_states: Arc<UsedStates>,
    pub refresher: Arc<crate::refresh::Refresher>,
    pub revocations: Arc<crate::session::revocation::Revocations>,
    pub request_id_prefix: Arc<str>,
    /// Open websocket tunnels: shutdown waits for them to end.
    pub tunnels: Arc<Running>,
    /// Work left running after an answer (a sign-out's revocation): shutdown waits for it.
    pub background: Arc<Running>,
}

/// Counts work that outlives hyper's connection tracking, which shutdown waits for (within
/// `timeouts.shutdown`): open websocket tunnels, and tasks a request left running after its
/// answer (a sign-out's token revocation at the provider, bounded by `timeouts.provider`, so
/// that a sign-out just before a restart is not cut short).
#[derive(Default)]
pub struct Running(std::sync::atomic::AtomicUsize);

/// Held for as long as the counted work goes on.
pub struct RunningGuard(Arc<Running>);

impl Running {
    pub fn hold(self: &Arc<Self>) -> RunningGuard {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        RunningGuard(self.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Shared {
    pub fn new(metrics: Arc<crate::metrics::Metrics>) -> Self {
        let prefix = crate::session::crypto::hex(&crate::session::crypto::random_bytes::<4>());
        Self {
            metrics,
            draining: Arc::default(),
            used_states: Arc::default(),
            refresher: Arc::default(),
            revocations: Arc::default(),
            request_id_prefix: prefix.into(),
            tunnels: Arc::default(),
            background: Arc::default(),
        }
    }
}

/// Everything a request needs, built from one configuration (rebuilt on reload).
pub struct App {
    pub cfg: Arc<Config>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub draining: Arc<std::sync::atomic::AtomicBool>,
    pub cookies: SessionCookies,
    /// Sessions of recently seen cookies (this generation's keys and header names).
    pub session_cache: crate::session::SessionCache,
    pub provider: Arc<Provider>,
    /// Upstream requests (one pool per worker thread).
    pub upstream: Arc<crate::proxy::client::UpstreamClients>,
    pub spoofable: Spoofable,
    pub used_states: Arc<UsedStates>,
    pub refresher: Arc<crate::refresh::Refresher>,
    /// Redis for sessions and/or coordination, when configured.
    pub redis: Option<Arc<crate::store::Redis>>,
    pub revocations: Arc<crate::session::revocation::Revocations>,
    pub request_id_prefix: Arc<str>,
    pub tunnels: Arc<Running>,
    pub background: Arc<Running>,
}

impl App {
    pub fn new(
        cfg: Arc<Config>,
        provider: Arc<Provider>,
        upstream: Arc<crate::proxy::client::UpstreamClients>,
        shared: &Shared,
        redis: Option<Arc<crate::store::Redis>>,
    ) -> Self {
        let cookies = SessionCookies::new(
            &cfg.cookie,
            (&cfg.provider.issuer_url, &cfg.provider.client_id),
            cfg.session.lifetime,
            cfg.limits.max_cookie_chunks,
            "/",
            cfg.session.store == crate::config::StoreKind::Redis,
        );
        Self {
            spoofable: Spoofable::new(&cfg.headers),
            session_cache: crate::session::SessionCache::new(cfg.limits.session_cache_bytes),
            cookies,
            provider,
            upstream,
            used_states: shared.used_states.clone(),
            refresher: shared.refresher.clone(),
            redis,
            revocations: shared.revocations.clone(),
            request_id_prefix: shared.request_id_prefix.clone(),
            tunnels: shared.tunnels.clone(),
            background: shared.background.clone(),
            metrics: shared.metrics.clone(),
            draining: shared.draining.clone(),
            cfg,
        }
    }
}

impl App {
    /// Ready to take traffic: provider discovered with its keys, and not shutting down.
    /// Otherwise every condition not met, so that an operator sees them all at once.
    pub fn is_ready(&self) -> Result<(), String> {
        let mut unmet: Vec<&'static str> = Vec::new();
        if self.draining.load(std::sync::atomic::Ordering::Relaxed) {
            unmet.push("shutting down");
        }
        if !self.provider.is_ready() {
            unmet.push("provider not discovered yet");
        }
        // Only the Redis store makes Redis a dependency of serving. A coordination-only Redis
        // being down must not take every replica out: sessions are still served from their
        // cookies, and only their refreshes wait for Redis (503 once a token has expired).
        if self.cfg.session.store == crate::config::StoreKind::Redis
            && self.redis.as_ref().is_some_and(|r| !r.is_healthy())
        {
            unmet.push("redis unreachable");
        }
        // Cookie store: sign-outs the other replicas recorded are known before taking
        // traffic, else a copy of a signed-out cookie would pass here (with Redis down from
        // the start there is nothing to wait for: see above).
        if self.cfg.session.store == crate::config::StoreKind::Cookie
            && self.redis.as_ref().is_some_and(|r| !r.is_known_down())
            && !self.revocations.is_loaded()
        {
            unmet.push("sign-outs not read from redis yet");
        }
        if unmet.is_empty() {
            Ok(())
        } else {
            Err(unmet.join("; "))
        }
    }
}

/// States already spent at the callback (replay defence on top of the single-use flow cookie).
/// Bounded: expired entries are swept, and past the cap the oldest half is forgotten.
#[derive(Default)]
pub struct UsedStates {
    inner: Mutex<HashMap<String, u64>>,
}

const MAX_USED_STATES: usize = 100_000;

impl UsedStates {
    /// Records `state` as used until `until`; false if it was already used.
    pub fn claim(&self, state: &str, until: u64) -> bool {
        let Ok(mut map) = self.inner.lock() else {
            return false;
        };
        let now = crate::session::now_secs();
        if map.len() >= MAX_USED_STATES {
            map.retain(|_, exp| *exp > now);
            if map.len() >= MAX_USED_STATES {
                let mut exps: Vec<u64> = map.values().copied().collect();
                exps.sort_unstable();
                let cut = exps[exps.len() / 2];
                map.retain(|_, exp| *exp > cut);
            }
        }
        match map.get(state) {
            Some(exp) if *exp > now => false,
            _ => {
                map.insert(state.to_string(), until);
                true
            }
        }
    }
}
