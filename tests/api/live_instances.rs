//! Instances follow Consul: "an instance registered, deregistered, or turning critical reaches
//! HAProxy within one second, without any API call". Each test changes the registry the way
//! Registrator or a check does, and then only looks: requests through HAProxy (and `/config`)
//! must show the change within one second of the registry call, with no call to flow-proxy.
//!
//! HAProxy health-checks every server (`check`), but a server in a freshly loaded configuration
//! starts up (its first check can only take it down), so a newly routed instance answers at once.
//! The tests still only ask that it answers *at least once* among a few requests, which is what
//! round robin over a server that is up guarantees.

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::StatusCode;
use tokio::time::Instant;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry};
use crate::helpers::spawn_backend;

/// The bound: a change in Consul reaches HAProxy within one second.
const LIVE: Duration = Duration::from_secs(1);

/// Requests per look: with round robin over two or three servers, each one that is up answers
/// at least once.
const SAMPLE: usize = 6;

/// How long the KV watch of a second proxy may take to pick up a route stored by the first.
const FOLLOW: Duration = Duration::from_secs(5);

/// Waits until `condition` holds, failing unless it held within [`LIVE`] counted from `changed`
/// (taken just before the registry call, so the call's own time counts too). Returns how long
/// the change took to show.
async fn live_within_a_second<F, Fut>(changed: Instant, what: &str, condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually(what, LIVE.saturating_sub(changed.elapsed()), condition).await;
    let took = changed.elapsed();
    eprintln!("{what}: {took:?} after the registry change");
    took
}

/// The distinct backend names answering [`SAMPLE`] requests for `path`.
async fn serving(proxy: &ProxyProcess, path: &str) -> BTreeSet<String> {
    proxy
        .names_answering(path, None, SAMPLE)
        .await
        .into_iter()
        .collect()
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|name| name.to_string()).collect()
}

