//! Where the gateway may send a user after login or logout: a relative path on this host, or
//! an absolute http(s) URL on this host or a host from `allowed_redirect_domains` (exact, or
//! `.suffix`). Anything else — anything a browser could read as another origin — is `/`.

/// Returns `target` if it is a safe same-origin relative reference, else `None`.
pub fn safe_relative(target: &str) -> Option<&str> {
    let b = target.as_bytes();
    // Must be an absolute path: "/x", never "//host", "/\host", or a scheme.
    if b.first() != Some(&b'/') || matches!(b.get(1), Some(b'/') | Some(b'\\')) {
        return None;
    }
    if target.len() > 2048 {
        return None;
    }
    // No backslashes, controls, spaces or non-ASCII anywhere (browsers "fix" them up into hosts).
    if b.iter().any(|&c| c == b'\\' || c <= 0x20 || c >= 0x7f) {
        return None;
    }
    // Encoded forms of the same tricks ("/%2F%2Fevil", "/%5Cevil", "%09").
    let decoded: Vec<u8> = percent_encoding::percent_decode(b).collect();
    if matches!(decoded.get(1), Some(b'/') | Some(b'\\'))
        || decoded.iter().any(|&c| c == b'\\' || c < 0x20 || c == 0x7f)
    {
        return None;
    }
    Some(target)
}

/// Is `host` this gateway's host or one of the allowed domains?
fn host_allowed(host: &str, own_host: &str, allowed: &[String]) -> bool {
    host == own_host
        || allowed.iter().any(|d| match d.strip_prefix('.') {
            Some(suffix) => {
                host == suffix || host.strip_suffix(suffix).is_some_and(|p| p.ends_with('.'))
            }
            None => host == d,
        })
}

/// An absolute URL allowed as a redirect target, in canonical form.
pub fn safe_absolute(target: &str, own_origin: &str, allowed: &[String]) -> Option<String> {
    let b = target.as_bytes();
    if target.len() > 2048 || b.iter().any(|&c| c == b'\\' || c <= 0x20 || c >= 0x7f) {
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
    let own_host = own.host_str()?;
    let host = match u.host()? {
        url::Host::Domain(d) => d.to_string(),
        // IP literals only when they are this gateway's own host.
        ip => {
            let text = ip.to_string();
            if text != own_host {
                return None;
            }
            text
        }
    };
    host_allowed(&host, own_host, allowed).then(|| u.to_string())
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
        for ok in ["/", "/a", "/a/b?c=d&e=%2F", "/a#frag", "/%7Euser"] {
            assert_eq!(safe_relative(ok), Some(ok), "{ok}");
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
        ] {
            assert_eq!(safe_absolute(bad, own, &allowed), None, "{bad}");
        }
        assert_eq!(or_root_with(Some("https://evil.com"), own, &allowed), "/");
        assert_eq!(or_root_with(Some("/rel"), own, &allowed), "/rel");
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
        ] {
            assert_eq!(safe_relative(bad), None, "{bad:?}");
        }
    }
}
