//! The session: what a logged-in user carries, sealed into the session cookie.

pub mod active;
pub mod cookie;
pub mod crypto;
pub mod layer;
mod packed;
pub mod revocation;
pub mod store;

pub use self::active::{ActiveSession, SessionCache};
pub use self::cookie::{CookieJar, CookieReject, Opened, SessionCookies};
pub use crypto::{KeyRing, OpenError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

/// Bumped when the encoding changes; older values then read as "no session" unless read
/// below. Flow states are still at 2; sessions moved to `SESSION_SCHEMA`, and the session
/// schemas 2, 4 and 5 are still read. (3 is a reference to a stored session.)
const SCHEMA: u8 = 2;
const SESSION_SCHEMA_4: u8 = 4;
const SESSION_SCHEMA_5: u8 = 5;
const SESSION_SCHEMA: u8 = 6;

pub fn now_secs() -> u64 {
    now_millis() / 1000
}

/// Whether something last done at `last` (seconds since the epoch, 0: never) may be done
/// again now, `period` later, claiming it: a warning once a minute at most, say.
pub fn once_per(last: &std::sync::atomic::AtomicU64, period: u64) -> bool {
    use std::sync::atomic::Ordering;
    let now = now_secs();
    let prev = last.load(Ordering::Relaxed);
    (prev == 0 || now >= prev.saturating_add(period))
        && last
            .compare_exchange(prev, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
}

/// Milliseconds since the epoch: orders a login and a logout within the same second.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Who the user is, from the ID token.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub sub: String,
    pub email: Option<String>,
    pub email_verified: bool,
    pub name: Option<String>,
    pub preferred_username: Option<String>,
    pub groups: Vec<String>,
    /// The provider's session id (`sid`), for back-channel logout.
    pub sid: Option<String>,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("sub", &self.sub)
            .field("groups", &self.groups.len())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    /// Random id: keys single-flight refresh and server-side storage.
    pub id: [u8; 16],
    /// When the user logged in, in milliseconds since the epoch: a logout recorded after it
    /// ends the session, one recorded before it (in the same second too) does not.
    pub created_at_ms: u64,
    /// End of the session's life (absolute, seconds since the epoch).
    pub expires_at: u64,
    #[serde(with = "packed::token")]
    pub access_token: String,
    /// When the access token expires (0: the provider did not say).
    pub access_expires_at: u64,
    /// When the access token was received (0: unknown, a session from before this field).
    pub access_issued_at: u64,
    #[serde(with = "packed::optional_token")]
    pub refresh_token: Option<String>,
    #[serde(with = "packed::optional_token")]
    pub id_token: Option<String>,
    pub identity: Identity,
    /// When the session was last used (kept current at most every tenth of the idle timeout).
    pub last_seen: u64,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Tokens are never printed.
        f.debug_struct("Session")
            .field("identity", &self.identity)
            .field("expires_at", &self.expires_at)
            .field("access_expires_at", &self.access_expires_at)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("unknown session schema")]
    Schema,
    #[error("malformed session")]
    Malformed,
}

/// The schema byte, then the value in postcard.
fn encode_versioned<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_extend(value, vec![SCHEMA]).unwrap_or_default()
}

fn decode_versioned<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&SCHEMA, rest)) => postcard::from_bytes(rest).map_err(|_| DecodeError::Malformed),
        _ => Err(DecodeError::Schema),
    }
}

/// A session as schema 2 encoded it (no `access_issued_at`).
#[derive(Serialize, Deserialize)]
struct SessionV2 {
    id: [u8; 16],
    created_at: u64,
    expires_at: u64,
    access_token: String,
    access_expires_at: u64,
    refresh_token: Option<String>,
    id_token: Option<String>,
    identity: Identity,
    last_seen: u64,
}

impl From<SessionV2> for Session {
    fn from(v: SessionV2) -> Self {
        Session {
            id: v.id,
            created_at_ms: v.created_at.saturating_mul(1000),
            expires_at: v.expires_at,
            access_token: v.access_token,
            access_expires_at: v.access_expires_at,
            access_issued_at: 0,
            refresh_token: v.refresh_token,
            id_token: v.id_token,
            identity: v.identity,
            last_seen: v.last_seen,
        }
    }
}

/// A session as schemas 4 and 5 encoded it: its tokens as text, its creation time in seconds
/// (4) or in milliseconds (5).
#[derive(Serialize, Deserialize)]
struct SessionV4 {
    id: [u8; 16],
    created_at: u64,
    expires_at: u64,
    access_token: String,
    access_expires_at: u64,
    access_issued_at: u64,
    refresh_token: Option<String>,
    id_token: Option<String>,
    identity: Identity,
    last_seen: u64,
}