/// `127.0.0.1:<port>` as a server line of haproxy.cfg names the instance.
fn server_address(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_serves_within_a_second_without_any_api_call() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["one"]));

    let changed = Instant::now();
    registry.register_instance("web", "web.2", two.port).await;
    live_within_a_second(changed, "the registered instance answers", || async {
        serving(&proxy, "/web").await.contains("two")
    })
    .await;

    assert_eq!(
        serving(&proxy, "/web").await,
        names(&["one", "two"]),
        "both instances share the requests"
    );
    assert!(
        proxy.config().await.contains(&server_address(two.port)),
        "/config lists the new instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_a_reconfigure_read_does_not_hide_another_one_registered_beside_it() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let web_one = spawn_backend("web-one").await;
    let web_two = spawn_backend("web-two").await;
    let api_one = spawn_backend("api-one").await;
    let api_two = spawn_backend("api-two").await;
    registry
        .register_instance("web", "web.1", web_one.port)
        .await;
    registry
        .register_instance("api", "api.1", api_one.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    assert_eq!(serving(&proxy, "/api").await, names(&["api-one"]));

    // Registrator registers two containers without checks; the deployment of web then calls
    // reconfigure, which reads web's instances (and so the index of web's registration). The
    // catalog's move also spans api's registration, which only a listing can name.
    let changed = Instant::now();
    registry
        .register_instance("web", "web.2", web_two.port)
        .await;
    registry
        .register_instance("api", "api.2", api_two.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    live_within_a_second(
        changed,
        "api's new instance answers without a call",
        || async { serving(&proxy, "/api").await.contains("api-two") },
    )
    .await;
    assert_eq!(
        serving(&proxy, "/web").await,
        names(&["web-one", "web-two"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_instance_stops_being_routed_within_a_second() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    registry.register_instance("web", "web.2", two.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["one", "two"]));

    // The backend keeps running: only Consul says the instance is gone.
    let changed = Instant::now();
    registry.deregister_instance("web.2").await;
    live_within_a_second(
        changed,
        "the deregistered instance is not routed",
        || async { serving(&proxy, "/web").await == names(&["one"]) },
    )
    .await;

    assert_eq!(
        proxy.names_answering("/web", None, 20).await,
        ["one"; 20],
        "no request reaches the deregistered instance any more"
    );
    let config = proxy.config().await;
    assert!(
        !config.contains(&server_address(two.port)),
        "/config no longer lists the deregistered instance:\n{config}"
    );
    assert!(config.contains(&server_address(one.port)), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_whose_check_turns_critical_leaves_and_comes_back_within_a_second() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry
        .register_instance_with_ttl_check("web", "web.1", one.port)
        .await;
    let check_two = registry
        .register_instance_with_ttl_check("web", "web.2", two.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["one", "two"]));

    let changed = Instant::now();
    registry.fail_check(&check_two).await;
    live_within_a_second(changed, "the critical instance is not routed", || async {
        serving(&proxy, "/web").await == names(&["one"])
    })
    .await;
    assert!(
        !proxy.config().await.contains(&server_address(two.port)),
        "/config no longer lists the critical instance"
    );

    let changed = Instant::now();
    registry.pass_check(&check_two).await;
    live_within_a_second(changed, "the passing instance answers again", || async {
        serving(&proxy, "/web").await.contains("two")
    })
    .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["one", "two"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_instance_watching_new_instances_wait_for_a_reload() {
    let registry = SharedRegistry::start().await;
    let watching = ProxyProcess::start(&registry.address(), &[]).await;
    let on_demand = ProxyProcess::start(&registry.address(), &["--watch-instances=false"]).await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    registry.register_instance("web", "web.1", one.port).await;
    watching
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    // The route reaches the second proxy through the stored specs, with the instances of then.
    eventually("the on-demand proxy routes /web", FOLLOW, || async {
        on_demand.get_through_proxy("/web", None).await.0 == StatusCode::OK
    })
    .await;
    assert_eq!(serving(&on_demand, "/web").await, names(&["one"]));

    let changed = Instant::now();
    registry.register_instance("web", "web.2", two.port).await;
    // Once the watching proxy routes it, a watch would have seen it: the on-demand one has not.
    live_within_a_second(
        changed,
        "the watching proxy routes the new instance",
        || async { serving(&watching, "/web").await.contains("two") },
    )
    .await;
    let config = on_demand.config().await;
    assert!(
        !config.contains(&server_address(two.port)),
        "--watch-instances=false: the new instance waits for a reload:\n{config}"
    );
    assert_eq!(serving(&on_demand, "/web").await, names(&["one"]));

    let (status, body) = on_demand.api_get("/v1/docker-flow-proxy/reload").await;
    assert_eq!(status, StatusCode::OK, "reload: {body}");
    assert_eq!(
        serving(&on_demand, "/web").await,
        names(&["one", "two"]),
        "the reload read the instances"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_service_follows_the_instances_of_its_current_color() {
    let registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let blue_1 = spawn_backend("blue-1").await;
    let blue_2 = spawn_backend("blue-2").await;
    let blue_3 = spawn_backend("blue-3").await;
    let green_1 = spawn_backend("green-1").await;
    let green_2 = spawn_backend("green-2").await;
    registry
        .register_instance("web-blue", "web-blue.1", blue_1.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=web&serviceColor=blue&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["blue-1"]));

    let changed = Instant::now();
    registry
        .register_instance("web-blue", "web-blue.2", blue_2.port)
        .await;
    live_within_a_second(changed, "a new blue instance answers", || async {
        serving(&proxy, "/web").await.contains("blue-2")
    })
    .await;

    // Green is deployed next to blue; the cutover is the reconfigure, not the registration.
    registry
        .register_instance("web-green", "web-green.1", green_1.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=web&serviceColor=green&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, names(&["green-1"]));

    // Blue changes first, then green: once green's change shows, blue's would have too.
    registry
        .register_instance("web-blue", "web-blue.3", blue_3.port)
        .await;
    let changed = Instant::now();
    registry
        .register_instance("web-green", "web-green.2", green_2.port)
        .await;
    live_within_a_second(changed, "a new green instance answers", || async {
        serving(&proxy, "/web").await.contains("green-2")
    })
    .await;
    assert_eq!(
        serving(&proxy, "/web").await,
        names(&["green-1", "green-2"]),
        "after the cutover, blue's instances are not followed"
    );
    assert!(!proxy.config().await.contains(&server_address(blue_3.port)));
}
