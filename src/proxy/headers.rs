//! Header hygiene, as pure functions: hop-by-hop removal, spoofed-identity stripping,
//! the gateway's cookies kept from the upstream, identity and X-Forwarded-* injection.

use crate::config::HeaderConfig;
use crate::session::Session;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// RFC 9110 §7.6.1 connection-specific headers, plus the legacy ones proxies still see
/// (a `match` on the name: a length check rejects most headers at once).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            // RFC 9113 §3.2.1 (HTTP/1.1's upgrade to h2c): connection-specific.
            | "http2-settings"
    )
}

/// The comma-separated tokens of a header value (`Connection`, `Transfer-Encoding`), trimmed.
pub fn tokens(v: &HeaderValue) -> impl Iterator<Item = &[u8]> {
    v.as_bytes().split(|&b| b == b',').map(|t| t.trim_ascii())
}

/// Does the header value list `token` (any case)?
pub fn has_token(v: &HeaderValue, token: &str) -> bool {
    tokens(v).any(|t| t.eq_ignore_ascii_case(token.as_bytes()))
}

/// The largest response head passed on from the upstream (nginx's `proxy_buffer_size` is
/// 4–8 KB). hyper's client refuses only a head that does not fit its read buffer, and one read
/// may bring in more than the buffer's bound: over 64 KiB, a head passed or not by timing.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Makes an upstream's response headers fit for the client: hop-by-hop headers go, and so
/// does a `Set-Cookie` for one of the gateway's own cookies. The app never sees those
/// cookies; nor may it (or a header injected into its answers) replace or clear a user's
/// session (`Clear-Site-Data: "cookies"`), or plant one of its choosing. The body's length is
/// restated as the body was framed (RFC 9112 §6.3): a `Content-Length` beside
/// `Transfer-Encoding` goes, repeated ones become one. Err: the upstream applied a transfer
/// coding besides chunked, which the gateway cannot undo (and the client would not know of),
/// or its head is over [`MAX_RESPONSE_HEAD`].
pub fn sanitize_response(
    h: &mut HeaderMap,
    is_ours: impl Fn(&str) -> bool,
) -> Result<(), &'static str> {
    // The header lines as sent: `name: value` and the line end.
    let head: usize = h.iter().map(|(n, v)| n.as_str().len() + v.len() + 4).sum();
    if head > MAX_RESPONSE_HEAD {
        return Err("the upstream's response head is over 64 KiB");
    }
    let seen = Seen::scan(h, None);
    if seen.foreign_coding {
        return Err("the upstream's Transfer-Encoding names a coding besides chunked");
    }
    if seen.transfer_encoding && seen.lengths > 0 {
        h.remove(header::CONTENT_LENGTH);
    } else if seen.lengths > 1 || seen.length_list {
        // hyper took the response only if every value agreed: keep one.
        let one = h
            .get(header::CONTENT_LENGTH)
            .and_then(|v| tokens(v).next())
            .and_then(|t| HeaderValue::from_bytes(t).ok());
        h.remove(header::CONTENT_LENGTH);
        if let Some(v) = one {
            h.insert(header::CONTENT_LENGTH, v);
        }
    }
    seen.strip(h, false, None);
    keep_session(h, &seen, is_ours);
    Ok(())
}

/// The head of an upstream's `101` that completed a websocket handshake: the same hygiene as
/// [`sanitize_response`], but `Upgrade` and `Connection: upgrade` stay (the client's end of the
/// tunnel needs them), and a switch has no body to frame.
pub fn sanitize_switch(h: &mut HeaderMap, is_ours: impl Fn(&str) -> bool) {
    let seen = Seen::scan(h, None);
    seen.strip(h, true, None);
    h.remove(header::CONTENT_LENGTH);
    keep_session(h, &seen, is_ours);
}

/// What no answer of the app's may do to the gateway's session: set or clear its cookies.
fn keep_session(h: &mut HeaderMap, seen: &Seen, is_ours: impl Fn(&str) -> bool) {
    if seen.set_cookie {
        strip_set_cookies(h, &is_ours);
    }
    if seen.clear_site_data {
        keep_session_cookies(h);
    }
}

/// `Clear-Site-Data` without `"cookies"` (which would clear the gateway's session cookie) and
/// with `"*"` narrowed to what else it covers.
fn keep_session_cookies(h: &mut HeaderMap) {
    let mut kept: Vec<&[u8]> = Vec::new();
    let mut dropped = false;
    for v in h.get_all(CLEAR_SITE_DATA) {
        for t in tokens(v).filter(|t| !t.is_empty()) {
            match t {
                b"\"cookies\"" => dropped = true,
                b"\"*\"" => {
                    dropped = true;
                    kept.extend([&b"\"cache\""[..], b"\"storage\"", b"\"executionContexts\""]);
                }
                other => kept.push(other),
            }
        }
    }
    if !dropped {
        return;
    }
    let value = kept.join(&b", "[..]);
    let value = HeaderValue::from_bytes(&value).ok();
    h.remove(CLEAR_SITE_DATA);
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        h.insert(CLEAR_SITE_DATA, v);
    }
    tracing::warn!(
        "the upstream's Clear-Site-Data for cookies dropped (it would end the gateway's session)"
    );
}

pub const CLEAR_SITE_DATA: HeaderName = HeaderName::from_static("clear-site-data");

