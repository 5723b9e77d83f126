//! Custom templates and raw backend lines: `templateFePath`, `templateBePath` and
//! `backendExtra` (Docker Flow Proxy's names), service-wide.
//!
//! - `templateFePath` / `templateBePath` name a handlebars fragment by a path relative to
//!   `--templates-dir` ([`TemplatePath`]): plain segments of letters, digits, `.`, `_`, `-`
//!   separated by `/`; never absolute, never `.` or `..`. Whether the file exists, and that it
//!   does not leave the directory through a symlink, is checked by the renderer (it alone knows
//!   the directory), when the request arrives and again at each render.
//! - `backendExtra` is raw backend lines ([`BackendExtraLine`]), one per line of the value
//!   (`%0A` in a query; a `\r` before it is dropped, blank lines are skipped), each starting with
//!   a keyword of [`BACKEND_KEYWORDS`]. Whether the operator allows them at all
//!   (`--allow-backend-extra`) is the renderer's check too.
//!
//! Nothing here can leave its slot: a template path never reaches haproxy.cfg, and a backend
//! line holds no newline, `#`, backslash, `$`, single quote, handlebars braces, control
//! character, `%` inside double quotes or unterminated double quote, so each stays one line of
//! the service's own backend, read by HAProxy word by word as written.

use serde::{Deserialize, Serialize};

use super::values::{shown, spec_error};
use super::SpecError;

/// Longest template path accepted, in characters.
pub const MAX_TEMPLATE_PATH_LEN: usize = 255;
/// Most lines `backendExtra` may hold.
pub const MAX_BACKEND_EXTRA_LINES: usize = 32;
/// Longest `backendExtra` line accepted, in characters.
pub const MAX_BACKEND_EXTRA_LINE_LEN: usize = 512;

/// The keywords a `backendExtra` line may start with: those HAProxy 2.6 accepts in a `backend`
/// section (its manual's proxy keywords matrix), minus the ones that read files or run programs
/// (`errorfile`, `errorfiles`, `external-check`, `load-server-state-from-file`,
/// `server-state-file-name`), expose other services (`stats`), or would undo what flow-proxy
/// writes (`mode`, `log`, `source`, `id`).
pub const BACKEND_KEYWORDS: &[&str] = &[
    "acl",
    "balance",
    "compression",
    "cookie",
    "default-server",
    "description",
    "dynamic-cookie-key",
    "errorloc",
    "errorloc302",
    "errorloc303",
    "filter",
    "force-persist",
    "fullconn",
    "hash-balance-factor",
    "hash-type",
    "http-after-response",
    "http-check",
    "http-error",
    "http-request",
    "http-response",
    "http-reuse",
    "http-send-name-header",
    "ignore-persist",
    "max-keep-alive-queue",
    "no",
    "option",
    "persist",
    "redirect",
    "retries",
    "retry-on",
    "server",
    "server-template",
    "stick",
    "stick-table",
    "tcp-check",
    "tcp-request",
    "tcp-response",
    "timeout",
    "use-server",
];

/// Words a `backendExtra` line may not hold: they make HAProxy read a file from its disk and
/// send it to clients (`http-request return … file`, `lf-file`).
const REFUSED_WORDS: &[&str] = &["file", "lf-file"];

/// The path of a custom fragment, relative to `--templates-dir`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct TemplatePath(String);

impl TemplatePath {
    /// Checks `value` as a path relative to the templates directory.
    pub fn parse(parameter: &str, value: &str) -> Result<TemplatePath, SpecError> {
        let refuse = |why: &str| {
            Err(spec_error(
                parameter,
                format!(
                    "{} {why}; give a path relative to --templates-dir, e.g. `my-service-be.hbs`",
                    shown(value)
                ),
            ))
        };
        if value.is_empty() {
            return refuse("is empty");
        }
        if value.chars().count() > MAX_TEMPLATE_PATH_LEN {
            return refuse(&format!(
                "is longer than {MAX_TEMPLATE_PATH_LEN} characters"
            ));
        }
        if value.starts_with('/') {
            return refuse("is absolute");
        }
        for segment in value.split('/') {
            if segment.is_empty() {
                return refuse("has an empty segment (`//` or a trailing `/`)");
            }
            if segment == "." || segment == ".." {
                return refuse(
                    "has a `.` or `..` segment: the fragment must be inside --templates-dir",
                );
            }
            if let Some(c) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
            {
                return refuse(&format!(
                    "has {c:?}: only letters, digits, `.`, `_`, `-` and `/` between segments are allowed"
                ));
            }
        }
        Ok(TemplatePath(value.to_string()))
    }

