//! The command line: running the proxy (no subcommand, every flag of [`Settings`]) and the
//! operator subcommands.
//!
//! - `render --spec-file specs.json [--instances-file instances.json]`: prints the haproxy.cfg a
//!   proxy with these settings would run for these specs, touching neither Consul nor HAProxy.
//!   The spec file is what `GET /v1/docker-flow-proxy/services` answers, so
//!   `flow-proxy services > specs.json` (or `curl …/services > specs.json`) round-trips.
//! - `check`: validates the templates, the settings and every spec stored in the configured
//!   Consul (or the embedded registry of a proxy running on this host), without touching
//!   HAProxy; one line per problem, exit code 1 when there is any.
//! - `services`, `reconfigure key=value…`, `remove <serviceName>`: a thin client of a running
//!   proxy's API, authenticating with the same `--api-token`/`--api-token-file`/`--api-users`
//!   (and their environment variables) the proxy was started with.
//!
//! Every subcommand takes every flag of [`Settings`] after its name, so `render` and `check`
//! judge exactly the configuration a proxy started with the same flags and environment would
//! have.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::certs::Certificate;
use crate::registry::ConsulClient;
use crate::render::{RenderError, Renderer, ServiceRoute};
use crate::settings::Settings;
use crate::spec::{Instance, ServiceSpec, MASKED_PASSWORD};

/// The whole command line of the `flow-proxy` binary.
#[derive(Debug, Parser)]
#[command(
    name = "flow-proxy",
    version,
    about = "On-demand control plane for HAProxy, driven by Consul",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// The proxy's settings, when no subcommand is given.
    #[command(flatten)]
    pub settings: Settings,
    /// An operator subcommand instead of running the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// The operator subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the haproxy.cfg these settings would produce for the specs in a file (the answer of
    /// `/services`), without touching Consul or HAProxy.
    Render(RenderArgs),
    /// Validate the templates, the settings and every stored spec in Consul, without touching
    /// HAProxy: one line per problem, exit code 1 when there is any.
    Check(CheckArgs),
    /// Print the specs a running proxy routes (its `/services` answer).
    Services(ClientArgs),
    /// Route a service on a running proxy: `flow-proxy reconfigure serviceName=go-demo
    /// servicePath=/demo` (the parameters of `/reconfigure`).
    Reconfigure(ReconfigureArgs),
    /// Take a service off a running proxy: `flow-proxy remove go-demo`.
    Remove(RemoveArgs),
}

/// `flow-proxy render`.
#[derive(Debug, Args)]
pub struct RenderArgs {
    /// JSON array of specs, as `GET /v1/docker-flow-proxy/services` answers it.
    #[arg(long)]
    pub spec_file: PathBuf,
    /// JSON object from Consul service name (`go-demo`, or `go-demo-blue` for a colored service)
    /// to its instances, `["10.0.0.5:8080", …]`. Without it every backend has no server.
    #[arg(long)]
    pub instances_file: Option<PathBuf>,
    /// Also write the map files the printed config routes plain rules with, as
    /// `<DIR>/maps/<file>.map` (HAProxy reads them relative to where it runs: run it in `<DIR>`).
    #[arg(long, value_name = "DIR")]
    pub write_maps: Option<PathBuf>,
    #[command(flatten)]
    pub settings: Settings,
}

/// `flow-proxy check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub settings: Settings,
}

/// Where a running proxy's API is and how to authenticate to it.
#[derive(Debug, Args)]
pub struct ClientArgs {
    /// Base URL of the proxy's API. Unset: `http://` and `--api-address` (an unspecified address
    /// such as `0.0.0.0` becomes 127.0.0.1), else `http://127.0.0.1:8080`.
    #[arg(long, env = "FLOW_PROXY_URL")]
    pub proxy_url: Option<String>,
    #[command(flatten)]
    pub settings: Settings,
}

