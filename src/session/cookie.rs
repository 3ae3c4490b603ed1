//! Session and flow cookies: naming, chunking, sealing, and the `Set-Cookie` lines.

use super::crypto::{KeyRing, OpenError};
use super::{ActiveSession, CookieValue, DecodeError, FlowState, Session, SessionCache};
use crate::config::{CookieConfig, SameSite};
use ::cookie::{Cookie, CookieBuilder};
use http::header::{HeaderMap, HeaderValue, COOKIE};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;

/// Values above this many bytes are split into `<name>_0`, `<name>_1`, …
/// (browsers drop cookies over ~4096 bytes including the name and attributes).
pub const CHUNK_SIZE: usize = 3800;

/// Why a session cookie was not accepted (metrics label; all mean "no session").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CookieReject {
    #[error("too many or missing chunks")]
    Oversize,
    #[error("{0}")]
    Open(#[from] OpenError),
    #[error("{0}")]
    Decode(#[from] DecodeError),
    #[error("session expired")]
    Expired,
    #[error("session ended by a back-channel logout")]
    Revoked,
}

impl CookieReject {
    pub fn label(&self) -> &'static str {
        match self {
            CookieReject::Oversize => "oversize",
            CookieReject::Open(OpenError::UnknownKey) => "unknown_key",
            CookieReject::Open(_) | CookieReject::Decode(_) => "tampered",
            CookieReject::Expired => "expired",
            CookieReject::Revoked => "revoked",
        }
    }
}

/// A session cookie opened on the request path.
#[derive(Debug)]
pub enum Opened {
    /// The whole session (cookie store).
    Session(Arc<ActiveSession>),
    /// The id of a Redis-stored session.
    Ref([u8; 16]),
}

/// The request's cookies, parsed once, borrowing from the headers.
#[derive(Debug, Default)]
pub struct CookieJar<'a> {
    /// Names (valid UTF-8) and raw values: a value is only checked when it is read, so the
    /// kilobytes of a session cookie are scanned once (for `;`) on the request path.
    /// Inline: a request rarely carries more than a few cookies, and this is per request.
    pairs: smallvec::SmallVec<[(&'a str, &'a [u8]); 4]>,
}

impl<'a> CookieJar<'a> {
    pub fn parse(headers: &'a HeaderMap) -> Self {
        let mut pairs = smallvec::SmallVec::new();
        for value in headers.get_all(COOKIE) {
            // Other apps' cookies may carry UTF-8 or worse: bytes, and one bad pair only
            // costs that pair.
            let bytes = value.as_bytes();
            let mut start = 0;
            for end in memchr::memchr_iter(b';', bytes).chain(std::iter::once(bytes.len())) {
                let part = &bytes[start..end];
                start = end + 1;
                let Some(eq) = memchr::memchr(b'=', part) else {
                    continue;
                };
                let (n, v) = (part[..eq].trim_ascii(), part[eq + 1..].trim_ascii());
                let v = match v {
                    [b'"', inner @ .., b'"'] => inner,
                    v => v,
                };
                match std::str::from_utf8(n) {
                    Ok(n) if !n.is_empty() => pairs.push((n, v)),
                    _ => {}
                }
            }
        }
        Self { pairs }
    }

    /// The value of the first cookie called `name`, as sent (sealed values need no UTF-8
    /// check: what is not base64 fails to open).
    pub fn get_bytes(&self, name: &str) -> Option<&'a [u8]> {
        let (_, v) = self.pairs.iter().find(|(n, _)| *n == name)?;
        Some(v)
    }

    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.pairs.iter().map(|(n, _)| *n)
    }
}

/// The most chunks a session cookie may be split into (`limits.max_cookie_chunks` ≤ this).
pub const MAX_CHUNKS: usize = 32;

/// How many other readings of a request's session cookies are tried when the first does not
/// open (see `SessionCookies::other_readings`), and how many of them may be other values of
/// the whole name.
const MAX_OTHER_READINGS: usize = 8;
const MAX_WHOLE_READINGS: usize = 3;

/// Everything needed to read and write the gateway's cookies; built once.
#[derive(Debug)]
pub struct SessionCookies {
    pub name: String,
    /// What a session cookie's value is sealed to (the AEAD's associated data): its name, the
    /// provider's issuer and the client id. Another deployment that shares the key and the
    /// cookie name (a staging copy of the config, a second app on the same domain) cannot
    /// have its sessions taken here, with tokens issued to another client.
    bound_to: Vec<u8>,
    flow_prefix: String,
    chunk_prefix: String,
    /// The name without a `__Host-`/`__Secure-` prefix, by which `is_ours` knows the
    /// gateway's cookies under any prefix.
    bare_name: String,
    secure: bool,
    domain: Option<String>,
    same_site: ::cookie::SameSite,
    flow_path: String,
    pub lifetime: Duration,
    pub flow_lifetime: Duration,
    max_chunks: usize,
    pub keys: KeyRing,
    /// The Redis store: the cookie holds a session id, never a whole session (and the cookie
    /// store the reverse). A value of the other kind was sealed by another deployment with the
    /// same key, or by this one before it changed stores: a sign-out here could not end it.
    holds_ref: bool,
}

/// A cookie name without the `__Host-` or `__Secure-` prefix browsers give a meaning to.
fn unprefixed(name: &str) -> &str {
    name.strip_prefix("__Host-")
        .or_else(|| name.strip_prefix("__Secure-"))
        .unwrap_or(name)
}

/// A cookie of the other store's kind: no session here.
pub const NOT_THIS_STORE: CookieReject = CookieReject::Decode(DecodeError::Schema);