    /// The path as given, relative to the templates directory.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for TemplatePath {
    type Error = SpecError;

    fn try_from(value: String) -> Result<TemplatePath, SpecError> {
        TemplatePath::parse("templatePath", &value)
    }
}

impl From<TemplatePath> for String {
    fn from(path: TemplatePath) -> String {
        path.0
    }
}

/// One raw line of `backendExtra`: starts with a backend keyword, stays on its line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendExtraLine(String);

impl BackendExtraLine {
    /// Checks one line (already split from the others, surrounding blanks trimmed).
    pub fn parse(parameter: &str, line: &str) -> Result<BackendExtraLine, SpecError> {
        let refuse = |why: String| {
            Err(spec_error(
                parameter,
                format!("line {}: {why}", shown(line)),
            ))
        };
        if line.chars().count() > MAX_BACKEND_EXTRA_LINE_LEN {
            return refuse(format!(
                "is longer than {MAX_BACKEND_EXTRA_LINE_LEN} characters"
            ));
        }
        if let Some(c) = line.chars().find(|c| !(' '..='~').contains(c)) {
            return refuse(format!(
                "has {c:?}: only printable ASCII characters and spaces are allowed"
            ));
        }
        if let Some(c) = line.chars().find(|c| matches!(c, '#' | '\\' | '$')) {
            return refuse(format!(
                "has {c:?}, which HAProxy reads specially (a comment, an escape, an environment variable)"
            ));
        }
        if line.contains("{{") || line.contains("}}") {
            return refuse("has `{{` or `}}`: template syntax is not allowed".to_string());
        }
        if line.contains("env(") {
            return refuse(
                "uses the `env()` fetch: HAProxy's environment (flow-proxy's secrets) stays private"
                    .to_string(),
            );
        }
        if line.contains('\'') {
            return refuse("has a single quote: quote with double quotes".to_string());
        }
        let mut quoted = false;
        for c in line.chars() {
            match c {
                '"' => quoted = !quoted,
                '%' if quoted => {
                    return refuse(
                        "has `%` inside double quotes: write a `%[…]` expression unquoted"
                            .to_string(),
                    )
                }
                _ => {}
            }
        }
        if quoted {
            return refuse("has an unterminated double quote".to_string());
        }
        let mut words = line.split(' ').filter(|word| !word.is_empty());
        let keyword = words.next().unwrap_or_default();
        if !BACKEND_KEYWORDS.contains(&keyword) {
            return refuse(format!(
                "must start with a backend keyword, one of: {}",
                BACKEND_KEYWORDS.join(", ")
            ));
        }
        if let Some(word) = line
            .split(' ')
            .find(|word| REFUSED_WORDS.contains(&word.trim_matches('"')))
        {
            return refuse(format!(
                "has `{word}`: lines that make HAProxy read a file are not allowed"
            ));
        }
        Ok(BackendExtraLine(line.to_string()))
    }

    /// The line as written into the backend.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Splits a `backendExtra` value into its lines: separated by newlines (`\r\n` too), each
/// trimmed of surrounding spaces and tabs, blank lines skipped.
pub fn parse_backend_extra(
    parameter: &str,
    value: &str,
) -> Result<Vec<BackendExtraLine>, SpecError> {
    let lines: Vec<&str> = value
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line))
        .map(|line| line.trim_matches(|c| c == ' ' || c == '\t'))
        .filter(|line| !line.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(spec_error(parameter, "holds no line"));
    }
    if lines.len() > MAX_BACKEND_EXTRA_LINES {
        return Err(spec_error(
            parameter,
            format!(
                "{} lines given: at most {MAX_BACKEND_EXTRA_LINES}",
                lines.len()
            ),
        ));
    }
    lines
        .into_iter()
        .map(|line| BackendExtraLine::parse(parameter, line))
        .collect()
}

/// A service's custom templates and raw backend lines.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CustomTemplates {
    /// `templateFePath`: the fragment written instead of each of the service's frontend rules.
    pub template_fe_path: Option<TemplatePath>,
    /// `templateBePath`: the fragment written instead of each of the service's backends.
    pub template_be_path: Option<TemplatePath>,
    /// `backendExtra`: lines written at the bottom of each of the service's backends.
    pub backend_extra: Vec<BackendExtraLine>,
}

/// The query parameters of this group, in [`CustomTemplates::parse`]'s order.
pub(crate) const TEMPLATE_FE_PATH: &str = "templateFePath";
pub(crate) const TEMPLATE_BE_PATH: &str = "templateBePath";
pub(crate) const BACKEND_EXTRA: &str = "backendExtra";

