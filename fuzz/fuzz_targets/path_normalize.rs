//! The path normaliser never panics, and what it accepts is canonical and stable.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::proxy::path::normalize;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else { return };
    if let Ok(n) = normalize(path) {
        assert!(n.starts_with('/') && !n.contains("//"));
        assert!(!n.split('/').any(|s| s == "." || s == ".."));
        assert_eq!(normalize(&n).ok().as_deref(), Some(n.as_ref()));
    }
});
