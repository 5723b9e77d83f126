//! HAProxy's Runtime API over the stats socket: the few commands flow-proxy sends, each bounded
//! in time. A stopped (SIGSTOP) or hung HAProxy still accepts the connection (the kernel does)
//! but never answers, so without the bound a caller would wait forever.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// How long one Runtime API command may take (it normally takes well under a millisecond).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends one command to the stats socket and returns the whole answer; fails with
/// `ErrorKind::TimedOut` when HAProxy has not answered within [`COMMAND_TIMEOUT`].
pub async fn command(socket: &Path, command: &str) -> std::io::Result<String> {
    let exchange = async {
        let mut stream = UnixStream::connect(socket).await?;
        stream.write_all(command.as_bytes()).await?;
        stream.write_all(b"\n").await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok(answer)
    };
    tokio::time::timeout(COMMAND_TIMEOUT, exchange)
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer to `{command}` within {COMMAND_TIMEOUT:?}"),
            )
        })?
}

/// The PID of the HAProxy process that owns the stats socket now (`show info`), if one answers
/// within [`COMMAND_TIMEOUT`].
pub async fn serving_pid(socket: &Path) -> Option<u32> {
    let info = command(socket, "show info").await.ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}
