//! Every setting of flow-proxy: one typed struct, each flag also read from its environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

use crate::render::ProxyWide;
use crate::spec::proxy_wide::parse_maxconn;
use crate::spec::{
    CapturedHeader, ConfigLine, ConnectionMode, DomainAlgo, HaproxyTime, TimeoutName,
};

/// The whole configuration of one flow-proxy process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flow-proxy",
    version,
    about = "On-demand control plane for HAProxy, driven by Consul"
)]
pub struct Settings {
    /// Address the flow-proxy HTTP API listens on. Unset: `0.0.0.0:8080` when the API requires
    /// credentials (or `--insecure-api` is given), else `127.0.0.1:8080`.
    #[arg(long, env = "API_ADDRESS")]
    pub api_address: Option<SocketAddr>,

    /// Bearer token every API call that changes routing must carry (`Authorization: Bearer …`).
    #[arg(long, env = "API_TOKEN", hide_env_values = true)]
    pub api_token: Option<Secret>,

    /// File holding the API token (e.g. a Docker or systemd secret); surrounding white space is
    /// ignored.
    #[arg(long, env = "API_TOKEN_FILE", conflicts_with = "api_token")]
    pub api_token_file: Option<PathBuf>,

    /// API users for basic auth, `user:password,user2:password2`.
    #[arg(long, env = "API_USERS", hide_env_values = true)]
    pub api_users: Option<Secret>,

    /// Let the API listen on any address without credentials (anyone who reaches it can change
    /// routing).
    #[arg(
        long,
        env = "INSECURE_API",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub insecure_api: bool,

    /// Let the read-only endpoints (`config`, `services`) answer without credentials.
    #[arg(
        long,
        env = "OPEN_READ_ENDPOINTS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub open_read_endpoints: bool,

    /// Consul HTTP addresses (comma separated, tried in order). Unset: start the embedded registry.
    #[arg(long, env = "CONSUL_ADDRESS", value_delimiter = ',')]
    pub consul_address: Vec<String>,

    /// Consul ACL token, sent as `X-Consul-Token` with every request to Consul.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<Secret>,

    /// Follow each routed service's healthy instances in Consul (blocking queries) and update
    /// HAProxy as they change. `false`: instances are read only on reconfigure and reload.
    #[arg(
        long,
        env = "WATCH_INSTANCES",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub watch_instances: bool,

