//! The status page (`GET /` on the API port): every routed service with its paths, domains,
//! color and instances with their health (HAProxy's view, from `show stat`), the certificates and
//! their expiry, the last reload and the last error, and the recent changes. Rendered on the
//! server by handlebars from `templates/status.html.hbs`, every value HTML-escaped; no script.
//! It shows no password, hash or key: only names, addresses and messages.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use handlebars::Handlebars;
use serde::Serialize;

use super::haproxy_stats::StatRow;
use super::{instance_address, Observer};

/// The page's template, built in.
const TEMPLATE: &str = include_str!("../../templates/status.html.hbs");
const TEMPLATE_NAME: &str = "status.html";

/// The page could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum StatusPageError {
    /// The built-in template does not compile.
    #[error("the status page template: {0}")]
    Template(#[from] Box<handlebars::TemplateError>),
    /// Rendering failed.
    #[error("rendering the status page: {0}")]
    Render(#[from] Box<handlebars::RenderError>),
}

/// The compiled page; HTML escaping is handlebars' default.
pub struct StatusPage {
    registry: Handlebars<'static>,
}

impl StatusPage {
    /// Compiles the template.
    pub fn new() -> Result<StatusPage, StatusPageError> {
        let mut registry = Handlebars::new();
        registry
            .register_template_string(TEMPLATE_NAME, TEMPLATE)
            .map_err(Box::new)?;
        Ok(StatusPage { registry })
    }

    /// The page compiled once for the whole process (the template is built in).
    pub fn shared() -> Result<&'static StatusPage, StatusPageError> {
        static PAGE: std::sync::OnceLock<StatusPage> = std::sync::OnceLock::new();
        if let Some(page) = PAGE.get() {
            return Ok(page);
        }
        let page = StatusPage::new()?;
        Ok(PAGE.get_or_init(|| page))
    }

    /// The page for what `observer` holds now, with instance health from `stats` (`None`: the
    /// stats socket did not answer).
    pub fn render(
        &self,
        observer: &Observer,
        stats: Option<&[StatRow]>,
    ) -> Result<String, StatusPageError> {
        let view = StatusView::of(observer, stats);
        Ok(self
            .registry
            .render(TEMPLATE_NAME, &view)
            .map_err(Box::new)?)
    }
}

#[derive(Serialize)]
struct StatusView {
    generated: String,
    last_reload: Option<ReloadView>,
    last_error: Option<ErrorView>,
    service_count: usize,
    services: Vec<ServiceView>,
    certificate_count: usize,
    certificates: Vec<CertificateView>,
    changes: Vec<ChangeView>,
}

#[derive(Serialize)]
struct ReloadView {
    at: String,
    duration_ms: String,
    error: Option<String>,
}

#[derive(Serialize)]
struct ErrorView {
    at: String,
    subject: String,
    message: String,
}

#[derive(Serialize)]
struct ServiceView {
    name: String,
    color: String,
    paths: Vec<String>,
    domains: Vec<String>,
    instances: Vec<InstanceView>,
}

#[derive(Serialize)]
struct InstanceView {
    address: String,
    health: String,
    healthy: bool,
}

#[derive(Serialize)]
struct CertificateView {
    name: String,
    dns_names: String,
    not_after: String,
    expired: bool,
}

#[derive(Serialize)]
struct ChangeView {
    at: String,
    kind: &'static str,
    service: String,
    outcome: &'static str,
    error: Option<String>,
    validate_ms: Option<String>,
    reload_ms: Option<String>,
}

/// RFC 3339, to the second, UTC.
fn timestamp(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    let at = at.replace_nanosecond(0).unwrap_or(at);
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "?".into())
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.1}", duration.as_secs_f64() * 1000.0)
}

impl StatusView {
    fn of(observer: &Observer, stats: Option<&[StatRow]>) -> StatusView {
        let status = observer.status();
        // HAProxy's status of each instance, by (backend, `<address>_<port>` it sends to).
        let health: BTreeMap<(&str, String), &str> = stats
            .unwrap_or_default()
            .iter()
            .filter(|row| row.is_server())
            .filter_map(|row| {
                let server = super::haproxy_stats::instance_name(row)?;
                Some((
                    (row.proxy.as_str(), server),
                    row.field("status").unwrap_or("unknown"),
                ))
            })
            .collect();
        let listed = status
            .services
            .as_ref()
            .map(|services| services.list())
            .unwrap_or_default();
        let services = listed
            .iter()
            .map(|routed| {
                let spec = &routed.spec;
                let name = spec.service_name().as_str();
                let mut paths = Vec::new();
                let mut domains = Vec::new();
                for destination in spec.destinations() {
                    paths.extend(destination.service_path().iter().map(|p| p.as_str().into()));
                    domains.extend(destination.service_domain().iter().map(ToString::to_string));
                }
                paths.dedup();
                domains.dedup();
                let instances = routed
                    .instances
                    .iter()
                    .map(|instance| {
                        // The worst status among the destinations' backends that hold it (on
                        // the destination's `port` when it has one).
                        let statuses: Vec<&str> = spec
                            .destinations()
                            .iter()
                            .filter_map(|d| {
                                let backend = routed.backend_name(d);
                                let port = d.port().map_or(instance.port(), |port| port.get());
                                let server = format!("{}_{port}", instance.address());
                                health.get(&(backend.as_str(), server)).copied()
                            })
                            .collect();
                        let health = if stats.is_none() {
                            "unknown (HAProxy's stats socket did not answer)".to_string()
                        } else {
                            statuses
                                .iter()
                                .find(|s| !s.starts_with("UP") && **s != "no check")
                                .or_else(|| statuses.first())
                                .map_or("not in HAProxy yet".to_string(), |s| s.to_string())
                        };
                        let healthy = health.starts_with("UP") || health == "no check";
                        InstanceView {
                            address: instance_address(instance),
                            health,
                            healthy,
                        }
                    })
                    .collect();
                ServiceView {
                    name: name.to_string(),
                    color: spec
                        .service_color()
                        .map_or(String::new(), |color| color.as_str().to_string()),
                    paths,
                    domains,
                    instances,
                }
            })
            .collect::<Vec<ServiceView>>();
        let certificates: Vec<CertificateView> = status
            .certificates
            .iter()
            .map(|info| CertificateView {
                name: info.name.clone(),
                dns_names: info.dns_names.join(", "),
                not_after: info.not_after.clone(),
                expired: info.expired
                    || info.not_after_unix < time::OffsetDateTime::now_utc().unix_timestamp(),
            })
            .collect();
        let changes = status
            .recent
            .iter()
            .rev()
            .map(|(at, record)| ChangeView {
                at: timestamp(*at),
                kind: record.kind.as_str(),
                service: record.service.clone().unwrap_or_default(),
                outcome: record.outcome.as_str(),
                error: record.outcome.error().map(str::to_string),
                validate_ms: record.validate.map(milliseconds),
                reload_ms: record.reload.map(milliseconds),
            })
            .collect();
        StatusView {
            generated: timestamp(SystemTime::now()),
            last_reload: status.last_reload.as_ref().map(|reload| ReloadView {
                at: timestamp(reload.at),
                duration_ms: milliseconds(reload.duration),
                error: reload.error.clone(),
            }),
            last_error: status.last_error.as_ref().map(|error| ErrorView {
                at: timestamp(error.at),
                subject: error.subject.clone(),
                message: error.message.clone(),
            }),
            service_count: services.len(),
            services,
            certificate_count: certificates.len(),
            certificates,
            changes,
        }
    }
}
