//! Proxy-wide settings as checked values: HAProxy time values, the connection mode, `maxconn`,
//! the operator's extra config lines and the captured request headers.
//!
//! They come from flags (Docker Flow Proxy's environment variables) and from Consul KV
//! (`<kv-prefix>/settings/…`); whatever the source, a value reaches haproxy.cfg only through one
//! of these types, so it is one word of the grammar HAProxy expects (the extra lines are the one
//! exception: the operator's own text, one line each, checked by `haproxy -c` at start).

use std::fmt;
use std::str::FromStr;

/// Why a proxy-wide value was refused; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProxyWideError(String);

impl ProxyWideError {
    fn new(message: impl Into<String>) -> ProxyWideError {
        ProxyWideError(message.into())
    }
}

/// HAProxy refuses a time value above this many milliseconds (~24.8 days: "timer overflow").
const MAX_TIME_MS: u64 = 2_147_483_647;

/// A unit of an HAProxy time value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeUnit {
    Micros,
    Millis,
    Seconds,
    Minutes,
    Hours,
    Days,
}

impl TimeUnit {
    /// The suffix HAProxy reads.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeUnit::Micros => "us",
            TimeUnit::Millis => "ms",
            TimeUnit::Seconds => "s",
            TimeUnit::Minutes => "m",
            TimeUnit::Hours => "h",
            TimeUnit::Days => "d",
        }
    }

    fn from_suffix(suffix: &str) -> Option<TimeUnit> {
        Some(match suffix {
            "us" => TimeUnit::Micros,
            "ms" => TimeUnit::Millis,
            "s" => TimeUnit::Seconds,
            "m" => TimeUnit::Minutes,
            "h" => TimeUnit::Hours,
            "d" => TimeUnit::Days,
            _ => return None,
        })
    }

    /// Milliseconds in `amount` of this unit, rounded up (HAProxy rounds microseconds up).
    fn millis(self, amount: u64) -> u64 {
        match self {
            TimeUnit::Micros => amount.div_ceil(1000),
            TimeUnit::Millis => amount,
            TimeUnit::Seconds => amount.saturating_mul(1000),
            TimeUnit::Minutes => amount.saturating_mul(60_000),
            TimeUnit::Hours => amount.saturating_mul(3_600_000),
            TimeUnit::Days => amount.saturating_mul(86_400_000),
        }
    }
}

/// An HAProxy time value (`timeout server 30s`): a positive whole number with a unit (`us`, `ms`,
/// `s`, `m`, `h`, `d`), at most ~24.8 days. Written back with its unit, so HAProxy never reads a
/// bare number as milliseconds by surprise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HaproxyTime {
    amount: u64,
    unit: TimeUnit,
}

impl HaproxyTime {
    /// A time value from its parts (checked like a parsed one).
    pub fn new(amount: u64, unit: TimeUnit) -> Result<HaproxyTime, ProxyWideError> {
        if amount == 0 {
            return Err(ProxyWideError::new(
                "must be more than 0 (0 would turn the timeout off)",
            ));
        }
        if unit.millis(amount) > MAX_TIME_MS {
            return Err(ProxyWideError::new(
                "is longer than HAProxy allows (2147483647ms, about 24.8 days)",
            ));
        }
        Ok(HaproxyTime { amount, unit })
    }

    /// `amount` whole seconds, for the defaults written in the code: `amount` must be 1 to
    /// 2,147,483 (what [`HaproxyTime::new`] accepts in seconds).
    pub(crate) const fn whole_seconds(amount: u64) -> HaproxyTime {
        HaproxyTime {
            amount,
            unit: TimeUnit::Seconds,
        }
    }

    /// Parses an HAProxy time value with its unit (`500ms`, `30s`, `1h`).
    pub fn parse(value: &str) -> Result<HaproxyTime, ProxyWideError> {
        Self::parse_with_bare_unit(value, None)
    }

    /// Parses a time value as Docker Flow Proxy's `TIMEOUT_*` variables took it: a bare number
    /// is seconds (`20` = `20s`); with a unit it is read as HAProxy reads it.
    pub fn parse_seconds_by_default(value: &str) -> Result<HaproxyTime, ProxyWideError> {
        Self::parse_with_bare_unit(value, Some(TimeUnit::Seconds))
    }

