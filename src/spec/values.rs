//! Validated value types: each holds only text that matched a strict pattern when it was built.
//!
//! These are the only way a user's value reaches haproxy.cfg, so every constructor rejects
//! whatever could end a word or a line in HAProxy's configuration language (whitespace, `#`,
//! quotes, backslashes, control characters) and anything outside the value's own grammar.
//! Each constructor takes the parameter name so the error names exactly what the user wrote.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::SpecError;

/// Longest service name accepted (it also names the KV key and HAProxy's backends).
pub const MAX_SERVICE_NAME_LEN: usize = 64;
/// Longest service color accepted.
pub const MAX_SERVICE_COLOR_LEN: usize = 32;
/// Longest `aclName` accepted.
pub const MAX_ACL_NAME_LEN: usize = 64;
/// Longest path (or path pattern) accepted, in characters.
pub const MAX_PATH_LEN: usize = 512;
/// Longest domain accepted, not counting a leading `*` or `*.` (the DNS limit).
pub const MAX_DOMAIN_LEN: usize = 253;
/// Longest label of a domain (between dots), the DNS limit.
pub const MAX_DOMAIN_LABEL_LEN: usize = 63;

/// HAProxy 2.6 reads at most this many words on one configuration line (`MAX_LINE_ARGS`); a
/// longer line is refused with "too many words".
pub const HAPROXY_MAX_WORDS_PER_LINE: usize = 64;

/// Most paths one destination may list. All its paths are the patterns of one `acl` line,
/// `acl <name> <fetch> <path>…` (3 words before the paths), so HAProxy's 64 words would allow
/// 61; 50 is a round number that keeps room for a flag (`-i`, `-m`) in that line.
pub const MAX_PATHS_PER_DESTINATION: usize = 50;
/// Most domains one destination may list. They are the patterns of at most two `acl` lines,
/// `acl <name> req.hdr(host),field(1,:) -m str -i <domain>…` (6 words before the domains), so
/// HAProxy's 64 words would allow 58; 50 keeps room, as for paths.
pub const MAX_DOMAINS_PER_DESTINATION: usize = 50;

// Every list line must fit HAProxy's line, with the words its template puts before the list.
const _: () = assert!(3 + MAX_PATHS_PER_DESTINATION <= HAPROXY_MAX_WORDS_PER_LINE);
const _: () = assert!(6 + MAX_DOMAINS_PER_DESTINATION <= HAPROXY_MAX_WORDS_PER_LINE);

/// Builds a [`SpecError`] for `parameter`.
pub(crate) fn spec_error(parameter: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        parameter: parameter.to_string(),
        message: message.into(),
    }
}

/// Shows a rejected value in an error message: escaped (so it cannot break a log line or an
/// answer) and shortened when long.
pub(crate) fn shown(value: &str) -> String {
    const SHOWN: usize = 40;
    if value.chars().count() > SHOWN {
        let head: String = value.chars().take(SHOWN).collect();
        format!("{head:?}…")
    } else {
        format!("{value:?}")
    }
}

/// Names a rejected character in words a user recognises.
fn describe(c: char) -> String {
    match c {
        '\n' => "a newline".into(),
        '\r' => "a carriage return".into(),
        '\t' => "a tab".into(),
        ' ' => "a space".into(),
        '#' => "`#`".into(),
        '"' | '\'' | '`' => "a quote".into(),
        '\\' => "a backslash".into(),
        c if c.is_control() => format!("control character U+{:04X}", u32::from(c)),
        // Never the raw character: it may be a line separator, an invisible or a
        // right-to-left mark, which would garble the message or a log line.
        c if !c.is_ascii() => format!("character U+{:04X}", u32::from(c)),
        c => format!("`{c}`"),
    }
}

/// Checks `value` against a simple grammar: non-empty, at most `max` characters, the first
/// character passing `first` and the others passing `rest`.
pub(crate) fn check_chars(
    parameter: &str,
    value: &str,
    max: usize,
    what: &str,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
) -> Result<(), SpecError> {
    check_part(parameter, value, value, max, what, first, rest)
}

