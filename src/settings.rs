//! Every setting of flow-proxy: one typed struct, each flag also read from its environment variable.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Parser;

/// The whole configuration of one flow-proxy process.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "flow-proxy",
    version,
    about = "On-demand control plane for HAProxy, driven by Consul"
)]
pub struct Settings {
    /// Address the flow-proxy HTTP API listens on.
    #[arg(long, env = "API_ADDRESS", default_value = "0.0.0.0:8080")]
    pub api_address: SocketAddr,

    /// Consul HTTP addresses (comma separated, tried in order). Unset: start the embedded registry.
    #[arg(long, env = "CONSUL_ADDRESS", value_delimiter = ',')]
    pub consul_address: Vec<String>,

    /// Consul ACL token, sent as `X-Consul-Token` with every request to Consul.
    #[arg(long, env = "CONSUL_HTTP_TOKEN", hide_env_values = true)]
    pub consul_token: Option<String>,

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

    /// Directory with handlebars templates overriding the built-in ones (same file names).
    #[arg(long, env = "TEMPLATES_DIR")]
    pub templates_dir: Option<PathBuf>,

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
    fn haproxy_is_left_running_on_exit_unless_told_to_stop_it() {
        assert!(!parse(&[]).stop_haproxy_on_exit);
        assert!(parse(&["--stop-haproxy-on-exit"]).stop_haproxy_on_exit);
        assert!(parse(&["--stop-haproxy-on-exit=true"]).stop_haproxy_on_exit);
        assert!(!parse(&["--stop-haproxy-on-exit=false"]).stop_haproxy_on_exit);
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
        assert_eq!(settings.consul_token.as_deref(), Some("s3cret"));
    }
}