/// Drops the `Set-Cookie` lines that name one of the gateway's cookies (the name as a browser
/// reads it: up to the first `=` of the first `;`-part, trimmed). A nameless cookie
/// (`=_portcullis=v`) counts by what follows: a browser that keeps it sends back
/// `_portcullis=v`.
pub fn strip_set_cookies(h: &mut HeaderMap, is_ours: impl Fn(&str) -> bool) {
    fn named(pair: &[u8]) -> Option<(&[u8], &[u8])> {
        memchr::memchr(b'=', pair).map(|i| (pair[..i].trim_ascii(), &pair[i + 1..]))
    }
    let ours = |v: &&HeaderValue| {
        let line = v.as_bytes();
        let pair = memchr::memchr(b';', line).map_or(line, |i| &line[..i]);
        let name = match named(pair) {
            Some((b"", rest)) => named(rest).map(|(n, _)| n),
            Some((name, _)) => Some(name),
            None => None,
        };
        name.and_then(|n| std::str::from_utf8(n).ok())
            .is_some_and(&is_ours)
    };
    if !h.get_all(header::SET_COOKIE).iter().any(|v| ours(&v)) {
        return;
    }
    let kept: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !ours(v))
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for v in kept {
        h.append(header::SET_COOKIE, v);
    }
    tracing::warn!("the upstream's Set-Cookie for a cookie of the gateway's dropped");
}

/// What the request headers became in [`sanitize_request`].
#[derive(Debug)]
pub struct Sanitized {
    /// An HTTP/1.1 upgrade (websocket) is being forwarded.
    pub upgrading: bool,
    /// The client's Host header, if it sent one.
    pub host: Option<HeaderValue>,
    /// What a trusted proxy in front said (empty unless `trusted_hop`).
    pub prior: PriorHop,
    /// The client sent `Accept` (every browser navigation does).
    pub accept: bool,
}

/// Makes a client's request headers fit for the upstream: hop-by-hop headers (and those
/// `Connection` names), every spoofable name and the gateway's own cookies go. One pass over
/// the headers finds what is there; only that is then looked up or removed. `can_switch`:
/// whether the client's connection could be switched to another protocol (asked only of a
/// request that asks for a websocket).
pub fn sanitize_request(
    h: &mut HeaderMap,
    can_switch: impl FnOnce() -> bool,
    trusted_hop: bool,
    spoofable: &Spoofable,
    is_ours: impl Fn(&str) -> bool,
) -> Sanitized {
    let seen = Seen::scan(h, Some(spoofable));
    // Websockets only: an upstream that took `Upgrade: h2c` (or any other protocol) would
    // hand the client a raw connection to send it any request, past every route and with any
    // identity header.
    let upgrading = seen.upgrade && !seen.other_protocol && seen.connection_upgrade && can_switch();
    // Read before the strip: these names are spoofable.
    let prior = if trusted_hop {
        PriorHop::read(h)
    } else {
        PriorHop::default()
    };
    seen.strip(h, upgrading, Some(spoofable));
    if seen.cookie {
        strip_cookies(h, is_ours);
    }
    Sanitized {
        upgrading,
        // `Connection` cannot name Host away (see `remove_listed`).
        host: seen.host,
        prior,
        accept: seen.accept,
    }
}

/// What one pass over a header map found, for [`Seen::strip`].
#[derive(Default)]
struct Seen {
    connection: bool,
    /// `Connection` lists more than `keep-alive` and `upgrade`, which the pass removes anyway.
    names_others: bool,
    connection_upgrade: bool,
    upgrade: bool,
    /// `Upgrade` asks for something besides `websocket` (as `h2c`).
    other_protocol: bool,
    cookie: bool,
    set_cookie: bool,
    transfer_encoding: bool,
    /// `Transfer-Encoding` names a coding besides `chunked`.
    foreign_coding: bool,
    /// How many `Content-Length` lines, and whether one holds a list (`5, 5`).
    lengths: u8,
    length_list: bool,
    clear_site_data: bool,
    accept: bool,
    /// Some hop-by-hop or spoofable name is present.
    doomed: bool,
    host: Option<HeaderValue>,
}

impl Seen {
    fn scan(h: &HeaderMap, spoofable: Option<&Spoofable>) -> Self {
        let mut seen = Seen::default();
        for (name, value) in h {
            if *name == header::CONNECTION {
                seen.connection = true;
                for token in tokens(value) {
                    if token.eq_ignore_ascii_case(b"upgrade") {
                        seen.connection_upgrade = true;
                    } else if !token.eq_ignore_ascii_case(b"keep-alive") {
                        seen.names_others = true;
                    }
                }
            } else if *name == header::UPGRADE {
                seen.upgrade = true;
                seen.other_protocol |= !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"websocket");
            } else if *name == header::HOST {
                seen.host.get_or_insert_with(|| value.clone());
            } else if *name == header::COOKIE {
                seen.cookie = true;
            } else if *name == header::SET_COOKIE {
                seen.set_cookie = true;
            } else if *name == header::CONTENT_LENGTH {
                seen.lengths = seen.lengths.saturating_add(1);
                seen.length_list |= value.as_bytes().contains(&b',');
            } else if *name == header::TRANSFER_ENCODING {
                seen.transfer_encoding = true;
                seen.foreign_coding |=
                    tokens(value).any(|t| !t.is_empty() && !t.eq_ignore_ascii_case(b"chunked"));
                seen.doomed = true;
            } else if *name == CLEAR_SITE_DATA {
                seen.clear_site_data = true;
            } else if *name == header::ACCEPT {
                seen.accept = true;
            } else if is_hop_by_hop(name) || spoofable.is_some_and(|s| s.matches(name)) {
                seen.doomed = true;
            }
        }
        seen
    }

    /// Removes what `scan` found that must not pass (usually nothing: then no lookup at all).
    fn strip(&self, h: &mut HeaderMap, upgrading: bool, spoofable: Option<&Spoofable>) {
        if self.names_others {
            remove_listed(h, upgrading, spoofable.map(|s| &s.request_id));
        }
        if self.connection {
            h.remove(header::CONNECTION);
        }
        if self.doomed || (self.upgrade && !upgrading) {
            let doomed: Vec<HeaderName> = h
                .keys()
                .filter(|k| {
                    is_hop_by_hop(k)
                        || (!upgrading && *k == header::UPGRADE)
                        || spoofable.is_some_and(|s| s.matches(k))
                })
                .cloned()
                .collect();
            for n in doomed {
                h.remove(n);
            }
        }
        if upgrading {
            h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
    }
}

