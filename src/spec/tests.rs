//! Tests of query parsing, validation and the stored JSON shape.

use super::*;

fn q(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses `pairs` as a reconfigure query (shared by the parameter groups' own tests).
pub(super) fn parse(pairs: &[(&str, &str)]) -> Result<ServiceSpec, SpecError> {
    ServiceSpec::from_query(&q(pairs))
}

/// Asserts the query is refused; its error.
pub(super) fn rejected(pairs: &[(&str, &str)]) -> SpecError {
    match parse(pairs) {
        Ok(spec) => panic!("{pairs:?} was accepted as {spec:?}"),
        Err(error) => error,
    }
}

#[test]
fn minimal_query_routes_one_path_with_defaults() {
    let spec = parse(&[("serviceName", "go-demo"), ("servicePath", "/demo")]).unwrap();
    assert_eq!(spec.service_name().as_str(), "go-demo");
    assert_eq!(spec.consul_service_name(), "go-demo");
    assert_eq!(spec.ordering_name(), "go-demo");
    assert!(!spec.skip_check());
    assert_eq!(spec.path_type(), PathType::PathBeg);
    let [dest] = spec.destinations() else {
        panic!("one destination expected: {spec:?}")
    };
    assert_eq!(dest.index(), 0);
    assert_eq!(dest.service_path()[0].as_str(), "/demo");
    assert_eq!(dest.req_mode(), ReqMode::Http);
    assert_eq!(dest.port(), None);
    assert_eq!(dest.src_port(), None);
}

#[test]
fn all_parameters_and_indexed_destinations() {
    let spec = parse(&[
        ("serviceName", "shop"),
        ("serviceColor", "blue"),
        ("aclName", "00-shop"),
        ("skipCheck", "1"),
        ("pathType", "path_dir"),
        ("servicePath", "/api,/v2/api"),
        ("serviceDomain", "Shop.Example.com,*.shop.io"),
        ("port", "8080"),
        ("servicePath.2", "^/img/[a-z]+.png$"),
        ("pathType.2", "path_reg"),
        ("srcPort.2", "8081"),
        ("reqMode.1", "tcp"),
        ("srcPort.1", "5432"),
        ("port.1", "5433"),
    ])
    .unwrap();
    assert_eq!(spec.consul_service_name(), "shop-blue");
    assert_eq!(spec.ordering_name(), "00-shop");
    assert!(spec.skip_check());
    let dests = spec.destinations();
    assert_eq!(
        dests.iter().map(Destination::index).collect::<Vec<_>>(),
        [0, 1, 2]
    );
    assert_eq!(dests[0].effective_path_type(&spec), PathType::PathDir);
    assert_eq!(dests[0].service_path().len(), 2);
    let domains: Vec<String> = dests[0]
        .service_domain()
        .iter()
        .map(|d| d.to_string())
        .collect();
    assert_eq!(domains, ["shop.example.com", "*.shop.io"]);
    assert_eq!(dests[0].port().map(Port::get), Some(8080));
    assert_eq!(dests[1].req_mode(), ReqMode::Tcp);
    assert_eq!(dests[1].src_port().map(Port::get), Some(5432));
    assert_eq!(dests[1].port().map(Port::get), Some(5433));
    assert_eq!(dests[2].effective_path_type(&spec), PathType::PathReg);
    assert_eq!(dests[2].src_port().map(Port::get), Some(8081));
}

#[test]
fn domain_only_and_wildcard_domains() {
    let spec = parse(&[("serviceName", "web"), ("serviceDomain", "*example.com")]).unwrap();
    let domain = &spec.destinations()[0].service_domain()[0];
    assert!(domain.is_wildcard());
    assert_eq!(domain.host_pattern(), "example.com");
    let spec = parse(&[("serviceName", "web"), ("serviceDomain", "*.example.com")]).unwrap();
    assert_eq!(
        spec.destinations()[0].service_domain()[0].host_pattern(),
        ".example.com"
    );
    assert!(spec.destinations()[0].service_path().is_empty());
}

#[test]
fn path_end_and_path_sub_need_no_leading_slash() {
    let spec = parse(&[
        ("serviceName", "img"),
        ("pathType", "path_end"),
        ("servicePath", ".png"),
    ])
    .unwrap();
    assert_eq!(spec.destinations()[0].service_path()[0].as_str(), ".png");
    assert!(parse(&[
        ("serviceName", "img"),
        ("pathType", "path_sub"),
        ("servicePath", "thumb")
    ])
    .is_ok());
}

#[test]
fn service_wide_path_type_applies_to_every_destination_unless_overridden() {
    let spec = parse(&[
        ("serviceName", "s"),
        ("pathType", "path"),
        ("servicePath", "/exact"),
        ("servicePath.1", "/also-exact"),
        ("servicePath.2", "/prefix"),
        ("pathType.2", "path_beg"),
    ])
    .unwrap();
    let types: Vec<PathType> = spec
        .destinations()
        .iter()
        .map(|d| d.effective_path_type(&spec))
        .collect();
    assert_eq!(types, [PathType::Path, PathType::Path, PathType::PathBeg]);
}

#[test]
fn injection_attempts_and_bad_values_name_the_parameter() {
    let base = ("serviceName", "go-demo");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[base, ("servicePath", "/demo\nbackend x")], "servicePath"),
        (&[base, ("servicePath", "/a b")], "servicePath"),
        (&[base, ("servicePath", "/a#b")], "servicePath"),
        (&[base, ("servicePath", "/a\"b")], "servicePath"),
        (&[base, ("servicePath", "/a'b")], "servicePath"),
        (&[base, ("servicePath", "/a\\b")], "servicePath"),
        (&[base, ("servicePath", "/a\rb")], "servicePath"),
        (&[base, ("servicePath", "/a\tb")], "servicePath"),
        (&[base, ("servicePath", "/a\u{0}b")], "servicePath"),
        (&[base, ("servicePath", "/a$b")], "servicePath"),
        (&[base, ("servicePath", "a,,b")], "servicePath"),
        (&[base, ("servicePath", "/a,,/b")], "servicePath"),
        (&[base, ("servicePath", "")], "servicePath"),
        (&[base, ("servicePath", "/a,/a")], "servicePath"),
        (&[base, ("servicePath", "demo")], "servicePath"),
        (
            &[base, ("servicePath.1", "/ok"), ("servicePath.3", "/x y")],
            "servicePath.3",
        ),
        (
            &[base, ("pathType", "path_reg"), ("servicePath", "^/a\\d")],
            "servicePath",
        ),
        (
            &[base, ("pathType", "path_reg"), ("servicePath", "^/a b")],
            "servicePath",
        ),
        (
            &[base, ("pathType", "path_end"), ("servicePath", "-i")],
            "servicePath",
        ),
        (
            &[base, ("pathType", "path_nope"), ("servicePath", "/a")],
            "pathType",
        ),
        (
            &[base, ("servicePath", "/a"), ("pathType.1", "path")],
            "servicePath.1",
        ),
        (
            &[("serviceName", "go demo"), ("servicePath", "/a")],
            "serviceName",
        ),
        (
            &[("serviceName", "-go"), ("servicePath", "/a")],
            "serviceName",
        ),
        (
            &[("serviceName", "a\nb"), ("servicePath", "/a")],
            "serviceName",
        ),
        (&[("servicePath", "/a")], "serviceName"),
        (&[("serviceName", ""), ("servicePath", "/a")], "serviceName"),
        (
            &[("serviceName", &"a".repeat(65)), ("servicePath", "/a")],
            "serviceName",
        ),
        (
            &[base, ("servicePath", &format!("/{}", "a".repeat(600)))],
            "servicePath",
        ),
        (
            &[base, ("servicePath", "/a"), ("serviceColor", "blue.green")],
            "serviceColor",
        ),
        (
            &[
                base,
                ("servicePath", "/a"),
                ("serviceColor", &"b".repeat(33)),
            ],
            "serviceColor",
        ),
        (
            &[base, ("servicePath", "/a"), ("aclName", "a#b")],
            "aclName",
        ),
        (
            &[base, ("servicePath", "/a"), ("skipCheck", "yes")],
            "skipCheck",
        ),
        (&[base, ("serviceDomain", "exa mple.com")], "serviceDomain"),
        (&[base, ("serviceDomain", "example..com")], "serviceDomain"),
        (&[base, ("serviceDomain", "-example.com")], "serviceDomain"),
        (
            &[base, ("serviceDomain", "example.com:8080")],
            "serviceDomain",
        ),
        (&[base, ("serviceDomain", "ex_ample.com")], "serviceDomain"),
        (&[base, ("serviceDomain", "*")], "serviceDomain"),
        (&[base, ("serviceDomain", "a.com,")], "serviceDomain"),
        (&[base, ("servicePath", "/a"), ("port", "0")], "port"),
        (&[base, ("servicePath", "/a"), ("port", "70000")], "port"),
        (&[base, ("servicePath", "/a"), ("port", "abc")], "port"),
        (&[base, ("servicePath", "/a"), ("port", "+80")], "port"),
        (&[base, ("servicePath.2", "/a"), ("port.2", "-1")], "port.2"),
        (&[base, ("servicePath", "/a"), ("srcPort", "")], "srcPort"),
        (
            &[base, ("servicePath", "/a"), ("reqMode", "udp")],
            "reqMode",
        ),
        (
            &[base, ("servicePath", "/a"), ("servicePort", "80")],
            "servicePort",
        ),
        (
            &[base, ("servicePath", "/a"), ("ServicePath", "/b")],
            "ServicePath",
        ),
        (
            &[base, ("servicePath", "/a"), ("servicePath", "/b")],
            "servicePath",
        ),
        (
            &[base, ("servicePath", "/a"), ("serviceName", "other")],
            "serviceName",
        ),
        (&[base, ("servicePath.0", "/a")], "servicePath.0"),
        (&[base, ("servicePath.01", "/a")], "servicePath.01"),
        (&[base, ("servicePath.1000", "/a")], "servicePath.1000"),
        (&[base, ("servicePath.x", "/a")], "servicePath.x"),
        (
            &[base, ("servicePath", "/a"), ("serviceColor.1", "blue")],
            "serviceColor.1",
        ),
        (&[base, ("reqMode", "tcp")], "srcPort"),
        (
            &[
                base,
                ("reqMode", "tcp"),
                ("srcPort", "5000"),
                ("servicePath", "/a"),
            ],
            "servicePath",
        ),
        (
            &[
                base,
                ("reqMode.1", "tcp"),
                ("srcPort.1", "5000"),
                ("serviceDomain.1", "a.com"),
            ],
            "serviceDomain.1",
        ),
        (&[base, ("port", "8080")], "servicePath"),
        (&[base], "servicePath"),
        (
            &[
                base,
                ("reqMode", "tcp"),
                ("srcPort", "5000"),
                ("reqMode.1", "tcp"),
                ("srcPort.1", "5000"),
            ],
            "srcPort.1",
        ),
        (
            &[
                base,
                ("servicePath", "/a"),
                ("srcPort", "5000"),
                ("reqMode.1", "tcp"),
                ("srcPort.1", "5000"),
            ],
            "srcPort.1",
        ),
    ];
    for (pairs, parameter) in cases {
        let error = rejected(pairs);
        assert_eq!(
            error.parameter, *parameter,
            "{pairs:?} rejected for the wrong parameter: {error}"
        );
        assert!(!error.message.is_empty());
        assert!(
            !error.to_string().contains('\n'),
            "an error message must stay on one line: {error:?}"
        );
    }
}