/// `flow-proxy reconfigure`.
#[derive(Debug, Args)]
pub struct ReconfigureArgs {
    /// The parameters of `/reconfigure`, each `name=value` (sent URL-encoded).
    #[arg(required = true, value_name = "NAME=VALUE")]
    pub parameters: Vec<String>,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// `flow-proxy remove`.
#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The `serviceName` to take off.
    pub service_name: String,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Why a subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A file given on the command line could not be read.
    #[error("{flag} {path}: {source}")]
    ReadFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file asked for on the command line could not be written.
    #[error("{flag} {path}: {source}")]
    WriteFile {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A file given on the command line does not hold what it should.
    #[error("{flag} {path}: {message}")]
    BadFile {
        flag: &'static str,
        path: PathBuf,
        message: String,
    },
    /// The templates did not load or the configuration did not render.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The settings are unusable.
    #[error(transparent)]
    Settings(#[from] crate::StartError),
    /// A `reconfigure` parameter is not `name=value`.
    #[error("parameter {0:?}: give it as name=value")]
    Parameter(String),
    /// The API token file could not be read.
    #[error(transparent)]
    TokenFile(#[from] crate::api::AccessError),
    /// The proxy's API could not be reached.
    #[error("calling {url}: {source}")]
    Request { url: String, source: reqwest::Error },
    /// The proxy answered with an error status (its body has been printed).
    #[error("{url} answered {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
}

/// How long a client subcommand waits for the proxy's answer (a reconfigure may wait for its
/// change, up to `--change-timeout`, 20 s by default).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);

/// A crypt(3) hash that no password matches (the hash of a random password that was thrown
/// away): `render` puts it in place of the masked (`***`) hashes of a `/services` answer.
pub const UNUSABLE_PASSWORD_HASH: &str = "$6$XFJnm6ikH1m081Dx$o8/4D9NN0Gh61fPmJi0y1Opq6y.bfMCYOn7yL.uLGmaTv6UjS05h1CwFJSDkk5BaeZRS14iT852OL.xnSaFtd1";

/// Runs a subcommand; what it prints goes to stdout, problems to stderr.
pub async fn run(command: Command) -> ExitCode {
    let outcome = match command {
        Command::Render(args) => render(&args).map(|text| print!("{text}")),
        Command::Check(args) => {
            let problems = check(&args.settings).await;
            for problem in &problems {
                // One line per problem, however many lines the underlying error has.
                let words: Vec<&str> = problem.split_whitespace().collect();
                println!("{}", words.join(" "));
            }
            if !problems.is_empty() {
                return ExitCode::FAILURE;
            }
            println!("ok: templates, settings and stored specs are valid");
            Ok(())
        }
        Command::Services(client) => call(&client, "services", &[]).await,
        Command::Reconfigure(args) => match reconfigure_pairs(&args.parameters) {
            Ok(pairs) => call(&args.client, "reconfigure", &pairs).await,
            Err(error) => Err(error),
        },
        Command::Remove(args) => {
            let pairs = [("serviceName".to_string(), args.service_name.clone())];
            call(&args.client, "remove", &pairs).await
        }
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flow-proxy: {error}");
            ExitCode::FAILURE
        }
    }
}

// ---- render ------------------------------------------------------------------------------------

/// The haproxy.cfg `flow-proxy render` prints. Masked password hashes (`***`, as `/services`
/// shows them) are replaced by [`UNUSABLE_PASSWORD_HASH`], with a note on stderr: the users and
/// their auth rules are rendered, but no password opens them.
pub fn render(args: &RenderArgs) -> Result<String, CliError> {
    let renderer = Renderer::new(args.settings.templates_dir.as_deref())?;
    let render_settings = crate::render_settings(&args.settings)?;
    let specs = read_spec_file(&args.spec_file)?;
    let instances = match &args.instances_file {
        Some(path) => read_instances_file(path, &specs)?,
        None => BTreeMap::new(),
    };
    let routes: Vec<ServiceRoute<'_>> = specs
        .iter()
        .map(|spec| ServiceRoute {
            spec,
            instances: instances
                .get(&spec.consul_service_name())
                .map_or(&[], Vec::as_slice),
        })
        .collect();
    // The pool backends a proxy writes, all free (a proxy starting on these specs renders the same).
    let rendered = renderer.render_slotted(
        &render_settings,
        &routes,
        None,
        &crate::render::SlotsByService::new(),
        &crate::render::BackendPool::with_size(crate::render::pool_floor(specs.len())),
    )?;
    if let Some(dir) = &args.write_maps {
        crate::render::write_map_files(dir, &rendered.maps).map_err(|source| {
            CliError::WriteFile {
                flag: "--write-maps",
                path: dir.clone(),
                source,
            }
        })?;
    }
    Ok(rendered.config)
}

/// Reads a `/services` answer: a JSON array of specs, each validated as a stored one.
fn read_spec_file(path: &Path) -> Result<Vec<ServiceSpec>, CliError> {
    const FLAG: &str = "--spec-file";
    let bad = |message: String| CliError::BadFile {
        flag: FLAG,
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|source| CliError::ReadFile {
        flag: FLAG,
        path: path.to_path_buf(),
        source,
    })?;
    let documents: Vec<Value> = serde_json::from_slice(&text).map_err(|error| {
        bad(format!(
            "not a JSON array of specs (the answer of /services): {error}"
        ))
    })?;
    let mut specs = Vec::with_capacity(documents.len());
    for (position, mut document) in documents.into_iter().enumerate() {
        let name = document
            .get("ServiceName")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if unmask_passwords(&mut document) {
            eprintln!(
                "flow-proxy: service {name}: its password hashes are masked ({MASKED_PASSWORD}); \
                 rendered with a hash no password matches (the real ones are in Consul KV)"
            );
        }
        let spec: ServiceSpec = serde_json::from_value(document)
            .map_err(|error| bad(format!("spec {} ({name}): {error}", position + 1)))?;
        specs.push(spec);
    }
    Ok(specs)
}

/// Replaces every masked `Users[].PasswordHash` with [`UNUSABLE_PASSWORD_HASH`]; whether any was.
fn unmask_passwords(document: &mut Value) -> bool {
    let mut replaced = false;
    if let Some(users) = document.get_mut("Users").and_then(Value::as_array_mut) {
        for user in users {
            if let Some(hash) = user.get_mut("PasswordHash") {
                if hash.as_str() == Some(MASKED_PASSWORD) {
                    *hash = Value::from(UNUSABLE_PASSWORD_HASH);
                    replaced = true;
                }
            }
        }
    }
    replaced
}

/// Reads `{"<consul service name>": ["address:port", …]}`; every name must be one the specs
/// route and every instance must validate as one read from Consul would.
fn read_instances_file(
    path: &Path,
    specs: &[ServiceSpec],
) -> Result<BTreeMap<String, Vec<Instance>>, CliError> {
    const FLAG: &str = "--instances-file";
    let bad = |message: String| CliError::BadFile {
        flag: FLAG,
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read(path).map_err(|source| CliError::ReadFile {
        flag: FLAG,
        path: path.to_path_buf(),
        source,
    })?;
    let listed: BTreeMap<String, Vec<String>> = serde_json::from_slice(&text).map_err(|error| {
        bad(format!(
            "not a JSON object from service name to [\"address:port\", …]: {error}"
        ))
    })?;
    let mut instances = BTreeMap::new();
    for (service, addresses) in listed {
        if !specs
            .iter()
            .any(|spec| spec.consul_service_name() == service)
        {
            return Err(bad(format!(
                "{service:?} is not the Consul name of any spec (a colored service is \
                 `<serviceName>-<serviceColor>`)"
            )));
        }
        let parsed = addresses
            .iter()
            .map(|address| parse_instance(address))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|message| bad(format!("{service}: {message}")))?;
        instances.insert(service, parsed);
    }
    Ok(instances)
}

/// `10.0.0.5:8080`, `[::1]:8080` or `app.internal:8080` as an [`Instance`].
fn parse_instance(text: &str) -> Result<Instance, String> {
    let (address, port) = match text.parse::<SocketAddr>() {
        Ok(socket) => (socket.ip().to_string(), socket.port()),
        Err(_) => {
            let (host, port) = text
                .rsplit_once(':')
                .ok_or_else(|| format!("{text:?} is not address:port"))?;
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{text:?}: the port is not a number from 1 to 65535"))?;
            (host.to_string(), port)
        }
    };
    Instance::new(&address, port).map_err(|error| format!("{text:?}: {error}"))
}

// ---- check -------------------------------------------------------------------------------------

/// Every problem `flow-proxy check` finds, one line each: templates that do not load, settings
/// that would not start, stored specs and certificates that do not validate, and specs that do
/// not render together (e.g. two wanting one port).
pub async fn check(settings: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    let renderer = match Renderer::new(settings.templates_dir.as_deref()) {
        Ok(renderer) => Some(renderer),
        Err(error) => {
            problems.push(format!("templates: {error}"));
            None
        }
    };
    for error in crate::settings_problems(settings) {
        problems.push(format!("settings: {error}"));
    }
    let addresses = if settings.consul_address.is_empty() {
        vec![settings.embedded_registry_address.to_string()]
    } else {
        settings.consul_address.clone()
    };
    let registry = ConsulClient::new(
        &addresses,
        settings
            .consul_token
            .as_ref()
            .map(|token| token.expose().to_string()),
    );
    let root = format!("{}/", settings.kv_prefix.trim_end_matches('/'));
    let services_prefix = format!("{root}services/");
    let certs_prefix = format!("{root}certs/");
    let entries = match registry.kv_list(&root).await {
        Ok(entries) => entries,
        Err(error) => {
            problems.push(format!(
                "consul {}: reading {root}: {error}",
                registry.primary_url()
            ));
            return problems;
        }
    };
    let mut specs = Vec::new();
    for entry in entries {
        if let Some(cert_name) = entry.key.strip_prefix(&certs_prefix) {
            if let Err(error) = Certificate::parse(cert_name, &entry.value) {
                problems.push(format!("stored certificate {}: {error}", entry.key));
            }
            continue;
        }
        let Some(stored_name) = entry.key.strip_prefix(&services_prefix) else {
            continue;
        };
        match serde_json::from_slice::<ServiceSpec>(&entry.value) {
            Ok(spec) if spec.service_name().as_str() == stored_name => specs.push(spec),
            Ok(spec) => problems.push(format!(
                "stored spec {}: it holds service `{}`",
                entry.key,
                spec.service_name()
            )),
            Err(error) => problems.push(format!("stored spec {}: {error}", entry.key)),
        }
    }
    if let (Some(renderer), Ok(render_settings)) = (renderer, crate::render_settings(settings)) {
        let routes: Vec<ServiceRoute<'_>> = specs
            .iter()
            .map(|spec| ServiceRoute {
                spec,
                instances: &[],
            })
            .collect();
        if let Err(error) = renderer.render(&render_settings, &routes) {
            problems.push(format!("stored specs together: {error}"));
        }
    }
    problems
}

// ---- the API client ----------------------------------------------------------------------------

/// `reconfigure`'s `name=value` arguments as query pairs.
fn reconfigure_pairs(parameters: &[String]) -> Result<Vec<(String, String)>, CliError> {
    parameters
        .iter()
        .map(|parameter| {
            parameter
                .split_once('=')
                .filter(|(name, _)| !name.is_empty())
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .ok_or_else(|| CliError::Parameter(parameter.clone()))
        })
        .collect()
}

/// The API's base URL: `--proxy-url`, else `--api-address` (loopback for an unspecified
/// address), else the default API port on 127.0.0.1.
fn api_base(client: &ClientArgs) -> String {
    if let Some(url) = &client.proxy_url {
        return url.trim_end_matches('/').to_string();
    }
    let mut address = client
        .settings
        .api_address
        .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 8080)));
    if address.ip().is_unspecified() {
        address.set_ip(match address.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        });
    }
    format!("http://{address}")
}

