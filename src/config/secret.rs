//! Secret values: never printed, compared in constant time.

use std::fmt;
use subtle::ConstantTimeEq;

/// A secret string (client secret). `Debug` and `Display` are redacted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Self(value)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A 256-bit cookie key, as decoded from `cookie.secrets`.
#[derive(Clone)]
pub struct CookieKey(pub [u8; 32]);

impl fmt::Debug for CookieKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CookieKey([redacted])")
    }
}

impl PartialEq for CookieKey {
    fn eq(&self, other: &Self) -> bool {
        self.0.ct_eq(&other.0).into()
    }
}

/// Constant-time equality of two byte strings (length is not secret), a word at a time: it
/// also compares whole session cookies on the request path, where subtle's byte-at-a-time
/// comparison of 1.5 KB costs as much as decrypting it.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, b_words) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut diff = 0u64;
    for (x, y) in a_words.remainder().iter().zip(b_words.remainder()) {
        diff |= u64::from(x ^ y);
    }
    for (x, y) in a_words.zip(b_words) {
        let word = |w: &[u8]| u64::from_ne_bytes(w.try_into().unwrap_or_default());
        diff |= word(x) ^ word(y);
    }
    std::hint::black_box(diff) == 0
}

/// Decodes a base64 cookie secret (standard or URL-safe alphabet, padding optional).
pub fn decode_cookie_key(text: &str) -> Result<CookieKey, String> {
    use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
    use base64::Engine;
    let trimmed = text.trim().trim_end_matches('=');
    let bytes = STANDARD_NO_PAD
        .decode(trimmed)
        .or_else(|_| URL_SAFE_NO_PAD.decode(trimmed))
        .map_err(|_| "is not valid base64 (generate one with `portcullis secret`)".to_string())?;
    let key: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        format!(
            "must be 32 bytes after base64 decoding, got {} (generate one with `portcullis secret`)",
            bytes.len()
        )
    })?;
    Ok(CookieKey(key))
}

/// The cookie keys this project has published in its examples. Anyone can seal a session
/// with them, so a deployment that kept one would accept forged sessions: start-up and
/// `check` warn about them, in any spelling (compared after decoding). Keep the list in step
/// with the shipped files.
const PUBLISHED_KEYS: &[&str] = &[
    // "REPLACExWITHxPORTCULLISxSECRETxx": config/portcullis.yaml, and deploy/kubernetes/*/secret.yaml
    // before they held a non-key placeholder.
    "UkVQTEFDRXhXSVRIeFBPUlRDVUxMSVN4U0VDUkVUeHg=",
    // config/demo.yaml and tests/js/demo.mjs, before `make demo` generated its own key.
    "gJDGcaRi/uH1koUW7MEmgnrRe/4o4uH2RZXQRJVpoUM=",
];

pub fn is_published(key: &CookieKey) -> bool {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    PUBLISHED_KEYS
        .iter()
        .any(|k| STANDARD.decode(k).is_ok_and(|b| b == key.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn published_example_keys_are_known_in_any_spelling() {
        for k in super::PUBLISHED_KEYS {
            let url_safe = k.replace('+', "-").replace('/', "_");
            for spelling in [k.to_string(), k.trim_end_matches('=').to_string(), url_safe] {
                let key = super::decode_cookie_key(&spelling).unwrap();
                assert!(super::is_published(&key), "{spelling}");
            }
        }
        // Any other 32-byte key is not.
        let other =
            super::decode_cookie_key("AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=").unwrap();
        assert!(!super::is_published(&other));
    }

    #[test]
    fn ct_eq_is_equality() {
        let long = "k".repeat(1500);
        for (a, b) in [
            ("", ""),
            ("a", "a"),
            ("abcdefghij", "abcdefghij"),
            (&long, &long),
        ] {
            assert!(super::ct_eq(a.as_bytes(), b.as_bytes()));
        }
        let mut other = long.clone().into_bytes();
        other[700] = b'x';
        for (a, b) in [
            ("a".as_bytes(), "".as_bytes()),
            (b"abcdefghij", b"abcdefghiX"),
            (b"Xbcdefghij", b"abcdefghij"),
            (long.as_bytes(), &other[..]),
        ] {
            assert!(!super::ct_eq(a, b));
        }
    }
}
