//! The packaging that Docker or systemd runs and these machines cannot: `haproxy/Dockerfile`,
//! `docker-compose-demo.yml` and `packaging/flow-proxy.service`. Every flag and environment
//! variable they give flow-proxy must be one of its real settings with a value it accepts
//! (checked with clap itself, so a renamed or mistyped one fails here), every port they publish
//! must be one the proxy listens on, and the image must build the binary with the README's
//! build command.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use clap::{CommandFactory, Parser};
use flow_proxy::cli::Cli;
use reqwest::StatusCode;
use serde_yaml_ng::Value;

use crate::fleet::eventually;
use crate::helpers::free_port;
use crate::proxy_client::ProxyClient;

/// The API's port when `--api-address` is not given (flow-proxy's default, as Docker Flow
/// Proxy's).
const API_PORT: u16 = 8080;

fn repository_file(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    std::fs::read_to_string(&full).unwrap_or_else(|error| panic!("{}: {error}", full.display()))
}

/// The long flag that reads environment variable `name`, if flow-proxy has one.
fn flag_of_env(name: &str) -> Option<String> {
    Cli::command()
        .get_arguments()
        .find(|argument| argument.get_env().and_then(|env| env.to_str()) == Some(name))
        .and_then(|argument| argument.get_long().map(str::to_string))
}

/// Parses `flags` plus `env` (as the flags those variables stand for) the way flow-proxy does
/// without a subcommand; panics naming `what` and the problem when clap refuses them.
fn assert_flow_proxy_accepts(what: &str, flags: &[String], env: &BTreeMap<String, String>) {
    let mut args = vec!["flow-proxy".to_string()];
    for (name, value) in env {
        let flag = flag_of_env(name).unwrap_or_else(|| {
            panic!("{what}: {name} is not an environment variable of flow-proxy")
        });
        args.push(format!("--{flag}={value}"));
    }
    args.extend(flags.iter().cloned());
    let cli = Cli::try_parse_from(&args)
        .unwrap_or_else(|error| panic!("{what}: flow-proxy refuses {args:?}: {error}"));
    assert!(cli.command.is_none(), "{what}: {args:?} runs a subcommand");
}

// ---- the Dockerfile ----------------------------------------------------------------------------

/// The Dockerfile's instructions, each `(INSTRUCTION, arguments)` with continuation lines joined.
fn dockerfile_instructions() -> Vec<(String, String)> {
    let text = repository_file("haproxy/Dockerfile");
    let mut instructions = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(continued) = line.strip_suffix('\\') {
            current.push_str(continued);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (instruction, arguments) = current.split_once(' ').unwrap_or((current.as_str(), ""));
        instructions.push((instruction.to_uppercase(), arguments.trim().to_string()));
        current.clear();
    }
    instructions
}

/// The `ENV` of the image's last stage.
fn image_env(instructions: &[(String, String)]) -> BTreeMap<String, String> {
    let last_stage = instructions
        .iter()
        .rposition(|(instruction, _)| instruction == "FROM")
        .expect("a FROM");
    let mut env = BTreeMap::new();
    for (instruction, arguments) in &instructions[last_stage..] {
        if instruction == "ENV" {
            for pair in arguments.split_whitespace() {
                let (name, value) = pair
                    .split_once('=')
                    .unwrap_or_else(|| panic!("ENV {arguments}: write NAME=value"));
                env.insert(name.to_string(), value.to_string());
            }
        }
    }
    env
}

/// The one `cargo build` command of a text (a Dockerfile `RUN`, a script line).
fn cargo_build_command(text: &str, what: &str) -> String {
    let commands: Vec<&str> = text
        .lines()
        .filter_map(|line| line.find("cargo build").map(|start| line[start..].trim()))
        .collect();
    assert_eq!(
        commands.len(),
        1,
        "{what}: one cargo build command: {commands:?}"
    );
    commands[0].to_string()
}

