//! The key ring: AES-256-GCM seal/open with a key id, so several keys can be live.
//! Sealed layout: version (1) | key id (4) | nonce (12) | ciphertext+tag, base64url (no padding).
//! The associated data is the cookie's name, so a value cannot be moved between cookies.

use crate::config::CookieKey;
use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

const VERSION: u8 = 1;
const KEY_ID_LEN: usize = 4;
const NONCE_LEN: usize = 12;
const HEADER_LEN: usize = 1 + KEY_ID_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;
/// The shortest text `seal` makes (an empty plaintext): anything shorter is not sealed.
const MIN_SEALED_CHARS: usize = ((HEADER_LEN + TAG_LEN) * 4).div_ceil(3);

/// Why a sealed value did not open. Callers treat all of them as "no session";
/// the reason feeds metrics and debug logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("not valid base64")]
    Encoding,
    #[error("too short or unknown format version")]
    Format,
    #[error("sealed with a key that is not configured")]
    UnknownKey,
    #[error("authentication failed (tampered or wrong cookie)")]
    Tampered,
}

struct Key {
    id: [u8; KEY_ID_LEN],
    cipher: Aes256Gcm,
}

/// Keys built once at start-up: the first seals, every key opens.
pub struct KeyRing {
    keys: Vec<Key>,
    /// Derived MAC keys for small non-secret tokens (CSRF), independent of the AEAD keys, one
    /// per key: the first makes tokens, all check them (a token made before a rotation, or
    /// by a replica not rotated yet, still counts).
    mac_keys: Vec<[u8; 32]>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyRing({} keys)", self.keys.len())
    }
}

fn key_id(key: &[u8; 32]) -> [u8; KEY_ID_LEN] {
    let d = Sha256::new()
        .chain_update(b"portcullis key id\0")
        .chain_update(key)
        .finalize();
    let mut id = [0u8; KEY_ID_LEN];
    id.copy_from_slice(&d[..KEY_ID_LEN]);
    id
}

/// The lower-case hex digits, by value.
pub const HEX_DIGITS: &[u8; 16] = b"0123456789abcdef";

/// The SHA-256 of `data` in lower-case hex: how a value that must not be stored as it is
/// (a sign-in state, a logout token's `jti`) is named in Redis, the same on every replica.
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// Lower-case hex of `bytes`: ids and digests in storage keys and names.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX_DIGITS[usize::from(b >> 4)]));
        s.push(char::from(HEX_DIGITS[usize::from(b & 0xf)]));
    }
    s
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The OS RNG failing is not recoverable and never caused by a request.
    if getrandom::fill(&mut b).is_err() {
        std::process::abort();
    }
    b
}

impl KeyRing {
    /// `keys` must not be empty (config validation guarantees it).
    pub fn new(keys: &[CookieKey]) -> Self {
        let mac_keys = keys
            .iter()
            .map(|k| {
                Sha256::new()
                    .chain_update(b"portcullis mac key\0")
                    .chain_update(k.0)
                    .finalize()
                    .into()
            })
            .collect();
        Self {
            keys: keys
                .iter()
                .map(|k| Key {
                    id: key_id(&k.0),
                    cipher: Aes256Gcm::new(&k.0.into()),
                })
                .collect(),
            mac_keys,
        }
    }

