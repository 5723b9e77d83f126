//! HAProxy: validating candidate configs, swapping the live file, and supervising the processes.
//!
//! flow-proxy runs HAProxy in the foreground as its own child, never daemonised, so every process
//! is reaped by the task that waits on it (no zombies, also when flow-proxy is PID 1).
//!
//! - A change is parsed once, by the process that is to serve it: [`Haproxy::start_candidate`]
//!   writes the candidate to `haproxy.cfg.candidate` and its map files (see [`maps`]) and starts
//!   a new process on it with `-x <stats socket>` (it takes the listening sockets over from the
//!   serving one) and `-sf <old pid>` (it soft-stops the old one once it has them), so no
//!   connection is refused. HAProxy parses the whole configuration before it touches the serving
//!   process: a candidate it refuses exits with the same lines `haproxy -c` prints
//!   ([`HaproxyError::Rejected`]), the previous map files are written back, and the old process
//!   never noticed. The call returns once the new process serves (see [`readiness`]). The live
//!   `haproxy.cfg` is still the previous configuration: [`Haproxy::promote`] renames the
//!   candidate over it (atomic on one file system) once the change is stored, or
//!   [`Haproxy::reload_live`] goes back to it when the change must not stay (the caller writes
//!   the previous map files back first).
//! - `haproxy -c` is for where nothing serves yet: the first start, `flow-proxy check`, the
//!   operator's extra lines at start. It runs in `candidate/`, where the candidate's map files
//!   are staged, so no live map changes before a candidate is accepted.
//! - [`Haproxy::preflight`] runs before a change is validated: the serving process must answer
//!   on its stats socket, and every address the candidate binds that the running config does not
//!   must be free (see [`ports`]); otherwise the change is refused before anything is touched.
//! - A change HAProxy takes at runtime queues the live files' new text to the supervisor
//!   ([`Haproxy::write_live_later`], see [`live_files`]), which writes it in order and before any
//!   start from the live file; the caller is answered without waiting for the disk.
//! - If the serving process dies, the supervisor starts a new one at once from the last good
//!   `haproxy.cfg`. It also asks the serving process `show info` every second when idle; a process
//!   that fails [`HUNG_AFTER`] probes in a row (e.g. stopped with SIGSTOP) is killed with SIGKILL
//!   and replaced the same way.
//! - Every call to HAProxy is bounded in time: `haproxy -c`, each stats-socket command, the wait
//!   for a new process to serve, and the wait for the supervisor's answer.
//! - On exit flow-proxy leaves the serving HAProxy running (the next flow-proxy takes it over with
//!   `-x`/`-sf`), unless it was started to stop it ([`OnExit::Stop`]).

mod certificates;
mod live_files;
mod maps;
mod output;
mod ports;
mod readiness;
mod runtime;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

pub use certificates::{certificate_for, CaFileError, ClientAuth, ClientCa, CERTS_DIR};
pub use live_files::LiveWrite;
pub use maps::live_map_writes;
pub use ports::{bind_addresses, PortError};
pub use runtime::{
    command as runtime_command, serving_pid, slot_changes, RuntimeError, SlotChange,
    COMMAND_TIMEOUT,
};

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
    /// HAProxy refused the candidate (`haproxy -c`, or the new process started on it); the text
    /// holds HAProxy's own lines.
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
    /// Where candidates are written, for `haproxy -c` or for a new process to start on.
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
    paths: HaproxyPaths,
    on_exit: OnExit,
    supervisor: mpsc::Sender<SupervisorCommand>,
}

