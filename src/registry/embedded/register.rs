//! Decoding `PUT /v1/agent/service/register` bodies the way Consul's agent does: field names
//! case-insensitive (PascalCase, camelCase and snake_case all match), `null` meaning absent,
//! Go-style type errors, check validation and CheckID generation.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::blocking::duration_ms;
use super::store::{
    CheckDefinition, CheckKind, NewCheck, Service, TaggedAddress, Weights, CRITICAL, PASSING,
    WARNING,
};

/// Consul's default HTTP/TCP check timeout.
const DEFAULT_TIMEOUT_MS: u64 = 10_000;
/// The largest TCP port; a registration whose `Port` is outside `0..=MAX_PORT` is refused.
const MAX_PORT: i64 = 65_535;

/// Why a registration was refused; the text is Consul's plain-text body.
#[derive(Debug, thiserror::Error, PartialEq)]
pub(crate) enum RegisterError {
    /// `400`: undecodable body, missing name, invalid check.
    #[error("{0}")]
    BadRequest(String),
    /// `500`: a script check on an agent without `enable_script_checks`.
    #[error("Scripts are disabled on this agent from remote calls; to enable, configure 'enable_script_checks' to true")]
    ScriptsDisabled,
}

/// A decoded registration.
#[derive(Debug)]
pub(crate) struct Registration {
    pub service: Service,
    pub checks: Vec<NewCheck>,
}

fn decode_error(message: String) -> RegisterError {
    RegisterError::BadRequest(format!("Request decode failed: {message}"))
}

/// The text Go's `encoding/json` gives for the end-of-input cases (`EOF` for an empty body,
/// `unexpected EOF` for a cut-off one); other syntax errors keep serde's description.
fn go_json_error(body: &[u8], error: &serde_json::Error) -> String {
    if body.iter().all(u8::is_ascii_whitespace) {
        "EOF".into()
    } else if error.is_eof() {
        "unexpected EOF".into()
    } else {
        error.to_string()
    }
}

fn go_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn mismatch(value: &Value, path: &str, go: &str) -> RegisterError {
    decode_error(format!(
        "json: cannot unmarshal {} into Go struct field {path} of type {go}",
        go_type(value)
    ))
}

/// Field access on one JSON object, case- and underscore-insensitive, with Go-style errors.
struct Fields<'a> {
    object: &'a Map<String, Value>,
    /// Go struct path prefix for error messages (`""` or `".Check"`).
    path: &'a str,
}

fn normalise(name: &str) -> String {
    name.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

impl<'a> Fields<'a> {
    /// The first non-null field whose name matches any of `names`.
    fn raw(&self, names: &[&str]) -> Option<(&'a Value, String)> {
        for name in names {
            let wanted = normalise(name);
            for (key, value) in self.object {
                if normalise(key) == wanted && !value.is_null() {
                    return Some((value, format!("{}.{name}", self.path)));
                }
            }
        }
        None
    }

    fn string(&self, names: &[&str]) -> Result<String, RegisterError> {
        match self.raw(names) {
            None => Ok(String::new()),
            Some((Value::String(s), _)) => Ok(s.clone()),
            Some((other, path)) => Err(mismatch(other, &path, "string")),
        }
    }

    fn int(&self, names: &[&str]) -> Result<i64, RegisterError> {
        match self.raw(names) {
            None => Ok(0),
            Some((Value::Number(n), path)) => n.as_i64().ok_or_else(|| {
                decode_error(format!(
                    "json: cannot unmarshal number {n} into Go struct field {path} of type int"
                ))
            }),
            Some((other, path)) => Err(mismatch(other, &path, "int")),
        }
    }

    fn boolean(&self, names: &[&str]) -> Result<bool, RegisterError> {
        match self.raw(names) {
            None => Ok(false),
            Some((Value::Bool(b), _)) => Ok(*b),
            Some((other, path)) => Err(mismatch(other, &path, "bool")),
        }
    }

    fn strings(&self, names: &[&str]) -> Result<Vec<String>, RegisterError> {
        match self.raw(names) {
            None => Ok(Vec::new()),
            Some((Value::Array(items), path)) => items
                .iter()
                .map(|item| match item {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(mismatch(other, &path, "string")),
                })
                .collect(),
            Some((other, path)) => Err(mismatch(other, &path, "[]string")),
        }
    }

    fn string_map(
        &self,
        names: &[&str],
    ) -> Result<Option<BTreeMap<String, String>>, RegisterError> {
        match self.raw(names) {
            None => Ok(None),
            Some((Value::Object(map), path)) => map
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    other => Err(mismatch(other, &path, "string")),
                })
                .collect::<Result<_, _>>()
                .map(Some),
            Some((other, path)) => Err(mismatch(other, &path, "map[string]string")),
        }
    }

    /// A duration given as a Go duration string or as nanoseconds.
    fn duration_ms(&self, names: &[&str]) -> Result<u64, RegisterError> {
        match self.raw(names) {
            None => Ok(0),
            Some((Value::String(s), _)) => {
                duration_ms(s).ok_or_else(|| decode_error(format!("time: invalid duration {s:?}")))
            }
            Some((Value::Number(n), path)) => match n.as_i64() {
                Some(nanos) => Ok((nanos.max(0) as u64) / 1_000_000),
                None => Err(mismatch(&Value::Number(n.clone()), &path, "time.Duration")),
            },
            Some((other, path)) => Err(mismatch(other, &path, "time.Duration")),
        }
    }

    fn object(&self, names: &[&str], go: &str) -> Result<Option<Fields<'a>>, RegisterError> {
        match self.raw(names) {
            None => Ok(None),
            Some((Value::Object(object), _)) => Ok(Some(Fields {
                object,
                path: self.path,
            })),
            Some((other, path)) => Err(mismatch(other, &path, go)),
        }
    }
}

