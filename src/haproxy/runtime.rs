//! HAProxy's Runtime API over the stats socket: the few commands flow-proxy sends, each bounded
//! in time. A stopped (SIGSTOP) or hung HAProxy still accepts the connection (the kernel does)
//! but never answers, so without the bound a caller would wait forever.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
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
    bounded(command, exchange).await
}

/// One connection to the stats socket in interactive mode (`prompt`): a series of commands is
/// written at once and each answer read up to HAProxy's prompt, so the series costs one
/// connection and one round trip. Each exchange is bounded by [`COMMAND_TIMEOUT`].
pub struct Session {
    stream: UnixStream,
    answer: Vec<u8>,
}

/// What HAProxy writes after each answer in interactive mode.
const PROMPT: &[u8] = b"\n> ";

/// Slot commands sent in one write (each line under 100 bytes).
const PIPELINED_COMMANDS: usize = 32;

impl Session {
    /// Connects, enters interactive mode and runs `commands` (as [`Session::run_all`]) in the
    /// same round trip: HAProxy reads the lines after `prompt` in interactive mode.
    pub async fn open_running(
        socket: &Path,
        commands: &[String],
    ) -> std::io::Result<(Session, Vec<String>)> {
        let opened = async {
            let stream = UnixStream::connect(socket).await?;
            let mut session = Session {
                stream,
                answer: Vec::new(),
            };
            let mut series = Vec::with_capacity(commands.len() + 1);
            series.push("prompt".to_string());
            series.extend_from_slice(commands);
            let mut answers = session.exchange_all(&series).await?;
            answers.remove(0);
            Ok((session, answers))
        };
        bounded("prompt", opened).await
    }

    /// Sends `commands` at once and returns their answers in order (HAProxy runs the lines of
    /// its input one after the other, each answer followed by the prompt), so a series costs one
    /// round trip. The whole series is bounded by [`COMMAND_TIMEOUT`].
    pub async fn run_all(&mut self, commands: &[String]) -> std::io::Result<Vec<String>> {
        let described = commands.first().map_or("", String::as_str);
        bounded(described, self.exchange_all(commands)).await
    }

    async fn exchange_all(&mut self, commands: &[String]) -> std::io::Result<Vec<String>> {
        let mut input = String::new();
        for command in commands {
            input.push_str(command);
            input.push('\n');
        }
        self.stream.write_all(input.as_bytes()).await?;
        self.answer.clear();
        let mut answers = Vec::with_capacity(commands.len());
        let mut chunk = [0u8; 4096];
        let mut scanned = 0;
        while answers.len() < commands.len() {
            if let Some(at) = memchr::memmem::find(&self.answer[scanned..], PROMPT) {
                let end = scanned + at;
                answers.push(String::from_utf8_lossy(&self.answer[scanned..=end]).into_owned());
                scanned = end + PROMPT.len();
                continue;
            }
            let read = self.stream.read(&mut chunk).await?;
            if read == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "HAProxy closed the stats socket",
                ));
            }
            self.answer.extend_from_slice(&chunk[..read]);
        }
        Ok(answers)
    }
}

/// `exchange` bounded by [`COMMAND_TIMEOUT`], its error naming `command`.
async fn bounded<T>(
    command: &str,
    exchange: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
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

// ---- Server slots changed at runtime ---------------------------------------------------------

/// What becomes of one server slot (`server s<n> …` in a backend) at runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotChange {
    /// The backend holding the slot.
    pub backend: String,
    /// The slot's server name (`s<n>`).
    pub server: String,
    /// The instance the slot now sends traffic to; `None`: the slot is emptied (maintenance).
    pub target: Option<SocketAddr>,
    /// Whether the slot's server line has `check` (then its health check is enabled).
    pub check: bool,
}

impl SlotChange {
    /// The Runtime API commands that make the serving process hold this slot as the new file
    /// says. An emptied slot goes to maintenance: HAProxy sends it no new request, and the
    /// connections it has finish normally.
    pub fn commands(&self) -> Vec<String> {
        let server = format!("{}/{}", self.backend, self.server);
        match self.target {
            Some(target) => {
                let mut commands = vec![format!(
                    "set server {server} addr {} port {}",
                    target.ip(),
                    target.port()
                )];
                if self.check {
                    commands.push(format!("enable health {server}"));
                }
                commands.push(format!("set server {server} state ready"));
                commands
            }
            None => vec![format!("set server {server} state maint")],
        }
    }
}

/// One `server` line, split into what the Runtime API can change and what it cannot.
struct ServerLine<'a> {
    name: &'a str,
    address: &'a str,
    disabled: bool,
    /// Every other word, in order (`check`, `ssl`, `verify none`, `cookie <value>`, …).
    rest: Vec<&'a str>,
}

