//! A Consul that comes back without its data (rebuilt cluster, lost disks) must not empty the
//! proxies: they keep their routes and write their specs back, so other proxies and restarts
//! find them again.

use std::time::Duration;

use reqwest::StatusCode;

use crate::fleet::{eventually, ProxyProcess, SharedRegistry};
use crate::helpers::spawn_backend;

/// Long enough for a watch in backoff (capped at 10 s) to try again after the registry is back.
const RESYNC: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_survive_a_consul_that_lost_its_data_and_their_specs_are_stored_again() {
    let mut registry = SharedRegistry::start().await;
    let proxy = ProxyProcess::start(&registry.address(), &[]).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    // Enough writes that the rebuilt registry's indexes are lower than the ones seen before.
    for round in 0..5 {
        let (status, body) = proxy
            .reconfigure(&format!("serviceName=web&servicePath=/web,/round-{round}"))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let spec_before = registry.stored_spec("web").await.expect("stored");

    registry.stop().await;
    // A rebuild takes a while: the proxy sees Consul gone before it sees it back.
    eventually(
        "the proxy notices that Consul is gone",
        Duration::from_secs(5),
        || async { proxy.log().contains("watching the stored specs failed") },
    )
    .await;
    registry.lose_data();
    registry.restart().await;
    assert_eq!(
        registry.stored_spec("web").await,
        None,
        "the registry came back empty"
    );

    eventually(
        "the proxy stores its spec in the rebuilt registry again",
        RESYNC,
        || async { registry.stored_spec("web").await.as_ref() == Some(&spec_before) },
    )
    .await;
    assert_eq!(
        proxy.services().await[0],
        spec_before,
        "the route is still configured"
    );
    // Registrator registers the instance again; the route serves it without any API call.
    registry.register_instance("web", "web.1", web.port).await;
    eventually("the re-registered instance serves", RESYNC, || async {
        proxy.get_through_proxy("/web", None).await == (StatusCode::OK, "web /web".to_string())
    })
    .await;
}