#[test]
fn error_message_names_the_parameter_and_the_problem() {
    let error = rejected(&[("serviceName", "a"), ("servicePath.1", "/demo\nbackend x")]);
    let text = error.to_string();
    assert!(text.starts_with("parameter `servicePath.1`: "), "{text}");
    assert!(text.contains("newline"), "{text}");
    let error = rejected(&[("serviceName", "a"), ("servicePath", "/a"), ("bogus", "1")]);
    assert!(error.message.contains("not supported"), "{error}");
    let error = rejected(&[
        ("serviceName", "a"),
        ("servicePath", "/a"),
        ("port", "1"),
        ("port", "2"),
    ]);
    assert!(error.message.contains("more than once"), "{error}");
}

#[test]
fn two_http_destinations_may_share_a_source_port() {
    let spec = parse(&[
        ("serviceName", "a"),
        ("servicePath", "/a"),
        ("srcPort", "8081"),
        ("servicePath.1", "/b"),
        ("srcPort.1", "8081"),
    ])
    .unwrap();
    assert_eq!(spec.destinations().len(), 2);
}

#[test]
fn remove_reads_only_the_service_name() {
    let (name, ignored) = service_name_from_query(&q(&[("serviceName", "go-demo")])).unwrap();
    assert_eq!(name.as_str(), "go-demo");
    assert!(ignored.is_empty());
    let error = service_name_from_query(&q(&[])).unwrap_err();
    assert_eq!(error.parameter, "serviceName");
    let error = service_name_from_query(&q(&[("serviceName", "a b")])).unwrap_err();
    assert_eq!(error.parameter, "serviceName");
    let error =
        service_name_from_query(&q(&[("serviceName", "a"), ("servicePath", "/a")])).unwrap_err();
    assert_eq!(error.parameter, "servicePath");
}

#[test]
fn json_round_trip_keeps_every_value() {
    let spec = parse(&[
        ("serviceName", "shop"),
        ("serviceColor", "green"),
        ("aclName", "zz"),
        ("skipCheck", "true"),
        ("servicePath", "/api"),
        ("serviceDomain", "*.shop.io"),
        ("port", "8080"),
        ("reqMode.1", "tcp"),
        ("srcPort.1", "5432"),
        ("servicePath.2", "^/x$"),
        ("pathType.2", "path_reg"),
    ])
    .unwrap();
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["ServiceName"], "shop");
    assert_eq!(json["ServiceColor"], "green");
    assert_eq!(json["AclName"], "zz");
    assert_eq!(json["SkipCheck"], true);
    assert_eq!(json["PathType"], "path_beg");
    assert_eq!(json["ServiceDest"][0]["Index"], 0);
    assert_eq!(json["ServiceDest"][0]["ServicePath"][0], "/api");
    assert_eq!(json["ServiceDest"][0]["ServiceDomain"][0], "*.shop.io");
    assert_eq!(json["ServiceDest"][0]["Port"], 8080);
    assert_eq!(json["ServiceDest"][0]["SrcPort"], serde_json::Value::Null);
    assert_eq!(json["ServiceDest"][0]["PathType"], serde_json::Value::Null);
    assert_eq!(json["ServiceDest"][0]["ReqMode"], "http");
    assert_eq!(json["ServiceDest"][1]["ReqMode"], "tcp");
    assert_eq!(json["ServiceDest"][1]["SrcPort"], 5432);
    assert_eq!(json["ServiceDest"][2]["PathType"], "path_reg");
    let back: ServiceSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, spec);
}

#[test]
fn minimal_stored_json_takes_defaults() {
    let spec: ServiceSpec = serde_json::from_str(
        r#"{"ServiceName":"go-demo","ServiceDest":[{"Index":0,"ServicePath":["/demo"]}]}"#,
    )
    .unwrap();
    assert_eq!(
        spec,
        parse(&[("serviceName", "go-demo"), ("servicePath", "/demo")]).unwrap()
    );
}

#[test]
fn invalid_stored_specs_are_rejected_on_read() {
    let cases = [
        r#"{"ServiceName":"go demo","ServiceDest":[{"Index":0,"ServicePath":["/demo"]}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/demo\nbackend x"]}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"],"Port":0}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"],"Port":70000}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":1,"ReqMode":"tcp"}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"]},{"Index":0,"ServicePath":["/b"]}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServiceDomain":["a b.com"]}]}"#,
        r#"{"ServiceName":"go","PathType":"regex","ServiceDest":[{"Index":0,"ServicePath":["/a"]}]}"#,
    ];
    for json in cases {
        let result: Result<ServiceSpec, _> = serde_json::from_str(json);
        assert!(result.is_err(), "accepted invalid stored spec {json}");
    }
    let error = serde_json::from_str::<ServiceSpec>(
        r#"{"ServiceName":"go","ServiceDest":[{"Index":2,"ServicePath":["/a b"]}]}"#,
    )
    .unwrap_err();
    assert!(error.to_string().contains("servicePath.2"), "{error}");
}