/// Removes the headers that `Connection` names, except `keep`: the gateway's own request id,
/// already set when this runs (a client listing it must not leave the upstream without one);
/// and never `Host`, which is end to end: the routes were matched on it, and an upstream that
/// picks a site by name must see the same one (not the upstream's own authority, which the
/// gateway would put in its place).
fn remove_listed(h: &mut HeaderMap, upgrading: bool, keep: Option<&HeaderName>) {
    // The names Connection lists go too. Its values are cloned (they share their bytes, and
    // there is rarely more than one) so that the map can change while they are read.
    let mut listed = h.get_all(header::CONNECTION).iter();
    let first = listed.next().cloned();
    let more: Vec<HeaderValue> = listed.cloned().collect();
    for value in first.iter().chain(&more) {
        for token in tokens(value) {
            if upgrading && token.eq_ignore_ascii_case(b"upgrade") {
                continue;
            }
            if token.eq_ignore_ascii_case(b"host")
                || keep.is_some_and(|k| token.eq_ignore_ascii_case(k.as_str().as_bytes()))
            {
                continue;
            }
            // By `&str`: no name is built (what is not a valid name is in no map).
            if let Ok(name) = std::str::from_utf8(token) {
                h.remove(name);
            }
        }
    }
}

/// The identity and forwarding names a client may never set, besides `Authorization`,
/// `Forwarded` and the configured identity names. The forwarding ones go whoever sent them
/// (a trusted proxy's X-Forwarded-For/Proto/Host are read first, and set again by the
/// gateway): frameworks build URLs or route from them (Spring and ASP.NET from
/// X-Forwarded-Prefix, Symfony and IIS's URL rewrite from X-Original-URL / X-Rewrite-URL).
pub const SPOOFABLE_NAMES: [&str; 33] = [
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-groups",
    "x-forwarded-preferred-username",
    "x-forwarded-access-token",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-auth-request-groups",
    "x-auth-request-preferred-username",
    "x-auth-request-access-token",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-uri",
    "x-original-url",
    "x-original-uri",
    "x-rewrite-url",
    "x-real-ip",
    // Others that frameworks and apps believe about the scheme, host or client address.
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-url-scheme",
    "front-end-https",
    "x-original-host",
    "x-host",
    "x-client-ip",
    "true-client-ip",
    "x-cluster-client-ip",
    // What a forward-auth proxy says of the original request: for the gateway only.
    "x-forwarded-method",
    "x-original-method",
];

/// The prefix of forward-auth's answer headers (oauth2-proxy's, and the gateway's own).
const AUTH_REQUEST: &[u8] = b"x-auth-request-";

/// Headers that frame or route a request, whose other spellings a client must not pass on
/// (`Content_Length`, `Transfer.Encoding`, `Keep_Alive`…): servers that give `_` and `-` the same
/// variable (Puma before 6.4.3 among them) would read the client's value as the real header,
/// a request the upstream frames differently than the gateway did, on a pooled connection that
/// carries other users' requests next.
const FRAMING_NAMES: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "expect",
];

/// The names a client must never be able to set: the identity headers, the bearer,
/// and the forwarding headers the gateway sets itself.
#[derive(Debug, Clone)]
pub struct Spoofable {
    /// The names by length: a client's name is compared only with those as long as it.
    by_length: Vec<Vec<Box<[u8]>>>,
    /// The gateway's request-id header (`headers.request_id`). Not spoofable (a plain client id
    /// is kept), but set by the gateway before the strip: `Connection` cannot name it away.
    /// The other names the gateway sets (identity, `Authorization`, `X-Forwarded-*`, `Host`)
    /// are set after the strip.
    request_id: HeaderName,
}

impl Spoofable {
    pub fn new(cfg: &HeaderConfig) -> Self {
        let names = [
            header::AUTHORIZATION,
            header::FORWARDED,
            cfg.user.clone(),
            cfg.email.clone(),
            cfg.groups.clone(),
            cfg.preferred_username.clone(),
        ]
        .into_iter()
        .chain(SPOOFABLE_NAMES.map(HeaderName::from_static));
        let mut by_length: Vec<Vec<Box<[u8]>>> = Vec::new();
        for name in names {
            let name = name.as_str().as_bytes();
            if by_length.len() <= name.len() {
                by_length.resize(name.len() + 1, Vec::new());
            }
            let same_length = &mut by_length[name.len()];
            if !same_length.iter().any(|n| **n == *name) {
                same_length.push(name.into());
            }
        }
        Self {
            by_length,
            request_id: cfg.request_id.clone(),
        }
    }