impl SessionCookies {
    /// `issuer` and `client_id`: the provider's, that session cookies are bound to.
    pub fn new(
        cfg: &CookieConfig,
        (issuer, client_id): (&str, &str),
        lifetime: Duration,
        max_chunks: usize,
        flow_path: &str,
        holds_ref: bool,
    ) -> Self {
        let base = cfg.name.trim_start_matches("__Host-");
        // Flow cookies are scoped like the session cookie (Path=/) so every request that may
        // start a login sees the pending ones and can cap them; they never reach the upstream.
        let flow_prefix = if cfg.name.starts_with("__Host-") {
            format!("__Host-{base}_flow_")
        } else if cfg.secure {
            format!("__Secure-{}_flow_", base.trim_start_matches("__Secure-"))
        } else {
            format!("{base}_flow_")
        };
        let bound_to = [cfg.name.as_str(), issuer, client_id]
            .join("\0")
            .into_bytes();
        Self {
            chunk_prefix: format!("{}_", cfg.name),
            bare_name: unprefixed(base).to_string(),
            name: cfg.name.clone(),
            bound_to,
            flow_prefix,
            secure: cfg.secure,
            domain: cfg.domain.clone(),
            same_site: match cfg.same_site {
                SameSite::Lax => ::cookie::SameSite::Lax,
                SameSite::Strict => ::cookie::SameSite::Strict,
                SameSite::None => ::cookie::SameSite::None,
            },
            flow_path: flow_path.to_string(),
            lifetime,
            flow_lifetime: cfg.flow_lifetime,
            max_chunks,
            keys: KeyRing::new(&cfg.keys),
            holds_ref,
        }
    }

    /// Is this one of the gateway's cookies (session, chunk or flow)? Those never reach the
    /// upstream, also under another `__Host-`/`__Secure-` prefix than the one in use (set
    /// before `cookie.name` or `cookie.secure` changed).
    pub fn is_ours(&self, name: &str) -> bool {
        match unprefixed(name).strip_prefix(self.bare_name.as_str()) {
            Some("") => true,
            Some(rest) => rest.strip_prefix('_').is_some_and(|r| {
                r.starts_with("flow_") || (!r.is_empty() && r.bytes().all(|b| b.is_ascii_digit()))
            }),
            None => false,
        }
    }

    /// `<name>_<digits>`: a chunk of the session cookie (never a flow cookie).
    fn is_chunk(&self, name: &str) -> bool {
        name.strip_prefix(&self.chunk_prefix)
            .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
    }

    /// The index of a chunk name the gateway writes (no leading zero; `None` for any other).
    fn chunk_index(&self, name: &str) -> Option<usize> {
        let digits = name.strip_prefix(&self.chunk_prefix)?;
        if digits.len() > 1 && digits.starts_with('0') {
            return None; // "_07": not a name the gateway writes
        }
        digits.parse().ok()
    }

    fn chunk_name(&self, i: usize) -> String {
        format!("{}{i}", self.chunk_prefix)
    }

