//! When HAProxy refuses a Runtime API command, the change is still served: flow-proxy starts
//! the file it already wrote (the same configuration) as a new process, and the live file, the
//! map files and the serving process agree afterwards. When that start fails too, the change
//! fails and the commands HAProxy had taken are taken back, so they still agree.
//!
//! HAProxy refuses flow-proxy's commands when the serving process no longer has what the file
//! has: here an operator's own runtime edits make it so (`del server` on the spare server slots,
//! `del map` on a route), and HAProxy answers `No such server.` or `Key not found.`. Nothing is
//! mocked: the refusals are HAProxy's, and so are the reloads. A stats socket that does not
//! answer at all cannot take this path: the reload needs the serving process to answer (it
//! hands its listeners over on that socket), so such a change is refused instead (see
//! `haproxy_faults::a_frozen_haproxy_is_answered_503_and_replaced`).

use std::collections::BTreeSet;
use std::time::Duration;

use flow_proxy::haproxy::{runtime_command, STATS_SOCKET_FILE};

use crate::fleet::eventually;
use crate::helpers::{spawn_backend, TestProxy};
use crate::pool_backends::answer;

/// How long an instance change may take to show through HAProxy (the watch's turn and the
/// reload included).
const SHOWS: Duration = Duration::from_secs(5);

/// Requests per look: round robin over two servers answers from each at least once.
const SAMPLE: usize = 8;

/// Sends `command` to `proxy`'s HAProxy on its stats socket, as an operator would with socat.
async fn runtime(proxy: &TestProxy, command: &str) -> String {
    let socket = proxy
        .data_dir()
        .canonicalize()
        .expect("the data directory exists")
        .join(STATS_SOCKET_FILE);
    runtime_command(&socket, command)
        .await
        .unwrap_or_else(|error| panic!("`{command}` on the stats socket: {error}"))
}

/// The PID of the HAProxy process serving now: another one means a reload.
async fn serving_pid(proxy: &TestProxy) -> u32 {
    proxy
        .haproxy_pid()
        .await
        .expect("HAProxy answers on its stats socket")
}

/// The backend names answering [`SAMPLE`] requests for `path`, sorted, without repeats.
async fn serving(proxy: &TestProxy, path: &str) -> Vec<String> {
    let mut names = proxy.names_answering(path, None, SAMPLE).await;
    names.sort();
    names.dedup();
    names
}

/// The `server` lines of `backend` in the live haproxy.cfg, as (name, address, disabled).
async fn file_servers(proxy: &TestProxy, backend: &str) -> Vec<(String, String, bool)> {
    let config = proxy.config().await;
    let mut inside = false;
    let mut servers = Vec::new();
    for line in config.lines() {
        if let Some(name) = line.strip_prefix("backend ") {
            inside = name.trim() == backend;
        } else if !line.starts_with(' ') {
            inside = false;
        } else if let Some(server) = line.trim().strip_prefix("server ").filter(|_| inside) {
            let words: Vec<&str> = server.split_whitespace().collect();
            servers.push((
                words[0].to_string(),
                words[1].to_string(),
                words.contains(&"disabled"),
            ));
        }
    }
    servers
}

/// HAProxy's `srv_admin_state` bits that hold a server in maintenance (forced, inherited, from a
/// resolver, from a hostname); the bit of the `disabled` keyword alone (4) does not.
const IN_MAINTENANCE: u32 = 0x01 | 0x02 | 0x20 | 0x40;

