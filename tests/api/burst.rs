//! A burst of deployments: hundreds of reconfigures of distinct services sent at once all queue
//! (none is refused as busy), each caller gets its own 200 once its service is live, and the burst
//! is applied in batches, with far fewer reloads than changes, each service routed to its own
//! instances.

use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};
use crate::metrics::{sample, scrape};

/// Concurrent reconfigures: more than the queue held before it was raised (64), fewer than it
/// holds now.
const BURST: usize = 200;
const _: () = assert!(BURST > 64 && BURST < flow_proxy::proxy::QUEUE_CAPACITY);

/// HAProxy reloads so far (successful and failed).
async fn reloads(proxy: &TestProxy) -> f64 {
    let text = scrape(proxy).await;
    ["ok", "failed"]
        .iter()
        .filter_map(|result| {
            sample(
                &text,
                "flow_proxy_haproxy_reloads_total",
                &[&format!(r#"result="{result}""#)],
            )
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_hundreds_of_deployments_is_queued_whole_and_applied_in_batches() {
    let proxy = TestProxy::spawn().await;
    // A backend of its own for each service, so an instance routed to the wrong service shows.
    let mut backends = Vec::with_capacity(BURST);
    for index in 0..BURST {
        let service = format!("burst{index}");
        let backend = spawn_backend(&service).await;
        proxy
            .register_instance(&service, &format!("{service}.1"), backend.port)
            .await;
        backends.push(backend);
    }
    let reloads_before = reloads(&proxy).await;

    let calls = (0..BURST).map(|index| {
        let proxy = &proxy;
        async move {
            proxy
                .reconfigure(&format!(
                    "serviceName=burst{index}&servicePath=/burst{index}"
                ))
                .await
        }
    });
    let answers = futures::future::join_all(calls).await;
    for (index, (status, body)) in answers.iter().enumerate() {
        assert_eq!(
            *status,
            StatusCode::OK,
            "burst{index} is applied, not refused as busy: {body}"
        );
    }

    let reloaded = reloads(&proxy).await - reloads_before;
    assert!(
        reloaded <= (BURST / 10) as f64,
        "{BURST} deployments are applied in batches: {reloaded} reloads"
    );
    for index in 0..BURST {
        let path = format!("/burst{index}");
        assert_eq!(
            proxy.get_through_proxy(&path, None).await,
            (StatusCode::OK, format!("burst{index} {path}")),
            "burst{index} is served"
        );
        assert!(
            proxy.stored_spec(&format!("burst{index}")).await.is_some(),
            "burst{index} is stored"
        );
    }
}
