//! The moment a new HAProxy process serves, or the reason it never will.
//!
//! A new process parses its configuration, takes the listening sockets over from the serving one
//! (`-x`; the stats socket is among them, so the socket file does not change) or binds them, and
//! then runs its event loop: from then on it answers `show info` on the stats socket with its own
//! PID. flow-proxy asks every millisecond ([`pause_after`]: past 100 ms, as for a configuration of
//! thousands of services, every 2% of the time waited so far, so that asking never costs more
//! than a sliver of the start it waits for). A process that exits is seen at once: its exit
//! status is awaited alongside the asking, not polled, and its own lines are read to their end,
//! so a configuration it refuses is reported with exactly the lines `haproxy -c` prints.

use std::path::Path;
use std::time::Duration;

use super::runtime::serving_pid;
use super::{HaproxyError, Process};

/// How long a new HAProxy process may take to serve before the start counts as failed.
pub(super) const READY_TIMEOUT: Duration = Duration::from_secs(15);

/// How long the lines a process printed before it exited may take to be read to their end.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long flow-proxy waits before asking again, `waited` after the start: 1 ms, and past
/// 100 ms 1/50 of the time waited (at most 20 ms).
pub(super) fn pause_after(waited: Duration) -> Duration {
    (waited / 50).clamp(Duration::from_millis(1), Duration::from_millis(20))
}

/// Waits until `process` answers on `stats_socket` with its own PID; returns how long that took.
///
/// If it exits first, the error carries its own lines: [`HaproxyError::Rejected`] when HAProxy
/// refused the configuration (the serving process, if any, never noticed), else
/// [`HaproxyError::Start`]. If it does not serve within [`READY_TIMEOUT`] it is killed.
pub(super) async fn wait_until_serving(
    process: &mut Process,
    stats_socket: &Path,
) -> Result<Duration, HaproxyError> {
    let started = tokio::time::Instant::now();
    let deadline = started + READY_TIMEOUT;
    loop {
        if serving_pid(stats_socket).await == Some(process.pid) {
            return Ok(started.elapsed());
        }
        if tokio::time::Instant::now() >= deadline {
            let _ = process.child.start_kill();
            let _ = process.child.wait().await;
            return Err(HaproxyError::Start(format!(
                "not serving after {READY_TIMEOUT:?}: {}",
                process.output().await
            )));
        }
        let pause = pause_after(started.elapsed());
        tokio::select! {
            status = process.child.wait() => {
                let output = process.output().await;
                return Err(match status {
                    Ok(status) if refused_configuration(&output) => {
                        tracing::debug!(pid = process.pid, %status, "haproxy refused the configuration");
                        HaproxyError::Rejected(verdict(&output))
                    }
                    Ok(status) => HaproxyError::Start(format!("{status}: {output}")),
                    Err(error) => HaproxyError::Start(format!("waiting for the process: {error}")),
                });
            }
            () = tokio::time::sleep(pause) => {}
        }
    }
}

/// Whether HAProxy's output says it refused the configuration (as `haproxy -c` would), rather
/// than failing to start with a configuration it accepted (e.g. memory for `maxconn`).
fn refused_configuration(output: &str) -> bool {
    output.contains("Fatal errors found in configuration")
        || output.contains("Error(s) found in configuration file")
}

/// HAProxy's verdict on a configuration from what it printed: its ALERT lines (the NOTICE lines
/// around them are noise), or everything when it printed none.
pub(super) fn verdict(printed: &str) -> String {
    let alerts: Vec<&str> = printed
        .lines()
        .filter(|line| line.contains("[ALERT]"))
        .collect();
    if alerts.is_empty() {
        printed.trim().to_string()
    } else {
        alerts.join("\n")
    }
}

/// Waits (bounded) until everything `process` printed has been read; used once it exited.
pub(super) async fn output_read(reader: tokio::task::JoinHandle<()>) {
    let _ = tokio::time::timeout(OUTPUT_TIMEOUT, reader).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asks_every_millisecond_then_every_fiftieth_of_the_wait() {
        assert_eq!(pause_after(Duration::ZERO), Duration::from_millis(1));
        assert_eq!(
            pause_after(Duration::from_millis(40)),
            Duration::from_millis(1)
        );
        assert_eq!(
            pause_after(Duration::from_millis(500)),
            Duration::from_millis(10)
        );
        assert_eq!(
            pause_after(Duration::from_secs(2)),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn a_refused_configuration_is_told_from_a_failed_start() {
        let refused = "[NOTICE]   (6876) : haproxy version is 2.6.12\n\
            [ALERT]    (6876) : config : parsing [bad.cfg:10] : unknown keyword 'bogus_kw' in 'frontend' section\n\
            [ALERT]    (6876) : config : Error(s) found in configuration file : bad.cfg\n\
            [ALERT]    (6876) : config : Fatal errors found in configuration.";
        assert!(refused_configuration(refused));
        assert_eq!(
            verdict(refused),
            "[ALERT]    (6876) : config : parsing [bad.cfg:10] : unknown keyword 'bogus_kw' in 'frontend' section\n\
             [ALERT]    (6876) : config : Error(s) found in configuration file : bad.cfg\n\
             [ALERT]    (6876) : config : Fatal errors found in configuration."
        );
        let failed_start =
            "[ALERT]    (7096) : Not enough memory to allocate 200000028 entries for fdtab!\n\
            [ALERT]    (7096) : No polling mechanism available.";
        assert!(!refused_configuration(failed_start));
    }
}