/// Decodes and validates a registration body.
pub(crate) fn decode(body: &[u8]) -> Result<Registration, RegisterError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| decode_error(go_json_error(body, &e)))?;
    let object = match &value {
        Value::Object(object) => object,
        other => {
            return Err(decode_error(format!(
                "json: cannot unmarshal {} into Go value of type structs.ServiceDefinition",
                go_type(other)
            )))
        }
    };
    let fields = Fields { object, path: "" };
    let name = fields.string(&["Name"])?;
    let mut id = fields.string(&["ID"])?;
    let tags = fields.strings(&["Tags"])?;
    let address = fields.string(&["Address"])?;
    let meta = fields.string_map(&["Meta"])?;
    let port = port_in_range(fields.int(&["Port"])?, "Port")?;
    let kind = fields.string(&["Kind"])?;
    let enable_tag_override = fields.boolean(&["EnableTagOverride"])?;
    let mut weights = Weights::default();
    if let Some(w) = fields.object(&["Weights"], "structs.Weights")? {
        if w.raw(&["Passing"]).is_some() {
            weights.passing = w.int(&["Passing"])?;
        }
        if w.raw(&["Warning"]).is_some() {
            weights.warning = w.int(&["Warning"])?;
        }
    }
    let mut tagged_addresses = BTreeMap::new();
    if let Some((value, path)) = fields.raw(&["TaggedAddresses"]) {
        let Value::Object(map) = value else {
            return Err(mismatch(value, &path, "map[string]structs.ServiceAddress"));
        };
        for (tag, entry) in map {
            let Value::Object(entry) = entry else {
                return Err(mismatch(entry, &path, "structs.ServiceAddress"));
            };
            let entry = Fields {
                object: entry,
                path: &path,
            };
            tagged_addresses.insert(
                tag.clone(),
                TaggedAddress {
                    address: entry.string(&["Address"])?,
                    port: port_in_range(
                        entry.int(&["Port"])?,
                        &format!("TaggedAddresses[{tag}].Port"),
                    )?,
                },
            );
        }
    }

    let mut check_objects: Vec<(&Map<String, Value>, String)> = Vec::new();
    if let Some((value, path)) = fields.raw(&["Check"]) {
        match value {
            Value::Object(object) => check_objects.push((object, path)),
            other => return Err(mismatch(other, &path, "structs.CheckType")),
        }
    }
    if let Some((value, path)) = fields.raw(&["Checks"]) {
        match value {
            Value::Array(items) => {
                for item in items {
                    match item {
                        Value::Object(object) => check_objects.push((object, path.clone())),
                        Value::Null => {}
                        other => return Err(mismatch(other, &path, "structs.CheckType")),
                    }
                }
            }
            other => return Err(mismatch(other, &path, "structs.CheckTypes")),
        }
    }

    if name.is_empty() {
        return Err(RegisterError::BadRequest("Missing service name".into()));
    }
    if id.is_empty() {
        id.clone_from(&name);
    }

    let mut decoded = Vec::new();
    for (object, path) in &check_objects {
        if let Some(check) = decode_check(&Fields { object, path })? {
            decoded.push(check);
        }
    }
    let total = decoded.len();
    let mut checks = Vec::new();
    let mut script = false;
    for (position, check) in decoded.into_iter().enumerate() {
        script |= check.script;
        let check_id = if check.id.is_empty() {
            if total > 1 {
                format!("service:{id}:{}", position + 1)
            } else {
                format!("service:{id}")
            }
        } else {
            check.id
        };
        let name = if check.name.is_empty() {
            format!("Service '{name}' check")
        } else {
            check.name
        };
        checks.push(NewCheck {
            check_id,
            name,
            notes: check.notes,
            initial_status: check.status,
            definition: check.definition,
        });
    }
    if script {
        return Err(RegisterError::ScriptsDisabled);
    }

    Ok(Registration {
        service: Service {
            id,
            name,
            tags,
            address,
            meta,
            port,
            tagged_addresses,
            weights,
            enable_tag_override,
            kind,
            create_index: 0,
            modify_index: 0,
        },
        checks,
    })
}