    /// Address the embedded Consul-compatible registry listens on (only when no --consul-address).
    #[arg(
        long,
        env = "EMBEDDED_REGISTRY_ADDRESS",
        default_value = "127.0.0.1:8500"
    )]
    pub embedded_registry_address: SocketAddr,

    /// Directory for the generated haproxy.cfg, HAProxy's sockets and the embedded registry's state.
    #[arg(long, env = "DATA_DIR", default_value = "./flow-proxy-data")]
    pub data_dir: PathBuf,

    /// The HAProxy executable (looked up on PATH when it has no slash).
    #[arg(long, env = "HAPROXY_BINARY", default_value = "haproxy")]
    pub haproxy_binary: PathBuf,

    /// Address HAProxy's frontends bind to. Unset: every IPv4 address (`*`).
    #[arg(long, env = "BIND_HOST")]
    pub bind_host: Option<IpAddr>,

    /// Port of HAProxy's HTTP frontend.
    #[arg(long, env = "HTTP_PORT", default_value_t = 80)]
    pub http_port: u16,

    /// Port of HAProxy's HTTPS frontend, which serves every route of the HTTP frontend once a
    /// certificate is stored.
    #[arg(long, env = "HTTPS_PORT", default_value_t = 443)]
    pub https_port: u16,

    /// Offer HTTP/2 on the HTTPS frontend (ALPN `h2,http/1.1`); `false`: HTTP/1.1 only.
    #[arg(
        long,
        env = "ENABLE_H2",
        default_value_t = true,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub enable_h2: bool,

    /// Redirect plain HTTP requests of every service to HTTPS (as `httpsOnly=true` on every
    /// destination of the main HTTP frontend).
    #[arg(
        long,
        env = "HTTPS_ONLY",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub https_only: bool,

    /// PEM file of the CA (one or more certificates) that signs client certificates: services
    /// with `verifyClientSsl=true` require a client certificate signed by it (mutual TLS). Read
    /// at start and copied into the data directory.
    #[arg(long, env = "CA_FILE")]
    pub ca_file: Option<PathBuf>,

    /// Basic auth for every service, `user:password,user2:password2`: each HTTP destination of a
    /// service without `users` of its own requires one of these users (unless it has
    /// `ignoreAuthorization=true`). Passwords are hashed at start and never logged.
    #[arg(long, env = "USERS", hide_env_values = true)]
    pub users: Option<Secret>,

    /// The `--users` passwords are crypt(3) hashes (SHA-512 `$6$…` or SHA-256 `$5$…`).
    #[arg(
        long,
        env = "USERS_PASS_ENCRYPTED",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub users_pass_encrypted: bool,

    /// User of HAProxy's stats page; the page is on only when both --stats-user and --stats-pass
    /// are set.
    #[arg(long, env = "STATS_USER")]
    pub stats_user: Option<String>,

    /// Password of HAProxy's stats page (hashed at start; never written in clear).
    #[arg(long, env = "STATS_PASS", hide_env_values = true)]
    pub stats_pass: Option<Secret>,

    /// URI prefix of HAProxy's stats page.
    #[arg(long, env = "STATS_URI", default_value = "/admin?stats")]
    pub stats_uri: String,

    /// Port of HAProxy's stats page. Unset: the HTTP port (the main frontend routes the stats
    /// URI to the page before any service rule).
    #[arg(long, env = "STATS_PORT")]
    pub stats_port: Option<u16>,

    /// How a service's exact `serviceDomain`s match the request's host when it has no
    /// `serviceDomainAlgo` of its own: `hdr` (the host is the domain), `hdr_beg`, `hdr_end` or
    /// `hdr_dom`; always on the host without its port, case-insensitive.
    #[arg(long, env = "SERVICE_DOMAIN_ALGO", default_value = "hdr")]
    pub service_domain_algo: DomainAlgo,

    /// Directory with handlebars templates: a file named like a built-in one (`haproxy.cfg.hbs`,
    /// `http-frontend.hbs`, `backend.hbs`, `rule-acls.hbs`) replaces it, read at start; the
    /// fragments `templateFePath`/`templateBePath` name are read from here at each render.
    #[arg(long, env = "TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,

    /// The most services routed at once: a reconfigure of one more is refused with 409.
    #[arg(long, env = "MAX_SERVICES", default_value_t = 10_000)]
    pub max_services: usize,

    /// Seconds an API call waits for its change to be applied before answering 503 (a change
    /// that has not started by then is dropped).
    #[arg(long, env = "CHANGE_TIMEOUT", default_value_t = 20)]
    pub change_timeout: u64,

    /// Prefix of flow-proxy's keys in Consul KV; specs live at `<prefix>/services/<serviceName>`.
    #[arg(long, env = "KV_PREFIX", default_value = "flow-proxy")]
    pub kv_prefix: String,

    /// Stop HAProxy when flow-proxy exits. `false` (the default): HAProxy keeps serving the last
    /// good configuration while flow-proxy is down, and the next flow-proxy on the same data
    /// directory takes it over without dropping a connection.
    #[arg(
        long,
        env = "STOP_HAPROXY_ON_EXIT",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub stop_haproxy_on_exit: bool,

    // Custom templates and raw backend lines.
    /// Accept `backendExtra` (raw lines at the bottom of a service's backends, each starting
    /// with a backend keyword). Anyone who may call the reconfigure API can then change how
    /// HAProxy treats that service's traffic beyond flow-proxy's parameters: enable it only when
    /// API callers are trusted like the operator.
    #[arg(
        long,
        env = "ALLOW_BACKEND_EXTRA",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub allow_backend_extra: bool,
    /// `maxconn`, timeouts, connection mode, extra lines, header captures, request log.
    #[command(flatten)]
    pub proxy_wide: ProxyWideFlags,

    /// How log lines are written on stdout: `text` (for people) or `json` (one JSON object per
    /// line, each field a key; each change has one line with target `flow_proxy::change`).
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// ACME certificates (see the `acme` module).
    #[command(flatten)]
    pub acme: crate::acme::AcmeFlags,
}

