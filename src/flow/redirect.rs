//! Where the gateway may send a user after login or logout: a relative path on this host, an
//! absolute URL of the gateway's own origin (scheme, host and port of `redirect_url`), or an
//! absolute http(s) URL on a host from `allowed_redirect_domains` (exact, or `.suffix`; any
//! port). Anything else — anything a browser could read as another origin — is `/`.

/// Returns `target` if it is a safe same-origin relative reference, else `None`.
pub fn safe_relative(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    // Must be an absolute path: "/x", never "//host", "/\host", or a scheme.
    if b.first() != Some(&b'/') || matches!(b.get(1), Some(b'/') | Some(b'\\')) {
        return None;
    }
    if target.len() > MAX_TARGET {
        return None;
    }
    // No backslashes, controls, spaces or non-ASCII anywhere (browsers "fix" them up into hosts).
    if b.iter().any(|&c| c == b'\\' || c <= 0x20 || c >= 0x7f) {
        return None;
    }
    // Encoded forms of the same tricks ("/%2F%2Fevil", "/%5Cevil", "%09"), in the path: a
    // query or fragment cannot move the target to another host, and an encoded `\`, tab or
    // newline there is an ordinary value (`?q=C:%5Cdir`, a multi-line search) that must survive
    // the login round trip.
    let path = target.split(['?', '#']).next().unwrap_or_default();
    let decoded: Vec<u8> = percent_encoding::percent_decode(path.as_bytes()).collect();
    if matches!(decoded.get(1), Some(b'/') | Some(b'\\'))
        || decoded.iter().any(|&c| c == b'\\' || c < 0x20 || c == 0x7f)
    {
        return None;
    }
    // No dot segments: resolved, `/x/..//evil.com` is `//evil.com`, which a browser keeps on
    // this origin as a path but a client that resolves it as text reads as another host.
    if decoded
        .split(|&c| c == b'/')
        .any(|seg| seg == b"." || seg == b"..")
    {
        return None;
    }
    // Nor a path the gateway would refuse (`;` parameters, an encoded `/`, …): the user would
    // end the login on a 400 page.
    if crate::proxy::path::normalize(path).is_err() {
        return None;
    }
    Some(target)
}

/// Is `host` one of the allowed domains (exact, or under a `.suffix` entry)?
fn domain_allowed(host: &str, allowed: &[String]) -> bool {
    allowed.iter().any(|d| match d.strip_prefix('.') {
        Some(suffix) => {
            host == suffix || host.strip_suffix(suffix).is_some_and(|p| p.ends_with('.'))
        }
        None => host == d,
    })
}

/// An absolute URL allowed as a redirect target, in canonical form: the gateway's own origin
/// exactly (another port or scheme on its host is another origin: another service, or a
/// downgrade), or any http(s) URL on an allowed domain.
pub fn safe_absolute(target: &str, own_origin: &str, allowed: &[String]) -> Option<String> {
    let b = target.as_bytes();
    if target.len() > MAX_TARGET || b.iter().any(|&c| c == b'\\' || c <= 0x20 || c >= 0x7f) {
        return None;
    }
    let lower = target.to_ascii_lowercase();
    if !(lower.starts_with("https://") || lower.starts_with("http://")) {
        return None;
    }
    let u = url::Url::parse(target).ok()?;
    if !u.username().is_empty() || u.password().is_some() {
        return None;
    }
    let own = url::Url::parse(own_origin).ok()?;
    // On the own origin, only a path the gateway would take (see `safe_relative`).
    let ok = (u.origin() == own.origin() && crate::proxy::path::normalize(u.path()).is_ok())
        // Allowed domains are names, never IP literals (those pass only as the own origin).
        || matches!(u.host()?, url::Host::Domain(d) if domain_allowed(d, allowed));
    if !ok {
        return None;
    }
    // The canonical form percent-encodes what the target had raw (`"` is `%22`): bounded
    // again, as it is what gets sealed into the flow cookie.
    Some(u.to_string()).filter(|canonical| canonical.len() <= MAX_TARGET)
}

