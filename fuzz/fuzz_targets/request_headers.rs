//! Header hygiene on whatever headers a client (or an upstream) sends: `sanitize_request`,
//! the Cookie reader and stripper, the session cookie's chunks, a trusted proxy's
//! X-Forwarded-* lines, navigation detection and method overrides never panic; sanitising is
//! idempotent, leaves no hop-by-hop or spoofable name and none of the gateway's cookies, and
//! the stripper agrees with the reader on which cookies are the gateway's.
//! `sanitize_response` likewise on the same lines taken as a response's.
//!
//! Input: a flags byte, then `name: value` lines (`\n`-separated; invalid ones are skipped).
#![no_main]
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::Method;
use libfuzzer_sys::fuzz_target;
use portcullis::config::{CookieConfig, CookieKey, HeaderConfig, SameSite, UserClaim};
use portcullis::policy::routes::method_override;
use portcullis::policy::{is_browser_navigation, is_form_navigation, prefers_html};
use portcullis::proxy::headers::{
    has_token, same_dashed, sanitize_request, sanitize_response, set_forwarded, Spoofable,
    CLEAR_SITE_DATA, SPOOFABLE_NAMES,
};
use portcullis::session::{CookieJar, SessionCache, SessionCookies};
use std::sync::OnceLock;
use std::time::Duration;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "http2-settings",
];

fn header_cfg() -> HeaderConfig {
    HeaderConfig {
        user_claim: UserClaim::Sub,
        user: HeaderName::from_static("x-remote-user"),
        email: HeaderName::from_static("x-remote-email"),
        groups: HeaderName::from_static("x_remote_groups"),
        preferred_username: HeaderName::from_static("x-forwarded-preferred-username"),
        request_id: HeaderName::from_static("x-request-id"),
        pass_access_token: true,
        unverified_email: false,
    }
}

struct Fixture {
    spoofable: Spoofable,
    cookies: SessionCookies,
    cache: SessionCache,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let cfg = CookieConfig {
            name: "_p".into(),
            keys: vec![CookieKey([3; 32])],
            secure: false,
            domain: None,
            same_site: SameSite::Lax,
            flow_lifetime: Duration::from_secs(600),
        };
        Fixture {
            spoofable: Spoofable::new(&header_cfg()),
            cookies: SessionCookies::new(
                &cfg,
                ("https://idp.test", "app"),
                Duration::from_secs(3600),
                8,
                "/oauth2/callback",
                false,
            ),
            cache: SessionCache::new(1 << 16),
        }
    })
}

fn headers(data: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}

/// Would the gateway's own sanitising have to remove this name from a request?
fn forbidden_name(name: &HeaderName, upgrading: bool) -> bool {
    let n = name.as_str();
    let cfg = header_cfg();
    (HOP_BY_HOP.contains(&n) && !(upgrading && n == "connection"))
        || (n == "upgrade" && !upgrading)
        || [
            "authorization",
            "forwarded",
            cfg.user.as_str(),
            cfg.email.as_str(),
            cfg.groups.as_str(),
            cfg.preferred_username.as_str(),
        ]
        .iter()
        .chain(SPOOFABLE_NAMES.iter())
        .any(|s| same_dashed(n.as_bytes(), s.as_bytes()))
}

