//! Who may call the API, decided before any handler runs.
//!
//! - **Credentials.** With `--api-token` (or `--api-token-file`) and/or `--api-users`, every
//!   endpoint but `ping` requires `Authorization: Bearer <token>` or basic auth of a listed user;
//!   `--open-read-endpoints` lets `config` and `services` answer without. Secrets are kept only as
//!   SHA-256 digests and compared in constant time.
//! - **Without credentials** the API listens on loopback only (unless `--insecure-api`), and a
//!   request whose `Host` is not a loopback name is refused, so a web page cannot reach it through
//!   DNS rebinding.
//! - **Browsers cannot be turned against it.** A request a browser marks as cross-site
//!   (`Sec-Fetch-Site`), or whose `Origin` is not the host it was sent to, is refused; answers
//!   carry no CORS headers; `HEAD` never changes anything.

use std::net::IpAddr;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::ApiErrorKind;

/// A SHA-256 digest of a secret: what is kept in memory instead of the secret.
type SecretDigest = [u8; 32];

fn digest(secret: &[u8]) -> SecretDigest {
    Sha256::digest(secret).into()
}

/// The API's credentials were given in a form flow-proxy cannot use.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// `--api-token-file` could not be read.
    #[error("--api-token-file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    /// The token is empty.
    #[error("{0}: the API token is empty")]
    EmptyToken(&'static str),
    /// An `--api-users` item is not `user:password`.
    #[error(
        "--api-users: item {position} is not `user:password` with a non-empty user and password"
    )]
    BadUser { position: usize },
}

/// What the API requires of a caller.
#[derive(Clone, Default)]
pub struct ApiAccess {
    token: Option<SecretDigest>,
    /// User names with the digests of their passwords.
    users: Vec<(String, SecretDigest)>,
    /// `config` and `services` answer without credentials.
    open_read_endpoints: bool,
    /// No credentials and not `--insecure-api`: only requests addressed to a loopback name.
    loopback_hosts_only: bool,
}

impl std::fmt::Debug for ApiAccess {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ApiAccess")
            .field("token", &self.token.is_some())
            .field("users", &self.users.len())
            .field("open_read_endpoints", &self.open_read_endpoints)
            .field("loopback_hosts_only", &self.loopback_hosts_only)
            .finish()
    }
}