#[test]
fn service_name_deserialization_validates() {
    assert!(serde_json::from_str::<ServiceName>(r#""go-demo""#).is_ok());
    assert!(serde_json::from_str::<ServiceName>(r#""go demo""#).is_err());
}

#[test]
fn instances_accept_ip_literals_and_hostnames_only() {
    let v4 = Instance::new("10.0.0.1", 8080).unwrap();
    assert_eq!((v4.address(), v4.port()), ("10.0.0.1", 8080));
    let v6 = Instance::new("FD00:0:0::1", 80).unwrap();
    assert_eq!(v6.address(), "fd00::1");
    assert!(v6.is_ipv6());
    assert_eq!(
        Instance::new("Node-1.Consul", 80).unwrap().address(),
        "node-1.consul"
    );
    for bad in [
        "",
        "a b",
        "10.0.0.1:80",
        "[::1]",
        "host\nbackend",
        "-a.com",
        "a..b",
        "a#b",
        "fe80::1%eth0",
    ] {
        let error = Instance::new(bad, 80).unwrap_err();
        assert_eq!(error.parameter, "ServiceAddress", "{bad:?}");
    }
    assert_eq!(
        Instance::new("10.0.0.1", 0).unwrap_err().parameter,
        "ServicePort"
    );
}

/// A domain of exactly `length` characters: labels of 63 `a`s joined by dots, then a shorter one.
fn domain_of_length(length: usize) -> String {
    let mut domain = String::new();
    while domain.len() < length {
        if !domain.is_empty() {
            domain.push('.');
        }
        let left = length - domain.len();
        // Never end on a lone dot: leave at least one character for the next label.
        let label = if left > 64 { 63 } else { left.min(63) };
        domain.push_str(&"a".repeat(label));
    }
    domain
}

/// Asserts the query is accepted.
pub(super) fn accepted(pairs: &[(&str, &str)]) -> ServiceSpec {
    parse(pairs).unwrap_or_else(|error| panic!("{pairs:?} was refused: {error}"))
}

/// Asserts the query is refused naming `parameter`, with every `needle` in the message.
fn refused_with(pairs: &[(&str, &str)], parameter: &str, needles: &[&str]) {
    let error = rejected(pairs);
    assert_eq!(error.parameter, parameter, "{error}");
    for needle in needles {
        assert!(error.message.contains(needle), "`{needle}` in: {error}");
    }
}

#[test]
fn every_value_length_limit_is_exact_and_named_with_its_number() {
    let path = |length: usize| format!("/{}", "a".repeat(length - 1));
    let name = |length: usize| "a".repeat(length);
    let base = ("servicePath", "/a");
    let cases: [(&str, usize, String, String); 5] = [
        ("serviceName", 64, name(64), name(65)),
        ("serviceColor", 32, name(32), name(33)),
        ("aclName", 64, name(64), name(65)),
        ("servicePath", 512, path(512), path(513)),
        (
            "serviceDomain",
            253,
            domain_of_length(253),
            domain_of_length(254),
        ),
    ];
    for (parameter, limit, longest, too_long) in cases {
        let with = |value: &str| -> Vec<(String, String)> {
            let mut pairs = q(&[("serviceName", "svc"), base]);
            pairs.retain(|(k, _)| k != parameter);
            pairs.push((parameter.to_string(), value.to_string()));
            pairs
        };
        assert_eq!(longest.chars().count(), limit);
        ServiceSpec::from_query(&with(&longest))
            .unwrap_or_else(|error| panic!("{parameter} of {limit} characters: {error}"));
        let error = ServiceSpec::from_query(&with(&too_long)).unwrap_err();
        assert_eq!(error.parameter, parameter, "{error}");
        let expected = format!("{} characters, at most {limit}", limit + 1);
        assert!(error.message.contains(&expected), "{error}");
    }
}

#[test]
fn path_reg_patterns_and_wildcard_domains_have_the_same_length_limits() {
    let regex = format!("^/{}", "a".repeat(510));
    accepted(&[
        ("serviceName", "svc"),
        ("pathType", "path_reg"),
        ("servicePath", &regex),
    ]);
    refused_with(
        &[
            ("serviceName", "svc"),
            ("pathType", "path_reg"),
            ("servicePath", &format!("{regex}a")),
        ],
        "servicePath",
        &["513 characters, at most 512"],
    );
    // The DNS limit counts the labels, not a leading `*.`.
    let longest = domain_of_length(253);
    accepted(&[
        ("serviceName", "svc"),
        ("serviceDomain", &format!("*.{longest}")),
    ]);
    let too_long = format!("*.{}", domain_of_length(254));
    refused_with(
        &[("serviceName", "svc"), ("serviceDomain", &too_long)],
        "serviceDomain",
        &["254 characters, at most 253", "\"*.aaa"],
    );
    refused_with(
        &[("serviceName", "svc"), ("serviceDomain", &"a".repeat(64))],
        "serviceDomain",
        &["1 to 63 characters"],
    );
    accepted(&[("serviceName", "svc"), ("serviceDomain", &"a".repeat(63))]);
}

#[test]
fn a_length_is_counted_in_characters_not_bytes() {
    // 20 two-byte characters: a bad character, not "too long".
    refused_with(
        &[
            ("serviceName", "svc"),
            ("servicePath", "/a"),
            ("serviceColor", &"é".repeat(20)),
        ],
        "serviceColor",
        &["contains character U+00E9"],
    );
}

#[test]
fn paths_and_domains_per_destination_are_capped_so_their_acl_line_fits_haproxy() {
    let paths = |count: usize| -> String {
        (0..count)
            .map(|i| format!("/p{i}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let domains = |count: usize| -> String {
        (0..count)
            .map(|i| format!("d{i}.example.com"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let spec = accepted(&[("serviceName", "svc"), ("servicePath.3", &paths(50))]);
    assert_eq!(spec.destinations()[0].service_path().len(), 50);
    refused_with(
        &[("serviceName", "svc"), ("servicePath.3", &paths(51))],
        "servicePath.3",
        &["51 paths given: at most 50 per destination"],
    );
    // 62 paths were HAProxy's "too many words" before the cap; 64 was the old cap.
    refused_with(
        &[("serviceName", "svc"), ("servicePath", &paths(62))],
        "servicePath",
        &["at most 50"],
    );
    let spec = accepted(&[("serviceName", "svc"), ("serviceDomain", &domains(50))]);
    assert_eq!(spec.destinations()[0].service_domain().len(), 50);
    refused_with(
        &[("serviceName", "svc"), ("serviceDomain", &domains(51))],
        "serviceDomain",
        &["51 domains given: at most 50 per destination"],
    );
}

#[test]
fn destinations_per_service_are_capped_and_the_first_one_over_is_named() {
    let query = |count: u16| -> Vec<(String, String)> {
        let mut pairs = vec![("serviceName".to_string(), "svc".to_string())];
        // Indices 0, 10, 20, …; given in reverse, so the error cannot depend on the order.
        for index in (0..count).rev() {
            let name = if index == 0 {
                "servicePath".to_string()
            } else {
                format!("servicePath.{}", index * 10)
            };
            pairs.push((name, format!("/d{index}")));
        }
        pairs
    };
    let spec = ServiceSpec::from_query(&query(64)).expect("64 destinations");
    assert_eq!(spec.destinations().len(), 64);
    let error = ServiceSpec::from_query(&query(65)).unwrap_err();
    assert_eq!(error.parameter, "servicePath.640", "{error}");
    assert!(
        error
            .message
            .contains("65 destinations given: at most 64 per service"),
        "{error}"
    );

    // The stored form has the same limit.
    let stored = |count: u32| {
        let destinations: Vec<_> = (0..count)
            .map(|i| serde_json::json!({"Index": i, "ServicePath": [format!("/d{i}")]}))
            .collect();
        serde_json::json!({"ServiceName": "svc", "ServiceDest": destinations}).to_string()
    };
    let spec: ServiceSpec = serde_json::from_str(&stored(64)).expect("64 stored destinations");
    assert_eq!(spec.destinations().len(), 64);
    let error = serde_json::from_str::<ServiceSpec>(&stored(65))
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("65 destinations given: at most 64 per service"),
        "{error}"
    );
}

#[test]
fn the_index_and_port_limits_carry_their_numbers() {
    accepted(&[("serviceName", "svc"), ("servicePath.999", "/a")]);
    refused_with(
        &[("serviceName", "svc"), ("servicePath.1000", "/a")],
        "servicePath.1000",
        &["1 to 999"],
    );
    accepted(&[
        ("serviceName", "svc"),
        ("servicePath", "/a"),
        ("port", "65535"),
    ]);
    refused_with(
        &[
            ("serviceName", "svc"),
            ("servicePath", "/a"),
            ("port", "65536"),
        ],
        "port",
        &["1 to 65535"],
    );
    refused_with(
        &[("serviceName", "svc"), ("servicePath", "/a"), ("port", "0")],
        "port",
        &["1 to 65535"],
    );
}

#[test]
fn instance_hostnames_have_the_dns_limits() {
    let longest = domain_of_length(253);
    assert_eq!(Instance::new(&longest, 80).unwrap().address(), longest);
    let error = Instance::new(&domain_of_length(254), 80).unwrap_err();
    assert!(error.message.contains("at most 253 characters"), "{error}");
    assert!(Instance::new(&"a".repeat(64), 80).is_err());
    assert!(Instance::new(&"a".repeat(63), 80).is_ok());
    assert!(Instance::new("10.0.0.1", 0).is_err());
}

// ---- Edge rules: redirects, header rules, method rules -------------------------------------

#[test]
fn edge_rules_round_trip_through_json() {
    let spec = parse(&[
        ("serviceName", "shop"),
        ("serviceDomain", "shop.io"),
        ("httpsOnly", "true"),
        ("httpsRedirectCode", "308"),
        ("redirectFromDomain", "old.shop.io,Shop.com"),
        ("allowedMethods", "GET,HEAD"),
        ("servicePath.1", "/admin"),
        ("deniedMethods.1", "DELETE"),
        ("denyHttp.1", "1"),
        ("redirectWhenHttpProto", "true"),
        ("addReqHeader", "X-A one two,X-B b"),
        ("setResHeader", "Strict-Transport-Security max-age=31536000"),
        ("delReqHeader", "X-Secret"),
        ("delResHeader", "Server,X-Powered-By"),
    ])
    .unwrap();
    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["RedirectWhenHttpProto"], true);
    assert_eq!(json["AddReqHeader"][0], "X-A one two");
    assert_eq!(json["AddReqHeader"][1], "X-B b");
    assert_eq!(
        json["SetResHeader"][0],
        "Strict-Transport-Security max-age=31536000"
    );
    assert_eq!(json["DelResHeader"][1], "X-Powered-By");
    assert_eq!(json["SetReqHeader"], serde_json::json!([]));
    let first = &json["ServiceDest"][0];
    assert_eq!(first["HttpsOnly"], true);
    assert_eq!(first["HttpsRedirectCode"], 308);
    assert_eq!(first["RedirectFromDomain"][1], "shop.com");
    assert_eq!(first["AllowedMethods"], serde_json::json!(["GET", "HEAD"]));
    assert_eq!(first["DenyHttp"], false);
    // The unsuffixed httpsOnly, httpsRedirectCode and allowedMethods are destination 1's
    // defaults; redirectFromDomain belongs to destination 0's domains only.
    let second = &json["ServiceDest"][1];
    assert_eq!(second["HttpsOnly"], true);
    assert_eq!(second["HttpsRedirectCode"], 308);
    assert_eq!(second["RedirectFromDomain"], serde_json::json!([]));
    assert_eq!(second["AllowedMethods"], serde_json::json!(["GET", "HEAD"]));
    assert_eq!(second["DeniedMethods"][0], "DELETE");
    assert_eq!(second["DenyHttp"], true);
    let back: ServiceSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, spec);
    assert_eq!(back.destinations()[1].redirect_code().get(), 308);
}

#[test]
fn bad_edge_rule_values_name_their_parameter() {
    let base = [("serviceName", "go"), ("servicePath", "/a")];
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("addReqHeader", "X-A a\nb")], "addReqHeader"),
        (&[("setReqHeader", "X-A \"q\"")], "setReqHeader"),
        (&[("addResHeader", "X-A %[src]")], "addResHeader"),
        (&[("setResHeader", "X-A a#b")], "setResHeader"),
        (&[("setResHeader", "X-A $HOME")], "setResHeader"),
        (&[("setResHeader", "X-A  padded")], "setResHeader"),
        (&[("addReqHeader", "NoValue")], "addReqHeader"),
        (&[("addReqHeader", "X(A) v")], "addReqHeader"),
        (&[("delReqHeader", "X-A v")], "delReqHeader"),
        (&[("delResHeader", "X-A,X-A")], "delResHeader"),
        (
            &[
                ("httpsOnly.1", "true"),
                ("servicePath.1", "/b"),
                ("httpsOnly", "2"),
            ],
            "httpsOnly",
        ),
        (&[("httpsRedirectCode", "300")], "httpsRedirectCode"),
        (&[("httpsRedirectCode", "0302")], "httpsRedirectCode"),
        (&[("redirectFromDomain", "old.io")], "redirectFromDomain"),
        (&[("allowedMethods", "get")], "allowedMethods"),
        (
            &[("deniedMethods.3", "DEL ETE"), ("servicePath.3", "/c")],
            "deniedMethods.3",
        ),
        (
            &[("redirectWhenHttpProto.1", "true")],
            "redirectWhenHttpProto.1",
        ),
        (&[("addReqHeader.1", "X-A a")], "addReqHeader.1"),
    ];
    for (extra, parameter) in cases {
        let mut pairs = base.to_vec();
        pairs.extend_from_slice(extra);
        let error = parse(&pairs).unwrap_err();
        assert_eq!(&error.parameter, parameter, "{extra:?}: {error}");
    }
}

#[test]
fn redirect_from_domain_needs_an_exact_target_and_cannot_loop() {
    let with = |domains: &str, from: &str| {
        parse(&[
            ("serviceName", "go"),
            ("serviceDomain", domains),
            ("redirectFromDomain", from),
        ])
    };
    assert!(with("new.io", "old.io").is_ok());
    for (domains, from) in [
        ("*.new.io", "old.io"),
        ("new.io", "*.old.io"),
        ("new.io,www.new.io", "www.new.io"),
    ] {
        let error = with(domains, from).unwrap_err();
        assert_eq!(error.parameter, "redirectFromDomain", "{domains} {from}");
    }
}

#[test]
fn http_rules_are_refused_on_tcp_destinations() {
    for rule in ["httpsOnly.1", "denyHttp.1"] {
        let error = parse(&[
            ("serviceName", "db"),
            ("reqMode.1", "tcp"),
            ("srcPort.1", "5432"),
            (rule, "true"),
        ])
        .unwrap_err();
        assert_eq!(error.parameter, rule, "{error}");
    }
}

#[test]
fn method_lists_stay_within_one_haproxy_line() {
    let methods: Vec<String> = (0..33)
        .map(|i| format!("M{}", "X".repeat(i % 5 + 1)) + &"A".repeat(i / 5))
        .collect();
    let error = parse(&[
        ("serviceName", "go"),
        ("servicePath", "/a"),
        ("allowedMethods", &methods.join(",")),
    ])
    .unwrap_err();
    assert_eq!(error.parameter, "allowedMethods", "{error}");
}

#[test]
fn invalid_stored_edge_rules_are_rejected_on_read() {
    let cases = [
        r#"{"ServiceName":"go","AddReqHeader":["X-A a\nb"],"ServiceDest":[{"Index":0,"ServicePath":["/a"]}]}"#,
        r#"{"ServiceName":"go","DelResHeader":["X-A b"],"ServiceDest":[{"Index":0,"ServicePath":["/a"]}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"],"HttpsRedirectCode":200}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"],"AllowedMethods":["get"]}]}"#,
        r#"{"ServiceName":"go","ServiceDest":[{"Index":0,"ServicePath":["/a"],"RedirectFromDomain":["old.io"]}]}"#,
    ];
    for json in cases {
        let result: Result<ServiceSpec, _> = serde_json::from_str(json);
        assert!(result.is_err(), "accepted invalid stored spec {json}");
    }
}

#[test]
fn https_only_is_refused_on_a_destination_with_its_own_src_port() {
    let error = parse(&[
        ("serviceName", "go"),
        ("servicePath", "/a"),
        ("srcPort", "8081"),
        ("httpsOnly", "true"),
    ])
    .unwrap_err();
    assert_eq!(error.parameter, "httpsOnly", "{error}");
}

#[test]
fn redirected_domains_are_claimed_routes() {
    let spec = parse(&[
        ("serviceName", "go"),
        ("serviceDomain", "new.io"),
        ("redirectFromDomain", "old.io"),
    ])
    .unwrap();
    let claimed: Vec<String> = spec
        .route_claims(80)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(claimed, ["every path of new.io", "every path of old.io"]);
}

#[test]
fn header_rules_need_an_http_destination() {
    let error = parse(&[
        ("serviceName", "db"),
        ("reqMode", "tcp"),
        ("srcPort", "5432"),
        ("setResHeader", "X-A b"),
    ])
    .unwrap_err();
    assert_eq!(error.parameter, "setResHeader", "{error}");
}

/// `secret` under SHA-512 crypt with the salt `saltsalt` (`openssl passwd -6 -salt saltsalt secret`).
const SECRET_SHA512: &str =
    "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1";
/// `secret` under SHA-256 crypt (`openssl passwd -5 -salt saltsalt secret`).
const SECRET_SHA256: &str = "$5$saltsalt$0IyaXrmV7.sGNS6tirgqHLqX/G.FBvgkYA.lpPdS5sA";

fn verifies(hash: &PasswordHash, clear: &str) -> bool {
    use sha_crypt::{PasswordVerifier, ShaCrypt};
    ShaCrypt::SHA512
        .verify_password(clear.as_bytes(), hash.as_str())
        .is_ok()
}

#[test]
fn clear_passwords_are_hashed_when_parsed_and_never_stored_or_shown() {
    let spec = parse(&[
        ("serviceName", "admin"),
        ("servicePath", "/admin"),
        ("users", "alice:wonderland,bob:builder"),
    ])
    .unwrap();
    let users = spec.users();
    assert_eq!(users.len(), 2);
    assert_eq!(users[0].name().as_str(), "alice");
    assert!(users[0].password().as_str().starts_with("$6$"));
    assert!(verifies(users[0].password(), "wonderland"));
    assert!(!verifies(users[0].password(), "builder"));
    assert!(verifies(users[1].password(), "builder"));

    let stored = serde_json::to_string(&spec).unwrap();
    assert!(!stored.contains("wonderland") && !stored.contains("builder"));
    assert!(stored.contains(users[0].password().as_str()));
    let answer = spec.to_answer_json().to_string();
    assert!(
        !answer.contains("wonderland") && !answer.contains("$6$"),
        "{answer}"
    );
    assert!(
        answer.contains(r#"{"Username":"alice","PasswordHash":"***"}"#),
        "{answer}"
    );
    assert!(!format!("{spec:?}").contains("$6$"));

    let read_back: ServiceSpec = serde_json::from_str(&stored).unwrap();
    assert_eq!(read_back, spec);
}

#[test]
fn encrypted_passwords_must_be_sha_crypt_hashes() {
    for hash in [
        SECRET_SHA512,
        SECRET_SHA256,
        "$6$rounds=10000$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1",
    ] {
        let spec = parse(&[
            ("serviceName", "admin"),
            ("servicePath", "/admin"),
            ("users", &format!("alice:{hash}")),
            ("usersPassEncrypted", "true"),
        ])
        .unwrap();
        assert_eq!(spec.users()[0].password().as_str(), hash);
    }
    for bad in [
        "secret",
        "$1$saltsalt$9xy1btjgzLYfb7hivXtC//",
        "$6$saltsalt$short",
        "$6$salt salt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1",
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO\n",
        "$6$rounds=10$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1",
        "$6$a$b$c",
    ] {
        let error = rejected(&[
            ("serviceName", "admin"),
            ("servicePath", "/admin"),
            ("users", &format!("alice:{bad}")),
            ("usersPassEncrypted", "true"),
        ]);
        assert_eq!(error.parameter, "users");
        assert!(error.message.contains("SHA-512"), "{error}");
        assert!(!error.to_string().contains(bad), "the error repeats the value: {error}");
    }
}

#[test]
fn bad_user_lists_name_the_parameter_and_never_repeat_a_password() {
    for (users, expected) in [
        ("alice", "item 1 is not `user:password`"),
        ("alice:wonderland,bob", "item 2 is not `user:password`"),
        ("alice:", "user `alice` has an empty password"),
        (
            "alice:wonderland,alice:again",
            "user `alice` is listed twice",
        ),
        (":wonderland", "a user name must not be empty"),
        ("al ice:wonderland", "contains a space"),
    ] {
        let error = rejected(&[
            ("serviceName", "admin"),
            ("servicePath", "/admin"),
            ("users", users),
        ]);
        assert_eq!(error.parameter, "users", "{users}");
        assert!(error.message.contains(expected), "{users}: {error}");
        assert!(!error.to_string().contains("wonderland"), "{error}");
    }
}

#[test]
fn ignore_authorization_is_per_destination_and_survives_storage() {
    let spec = parse(&[
        ("serviceName", "shop"),
        ("servicePath.1", "/shop"),
        ("servicePath.2", "/shop/health"),
        ("ignoreAuthorization.2", "true"),
        ("users", &format!("alice:{SECRET_SHA512}")),
        ("usersPassEncrypted", "1"),
    ])
    .unwrap();
    let flags: Vec<bool> = spec
        .destinations()
        .iter()
        .map(|d| d.ignore_authorization())
        .collect();
    assert_eq!(flags, [false, true]);
    let stored = serde_json::to_value(&spec).unwrap();
    assert_eq!(stored["ServiceDest"][1]["IgnoreAuthorization"], true);
    let read_back: ServiceSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(read_back, spec);
    assert_eq!(
        rejected(&[
            ("serviceName", "shop"),
            ("servicePath", "/shop"),
            ("ignoreAuthorization", "maybe")
        ])
        .parameter,
        "ignoreAuthorization"
    );
}

#[test]
fn a_stored_spec_with_a_clear_or_malformed_password_is_rejected_on_read() {
    for hash in ["wonderland", "$6$x$y z"] {
        let json = serde_json::json!({
            "ServiceName": "admin",
            "ServiceDest": [{ "Index": 0, "ServicePath": ["/admin"] }],
            "Users": [{ "Username": "alice", "PasswordHash": hash }],
        });
        let error = serde_json::from_value::<ServiceSpec>(json).unwrap_err();
        assert!(error.to_string().contains("users"), "{error}");
        assert!(!error.to_string().contains(hash), "{error}");
    }
}

#[test]
fn a_repeated_clear_password_keeps_the_current_hash_and_a_new_one_is_hashed_afresh() {
    let query = |users: &str| {
        q(&[
            ("serviceName", "admin"),
            ("servicePath", "/admin"),
            ("users", users),
        ])
    };
    let first = ServiceSpec::from_query(&query("alice:wonderland,bob:builder")).unwrap();
    let again =
        ServiceSpec::from_query_keeping(&query("alice:wonderland,bob:builder"), Some(&first))
            .unwrap()
            .0;
    assert_eq!(again, first, "same passwords, same hashes");

    let changed =
        ServiceSpec::from_query_keeping(&query("alice:looking-glass,bob:builder"), Some(&first))
            .unwrap()
            .0;
    assert_ne!(changed.users()[0], first.users()[0]);
    assert!(verifies(changed.users()[0].password(), "looking-glass"));
    assert_eq!(changed.users()[1], first.users()[1]);

    // Without the current spec (or another service's), a clear password gets a fresh salt.
    let fresh = ServiceSpec::from_query(&query("alice:wonderland,bob:builder")).unwrap();
    assert_ne!(fresh.users()[0], first.users()[0]);
    let other = ServiceSpec::from_query(&q(&[
        ("serviceName", "other"),
        ("servicePath", "/other"),
        ("users", "alice:wonderland"),
    ]))
    .unwrap();
    let not_shared = ServiceSpec::from_query_keeping(
        &q(&[
            ("serviceName", "other"),
            ("servicePath", "/other"),
            ("users", "alice:wonderland"),
        ]),
        Some(&first),
    )
    .unwrap()
    .0;
    assert_ne!(not_shared.users()[0], first.users()[0]);
    assert_ne!(not_shared.users()[0], other.users()[0]);
}

#[test]
fn tls_per_service_flags_are_read_stored_and_checked() {
    let spec = accepted(&[
        ("serviceName", "secure"),
        ("serviceDomain", "a.example.com,*.example.org"),
        ("verifyClientSsl", "true"),
        ("sslVerifyNone", "true"),
    ]);
    assert!(spec.verify_client_ssl());
    assert!(spec.ssl_verify_none());
    let stored = serde_json::to_string(&spec).unwrap();
    assert_eq!(serde_json::from_str::<ServiceSpec>(&stored).unwrap(), spec);
    let plain = accepted(&[("serviceName", "plain"), ("servicePath", "/")]);
    assert!(!plain.verify_client_ssl() && !plain.ssl_verify_none());

    refused_with(
        &[
            ("serviceName", "s"),
            ("servicePath", "/"),
            ("verifyClientSsl", "true"),
        ],
        "verifyClientSsl",
        &["serviceDomain", "SNI"],
    );
    refused_with(
        &[
            ("serviceName", "s"),
            ("serviceDomain", "*example.com"),
            ("verifyClientSsl", "true"),
        ],
        "verifyClientSsl",
        &["*.example.com"],
    );
    refused_with(
        &[
            ("serviceName", "s"),
            ("serviceDomain", "a.example.com"),
            ("srcPort.1", "5000"),
            ("reqMode.1", "tcp"),
            ("port.1", "5000"),
            ("verifyClientSsl", "true"),
        ],
        "verifyClientSsl",
        &["tcp"],
    );
    refused_with(
        &[
            ("serviceName", "s"),
            ("servicePath", "/"),
            ("sslVerifyNone", "maybe"),
        ],
        "sslVerifyNone",
        &[],
    );
}
// Docker Flow Proxy's callers: unsuffixed defaults, ignored parameters, did-you-mean.

#[test]
fn unsuffixed_port_is_the_default_of_indexed_destinations() {
    let spec = parse(&[
        ("serviceName", "go-demo"),
        ("port", "8080"),
        ("servicePath.1", "/a"),
        ("servicePath.2", "/b"),
        ("port.2", "9090"),
    ])
    .unwrap();
    let ports: Vec<(u16, Option<u16>)> = spec
        .destinations()
        .iter()
        .map(|d| (d.index(), d.port().map(Port::get)))
        .collect();
    assert_eq!(ports, [(1, Some(8080)), (2, Some(9090))]);
}

#[test]
fn unsuffixed_destination_with_a_path_or_domain_exists_and_lends_its_defaults() {
    let spec = parse(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/api"),
        ("reqMode", "http"),
        ("httpsOnly", "true"),
        ("port", "8080"),
        ("serviceDomain.1", "admin.example.com"),
    ])
    .unwrap();
    let [zero, one] = spec.destinations() else {
        panic!("two destinations expected: {spec:?}")
    };
    assert_eq!((zero.index(), one.index()), (0, 1));
    assert_eq!(one.port().map(Port::get), Some(8080));
    assert!(one.https_only());
    assert!(one.service_path().is_empty());
}

#[test]
fn unsuffixed_tcp_destination_stays_one_with_or_without_indexed_ones() {
    let alone = parse(&[
        ("serviceName", "db"),
        ("reqMode", "tcp"),
        ("srcPort", "5432"),
        ("port", "5432"),
    ])
    .unwrap();
    assert_eq!(alone.destinations().len(), 1);
    let error = rejected(&[
        ("serviceName", "db"),
        ("reqMode", "tcp"),
        ("srcPort", "5432"),
        ("servicePath.1", "/a"),
    ]);
    assert_eq!(error.parameter, "servicePath.1", "{error}");
    // `reqMode=tcp` alone is the default of the indexed tcp destinations.
    let spec = parse(&[
        ("serviceName", "db"),
        ("reqMode", "tcp"),
        ("srcPort.1", "5432"),
        ("srcPort.2", "5433"),
    ])
    .unwrap();
    assert!(spec
        .destinations()
        .iter()
        .all(|d| d.req_mode() == ReqMode::Tcp && d.index() > 0));
}

#[test]
fn a_bad_unsuffixed_default_is_named_unsuffixed() {
    let error = rejected(&[
        ("serviceName", "go-demo"),
        ("port", "http"),
        ("servicePath.1", "/a"),
    ]);
    assert_eq!(error.parameter, "port", "{error}");
}

#[test]
fn unsuffixed_destination_only_parameter_without_path_is_still_refused() {
    let error = rejected(&[
        ("serviceName", "go-demo"),
        ("redirectFromDomain", "old.example.com"),
        ("servicePath.1", "/a"),
    ]);
    assert_eq!(error.parameter, "servicePath", "{error}");
}

#[test]
fn docker_flow_proxy_only_parameters_are_ignored_with_a_reason() {
    let (spec, ignored) = query::build_spec(
        &q(&[
            ("serviceName", "go-demo"),
            ("servicePath", "/demo"),
            ("distribute", "true"),
            ("replicas", "3"),
            ("discoveryType", "swarm"),
            ("proxyInstanceName", "docker-flow"),
            ("fromListener", "true"),
            ("recreate", "true"),
        ]),
        None,
    )
    .unwrap();
    assert_eq!(spec.destinations().len(), 1);
    let names: Vec<&str> = ignored.iter().map(|i| i.parameter.as_str()).collect();
    assert_eq!(
        names,
        [
            "distribute",
            "replicas",
            "discoveryType",
            "proxyInstanceName",
            "fromListener",
            "recreate"
        ]
    );
    assert!(ignored.iter().all(|i| !i.reason.is_empty()));
    let error = rejected(&[("serviceName", "go-demo"), ("aclName", "a b")]);
    assert_eq!(
        error.parameter, "aclName",
        "aclName is still a reconfigure parameter"
    );
}

#[test]
fn remove_ignores_acl_name_and_distribute() {
    let (name, ignored) = service_name_from_query(&q(&[
        ("serviceName", "go-demo"),
        ("aclName", "05-go-demo"),
        ("distribute", "true"),
    ]))
    .unwrap();
    assert_eq!(name.as_str(), "go-demo");
    let names: Vec<&str> = ignored.iter().map(|i| i.parameter.as_str()).collect();
    assert_eq!(names, ["aclName", "distribute"]);
    let error = service_name_from_query(&q(&[("servicename", "go-demo")])).unwrap_err();
    assert!(
        error.message.contains("did you mean `serviceName`?"),
        "{error}"
    );
}

#[test]
fn unknown_parameters_name_the_closest_known_one() {
    for (written, expected) in [
        ("servicepath", "servicePath"),
        ("servicePth", "servicePath"),
        ("serviceDomian", "serviceDomain"),
        ("servicePaht.2", "servicePath.2"),
        ("prot", "port"),
        ("PORT.1", "port.1"),
        ("httpsonly", "httpsOnly"),
    ] {
        let error = rejected(&[
            ("serviceName", "go-demo"),
            ("servicePath", "/a"),
            (written, "1"),
        ]);
        assert_eq!(error.parameter, written);
        assert!(
            error
                .message
                .contains(&format!("did you mean `{expected}`?")),
            "{written}: {error}"
        );
    }
    let error = rejected(&[("serviceName", "go-demo"), ("xForwardedProto", "5")]);
    assert_eq!(error.parameter, "xForwardedProto");
    assert!(!error.message.contains("did you mean"), "{error}");
}

#[test]
fn service_domain_algo_takes_the_four_matches_in_both_forms_and_round_trips() {
    for (written, algo) in [
        ("hdr", DomainAlgo::Hdr),
        ("hdr(host)", DomainAlgo::Hdr),
        ("hdr_beg", DomainAlgo::HdrBeg),
        ("hdr_end(host)", DomainAlgo::HdrEnd),
        ("hdr_dom", DomainAlgo::HdrDom),
    ] {
        let spec = parse(&[
            ("serviceName", "web"),
            ("serviceDomain", "example.com"),
            ("serviceDomainAlgo", written),
        ])
        .unwrap();
        assert_eq!(spec.service_domain_algo(), Some(algo));
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["ServiceDomainAlgo"], algo.as_str());
        let back: ServiceSpec = serde_json::from_value(json).unwrap();
        assert_eq!(back, spec);
    }
    let plain = parse(&[("serviceName", "web"), ("serviceDomain", "example.com")]).unwrap();
    assert_eq!(plain.service_domain_algo(), None);
    for bad in ["req.ssl_sni", "hdr_sub", "HDR", "hdr(host) -m reg .*", ""] {
        let error = rejected(&[
            ("serviceName", "web"),
            ("serviceDomain", "example.com"),
            ("serviceDomainAlgo", bad),
        ]);
        assert_eq!(error.parameter, "serviceDomainAlgo", "{bad}: {error}");
    }
}

#[test]
fn a_path_starting_with_a_parenthesis_is_refused_for_every_path_type() {
    // HAProxy warns that such a first pattern is "likely a mistake" (found by the injection
    // proof with a stored `path_end` spec).
    for path_type in [
        "path", "path_beg", "path_dir", "path_end", "path_reg", "path_sub",
    ] {
        let error = rejected(&[
            ("serviceName", "demo"),
            ("servicePath", "(a)"),
            ("pathType", path_type),
        ]);
        assert_eq!(error.parameter, "servicePath", "{path_type}");
        // Types that need a leading `/` refuse it for that first.
        assert!(
            error.message.contains("must not start with `(`")
                || error.message.contains("must start with `/`"),
            "{error}"
        );
    }
    let spec = parse(&[
        ("serviceName", "demo"),
        ("servicePath", "^(a|b)$"),
        ("pathType", "path_reg"),
    ])
    .expect("a regex starting with ^( is accepted");
    assert_eq!(spec.destinations()[0].service_path()[0].as_str(), "^(a|b)$");
}

#[test]
fn docker_flow_parameters_without_a_meaning_here_are_refused_with_the_reason() {
    let error = rejected(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("consulTemplateBePath", "/tmpl/be.tmpl"),
    ]);
    assert_eq!(error.parameter, "consulTemplateBePath");
    assert!(error.message.contains("templateBePath"), "{error}");
    let error = rejected(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("usersSecret", "monitoring"),
    ]);
    assert_eq!(error.parameter, "usersSecret");
    assert!(error.message.contains("not supported"), "{error}");
}

