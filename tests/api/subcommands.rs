//! The operator subcommands of the real `flow-proxy` binary: `render` prints exactly the
//! haproxy.cfg a running proxy serves for the specs `services` printed, `check` names every
//! problem in the stored specs and the settings, and `reconfigure`/`remove`/`services` drive a
//! running proxy's API with its token.

use std::process::ExitStatus;
use std::time::Duration;

use flow_proxy::settings::Secret;
use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::helpers::{proxy_routing_demo, spawn_backend, TestProxy};

/// How long one subcommand may take.
const SUBCOMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// What a run of the binary left behind.
struct Run {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Run {
    fn describe(&self) -> String {
        format!(
            "{}\n-- stdout --\n{}\n-- stderr --\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `flow-proxy <args>` with only `env` (and PATH) in its environment.
async fn flow_proxy(args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_flow-proxy"));
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .kill_on_drop(true);
    let output = tokio::time::timeout(SUBCOMMAND_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("flow-proxy {args:?} did not finish in {SUBCOMMAND_TIMEOUT:?}"))
        .expect("run the flow-proxy binary");
    Run {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[tokio::test]
async fn render_prints_the_config_a_proxy_serves_for_the_specs_services_printed() {
    let proxy = TestProxy::spawn().await;
    let (one, two, blue) = (
        spawn_backend("one").await,
        spawn_backend("two").await,
        spawn_backend("blue").await,
    );
    proxy
        .register_instance("go-demo", "go-demo.1", one.port)
        .await;
    proxy
        .register_instance("go-demo", "go-demo.2", two.port)
        .await;
    proxy
        .register_instance("shop-blue", "shop.1", blue.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=go-demo&servicePath=/demo,/api&servicePath.1=/v1&port.1=8080")
        .await;
    proxy
        .reconfigure_ok("serviceName=shop&serviceColor=blue&serviceDomain=shop.example.com")
        .await;

    let services = flow_proxy(&["services", "--proxy-url", &proxy.api("")], &[]).await;
    assert!(services.status.success(), "{}", services.describe());
    let listed: Value = serde_json::from_str(&services.stdout).expect("services prints JSON");
    assert_eq!(listed, proxy.services().await);

    let files = tempfile::tempdir().expect("a directory for the files");
    let spec_file = files.path().join("specs.json");
    std::fs::write(&spec_file, &services.stdout).expect("write specs.json");
    let instances_file = files.path().join("instances.json");
    let instances = json!({
        "go-demo": [format!("127.0.0.1:{}", one.port), format!("127.0.0.1:{}", two.port)],
        "shop-blue": [format!("127.0.0.1:{}", blue.port)],
    });
    std::fs::write(&instances_file, instances.to_string()).expect("write instances.json");
    let http_port = proxy.http_port.to_string();
    let rendered = flow_proxy(
        &[
            "render",
            "--spec-file",
            spec_file.to_str().expect("a UTF-8 path"),
            "--instances-file",
            instances_file.to_str().expect("a UTF-8 path"),
            "--bind-host",
            "127.0.0.1",
            "--http-port",
            &http_port,
            "--write-maps",
            files.path().to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
    .await;
    assert!(rendered.status.success(), "{}", rendered.describe());
    let live = proxy.live_file("haproxy.cfg").await;
    assert_eq!(rendered.stdout, live);
    // With the map files the config routes its plain rules with, the same as the proxy's.
    let map_files = |dir: &std::path::Path| -> Vec<(String, String)> {
        let mut files: Vec<(String, String)> = std::fs::read_dir(dir.join("maps"))
            .expect("a maps directory")
            .map(|entry| {
                let entry = entry.expect("an entry");
                let text = std::fs::read_to_string(entry.path()).expect("a map file");
                (entry.file_name().to_string_lossy().into_owned(), text)
            })
            .collect();
        files.sort();
        files
    };
    let written = map_files(files.path());
    assert!(!written.is_empty(), "the plain rules have maps");
    assert_eq!(written, map_files(proxy.data_dir()));

    // An instance for a service no spec routes is a typo, not something to ignore.
    std::fs::write(&instances_file, r#"{"go-dmeo": ["127.0.0.1:1"]}"#).expect("write");
    let typo = flow_proxy(
        &[
            "render",
            "--spec-file",
            spec_file.to_str().expect("a UTF-8 path"),
            "--instances-file",
            instances_file.to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
    .await;
    assert!(!typo.status.success(), "{}", typo.describe());
    assert!(
        typo.stderr.contains("--instances-file") && typo.stderr.contains("go-dmeo"),
        "{}",
        typo.describe()
    );
}

#[tokio::test]
async fn render_replaces_masked_passwords_with_a_hash_no_password_matches() {
    let proxy = TestProxy::spawn().await;
    let backend = spawn_backend("private").await;
    proxy
        .register_instance("private", "private.1", backend.port)
        .await;
    proxy
        .reconfigure_ok("serviceName=private&servicePath=/private&users=alice:wonderland")
        .await;
    let files = tempfile::tempdir().expect("a directory for the files");
    let spec_file = files.path().join("specs.json");
    let answer = proxy.services().await;
    assert!(answer.to_string().contains("\"***\""), "{answer}");
    std::fs::write(&spec_file, answer.to_string()).expect("write specs.json");

    let rendered = flow_proxy(
        &[
            "render",
            "--spec-file",
            spec_file.to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
    .await;
    assert!(rendered.status.success(), "{}", rendered.describe());
    assert!(
        rendered.stdout.contains(&format!(
            "user alice password {}",
            flow_proxy::cli::UNUSABLE_PASSWORD_HASH
        )),
        "{}",
        rendered.describe()
    );
    assert!(
        rendered.stderr.contains("private") && rendered.stderr.contains("masked"),
        "{}",
        rendered.describe()
    );

    // A spec file that is not a /services answer is refused, naming the flag.
    std::fs::write(&spec_file, r#"[{"ServiceName": "bad name"}]"#).expect("write");
    let refused = flow_proxy(
        &[
            "render",
            "--spec-file",
            spec_file.to_str().expect("a UTF-8 path"),
        ],
        &[],
    )
    .await;
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(
        refused.stderr.contains("--spec-file") && refused.stderr.contains("spec 1"),
        "{}",
        refused.describe()
    );
}

#[tokio::test]
async fn check_names_every_problem_and_passes_a_sound_setup() {
    let (proxy, _backend) = proxy_routing_demo().await;
    let registry = proxy.registry_address();

    let sound = flow_proxy(&["check", "--consul-address", &registry], &[]).await;
    assert!(sound.status.success(), "{}", sound.describe());
    assert!(sound.stdout.starts_with("ok"), "{}", sound.describe());

    proxy
        .put_kv(
            "flow-proxy/services/broken",
            r#"{"ServiceName":"broken","ServiceDest":[{"Index":0,"ServicePath":["/a b"]}]}"#,
        )
        .await;
    proxy
        .put_kv(
            "flow-proxy/certs/shop",
            "-----BEGIN CERTIFICATE-----\nnot one\n",
        )
        .await;
    // A directory may hold only some templates (the rest are built in), but each must parse.
    let templates = tempfile::tempdir().expect("a templates directory");
    std::fs::write(templates.path().join("backend.hbs"), "{{#each servers}}\n")
        .expect("a broken backend template");
    let broken = flow_proxy(
        &[
            "check",
            "--templates-dir",
            templates.path().to_str().expect("a UTF-8 path"),
        ],
        // Settings come from the environment as well as from flags.
        &[("CONSUL_ADDRESS", &registry), ("STATS_USER", "admin")],
    )
    .await;
    assert!(!broken.status.success(), "{}", broken.describe());
    let lines: Vec<&str> = broken.stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{}", broken.describe());
    assert!(lines[0].starts_with("templates: "), "{}", broken.describe());
    assert!(
        lines[1].starts_with("settings: ") && lines[1].contains("--stats-pass"),
        "{}",
        broken.describe()
    );
    assert!(
        lines[2].starts_with("stored certificate flow-proxy/certs/shop: "),
        "{}",
        broken.describe()
    );
    assert!(
        lines[3].starts_with("stored spec flow-proxy/services/broken: ")
            && lines[3].contains("servicePath"),
        "{}",
        broken.describe()
    );

    // Nothing was touched: the proxy still serves its route.
    let (status, body) = proxy.get_through_proxy("/demo/x", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "demo /demo/x"));
}

#[tokio::test]
async fn reconfigure_remove_and_services_drive_a_running_proxy_with_its_token() {
    let proxy = TestProxy::spawn_with(|settings| {
        settings.api_token = Some(Secret::new("s3cret"));
    })
    .await;
    let backend = spawn_backend("demo").await;
    proxy
        .register_instance("go-demo", "go-demo.1", backend.port)
        .await;
    let url = proxy.api("");

    let refused = flow_proxy(
        &[
            "reconfigure",
            "serviceName=go-demo",
            "servicePath=/demo",
            "--proxy-url",
            &url,
        ],
        &[],
    )
    .await;
    assert!(!refused.status.success(), "{}", refused.describe());
    assert!(refused.stderr.contains("401"), "{}", refused.describe());

    let routed = flow_proxy(
        &[
            "reconfigure",
            "serviceName=go-demo",
            "servicePath=/demo",
            "--proxy-url",
            &url,
        ],
        &[("API_TOKEN", "s3cret")],
    )
    .await;
    assert!(routed.status.success(), "{}", routed.describe());
    let answer: Value = serde_json::from_str(&routed.stdout).expect("JSON answer");
    assert_eq!(answer["Status"], "OK", "{answer}");
    let (status, body) = proxy.get_through_proxy("/demo/x", None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "demo /demo/x"));

    let bad = flow_proxy(
        &[
            "reconfigure",
            "serviceName=go-demo",
            "servicePath=/a b",
            "--proxy-url",
            &url,
            "--api-token",
            "s3cret",
        ],
        &[],
    )
    .await;
    assert!(!bad.status.success(), "{}", bad.describe());
    assert!(
        bad.stdout.contains("servicePath") && bad.stderr.contains("400"),
        "{}",
        bad.describe()
    );
    let (status, _) = proxy.get_through_proxy("/demo/x", None).await;
    assert_eq!(status, StatusCode::OK, "a refused change changes nothing");

    let listed = flow_proxy(
        &["services", "--proxy-url", &url, "--api-token", "s3cret"],
        &[],
    )
    .await;
    assert!(listed.status.success(), "{}", listed.describe());
    let listed: Value = serde_json::from_str(&listed.stdout).expect("JSON answer");
    assert_eq!(listed[0]["ServiceName"], "go-demo", "{listed}");

    let removed = flow_proxy(
        &["remove", "go-demo", "--proxy-url", &url],
        &[("API_TOKEN", "s3cret")],
    )
    .await;
    assert!(removed.status.success(), "{}", removed.describe());
    let (status, _) = proxy.get_through_proxy("/demo/x", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
}
