//! The HTTP API, Docker Flow Proxy compatible: each endpoint is served under
//! `/v1/docker-flow-proxy/<name>` and under `/<name>`. Handlers only parse, hand the change to
//! the proxy core, and answer; the meaning of a request lives in `spec` and `proxy`.

mod error;

use axum::extract::{RawQuery, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use serde_json::{Map, Value};
use tower_http::trace::TraceLayer;

pub use error::{ApiError, ApiErrorKind};

use crate::proxy::Proxy;
use crate::spec::{self, ServiceSpec};

/// Builds the API router around a running proxy core.
pub fn router(proxy: Proxy) -> Router {
    let endpoints: [(&str, MethodRouter<Proxy>); 6] = [
        ("reconfigure", get(reconfigure).put(reconfigure)),
        ("remove", get(remove).put(remove).delete(remove)),
        ("reload", get(reload).put(reload).post(reload)),
        ("config", get(config)),
        ("services", get(services)),
        ("ping", get(ping)),
    ];
    let mut router = Router::new();
    for (name, handler) in endpoints {
        router = router
            .route(&format!("/v1/docker-flow-proxy/{name}"), handler.clone())
            .route(&format!("/{name}"), handler);
    }
    router.layer(TraceLayer::new_for_http()).with_state(proxy)
}

/// Builds an answer in Docker Flow Proxy's shape, with the spec's fields merged in.
fn answer(status: &str, message: String, spec: Option<&ServiceSpec>) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("Status".into(), status.into());
    body.insert("Message".into(), message.into());
    if let Some(Value::Object(fields)) = spec.and_then(|spec| serde_json::to_value(spec).ok()) {
        body.extend(fields);
    }
    body
}

/// The decoded query pairs, in request order.
fn query_pairs(query: Option<String>) -> Result<Vec<(String, String)>, ApiError> {
    Ok(serde_urlencoded::from_str(query.as_deref().unwrap_or(""))?)
}

/// The raw `serviceName` of a request, echoed back in error answers.
fn named_service(pairs: &[(String, String)]) -> Option<String> {
    pairs
        .iter()
        .find(|(name, _)| name == "serviceName")
        .map(|(_, value)| value.clone())
}

async fn reconfigure(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let pairs = query_pairs(query)?;
    let about = named_service(&pairs);
    let spec = ServiceSpec::from_query(&pairs)
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    let applied = proxy
        .reconfigure(spec)
        .await
        .map_err(|error| ApiError::from(error).about(about))?;
    Ok(Json(answer("OK", String::new(), Some(&applied))))
}

async fn remove(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let pairs = query_pairs(query)?;
    let about = named_service(&pairs);
    let name = spec::service_name_from_query(&pairs)
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    let removed = proxy
        .remove(name.clone())
        .await
        .map_err(|error| ApiError::from(error).about(about))?;
    Ok(Json(match removed {
        Some(spec) => answer("OK", String::new(), Some(&spec)),
        None => {
            let mut body = answer(
                "OK",
                "the service was not routed: its stored spec did not validate; it is deleted"
                    .into(),
                None,
            );
            body.insert("ServiceName".into(), name.as_str().into());
            body
        }
    }))
}

async fn reload(State(proxy): State<Proxy>) -> Result<Json<Map<String, Value>>, ApiError> {
    proxy.reload().await?;
    Ok(Json(answer("OK", String::new(), None)))
}

async fn config(State(proxy): State<Proxy>) -> Result<impl IntoResponse, ApiError> {
    let text = proxy.live_config().await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

async fn services(State(proxy): State<Proxy>) -> Json<Vec<ServiceSpec>> {
    Json(proxy.services().as_ref().clone())
}

async fn ping() -> Json<Map<String, Value>> {
    Json(answer("OK", String::new(), None))
}
