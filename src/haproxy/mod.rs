//! HAProxy: validating candidate configs, swapping the live file, and supervising the processes.
//!
//! flow-proxy runs HAProxy in the foreground as its own child, never daemonised, so every process
//! is reaped by the task that waits on it (no zombies, also when flow-proxy is PID 1).
//!
//! - [`Haproxy::validate`] writes the candidate to `haproxy.cfg.candidate` and runs `haproxy -c`;
//!   the live `haproxy.cfg` is untouched, so a rejected config changes nothing.
//! - [`Haproxy::apply`] renames an accepted candidate over `haproxy.cfg` (atomic on one file
//!   system) and reloads: a new process started with `-x <stats socket>` takes the listening
//!   sockets over from the old one and `-sf <old pid>` soft-stops it, so no connection is refused.
//!   The call returns once the new process answers on the stats socket, i.e. serves the new config.
//! - If the serving process dies, the supervisor starts a new one from the last good `haproxy.cfg`.

mod certificates;
mod runtime;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

pub use certificates::CERTS_DIR;
pub use runtime::{command as runtime_command, serving_pid};

/// How long a new HAProxy process may take to serve before the start counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a stopping HAProxy may finish its connections at shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Pause between restarts of an HAProxy that keeps dying.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);

/// Something went wrong with HAProxy.
#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    /// `haproxy -c` rejected the candidate; the text holds HAProxy's own lines.
    #[error("HAProxy rejected the configuration:\n{0}")]
    Rejected(String),
    /// A process could not be started, or a file not written.
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    /// A new process exited or never became ready; the previous one keeps serving.
    #[error("HAProxy did not start: {0}")]
    Start(String),
    /// The supervisor is gone (flow-proxy is shutting down).
    #[error("the HAProxy supervisor has stopped")]
    Stopped,
}

