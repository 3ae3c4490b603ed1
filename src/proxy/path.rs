//! One normalised path decides everything: the router, the route matcher and the upstream
//! all see the same one. Dot segments and `//` are resolved; anything a server could read
//! two ways (encoded `/` or `\`, NUL, `;` parameters, raw backslashes, controls, non-ASCII,
//! escapes that do not decode to UTF-8, encoded look-alikes of `/`, `\` and dot segments) is
//! refused rather than guessed.

use std::borrow::Cow;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path must start with /")]
    NotAbsolute,
    #[error("path contains a forbidden character")]
    ForbiddenChar,
    #[error("path contains an encoded separator or NUL")]
    EncodedSeparator,
    #[error("path contains ';' parameters")]
    Parameters,
    #[error("path climbs above the root")]
    AboveRoot,
    #[error("malformed percent-encoding")]
    BadEncoding,
    #[error("percent-encoding that is not UTF-8")]
    NotUtf8,
    #[error("dot segments leave the gateway's own endpoints")]
    LeavesGatewayPaths,
    #[error("a segment of dots and spaces other than . and ..")]
    WindowsDots,
    #[error("an encoded look-alike of /, \\ or a dot segment")]
    LookAlike,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Canonical form of one segment: unreserved characters decoded, other escapes upper-cased.
/// Escaped bytes above 0x7F must decode to UTF-8: an overlong form (`%C0%AE` for `.`), a
/// lone `%FF` or a surrogate is read as something else, or refused, by one server or another.
fn segment(raw: &str) -> Result<Cow<'_, str>, PathError> {
    let b = raw.as_bytes();
    if !b.contains(&b'%') {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut non_ascii = false;
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEncoding);
            };
            let c = h * 16 + l;
            match c {
                b'/' | b'\\' | 0 => return Err(PathError::EncodedSeparator),
                b';' => return Err(PathError::Parameters),
                c if c < 0x20 || c == 0x7f => return Err(PathError::ForbiddenChar),
                c if is_unreserved(c) => out.push(c as char),
                c => {
                    non_ascii |= c >= 0x80;
                    out.push('%');
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(c >> 4)]));
                    out.push(char::from(b"0123456789ABCDEF"[usize::from(c & 15)]));
                }
            }
            i += 3;
        } else {
            out.push(b[i] as char);
            i += 1;
        }
    }
    // Every escape is well-formed by now, and the raw bytes are ASCII (see `normalize`): the
    // segment decodes to UTF-8 exactly when its escaped bytes form whole UTF-8 sequences.
    if non_ascii {
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .map_err(|_| PathError::NotUtf8)?;
        if is_look_alike(&decoded) {
            return Err(PathError::LookAlike);
        }
    }
    Ok(Cow::Owned(out))
}

/// Characters Unicode compatibility normalisation (NFKC, which some apps and frameworks apply
/// to paths, and Windows' best-fit mappings) turns into `/` or `\`...
const SEPARATOR_LOOK_ALIKES: [char; 3] = ['\u{FF0F}', '\u{FF3C}', '\u{FE68}'];
/// ...into dots (one, two or three)...
const DOT_LOOK_ALIKES: [char; 5] = ['\u{FF0E}', '\u{2024}', '\u{2025}', '\u{2026}', '\u{FE52}'];
/// ...and into a space.
const SPACE_LOOK_ALIKE: char = '\u{3000}';

/// A decoded segment that such an app would read as holding a separator, or as a segment of
/// dots (and spaces): `/public/．．/admin` is `/admin` to it, past the routes. Dots in a name
/// (`Wait…`) pass.
fn is_look_alike(decoded: &str) -> bool {
    decoded.contains(SEPARATOR_LOOK_ALIKES)
        || (decoded.contains(DOT_LOOK_ALIKES)
            && decoded
                .chars()
                .all(|c| matches!(c, '.' | ' ' | SPACE_LOOK_ALIKE) || DOT_LOOK_ALIKES.contains(&c)))
}

/// A segment that needs a closer look: empty (`//`), or dots only (`.` and `..` are resolved,
/// more dots refused).
fn is_dot_or_empty(segment: &[u8]) -> bool {
    segment.iter().all(|&c| c == b'.')
}

