//! Where the gateway may send a user after login or logout: only a relative path on this
//! host. Anything that a browser could read as another origin falls back to `/`.

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

/// The redirect target to use: `target` when safe, else `/`.
pub fn or_root(target: Option<&str>) -> String {
    target.and_then(safe_relative).unwrap_or("/").to_string()
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
