//! The running configuration and its hot reload. A generation is everything built from one
//! config; the listeners read the current one per request, so a reload is one atomic swap.
//! Reload on SIGHUP and whenever the config file or a secret file it names changes (checked
//! by content every second, which also catches Kubernetes' `..data` symlink swaps).

use crate::app::{App, Shared};
use crate::config::{self, Config, StoreKind};
use crate::oidc::{http::ProviderHttp, Provider};
use crate::stack::{self, Gateway};
use crate::store::Redis;
use crate::{proxy, StartError};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Generation {
    pub app: Arc<App>,
    pub stack: Gateway,
}

pub type Live = Arc<ArcSwap<Generation>>;

fn client_options(cfg: &Config) -> proxy::client::ClientOptions {
    proxy::client::ClientOptions {
        tls: cfg.tls_client.clone(),
        connect_timeout: cfg.timeouts.upstream_connect,
        idle_timeout: cfg.timeouts.idle,
        max_idle_per_host: 1024,
    }
}

/// Builds a generation, reusing from `prev` what still fits (connection pools, the discovered
/// provider, the Redis connection) so a reload costs no cold start. A reload that changes a
/// working provider for one that cannot be discovered fails: swapped in, it would take every
/// replica out of service at once for a typo (at start-up, discovery is retried until ready);
/// so does one that changes the Redis settings for a Redis that does not answer a PING.
pub async fn build(
    cfg: Arc<Config>,
    shared: &Shared,
    prev: Option<&App>,
) -> Result<Generation, StartError> {
    let upstream = match prev {
        Some(p) if p.upstream.opts == client_options(&cfg) => p.upstream.clone(),
        _ => {
            let clients = proxy::client::UpstreamClients::new(&client_options(&cfg))
                .map_err(StartError::Client)?;
            note_client_cert_expiry(&cfg, &shared.metrics);
            Arc::new(clients)
        }
    };
    // Redis first: a reload refused here has started nothing.
    let mut fresh = false;
    let redis = match (&cfg.session.redis, prev) {
        (Some(rc), Some(p)) if p.cfg.session.redis.as_ref() == Some(rc) => {
            // The same Redis, now holding the sessions: readiness will depend on it.
            if cfg.session.store == StoreKind::Redis && p.cfg.session.store != StoreKind::Redis {
                if let Some(r) = &p.redis {
                    check_redis(r, &cfg).await?;
                }
            }
            p.redis.clone()
        }
        (Some(rc), _) => {
            let r = Arc::new(Redis::new(rc).map_err(StartError::Redis)?);
            if prev.is_some() {
                check_redis(&r, &cfg).await?;
            }
            fresh = true;
            Some(r)
        }
        (None, _) => None,
    };
    let client = upstream.shared();
    let provider = Arc::new(Provider::new(
        &cfg,
        ProviderHttp {
            client: client.clone(),
            timeout: cfg.timeouts.provider,
            metrics: shared.metrics.clone(),
        },
    ));
    let adopted = prev.is_some_and(|p| provider.adopt(&p.provider));
    tokio::spawn(provider.clone().keep_keys_fresh());
    if !adopted {
        match prev {
            Some(p) if p.provider.is_ready() => {
                provider
                    .discover()
                    .await
                    .map_err(|e| StartError::Provider {
                        issuer: cfg.provider.issuer_url.clone(),
                        error: format!("discovery failed: {e}"),
                    })?;
            }
            _ => {
                tokio::spawn(provider.clone().discover_until_ready());
            }
        }
    }
    // Nothing below fails: this generation will be swapped in.
    // The logout mirror keeps revocations for a session lifetime: the new one, also when
    // the Redis settings stayed the same; and reads back as far as clocks may differ.
    shared
        .revocations
        .configure(cfg.session.lifetime, cfg.provider.clock_skew);
    if let (true, Some(r)) = (fresh, &redis) {
        // Both end once the generations holding this client are gone.
        tokio::spawn(Redis::watch_health(Arc::downgrade(r)));
        tokio::spawn(shared.revocations.clone().sync(Arc::downgrade(r)));
    }
    if redis.is_none() && prev.is_none_or(|p| p.redis.is_some()) {
        tracing::warn!("back-channel logout is unavailable: it needs session.store: redis or session.coordination.redis_url");
    }
    let app = Arc::new(App::new(cfg, provider, upstream, shared, redis));
    Ok(Generation {
        stack: stack::build(app.clone()),
        app,
    })
}