/// Like [`check_chars`] for `part` of the value the user `wrote`, which errors show.
fn check_part(
    parameter: &str,
    wrote: &str,
    part: &str,
    max: usize,
    what: &str,
    first: impl Fn(char) -> bool,
    rest: impl Fn(char) -> bool,
) -> Result<(), SpecError> {
    if part.is_empty() {
        return Err(spec_error(parameter, format!("{what} must not be empty")));
    }
    let length = part.chars().count();
    if length > max {
        return Err(spec_error(
            parameter,
            format!(
                "{} is too long: {length} characters, at most {max}",
                shown(wrote)
            ),
        ));
    }
    for (position, c) in part.chars().enumerate() {
        let allowed = if position == 0 { first(c) } else { rest(c) };
        if !allowed {
            return Err(spec_error(
                parameter,
                format!(
                    "{} contains {}, not allowed in {what}",
                    shown(wrote),
                    describe(c)
                ),
            ));
        }
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

/// A validated service name (`[A-Za-z0-9][A-Za-z0-9_.-]*`, at most [`MAX_SERVICE_NAME_LEN`]
/// characters).
///
/// It names the Consul service, the KV key and HAProxy's backends, so it must be a valid
/// HAProxy proxy name and safe in a URL path.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceName(String);

impl ServiceName {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<ServiceName, SpecError> {
        check_chars(
            parameter,
            value,
            MAX_SERVICE_NAME_LEN,
            "a service name",
            |c| c.is_ascii_alphanumeric(),
            is_name_char,
        )?;
        Ok(ServiceName(value.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for ServiceName {
    type Error = SpecError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        ServiceName::parse("serviceName", &value)
    }
}

impl From<ServiceName> for String {
    fn from(name: ServiceName) -> String {
        name.0
    }
}

/// A blue-green color (`[A-Za-z0-9_-]`, at most [`MAX_SERVICE_COLOR_LEN`] characters): the Consul service read is
/// `<serviceName>-<color>`, so switching colors switches instances without touching routing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceColor(String);

impl ServiceColor {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<ServiceColor, SpecError> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
        check_chars(
            parameter,
            value,
            MAX_SERVICE_COLOR_LEN,
            "a service color",
            allowed,
            allowed,
        )?;
        Ok(ServiceColor(value.to_string()))
    }

    /// The color as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The key that orders a service's rules among equally specific ones (`[A-Za-z0-9_.-]`, at
/// most [`MAX_ACL_NAME_LEN`] characters), as Docker Flow Proxy's `aclName`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AclName(String);

impl AclName {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<AclName, SpecError> {
        check_chars(
            parameter,
            value,
            MAX_ACL_NAME_LEN,
            "an ACL name",
            is_name_char,
            is_name_char,
        )?;
        Ok(AclName(value.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// How a destination's paths are matched: the HAProxy sample fetch used in its `acl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum PathType {
    /// `path`: the whole path equals the pattern.
    Path,
    /// `path_beg`: the path begins with the pattern (the default, as in Docker Flow Proxy).
    #[default]
    PathBeg,
    /// `path_dir`: one of the path's `/`-delimited parts is the pattern.
    PathDir,
    /// `path_end`: the path ends with the pattern.
    PathEnd,
    /// `path_reg`: the path matches the pattern as a regular expression.
    PathReg,
    /// `path_sub`: the path contains the pattern.
    PathSub,
}

impl PathType {
    const ALL: [PathType; 6] = [
        PathType::Path,
        PathType::PathBeg,
        PathType::PathDir,
        PathType::PathEnd,
        PathType::PathReg,
        PathType::PathSub,
    ];

    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<PathType, SpecError> {
        PathType::ALL
            .into_iter()
            .find(|t| t.as_str() == value)
            .ok_or_else(|| {
                spec_error(
                    parameter,
                    format!(
                        "{} is not a path type; use one of path, path_beg, path_dir, path_end, path_reg, path_sub",
                        shown(value)
                    ),
                )
            })
    }

    /// The HAProxy fetch name, which is also the parameter value.
    pub fn as_str(self) -> &'static str {
        match self {
            PathType::Path => "path",
            PathType::PathBeg => "path_beg",
            PathType::PathDir => "path_dir",
            PathType::PathEnd => "path_end",
            PathType::PathReg => "path_reg",
            PathType::PathSub => "path_sub",
        }
    }

    /// Whether patterns of this type are prefixes/exact paths that must start with `/`.
    fn needs_leading_slash(self) -> bool {
        matches!(self, PathType::Path | PathType::PathBeg | PathType::PathDir)
    }
}

impl fmt::Display for PathType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Characters allowed in a literal path pattern: RFC 3986 path characters without the quote,
/// the comma (our list separator) and `$` (HAProxy's variable sign).
pub(crate) fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '/' | '-'
                | '.'
                | '_'
                | '~'
                | '!'
                | '&'
                | '('
                | ')'
                | '*'
                | '+'
                | ';'
                | '='
                | ':'
                | '@'
                | '%'
        )
}

/// Characters allowed in a `path_reg` pattern: path characters plus regex metacharacters, still
/// without whitespace, `#`, quotes or backslashes.
fn is_regex_char(c: char) -> bool {
    is_path_char(c) || matches!(c, '^' | '$' | '[' | ']' | '{' | '}' | '|' | '?')
}

/// One validated path pattern of a destination, checked against its [`PathType`].
///
/// `path`, `path_beg` and `path_dir` patterns start with `/`; `path_end`, `path_sub` and
/// `path_reg` patterns need not, but none may start with `-` (HAProxy would read it as a flag).
/// A `path_reg` pattern's regex syntax itself is checked by `haproxy -c`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePath(String);

impl ServicePath {
    /// Validates `value` given as `parameter`, for matching with `path_type`.
    pub fn parse(
        parameter: &str,
        value: &str,
        path_type: PathType,
    ) -> Result<ServicePath, SpecError> {
        let (what, allowed): (&str, fn(char) -> bool) = if path_type == PathType::PathReg {
            ("a path_reg pattern", is_regex_char)
        } else {
            ("a path", is_path_char)
        };
        check_chars(parameter, value, MAX_PATH_LEN, what, allowed, allowed)?;
        if path_type.needs_leading_slash() && !value.starts_with('/') {
            return Err(spec_error(
                parameter,
                format!(
                    "{} must start with `/` (pathType {path_type})",
                    shown(value)
                ),
            ));
        }
        if value.starts_with('-') {
            return Err(spec_error(
                parameter,
                format!("{} must not start with `-`", shown(value)),
            ));
        }
        // HAProxy takes a pattern starting with `(` for a misplaced parenthesis and warns.
        if value.starts_with('(') {
            return Err(spec_error(
                parameter,
                format!(
                    "{} must not start with `(` (HAProxy reads it as a misplaced parenthesis; for a regex, start with `.*(` or `^(`)",
                    shown(value)
                ),
            ));
        }
        Ok(ServicePath(value.to_string()))
    }

    /// The pattern as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated domain: DNS labels (lowercased), optionally led by `*` to match the end of the
/// request's host (`*.example.com` matches `api.example.com`; `*example.com` also matches
/// `myexample.com`, as in Docker Flow Proxy).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Domain {
    /// The text after the optional `*`, lowercased.
    suffix: String,
    /// Whether the domain started with `*`.
    wildcard: bool,
}

impl Domain {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<Domain, SpecError> {
        let (wildcard, rest) = match value.strip_prefix('*') {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        // `*.example.com`: the dot belongs to the matched suffix, the labels follow it.
        let labels = if wildcard {
            rest.strip_prefix('.').unwrap_or(rest)
        } else {
            rest
        };
        // The DNS limit applies to the labels, after any leading `*` or `*.`.
        let is_label_char = |c: char| c.is_ascii_alphanumeric() || c == '-';
        check_part(
            parameter,
            value,
            labels,
            MAX_DOMAIN_LEN,
            "a domain",
            is_label_char,
            |c| is_label_char(c) || c == '.',
        )?;
        for label in labels.split('.') {
            if label.is_empty() || label.len() > MAX_DOMAIN_LABEL_LEN {
                return Err(spec_error(
                    parameter,
                    format!(
                        "{} has an empty or over-long label (1 to {MAX_DOMAIN_LABEL_LEN} characters between dots)",
                        shown(value)
                    ),
                ));
            }
            if label.starts_with('-') || label.ends_with('-') {
                return Err(spec_error(
                    parameter,
                    format!("{} has a label starting or ending with `-`", shown(value)),
                ));
            }
        }
        Ok(Domain {
            suffix: rest.to_ascii_lowercase(),
            wildcard,
        })
    }

    /// Whether this domain matches the end of the host rather than the whole host.
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// The host (exact domain) or the host's required ending (wildcard), without the `*`.
    pub fn host_pattern(&self) -> &str {
        &self.suffix
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*")?;
        }
        f.write_str(&self.suffix)
    }
}

/// A TCP port, 1–65535.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port(u16);

impl Port {
    /// Validates a port given as text (a query parameter).
    pub fn parse(parameter: &str, value: &str) -> Result<Port, SpecError> {
        if value.is_empty() || value.len() > 5 || !value.bytes().all(|b| b.is_ascii_digit()) {
            return Err(spec_error(
                parameter,
                format!("{} is not a port number (1 to 65535)", shown(value)),
            ));
        }
        let number: u32 = value.parse().map_err(|_| {
            spec_error(
                parameter,
                format!("{} is not a port number (1 to 65535)", shown(value)),
            )
        })?;
        Port::from_number(parameter, number)
    }

    /// Validates a port given as a number (a stored spec, an instance).
    pub fn from_number(parameter: &str, number: u32) -> Result<Port, SpecError> {
        match u16::try_from(number) {
            Ok(port) if port != 0 => Ok(Port(port)),
            _ => Err(spec_error(
                parameter,
                format!("{number} is not a port number (1 to 65535)"),
            )),
        }
    }

    /// The port number.
    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Whether a destination is routed as HTTP (by path and domain), as plain TCP (by port) or as
/// TLS passed through by the name the client asks for (SNI).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum ReqMode {
    /// Routed by `acl`s in an HTTP frontend (the default).
    #[default]
    Http,
    /// A TCP frontend on the destination's `srcPort` forwards everything to the service.
    Tcp,
    /// A TCP frontend on the destination's `srcPort`, shared by every `sni` destination on that
    /// port, reads the TLS ClientHello's server name and forwards the still-encrypted connection
    /// to the destination claiming that name (`serviceDomain`); the instances terminate TLS.
    Sni,
}

impl ReqMode {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<ReqMode, SpecError> {
        match value {
            "http" => Ok(ReqMode::Http),
            "tcp" => Ok(ReqMode::Tcp),
            "sni" => Ok(ReqMode::Sni),
            _ => Err(spec_error(
                parameter,
                format!(
                    "{} is not a request mode; use http, tcp or sni",
                    shown(value)
                ),
            )),
        }
    }

    /// The mode as the query names it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReqMode::Http => "http",
            ReqMode::Tcp => "tcp",
            ReqMode::Sni => "sni",
        }
    }

    /// The `mode` of its HAProxy proxies: `sni` is passed through as TCP.
    pub fn haproxy_mode(self) -> &'static str {
        match self {
            ReqMode::Http => "http",
            ReqMode::Tcp | ReqMode::Sni => "tcp",
        }
    }
}

/// How a destination's exact `serviceDomain`s match the request's host (without its port,
/// case-insensitive): `serviceDomainAlgo` per service, `--service-domain-algo` for all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum DomainAlgo {
    /// `hdr`: the host is the domain (the default).
    #[default]
    Hdr,
    /// `hdr_beg`: the host begins with the domain (Docker Flow Proxy's old default).
    HdrBeg,
    /// `hdr_end`: the host ends with the domain.
    HdrEnd,
    /// `hdr_dom`: the domain is a dot-delimited run of the host's labels (so `example.com`
    /// matches `example.com` and `www.example.com`).
    HdrDom,
}

impl DomainAlgo {
    /// Every algorithm, by its query name.
    const ALL: [DomainAlgo; 4] = [
        DomainAlgo::Hdr,
        DomainAlgo::HdrBeg,
        DomainAlgo::HdrEnd,
        DomainAlgo::HdrDom,
    ];

    /// Validates `value` given as `parameter`: `hdr`, `hdr_beg`, `hdr_end` or `hdr_dom`, also
    /// in Docker Flow Proxy's form with the header named (`hdr_beg(host)`).
    pub fn parse(parameter: &str, value: &str) -> Result<DomainAlgo, SpecError> {
        let name = value.strip_suffix("(host)").unwrap_or(value);
        DomainAlgo::ALL
            .into_iter()
            .find(|algo| algo.as_str() == name)
            .ok_or_else(|| {
                spec_error(
                    parameter,
                    format!(
                        "{} is not a domain match; use hdr (exact), hdr_beg, hdr_end or hdr_dom",
                        shown(value)
                    ),
                )
            })
    }

    /// The query name: `hdr`, `hdr_beg`, `hdr_end` or `hdr_dom`.
    pub fn as_str(self) -> &'static str {
        match self {
            DomainAlgo::Hdr => "hdr",
            DomainAlgo::HdrBeg => "hdr_beg",
            DomainAlgo::HdrEnd => "hdr_end",
            DomainAlgo::HdrDom => "hdr_dom",
        }
    }

    /// HAProxy's match method for it (`-m <method>`).
    pub fn match_method(self) -> &'static str {
        match self {
            DomainAlgo::Hdr => "str",
            DomainAlgo::HdrBeg => "beg",
            DomainAlgo::HdrEnd => "end",
            DomainAlgo::HdrDom => "dom",
        }
    }
}

