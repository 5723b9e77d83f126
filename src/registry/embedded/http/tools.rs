//! The endpoints the Consul tools read beyond what flow-proxy and Registrator need: `consul
//! members` (`/v1/agent/members`), `consul info` and every tool's node-name probe
//! (`/v1/agent/self`), `consul catalog nodes` and consul-template's `nodes`/`node`
//! (`/v1/catalog/nodes`, `/v1/catalog/node/<node>`), `consul catalog datacenters`
//! (`/v1/catalog/datacenters`) and `consul watch -type=checks` (`/v1/health/state/<state>`,
//! `/v1/health/checks/<service>`). Shapes follow Consul 1.7 (see `shared/consul-api.md`, §11).
//!
//! The registry is one server node that leads itself, so the answers describe that node: it is
//! the only member, the only catalog node, and its `serfHealth` check always passes.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::response::Response;
use serde::Serialize;

use super::super::store::{Check, CheckKind, Service, State as RegistryState};
use super::super::Fault;
use super::{
    json, no_leader, node_meta, node_meta_matches, tagged_node_addresses, Access, ApiError, App,
    CheckView, HealthNodeView, HealthServiceView, Meta, NodeView, Params, DATACENTER, LEADER,
    NODE_ADDRESS,
};

/// The Consul version whose HTTP API the registry imitates (reported as `Config.Version` and in
/// the members' `build` tag, which `consul members` prints up to the `:`).
const CONSUL_API_VERSION: &str = "1.7.10";
/// Serf's LAN and WAN gossip ports and the server RPC port, as a default Consul agent has them.
const SERF_LAN_PORT: u16 = 8301;
const SERF_WAN_PORT: u16 = 8302;
const SERVER_PORT: &str = "8300";
/// Serf's `StatusAlive`.
const MEMBER_ALIVE: u8 = 1;
/// `?segment=` value meaning "every segment" (`api.AllSegments`).
const ALL_SEGMENTS: &str = "_all";

/// The endpoints served here, with what the path carries.
pub(super) enum ToolRoute {
    AgentSelf,
    AgentMembers,
    CatalogDatacenters,
    CatalogNodes,
    CatalogNode(String),
    HealthState(String),
    HealthChecks(String),
}

impl ToolRoute {
    pub(super) fn find(path: &str) -> Option<ToolRoute> {
        let rest = |prefix: &str| path.strip_prefix(prefix).map(str::to_string);
        Some(match path {
            "/v1/agent/self" => ToolRoute::AgentSelf,
            "/v1/agent/members" => ToolRoute::AgentMembers,
            "/v1/catalog/datacenters" => ToolRoute::CatalogDatacenters,
            "/v1/catalog/nodes" => ToolRoute::CatalogNodes,
            _ => {
                if let Some(node) = rest("/v1/catalog/node/") {
                    ToolRoute::CatalogNode(node)
                } else if let Some(state) = rest("/v1/health/state/") {
                    ToolRoute::HealthState(state)
                } else if let Some(service) = rest("/v1/health/checks/") {
                    ToolRoute::HealthChecks(service)
                } else {
                    return None;
                }
            }
        })
    }

