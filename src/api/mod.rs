//! The HTTP API, Docker Flow Proxy compatible: each endpoint is served under
//! `/v1/docker-flow-proxy/<name>` and under `/<name>`. Handlers only parse, hand the change to
//! the proxy core, and answer; the meaning of a request lives in `spec` and `proxy`.

mod access;
mod error;

use axum::body::Bytes;
use axum::extract::{RawQuery, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put, MethodRouter};
use axum::{Json, Router};
use serde_json::{Map, Value};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::trace::TraceLayer;

pub use access::{AccessError, ApiAccess};
pub use error::{ApiError, ApiErrorKind};

use crate::certs::Certificate;
use crate::observe;
use crate::proxy::Proxy;
use crate::spec::{self, IgnoredParameter, ServiceName, ServiceSpec, SpecError};

/// Longest query string accepted (414 beyond).
pub const MAX_QUERY_BYTES: usize = 16 * 1024;
/// Largest request body accepted (413 beyond).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// Builds the API router around a running proxy core, with `access` deciding who may call it.
pub fn router(proxy: Proxy, access: ApiAccess) -> Router {
    let endpoints: [(&str, MethodRouter<Proxy>); 9] = [
        ("cert", put(put_cert).delete(delete_cert)),
        ("certs", get(certs)),
        ("reconfigure", get(reconfigure).put(reconfigure)),
        ("remove", get(remove).put(remove).delete(remove)),
        ("reload", get(reload).put(reload).post(reload)),
        ("config", get(config)),
        ("services", get(services)),
        ("ping", get(ping)),
        ("settings", get(settings)),
    ];
    let mut router = Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics));
    for (name, handler) in endpoints {
        router = router
            .route(&format!("/v1/docker-flow-proxy/{name}"), handler.clone())
            .route(&format!("/{name}"), handler);
    }
    router
        .layer(middleware::from_fn_with_state(access, access::enforce))
        // The backstop for bodies without a Content-Length; `refuse_oversized` answers the rest.
        .layer(RequestBodyLimitLayer::new(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_oversized))
        // Spans name the path only: a query may carry `users` passwords, which no log may hold.
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request| {
                tracing::debug_span!("request", method = %request.method(), path = %request.uri().path())
            }),
        )
        .with_state(proxy)
}

/// Refuses a query string longer than [`MAX_QUERY_BYTES`] (414) and a body announced larger
/// than [`MAX_BODY_BYTES`] (413) before anything reads them.
async fn refuse_oversized(request: Request, next: Next) -> Response {
    let query_bytes = request.uri().query().map_or(0, str::len);
    if query_bytes > MAX_QUERY_BYTES {
        return ApiError::from(ApiErrorKind::UriTooLong {
            length: query_bytes,
        })
        .into_response();
    }
    let body_bytes = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Some(length) = body_bytes.filter(|length| *length > MAX_BODY_BYTES as u64) {
        return ApiError::from(ApiErrorKind::PayloadTooLarge { length }).into_response();
    }
    next.run(request).await
}

/// Builds an answer in Docker Flow Proxy's shape, with the spec's fields merged in.
fn answer(status: &str, message: String, spec: Option<&ServiceSpec>) -> Map<String, Value> {
    let mut body = Map::new();
    body.insert("Status".into(), status.into());
    body.insert("Message".into(), message.into());
    if let Some(Value::Object(fields)) = spec.map(ServiceSpec::to_answer_json) {
        body.extend(fields);
    }
    body
}