fn io_error(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> HaproxyError {
    let context = context.into();
    move |source| HaproxyError::Io { context, source }
}

/// File name of the stats socket in the data directory.
pub const STATS_SOCKET_FILE: &str = "haproxy.sock";

/// Where HAProxy's files live under the data directory.
#[derive(Debug, Clone)]
pub struct HaproxyPaths {
    /// The live configuration, only ever replaced by a validated candidate.
    pub config: PathBuf,
    /// Where candidates are written for `haproxy -c`.
    pub candidate: PathBuf,
    /// The admin stats socket (also used by `-x` to pass listening sockets on).
    pub stats_socket: PathBuf,
}

impl HaproxyPaths {
    /// The standard layout under `data_dir`.
    pub fn under(data_dir: &Path) -> HaproxyPaths {
        HaproxyPaths {
            config: data_dir.join("haproxy.cfg"),
            candidate: data_dir.join("haproxy.cfg.candidate"),
            stats_socket: data_dir.join(STATS_SOCKET_FILE),
        }
    }
}

/// The handle to HAProxy: validation, config swaps and the supervisor task.
#[derive(Debug, Clone)]
pub struct Haproxy {
    binary: PathBuf,
    paths: HaproxyPaths,
    supervisor: mpsc::Sender<SupervisorCommand>,
}

enum SupervisorCommand {
    Reload(oneshot::Sender<Result<(), HaproxyError>>),
    Stop(oneshot::Sender<()>),
}

impl Haproxy {
    /// Validates `initial_config`, makes it the live file and starts HAProxy with it.
    ///
    /// If an HAProxy from an earlier flow-proxy still answers on the stats socket, the new process
    /// takes its listening sockets over (`-x`, `-sf`) instead of failing to bind.
    pub async fn start(
        binary: PathBuf,
        paths: HaproxyPaths,
        initial_config: &str,
    ) -> Result<Haproxy, HaproxyError> {
        validate_file(&binary, &paths.candidate, initial_config).await?;
        promote(&paths).await?;
        let leftover_pid = serving_pid(&paths.stats_socket).await;
        if let Some(pid) = leftover_pid {
            tracing::warn!(
                pid,
                "taking over from an HAProxy left running by an earlier flow-proxy"
            );
        }
        let first = spawn_and_wait_ready(&binary, &paths, leftover_pid).await?;
        let (supervisor, commands) = mpsc::channel(16);
        tokio::spawn(supervise(binary.clone(), paths.clone(), first, commands));
        Ok(Haproxy {
            binary,
            paths,
            supervisor,
        })
    }

    /// Runs `haproxy -c` on `config` written as the candidate file; the live file is untouched.
    pub async fn validate(&self, config: &str) -> Result<(), HaproxyError> {
        validate_file(&self.binary, &self.paths.candidate, config).await
    }

    /// Replaces the live config with the last validated candidate and reloads HAProxy.
    ///
    /// Returns once the new process serves. If it fails to start, the old process keeps serving.
    pub async fn apply(&self) -> Result<(), HaproxyError> {
        promote(&self.paths).await?;
        let (reply, answer) = oneshot::channel();
        self.supervisor
            .send(SupervisorCommand::Reload(reply))
            .await
            .map_err(|_| HaproxyError::Stopped)?;
        answer.await.map_err(|_| HaproxyError::Stopped)?
    }

    /// Writes `config` back as the live file, without a reload: used to undo a swap whose reload
    /// failed, so the file matches the process that still serves.
    pub async fn restore_live_config(&self, config: &str) -> Result<(), HaproxyError> {
        let staging = self.paths.config.with_extension("cfg.rollback");
        tokio::fs::write(&staging, config)
            .await
            .map_err(io_error(format!("writing {}", staging.display())))?;
        tokio::fs::rename(&staging, &self.paths.config)
            .await
            .map_err(io_error(format!("moving {} into place", staging.display())))
    }

    /// The live configuration text.
    pub async fn live_config(&self) -> Result<String, HaproxyError> {
        tokio::fs::read_to_string(&self.paths.config)
            .await
            .map_err(io_error(format!("reading {}", self.paths.config.display())))
    }

    /// Soft-stops every HAProxy process and waits for them (killing them after a grace period).
    pub async fn stop(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .supervisor
            .send(SupervisorCommand::Stop(reply))
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }
}

async fn validate_file(binary: &Path, candidate: &Path, config: &str) -> Result<(), HaproxyError> {
    tokio::fs::write(candidate, config)
        .await
        .map_err(io_error(format!("writing {}", candidate.display())))?;
    let output = haproxy_command(binary, candidate)
        .arg("-c")
        .arg("-f")
        .arg(candidate)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_error(format!("running {} -c", binary.display())))?;
    if output.status.success() {
        return Ok(());
    }
    let mut printed = String::from_utf8_lossy(&output.stdout).into_owned();
    printed.push_str(&String::from_utf8_lossy(&output.stderr));
    // HAProxy's verdict is in its ALERT lines; the NOTICE lines around them are noise.
    let alerts: Vec<&str> = printed
        .lines()
        .filter(|line| line.contains("[ALERT]"))
        .collect();
    let message = if alerts.is_empty() {
        printed.trim().to_string()
    } else {
        alerts.join("\n")
    };
    Err(HaproxyError::Rejected(message))
}

/// An HAProxy command run from the directory of `config_file`, so that the relative paths in
/// haproxy.cfg (stats socket, error pages) resolve there and the rendered file does not depend on
/// where `--data-dir` is.
fn haproxy_command(binary: &Path, config_file: &Path) -> Command {
    let mut command = Command::new(binary);
    if let Some(directory) = config_file.parent() {
        command.current_dir(directory);
    }
    command
}

async fn promote(paths: &HaproxyPaths) -> Result<(), HaproxyError> {
    tokio::fs::rename(&paths.candidate, &paths.config)
        .await
        .map_err(io_error(format!(
            "moving {} to {}",
            paths.candidate.display(),
            paths.config.display()
        )))
}

/// One HAProxy process we started, with the lines it printed to stderr.
struct Process {
    child: Child,
    pid: u32,
    output: Arc<Mutex<Vec<String>>>,
}

impl Process {
    fn output(&self) -> String {
        self.output
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }
}

