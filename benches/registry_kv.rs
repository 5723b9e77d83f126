//! Measures the embedded registry's KV write rate as the store grows: for 10, 10,000 and
//! 100,000 keys already stored, how many sequential `PUT /v1/kv/...` a client gets answered per
//! second over real HTTP (each one synced to disk before it is answered), plus how long the
//! registry takes to start on that state and to write its final snapshot at shutdown.
//!
//! Run with `cargo bench --bench registry_kv`.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use flow_proxy::registry::embedded::EmbeddedRegistry;
use serde_json::{json, Map, Value};

/// Sizes of the store before the timed writes.
const SIZES: [usize; 3] = [10, 10_000, 100_000];
/// Timed writes per size.
const WRITES: usize = 2_000;

/// Writes a `state.json` holding `keys` KV entries (the format the registry has always
/// written), so the store starts large without `keys` HTTP calls.
fn seed(dir: &Path, keys: usize) {
    let value = base64::engine::general_purpose::STANDARD.encode(b"{\"serviceName\":\"seeded\"}");
    let mut kv = Map::new();
    for n in 0..keys {
        let key = format!("seed/{n:07}");
        kv.insert(
            key.clone(),
            json!({"key": key, "flags": 0, "value": value, "create_index": n + 2, "modify_index": n + 2}),
        );
    }
    let state = json!({
        "node_id": "3f0c6a2e-5b1d-4c7a-8e9f-0a1b2c3d4e5f",
        "index": keys + 1,
        "node_index": 1,
        "kv": Value::Object(kv),
        "tombstones": {},
        "kv_index": keys + 1,
        "services": {},
        "checks": {},
        "services_index": 0,
        "service_indexes": {},
        "extinction_index": 0
    });
    std::fs::create_dir_all(dir.join("registry")).expect("registry dir");
    std::fs::write(
        dir.join("registry/state.json"),
        serde_json::to_vec(&state).expect("state serialises"),
    )
    .expect("write the seeded state");
}

async fn measure(keys: usize) {
    let dir = tempfile::tempdir().expect("tempdir");
    seed(dir.path(), keys);
    let started = Instant::now();
    let registry = EmbeddedRegistry::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), dir.path())
        .await
        .expect("registry starts");
    let start_time = started.elapsed();
    let url = format!("http://{}", registry.address());
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let body = "{\"serviceName\":\"web\",\"servicePath\":\"/web\"}";
    let timed = Instant::now();
    for n in 0..WRITES {
        let response = client
            .put(format!("{url}/v1/kv/bench/{n:07}"))
            .body(body)
            .send()
            .await
            .expect("PUT answered");
        assert!(response.status().is_success(), "PUT failed");
    }
    let elapsed = timed.elapsed();
    let stopped = Instant::now();
    registry.shutdown().await;
    let stop_time = stopped.elapsed();
    println!(
        "{keys:>7} keys: {:>7.0} PUT/s ({:.3} ms each, {WRITES} sequential writes); start {:>7.1} ms, shutdown snapshot {:>7.1} ms",
        WRITES as f64 / elapsed.as_secs_f64(),
        elapsed.as_secs_f64() * 1000.0 / WRITES as f64,
        start_time.as_secs_f64() * 1000.0,
        stop_time.as_secs_f64() * 1000.0,
    );
}

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    runtime.block_on(async {
        for keys in SIZES {
            measure(keys).await;
        }
    });
}