#[test]
fn docker_flow_older_names_are_read_as_the_new_ones() {
    let renamed = parse(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("addHeader", "X-Added yes"),
        ("setHeader", "X-Set yes"),
        ("serviceDomain", "example.com"),
        ("serviceDomainMatchAll", "true"),
    ])
    .unwrap();
    let current = parse(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("addReqHeader", "X-Added yes"),
        ("setReqHeader", "X-Set yes"),
        ("serviceDomain", "example.com"),
        ("serviceDomainAlgo", "hdr_dom"),
    ])
    .unwrap();
    assert_eq!(renamed, current);
    let exact = parse(&[
        ("serviceName", "go-demo"),
        ("serviceDomain", "example.com"),
        ("serviceDomainMatchAll", "false"),
    ])
    .unwrap();
    assert_eq!(exact.service_domain_algo(), None);
    let twice = rejected(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("addHeader", "X-A a"),
        ("addReqHeader", "X-B b"),
    ]);
    assert!(twice.message.contains("more than once"), "{twice}");
    let bad = rejected(&[
        ("serviceName", "go-demo"),
        ("servicePath", "/demo"),
        ("serviceDomainMatchAll", "yes please"),
    ]);
    assert_eq!(bad.parameter, "serviceDomainMatchAll");
}

// TLS passthrough by SNI (reqMode=sni).

