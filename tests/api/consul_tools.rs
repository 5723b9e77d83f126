//! The Consul tools against the embedded registry. The `consul` binary cannot be installed here,
//! so each test sends the exact requests a tool makes (read from its source: `consul members`,
//! `consul info`, `consul catalog nodes`, `consul kv`, `consul watch` through `api/watch/funcs.go`,
//! consul-template's `dependency/*.go`, all through Consul's Go `api` client) and asserts the
//! fields that tool reads in the real registry's answers, blocking queries included.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flow_proxy::registry::embedded::{EmbeddedRegistry, Fault};
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;

/// A running registry plus a client pointed at it (no redirects followed, as Go's client would
/// follow them silently and hide them).
struct Registry {
    registry: EmbeddedRegistry,
    _dir: TempDir,
    client: Client,
}

impl Registry {
    async fn start() -> Registry {
        let dir = TempDir::new().unwrap();
        let registry = EmbeddedRegistry::start("127.0.0.1:0".parse().unwrap(), dir.path())
            .await
            .unwrap();
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        Registry {
            registry,
            _dir: dir,
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry.address())
    }

    async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn put(&self, path: &str, body: &str) -> Response {
        let response = self
            .client
            .put(self.url(path))
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "PUT {path}");
        response
    }

    async fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    /// A 200 JSON answer with its `X-Consul-Index` (0 when the endpoint sets none).
    async fn get_json(&self, path: &str) -> (u64, Value) {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let index = header(&response, "x-consul-index").map_or(0, |v| v.parse().unwrap());
        (index, response.json().await.unwrap())
    }

    async fn register(&self, body: &str) {
        self.put("/v1/agent/service/register", body).await;
    }

    /// The node name as every tool learns it: `Agent().NodeName()` reads `Config.NodeName`.
    async fn node_name(&self) -> String {
        let (_, body) = self.get_json("/v1/agent/self").await;
        body["Config"]["NodeName"].as_str().unwrap().to_string()
    }

    async fn stop(self: Arc<Self>) {
        let registry = Arc::into_inner(self).expect("no request still running");
        registry.registry.shutdown().await;
    }
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn error_text(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    response.text().await.unwrap()
}

