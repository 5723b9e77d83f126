//! A route belongs to one service: a second service claiming the same path or domain is refused
//! with 409 naming the owner, and so is one service more than `--max-services`. Neither changes
//! anything.

use reqwest::StatusCode;

use crate::helpers::{spawn_backend, TestProxy};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_or_domain_another_service_routes_is_refused_naming_the_owner() {
    let shop = spawn_backend("shop").await;
    let rival = spawn_backend("rival").await;
    let proxy = TestProxy::spawn().await;
    proxy.register_instance("shop", "shop-1", shop.port).await;
    proxy
        .register_instance("rival", "rival-1", rival.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=shop&servicePath=/shop,/cart&serviceDomain.1=shop.example.com")
        .await;
    let before = proxy.snapshot().await;

    for (query, route) in [
        ("serviceName=rival&servicePath=/cart", "path_beg /cart"),
        (
            "serviceName=rival&servicePath=/other&servicePath.1=/shop",
            "path_beg /shop",
        ),
        (
            "serviceName=rival&serviceDomain=SHOP.example.com",
            "every path of shop.example.com",
        ),
    ] {
        let (status, answer) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::CONFLICT, "{query}: {answer}");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(route),
            "{query}: names the route: {message}"
        );
        assert!(
            message.contains("`shop`"),
            "{query}: names the owner: {message}"
        );
    }
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.stored_spec("rival").await, None);
    assert_eq!(
        proxy.get_through_proxy("/cart", None).await,
        (StatusCode::OK, "shop /cart".into())
    );

    // The same path with another path type, or under a domain, is another route: ordering
    // decides between them, as documented.
    proxy
        .reconfigure_ok("serviceName=rival&servicePath=/shop&serviceDomain=rival.example.com")
        .await;
    assert_eq!(
        proxy
            .get_through_proxy("/shop", Some("rival.example.com"))
            .await,
        (StatusCode::OK, "rival /shop".into())
    );
    assert_eq!(
        proxy.get_through_proxy("/shop", None).await,
        (StatusCode::OK, "shop /shop".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blue_green_switch_of_one_service_is_no_conflict() {
    let blue = spawn_backend("blue").await;
    let green = spawn_backend("green").await;
    let proxy = TestProxy::spawn().await;
    proxy
        .register_instance("app-blue", "app-blue-1", blue.port)
        .await;
    proxy
        .register_instance("app-green", "app-green-1", green.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=app&serviceColor=blue&servicePath=/app")
        .await;
    proxy
        .reconfigure_ok("serviceName=app&serviceColor=green&servicePath=/app")
        .await;
    assert_eq!(
        proxy.get_through_proxy("/app", None).await,
        (StatusCode::OK, "green /app".into())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_service_more_than_max_services_is_refused_and_the_others_still_change() {
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn_with(|settings| settings.max_services = 2).await;
    proxy.register_instance("one", "one-1", backend.port).await;
    proxy
        .reconfigure_ok("serviceName=one&servicePath=/one")
        .await;
    proxy
        .reconfigure_ok("serviceName=two&servicePath=/two")
        .await;
    let before = proxy.snapshot().await;

    let (status, answer) = proxy
        .reconfigure("serviceName=three&servicePath=/three")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(
        message.contains("2 services") && message.contains("--max-services"),
        "{message}"
    );
    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.stored_spec("three").await, None);

    // A routed service can still change.
    proxy
        .reconfigure_ok("serviceName=one&servicePath=/first")
        .await;
    assert_eq!(
        proxy.get_through_proxy("/first", None).await,
        (StatusCode::OK, "app /first".into())
    );
}

/// Services reconfigured at the same time are applied together (one batch): a claim is checked
/// against the routed services and against the others of the batch alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_claiming_one_path_at_the_same_time_get_one_winner_each() {
    let backend = spawn_backend("app").await;
    let proxy = TestProxy::spawn().await;
    for pair in 0..6 {
        for side in ["left", "right"] {
            let name = format!("{side}{pair}");
            proxy
                .register_instance(&name, &format!("{name}-1"), backend.port)
                .await;
        }
    }
    let calls = (0..6).flat_map(|pair| {
        ["left", "right"].map(|side| {
            let proxy = &proxy;
            async move {
                let name = format!("{side}{pair}");
                let query = format!("serviceName={name}&servicePath=/contested{pair}");
                let (status, answer) = proxy.reconfigure(&query).await;
                (pair, name, status, answer)
            }
        })
    });
    // A reload first keeps the core busy while the pairs queue up behind it: they are applied
    // together, as one batch.
    let (reloaded, answers) = tokio::join!(
        proxy.api_get("/v1/docker-flow-proxy/reload"),
        futures::future::join_all(calls)
    );
    assert_eq!(reloaded.0, StatusCode::OK, "{reloaded:?}");
    for pair in 0..6 {
        let outcomes: Vec<_> = answers.iter().filter(|(p, ..)| *p == pair).collect();
        let winners: Vec<&String> = outcomes
            .iter()
            .filter(|(_, _, status, _)| *status == StatusCode::OK)
            .map(|(_, name, ..)| name)
            .collect();
        assert_eq!(winners.len(), 1, "pair {pair}: {outcomes:?}");
        let loser = outcomes
            .iter()
            .find(|(_, name, ..)| name != winners[0])
            .expect("two sides");
        assert_eq!(loser.2, StatusCode::CONFLICT, "pair {pair}: {outcomes:?}");
        assert_eq!(proxy.stored_spec(&loser.1).await, None);
        let path = format!("/contested{pair}");
        assert_eq!(
            proxy.get_through_proxy(&path, None).await,
            (StatusCode::OK, format!("app {path}"))
        );
    }
}
