//! Token revocation (RFC 7009). A sign-out revokes its session's refresh token at the
//! provider, so that a copy of the session (a cookie taken before the sign-out, presented to a
//! gateway that no longer remembers it: restarted, another replica without coordination
//! Redis) cannot be refreshed once its access token expires.

use super::http::{Endpoint, ProviderHttpError};
use super::{Provider, ProviderError};
use crate::body::Body;
use crate::config::TokenAuthMethod;
use base64::Engine as _;
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use std::sync::atomic::Ordering;

/// Which token a revocation names (its RFC 7009 `token_type_hint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenKind {
    Refresh,
    Access,
}

impl TokenKind {
    pub fn hint(self) -> &'static str {
        match self {
            TokenKind::Refresh => "refresh_token",
            TokenKind::Access => "access_token",
        }
    }
}

/// What a revocation did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revoked {
    /// The provider answered 200: the token is revoked, or was unknown (RFC 7009 §2.2).
    Done,
    /// Discovery names no `revocation_endpoint`: nothing was asked.
    NoEndpoint,
}

/// The revocation request: `token` and `token_type_hint` in a form body, the client
/// authenticated as at the token endpoint (the `oauth2` crate's way, which the code exchange
/// and refresh use): HTTP Basic with the id and secret each form-urlencoded first (RFC 6749
/// §2.3.1), or `client_id` / `client_secret` in the body (`post`).
pub(super) fn request(
    endpoint: &str,
    client_id: &str,
    client_secret: &str,
    post: bool,
    token: &str,
    kind: TokenKind,
) -> Result<Request<Body>, ProviderHttpError> {
    let mut form = url::form_urlencoded::Serializer::new(String::new());
    form.append_pair("token", token)
        .append_pair("token_type_hint", kind.hint());
    let mut builder = Request::post(endpoint)
        .header(ACCEPT, "application/json")
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded");
    if post {
        form.append_pair("client_id", client_id)
            .append_pair("client_secret", client_secret);
    } else {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let credential = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(client_id),
            enc(client_secret)
        ));
        builder = builder.header(AUTHORIZATION, format!("Basic {credential}"));
    }
    builder
        .body(Body::full(form.finish().into_bytes()))
        // http's errors name what was wrong, never the value (no token, no secret).
        .map_err(|e| ProviderHttpError::Request(e.to_string()))
}

/// The provider's answer: 200 is success (whatever the body); 5xx and 429 mean the provider
/// is unavailable; another status is a refusal, named by its OAuth `error` code when the body
/// has one that looks like a code (RFC 6749 §5.2: printable ASCII, no `"` or `\`), else by
/// its status. Nothing else of the body is kept: it is not logged.
pub(super) fn outcome(resp: &Response<Bytes>) -> Result<(), ProviderError> {
    let status = resp.status();
    if status == StatusCode::OK {
        return Ok(());
    }
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        return Err(ProviderError::Http(ProviderHttpError::Unavailable(
            status.as_u16(),
        )));
    }
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        error: String,
    }
    let code = serde_json::from_slice::<ErrorBody>(resp.body())
        .ok()
        .map(|b| b.error)
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| (0x20..=0x7e).contains(&b) && b != b'"' && b != b'\\')
        });
    Err(match code {
        Some(code) => ProviderError::TokenError(code),
        None => ProviderError::Status(status.as_u16()),
    })
}