/// The client certificate's expiry, published and checked each time it is loaded.
fn note_client_cert_expiry(cfg: &Config, metrics: &crate::metrics::Metrics) {
    const KEY: &str = "tls.client_cert_file";
    match &cfg.tls_client.client_cert {
        Some((cert, _)) => {
            // It loaded just now, in the client's TLS config.
            if let Ok(chain) = crate::server::tls::read_chain(cert) {
                crate::server::tls::note_expiry(KEY, &chain, metrics, std::time::SystemTime::now());
            }
        }
        None => {
            let _ = metrics.tls_cert_expiry.remove_label_values(&[KEY]);
        }
    }
}

/// A reload that points the gateway at a Redis that does not answer is refused, as one that
/// changes a working provider for one that cannot be discovered: swapped in, it would make
/// every replica unready at once (at start-up, readiness waits for Redis instead).
async fn check_redis(redis: &Redis, cfg: &Config) -> Result<(), StartError> {
    let key = match cfg.session.store {
        StoreKind::Redis => "session.redis.url",
        StoreKind::Cookie => "session.coordination.redis_url",
    };
    redis
        .ping()
        .await
        .map_err(|error| StartError::RedisUnreachable { key, error })
}

/// A digest of the config file (if any) and every secret file it names.
fn fingerprint(path: Option<&Path>, files: &[PathBuf]) -> [u8; 32] {
    config::files_digest(path.into_iter().chain(files.iter().map(PathBuf::as_path)))
}

/// `running`'s files, then those of `refused` it does not name: what a reload watches while
/// a refused config waits for a change.
fn with_refused(running: &[PathBuf], refused: &[PathBuf]) -> Vec<PathBuf> {
    let mut files = running.to_vec();
    files.extend(refused.iter().filter(|f| !running.contains(f)).cloned());
    files
}

/// Watches for SIGHUP and file changes, forever. Without a config file (configured from the
/// environment alone) the secret files it names are still watched.
pub async fn watch(path: Option<PathBuf>, live: Live, shared: Shared) {
    let path = path.as_deref();
    // What the settings read only at start-up still are, whatever reloads say.
    let started = live.load().app.cfg.clone();
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    // The secret files of a config that was refused, watched as well as the running one's: a
    // secret file it names that did not exist yet (a Secret volume that updates after its
    // ConfigMap's) is a change when it appears, and the files it names that the running one
    // does not are no change (a refused config is not tried again every second).
    let mut refused: Vec<PathBuf> = Vec::new();
    let watched = |refused: &[PathBuf]| with_refused(&live.load().app.cfg.watched_files, refused);
    let mut last = fingerprint(path, &watched(&refused));
    let mut retry_redis: Option<Instant> = None;
    loop {
        let forced = {
            #[cfg(unix)]
            {
                let hup_recv = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = hup_recv => true,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => false,
                }
            }
            #[cfg(not(unix))]
            {
                tokio::time::sleep(Duration::from_secs(1)).await;
                false
            }
        };
        let now = fingerprint(path, &watched(&refused));
        // A config refused for its Redis is tried again while the running one's Redis fails
        // as well: nothing works as it is, and the new settings may by now.
        let retry = retry_redis.is_some_and(|at| Instant::now() >= at)
            && live
                .load()
                .app
                .redis
                .as_ref()
                .is_some_and(|r| r.is_known_down());
        if !forced && !retry && now == last {
            continue;
        }
        // What was loaded, not what the files hold after a reload that waited (on a new
        // provider's discovery): a change meanwhile is seen at the next tick.
        last = match reload(path, &live, &shared, &started).await {
            Reloaded::Applied(loaded) => {
                refused.clear();
                retry_redis = None;
                loaded
            }
            Reloaded::Refused {
                files,
                loaded,
                redis,
            } => {
                refused = files;
                retry_redis = redis.then(|| Instant::now() + REDIS_RETRY);
                loaded.unwrap_or_else(|| fingerprint(path, &watched(&refused)))
            }
        };
    }
}

enum Reloaded {
    /// Swapped in; the fingerprint of the files as they were read.
    Applied([u8; 32]),
    /// The running config stays: the secret files the refused one names and, when it was
    /// read whole, the fingerprint of the files as they were read (with the running ones').
    Refused {
        files: Vec<PathBuf>,
        loaded: Option<[u8; 32]>,
        /// For its Redis, which did not answer (or refused its password).
        redis: bool,
    },
}

/// How often a config refused for its Redis is tried again while the running one's Redis
/// fails too (a password rotated in the secret file first, on the Redis side next).
const REDIS_RETRY: Duration = Duration::from_secs(10);

