//! What HAProxy prints on its standard error, and at which level flow-proxy logs each line.
//! HAProxy marks most of its lines `[WARNING]`, including the ones that only report what
//! flow-proxy itself asked over the Runtime API (a server slot entering or leaving maintenance,
//! an address set by `set server … addr`): those are routine and logged at INFO. Everything
//! else keeps its weight: `[ALERT]` is an error, a server going DOWN on a failed health check or
//! a configuration warning stays a warning.

/// The level one line of HAProxy's output is logged at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum OutputLevel {
    Error,
    Warn,
    Info,
    Debug,
}

/// How HAProxy 2.6 reports a server's maintenance changed on command (flow-proxy's `set server
/// … state maint|ready`): `Server pool-1/s1 is going DOWN for maintenance. 2 active …`,
/// `Server b/s2 was DOWN and now enters maintenance.`, `Server web-be0/s2 is UP/READY (leaving
/// forced maintenance).`. A maintenance HAProxy enters by itself carries its cause in
/// parentheses before the period (`… for maintenance (No IP for server ). …`, `(DNS NX
/// status)`), so it does not match.
const COMMANDED_MAINTENANCE: [&str; 2] =
    ["is going DOWN for maintenance.", "now enters maintenance."];

/// A server leaving maintenance says `(leaving maintenance)` or `(leaving forced
/// maintenance)`, after the state it is in.
const LEAVING_MAINTENANCE: (&str, &str) = ("(leaving ", "maintenance)");

/// How HAProxy words an address or port set over the stats socket.
const COMMANDED_ADDRESS: &str = "by 'stats socket command'";

/// The level `line` (one line of HAProxy's standard error) is logged at.
pub(super) fn output_level(line: &str) -> OutputLevel {
    if line.contains("[ALERT]") {
        return OutputLevel::Error;
    }
    if line.contains("stopped (cumulated conns") {
        // Every soft-stop after a reload says this for each proxy: routine.
        return OutputLevel::Debug;
    }
    if commanded(line) {
        return OutputLevel::Info;
    }
    OutputLevel::Warn
}

/// Whether a line reports only what a Runtime API command did: an address set over the stats
/// socket, a server entering maintenance without a cause of HAProxy's own, or one leaving it
/// up (one that leaves it DOWN is failing its health checks: a warning).
fn commanded(line: &str) -> bool {
    if line.contains(COMMANDED_ADDRESS) {
        return true;
    }
    if !line.contains("Server ") {
        return false;
    }
    let (leaving, maintenance) = LEAVING_MAINTENANCE;
    let entering = COMMANDED_MAINTENANCE
        .iter()
        .any(|words| line.contains(words));
    let leaving_up =
        line.contains(leaving) && line.contains(maintenance) && !line.contains(" is DOWN");
    entering || leaving_up
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The lines marked "seen" are what HAProxy 2.6.12 printed here for `set server … state
    /// maint|ready`, `set server … addr` (its answer on the socket) and a failing health check;
    /// the others follow the same wording with the causes HAProxy gives its own state changes.
    #[test]
    fn what_flow_proxys_own_commands_cause_is_info_and_real_trouble_stays_a_warning() {
        for line in [
            // seen
            "[WARNING]  (9917) : Server pool-1/s1 is UP/READY (leaving forced maintenance).",
            // seen
            "[WARNING]  (9917) : Server web-be0/s3 is going DOWN for maintenance. 2 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.",
            // seen
            "[WARNING]  (10392) : Server b/s2 was DOWN and now enters maintenance.",
            // seen (the stats socket's answer to `set server b/s3 addr 127.0.0.2 port 8`)
            "IP changed from '127.0.0.1' to '127.0.0.2', port changed from '46891' to '8' by 'stats socket command'",
            "[WARNING]  (1) : Server b/s2 is UP (leaving maintenance).",
        ] {
            assert_eq!(output_level(line), OutputLevel::Info, "{line}");
        }
        for line in [
            // seen
            "[WARNING]  (9917) : Server b/s1 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms. 1 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.",
            // seen
            "[WARNING]  (9917) : Server b/s1 is UP, reason: Layer4 check passed, check duration: 0ms. 2 active and 0 backup servers online. 0 sessions requeued, 0 total in queue.",
            // seen (not a command flow-proxy sends)
            "[WARNING]  (9917) : Server b/s2 enters drain state. 2 active and 0 backup servers online. 0 sessions requeued, 0 total in queue.",
            "[WARNING]  (1) : Server b/s2 is DOWN (leaving forced maintenance).",
            "[WARNING]  (8) : Server app/web-3 is going DOWN for maintenance (No IP for server ). 4 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.",
            "[WARNING]  (1) : Server b/s2 is going DOWN for maintenance (DNS NX status). 0 active and 0 backup servers left. 0 sessions active, 0 requeued, 0 remaining in queue.",
            "[WARNING]  (1) : config : parsing [haproxy.cfg:12] : a 'http-request' rule placed after a 'use_backend' rule will still be processed before.",
        ] {
            assert_eq!(output_level(line), OutputLevel::Warn, "{line}");
        }
        assert_eq!(
            output_level("[ALERT]    (1) : config : parsing [h.cfg:9] : 'bind' : invalid port '0'"),
            OutputLevel::Error
        );
        assert_eq!(
            output_level("[WARNING]  (1) : Proxy web-be0 stopped (cumulated conns: FE: 0, BE: 4)."),
            OutputLevel::Debug
        );
    }
}