enum SupervisorCommand {
    /// Start a new process on the live file.
    Reload(oneshot::Sender<Result<(), HaproxyError>>),
    /// Start a new process on the candidate file; answer how long it took to serve.
    StartCandidate(oneshot::Sender<Result<Duration, HaproxyError>>),
    /// Rename the candidate over the live file: the serving process runs it.
    Promote(oneshot::Sender<Result<(), HaproxyError>>),
    /// Does the serving process answer?
    Probe(oneshot::Sender<Result<(), HaproxyError>>),
    /// Write live files (see [`live_files`]); nobody waits for it.
    WriteLive(Vec<LiveWrite>),
    /// Answer once every queued live write is done (or with the error of one that failed).
    FlushLive(oneshot::Sender<Result<(), HaproxyError>>),
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
        let (first, _) =
            spawn_and_wait_ready(&binary, &paths, ConfigFile::Live, leftover_pid, on_exit).await?;
        let (supervisor, commands) = mpsc::channel(16);
        let supervisor_task = Supervisor {
            binary,
            paths: paths.clone(),
            on_exit,
            current: first,
            unanswered_probes: 0,
            unwritten: live_files::Unwritten::default(),
        };
        tokio::spawn(supervisor_task.run(commands));
        Ok(Haproxy {
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

    /// Writes `config` as the candidate file and starts a new HAProxy process on it that takes
    /// over from the serving one; returns how long the new process took to serve.
    ///
    /// If HAProxy refuses the configuration ([`HaproxyError::Rejected`], with its own lines) or
    /// the new process fails to start, the old process keeps serving and nothing changed but the
    /// candidate file. On success the live file still holds the previous configuration: call
    /// [`Haproxy::promote`] to keep the new one, or [`Haproxy::reload_live`] to go back.
    ///
    /// The new process reads `maps` from the live map directory (haproxy.cfg names them relative
    /// to the data directory): they are written there (and staged as the candidate's, which
    /// [`Haproxy::promote`] moves into place) just before it starts, and the previous ones are
    /// written back if it does not serve. The serving process keeps the maps it loaded.
    pub async fn start_candidate(
        &self,
        config: &str,
        maps: &[crate::render::MapFile],
    ) -> Result<Duration, HaproxyError> {
        let previous_maps = self.live_maps().await?;
        // (`live_maps` waited for the queued live writes.)
        self.stage_candidate_maps(maps).await?;
        self.write_live_maps(maps).await?;
        let started = async {
            tokio::fs::write(&self.paths.candidate, config)
                .await
                .map_err(io_error(format!(
                    "writing {}",
                    self.paths.candidate.display()
                )))?;
            self.ask_supervisor(SupervisorCommand::StartCandidate).await
        };
        let result = started.await;
        if result.is_err() {
            if let Err(error) = self.write_live_maps(&previous_maps).await {
                tracing::error!(%error, "putting back the previous map files failed");
            }
        }
        result
    }

    /// Renames the candidate a started process serves over the live file, so restarts (by the
    /// supervisor or by the next flow-proxy) start from it.
    pub async fn promote(&self) -> Result<(), HaproxyError> {
        self.ask_supervisor(SupervisorCommand::Promote).await
    }

    /// Reloads HAProxy from the live file: puts the previous configuration back after a started
    /// candidate that must not stay (e.g. its change could not be stored).
    pub async fn reload_live(&self) -> Result<(), HaproxyError> {
        self.ask_supervisor(SupervisorCommand::Reload).await
    }

    /// Sends a command to the supervisor and waits (bounded) for its answer.
    async fn ask_supervisor<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, HaproxyError>>) -> SupervisorCommand,
    ) -> Result<T, HaproxyError> {
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
        self.flush_live_writes().await?;
        let staging = self.paths.config.with_extension("cfg.rollback");
        tokio::fs::write(&staging, config)
            .await
            .map_err(io_error(format!("writing {}", staging.display())))?;
        tokio::fs::rename(&staging, &self.paths.config)
            .await
            .map_err(io_error(format!("moving {} into place", staging.display())))
    }

    /// Queues live files' new text for the supervisor to write (see [`live_files`]): returns
    /// at once, and every later start from the live file, direct access or flush comes after.
    pub async fn write_live_later(&self, writes: Vec<LiveWrite>) -> Result<(), HaproxyError> {
        self.supervisor
            .send(SupervisorCommand::WriteLive(writes))
            .await
            .map_err(|_| HaproxyError::Stopped)
    }

    /// Waits until every live write queued so far is done; the error of one that failed.
    pub async fn flush_live_writes(&self) -> Result<(), HaproxyError> {
        self.ask_supervisor(SupervisorCommand::FlushLive).await
    }

    /// The stats socket (the Runtime API).
    pub fn stats_socket(&self) -> &Path {
        &self.paths.stats_socket
    }