#[test]
fn sni_destinations_need_a_src_port_and_server_names_and_take_no_http_rules() {
    let spec = parse(&[
        ("serviceName", "vault"),
        ("reqMode", "sni"),
        ("srcPort", "9443"),
        ("serviceDomain", "vault.example.com"),
        ("port", "8200"),
    ])
    .expect("valid");
    let destination = &spec.destinations()[0];
    assert_eq!(destination.req_mode(), ReqMode::Sni);
    assert_eq!(destination.req_mode().haproxy_mode(), "tcp");
    let json = serde_json::to_string(&spec).expect("serializes");
    assert!(json.contains("\"ReqMode\":\"sni\""), "{json}");
    assert_eq!(
        serde_json::from_str::<ServiceSpec>(&json).expect("reads back"),
        spec
    );

    let sni = [("serviceName", "vault"), ("reqMode", "sni")];
    let with = |extra: &[(&'static str, &'static str)]| {
        let mut pairs = sni.to_vec();
        pairs.extend_from_slice(extra);
        rejected(&pairs)
    };
    assert_eq!(
        with(&[("serviceDomain", "a.example.com")]).parameter,
        "srcPort"
    );
    assert_eq!(with(&[("srcPort", "9443")]).parameter, "serviceDomain");
    for (parameter, value) in [
        ("servicePath", "/x"),
        ("httpsOnly", "true"),
        ("denyHttp", "true"),
        ("serviceHeader", "X-A:1"),
        ("userAgent", "curl"),
        ("addReqHeader", "X-A 1"),
        ("sslVerifyNone", "true"),
        ("verifyClientSsl", "true"),
    ] {
        let error = with(&[
            ("srcPort", "9443"),
            ("serviceDomain", "a.example.com"),
            (parameter, value),
        ]);
        assert_eq!(error.parameter, parameter, "{error}");
    }
    assert!(ReqMode::parse("reqMode", "SNI").is_err());
}

