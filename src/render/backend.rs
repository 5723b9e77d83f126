//! The backend tuning block of a backend: what `balance`, the timeouts, `connectionMode`,
//! compression, `sessionType` and the health settings of a spec become in haproxy.cfg.
//!
//! Order inside `backend <name>` (templates/backend.hbs): `mode`, `balance`, then this block —
//! `timeout server`, `timeout tunnel`, `option <connectionMode>`, `compression algo`,
//! `compression type`, `cookie <serviceName> insert indirect nocache` (`sessionType`),
//! `option httpchk` with `http-check send meth GET uri <checkPath>`, `option redispatch 1`,
//! `default-server inter … fall 3 rise 2 [observe … error-limit … on-error mark-down]` — then
//! basic auth, the edge rules, the servers (`cookie <server name>` on each with
//! `sessionType=sticky-server`). A TCP frontend carries the service's `timeoutClient`.
//!
//! Health is on unless `skipCheck=true`: every server has `check`, and the `default-server`
//! line sets the check interval and the passive health ([`HealthView`]); `option redispatch 1`
//! sends a retried request to another instance, so a stopped instance costs the client nothing.

use serde::Serialize;

use crate::spec::{Destination, ReqMode, ServiceSpec};

/// Rise and fall of the active checks: HAProxy's defaults, written out so a reader sees them.
const CHECK_FALL: u8 = 3;
const CHECK_RISE: u8 = 2;

/// The tuning lines of one backend; `None`/empty: the line is not written.
#[derive(Debug, Serialize)]
pub(super) struct BackendTuningView {
    /// The `balance` arguments, `roundrobin` unless the spec says otherwise.
    balance: String,
    timeout_server: Option<String>,
    timeout_tunnel: Option<String>,
    /// `http-keep-alive`, `http-server-close` or `httpclose` (HTTP backends only).
    connection_mode: Option<&'static str>,
    /// `compression algo` arguments (HTTP backends only).
    compression_algo: Option<String>,
    /// `compression type` arguments.
    compression_type: Option<String>,
    /// The stickiness cookie's name: the service name (HTTP backends with
    /// `sessionType=sticky-server`).
    cookie: Option<String>,
    health: Option<HealthView>,
}

/// Active and passive health of one backend's servers.
#[derive(Debug, Serialize)]
struct HealthView {
    /// `checkPath`: `GET <path>` replaces the TCP connect check (HTTP backends only).
    check_path: Option<String>,
    /// The `default-server` arguments: `inter <checkInterval> fall 3 rise 2`, then, with
    /// passive health (`maxFails` > 0), `observe <observe> error-limit <maxFails> on-error
    /// mark-down`.
    default_server: String,
}

/// The tuning block of `destination`'s backend.
pub(super) fn tuning_view(spec: &ServiceSpec, destination: &Destination) -> BackendTuningView {
    let tuning = spec.backend_tuning();
    let http = destination.req_mode() == ReqMode::Http;
    let health = (!spec.skip_check()).then(|| {
        let mut default_server = format!(
            "inter {} fall {CHECK_FALL} rise {CHECK_RISE}",
            tuning.effective_check_interval()
        );
        let max_fails = tuning.effective_max_fails();
        if max_fails > 0 {
            default_server.push_str(&format!(
                " observe {} error-limit {max_fails} on-error mark-down",
                tuning.effective_observe().as_str()
            ));
        }
        HealthView {
            check_path: tuning.check_path.clone().filter(|_| http),
            default_server,
        }
    });
    BackendTuningView {
        balance: tuning
            .balance
            .as_ref()
            .map_or_else(|| "roundrobin".to_string(), |b| b.as_config()),
        timeout_server: tuning
            .timeout_server
            .as_ref()
            .map(|t| t.as_str().to_string()),
        timeout_tunnel: tuning
            .timeout_tunnel
            .as_ref()
            .map(|t| t.as_str().to_string()),
        connection_mode: tuning
            .connection_mode
            .filter(|_| http)
            .map(|mode| mode.as_str()),
        compression_algo: (http && !tuning.compression_algo.is_empty())
            .then(|| tuning.compression_algo.join(" ")),
        compression_type: (http && !tuning.compression_type.is_empty())
            .then(|| tuning.compression_type.join(" ")),
        cookie: (http && tuning.sticky_server).then(|| spec.service_name().to_string()),
        health,
    }
}

/// The `cookie` value of a server in `destination`'s backend (its server name), with
/// `sessionType=sticky-server`.
pub(super) fn server_cookie(
    spec: &ServiceSpec,
    destination: &Destination,
    server_name: &str,
) -> Option<String> {
    (destination.req_mode() == ReqMode::Http && spec.backend_tuning().sticky_server)
        .then(|| server_name.to_string())
}

/// The `timeout client` of a service's TCP frontend (`timeoutClient`).
pub(super) fn tcp_timeout_client(spec: &ServiceSpec) -> Option<String> {
    spec.backend_tuning()
        .timeout_client
        .as_ref()
        .map(|t| t.as_str().to_string())
}