impl ApiAccess {
    /// Builds the access rules from the token (already read from its flag or file), the
    /// `user:password,…` list, and the two switches.
    pub fn new(
        token: Option<&str>,
        users: Option<&str>,
        open_read_endpoints: bool,
        insecure_api: bool,
    ) -> Result<ApiAccess, AccessError> {
        let token = match token.map(str::trim) {
            Some("") => return Err(AccessError::EmptyToken("--api-token")),
            Some(token) => Some(digest(token.as_bytes())),
            None => None,
        };
        let mut parsed = Vec::new();
        for (position, item) in users
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .enumerate()
        {
            match item.split_once(':') {
                Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                    parsed.push((user.to_string(), digest(password.as_bytes())));
                }
                _ => {
                    return Err(AccessError::BadUser {
                        position: position + 1,
                    })
                }
            }
        }
        let has_credentials = token.is_some() || !parsed.is_empty();
        Ok(ApiAccess {
            token,
            users: parsed,
            open_read_endpoints,
            loopback_hosts_only: !has_credentials && !insecure_api,
        })
    }

    /// Reads the token from `--api-token-file`.
    pub fn read_token_file(path: &std::path::Path) -> Result<String, AccessError> {
        let text = std::fs::read_to_string(path).map_err(|source| AccessError::TokenFile {
            path: path.display().to_string(),
            source,
        })?;
        let token = text.trim();
        if token.is_empty() {
            return Err(AccessError::EmptyToken("--api-token-file"));
        }
        Ok(token.to_string())
    }

    /// Whether callers must present a token or a user's password.
    pub fn has_credentials(&self) -> bool {
        self.token.is_some() || !self.users.is_empty()
    }

    /// How callers are authenticated, for the start-up log (never the secrets).
    pub fn describe(&self) -> String {
        match (self.token.is_some(), self.users.len()) {
            (false, 0) if self.loopback_hosts_only => {
                "none: the API answers only requests to a loopback name".into()
            }
            (false, 0) => {
                "none (--insecure-api): anyone who reaches the API can change routing".into()
            }
            (true, 0) => "bearer token".into(),
            (false, users) => format!("basic auth ({users} users)"),
            (true, users) => format!("bearer token or basic auth ({users} users)"),
        }
    }

    fn authenticated(&self, headers: &HeaderMap) -> bool {
        let Some(authorization) = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
        else {
            return false;
        };
        let (scheme, credentials) = authorization
            .trim()
            .split_once(' ')
            .unwrap_or((authorization, ""));
        let credentials = credentials.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self
                .token
                .is_some_and(|token| bool::from(digest(credentials.as_bytes()).ct_eq(&token)));
        }
        if scheme.eq_ignore_ascii_case("basic") {
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(credentials) else {
                return false;
            };
            let Some((user, password)) = std::str::from_utf8(&decoded)
                .ok()
                .and_then(|text| text.split_once(':'))
            else {
                return false;
            };
            let given = digest(password.as_bytes());
            // Every user is compared, so the time taken does not tell which names exist.
            return self.users.iter().fold(false, |found, (name, password)| {
                let matches = name.as_bytes().ct_eq(user.as_bytes()) & given.ct_eq(password);
                found | bool::from(matches)
            });
        }
        false
    }

    fn challenge(&self) -> &'static str {
        if self.users.is_empty() {
            "Bearer realm=\"flow-proxy\""
        } else {
            "Basic realm=\"flow-proxy\", charset=\"UTF-8\""
        }
    }
}

/// The endpoint a path names (`/v1/docker-flow-proxy/<name>` or `/<name>`).
fn endpoint(path: &str) -> &str {
    path.strip_prefix("/v1/docker-flow-proxy")
        .unwrap_or(path)
        .trim_start_matches('/')
}

/// Endpoints that only read (`""` is the status page, `GET /`).
fn reads_only(endpoint: &str) -> bool {
    matches!(
        endpoint,
        "config" | "services" | "certs" | "settings" | "metrics" | ""
    )
}

/// Whether `host` (a `Host` header: name or address, optional port) names this machine's
/// loopback interface.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [::1]:8080
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host (and port) part of an `Origin` header, `None` for an opaque origin (`null`).
fn origin_host(origin: &str) -> Option<&str> {
    origin
        .split_once("://")
        .map(|(_, rest)| rest.trim_end_matches('/'))
}

/// Why a browser's request is refused, if it is one that could be forged by another site.
fn cross_site(headers: &HeaderMap) -> Option<String> {
    let fetch_site = headers
        .get("sec-fetch-site")
        .and_then(|value| value.to_str().ok());
    if let Some(site @ ("cross-site" | "same-site")) = fetch_site {
        return Some(format!(
            "the browser marked this request `Sec-Fetch-Site: {site}`: the API answers no request made from another site"
        ));
    }
    let origin = headers.get(header::ORIGIN)?.to_str().unwrap_or("null");
    let host = headers
        .get(header::HOST)
        .and_then(|value| value.to_str().ok());
    match (origin_host(origin), host) {
        (Some(origin), Some(host)) if origin.eq_ignore_ascii_case(host) => None,
        _ => Some(
            "the request's Origin is not the API's own address: the API answers no request made from another site".into(),
        ),
    }
}

/// The middleware that applies [`ApiAccess`] to every request.
pub async fn enforce(State(access): State<ApiAccess>, request: Request, next: Next) -> Response {
    match check(&access, &request) {
        Ok(()) => next.run(request).await,
        Err(error) => axum::response::IntoResponse::into_response(error),
    }
}