#[test]
fn sni_destinations_of_one_service_may_share_a_port_with_each_other_only() {
    let spec = parse(&[
        ("serviceName", "vault"),
        ("reqMode.1", "sni"),
        ("srcPort.1", "9443"),
        ("serviceDomain.1", "a.example.com"),
        ("reqMode.2", "sni"),
        ("srcPort.2", "9443"),
        ("serviceDomain.2", "b.example.com"),
    ])
    .expect("valid");
    let claims: Vec<String> = spec
        .route_claims(80)
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        claims,
        [
            "every path of a.example.com on port 9443 with TLS passthrough (reqMode=sni)",
            "every path of b.example.com on port 9443 with TLS passthrough (reqMode=sni)",
        ]
    );
    let error = rejected(&[
        ("serviceName", "vault"),
        ("reqMode.1", "sni"),
        ("srcPort.1", "9443"),
        ("serviceDomain.1", "a.example.com"),
        ("servicePath.2", "/x"),
        ("srcPort.2", "9443"),
    ]);
    assert_eq!(error.parameter, "srcPort.2");
}
// ---- backend tuning (backend_tuning.rs) ------------------------------------------------------

#[test]
fn backend_tuning_values_are_read_and_normalised() {
    let spec = accepted(&[
        ("serviceName", "shop"),
        ("servicePath", "/shop"),
        ("balance", "url_param userid"),
        ("timeoutServer", "60"),
        ("timeoutTunnel", "1h"),
        ("connectionMode", "http-server-close"),
        ("compressionAlgo", "gzip,deflate"),
        ("compressionType", "text/html text/plain"),
        ("sessionType", "sticky-server"),
        ("checkPath", "/health?deep=1"),
        ("checkInterval", "500ms"),
        ("maxFails", "5"),
        ("observe", "layer7"),
    ]);
    let tuning = spec.backend_tuning();
    assert_eq!(
        tuning.balance.as_ref().map(|b| b.as_config()).as_deref(),
        Some("url_param userid")
    );
    assert_eq!(
        tuning.timeout_server.as_ref().map(|t| t.as_str()),
        Some("60s")
    );
    assert_eq!(
        tuning.timeout_tunnel.as_ref().map(|t| t.as_str()),
        Some("1h")
    );
    assert_eq!(
        tuning.connection_mode,
        Some(ConnectionMode::HttpServerClose)
    );
    assert_eq!(tuning.compression_algo, vec!["gzip", "deflate"]);
    assert_eq!(tuning.compression_type, vec!["text/html", "text/plain"]);
    assert!(tuning.sticky_server);
    assert_eq!(tuning.check_path.as_deref(), Some("/health?deep=1"));
    assert_eq!(tuning.effective_check_interval(), "500ms");
    assert_eq!(tuning.effective_max_fails(), 5);
    assert_eq!(tuning.effective_observe(), Observe::Layer7);

    let json = serde_json::to_value(&spec).unwrap();
    assert_eq!(json["Balance"], "url_param userid");
    assert_eq!(json["TimeoutServer"], "60s");
    assert_eq!(json["CompressionType"], "text/html,text/plain");
    assert_eq!(json["SessionType"], "sticky-server");
    assert_eq!(json["MaxFails"], 5);
    let back: ServiceSpec = serde_json::from_value(json).unwrap();
    assert_eq!(back, spec);

    let defaults = accepted(&[("serviceName", "shop"), ("servicePath", "/shop")]);
    let tuning = defaults.backend_tuning();
    assert_eq!(tuning, &BackendTuning::default());
    assert_eq!(tuning.effective_max_fails(), DEFAULT_MAX_FAILS);
    assert_eq!(tuning.effective_check_interval(), DEFAULT_CHECK_INTERVAL);
    assert_eq!(tuning.effective_observe(), Observe::Layer4);
}