#[test]
fn the_image_builds_with_the_readmes_command_and_runs_flow_proxy_unprivileged() {
    let instructions = dockerfile_instructions();
    let dockerfile_build =
        cargo_build_command(&repository_file("haproxy/Dockerfile"), "Dockerfile");
    assert!(
        dockerfile_build.starts_with("cargo build --release"),
        "{dockerfile_build}"
    );
    // The README builds and runs with scripts/run.sh; whatever `cargo build` it shows is the same.
    let readme = repository_file("README.md");
    assert!(
        readme.lines().any(|line| line.trim() == "scripts/run.sh"),
        "the README's quick start runs scripts/run.sh"
    );
    assert_eq!(
        cargo_build_command(&repository_file("scripts/run.sh"), "scripts/run.sh"),
        dockerfile_build
    );
    for line in readme.lines().filter(|line| line.contains("cargo build")) {
        assert!(line.contains(&dockerfile_build), "README: {line}");
    }

    let from: Vec<&str> = instructions
        .iter()
        .filter(|(instruction, _)| instruction == "FROM")
        .map(|(_, arguments)| arguments.as_str())
        .collect();
    let runtime = from.last().expect("a runtime stage");
    let version = runtime
        .strip_prefix("haproxy:")
        .unwrap_or_else(|| panic!("the runtime stage is the official HAProxy image: {runtime}"));
    let (major, minor) = version
        .split(['-', '.'])
        .take(2)
        .map(|part| part.parse::<u32>().expect("haproxy:<major>.<minor>…"))
        .fold((None, None), |(major, minor), number| match major {
            None => (Some(number), minor),
            Some(_) => (major, Some(number)),
        });
    assert!(
        (major, minor) >= (Some(2), Some(6)),
        "HAProxy 2.6 or newer: {runtime}"
    );

    let user = instructions
        .iter()
        .rev()
        .find(|(instruction, _)| instruction == "USER")
        .map(|(_, user)| user.as_str());
    assert!(
        matches!(user, Some(user) if user != "root" && user != "0"),
        "the image runs as a non-root user: {user:?}"
    );

    let binary = instructions
        .iter()
        .find(|(instruction, arguments)| {
            instruction == "COPY" && arguments.contains("target/release/flow-proxy")
        })
        .and_then(|(_, arguments)| arguments.split_whitespace().last())
        .expect("the binary is copied from the build stage");
    let entrypoint = instructions
        .iter()
        .rfind(|(instruction, _)| instruction == "ENTRYPOINT")
        .map(|(_, arguments)| arguments.as_str());
    assert_eq!(
        entrypoint,
        Some(format!("[\"{binary}\"]").as_str()),
        "flow-proxy itself is PID 1"
    );

    let env = image_env(&instructions);
    assert_flow_proxy_accepts("Dockerfile ENV", &[], &env);
    let port = |name: &str| -> u16 {
        env.get(name)
            .unwrap_or_else(|| panic!("the image sets {name}"))
            .parse()
            .expect("a port")
    };
    let exposed: Vec<u16> = instructions
        .iter()
        .filter(|(instruction, _)| instruction == "EXPOSE")
        .flat_map(|(_, ports)| ports.split_whitespace())
        .map(|port| port.parse().expect("EXPOSE <port>"))
        .collect();
    for wanted in [port("HTTP_PORT"), port("HTTPS_PORT"), API_PORT] {
        assert!(wanted > 1024, "an unprivileged user binds {wanted}");
        assert!(exposed.contains(&wanted), "EXPOSE {wanted}: {exposed:?}");
    }
    let stop_signal = instructions
        .iter()
        .rfind(|(instruction, _)| instruction == "STOPSIGNAL")
        .map(|(_, signal)| signal.as_str());
    assert_eq!(
        stop_signal,
        Some("SIGTERM"),
        "docker stop sends what flow-proxy stops on (the HAProxy image's is SIGUSR1)"
    );
}

// ---- the compose demo --------------------------------------------------------------------------

