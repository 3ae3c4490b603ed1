//! Routes (`routes:`) and who may pass (`authorization:`, per-route `allow:`).

use crate::config::raw::{RawAllow, RawAuthorization, RawRoute};
use crate::config::UpstreamConfig;
use crate::proxy::path::RoutePath;
use crate::session::Identity;
use http::Method;
use regex::Regex;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Forwarded without login (identity headers still stripped).
    Skip,
    /// Needs a session; never redirects (401).
    Api,
    /// Needs a session; browsers are sent to log in.
    Login,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Regex(Regex),
    /// The configured prefix decoded, and as a browser sends it (see `Route::covers_path`).
    Prefix {
        decoded: String,
        sent: String,
    },
}

#[derive(Debug, Clone)]
pub struct Route {
    pub path: PathMatch,
    pub methods: Vec<Method>,
    /// Lower-case host without port.
    pub host: Option<String>,
    pub auth: AuthMode,
    pub upstream: Option<UpstreamConfig>,
    pub upstream_response: Option<Duration>,
    /// Connect timeout for a connection opened for this route's request (pooled connections
    /// are shared by every route to the same upstream).
    pub upstream_connect: Option<Duration>,
    pub allow: Option<Rules>,
}

impl Route {
    /// Methods compare in any case: a `delete` is a DELETE to apps that upper-case the method
    /// (Django, Flask, Symfony, Laravel), so it must meet the DELETE route's rules.
    pub fn matches(&self, method: &Method, host: Option<&str>, path: &RoutePath<'_>) -> bool {
        (self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|m| m.as_str().eq_ignore_ascii_case(method.as_str())))
            && self.covers(host, path)
    }

    /// Whether the route's path fits, whatever the method and host. A path is looked at as
    /// sent (normalised) and decoded, since apps route on one or the other (most decode it;
    /// Express and Rails do not), and the route must hold for whichever the app reads: a
    /// route that protects (login, api, allow rules) takes a request either spelling fits, a
    /// public one (`auth: skip`) only a request both spellings fit. So `%3A` for `:`, or an
    /// escaped space or non-ASCII character, gets no request out of a protected route, nor
    /// into a public one written for the other spelling.
    pub fn covers_path(&self, path: &RoutePath<'_>) -> bool {
        let (sent, decoded) = match &self.path {
            PathMatch::Regex(r) => {
                let sent = r.is_match(path.sent);
                let decoded = if path.decoded == path.sent {
                    sent
                } else {
                    r.is_match(&path.decoded)
                };
                (sent, decoded)
            }
            PathMatch::Prefix {
                decoded: p,
                sent: q,
            } => (
                path.sent.starts_with(q.as_str()),
                path.decoded.starts_with(p.as_str()),
            ),
        };
        if self.auth == AuthMode::Skip {
            sent && decoded
        } else {
            sent || decoded
        }
    }

    /// Whether the route's host and path fit, whatever the method.
    pub fn covers(&self, host: Option<&str>, path: &RoutePath<'_>) -> bool {
        self.covers_path(path)
            && self
                .host
                .as_deref()
                .is_none_or(|h| host.is_some_and(|x| x.eq_ignore_ascii_case(h)))
    }
}

/// The host of a Host header or authority, without the port, and without the trailing dot of
/// a fully qualified name (`app.example.com.` is the site `app.example.com` to nginx and
/// Apache): what routes are matched against (case aside). Brackets are taken off an IPv6
/// address only; anything else comes back whole, so that it matches no configured host —
/// `valid_host` keeps such values from reaching the routes at all.
pub fn host_only(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, _)) if ip.parse::<std::net::Ipv6Addr>().is_ok() => ip,
            _ => authority,
        };
    }
    let host = authority.rsplit_once(':').map_or(authority, |(h, p)| {
        if p.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            authority
        }
    });
    host.strip_suffix('.').unwrap_or(host)
}

/// Is this a Host value (or URI authority) every server reads the same way: a DNS name or
/// IPv4 address (letters, digits, `-`, `.`, `_`) or a bracketed IPv6 address, then an
/// optional `:port`; or empty (RFC 9112 §3.2, no authority). Stricter than RFC 3986's
/// reg-name — no userinfo, percent-encoding, commas or other sub-delims, which upstreams
/// that pick a site by host name read differently than the route matcher would.
pub fn valid_host(authority: &str) -> bool {
    valid_host_bytes(authority.as_bytes())
}