    /// Is this a spoofable name? Header names are already lower-case; `_`, `-` and the other
    /// punctuation are compared as the same (see `same_dashed`). Another spelling of a header
    /// that frames or routes the request (`Content_Length`, `Transfer.Encoding`) goes too.
    fn matches(&self, name: &HeaderName) -> bool {
        let k = name.as_str().as_bytes();
        // The length first, then the bytes: most names fail at once.
        self.by_length
            .get(k.len())
            .is_some_and(|names| names.iter().any(|n| same_dashed(k, n)))
            || FRAMING_NAMES
                .iter()
                .any(|n| n.len() == k.len() && same_dashed(k, n.as_bytes()) && k != n.as_bytes())
            // Every `X-Auth-Request-*`: what a forward-auth gateway tells its proxy (and the
            // proxy may pass on, as `-Redirect`), never a client's to say.
            || (k.len() > AUTH_REQUEST.len() && same_dashed(&k[..AUTH_REQUEST.len()], AUTH_REQUEST))
    }
}

/// Header-name equality where `-`, `_` and every other character that is not a letter or a
/// digit count as the same, either way round. CGI-style servers give such names one variable
/// (`HTTP_X_REMOTE_USER`: Apache, PHP and WSGI servers make `-` a `_`, lighttpd every such
/// character), so a configured `X_Remote_User` is spoofed by a client's `X-Remote-User` as
/// much as the reverse, and `X.Remote.User` spoofs both (nginx and gunicorn drop names with
/// `_` by default, so the app would see the client's alone).
pub fn same_dashed(client: &[u8], ours: &[u8]) -> bool {
    let dash = |b: u8| if b.is_ascii_alphanumeric() { b } else { b'-' };
    client.len() == ours.len() && client.iter().zip(ours).all(|(&c, &o)| dash(c) == dash(o))
}

/// Drops the gateway's own cookies from the `Cookie` header(s); the rest pass unchanged, in
/// one `Cookie` header: an HTTP/2 client sends a line per cookie, which must be joined with
/// `; ` for an HTTP/1.1 upstream (RFC 9113 §8.2.3; many servers read the first line only).
pub fn strip_cookies(h: &mut HeaderMap, is_ours: impl Fn(&str) -> bool) {
    // Bytes, not &str: other cookies may carry UTF-8 and must pass unchanged.
    fn name(pair: &[u8]) -> &[u8] {
        let n = memchr::memchr(b'=', pair).map_or(pair, |i| &pair[..i]);
        n.trim_ascii()
    }
    // memchr-split: cookie headers are long (the session alone is ~1.5 KB).
    fn pairs(v: &[u8]) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        memchr::memchr_iter(b';', v)
            .chain(std::iter::once(v.len()))
            .map(move |end| {
                let p = &v[start..end];
                start = end + 1;
                p
            })
    }
    let ours = |pair: &[u8]| std::str::from_utf8(name(pair)).is_ok_and(&is_ours);
    // One pass: what is kept is copied as it goes, and used only if something was dropped.
    let mut kept: Vec<u8> = Vec::new();
    let mut dropped = false;
    let mut lines = 0;
    for v in h.get_all(header::COOKIE) {
        lines += 1;
        for pair in pairs(v.as_bytes()) {
            let pair = pair.trim_ascii();
            if pair.is_empty() {
                continue;
            }
            if ours(pair) {
                dropped = true;
                continue;
            }
            if !kept.is_empty() {
                kept.extend_from_slice(b"; ");
            }
            kept.extend_from_slice(pair);
        }
    }
    if !dropped && lines < 2 {
        return;
    }
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_bytes(&kept) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Sets an identity header, if `value` can be one (see [`identity_value`]).
pub fn put(h: &mut HeaderMap, name: &HeaderName, value: &str) {
    if let Some(v) = identity_value(value) {
        h.insert(name.clone(), v);
    }
}

/// A claim as an identity header value. Claims with characters a header cannot carry are left
/// out rather than mangled, and so are claims with blanks at either end: the app's HTTP parser
/// drops those (RFC 9112 §5.1), so the user ` admin` would reach it as `admin`.
pub fn identity_value(value: &str) -> Option<HeaderValue> {
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let bytes = value.as_bytes();
    if bytes.first().is_some_and(blank) || bytes.last().is_some_and(blank) {
        return None;
    }
    HeaderValue::from_str(value).ok()
}

/// The groups header value: names joined by commas, a comma, `%`, control character or
/// non-ASCII byte inside a name percent-encoded (`%2C`, `%25`, UTF-8 bytes as `%C3%84`…) so
/// that an app splitting on commas sees the real groups (`cn=a,ou=b` is one group, not two)
/// and no group can make the header unsendable. Spaces at either end of a name are encoded
/// too (`%20admins`): a list parser trims them, and ` admins` is not `admins`.
pub fn groups_value(groups: &[String]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(groups.iter().map(|g| g.len() + 1).sum());
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let bytes = g.as_bytes();
        let inner = g.trim_start_matches(' ').len();
        let (start, end) = (bytes.len() - inner, g.trim_end_matches(' ').len());
        for (j, &b) in bytes.iter().enumerate() {
            let edge = b == b' ' && (j < start || j >= end);
            if edge || b == b',' || b == b'%' || !(b' '..=b'~').contains(&b) {
                let _ = write!(out, "%{b:02X}");
            } else {
                out.push(char::from(b));
            }
        }
    }
    out
}

