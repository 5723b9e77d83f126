//! The embedded registry speaks Consul's HTTP API (see ../shared/consul-api.md): each test starts
//! it on an ephemeral port with a fresh data directory and talks to it over real HTTP, asserting
//! what a Consul client sees: bodies, status codes, headers and plain-text errors.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flow_proxy::registry::embedded::{EmbeddedRegistry, Fault};
use futures::StreamExt;
use reqwest::{Client, Response, StatusCode};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A running registry plus a client pointed at it.
struct Harness {
    registry: EmbeddedRegistry,
    dir: TempDir,
    client: Client,
}

impl Harness {
    async fn start() -> Harness {
        let dir = TempDir::new().unwrap();
        Harness::start_in(dir).await
    }

    async fn start_in(dir: TempDir) -> Harness {
        let registry = EmbeddedRegistry::start(loopback(), dir.path())
            .await
            .unwrap();
        let client = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Harness {
            registry,
            dir,
            client,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.registry.address())
    }

    async fn get(&self, path: &str) -> Response {
        self.client.get(self.url(path)).send().await.unwrap()
    }

    async fn put(&self, path: &str, body: impl Into<reqwest::Body>) -> Response {
        self.client
            .put(self.url(path))
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn delete(&self, path: &str) -> Response {
        self.client.delete(self.url(path)).send().await.unwrap()
    }

    async fn get_json(&self, path: &str) -> (u64, Value) {
        let response = self.get(path).await;
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        let index = index_of(&response);
        (index, response.json().await.unwrap())
    }

    async fn register(&self, body: &str) {
        let response = self
            .put("/v1/agent/service/register", body.to_string())
            .await;
        let status = response.status();
        let text = response.text().await.unwrap();
        assert_eq!(status, StatusCode::OK, "register failed: {text}");
        assert_eq!(text, "");
    }

    /// Polls `path` until `ready` holds for its JSON body (at most ~10 s).
    async fn wait_for(&self, path: &str, ready: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            let (_, body) = self.get_json(path).await;
            if ready(&body) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{path} never reached the expected state");
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn header<'a>(response: &'a Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).map(|v| v.to_str().unwrap())
}

fn index_of(response: &Response) -> u64 {
    header(response, "x-consul-index")
        .expect("X-Consul-Index present")
        .parse()
        .unwrap()
}

async fn error_text(response: Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    assert_eq!(
        header(&response, "content-type"),
        Some("text/plain; charset=utf-8")
    );
    response.text().await.unwrap()
}

const REDIS: &str = r#"{"ID":"host1:redis.0:6379","Name":"redis","Port":10000,"Address":"192.168.1.102","Check":null,"Checks":null}"#;

#[tokio::test]
async fn status_leader_methods_and_options() {
    let h = Harness::start().await;
    let response = h.get("/v1/status/leader").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "\"127.0.0.1:8300\"");

    let response = h.get("/v1/agent/service/register").await;
    assert_eq!(header(&response, "allow"), Some("OPTIONS,PUT"));
    assert_eq!(
        error_text(response, StatusCode::METHOD_NOT_ALLOWED).await,
        "method GET not allowed"
    );