fn server_line(line: &str) -> Option<ServerLine<'_>> {
    let mut words = line.split_whitespace();
    if words.next() != Some("server") {
        return None;
    }
    let name = words.next()?;
    let address = words.next()?;
    let mut disabled = false;
    let mut rest = Vec::new();
    for word in words {
        if word == "disabled" {
            disabled = true;
        } else {
            rest.push(word);
        }
    }
    Some(ServerLine {
        name,
        address,
        disabled,
        rest,
    })
}

/// Whether a server name is a slot's (`s<n>`), not an `outboundHostname` server's.
fn is_slot_name(name: &str) -> bool {
    name.strip_prefix('s')
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// The slot changes that turn the configuration `applied` into `candidate` at runtime, or
/// `None` when anything else differs (a line added, removed or changed that is not a slot's
/// address or `disabled` flag, or an instance that is not an IP address): then only a reload
/// applies it. Empty when the two are the same.
///
/// The slots being filled come first, the ones being emptied last, so a backend whose every
/// instance is replaced (a blue-green switch) never has none.
pub fn slot_changes(applied: &str, candidate: &str) -> Option<Vec<SlotChange>> {
    let mut filled = Vec::new();
    let mut emptied = Vec::new();
    let mut backend: Option<&str> = None;
    let mut old_lines = applied.lines();
    let mut new_lines = candidate.lines();
    loop {
        let (old, new) = match (old_lines.next(), new_lines.next()) {
            (None, None) => break,
            (Some(old), Some(new)) => (old, new),
            _ => return None,
        };
        if let Some(name) = new.strip_prefix("backend ") {
            backend = Some(name.trim());
        } else if !new.starts_with(' ') && !new.is_empty() {
            backend = None;
        }
        if old == new {
            continue;
        }
        let (Some(backend), Some(old), Some(new)) = (backend, server_line(old), server_line(new))
        else {
            return None;
        };
        if old.name != new.name || !is_slot_name(new.name) || old.rest != new.rest {
            return None;
        }
        let change = SlotChange {
            backend: backend.to_string(),
            server: new.name.to_string(),
            target: None,
            check: new.rest.contains(&"check"),
        };
        if new.disabled {
            emptied.push(change);
        } else {
            if new.address == crate::render::SPARE_ADDRESS {
                // A spare slot written without `disabled` (a custom template): not a slot to
                // fill at runtime.
                return None;
            }
            let target: SocketAddr = new.address.parse().ok()?;
            filled.push(SlotChange {
                target: Some(target),
                ..change
            });
        }
    }
    filled.extend(emptied);
    Some(filled)
}

/// A slot change HAProxy did not take.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The stats socket could not be reached or did not answer in time.
    #[error("`{command}` on the stats socket: {source}")]
    Socket {
        command: String,
        source: std::io::Error,
    },
    /// HAProxy answered with an error.
    #[error("`{command}` was refused by HAProxy: {answer}")]
    Refused { command: String, answer: String },
    /// The live file could not be written.
    #[error(transparent)]
    File(#[from] super::HaproxyError),
}

/// Whether `answer` is HAProxy's success answer to `command`: `set server … addr` says what it
/// changed (or that nothing needed to), the others answer nothing.
fn succeeded(command: &str, answer: &str) -> bool {
    let answer = answer.trim();
    if command.contains(" addr ") {
        answer.contains("changed") || answer.contains("no need to change")
    } else {
        answer.is_empty()
    }
}

impl super::Haproxy {
    /// Applies `changes` to the serving process over the Runtime API, then `more_commands` (map
    /// entries, which answer nothing when they succeed) in the same session, after queuing
    /// `config` (the configuration they lead to) as the live file's next text and `more_writes`
    /// (the map files) with it, without a reload: a process started from the files later (a
    /// reload, or a replacement of a dead one) holds the same servers and entries, since the
    /// supervisor writes queued files before it starts one (see `live_files`). Stops at the first
    /// command HAProxy does not take; the caller then reloads from the files.
    pub async fn apply_slot_changes(
        &self,
        config: &Arc<String>,
        changes: &[SlotChange],
        more_writes: Vec<super::LiveWrite>,
        more_commands: &[String],
    ) -> Result<(), RuntimeError> {
        let mut writes = Vec::with_capacity(1 + more_writes.len());
        writes.push(super::LiveWrite::Config(Arc::clone(config)));
        writes.extend(more_writes);
        self.write_live_later(writes).await?;
        let commands: Vec<String> = changes
            .iter()
            .flat_map(SlotChange::commands)
            .chain(more_commands.iter().cloned())
            .collect();
        let mut session = None;
        // A few dozen lines at a time, well inside HAProxy's input buffer; the first series
        // goes with the `prompt` that opens the session.
        for series in commands.chunks(PIPELINED_COMMANDS) {
            let ran = match &mut session {
                None => Session::open_running(self.stats_socket(), series)
                    .await
                    .map(|(opened, answers)| {
                        session = Some(opened);
                        answers
                    }),
                Some(session) => session.run_all(series).await,
            };
            let answers = ran.map_err(|source| RuntimeError::Socket {
                command: series.join("; "),
                source,
            })?;
            for (command, answer) in series.iter().zip(answers) {
                if !succeeded(command, &answer) {
                    return Err(RuntimeError::Refused {
                        command: command.clone(),
                        answer: answer.trim().to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(servers: &[&str]) -> String {
        let mut text =
            String::from("frontend http\n    bind *:80\n\nbackend web-be0\n    mode http\n");
        for server in servers {
            text.push_str(&format!("    server {server}\n"));
        }
        text.push_str("\nbackend other-be0\n    mode http\n");
        text
    }

    #[test]
    fn a_spare_slot_filled_becomes_addr_health_and_ready() {
        let applied = backend(&["s1 10.0.0.1:80 check", "s2 127.0.0.1:1 check disabled"]);
        let candidate = backend(&["s1 10.0.0.1:80 check", "s2 10.0.0.2:8080 check"]);
        let changes = slot_changes(&applied, &candidate).expect("a runtime change");
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].commands(),
            [
                "set server web-be0/s2 addr 10.0.0.2 port 8080",
                "enable health web-be0/s2",
                "set server web-be0/s2 state ready",
            ]
        );
    }

    #[test]
    fn slots_are_filled_before_others_are_emptied_and_unchecked_ones_get_no_health_command() {
        let applied = backend(&["s1 10.0.0.1:80", "s2 127.0.0.1:1 disabled"]);
        let candidate = backend(&["s1 127.0.0.1:1 disabled", "s2 [fd00::5]:80"]);
        let commands: Vec<String> = slot_changes(&applied, &candidate)
            .expect("a runtime change")
            .iter()
            .flat_map(SlotChange::commands)
            .collect();
        assert_eq!(
            commands,
            [
                "set server web-be0/s2 addr fd00::5 port 80",
                "set server web-be0/s2 state ready",
                "set server web-be0/s1 state maint",
            ]
        );
    }

    #[test]
    fn haproxy_answers_are_told_apart_from_its_refusals() {
        let addr = "set server web-be0/s2 addr 10.0.0.2 port 80";
        assert!(succeeded(
            addr,
            "IP changed from '127.0.0.1' to '10.0.0.2', port changed from '1' to '80' by 'stats socket command'\n"
        ));
        assert!(succeeded(
            addr,
            "no need to change the addr, port changed from '1' to '80' by 'stats socket command'\n"
        ));
        assert!(!succeeded(addr, "No such backend.\n"));
        let state = "set server web-be0/s2 state ready";
        assert!(succeeded(state, "\n"));
        assert!(!succeeded(state, "No such server.\n"));
        assert!(!succeeded(
            "enable health web-be0/s2",
            "Health checks are not configured on this server, cannot enable.\n"
        ));
    }

    #[test]
    fn the_same_file_needs_no_change() {
        let config = backend(&["s1 10.0.0.1:80 check"]);
        assert_eq!(slot_changes(&config, &config), Some(Vec::new()));
    }

    #[test]
    fn anything_but_slot_contents_needs_a_reload() {
        let applied = backend(&["s1 10.0.0.1:80 check", "s2 127.0.0.1:1 check disabled"]);
        let refused = [
            // A slot added (the backend grew).
            backend(&[
                "s1 10.0.0.1:80 check",
                "s2 127.0.0.1:1 check disabled",
                "s3 10.0.0.3:80 check",
            ]),
            // Health checks changed (skipCheck).
            backend(&["s1 10.0.0.1:80", "s2 127.0.0.1:1 disabled"]),
            // A hostname: `set server addr` takes IP addresses only.
            backend(&["s1 10.0.0.1:80 check", "s2 app.internal:80 check"]),
            // A spare slot written without `disabled` (a custom template).
            backend(&["s1 127.0.0.1:1 check", "s2 127.0.0.1:1 check disabled"]),
            // Another line.
            applied.replace("mode http", "mode tcp"),
        ];
        for candidate in refused {
            assert_eq!(slot_changes(&applied, &candidate), None, "{candidate}");
        }
        // An outbound server (not a slot) whose address changes.
        let outbound = backend(&["example.com_443 10.0.0.1:443 check"]);
        let moved = backend(&["example.com_443 10.0.0.2:443 check"]);
        assert_eq!(slot_changes(&outbound, &moved), None);
    }
}
