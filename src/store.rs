//! The Redis connection: session storage (`session.store: redis`), refresh coordination
//! across replicas, and the shared record of back-channel logouts. Every call is bounded by
//! `session.redis.timeout`; the connection is lazy and reconnects by itself.

use crate::config::RedisConfig;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Weak;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redis timed out")]
    Timeout,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a value in redis is larger than any the gateway writes")]
    Oversized,
}

/// The largest value read back. A sealed session holds at most what a provider's token
/// response carried (`MAX_PROVIDER_BODY`, 1 MiB: its tokens, and the claims decoded from its ID
/// token a second time), base64 grows it by a third: under 3 MiB.
pub const MAX_VALUE_BYTES: usize = 4 * 1024 * 1024;

pub struct Redis {
    /// Swapped for a new one after a failed authentication: the manager reconnects by itself
    /// only after I/O errors, and would answer every later command with that error.
    conn: arc_swap::ArcSwap<ConnectionManager>,
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    /// When `conn` was last replaced (seconds since the epoch): once a second at most.
    renewed_at: std::sync::atomic::AtomicU64,
    timeout: Duration,
    prefix: String,
    healthy: AtomicBool,
    /// Some command has had its answer (or failed): `healthy` means something.
    checked: AtomicBool,
    /// When a failed command was last logged (seconds since the epoch): once a minute at most.
    failure_logged: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Redis")
    }
}

/// The system's roots and `extra` as one PEM bundle: given roots of its own, the Redis client
/// trusts those alone, and a private CA for Redis must not untrust every public one.
fn trust_bundle(extra: &[u8]) -> Vec<u8> {
    use base64::Engine;
    let mut pem = Vec::new();
    for cert in rustls_native_certs::load_native_certs().certs {
        // The Redis client refuses the whole bundle for one certificate it cannot use.
        if rustls::RootCertStore::empty().add(cert.clone()).is_err() {
            continue;
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&cert);
        pem.extend_from_slice(b"-----BEGIN CERTIFICATE-----\n");
        for line in b64.as_bytes().chunks(64) {
            pem.extend_from_slice(line);
            pem.push(b'\n');
        }
        pem.extend_from_slice(b"-----END CERTIFICATE-----\n");
    }
    pem.extend_from_slice(extra);
    pem
}

/// `index_add`. The keys it checks are derived from the members, not declared: fine on a
/// single Redis (the gateway does not support Redis Cluster). It checks 16 members picked at
/// random, not all: Redis runs nothing else meanwhile, and a user with thousands of sessions
/// must not make each login of theirs scan them all. One member more per login, up to 16
/// fewer: the ended ones stay a small share of an index.
const INDEX_ADD: &str = "for _, m in ipairs(redis.call('srandmember', KEYS[1], 16)) do \
    if redis.call('exists', ARGV[3] .. m) == 0 then redis.call('srem', KEYS[1], m) end \
end \
redis.call('sadd', KEYS[1], ARGV[1]) \
return redis.call('expire', KEYS[1], ARGV[2])";