/// The servers of `backend` the serving process routes to (not in maintenance), as
/// (name, address:port), from `show servers state`.
async fn served_servers(proxy: &TestProxy, backend: &str) -> BTreeSet<(String, String)> {
    let state = runtime(proxy, &format!("show servers state {backend}")).await;
    state
        .lines()
        .filter(|line| !line.starts_with('#') && line.split_whitespace().count() > 18)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // srv_name, srv_addr, srv_admin_state, srv_port.
            let admin: u32 = fields[6].parse().ok()?;
            (admin & IN_MAINTENANCE == 0).then(|| {
                (
                    fields[3].to_string(),
                    format!("{}:{}", fields[4], fields[18]),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_change_haproxy_refuses_at_runtime_is_served_by_starting_the_same_file() {
    let proxy = TestProxy::spawn().await;
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    proxy.register_instance("web", "web.1", one.port).await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(serving(&proxy, "/web").await, ["one"]);
    let spares: Vec<String> = file_servers(&proxy, "web-be0")
        .await
        .into_iter()
        .filter(|(_, _, disabled)| *disabled)
        .map(|(name, _, _)| name)
        .collect();
    assert!(!spares.is_empty(), "web-be0 has spare server slots");
    // An operator removes the spare slots from the serving process; the file still has them.
    for slot in &spares {
        assert_eq!(
            runtime(&proxy, &format!("del server web-be0/{slot}"))
                .await
                .trim(),
            "Server deleted."
        );
    }
    let before = serving_pid(&proxy).await;

    proxy.register_instance("web", "web.2", two.port).await;

    eventually("the new instance is served", SHOWS, || async {
        serving(&proxy, "/web").await == ["one", "two"]
    })
    .await;
    assert_ne!(
        serving_pid(&proxy).await,
        before,
        "HAProxy refused `set server` (No such server.): a new process started on the file"
    );
    let in_file: BTreeSet<(String, String)> = file_servers(&proxy, "web-be0")
        .await
        .into_iter()
        .filter(|(_, _, disabled)| !disabled)
        .map(|(name, address, _)| (name, address))
        .collect();
    assert!(
        in_file
            .iter()
            .any(|(_, address)| *address == format!("127.0.0.1:{}", two.port)),
        "the live file routes to the new instance: {in_file:?}"
    );
    assert_eq!(
        served_servers(&proxy, "web-be0").await,
        in_file,
        "the serving process routes to exactly the file's servers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_change_haproxy_refuses_at_runtime_is_served_by_a_reload_with_the_new_maps() {
    let proxy = TestProxy::spawn().await;
    let api = spawn_backend("api").await;
    let web = spawn_backend("web").await;
    proxy.register_instance("api", "api.1", api.port).await;
    proxy.register_instance("web", "web.1", web.port).await;
    proxy
        .reconfigure_ok("serviceName=api&servicePath=/api")
        .await;
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/web")
        .await;
    assert_eq!(answer(&proxy, "/web/x").await, "web");
    // `/config` answers once the live files the change queued are written.
    proxy.config().await;
    let maps = proxy.data_dir().join("maps");
    let file = std::fs::read_dir(&maps)
        .expect("the map directory")
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|name| {
            std::fs::read_to_string(maps.join(name))
                .is_ok_and(|text| text.lines().any(|line| line.starts_with("/web ")))
        })
        .expect("a map file routes /web");
    // An operator removes /web from the serving process's map; the file still has it.
    assert_eq!(
        runtime(&proxy, &format!("del map maps/{file} /web"))
            .await
            .trim(),
        ""
    );
    assert_eq!(answer(&proxy, "/web/x").await, "503");
    let before = serving_pid(&proxy).await;

    // Moving web to /site deletes /web from the map: HAProxy answers `Key not found.`.
    proxy
        .reconfigure_ok("serviceName=web&servicePath=/site")
        .await;

    assert_eq!(answer(&proxy, "/site/x").await, "web");
    assert_eq!(answer(&proxy, "/web/x").await, "503");
    assert_eq!(answer(&proxy, "/api").await, "api");
    assert_ne!(
        serving_pid(&proxy).await,
        before,
        "the live config was started again with the new map files"
    );
    let in_file: BTreeSet<(String, String)> = std::fs::read_to_string(maps.join(&file))
        .expect("the live map file")
        .lines()
        .filter_map(|line| line.split_once(' '))
        .map(|(key, backend)| (key.to_string(), backend.to_string()))
        .collect();
    assert!(in_file.iter().any(|(key, _)| key == "/site"), "{in_file:?}");
    let served: BTreeSet<(String, String)> = runtime(&proxy, &format!("show map maps/{file}"))
        .await
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace().skip(1);
            Some((words.next()?.to_string(), words.next()?.to_string()))
        })
        .collect();
    assert_eq!(
        served, in_file,
        "the serving process's map is the live file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_whose_commands_and_reload_both_fail_leaves_every_pool_slot_as_the_file_says()
{
    let proxy = TestProxy::spawn().await;
    let seed = spawn_backend("seed").await;
    proxy.register_instance("seed", "seed.1", seed.port).await;
    proxy
        .reconfigure_ok("serviceName=seed&servicePath=/seed")
        .await;
    let pool: Vec<String> = proxy
        .config()
        .await
        .lines()
        .filter_map(|line| line.strip_prefix("backend pool-"))
        .map(|number| format!("pool-{number}"))
        .collect();
    assert!(!pool.is_empty(), "the file carries pool backends");
    // An operator removes the second slot of every pool backend from the serving process: a new
    // service with two instances gets its first slot set, then `No such server.`.
    for backend in &pool {
        assert_eq!(
            runtime(&proxy, &format!("del server {backend}/s2"))
                .await
                .trim(),
            "Server deleted."
        );
    }
    // And the reload that follows fails: every write of the candidate file fails as on a full
    // disk.
    let candidate = proxy.data_dir().join("haproxy.cfg.candidate");
    let _ = std::fs::remove_file(&candidate);
    std::os::unix::fs::symlink("/dev/full", &candidate).expect("candidate → /dev/full");
    let one = spawn_backend("one").await;
    let two = spawn_backend("two").await;
    proxy.register_instance("fresh", "fresh.1", one.port).await;
    proxy.register_instance("fresh", "fresh.2", two.port).await;
    let before = serving_pid(&proxy).await;

    let (status, body) = proxy
        .reconfigure("serviceName=fresh&servicePath=/fresh")
        .await;
    assert_eq!(status, reqwest::StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    assert_eq!(serving_pid(&proxy).await, before, "no new process serves");
    // The serving process holds what the live file says: no pool slot routes to anything (the
    // first slot the refused session had set is back in maintenance).
    for backend in &pool {
        assert_eq!(
            served_servers(&proxy, backend).await,
            BTreeSet::new(),
            "{backend} serves no instance, as in the file"
        );
    }
    assert_eq!(answer(&proxy, "/fresh").await, "503");
    assert_eq!(answer(&proxy, "/seed").await, "seed");

    // The disk recovers: the same call is served.
    std::fs::remove_file(&candidate).expect("remove the fault");
    proxy
        .reconfigure_ok("serviceName=fresh&servicePath=/fresh")
        .await;
    eventually("both instances serve /fresh", SHOWS, || async {
        serving(&proxy, "/fresh").await == ["one", "two"]
    })
    .await;
}
