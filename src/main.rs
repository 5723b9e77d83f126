//! The `flow-proxy` binary: parse the command line; without a subcommand start logging and run
//! the proxy until SIGINT or SIGTERM, else run the operator subcommand (see [`flow_proxy::cli`]).

use clap::Parser;
use flow_proxy::cli::Cli;
use flow_proxy::settings::LogFormat;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(command) = cli.command {
        return flow_proxy::cli::run(command).await;
    }
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    match cli.settings.log_format {
        LogFormat::Text => tracing_subscriber::fmt().with_env_filter(filter).init(),
        LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_env_filter(filter)
            .init(),
    }
    match flow_proxy::run(cli.settings, flow_proxy::shutdown_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "flow-proxy stopped");
            std::process::ExitCode::FAILURE
        }
    }
}