    fn parse_with_bare_unit(
        value: &str,
        bare_unit: Option<TimeUnit>,
    ) -> Result<HaproxyTime, ProxyWideError> {
        let expected = if bare_unit.is_some() {
            "a time such as 20 (seconds), 500ms, 30s, 5m or 1h"
        } else {
            "a time with its unit, such as 500ms, 30s, 5m or 1h (us, ms, s, m, h, d)"
        };
        let digits = value.bytes().take_while(u8::is_ascii_digit).count();
        let (number, suffix) = value.split_at(digits);
        let unit = match (suffix, bare_unit) {
            ("", Some(unit)) => Some(unit),
            ("", None) => None,
            (suffix, _) => TimeUnit::from_suffix(suffix),
        };
        let (Some(unit), false) = (unit, number.is_empty() || number.len() > 12) else {
            return Err(ProxyWideError::new(format!("{value:?} is not {expected}")));
        };
        let amount: u64 = number
            .parse()
            .map_err(|_| ProxyWideError::new(format!("{value:?} is not {expected}")))?;
        HaproxyTime::new(amount, unit)
            .map_err(|error| ProxyWideError::new(format!("{value:?} {error}")))
    }

    /// The value in milliseconds (rounded up from microseconds).
    pub fn as_millis(self) -> u64 {
        self.unit.millis(self.amount)
    }
}

impl fmt::Display for HaproxyTime {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}{}", self.amount, self.unit.as_str())
    }
}

/// The time flags (`--timeout-*`) take Docker Flow Proxy's bare seconds as well as HAProxy units.
impl FromStr for HaproxyTime {
    type Err = ProxyWideError;

    fn from_str(value: &str) -> Result<HaproxyTime, ProxyWideError> {
        HaproxyTime::parse_seconds_by_default(value)
    }
}

/// The proxy-wide timeouts, by HAProxy's name (`timeout <name>`), which is also the name of
/// their KV key (`<kv-prefix>/settings/timeouts/<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TimeoutName {
    Connect,
    Client,
    Server,
    Queue,
    Tunnel,
    HttpRequest,
    HttpKeepAlive,
}

impl TimeoutName {
    /// Every timeout, in the order the `defaults` section lists them.
    pub const ALL: [TimeoutName; 7] = [
        TimeoutName::Connect,
        TimeoutName::Client,
        TimeoutName::Server,
        TimeoutName::Queue,
        TimeoutName::HttpRequest,
        TimeoutName::HttpKeepAlive,
        TimeoutName::Tunnel,
    ];

    /// HAProxy's name, e.g. `http-keep-alive`.
    pub fn as_str(self) -> &'static str {
        match self {
            TimeoutName::Connect => "connect",
            TimeoutName::Client => "client",
            TimeoutName::Server => "server",
            TimeoutName::Queue => "queue",
            TimeoutName::Tunnel => "tunnel",
            TimeoutName::HttpRequest => "http-request",
            TimeoutName::HttpKeepAlive => "http-keep-alive",
        }
    }

    /// The timeout named `name` (HAProxy's name), if it is one of them.
    pub fn from_name(name: &str) -> Option<TimeoutName> {
        TimeoutName::ALL
            .into_iter()
            .find(|timeout| timeout.as_str() == name)
    }

    /// Whether the timeout also applies to TCP services (the `tcp_defaults` section).
    pub fn applies_to_tcp(self) -> bool {
        matches!(
            self,
            TimeoutName::Connect | TimeoutName::Client | TimeoutName::Server | TimeoutName::Queue
        )
    }
}

/// How HAProxy handles HTTP connections (`option <mode>` in the HTTP `defaults`), as Docker Flow
/// Proxy's `CONNECTION_MODE`. Its `http-tunnel` and `forceclose` are gone from HAProxy 2.x and
/// refused with a hint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConnectionMode {
    /// Requests and responses are all processed; both sides stay open (HAProxy's default).
    #[default]
    HttpKeepAlive,
    /// The server-facing connection is closed after each response.
    HttpServerClose,
    /// Both connections are closed after each response.
    HttpClose,
}

impl ConnectionMode {
    /// The option's name in haproxy.cfg.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionMode::HttpKeepAlive => "http-keep-alive",
            ConnectionMode::HttpServerClose => "http-server-close",
            ConnectionMode::HttpClose => "httpclose",
        }
    }
}

impl FromStr for ConnectionMode {
    type Err = ProxyWideError;

    fn from_str(value: &str) -> Result<ConnectionMode, ProxyWideError> {
        match value {
            "http-keep-alive" => Ok(ConnectionMode::HttpKeepAlive),
            "http-server-close" => Ok(ConnectionMode::HttpServerClose),
            "httpclose" => Ok(ConnectionMode::HttpClose),
            "forceclose" => Err(ProxyWideError::new(
                "forceclose is gone since HAProxy 2.0: use httpclose",
            )),
            "http-tunnel" => Err(ProxyWideError::new(
                "http-tunnel is gone since HAProxy 2.1: use http-keep-alive",
            )),
            other => Err(ProxyWideError::new(format!(
                "{other:?} is not one of http-keep-alive, http-server-close, httpclose"
            ))),
        }
    }
}

