//! The one place where a failure becomes an HTTP answer: status code plus Docker Flow Proxy's
//! JSON shape `{"Status":"NOK","Message":…,"ServiceName":…}`.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::haproxy::{HaproxyError, PortError};
use crate::proxy::ProxyError;
use crate::registry::RegistryError;
use crate::render::RenderError;
use crate::spec::SpecError;

use super::answer;

/// What went wrong, by cause.
#[derive(Debug, thiserror::Error)]
pub enum ApiErrorKind {
    /// The query string is not URL encoding.
    #[error("the query string is not valid URL encoding: {0}")]
    Query(#[from] serde_urlencoded::de::Error),
    /// A certificate bundle was refused.
    #[error(transparent)]
    Cert(#[from] crate::certs::CertError),
    /// A parameter failed validation.
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The core could not apply the change.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// The request carries no valid credentials.
    #[error("this endpoint requires credentials: `Authorization: Bearer <api token>` or basic auth of an API user")]
    Unauthorized {
        /// The `WWW-Authenticate` challenge.
        challenge: &'static str,
    },
    /// The request may not be answered (cross-site, or not addressed to a loopback name).
    #[error("{0}")]
    Forbidden(String),
    /// The query string is longer than the API reads.
    #[error("the query string has {length} bytes; at most {max} are accepted", max = super::MAX_QUERY_BYTES)]
    UriTooLong { length: usize },
    /// The request body is larger than the API reads.
    #[error("the request body has {length} bytes; at most {max} are accepted", max = super::MAX_BODY_BYTES)]
    PayloadTooLarge { length: u64 },
    /// The method is not one this endpoint accepts.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A read endpoint could not produce its answer (metrics encoding, the status page).
    #[error("{0}")]
    Internal(String),
}

/// A failed API call: the cause, and the service it was about when known.
#[derive(Debug)]
pub struct ApiError {
    /// The `serviceName` the request named, echoed back in the answer.
    pub service_name: Option<String>,
    /// The cause.
    pub kind: ApiErrorKind,
}

impl<E: Into<ApiErrorKind>> From<E> for ApiError {
    fn from(error: E) -> Self {
        ApiError {
            service_name: None,
            kind: error.into(),
        }
    }
}

impl ApiError {
    /// Attaches the service name the request was about.
    pub fn about(mut self, service_name: Option<String>) -> Self {
        self.service_name = service_name;
        self
    }

    fn status(&self) -> StatusCode {
        match &self.kind {
            ApiErrorKind::Query(_) | ApiErrorKind::Spec(_) | ApiErrorKind::Cert(_) => {
                StatusCode::BAD_REQUEST
            }
            ApiErrorKind::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiErrorKind::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiErrorKind::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ApiErrorKind::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiErrorKind::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiErrorKind::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiErrorKind::Proxy(error) => match error {
                // The request's own custom fragment or backendExtra failed; another service's
                // is the proxy's problem (below).
                ProxyError::Render(RenderError::Custom { service, .. })
                    if self.service_name.as_deref() == Some(service.as_str()) =>
                {
                    StatusCode::BAD_REQUEST
                }
                ProxyError::RejectedRequest(_)
                | ProxyError::Render(RenderError::PortConflict { .. }) => StatusCode::BAD_REQUEST,
                ProxyError::UnknownService(_) | ProxyError::UnknownCertificate(_) => {
                    StatusCode::NOT_FOUND
                }
                ProxyError::Conflict(_)
                | ProxyError::RouteTaken { .. }
                | ProxyError::DefaultBackendTaken { .. }
                | ProxyError::TooManyServices { .. }
                | ProxyError::Haproxy(HaproxyError::Port(PortError::InUse { .. })) => {
                    StatusCode::CONFLICT
                }
                ProxyError::Haproxy(HaproxyError::Port(_)) => StatusCode::BAD_REQUEST,
                ProxyError::Haproxy(HaproxyError::NotAnswering { .. }) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                ProxyError::Registry(
                    RegistryError::Unreachable { .. } | RegistryError::Unavailable { .. },
                )
                | ProxyError::Busy
                | ProxyError::TimedOut { .. }
                | ProxyError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
                // Consul answered, and said no: flow-proxy's token is the problem.
                ProxyError::Registry(
                    RegistryError::AclDenied { .. } | RegistryError::FilteredByAcls { .. },
                ) => StatusCode::BAD_GATEWAY,
                ProxyError::Render(_)
                | ProxyError::Registry(_)
                | ProxyError::Rejected(_)
                | ProxyError::Haproxy(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::error!(service = ?self.service_name, error = %self.kind, "request failed");
        } else {
            tracing::info!(service = ?self.service_name, error = %self.kind, "request refused");
        }
        let mut body = answer("NOK", self.kind.to_string(), None);
        if let Some(name) = self.service_name {
            body.insert("ServiceName".into(), name.into());
        }
        let mut response = (status, Json(body)).into_response();
        match self.kind {
            ApiErrorKind::Unauthorized { challenge } => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static(challenge),
                );
            }
            ApiErrorKind::Proxy(ProxyError::Busy) => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
            }
            _ => {}
        }
        response
    }
}
