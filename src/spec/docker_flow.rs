//! Importing the routes Docker Flow Proxy left in Consul KV, so a proxy replacing it starts with
//! the same services.
//!
//! Docker Flow Proxy kept one plain-text value per key, under
//! `<PROXY_INSTANCE_NAME>/<serviceName>/<field>` (the instance name defaults to `docker-flow`,
//! the only root read here). Its field names are all lowercase; they are matched here without
//! regard to case. The fields it wrote across its versions (the `*_KEY` constants of
//! `registry/registrarable.go`, earlier of `reconfigure.go`, and `PutService` in
//! `registry/consul.go`, in docker-flow/docker-flow-proxy), and what becomes of them:
//!
//! | DFP field              | value as DFP wrote it                  | flow-proxy parameter |
//! |------------------------|----------------------------------------|----------------------|
//! | `path`                 | paths joined with `,`                  | `servicePath`        |
//! | `domain`               | one domain; later a list, split on `,` | `serviceDomain`      |
//! | `color`                | the blue-green color                   | `serviceColor`       |
//! | `pathtype`             | `path_beg`, `path_reg`, …              | `pathType`           |
//! | `port`                 | the service's port                     | `port`               |
//! | `skipcheck`            | `true` / `false`                       | `skipCheck`          |
//! | `hostname`             | outbound hostname                      | ignored              |
//! | `cert`                 | a certificate                          | ignored              |
//! | `consultemplatefepath` | a Consul Template file path            | ignored              |
//! | `consultemplatebepath` | a Consul Template file path            | ignored              |
//!
//! Docker Flow Proxy persisted only its first destination, so every field maps to destination 0
//! and nothing is ever indexed: a field named `path.1` is not a DFP field and is ignored like any
//! other unknown field (Docker Flow, the deployment tool, also kept `scale` under the same root).
//! It never persisted `aclName`, `srcPort` or `reqMode`, so a TCP service cannot be recovered.
//!
//! Docker Flow Proxy also listed its services as `docker-flow/service/<serviceName>` = `swarm`;
//! that index is not a service and is skipped (which means a DFP service named `service` cannot
//! be told apart from it and is not imported; Docker Flow Proxy had the same collision).
//!
//! Nothing read here is trusted: the values of one service become the query of a reconfigure
//! request and go through [`ServiceSpec::from_query`], so they are validated exactly like an API
//! request and every error names the flow-proxy parameter.

use std::collections::BTreeMap;

use super::values::{spec_error, ServiceName};
use super::{ServiceSpec, SpecError};

/// The root of Docker Flow Proxy's KV keys (its default `PROXY_INSTANCE_NAME`), with the slash.
pub const DOCKER_FLOW_PREFIX: &str = "docker-flow/";

/// The service segment under which Docker Flow Proxy kept its list of services, not a service.
const SERVICE_INDEX: &str = "service";

/// Each Docker Flow Proxy field that flow-proxy understands, with the query parameter it becomes.
const FIELDS: &[(&str, &str)] = &[
    ("path", "servicePath"),
    ("domain", "serviceDomain"),
    ("color", "serviceColor"),
    ("pathtype", "pathType"),
    ("port", "port"),
    ("skipcheck", "skipCheck"),
];

/// One service found in the Docker Flow Proxy layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerFlowService {
    /// The `<serviceName>` segment of the keys, as found: not validated, so log it escaped.
    pub service: String,
    /// The converted spec, or the first reason it does not validate (naming the parameter).
    pub spec: Result<ServiceSpec, SpecError>,
    /// Non-empty fields flow-proxy has no equivalent for, as spelled in the keys, sorted.
    pub ignored_fields: Vec<String>,
}

/// Groups `docker-flow/<service>/<field>` entries (full keys, raw values) by service and converts
/// each service; services come sorted by name.
///
/// Keys of any other shape (another root, a missing or empty segment, deeper keys) are skipped,
/// and so is DFP's `docker-flow/service/` index. Empty values count as absent, as Consul returns
/// `null` for the fields Docker Flow Proxy wrote empty. A service whose fields give no route
/// (no `path` or `domain`) comes back as an error naming `servicePath`.
pub fn services_from_docker_flow(entries: &[(String, Vec<u8>)]) -> Vec<DockerFlowService> {
    let mut services: BTreeMap<&str, Vec<(&str, &[u8])>> = BTreeMap::new();
    for (key, value) in entries {
        let Some((service, field)) = split_key(key) else {
            continue;
        };
        if service == SERVICE_INDEX {
            continue;
        }
        services
            .entry(service)
            .or_default()
            .push((field, value.as_slice()));
    }
    services
        .into_iter()
        .map(|(service, fields)| convert(service, fields))
        .collect()
}