/// Calls `/v1/docker-flow-proxy/<endpoint>` with the settings' credentials (the token, else the
/// first `--api-users` user) and prints the answer's body; an error status fails after printing.
async fn call(
    client: &ClientArgs,
    endpoint: &str,
    query: &[(String, String)],
) -> Result<(), CliError> {
    let url = format!("{}/v1/docker-flow-proxy/{endpoint}", api_base(client));
    let settings = &client.settings;
    let token = match (&settings.api_token, &settings.api_token_file) {
        (Some(token), _) => Some(token.expose().to_string()),
        (None, Some(path)) => Some(crate::api::ApiAccess::read_token_file(path)?),
        (None, None) => None,
    };
    let mut request = reqwest::Client::new()
        .get(&url)
        .query(query)
        .timeout(CLIENT_TIMEOUT);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    } else if let Some(users) = &settings.api_users {
        let first = users.expose().split(',').next().unwrap_or_default();
        if let Some((user, password)) = first.split_once(':') {
            request = request.basic_auth(user, Some(password));
        }
    }
    let request_error = |source| CliError::Request {
        url: url.clone(),
        source,
    };
    let response = request.send().await.map_err(request_error)?;
    let status = response.status();
    let body = response.text().await.map_err(request_error)?;
    // JSON answers are printed pretty (so `services > specs.json` is readable), others as they are.
    match serde_json::from_str::<Value>(&body) {
        Ok(json) => println!(
            "{}",
            serde_json::to_string_pretty(&json).unwrap_or_else(|_| body.clone())
        ),
        Err(_) => println!("{body}"),
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(CliError::Status { url, status })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[test]
    fn without_a_subcommand_every_flag_runs_the_proxy_as_before() {
        let cli = Cli::try_parse_from(["flow-proxy", "--http-port", "8081", "--insecure-api"])
            .expect("the proxy's flags");
        assert!(cli.command.is_none());
        assert_eq!(cli.settings.http_port, 8081);
        assert!(cli.settings.insecure_api);
        let error = Cli::try_parse_from(["flow-proxy", "--http-port", "81", "render"])
            .expect_err("the proxy's flags go after the subcommand");
        assert!(error.to_string().contains("render"), "{error}");
    }

    #[test]
    fn subcommands_take_the_proxys_flags_after_their_name() {
        let cli = Cli::try_parse_from([
            "flow-proxy",
            "render",
            "--spec-file",
            "specs.json",
            "--http-port",
            "81",
        ])
        .expect("render with a setting");
        let Some(Command::Render(args)) = cli.command else {
            panic!("render");
        };
        assert_eq!(args.spec_file, PathBuf::from("specs.json"));
        assert_eq!(args.settings.http_port, 81);
        assert!(Cli::try_parse_from(["flow-proxy", "render"]).is_err());
        assert!(Cli::try_parse_from(["flow-proxy", "reconfigure"]).is_err());
    }

    #[test]
    fn reconfigure_parameters_are_name_value_pairs() {
        let pairs = reconfigure_pairs(&["serviceName=go-demo".into(), "servicePath=/a=b".into()])
            .expect("pairs");
        assert_eq!(
            pairs,
            [
                ("serviceName".to_string(), "go-demo".to_string()),
                ("servicePath".to_string(), "/a=b".to_string())
            ]
        );
        for bad in ["servicePath", "=x"] {
            let error = reconfigure_pairs(&[bad.to_string()]).expect_err("refused");
            assert!(error.to_string().contains(bad), "{error}");
        }
    }

    #[test]
    fn instances_are_address_and_port_checked_like_consuls() {
        let instance = parse_instance("10.0.0.5:8080").expect("IPv4");
        assert_eq!((instance.address(), instance.port()), ("10.0.0.5", 8080));
        let instance = parse_instance("[::1]:80").expect("IPv6");
        assert_eq!((instance.address(), instance.port()), ("::1", 80));
        let instance = parse_instance("App.internal:80").expect("a host name");
        assert_eq!(instance.address(), "app.internal");
        for bad in [
            "10.0.0.5",
            "10.0.0.5:0",
            "10.0.0.5:99999",
            "bad host:80",
            "a\nb:80",
        ] {
            assert!(parse_instance(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn masked_passwords_become_the_unusable_hash_and_real_ones_stay() {
        let mut document = serde_json::json!({
            "Users": [
                {"Username": "alice", "PasswordHash": MASKED_PASSWORD},
                {"Username": "bob", "PasswordHash": "$6$salt$hash"}
            ]
        });
        assert!(unmask_passwords(&mut document));
        assert_eq!(document["Users"][0]["PasswordHash"], UNUSABLE_PASSWORD_HASH);
        assert_eq!(document["Users"][1]["PasswordHash"], "$6$salt$hash");
        assert!(!unmask_passwords(&mut document));
        crate::spec::PasswordHash::parse("Users", UNUSABLE_PASSWORD_HASH)
            .expect("a hash flow-proxy accepts");
    }

    #[test]
    fn the_client_finds_the_api_from_the_proxys_own_address() {
        let client = |args: &[&str]| {
            let cli = Cli::try_parse_from(["flow-proxy", "services"].iter().chain(args))
                .expect("services");
            let Some(Command::Services(client)) = cli.command else {
                panic!("services");
            };
            api_base(&client)
        };
        assert_eq!(client(&[]), "http://127.0.0.1:8080");
        assert_eq!(
            client(&["--api-address", "0.0.0.0:9000"]),
            "http://127.0.0.1:9000"
        );
        assert_eq!(client(&["--api-address", "[::]:9000"]), "http://[::1]:9000");
        assert_eq!(
            client(&["--proxy-url", "http://proxy:8080/"]),
            "http://proxy:8080"
        );
    }
}