impl SessionV4 {
    /// `created_at` in `unit` milliseconds. A time in seconds reads as the start of its
    /// second: a logout within that second still ends the session, as before.
    fn into_session(self, unit: u64) -> Session {
        Session {
            id: self.id,
            created_at_ms: self.created_at.saturating_mul(unit),
            expires_at: self.expires_at,
            access_token: self.access_token,
            access_expires_at: self.access_expires_at,
            access_issued_at: self.access_issued_at,
            refresh_token: self.refresh_token,
            id_token: self.id_token,
            identity: self.identity,
            last_seen: self.last_seen,
        }
    }
}

impl Session {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_extend(self, vec![SESSION_SCHEMA]).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.split_first() {
            Some((&SESSION_SCHEMA, rest)) => {
                postcard::from_bytes(rest).map_err(|_| DecodeError::Malformed)
            }
            Some((&schema @ (SESSION_SCHEMA_4 | SESSION_SCHEMA_5), rest)) => {
                let unit = if schema == SESSION_SCHEMA_4 { 1000 } else { 1 };
                postcard::from_bytes::<SessionV4>(rest)
                    .map(|v| v.into_session(unit))
                    .map_err(|_| DecodeError::Malformed)
            }
            Some((&SCHEMA, _)) => decode_versioned::<SessionV2>(bytes).map(Session::from),
            _ => Err(DecodeError::Schema),
        }
    }

    pub fn is_expired(&self, now: u64) -> bool {
        now >= self.expires_at
    }

    /// Older than `lifetime` (the configured one, which may be shorter than the one it was
    /// created under)?
    pub fn outlived(&self, now: u64, lifetime: std::time::Duration) -> bool {
        let lifetime_ms = u64::try_from(lifetime.as_millis()).unwrap_or(u64::MAX);
        now.saturating_mul(1000) >= self.created_at_ms.saturating_add(lifetime_ms)
    }

    /// Unused for longer than `idle` (zero: no idle timeout)?
    pub fn is_idle(&self, now: u64, idle: std::time::Duration) -> bool {
        !idle.is_zero() && now > self.last_seen.saturating_add(idle.as_secs())
    }

    /// Is it time to record activity (at most every tenth of the idle timeout)?
    pub fn needs_touch(&self, now: u64, idle: std::time::Duration) -> bool {
        !idle.is_zero() && now >= self.last_seen.saturating_add((idle.as_secs() / 10).max(1))
    }

    /// The email to hand the app: one the provider says is verified, unless unverified ones
    /// are allowed (else anyone who can set their email at the provider is that email).
    pub fn email(&self, unverified: bool) -> Option<&str> {
        self.identity
            .email
            .as_deref()
            .filter(|_| self.identity.email_verified || unverified)
    }

    /// The user header value: subject, or the (trusted) email.
    pub fn user(&self, cfg: &crate::config::HeaderConfig) -> &str {
        match cfg.user_claim {
            crate::config::UserClaim::Email => self
                .email(cfg.unverified_email)
                .unwrap_or(&self.identity.sub),
            crate::config::UserClaim::Sub => &self.identity.sub,
        }
    }

    /// The session id as text (for logs and storage keys; not a secret by itself).
    pub fn id_hex(&self) -> String {
        crypto::hex(&self.id)
    }
}

/// Schema byte of a cookie that only references a Redis-stored session.
const REF_SCHEMA: u8 = 3;

/// What a session cookie holds.
#[derive(Debug, Clone, PartialEq, Eq)]
// Moved once per request; boxing would cost an allocation on the hot path.
#[allow(clippy::large_enum_variant)]
pub enum CookieValue {
    Full(Session),
    Ref([u8; 16]),
}

impl CookieValue {
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        match bytes.split_first() {
            Some((&REF_SCHEMA, rest)) => rest
                .try_into()
                .map(CookieValue::Ref)
                .map_err(|_| DecodeError::Malformed),
            // Every session schema still read, and `Schema` for anything else.
            _ => Session::decode(bytes).map(CookieValue::Full),
        }
    }

    pub fn encode_ref(id: &[u8; 16]) -> Vec<u8> {
        let mut v = Vec::with_capacity(17);
        v.push(REF_SCHEMA);
        v.extend_from_slice(id);
        v
    }
}

/// A pending login: what the callback needs to finish it. Sealed into a flow cookie.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowState {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
    pub return_to: String,
    pub created_at: u64,
}

impl fmt::Debug for FlowState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowState")
            .field("return_to", &self.return_to)
            .finish_non_exhaustive()
    }
}