#[test]
fn every_balance_algorithm_flow_proxy_accepts() {
    for algorithm in [
        "roundrobin",
        "static-rr",
        "leastconn",
        "first",
        "source",
        "random",
        "random(2)",
        "uri",
        "url_param session_id",
        "hdr(X-User)",
    ] {
        let spec = accepted(&[
            ("serviceName", "svc"),
            ("servicePath", "/a"),
            ("balance", algorithm),
        ]);
        let written = spec
            .backend_tuning()
            .balance
            .as_ref()
            .map(|b| b.as_config());
        assert_eq!(written.as_deref(), Some(algorithm));
    }
}

#[test]
fn bad_backend_tuning_values_are_refused_naming_the_parameter() {
    let base = [("serviceName", "svc"), ("servicePath", "/a")];
    let with = |extra: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        base.iter().chain(extra).copied().collect()
    };
    let cases: &[(&str, &str, &str)] = &[
        (
            "balance",
            "roundrobin\n    server evil 1.2.3.4:80",
            "not an algorithm",
        ),
        ("balance", "url_param a b", "url_param takes one"),
        ("balance", "hdr(X User)", "hdr(<name>)"),
        ("balance", "hdr(X-User", "not an algorithm"),
        ("balance", "random(0)", "random(<draws>)"),
        ("balance", "rdp-cookie", "not an algorithm"),
        ("balance", "", "not an algorithm"),
        ("timeoutServer", "0", "not a time"),
        ("timeoutServer", "1s 2s", "not a time"),
        ("timeoutServer", "25d", "not a time"),
        ("timeoutServer", "10us", "not a time"),
        ("timeoutTunnel", "-1", "not a time"),
        ("checkInterval", "fast", "not a time"),
        ("connectionMode", "forceclose", "is gone since HAProxy 2.0"),
        (
            "connectionMode",
            "keep-alive",
            "is not one of http-keep-alive",
        ),
        ("compressionAlgo", "brotli", "not an algorithm"),
        ("compressionAlgo", "gzip,gzip", "listed twice"),
        ("compressionType", "text/*", "not a MIME type"),
        ("sessionType", "sticky", "not a session type"),
        ("checkPath", "health", "not a path"),
        ("checkPath", "/health#x", "not a path"),
        ("checkPath", "/he alth", "not a path"),
        ("maxFails", "101", "from 0"),
        ("maxFails", "03", "from 0"),
        ("observe", "layer5", "not a kind of failure"),
    ];
    for (parameter, value, needle) in cases {
        let mut pairs = with(&[]);
        pairs.push((parameter, value));
        if *parameter == "compressionType" {
            pairs.push(("compressionAlgo", "gzip"));
        }
        refused_with(&pairs, parameter, &[needle]);
    }
}

