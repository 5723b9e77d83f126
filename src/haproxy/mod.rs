//! HAProxy: validating candidate configs, swapping the live file, and supervising the processes.
//!
//! flow-proxy runs HAProxy in the foreground as its own child, never daemonised, so every process
//! is reaped by the task that waits on it (no zombies, also when flow-proxy is PID 1).
//!
//! - [`Haproxy::validate`] writes the candidate to `haproxy.cfg.candidate` and runs `haproxy -c`;
//!   the live `haproxy.cfg` is untouched, so a rejected config changes nothing. The check runs in
//!   `candidate/`, where the candidate's map files are (see [`maps`]; `validate_with_maps` stages
//!   them), so no live map changes before the candidate is accepted.
//! - [`Haproxy::apply`] moves the candidate's map files over the live ones, renames an accepted
//!   candidate over `haproxy.cfg` (atomic on one file system) and reloads: a new process started with `-x <stats socket>` takes the listening
//!   sockets over from the old one and `-sf <old pid>` soft-stops it, so no connection is refused.
//!   The call returns once the new process answers on the stats socket, i.e. serves the new config.
//! - [`Haproxy::preflight`] runs before a change is validated: the serving process must answer
//!   on its stats socket, and every address the candidate binds that the running config does not
//!   must be free (see [`ports`]); otherwise the change is refused before anything is touched.
//! - If the serving process dies, the supervisor starts a new one at once from the last good
//!   `haproxy.cfg`. It also asks the serving process `show info` every second when idle; a process
//!   that fails [`HUNG_AFTER`] probes in a row (e.g. stopped with SIGSTOP) is killed with SIGKILL
//!   and replaced the same way.
//! - Every call to HAProxy is bounded in time: `haproxy -c`, each stats-socket command, the wait
//!   for a new process to serve, and the wait for the supervisor's answer.
//! - On exit flow-proxy leaves the serving HAProxy running (the next flow-proxy takes it over with
//!   `-x`/`-sf`), unless it was started to stop it ([`OnExit::Stop`]).

mod certificates;
mod maps;
mod ports;
mod runtime;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

pub use certificates::{certificate_for, CaFileError, ClientAuth, ClientCa, CERTS_DIR};
pub use ports::{bind_addresses, PortError};
pub use runtime::{command as runtime_command, serving_pid, COMMAND_TIMEOUT};

/// How long a new HAProxy process may take to serve before the start counts as failed.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `haproxy -c` may take (about 0.6 s for 10,000 services) before it is killed.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a caller waits for the supervisor's answer (it may be restarting HAProxy).
const SUPERVISOR_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stopping HAProxy may finish its connections at shutdown before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// Pause between restarts of an HAProxy that keeps dying.
const RESTART_BACKOFF: Duration = Duration::from_secs(1);
/// How often the supervisor asks an idle HAProxy whether it still answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Consecutive unanswered probes after which the serving process counts as hung.
pub const HUNG_AFTER: u32 = 3;

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
    /// The serving process does not answer on its stats socket (stopped, hung or restarting).
    #[error(
        "HAProxy does not answer: {detail}; nothing was changed (flow-proxy replaces an HAProxy \
         that stays unresponsive)"
    )]
    NotAnswering { detail: String },
    /// A call to HAProxy did not finish in time.
    #[error("{what} did not finish within {after:?}")]
    Timeout { what: String, after: Duration },
    /// The candidate binds an address that cannot be bound now.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The supervisor is gone (flow-proxy is shutting down).
    #[error("the HAProxy supervisor has stopped")]
    Stopped,
}

/// What happens to the serving HAProxy when flow-proxy exits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnExit {
    /// Leave it serving, detached; the next flow-proxy on the same data directory takes it over.
    LeaveRunning,
    /// Soft-stop it (and kill it if flow-proxy's runtime goes away first).
    Stop,
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
    on_exit: OnExit,
    supervisor: mpsc::Sender<SupervisorCommand>,
}