/// Dots and (escaped) spaces only, but not `.` or `..` (`...`, `..%20`): Windows drops a
/// name's trailing dots and spaces, so an app on IIS would take it for `..` or `.` and climb
/// where the routes did not look.
fn is_windows_dots(canonical: &str) -> bool {
    let mut b = canonical.as_bytes();
    let mut dot = false;
    while let Some((&c, rest)) = b.split_first() {
        match c {
            b'.' => dot = true,
            b'%' if rest.starts_with(b"20") => {
                b = &rest[2..];
                continue;
            }
            _ => return false,
        }
        b = rest;
    }
    dot
}

/// Normalises a request path. Returns the input unchanged (borrowed) when already canonical.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute);
    }
    // One pass: refuse what is never allowed, and see whether anything needs resolving
    // (`%`, `//`, a `.` or `..` segment). Most paths need nothing.
    let mut plain = true;
    let mut segment_start = 1;
    for (i, &c) in b.iter().enumerate().skip(1) {
        match c {
            c if c <= 0x20 || c >= 0x7f || c == b'\\' => return Err(PathError::ForbiddenChar),
            b';' => return Err(PathError::Parameters),
            b'%' => plain = false,
            b'/' => {
                plain &= !is_dot_or_empty(&b[segment_start..i]);
                segment_start = i + 1;
            }
            _ => {}
        }
    }
    let last = &b[segment_start..];
    plain &= last.is_empty() || !is_dot_or_empty(last);
    if plain {
        return Ok(Cow::Borrowed(path));
    }
    let mut out: Vec<Cow<'_, str>> = Vec::new();
    let raw_segments: Vec<&str> = path[1..].split('/').collect();
    let last = raw_segments.len().saturating_sub(1);
    let mut trailing = false;
    for (i, raw) in raw_segments.into_iter().enumerate() {
        let seg = segment(raw)?;
        match seg.as_ref() {
            "." | "" => trailing = i == last,
            ".." => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot);
                }
                trailing = i == last;
            }
            s if is_windows_dots(s) => return Err(PathError::WindowsDots),
            _ => {
                out.push(seg);
                trailing = false;
            }
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if s.is_empty() || trailing {
        s.push('/');
    }
    if s == path {
        return Ok(Cow::Borrowed(path));
    }
    Ok(Cow::Owned(s))
}

/// The normalised path percent-decoded. Most apps decode the path before they route it, so
/// `/wiki/Special:x` and `/wiki/Special%3Ax`, or `/caf%C3%A9/` and `/café/`, are one page to
/// them; some (Express, Rails) route on it as sent. Normalisation refused encoded separators,
/// NUL and escapes that are not UTF-8: decoding changes no segment.
pub fn route_key(normalised: &str) -> Cow<'_, str> {
    if !normalised.as_bytes().contains(&b'%') {
        return Cow::Borrowed(normalised);
    }
    percent_encoding::percent_decode_str(normalised)
        .decode_utf8()
        .unwrap_or(Cow::Borrowed(normalised))
}

/// A normalised path in the two spellings routes look at: as sent (normalised) and decoded
/// (see `Route::covers`).
pub struct RoutePath<'a> {
    pub sent: &'a str,
    pub decoded: Cow<'a, str>,
}

impl<'a> RoutePath<'a> {
    pub fn new(normalised: &'a str) -> Self {
        Self {
            sent: normalised,
            decoded: route_key(normalised),
        }
    }
}

/// A decoded prefix as a browser sends it: spaces, quotes, `#`, `?`, `%`, `<`, `>`, `` ` ``,
/// braces and non-ASCII characters escaped (upper-case hex, as normalisation writes them), the
/// rest as it is.
pub fn sent_form(decoded: &str) -> String {
    let mut out = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        let escape = !c.is_ascii()
            || c.is_ascii_control()
            || matches!(c, ' ' | '"' | '#' | '%' | '<' | '>' | '?' | '`' | '{' | '}');
        if !escape {
            out.push(c);
            continue;
        }
        let mut buf = [0u8; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            out.push('%');
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b >> 4)]));
            out.push(char::from(b"0123456789ABCDEF"[usize::from(b & 15)]));
        }
    }
    out
}

