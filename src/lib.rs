//! flow-proxy: an on-demand control plane for HAProxy, driven by Consul.
//!
//! (Layout section written when the modules are filled in.)

pub mod registry;
pub mod render;
pub mod settings;
pub mod spec;

/// Runs flow-proxy until `shutdown` completes.
pub async fn run(
    _settings: settings::Settings,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), std::io::Error> {
    shutdown.await;
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let _ = tokio::signal::ctrl_c().await;
}