    let response = h
        .client
        .request(reqwest::Method::OPTIONS, h.url("/v1/kv/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "allow"), Some("OPTIONS,GET,PUT,DELETE"));
    assert_eq!(response.text().await.unwrap(), "");
    h.registry.shutdown().await;
}

#[tokio::test]
async fn kv_put_get_shapes_and_headers() {
    let h = Harness::start().await;
    let response = h.put("/v1/kv/dfp/routes/web?flags=5", "hello").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(
        header(&response, "x-consul-index").is_none(),
        "no index on writes"
    );
    assert_eq!(header(&response, "content-type"), Some("application/json"));
    assert_eq!(response.text().await.unwrap(), "true");

    let response = h.get("/v1/kv/dfp/routes/web").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(header(&response, "x-consul-knownleader"), Some("true"));
    assert_eq!(header(&response, "x-consul-lastcontact"), Some("0"));
    let index = index_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!([{"LockIndex":0,"Key":"dfp/routes/web","Flags":5,"Value":"aGVsbG8=",
                "CreateIndex":index,"ModifyIndex":index}])
    );

    // A PUT without ?flags resets Flags; CreateIndex stays, ModifyIndex rises.
    h.put("/v1/kv/dfp/routes/web", "hi").await;
    let (index2, body) = h.get_json("/v1/kv/dfp/routes/web").await;
    assert!(index2 > index);
    assert_eq!(body[0]["Flags"], 0);
    assert_eq!(body[0]["CreateIndex"], index);
    assert_eq!(body[0]["ModifyIndex"], index2);

    // Empty value is null; ?raw gives the bytes.
    h.put("/v1/kv/empty", "").await;
    let (_, body) = h.get_json("/v1/kv/empty").await;
    assert_eq!(body[0]["Value"], Value::Null);
    let response = h.get("/v1/kv/dfp/routes/web?raw").await;
    assert!(header(&response, "x-consul-index").is_some());
    assert_eq!(response.text().await.unwrap(), "hi");

    // Missing key: 404, empty body, meta headers.
    let response = h.get("/v1/kv/nope").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(index_of(&response) >= 1);
    assert_eq!(header(&response, "x-consul-knownleader"), Some("true"));
    assert_eq!(response.text().await.unwrap(), "");

    assert_eq!(
        error_text(h.get("/v1/kv/").await, StatusCode::BAD_REQUEST).await,
        "Missing key name"
    );
    assert_eq!(
        error_text(
            h.put("/v1/kv/x?flags=-1", "v").await,
            StatusCode::INTERNAL_SERVER_ERROR
        )
        .await,
        "strconv.ParseUint: parsing \"-1\": invalid syntax"
    );

    // ?pretty pretty-prints.
    let text = h.get("/v1/kv/empty?pretty").await.text().await.unwrap();
    assert!(text.starts_with("[\n    {\n"), "{text}");
    h.registry.shutdown().await;
}

#[tokio::test]
async fn kv_cas_and_delete_semantics() {
    let harness = Harness::start().await;
    let h = &harness;
    let put = |path: &'static str, body: &'static str| async move {
        h.put(path, body).await.text().await.unwrap()
    };
    assert_eq!(put("/v1/kv/c?cas=0", "1").await, "true");
    assert_eq!(put("/v1/kv/c?cas=0", "2").await, "false");
    let (_, body) = h.get_json("/v1/kv/c").await;
    let modify = body[0]["ModifyIndex"].as_u64().unwrap();
    let response = h.put(&format!("/v1/kv/c?cas={}", modify + 100), "3").await;
    assert_eq!(response.status(), StatusCode::OK, "stale CAS is 200");
    assert_eq!(response.text().await.unwrap(), "false");
    let response = h.put(&format!("/v1/kv/c?cas={modify}"), "4").await;
    assert_eq!(response.text().await.unwrap(), "true");
    assert_eq!(
        error_text(
            h.put("/v1/kv/c?cas=abc", "5").await,
            StatusCode::INTERNAL_SERVER_ERROR
        )
        .await,
        "strconv.ParseUint: parsing \"abc\": invalid syntax"
    );
    assert_eq!(
        error_text(
            h.put("/v1/kv/c?acquire=abc&cas=1", "5").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Conflicting flags: acquire=abc&cas=1"
    );

    // DELETE: cas=0 never deletes, stale cas false, missing key true.
    let (_, body) = h.get_json("/v1/kv/c").await;
    let modify = body[0]["ModifyIndex"].as_u64().unwrap();
    assert_eq!(
        h.delete("/v1/kv/c?cas=0").await.text().await.unwrap(),
        "false"
    );
    let stale = format!("/v1/kv/c?cas={}", modify - 1);
    assert_eq!(h.delete(&stale).await.text().await.unwrap(), "false");
    let exact = format!("/v1/kv/c?cas={modify}");
    assert_eq!(h.delete(&exact).await.text().await.unwrap(), "true");
    assert_eq!(h.get("/v1/kv/c").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(h.delete("/v1/kv/c").await.text().await.unwrap(), "true");
    assert_eq!(
        h.delete("/v1/kv/c?cas=5").await.text().await.unwrap(),
        "true"
    );
    assert_eq!(
        error_text(
            h.delete("/v1/kv/c?recurse&cas=3").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Conflicting flags: cas=3&recurse="
    );
    harness.registry.shutdown().await;
}

#[tokio::test]
async fn kv_recurse_keys_and_prefix_delete() {
    let h = Harness::start().await;
    for key in [
        "dfp/routes/b",
        "dfp/routes/a",
        "dfp/routes/sub/x",
        "dfp/routesX",
        "other",
    ] {
        h.put(&format!("/v1/kv/{key}"), "v").await;
    }
    let (index, body) = h.get_json("/v1/kv/dfp/routes?recurse").await;
    let keys: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "dfp/routes/a",
            "dfp/routes/b",
            "dfp/routes/sub/x",
            "dfp/routesX"
        ]
    );
    let max_modify = body
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ModifyIndex"].as_u64().unwrap())
        .max()
        .unwrap();
    assert_eq!(index, max_modify, "prefix index is the max ModifyIndex");

    let (_, body) = h.get_json("/v1/kv/dfp/routes/?keys&separator=/").await;
    assert_eq!(
        body,
        json!(["dfp/routes/a", "dfp/routes/b", "dfp/routes/sub/"])
    );
    assert_eq!(
        h.get("/v1/kv/nothing?keys").await.status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get("/v1/kv/nothing/?recurse").await.status(),
        StatusCode::NOT_FOUND
    );

    // A recursive delete removes by string prefix and raises the prefix index (tombstones).
    assert_eq!(
        h.delete("/v1/kv/dfp/routes/?recurse")
            .await
            .text()
            .await
            .unwrap(),
        "true"
    );
    let response = h.get("/v1/kv/dfp/routes/?recurse").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    assert!(index_of(&response) > index);
    let (_, body) = h.get_json("/v1/kv/?keys").await;
    assert_eq!(body, json!(["dfp/routesX", "other"]));
    h.delete("/v1/kv/?recurse").await;
    let (_, body) = h.get_json("/v1/kv/?keys").await;
    assert_eq!(body, json!([]), "root ?keys answers 200 []");
    h.registry.shutdown().await;
}

#[tokio::test]
async fn kv_paths_are_decoded_and_cleaned() {
    let h = Harness::start().await;
    h.put("/v1/kv/a%20b%2Fc", "v").await;
    let (_, body) = h.get_json("/v1/kv/a%20b/c").await;
    assert_eq!(body[0]["Key"], "a b/c");
    let response = h.put("/v1/kv//lead", "v").await;
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(header(&response, "location"), Some("/v1/kv/lead"));
    let response = h.get("/v1/kv?recurse").await;
    assert_eq!(response.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(header(&response, "location"), Some("/v1/kv/?recurse"));
    let response = h.get("/v1/nope").await;
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    h.registry.shutdown().await;
}

/// Sends a raw HTTP/1.1 request and returns the whole response text.
async fn raw_http(address: SocketAddr, request: &[u8]) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut response = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response));
    let _ = read.await;
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test]
async fn kv_value_size_limit_holds_for_real_bodies() {
    let h = Harness::start().await;
    let at_limit = vec![b'x'; 524_288];
    let response = h.put("/v1/kv/big", at_limit).await;
    assert_eq!(response.text().await.unwrap(), "true");

    let response = h.put("/v1/kv/big", vec![b'x'; 524_289]).await;
    assert_eq!(header(&response, "connection"), Some("close"));
    assert_eq!(
        error_text(response, StatusCode::PAYLOAD_TOO_LARGE).await,
        "Request body(524289 bytes) too large, max size: 524288 bytes. See https://www.consul.io/docs/agent/options.html#kv_max_value_size."
    );

    // A chunked upload has no Content-Length; the limit still holds.
    let mut request = b"PUT /v1/kv/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    let chunk = vec![b'y'; 524_289];
    request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
    request.extend_from_slice(&chunk);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    let response = raw_http(h.registry.address(), &request).await;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert_eq!(
        h.get("/v1/kv/chunked").await.status(),
        StatusCode::NOT_FOUND
    );
    h.registry.shutdown().await;
}