#[test]
fn backend_tuning_rules_between_values() {
    let tcp = [
        ("serviceName", "db"),
        ("reqMode", "tcp"),
        ("srcPort", "5432"),
    ];
    let with = |base: &[(&'static str, &'static str)], extra: (&'static str, &'static str)| {
        let mut pairs: Vec<(&str, &str)> = base.to_vec();
        pairs.push(extra);
        pairs
    };
    refused_with(&with(&tcp, ("balance", "uri")), "balance", &["reqMode=tcp"]);
    refused_with(
        &with(&tcp, ("connectionMode", "httpclose")),
        "connectionMode",
        &["needs an http destination"],
    );
    refused_with(
        &with(&tcp, ("sessionType", "sticky-server")),
        "sessionType",
        &["http"],
    );
    refused_with(
        &with(&tcp, ("checkPath", "/health")),
        "checkPath",
        &["http"],
    );
    refused_with(&with(&tcp, ("observe", "layer7")), "observe", &["http"]);
    accepted(&with(&tcp, ("timeoutClient", "5s")));
    accepted(&with(&tcp, ("balance", "leastconn")));

    let http = [("serviceName", "web"), ("servicePath", "/web")];
    refused_with(
        &with(&http, ("timeoutClient", "5s")),
        "timeoutClient",
        &["reqMode=tcp destinations only"],
    );
    refused_with(
        &with(&http, ("compressionType", "text/html")),
        "compressionType",
        &["needs compressionAlgo"],
    );
    let skipped = [
        ("serviceName", "web"),
        ("servicePath", "/web"),
        ("skipCheck", "true"),
    ];
    for parameter in ["checkPath", "checkInterval", "maxFails", "observe"] {
        let value = match parameter {
            "checkPath" => "/health",
            "checkInterval" => "1s",
            "maxFails" => "2",
            _ => "layer4",
        };
        refused_with(
            &with(&skipped, (parameter, value)),
            parameter,
            &["skipCheck=true"],
        );
    }
}

#[test]
fn stored_backend_tuning_is_validated_on_read() {
    let json = serde_json::json!({
        "ServiceName": "svc",
        "ServiceDest": [{"Index": 0, "ServicePath": ["/a"]}],
        "Balance": "roundrobin\n    server x 1.2.3.4:1",
    });
    let error = serde_json::from_value::<ServiceSpec>(json)
        .unwrap_err()
        .to_string();
    assert!(error.contains("balance"), "{error}");
    let json = serde_json::json!({
        "ServiceName": "svc",
        "ServiceDest": [{"Index": 0, "ServicePath": ["/a"]}],
        "TimeoutServer": "5s",
        "MaxFails": 0,
    });
    let spec: ServiceSpec = serde_json::from_value(json).unwrap();
    assert_eq!(spec.backend_tuning().effective_max_fails(), 0);
}

// ACME (`acme.rs`): letsEncrypt.

#[test]
fn lets_encrypt_is_read_stored_and_needs_an_exact_domain() {
    let spec = accepted(&[
        ("serviceName", "shop"),
        ("serviceDomain", "shop.example.com,*.shop.example.com"),
        ("letsEncrypt", "true"),
    ]);
    assert!(spec.lets_encrypt());
    let exact: Vec<&str> = acme::acme_domains(&spec)
        .iter()
        .map(|domain| domain.host_pattern())
        .collect();
    assert_eq!(exact, ["shop.example.com"]);
    let stored = serde_json::to_string(&spec).unwrap();
    assert!(stored.contains("\"LetsEncrypt\":true"), "{stored}");
    assert_eq!(serde_json::from_str::<ServiceSpec>(&stored).unwrap(), spec);
    let plain = accepted(&[("serviceName", "plain"), ("servicePath", "/")]);
    assert!(!plain.lets_encrypt());

    refused_with(
        &[
            ("serviceName", "s"),
            ("servicePath", "/"),
            ("letsEncrypt", "true"),
        ],
        "letsEncrypt",
        &["serviceDomain", "wildcard"],
    );
    refused_with(
        &[
            ("serviceName", "s"),
            ("serviceDomain", "*.example.com"),
            ("letsEncrypt", "true"),
        ],
        "letsEncrypt",
        &["serviceDomain", "wildcard"],
    );
    refused_with(
        &[
            ("serviceName", "s"),
            ("serviceDomain", "a.example.com"),
            ("letsEncrypt", "yes\n"),
        ],
        "letsEncrypt",
        &[],
    );
}

#[test]
fn route_claims_that_differ_in_any_field_have_different_keys() {
    let claim = RouteClaim {
        src_port: None,
        domain: None,
        path: Some(("path_beg", "/api".to_string())),
        condition: None,
    };
    let variants = [
        RouteClaim {
            src_port: Some(8081),
            ..claim.clone()
        },
        RouteClaim {
            domain: Some("example.com".to_string()),
            ..claim.clone()
        },
        RouteClaim {
            path: Some(("path_reg", "/api".to_string())),
            ..claim.clone()
        },
        RouteClaim {
            path: Some(("path_beg", "/api2".to_string())),
            ..claim.clone()
        },
        RouteClaim {
            path: None,
            ..claim.clone()
        },
        RouteClaim {
            condition: Some("hdr(x-version) 2".to_string()),
            ..claim.clone()
        },
    ];
    let mut keys: Vec<Box<str>> = variants.iter().map(RouteClaim::key).collect();
    keys.push(claim.key());
    let count = keys.len();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), count, "{keys:?}");
    assert_eq!(claim.key(), claim.clone().key());
}