    /// The sealed session value, reassembled from chunks when needed.
    fn sealed_value<'a>(
        &self,
        jar: &CookieJar<'a>,
    ) -> Result<Option<std::borrow::Cow<'a, [u8]>>, CookieReject> {
        if let Some(v) = jar.get_bytes(&self.name) {
            // The gateway splits anything longer into chunks.
            if v.len() > CHUNK_SIZE {
                return Err(CookieReject::Oversize);
            }
            return Ok(Some(v.into()));
        }
        // One pass finds every chunk (the first of each name), before anything is allocated.
        let mut parts: [Option<&'a [u8]>; MAX_CHUNKS] = [None; MAX_CHUNKS];
        let mut count = 0;
        for &(name, value) in &jar.pairs {
            if !self.is_chunk(name) {
                continue;
            }
            count += 1;
            if let Some(slot) = self.chunk_index(name).and_then(|i| parts.get_mut(i)) {
                slot.get_or_insert(value);
            }
        }
        if count == 0 {
            return Ok(None);
        }
        // The gateway never writes a single chunk (short values are not chunked): a lone
        // chunk is a whole value moved under another name.
        if count == 1 {
            return Err(CookieReject::Decode(DecodeError::Malformed));
        }
        if count > self.max_chunks {
            return Err(CookieReject::Oversize);
        }
        let mut value = Vec::with_capacity(count * CHUNK_SIZE);
        for part in &parts[..count] {
            let part = part.ok_or(CookieReject::Oversize)?;
            if part.len() > CHUNK_SIZE {
                return Err(CookieReject::Oversize);
            }
            // Nor an empty one: a whole value under a chunk's name beside an empty chunk is a
            // lone chunk in disguise.
            if part.is_empty() {
                return Err(CookieReject::Decode(DecodeError::Malformed));
            }
            value.extend_from_slice(part);
        }
        Ok(Some(value.into()))
    }

    /// Other readings of the request's session cookies, for when the first does not open:
    /// a cookie of the session's name that is not the gateway's (planted under a longer path,
    /// which browsers send first, or from a sibling domain; the gateway's `Path=/` clearing
    /// cannot remove it) would otherwise end the session on every request it rides on, and
    /// send the browser round the login for good. Each reading is a list of values to join;
    /// one whose first value is not sealed under one of the keys (checked from its first
    /// bytes) is not counted. Tried, up to `MAX_OTHER_READINGS`:
    /// - up to three other values of the whole name (the same one sent twice counts once);
    /// - the chunks as the browser sent them together, `_0`, `_1`, … one after the other (the
    ///   gateway sets them in one answer, so they arrive side by side);
    /// - the chunks as the gateway writes them, every chunk but the last at `CHUNK_SIZE`: a
    ///   run of full-size values from `_0` (the first or the last sent for each index), then a
    ///   short value for the next index, or none.
    ///
    /// Strays of another size, or past the end, are passed over.
    fn other_readings<'a>(&self, jar: &CookieJar<'a>) -> Vec<Vec<&'a [u8]>> {
        let mut out: Vec<Vec<&'a [u8]>> = Vec::new();
        let offer = |out: &mut Vec<Vec<&'a [u8]>>, parts: Vec<&'a [u8]>, chunked: bool| {
            let sealed = parts.first().is_some_and(|p| self.keys.may_open(p));
            // A lone chunk is never written: a whole value moved under a chunk's name.
            let lone_chunk = parts.len() == 1 && chunked;
            let seen = out
                .iter()
                .any(|o| o.len() == parts.len() && o.iter().zip(&parts).all(|(a, b)| a == b));
            if sealed && !seen && !lone_chunk && out.len() < MAX_OTHER_READINGS {
                out.push(parts);
            }
        };
        let mut whole = jar
            .pairs
            .iter()
            .filter(|(n, v)| *n == self.name && v.len() <= CHUNK_SIZE)
            .map(|&(_, v)| v);
        let first_whole = whole.next();
        for v in whole.filter(|v| Some(*v) != first_whole) {
            offer(&mut out, vec![v], false);
            if out.len() >= MAX_WHOLE_READINGS {
                break;
            }
        }
        // The chunks in the order sent, and per index the first and the last value of full
        // size, and up to three short ones.
        let chunks: Vec<(usize, &'a [u8])> = jar
            .pairs
            .iter()
            .filter(|(n, v)| self.is_chunk(n) && !v.is_empty() && v.len() <= CHUNK_SIZE)
            .filter_map(|&(n, v)| Some((self.chunk_index(n)?, v)))
            .filter(|&(i, _)| i < self.max_chunks)
            .collect();
        // A chunk shorter than `CHUNK_SIZE` is the last: what follows it is not the session's.
        let cut = |mut parts: Vec<&'a [u8]>| {
            if let Some(end) = parts.iter().position(|p| p.len() < CHUNK_SIZE) {
                parts.truncate(end + 1);
            }
            parts
        };
        let mut run: Vec<&'a [u8]> = Vec::new();
        for &(i, v) in &chunks {
            if i == 0 || i != run.len() {
                if run.len() >= 2 {
                    offer(&mut out, cut(std::mem::take(&mut run)), true);
                }
                run.clear();
                if i != 0 {
                    continue;
                }
            }
            run.push(v);
        }
        if run.len() >= 2 {
            offer(&mut out, cut(run), true);
        }
        let mut full_first: [Option<&'a [u8]>; MAX_CHUNKS] = [None; MAX_CHUNKS];
        let mut full_last = full_first;
        let mut short: [[Option<&'a [u8]>; 3]; MAX_CHUNKS] = [[None; 3]; MAX_CHUNKS];
        for &(i, v) in &chunks {
            if v.len() == CHUNK_SIZE {
                full_first[i].get_or_insert(v);
                full_last[i] = Some(v);
            } else if let Some(slot) = short[i].iter_mut().find(|s| s.is_none()) {
                *slot = Some(v);
            }
        }
        let full_run = full_first.iter().take_while(|p| p.is_some()).count();
        // The last chunk is short, at any index the full-size run reaches (a full-size stray
        // at its own index must not hide it), or the run ends on a full chunk.
        for k in (1..=full_run.min(MAX_CHUNKS - 1)).rev() {
            for last in short[k].iter().flatten() {
                for prefix in [&full_first, &full_last] {
                    offer(
                        &mut out,
                        prefix[..k]
                            .iter()
                            .flatten()
                            .copied()
                            .chain([*last])
                            .collect(),
                        true,
                    );
                }
            }
        }
        // A session of an exact multiple of `CHUNK_SIZE` ends on a full chunk, and full-size
        // strays may follow it.
        for k in (2..=full_run).rev() {
            for prefix in [&full_first, &full_last] {
                offer(
                    &mut out,
                    prefix[..k].iter().flatten().copied().collect(),
                    true,
                );
            }
        }
        out
    }

    /// `open_one` on the request's session value; when that does not open, on the other
    /// readings of its cookies (see `other_readings`). `Ok(None)`: no session cookie at all.
    /// A rejection is the first reading's.
    fn open_any<T>(
        &self,
        jar: &CookieJar<'_>,
        mut open_one: impl FnMut(&[u8]) -> Result<T, CookieReject>,
    ) -> Result<Option<T>, CookieReject> {
        let rejected = match self.sealed_value(jar) {
            Ok(None) => return Ok(None),
            Ok(Some(sealed)) => match open_one(&sealed) {
                Ok(v) => return Ok(Some(v)),
                Err(e) => e,
            },
            Err(e) => e,
        };
        self.other_readings(jar)
            .iter()
            .find_map(|parts| open_one(&parts.concat()).ok())
            .map(Some)
            .ok_or(rejected)
    }

    /// The references (Redis store) the other readings of the request's session cookies open
    /// to, but `first`: to be looked up in turn when the first one names no live session, so
    /// that a planted reference to a signed-out session does not hide the live one.
    pub fn other_refs(&self, jar: &CookieJar<'_>, now: u64, first: &[u8; 16]) -> Vec<[u8; 16]> {
        let mut out: Vec<[u8; 16]> = Vec::new();
        for parts in self.other_readings(jar) {
            if let Ok(CookieValue::Ref(id)) = self.unseal(&parts.concat(), now) {
                if id != *first && !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Opens the session cookie: a whole session, or (Redis store) a reference to one.
    /// `Ok(None)`: no session cookie at all. `ended` says why a session that opened is over
    /// anyway (signed out, idle): such a reading is passed over like one that does not open,
    /// so that a planted cookie of an ended session does not hide the live one.
    pub fn open(
        &self,
        jar: &CookieJar<'_>,
        now: u64,
        ended: impl Fn(&Session) -> Option<CookieReject>,
    ) -> Result<Option<CookieValue>, CookieReject> {
        self.open_any(jar, |sealed| match self.unseal(sealed, now)? {
            CookieValue::Full(s) => match ended(&s) {
                Some(reason) => Err(reason),
                None => Ok(CookieValue::Full(s)),
            },
            v => Ok(v),
        })
    }

    /// Decrypts and decodes a sealed session value; an expired session is a rejection.
    fn unseal(&self, sealed: &[u8], now: u64) -> Result<CookieValue, CookieReject> {
        if sealed.len() > self.max_chunks * CHUNK_SIZE {
            return Err(CookieReject::Oversize);
        }
        let value = self
            .keys
            .open_with(&self.bound_to, sealed, CookieValue::decode)??;
        match value {
            CookieValue::Full(_) if self.holds_ref => Err(NOT_THIS_STORE),
            CookieValue::Ref(_) if !self.holds_ref => Err(NOT_THIS_STORE),
            CookieValue::Full(s) if s.is_expired(now) => Err(CookieReject::Expired),
            v => Ok(v),
        }
    }

    /// Opens the session cookie on the request path: a session (from `cache` when this exact
    /// value was opened before), or (Redis store) a reference. `Ok(None)`: no session cookie.
    /// `ended`: as for `open`.
    pub fn open_active(
        &self,
        jar: &CookieJar<'_>,
        now: u64,
        cache: &SessionCache,
        ended: impl Fn(&Session) -> Option<CookieReject>,
    ) -> Result<Option<Opened>, CookieReject> {
        let live = |s: std::sync::Arc<ActiveSession>| match ended(&s) {
            Some(reason) => Err(reason),
            None => Ok(Opened::Session(s)),
        };
        self.open_any(jar, |sealed| {
            if let Some(s) = cache.get(sealed) {
                return match s.is_expired(now) {
                    true => Err(CookieReject::Expired),
                    false => live(s),
                };
            }
            match self.unseal(sealed, now)? {
                CookieValue::Full(s) => {
                    let s = ActiveSession::new(s);
                    cache.insert(sealed, s.clone());
                    live(s)
                }
                CookieValue::Ref(id) => Ok(Opened::Ref(id)),
            }
        })
    }

    /// Opens a cookie that holds the whole session (the cookie store).
    pub fn open_session(
        &self,
        jar: &CookieJar<'_>,
        now: u64,
    ) -> Result<Option<Session>, CookieReject> {
        match self.open(jar, now, |_| None)? {
            Some(CookieValue::Full(s)) => Ok(Some(s)),
            Some(CookieValue::Ref(_)) => Err(NOT_THIS_STORE),
            None => Ok(None),
        }
    }

    /// `Set-Cookie` lines for a Redis-stored session: the cookie carries only its id.
    pub fn set_ref(
        &self,
        id: &[u8; 16],
        expires_at: u64,
        jar: &CookieJar<'_>,
        now: u64,
    ) -> Vec<HeaderValue> {
        let sealed = self.keys.seal(&self.bound_to, &CookieValue::encode_ref(id));
        let max_age = expires_at.saturating_sub(now).min(i64::MAX as u64) as i64;
        let mut out: Vec<HeaderValue> = Self::line(
            self.builder(self.name.clone(), sealed, "/")
                .max_age(::cookie::time::Duration::seconds(max_age)),
        )
        .into_iter()
        .collect();
        for n in jar.names() {
            if self.is_chunk(n) {
                out.extend(self.expire(n, "/"));
            }
        }
        out
    }

    fn builder<'c>(&self, name: String, value: String, path: &'c str) -> CookieBuilder<'c> {
        let mut b = Cookie::build((name, value))
            .path(path)
            .http_only(true)
            .secure(self.secure)
            .same_site(self.same_site);
        if let Some(d) = &self.domain {
            b = b.domain(d.clone());
        }
        b
    }

    fn line(b: CookieBuilder<'_>) -> Option<HeaderValue> {
        HeaderValue::from_str(&b.build().to_string()).ok()
    }

    fn expire(&self, name: &str, path: &str) -> Option<HeaderValue> {
        Self::line(
            self.builder(name.to_string(), String::new(), path)
                .max_age(::cookie::time::Duration::ZERO),
        )
    }

    /// Whether `session` fits in `limits.max_cookie_chunks` chunks.
    pub fn fits(&self, session: &Session, now: u64) -> bool {
        self.set_session(session, &CookieJar::default(), now)
            .is_some()
    }

    /// `Set-Cookie` lines that store `session`, clearing stale chunks the request carried.
    /// `None` when the session does not fit in `limits.max_cookie_chunks` chunks.
    pub fn set_session(
        &self,
        session: &Session,
        jar: &CookieJar<'_>,
        now: u64,
    ) -> Option<Vec<HeaderValue>> {
        let sealed = self.keys.seal(&self.bound_to, &session.encode());
        let max_age = session.expires_at.saturating_sub(now).min(i64::MAX as u64) as i64;
        let max_age = ::cookie::time::Duration::seconds(max_age);
        let mut out = Vec::new();
        let written_chunks = if sealed.len() <= CHUNK_SIZE {
            out.push(Self::line(
                self.builder(self.name.clone(), sealed, "/")
                    .max_age(max_age),
            )?);
            0
        } else {
            let chunks: Vec<&str> = sealed
                .as_bytes()
                .chunks(CHUNK_SIZE)
                .filter_map(|c| std::str::from_utf8(c).ok())
                .collect();
            if chunks.len() > self.max_chunks {
                return None;
            }
            for (i, c) in chunks.iter().enumerate() {
                out.push(Self::line(
                    self.builder(self.chunk_name(i), c.to_string(), "/")
                        .max_age(max_age),
                )?);
            }
            if jar.get_bytes(&self.name).is_some() {
                out.extend(self.expire(&self.name, "/"));
            }
            chunks.len()
        };
        for i in self.sent_chunks(jar) {
            if i >= written_chunks {
                out.extend(self.expire(&self.chunk_name(i), "/"));
            }
        }
        Some(out)
    }

    /// `Set-Cookie` lines that delete the session: the cookie and its chunks the request
    /// carried, and only those (a request that carries none, a cross-site post SameSite keeps
    /// them from, cannot have the browser drop them).
    pub fn clear_session(&self, jar: &CookieJar<'_>) -> Vec<HeaderValue> {
        let mut out = Vec::new();
        if jar.get_bytes(&self.name).is_some() {
            out.extend(self.expire(&self.name, "/"));
        }
        for i in self.sent_chunks(jar) {
            out.extend(self.expire(&self.chunk_name(i), "/"));
        }
        out
    }

    /// The chunks of ours a request carried: only names the gateway could have set under any
    /// configuration (below `MAX_CHUNKS`, no leading zeros), each once, however many cookies
    /// the client sent.
    fn sent_chunks(&self, jar: &CookieJar<'_>) -> Vec<usize> {
        let mut sent = [false; MAX_CHUNKS];
        for n in jar.names().filter(|n| self.is_chunk(n)) {
            if let Some(slot) = self.chunk_index(n).and_then(|i| sent.get_mut(i)) {
                *slot = true;
            }
        }
        (0..MAX_CHUNKS).filter(|&i| sent[i]).collect()
    }

    /// The flow cookie for one login attempt: its name is derived from the state.
    pub fn flow_cookie_name(&self, state: &str) -> String {
        let d = Sha256::digest(state.as_bytes());
        format!("{}{}", self.flow_prefix, super::crypto::hex(&d[..8]))
    }

    pub fn set_flow(&self, flow: &FlowState) -> Option<HeaderValue> {
        let name = self.flow_cookie_name(&flow.state);
        let sealed = self.keys.seal(name.as_bytes(), &flow.encode());
        let max_age = ::cookie::time::Duration::seconds(self.flow_lifetime.as_secs() as i64);
        // SameSite=Lax: the provider sends the user back with a top-level GET.
        let b = self
            .builder(name, sealed, &self.flow_path)
            .max_age(max_age)
            .same_site(::cookie::SameSite::Lax);
        Self::line(b)
    }

    pub fn clear_flow(&self, state: &str) -> Option<HeaderValue> {
        self.expire(&self.flow_cookie_name(state), &self.flow_path)
    }

    /// Names of flow cookies the request carries (to cap them per client).
    pub fn flow_names<'a>(&'a self, jar: &'a CookieJar<'_>) -> impl Iterator<Item = &'a str> + 'a {
        jar.names().filter(|n| n.starts_with(&self.flow_prefix))
    }

    pub fn expire_flow_named(&self, name: &str) -> Option<HeaderValue> {
        self.expire(name, &self.flow_path)
    }

    /// When the login of the flow cookie `name` started; `None` if it cannot be read (another
    /// key, garbage): such a cookie can finish no login.
    pub fn flow_created_at(&self, jar: &CookieJar<'_>, name: &str) -> Option<u64> {
        let sealed = jar.get_bytes(name)?;
        let plain = self.keys.open(name.as_bytes(), sealed).ok()?;
        FlowState::decode(&plain).ok().map(|f| f.created_at)
    }

    /// Opens the flow cookie bound to `state`; `None` if absent, unreadable, or not for this state.
    pub fn open_flow(&self, jar: &CookieJar<'_>, state: &str) -> Option<FlowState> {
        let name = self.flow_cookie_name(state);
        let sealed = jar.get_bytes(&name)?;
        let plain = self.keys.open(name.as_bytes(), sealed).ok()?;
        let flow = FlowState::decode(&plain).ok()?;
        crate::config::secret::ct_eq(flow.state.as_bytes(), state.as_bytes()).then_some(flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CookieKey;
    use crate::session::Identity;

    fn cookies(max_chunks: usize) -> SessionCookies {
        store_cookies(max_chunks, false)
    }

    fn store_cookies(max_chunks: usize, holds_ref: bool) -> SessionCookies {
        let cfg = CookieConfig {
            name: "_p".into(),
            keys: vec![CookieKey([3; 32])],
            secure: false,
            domain: None,
            same_site: SameSite::Lax,
            flow_lifetime: Duration::from_secs(600),
        };
        SessionCookies::new(
            &cfg,
            ("https://idp.test", "app"),
            Duration::from_secs(3600),
            max_chunks,
            "/oauth2/callback",
            holds_ref,
        )
    }

    fn session(token_len: usize) -> Session {
        Session {
            id: [1; 16],
            created_at_ms: 0,
            expires_at: 1000,
            // Not base64url, so sealed at its length (see `packed`).
            access_token: "~".repeat(token_len),
            access_expires_at: 0,
            access_issued_at: 0,
            refresh_token: None,
            id_token: None,
            identity: Identity {
                sub: "s".into(),
                ..Default::default()
            },
            last_seen: 0,
        }
    }

    /// The `name=value` pairs a browser sends back for `s`'s `Set-Cookie` lines.
    fn cookie_pairs(c: &SessionCookies, s: &Session) -> Vec<String> {
        c.set_session(s, &CookieJar::default(), 10)
            .unwrap()
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .collect()
    }

    /// A `_p=` pair that looks sealed under `c`'s key (its head is a real one) but does not
    /// open: another session's value with one character of its ciphertext changed.
    fn forged(c: &SessionCookies, k: u8) -> String {
        let mut s = session(10);
        s.id = [k; 16];
        let mut pair = cookie_pairs(c, &s).remove(0).into_bytes();
        let mid = pair.len() / 2;
        pair[mid] = if pair[mid] == b'A' { b'B' } else { b'A' };
        String::from_utf8(pair).unwrap()
    }

    fn request_headers(set_cookies: &[HeaderValue]) -> HeaderMap {
        let pairs: Vec<String> = set_cookies
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .filter(|p| !p.ends_with('='))
            .collect();
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
        h
    }

    #[test]
    fn a_session_cookie_that_is_not_utf8_is_rejected_not_absent() {
        let c = cookies(8);
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_bytes(b"_p=\xff\xfeAAAA").unwrap());
        let cache = SessionCache::new(1 << 20);
        let opened = c.open_active(&CookieJar::parse(&h), 10, &cache, |_| None);
        assert!(matches!(opened, Err(CookieReject::Open(_))), "{opened:?}");
    }

    #[test]
    fn single_and_chunked_round_trip() {
        let c = cookies(8);
        for len in [10, 5000, 12000] {
            let s = session(len);
            let empty = HeaderMap::new();
            let lines = c.set_session(&s, &CookieJar::parse(&empty), 10).unwrap();
            assert_eq!(
                lines.len(),
                if len < 3000 { 1 } else { len / 2800 + 1 }.max(lines.len().min(1))
            );
            let h = request_headers(&lines);
            let got = c.open_session(&CookieJar::parse(&h), 10).unwrap().unwrap();
            assert_eq!(got, s);
        }
    }

    /// Cookies of the session's names that are not the session (planted under a longer
    /// path, which browsers send first, or from a sibling domain) do not hide it: it opens
    /// whichever comes first, and only when nothing opens is the first reading's rejection
    /// the answer.
    #[test]
    fn stray_cookies_of_the_sessions_names_do_not_hide_it() {
        let c = cookies(8);
        let cache = SessionCache::new(1 << 20);
        let pairs_of = |s: &Session| cookie_pairs(&c, s);
        let open = |pairs: &[String]| {
            let mut h = HeaderMap::new();
            h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
            let jar = CookieJar::parse(&h);
            let active = c
                .open_active(&jar, 10, &cache, |_| None)
                .map(|o| matches!(o, Some(Opened::Session(_))));
            (c.open_session(&jar, 10), active)
        };
        let small = session(10);
        let whole = pairs_of(&small);
        let stray = "_p=QUFBQUFB".to_string();
        for pairs in [
            vec![stray.clone(), whole[0].clone()],
            vec![whole[0].clone(), stray.clone()],
            vec![
                stray.clone(),
                "_p_0=QUFB".into(),
                "_p_1=QUFB".into(),
                whole[0].clone(),
            ],
            // Three forged values (each takes a turn): the whole name's bound.
            vec![
                forged(&c, 1),
                forged(&c, 2),
                forged(&c, 3),
                whole[0].clone(),
            ],
            // The same forged value many times is one reading.
            [
                vec![forged(&c, 1)],
                vec![forged(&c, 2); 6],
                vec![whole[0].clone()],
            ]
            .concat(),
        ] {
            assert_eq!(
                open(&pairs),
                (Ok(Some(small.clone())), Ok(true)),
                "{pairs:?}"
            );
        }
        let big = session(12000);
        let chunks = pairs_of(&big);
        let n = chunks.len();
        let with = |extra: &[&str], first: bool| -> Vec<String> {
            let extra = extra.iter().map(|e| e.to_string());
            match first {
                true => extra.chain(chunks.iter().cloned()).collect(),
                false => chunks.iter().cloned().chain(extra).collect(),
            }
        };
        let past_end = format!("_p_{n}=QUFBQUFB");
        for (what, pairs) in [
            ("a whole-name stray", with(&["_p=QUFBQUFB"], true)),
            ("a stray chunk 0 first", with(&["_p_0=QUFBQUFB"], true)),
            ("a stray chunk 1 last", with(&["_p_1=QUFBQUFB"], false)),
            ("a stray chunk past the end", with(&[&past_end], false)),
            (
                "a stray chunk far past the end",
                with(&["_p_9=QUFBQUFB"], true),
            ),
            ("a pile of whole-name strays", with(&["_p=QUFB"; 8], true)),
            (
                "three forged whole-name strays",
                with(&[&forged(&c, 1), &forged(&c, 2), &forged(&c, 3)], true),
            ),
            (
                "two strays past the end",
                with(&[&past_end, &format!("_p_{}=QUFB", n + 1)], false),
            ),
            ("two strays past the end, first", {
                let mut p = with(&[&past_end], true);
                p.insert(0, format!("_p_{}=QUFB", n + 1));
                p
            }),
            ("a stray chunk 0 before and after", {
                let mut p = with(&["_p_0=QUFBQUFB"], false);
                p.insert(0, "_p_0=QkJCQkJC".into());
                p
            }),
            ("a full-size stray chunk 0 first", {
                let full = format!("_p_0={}", "Q".repeat(CHUNK_SIZE));
                with(&[&full], true)
            }),
            ("a full-size stray chunk 1 last", {
                let full = format!("_p_1={}", "Q".repeat(CHUNK_SIZE));
                with(&[&full], false)
            }),
            ("a stray chunk 1 before, chunk 2 after", {
                let mut p = with(&["_p_2=QUFBQUFB"], false);
                p.insert(0, "_p_1=QkJCQkJC".into());
                p
            }),
        ] {
            assert_eq!(open(&pairs), (Ok(Some(big.clone())), Ok(true)), "{what}");
        }
        // Any two short strays among the chunks, before them or after, in range or past the
        // end (the gateway writes every chunk but the last at full size).
        for i in 0..n + 2 {
            for j in 0..n + 2 {
                for (i_first, j_first) in
                    [(true, true), (true, false), (false, true), (false, false)]
                {
                    let mut pairs = chunks.clone();
                    for (k, first) in [(i, i_first), (j, j_first)] {
                        let stray = format!("_p_{k}=QkJD{k}");
                        match first {
                            true => pairs.insert(0, stray),
                            false => pairs.push(stray),
                        }
                    }
                    assert_eq!(
                        open(&pairs),
                        (Ok(Some(big.clone())), Ok(true)),
                        "strays {i} ({i_first}) and {j} ({j_first})"
                    );
                }
            }
        }
        // Full-size strays (forged chunks): one at any index on either side, or one on each
        // side of the chunks at the same index.
        let full = |k: usize| format!("_p_{k}={}", "Q".repeat(CHUNK_SIZE));
        for k in 0..n + 2 {
            for (before, after) in [(true, false), (false, true), (true, true)] {
                let mut pairs = chunks.clone();
                if before {
                    pairs.insert(0, full(k));
                }
                if after {
                    pairs.push(full(k));
                }
                assert_eq!(
                    open(&pairs),
                    (Ok(Some(big.clone())), Ok(true)),
                    "full-size stray {k} ({before}, {after})"
                );
            }
        }
        // Another session's chunks split around this one's (a kept copy of one's own).
        let mut other = big.clone();
        other.id = [7; 16];
        let others = pairs_of(&other);
        for k in 0..others.len() - 1 {
            let pairs = [&others[..=k], &chunks[..], &others[k + 1..]].concat();
            assert_eq!(open(&pairs).0, Ok(Some(big.clone())), "split after {k}");
        }
        // Nothing that opens: the first reading's rejection.
        let none = open(&[stray.clone(), "_p=QkJCQkJC".into()]).0;
        assert!(matches!(none, Err(CookieReject::Open(_))), "{none:?}");
        let mut broken = chunks.clone();
        broken[1] = broken[1].replacen("_p_1=", "_p_1=A", 1);
        assert!(open(&broken).0.is_err());
    }

    #[test]
    fn an_ended_session_planted_beside_the_live_one_does_not_hide_it() {
        let c = cookies(8);
        let cache = SessionCache::new(1 << 20);
        let pair = |s: &Session| cookie_pairs(&c, s).remove(0);
        let live = session(10);
        let mut signed_out = session(10);
        signed_out.id = [9; 16];
        signed_out.identity.sub = "mallory".into();
        let ended = |s: &Session| (s.id == [9; 16]).then_some(CookieReject::Revoked);
        for pairs in [
            [pair(&signed_out), pair(&live)],
            [pair(&live), pair(&signed_out)],
        ] {
            let mut h = HeaderMap::new();
            h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
            let jar = CookieJar::parse(&h);
            let active = c.open_active(&jar, 10, &cache, ended);
            assert!(
                matches!(&active, Ok(Some(Opened::Session(s))) if s.identity.sub == live.identity.sub),
                "{active:?}"
            );
            let opened = c.open(&jar, 10, ended);
            assert!(
                matches!(&opened, Ok(Some(CookieValue::Full(s))) if s.id == live.id),
                "{opened:?}"
            );
        }
        // Alone, the ended session is refused, and says why.
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&pair(&signed_out)).unwrap());
        let jar = CookieJar::parse(&h);
        assert_eq!(
            c.open_active(&jar, 10, &cache, ended).err(),
            Some(CookieReject::Revoked)
        );
    }

    #[test]
    fn chunks_reassemble_in_any_order_and_only_under_their_own_names() {
        let c = cookies(8);
        let s = session(12000);
        let lines = c.set_session(&s, &CookieJar::default(), 10).unwrap();
        let pairs: Vec<String> = lines
            .iter()
            .map(|v| v.to_str().unwrap().split(';').next().unwrap().to_string())
            .collect();
        assert!(pairs.len() >= 3, "{}", pairs.len());
        let open = |pairs: &[String]| {
            let mut h = HeaderMap::new();
            h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
            let opened = c.open_session(&CookieJar::parse(&h), 10);
            opened
        };
        let mut reversed = pairs.clone();
        reversed.reverse();
        assert_eq!(open(&reversed), Ok(Some(s.clone())));
        // A chunk sent twice (the same cookie under two paths) is still the session.
        let mut twice = pairs.clone();
        twice.push(pairs[0].clone());
        assert_eq!(open(&twice), Ok(Some(s.clone())));
        // "_p_01" is not the name of chunk 1.
        let mut padded = pairs.clone();
        padded[1] = padded[1].replacen("_p_1=", "_p_01=", 1);
        assert_eq!(open(&padded), Err(CookieReject::Oversize));
        // The whole value under chunk 0's name, with an empty chunk 1: a lone chunk, refused
        // like one.
        let whole = c
            .set_session(&session(10), &CookieJar::default(), 10)
            .unwrap();
        let whole = whole[0].to_str().unwrap().split(';').next().unwrap();
        let disguised = [whole.replacen("_p=", "_p_0=", 1), "_p_1=".to_string()];
        assert_eq!(
            open(&disguised),
            Err(CookieReject::Decode(DecodeError::Malformed))
        );
        assert_eq!(
            open(&disguised[..1]),
            Err(CookieReject::Decode(DecodeError::Malformed))
        );
    }

    /// `limits.max_cookie_chunks` is a limit the session may reach: one that takes exactly
    /// that many chunks is written, fits, and opens.
    #[test]
    fn a_session_of_exactly_the_chunk_limit_round_trips() {
        let c = cookies(2);
        let s = session(5000);
        assert!(c.fits(&s, 10));
        let lines = c.set_session(&s, &CookieJar::default(), 10).unwrap();
        assert_eq!(lines.len(), 2);
        let h = request_headers(&lines);
        assert_eq!(c.open_session(&CookieJar::parse(&h), 10), Ok(Some(s)));
    }

    /// Strays beside a session of an exact multiple of the chunk size (its last chunk full
    /// too), short garbage of the whole name, and a whole value under a chunk's name.
    #[test]
    fn strays_beside_full_last_chunks_short_garbage_and_lone_chunks() {
        let c = cookies(8);
        let pairs_of = |s: &Session| cookie_pairs(&c, s);
        let open = |pairs: &[String]| {
            let mut h = HeaderMap::new();
            h.insert(COOKIE, HeaderValue::from_str(&pairs.join("; ")).unwrap());
            let opened = c.open_session(&CookieJar::parse(&h), 10);
            opened
        };
        let exact = (4000..7000)
            .map(session)
            .find(|s| {
                let p = pairs_of(s);
                p.len() == 2 && p.iter().all(|l| l.len() == "_p_0=".len() + CHUNK_SIZE)
            })
            .expect("a session of exactly two full chunks");
        let chunks = pairs_of(&exact);
        let full_stray = format!("_p_2={}", "Q".repeat(CHUNK_SIZE));
        for pairs in [
            [chunks.clone(), vec![full_stray.clone()]].concat(),
            [vec![full_stray.clone()], chunks.clone()].concat(),
            vec![chunks[0].clone(), full_stray.clone(), chunks[1].clone()],
        ] {
            assert_eq!(open(&pairs), Ok(Some(exact.clone())));
        }
        // Short garbage of the whole name is no reading: any number of it.
        let small = session(10);
        let whole = pairs_of(&small);
        let garbage: Vec<String> = ["a", "b", "c", "d", "e", "f"]
            .iter()
            .map(|v| format!("_p={v}"))
            .collect();
        assert_eq!(
            open(&[garbage, whole.clone()].concat()),
            Ok(Some(small.clone()))
        );
        // A whole value under `_0`, with a junk `_1`: still no session.
        let moved = whole[0].replacen("_p=", "_p_0=", 1);
        assert!(open(&[moved, "_p_1=x".into()]).is_err());
    }

    /// Each store opens its own kind of cookie only: a reference is no session to the cookie
    /// store, a whole session none to the Redis store (which could never end it).
    #[test]
    fn each_store_refuses_the_others_cookie() {
        let (in_cookie, in_redis) = (cookies(8), store_cookies(8, true));
        let open = |c: &SessionCookies, lines: &[HeaderValue]| {
            c.open(&CookieJar::parse(&request_headers(lines)), 10, |_| None)
        };
        let reference = in_redis.set_ref(&[7; 16], 1000, &CookieJar::default(), 10);
        assert!(matches!(
            open(&in_redis, &reference),
            Ok(Some(CookieValue::Ref(_)))
        ));
        assert_eq!(open(&in_cookie, &reference), Err(NOT_THIS_STORE));
        let whole = in_cookie
            .set_session(&session(10), &CookieJar::default(), 10)
            .unwrap();
        assert!(matches!(
            open(&in_cookie, &whole),
            Ok(Some(CookieValue::Full(_)))
        ));
        assert_eq!(open(&in_redis, &whole), Err(NOT_THIS_STORE));
    }

    /// A value longer than the chunks could hold is refused before it is decoded.
    #[test]
    fn values_over_the_chunk_limit_are_refused_unopened() {
        let c = cookies(2);
        let over = "A".repeat(2 * CHUNK_SIZE + 4);
        assert_eq!(c.unseal(over.as_bytes(), 10), Err(CookieReject::Oversize));
        let most = "A".repeat(2 * CHUNK_SIZE);
        assert_ne!(c.unseal(most.as_bytes(), 10), Err(CookieReject::Oversize));
    }

    #[test]
    fn the_gateways_cookies_are_known_under_any_prefix() {
        let c = cookies(8);
        for ours in [
            "_p",
            "_p_0",
            "_p_12",
            "_p_flow_abc",
            "__Host-_p",
            "__Host-_p_1",
            "__Secure-_p_flow_abc",
            "__Host-_p_flow_x",
        ] {
            assert!(c.is_ours(ours), "{ours}");
        }
        for other in [
            "_pp", "_p_", "_p_x", "p", "__Host-p", "_p_1a", "session", "__Host-",
        ] {
            assert!(!c.is_ours(other), "{other}");
        }
    }

    #[test]
    fn a_whole_value_longer_than_a_chunk_is_oversize() {
        let c = cookies(8);
        let mut h = HeaderMap::new();
        let value = format!("_p={}", "A".repeat(CHUNK_SIZE + 1));
        h.insert(COOKIE, HeaderValue::from_str(&value).unwrap());
        assert_eq!(
            c.open_session(&CookieJar::parse(&h), 10),
            Err(CookieReject::Oversize)
        );
    }

    #[test]
    fn too_many_chunks_rejected() {
        let c = cookies(2);
        assert!(c
            .set_session(&session(12000), &CookieJar::default(), 10)
            .is_none());
        let mut h = HeaderMap::new();
        let many: Vec<String> = (0..50).map(|i| format!("_p_{i}=x")).collect();
        h.insert(COOKIE, HeaderValue::from_str(&many.join("; ")).unwrap());
        assert_eq!(
            c.open_session(&CookieJar::parse(&h), 10),
            Err(CookieReject::Oversize)
        );
    }

    #[test]
    fn clearing_is_bounded_by_the_chunk_limit() {
        let c = cookies(8);
        // 3,000 chunk-like cookies, a duplicate, and names the gateway never sets.
        let mut v: String = (0..3000).map(|i| format!("_p_{i}=a; ")).collect();
        v.push_str("_p_1=dup; _p_01=x; _p_+2=x; _p_=x; other=1");
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(&v).unwrap());
        let jar = CookieJar::parse(&h);
        let lines = c.clear_session(&jar);
        let names: Vec<&str> = lines
            .iter()
            .map(|l| l.to_str().unwrap().split('=').next().unwrap())
            .collect();
        // Every chunk some configuration could have set (a lower limit leaves older ones);
        // not the whole cookie, which the request did not carry.
        let want: Vec<String> = (0..MAX_CHUNKS).map(|i| format!("_p_{i}")).collect();
        assert_eq!(names, want);
        // Storing a session clears the chunks it does not use, within the same bound.
        let stored = c.set_session(&session(10), &jar, 10).unwrap();
        assert!(stored.len() <= 1 + MAX_CHUNKS, "{}", stored.len());
    }

    /// Only what the request carried is expired: a request without the gateway's cookies (a
    /// cross-site post, which SameSite keeps them from) cannot make the browser drop them.
    #[test]
    fn clearing_expires_only_the_cookies_sent() {
        let c = cookies(8);
        let clear = |cookie: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(COOKIE, HeaderValue::from_static(cookie));
            let lines = c.clear_session(&CookieJar::parse(&h));
            lines
                .iter()
                .map(|l| l.to_str().unwrap().split('=').next().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        assert!(clear("other=1").is_empty());
        assert!(c.clear_session(&CookieJar::default()).is_empty());
        assert_eq!(clear("_p=x; other=1"), ["_p"]);
    }

    #[test]
    fn stale_chunks_cleared() {
        let c = cookies(8);
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_static("_p_0=a; _p_1=b; other=1"));
        let lines = c
            .set_session(&session(10), &CookieJar::parse(&h), 10)
            .unwrap();
        let text: Vec<&str> = lines.iter().map(|v| v.to_str().unwrap()).collect();
        assert!(text.iter().any(|l| l.starts_with("_p_0=;")), "{text:?}");
        assert!(text.iter().any(|l| l.starts_with("_p_1=;")), "{text:?}");
        assert!(!text.iter().any(|l| l.starts_with("other")));
    }

    #[test]
    fn expired_session_rejected() {
        let c = cookies(8);
        let lines = c
            .set_session(&session(10), &CookieJar::default(), 10)
            .unwrap();
        let h = request_headers(&lines);
        assert_eq!(
            c.open_session(&CookieJar::parse(&h), 1000),
            Err(CookieReject::Expired)
        );
    }

    #[test]
    fn flow_cookies_are_not_chunks() {
        let c = cookies(8);
        let mut h = HeaderMap::new();
        h.insert(
            COOKIE,
            HeaderValue::from_static("_p_flow_ab=x; _p_flow_cd=y"),
        );
        assert_eq!(c.open_session(&CookieJar::parse(&h), 10), Ok(None));
        assert!(c
            .clear_session(&CookieJar::parse(&h))
            .iter()
            .all(|v| !v.to_str().unwrap().contains("flow")));
    }

    #[test]
    fn ours() {
        let c = cookies(8);
        assert!(c.is_ours("_p") && c.is_ours("_p_0") && c.is_ours("_p_flow_ab"));
        assert!(!c.is_ours("_p_x") && !c.is_ours("_px") && !c.is_ours("other"));
    }

    #[test]
    fn flow_bound_to_state() {
        let c = cookies(8);
        let f = FlowState {
            state: "st".into(),
            nonce: "n".into(),
            pkce_verifier: "v".into(),
            return_to: "/x".into(),
            created_at: 1,
        };
        let line = c.set_flow(&f).unwrap();
        let h = request_headers(&[line]);
        let jar = CookieJar::parse(&h);
        assert_eq!(c.open_flow(&jar, "st"), Some(f));
        assert_eq!(c.open_flow(&jar, "other"), None);
    }
}