impl std::str::FromStr for DomainAlgo {
    type Err = SpecError;

    /// Reads `--service-domain-algo`.
    fn from_str(value: &str) -> Result<DomainAlgo, SpecError> {
        DomainAlgo::parse("--service-domain-algo", value)
    }
}

/// Parses a boolean flag (`true`, `false`, `1`, `0`).
pub(crate) fn parse_flag(parameter: &str, value: &str) -> Result<bool, SpecError> {
    match value {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(spec_error(
            parameter,
            format!("{} is not a flag; use true, false, 1 or 0", shown(value)),
        )),
    }
}

/// The most items of any other list (header rules, methods, redirected domains); lists that
/// share one HAProxy line have tighter caps of their own.
pub(crate) const MAX_LIST_ITEMS: usize = 64;

/// Parses each item of a list of at most `max_items` `what` (e.g. "paths") with `item`,
/// rejecting empty and repeated items.
pub(crate) fn parse_list<T: PartialEq>(
    parameter: &str,
    items: &[&str],
    max_items: usize,
    what: &str,
    item: impl Fn(&str) -> Result<T, SpecError>,
) -> Result<Vec<T>, SpecError> {
    if items.len() > max_items {
        return Err(spec_error(
            parameter,
            format!(
                "{} {what} given: at most {max_items} per destination",
                items.len()
            ),
        ));
    }
    let mut parsed: Vec<T> = Vec::with_capacity(items.len());
    for raw in items {
        if raw.is_empty() {
            return Err(spec_error(parameter, "the list has an empty item"));
        }
        let value = item(raw)?;
        if parsed.contains(&value) {
            return Err(spec_error(
                parameter,
                format!("{} is listed twice", shown(raw)),
            ));
        }
        parsed.push(value);
    }
    Ok(parsed)
}