    /// How many HAProxy processes serve this proxy now, started on its live file or on a
    /// candidate (more than one while an old process finishes its connections after a reload);
    /// `haproxy -c` checks do not count.
    pub fn process_count(&self) -> usize {
        let files = [&self.paths.config, &self.paths.candidate]
            .map(|file| file.as_os_str().to_string_lossy().into_owned());
        let Ok(processes) = procfs::process::all_processes() else {
            return 0;
        };
        processes
            .filter_map(Result::ok)
            .filter_map(|process| process.cmdline().ok())
            .filter(|arguments| {
                arguments
                    .windows(2)
                    .any(|pair| pair[0] == "-f" && files.contains(&pair[1]))
                    && !arguments.iter().any(|argument| argument == "-c")
            })
            .count()
    }

    /// The live configuration text.
    pub async fn live_config(&self) -> Result<String, HaproxyError> {
        self.flush_live_writes().await?;
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
    Err(HaproxyError::Rejected(readiness::verdict(&printed)))
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

/// The configuration file a process is started on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConfigFile {
    /// `haproxy.cfg`, the last good configuration.
    Live,
    /// `haproxy.cfg.candidate`, a change not yet promoted.
    Candidate,
}

impl ConfigFile {
    fn path(self, paths: &HaproxyPaths) -> &Path {
        match self {
            ConfigFile::Live => &paths.config,
            ConfigFile::Candidate => &paths.candidate,
        }
    }
}

/// Most lines of a process's output kept for its error message.
const OUTPUT_LINES: usize = 1000;

/// One HAProxy process we started, with the lines it printed to stderr.
struct Process {
    child: Child,
    pid: u32,
    /// The file it was started on.
    config: ConfigFile,
    output: Arc<Mutex<Vec<String>>>,
    /// The task reading its stderr, until it is awaited once the process exited.
    reader: Option<tokio::task::JoinHandle<()>>,
}

impl Process {
    /// What it printed (the first [`OUTPUT_LINES`] lines); once it exited, all of that.
    async fn output(&mut self) -> String {
        if let Some(reader) = self.reader.take() {
            readiness::output_read(reader).await;
        }
        self.output
            .lock()
            .map(|lines| lines.join("\n"))
            .unwrap_or_default()
    }
}

fn spawn(
    binary: &Path,
    paths: &HaproxyPaths,
    config: ConfigFile,
    previous_pid: Option<u32>,
    on_exit: OnExit,
) -> Result<Process, HaproxyError> {
    let file = config.path(paths);
    let mut command = haproxy_command(binary, file);
    command.arg("-f").arg(file);
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
    let reader = child.stderr.take().map(|stderr| {
        let sink = Arc::clone(&output);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match output::output_level(&line) {
                    output::OutputLevel::Error => tracing::error!(pid, "haproxy: {line}"),
                    output::OutputLevel::Warn => tracing::warn!(pid, "haproxy: {line}"),
                    output::OutputLevel::Info => tracing::info!(pid, "haproxy: {line}"),
                    output::OutputLevel::Debug => tracing::debug!(pid, "haproxy: {line}"),
                }
                if let Ok(mut kept) = sink.lock() {
                    if kept.len() < OUTPUT_LINES {
                        kept.push(line);
                    }
                }
            }
        })
    });
    Ok(Process {
        child,
        pid,
        config,
        output,
        reader,
    })
}

/// Starts a process on `config` and waits until it answers on the stats socket, i.e. has loaded
/// its config and bound (or taken over) every listener; returns it with how long that took.
async fn spawn_and_wait_ready(
    binary: &Path,
    paths: &HaproxyPaths,
    config: ConfigFile,
    previous_pid: Option<u32>,
    on_exit: OnExit,
) -> Result<(Process, Duration), HaproxyError> {
    let mut process = spawn(binary, paths, config, previous_pid, on_exit)?;
    let took = readiness::wait_until_serving(&mut process, &paths.stats_socket).await?;
    tracing::info!(
        pid = process.pid,
        ?took,
        "haproxy serves the new configuration"
    );
    Ok((process, took))
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
    /// Live writes queued and not done yet (see [`live_files`]).
    unwritten: live_files::Unwritten,
}

