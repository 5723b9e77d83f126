//! A slow Consul costs callers time, never the front door: every API call is answered within the
//! change timeout with 503, calls beyond the queue are refused at once with `Retry-After`, the
//! routes keep being served, nothing half-applied stays behind, and changes work again once
//! Consul answers in time.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::fleet::{ProxyProcess, SharedRegistry, KV_PREFIX};
use crate::front::RegistryFront;
use crate::helpers::spawn_backend;

const CHANGE_TIMEOUT: Duration = Duration::from_secs(3);
/// Concurrent calls while Consul is slow: 100 more than the queue holds.
const BURST: usize = flow_proxy::proxy::QUEUE_CAPACITY + 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_registry_gets_every_caller_a_prompt_503_and_changes_nothing() {
    let registry = SharedRegistry::start().await;
    let front = RegistryFront::start(&registry.address()).await;
    let web = spawn_backend("web").await;
    registry.register_instance("web", "web.1", web.port).await;
    let proxy = ProxyProcess::start(
        &front.address(),
        &["--change-timeout", &CHANGE_TIMEOUT.as_secs().to_string()],
    )
    .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    let before = proxy.snapshot().await;

    // Consul now answers after 10 s.
    front.set_delay(Duration::from_secs(10));
    let started = Instant::now();
    let calls = (0..BURST).map(|n| {
        let proxy = &proxy;
        async move {
            let response = proxy
                .http()
                .get(proxy.api(&format!(
                    "/v1/docker-flow-proxy/reconfigure?serviceName=svc{n}&servicePath=/svc{n}"
                )))
                .send()
                .await
                .expect("the API answers");
            let answered_after = started.elapsed();
            let retry_after = response.headers().contains_key("retry-after");
            let status = response.status();
            let body = response.text().await.expect("body");
            (status, retry_after, answered_after, body)
        }
    });
    let answers = futures::future::join_all(calls).await;
    let slowest = answers
        .iter()
        .map(|answer| answer.2)
        .max()
        .expect("answers");
    assert!(
        slowest < CHANGE_TIMEOUT + Duration::from_secs(3),
        "every call is answered within the change timeout; the slowest took {slowest:?}"
    );
    for (status, _, _, body) in &answers {
        assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    let busy = answers
        .iter()
        .filter(|(_, retry_after, _, body)| *retry_after && body.contains("busy"))
        .count();
    assert!(
        busy >= BURST - flow_proxy::proxy::QUEUE_CAPACITY - 1,
        "calls beyond the queue are refused at once with Retry-After: {busy} of {BURST}"
    );
    let timed_out = answers
        .iter()
        .filter(|(_, _, _, body)| body.contains("not applied within"))
        .count();
    assert!(timed_out >= 1, "the queued calls say they timed out");

    // The front door kept serving throughout.
    assert_eq!(
        proxy.get_through_proxy("/web", None).await,
        (StatusCode::OK, "web /web".to_string())
    );

    // Consul answers in time again: nothing of the burst was applied, and changes work.
    front.set_delay(Duration::ZERO);
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(
        registry.kv_keys(&format!("{KV_PREFIX}/services/")).await,
        [format!("{KV_PREFIX}/services/web")],
        "none of the burst was stored"
    );
    let web2 = spawn_backend("web2").await;
    registry
        .register_instance("web2", "web2.1", web2.port)
        .await;
    // Calls queued before the delay was lifted may still be ending: retry while busy.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = proxy
            .reconfigure("serviceName=web2&servicePath=/web2")
            .await;
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(Instant::now() < deadline, "changes work again: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        proxy.get_through_proxy("/web2", None).await,
        (StatusCode::OK, "web2 /web2".to_string())
    );
}