async fn reload(path: Option<&Path>, live: &Live, shared: &Shared, started: &Config) -> Reloaded {
    let result = |r: &str| shared.metrics.config_reloads.with_label_values(&[r]).inc();
    tracing::info!("configuration changed (or SIGHUP); reloading");
    // Off the request threads: parsing a large or pathological file (and reading the secret
    // files it names) must not hold up the requests they serve meanwhile.
    let owned = path.map(Path::to_path_buf);
    let loaded = tokio::task::spawn_blocking(move || match owned {
        Some(path) => config::load(&path),
        None => config::load_str("", std::env::vars()),
    })
    .await
    .unwrap_or_else(|e| {
        Err(config::ConfigError::new("", format!("config reload did not finish: {e}")).into())
    });
    let cfg = match loaded {
        Ok(c) => c,
        Err(errors) => {
            for e in &errors.0 {
                tracing::error!(
                    error = e.to_string().as_str(),
                    "config reload rejected; the previous config keeps serving"
                );
            }
            result("failure");
            return Reloaded::Refused {
                files: config::named_secret_files(path),
                loaded: None,
                redis: false,
            };
        }
    };
    let current = live.load_full();
    // Secret files named by the new config may differ from the old ones.
    let applied = fingerprint(path, &cfg.watched_files);
    let files = cfg.watched_files.clone();
    let refused = fingerprint(path, &with_refused(&current.app.cfg.watched_files, &files));
    // Said at every reload while the file differs from what runs: it still does.
    for key in restart_only_changes(started, &cfg) {
        tracing::warn!(
            key,
            "config reload: {key} changed; it needs a restart to take effect (the rest applies)"
        );
    }
    match build(Arc::new(cfg), shared, Some(&current.app)).await {
        Ok(next) => {
            live.store(Arc::new(next));
            // Idle keep-alive connections hold the previous generation until their next
            // request: its session cache (up to `limits.session_cache_bytes`) goes now.
            current.app.session_cache.clear();
            tracing::info!("config reloaded");
            result("success");
            Reloaded::Applied(applied)
        }
        Err(e) => {
            tracing::error!(
                error = e.to_string().as_str(),
                "config reload failed; the previous config keeps serving"
            );
            result("failure");
            Reloaded::Refused {
                files,
                loaded: Some(refused),
                redis: matches!(e, StartError::RedisUnreachable { .. }),
            }
        }
    }
}

/// The settings read only at start-up that differ between `running` and `new`: the listeners,
/// the connection cap (the listener's semaphore), the log setup and the TLS files' paths
/// (their contents reload).
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let tls = |c: &Config| c.tls_server.clone().unzip();
    let (cert, key) = tls(running);
    let (new_cert, new_key) = tls(new);
    [
        (running.listen != new.listen, "listen"),
        (running.admin_listen != new.admin_listen, "admin.listen"),
        (
            running.limits.max_connections != new.limits.max_connections,
            "limits.max_connections",
        ),
        (running.log.level != new.log.level, "log.level"),
        (running.log.json != new.log.json, "log.format"),
        (cert != new_cert, "tls.cert_file"),
        (key != new_key, "tls.key_file"),
    ]
    .into_iter()
    .filter_map(|(changed, key)| changed.then_some(key))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
upstream: "http://127.0.0.1:8081"
provider: { issuer_url: "http://127.0.0.1:9000", client_id: "c", client_secret: "s" }
redirect_url: "http://127.0.0.1:4180/oauth2/callback"
cookie: { secrets: ["AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="], secure: false }
"#;

    fn cfg(extra: &str) -> Config {
        config::load_str(&format!("{BASE}{extra}"), Vec::new()).unwrap()
    }

    #[test]
    fn settings_read_only_at_start_up_are_named_when_a_reload_changes_them() {
        let running = cfg("");
        assert!(restart_only_changes(&running, &cfg("")).is_empty());
        // Reloadable ones are not named.
        let reloadable = "timeouts: { idle: 5s, shutdown: 3s }\nlimits: { max_headers: 50 }\n\
                          headers: { user: X-Remote-User }\nlifecycle: { shutdown_delay: 1s }\n";
        assert!(restart_only_changes(&running, &cfg(reloadable)).is_empty());
        let all = "listen: \"127.0.0.1:4181\"\nadmin: { listen: \"\" }\n\
                   limits: { max_connections: 3 }\nlog: { level: debug, format: json }\n";
        assert_eq!(
            restart_only_changes(&running, &cfg(all)),
            [
                "listen",
                "admin.listen",
                "limits.max_connections",
                "log.level",
                "log.format"
            ]
        );
    }
}
