//! The embedded Consul-compatible registry: the server side of the Consul HTTP API subset that
//! flow-proxy and Registrator use (agent, catalog, health, KV, blocking queries), persisted under
//! the data directory. It is the dev default and the test fixture; production uses real Consul.
//!
//! (Skeleton: filled in by the embedded-registry work.)

use std::net::SocketAddr;
use std::path::Path;

/// The embedded registry could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    /// Binding the listen address failed.
    #[error("embedded registry cannot listen on {address}: {source}")]
    Bind {
        address: SocketAddr,
        source: std::io::Error,
    },
    /// The persisted state could not be read.
    #[error("embedded registry state {path}: {message}")]
    State { path: String, message: String },
}

/// A running embedded registry.
pub struct EmbeddedRegistry {
    address: SocketAddr,
}

impl EmbeddedRegistry {
    /// Loads the state persisted in `data_dir` and starts serving on `address` (port 0 picks one).
    pub async fn start(
        address: SocketAddr,
        _data_dir: &Path,
    ) -> Result<EmbeddedRegistry, EmbeddedError> {
        Ok(EmbeddedRegistry { address })
    }

    /// The address it actually listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops serving and waits until the state is on disk.
    pub async fn shutdown(self) {}
}