#[tokio::test]
async fn blocking_queries_wait_wake_and_time_out() {
    let h = Arc::new(Harness::start().await);
    h.put("/v1/kv/watched", "1").await;
    let (index, _) = h.get_json("/v1/kv/watched").await;

    // Timeout: same index; an unrelated write does not wake a single-key query.
    h.put("/v1/kv/unrelated", "x").await;
    let (same, _) = h
        .get_json(&format!("/v1/kv/watched?index={index}&wait=1s"))
        .await;
    assert_eq!(same, index);

    // Wake: a blocked query returns once the key changes, with a higher index.
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move {
            h.get_json(&format!("/v1/kv/watched?index={index}&wait=1m30s"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiter.is_finished(), "query must block until a change");
    h.put("/v1/kv/watched", "2").await;
    let (woken, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(woken > index);
    assert_eq!(body[0]["Value"], "Mg==");

    // index=0 never blocks; bad values are 400s.
    let (_, _) = h.get_json("/v1/kv/watched?index=0&wait=10m").await;
    assert_eq!(
        error_text(
            h.get("/v1/kv/watched?index=1&wait=10").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Invalid wait time"
    );
    assert_eq!(
        error_text(
            h.get("/v1/kv/watched?index=x").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Invalid index"
    );

    // A catalog watcher wakes on a registration.
    let (catalog_index, _) = h.get_json("/v1/catalog/service/redis").await;
    let waiter = {
        let h = h.clone();
        tokio::spawn(async move {
            h.get_json(&format!(
                "/v1/catalog/service/redis?index={catalog_index}&wait=30s"
            ))
            .await
        })
    };
    h.register(REDIS).await;
    let (woken, body) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .unwrap()
        .unwrap();
    assert!(woken > catalog_index);
    assert_eq!(body[0]["ServiceID"], "host1:redis.0:6379");

    let h = Arc::into_inner(h).unwrap();
    h.registry.shutdown().await;
}

#[tokio::test]
async fn registrator_bodies_reach_catalog_and_health() {
    let h = Harness::start().await;
    h.register(REDIS).await;
    h.register(r#"{"ID":"host1:nginx.0:80","Name":"web","Tags":["www"],"Port":8000,"Address":"192.168.1.102","Meta":{"check_deregister_after":"10m","check_http":"/health","check_interval":"15s"},"Check":{"Interval":"15s","HTTP":"http://127.0.0.1:9/health","DeregisterCriticalServiceAfter":"10m"},"Checks":null}"#).await;
    h.register(r#"{"ID":"noaddr","Name":"web","Tags":["b"],"Port":32769}"#)
        .await;

    let response = h.get("/v1/catalog/services").await;
    assert_eq!(
        header(&response, "x-consul-effective-consistency"),
        Some("leader")
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["redis"], json!([]));
    let mut web: Vec<String> = serde_json::from_value(body["web"].clone()).unwrap();
    web.sort();
    assert_eq!(web, ["b", "www"]);

    let (index, body) = h.get_json("/v1/catalog/service/redis").await;
    let entry = &body[0];
    let node_id = entry["ID"].as_str().unwrap();
    assert_eq!(node_id.len(), 36);
    let node = entry["Node"].as_str().unwrap().to_string();
    assert_eq!(
        *entry,
        json!({"ID":node_id,"Node":node,"Address":"127.0.0.1","Datacenter":"dc1",
            "TaggedAddresses":{"lan":"127.0.0.1","lan_ipv4":"127.0.0.1","wan":"127.0.0.1","wan_ipv4":"127.0.0.1"},
            "NodeMeta":{"consul-network-segment":""},
            "ServiceKind":"","ServiceID":"host1:redis.0:6379","ServiceName":"redis","ServiceTags":[],
            "ServiceAddress":"192.168.1.102",
            "ServiceTaggedAddresses":{"lan_ipv4":{"Address":"192.168.1.102","Port":10000},"wan_ipv4":{"Address":"192.168.1.102","Port":10000}},
            "ServiceWeights":{"Passing":1,"Warning":1},"ServiceMeta":{},"ServicePort":10000,
            "ServiceEnableTagOverride":false,"ServiceProxy":{"MeshGateway":{},"Expose":{}},"ServiceConnect":{},
            "CreateIndex":index,"ModifyIndex":index})
    );

    let (_, body) = h.get_json("/v1/catalog/service/web?tag=b").await;
    assert_eq!(body.as_array().unwrap().len(), 1);
    assert_eq!(body[0]["ServiceAddress"], "");
    assert!(body[0].get("ServiceTaggedAddresses").is_none());
    let (_, body) = h.get_json("/v1/catalog/service/web?tag=b&tag=www").await;
    assert_eq!(body, json!([]));
    let (_, body) = h.get_json("/v1/catalog/service/unknown").await;
    assert_eq!(body, json!([]));
    assert_eq!(
        error_text(h.get("/v1/catalog/service/").await, StatusCode::BAD_REQUEST).await,
        "Missing service name"
    );

    // Health: Meta null without meta, serfHealth first, new HTTP check critical (nothing on :9).
    let (_, body) = h.get_json("/v1/health/service/redis").await;
    assert_eq!(body[0]["Service"]["Meta"], Value::Null);
    assert_eq!(
        body[0]["Node"]["Meta"],
        json!({"consul-network-segment":""})
    );
    assert_eq!(
        body[0]["Checks"],
        json!([{"Node":node,"CheckID":"serfHealth","Name":"Serf Health Status","Status":"passing",
            "Notes":"","Output":"Agent alive and reachable","ServiceID":"","ServiceName":"",
            "ServiceTags":[],"Type":"","Definition":{},
            "CreateIndex":body[0]["Checks"][0]["CreateIndex"],"ModifyIndex":body[0]["Checks"][0]["ModifyIndex"]}])
    );
    let (_, body) = h.get_json("/v1/health/service/web").await;
    let nginx = body
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["Service"]["ID"] == "host1:nginx.0:80")
        .unwrap();
    assert_eq!(nginx["Service"]["Meta"]["check_http"], "/health");
    let check = &nginx["Checks"][1];
    assert_eq!(check["CheckID"], "service:host1:nginx.0:80");
    assert_eq!(check["Name"], "Service 'web' check");
    assert_eq!(check["Status"], "critical");
    assert_eq!(check["Type"], "http");
    assert_eq!(check["ServiceTags"], json!(["www"]));

    // ?passing keeps the instance without service checks and drops the critical one.
    for query in ["passing", "passing=true", "passing=1"] {
        let (_, body) = h.get_json(&format!("/v1/health/service/web?{query}")).await;
        let ids: Vec<&str> = body
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["Service"]["ID"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["noaddr"], "{query}");
    }
    let (_, body) = h.get_json("/v1/health/service/web?passing=false").await;
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert_eq!(
        error_text(
            h.get("/v1/health/service/web?passing=maybe").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Invalid value for ?passing"
    );

    // Agent view for Registrator's -cleanup.
    let (_, body) = {
        let response = h.get("/v1/agent/services").await;
        (0, response.json::<Value>().await.unwrap())
    };
    assert_eq!(
        body["host1:redis.0:6379"],
        json!({"ID":"host1:redis.0:6379","Service":"redis","Tags":[],"Meta":{},"Port":10000,
            "Address":"192.168.1.102",
            "TaggedAddresses":{"lan_ipv4":{"Address":"192.168.1.102","Port":10000},"wan_ipv4":{"Address":"192.168.1.102","Port":10000}},
            "Weights":{"Passing":1,"Warning":1},"EnableTagOverride":false})
    );
    h.registry.shutdown().await;
}

#[tokio::test]
async fn reregistration_updates_in_place_and_deregister_removes() {
    let h = Harness::start().await;
    h.register(r#"{"ID":"w1","Name":"web","Port":80,"Check":{"TTL":"30s","Status":"passing"}}"#)
        .await;
    let (_, before) = h.get_json("/v1/catalog/service/web").await;
    h.put("/v1/agent/check/fail/service:w1?note=down", "").await;
    // Re-register with another port and Status passing: service updates, check keeps critical.
    h.register(r#"{"ID":"w1","Name":"web","Port":81,"Check":{"TTL":"30s","Status":"passing"}}"#)
        .await;
    let (_, after) = h.get_json("/v1/catalog/service/web").await;
    assert_eq!(after[0]["ServicePort"], 81);
    assert_eq!(after[0]["CreateIndex"], before[0]["CreateIndex"]);
    assert!(after[0]["ModifyIndex"].as_u64() > before[0]["ModifyIndex"].as_u64());
    let (_, health) = h.get_json("/v1/health/service/web").await;
    assert_eq!(health[0]["Checks"][1]["Status"], "critical");
    assert_eq!(health[0]["Checks"][1]["Output"], "down");

    let response = h.put("/v1/agent/service/deregister/w1", "").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "");
    let (_, body) = h.get_json("/v1/health/service/web").await;
    assert_eq!(body, json!([]));
    let (_, body) = h.get_json("/v1/catalog/services").await;
    assert_eq!(body, json!({}));
    h.register(REDIS).await;
    let response = h
        .put("/v1/agent/service/deregister/host1:redis.0:6379", "")
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = h.get("/v1/agent/services").await.json().await.unwrap();
    assert_eq!(body, json!({}));
    let response = h.put("/v1/agent/service/deregister/unknown", "").await;
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "1.7.10: unknown ID is 200"
    );
    // The check went with the service.
    let response = h.put("/v1/agent/check/pass/service:w1", "").await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    h.registry.shutdown().await;
}

#[tokio::test]
async fn registration_errors_match_consul() {
    let h = Harness::start().await;
    let cases = [
        (
            r#"{"Port":80}"#,
            StatusCode::BAD_REQUEST,
            "Missing service name",
        ),
        (
            r#"{"Name":"x","Port":"80"}"#,
            StatusCode::BAD_REQUEST,
            "Request decode failed: json: cannot unmarshal string into Go struct field .Port of type int",
        ),
        (
            r#"{"Name":"x","Check":{"HTTP":"http://127.0.0.1:9/"}}"#,
            StatusCode::BAD_REQUEST,
            "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks",
        ),
        (
            r#"{"Name":"x","Check":{"ScriptArgs":["check-cmd","abc","80","true"],"Interval":"10s"}}"#,
            StatusCode::INTERNAL_SERVER_ERROR,
            "Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true",
        ),
    ];
    for (body, status, message) in cases {
        let response = h.put("/v1/agent/service/register", body).await;
        assert_eq!(error_text(response, status).await, message, "{body}");
    }
    let (_, body) = h.get_json("/v1/catalog/services").await;
    assert_eq!(body, json!({}), "failed registrations leave nothing behind");
    h.registry.shutdown().await;
}

/// A tiny HTTP server whose `/health` answers the status held in the returned cell.
async fn toggled_server() -> (SocketAddr, Arc<AtomicU16>) {
    let status = Arc::new(AtomicU16::new(200));
    let shared = status.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            let shared = shared.clone();
            async move {
                let code = StatusCode::from_u16(shared.load(Ordering::SeqCst)).unwrap();
                (code, "ok")
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (address, status)
}

#[tokio::test]
async fn http_check_drives_passing_filter_and_wakes_health_watchers() {
    let h = Harness::start().await;
    let (address, status) = toggled_server().await;
    let url = format!("http://{address}/health");
    h.register(&format!(
        r#"{{"ID":"api1","Name":"api","Port":{},"Check":{{"HTTP":"{url}","Interval":"100ms"}}}}"#,
        address.port()
    ))
    .await;
    let body = h
        .wait_for("/v1/health/service/api?passing", |b| {
            b.as_array().is_some_and(|a| a.len() == 1)
        })
        .await;
    assert_eq!(
        body[0]["Checks"][1]["Output"],
        format!("HTTP GET {url}: 200 OK Output: ok")
    );
    let (index, _) = h.get_json("/v1/health/service/api?passing").await;

    status.store(500, Ordering::SeqCst);
    // A blocking health query wakes on the status change.
    let (woken, body) = h
        .get_json(&format!(
            "/v1/health/service/api?passing&index={index}&wait=20s"
        ))
        .await;
    assert!(woken > index);
    assert_eq!(body, json!([]));
    let (_, body) = h.get_json("/v1/health/service/api").await;
    assert_eq!(body[0]["Checks"][1]["Status"], "critical");
    assert_eq!(
        body[0]["Checks"][1]["Output"],
        format!("HTTP GET {url}: 500 Internal Server Error Output: ok")
    );

    status.store(429, Ordering::SeqCst);
    h.wait_for("/v1/health/service/api", |b| {
        b[0]["Checks"][1]["Status"] == "warning"
    })
    .await;
    let (_, body) = h.get_json("/v1/health/service/api?passing").await;
    assert_eq!(body, json!([]), "warning is not passing");

    status.store(200, Ordering::SeqCst);
    h.wait_for("/v1/health/service/api?passing", |b| {
        b.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    h.registry.shutdown().await;
}

#[tokio::test]
async fn tcp_and_ttl_checks() {
    let h = Harness::start().await;
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let tcp = listener.local_addr().unwrap();
    h.register(&format!(
        r#"{{"ID":"db1","Name":"db","Checks":[{{"TCP":"{tcp}","Interval":"100ms"}},{{"TTL":"300ms","Notes":"ttl"}}]}}"#
    ))
    .await;
    let body = h
        .wait_for("/v1/health/service/db", |b| {
            b[0]["Checks"][1]["Status"] == "passing"
        })
        .await;
    assert_eq!(body[0]["Checks"][1]["CheckID"], "service:db1:1");
    assert_eq!(
        body[0]["Checks"][1]["Output"],
        format!("TCP connect {tcp}: Success")
    );
    assert_eq!(body[0]["Checks"][1]["Type"], "tcp");
    assert_eq!(body[0]["Checks"][2]["CheckID"], "service:db1:2");
    assert_eq!(body[0]["Checks"][2]["Type"], "ttl");

    let response = h
        .put("/v1/agent/check/pass/service:db1:2?note=fine", "")
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.unwrap(), "");
    // Not yet expired right after the update (300 ms TTL): passing with the note... then expiry.
    let body = h
        .wait_for("/v1/health/service/db", |b| {
            b[0]["Checks"][2]["Status"] == "critical"
        })
        .await;
    assert_eq!(
        body[0]["Checks"][2]["Output"],
        "TTL expired (last output before timeout follows): fine"
    );
    h.put("/v1/agent/check/warn/service:db1:2?note=meh", "")
        .await;
    let (_, body) = h.get_json("/v1/health/service/db").await;
    assert!(["warning", "critical"].contains(&body[0]["Checks"][2]["Status"].as_str().unwrap()));
    let response = h.put("/v1/agent/check/pass/service:db1:1", "").await;
    assert_eq!(
        error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await,
        "CheckID \"service:db1:1\" does not have associated TTL"
    );
    drop(listener);
    h.registry.shutdown().await;
}

#[tokio::test]
async fn ttl_pass_and_fail_flip_status() {
    let h = Harness::start().await;
    h.register(r#"{"Name":"job","Check":{"TTL":"60s"}}"#).await;
    let (_, body) = h.get_json("/v1/health/service/job").await;
    assert_eq!(
        body[0]["Checks"][1]["Status"], "critical",
        "new checks start critical"
    );
    assert_eq!(body[0]["Checks"][1]["CheckID"], "service:job");
    h.put("/v1/agent/check/pass/service:job?note=ok", "").await;
    let (_, body) = h.get_json("/v1/health/service/job?passing").await;
    assert_eq!(body[0]["Checks"][1]["Output"], "ok");
    h.put("/v1/agent/check/fail/service:job?note=bad", "").await;
    let (_, body) = h.get_json("/v1/health/service/job?passing").await;
    assert_eq!(body, json!([]));
    h.registry.shutdown().await;
}

#[tokio::test]
async fn state_survives_a_restart() {
    let h = Harness::start().await;
    h.put("/v1/kv/dfp/routes/web", "spec").await;
    h.register(REDIS).await;
    h.register(r#"{"Name":"job","Check":{"TTL":"60s"}}"#).await;
    h.put("/v1/agent/check/pass/service:job?note=ok", "").await;
    let (kv_index, before) = h.get_json("/v1/kv/dfp/routes/web").await;
    let (services_index, _) = h.get_json("/v1/catalog/services").await;
    let (_, catalog) = h.get_json("/v1/catalog/service/redis").await;
    let Harness { registry, dir, .. } = h;
    registry.shutdown().await;
    assert!(dir.path().join("registry/state.json").is_file());

    let h = Harness::start_in(dir).await;
    let (index, after) = h.get_json("/v1/kv/dfp/routes/web").await;
    assert_eq!((index, &after), (kv_index, &before));
    let (index, body) = h.get_json("/v1/catalog/services").await;
    assert!(index >= services_index);
    assert_eq!(body, json!({"job":[],"redis":[]}));
    let (_, again) = h.get_json("/v1/catalog/service/redis").await;
    assert_eq!(again, catalog, "same node ID and indexes");
    let (_, body) = h.get_json("/v1/health/service/job").await;
    assert_eq!(body[0]["Checks"][1]["Status"], "passing");
    // The index counter continues instead of starting over.
    h.put("/v1/kv/next", "x").await;
    let (index, _) = h.get_json("/v1/kv/next").await;
    assert!(index > kv_index);
    h.registry.shutdown().await;
}

#[tokio::test]
async fn datacenter_consistency_and_fault_answers() {
    let h = Harness::start().await;
    h.put("/v1/kv/k?dc=dc1", "v").await;
    let response = h.get("/v1/kv/k?dc=dc2").await;
    assert_eq!(header(&response, "x-consul-knownleader"), Some("false"));
    assert_eq!(
        error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await,
        "No path to datacenter"
    );
    assert_eq!(
        error_text(
            h.get("/v1/catalog/services?stale&consistent").await,
            StatusCode::BAD_REQUEST
        )
        .await,
        "Cannot specify ?stale with ?consistent, conflicting semantics."
    );
    // Tokens are accepted and ignored.
    let response = h
        .client
        .get(h.url("/v1/kv/k?token=abc"))
        .header("X-Consul-Token", "def")
        .bearer_auth("ghi")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    h.registry.set_fault(Some(Fault::NoLeader));
    let response = h.get("/v1/catalog/service/web").await;
    assert_eq!(header(&response, "x-consul-index"), Some("1"));
    assert_eq!(
        error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await,
        "No cluster leader"
    );
    assert_eq!(
        h.get("/v1/status/leader").await.text().await.unwrap(),
        "\"\""
    );
    h.registry.set_fault(Some(Fault::PermissionDenied));
    assert_eq!(
        error_text(h.get("/v1/kv/k").await, StatusCode::FORBIDDEN).await,
        "Permission denied"
    );
    let (_, body) = h.get_json("/v1/health/service/web").await;
    assert_eq!(body, json!([]));
    h.registry.set_fault(None);
    assert_eq!(h.get("/v1/kv/k").await.status(), StatusCode::OK);
    h.registry.shutdown().await;
}

// ---- durability and hostile input ---------------------------------------------------------------

/// Makes the disk refuse the registry's writes, as a full disk does (also for root): its change
/// log becomes a symlink to `/dev/full`. Returns where the real log was put aside.
fn fill_disk(dir: &TempDir) -> std::path::PathBuf {
    let log = dir.path().join("registry/state.log");
    let aside = dir.path().join("registry/state.log.aside");
    std::fs::rename(&log, &aside).unwrap();
    std::os::unix::fs::symlink("/dev/full", &log).unwrap();
    aside
}

/// Undoes [`fill_disk`].
fn free_disk(dir: &TempDir, aside: &std::path::Path) {
    let log = dir.path().join("registry/state.log");
    std::fs::remove_file(&log).unwrap();
    std::fs::rename(aside, &log).unwrap();
}

#[tokio::test]
async fn a_write_the_disk_refuses_is_answered_500_and_changes_nothing() {
    let h = Harness::start().await;
    assert_eq!(h.put("/v1/kv/kept", "1").await.status(), StatusCode::OK);
    h.register(REDIS).await;
    let (kv_index, _) = h.get_json("/v1/kv/kept").await;
    let (catalog_index, catalog) = h.get_json("/v1/catalog/services").await;

    let aside = fill_disk(&h.dir);
    let refused = [
        h.put("/v1/kv/lost", "2").await,
        h.put("/v1/kv/kept", "changed").await,
        h.delete("/v1/kv/kept").await,
        h.put("/v1/agent/service/register", r#"{"Name":"web","Port":80}"#)
            .await,
        h.put("/v1/agent/service/deregister/host1:redis.0:6379", "")
            .await,
    ];
    let mut reasons = Vec::new();
    for response in refused {
        reasons.push(error_text(response, StatusCode::INTERNAL_SERVER_ERROR).await);
    }
    assert!(
        reasons[0].contains("state.log: No space left on device"),
        "the reason is given: {}",
        reasons[0]
    );
    assert!(
        reasons.iter().all(|r| r.contains("state.log")),
        "{reasons:?}"
    );
    // Reads show the state from before the refused writes, with the same indexes.
    let (index, body) = h.get_json("/v1/kv/kept").await;
    assert_eq!(index, kv_index);
    assert_eq!(body[0]["Value"], "MQ==");
    assert_eq!(h.get("/v1/kv/lost").await.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        h.get_json("/v1/catalog/services").await,
        (catalog_index, catalog.clone())
    );

    // Once the disk takes writes again, so does the registry.
    free_disk(&h.dir, &aside);
    assert_eq!(
        h.put("/v1/kv/after", "3").await.text().await.unwrap(),
        "true"
    );

    // After a restart, the refused writes are still absent; the later one is there.
    let Harness { registry, dir, .. } = h;
    registry.shutdown().await;
    let h = Harness::start_in(dir).await;
    assert_eq!(h.get("/v1/kv/lost").await.status(), StatusCode::NOT_FOUND);
    let (_, body) = h.get_json("/v1/kv/kept").await;
    assert_eq!(body[0]["Value"], "MQ==");
    let (_, body) = h.get_json("/v1/kv/after").await;
    assert_eq!(body[0]["Value"], "Mw==");
    let (_, body) = h.get_json("/v1/catalog/services").await;
    assert_eq!(body, catalog, "redis still registered, web never was");
    h.registry.shutdown().await;
}

#[tokio::test]
async fn many_keys_survive_a_restart() {
    const KEYS: usize = 3_000;
    let h = Harness::start().await;
    // 2 KiB values: the change log outgrows its compaction threshold (4 MiB) on the way, so
    // writes continue across a compaction.
    let value = "v".repeat(2048);
    let puts = futures::stream::iter(0..KEYS)
        .map(|n| {
            let request = h
                .client
                .put(h.url(&format!("/v1/kv/many/{n:05}")))
                .body(format!("{n}:{value}"))
                .send();
            async move { request.await.unwrap().text().await.unwrap() }
        })
        .buffer_unordered(16)
        .collect::<Vec<String>>()
        .await;
    assert!(puts.iter().all(|answer| answer == "true"));
    assert_eq!(h.delete("/v1/kv/many/00042").await.status(), StatusCode::OK);
    let (index, keys) = h.get_json("/v1/kv/many/?keys").await;
    assert_eq!(keys.as_array().unwrap().len(), KEYS - 1);

    let Harness { registry, dir, .. } = h;
    registry.shutdown().await;
    let h = Harness::start_in(dir).await;
    let (after, again) = h.get_json("/v1/kv/many/?keys").await;
    assert_eq!((after, &again), (index, &keys));
    let (_, body) = h.get_json("/v1/kv/many/02999").await;
    let stored = base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        body[0]["Value"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(stored, format!("2999:{value}").into_bytes());
    h.registry.shutdown().await;
}

#[tokio::test]
async fn hostile_registration_bodies_are_refused_and_change_nothing() {
    let h = Harness::start().await;
    h.register(REDIS).await;
    h.put("/v1/kv/kept", "1").await;
    let (_, catalog) = h.get_json("/v1/catalog/service/redis").await;

    let huge = format!(
        r#"{{"ID":"host1:redis.0:6379","Name":"redis","Tags":["{}"]}}"#,
        "t".repeat(9 * 1024 * 1024)
    )
    .into_bytes();
    let huge_len = huge.len();
    let cases: Vec<(Vec<u8>, StatusCode, String)> = vec![
        (
            Vec::new(),
            StatusCode::BAD_REQUEST,
            "Request decode failed: EOF".into(),
        ),
        (
            br#"{"ID":"host1:redis.0:6379","Name":"redis","Port":1"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "Request decode failed: unexpected EOF".into(),
        ),
        (
            br#"{"ID":"host1:redis.0:6379","Name":"redis","Port":1,}"#.to_vec(),
            StatusCode::BAD_REQUEST,
            "Request decode failed: ".into(),
        ),
        (
            [b"[".repeat(10_000), b"]".repeat(10_000)].concat(),
            StatusCode::BAD_REQUEST,
            "Request decode failed: ".into(),
        ),
        (
            huge,
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body({huge_len} bytes) too large, max size: 8388608 bytes."),
        ),
    ];
    for (body, status, message) in cases {
        let response = h.put("/v1/agent/service/register", body).await;
        let text = error_text(response, status).await;
        assert!(text.starts_with(&message), "{text:.200}");
    }
    let (_, after) = h.get_json("/v1/catalog/service/redis").await;
    assert_eq!(after, catalog);
    let (_, body) = h.get_json("/v1/kv/kept").await;
    assert_eq!(body[0]["Value"], "MQ==");
    h.registry.shutdown().await;
}

#[tokio::test]
async fn impossible_ports_are_refused_at_registration() {
    let h = Harness::start().await;
    for port in ["-1", "65536", "99999"] {
        let body = format!(r#"{{"ID":"web-{port}","Name":"web","Port":{port}}}"#);
        let response = h.put("/v1/agent/service/register", body).await;
        assert_eq!(
            error_text(response, StatusCode::BAD_REQUEST).await,
            format!("Invalid Port: {port} is not a TCP port (0 to 65535)")
        );
    }
    h.register(r#"{"ID":"web-65535","Name":"web","Port":65535}"#)
        .await;
    let (_, body) = h.get_json("/v1/catalog/service/web").await;
    let ids: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|entry| entry["ServiceID"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["web-65535"]);
    h.registry.shutdown().await;
}

#[tokio::test]
async fn a_one_millisecond_check_interval_probes_once_a_second() {
    let h = Harness::start().await;
    let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/health",
        axum::routing::get(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            async { "ok" }
        }),
    );
    let listener = tokio::net::TcpListener::bind(loopback()).await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    h.register(&format!(
        r#"{{"ID":"api1","Name":"api","Port":{},"Check":{{"HTTP":"http://{address}/health","Interval":"1ms"}}}}"#,
        address.port()
    ))
    .await;
    h.wait_for("/v1/health/service/api?passing", |b| {
        b.as_array().is_some_and(|a| a.len() == 1)
    })
    .await;
    // Count the probes over a 2.5 s window: one a second, not hundreds.
    let start = hits.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let probes = hits.load(Ordering::SeqCst) - start;
    assert!((1..=3).contains(&probes), "{probes} probes in 2.5 s");
    h.registry.shutdown().await;
}