// ---- Edge rules: redirects, header rules, method rules -------------------------------------

/// The status of an HTTPS redirect (`httpsRedirectCode`): 301, 302, 303, 307 or 308.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RedirectCode(u16);

impl RedirectCode {
    /// Docker Flow Proxy's default, 302 (a temporary redirect browsers do not cache forever).
    pub const DEFAULT: RedirectCode = RedirectCode(302);
    const ALLOWED: [u16; 5] = [301, 302, 303, 307, 308];

    /// Validates a code given as text (a query parameter).
    pub fn parse(parameter: &str, value: &str) -> Result<RedirectCode, SpecError> {
        let number = if value.len() == 3 && value.bytes().all(|b| b.is_ascii_digit()) {
            value.parse::<u32>().ok()
        } else {
            None
        };
        match number {
            Some(number) => RedirectCode::from_number(parameter, number),
            None => Err(spec_error(
                parameter,
                format!(
                    "{} is not a redirect code; use 301, 302, 303, 307 or 308",
                    shown(value)
                ),
            )),
        }
    }

    /// Validates a code given as a number (a stored spec).
    pub fn from_number(parameter: &str, number: u32) -> Result<RedirectCode, SpecError> {
        match u16::try_from(number) {
            Ok(code) if RedirectCode::ALLOWED.contains(&code) => Ok(RedirectCode(code)),
            _ => Err(spec_error(
                parameter,
                format!("{number} is not a redirect code; use 301, 302, 303, 307 or 308"),
            )),
        }
    }

