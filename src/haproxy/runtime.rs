//! HAProxy's Runtime API over the stats socket: the few commands flow-proxy sends.

use std::path::Path;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Sends one command to the stats socket and returns the whole answer.
pub async fn command(socket: &Path, command: &str) -> std::io::Result<String> {
    let mut stream = UnixStream::connect(socket).await?;
    stream.write_all(command.as_bytes()).await?;
    stream.write_all(b"\n").await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    Ok(answer)
}

/// The PID of the HAProxy process that owns the stats socket now (`show info`), if one answers.
pub async fn serving_pid(socket: &Path) -> Option<u32> {
    let info = command(socket, "show info").await.ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("Pid:"))
        .and_then(|pid| pid.trim().parse().ok())
}