/// Splits `docker-flow/<service>/<field>` into its two non-empty segments.
fn split_key(key: &str) -> Option<(&str, &str)> {
    let (service, field) = key.strip_prefix(DOCKER_FLOW_PREFIX)?.split_once('/')?;
    if service.is_empty() || field.is_empty() || field.contains('/') {
        return None;
    }
    Some((service, field))
}

/// The flow-proxy parameter a DFP field becomes, if any.
fn parameter_for(field: &str) -> Option<&'static str> {
    FIELDS
        .iter()
        .find(|(dfp, _)| dfp.eq_ignore_ascii_case(field))
        .map(|&(_, parameter)| parameter)
}

/// Turns one service's fields into the reconfigure query they stand for, and parses it.
fn convert(service: &str, mut fields: Vec<(&str, &[u8])>) -> DockerFlowService {
    // Sorted so that the ignored list and the first error do not depend on the input order.
    fields.sort_unstable();
    let mut ignored_fields = Vec::new();
    let mut query = vec![("serviceName".to_string(), service.to_string())];
    let mut not_text: Option<SpecError> = None;
    for (field, value) in fields {
        if value.is_empty() {
            continue;
        }
        let Some(parameter) = parameter_for(field) else {
            ignored_fields.push(field.to_string());
            continue;
        };
        match std::str::from_utf8(value) {
            Ok(text) => query.push((parameter.to_string(), text.to_string())),
            Err(_) => {
                not_text.get_or_insert_with(|| {
                    spec_error(
                        parameter,
                        format!("the value of Docker Flow Proxy's `{field}` is not UTF-8 text"),
                    )
                });
            }
        }
    }
    // A bad service name is the error that matters most; report it before a bad value.
    let spec = match not_text {
        Some(error) => ServiceName::parse("serviceName", service).and(Err(error)),
        None => ServiceSpec::from_query(&query),
    };
    DockerFlowService {
        service: service.to_string(),
        spec,
        ignored_fields,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{PathType, Port, ReqMode};

    fn entries(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(key, value)| (key.to_string(), value.to_vec()))
            .collect()
    }

    /// The one service the entries hold.
    fn only(pairs: &[(&str, &[u8])]) -> DockerFlowService {
        let mut services = services_from_docker_flow(&entries(pairs));
        assert_eq!(services.len(), 1, "one service expected: {services:?}");
        services.remove(0)
    }

    fn spec_of(service: &DockerFlowService) -> &ServiceSpec {
        match &service.spec {
            Ok(spec) => spec,
            Err(error) => panic!("{} did not convert: {error}", service.service),
        }
    }

    fn error_of(service: &DockerFlowService) -> &SpecError {
        match &service.spec {
            Ok(spec) => panic!("{} was accepted as {spec:?}", service.service),
            Err(error) => error,
        }
    }

    fn paths(spec: &ServiceSpec) -> Vec<&str> {
        spec.destinations()[0]
            .service_path()
            .iter()
            .map(|p| p.as_str())
            .collect()
    }

    #[test]
    fn full_service_converts_to_the_same_route() {
        let service = only(&[
            ("docker-flow/go-demo/color", b"blue"),
            ("docker-flow/go-demo/consultemplatebepath", b""),
            ("docker-flow/go-demo/consultemplatefepath", b""),
            (
                "docker-flow/go-demo/domain",
                b"Demo.Example.com,*.example.org",
            ),
            ("docker-flow/go-demo/hostname", b""),
            ("docker-flow/go-demo/path", b"/demo,/api"),
            ("docker-flow/go-demo/pathtype", b"path_dir"),
            ("docker-flow/go-demo/port", b"8080"),
            ("docker-flow/go-demo/skipcheck", b"true"),
        ]);
        assert_eq!(service.service, "go-demo");
        // Fields DFP wrote empty are absent, not ignored.
        assert!(service.ignored_fields.is_empty(), "{service:?}");
        let spec = spec_of(&service);
        assert_eq!(spec.service_name().as_str(), "go-demo");
        assert_eq!(spec.consul_service_name(), "go-demo-blue");
        assert!(spec.skip_check());
        assert_eq!(spec.path_type(), PathType::PathDir);
        assert_eq!(spec.acl_name(), None);
        let [dest] = spec.destinations() else {
            panic!("one destination expected: {spec:?}")
        };
        assert_eq!(dest.index(), 0);
        assert_eq!(paths(spec), ["/demo", "/api"]);
        let domains: Vec<String> = dest
            .service_domain()
            .iter()
            .map(|d| d.to_string())
            .collect();
        assert_eq!(domains, ["demo.example.com", "*.example.org"]);
        assert_eq!(dest.port().map(Port::get), Some(8080));
        assert_eq!(dest.src_port(), None);
        assert_eq!(dest.req_mode(), ReqMode::Http);
    }

    #[test]
    fn a_minimal_service_takes_the_defaults() {
        // What DFP wrote for a service registered with servicePath only.
        let service = only(&[
            ("docker-flow/web/color", b""),
            ("docker-flow/web/domain", b""),
            ("docker-flow/web/path", b"/web"),
            ("docker-flow/web/pathtype", b""),
            ("docker-flow/web/skipcheck", b"false"),
        ]);
        let spec = spec_of(&service);
        assert_eq!(spec.consul_service_name(), "web");
        assert!(!spec.skip_check());
        assert_eq!(spec.path_type(), PathType::PathBeg);
        assert_eq!(paths(spec), ["/web"]);
        assert!(spec.destinations()[0].service_domain().is_empty());
        assert_eq!(spec.destinations()[0].port(), None);
    }

    #[test]
    fn services_are_grouped_by_name_whatever_the_key_order() {
        let services = services_from_docker_flow(&entries(&[
            ("docker-flow/go-demo/path", b"/demo"),
            ("docker-flow/service/go-demo", b"swarm"),
            ("docker-flow/api/port", b"9000"),
            ("docker-flow/service/api", b"swarm"),
            ("docker-flow/go-demo/color", b"green"),
            ("docker-flow/api/path", b"/api,/v2"),
        ]));
        let names: Vec<&str> = services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["api", "go-demo"]);
        let api = spec_of(&services[0]);
        assert_eq!(paths(api), ["/api", "/v2"]);
        assert_eq!(api.destinations()[0].port().map(Port::get), Some(9000));
        assert_eq!(api.service_color(), None);
        let demo = spec_of(&services[1]);
        assert_eq!(paths(demo), ["/demo"]);
        assert_eq!(demo.consul_service_name(), "go-demo-green");
        assert_eq!(demo.destinations()[0].port(), None);
    }

    #[test]
    fn fields_without_an_equivalent_are_reported_as_ignored() {
        let service = only(&[
            ("docker-flow/go-demo/path", b"/demo"),
            ("docker-flow/go-demo/scale", b"3"),
            ("docker-flow/go-demo/hostname", b"go-demo.internal"),
            (
                "docker-flow/go-demo/consultemplatefepath",
                b"/tmpl/fe.ctmpl",
            ),
            (
                "docker-flow/go-demo/consultemplatebepath",
                b"/tmpl/be.ctmpl",
            ),
            ("docker-flow/go-demo/cert", b"-----BEGIN CERTIFICATE-----"),
            ("docker-flow/go-demo/path.1", b"/other"),
            ("docker-flow/go-demo/serviceName", b"someone-else"),
            ("docker-flow/go-demo/distribute", b""),
        ]);
        assert_eq!(
            service.ignored_fields,
            [
                "cert",
                "consultemplatebepath",
                "consultemplatefepath",
                "hostname",
                "path.1",
                "scale",
                "serviceName",
            ]
        );
        let spec = spec_of(&service);
        // Nothing ignored leaks into the spec: no second destination, no other name.
        assert_eq!(spec.service_name().as_str(), "go-demo");
        assert_eq!(spec.destinations().len(), 1);
        assert_eq!(paths(spec), ["/demo"]);
    }

    #[test]
    fn field_names_match_without_regard_to_case() {
        let service = only(&[
            ("docker-flow/go-demo/Path", b"/demo"),
            ("docker-flow/go-demo/PATHTYPE", b"path"),
            ("docker-flow/go-demo/SkipCheck", b"true"),
            ("docker-flow/go-demo/Color", b"blue"),
        ]);
        assert!(service.ignored_fields.is_empty(), "{service:?}");
        let spec = spec_of(&service);
        assert_eq!(paths(spec), ["/demo"]);
        assert_eq!(spec.path_type(), PathType::Path);
        assert!(spec.skip_check());
        assert_eq!(spec.consul_service_name(), "go-demo-blue");

        // Two spellings of one field are one parameter given twice.
        let twice = only(&[
            ("docker-flow/go-demo/PATH", b"/a"),
            ("docker-flow/go-demo/path", b"/b"),
        ]);
        assert_eq!(error_of(&twice).parameter, "servicePath");
    }

    #[test]
    fn values_that_could_break_the_config_are_rejected_naming_the_parameter() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("path", b"/a b", "servicePath"),
            ("path", b"/a\nbackend evil", "servicePath"),
            ("path", b"/a#b", "servicePath"),
            (
                "domain",
                b"example.com\n    acl x always_true",
                "serviceDomain",
            ),
            ("domain", b"a.com b.com", "serviceDomain"),
            ("color", b"blue#", "serviceColor"),
            ("pathtype", b"path_beg if TRUE", "pathType"),
            ("port", b"80\n", "port"),
            ("skipcheck", b"yes", "skipCheck"),
        ];
        for &(field, value, parameter) in cases {
            let key = format!("docker-flow/go-demo/{field}");
            let mut pairs: Vec<(&str, &[u8])> = vec![(key.as_str(), value)];
            if field != "path" {
                pairs.push(("docker-flow/go-demo/path", b"/demo"));
            }
            let service = only(&pairs);
            assert_eq!(
                error_of(&service).parameter,
                parameter,
                "{field} = {value:?}"
            );
        }
    }

    #[test]
    fn a_value_that_is_not_utf8_is_an_error_naming_the_parameter() {
        let service = only(&[
            ("docker-flow/go-demo/path", b"/demo"),
            ("docker-flow/go-demo/domain", b"caf\xe9.example.com"),
        ]);
        let error = error_of(&service);
        assert_eq!(error.parameter, "serviceDomain");
        assert!(error.message.contains("UTF-8"), "{error}");

        // An ignored field's value is never read, so its encoding does not matter.
        let ignored = only(&[
            ("docker-flow/go-demo/path", b"/demo"),
            ("docker-flow/go-demo/cert", b"\x30\x82\xff"),
        ]);
        assert_eq!(ignored.ignored_fields, ["cert"]);
        assert_eq!(paths(spec_of(&ignored)), ["/demo"]);
    }

    #[test]
    fn a_segment_that_is_not_a_service_name_is_an_error_naming_service_name() {
        for pairs in [
            &[("docker-flow/-rm/path", b"/demo".as_slice())][..],
            // Even when a value is also bad, the name is what is reported.
            &[("docker-flow/a b/path", b"/d\xffemo".as_slice())][..],
        ] {
            let service = only(pairs);
            assert_eq!(error_of(&service).parameter, "serviceName", "{service:?}");
        }
    }

    #[test]
    fn a_service_without_a_route_is_an_error() {
        // Docker Flow (the deployment tool) alone wrote only these.
        let service = only(&[
            ("docker-flow/go-demo/color", b"blue"),
            ("docker-flow/go-demo/scale", b"2"),
            ("docker-flow/go-demo/path", b""),
        ]);
        assert_eq!(error_of(&service).parameter, "servicePath");
        assert_eq!(service.ignored_fields, ["scale"]);
    }

    #[test]
    fn keys_of_another_shape_are_skipped() {
        let services = services_from_docker_flow(&entries(&[
            ("docker-flow/go-demo", b"/demo"),
            ("docker-flow/go-demo/", b"/demo"),
            ("docker-flow/go-demo/path/1", b"/demo"),
            ("docker-flow//path", b"/demo"),
            ("docker-flow/service/go-demo", b"swarm"),
            ("Docker-Flow/go-demo/path", b"/demo"),
            ("flow-proxy/services/go-demo", b"{}"),
            ("other/docker-flow/go-demo/path", b"/demo"),
            ("docker-flowx/go-demo/path", b"/demo"),
            ("docker-flow/kept/path", b"/kept"),
        ]));
        let names: Vec<&str> = services.iter().map(|s| s.service.as_str()).collect();
        assert_eq!(names, ["kept"]);
        assert_eq!(paths(spec_of(&services[0])), ["/kept"]);
        assert!(services[0].ignored_fields.is_empty());
    }
}