    /// The status code.
    pub fn get(self) -> u16 {
        self.0
    }
}

/// Longest header name accepted.
const MAX_HEADER_NAME_LEN: usize = 128;
/// Longest header value accepted.
const MAX_HEADER_VALUE_LEN: usize = 1024;

/// Characters of a header name: RFC 7230 `tchar`s without the ones HAProxy's configuration
/// language reads specially (`#` comment, `$` environment variable, `%` log-format, `'` and
/// `` ` `` quotes).
fn is_header_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(c, '!' | '&' | '*' | '+' | '-' | '.' | '^' | '_' | '|' | '~')
}

/// Characters of a header value: printable ASCII and the space, without what could end the
/// double-quoted word it is written as (`"`, `\`), start a sample expression or a comment (`%`,
/// `#`), or expand an environment variable (`$`). The list separator `,` cannot occur either.
fn is_header_value_char(c: char) -> bool {
    (c == ' ' || c.is_ascii_graphic()) && !matches!(c, '"' | '\\' | '%' | '#' | '$' | ',')
}

/// A validated HTTP header name, e.g. `Strict-Transport-Security`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderName(String);

impl HeaderName {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<HeaderName, SpecError> {
        check_chars(
            parameter,
            value,
            MAX_HEADER_NAME_LEN,
            "a header name (letters, digits and ! & * + - . ^ _ | ~)",
            is_header_name_char,
            is_header_name_char,
        )?;
        Ok(HeaderName(value.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated header value: written double-quoted into haproxy.cfg, so spaces are kept and
/// nothing in it is interpreted by HAProxy.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderValue(String);

impl HeaderValue {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<HeaderValue, SpecError> {
        check_chars(
            parameter,
            value,
            MAX_HEADER_VALUE_LEN,
            "a header value (printable ASCII and spaces, without \" \\ % # $ ,)",
            is_header_value_char,
            is_header_value_char,
        )?;
        if value.starts_with(' ') || value.ends_with(' ') {
            return Err(spec_error(
                parameter,
                format!("{} starts or ends with a space", shown(value)),
            ));
        }
        Ok(HeaderValue(value.to_string()))
    }

    /// The value as text (without quotes).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One `Name value` item of `addReqHeader`, `setReqHeader`, `addResHeader` or `setResHeader`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HeaderLine {
    name: HeaderName,
    value: HeaderValue,
}

impl HeaderLine {
    /// Validates one `Name value` item (the name ends at the first space; the value is the rest).
    pub fn parse(parameter: &str, item: &str) -> Result<HeaderLine, SpecError> {
        let Some((name, value)) = item.split_once(' ') else {
            return Err(spec_error(
                parameter,
                format!(
                    "{} must be `Name value` (a header name, a space, then the value)",
                    shown(item)
                ),
            ));
        };
        Ok(HeaderLine {
            name: HeaderName::parse(parameter, name)?,
            value: HeaderValue::parse(parameter, value)?,
        })
    }

    /// The header's name.
    pub fn name(&self) -> &HeaderName {
        &self.name
    }

    /// The header's value.
    pub fn value(&self) -> &HeaderValue {
        &self.value
    }
}

impl fmt::Display for HeaderLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name.0, self.value.0)
    }
}

/// A validated HTTP method (`allowedMethods`, `deniedMethods`): an upper-case token such as
/// `GET` or `PROPFIND`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct HttpMethod(String);

impl HttpMethod {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<HttpMethod, SpecError> {
        let allowed = |c: char| c.is_ascii_uppercase() || c == '-' || c == '_';
        check_chars(
            parameter,
            value,
            32,
            "an HTTP method (upper-case letters, - and _, e.g. GET)",
            |c| c.is_ascii_uppercase(),
            allowed,
        )?;
        Ok(HttpMethod(value.to_string()))
    }