/// A host named by a forwarding header (`X-Forwarded-Host`): held to a Host's rules, and not
/// empty (an empty one names no site).
pub fn valid_forwarded_host(value: &[u8]) -> bool {
    !value.is_empty() && valid_host_bytes(value)
}

/// [`valid_host`] of a header value's bytes: no UTF-8 check first, as any byte outside the
/// allowed ASCII is refused anyway (an HTTP/1 request's Host comes through here).
pub fn valid_host_bytes(authority: &[u8]) -> bool {
    let port = match authority.strip_prefix(b"[") {
        Some(rest) => {
            let Some(end) = memchr::memchr(b']', rest) else {
                return false;
            };
            let ip = std::str::from_utf8(&rest[..end]).map(str::parse::<std::net::Ipv6Addr>);
            if !matches!(ip, Ok(Ok(_))) {
                return false;
            }
            &rest[end + 1..]
        }
        None if authority.is_empty() => return true,
        None => {
            // A plain search: memchr's set-up costs more than a host name's few bytes.
            let colon = authority
                .iter()
                .position(|&b| b == b':')
                .unwrap_or(authority.len());
            let (host, port) = authority.split_at(colon);
            // Labels of name bytes, none empty (`.a`, `a..b`, `.`), one trailing dot at most:
            // one pass, as every HTTP/1 request's Host comes through here.
            let name = host.strip_suffix(b".").unwrap_or(host);
            let mut after_dot = true;
            for &b in name {
                match b {
                    b'.' if after_dot => return false,
                    b'.' => after_dot = true,
                    b if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' => after_dot = false,
                    _ => return false,
                }
            }
            if after_dot {
                // Empty, or still ending in a dot once the trailing one came off.
                return false;
            }
            port
        }
    };
    match port.strip_prefix(b":") {
        None => port.is_empty(),
        // A port is a number up to 65535 (RFC 3986 lets it be empty).
        Some(p) => {
            p.len() <= 5
                && p.iter().all(u8::is_ascii_digit)
                && p.iter().fold(0u32, |n, &d| n * 10 + u32::from(d - b'0')) <= 65535
        }
    }
}

/// Headers with which a POST asks to be taken as another method (in any spelling that
/// `same_dashed` takes for them, as CGI-style servers read them), honoured by Rails (Rack),
/// Laravel, Symfony, Express's method-override and ASP.NET Core; Symfony, Laravel and Express
/// also read a `_method` query parameter.
const METHOD_OVERRIDES: [&[u8]; 3] = [
    b"x-http-method-override",
    b"x-http-method",
    b"x-method-override",
];

/// Overrides that disagree, or name no method.
#[derive(Debug)]
pub struct BadOverride;

/// The method a request asks to be taken as (`POST` + `X-HTTP-Method-Override: DELETE` is a
/// DELETE to such apps): `Ok(None)` when it asks for none. Whatever its own method: most apps
/// honour overrides on a POST only, but some on any (Flask's documented middleware). (A
/// `_method` field in a form body is beyond the gateway's sight.)
pub fn method_override(
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<Option<Method>, BadOverride> {
    let from_headers = headers.iter().filter_map(|(name, v)| {
        let n = name.as_str().as_bytes();
        METHOD_OVERRIDES
            .iter()
            .any(|o| crate::proxy::headers::same_dashed(n, o))
            .then(|| v.to_str().map(str::to_owned).map_err(|_| BadOverride))
    });
    // `;` separates parameters too for some apps (Rack 2, Python before 3.9.2, PHP's
    // `arg_separator.input`): `?a=1;_method=PUT` is a PUT to them.
    let from_query = query
        .unwrap_or("")
        .split(';')
        .flat_map(|part| url::form_urlencoded::parse(part.as_bytes()))
        .filter(|(k, _)| is_method_param(k))
        .map(|(_, v)| Ok(v.into_owned()));
    let mut found: Option<Method> = None;
    for name in from_headers.chain(from_query) {
        let name = name?.trim().to_ascii_uppercase();
        let m = Method::from_bytes(name.as_bytes()).map_err(|_| BadOverride)?;
        match &found {
            Some(f) if *f != m => return Err(BadOverride),
            _ => found = Some(m),
        }
    }
    Ok(found)
}

/// `_method`, also as PHP (Laravel, Symfony) reads a query's names: leading spaces dropped,
/// the name cut at a NUL and at a `[` (`_method[]` is PHP's array of that name), and a `.` or
/// ` ` taken for `_`, so `%20_method`, `.method` and `_method%00x` all reach the app as
/// `_method`. ` method` and `[method`, which PHP drops, count too: refusing them costs nothing.
fn is_method_param(name: &str) -> bool {
    let name = name.split('\0').next().unwrap_or(name);
    let as_php = name.trim_start_matches(' ');
    let as_php = as_php.split('[').next().unwrap_or(as_php);
    [name, as_php].iter().any(|n| match n.as_bytes() {
        [b'_' | b'.' | b' ' | b'[', rest @ ..] => rest == b"method",
        _ => false,
    })
}

/// Any match of any list lets the user pass; all lists empty lets everyone pass.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    pub emails: Vec<String>,
    pub domains: Vec<String>,
    pub groups: Vec<String>,
}

