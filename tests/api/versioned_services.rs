//! Versioned services on a shared prefix, the HAProxy `reqrep ^([^\ ]*\ /)hello/v1[/]?(.*) \1\2`
//! setup of consul-template users: `/hello/v1` and `/hello/v2` are two services whose instances
//! never see the prefix (`stripPath`), only instances carrying a Consul tag are routed
//! (`serviceTag`), and anything else is a regex rewrite (`reqPathSearchReplace`, or Docker Flow
//! Proxy's older `reqPathSearch`/`reqPathReplace`). Each backend answers with the path and query
//! it received, so every test reads what the instance saw.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::eventually;
use crate::helpers::TestProxy;

/// How long a registry change may take to reach HAProxy through the instance watch (the issue
/// asks for one second; this leaves room for a loaded machine).
const WATCH: Duration = Duration::from_secs(5);

/// Requests per look: round robin over two or three servers shows each one that is up.
const SAMPLE: usize = 6;

/// A backend on 127.0.0.1 that answers every request with `<name> <path and query>`.
struct PathBackend {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PathBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn path_backend(name: &str) -> PathBackend {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind backend");
    let port = listener.local_addr().expect("backend address").port();
    let name = name.to_string();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let name = name.clone();
        async move {
            let received = uri.path_and_query().map_or("", |p| p.as_str()).to_string();
            format!("{name} {received}")
        }
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    PathBackend { port, task }
}

/// Registers an instance with Consul tags, as Registrator does with `SERVICE_TAGS`.
async fn register_tagged(proxy: &TestProxy, service: &str, id: &str, port: u16, tags: &[&str]) {
    let body = serde_json::json!({
        "ID": id, "Name": service, "Port": port, "Address": "127.0.0.1", "Tags": tags,
    });
    let response = proxy
        .http()
        .put(format!(
            "http://{}/v1/agent/service/register",
            proxy.registry_address()
        ))
        .json(&body)
        .send()
        .await
        .expect("registry answers");
    assert_eq!(response.status(), StatusCode::OK, "register {id}");
}

/// What the instance answering `path` received: `(backend name, path and query)`.
async fn received(proxy: &TestProxy, path: &str) -> (String, String) {
    let (status, body) = proxy.get_through_proxy(path, None).await;
    assert_eq!(status, StatusCode::OK, "GET {path} through HAProxy: {body}");
    match body.split_once(' ') {
        Some((name, got)) => (name.to_string(), got.to_string()),
        None => panic!("GET {path}: unexpected answer {body:?}"),
    }
}

/// The distinct backends answering [`SAMPLE`] requests for `path`.
async fn answering(proxy: &TestProxy, path: &str) -> BTreeSet<String> {
    proxy
        .names_answering(path, None, SAMPLE)
        .await
        .into_iter()
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| name.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_versions_on_a_shared_prefix_each_receive_the_path_without_it() {
    let proxy = TestProxy::spawn().await;
    let v1 = path_backend("v1").await;
    let v2 = path_backend("v2").await;
    proxy
        .register_instance("hello-v1", "hello-v1.1", v1.port)
        .await;
    proxy
        .register_instance("hello-v2", "hello-v2.1", v2.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=hello-v1&servicePath=/hello/v1&stripPath=true")
        .await;
    proxy
        .reconfigure_ok("serviceName=hello-v2&servicePath=/hello/v2&stripPath=true")
        .await;

    assert_eq!(
        received(&proxy, "/hello/v1/x?q=1").await,
        ("v1".into(), "/x?q=1".into()),
        "the prefix is gone, the query string kept"
    );
    assert_eq!(
        received(&proxy, "/hello/v1").await,
        ("v1".into(), "/".into())
    );
    assert_eq!(
        received(&proxy, "/hello/v1/").await,
        ("v1".into(), "/".into())
    );
    assert_eq!(
        received(&proxy, "/hello/v2/users/7?page=2&sort=name").await,
        ("v2".into(), "/users/7?page=2&sort=name".into())
    );
    // Without stripPath the instance gets the path as the client sent it.
    proxy
        .reconfigure_ok("serviceName=hello-v2&servicePath=/hello/v2")
        .await;
    assert_eq!(
        received(&proxy, "/hello/v2/x?q=1").await,
        ("v2".into(), "/hello/v2/x?q=1".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strip_path_takes_the_longest_matching_path_of_a_destination() {
    let proxy = TestProxy::spawn().await;
    let api = path_backend("api").await;
    proxy.register_instance("api", "api.1", api.port).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api,/api/v1&stripPath=true")
        .await;

    assert_eq!(received(&proxy, "/api/v1/x").await.1, "/x");
    assert_eq!(received(&proxy, "/api/x").await.1, "/x");
    // The prefix of one path is removed once: `/api/v1/api/x` keeps its inner `/api`.
    assert_eq!(received(&proxy, "/api/v1/api/x").await.1, "/api/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_instances_carrying_the_tag_are_routed_and_new_ones_follow_without_a_call() {
    let proxy = TestProxy::spawn().await;
    let rest = path_backend("rest").await;
    let plain = path_backend("plain").await;
    register_tagged(&proxy, "hello", "hello.rest", rest.port, &["rest", "v1"]).await;
    register_tagged(&proxy, "hello", "hello.plain", plain.port, &[]).await;
    proxy
        .reconfigure_ok("serviceName=hello&servicePath=/hello&serviceTag=rest")
        .await;

    assert_eq!(answering(&proxy, "/hello").await, names(&["rest"]));
    let config = proxy.config().await;
    assert!(
        !config.contains(&format!("127.0.0.1:{}", plain.port)),
        "the untagged instance is not a server:\n{config}"
    );

    // A tagged instance registered later is routed by the instance watch, with no API call;
    // an untagged one registered at the same time never is.
    let rest2 = path_backend("rest2").await;
    let plain2 = path_backend("plain2").await;
    register_tagged(&proxy, "hello", "hello.plain2", plain2.port, &["v1"]).await;
    register_tagged(&proxy, "hello", "hello.rest2", rest2.port, &["rest"]).await;
    eventually("the second tagged instance answers", WATCH, || async {
        answering(&proxy, "/hello").await == names(&["rest", "rest2"])
    })
    .await;
    let config = proxy.config().await;
    assert!(
        !config.contains(&format!("127.0.0.1:{}", plain2.port)),
        "an instance without the tag never becomes a server:\n{config}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_tags_must_all_be_carried_and_two_routes_split_one_consul_service() {
    let proxy = TestProxy::spawn().await;
    let v1 = path_backend("v1").await;
    let v2 = path_backend("v2").await;
    let both = path_backend("both").await;
    register_tagged(&proxy, "hello-blue", "hello.v1", v1.port, &["rest", "v1"]).await;
    register_tagged(&proxy, "hello-blue", "hello.v2", v2.port, &["rest", "v2"]).await;
    register_tagged(&proxy, "hello-blue", "hello.both", both.port, &["v1", "v2"]).await;
    // Two routes read the one Consul service `hello-blue` (`hello` in color `blue` is the same
    // Consul service): `/v1` takes the instances tagged rest and v1, `/v2` rest and v2.
    proxy
        .reconfigure_ok("serviceName=hello-blue&servicePath=/v1&serviceTag=rest,v1&stripPath=true")
        .await;
    proxy
        .reconfigure_ok(
            "serviceName=hello&serviceColor=blue&servicePath=/v2&serviceTag=v2,rest&stripPath=true",
        )
        .await;
    assert_eq!(answering(&proxy, "/v1/x").await, names(&["v1"]));
    assert_eq!(answering(&proxy, "/v2/x").await, names(&["v2"]));

    // Tagging the v1 instance with v2 as well (Registrator re-registers it) brings it into `/v2`
    // through that route's own watch, and `/v1` stays as it was.
    register_tagged(
        &proxy,
        "hello-blue",
        "hello.v1",
        v1.port,
        &["rest", "v1", "v2"],
    )
    .await;
    eventually("the re-tagged instance answers on /v2", WATCH, || async {
        answering(&proxy, "/v2/x").await == names(&["v1", "v2"])
    })
    .await;
    assert_eq!(answering(&proxy, "/v1/x").await, names(&["v1"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_replace_rewrite_shows_in_the_path_the_backend_got() {
    let proxy = TestProxy::spawn().await;
    let legacy = path_backend("legacy").await;
    proxy
        .register_instance("legacy", "legacy.1", legacy.port)
        .await;
    // `/legacy/,/:/v(\d+)/,/version-\1/`, percent-encoded: the first pair removes the prefix
    // (Docker Flow Proxy's usual use), the second renames a versioned segment with a group.
    proxy
        .reconfigure_ok(
            "serviceName=legacy&servicePath=/legacy\
             &reqPathSearchReplace=/legacy/,/:/v(%5Cd%2B)/,/version-%5C1/",
        )
        .await;
    assert_eq!(
        received(&proxy, "/legacy/v12/items?x=1").await.1,
        "/version-12/items?x=1"
    );
    assert_eq!(received(&proxy, "/legacy/other").await.1, "/other");

    // Docker Flow Proxy's older pair of parameters: one search and one replacement.
    proxy
        .reconfigure_ok(
            "serviceName=legacy&servicePath=/legacy&reqPathSearch=/legacy&reqPathReplace=/api",
        )
        .await;
    assert_eq!(
        received(&proxy, "/legacy/items?x=1").await.1,
        "/api/items?x=1"
    );

    // With stripPath, the pairs see the path without the prefix.
    proxy
        .reconfigure_ok(
            "serviceName=legacy&servicePath=/legacy&stripPath=true&reqPathSearchReplace=%5E/old,/new",
        )
        .await;
    assert_eq!(received(&proxy, "/legacy/old/x").await.1, "/new/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_refused_naming_the_parameter_and_change_nothing() {
    let proxy = TestProxy::spawn().await;
    let legacy = path_backend("legacy").await;
    proxy
        .register_instance("legacy", "legacy.1", legacy.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=legacy&servicePath=/legacy&stripPath=true")
        .await;
    let before = proxy.snapshot().await;

    let cases = [
        ("serviceTag=a%20b", "serviceTag"),
        ("serviceTag=rest%26tag%3Dother", "serviceTag"),
        ("stripPath=yes", "stripPath"),
        ("pathType=path_reg&stripPath=true", "stripPath"),
        // A quote would end the single-quoted word; a space or `#` would start another.
        ("reqPathSearchReplace=/a',/b", "reqPathSearchReplace"),
        ("reqPathSearchReplace=/a%20b,/b", "reqPathSearchReplace"),
        ("reqPathSearchReplace=/a%23x,/b", "reqPathSearchReplace"),
        (
            "reqPathSearchReplace=/a,/b%0Abackend%20x",
            "reqPathSearchReplace",
        ),
        ("reqPathSearchReplace=(a,/b", "reqPathSearchReplace"),
        // A replacement must start with `/`, so the rewritten path stays a path.
        ("reqPathSearchReplace=/a,b", "reqPathSearchReplace"),
        ("reqPathSearchReplace=/a,%5C3", "reqPathSearchReplace"),
        ("reqPathSearchReplace=/a", "reqPathSearchReplace"),
        ("reqPathSearch=/a", "reqPathSearch"),
    ];
    proxy
        .assert_each_refused("serviceName=legacy&servicePath=/legacy", &cases)
        .await;
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(received(&proxy, "/legacy/x").await.1, "/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_regex_haproxy_rejects_is_refused_with_its_own_message() {
    let proxy = TestProxy::spawn().await;
    let legacy = path_backend("legacy").await;
    proxy
        .register_instance("legacy", "legacy.1", legacy.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=legacy&servicePath=/legacy&stripPath=true")
        .await;
    let before = proxy.snapshot().await;

    // Well-formed for flow-proxy's checks, refused by HAProxy's regex engine.
    let (status, answer) = proxy
        .reconfigure("serviceName=legacy&servicePath=/legacy&reqPathSearchReplace=[z-a],/")
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("[ALERT]") && message.contains("range out of order"),
        "HAProxy's own lines reach the caller: {message}"
    );
    proxy.assert_unchanged_since(&before).await;
    let stored = proxy.stored_spec("legacy").await.expect("legacy is stored");
    assert_eq!(
        stored["ServiceDest"][0]["ReqPathSearchReplace"],
        serde_json::json!([]),
        "KV keeps the old spec: {stored}"
    );
    assert_eq!(received(&proxy, "/legacy/x").await.1, "/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_answers_with_the_passing_instances_carrying_every_tag() {
    use flow_proxy::registry::{ConsulClient, InstanceQuery};

    let proxy = TestProxy::spawn().await;
    let register = |id: &'static str, port: u16, tags: &'static [&'static str], check| {
        let body = serde_json::json!({
            "ID": id, "Name": "hello", "Port": port, "Address": "127.0.0.1", "Tags": tags,
            "Check": check,
        });
        let request = proxy
            .http()
            .put(format!(
                "http://{}/v1/agent/service/register",
                proxy.registry_address()
            ))
            .json(&body);
        async move {
            let response = request.send().await.expect("registry answers");
            assert_eq!(response.status(), StatusCode::OK, "register {id}");
        }
    };
    register("both", 9001, &["rest", "v1"], serde_json::Value::Null).await;
    // Consul compares tags without regard to case.
    register("rest-upper", 9002, &["REST"], serde_json::Value::Null).await;
    register("v1-only", 9003, &["v1"], serde_json::Value::Null).await;
    // A TTL check starts critical: tagged, but not passing.
    let critical = serde_json::json!({ "TTL": "60s" });
    register("both-critical", 9004, &["rest", "v1"], critical).await;

    let client = ConsulClient::new(&[proxy.registry_address()], None);
    let ports = |query: InstanceQuery| {
        let client = client.clone();
        async move {
            let mut ports: Vec<u16> = client
                .healthy_instances(&query)
                .await
                .expect("the registry answers")
                .iter()
                .map(|instance| instance.port())
                .collect();
            ports.sort();
            ports
        }
    };
    let tags = |list: &[&str]| list.iter().map(|tag| tag.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ports(InstanceQuery::new("hello", tags(&["rest", "v1"]))).await,
        [9001]
    );
    assert_eq!(
        ports(InstanceQuery::new("hello", tags(&["rest"]))).await,
        [9001, 9002]
    );
    assert_eq!(
        ports(InstanceQuery::untagged("hello")).await,
        [9001, 9002, 9003]
    );
    assert!(ports(InstanceQuery::new("hello", tags(&["v2"])))
        .await
        .is_empty());
}
