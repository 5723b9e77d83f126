//! The `flow-proxy` binary: parse the settings, start logging, run until SIGINT or SIGTERM.

use clap::Parser;
use flow_proxy::settings::Settings;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = Settings::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match flow_proxy::run(settings, flow_proxy::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "flow-proxy stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
