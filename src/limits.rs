//! The open-files limit flow-proxy runs under: raised at start, and lived with when reached.
//!
//! flow-proxy's own descriptors no longer grow with the routed services: the instances of every
//! routed service are followed over a handful of connections to Consul (see
//! [`crate::proxy`]'s instance follower), so idle it holds a few dozen descriptors whether it
//! routes one service or thousands. What still grows with load is the API's concurrent callers
//! and, with the embedded registry, Registrator's and other clients' connections to it. So at
//! start flow-proxy raises its soft limit to the hard limit, as Go's runtime does for every Go
//! program (Consul's and Docker Flow Proxy's included); on macOS [`rlimit`] also caps it at
//! `kern.maxfilesperproc`, which the kernel enforces anyway.
//!
//! The hard limit itself is the operator's (`ulimit -Hn`, `LimitNOFILE=` in systemd, `--ulimit
//! nofile=` in Docker). When the limit is reached anyway (e.g. by a flood of API connections),
//! accepting fails with `EMFILE`. The API listens through an [`ApiListener`], which keeps one
//! descriptor in reserve to answer such a connection with a 503 that says so instead of leaving
//! the caller waiting; the embedded registry logs the error and tries again a second later (it
//! neither stops nor spins). Changes that do get through answer with the error that names the
//! cause ("Too many open files"), and HAProxy keeps serving its last good configuration.
//! Everything recovers by itself once descriptors are freed.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
/// The hard limit on open files: what flow-proxy raises its own limit to at start, and so what
/// HAProxy inherits. `None` when it cannot be read.
pub fn open_files_hard_limit() -> Option<u64> {
    rlimit::Resource::NOFILE.get().ok().map(|(_, hard)| hard)
}

pub fn raise_open_files_limit() -> Result<OpenFilesLimit, LimitError> {
    let (before, hard) = rlimit::Resource::NOFILE.get().map_err(LimitError::Read)?;
    let now = rlimit::increase_nofile_limit(hard).map_err(|source| LimitError::Raise {
        from: before,
        to: hard,
        source,
    })?;
    Ok(OpenFilesLimit { before, now, hard })
}

/// Raises the limit (see [`raise_open_files_limit`]) and logs the outcome: what it was and what
/// it is. A failure is logged and start goes on.
pub fn raise_and_log() {
    match raise_open_files_limit() {
        Ok(limit) if limit.now > limit.before => tracing::info!(
            "open files limit raised from {} to {}",
            limit.before,
            limit.now
        ),
        Ok(limit) => tracing::info!("open files limit is {} (the hard limit)", limit.now),
        Err(error) => tracing::warn!(%error, "the open files limit stays as it is"),
    }
}

/// How long the API waits before accepting again after an accept error it cannot answer.
const ACCEPT_RETRY: Duration = Duration::from_secs(1);

/// How long a refused connection may take to send its request, and to take the 503.
const REFUSED_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// The API's listener: accepts like [`TcpListener`], and when the process is out of file
/// descriptors (`EMFILE`, `ENFILE`) it closes a descriptor it holds in reserve, accepts the
/// waiting connection with it, answers `503` with a message naming the cause, and turns that
/// connection's descriptor back into the reserve as it closes it (`dup2`), so that no other task
/// can take the descriptor in between. Without a reserve it logs and retries a second later, as
/// axum does.
pub struct ApiListener {
    listener: TcpListener,
    reserve: Option<OwnedFd>,
}

impl ApiListener {
    /// Wraps a bound listener and takes one descriptor in reserve.
    pub fn new(listener: TcpListener) -> ApiListener {
        ApiListener {
            listener,
            reserve: open_reserve(),
        }
    }

    /// Answers one connection waiting while the process is out of descriptors; whether one was
    /// answered.
    async fn refuse_one(&mut self, cause: &std::io::Error) -> bool {
        let Some(reserve) = self.reserve.take() else {
            return false;
        };
        drop(reserve);
        let (stream, peer) = match self.listener.accept().await {
            Ok(accepted) => accepted,
            Err(_) => {
                self.reserve = open_reserve();
                return false;
            }
        };
        let limit = rlimit::Resource::NOFILE
            .get()
            .map_or_else(|_| "unknown".to_string(), |(soft, _)| soft.to_string());
        tracing::error!(
            %peer,
            %cause,
            "flow-proxy is out of file descriptors (open files limit {limit}): answering 503 \
             until descriptors are freed"
        );
        let stream = answer_out_of_descriptors(stream, &limit).await;
        self.reserve = self.keep_as_reserve(stream);
        true
    }

    /// Closes `stream` by making its descriptor a duplicate of the listener's (one atomic
    /// `dup2`), which becomes the new reserve.
    fn keep_as_reserve(&self, stream: TcpStream) -> Option<OwnedFd> {
        let descriptor = stream.into_std().ok()?.into_raw_fd();
        // SAFETY: both descriptors are open and owned here; dup2 closes `descriptor` (the
        // answered connection, owned by nobody else now) and reopens it as a copy of the
        // listener's, which this function then owns.
        unsafe {
            if libc::dup2(self.listener.as_raw_fd(), descriptor) == descriptor {
                Some(OwnedFd::from_raw_fd(descriptor))
            } else {
                libc::close(descriptor);
                open_reserve()
            }
        }
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok(accepted) => {
                    if self.reserve.is_none() {
                        self.reserve = open_reserve();
                    }
                    return accepted;
                }
                Err(error) if is_connection_error(&error) => {}
                Err(error) if is_out_of_descriptors(&error) => {
                    if !self.refuse_one(&error).await {
                        tracing::error!(
                            %error,
                            "the API cannot accept connections: out of file descriptors; \
                             trying again in 1 s"
                        );
                        tokio::time::sleep(ACCEPT_RETRY).await;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "the API cannot accept connections; trying again in 1 s");
                    tokio::time::sleep(ACCEPT_RETRY).await;
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// One open descriptor (of /dev/null) held so that it can be given up when none is left.
fn open_reserve() -> Option<OwnedFd> {
    std::fs::File::open("/dev/null").ok().map(OwnedFd::from)
}

fn is_out_of_descriptors(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
    )
}

/// Reads what the caller sent (briefly, so that closing does not reset the connection before it
/// reads the answer), then answers `503` in the API's JSON shape and ends the connection.
async fn answer_out_of_descriptors(mut stream: TcpStream, limit: &str) -> TcpStream {
    let mut request = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSED_READ_TIMEOUT, stream.read(&mut request)).await;
    let body = serde_json::json!({
        "Status": "NOK",
        "Message": format!(
            "flow-proxy is out of file descriptors (open files limit {limit}) and cannot serve \
             this request; HAProxy keeps serving its last good configuration. It recovers by \
             itself once descriptors are freed (fewer routed services), or raise the hard limit \
             (ulimit -Hn, LimitNOFILE, docker --ulimit nofile)."
        ),
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: \
         {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSED_READ_TIMEOUT, async {
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
    stream
}

#[cfg(test)]
mod tests {
    use super::*;

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