enum SupervisorCommand {
    Reload(oneshot::Sender<Result<(), HaproxyError>>),
    /// Does the serving process answer?
    Probe(oneshot::Sender<Result<(), HaproxyError>>),
    /// Stop supervising: soft-stop the process, or leave it running.
    Exit(OnExit, oneshot::Sender<()>),
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
        on_exit: OnExit,
    ) -> Result<Haproxy, HaproxyError> {
        maps::stage_live_maps(&paths).await?;
        validate_file(&binary, &paths.candidate, initial_config).await?;
        promote(&paths).await?;
        let leftover_pid = serving_pid(&paths.stats_socket).await;
        if let Some(pid) = leftover_pid {
            tracing::info!(
                pid,
                "taking over from the HAProxy an earlier flow-proxy left serving"
            );
        }
        let first = spawn_and_wait_ready(&binary, &paths, leftover_pid, on_exit).await?;
        let (supervisor, commands) = mpsc::channel(16);
        let supervisor_task = Supervisor {
            binary: binary.clone(),
            paths: paths.clone(),
            on_exit,
            current: first,
            unanswered_probes: 0,
        };
        tokio::spawn(supervisor_task.run(commands));
        Ok(Haproxy {
            binary,
            paths,
            on_exit,
            supervisor,
        })
    }

    /// Checks, before a change is validated, what `haproxy -c` cannot: that the serving process
    /// answers (else a reload would wait on it), and that every address `config` binds and the
    /// live config does not can be bound now (else the reload would pause every listener while
    /// the new process retries). Nothing is touched.
    pub async fn preflight(&self, config: &str) -> Result<(), HaproxyError> {
        self.ask_supervisor(SupervisorCommand::Probe).await?;
        let live = self.live_config().await?;
        ports::check_new_binds(&live, config)?;
        Ok(())
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
        self.ask_supervisor(SupervisorCommand::Reload).await
    }

    /// Sends a command to the supervisor and waits (bounded) for its answer.
    async fn ask_supervisor(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<(), HaproxyError>>) -> SupervisorCommand,
    ) -> Result<(), HaproxyError> {
        let (reply, answer) = oneshot::channel();
        let exchange = async {
            self.supervisor
                .send(command(reply))
                .await
                .map_err(|_| HaproxyError::Stopped)?;
            answer.await.map_err(|_| HaproxyError::Stopped)?
        };
        tokio::time::timeout(SUPERVISOR_TIMEOUT, exchange)
            .await
            .map_err(|_| HaproxyError::NotAnswering {
                detail: format!(
                    "the HAProxy supervisor did not answer within {SUPERVISOR_TIMEOUT:?} (it is \
                     still starting a replacement process)"
                ),
            })?
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

    /// The stats socket (the Runtime API).
    pub fn stats_socket(&self) -> &Path {
        &self.paths.stats_socket
    }

    /// How many HAProxy processes run this proxy's live configuration now (more than one while
    /// an old process finishes its connections after a reload).
    pub fn process_count(&self) -> usize {
        let config = self.paths.config.as_os_str().to_string_lossy().into_owned();
        let Ok(processes) = procfs::process::all_processes() else {
            return 0;
        };
        processes
            .filter_map(Result::ok)
            .filter_map(|process| process.cmdline().ok())
            .filter(|arguments| {
                arguments
                    .windows(2)
                    .any(|pair| pair[0] == "-f" && pair[1] == config)
            })
            .count()
    }

    /// The live configuration text.
    pub async fn live_config(&self) -> Result<String, HaproxyError> {
        tokio::fs::read_to_string(&self.paths.config)
            .await
            .map_err(io_error(format!("reading {}", self.paths.config.display())))
    }

    /// Stops supervising, for flow-proxy's exit: with [`OnExit::Stop`] soft-stops the serving
    /// process and waits for it (killing it after a grace period); with [`OnExit::LeaveRunning`]
    /// leaves it serving on its own.
    pub async fn exit(&self) {
        let (reply, done) = oneshot::channel();
        if self
            .supervisor
            .send(SupervisorCommand::Exit(self.on_exit, reply))
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }
}

/// Runs `haproxy -c` on `config` written as the candidate file of `paths`, before any HAProxy
/// runs (flow-proxy's start-time check of the operator's extra lines).
pub async fn check_config(
    binary: &Path,
    paths: &HaproxyPaths,
    config: &str,
) -> Result<(), HaproxyError> {
    validate_file(binary, &paths.candidate, config).await
}