/// The proxy-wide HAProxy settings, with Docker Flow Proxy's environment variables. Unset flags
/// keep the values haproxy.cfg always had. `maxconn` and the timeouts can be overridden at run
/// time in Consul KV (`<kv-prefix>/settings/maxconn`, `<kv-prefix>/settings/timeouts/<name>`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ProxyWideFlags {
    /// `timeout connect` of every service. A bare number is seconds (as in Docker Flow Proxy);
    /// HAProxy units are accepted (`500ms`, `30s`, `5m`, `1h`). Default: 5s.
    #[arg(long, env = "TIMEOUT_CONNECT")]
    pub timeout_connect: Option<HaproxyTime>,

    /// `timeout client` (seconds, or with a unit). Default: 60s.
    #[arg(long, env = "TIMEOUT_CLIENT")]
    pub timeout_client: Option<HaproxyTime>,

    /// `timeout server`: how long a service may take to answer before the client gets a 504
    /// (seconds, or with a unit). Default: 60s.
    #[arg(long, env = "TIMEOUT_SERVER")]
    pub timeout_server: Option<HaproxyTime>,

    /// `timeout queue` (seconds, or with a unit). Default: HAProxy's (the connect timeout).
    #[arg(long, env = "TIMEOUT_QUEUE")]
    pub timeout_queue: Option<HaproxyTime>,

    /// `timeout tunnel`, for WebSocket and other upgraded connections (seconds, or with a unit).
    /// Default: 1h.
    #[arg(long, env = "TIMEOUT_TUNNEL")]
    pub timeout_tunnel: Option<HaproxyTime>,

    /// `timeout http-request` (seconds, or with a unit). Default: 10s.
    #[arg(long, env = "TIMEOUT_HTTP_REQUEST")]
    pub timeout_http_request: Option<HaproxyTime>,

    /// `timeout http-keep-alive` (seconds, or with a unit). Default: 10s.
    #[arg(long, env = "TIMEOUT_HTTP_KEEP_ALIVE")]
    pub timeout_http_keep_alive: Option<HaproxyTime>,

    /// How HAProxy handles HTTP connections: `http-keep-alive` (the default),
    /// `http-server-close` or `httpclose`.
    #[arg(long, env = "CONNECTION_MODE")]
    pub connection_mode: Option<ConnectionMode>,

    /// How long an HAProxy process replaced by a reload may keep serving its open connections
    /// (WebSockets, long downloads) before it is stopped: `hard-stop-after` (seconds, or with a
    /// unit). Default: 30s.
    #[arg(long, env = "HARD_STOP_AFTER")]
    pub hard_stop_after: Option<HaproxyTime>,

    /// HAProxy's process-wide `maxconn` (1 to 10000000; HAProxy needs about two open files per
    /// connection). Default: 4096.
    #[arg(long, env = "MAXCONN", value_parser = parse_maxconn)]
    pub maxconn: Option<u32>,

    /// Lines added to HAProxy's `global` section, comma separated (as in Docker Flow Proxy; a
    /// line cannot hold a comma); the flag may be repeated. Checked with `haproxy -c` at start:
    /// a line HAProxy refuses stops flow-proxy with HAProxy's message.
    #[arg(long, env = "EXTRA_GLOBAL", value_delimiter = ',')]
    pub extra_global: Vec<ConfigLine>,

    /// Lines added to the main frontends (HTTP, and HTTPS once a certificate is stored), after
    /// `bind`, comma separated like --extra-global; checked the same way.
    #[arg(long, env = "EXTRA_FRONTEND", value_delimiter = ',')]
    pub extra_frontend: Vec<ConfigLine>,

    /// Request headers to capture in the request log, `Name:length,…` (e.g.
    /// `Host:15,X-Request-Id:36`): `capture request header <Name> len <length>`.
    #[arg(long, env = "CAPTURE_REQUEST_HEADER", value_delimiter = ',')]
    pub capture_request_header: Vec<CapturedHeader>,

    /// HAProxy's request log (`option httplog`, `option tcplog`) on flow-proxy's standard
    /// output, one line per request, so `docker logs` shows every request.
    #[arg(
        long,
        env = "DEBUG",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub access_log: bool,
}

impl ProxyWideFlags {
    /// The timeout flag of `name`, when given.
    pub fn timeout(&self, name: TimeoutName) -> Option<HaproxyTime> {
        match name {
            TimeoutName::Connect => self.timeout_connect,
            TimeoutName::Client => self.timeout_client,
            TimeoutName::Server => self.timeout_server,
            TimeoutName::Queue => self.timeout_queue,
            TimeoutName::Tunnel => self.timeout_tunnel,
            TimeoutName::HttpRequest => self.timeout_http_request,
            TimeoutName::HttpKeepAlive => self.timeout_http_keep_alive,
        }
    }