impl CustomTemplates {
    /// Reads the group from a query's service parameters (`get` looks one up by name).
    pub(crate) fn parse<'q>(
        get: impl Fn(&str) -> Option<&'q str>,
    ) -> Result<CustomTemplates, SpecError> {
        let path = |parameter: &str| {
            get(parameter)
                .map(|value| TemplatePath::parse(parameter, value))
                .transpose()
        };
        Ok(CustomTemplates {
            template_fe_path: path(TEMPLATE_FE_PATH)?,
            template_be_path: path(TEMPLATE_BE_PATH)?,
            backend_extra: get(BACKEND_EXTRA)
                .map(|value| parse_backend_extra(BACKEND_EXTRA, value))
                .transpose()?
                .unwrap_or_default(),
        })
    }

    /// Whether nothing of the group is set.
    pub fn is_empty(&self) -> bool {
        self.template_fe_path.is_none()
            && self.template_be_path.is_none()
            && self.backend_extra.is_empty()
    }
}

/// The stored form of the group: fields of the stored spec (see `stored.rs`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct StoredCustomTemplates {
    #[serde(default)]
    pub template_fe_path: Option<String>,
    #[serde(default)]
    pub template_be_path: Option<String>,
    /// One item per line.
    #[serde(default)]
    pub backend_extra: Vec<String>,
}

impl From<&CustomTemplates> for StoredCustomTemplates {
    fn from(custom: &CustomTemplates) -> StoredCustomTemplates {
        StoredCustomTemplates {
            template_fe_path: custom.template_fe_path.clone().map(String::from),
            template_be_path: custom.template_be_path.clone().map(String::from),
            backend_extra: custom
                .backend_extra
                .iter()
                .map(|line| line.as_str().to_string())
                .collect(),
        }
    }
}