/// A compose service's `environment` (map or list form) as a map.
fn environment(service: &Value) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match service.get("environment") {
        None => {}
        Some(Value::Mapping(map)) => {
            for (name, value) in map {
                let name = name.as_str().expect("a variable name").to_string();
                let value = match value {
                    Value::String(text) => text.clone(),
                    Value::Number(number) => number.to_string(),
                    Value::Bool(flag) => flag.to_string(),
                    other => panic!("{name}: a scalar value, not {other:?}"),
                };
                env.insert(name, value);
            }
        }
        Some(Value::Sequence(items)) => {
            for item in items {
                let (name, value) = item
                    .as_str()
                    .and_then(|item| item.split_once('='))
                    .expect("NAME=value");
                env.insert(name.to_string(), value.to_string());
            }
        }
        Some(other) => panic!("environment: {other:?}"),
    }
    env
}

/// A `command` (string or list form) as arguments.
fn command(service: &Value) -> Vec<String> {
    match service.get("command") {
        None => Vec::new(),
        Some(Value::String(text)) => text.split_whitespace().map(str::to_string).collect(),
        Some(Value::Sequence(items)) => items
            .iter()
            .map(|item| item.as_str().expect("a string argument").to_string())
            .collect(),
        Some(other) => panic!("command: {other:?}"),
    }
}