    /// The proxy-wide settings these flags ask for (defaults where unset).
    pub fn proxy_wide(&self) -> ProxyWide {
        let mut settings = ProxyWide::default();
        for name in TimeoutName::ALL {
            if let Some(time) = self.timeout(name) {
                settings.timeouts.insert(name, time);
            }
        }
        if let Some(maxconn) = self.maxconn {
            settings.maxconn = maxconn;
        }
        if let Some(time) = self.hard_stop_after {
            settings.hard_stop_after = time;
        }
        if let Some(mode) = self.connection_mode {
            settings.connection_mode = mode;
        }
        settings.extra_global = self.extra_global.clone();
        settings.extra_frontend = self.extra_frontend.clone();
        settings.capture_request_headers = self.capture_request_header.clone();
        settings.access_log = self.access_log;
        settings.open_files_limit = crate::limits::open_files_hard_limit();
        settings
    }
}

/// The format of the log lines (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A secret setting (token, passwords): its `Debug` never shows the value, so printing the
/// settings cannot leak it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> Result<Secret, Self::Err> {
        Ok(Secret(value.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::Settings;

    fn parse(args: &[&str]) -> Settings {
        Settings::try_parse_from(std::iter::once("flow-proxy").chain(args.iter().copied()))
            .expect("valid flags")
    }

    #[test]
    fn watch_instances_is_on_by_default_and_takes_an_explicit_false() {
        assert!(parse(&[]).watch_instances);
        assert!(parse(&["--watch-instances"]).watch_instances);
        assert!(!parse(&["--watch-instances=false"]).watch_instances);
        assert!(!parse(&["--watch-instances", "false"]).watch_instances);
        assert!(Settings::try_parse_from(["flow-proxy", "--watch-instances=maybe"]).is_err());
    }

    #[test]
    fn ca_file_is_unset_by_default_and_takes_a_path() {
        assert_eq!(parse(&[]).ca_file, None);
        assert_eq!(
            parse(&["--ca-file", "/etc/flow-proxy/ca.pem"]).ca_file,
            Some(std::path::PathBuf::from("/etc/flow-proxy/ca.pem"))
        );
    }

    #[test]
    fn haproxy_is_left_running_on_exit_unless_told_to_stop_it() {
        assert!(!parse(&[]).stop_haproxy_on_exit);
        assert!(parse(&["--stop-haproxy-on-exit"]).stop_haproxy_on_exit);
        assert!(parse(&["--stop-haproxy-on-exit=true"]).stop_haproxy_on_exit);
        assert!(!parse(&["--stop-haproxy-on-exit=false"]).stop_haproxy_on_exit);
    }

    #[test]
    fn https_only_is_off_by_default() {
        assert!(!parse(&[]).https_only);
        assert!(parse(&["--https-only"]).https_only);
        assert!(!parse(&["--https-only=false"]).https_only);
    }

    #[test]
    fn consul_addresses_keep_their_order_and_the_token_is_optional() {
        let settings = parse(&[
            "--consul-address",
            "consul-1:8500,consul-2:8500",
            "--consul-token",
            "s3cret",
        ]);
        assert_eq!(settings.consul_address, ["consul-1:8500", "consul-2:8500"]);
        assert_eq!(settings.consul_token, Some(super::Secret::new("s3cret")));
        assert!(!format!("{settings:?}").contains("s3cret"));
    }

    #[test]
    fn stats_page_is_off_by_default_and_its_password_is_never_printed() {
        let settings = parse(&[]);
        assert_eq!(settings.stats_user, None);
        assert_eq!(settings.stats_uri, "/admin?stats");
        assert_eq!(settings.stats_port, None);
        let settings = parse(&[
            "--stats-user",
            "admin",
            "--stats-pass",
            "hunter2",
            "--users",
            "alice:wonderland",
        ]);
        let printed = format!("{settings:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("wonderland"));
    }

    #[test]
    fn flags_docker_flow_proxy_had_read_its_environment_variables() {
        let command = <Settings as clap::CommandFactory>::command();
        let env_of = |flag: &str| {
            command
                .get_arguments()
                .find(|argument| argument.get_long() == Some(flag))
                .and_then(|argument| argument.get_env())
                .and_then(|name| name.to_str())
                .map(str::to_string)
        };
        let mut flags = vec![
            ("stats-user", "STATS_USER"),
            ("stats-pass", "STATS_PASS"),
            ("stats-uri", "STATS_URI"),
            ("stats-port", "STATS_PORT"),
            ("users", "USERS"),
            ("https-only", "HTTPS_ONLY"),
            ("enable-h2", "ENABLE_H2"),
            ("service-domain-algo", "SERVICE_DOMAIN_ALGO"),
            ("timeout-connect", "TIMEOUT_CONNECT"),
            ("timeout-client", "TIMEOUT_CLIENT"),
            ("timeout-server", "TIMEOUT_SERVER"),
            ("timeout-queue", "TIMEOUT_QUEUE"),
            ("timeout-tunnel", "TIMEOUT_TUNNEL"),
            ("timeout-http-request", "TIMEOUT_HTTP_REQUEST"),
            ("timeout-http-keep-alive", "TIMEOUT_HTTP_KEEP_ALIVE"),
            ("connection-mode", "CONNECTION_MODE"),
            ("extra-global", "EXTRA_GLOBAL"),
            ("extra-frontend", "EXTRA_FRONTEND"),
            ("capture-request-header", "CAPTURE_REQUEST_HEADER"),
            ("access-log", "DEBUG"),
        ];
        // `--ca-file` comes with client certificates; checked once it exists.
        if command
            .get_arguments()
            .any(|argument| argument.get_long() == Some("ca-file"))
        {
            flags.push(("ca-file", "CA_FILE"));
        }
        for (flag, env) in flags {
            assert_eq!(env_of(flag).as_deref(), Some(env), "--{flag}");
        }
    }

    #[test]
    fn backend_extra_is_refused_unless_the_operator_allows_it() {
        assert!(!parse(&[]).allow_backend_extra);
        assert!(parse(&["--allow-backend-extra"]).allow_backend_extra);
        assert!(!parse(&["--allow-backend-extra=false"]).allow_backend_extra);
        let command = <Settings as clap::CommandFactory>::command();
        let env = command
            .get_arguments()
            .find(|argument| argument.get_long() == Some("allow-backend-extra"))
            .and_then(|argument| argument.get_env())
            .and_then(|name| name.to_str());
        assert_eq!(env, Some("ALLOW_BACKEND_EXTRA"));
    }

    #[test]
    fn service_domain_algo_is_exact_by_default_and_refuses_other_matches() {
        use crate::spec::DomainAlgo;
        assert_eq!(parse(&[]).service_domain_algo, DomainAlgo::Hdr);
        assert_eq!(
            parse(&["--service-domain-algo", "hdr_beg(host)"]).service_domain_algo,
            DomainAlgo::HdrBeg
        );
        let error =
            Settings::try_parse_from(["flow-proxy", "--service-domain-algo", "req.ssl_sni"])
                .expect_err("not a domain match");
        assert!(error.to_string().contains("hdr_dom"), "{error}");
    }

    #[test]
    fn proxy_wide_flags_keep_haproxy_cfgs_values_unless_given() {
        use crate::render::ProxyWide;
        use crate::spec::TimeoutName;
        let defaults = ProxyWide {
            // The one value that does not come from the flags: the limit HAProxy inherits.
            open_files_limit: crate::limits::open_files_hard_limit(),
            ..ProxyWide::default()
        };
        assert_eq!(parse(&[]).proxy_wide.proxy_wide(), defaults);
        let settings = parse(&[
            "--timeout-server",
            "20",
            "--timeout-queue=500ms",
            "--maxconn",
            "2000",
            "--connection-mode",
            "http-server-close",
            "--extra-global",
            "tune.bufsize 32768,tune.maxrewrite 1024",
            "--extra-global",
            "nbthread 2",
            "--capture-request-header",
            "Host:15,X-Forwarded-For:20",
            "--access-log",
        ])
        .proxy_wide
        .proxy_wide();
        assert_eq!(settings.timeouts[&TimeoutName::Server].to_string(), "20s");
        assert_eq!(settings.timeouts[&TimeoutName::Queue].to_string(), "500ms");
        assert_eq!(settings.timeouts[&TimeoutName::Connect].to_string(), "5s");
        assert_eq!(settings.maxconn, 2000);
        assert_eq!(settings.connection_mode.as_str(), "http-server-close");
        let lines: Vec<&str> = settings.extra_global.iter().map(|l| l.as_str()).collect();
        assert_eq!(
            lines,
            ["tune.bufsize 32768", "tune.maxrewrite 1024", "nbthread 2"]
        );
        assert_eq!(settings.capture_request_headers.len(), 2);
        assert!(settings.access_log);
    }

    #[test]
    fn bad_proxy_wide_flags_are_refused_naming_the_flag() {
        for args in [
            ["--timeout-client", "1 minute"],
            ["--timeout-tunnel", "0"],
            ["--maxconn", "10000001"],
            ["--connection-mode", "http-tunnel"],
            ["--extra-frontend", "backend sneaky"],
            ["--capture-request-header", "Host:0"],
            ["--access-log", "maybe"],
        ] {
            let error = Settings::try_parse_from(std::iter::once("flow-proxy").chain(args))
                .expect_err("refused");
            assert!(error.to_string().contains(args[0]), "{args:?}: {error}");
        }
    }
}
