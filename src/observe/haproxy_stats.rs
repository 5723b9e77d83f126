//! HAProxy's own per-backend and per-server counters, named by service: `show stat` read from
//! the stats socket at each scrape, parsed by its CSV header, and re-exported on `/metrics` with
//! `service`, `backend` and `server` labels. Only the routed services' backends are exported
//! (`<serviceName>-be<index>`); their servers are the instances, labelled `<address>_<port>`
//! (the address HAProxy sends to: a server slot `s<n>` is named by the instance it holds now,
//! and a slot in maintenance, spare or emptied, holds none and is left out).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

use super::RoutedService;

/// One row of `show stat`: a frontend, backend or server, with its fields by CSV column name.
/// The row keeps its CSV record as read (one allocation for all its fields) and shares the
/// column names with every other row of the answer: at 10,000 services `show stat` has tens of
/// thousands of rows of about 100 fields each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatRow {
    /// The proxy (`pxname`): a frontend or backend name.
    pub proxy: String,
    /// `FRONTEND`, `BACKEND`, or the server's name (`svname`).
    pub server: String,
    columns: Arc<HashMap<String, usize>>,
    record: csv::StringRecord,
}

impl StatRow {
    /// A field by its `show stat` column name (`scur`, `stot`, `hrsp_2xx`, `status`, …); empty
    /// fields are `None`.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.columns
            .get(name)
            .and_then(|&at| self.record.get(at))
            .filter(|value| !value.is_empty())
    }

    fn number(&self, name: &str) -> Option<u64> {
        self.field(name).and_then(|value| value.parse().ok())
    }

    /// Whether this is a server row (not the backend's or a frontend's own).
    pub fn is_server(&self) -> bool {
        self.server != "BACKEND" && self.server != "FRONTEND"
    }
}