/// The `(host, container)` ports a service publishes.
fn published_ports(service: &Value) -> Vec<(u16, u16)> {
    service
        .get("ports")
        .and_then(Value::as_sequence)
        .map(|ports| {
            ports
                .iter()
                .map(|port| {
                    let text = port.as_str().expect("ports as \"host:container\" strings");
                    let (host, container) = text.split_once(':').expect("host:container");
                    (
                        host.parse().expect("a host port"),
                        container.parse().expect("a container port"),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn the_compose_demo_gives_flow_proxy_only_real_settings_and_wires_every_service() {
    let compose: Value =
        serde_yaml_ng::from_str(&repository_file("docker-compose-demo.yml")).expect("YAML");
    let services = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services");
    let named = |name: &str| -> &Value {
        services
            .get(name)
            .unwrap_or_else(|| panic!("the demo has a `{name}` service"))
    };
    let image_of = |service: &Value| {
        service
            .get("image")
            .and_then(Value::as_str)
            .map(str::to_string)
    };

    // Consul's official image, its HTTP API open to the other containers.
    let consul = named("consul");
    let consul_image = image_of(consul).expect("consul: an image");
    assert!(
        consul_image.starts_with("hashicorp/consul:"),
        "{consul_image}"
    );
    let consul_command = command(consul);
    assert!(
        consul_command
            .windows(2)
            .any(|pair| pair == ["-client", "0.0.0.0"]),
        "consul listens beyond its loopback: {consul_command:?}"
    );

    // Registrator, pointed at that Consul.
    let registrator = named("registrator");
    let registrator_image = image_of(registrator).expect("registrator: an image");
    assert!(
        registrator_image.starts_with("gliderlabs/registrator:"),
        "{registrator_image}"
    );
    assert_eq!(
        command(registrator).last().map(String::as_str),
        Some("consul://consul:8500"),
        "registrator's registry URI"
    );

    let dockerfile_env = image_env(&dockerfile_instructions());
    let mut proxies = 0;
    let mut published_hosts = Vec::new();
    for (name, service) in services {
        let name = name.as_str().expect("a service name");
        for dependency in service
            .get("depends_on")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let dependency = dependency.as_str().expect("depends_on names");
            assert!(
                services.contains_key(dependency),
                "{name} depends on unknown {dependency}"
            );
        }
        published_hosts.extend(published_ports(service).into_iter().map(|(host, _)| host));
        let Some(build) = service.get("build") else {
            continue;
        };
        // A flow-proxy: built from the image's Dockerfile, its settings from the image's ENV
        // and its own environment and command.
        proxies += 1;
        let dockerfile = build
            .get("dockerfile")
            .and_then(Value::as_str)
            .expect("build.dockerfile");
        assert_eq!(dockerfile, "haproxy/Dockerfile", "{name}");
        let mut env = dockerfile_env.clone();
        env.extend(environment(service));
        assert_flow_proxy_accepts(name, &command(service), &env);
        let consul_address = env.get("CONSUL_ADDRESS").expect("CONSUL_ADDRESS");
        assert_eq!(
            consul_address, "consul:8500",
            "{name} uses the demo's Consul"
        );
        assert!(
            env.contains_key("API_TOKEN") || env.contains_key("API_TOKEN_FILE"),
            "{name}: the API is reachable from the host only with credentials"
        );
        let listening: Vec<u16> = ["HTTP_PORT", "HTTPS_PORT"]
            .iter()
            .map(|variable| env[*variable].parse().expect("a port"))
            .chain([API_PORT])
            .collect();
        let ports = published_ports(service);
        for (host, container) in &ports {
            assert!(
                listening.contains(container),
                "{name} publishes {host}:{container}, a port it does not listen on ({listening:?})"
            );
        }
        for wanted in [listening[0], API_PORT] {
            assert!(
                ports.iter().any(|(_, container)| *container == wanted),
                "{name} publishes its HTTP port and its API ({wanted})"
            );
        }
    }
    assert!(proxies >= 1, "the demo runs flow-proxy");
    let mut unique = published_hosts.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        published_hosts.len(),
        "host ports: {published_hosts:?}"
    );

    // The app: scalable (no host port), registered by Registrator under the colored names the
    // blue-green walk-through routes.
    for (name, color) in [("app", "blue"), ("app-green", "green")] {
        let app = named(name);
        assert!(image_of(app).is_some(), "{name}: an image");
        assert!(
            published_ports(app).is_empty(),
            "{name} publishes no host port, so --scale {name}=3 works"
        );
        assert_eq!(
            environment(app).get("SERVICE_NAME").map(String::as_str),
            Some(format!("app-{color}").as_str()),
            "{name}: Registrator's service name is <serviceName>-<serviceColor>"
        );
    }
}

// ---- systemd -----------------------------------------------------------------------------------

#[test]
fn the_systemd_unit_gives_flow_proxy_only_real_settings_and_may_bind_80() {
    let unit = repository_file("packaging/flow-proxy.service");
    let mut env = BTreeMap::new();
    let mut exec_start = None;
    let mut settings = BTreeMap::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with('[') || line.is_empty() {
            continue;
        }
        let (key, value) = line.split_once('=').expect("Key=value");
        if key == "Environment" {
            let (name, value) = value.split_once('=').expect("Environment=NAME=value");
            env.insert(name.to_string(), value.to_string());
        } else if key == "ExecStart" {
            exec_start = Some(value.to_string());
        } else {
            settings.insert(key.to_string(), value.to_string());
        }
    }
    let exec_start = exec_start.expect("ExecStart");
    let mut words = exec_start.split_whitespace().map(str::to_string);
    assert_eq!(
        words.next().as_deref(),
        Some("/usr/local/bin/flow-proxy"),
        "where the install lines put the binary"
    );
    let flags: Vec<String> = words.collect();
    assert_flow_proxy_accepts("flow-proxy.service", &flags, &env);
    let user = settings.get("User").map(String::as_str);
    assert!(
        matches!(user, Some(user) if user != "root"),
        "runs unprivileged: {user:?}"
    );
    let http_port: u16 = env
        .get("HTTP_PORT")
        .map_or(80, |port| port.parse().expect("a port"));
    if http_port < 1024 {
        for key in ["AmbientCapabilities", "CapabilityBoundingSet"] {
            assert_eq!(
                settings.get(key).map(String::as_str),
                Some("CAP_NET_BIND_SERVICE"),
                "{key}: HAProxy binds {http_port} as an unprivileged user"
            );
        }
    }
    assert!(
        unit.contains("LoadCredential=api-token:") && flags.iter().any(|f| f == "%d/api-token"),
        "the API token comes from a systemd credential"
    );
}

// ---- flow-proxy as PID 1 -----------------------------------------------------------------------

/// How long flow-proxy may take to answer its ping, to exit after SIGTERM, and old HAProxy
/// processes to be reaped.
const PID1_TIMEOUT: Duration = Duration::from_secs(20);

/// `(state, parent pid)` of a process, from /proc/<pid>/stat.
fn state_and_parent(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.to_string();
    Some((state, fields.next()?.parse().ok()?))
}

/// The children of `parent` as `(pid, state)`.
fn children_of(parent: u32) -> Vec<(u32, String)> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let (state, ppid) = state_and_parent(pid)?;
            (ppid == parent).then_some((pid, state))
        })
        .collect()
}