    /// Encrypts `plain` under the first key, bound to `aad`; returns base64url text.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> String {
        let Some(key) = self.keys.first() else {
            return String::new();
        };
        let nonce = random_bytes::<NONCE_LEN>();
        let mut out = Vec::with_capacity(HEADER_LEN + plain.len() + TAG_LEN);
        out.push(VERSION);
        out.extend_from_slice(&key.id);
        out.extend_from_slice(&nonce);
        match key
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
        {
            Ok(ct) => out.extend_from_slice(&ct),
            // Only possible for plaintexts over 64 GiB.
            Err(_) => return String::new(),
        }
        base64_simd::URL_SAFE_NO_PAD.encode_to_string(out)
    }

    /// Decrypts base64url text sealed by `seal` with any configured key.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        let raw = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| OpenError::Encoding)?;
        if raw.len() < HEADER_LEN + TAG_LEN || raw[0] != VERSION {
            return Err(OpenError::Format);
        }
        let id = &raw[1..1 + KEY_ID_LEN];
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(OpenError::UnknownKey)?;
        let nonce = Nonce::from_slice(&raw[1 + KEY_ID_LEN..HEADER_LEN]);
        key.cipher
            .decrypt(
                nonce,
                Payload {
                    msg: &raw[HEADER_LEN..],
                    aad,
                },
            )
            .map_err(|_| OpenError::Tampered)
    }

    /// Refuses base64url text that is not sealed by this ring from its first 8 characters
    /// (6 bytes: the version and the key id), as `open` would refuse it whole. Shorter text
    /// is left to `open`.
    fn check_head(&self, sealed: &[u8]) -> Result<(), OpenError> {
        let Some(head) = sealed.get(..8) else {
            return Ok(());
        };
        let mut raw = [0u8; 6];
        URL_SAFE_NO_PAD
            .decode_slice(head, &mut raw)
            .map_err(|_| OpenError::Encoding)?;
        if raw[0] != VERSION {
            return Err(OpenError::Format);
        }
        match self.keys.iter().any(|k| k.id == raw[1..1 + KEY_ID_LEN]) {
            true => Ok(()),
            false => Err(OpenError::UnknownKey),
        }
    }

    /// Whether base64url text may be sealed by this ring: as long as the shortest seal, with
    /// the version and a known key id in its head. False is certain; true still needs `open`.
    pub fn may_open(&self, sealed: &[u8]) -> bool {
        sealed.len() >= MIN_SEALED_CHARS && self.check_head(sealed).is_ok()
    }

    /// Like `open`, but decodes and decrypts in a reused per-thread buffer and hands the
    /// plaintext to `f`: no allocation on the hot path.
    pub fn open_with<T>(
        &self,
        aad: &[u8],
        sealed: &[u8],
        f: impl FnOnce(&[u8]) -> T,
    ) -> Result<T, OpenError> {
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with(|cell| {
            let Ok(mut buf) = cell.try_borrow_mut() else {
                // Re-entered (cannot happen on the request path): fall back to allocating.
                return self.open(aad, sealed).map(|p| f(&p));
            };
            buf.clear();
            // A value that is not sealed under one of these keys (a stray cookie of the
            // session's name) is refused from its first bytes, before the whole is decoded.
            self.check_head(sealed)?;
            // SIMD base64: the cookie is the largest thing decoded per request.
            base64_simd::URL_SAFE_NO_PAD
                .decode_append(sealed, &mut *buf)
                .map_err(|_| OpenError::Encoding)?;
            if buf.len() < HEADER_LEN + TAG_LEN || buf[0] != VERSION {
                return Err(OpenError::Format);
            }
            let key = self
                .keys
                .iter()
                .find(|k| k.id == buf[1..1 + KEY_ID_LEN])
                .ok_or(OpenError::UnknownKey)?;
            let (head, rest) = buf.split_at_mut(HEADER_LEN);
            let (ct, tag) = rest.split_at_mut(rest.len() - TAG_LEN);
            key.cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&head[1 + KEY_ID_LEN..]),
                    aad,
                    ct,
                    aes_gcm::Tag::from_slice(tag),
                )
                .map_err(|_| OpenError::Tampered)?;
            let out = f(ct);
            // Plaintext (tokens) does not linger in the buffer.
            ct.fill(0);
            Ok(out)
        })
    }

    /// A keyed digest (for CSRF tokens bound to a session), base64url, with the first key.
    pub fn mac(&self, purpose: &[u8], data: &[u8]) -> String {
        self.mac_keys
            .first()
            .map(|k| mac_with(k, purpose, data))
            .unwrap_or_default()
    }

    /// Is `sent` the digest `mac` gives with any of the keys? (Constant time for each.)
    pub fn mac_matches(&self, purpose: &[u8], data: &[u8], sent: &[u8]) -> bool {
        self.mac_keys.iter().fold(false, |found, k| {
            crate::config::secret::ct_eq(sent, mac_with(k, purpose, data).as_bytes()) | found
        })
    }
}