fn spawn(
    binary: &Path,
    paths: &HaproxyPaths,
    previous_pid: Option<u32>,
) -> Result<Process, HaproxyError> {
    let mut command = haproxy_command(binary, &paths.config);
    command.arg("-f").arg(&paths.config);
    if let Some(pid) = previous_pid {
        command
            .arg("-x")
            .arg(&paths.stats_socket)
            .arg("-sf")
            .arg(pid.to_string());
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(io_error(format!("starting {}", binary.display())))?;
    let pid = child
        .id()
        .ok_or_else(|| HaproxyError::Start("the new process exited at once".into()))?;
    let output = Arc::new(Mutex::new(Vec::new()));
    if let Some(stderr) = child.stderr.take() {
        let sink = Arc::clone(&output);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("[ALERT]") {
                    tracing::error!(pid, "haproxy: {line}");
                } else if line.contains("stopped (cumulated conns") {
                    // Every soft-stop after a reload says this for each proxy: routine.
                    tracing::debug!(pid, "haproxy: {line}");
                } else {
                    tracing::warn!(pid, "haproxy: {line}");
                }
                if let Ok(mut kept) = sink.lock() {
                    if kept.len() < 100 {
                        kept.push(line);
                    }
                }
            }
        });
    }
    Ok(Process { child, pid, output })
}

/// Starts a process and waits until it owns the stats socket, i.e. has loaded its config and
/// bound (or taken over) every listener.
async fn spawn_and_wait_ready(
    binary: &Path,
    paths: &HaproxyPaths,
    previous_pid: Option<u32>,
) -> Result<Process, HaproxyError> {
    let mut process = spawn(binary, paths, previous_pid)?;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut pause = Duration::from_millis(2);
    loop {
        if serving_pid(&paths.stats_socket).await == Some(process.pid) {
            tracing::info!(pid = process.pid, "haproxy serves the new configuration");
            return Ok(process);
        }
        if let Ok(Some(status)) = process.child.try_wait() {
            // Give the stderr reader a moment to collect the last lines.
            tokio::time::sleep(Duration::from_millis(20)).await;
            return Err(HaproxyError::Start(format!(
                "{status}: {}",
                process.output()
            )));
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
            return Err(HaproxyError::Start(format!(
                "not serving after {READY_TIMEOUT:?}: {}",
                process.output()
            )));
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// Waits for an old process in the background, so it is reaped once it has finished its work.
fn reap(mut process: Process) {
    tokio::spawn(async move {
        match process.child.wait().await {
            Ok(status) => tracing::debug!(pid = process.pid, %status, "old haproxy exited"),
            Err(error) => tracing::warn!(pid = process.pid, %error, "waiting for old haproxy"),
        }
    });
}

async fn stop_process(mut process: Process) {
    send_signal(process.pid, libc::SIGUSR1);
    if tokio::time::timeout(STOP_GRACE, process.child.wait())
        .await
        .is_err()
    {
        let _ = process.child.start_kill();
        let _ = process.child.wait().await;
    }
}

fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is one of our children.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}

/// The supervisor task: owns the serving process, performs reloads, restarts HAProxy if it dies.
async fn supervise(
    binary: PathBuf,
    paths: HaproxyPaths,
    mut current: Process,
    mut commands: mpsc::Receiver<SupervisorCommand>,
) {
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(SupervisorCommand::Reload(reply)) => {
                    let result = match spawn_and_wait_ready(&binary, &paths, Some(current.pid)).await {
                        Ok(next) => {
                            let old = std::mem::replace(&mut current, next);
                            reap(old);
                            Ok(())
                        }
                        Err(error) => Err(error),
                    };
                    let _ = reply.send(result);
                }
                Some(SupervisorCommand::Stop(reply)) => {
                    stop_process(current).await;
                    let _ = reply.send(());
                    return;
                }
                None => {
                    stop_process(current).await;
                    return;
                }
            },
            status = current.child.wait() => {
                tracing::error!(
                    pid = current.pid,
                    status = ?status,
                    "haproxy died; restarting it with the last good configuration"
                );
                loop {
                    match spawn_and_wait_ready(&binary, &paths, None).await {
                        Ok(next) => {
                            current = next;
                            break;
                        }
                        Err(error) => {
                            tracing::error!(%error, "restarting haproxy failed; trying again");
                            tokio::time::sleep(RESTART_BACKOFF).await;
                        }
                    }
                }
            }
        }
    }
}
