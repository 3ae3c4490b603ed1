//! The redirect validator never panics and never lets a target leave the allowed hosts.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::flow::redirect::{safe_absolute, safe_relative};

fuzz_target!(|data: &[u8]| {
    let Ok(t) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(ok) = safe_relative(t) {
        assert!(ok.starts_with('/') && !ok.starts_with("//") && !ok.starts_with("/\\"));
        assert!(ok.len() <= 2048);
    }
    let allowed = vec![".example.com".to_string()];
    if let Some(ok) = safe_absolute(t, "https://gw.test", &allowed) {
        // Sealed into the flow cookie: bounded as the target was.
        assert!(ok.len() <= 2048, "{} bytes", ok.len());
        let u = url::Url::parse(&ok).ok();
        let own = u.as_ref().map(|u| u.origin().ascii_serialization());
        let host = u.as_ref().and_then(|u| u.host_str().map(str::to_string));
        let host = host.unwrap_or_default();
        assert!(
            own.as_deref() == Some("https://gw.test")
                || host == "example.com"
                || host.ends_with(".example.com")
        );
    }
});
