//! The open-files limit flow-proxy runs under, raised at start.
//!
//! Every routed service holds a socket for its instance watch (a blocking query kept open to
//! Consul), and with the embedded registry the registry holds the other end in the same process.
//! Under the common default soft limit of 1,024 open files that caps flow-proxy at a few hundred
//! routed services, after which the API and the registry cannot accept connections. So at start
//! flow-proxy raises its soft limit to the hard limit, as Go's runtime does for every Go program
//! (Consul's and Docker Flow Proxy's included); on macOS [`rlimit`] also caps it at
//! `kern.maxfilesperproc`, which the kernel enforces anyway.
//!
//! The hard limit itself is the operator's (`ulimit -Hn`, `LimitNOFILE=` in systemd, `--ulimit
//! nofile=` in Docker). When it is reached anyway, accepting a connection fails with `EMFILE`: the
//! API and the embedded registry log the error and try again a second later (they neither stop
//! nor spin), changes answer with the error that names the cause, and HAProxy keeps serving its
//! last good configuration. Everything recovers by itself once descriptors are freed.

/// Descriptors flow-proxy needs besides its instance watches: the API and registry listeners,
/// the HAProxy children's pipes, `haproxy -c` runs, the KV watch, concurrent API requests and
/// the registry's state file, with room to spare (measured: about 30 when idle).
pub const BASE_OPEN_FILES: u64 = 128;

/// Descriptors one routed service costs with an external Consul: its instance watch's socket.
pub const OPEN_FILES_PER_SERVICE: u64 = 1;

/// Descriptors one routed service costs with the embedded registry: the instance watch's socket
/// and the registry's end of it.
pub const OPEN_FILES_PER_SERVICE_EMBEDDED: u64 = 2;

/// The soft open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit flow-proxy was started with.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
    /// The hard limit (the most the soft limit can be raised to).
    pub hard: u64,
}

impl OpenFilesLimit {
    /// About how many services can be routed under the current limit (see [`services_allowed`]).
    pub fn services_allowed(&self, embedded_registry: bool) -> u64 {
        services_allowed(self.now, embedded_registry)
    }
}

/// The open-files limit could not be read or raised.
#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// `getrlimit(RLIMIT_NOFILE)` failed.
    #[error("reading the open files limit: {0}")]
    Read(std::io::Error),
    /// `setrlimit(RLIMIT_NOFILE)` failed.
    #[error("raising the open files limit from {from} to {to}: {source}")]
    Raise {
        from: u64,
        to: u64,
        source: std::io::Error,
    },
}

/// Raises the soft open-files limit to the hard limit; returns both limits before and after.
pub fn raise_open_files_limit() -> Result<OpenFilesLimit, LimitError> {
    let (before, hard) = rlimit::Resource::NOFILE.get().map_err(LimitError::Read)?;
    let now = rlimit::increase_nofile_limit(hard).map_err(|source| LimitError::Raise {
        from: before,
        to: hard,
        source,
    })?;
    Ok(OpenFilesLimit { before, now, hard })
}

/// About how many routed services `limit` open files allow, each instance watch costing one
/// descriptor (two with the embedded registry) after [`BASE_OPEN_FILES`] for everything else.
pub fn services_allowed(limit: u64, embedded_registry: bool) -> u64 {
    let per_service = if embedded_registry {
        OPEN_FILES_PER_SERVICE_EMBEDDED
    } else {
        OPEN_FILES_PER_SERVICE
    };
    limit.saturating_sub(BASE_OPEN_FILES) / per_service
}

/// Raises the limit (see [`raise_open_files_limit`]) and logs the outcome: what it was, what it
/// is, and about how many routed services it allows. A failure is logged and start goes on.
pub fn raise_and_log(embedded_registry: bool) {
    match raise_open_files_limit() {
        Ok(limit) => {
            let services = limit.services_allowed(embedded_registry);
            if limit.now > limit.before {
                tracing::info!(
                    "open files limit raised from {} to {} (enough for about {services} routed \
                     services)",
                    limit.before,
                    limit.now
                );
            } else {
                tracing::info!(
                    "open files limit is {} (the hard limit; enough for about {services} routed \
                     services)",
                    limit.now
                );
            }
        }
        Err(error) => tracing::warn!(%error, "the open files limit stays as it is"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_registry_halves_the_services_a_limit_allows() {
        assert_eq!(services_allowed(1024, false), 1024 - BASE_OPEN_FILES);
        assert_eq!(services_allowed(1024, true), (1024 - BASE_OPEN_FILES) / 2);
        assert_eq!(services_allowed(100, true), 0);
    }

    #[test]
    fn raising_ends_at_the_hard_limit() {
        let limit = raise_open_files_limit().expect("the limit can be read and raised");
        assert!(limit.now >= limit.before);
        let (soft, hard) = rlimit::Resource::NOFILE.get().expect("read the limit");
        assert_eq!((soft, hard), (limit.now, limit.hard));
        if !cfg!(target_os = "macos") {
            assert_eq!(limit.now, limit.hard);
        }
    }
}