async fn validate_file(binary: &Path, candidate: &Path, config: &str) -> Result<(), HaproxyError> {
    tokio::fs::write(candidate, config)
        .await
        .map_err(io_error(format!("writing {}", candidate.display())))?;
    // In the check directory, where the relative paths reach the candidate's map files.
    maps::prepare_check_dir_for(candidate).await?;
    let mut command = Command::new(binary);
    command.current_dir(maps::check_dir_for(candidate));
    // Dropping the unfinished future at the timeout kills `haproxy -c` (kill_on_drop).
    let check = command
        .arg("-c")
        .arg("-f")
        .arg(candidate)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(VALIDATE_TIMEOUT, check)
        .await
        .map_err(|_| HaproxyError::Timeout {
            what: format!("`{} -c`", binary.display()),
            after: VALIDATE_TIMEOUT,
        })?
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
    maps::promote_maps(paths).await?;
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
    on_exit: OnExit,
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
        // flow-proxy's standard output: where `--access-log` (`log stdout`) sends the request
        // log, so `docker logs` shows it. HAProxy writes nothing there otherwise.
        .stdout(Stdio::inherit())
        // HAProxy ignores SIGPIPE, so a process left running keeps serving after flow-proxy
        // (the reader of this pipe) is gone.
        .stderr(Stdio::piped())
        .kill_on_drop(on_exit == OnExit::Stop);
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
    on_exit: OnExit,
) -> Result<Process, HaproxyError> {
    let mut process = spawn(binary, paths, previous_pid, on_exit)?;
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

/// The supervisor task: owns the serving process, performs reloads, probes it, and replaces it
/// when it dies or hangs.
struct Supervisor {
    binary: PathBuf,
    paths: HaproxyPaths,
    on_exit: OnExit,
    current: Process,
    /// Probes in a row the serving process did not answer.
    unanswered_probes: u32,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::Receiver<SupervisorCommand>) {
        let mut probes = tokio::time::interval(PROBE_INTERVAL);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(SupervisorCommand::Reload(reply)) => {
                        let result = self.reload().await;
                        let _ = reply.send(result);
                    }
                    Some(SupervisorCommand::Probe(reply)) => {
                        let result = self.probe().await;
                        let _ = reply.send(result);
                    }
                    Some(SupervisorCommand::Exit(on_exit, reply)) => {
                        self.exit(on_exit).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => {
                        let on_exit = self.on_exit;
                        self.exit(on_exit).await;
                        return;
                    }
                },
                status = self.current.child.wait() => {
                    tracing::error!(
                        pid = self.current.pid,
                        status = ?status,
                        "haproxy died; restarting it with the last good configuration"
                    );
                    self.replace().await;
                }
                _ = probes.tick() => {
                    if self.probe().await.is_err() && self.unanswered_probes >= HUNG_AFTER {
                        tracing::error!(
                            pid = self.current.pid,
                            probes = self.unanswered_probes,
                            "haproxy does not answer on its stats socket; killing it and \
                             restarting it with the last good configuration"
                        );
                        let _ = self.current.child.start_kill();
                        let _ = self.current.child.wait().await;
                        self.replace().await;
                    }
                }
            }
        }
    }

    /// Asks the serving process `show info`; counts the unanswered probes in a row.
    async fn probe(&mut self) -> Result<(), HaproxyError> {
        let pid = self.current.pid;
        let detail = match runtime::command(&self.paths.stats_socket, "show info").await {
            Ok(info) if info.lines().any(|line| line == format!("Pid: {pid}")) => {
                self.unanswered_probes = 0;
                return Ok(());
            }
            Ok(_) => format!("another process answers on the stats socket instead of pid {pid}"),
            Err(error) => format!("pid {pid} on its stats socket: {error}"),
        };
        self.unanswered_probes += 1;
        Err(HaproxyError::NotAnswering { detail })
    }

    /// Starts a new process on the live file that takes the listeners over from the serving
    /// one, once the serving one answers (a hung one would hold the new one up).
    async fn reload(&mut self) -> Result<(), HaproxyError> {
        if let Ok(Some(status)) = self.current.child.try_wait() {
            // Died before the supervisor noticed: nobody holds the listeners to hand over, and
            // `-x` would fail. The new configuration starts on its own (if it fails, the dead
            // process is replaced from the put-back file as usual).
            tracing::error!(
                pid = self.current.pid,
                %status,
                "haproxy died; starting the new configuration in a fresh process"
            );
            let next = spawn_and_wait_ready(&self.binary, &self.paths, None, self.on_exit).await?;
            self.current = next;
            self.unanswered_probes = 0;
            return Ok(());
        }
        self.probe().await?;
        let next = match spawn_and_wait_ready(
            &self.binary,
            &self.paths,
            Some(self.current.pid),
            self.on_exit,
        )
        .await
        {
            Ok(next) => next,
            // The serving process died while the new one asked it for its sockets.
            Err(error) => match self.current.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::error!(
                        pid = self.current.pid,
                        %status,
                        "haproxy died during the reload; starting the new configuration in a fresh process"
                    );
                    let next =
                        spawn_and_wait_ready(&self.binary, &self.paths, None, self.on_exit).await?;
                    self.current = next;
                    self.unanswered_probes = 0;
                    return Ok(());
                }
                _ => return Err(error),
            },
        };
        let old = std::mem::replace(&mut self.current, next);
        reap(old);
        Ok(())
    }

    /// Starts a new process from the last good file after the serving one died or was killed,
    /// at once and then every second until one serves. The listeners died with the old process,
    /// so the new one binds them itself.
    async fn replace(&mut self) {
        loop {
            match spawn_and_wait_ready(&self.binary, &self.paths, None, self.on_exit).await {
                Ok(next) => {
                    self.current = next;
                    self.unanswered_probes = 0;
                    return;
                }
                Err(error) => {
                    tracing::error!(%error, "restarting haproxy failed; trying again");
                    tokio::time::sleep(RESTART_BACKOFF).await;
                }
            }
        }
    }

    async fn exit(self, on_exit: OnExit) {
        match on_exit {
            OnExit::Stop => stop_process(self.current).await,
            OnExit::LeaveRunning => tracing::info!(
                pid = self.current.pid,
                "leaving haproxy serving; the next flow-proxy takes it over"
            ),
        }
    }
}
