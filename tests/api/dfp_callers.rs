//! Docker Flow Proxy's callers keep working: the parameters they send that mean nothing here
//! are accepted and named in the answer, a typo is refused with the closest name, indexed
//! destinations read as both generations wrote them, and `serviceDomainAlgo` /
//! `--service-domain-algo` choose how domains match.

use reqwest::StatusCode;

use flow_proxy::spec::DomainAlgo;

use crate::helpers::{free_port, proxy_routing_demo, spawn_backend, TestProxy};

/// Sends `GET /` to `port` on 127.0.0.1 and returns the name of the backend that answered.
async fn name_on_port(proxy: &TestProxy, port: u16) -> String {
    let response = proxy
        .http()
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .unwrap_or_else(|error| panic!("HAProxy answers on port {port}: {error}"));
    assert_eq!(response.status(), StatusCode::OK, "GET / on port {port}");
    let body = response.text().await.expect("body");
    body.split(' ').next().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_docker_flow_proxy_clients_send_are_ignored_and_named_in_the_message() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("demo").await;
    proxy
        .register_instance("go-demo", "go-demo.1", backend.port)
        .await;

    let (status, answer) = proxy
        .reconfigure(
            "serviceName=go-demo&servicePath=/demo&distribute=true&replicas=3\
             &discoveryType=swarm&proxyInstanceName=docker-flow&fromListener=true&recreate=true",
        )
        .await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["Status"], "OK");
    let message = answer["Message"].as_str().unwrap_or_default();
    for parameter in [
        "distribute",
        "replicas",
        "discoveryType",
        "proxyInstanceName",
        "fromListener",
        "recreate",
    ] {
        assert!(
            message.contains(&format!("`{parameter}` ignored: ")),
            "the message names `{parameter}` with its reason: {message}"
        );
    }
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);
    let config = proxy.config().await;
    assert!(!config.contains("docker-flow") && !config.contains("swarm"));

    // A plain reconfigure has an empty message, as in Docker Flow Proxy.
    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["Message"], "");

    let (status, answer) = proxy
        .remove("serviceName=go-demo&aclName=05-go-demo&distribute=true")
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(message.contains("`aclName` ignored: "), "{message}");
    assert!(message.contains("`distribute` ignored: "), "{message}");
    let (status, _) = proxy.get_through_proxy("/demo", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the service is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mistyped_parameter_is_refused_with_the_closest_name_and_changes_nothing() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let before = proxy.snapshot().await;

    for (query, parameter, suggestion) in [
        (
            "serviceName=go-demo&servicepath=/other",
            "servicepath",
            "servicePath",
        ),
        (
            "serviceName=go-demo&servicePth.1=/other",
            "servicePth.1",
            "servicePath.1",
        ),
        (
            "serviceName=go-demo&servicePath=/other&prot=8080",
            "prot",
            "port",
        ),
    ] {
        let (status, answer) = proxy.reconfigure(query).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{query}: {answer}");
        assert_eq!(answer["Status"], "NOK");
        let message = answer["Message"].as_str().unwrap_or_default();
        assert!(
            message.contains(&format!("`{parameter}`"))
                && message.contains(&format!("did you mean `{suggestion}`?")),
            "{query}: {message}"
        );
    }
    let (status, answer) = proxy
        .reconfigure("serviceName=go-demo&servicePath=/demo&xForwardedProto=true")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(message.contains("`xForwardedProto`"), "{message}");
    assert!(
        !message.contains("did you mean"),
        "nothing is close: {message}"
    );
    let (status, answer) = proxy.remove("servicename=go-demo").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(message.contains("did you mean `serviceName`?"), "{message}");

    proxy.assert_unchanged_since(&before).await;
    assert_eq!(proxy.names_answering("/demo", None, 1).await, ["demo"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsuffixed_port_is_the_port_of_every_indexed_destination() {
    let proxy = TestProxy::spawn().await;
    let registered = spawn_backend("registered").await;
    let shared = spawn_backend("shared").await;
    proxy
        .register_instance("shop", "shop.1", registered.port)
        .await;

    let query = format!(
        "serviceName=shop&port={}&servicePath.1=/a&servicePath.2=/b\
         &servicePath.3=/c&port.3={}",
        shared.port, registered.port
    );
    let (status, answer) = proxy.reconfigure(&query).await;

    assert_eq!(status, StatusCode::OK, "{answer}");
    let indices: Vec<u64> = answer["ServiceDest"]
        .as_array()
        .expect("destinations")
        .iter()
        .map(|d| d["Index"].as_u64().unwrap_or_default())
        .collect();
    assert_eq!(indices, [1, 2, 3], "no unsuffixed destination: {answer}");
    assert_eq!(proxy.names_answering("/a", None, 1).await, ["shared"]);
    assert_eq!(proxy.names_answering("/b", None, 1).await, ["shared"]);
    assert_eq!(
        proxy.names_answering("/c", None, 1).await,
        ["registered"],
        "port.3 overrides the default"
    );
    let (status, _) = proxy.get_through_proxy("/elsewhere", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);

    // The newer form: an unsuffixed destination with a path is one, and lends its port.
    let query = format!(
        "serviceName=shop&servicePath=/zero&port={}&servicePath.1=/one",
        shared.port
    );
    proxy.reconfigure_ok(&query).await;
    assert_eq!(proxy.names_answering("/zero", None, 1).await, ["shared"]);
    assert_eq!(proxy.names_answering("/one", None, 1).await, ["shared"]);
    let (status, _) = proxy.get_through_proxy("/a", None).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "the new spec replaced the old"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_destinations_take_the_unsuffixed_mode_and_port_and_a_whole_one_stays() {
    let proxy = TestProxy::spawn().await;
    let registered = spawn_backend("registered").await;
    let shared = spawn_backend("shared").await;
    proxy.register_instance("db", "db.1", registered.port).await;
    let (first, second) = (free_port(), free_port());

    let query = format!(
        "serviceName=db&reqMode=tcp&port={}&srcPort.1={first}&srcPort.2={second}",
        shared.port
    );
    proxy.reconfigure_ok(&query).await;

    assert_eq!(name_on_port(&proxy, first).await, "shared");
    assert_eq!(name_on_port(&proxy, second).await, "shared");

    // `reqMode=tcp&srcPort=…` alone is a destination, as it always was.
    let only = free_port();
    proxy
        .reconfigure_ok(&format!("serviceName=db&reqMode=tcp&srcPort={only}"))
        .await;
    assert_eq!(name_on_port(&proxy, only).await, "registered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_domain_algo_chooses_how_the_host_matches() {
    let proxy = TestProxy::spawn().await;
    let mut backends = Vec::new();
    for name in ["exact", "beg", "end", "dom", "wild"] {
        let backend = spawn_backend(name).await;
        proxy
            .register_instance(name, &format!("{name}.1"), backend.port)
            .await;
        backends.push(backend);
    }
    for query in [
        "serviceName=exact&serviceDomain=exact.test",
        "serviceName=beg&serviceDomain=beg.test&serviceDomainAlgo=hdr_beg",
        "serviceName=end&serviceDomain=end.test&serviceDomainAlgo=hdr_end(host)",
        "serviceName=dom&serviceDomain=dom.test&serviceDomainAlgo=hdr_dom",
        "serviceName=wild&serviceDomain=*.wild.test,wild.test&serviceDomainAlgo=hdr_beg",
    ] {
        proxy.reconfigure_ok(query).await;
    }

    for (host, expected) in [
        ("exact.test", Some("exact")),
        ("EXACT.test:8080", Some("exact")),
        ("www.exact.test", None),
        ("exact.test.example", None),
        ("beg.test", Some("beg")),
        ("Beg.test.example:81", Some("beg")),
        ("www.beg.test", None),
        ("end.test", Some("end")),
        ("myend.test", Some("end")),
        ("end.test.example", None),
        ("dom.test", Some("dom")),
        ("www.dom.test", Some("dom")),
        ("notdom.test", None),
        ("a.wild.test", Some("wild")),
        ("wild.test.example", Some("wild")),
    ] {
        let (status, body) = proxy.get_through_proxy("/", Some(host)).await;
        match expected {
            Some(name) => {
                assert_eq!(status, StatusCode::OK, "{host}: {body}");
                assert!(body.starts_with(&format!("{name} ")), "{host}: {body}");
            }
            None => assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{host}: {body}"),
        }
    }

    let before = proxy.snapshot().await;
    let (status, answer) = proxy
        .reconfigure("serviceName=exact&serviceDomain=exact.test&serviceDomainAlgo=req.ssl_sni")
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");
    let message = answer["Message"].as_str().unwrap_or_default();
    assert!(message.contains("serviceDomainAlgo"), "{message}");
    proxy.assert_unchanged_since(&before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_domain_algo_flag_applies_to_services_without_their_own() {
    let proxy = TestProxy::spawn_with(|settings| {
        settings.service_domain_algo = DomainAlgo::HdrDom;
    })
    .await;
    let site = spawn_backend("site").await;
    let strict = spawn_backend("strict").await;
    proxy.register_instance("site", "site.1", site.port).await;
    proxy
        .register_instance("strict", "strict.1", strict.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=site&serviceDomain=site.test")
        .await;
    proxy
        .reconfigure_ok("serviceName=strict&serviceDomain=strict.test&serviceDomainAlgo=hdr")
        .await;

    assert_eq!(
        proxy.names_answering("/", Some("www.site.test"), 1).await,
        ["site"]
    );
    assert_eq!(
        proxy.names_answering("/", Some("site.test"), 1).await,
        ["site"]
    );
    assert_eq!(
        proxy.names_answering("/", Some("strict.test"), 1).await,
        ["strict"]
    );
    let (status, _) = proxy.get_through_proxy("/", Some("www.strict.test")).await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "serviceDomainAlgo=hdr keeps the exact match"
    );
}