impl Provider {
    /// Revokes `token` at the provider's `revocation_endpoint`, within `timeouts.provider`
    /// (each attempt). With `token_auth_method: auto`, a client refused (`invalid_client`)
    /// with HTTP Basic tries the body once, as the code exchange does, and that is learnt.
    pub async fn revoke(&self, token: &str, kind: TokenKind) -> Result<Revoked, ProviderError> {
        let d = self.discovered()?;
        let Some(endpoint) = d.meta.revocation_endpoint.as_deref() else {
            return Ok(Revoked::NoEndpoint);
        };
        let mut post = d.use_post.load(Ordering::Relaxed);
        loop {
            let req = request(
                endpoint,
                &self.client_id,
                &self.client_secret,
                post,
                token,
                kind,
            )?;
            let resp = self.http.send(req, Endpoint::Revocation).await?;
            match outcome(&resp) {
                Err(ProviderError::TokenError(code))
                    if code == "invalid_client"
                        && !post
                        && self.auth_method == TokenAuthMethod::Auto =>
                {
                    post = true;
                    d.use_post.store(true, Ordering::Relaxed);
                }
                r => return r.map(|()| Revoked::Done),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn split(req: Request<Body>) -> (http::request::Parts, Vec<(String, String)>) {
        let (parts, body) = req.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let form = url::form_urlencoded::parse(&bytes).into_owned().collect();
        (parts, form)
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The request as RFC 7009 §2.1 and RFC 6749 §2.3.1 have it: a form POST naming the
    /// token and its type, the client authenticated with Basic (id and secret form-encoded
    /// first) or in the body.
    #[tokio::test]
    async fn the_revocation_request_names_the_token_and_authenticates_the_client() {
        let token = "rt/1+2=3 &x";
        let req = request(
            "https://idp/revoke",
            "my client",
            "s:e/c+r%t",
            false,
            token,
            TokenKind::Refresh,
        )
        .unwrap();
        let (parts, form) = split(req).await;
        assert_eq!(parts.method, http::Method::POST);
        assert_eq!(parts.uri, "https://idp/revoke");
        assert_eq!(
            parts.headers[CONTENT_TYPE],
            "application/x-www-form-urlencoded"
        );
        assert_eq!(parts.headers[ACCEPT], "application/json");
        assert_eq!(
            form,
            pairs(&[("token", token), ("token_type_hint", "refresh_token")])
        );
        let basic = parts.headers[AUTHORIZATION].to_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(basic.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "my+client:s%3Ae%2Fc%2Br%25t"
        );

        let req = request(
            "https://idp/revoke",
            "my client",
            "secret",
            true,
            "at-1",
            TokenKind::Access,
        )
        .unwrap();
        let (parts, form) = split(req).await;
        assert!(parts.headers.get(AUTHORIZATION).is_none());
        assert_eq!(
            form,
            pairs(&[
                ("token", "at-1"),
                ("token_type_hint", "access_token"),
                ("client_id", "my client"),
                ("client_secret", "secret"),
            ])
        );

        // A request that cannot be built says so without naming the token.
        let e = request(
            "not a url",
            "c",
            "s",
            false,
            "secret-token",
            TokenKind::Refresh,
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("secret-token"), "{e}");
    }

    #[test]
    fn the_answer_is_success_a_refusal_or_unavailable() {
        let resp = |status: u16, body: &str| {
            Response::builder()
                .status(status)
                .body(Bytes::from(body.to_string()))
                .unwrap()
        };
        assert!(outcome(&resp(200, "")).is_ok());
        assert!(outcome(&resp(200, "not json")).is_ok());
        for s in [500, 503, 429] {
            let e = outcome(&resp(s, r#"{"error":"server_error"}"#)).unwrap_err();
            assert!(e.is_unavailable(), "{s}: {e}");
        }
        let refused = |s, body| match outcome(&resp(s, body)) {
            Err(ProviderError::TokenError(code)) => code,
            other => panic!("{s} {body}: {other:?}"),
        };
        assert_eq!(
            refused(400, r#"{"error":"unsupported_token_type"}"#),
            "unsupported_token_type"
        );
        assert_eq!(
            refused(401, r#"{"error":"invalid_client"}"#),
            "invalid_client"
        );
        // No code, or not one that looks like a code: the status alone (the body may echo
        // what it was sent).
        for body in [
            "<h1>no</h1>",
            r#"{"error":""}"#,
            r#"{"error":"bad\ntoken=rt-1"}"#,
            r#"{"error":"quote\"d"}"#,
        ] {
            assert!(
                matches!(outcome(&resp(400, body)), Err(ProviderError::Status(400))),
                "{body}"
            );
        }
        let long = format!(r#"{{"error":"{}"}}"#, "x".repeat(65));
        assert!(matches!(
            outcome(&resp(400, &long)),
            Err(ProviderError::Status(400))
        ));
    }
}