    /// Subtree roots that Go's mux redirects to their `/` form.
    pub(super) const SUBTREE_ROOTS: [&'static str; 3] =
        ["/v1/catalog/node", "/v1/health/state", "/v1/health/checks"];
}

/// Answers one of the tool endpoints (all are GET-only).
pub(super) async fn handle(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
    route: ToolRoute,
) -> Result<Response, ApiError> {
    no_filter(params)?;
    match route {
        ToolRoute::AgentSelf => {
            if fault == Some(Fault::PermissionDenied) {
                return Err(ApiError::Forbidden("Permission denied".into()));
            }
            json(&agent_self(app, fault), params, None)
        }
        ToolRoute::AgentMembers => {
            let segment = params.get("segment").unwrap_or("");
            let wan = params.get("wan").is_some_and(|v| !v.is_empty());
            let members = if segment.is_empty() || segment == ALL_SEGMENTS {
                vec![member(app, wan)]
            } else {
                Vec::new()
            };
            let removed = !access.nodes && !members.is_empty();
            let members = if access.nodes { members } else { Vec::new() };
            let mut response = json(&members, params, None)?;
            access.mark(&mut response, removed);
            Ok(response)
        }
        ToolRoute::CatalogDatacenters => json(&[DATACENTER], params, None),
        ToolRoute::CatalogNodes => catalog_nodes(app, params, fault, access).await,
        ToolRoute::CatalogNode(name) => catalog_node(app, params, fault, access, &name).await,
        ToolRoute::HealthState(state) => health_state(app, params, fault, access, &state).await,
        ToolRoute::HealthChecks(service) => {
            health_checks(app, params, fault, access, &service).await
        }
    }
}

/// `?filter=` takes a go-bexpr expression; the registry has no evaluator, and ignoring the filter
/// would answer more than was asked, so it is refused by name.
fn no_filter(params: &Params) -> Result<(), ApiError> {
    match params.get("filter") {
        Some(filter) if !filter.is_empty() => Err(ApiError::BadRequest(
            "filter: ?filter expressions are not supported by the embedded registry".into(),
        )),
        _ => Ok(()),
    }
}

/// The index that moves whenever any service instance or check changes (and at node creation):
/// what blocking queries on the node and on checks in a state wait on.
fn catalog_index(state: &RegistryState) -> u64 {
    state
        .service_indexes
        .values()
        .copied()
        .chain([
            state.extinction_index,
            state.services_index,
            state.node_index,
        ])
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The node as catalog and health answers show it (`Meta`, not `NodeMeta`).
fn node_view(node: &NodeView) -> HealthNodeView {
    HealthNodeView {
        id: node.id.clone(),
        node: node.name.clone(),
        address: NODE_ADDRESS,
        datacenter: DATACENTER,
        tagged_addresses: tagged_node_addresses(),
        meta: node_meta(),
        create_index: node.index,
        modify_index: node.index,
    }
}

// ---- agent ----------------------------------------------------------------------------------

/// A serf member as `/v1/agent/members` lists it.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct MemberView {
    name: String,
    addr: &'static str,
    port: u16,
    tags: BTreeMap<&'static str, String>,
    status: u8,
    protocol_min: u8,
    protocol_max: u8,
    protocol_cur: u8,
    delegate_min: u8,
    delegate_max: u8,
    delegate_cur: u8,
}

/// The registry's own member: a bootstrapped server of `dc1`. The WAN pool names servers
/// `<node>.<dc>` and gossips on the WAN port.
fn member(app: &App, wan: bool) -> MemberView {
    let node_id = app.store.read(|s| s.node_id.clone());
    let tags = [
        ("acls", "0".to_string()),
        ("bootstrap", "1".to_string()),
        ("build", format!("{CONSUL_API_VERSION}:flow-proxy")),
        ("dc", DATACENTER.to_string()),
        ("id", node_id),
        ("port", SERVER_PORT.to_string()),
        ("raft_vsn", "3".to_string()),
        ("role", "consul".to_string()),
        ("segment", String::new()),
        ("vsn", "2".to_string()),
        ("vsn_max", "3".to_string()),
        ("vsn_min", "2".to_string()),
        ("wan_join_port", SERF_WAN_PORT.to_string()),
    ];
    let (name, port) = if wan {
        (format!("{}.{DATACENTER}", app.node_name), SERF_WAN_PORT)
    } else {
        (app.node_name.clone(), SERF_LAN_PORT)
    };
    MemberView {
        name,
        addr: NODE_ADDRESS,
        port,
        tags: tags.into_iter().collect(),
        status: MEMBER_ALIVE,
        protocol_min: 1,
        protocol_max: 5,
        protocol_cur: 2,
        delegate_min: 2,
        delegate_max: 5,
        delegate_cur: 4,
    }
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct SelfConfig {
    datacenter: &'static str,
    node_name: String,
    #[serde(rename = "NodeID")]
    node_id: String,
    revision: String,
    server: bool,
    version: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Coordinate {
    vec: [f64; 8],
    error: f64,
    adjustment: f64,
    height: f64,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct AgentSelfView {
    config: SelfConfig,
    coord: Coordinate,
    member: MemberView,
    stats: BTreeMap<&'static str, BTreeMap<&'static str, String>>,
    meta: BTreeMap<&'static str, &'static str>,
}

/// Go's `runtime.GOARCH` spelling of the machine architecture.
fn go_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    }
}

fn stats_group(pairs: &[(&'static str, String)]) -> BTreeMap<&'static str, String> {
    pairs.iter().cloned().collect()
}

/// `/v1/agent/self`: `Config` (what `Agent().NodeName()` reads), the agent's member, a fresh
/// coordinate, node meta, and `Stats` (what `consul info` prints: groups of string values).
fn agent_self(app: &App, fault: Option<Fault>) -> AgentSelfView {
    let (node_id, index, services, checks, ttls) = app.store.read(|s| {
        let ttls = s
            .checks
            .values()
            .filter(|c| c.definition.kind == CheckKind::Ttl)
            .count();
        (
            s.node_id.clone(),
            s.index,
            s.services.len(),
            s.checks.len(),
            ttls,
        )
    });
    let leading = fault != Some(Fault::NoLeader);
    let revision = format!("flow-proxy {}", env!("CARGO_PKG_VERSION"));
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .to_string();
    let serf = |members: &str| {
        stats_group(&[
            ("encrypted", "false".into()),
            ("failed", "0".into()),
            ("health_score", "0".into()),
            ("left", "0".into()),
            ("members", members.into()),
        ])
    };
    let stats = BTreeMap::from([
        (
            "agent",
            stats_group(&[
                ("check_monitors", "0".into()),
                ("check_ttls", ttls.to_string()),
                ("checks", checks.to_string()),
                ("services", services.to_string()),
            ]),
        ),
        (
            "build",
            stats_group(&[
                ("prerelease", String::new()),
                ("revision", revision.clone()),
                ("version", CONSUL_API_VERSION.into()),
            ]),
        ),
        (
            "consul",
            stats_group(&[
                ("acl", "disabled".into()),
                ("bootstrap", "true".into()),
                ("known_datacenters", "1".into()),
                ("leader", leading.to_string()),
                ("leader_addr", if leading { LEADER } else { "" }.to_string()),
                ("server", "true".into()),
            ]),
        ),
        (
            "raft",
            stats_group(&[
                ("applied_index", index.to_string()),
                ("commit_index", index.to_string()),
                ("fsm_pending", "0".into()),
                ("last_contact", "0".into()),
                ("last_log_index", index.to_string()),
                ("last_log_term", "1".into()),
                ("num_peers", "0".into()),
                ("protocol_version", "3".into()),
                ("state", if leading { "Leader" } else { "Candidate" }.into()),
                ("term", "1".into()),
            ]),
        ),
        (
            "runtime",
            stats_group(&[
                ("arch", go_arch().into()),
                ("cpu_count", cpus.clone()),
                ("max_procs", cpus),
                ("os", std::env::consts::OS.into()),
                ("version", revision.clone()),
            ]),
        ),
        ("serf_lan", serf("1")),
        ("serf_wan", serf("1")),
    ]);
    AgentSelfView {
        config: SelfConfig {
            datacenter: DATACENTER,
            node_name: app.node_name.clone(),
            node_id,
            revision,
            server: true,
            version: CONSUL_API_VERSION,
        },
        coord: Coordinate {
            vec: [0.0; 8],
            error: 1.5,
            adjustment: 0.0,
            height: 1e-5,
        },
        member: member(app, false),
        stats,
        meta: node_meta(),
    }
}

// ---- catalog --------------------------------------------------------------------------------

/// The meta of a catalog or health read: its index and effective consistency.
fn read_meta(index: u64, consistency: &'static str) -> Option<Meta> {
    Some(Meta {
        index,
        consistency: Some(consistency),
    })
}

/// `/v1/catalog/nodes`: the one node; blocks on the nodes table, which only moves at creation.
async fn catalog_nodes(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
) -> Result<Response, ApiError> {
    params.check_dc()?;
    let consistency = params.consistency()?;
    no_leader(fault)?;
    let blocking = params.blocking()?;
    let listed = node_meta_matches(params);
    let node = NodeView::new(app);
    let (index, nodes) = blocking
        .run(
            &app.store,
            app.shutdown.clone(),
            |s| s.node_index.max(1),
            |_| {
                let nodes: Vec<HealthNodeView> = if listed && access.nodes {
                    vec![node_view(&node)]
                } else {
                    Vec::new()
                };
                nodes
            },
        )
        .await;
    let mut response = json(&nodes, params, read_meta(index, consistency))?;
    access.mark(&mut response, listed && !access.nodes);
    Ok(response)
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct NodeServicesView {
    node: HealthNodeView,
    /// Each service as Consul's `NodeService` shows it (`Meta` is `null` when none was
    /// registered), the same shape `/v1/health/service` gives.
    services: BTreeMap<String, HealthServiceView>,
}

/// `/v1/catalog/node/<node>`: the node and its services keyed by ID; `null` for another node.
async fn catalog_node(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
    name: &str,
) -> Result<Response, ApiError> {
    params.check_dc()?;
    let consistency = params.consistency()?;
    no_leader(fault)?;
    if name.is_empty() {
        return Err(ApiError::BadRequest("Missing node name".into()));
    }
    let blocking = params.blocking()?;
    let ours = name == app.node_name;
    let node = NodeView::new(app);
    // The instances are taken under the lock; the answer is built after it is released.
    let (index, (listed, removed)) = blocking
        .run(&app.store, app.shutdown.clone(), catalog_index, |s| {
            if !ours {
                return (None, false);
            }
            if !access.nodes {
                // Consul's filter drops the whole node.
                return (None, true);
            }
            let removed = !access.services && !s.services.is_empty();
            let services: Vec<Arc<Service>> = s
                .services
                .values()
                .filter(|_| access.services)
                .cloned()
                .collect();
            (Some(services), removed)
        })
        .await;
    let body = listed.map(|services| NodeServicesView {
        node: node_view(&node),
        services: services
            .iter()
            .map(|svc| (svc.id.clone(), HealthServiceView::new(svc)))
            .collect(),
    });
    let mut response = json(&body, params, read_meta(index, consistency))?;
    access.mark(&mut response, removed);
    Ok(response)
}

// ---- health ---------------------------------------------------------------------------------

/// Every check of the node, `serfHealth` included, sorted by check ID as Consul's table is.
fn all_checks(node: &NodeView, checks_table: &[Arc<Check>]) -> Vec<CheckView> {
    let mut checks = vec![CheckView::serf(node)];
    checks.extend(checks_table.iter().map(|c| CheckView::new(node, c)));
    checks.sort_by(|a, b| a.check_id.cmp(&b.check_id));
    checks
}

/// `/v1/health/state/<state>`: checks in `passing`, `warning` or `critical`, or every check for
/// `any`. Like Consul, a state that is none of these matches no check (`200 []`). It blocks on
/// the checks-table index, as Consul's does: a check added, changed or removed wakes it; an
/// instance without checks coming or going does not.
async fn health_state(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
    wanted: &str,
) -> Result<Response, ApiError> {
    params.check_dc()?;
    let consistency = params.consistency()?;
    no_leader(fault)?;
    if wanted.is_empty() {
        return Err(ApiError::BadRequest("Missing check state".into()));
    }
    let blocking = params.blocking()?;
    let listed = node_meta_matches(params);
    let node = NodeView::new(app);
    // Consul's checks-table index: it wakes on check changes only. The checks are taken under
    // the lock; the answer is built after it is released.
    let (index, all) = blocking
        .run(
            &app.store,
            app.shutdown.clone(),
            RegistryState::checks_table_index,
            |s| {
                if listed {
                    s.checks.values().cloned().collect()
                } else {
                    Vec::new()
                }
            },
        )
        .await;
    let in_state: Vec<CheckView> = if listed {
        all_checks(&node, &all)
            .into_iter()
            .filter(|c| wanted == "any" || c.status == wanted)
            .collect()
    } else {
        Vec::new()
    };
    let (checks, dropped): (Vec<CheckView>, Vec<CheckView>) = in_state
        .into_iter()
        .partition(|c| access.check(&c.service_name));
    let removed = !dropped.is_empty();
    let mut response = json(&checks, params, read_meta(index, consistency))?;
    access.mark(&mut response, removed);
    Ok(response)
}

/// `/v1/health/checks/<service>`: the checks of every instance of a service (no node checks);
/// blocks on that service's index, like `/v1/health/service/<service>`.
async fn health_checks(
    app: &App,
    params: &Params,
    fault: Option<Fault>,
    access: Access,
    service: &str,
) -> Result<Response, ApiError> {
    params.check_dc()?;
    let consistency = params.consistency()?;
    no_leader(fault)?;
    if service.is_empty() {
        return Err(ApiError::BadRequest("Missing service name".into()));
    }
    let blocking = params.blocking()?;
    let listed = node_meta_matches(params);
    let node = NodeView::new(app);
    let (index, (checks, removed)) = blocking
        .run(
            &app.store,
            app.shutdown.clone(),
            |s| s.service_index(service),
            |s| {
                let all: Vec<CheckView> = if listed {
                    s.checks
                        .values()
                        .filter(|c| c.service_name == service)
                        .map(|c| CheckView::new(&node, c))
                        .collect()
                } else {
                    Vec::new()
                };
                let removed = !all.is_empty() && !access.check(service);
                let checks = if access.check(service) {
                    all
                } else {
                    Vec::new()
                };
                (checks, removed)
            },
        )
        .await;
    let mut response = json(&checks, params, read_meta(index, consistency))?;
    access.mark(&mut response, removed);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_routes_are_found_and_others_are_not() {
        assert!(matches!(
            ToolRoute::find("/v1/agent/self"),
            Some(ToolRoute::AgentSelf)
        ));
        assert!(matches!(
            ToolRoute::find("/v1/catalog/node/web-1"),
            Some(ToolRoute::CatalogNode(name)) if name == "web-1"
        ));
        assert!(matches!(
            ToolRoute::find("/v1/health/state/critical"),
            Some(ToolRoute::HealthState(state)) if state == "critical"
        ));
        assert!(ToolRoute::find("/v1/health/service/web").is_none());
        assert!(ToolRoute::find("/v1/agent/selfish").is_none());
    }

    #[test]
    fn go_architecture_names() {
        assert!(!go_arch().is_empty());
        assert_ne!(go_arch(), "x86_64");
        assert_ne!(go_arch(), "aarch64");
    }
}