impl Rules {
    fn from_raw(emails: &[String], domains: &[String], groups: &[String]) -> Self {
        Self {
            emails: emails
                .iter()
                .map(|e| e.trim().to_ascii_lowercase())
                .collect(),
            domains: domains
                .iter()
                .map(|d| d.trim().trim_start_matches('@').to_ascii_lowercase())
                .collect(),
            groups: groups.to_vec(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.emails.is_empty() && self.domains.is_empty() && self.groups.is_empty()
    }
}

#[derive(Debug, Clone)]
pub struct Authorization {
    pub rules: Rules,
    pub require_email_verified: bool,
    pub groups_claim: String,
}

/// Why a logged-in user may not pass (shown on the 403 page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied(pub &'static str);

impl Authorization {
    /// Checks the global rules, then the route's own.
    pub fn check(&self, id: &Identity, route: Option<&Rules>) -> Result<(), Denied> {
        self.check_rules(id, &self.rules)?;
        match route {
            Some(r) => self.check_rules(id, r),
            None => Ok(()),
        }
    }

    fn check_rules(&self, id: &Identity, rules: &Rules) -> Result<(), Denied> {
        if rules.is_empty() {
            return Ok(());
        }
        let email = id
            .email
            .as_deref()
            .filter(|_| id.email_verified || !self.require_email_verified)
            .map(str::to_ascii_lowercase);
        if let Some(email) = &email {
            if rules.emails.iter().any(|e| e == email) {
                return Ok(());
            }
            // The domain is what follows the LAST '@': "a@evil.com@corp.com" is corp.com's
            // only if the whole address is a valid single-@ address, which it is not.
            let mut parts = email.rsplitn(2, '@');
            if let (Some(domain), Some(local)) = (parts.next(), parts.next()) {
                if !local.is_empty()
                    && !local.contains('@')
                    && rules.domains.iter().any(|d| d == domain)
                {
                    return Ok(());
                }
            }
        }
        if id.groups.iter().any(|g| rules.groups.contains(g)) {
            return Ok(());
        }
        if id.email.is_some()
            && email.is_none()
            && (!rules.emails.is_empty() || !rules.domains.is_empty())
        {
            return Err(Denied(
                "your email address is not verified by the identity provider",
            ));
        }
        Err(Denied(
            "your account is not on the list of users allowed here",
        ))
    }
}

pub fn build_authorization(raw: &RawAuthorization) -> Authorization {
    Authorization {
        rules: Rules::from_raw(
            &raw.allowed_emails,
            &raw.allowed_email_domains,
            &raw.allowed_groups,
        ),
        require_email_verified: raw.require_email_verified,
        groups_claim: raw.groups_claim.clone(),
    }
}

fn allow(raw: &RawAllow) -> Rules {
    Rules::from_raw(
        &raw.allowed_emails,
        &raw.allowed_email_domains,
        &raw.allowed_groups,
    )
}

/// Builds one route; errors are (key suffix, message).
pub fn build_route(
    raw: &RawRoute,
    upstream: impl Fn(&str) -> Result<UpstreamConfig, String>,
) -> Result<Route, (String, String)> {
    let path = match (&raw.path, &raw.prefix) {
        (Some(_), Some(_)) => {
            return Err(("path".into(), "set either path or prefix, not both".into()))
        }
        (None, None) => {
            return Err((
                "path".into(),
                "each route needs path (a regex) or prefix".into(),
            ))
        }
        (Some(re), None) => {
            let anchored = format!("^(?:{})", re.strip_prefix('^').unwrap_or(re));
            PathMatch::Regex(
                Regex::new(&anchored).map_err(|e| ("path".to_string(), regex_error(re, &e)))?,
            )
        }
        (None, Some(p)) => {
            let decoded =
                crate::proxy::path::route_prefix(p).map_err(|e| ("prefix".to_string(), e))?;
            PathMatch::Prefix {
                sent: crate::proxy::path::sent_form(&decoded),
                decoded,
            }
        }
    };
    if raw.methods.as_ref().is_some_and(Vec::is_empty) {
        return Err((
            "methods".into(),
            "must list at least one method (leave `methods` out for every method)".into(),
        ));
    }
    let mut methods = Vec::new();
    for m in raw.methods.iter().flatten() {
        let m = Method::from_bytes(m.to_ascii_uppercase().as_bytes()).map_err(|_| {
            (
                "methods".to_string(),
                format!("`{m}` is not an HTTP method"),
            )
        })?;
        methods.push(m);
    }
    let auth = match raw.auth.as_deref().unwrap_or("login") {
        "skip" => AuthMode::Skip,
        "api" => AuthMode::Api,
        "login" => AuthMode::Login,
        other => return Err(("auth".into(), format!("`{other}`: use skip, api or login"))),
    };
    if auth == AuthMode::Skip && raw.allow.is_some() {
        return Err(("allow".into(), "makes no sense with auth: skip".into()));
    }
    let up = match &raw.upstream {
        Some(u) => Some(upstream(u).map_err(|m| ("upstream".to_string(), m))?),
        None => None,
    };
    let host = match &raw.host {
        Some(h) => Some(route_host(h).ok_or_else(|| {
            (
                "host".to_string(),
                format!("`{h}`: a host name without scheme, port or path, like app.example.com"),
            )
        })?),
        None => None,
    };
    let timeouts = raw.timeouts.clone().unwrap_or_default();
    for (key, t) in [
        ("timeouts.upstream_response", timeouts.upstream_response),
        ("timeouts.upstream_connect", timeouts.upstream_connect),
    ] {
        if t.is_some_and(|t| t.is_zero()) {
            return Err((key.into(), "must be greater than zero".into()));
        }
    }
    Ok(Route {
        path,
        methods,
        host,
        auth,
        upstream: up,
        upstream_response: timeouts.upstream_response,
        upstream_connect: timeouts.upstream_connect,
        allow: raw.allow.as_ref().map(allow),
    })
}

/// A route regex's error on one line. `regex` spells a syntax error over several (the
/// pattern, a line of carets under the culprit, then `error: <reason>`): the reason alone is
/// kept, with the pattern as the route wrote it (escaped if it holds control characters).
fn regex_error(pattern: &str, e: &regex::Error) -> String {
    let text = e.to_string();
    let reason = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let lines: Vec<&str> = text.lines().map(str::trim).collect();
            lines.join(" ")
        });
    if pattern.contains(char::is_control) {
        format!("invalid regex {pattern:?}: {reason}")
    } else {
        format!("invalid regex `{pattern}`: {reason}")
    }
}