/// Refuses a port no TCP service can listen on. Consul itself stores any Go `int` here (its
/// `validateService` checks only the name and the checks), but such an instance could never be
/// reached; the embedded registry refuses it up front with a 400 in Consul's plain-text style.
fn port_in_range(port: i64, field: &str) -> Result<i64, RegisterError> {
    if (0..=MAX_PORT).contains(&port) {
        Ok(port)
    } else {
        Err(RegisterError::BadRequest(format!(
            "Invalid {field}: {port} is not a TCP port (0 to {MAX_PORT})"
        )))
    }
}

struct DecodedCheck {
    id: String,
    name: String,
    notes: String,
    status: String,
    script: bool,
    definition: CheckDefinition,
}

fn invalid(message: &str) -> RegisterError {
    RegisterError::BadRequest(format!("Invalid check: {message}"))
}

fn decode_check(fields: &Fields<'_>) -> Result<Option<DecodedCheck>, RegisterError> {
    let id = fields.string(&["CheckID", "ID"])?;
    let name = fields.string(&["Name"])?;
    let notes = fields.string(&["Notes"])?;
    let status = fields.string(&["Status"])?;
    let mut interval_ms = fields.duration_ms(&["Interval"])?;
    let mut timeout_ms = fields.duration_ms(&["Timeout"])?;
    let ttl_ms = fields.duration_ms(&["TTL"])?;
    let deregister_after_ms = fields.duration_ms(&["DeregisterCriticalServiceAfter"])?;
    let http = fields.string(&["HTTP"])?;
    let mut method = fields.string(&["Method"])?;
    let body = fields.string(&["Body"])?;
    let tcp = fields.string(&["TCP"])?;
    let grpc = fields.string(&["GRPC"])?;
    let args = fields.strings(&["ScriptArgs", "Args"])?;
    let script = fields.string(&["Script"])?;
    let docker = fields.string(&["DockerContainerID"])?;
    let alias_node = fields.string(&["AliasNode"])?;
    let alias_service = fields.string(&["AliasService"])?;
    let mut header = BTreeMap::new();
    if let Some((value, path)) = fields.raw(&["Header"]) {
        let Value::Object(map) = value else {
            return Err(mismatch(value, &path, "map[string][]string"));
        };
        for (key, values) in map {
            let Value::Array(values) = values else {
                return Err(mismatch(values, &path, "[]string"));
            };
            let values = values
                .iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.clone()),
                    other => Err(mismatch(other, &path, "string")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            header.insert(key.clone(), values);
        }
    }

    let is_script = !args.is_empty() || !script.is_empty();
    let is_alias = !alias_node.is_empty() || !alias_service.is_empty();
    let is_empty = id.is_empty()
        && name.is_empty()
        && notes.is_empty()
        && status.is_empty()
        && interval_ms == 0
        && ttl_ms == 0
        && http.is_empty()
        && tcp.is_empty()
        && grpc.is_empty()
        && !is_script
        && docker.is_empty()
        && !is_alias;
    if is_empty {
        return Ok(None);
    }
    let interval_check = is_script || !http.is_empty() || !tcp.is_empty() || !grpc.is_empty();
    if interval_ms > 0 && ttl_ms > 0 {
        return Err(invalid("Interval and TTL cannot both be specified"));
    }
    if interval_check && interval_ms == 0 {
        return Err(invalid(
            "Interval must be > 0 for Script, HTTP, or TCP checks",
        ));
    }
    if !interval_check && !is_alias && docker.is_empty() && ttl_ms == 0 {
        return Err(invalid("TTL must be > 0 for TTL checks"));
    }
    let status = match status.as_str() {
        "" => CRITICAL.to_string(),
        PASSING | WARNING | CRITICAL => status,
        _ => {
            return Err(RegisterError::BadRequest(
                "Status for checks must 'passing', 'warning', 'critical'".into(),
            ))
        }
    };
    if timeout_ms == 0 {
        timeout_ms = DEFAULT_TIMEOUT_MS;
    }
    let floor = super::checks::MIN_INTERVAL.as_millis() as u64;
    if interval_check && interval_ms < floor {
        tracing::warn!(
            check = %id,
            interval_ms,
            "check has interval below minimum of 1s; raised to 1s"
        );
        interval_ms = floor;
    }
    let kind = if !http.is_empty() {
        if method.is_empty() {
            method = "GET".into();
        }
        CheckKind::Http {
            url: http,
            method,
            header,
            body,
        }
    } else if !tcp.is_empty() {
        CheckKind::Tcp { address: tcp }
    } else if ttl_ms > 0 {
        CheckKind::Ttl
    } else if !grpc.is_empty() {
        CheckKind::Unprobed {
            type_name: "grpc".into(),
        }
    } else if is_alias {
        CheckKind::Unprobed {
            type_name: "alias".into(),
        }
    } else {
        CheckKind::Unprobed {
            type_name: if docker.is_empty() {
                "script".into()
            } else {
                "docker".into()
            },
        }
    };
    Ok(Some(DecodedCheck {
        id,
        name,
        notes,
        status,
        script: is_script || !docker.is_empty(),
        definition: CheckDefinition {
            kind,
            interval_ms,
            timeout_ms,
            ttl_ms,
            deregister_after_ms,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrator_body_with_null_checks() {
        let body = br#"{"ID":"host1:redis.0:6379","Name":"redis","Port":10000,"Address":"192.168.1.102","Check":null,"Checks":null}"#;
        let r = decode(body).unwrap();
        assert_eq!(r.service.id, "host1:redis.0:6379");
        assert!(r.checks.is_empty());
        assert!(r.service.meta.is_none());
    }

    #[test]
    fn snake_case_and_id_default() {
        let r =
            decode(br#"{"name":"web","enable_tag_override":true,"check":{"ttl":"5s"}}"#).unwrap();
        assert_eq!(r.service.id, "web");
        assert!(r.service.enable_tag_override);
        assert_eq!(r.checks[0].check_id, "service:web");
    }

    #[test]
    fn errors_match_consul() {
        assert_eq!(
            decode(br#"{"Name":"x","Port":"80"}"#).unwrap_err().to_string(),
            "Request decode failed: json: cannot unmarshal string into Go struct field .Port of type int"
        );
        assert_eq!(
            decode(br#"{"Port":80}"#).unwrap_err().to_string(),
            "Missing service name"
        );
        assert_eq!(
            decode(br#"{"Name":"x","Check":{"HTTP":"http://a"}}"#)
                .unwrap_err()
                .to_string(),
            "Invalid check: Interval must be > 0 for Script, HTTP, or TCP checks"
        );
        assert_eq!(
            decode(br#"{"Name":"x","Check":{"ScriptArgs":["true"],"Interval":"1s"}}"#).unwrap_err(),
            RegisterError::ScriptsDisabled
        );
        assert_eq!(
            decode(b"").unwrap_err().to_string(),
            "Request decode failed: EOF"
        );
        assert_eq!(
            decode(br#"{"Name":"x""#).unwrap_err().to_string(),
            "Request decode failed: unexpected EOF"
        );
    }

    #[test]
    fn ports_outside_tcp_range_are_refused() {
        for port in ["-1", "65536", "99999"] {
            let body = format!(r#"{{"Name":"web","Port":{port}}}"#);
            assert_eq!(
                decode(body.as_bytes()).unwrap_err().to_string(),
                format!("Invalid Port: {port} is not a TCP port (0 to 65535)")
            );
        }
        for port in [0, 1, 65535] {
            let body = format!(r#"{{"Name":"web","Port":{port}}}"#);
            assert_eq!(decode(body.as_bytes()).unwrap().service.port, port);
        }
        let tagged = br#"{"Name":"web","Port":80,"TaggedAddresses":{"lan":{"Address":"10.0.0.1","Port":70000}}}"#;
        assert_eq!(
            decode(tagged).unwrap_err().to_string(),
            "Invalid TaggedAddresses[lan].Port: 70000 is not a TCP port (0 to 65535)"
        );
    }

    #[test]
    fn intervals_below_one_second_are_raised_and_timeout_defaults_to_ten_seconds() {
        let r =
            decode(br#"{"Name":"web","Check":{"HTTP":"http://127.0.0.1:9/","Interval":"1ms"}}"#)
                .unwrap();
        assert_eq!(r.checks[0].definition.interval_ms, 1_000);
        assert_eq!(r.checks[0].definition.timeout_ms, 10_000);
        let r = decode(
            br#"{"Name":"web","Check":{"TCP":"127.0.0.1:9","Interval":"1500ms","Timeout":"250ms"}}"#,
        )
        .unwrap();
        assert_eq!(r.checks[0].definition.interval_ms, 1_500);
        assert_eq!(r.checks[0].definition.timeout_ms, 250);
        // TTL checks have no interval; their TTL is kept as given.
        let r = decode(br#"{"Name":"job","Check":{"TTL":"500ms"}}"#).unwrap();
        assert_eq!(r.checks[0].definition.ttl_ms, 500);
    }
}