/// A watcher's loop step: `path` (which already has its query, if any) is asked with
/// `index=<index>`; the query must still be waiting after 200 ms, `change` is made, and the
/// answer must then come back promptly with a higher index. Returns that answer.
async fn wakes_on<F: std::future::Future<Output = ()>>(
    registry: &Arc<Registry>,
    path: &str,
    index: u64,
    change: F,
) -> (u64, Value) {
    let separator = if path.contains('?') { '&' } else { '?' };
    // The Go client sends `wait` in milliseconds (`durToMsec`), consul-template 60 s by default.
    let blocked = format!("{path}{separator}index={index}&wait=60000ms");
    let waiter = {
        let registry = registry.clone();
        tokio::spawn(async move { registry.get_json(&blocked).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "{path} must block until a change");
    change.await;
    let (woken, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the change wakes the query")
        .unwrap();
    assert!(woken > index, "{path}: index {woken} must pass {index}");
    (woken, body)
}

/// A query with the current index and nothing changing answers after `wait` (plus at most
/// wait/16 of jitter) with the same index, as Consul's do.
async fn times_out_unchanged(registry: &Registry, path: &str, index: u64) {
    let separator = if path.contains('?') { '&' } else { '?' };
    let started = Instant::now();
    let (same, _) = registry
        .get_json(&format!("{path}{separator}index={index}&wait=1s"))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(same, index, "{path}: a timeout keeps the index");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_millis(1_900),
        "{path}: answered after {elapsed:?}"
    );
}

const WEB: &str = r#"{"ID":"host1:web.1:80","Name":"web","Tags":["www","v2"],"Port":32768,"Address":"10.1.2.3","Meta":{"region":"us2"},"Check":{"TTL":"60s"},"Checks":null}"#;
const REDIS: &str = r#"{"ID":"host1:redis.0:6379","Name":"redis","Port":10000,"Address":"10.1.2.4","Check":null,"Checks":null}"#;

/// `consul members` → `GET /v1/agent/members?segment=_all` (plus `wan=1` with `-wan`); it prints
/// Name, `Addr:Port`, the serf status name of `Status`, `server` for `Tags.role == "consul"`,
/// `Tags.build` up to `:`, `Tags.vsn`, `Tags.dc` and `Tags.segment`.
#[tokio::test]
async fn consul_members_sees_one_alive_server() {
    let registry = Arc::new(Registry::start().await);
    let node = registry.node_name().await;

    let (_, members) = registry.get_json("/v1/agent/members?segment=_all").await;
    let members = members.as_array().unwrap();
    assert_eq!(members.len(), 1);
    let member = &members[0];
    assert_eq!(member["Name"], node.as_str());
    assert_eq!(member["Addr"], "127.0.0.1");
    assert_eq!(member["Port"], 8301);
    assert_eq!(member["Status"], 1, "serf StatusAlive prints as `alive`");
    let tags = &member["Tags"];
    assert_eq!(tags["role"], "consul", "printed as Type `server`");
    let build = tags["build"].as_str().unwrap();
    assert_eq!(build.split(':').next(), Some("1.7.10"));
    assert_eq!(tags["vsn"], "2");
    assert_eq!(tags["dc"], "dc1");
    assert_eq!(tags["segment"], "");
    for field in ["ProtocolMin", "ProtocolMax", "ProtocolCur", "DelegateCur"] {
        assert!(member[field].is_u64(), "{field} is a number");
    }
    // Every tag is a string (the Go client decodes map[string]string).
    assert!(tags.as_object().unwrap().values().all(Value::is_string));

    // `-wan`: the WAN pool names servers `<node>.<dc>` on the WAN gossip port.
    let (_, wan) = registry
        .get_json("/v1/agent/members?segment=_all&wan=1")
        .await;
    assert_eq!(wan[0]["Name"], format!("{node}.dc1"));
    assert_eq!(wan[0]["Port"], 8302);
    // `-segment=other`: nobody (the CLI then exits 2).
    let (_, none) = registry.get_json("/v1/agent/members?segment=other").await;
    assert_eq!(none, json!([]));
    // `-filter`: no evaluator here; refused by name rather than ignored.
    let response = registry
        .get("/v1/agent/members?segment=_all&filter=Name%20%3D%3D%20%22x%22")
        .await;
    assert!(error_text(response, StatusCode::BAD_REQUEST)
        .await
        .starts_with("filter:"));
    registry.stop().await;
}

/// `consul info` → `GET /v1/agent/self`, decoded as `map[string]map[string]interface{}`; it
/// prints every group of `Stats` sorted, each value with `%v`.
#[tokio::test]
async fn consul_info_reads_live_stats_from_agent_self() {
    let registry = Arc::new(Registry::start().await);
    let (_, body) = registry.get_json("/v1/agent/self").await;
    for (key, value) in body.as_object().unwrap() {
        assert!(value.is_object(), "top-level {key} must be an object");
    }
    assert_eq!(body["Config"]["Datacenter"], "dc1");
    assert_eq!(body["Config"]["Server"], true);
    assert!(!body["Config"]["NodeName"].as_str().unwrap().is_empty());
    assert_eq!(body["Member"]["Name"], body["Config"]["NodeName"]);
    let stats = body["Stats"].as_object().unwrap();
    for group in ["agent", "build", "consul", "raft", "runtime", "serf_lan"] {
        let values = stats[group].as_object().unwrap();
        assert!(
            values.values().all(Value::is_string),
            "{group}: consul info prints string values"
        );
    }
    assert_eq!(body["Stats"]["agent"]["services"], "0");
    assert_eq!(body["Stats"]["consul"]["leader"], "true");
    assert_eq!(body["Stats"]["raft"]["state"], "Leader");
    let commit_before: u64 = body["Stats"]["raft"]["commit_index"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // The counters follow the registry's state.
    registry.register(WEB).await;
    registry.register(REDIS).await;
    let (_, body) = registry.get_json("/v1/agent/self").await;
    assert_eq!(body["Stats"]["agent"]["services"], "2");
    assert_eq!(body["Stats"]["agent"]["checks"], "1");
    assert_eq!(body["Stats"]["agent"]["check_ttls"], "1");
    let commit_after: u64 = body["Stats"]["raft"]["commit_index"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(commit_after > commit_before, "writes raise the raft index");

    // Without a leader the agent still answers and says so; without rights it refuses.
    registry.registry.set_fault(Some(Fault::NoLeader));
    let (_, body) = registry.get_json("/v1/agent/self").await;
    assert_eq!(body["Stats"]["consul"]["leader"], "false");
    registry.registry.set_fault(Some(Fault::PermissionDenied));
    let response = registry.get("/v1/agent/self").await;
    assert_eq!(
        error_text(response, StatusCode::FORBIDDEN).await,
        "Permission denied"
    );
    registry.registry.set_fault(None);
    registry.stop().await;
}

/// `consul catalog nodes` → `GET /v1/catalog/nodes` (with `near`/`node-meta` when given); it
/// prints Node, ID[:8], Address, Datacenter, and with `-detailed` TaggedAddresses and Meta.
/// `-service=web` reads `/v1/catalog/service/web` instead, mapping ID, Node, Address,
/// Datacenter, TaggedAddresses and NodeMeta. `consul watch -type=nodes` and consul-template's
/// `nodes` block on the same endpoint.
#[tokio::test]
async fn consul_catalog_nodes_and_the_nodes_watch() {
    let registry = Arc::new(Registry::start().await);
    let node = registry.node_name().await;
    let response = registry.get("/v1/catalog/nodes?near=_agent").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-consul-knownleader"), Some("true"));
    assert_eq!(
        header(&response, "x-consul-effective-consistency"),
        Some("leader")
    );
    let index: u64 = header(&response, "x-consul-index")
        .unwrap()
        .parse()
        .unwrap();
    let nodes: Value = response.json().await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!(nodes[0]["Node"], node.as_str());
    assert_eq!(nodes[0]["ID"].as_str().unwrap().len(), 36);
    assert_eq!(nodes[0]["Address"], "127.0.0.1");
    assert_eq!(nodes[0]["Datacenter"], "dc1");
    assert_eq!(nodes[0]["TaggedAddresses"]["lan"], "127.0.0.1");
    assert_eq!(nodes[0]["Meta"], json!({"consul-network-segment": ""}));

    let (_, matching) = registry
        .get_json("/v1/catalog/nodes?node-meta=consul-network-segment:")
        .await;
    assert_eq!(matching.as_array().unwrap().len(), 1);
    let (_, none) = registry
        .get_json("/v1/catalog/nodes?node-meta=rack:r1")
        .await;
    assert_eq!(none, json!([]));

    registry.register(WEB).await;
    let (_, by_service) = registry.get_json("/v1/catalog/service/web").await;
    assert_eq!(by_service[0]["ID"], nodes[0]["ID"]);
    assert_eq!(by_service[0]["Node"], node.as_str());
    assert_eq!(by_service[0]["NodeMeta"], nodes[0]["Meta"]);
    assert_eq!(
        by_service[0]["TaggedAddresses"],
        nodes[0]["TaggedAddresses"]
    );

    // The nodes table does not move with services or KV: a nodes watch times out unchanged.
    registry.put("/v1/kv/unrelated", "x").await;
    times_out_unchanged(&registry, "/v1/catalog/nodes?stale", index).await;

    let (_, datacenters) = registry.get_json("/v1/catalog/datacenters").await;
    assert_eq!(datacenters, json!(["dc1"]));
    let response = registry.get("/v1/catalog/nodes?dc=dc2").await;
    assert_eq!(
        error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await,
        "No path to datacenter"
    );
    registry.registry.set_fault(Some(Fault::NoLeader));
    let response = registry.get("/v1/catalog/nodes").await;
    assert_eq!(
        error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await,
        "No cluster leader"
    );
    registry.registry.set_fault(None);
    registry.stop().await;
}

/// consul-template's `node` → `Agent().NodeName()` then `GET /v1/catalog/node/<name>`; it reads
/// Node.Node, Node.Address and each service's ID, Service, Tags and Port, and treats `null` as
/// "no such node".
#[tokio::test]
async fn catalog_node_lists_services_and_wakes_on_registration() {
    let registry = Arc::new(Registry::start().await);
    let node = registry.node_name().await;
    registry.register(WEB).await;
    let path = format!("/v1/catalog/node/{node}");
    let (index, body) = registry.get_json(&path).await;
    assert_eq!(body["Node"]["Node"], node.as_str());
    assert_eq!(body["Node"]["Address"], "127.0.0.1");
    let web = &body["Services"]["host1:web.1:80"];
    assert_eq!(web["ID"], "host1:web.1:80");
    assert_eq!(web["Service"], "web");
    assert_eq!(web["Tags"], json!(["www", "v2"]));
    assert_eq!(web["Port"], 32768);
    assert_eq!(web["Address"], "10.1.2.3");
    assert_eq!(web["Meta"], json!({"region": "us2"}));

    let (woken, body) = wakes_on(&registry, &path, index, async {
        registry.register(REDIS).await;
    })
    .await;
    assert_eq!(body["Services"]["host1:redis.0:6379"]["Port"], 10000);
    assert_eq!(
        body["Services"]["host1:redis.0:6379"]["Meta"],
        Value::Null,
        "no Meta registered: null, as Consul's NodeService"
    );
    times_out_unchanged(&registry, &path, woken).await;

    let (_, unknown) = registry.get_json("/v1/catalog/node/elsewhere").await;
    assert_eq!(unknown, Value::Null);
    let response = registry.get("/v1/catalog/node/").await;
    assert_eq!(
        error_text(response, StatusCode::BAD_REQUEST).await,
        "Missing node name"
    );
    let response = registry.get("/v1/catalog/node").await;
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(header(&response, "location"), Some("/v1/catalog/node/"));
    let response = registry
        .client
        .put(registry.url(&path))
        .send()
        .await
        .unwrap();
    assert_eq!(header(&response, "allow"), Some("OPTIONS,GET"));
    assert_eq!(
        error_text(response, StatusCode::METHOD_NOT_ALLOWED).await,
        "method PUT not allowed"
    );
    registry.stop().await;
}

/// `consul watch -type=checks` → `GET /v1/health/state/any` (or `-state=<s>`), and with
/// `-service=web` → `GET /v1/health/checks/web`; the handler gets the `HealthCheck` list.
#[tokio::test]
async fn consul_watch_checks_by_state_and_by_service() {
    let registry = Arc::new(Registry::start().await);
    registry.register(WEB).await;
    let check = "service:host1:web.1:80";

    let (index, any) = registry.get_json("/v1/health/state/any").await;
    let ids: Vec<&str> = any
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["CheckID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["serfHealth", check]);
    assert_eq!(any[1]["Status"], "critical", "new checks start critical");
    assert_eq!(any[1]["ServiceName"], "web");
    assert_eq!(any[1]["ServiceID"], "host1:web.1:80");
    assert_eq!(any[1]["Type"], "ttl");
    let (_, critical) = registry.get_json("/v1/health/state/critical").await;
    assert_eq!(critical.as_array().unwrap().len(), 1);
    assert_eq!(critical[0]["CheckID"], check);
    let (_, passing) = registry.get_json("/v1/health/state/passing").await;
    assert_eq!(passing.as_array().unwrap().len(), 1);
    assert_eq!(passing[0]["CheckID"], "serfHealth");
    // Consul matches an unknown state against no check.
    let (_, unknown) = registry.get_json("/v1/health/state/bogus").await;
    assert_eq!(unknown, json!([]));
    let response = registry.get("/v1/health/state/").await;
    assert_eq!(
        error_text(response, StatusCode::BAD_REQUEST).await,
        "Missing check state"
    );

    // A TTL pass wakes the passing watcher, which then sees the check.
    let (_, passing) = wakes_on(&registry, "/v1/health/state/passing", index, async {
        registry
            .put(&format!("/v1/agent/check/pass/{check}?note=ok"), "")
            .await;
    })
    .await;
    assert_eq!(passing.as_array().unwrap().len(), 2);
    assert_eq!(passing[1]["Output"], "ok");

    // By service: only that service's checks; a failure wakes it; an unrelated write does not.
    let (index, checks) = registry.get_json("/v1/health/checks/web").await;
    assert_eq!(checks.as_array().unwrap().len(), 1);
    assert_eq!(checks[0]["Status"], "passing");
    registry.register(REDIS).await;
    times_out_unchanged(&registry, "/v1/health/checks/web", index).await;
    let (_, checks) = wakes_on(&registry, "/v1/health/checks/web", index, async {
        registry
            .put(&format!("/v1/agent/check/fail/{check}?note=down"), "")
            .await;
    })
    .await;
    assert_eq!(checks[0]["Status"], "critical");
    assert_eq!(checks[0]["Output"], "down");
    let (_, none) = registry.get_json("/v1/health/checks/nothing").await;
    assert_eq!(none, json!([]));
    registry.stop().await;
}

/// `consul watch -type=key|keyprefix|services|service`: after `Agent().NodeName()`, the exact
/// blocking requests of `api/watch/funcs.go` (`kv.Get`, `kv.List` with `recurse=`,
/// `catalog.Services`, `health.ServiceMultipleTags` with `tag` and `passing=1`), each woken by
/// the change it watches.
#[tokio::test]
async fn consul_watch_key_keyprefix_services_and_service() {
    let registry = Arc::new(Registry::start().await);
    assert!(!registry.node_name().await.is_empty());

    // key: a missing key answers 404 with an index to block on.
    let response = registry.get("/v1/kv/app/config").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let index: u64 = header(&response, "x-consul-index")
        .unwrap()
        .parse()
        .unwrap();
    let (index, pair) = wakes_on(&registry, "/v1/kv/app/config", index, async {
        registry.put("/v1/kv/app/config", "v1").await;
    })
    .await;
    assert_eq!(pair[0]["Key"], "app/config");
    assert_eq!(pair[0]["Value"], "djE=");
    times_out_unchanged(&registry, "/v1/kv/app/config", index).await;

    // keyprefix
    let (_, pairs) = wakes_on(&registry, "/v1/kv/app?recurse=", index, async {
        registry.put("/v1/kv/app/other", "v2").await;
    })
    .await;
    let keys: Vec<&str> = pairs
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["app/config", "app/other"]);

    // services
    let (index, services) = registry.get_json("/v1/catalog/services").await;
    assert_eq!(services, json!({}));
    let (_, services) = wakes_on(&registry, "/v1/catalog/services", index, async {
        registry.register(WEB).await;
    })
    .await;
    assert_eq!(services["web"], json!(["www", "v2"]));

    // service -service=web -tag=www -passingonly=true: the TTL check starts critical, so the
    // watcher sees nobody until it passes.
    let path = "/v1/health/service/web?passing=1&tag=www";
    let (index, entries) = registry.get_json(path).await;
    assert_eq!(entries, json!([]));
    let (_, entries) = wakes_on(&registry, path, index, async {
        registry
            .put("/v1/agent/check/pass/service:host1:web.1:80", "")
            .await;
    })
    .await;
    assert_eq!(entries[0]["Service"]["ID"], "host1:web.1:80");
    registry.stop().await;
}

/// `consul kv put/get/delete` exactly as the CLI sends them, and consul-template's `key`, `ls`
/// and `tree` (a `kv.Get`, or a `kv.List` with `recurse=`, under `stale` and a blocking index).
#[tokio::test]
async fn consul_kv_commands_and_consul_template_key_functions() {
    let registry = Arc::new(Registry::start().await);
    // consul kv put -flags=42 app/a 1 ; consul kv put app/b/c 2 ; consul kv put app/d 3
    let response = registry.put("/v1/kv/app/a?flags=42", "1").await;
    assert_eq!(response.text().await.unwrap(), "true");
    registry.put("/v1/kv/app/b/c", "2").await;
    registry.put("/v1/kv/app/d", "3").await;

    // consul kv get -detailed app/a
    let (_, pair) = registry.get_json("/v1/kv/app/a").await;
    assert_eq!(pair[0]["Flags"], 42);
    assert_eq!(pair[0]["LockIndex"], 0);
    let modify_index = pair[0]["ModifyIndex"].as_u64().unwrap();
    // consul kv put -cas -modify-index=<stale> app/a x  → false; with the right one → true.
    let response = registry.put("/v1/kv/app/a?cas=1", "x").await;
    assert_eq!(response.text().await.unwrap(), "false");
    let response = registry
        .put(&format!("/v1/kv/app/a?cas={modify_index}"), "x")
        .await;
    assert_eq!(response.text().await.unwrap(), "true");
    // consul kv get -keys -separator=/ app/
    let (_, keys) = registry.get_json("/v1/kv/app/?keys=&separator=%2F").await;
    assert_eq!(keys, json!(["app/a", "app/b/", "app/d"]));

    // consul-template {{ key "app/a" }} with max_stale: ?stale plus a blocking index.
    let (index, pair) = registry.get_json("/v1/kv/app/a?stale=").await;
    assert_eq!(pair[0]["Value"], "eA==");
    let (_, pair) = wakes_on(&registry, "/v1/kv/app/a?stale=", index, async {
        registry.put("/v1/kv/app/a", "y").await;
    })
    .await;
    assert_eq!(pair[0]["Value"], "eQ==");
    // {{ ls "app" }} / {{ tree "app" }}: the whole subtree (ls keeps the direct children).
    let (index, tree) = registry.get_json("/v1/kv/app?recurse=&stale=").await;
    let keys: Vec<&str> = tree
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["Key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["app/a", "app/b/c", "app/d"]);
    let (_, tree) = wakes_on(&registry, "/v1/kv/app?recurse=&stale=", index, async {
        registry.delete("/v1/kv/app/d").await;
    })
    .await;
    assert_eq!(tree.as_array().unwrap().len(), 2);

    // consul kv delete -recurse app  → true, and the subtree is gone.
    let response = registry.delete("/v1/kv/app?recurse=").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "true");
    let response = registry.get("/v1/kv/app?recurse=").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    registry.stop().await;
}