/// The PID a process has in its own PID namespace (the last field of `NSpid:`).
fn pid_in_own_namespace(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("NSpid:"))?
        .split_whitespace()
        .last()?
        .parse()
        .ok()
}

#[tokio::test]
async fn as_pid_1_flow_proxy_reaps_every_haproxy_it_replaced_and_stops_on_sigterm() {
    // The container's situation: flow-proxy is PID 1 of its own PID namespace (needs root, as
    // the test machines run; `unshare` is util-linux's).
    let data_dir = tempfile::tempdir().expect("data directory");
    let api_address = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
    let http_port = free_port();
    let mut unshare = tokio::process::Command::new("unshare")
        .args(["--pid", "--fork", "--kill-child"])
        .arg(env!("CARGO_BIN_EXE_flow-proxy"))
        .args([
            "--embedded-registry-address",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .args(["--api-address", &api_address.to_string()])
        .args([
            "--bind-host",
            "127.0.0.1",
            "--http-port",
            &http_port.to_string(),
        ])
        .args(["--https-port", &free_port().to_string()])
        .arg("--data-dir")
        .arg(data_dir.path())
        // As the image sets it.
        .args(["--stop-haproxy-on-exit", "true"])
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("unshare runs (root is needed for a new PID namespace)");
    let unshare_pid = unshare.id().expect("unshare's pid");
    let client = ProxyClient::new(api_address, http_port, data_dir.path().to_path_buf());
    let mut flow_proxy = None;
    eventually(
        "flow-proxy runs as PID 1 and answers its ping",
        PID1_TIMEOUT,
        || {
            let found = children_of(unshare_pid).first().map(|(pid, _)| *pid);
            flow_proxy = found;
            let ping = client
                .http()
                .get(client.api("/v1/docker-flow-proxy/ping"))
                .send();
            async move {
                found.and_then(pid_in_own_namespace) == Some(1)
                    && ping
                        .await
                        .is_ok_and(|answer| answer.status() == StatusCode::OK)
            }
        },
    )
    .await;
    let flow_proxy = flow_proxy.expect("flow-proxy's pid");

    // Every reconfigure reloads: a new HAProxy takes over and the old one exits.
    let first_haproxy = client.haproxy_pid().await.expect("HAProxy serves");
    for version in 1..=5 {
        client
            .reconfigure_ok(&format!("serviceName=go-demo&servicePath=/v{version}"))
            .await;
    }
    let last_haproxy = client.haproxy_pid().await.expect("HAProxy serves");
    assert_ne!(
        first_haproxy, last_haproxy,
        "the reconfigures reloaded HAProxy"
    );
    let live_haproxy = || {
        children_of(flow_proxy)
            .into_iter()
            .filter(|(_, state)| state != "Z")
            .count()
    };
    eventually(
        "the replaced HAProxy processes are gone and none is a zombie",
        PID1_TIMEOUT,
        || {
            let children = children_of(flow_proxy);
            async move { children.len() == 1 && children.iter().all(|(_, state)| state != "Z") }
        },
    )
    .await;
    assert_eq!(live_haproxy(), 1);

    // `docker stop` sends SIGTERM; PID 1 has no default action for it, only its own handler.
    let pid = libc::pid_t::try_from(flow_proxy).expect("a pid fits pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is flow-proxy, started above.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let status = tokio::time::timeout(PID1_TIMEOUT, unshare.wait())
        .await
        .expect("flow-proxy as PID 1 exits on SIGTERM")
        .expect("unshare's status");
    assert!(status.success(), "{status}");
}