impl StoredCustomTemplates {
    /// Re-validates the stored group with the query's rules.
    pub(super) fn checked(&self) -> Result<CustomTemplates, SpecError> {
        let joined = self.backend_extra.join("\n");
        if self.backend_extra.iter().any(|line| line.contains('\n')) {
            return Err(spec_error(BACKEND_EXTRA, "a stored line holds a newline"));
        }
        CustomTemplates::parse(|parameter| match parameter {
            TEMPLATE_FE_PATH => self.template_fe_path.as_deref(),
            TEMPLATE_BE_PATH => self.template_be_path.as_deref(),
            BACKEND_EXTRA if !self.backend_extra.is_empty() => Some(joined.as_str()),
            _ => None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ServiceSpec;

    fn query(extra: &[(&str, &str)]) -> Result<ServiceSpec, SpecError> {
        let pairs: Vec<(String, String)> = [("serviceName", "app"), ("servicePath", "/app")]
            .iter()
            .chain(extra)
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        ServiceSpec::from_query(&pairs)
    }

    fn refused(extra: &[(&str, &str)]) -> SpecError {
        query(extra).expect_err("refused")
    }

    #[test]
    fn template_paths_are_plain_relative_paths() {
        for good in ["be.hbs", "app/fe.hbs", "a-b_c.1/x.tmpl", ".hidden.hbs"] {
            let spec = query(&[("templateBePath", good)]).expect(good);
            assert_eq!(
                spec.custom_templates()
                    .template_be_path
                    .as_ref()
                    .map(TemplatePath::as_str),
                Some(good)
            );
        }
        for (bad, words) in [
            ("", "empty"),
            ("/etc/passwd", "absolute"),
            ("../be.hbs", "`..`"),
            ("a/../../b", "`..`"),
            ("./be.hbs", "`.`"),
            ("a//b", "empty segment"),
            ("a/", "empty segment"),
            ("be hbs", "' '"),
            ("be.hbs\n", "'\\n'"),
            ("be\\hbs", "'\\\\'"),
            ("{{be}}", "'{'"),
            ("c:x", "':'"),
        ] {
            let error = refused(&[("templateFePath", bad)]);
            assert_eq!(error.parameter, "templateFePath", "{bad:?}");
            assert!(error.message.contains(words), "{bad:?}: {error}");
        }
        let long = "a".repeat(MAX_TEMPLATE_PATH_LEN + 1);
        assert!(refused(&[("templateBePath", &long)])
            .message
            .contains("longer"));
        assert!(refused(&[("templateBePath.1", "be.hbs")])
            .message
            .contains("whole service"));
    }

    #[test]
    fn backend_extra_is_lines_each_starting_with_a_backend_keyword() {
        let spec = query(&[(
            "backendExtra",
            " http-response set-header X-Extra yes\r\n\n\ttimeout server 5s \n",
        )])
        .expect("two lines");
        let lines: Vec<&str> = spec
            .custom_templates()
            .backend_extra
            .iter()
            .map(BackendExtraLine::as_str)
            .collect();
        assert_eq!(
            lines,
            ["http-response set-header X-Extra yes", "timeout server 5s"]
        );
        query(&[(
            "backendExtra",
            "http-request set-header X-Name \"a b\" if { path_beg /x }",
        )])
        .expect("quotes and anonymous acls");

        for (bad, words) in [
            ("", "no line"),
            ("\n \n", "no line"),
            ("frontend evil", "backend keyword"),
            ("backend other", "backend keyword"),
            ("mode tcp", "backend keyword"),
            ("errorfile 503 /etc/passwd", "backend keyword"),
            ("external-check command /bin/sh", "backend keyword"),
            ("timeout server 5s\nlisten evil", "backend keyword"),
            ("option httpchk # comment", "'#'"),
            ("http-request set-path \\x", "'\\\\'"),
            ("http-response set-header X \"${API_TOKEN}\"", "'$'"),
            ("http-response set-header X %[env(API_TOKEN)]", "env()"),
            ("http-response set-header X {{service}}", "{{"),
            ("http-request return status 200 file /etc/passwd", "`file`"),
            ("http-request return status 200 lf-file \"/x\"", "`lf-file`"),
            ("http-response set-header X \"open", "unterminated"),
            ("http-response set-header X 'a b'", "single quote"),
            (
                "http-response set-header X \"%[src]\"",
                "inside double quotes",
            ),
            ("http-response set-header X\u{7}", "printable"),
            ("http-response set-header X é", "printable"),
        ] {
            let error = refused(&[("backendExtra", bad)]);
            assert_eq!(error.parameter, "backendExtra", "{bad:?}");
            assert!(error.message.contains(words), "{bad:?}: {error}");
        }
        let many = vec!["retries 3"; MAX_BACKEND_EXTRA_LINES + 1].join("\n");
        assert!(refused(&[("backendExtra", &many)])
            .message
            .contains("lines"));
        let long = format!("description {}", "a".repeat(MAX_BACKEND_EXTRA_LINE_LEN));
        assert!(refused(&[("backendExtra", &long)])
            .message
            .contains("longer"));
    }

    #[test]
    fn a_frontend_fragment_needs_an_http_destination() {
        let pairs: Vec<(String, String)> = [
            ("serviceName", "db"),
            ("reqMode", "tcp"),
            ("srcPort", "5432"),
            ("templateFePath", "fe.hbs"),
        ]
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect();
        let error = ServiceSpec::from_query(&pairs).expect_err("refused");
        assert_eq!(error.parameter, "templateFePath");
        assert!(error.message.contains("http destination"), "{error}");
    }

    #[test]
    fn the_group_is_stored_and_read_back_with_the_same_checks() {
        let spec = query(&[
            ("templateFePath", "fe.hbs"),
            ("templateBePath", "dir/be.hbs"),
            ("backendExtra", "retries 3\noption redispatch"),
        ])
        .expect("accepted");
        let json = serde_json::to_value(&spec).expect("stored form");
        assert_eq!(json["TemplateFePath"], "fe.hbs");
        assert_eq!(json["TemplateBePath"], "dir/be.hbs");
        assert_eq!(
            json["BackendExtra"],
            serde_json::json!(["retries 3", "option redispatch"])
        );
        let back: ServiceSpec = serde_json::from_value(json.clone()).expect("read back");
        assert_eq!(back, spec);

        let plain = query(&[]).expect("accepted");
        let plain_json = serde_json::to_value(&plain).expect("stored form");
        assert_eq!(plain_json["TemplateFePath"], serde_json::Value::Null);
        assert_eq!(plain_json["BackendExtra"], serde_json::json!([]));

        for (field, value) in [
            ("TemplateBePath", serde_json::json!("../x.hbs")),
            ("BackendExtra", serde_json::json!(["frontend evil"])),
            (
                "BackendExtra",
                serde_json::json!(["retries 3\nlisten evil"]),
            ),
        ] {
            let mut edited = json.clone();
            edited[field] = value;
            let error = serde_json::from_value::<ServiceSpec>(edited).expect_err("refused");
            assert!(error.to_string().contains("backend") || error.to_string().contains(".."));
        }
    }
}