/// The answer's `Message` naming the parameters accepted and ignored, with their reasons.
fn ignored_message(ignored: &[IgnoredParameter]) -> String {
    ignored
        .iter()
        .map(IgnoredParameter::to_string)
        .collect::<Vec<_>>()
        .join("; ")
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

/// Takes Docker Flow Proxy's `serviceCert` out of a reconfigure query: the PEM is the query
/// value or the request body (not both); `None` when neither is given.
fn take_service_cert(
    pairs: &mut Vec<(String, String)>,
    body: &[u8],
) -> Result<Option<Vec<u8>>, SpecError> {
    let mut from_query: Vec<String> = Vec::new();
    pairs.retain(|(name, value)| {
        let is_cert = name == "serviceCert";
        if is_cert {
            from_query.push(value.clone());
        }
        !is_cert
    });
    let cert_error = |message: &str| SpecError {
        parameter: "serviceCert".into(),
        message: message.into(),
    };
    let body = (!body.iter().all(u8::is_ascii_whitespace)).then_some(body);
    match (from_query.as_slice(), body) {
        ([], None) => Ok(None),
        ([], Some(body)) => Ok(Some(body.to_vec())),
        ([pem], None) => Ok(Some(pem.as_bytes().to_vec())),
        ([_], Some(_)) => Err(cert_error(
            "given both in the query and as the request body; send the PEM once",
        )),
        _ => Err(cert_error("given more than once")),
    }
}

async fn reconfigure(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let mut pairs = query_pairs(query)?;
    let about = named_service(&pairs);
    let service_cert =
        take_service_cert(&mut pairs, &body).map_err(|e| ApiError::from(e).about(about.clone()))?;
    // The service's spec now: a repeated clear password keeps its hash (and haproxy.cfg its text).
    let current = about.as_deref().and_then(|name| proxy.service(name));
    let (spec, ignored) = ServiceSpec::from_query_keeping(&pairs, current.as_deref())
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    if spec.verify_client_ssl() && !proxy.has_client_ca() {
        let error = SpecError {
            parameter: "verifyClientSsl".into(),
            message: "needs the CA that signs client certificates: start flow-proxy with \
                      --ca-file (env CA_FILE)"
                .into(),
        };
        return Err(ApiError::from(error).about(about));
    }
    proxy
        .check_custom_templates(&spec)
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    let certificate = service_cert
        .map(|pem| {
            not_an_acme_name("serviceCert", spec.service_name().as_str())?;
            Certificate::parse(spec.service_name().as_str(), &pem).map_err(|error| SpecError {
                parameter: "serviceCert".into(),
                message: error.to_string(),
            })
        })
        .transpose()
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    let mut notes: Vec<String> = certificate
        .as_ref()
        .and_then(|certificate| expiry_warning(certificate.info()))
        .into_iter()
        .collect();
    let ignored_note = ignored_message(&ignored);
    if !ignored_note.is_empty() {
        notes.push(ignored_note);
    }
    let message = notes.join("; ");
    let applied = match certificate {
        Some(certificate) => proxy.reconfigure_with_cert(spec, certificate).await,
        None => proxy.reconfigure(spec).await,
    }
    .map_err(|error| ApiError::from(error).about(about))?;
    Ok(Json(answer("OK", message, Some(&applied))))
}

/// The warning an answer carries when a stored certificate has expired.
fn expiry_warning(info: &crate::certs::CertInfo) -> Option<String> {
    info.expired.then(|| {
        format!(
            "warning: the certificate expired on {}; clients will refuse it",
            info.not_after
        )
    })
}

async fn remove(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let pairs = query_pairs(query)?;
    let about = named_service(&pairs);
    let (name, ignored) = spec::service_name_from_query(&pairs)
        .map_err(|error| ApiError::from(error).about(about.clone()))?;
    let removed = proxy
        .remove(name.clone())
        .await
        .map_err(|error| ApiError::from(error).about(about))?;
    Ok(Json(match removed {
        Some(spec) => answer("OK", ignored_message(&ignored), Some(&spec)),
        None => {
            let mut message =
                "the service was not routed: its stored spec did not validate; it is deleted"
                    .to_string();
            if !ignored.is_empty() {
                message = format!("{message}; {}", ignored_message(&ignored));
            }
            let mut body = answer("OK", message, None);
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
    let text = crate::render::masked_config(&proxy.live_config().await?);
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text))
}

async fn services(State(proxy): State<Proxy>) -> Json<Vec<Value>> {
    Json(
        proxy
            .services()
            .iter()
            .map(|spec| spec.to_answer_json())
            .collect(),
    )
}

/// Refuses to store a certificate under `name` when the name is one ACME's certificates take
/// (`acme.<domain>`): an upload must never replace or shadow a certificate ACME renews.
fn not_an_acme_name(parameter: &str, name: &str) -> Result<(), SpecError> {
    if name.starts_with(crate::acme::CERTIFICATE_PREFIX) {
        return Err(SpecError {
            parameter: parameter.into(),
            message: format!(
                "certificates named `{}…` are the ones flow-proxy gets from ACME; store this one \
                 under another name",
                crate::acme::CERTIFICATE_PREFIX
            ),
        });
    }
    Ok(())
}

/// The `certName` of a certificate call; Docker Flow Proxy's `distribute` is accepted (every
/// proxy sharing the Consul serves a stored certificate anyway), anything else is refused.
fn cert_name(query: Option<String>) -> Result<String, ApiError> {
    let mut name = None;
    for (parameter, value) in query_pairs(query)? {
        match parameter.as_str() {
            "certName" if name.is_none() => name = Some(value),
            "distribute" => {}
            other => {
                return Err(SpecError {
                    parameter: spec::values::shown(other),
                    message: "not supported by the certificate endpoints (they take certName)"
                        .into(),
                }
                .into())
            }
        }
    }
    name.ok_or_else(|| {
        SpecError {
            parameter: "certName".into(),
            message: "required: the name the certificate is stored under".into(),
        }
        .into()
    })
}

async fn put_cert(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
    body: Bytes,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let name = cert_name(query)?;
    not_an_acme_name("certName", &name)?;
    let certificate = Certificate::parse(&name, &body)?;
    let info = certificate.info().clone();
    proxy.put_cert(certificate).await?;
    let message = expiry_warning(&info).unwrap_or_default();
    let mut body = answer("OK", message, None);
    body.insert(
        "Certificate".into(),
        serde_json::to_value(&info).unwrap_or_default(),
    );
    Ok(Json(body))
}

async fn delete_cert(
    State(proxy): State<Proxy>,
    RawQuery(query): RawQuery,
) -> Result<Json<Map<String, Value>>, ApiError> {
    let name = cert_name(query)?;
    let name = ServiceName::parse("certName", &name)?;
    proxy.delete_cert(name).await?;
    Ok(Json(answer("OK", String::new(), None)))
}

async fn certs(State(proxy): State<Proxy>) -> Json<Map<String, Value>> {
    let mut body = answer("OK", String::new(), None);
    let acme = proxy.acme_board().snapshot();
    let certs: Vec<Value> = proxy
        .certificates()
        .iter()
        .map(|info| {
            let mut cert = serde_json::to_value(info).unwrap_or_default();
            if let Value::Object(fields) = &mut cert {
                for (name, value) in crate::acme::certificate_fields(info, &acme) {
                    fields.insert(name.into(), value);
                }
            }
            cert
        })
        .collect();
    body.insert("Certs".into(), Value::Array(certs));
    // ACME: each managed domain's certificate name, last attempt and outcome, next retry.
    body.insert(
        "Acme".into(),
        serde_json::to_value(acme).unwrap_or_default(),
    );
    Json(body)
}

/// Hands the memory a scrape freed back to the system a second later (one at a time however often
/// scrapes come): with thousands of services, `show stat` and its metrics take tens of megabytes,
/// which glibc would otherwise keep.
fn release_memory_after_scrape() {
    static PENDING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if PENDING.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        PENDING.store(false, std::sync::atomic::Ordering::Release);
        crate::memory::release_freed_memory();
    });
}

/// HAProxy's `show stat`, or `None` (logged) when the stats socket does not answer.
async fn haproxy_stats(proxy: &Proxy) -> Option<Vec<observe::haproxy_stats::StatRow>> {
    match observe::haproxy_stats::read(proxy.haproxy().stats_socket()).await {
        Ok(rows) => Some(rows),
        Err(error) => {
            tracing::warn!(%error, "reading HAProxy's counters failed");
            None
        }
    }
}

/// Prometheus' text exposition (OpenMetrics) of flow-proxy's metrics and HAProxy's counters.
async fn metrics(State(proxy): State<Proxy>) -> Result<impl IntoResponse, ApiError> {
    let stats = haproxy_stats(&proxy).await;
    let processes = proxy.haproxy().process_count();
    let text = proxy
        .observer()
        .metrics_text(processes, stats.as_deref())
        .map_err(|_| ApiErrorKind::Internal("encoding the metrics failed".into()))?;
    release_memory_after_scrape();
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

/// The status page.
async fn status_page(State(proxy): State<Proxy>) -> Result<impl IntoResponse, ApiError> {
    let stats = haproxy_stats(&proxy).await;
    let page = observe::status::StatusPage::shared()
        .and_then(|page| page.render(proxy.observer(), stats.as_deref()))
        .map_err(|error| ApiErrorKind::Internal(error.to_string()))?;
    release_memory_after_scrape();
    Ok((
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        page,
    ))
}

async fn ping() -> Json<Map<String, Value>> {
    Json(answer("OK", String::new(), None))
}

/// The proxy-wide settings Consul KV can override (`maxconn`, the timeouts), as HAProxy runs
/// them: value, source (`default`, `flag`, `consul-kv`) and the KV key that overrides it.
async fn settings(State(proxy): State<Proxy>) -> Json<Value> {
    Json(serde_json::json!({ "settings": *proxy.proxy_wide_settings() }))
}
