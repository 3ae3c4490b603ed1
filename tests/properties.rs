//! Property tests: the cookie codec, the path normaliser and the redirect validator hold their
//! invariants (and never panic) on arbitrary input.

use portcullis::config::CookieKey;
use portcullis::flow::redirect::{safe_absolute, safe_relative};
use portcullis::proxy::path::normalize;
use portcullis::session::{crypto::KeyRing, CookieValue, Identity, Session};
use proptest::prelude::*;

fn session_strategy() -> impl Strategy<Value = Session> {
    (
        any::<[u8; 16]>(),
        any::<u64>(),
        ".{0,300}",
        proptest::option::of(".{0,100}"),
        proptest::option::of(".{0,200}"),
        ".{0,40}",
        proptest::collection::vec(".{0,20}", 0..5),
    )
        .prop_map(|(id, t, at, rt, idt, sub, groups)| Session {
            id,
            created_at_ms: t / 2,
            expires_at: t,
            access_token: at,
            access_expires_at: t / 3,
            access_issued_at: t / 4,
            refresh_token: rt,
            id_token: idt,
            identity: Identity {
                sub,
                groups,
                ..Default::default()
            },
            last_seen: 0,
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn sealed_sessions_round_trip_and_detect_tampering(s in session_strategy(), flip in any::<usize>()) {
        let ring = KeyRing::new(&[CookieKey([9; 32])]);
        let sealed = ring.seal(b"_portcullis", &s.encode());
        let opened = ring.open(b"_portcullis", sealed.as_bytes()).unwrap();
        prop_assert_eq!(CookieValue::decode(&opened).unwrap(), CookieValue::Full(s));
        // Any change to the sealed text is refused (or decodes to the identical bytes).
        let mut bytes = sealed.into_bytes();
        let i = flip % bytes.len();
        bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
        if let Ok(plain) = ring.open(b"_portcullis", &bytes) {
            prop_assert_eq!(plain, opened);
        }
    }

    #[test]
    fn opening_garbage_never_panics(g in proptest::collection::vec(any::<u8>(), 0..600)) {
        let ring = KeyRing::new(&[CookieKey([9; 32])]);
        let _ = ring.open(b"_portcullis", &g);
        let _ = CookieValue::decode(&g);
    }

    #[test]
    fn normalised_paths_are_canonical(p in "/[a-zA-Z0-9./%;\\\\_~-]{0,40}") {
        if let Ok(n) = normalize(&p) {
            prop_assert!(n.starts_with('/'));
            prop_assert!(!n.contains("//"));
            prop_assert!(!n.split('/').any(|s| s == "." || s == ".."));
            let lower = n.to_ascii_lowercase();
            prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains("%00"));
            prop_assert!(!n.contains(';') && !n.contains('\\'));
            // Idempotent: the upstream re-normalising sees the same path.
            let again = normalize(&n).unwrap();
            prop_assert_eq!(again.as_ref(), n.as_ref());
        }
    }

    #[test]
    fn normalising_anything_never_panics(p in ".{0,80}") {
        let _ = normalize(&p);
    }

    #[test]
    fn accepted_relative_targets_stay_on_this_host(t in ".{0,60}") {
        if let Some(ok) = safe_relative(&t) {
            let decoded: Vec<u8> = percent_encoding::percent_decode(ok.as_bytes()).collect();
            prop_assert!(decoded.first() == Some(&b'/'));
            prop_assert!(!matches!(decoded.get(1), Some(b'/') | Some(b'\\')));
            prop_assert!(!ok.bytes().any(|c| !(0x21..=0x7e).contains(&c) || c == b'\\'));
        }
    }

    #[test]
    fn accepted_absolute_targets_are_on_allowed_hosts(t in "(https?://)?[a-z.@:/\\\\%?#-]{0,40}") {
        let allowed = vec![".example.com".to_string()];
        if let Some(ok) = safe_absolute(&t, "https://gw.test", &allowed) {
            let u = url::Url::parse(&ok).unwrap();
            let host = u.host_str().unwrap();
            prop_assert!(host == "gw.test" || host == "example.com" || host.ends_with(".example.com"), "{}", ok);
            prop_assert!(u.username().is_empty() && u.password().is_none());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// What the normaliser accepts decodes (percent-decoding) to UTF-8: an overlong form, a
    /// stray byte or a surrogate is refused, never forwarded for the upstream to read its way.
    #[test]
    fn accepted_paths_decode_to_utf8(p in "/(%[0-9a-fA-F]{2}|%[c-fC-F][0-9a-fA-F]%[89abAB][0-9a-fA-F]|[a-z./]){0,24}") {
        if let Ok(n) = normalize(&p) {
            prop_assert!(percent_encoding::percent_decode_str(&n).decode_utf8().is_ok(), "{}", n);
            prop_assert!(percent_encoding::percent_decode_str(&p).decode_utf8().is_ok(), "{}", p);
        }
    }

    /// Text in any script, percent-encoded as UTF-8 (any case), is accepted and decodes back.
    #[test]
    fn encoded_utf8_text_is_accepted(s in "[^\\x00-\\x7f]{1,12}", lower in any::<bool>()) {
        let mut p = String::from("/");
        for b in s.as_bytes() {
            p.push_str(&if lower { format!("%{b:02x}") } else { format!("%{b:02X}") });
        }
        let n = normalize(&p).unwrap();
        let decoded = percent_encoding::percent_decode_str(&n).decode_utf8().unwrap();
        prop_assert_eq!(decoded.as_ref(), format!("/{s}"));
    }
}
