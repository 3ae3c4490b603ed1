//! Tokens as a sealed session carries them. Most tokens are base64url text: a JWT is three
//! base64url segments joined by dots, and many opaque tokens are one. Kept as the segments'
//! bytes they take a quarter less room in the cookie the browser sends with every request
//! (and large tokens need fewer cookie chunks); any other token is kept as it is.
//!
//! Only canonical base64url (no padding, unused bits zero) is taken apart, so the text made
//! again from the bytes is the token, byte for byte.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::borrow::Cow;

#[derive(Serialize, Deserialize)]
enum Packed<'a> {
    Text(Cow<'a, str>),
    Segments(Vec<Segment>),
}

/// Raw bytes, written as one byte string rather than a sequence of numbers.
struct Segment(Vec<u8>);

impl Serialize for Segment {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Segment {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Segment;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Segment, E> {
                Ok(Segment(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Segment, E> {
                Ok(Segment(v))
            }
        }
        d.deserialize_byte_buf(Bytes)
    }
}

fn pack(token: &str) -> Packed<'_> {
    let segments: Result<Vec<Segment>, _> = token
        .split('.')
        .map(|part| URL_SAFE_NO_PAD.decode(part).map(Segment))
        .collect();
    match segments {
        Ok(segments) => Packed::Segments(segments),
        Err(_) => Packed::Text(Cow::Borrowed(token)),
    }
}

fn unpack(packed: Packed) -> String {
    match packed {
        Packed::Text(t) => t.into_owned(),
        Packed::Segments(segments) => {
            let len = segments.iter().map(|s| s.0.len() * 4 / 3 + 3).sum();
            let mut out = String::with_capacity(len);
            for (i, segment) in segments.iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                URL_SAFE_NO_PAD.encode_string(&segment.0, &mut out);
            }
            out
        }
    }
}

/// `#[serde(with = "packed::token")]` for a `String` token.
pub mod token {
    use super::*;

    pub fn serialize<S: Serializer>(token: &str, s: S) -> Result<S::Ok, S::Error> {
        pack(token).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Packed::deserialize(d).map(unpack)
    }
}

/// `#[serde(with = "packed::optional_token")]` for an `Option<String>` token.
pub mod optional_token {
    use super::*;

    pub fn serialize<S: Serializer>(token: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
        token.as_deref().map(pack).serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<Packed>::deserialize(d).map(|p| p.map(unpack))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn round_trip(token: &str) -> (String, usize) {
        let bytes = postcard::to_stdvec(&pack(token)).unwrap();
        let back = unpack(postcard::from_bytes(&bytes).unwrap());
        (back, bytes.len())
    }

    #[test]
    fn every_token_comes_back_as_it_was() {
        let jwt = "eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz";
        for token in [
            jwt,
            "q1YWH4A5IA3O5Qc7GyLV4XmsRilNBUDfE-V79PLrjmo",
            "",
            ".",
            "a..b",
            // Not canonical base64url: unused bits set, padding, a length no encoding has.
            "QR",
            "QQ==",
            "QUJDR",
            // Other alphabets and characters tokens are made of.
            "ab+/cd",
            "2YotnFZFEjr1zCsicMWpAA~x",
            "opaque token with spaces",
            "ünïcödé",
        ] {
            assert_eq!(round_trip(token).0, token, "{token:?}");
        }
        // Exhaustively for short segments, every length and trailing-bit pattern.
        let alphabet = "ABQRgw_-";
        for a in alphabet.chars() {
            for b in alphabet.chars() {
                for c in ["", "A", "Q", "g", "w", "B"] {
                    let token = format!("{a}{b}{c}.x{a}{b}");
                    assert_eq!(round_trip(&token).0, token);
                }
            }
        }
    }

    /// A JWT-shaped token of segments of these many bytes.
    pub(crate) fn jwt_like(lengths: &[usize]) -> String {
        let segments: Vec<String> = lengths
            .iter()
            .map(|&n| {
                URL_SAFE_NO_PAD.encode((0..n).map(|i| (i * 7 + n) as u8).collect::<Vec<u8>>())
            })
            .collect();
        segments.join(".")
    }

    #[test]
    fn base64url_tokens_take_a_quarter_less_room() {
        let jwt = jwt_like(&[30, 300, 256]);
        let (back, len) = round_trip(&jwt);
        assert_eq!(back, jwt);
        assert!(
            len * 4 <= jwt.len() * 3 + 64,
            "{len} bytes for {}",
            jwt.len()
        );
        let (_, len) = round_trip("not base64url!");
        assert_eq!(len, 2 + "not base64url!".len());
    }
}
