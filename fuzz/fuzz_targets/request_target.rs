//! What routes a request, on whatever a client sends: the request target as the router
//! normalises it, the Host the routes are matched on, a trusted proxy's X-Original-URL (as
//! forward-auth reads it), method overrides and the callback's and login's query parameters.
//! Nothing panics; a normalised target is canonical, keeps its query and stays under the
//! gateway's paths when it started there; a valid Host's host part is itself a valid host.
//!
//! Input: `\n`-separated lines: request target, Host, X-Original-URL, method override.
#![no_main]
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use libfuzzer_sys::fuzz_target;
use portcullis::config::FLOW_PREFIX;
use portcullis::flow::redirect::{or_root_with, safe_relative};
use portcullis::flow::{is_flow_path, is_forward_auth_path, query_param};
use portcullis::policy::routes::{host_only, method_override, valid_host, valid_host_bytes};
use portcullis::proxy::path::normalize;
use portcullis::router::{normalize_uri, request_host};

fn line<'a>(lines: &mut impl Iterator<Item = &'a [u8]>) -> &'a str {
    lines
        .next()
        .and_then(|l| std::str::from_utf8(l).ok())
        .unwrap_or("")
}

fuzz_target!(|data: &[u8]| {
    let mut lines = data.split(|&b| b == b'\n');
    let target = line(&mut lines);
    let host = line(&mut lines);
    let original_url = line(&mut lines);
    let override_ = line(&mut lines);

    // The Host the routes see.
    assert_eq!(valid_host(host), valid_host_bytes(host.as_bytes()));
    if valid_host(host) && !host.starts_with('[') {
        let h = host_only(host);
        assert!(!h.contains(':') && !h.ends_with('.'), "{host:?} -> {h:?}");
        assert!(h.is_empty() || valid_host(h), "{host:?} -> {h:?}");
        assert_eq!(host_only(h), h);
    }

    // The request target, as the HTTP/1 reader takes it and the router normalises it.
    if let Ok(uri) = target.parse::<Uri>() {
        if uri.authority().is_some_and(|a| !valid_host(a.as_str())) {
            return;
        }
        let mut b = Request::builder().method(Method::GET).uri(uri.clone());
        if let Ok(v) = HeaderValue::from_str(host) {
            b = b.header(http::header::HOST, v);
        }
        if let Ok(v) = HeaderValue::from_str(override_) {
            b = b.header("x-http-method-override", v);
        }
        let Ok(mut req) = b.body(()) else { return };
        let _ = request_host(&req);
        if normalize_uri(&mut req).is_ok() {
            let path = req.uri().path();
            assert!(
                matches!(normalize(path), Ok(std::borrow::Cow::Borrowed(_))),
                "{target:?} -> {path:?} is not canonical"
            );
            assert_eq!(req.uri().query(), uri.query(), "the query changed");
            assert_eq!(req.uri().authority(), uri.authority());
            if uri.path().starts_with(FLOW_PREFIX) {
                assert!(
                    path.starts_with(FLOW_PREFIX),
                    "{target:?} left /oauth2/: {path:?}"
                );
            }
            if is_forward_auth_path(path) {
                assert!(is_flow_path(path));
            }
            let again = req.uri().to_string().parse::<Uri>().ok();
            assert_eq!(
                again.as_ref(),
                Some(req.uri()),
                "the normalised target reads otherwise"
            );
        }
        let _ = method_override(req.headers(), req.uri().query());

        // The gateway's own endpoints' parameters.
        let query = req.uri().query();
        for name in [
            "state",
            "code",
            "iss",
            "error",
            "error_description",
            "_method",
        ] {
            let _ = query_param(query, name);
        }
        let rd = query_param(query, "rd");
        let allowed = vec![".example.com".to_string()];
        let to = or_root_with(rd.as_deref(), "https://gw.test", &allowed);
        if safe_relative(&to).is_none() {
            let u = url::Url::parse(&to).expect("an absolute target that parses");
            let h = u.host_str().unwrap_or_default();
            assert!(
                u.origin().ascii_serialization() == "https://gw.test"
                    || h == "example.com"
                    || h.ends_with(".example.com"),
                "{to:?}"
            );
        }
    }

    // A trusted proxy's X-Original-URL (forward-auth): its path is matched once normalised.
    if let Ok(uri) = original_url.parse::<Uri>() {
        if let Ok(p) = normalize(uri.path()) {
            assert_eq!(normalize(&p).ok().as_deref(), Some(p.as_ref()));
        }
        if let Some(a) = uri.authority() {
            let _ = host_only(a.as_str());
        }
    }
    let mut h = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(override_) {
        h.insert("x-method-override", v);
        if let Ok(Some(m)) = method_override(&h, Some(original_url)) {
            assert!(!m.as_str().bytes().any(|b| b.is_ascii_lowercase()));
        }
    }
});