/// `Bearer <token>` as a header value, built in one buffer (no intermediate String copy of
/// tokens that can be kilobytes long). A token a header cannot carry gives `None`.
pub fn bearer_value(token: &str) -> Option<HeaderValue> {
    let mut buf = bytes::BytesMut::with_capacity(7 + token.len());
    buf.extend_from_slice(b"Bearer ");
    buf.extend_from_slice(token.as_bytes());
    let mut v = HeaderValue::from_maybe_shared(buf.freeze()).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// The bearer and the identity headers for an authenticated request (built once per session).
pub fn identity_headers(s: &Session, cfg: &HeaderConfig) -> Vec<(HeaderName, HeaderValue)> {
    let mut out = Vec::with_capacity(5);
    if cfg.pass_access_token {
        if let Some(v) = bearer_value(&s.access_token) {
            out.push((header::AUTHORIZATION, v));
        }
    }
    let mut put = |name: &HeaderName, value: &str| {
        if let Some(v) = identity_value(value) {
            out.push((name.clone(), v));
        }
    };
    put(&cfg.user, s.user(cfg));
    if let Some(e) = s.email(cfg.unverified_email) {
        put(&cfg.email, e);
    }
    if !s.identity.groups.is_empty() {
        put(&cfg.groups, &groups_value(&s.identity.groups));
    }
    if let Some(u) = &s.identity.preferred_username {
        put(&cfg.preferred_username, u);
    }
    out
}

/// Adds headers built by [`identity_headers`], replacing any of the same name.
pub fn inject_identity(h: &mut HeaderMap, headers: &[(HeaderName, HeaderValue)]) {
    for (name, value) in headers {
        h.insert(name.clone(), value.clone());
    }
}

/// What a trusted proxy in front of the gateway said about the original request.
#[derive(Debug, Default)]
pub struct PriorHop {
    xff: Option<HeaderValue>,
    proto: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

impl PriorHop {
    /// Reads the forwarding headers; call only for a connection from a trusted proxy.
    pub fn read(h: &HeaderMap) -> Self {
        Self {
            xff: joined(h, "x-forwarded-for"),
            proto: single(h, "x-forwarded-proto")
                .filter(|v| *v == "http" || *v == "https")
                .cloned(),
            // The upstream may pick its site by it.
            host: single(h, "x-forwarded-host")
                .filter(|v| crate::policy::routes::valid_forwarded_host(v.as_bytes()))
                .cloned(),
        }
    }
}

/// A header sent exactly once. Two lines of a single-valued forwarding header are ambiguous
/// (a proxy that adds its line after the client's): neither is believed.
pub fn single<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a HeaderValue> {
    let mut all = h.get_all(name).iter();
    let first = all.next()?;
    all.next().is_none().then_some(first)
}

/// A list header's lines as one comma-separated value (RFC 9110 §5.3), e.g. X-Forwarded-For
/// from a proxy that adds its own line instead of extending the client's.
fn joined(h: &HeaderMap, name: &str) -> Option<HeaderValue> {
    let mut all = h.get_all(name).iter();
    let first = all.next()?;
    let Some(second) = all.next() else {
        return Some(first.clone());
    };
    let mut out = first.as_bytes().to_vec();
    for v in std::iter::once(second).chain(all) {
        out.extend_from_slice(b", ");
        out.extend_from_slice(v.as_bytes());
    }
    HeaderValue::from_bytes(&out).ok()
}

/// Sets X-Forwarded-For/Proto/Host: from what the gateway itself saw, extended with what a
/// trusted proxy said (`prior`); anything else a client sent was stripped before. `host` is
/// the request's Host.
pub fn set_forwarded(
    h: &mut HeaderMap,
    client_ip: &HeaderValue,
    proto: &'static str,
    prior: PriorHop,
    host: Option<HeaderValue>,
) {
    let xff = match prior.xff.as_ref().and_then(|v| v.to_str().ok()) {
        Some(chain) if !chain.trim().is_empty() => {
            let ip = client_ip.to_str().unwrap_or_default();
            HeaderValue::from_str(&format!("{chain}, {ip}")).ok()
        }
        _ => Some(client_ip.clone()),
    };
    // Constants: `from_static` outside a const context checks its name on every call.
    const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    if let Some(v) = xff {
        h.insert(X_FORWARDED_FOR, v);
    }
    h.insert(
        X_FORWARDED_PROTO,
        prior.proto.unwrap_or(HeaderValue::from_static(proto)),
    );
    // An empty Host (a request without an authority) names no host to forward.
    if let Some(host) = prior.host.or(host.filter(|v| !v.is_empty())) {
        h.insert(X_FORWARDED_HOST, host);
    }
}

/// The X-Forwarded-For value for a peer address (built once per connection).
pub fn ip_header(ip: std::net::IpAddr) -> HeaderValue {
    HeaderValue::from_str(&ip.to_canonical().to_string())
        .unwrap_or(HeaderValue::from_static("unknown"))
}

/// A client-sent request id is kept only if it is short and plain.
pub fn valid_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UserClaim;

    /// Removes hop-by-hop headers, including those the `Connection` header names.
    /// `Upgrade` (and `Connection: upgrade`) survive only for an upgrade being forwarded.
    fn strip_hop_by_hop(h: &mut HeaderMap, upgrading: bool) {
        Seen::scan(h, None).strip(h, upgrading, None);
    }

    #[test]
    fn group_names_keep_their_commas_apart() {
        let groups: Vec<String> = [
            "users",
            "cn=a,ou=b",
            "50%",
            "x\ny",
            "Ärzte",
            "Domain Admins",
            " admins",
            "admins  ",
            " ",
        ]
        .iter()
        .map(|g| g.to_string())
        .collect();
        assert_eq!(
            groups_value(&groups),
            "users,cn=a%2Cou=b,50%25,x%0Ay,%C3%84rzte,Domain Admins,%20admins,admins%20%20,%20"
        );
        assert_eq!(groups_value(&[]), "");
    }

    #[test]
    fn claims_with_blanks_at_either_end_make_no_identity_header() {
        assert_eq!(identity_value("alice").unwrap(), "alice");
        assert_eq!(identity_value("Alice Smith").unwrap(), "Alice Smith");
        for v in [" admin", "admin ", "\tadmin", "admin\t", " ", "a\nb"] {
            assert!(identity_value(v).is_none(), "{v:?}");
        }
    }

    fn cfg() -> HeaderConfig {
        HeaderConfig {
            user_claim: UserClaim::Sub,
            user: HeaderName::from_static("x-forwarded-user"),
            email: HeaderName::from_static("x-forwarded-email"),
            groups: HeaderName::from_static("x-forwarded-groups"),
            preferred_username: HeaderName::from_static("x-forwarded-preferred-username"),
            request_id: HeaderName::from_static("x-request-id"),
            pass_access_token: true,
            unverified_email: false,
        }
    }

    fn strip_spoofable(h: &mut HeaderMap, cfg: &HeaderConfig) {
        sanitize_request(h, || true, false, &Spoofable::new(cfg), |_| false);
    }

    #[test]
    fn a_trusted_proxys_forwarding_lines() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "a.example"),
            ("x-forwarded-host", "b.example"),
        ] {
            h.append(n, HeaderValue::from_static(v));
        }
        let prior = PriorHop::read(&h);
        // A list: every line counts, the proxy's own last.
        assert_eq!(prior.xff.as_ref().unwrap(), "6.6.6.6, 203.0.113.9");
        assert_eq!(prior.proto.as_ref().unwrap(), "https");
        // A single value sent twice: believe neither.
        assert!(prior.host.is_none());
        let mut out = HeaderMap::new();
        set_forwarded(
            &mut out,
            &HeaderValue::from_static("10.0.0.1"),
            "http",
            prior,
            Some(HeaderValue::from_static("gw.example")),
        );
        assert_eq!(out["x-forwarded-for"], "6.6.6.6, 203.0.113.9, 10.0.0.1");
        assert_eq!(out["x-forwarded-host"], "gw.example");
        assert_eq!(out["x-forwarded-proto"], "https");
        // An empty Host names no host: no empty X-Forwarded-Host.
        let mut out = HeaderMap::new();
        let ip = HeaderValue::from_static("10.0.0.1");
        set_forwarded(
            &mut out,
            &ip,
            "http",
            PriorHop::default(),
            Some(HeaderValue::from_static("")),
        );
        assert!(out.get("x-forwarded-host").is_none());
    }

    #[test]
    fn strips_spoofed_including_underscore_variants() {
        let mut h = HeaderMap::new();
        for n in [
            "x-forwarded-user",
            "x_forwarded_user",
            "x-forwarded_email",
            "x.forwarded.groups",
            "x~forwarded*preferred-username",
            "authorization",
            "x-real-ip",
            "accept",
            // Any forward-auth answer header, in any spelling; the bare prefix is no such name.
            "x-auth-request-redirect",
            "x_auth_request_anything",
            "x-auth-request-",
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("evil"),
            );
        }
        strip_spoofable(&mut h, &cfg());
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-auth-request-"]);

        // Configured names of any length, also past the 63 bytes the length filter tells apart.
        let long = format!("x-{}", "a".repeat(70));
        let mut c = cfg();
        c.user = HeaderName::from_bytes(long.as_bytes()).unwrap();
        c.groups = HeaderName::from_static("x-g");
        let mut h = HeaderMap::new();
        for n in [
            long.replace('-', "_"),
            format!("x-{}", "a".repeat(80)),
            "x_g".into(),
        ] {
            h.insert(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_static("evil"),
            );
        }
        strip_spoofable(&mut h, &c);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, [format!("x-{}", "a".repeat(80))]);

        // Another spelling of a header that frames or routes the request; the real ones stay.
        let mut h = HeaderMap::new();
        for n in [
            "content_length",
            "transfer_encoding",
            "content.length",
            "transfer~encoding",
            "content-length",
            "host",
            "x_host_x",
            "te_",
            "accept",
        ] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_spoofable(&mut h, &cfg());
        let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(
            left,
            ["accept", "content-length", "host", "te_", "x_host_x"]
        );

        // A configured name with `_` is spoofed by its `-` spelling too.
        let mut c = cfg();
        c.user = HeaderName::from_static("x_remote_user");
        let mut h = HeaderMap::new();
        for n in ["x-remote-user", "x_remote_user", "x-remote_user", "accept"] {
            h.insert(n, HeaderValue::from_static("evil"));
        }
        strip_spoofable(&mut h, &c);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept"]);
    }

    #[test]
    fn url_building_forwarding_headers_are_stripped_even_from_a_trusted_proxy() {
        let sent = [
            "x-forwarded-prefix",
            "x-forwarded-server",
            "x-forwarded-port",
            "x-rewrite-url",
            "x-original-url",
            "x-original-uri",
            "x_forwarded_prefix",
            "X_Rewrite_URL",
        ];
        for trusted_hop in [false, true] {
            let mut h = HeaderMap::new();
            for n in sent {
                h.insert(
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_static("/evil"),
                );
            }
            h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
            sanitize_request(
                &mut h,
                || true,
                trusted_hop,
                &Spoofable::new(&cfg()),
                |_| false,
            );
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["accept"], "trusted hop: {trusted_hop}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("1"));
        for n in [
            "te",
            "trailer",
            "transfer-encoding",
            "proxy-connection",
            "proxy-authorization",
        ] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn connection_lists_in_several_values_and_any_case() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-One"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, x-two ,not a name,"),
        );
        for n in ["x-one", "x-two", "x-keep"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        let mut upgrade = h.clone();
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
        strip_hop_by_hop(&mut upgrade, true);
        let mut left: Vec<&str> = upgrade.keys().map(|k| k.as_str()).collect();
        left.sort();
        assert_eq!(left, ["connection", "upgrade", "x-keep"]);
        assert_eq!(upgrade[header::CONNECTION], "upgrade");
    }

    #[test]
    fn connection_cannot_name_the_gateways_request_id_away() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("X-Request-Id, x-secret"),
        );
        h.insert("x-request-id", HeaderValue::from_static("gw-1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        sanitize_request(&mut h, || true, false, &Spoofable::new(&cfg()), |_| false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-request-id"]);
        assert_eq!(h["x-request-id"], "gw-1");
        // A configured name too, in any case.
        let mut c = cfg();
        c.request_id = HeaderName::from_static("x-trace");
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("X-TRACE"));
        h.insert("x-trace", HeaderValue::from_static("t"));
        sanitize_request(&mut h, || true, false, &Spoofable::new(&c), |_| false);
        assert_eq!(h["x-trace"], "t");
        // Responses have no such header of the gateway's: what Connection names goes.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("x-request-id"));
        h.insert("x-request-id", HeaderValue::from_static("up"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn connection_keep_alive_alone_or_before_a_name() {
        // Only tokens the hop-by-hop pass removes anyway: the short way.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
        // A name listed after them, in a later value, still goes.
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("upgrade, x-two"),
        );
        for n in ["x-two", "x-keep"] {
            h.insert(n, HeaderValue::from_static("1"));
        }
        strip_hop_by_hop(&mut h, false);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    #[test]
    fn sanitize_request_in_one_pass() {
        let request = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let spoofable = Spoofable::new(&cfg());
        let ours = |n: &str| n == "_p";
        let sent = [
            ("host", "app.example"),
            ("cookie", "a=1; _p=secret"),
            ("connection", "keep-alive"),
            ("upgrade", "websocket"),
            ("x-forwarded-for", "6.6.6.6"),
            ("x-forwarded-host", "evil.example"),
            ("accept", "*/*"),
        ];
        for trusted_hop in [false, true] {
            let mut h = request(&sent);
            let clean = sanitize_request(&mut h, || true, trusted_hop, &spoofable, ours);
            assert!(!clean.upgrading, "Connection does not list upgrade");
            assert_eq!(clean.host.unwrap(), "app.example");
            assert_eq!(clean.prior.xff.is_some(), trusted_hop);
            assert_eq!(clean.prior.host.is_some(), trusted_hop);
            let mut left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            left.sort();
            assert_eq!(left, ["accept", "cookie", "host"]);
            assert_eq!(h[header::COOKIE], "a=1");
        }
        // A websocket upgrade over HTTP/1.1 keeps Upgrade and `Connection: upgrade`.
        let ws = [
            ("host", "app.example"),
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
        ];
        let mut h = request(&ws);
        assert!(sanitize_request(&mut h, || true, false, &spoofable, ours).upgrading);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        let mut h = request(&ws);
        assert!(!sanitize_request(&mut h, || false, false, &spoofable, ours).upgrading);
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key(header::CONNECTION));
        // Websockets only: no h2c (its settings are connection-specific too), nor a list.
        for protocol in ["h2c", "websocket, h2c", "TLS/1.0"] {
            let mut h = request(&[
                ("host", "app.example"),
                ("connection", "Upgrade"),
                ("upgrade", "websocket"),
                ("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA"),
            ]);
            h.insert(header::UPGRADE, HeaderValue::from_static(protocol));
            assert!(!sanitize_request(&mut h, || true, false, &spoofable, ours).upgrading);
            let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
            assert_eq!(left, ["host"], "{protocol}");
        }
        // What Connection names goes, but never Host (the routes were matched on it); no
        // cookie of ours: the Cookie header is kept.
        let mut h = request(&[
            ("host", "app.example"),
            ("connection", "Host, x-other"),
            ("x-other", "1"),
            ("cookie", "a=1;;b=2"),
        ]);
        let clean = sanitize_request(&mut h, || true, false, &spoofable, ours);
        assert_eq!(clean.host.unwrap(), "app.example");
        assert_eq!(h[header::HOST], "app.example");
        assert!(!h.contains_key("x-other"));
        assert_eq!(h[header::COOKIE], "a=1;;b=2");
    }

    #[test]
    fn cookie_stripping() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; _p=secret; b=2; _p_0=x"),
        );
        strip_cookies(&mut h, |n| n == "_p" || n == "_p_0");
        assert_eq!(h.get(header::COOKIE).unwrap(), "a=1; b=2");
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("_p=secret"));
        strip_cookies(&mut h, |n| n == "_p");
        assert!(h.get(header::COOKIE).is_none());
        // Lines (an HTTP/2 client's, one per cookie) become one header, with or without ours.
        for ours in [None, Some("_p=secret")] {
            let mut h = HeaderMap::new();
            for v in ["a=1", "b=2; c=3"].into_iter().chain(ours) {
                h.append(header::COOKIE, HeaderValue::from_static(v));
            }
            strip_cookies(&mut h, |n| n == "_p");
            let lines: Vec<_> = h.get_all(header::COOKIE).iter().collect();
            assert_eq!(lines, ["a=1; b=2; c=3"], "{ours:?}");
        }
    }

    #[test]
    fn bearer_values() {
        assert_eq!(
            bearer_value("abc.DEF-_~+/=").unwrap(),
            "Bearer abc.DEF-_~+/="
        );
        for bad in ["a\r\nX-Evil: 1", "a\nb", "a\0b"] {
            assert!(bearer_value(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn request_ids() {
        assert!(valid_request_id(&HeaderValue::from_static("abc-123_x.y")));
        assert!(!valid_request_id(&HeaderValue::from_static("a b")));
        assert!(!valid_request_id(
            &HeaderValue::from_str(&"a".repeat(200)).unwrap()
        ));
    }

    #[test]
    fn an_upstream_cannot_set_the_gateways_cookies() {
        let ours = |n: &str| n == "_p" || n == "_p_0";
        let mut h = HeaderMap::new();
        for v in [
            "app=1; Path=/",
            "_p=planted; Path=/",
            " _p_0 =x; Max-Age=0",
            "_p; Path=/",
            "other=_p=1",
            "_pp=1",
            // Nameless: a browser that keeps it sends `_p=planted` back.
            "=_p=planted; Path=/a/",
            " = _p_0=x",
            "=other=1",
        ] {
            h.append(header::SET_COOKIE, HeaderValue::from_static(v));
        }
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        sanitize_response(&mut h, ours).unwrap();
        let left: Vec<_> = h.get_all(header::SET_COOKIE).iter().collect();
        // A line without `=` in its first part sets a nameless cookie, not `_p`.
        assert_eq!(
            left,
            [
                "app=1; Path=/",
                "_p; Path=/",
                "other=_p=1",
                "_pp=1",
                "=other=1"
            ]
        );
        assert_eq!(h.get(header::CONTENT_TYPE).unwrap(), "text/plain");
        // None of ours: the lines stay as they were.
        let before = h.clone();
        strip_set_cookies(&mut h, ours);
        assert_eq!(h, before);
    }

    fn response_with(
        lines: &[(&'static str, &'static str)],
    ) -> (HeaderMap, Result<(), &'static str>) {
        let mut h = HeaderMap::new();
        for (k, v) in lines {
            h.append(*k, HeaderValue::from_static(v));
        }
        let r = sanitize_response(&mut h, |_| false);
        (h, r)
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    /// The client is told the body's length as the gateway framed it (RFC 9112 §6.3).
    #[test]
    fn response_lengths_are_restated_as_framed() {
        let (h, r) = response_with(&[("content-length", "3"), ("transfer-encoding", "chunked")]);
        assert!(r.is_ok());
        assert!(h.get("content-length").is_none() && h.get("transfer-encoding").is_none());
        for lines in [
            &[("content-length", "5"), ("content-length", "5")][..],
            &[("content-length", "5, 5")][..],
            &[("content-length", "5")][..],
        ] {
            let (h, r) = response_with(lines);
            assert!(r.is_ok());
            assert_eq!(values(&h, "content-length"), ["5"], "{lines:?}");
        }
        for coding in ["gzip, chunked", "chunked, gzip", "gzip", "x-custom"] {
            let (_, r) = response_with(&[("transfer-encoding", coding)]);
            assert!(r.is_err(), "{coding}");
        }
    }

    /// An app cannot end the gateway's session with `Clear-Site-Data`; the rest of it stays.
    #[test]
    fn clear_site_data_keeps_the_session_cookie() {
        let csd = |v: &'static str| {
            values(
                &response_with(&[("clear-site-data", v)]).0,
                "clear-site-data",
            )
        };
        assert_eq!(csd("\"cache\", \"cookies\""), ["\"cache\""]);
        assert_eq!(
            csd("\"*\""),
            ["\"cache\", \"storage\", \"executionContexts\""]
        );
        assert!(csd("\"cookies\"").is_empty());
        assert_eq!(csd("\"cache\", \"storage\""), ["\"cache\", \"storage\""]);
    }
}