impl Supervisor {
    async fn run(mut self, mut commands: mpsc::Receiver<SupervisorCommand>) {
        let mut probes = tokio::time::interval(PROBE_INTERVAL);
        probes.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Queued commands first: a live write queued before HAProxy died is written
                // before the replacement starts from the file.
                biased;
                command = commands.recv() => match command {
                    Some(SupervisorCommand::Reload(reply)) => {
                        let result = self.reload(ConfigFile::Live).await;
                        let _ = reply.send(result.map(|_| ()));
                    }
                    Some(SupervisorCommand::StartCandidate(reply)) => {
                        let result = self.reload(ConfigFile::Candidate).await;
                        let _ = reply.send(result);
                    }
                    Some(SupervisorCommand::Promote(reply)) => {
                        let result = self.promote().await;
                        let _ = reply.send(result);
                    }
                    Some(SupervisorCommand::Probe(reply)) => {
                        let result = self.probe().await;
                        let _ = reply.send(result);
                    }
                    Some(SupervisorCommand::WriteLive(writes)) => {
                        self.unwritten.push(writes);
                        // A failure is logged, kept and answered to the next flush.
                        let _ = self.unwritten.write(&self.paths).await;
                    }
                    Some(SupervisorCommand::FlushLive(reply)) => {
                        let result = self.unwritten.write(&self.paths).await;
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

    /// Starts a new process on `config` that takes the listeners over from the serving one, once
    /// the serving one answers (a hung one would hold the new one up); returns how long the new
    /// one took to serve.
    async fn reload(&mut self, config: ConfigFile) -> Result<Duration, HaproxyError> {
        if config == ConfigFile::Live {
            self.unwritten.write(&self.paths).await?;
        }
        if let Ok(Some(status)) = self.current.child.try_wait() {
            // Died before the supervisor noticed: nobody holds the listeners to hand over, and
            // `-x` would fail. The new configuration starts on its own (if it fails, the dead
            // process is replaced from the live file as usual).
            tracing::error!(
                pid = self.current.pid,
                %status,
                "haproxy died; starting the new configuration in a fresh process"
            );
            return self.start_fresh(config).await;
        }
        self.probe().await?;
        let (next, took) = match spawn_and_wait_ready(
            &self.binary,
            &self.paths,
            config,
            Some(self.current.pid),
            self.on_exit,
        )
        .await
        {
            Ok(next) => next,
            // The serving process died while the new one asked it for its sockets.
            Err(error @ HaproxyError::Start(_)) => match self.current.child.try_wait() {
                Ok(Some(status)) => {
                    tracing::error!(
                        pid = self.current.pid,
                        %status,
                        "haproxy died during the reload; starting the new configuration in a fresh process"
                    );
                    return self.start_fresh(config).await;
                }
                _ => return Err(error),
            },
            Err(error) => return Err(error),
        };
        let old = std::mem::replace(&mut self.current, next);
        reap(old);
        Ok(took)
    }

    /// Starts `config` in a new process that binds the listeners itself (nothing serves).
    async fn start_fresh(&mut self, config: ConfigFile) -> Result<Duration, HaproxyError> {
        let (next, took) =
            spawn_and_wait_ready(&self.binary, &self.paths, config, None, self.on_exit).await?;
        self.current = next;
        self.unanswered_probes = 0;
        Ok(took)
    }

    /// Renames the candidate over the live file. If the process started on the candidate is no
    /// longer the serving one (it died and was replaced from the previous live file meanwhile),
    /// the promoted file is reloaded, so HAProxy serves what the caller is told it serves.
    async fn promote(&mut self) -> Result<(), HaproxyError> {
        promote(&self.paths).await?;
        // The promoted files are whole: nothing queued before them may be written over them.
        self.unwritten = live_files::Unwritten::default();
        if self.current.config == ConfigFile::Candidate {
            return Ok(());
        }
        tracing::warn!(
            pid = self.current.pid,
            "the process started on the candidate was replaced before it was promoted; reloading"
        );
        self.reload(ConfigFile::Live).await.map(|_| ())
    }

    /// Starts a new process from the last good file after the serving one died or was killed,
    /// at once and then every second until one serves. The listeners died with the old process,
    /// so the new one binds them itself.
    async fn replace(&mut self) {
        // What the dead process ran at runtime goes to the file first (if the disk refuses it,
        // the last file written is still better than nothing serving).
        let _ = self.unwritten.write(&self.paths).await;
        loop {
            match spawn_and_wait_ready(
                &self.binary,
                &self.paths,
                ConfigFile::Live,
                None,
                self.on_exit,
            )
            .await
            {
                Ok((next, _)) => {
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