/// Releases a lock only if it still holds our token.
const UNLOCK: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl Redis {
    /// Builds the (lazy) connection; fails only on a malformed URL.
    pub fn new(cfg: &RedisConfig) -> Result<Self, StoreError> {
        let mut info = cfg.url.as_str().into_connection_info()?;
        if let Some(p) = &cfg.password {
            let settings = info.redis_settings().clone().set_password(p.expose());
            info = info.set_redis_settings(settings);
        }
        let client = match &cfg.ca_pem {
            Some(ca) => redis::Client::build_with_tls(
                info,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(trust_bundle(ca)),
                },
            )?,
            None => redis::Client::open(info)?,
        };
        let mc = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        Ok(Self {
            conn: arc_swap::ArcSwap::from_pointee(ConnectionManager::new_lazy_with_config(
                client.clone(),
                mc.clone(),
            )?),
            client,
            manager_config: mc,
            renewed_at: std::sync::atomic::AtomicU64::new(0),
            timeout: cfg.timeout,
            prefix: cfg.key_prefix.clone(),
            healthy: AtomicBool::new(false),
            checked: AtomicBool::new(false),
            failure_logged: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.conn.load())
    }

    /// A new (lazy) connection after a failed authentication, so that the next command logs
    /// in again: a password put right on either side (a rotation) is picked up by itself.
    fn renew(&self) {
        if !crate::session::once_per(&self.renewed_at, 1) {
            return;
        }
        match ConnectionManager::new_lazy_with_config(
            self.client.clone(),
            self.manager_config.clone(),
        ) {
            Ok(conn) => self.conn.store(std::sync::Arc::new(conn)),
            Err(e) => tracing::warn!(
                error = e.to_string().as_str(),
                "redis connection not renewed"
            ),
        }
    }

    pub fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for (i, p) in parts.iter().enumerate() {
            if i > 0 {
                k.push(':');
            }
            k.push_str(p);
        }
        k
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Has a command failed last (as opposed to: not asked yet, or answered)?
    pub fn is_known_down(&self) -> bool {
        self.checked.load(Ordering::Relaxed) && !self.is_healthy()
    }

    async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let r = match tokio::time::timeout(self.timeout, f).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(r) => r.map_err(StoreError::from),
        };
        self.healthy.store(r.is_ok(), Ordering::Relaxed);
        self.checked.store(true, Ordering::Relaxed);
        if let Err(StoreError::Redis(e)) = &r {
            if e.kind() == redis::ErrorKind::AuthenticationFailed {
                self.renew();
            }
        }
        if let Err(e) = &r {
            // Readiness follows every command, not only the probes: say why it fails.
            if crate::session::once_per(&self.failure_logged, 60) {
                tracing::warn!(error = e.to_string().as_str(), "redis command failed");
            }
        }
        r
    }

    /// Checks that Redis answers and that the gateway may use its keys: a short-lived key
    /// under the prefix is written and read back as sessions are. (A PING passes for a user
    /// whose ACL allows no key of the gateway's, and readiness would flap with every probe
    /// between the failing commands.)
    pub async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.connection();
        let key = self.key(&["health"]);
        self.run(async move { c.pset_ex::<_, _, ()>(&key, 1u8, 10_000).await })
            .await?;
        self.get(&self.key(&["health"])).await.map(drop)
    }

    /// Probes every couple of seconds so readiness reflects Redis even without traffic.
    /// Holds the client only while pinging: once the config generations using it are gone
    /// (a reload changed the Redis settings), the task ends and the connection closes.
    pub async fn watch_health(this: Weak<Self>) {
        let mut was = None;
        while let Some(redis) = this.upgrade() {
            let result = redis.ping().await;
            drop(redis);
            let ok = result.is_ok();
            if was != Some(ok) {
                match result {
                    Ok(()) => tracing::info!("redis reachable"),
                    Err(e) => tracing::warn!(error = e.to_string().as_str(), "redis unreachable"),
                }
                was = Some(ok);
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// A value the gateway wrote (it never writes an empty one), read at most
    /// [`MAX_VALUE_BYTES`] of it: whoever else can write to Redis cannot make each request
    /// read hundreds of megabytes into memory.
    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut c = self.connection();
        let mut cmd = redis::cmd("GETRANGE");
        // The end is inclusive: one byte more than the limit tells an oversized value.
        cmd.arg(key).arg(0).arg(MAX_VALUE_BYTES);
        let value: Vec<u8> = self
            .run(async move { cmd.query_async(&mut c).await })
            .await?;
        match value.len() {
            0 => Ok(None),
            n if n > MAX_VALUE_BYTES => Err(StoreError::Oversized),
            _ => Ok(Some(value)),
        }
    }

    pub async fn set_ex(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), StoreError> {
        let mut c = self.connection();
        let ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        self.run(async move { c.pset_ex(key, value, ms).await })
            .await
    }

    /// `set_ex`, only if the key still exists; `false`: it was gone (deleted meanwhile).
    pub async fn set_ex_existing(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.connection();
        let ms = ttl.as_millis().clamp(1, u64::MAX as u128) as u64;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(ms).arg("XX");
        let set: Option<String> = self
            .run(async move { cmd.query_async(&mut c).await })
            .await?;
        Ok(set.is_some())
    }

    pub async fn del(&self, keys: &[String]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut c = self.connection();
        self.run(async move { c.del::<_, ()>(keys).await }).await
    }

    /// Deletes `key` and takes `member` out of the index sets that name it (a set left empty
    /// goes with it), in one transaction.
    pub async fn del_indexed(
        &self,
        key: &str,
        member: &str,
        indexes: &[String],
    ) -> Result<(), StoreError> {
        let mut c = self.connection();
        self.run(async move {
            let mut p = redis::pipe();
            p.atomic().del(key).ignore();
            for index in indexes {
                p.srem(index, member).ignore();
            }
            p.query_async::<()>(&mut c).await
        })
        .await
    }

    /// Adds `member` to an index set and (re)sets the set's expiry, first dropping those of
    /// 16 members picked at random whose `<live_prefix><member>` key is gone (expired or
    /// deleted), so that an index holds mostly live entries instead of growing by one at
    /// every login. One EVAL: atomic, and one round trip.
    pub async fn index_add(
        &self,
        key: &str,
        member: &str,
        ttl: Duration,
        live_prefix: &str,
    ) -> Result<(), StoreError> {
        let mut c = self.connection();
        self.run(async move {
            redis::cmd("EVAL")
                .arg(INDEX_ADD)
                .arg(1)
                .arg(key)
                .arg(member)
                .arg(ttl.as_secs().max(1))
                .arg(live_prefix)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    pub async fn smembers(&self, key: &str) -> Result<Vec<String>, StoreError> {
        let mut c = self.connection();
        self.run(async move { c.smembers(key).await }).await
    }

    /// SET NX PX: true when this caller now holds `key`.
    pub async fn try_lock(
        &self,
        key: &str,
        token: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut c = self.connection();
        let ms = ttl.as_millis() as u64;
        self.run(async move {
            let r: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut c)
                .await?;
            Ok(r.is_some())
        })
        .await
    }

    pub async fn unlock(&self, key: &str, token: &str) -> Result<(), StoreError> {
        let mut c = self.connection();
        // One EVAL, not EVALSHA with a load on NOSCRIPT: a command sent to a stalled Redis
        // runs after the ones before it even when the caller gave up waiting (the undo of a
        // logout token's record relies on that), where a second round trip would not happen.
        self.run(async move {
            redis::cmd("EVAL")
                .arg(UNLOCK)
                .arg(1)
                .arg(key)
                .arg(token)
                .query_async::<i64>(&mut c)
                .await
                .map(|_| ())
        })
        .await
    }

    /// Adds scored members to a sorted set and drops members scored below `min_score`.
    pub async fn zadd_trim(
        &self,
        key: &str,
        members: &[(u64, String)],
        min_score: u64,
    ) -> Result<(), StoreError> {
        let mut c = self.connection();
        self.run(async move {
            let mut p = redis::pipe();
            p.atomic();
            for (score, m) in members {
                p.zadd(key, m, *score).ignore();
            }
            p.zrembyscore(key, "-inf", format!("({min_score}"))
                .ignore()
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Members scored at or above `min_score`, with their scores.
    pub async fn zrange_from(
        &self,
        key: &str,
        min_score: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut c = self.connection();
        self.run(async move { c.zrangebyscore_withscores(key, min_score, "+inf").await })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::{pem::PemObject, CertificateDer};

    fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem)
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn the_trust_bundle_keeps_the_system_roots_and_adds_the_extra_ones() {
        let system = trust_bundle(b"");
        let roots = certs(&system);
        for c in &roots {
            rustls::RootCertStore::empty().add(c.clone()).unwrap();
        }
        let usable = rustls_native_certs::load_native_certs()
            .certs
            .into_iter()
            .filter(|c| rustls::RootCertStore::empty().add(c.clone()).is_ok())
            .count();
        assert_eq!(roots.len(), usable);
        let extra = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let with = trust_bundle(extra);
        assert!(with.ends_with(extra));
        assert_eq!(certs(&with).len(), usable + 1);
    }
}