fn check(access: &ApiAccess, request: &Request) -> Result<(), ApiError> {
    let endpoint = endpoint(request.uri().path());
    if endpoint == "ping" {
        return Ok(());
    }
    let headers = request.headers();
    if request.method() == Method::HEAD && !reads_only(endpoint) {
        return Err(ApiErrorKind::MethodNotAllowed(
            "HEAD never changes anything: use GET or PUT".into(),
        )
        .into());
    }
    if let Some(reason) = cross_site(headers) {
        return Err(ApiErrorKind::Forbidden(reason).into());
    }
    if access.loopback_hosts_only {
        let host = headers
            .get(header::HOST)
            .and_then(|value| value.to_str().ok());
        if let Some(host) = host.filter(|host| !is_loopback_host(host)) {
            return Err(ApiErrorKind::Forbidden(format!(
                "the request is addressed to `{}`, not to a loopback name: without --api-token or --api-users the API answers only requests to localhost (this stops DNS rebinding)",
                crate::spec::values::shown(host)
            ))
            .into());
        }
        return Ok(());
    }
    if !access.has_credentials()
        || (access.open_read_endpoints && reads_only(endpoint))
        || access.authenticated(headers)
    {
        return Ok(());
    }
    Err(ApiErrorKind::Unauthorized {
        challenge: access.challenge(),
    }
    .into())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    fn basic(user: &str, password: &str) -> String {
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        format!("Basic {encoded}")
    }

    #[test]
    fn loopback_names_are_recognised_and_others_are_not() {
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:1",
            "[::1]:8080",
            "[::1]",
            "app.localhost:8080",
            "LOCALHOST.",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "example.com",
            "attacker.example:8080",
            "10.0.0.1:8080",
            "[2001:db8::1]:80",
            "localhost.example.com",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn a_token_or_a_users_password_authenticates_and_nothing_else_does() {
        let access = ApiAccess::new(Some("t0ken"), Some("alice:secret,bob:pass"), false, false)
            .expect("valid");
        let accepted = |value: &str| access.authenticated(&headers(&[("authorization", value)]));
        assert!(accepted("Bearer t0ken"));
        assert!(accepted("bearer t0ken"));
        assert!(accepted(&basic("alice", "secret")));
        assert!(accepted(&basic("bob", "pass")));
        assert!(!accepted("Bearer t0ken2"));
        assert!(!accepted("Bearer "));
        assert!(!accepted(&basic("alice", "pass")));
        assert!(!accepted(&basic("carol", "secret")));
        assert!(!accepted("Basic !!!"));
        assert!(!accepted("t0ken"));
        assert!(!access.authenticated(&HeaderMap::new()));
    }

    #[test]
    fn bad_credentials_settings_are_refused_at_start() {
        assert!(matches!(
            ApiAccess::new(Some("  "), None, false, false),
            Err(AccessError::EmptyToken(_))
        ));
        assert!(matches!(
            ApiAccess::new(None, Some("alice:secret,bob"), false, false),
            Err(AccessError::BadUser { position: 2 })
        ));
        assert!(matches!(
            ApiAccess::new(None, Some(":secret"), false, false),
            Err(AccessError::BadUser { position: 1 })
        ));
    }

    #[test]
    fn secrets_are_not_printed() {
        let access =
            ApiAccess::new(Some("t0ken"), Some("alice:secret"), false, false).expect("valid");
        let printed = format!("{access:?} {}", access.describe());
        assert!(
            !printed.contains("t0ken") && !printed.contains("secret"),
            "{printed}"
        );
    }

    #[test]
    fn cross_site_browser_requests_are_recognised() {
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "none")])).is_none());
        assert!(cross_site(&headers(&[
            ("origin", "http://evil.example"),
            ("host", "127.0.0.1:8080")
        ]))
        .is_some());
        assert!(cross_site(&headers(&[("origin", "null"), ("host", "127.0.0.1:8080")])).is_some());
        assert!(cross_site(&headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080")
        ]))
        .is_none());
        assert!(cross_site(&headers(&[("host", "127.0.0.1:8080")])).is_none());
    }
}