    /// The method as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for HttpMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Longest clear password accepted, in bytes (SHA-crypt's cost grows with the length).
const MAX_CLEAR_PASSWORD_LEN: usize = 256;
/// Most users accepted in one list.
const MAX_USERS: usize = 64;

/// A basic-auth user name (`[A-Za-z0-9][A-Za-z0-9_.@-]*`, at most 64 characters): one word of
/// a `user` line in a HAProxy `userlist`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserName(String);

impl UserName {
    /// Validates `value` given as `parameter`.
    pub fn parse(parameter: &str, value: &str) -> Result<UserName, SpecError> {
        check_chars(
            parameter,
            value,
            64,
            "a user name",
            |c| c.is_ascii_alphanumeric(),
            |c| is_name_char(c) || c == '@',
        )?;
        Ok(UserName(value.to_string()))
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A crypt(3) hash HAProxy checks passwords against with libc's `crypt()`: SHA-512 crypt
/// (`$6$`) or SHA-256 crypt (`$5$`), optionally with `rounds=N`, in the crypt alphabet only.
///
/// A clear password never becomes anything but one of these ([`PasswordHash::of_clear`]), so no
/// spec, stored document, answer or config line ever holds one.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PasswordHash(String);

impl fmt::Debug for PasswordHash {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("PasswordHash(***)")
    }
}

/// Characters of the crypt alphabet (salts and digests).
fn is_crypt_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '/'
}

impl PasswordHash {
    /// Hashes a clear password with SHA-512 crypt and a random 16-character salt.
    pub fn of_clear(parameter: &str, clear: &str) -> Result<PasswordHash, SpecError> {
        use sha_crypt::{PasswordHasher, ShaCrypt};
        if clear.len() > MAX_CLEAR_PASSWORD_LEN {
            return Err(spec_error(
                parameter,
                format!("a password is too long: at most {MAX_CLEAR_PASSWORD_LEN} bytes"),
            ));
        }
        // 12 random bytes are 16 characters of the crypt alphabet: glibc's longest salt.
        let salt: [u8; 12] = rand::random();
        let hashed = ShaCrypt::SHA512
            .hash_password_with_salt(clear.as_bytes(), &salt)
            .map_err(|error| {
                spec_error(parameter, format!("hashing a password failed: {error}"))
            })?;
        PasswordHash::parse(parameter, hashed.as_str())
    }