fn cookie_names(h: &HeaderMap) -> Vec<String> {
    CookieJar::parse(h).names().map(str::to_string).collect()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let f = fixture();
    let ours = |n: &str| f.cookies.is_ours(n);
    let original = headers(rest);
    let trusted_hop = flags & 1 != 0;
    let can_switch = flags & 2 != 0;

    // What a request's headers are read for before any strip.
    let method =
        [Method::GET, Method::HEAD, Method::POST, Method::DELETE][usize::from(flags >> 6)].clone();
    let _ = prefers_html(&original);
    let nav = is_browser_navigation(&method, &original);
    let form = is_form_navigation(&method, &original);
    assert!(!(nav && form), "a navigation both redirectable and a form");
    let _ = method_override(&original, None);
    {
        let jar = CookieJar::parse(&original);
        let _ = f.cookies.open_active(&jar, 1000, &f.cache);
        for line in f.cookies.clear_session(&jar) {
            let text = line.to_str().unwrap();
            let name = text.split('=').next().unwrap();
            assert!(ours(name), "clearing a cookie not ours: {text}");
        }
        let _: Vec<_> = f.cookies.flow_names(&jar).collect();
    }

    // The request strip.
    let mut h = original.clone();
    let clean = sanitize_request(&mut h, || can_switch, trusted_hop, &f.spoofable, ours);
    for name in h.keys() {
        assert!(
            !forbidden_name(name, clean.upgrading),
            "{name} left (upgrading: {})",
            clean.upgrading
        );
    }
    if clean.upgrading {
        assert_eq!(h.get_all(header::CONNECTION).iter().count(), 1);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert!(h
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"websocket")));
    }
    // Host is end to end: never removed, never changed.
    let hosts = |m: &HeaderMap| m.get_all(header::HOST).iter().cloned().collect::<Vec<_>>();
    assert_eq!(hosts(&h), hosts(&original));
    assert_eq!(clean.host.as_ref(), original.get(header::HOST));
    // The gateway's request id stays whatever Connection lists.
    assert_eq!(h.get("x-request-id"), original.get("x-request-id"));
    // No cookie of the gateway's reaches the upstream; every other one does, in order.
    let after = cookie_names(&h);
    assert!(
        !after.iter().any(|n| ours(n)),
        "a cookie of ours forwarded: {after:?}"
    );
    let listed_cookie = original
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, "cookie"));
    if !listed_cookie {
        let expected: Vec<String> = cookie_names(&original)
            .into_iter()
            .filter(|n| !ours(n))
            .collect();
        assert_eq!(after, expected, "cookies of others lost or changed");
    }
    assert!(h.get_all(header::COOKIE).iter().count() <= 1);

    // Twice is once.
    let mut again = h.clone();
    let clean2 = sanitize_request(&mut again, || can_switch, trusted_hop, &f.spoofable, ours);
    assert_eq!(again, h, "sanitising twice changed the headers");
    assert_eq!(clean2.upgrading, clean.upgrading);

    // The forwarding headers, from a trusted hop's lines.
    let ip = HeaderValue::from_static("192.0.2.7");
    set_forwarded(&mut h, &ip, "https", clean.prior, clean.host);
    let xff = h.get("x-forwarded-for").expect("X-Forwarded-For set");
    assert!(
        xff.as_bytes().ends_with(b"192.0.2.7"),
        "X-Forwarded-For does not end with the peer: {xff:?}"
    );
    assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
    assert_eq!(h.get_all("x-forwarded-proto").iter().count(), 1);
    let proto = &h["x-forwarded-proto"];
    assert!(proto == "https" || proto == "http", "{proto:?}");
    assert!(h.get_all("x-forwarded-host").iter().count() <= 1);

    // The same lines as an upstream's response.
    let mut r = original.clone();
    if sanitize_response(&mut r, ours).is_ok() {
        for name in r.keys() {
            let n = name.as_str();
            assert!(!HOP_BY_HOP.contains(&n), "{n} left in a response");
        }
        assert!(r.get_all(header::CONTENT_LENGTH).iter().count() <= 1);
        for line in r.get_all(header::SET_COOKIE) {
            let b = line.as_bytes();
            let pair = b.split(|&c| c == b';').next().unwrap_or_default();
            // The name a browser reads (a nameless cookie: what follows the `=`).
            let mut parts = pair.splitn(2, |&c| c == b'=');
            let first = parts.next().unwrap_or_default().trim_ascii();
            let name = match (first, parts.next()) {
                // `=_p=v` is kept by a browser and sent back as `_p=v`.
                (b"", Some(rest)) if rest.contains(&b'=') => {
                    rest.split(|&c| c == b'=').next().map(|n| n.trim_ascii())
                }
                (b"", Some(_)) => None,
                (_, None) => None,
                (n, Some(_)) => Some(n),
            };
            if let Some(n) = name.and_then(|n| std::str::from_utf8(n).ok()) {
                assert!(!ours(n), "Set-Cookie for {n} passed: {line:?}");
            }
        }
        for v in r.get_all(CLEAR_SITE_DATA) {
            for t in v.as_bytes().split(|&c| c == b',') {
                let t = t.trim_ascii();
                assert!(t != b"\"cookies\"" && t != b"\"*\"", "{v:?}");
            }
        }
        let mut twice = r.clone();
        assert!(sanitize_response(&mut twice, ours).is_ok());
        assert_eq!(twice, r, "sanitising a response twice changed it");
    }
});