impl FlowState {
    pub fn encode(&self) -> Vec<u8> {
        encode_versioned(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        decode_versioned(bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sessions_of_schema_2_still_open() {
        let s = sample();
        let v2 = SessionV2 {
            id: s.id,
            created_at: s.created_at_ms / 1000,
            expires_at: s.expires_at,
            access_token: s.access_token.clone(),
            access_expires_at: s.access_expires_at,
            refresh_token: s.refresh_token.clone(),
            id_token: s.id_token.clone(),
            identity: s.identity.clone(),
            last_seen: s.last_seen,
        };
        let old = encode_versioned(&v2);
        let read = Session::decode(&old).unwrap();
        assert_eq!(read.access_issued_at, 0);
        assert_eq!(read.created_at_ms, 1000);
        assert_eq!(read.access_token, s.access_token);
        assert_eq!(read.identity, s.identity);
        assert!(matches!(
            CookieValue::decode(&old),
            Ok(CookieValue::Full(_))
        ));
        let new = s.encode();
        assert_eq!(new[0], SESSION_SCHEMA);
        assert_eq!(Session::decode(&new).unwrap(), s);
    }

    #[test]
    fn sessions_of_schemas_4_and_5_still_open() {
        let s = sample();
        for (schema, created_at) in [(SESSION_SCHEMA_4, 1), (SESSION_SCHEMA_5, 1000)] {
            let old = SessionV4 {
                id: s.id,
                created_at,
                expires_at: s.expires_at,
                access_token: s.access_token.clone(),
                access_expires_at: s.access_expires_at,
                access_issued_at: s.access_issued_at,
                refresh_token: s.refresh_token.clone(),
                id_token: s.id_token.clone(),
                identity: s.identity.clone(),
                last_seen: s.last_seen,
            };
            let old = postcard::to_extend(&old, vec![schema]).unwrap();
            assert_eq!(Session::decode(&old).unwrap(), s);
            assert!(matches!(
                CookieValue::decode(&old),
                Ok(CookieValue::Full(_))
            ));
        }
    }

    #[test]
    fn base64url_tokens_are_sealed_as_their_bytes() {
        let mut s = sample();
        let plain = s.encode().len();
        let id_token = packed::tests::jwt_like(&[30, 300, 256]);
        s.access_token = "q1YWH4A5IA3O5Qc7GyLV4XmsRilNBUDfE-V79PLrjmo".into();
        let tokens = id_token.len() + s.access_token.len() - "at".len();
        s.id_token = Some(id_token);
        let packed = s.encode();
        assert_eq!(Session::decode(&packed).unwrap(), s);
        assert!(
            (packed.len() - plain) * 4 <= tokens * 3 + 64,
            "{} more bytes for {tokens} more token characters",
            packed.len() - plain
        );
    }

    pub fn sample() -> Session {
        Session {
            id: [7; 16],
            created_at_ms: 1000,
            expires_at: 2,
            access_token: "at".into(),
            access_expires_at: 3,
            access_issued_at: 1,
            refresh_token: Some("rt".into()),
            id_token: None,
            identity: Identity {
                sub: "alice".into(),
                email: Some("alice@example.com".into()),
                email_verified: true,
                groups: vec!["a".into(), "b".into()],
                ..Default::default()
            },
            last_seen: 1,
        }
    }

    /// Idle after `idle` unused (not at it); activity recorded at most every tenth of it,
    /// at least every second: often enough that a user who keeps going is never idled out.
    #[test]
    fn idleness_and_its_touches() {
        let mut s = sample();
        s.last_seen = 1_000;
        let idle = std::time::Duration::from_secs(300);
        assert!(!s.is_idle(1_300, idle));
        assert!(s.is_idle(1_301, idle));
        assert!(
            !s.is_idle(1_000_000, std::time::Duration::ZERO),
            "no idle timeout"
        );
        assert!(!s.needs_touch(1_029, idle));
        assert!(s.needs_touch(1_030, idle));
        let short = std::time::Duration::from_secs(4);
        assert!(!s.needs_touch(1_000, short));
        assert!(s.needs_touch(1_001, short));
        assert!(!s.needs_touch(1_000_000, std::time::Duration::ZERO));
    }

    #[test]
    fn round_trip() {
        let s = sample();
        assert_eq!(Session::decode(&s.encode()).unwrap(), s);
        assert_eq!(Session::decode(&[]), Err(DecodeError::Schema));
        assert_eq!(
            Session::decode(&[SCHEMA, 0xff]),
            Err(DecodeError::Malformed)
        );
    }

    #[test]
    fn debug_hides_tokens() {
        let s = format!("{:?}", sample());
        assert!(!s.contains("\"at\"") && !s.contains("rt"), "{s}");
    }
}