    /// Validates a crypt(3) hash given as `parameter` (with `usersPassEncrypted=true`, or read
    /// back from KV). The error never repeats the value.
    pub fn parse(parameter: &str, value: &str) -> Result<PasswordHash, SpecError> {
        let refuse = |why: &str| {
            spec_error(
                parameter,
                format!("a password hash {why}; give a SHA-512 crypt hash (`$6$…`, e.g. from `mkpasswd -m sha-512` or `openssl passwd -6`) or a SHA-256 one (`$5$…`)"),
            )
        };
        let (digest_len, rest) = if let Some(rest) = value.strip_prefix("$6$") {
            (86, rest)
        } else if let Some(rest) = value.strip_prefix("$5$") {
            (43, rest)
        } else {
            return Err(refuse("is not SHA-512 or SHA-256 crypt"));
        };
        let mut fields: Vec<&str> = rest.split('$').collect();
        if let Some(rounds) = fields.first().and_then(|f| f.strip_prefix("rounds=")) {
            let valid = !rounds.is_empty()
                && rounds.len() <= 9
                && rounds.bytes().all(|b| b.is_ascii_digit())
                && rounds.parse::<u32>().is_ok_and(|n| n >= 1000);
            if !valid {
                return Err(refuse("has rounds outside 1000 to 999999999"));
            }
            fields.remove(0);
        }
        let [salt, digest] = fields[..] else {
            return Err(refuse("is not `$id$[rounds=N$]salt$digest`"));
        };
        if salt.is_empty() || salt.len() > 16 || !salt.chars().all(is_crypt_char) {
            return Err(refuse("has a salt that is not 1 to 16 crypt characters"));
        }
        if digest.len() != digest_len || !digest.chars().all(is_crypt_char) {
            return Err(refuse("has a digest of the wrong length or alphabet"));
        }
        Ok(PasswordHash(value.to_string()))
    }