/// The longest redirect target kept (it is sealed into the flow cookie, whose browser limit
/// is 4 KB).
const MAX_TARGET: usize = 2048;

/// `/oauth2/start` with `return_to` (a target already checked) as its `rd`.
pub fn start_url(return_to: &str) -> String {
    let rd: String = url::form_urlencoded::byte_serialize(return_to.as_bytes()).collect();
    format!("/oauth2/start?rd={rd}")
}

/// The redirect target to use: `target` when safe, else `/`.
pub fn or_root(target: Option<&str>) -> String {
    target.and_then(safe_relative).unwrap_or("/").to_string()
}

/// Like `or_root`, also accepting absolute URLs on allowed hosts.
pub fn or_root_with(target: Option<&str>, own_origin: &str, allowed: &[String]) -> String {
    match target {
        Some(t) if safe_relative(t).is_some() => t.to_string(),
        Some(t) => safe_absolute(t, own_origin, allowed).unwrap_or_else(|| "/".to_string()),
        None => "/".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_paths() {
        for ok in [
            "/",
            "/a",
            "/a/b?c=d&e=%2F",
            "/a#frag",
            "/%7Euser",
            // Encoded `\`, newline and tab are values in a query or fragment.
            "/search?q=C:%5Cdir&note=a%0Ab&t=a%09b",
            "/a?x=%2F%2Fevil.com",
            "/a#%5Cb",
            // Encoded spaces and UTF-8 in a path are ordinary names, not tricks.
            "/my%20docs/r%C3%A9sum%C3%A9",
        ] {
            assert_eq!(safe_relative(ok), Some(ok), "{ok}");
        }
    }

    /// Targets are bounded (they are sealed into the flow cookie, whose browser limit is 4 KB):
    /// 2,048 bytes pass, one more does not.
    #[test]
    fn targets_are_at_most_2048_bytes() {
        let longest = format!("/{}", "a".repeat(2047));
        let over = format!("{longest}a");
        assert_eq!(safe_relative(&longest), Some(longest.as_str()));
        assert_eq!(safe_relative(&over), None);
        assert_eq!(safe_relative(&format!("/{}", "a".repeat(5000))), None);
        let own = "https://gw.local";
        let origin_longest = format!("{own}{longest}");
        let origin_longest = &origin_longest[..2048];
        assert!(safe_absolute(origin_longest, own, &[]).is_some());
        assert_eq!(safe_absolute(&format!("{origin_longest}a"), own, &[]), None);
    }

    /// The bound holds for what is returned, not only for what came in: the canonical form
    /// percent-encodes `"`, `<`, `>`, `{`, `}` and `` ` `` (three bytes each), so a 2,048-byte
    /// target could come back three times as long, sealed into a flow cookie no browser keeps.
    #[test]
    fn canonical_targets_are_at_most_2048_bytes_too() {
        let own = "https://gw.local";
        let allowed = vec![".example.com".to_string()];
        for base in [own, "https://app.example.com"] {
            let quoted = format!("{base}/{}", "\"".repeat(2000));
            assert!(quoted.len() <= 2048);
            assert_eq!(safe_absolute(&quoted, own, &allowed), None, "{base}");
            assert_eq!(or_root_with(Some(&quoted), own, &allowed), "/");
            // Encoded, but within the bound: kept.
            let few = format!("{base}/a{}", "\"".repeat(10));
            let ok = safe_absolute(&few, own, &allowed).unwrap();
            assert_eq!(ok, format!("{base}/a{}", "%22".repeat(10)));
        }
    }

    #[test]
    fn allowed_domains() {
        let allowed = vec![".example.com".to_string(), "exact.org".to_string()];
        let own = "https://gw.local";
        for ok in [
            "https://app.example.com/x?y=1",
            "https://example.com/",
            "https://exact.org/p",
            "https://gw.local/back",
        ] {
            assert!(safe_absolute(ok, own, &allowed).is_some(), "{ok}");
        }
        for bad in [
            "https://evilexample.com/",
            "https://example.com.evil.com/",
            "https://sub.exact.org/",
            "https://user@app.example.com/",
            "https://app.example.com@evil.com/",
            "javascript://app.example.com/%0aalert(1)",
            "https://app.example.com\\@evil.com/",
            "//app.example.com/",
            "https://evil.com#.example.com",
            "https://evil.com?.example.com",
            "ftp://app.example.com/",
            "https://\u{0435}xample.com/",
            "https://1.2.3.4/",
            // The gateway's host, but another origin: another port, another scheme.
            "https://gw.local:8443/",
            "http://gw.local/back",
            "https://gw.local:80/",
            // Whitespace, controls and non-ASCII that a URL parser would quietly strip or fix.
            " https://app.example.com/",
            "https://app.example.com/\t",
            "https://app.example.com/a\nb",
            "https://app.example.com/\u{7f}",
            "https://app.example.com/caf\u{e9}",
        ] {
            assert_eq!(safe_absolute(bad, own, &allowed), None, "{bad}");
        }
        // Allowed domains are names: any port, http or https.
        for ok in ["http://app.example.com:8080/x", "https://example.com:444/"] {
            assert!(safe_absolute(ok, own, &allowed).is_some(), "{ok}");
        }
        assert_eq!(
            safe_absolute("https://GW.local:443/back", own, &allowed).as_deref(),
            Some("https://gw.local/back"),
            "the own origin, in canonical form"
        );
        assert_eq!(or_root_with(Some("https://evil.com"), own, &allowed), "/");
        assert_eq!(or_root_with(Some("/rel"), own, &allowed), "/rel");
    }

    #[test]
    fn own_origin_is_scheme_host_and_port() {
        let own = "http://127.0.0.1:4180";
        assert_eq!(
            safe_absolute("http://127.0.0.1:4180/x?y=1", own, &[]).as_deref(),
            Some("http://127.0.0.1:4180/x?y=1")
        );
        for bad in [
            "http://127.0.0.1:9999/x",
            "http://127.0.0.1/x",
            "https://127.0.0.1/x",
            "https://127.0.0.1:4180/x",
            "http://127.0.0.2:4180/x",
            "http://localhost:4180/x",
        ] {
            assert_eq!(safe_absolute(bad, own, &[]), None, "{bad}");
            assert_eq!(or_root_with(Some(bad), own, &[]), "/", "{bad}");
        }
        // Nor a path the gateway itself refuses (400), on its own origin; another site's
        // paths are its own business.
        for refused in ["/x;url=http://evil.example/", "/a%2Fb", "/a/%00"] {
            assert_eq!(safe_relative(refused), None, "{refused}");
            let abs = format!("{own}{refused}");
            assert_eq!(safe_absolute(&abs, own, &[]), None, "{abs}");
        }
        assert!(safe_absolute(
            "https://app.example.com/x;jsessionid=1",
            own,
            &[".example.com".into()]
        )
        .is_some());
        // An IP literal never passes as an allowed domain.
        assert_eq!(
            safe_absolute("http://127.0.0.1:9999/x", own, &["127.0.0.1".into()]),
            None
        );
    }

    #[test]
    fn rejects_open_redirects() {
        for bad in [
            "",
            "a",
            "//evil.com",
            "/\\evil.com",
            "\\\\evil.com",
            "https://evil.com",
            "http:evil.com",
            "javascript:alert(1)",
            "/%2F%2Fevil.com",
            "/%2fevil.com",
            "/%5Cevil.com",
            "/\t/evil.com",
            "/ /evil.com",
            "/\u{3002}evil",
            "///evil.com",
            "/%09/evil.com",
            "/\r\n/evil",
            "data:text/html,x",
            "/x/..//evil.com",
            "/x/%2e%2e//evil.com",
            "/./x",
            "/x/.",
            "/..",
        ] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }
}