fn mac_with(key: &[u8; 32], purpose: &[u8], data: &[u8]) -> String {
    let d = Sha256::new()
        .chain_update(key)
        .chain_update(purpose)
        .chain_update([0u8])
        .chain_update(data)
        .finalize();
    URL_SAFE_NO_PAD.encode(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(b: u8) -> KeyRing {
        KeyRing::new(&[CookieKey([b; 32])])
    }

    #[test]
    fn hex_is_lower_case_two_digits_a_byte() {
        assert_eq!(hex(&[0x00, 0x0a, 0xab, 0xff]), "000aabff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn macs_of_every_key_are_accepted() {
        let old = ring(1);
        let rotated = KeyRing::new(&[CookieKey([2; 32]), CookieKey([1; 32])]);
        let before = old.mac(b"p", b"d");
        assert!(rotated.mac_matches(b"p", b"d", before.as_bytes()));
        assert!(!old.mac_matches(b"p", b"d", rotated.mac(b"p", b"d").as_bytes()));
        assert!(!rotated.mac_matches(b"q", b"d", before.as_bytes()));
        assert!(!rotated.mac_matches(b"p", b"e", before.as_bytes()));
        assert!(!rotated.mac_matches(b"p", b"d", b""));
    }

    #[test]
    fn values_not_sealed_under_the_ring_are_refused_from_their_first_bytes() {
        let (r, other) = (ring(1), ring(2));
        let mine = r.seal(b"a", b"hello");
        assert_eq!(r.check_head(mine.as_bytes()), Ok(()));
        assert_eq!(
            r.open_with(b"a", mine.as_bytes(), |p| p.to_vec()),
            Ok(b"hello".to_vec())
        );
        // Another key's seal, its tail cut off: refused from the head alone.
        let theirs = other.seal(b"a", b"hello");
        assert_eq!(
            r.check_head(&theirs.as_bytes()[..8]),
            Err(OpenError::UnknownKey)
        );
        assert_eq!(
            r.open_with(b"a", theirs.as_bytes(), |p| p.to_vec()),
            Err(OpenError::UnknownKey)
        );
        assert_eq!(r.check_head(b"!!!!!!!!!!!!"), Err(OpenError::Encoding));
        assert_eq!(r.check_head(b"AAAAAAAAAAAAAAAA"), Err(OpenError::Format));
        // Too short to say: left to the whole decode.
        assert_eq!(r.check_head(b"AQID"), Ok(()));
        assert!(r.may_open(mine.as_bytes()));
        assert!(!r.may_open(theirs.as_bytes()));
        // A head of the right key, too short to be a seal.
        assert!(!r.may_open(&mine.as_bytes()[..40]));
    }

    #[test]
    fn round_trip_and_binding() {
        let r = ring(1);
        let s = r.seal(b"a", b"hello");
        assert_eq!(r.open(b"a", s.as_bytes()).unwrap(), b"hello");
        assert_eq!(r.open(b"b", s.as_bytes()), Err(OpenError::Tampered));
        assert_eq!(ring(2).open(b"a", s.as_bytes()), Err(OpenError::UnknownKey));
        assert_ne!(s, r.seal(b"a", b"hello"), "fresh nonce per seal");
    }

    #[test]
    fn rotation_opens_with_old_key() {
        let old = ring(1);
        let s = old.seal(b"a", b"x");
        let both = KeyRing::new(&[CookieKey([2; 32]), CookieKey([1; 32])]);
        assert_eq!(both.open(b"a", s.as_bytes()).unwrap(), b"x");
    }

    #[test]
    fn open_with_matches_open() {
        let r = ring(1);
        let s = r.seal(b"a", b"hello world");
        assert_eq!(
            r.open_with(b"a", s.as_bytes(), |p| p.to_vec()).unwrap(),
            b"hello world"
        );
        assert_eq!(
            r.open_with(b"b", s.as_bytes(), |p| p.len()),
            Err(OpenError::Tampered)
        );
        assert_eq!(
            r.open_with(b"a", b"!!", |p| p.len()),
            Err(OpenError::Encoding)
        );
    }

    #[test]
    fn garbage_never_panics() {
        let r = ring(1);
        for g in ["", "!!!", "AAAA", &"A".repeat(100)] {
            assert!(r.open(b"a", g.as_bytes()).is_err());
        }
        let mut s = r.seal(b"a", b"hello").into_bytes();
        let last = s.len() - 1;
        s[last] = if s[last] == b'A' { b'B' } else { b'A' };
        assert!(r.open(b"a", &s).is_err());
    }

    /// Every value too short to hold a header and a tag, even one that starts like a real
    /// seal (version byte, a configured key's id), is refused as malformed by both readers.
    #[test]
    fn short_values_are_malformed() {
        let r = ring(1);
        let real = URL_SAFE_NO_PAD
            .decode(r.seal(b"a", b"").as_bytes())
            .unwrap_or_default();
        assert_eq!(real.len(), HEADER_LEN + TAG_LEN);
        for len in 0..real.len() {
            let short = base64_simd::URL_SAFE_NO_PAD.encode_to_string(&real[..len]);
            assert_eq!(r.open(b"a", short.as_bytes()), Err(OpenError::Format));
            assert_eq!(
                r.open_with(b"a", short.as_bytes(), |p| p.len()),
                Err(OpenError::Format),
                "{len} bytes"
            );
        }
        // The shortest real seal: an empty plaintext.
        let empty = r.seal(b"a", b"");
        assert_eq!(r.open(b"a", empty.as_bytes()), Ok(Vec::new()));
        assert_eq!(r.open_with(b"a", empty.as_bytes(), |p| p.len()), Ok(0));
    }
}