/// Dot-separated labels of letters, digits and `-` (an IPv4 address passes too).
pub fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
}

/// A route's `host`, as requests' hosts are compared with it: lower case, no port (an IPv6
/// literal without its brackets). `None` if it is no host name.
fn route_host(h: &str) -> Option<String> {
    let h = h.trim().to_ascii_lowercase();
    let bare = h
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .unwrap_or(&h);
    (is_host_name(bare) || bare.parse::<std::net::Ipv6Addr>().is_ok()).then(|| bare.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_overrides_in_the_query() {
        let none = http::HeaderMap::new();
        let of = |q: &str| method_override(&none, Some(q)).map_err(|_| ());
        assert_eq!(of("a=1"), Ok(None));
        assert_eq!(of("a=1&_method=put"), Ok(Some(Method::PUT)));
        // `;` separates parameters for some apps too.
        assert_eq!(of("a=1;_method=PUT"), Ok(Some(Method::PUT)));
        assert_eq!(of("_method=PUT;_method=DELETE"), Err(()));
        assert_eq!(of("a=x%3B_method%3DPUT"), Ok(None));
    }

    #[test]
    fn method_params_as_php_reads_them() {
        for name in [
            "_method",
            ".method",
            " method",
            "[method",
            " _method",
            "   .method",
            "_method\0",
            "_method\0junk",
            "_method[]",
            "_method[x]",
            " _method[",
        ] {
            assert!(is_method_param(name), "{name:?}");
        }
        for name in [
            "method",
            "_methods",
            "__method",
            "_method_",
            "x_method",
            "\0_method",
            "_Method",
        ] {
            assert!(!is_method_param(name), "{name:?}");
        }
    }

    fn id(email: &str, verified: bool, groups: &[&str]) -> Identity {
        Identity {
            sub: "s".into(),
            email: Some(email.into()),
            email_verified: verified,
            groups: groups.iter().map(|g| g.to_string()).collect(),
            ..Default::default()
        }
    }

    fn authz(domains: &[&str], groups: &[&str]) -> Authorization {
        Authorization {
            rules: Rules::from_raw(
                &[],
                &domains.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &groups.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            ),
            require_email_verified: true,
            groups_claim: "groups".into(),
        }
    }

    #[test]
    fn email_domains_are_exact() {
        let a = authz(&["corp.com"], &[]);
        assert!(a.check(&id("a@corp.com", true, &[]), None).is_ok());
        assert!(a.check(&id("A@CORP.COM", true, &[]), None).is_ok());
        for bad in [
            "a@evil.com@corp.com",
            "a@sub.corp.com",
            "a@corp.com.evil",
            "a@evilcorp.com",
            "@corp.com",
            "corp.com",
        ] {
            assert!(a.check(&id(bad, true, &[]), None).is_err(), "{bad}");
        }
        assert!(
            a.check(&id("a@corp.com", false, &[]), None).is_err(),
            "unverified"
        );
    }

    /// Listed addresses pass, in any case; others do not, nor a listed one the provider has
    /// not verified (and the page says which of the two it is).
    #[test]
    fn email_lists_are_exact() {
        let a = authz(&[], &[]);
        let listed = Rules::from_raw(&["bob@corp.com".to_string()], &[], &[]);
        let check = |email, verified| a.check(&id(email, verified, &[]), Some(&listed));
        assert!(check("bob@corp.com", true).is_ok());
        assert!(check("Bob@Corp.com", true).is_ok());
        let not_listed = check("eve@corp.com", true).unwrap_err();
        assert!(not_listed.0.contains("not on the list"), "{}", not_listed.0);
        let unverified = check("bob@corp.com", false).unwrap_err();
        assert!(unverified.0.contains("not verified"), "{}", unverified.0);
    }

    #[test]
    fn groups_and_route_rules() {
        let a = authz(&[], &[]);
        let admins = Rules::from_raw(&[], &[], &["admins".to_string()]);
        assert!(a
            .check(&id("a@x", true, &["admins"]), Some(&admins))
            .is_ok());
        assert!(a
            .check(&id("a@x", true, &["users"]), Some(&admins))
            .is_err());
        assert!(
            a.check(&id("a@x", true, &[]), None).is_ok(),
            "no rules: everyone"
        );
    }

    #[test]
    fn route_hosts_are_plain_names() {
        assert_eq!(
            route_host("App.Example.com").as_deref(),
            Some("app.example.com")
        );
        assert_eq!(route_host("127.0.0.1").as_deref(), Some("127.0.0.1"));
        assert_eq!(route_host("[::1]").as_deref(), Some("::1"));
        for bad in [
            "",
            "app.example.com:8443",
            "https://app.example.com",
            "a/b",
            "*.x.com",
            "a..b",
            "[::1]:80",
        ] {
            assert_eq!(route_host(bad), None, "{bad}");
        }
    }

    #[test]
    fn regex_errors_are_one_line() {
        let route = |path: &str| RawRoute {
            path: Some(path.to_string()),
            ..Default::default()
        };
        let err = |path: &str| match build_route(&route(path), |_| Err(String::new())) {
            Err(e) => e,
            Ok(_) => panic!("{path:?} was accepted"),
        };
        assert_eq!(
            err("/(unclosed"),
            (
                "path".to_string(),
                "invalid regex `/(unclosed`: unclosed group".to_string()
            )
        );
        assert_eq!(
            err("^/\\p{Nope}").1,
            "invalid regex `^/\\p{Nope}`: Unicode property not found"
        );
        assert_eq!(err("/a\n(").1, "invalid regex \"/a\\n(\": unclosed group");
        let (_, big) = err("/a{1000}{1000}");
        assert!(big.starts_with("invalid regex `/a{1000}{1000}`: "), "{big}");
        assert!(!big.contains('\n'), "{big}");
    }

    #[test]
    fn route_timeouts() {
        let route = |timeouts: &str| {
            let raw: RawRoute =
                serde_yaml::from_str(&format!("{{ prefix: /r/, timeouts: {timeouts} }}")).unwrap();
            build_route(&raw, |_| Err(String::new()))
        };
        let r = route("{ upstream_connect: 250ms, upstream_response: 2m }").unwrap();
        assert_eq!(r.upstream_connect, Some(Duration::from_millis(250)));
        assert_eq!(r.upstream_response, Some(Duration::from_secs(120)));
        let r = route("{ upstream_connect: 1s }").unwrap();
        assert_eq!(
            (r.upstream_connect, r.upstream_response),
            (Some(Duration::from_secs(1)), None)
        );
        for (t, key) in [
            ("{ upstream_connect: 0s }", "timeouts.upstream_connect"),
            ("{ upstream_response: 0s }", "timeouts.upstream_response"),
        ] {
            assert_eq!(route(t).err().map(|e| e.0), Some(key.to_string()), "{t}");
        }
    }

    #[test]
    fn case_insensitive_regexes_match_any_case() {
        let raw: RawRoute = serde_yaml::from_str(r#"{ path: "(?i)^/admin/" }"#).unwrap();
        let r = build_route(&raw, |_| Err(String::new())).unwrap();
        for p in ["/admin/x", "/ADMIN/x", "/Admin/"] {
            assert!(r.matches(&Method::GET, None, &RoutePath::new(p)), "{p}");
        }
        assert!(!r.matches(&Method::GET, None, &RoutePath::new("/public/admin/")));
    }

    #[test]
    fn host_without_port() {
        assert_eq!(host_only("a.example.com:8080"), "a.example.com");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("a"), "a");
        assert_eq!(host_only("a.example.com.:80"), "a.example.com");
        assert_eq!(host_only("a.example.com."), "a.example.com");
        // Brackets around a name are not an address: the value stays whole (it matches
        // no configured host).
        assert_eq!(host_only("[a.example.com]"), "[a.example.com]");
        assert_eq!(host_only("[a.example.com]:80"), "[a.example.com]:80");
    }

    #[test]
    fn host_values() {
        for ok in [
            "",
            "a",
            "app.example.com",
            "APP.example.com.",
            "app.example.com:8443",
            "app.example.com:",
            "my_host-1.internal",
            "127.0.0.1:80",
            "a:65535",
            "a:00080",
            "[::1]",
            "[::1]:8080",
            "[::ffff:10.0.0.1]:1",
        ] {
            assert!(valid_host(ok), "{ok:?}");
        }
        for bad in [
            "[app.example.com]",
            "[app.example.com]:80",
            "[app.example.com]evil",
            "[app.example.com",
            "[::1]x",
            "[::1]:80:80",
            "a b",
            "<script>x</script>",
            "evil.com/path",
            "x@evil.com",
            "evil.example, 127.0.0.1:80",
            "a%2eb",
            "a:b",
            ":80",
            "a:123456",
            "a:65536",
            "a:99999",
            "[::1]:65536",
            "a:80:80",
            ".",
            "..",
            ".a.example.com",
            "a..example.com",
            "a.example.com..",
            "a.example.com..:80",
        ] {
            assert!(!valid_host(bad), "{bad:?}");
        }
        // A header value's bytes, not UTF-8 (nor ASCII) at all: refused wherever they are.
        for bad in [
            &b"app.ex\xffample.com"[..],
            b"app.example.com:8\xe9",
            b"\xc3\xa9.example.com",
            b"[::1\xff]",
            b"[::1]\xff",
        ] {
            assert!(!valid_host_bytes(bad), "{bad:?}");
        }
    }
}