/// A configured route prefix, percent-decoded (see [`route_key`]). Refused, with the reason,
/// when no request could ever match it (requests are matched once normalised).
pub fn route_prefix(prefix: &str) -> Result<String, String> {
    if !prefix.starts_with('/') {
        return Err("must start with /".into());
    }
    let lower = prefix.to_ascii_lowercase();
    if ["%2f", "%5c", "%00", "%3b", ";", "\\"]
        .iter()
        .any(|s| lower.contains(s))
    {
        return Err(format!(
            "`{prefix}` never matches: requests with an encoded / or \\, NUL or ';' parameters \
             are refused (400)"
        ));
    }
    let decoded = percent_encoding::percent_decode_str(prefix)
        .decode_utf8()
        .map_err(|_| format!("`{prefix}` is not UTF-8 once percent-decoded"))?;
    if decoded.chars().any(|c| c.is_ascii_control()) {
        return Err(format!(
            "`{prefix}` never matches: requests with control characters are refused (400)"
        ));
    }
    // Every segment followed by a `/` is whole in a request path, never `.`, `..` or empty;
    // the last one may be the start of a name (`/.well-known` starts with `/.`).
    let mut segments: Vec<&str> = decoded[1..].split('/').collect();
    segments.pop();
    if segments.iter().any(|s| matches!(*s, "" | "." | "..")) {
        return Err(format!(
            "`{prefix}` never matches: requests are matched with `.`, `..` and `//` resolved"
        ));
    }
    if decoded.contains(SEPARATOR_LOOK_ALIKES) || segments.iter().any(|s| is_look_alike(s)) {
        return Err(format!(
            "`{prefix}` never matches: requests with look-alikes of `/`, `\\` or dot segments \
             are refused (400)"
        ));
    }
    Ok(decoded.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_see_every_spelling_of_a_path_as_one() {
        for (normalised, key) in [
            ("/admin/", "/admin/"),
            ("/wiki/Special%3AUserrights", "/wiki/Special:Userrights"),
            ("/reports/q%26a/1", "/reports/q&a/1"),
            ("/my%20docs/x", "/my docs/x"),
            ("/caf%C3%A9/x", "/café/x"),
            ("/x%3Fy%23z", "/x?y#z"),
            ("/a%2541", "/a%41"),
        ] {
            assert_eq!(normalize(normalised).unwrap(), normalised);
            assert_eq!(route_key(normalised), key, "{normalised}");
        }
        for (prefix, key) in [
            ("/wiki/Special:", "/wiki/Special:"),
            ("/wiki/Special%3a", "/wiki/Special:"),
            ("/café/", "/café/"),
            ("/caf%c3%a9/", "/café/"),
            ("/my docs/", "/my docs/"),
            ("/a%2541", "/a%41"),
            ("/.well-known", "/.well-known"),
            ("/a%C2%85b", "/a\u{85}b"),
            ("/a/..", "/a/.."),
            ("/．", "/．"),
            ("/", "/"),
        ] {
            assert_eq!(route_prefix(prefix).as_deref(), Ok(key), "{prefix}");
        }
        for (decoded, sent) in [
            ("/wiki/Special:", "/wiki/Special:"),
            ("/café/", "/caf%C3%A9/"),
            ("/my docs/", "/my%20docs/"),
            ("/a%41", "/a%2541"),
            ("/q?a#b", "/q%3Fa%23b"),
            ("/@scope/", "/@scope/"),
        ] {
            assert_eq!(sent_form(decoded), sent, "{decoded}");
            assert_eq!(normalize(sent).unwrap(), sent, "{sent} is not normalised");
            assert_eq!(route_key(sent), decoded, "{sent}");
        }
        for dead in [
            "api/",
            "/a/../b/",
            "/a/./b",
            "//a",
            "/a//b",
            "/a%2fb/",
            "/a%2Fb",
            "/a%5cb",
            "/a\\b",
            "/a;v=1/",
            "/a%3bb",
            "/a%00",
            "/a%0ab",
            "/a%7f",
            "/%ff/",
            "/%2e%2e/x",
            "/a／b",
            "/a%EF%BC%BCb",
            "/．．/x",
        ] {
            assert!(route_prefix(dead).is_err(), "{dead}");
        }
    }

    #[test]
    fn canonical_paths_pass_unchanged() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/a%20b",
            "/%E2%82%AC",
            "/caf%C3%A9",
            "/%F0%9F%A6%80/x",
            "/a.b/c..d/.e",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(x)) if x == p),
                "{p}"
            );
        }
    }

    #[test]
    fn dots_and_slashes_resolve() {
        let cases = [
            ("/public/../admin", "/admin"),
            ("/public/./x", "/public/x"),
            ("//admin", "/admin"),
            ("/a//b", "/a/b"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/x/%2e%2e/y", "/y"),
            ("/p/%2E%2E/admin", "/admin"),
            ("/%61dmin", "/admin"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), *want, "{input}");
        }
        assert_eq!(normalize("/x/%3f/../y").unwrap(), "/x/y");
        assert_eq!(normalize("/x%3fy%23z").unwrap(), "/x%3Fy%23z");
        assert_eq!(normalize("/x/%3fy/").unwrap(), "/x/%3Fy/");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "/a%2fb",
            "/a%2Fb",
            "/a%5cb",
            "/a%00",
            "/a\\b",
            "/a;b",
            "/a%3bb",
            "/..",
            "/a/../..",
            "/%zz",
            "/%4",
            "/%2e%2e/x",
            "a",
            "",
            "/\u{e9}",
            "/a b",
            "/%09",
            // Dots and spaces Windows would trim to `..` or `.`.
            "/public/...",
            "/public/.../admin",
            "/public/..%20/admin",
            "/public/.%20/x",
            "/public/..%2e/admin",
            "/public/%20../x",
        ] {
            assert!(normalize(p).is_err(), "{p:?}");
        }
    }

    #[test]
    fn encoded_look_alikes_of_separators_and_dot_segments_are_refused() {
        for p in [
            "/public/%EF%BC%8E%EF%BC%8E/admin", // fullwidth full stops
            "/public/%ef%bc%8e%ef%bc%8e",
            "/public/.%EF%BC%8E/admin",
            "/public/%E2%80%A5/admin",      // two dot leader
            "/public/%E2%80%A4%E2%80%A4/x", // one dot leaders
            "/public/%E2%80%A6/admin",      // ellipsis: `...`
            "/public/%EF%B9%92%EF%B9%92/x", // small full stops
            "/public/%EF%BC%8E%E3%80%80/x", // a dot and an ideographic space
            "/public/a%EF%BC%8Fb",          // fullwidth solidus
            "/public/%EF%BC%BC..%EF%BC%BCadmin",
            "/public/a%EF%B9%A8b", // small reverse solidus
        ] {
            assert_eq!(normalize(p), Err(PathError::LookAlike), "{p:?}");
        }
        // Look-alike dots inside a name, and other fullwidth characters, are names.
        for p in [
            "/wiki/Wait%E2%80%A6",
            "/v%EF%BC%8E2/x",
            "/%EF%BC%A1%EF%BC%A2",
            "/q%EF%BC%9F",
        ] {
            assert!(normalize(p).is_ok(), "{p:?}");
        }
    }

    #[test]
    fn escapes_must_decode_to_utf8() {
        // Valid UTF-8, escaped in either case: kept (escapes upper-cased).
        assert_eq!(normalize("/caf%c3%a9").unwrap(), "/caf%C3%A9");
        assert_eq!(normalize("/x/%e2%82%ac/../y%C3%A9").unwrap(), "/x/y%C3%A9");
        assert_eq!(normalize("/%ef%bf%bd").unwrap(), "/%EF%BF%BD");
        assert_eq!(normalize("/%F4%8F%BF%BF").unwrap(), "/%F4%8F%BF%BF");
        for p in [
            "/public/%c0%ae%c0%ae/admin", // overlong `.`
            "/%c0%af",                    // overlong `/`
            "/%e0%80%ae",                 // overlong, three bytes
            "/%ff",
            "/a%fe",
            "/%80",             // a continuation byte alone
            "/%c3",             // truncated
            "/%c3/%a9",         // split by a separator
            "/%c3a%a9",         // interrupted by ASCII
            "/%e2%82",          // truncated, three bytes
            "/%ed%a0%80",       // UTF-16 surrogate
            "/%f4%90%80%80",    // above U+10FFFF
            "/%f8%88%80%80%80", // five-byte form
        ] {
            assert_eq!(normalize(p), Err(PathError::NotUtf8), "{p:?}");
        }
    }
}