    /// Whether `clear` is the password this is the hash of.
    pub fn matches(&self, clear: &str) -> bool {
        use sha_crypt::{PasswordVerifier, ShaCrypt};
        // The verifier reads the algorithm and rounds from the hash itself.
        ShaCrypt::SHA512
            .verify_password(clear.as_bytes(), self.0.as_str())
            .is_ok()
    }

    /// The hash as text (for the `userlist` and the stored spec only).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One basic-auth user: a name and the hash of its password.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AuthUser {
    name: UserName,
    password: PasswordHash,
}

impl AuthUser {
    /// A user from validated parts.
    pub fn new(name: UserName, password: PasswordHash) -> AuthUser {
        AuthUser { name, password }
    }

    /// The user name.
    pub fn name(&self) -> &UserName {
        &self.name
    }

    /// The hash of the user's password.
    pub fn password(&self) -> &PasswordHash {
        &self.password
    }
}

/// Parses `alice:secret,bob:pass` (Docker Flow Proxy's `users`, and `--users`): clear
/// passwords are hashed at once; with `encrypted` each password must already be a crypt hash.
///
/// Errors name the item by its position and never repeat a password.
pub fn parse_users(
    parameter: &str,
    value: &str,
    encrypted: bool,
) -> Result<Vec<AuthUser>, SpecError> {
    parse_users_keeping(parameter, value, encrypted, &[])
}

/// [`parse_users`], keeping the hash of a user in `known` whose clear password it matches: a
/// random salt would otherwise change the hash, and so haproxy.cfg, on every repeated call.
pub(crate) fn parse_users_keeping(
    parameter: &str,
    value: &str,
    encrypted: bool,
    known: &[AuthUser],
) -> Result<Vec<AuthUser>, SpecError> {
    let items: Vec<&str> = value.split(',').collect();
    if items.len() > MAX_USERS {
        return Err(spec_error(
            parameter,
            format!("too many users: at most {MAX_USERS}"),
        ));
    }
    let mut users: Vec<AuthUser> = Vec::with_capacity(items.len());
    for (position, item) in items.iter().enumerate() {
        let position = position + 1;
        let Some((name, password)) = item.split_once(':') else {
            return Err(spec_error(
                parameter,
                format!("item {position} is not `user:password`"),
            ));
        };
        let name = UserName::parse(parameter, name)?;
        if password.is_empty() {
            return Err(spec_error(
                parameter,
                format!("user `{}` has an empty password", name.as_str()),
            ));
        }
        if users.iter().any(|user| user.name == name) {
            return Err(spec_error(
                parameter,
                format!("user `{}` is listed twice", name.as_str()),
            ));
        }
        let kept = known
            .iter()
            .find(|user| user.name == name && !encrypted && user.password.matches(password))
            .map(|user| user.password.clone());
        let password = match kept {
            Some(hash) => hash,
            None if encrypted => PasswordHash::parse(parameter, password)?,
            None => PasswordHash::of_clear(parameter, password)?,
        };
        users.push(AuthUser { name, password });
    }
    Ok(users)
}