impl fmt::Display for ConnectionMode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// The most `maxconn` flow-proxy writes; HAProxy also needs about two file descriptors per
/// connection, so a value the open-files limit cannot hold fails when HAProxy starts.
pub const MAX_MAXCONN: u32 = 10_000_000;

/// HAProxy's process-wide `maxconn` (global section): a whole number from 1 to [`MAX_MAXCONN`].
pub fn parse_maxconn(value: &str) -> Result<u32, ProxyWideError> {
    let refused = || {
        ProxyWideError::new(format!(
            "{value:?} is not a whole number from 1 to {MAX_MAXCONN}"
        ))
    };
    if value.is_empty() || !value.bytes().all(|byte| byte.is_ascii_digit()) || value.len() > 9 {
        return Err(refused());
    }
    match value.parse::<u32>() {
        Ok(maxconn) if (1..=MAX_MAXCONN).contains(&maxconn) => Ok(maxconn),
        _ => Err(refused()),
    }
}

/// Section keywords: a line starting with one would open a section of its own and swallow the
/// lines flow-proxy writes after it.
const SECTION_KEYWORDS: &[&str] = &[
    "global",
    "defaults",
    "frontend",
    "backend",
    "listen",
    "userlist",
    "peers",
    "resolvers",
    "mailers",
    "program",
    "http-errors",
    "ring",
    "cache",
    "fcgi-app",
];

/// One line of the operator's own HAProxy configuration (`--extra-global`, `--extra-frontend`):
/// one line, no control character, not opening a section. Its words are the operator's; `haproxy
/// -c` checks them when flow-proxy starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigLine(String);

impl ConfigLine {
    /// The line, trimmed.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ConfigLine {
    type Err = ProxyWideError;

    fn from_str(value: &str) -> Result<ConfigLine, ProxyWideError> {
        let line = value.trim();
        if line.is_empty() {
            return Err(ProxyWideError::new(
                "an empty line (two commas in a row, or a comma at the end?)",
            ));
        }
        if line.chars().any(char::is_control) {
            return Err(ProxyWideError::new(format!(
                "{line:?} holds a newline or another control character: give each line as its \
                 own comma-separated item"
            )));
        }
        let first = line.split_whitespace().next().unwrap_or_default();
        if SECTION_KEYWORDS.contains(&first) {
            return Err(ProxyWideError::new(format!(
                "{line:?} would open a `{first}` section of its own: only lines of the section \
                 are accepted"
            )));
        }
        Ok(ConfigLine(line.to_string()))
    }
}

/// The longest capture HAProxy is asked for, in bytes.
pub const MAX_CAPTURE_LENGTH: u32 = 65_536;

/// A request header captured for the request log (`--capture-request-header`, Docker Flow
/// Proxy's `Name:length`): `capture request header <name> len <length>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturedHeader {
    name: String,
    length: u32,
}

impl CapturedHeader {
    /// The header's name (an HTTP token).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many bytes of its value are kept.
    pub fn length(&self) -> u32 {
        self.length
    }
}

impl FromStr for CapturedHeader {
    type Err = ProxyWideError;