/// `show stat` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// The stats socket did not answer.
    #[error("HAProxy's stats socket: {0}")]
    Socket(#[from] std::io::Error),
    /// The answer is not the CSV `show stat` gives.
    #[error("HAProxy's show stat answer: {0}")]
    Csv(#[from] csv::Error),
}

/// What is asked: backends and servers (type mask 2 + 4, no frontend), without the servers in
/// maintenance (`no-maint`): a slot in maintenance holds no instance, and at 10,000 services the
/// spare slots are most of the rows. (An outbound server an operator put in maintenance is left
/// out too, as if unknown.)
const SHOW_STAT: &str = "show stat -1 6 -1 no-maint";

/// Reads `show stat` from the stats socket.
pub async fn read(stats_socket: &Path) -> Result<Vec<StatRow>, StatsError> {
    let answer = crate::haproxy::runtime_command(stats_socket, SHOW_STAT).await?;
    Ok(parse(&answer)?)
}

/// Parses `show stat`'s CSV: a header line starting with `# ` naming the columns, then a row per
/// frontend, backend and server.
pub fn parse(answer: &str) -> Result<Vec<StatRow>, csv::Error> {
    let text = answer.strip_prefix("# ").unwrap_or(answer);
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut columns = HashMap::new();
    for (at, name) in reader.headers()?.iter().enumerate() {
        if !name.is_empty() {
            columns.entry(name.to_string()).or_insert(at);
        }
    }
    let columns = Arc::new(columns);
    let (Some(&proxy_at), Some(&server_at)) = (columns.get("pxname"), columns.get("svname")) else {
        return Ok(Vec::new());
    };
    let mut rows = Vec::new();
    for record in reader.records() {
        let record = record?;
        let (Some(proxy), Some(server)) = (record.get(proxy_at), record.get(server_at)) else {
            continue;
        };
        let (proxy, server) = (proxy.to_string(), server.to_string());
        rows.push(StatRow {
            proxy,
            server,
            columns: Arc::clone(&columns),
            record,
        });
    }
    Ok(rows)
}

/// The service each routed backend belongs to, by backend name.
pub fn backends_by_service(services: &[RoutedService]) -> BTreeMap<String, String> {
    let mut backends = BTreeMap::new();
    for service in services {
        let name = service.spec.service_name().as_str();
        for destination in service.spec.destinations() {
            backends.insert(service.backend_name(destination), name.to_string());
        }
    }
    backends
}

/// The instance a server row stands for, `<address>_<port>`: a server slot (`s<n>`) by the
/// address it sends to (`addr`), `None` while it is in maintenance (no instance in it); any
/// other server by its name.
pub(super) fn instance_name(row: &StatRow) -> Option<String> {
    let is_slot = row
        .server
        .strip_prefix('s')
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()));
    if !is_slot {
        return Some(row.server.clone());
    }
    if row
        .field("status")
        .is_some_and(|status| status.starts_with("MAINT"))
    {
        return None;
    }
    let address: std::net::SocketAddr = row.field("addr")?.parse().ok()?;
    Some(format!("{}_{}", address.ip(), address.port()))
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendLabels {
    service: String,
    backend: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct BackendCodeLabels {
    service: String,
    backend: String,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServerLabels {
    service: String,
    backend: String,
    server: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ServerCodeLabels {
    service: String,
    backend: String,
    server: String,
    code: &'static str,
}

/// HTTP response classes `show stat` counts.
const CODES: [(&str, &str); 6] = [
    ("hrsp_1xx", "1xx"),
    ("hrsp_2xx", "2xx"),
    ("hrsp_3xx", "3xx"),
    ("hrsp_4xx", "4xx"),
    ("hrsp_5xx", "5xx"),
    ("hrsp_other", "other"),
];

/// Registers the counters of the routed services' backends and servers, read from `rows`.
/// Counters restart from zero when HAProxy reloads (a new process), which Prometheus' `rate()`
/// handles as a counter reset.
pub fn register(registry: &mut Registry, rows: &[StatRow], services: &[RoutedService]) {
    let backends = backends_by_service(services);
    let backend_sessions: Family<BackendLabels, Counter> = Family::default();
    let backend_current: Family<BackendLabels, Gauge> = Family::default();
    let backend_bytes_in: Family<BackendLabels, Counter> = Family::default();
    let backend_bytes_out: Family<BackendLabels, Counter> = Family::default();
    let backend_responses: Family<BackendCodeLabels, Counter> = Family::default();
    let backend_up: Family<BackendLabels, Gauge> = Family::default();
    let server_sessions: Family<ServerLabels, Counter> = Family::default();
    let server_current: Family<ServerLabels, Gauge> = Family::default();
    let server_responses: Family<ServerCodeLabels, Counter> = Family::default();
    let server_up: Family<ServerLabels, Gauge> = Family::default();
    let server_check_failures: Family<ServerLabels, Counter> = Family::default();
    for row in rows {
        let Some(service) = backends.get(&row.proxy) else {
            continue;
        };
        let up = i64::from(row.field("status").is_some_and(|s| s.starts_with("UP")));
        if row.is_server() {
            let Some(server) = instance_name(row) else {
                continue;
            };
            let labels = ServerLabels {
                service: service.clone(),
                backend: row.proxy.clone(),
                server: server.clone(),
            };
            let count = |family: &Family<ServerLabels, Counter>, field: &str| {
                family
                    .get_or_create(&labels)
                    .inc_by(row.number(field).unwrap_or(0));
            };
            count(&server_sessions, "stot");
            count(&server_check_failures, "chkfail");
            server_current
                .get_or_create(&labels)
                .set(gauge(row.number("scur")));
            server_up.get_or_create(&labels).set(up);
            for (field, code) in CODES {
                server_responses
                    .get_or_create(&ServerCodeLabels {
                        service: service.clone(),
                        backend: row.proxy.clone(),
                        server: server.clone(),
                        code,
                    })
                    .inc_by(row.number(field).unwrap_or(0));
            }
        } else if row.server == "BACKEND" {
            let labels = BackendLabels {
                service: service.clone(),
                backend: row.proxy.clone(),
            };
            let count = |family: &Family<BackendLabels, Counter>, field: &str| {
                family
                    .get_or_create(&labels)
                    .inc_by(row.number(field).unwrap_or(0));
            };
            count(&backend_sessions, "stot");
            count(&backend_bytes_in, "bin");
            count(&backend_bytes_out, "bout");
            backend_current
                .get_or_create(&labels)
                .set(gauge(row.number("scur")));
            backend_up.get_or_create(&labels).set(up);
            for (field, code) in CODES {
                backend_responses
                    .get_or_create(&BackendCodeLabels {
                        service: service.clone(),
                        backend: row.proxy.clone(),
                        code,
                    })
                    .inc_by(row.number(field).unwrap_or(0));
            }
        }
    }
    registry.register(
        "haproxy_backend_sessions",
        "Sessions (connections) each routed backend took, from HAProxy's show stat",
        backend_sessions,
    );
    registry.register(
        "haproxy_backend_current_sessions",
        "Sessions each routed backend holds now",
        backend_current,
    );
    registry.register_with_unit(
        "haproxy_backend_received",
        "Bytes each routed backend received from clients",
        Unit::Bytes,
        backend_bytes_in,
    );
    registry.register_with_unit(
        "haproxy_backend_sent",
        "Bytes each routed backend sent to clients",
        Unit::Bytes,
        backend_bytes_out,
    );
    registry.register(
        "haproxy_backend_http_responses",
        "HTTP responses of each routed backend, by class",
        backend_responses,
    );
    registry.register(
        "haproxy_backend_up",
        "Whether HAProxy counts the backend UP (at least one server usable)",
        backend_up,
    );
    registry.register(
        "haproxy_server_sessions",
        "Sessions each instance took",
        server_sessions,
    );
    registry.register(
        "haproxy_server_current_sessions",
        "Sessions each instance holds now",
        server_current,
    );
    registry.register(
        "haproxy_server_http_responses",
        "HTTP responses of each instance, by class",
        server_responses,
    );
    registry.register(
        "haproxy_server_up",
        "Whether HAProxy counts the instance UP (its health check passes, or it has none)",
        server_up,
    );
    registry.register(
        "haproxy_server_check_failures",
        "Failed health checks of each instance",
        server_check_failures,
    );
}

fn gauge(value: Option<u64>) -> i64 {
    value.map_or(0, |value| i64::try_from(value).unwrap_or(i64::MAX))
}
