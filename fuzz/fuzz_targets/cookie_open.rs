//! Whatever a browser sends as a session cookie: opening it never panics.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portcullis::config::CookieKey;
use portcullis::session::{crypto::KeyRing, CookieValue};

fuzz_target!(|data: &[u8]| {
    let ring = KeyRing::new(&[CookieKey([7; 32])]);
    if let Ok(plain) = ring.open(b"_portcullis", data) {
        let _ = CookieValue::decode(&plain);
    }
    let _ = CookieValue::decode(data);
});