    fn from_str(value: &str) -> Result<CapturedHeader, ProxyWideError> {
        let value = value.trim();
        let refused = |why: &str| {
            ProxyWideError::new(format!(
                "{value:?} {why}: give `Name:length`, e.g. `Host:15` or `X-Request-Id:36`"
            ))
        };
        let Some((name, length)) = value.split_once(':') else {
            return Err(refused("has no `:length`"));
        };
        let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        // `#`, `'`, `$` and `%` are HTTP token characters but HAProxy reads them specially.
        let plain_char = |c: char| token_char(c) && !"#'$%".contains(c);
        if name.is_empty() || name.len() > 256 || !name.chars().all(plain_char) {
            return Err(refused(
                "has no header name made of letters, digits and -_.!&*+^`|~",
            ));
        }
        let digits_only = !length.is_empty() && length.bytes().all(|b| b.is_ascii_digit());
        let length = match length.parse::<u32>() {
            Ok(length) if digits_only && (1..=MAX_CAPTURE_LENGTH).contains(&length) => length,
            _ => {
                return Err(refused(&format!(
                    "has no length from 1 to {MAX_CAPTURE_LENGTH} bytes"
                )))
            }
        };
        Ok(CapturedHeader {
            name: name.to_string(),
            length,
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn time_values_keep_their_unit_and_bare_numbers_are_seconds_only_for_flags() {
        assert_eq!(HaproxyTime::parse("500ms").unwrap().to_string(), "500ms");
        assert_eq!(HaproxyTime::parse("1h").unwrap().as_millis(), 3_600_000);
        assert_eq!(HaproxyTime::parse("1500us").unwrap().as_millis(), 2);
        assert_eq!("20".parse::<HaproxyTime>().unwrap().to_string(), "20s");
        assert_eq!("24d".parse::<HaproxyTime>().unwrap().to_string(), "24d");
        let bare = HaproxyTime::parse("20").unwrap_err().to_string();
        assert!(bare.contains("unit"), "{bare}");
    }

    #[test]
    fn time_values_haproxy_would_refuse_or_misread_are_refused() {
        for value in [
            "",
            "0",
            "0s",
            "25d",
            "2147484s",
            "-1s",
            "+5s",
            "5 s",
            "5S",
            "5sec",
            "1.5s",
            "s",
            "5s\n",
            "5s#",
            "99999999999999s",
        ] {
            assert!(
                value.parse::<HaproxyTime>().is_err() && HaproxyTime::parse(value).is_err(),
                "{value:?} must be refused"
            );
        }
        assert!(HaproxyTime::parse("2147483647ms").is_ok());
        assert!(HaproxyTime::parse("2147483648ms").is_err());
    }

    #[test]
    fn connection_modes_are_haproxy_2s_and_the_gone_ones_say_what_to_use() {
        assert_eq!(
            "http-server-close".parse::<ConnectionMode>().unwrap(),
            ConnectionMode::HttpServerClose
        );
        assert_eq!(
            "httpclose".parse::<ConnectionMode>().unwrap().as_str(),
            "httpclose"
        );
        let gone = "forceclose".parse::<ConnectionMode>().unwrap_err();
        assert!(gone.to_string().contains("use httpclose"), "{gone}");
        let gone = "http-tunnel".parse::<ConnectionMode>().unwrap_err();
        assert!(gone.to_string().contains("http-keep-alive"), "{gone}");
        assert!("keep-alive".parse::<ConnectionMode>().is_err());
    }

    #[test]
    fn maxconn_is_a_plain_positive_number_within_bounds() {
        assert_eq!(parse_maxconn("4096"), Ok(4096));
        assert_eq!(parse_maxconn("10000000"), Ok(MAX_MAXCONN));
        for value in ["0", "", "+5", "-5", "10000001", "1e3", "5 ", "4096\nglobal"] {
            assert!(parse_maxconn(value).is_err(), "{value:?} must be refused");
        }
    }

    #[test]
    fn extra_lines_are_one_line_each_and_never_open_a_section() {
        let line: ConfigLine = "  tune.bufsize 32768 ".parse().unwrap();
        assert_eq!(line.as_str(), "tune.bufsize 32768");
        for value in [
            "",
            "   ",
            "tune.bufsize 1\nbackend evil",
            "a\rb",
            "x\0",
            "backend evil",
            "frontend   f",
            "listen x",
            "global",
        ] {
            assert!(
                value.parse::<ConfigLine>().is_err(),
                "{value:?} must be refused"
            );
        }
    }

    #[test]
    fn captured_headers_are_dfps_name_and_length() {
        let header: CapturedHeader = "X-Request-Id:36".parse().unwrap();
        assert_eq!((header.name(), header.length()), ("X-Request-Id", 36));
        for value in [
            "Host",
            "Host:",
            ":15",
            "Host:0",
            "Host:+5",
            "Host:65537",
            "Ho st:15",
            "Host#:15",
            "Host%[src]:15",
            "Host:15:16",
            "Hos\nt:15",
        ] {
            let error = value.parse::<CapturedHeader>().unwrap_err().to_string();
            assert!(error.contains("Name:length"), "{value:?}: {error}");
        }
    }

    proptest! {
        /// Whatever is accepted is written as one plain word: no space, quote, `#`, brace or
        /// control character can reach haproxy.cfg through a time, a maxconn or a capture.
        #[test]
        fn accepted_values_are_single_plain_words(value in "\\PC{0,24}") {
            let plain = |text: &str| {
                !text.is_empty()
                    && text
                        .chars()
                        .all(|c| c.is_ascii_graphic() && !"\"'#{}\\$%".contains(c))
            };
            if let Ok(time) = value.parse::<HaproxyTime>() {
                prop_assert!(plain(&time.to_string()));
            }
            if let Ok(time) = HaproxyTime::parse(&value) {
                prop_assert!(plain(&time.to_string()));
            }
            if let Ok(maxconn) = parse_maxconn(&value) {
                prop_assert!(plain(&maxconn.to_string()));
            }
            if let Ok(header) = value.parse::<CapturedHeader>() {
                prop_assert!(plain(header.name()));
            }
            if let Ok(line) = value.parse::<ConfigLine>() {
                prop_assert!(!line.as_str().chars().any(char::is_control));
            }
        }
    }
}
