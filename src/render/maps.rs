//! Routing through HAProxy maps: which rules of an HTTP frontend become map entries, how they are
//! grouped into map files, and the text of those files.
//!
//! A rule is *plain* when one map lookup says exactly what its acls say: `path_beg` paths
//! (keyed on `path`), exactly matched domains with `path_beg` paths (keyed on the lowercased host
//! without its port joined with the path), or exactly matched domains alone (keyed on the host,
//! `map_str`), and nothing else conditions its `use_backend` (see `view.rs`'s `plain_route`).
//!
//! The frontend's sorted rule list stays the one source of order. Consecutive plain rules of the
//! same kind form one *segment*: one map file `maps/<frontend>-<n>.map` and one line
//! `use_backend %[<key>,map_beg(<file>)] if { <key>,map_beg(<file>) -m found }` at the place of
//! its first rule; the other rules keep their own acls and `use_backend` between segments. A
//! plain rule with hosts also joins the last segment of its kind when every rule between that
//! segment's line and the rule has exact hosts, none of them the rule's: no request can match
//! both, so moving it up changes no answer (domain-only and domain+`/` rules, which sort by name
//! among themselves, so make two maps, not one per alternation).
//!
//! HAProxy 2.6 indexes a `map_beg` file without `-i` in a prefix tree and returns the *longest*
//! matching key, whatever the file order (checked against HAProxy: `/a` and `/a/b` → `/a/b/c`
//! picks `/a/b`), while the acls take the *first* matching rule. Within a segment both agree as
//! long as no key of an earlier rule is a proper prefix of a key of a later rule; a rule that
//! would break this starts a new segment. A key already in the segment (an earlier rule routes
//! it) is left out: the earlier rule takes its requests either way. So a segment's entries do not
//! depend on their order, and a runtime `add map` (which appends) routes exactly as the file.
//!
//! Keys and values are validated spec values only (paths: no whitespace, `#`, quote or
//! backslash; domains: letters, digits, `-` and `.`; backend names from service names), so a map
//! line is always exactly two words.

use std::collections::BTreeSet;

use serde::Serialize;

/// The directory of the map files, relative to where HAProxy runs (the data directory).
pub const MAPS_DIR: &str = "maps";

/// The transaction variable holding the request path, for host+path keys (`concat` takes a
/// variable, not a fetch).
const PATH_VAR: &str = "txn.flow_proxy_path";

/// How a plain rule's requests are looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MapKind {
    /// `path_beg` paths only: `path,map_beg`.
    Path,
    /// Exact domains and `path_beg` paths: `<host><path>`, `map_beg`.
    HostPath,
    /// Exact domains only: `<host>`, `map_str`.
    Host,
}

impl MapKind {
    /// The sample expression of the key a request is looked up with.
    fn key_expression(self) -> String {
        let host = "req.hdr(host),field(1,:),lower";
        match self {
            MapKind::Path => "path".to_string(),
            MapKind::HostPath => format!("{host},concat(,{PATH_VAR},)"),
            MapKind::Host => host.to_string(),
        }
    }

    fn converter(self) -> &'static str {
        match self {
            MapKind::Path | MapKind::HostPath => "map_beg",
            MapKind::Host => "map_str",
        }
    }

    /// Whether a key matches every request key it begins (so a shorter key of an earlier rule
    /// could be beaten by a longer key of a later one).
    fn by_prefix(self) -> bool {
        matches!(self, MapKind::Path | MapKind::HostPath)
    }
}

/// What a plain rule puts in a map: its kind, its keys (in its own order) and its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlainRoute {
    pub(super) kind: MapKind,
    pub(super) keys: Vec<String>,
    pub(super) backend: String,
    /// Its exact hosts (lowercase); empty for a path-only rule, which matches any host.
    pub(super) hosts: Vec<String>,
}

impl PlainRoute {
    /// The route of `path_beg` `paths` and exact `domains` (lowercase) to `backend`; `None` when
    /// it has neither.
    pub(super) fn new(paths: &[&str], domains: &[&str], backend: &str) -> Option<PlainRoute> {
        let (kind, keys) = match (paths.is_empty(), domains.is_empty()) {
            (true, true) => return None,
            (false, true) => (MapKind::Path, paths.iter().map(|p| p.to_string()).collect()),
            (true, false) => (
                MapKind::Host,
                domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
            ),
            (false, false) => (
                MapKind::HostPath,
                domains
                    .iter()
                    .flat_map(|d| {
                        paths
                            .iter()
                            .map(move |p| format!("{}{p}", d.to_ascii_lowercase()))
                    })
                    .collect(),
            ),
        };
        Some(PlainRoute {
            kind,
            keys,
            backend: backend.to_string(),
            hosts: domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        })
    }
}

/// One map file: its name in [`MAPS_DIR`] and its entries (key → backend), in rule order.
#[derive(Debug, Clone, Eq)]
pub struct MapFile {
    /// e.g. `http-1.map`.
    pub name: String,
    /// `(key, backend)` pairs; keys are unique. A persistent vector: a copy of the file (the
    /// candidate of a change) costs nothing, and an entry placed in it costs what it adds.
    pub entries: imbl::Vector<(String, String)>,
}

impl PartialEq for MapFile {
    /// Equal files; a file and its unchanged copy are told equal without comparing entries.
    fn eq(&self, other: &MapFile) -> bool {
        self.name == other.name
            && (self.entries.ptr_eq(&other.entries) || self.entries == other.entries)
    }
}

impl MapFile {
    /// A map file of `(key, backend)` entries, for tests.
    #[cfg(test)]
    pub(crate) fn of(name: &str, entries: &[(&str, &str)]) -> MapFile {
        MapFile {
            name: name.to_string(),
            entries: entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The path the config and the Runtime API name it by: `maps/<name>`.
    pub fn config_path(&self) -> String {
        format!("{MAPS_DIR}/{}", self.name)
    }

    /// The file's text: one `<key> <backend>` line per entry.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.entries.len() * 32);
        for (key, backend) in &self.entries {
            text.push_str(key);
            text.push(' ');
            text.push_str(backend);
            text.push('\n');
        }
        text
    }
}

/// Writes `maps` into `<dir>/maps/` (created if needed), for running `haproxy -c` on a rendered
/// configuration in `dir` outside the proxy (the `check` subcommand, tests).
pub fn write_map_files(dir: &std::path::Path, maps: &[MapFile]) -> std::io::Result<()> {
    let maps_dir = dir.join(MAPS_DIR);
    std::fs::create_dir_all(&maps_dir)?;
    for map in maps {
        std::fs::write(maps_dir.join(&map.name), map.text())?;
    }
    Ok(())
}

/// The `use_backend` line of a segment, as the template writes it:
/// `use_backend %[<lookup>] if { <lookup> -m found }`.
#[derive(Debug, Clone, Serialize)]
pub(super) struct MapRouteView {
    /// `<key expression>,<converter>(<file>)`.
    lookup: String,
}

/// A frontend's rules after routing the plain ones through maps.
pub(super) enum Routed<T> {
    /// A rule that keeps its acls and `use_backend`.
    Rule(T),
    /// A segment of plain rules: the first rule (for its place) and the map line.
    Map(T, MapRouteView),
}

/// What [`route_through_maps`] made of a frontend's rules.
pub(super) struct MapRouting<T> {
    pub(super) rules: Vec<Routed<T>>,
    pub(super) maps: Vec<MapFile>,
    /// Whether a host+path segment needs the path variable set.
    pub(super) needs_path_var: bool,
    /// For each rule given, in order: the segment (index into `maps`) it joined and how many
    /// entries it added to it; `None` for a rule that keeps its acls.
    pub(super) placement: Vec<Option<(usize, usize)>>,
}

/// The `http-request` line setting the variable host+path keys read.
pub(super) fn path_var_line() -> String {
    format!("http-request set-var({PATH_VAR}) path")
}

/// A segment being built.
struct Segment {
    kind: MapKind,
    first: usize,
    entries: Vec<(String, String)>,
    keys: BTreeSet<String>,
    /// The hosts of the rules placed after its first rule and not in it.
    hosts_after: BTreeSet<String>,
    /// Whether a rule placed after its first rule and not in it may match any host (a rule
    /// with acls, or a path-only one).
    blocked: bool,
}

impl Segment {
    /// Whether `route` can join: same kind, and no key of the segment is a proper prefix of one
    /// of its new keys (a prefix-tree lookup would then prefer it over the earlier rule).
    fn takes(&self, route: &PlainRoute) -> bool {
        if route.kind != self.kind {
            return false;
        }
        if !self.kind.by_prefix() {
            return true;
        }
        route.keys.iter().all(|key| {
            (1..key.len())
                .filter(|end| key.is_char_boundary(*end))
                .all(|end| !self.keys.contains(&key[..end]))
        })
    }

    /// Whether `route` may move up to this segment's line: no rule between them can match a
    /// request `route` matches (each has exact hosts, none of `route`'s).
    fn reachable(&self, route: &PlainRoute) -> bool {
        !self.blocked
            && (self.hosts_after.is_empty()
                || (!route.hosts.is_empty()
                    && route.hosts.iter().all(|h| !self.hosts_after.contains(h))))
    }

    /// Notes a rule placed after this segment's line and not in it.
    fn passed_by(&mut self, route: Option<&PlainRoute>) {
        match route {
            Some(route) if !route.hosts.is_empty() => {
                self.hosts_after.extend(route.hosts.iter().cloned())
            }
            _ => self.blocked = true,
        }
    }

    /// Adds `route`'s keys; how many were new.
    fn add(&mut self, route: &PlainRoute) -> usize {
        let before = self.entries.len();
        for key in &route.keys {
            // An earlier rule (or an earlier key of this one) already takes these requests.
            if self.keys.insert(key.clone()) {
                self.entries.push((key.clone(), route.backend.clone()));
            }
        }
        self.entries.len() - before
    }
}

/// Routes the plain rules of frontend `frontend` (in rule order) through map files
/// `<frontend>-<n>.map`, keeping the other rules in place; `plain` says which rules are plain.
pub(super) fn route_through_maps<T>(
    frontend: &str,
    rules: Vec<T>,
    plain: impl Fn(&T) -> Option<PlainRoute>,
) -> MapRouting<T> {
    // Each rule, with the segment it joined (by segment number) when plain.
    let mut placed: Vec<(T, Option<usize>)> = Vec::with_capacity(rules.len());
    let mut placement = Vec::with_capacity(rules.len());
    let mut segments: Vec<Segment> = Vec::new();
    // The last segment of each kind: the only one a later rule of that kind may join.
    let mut latest: [Option<usize>; 3] = [None; 3];
    let slot = |kind: MapKind| match kind {
        MapKind::Path => 0,
        MapKind::HostPath => 1,
        MapKind::Host => 2,
    };
    for rule in rules {
        let route = plain(&rule);
        let at = route.as_ref().map(|route| {
            let joins = latest[slot(route.kind)]
                .filter(|at| segments[*at].takes(route) && segments[*at].reachable(route));
            let at = joins.unwrap_or_else(|| {
                segments.push(Segment {
                    kind: route.kind,
                    first: placed.len(),
                    entries: Vec::new(),
                    keys: BTreeSet::new(),
                    hosts_after: BTreeSet::new(),
                    blocked: false,
                });
                segments.len() - 1
            });
            let added = segments[at].add(route);
            latest[slot(route.kind)] = Some(at);
            (at, added)
        });
        placement.push(at);
        let at = at.map(|(at, _)| at);
        for other in latest.iter().flatten() {
            if Some(*other) != at {
                segments[*other].passed_by(route.as_ref());
            }
        }
        placed.push((rule, at));
    }
    let maps: Vec<MapFile> = segments
        .iter()
        .enumerate()
        .map(|(number, segment)| MapFile {
            name: format!("{frontend}-{}.map", number + 1),
            entries: segment.entries.iter().cloned().collect(),
        })
        .collect();
    let mut routed = Vec::with_capacity(placed.len());
    for (position, (rule, segment)) in placed.into_iter().enumerate() {
        match segment {
            None => routed.push(Routed::Rule(rule)),
            Some(at) if segments[at].first == position => {
                let kind = segments[at].kind;
                let lookup = format!(
                    "{},{}({})",
                    kind.key_expression(),
                    kind.converter(),
                    maps[at].config_path()
                );
                routed.push(Routed::Map(rule, MapRouteView { lookup }));
            }
            // Routed by its segment's line.
            Some(_) => {}
        }
    }
    MapRouting {
        rules: routed,
        needs_path_var: segments.iter().any(|s| s.kind == MapKind::HostPath),
        maps,
        placement,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(paths: &[&str], backend: &str) -> Option<PlainRoute> {
        PlainRoute::new(paths, &[], backend)
    }

    /// Rules as (name, plain route or none); the result as lines: `rule <name>` or
    /// `map <file> <entries…>`.
    fn outline(rules: Vec<(&str, Option<PlainRoute>)>) -> (Vec<String>, bool) {
        let routing = route_through_maps("http", rules, |(_, route)| route.clone());
        let mut lines = Vec::new();
        for item in &routing.rules {
            match item {
                Routed::Rule((name, _)) => lines.push(format!("rule {name}")),
                Routed::Map(_, view) => {
                    let file = routing
                        .maps
                        .iter()
                        .find(|m| view.lookup.contains(&m.config_path()))
                        .expect("the line names a map of the frontend");
                    let entries: Vec<String> = file
                        .entries
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    lines.push(format!("map {} {}", file.name, entries.join(" ")));
                }
            }
        }
        (lines, routing.needs_path_var)
    }

    #[test]
    fn consecutive_plain_rules_share_one_map_and_others_keep_their_place() {
        let (lines, path_var) = outline(vec![
            ("api-header", None),
            ("api", path(&["/api"], "api-be1")),
            ("shop", path(&["/shop", "/cart"], "shop-be1")),
            ("legacy", None),
            ("root", path(&["/"], "root-be1")),
        ]);
        assert_eq!(
            lines,
            vec![
                "rule api-header",
                "map http-1.map /api=api-be1 /shop=shop-be1 /cart=shop-be1",
                "rule legacy",
                "map http-2.map /=root-be1",
            ]
        );
        assert!(!path_var);
    }

    #[test]
    fn a_later_longer_key_under_an_earlier_prefix_starts_a_new_map() {
        // `wide` comes first (its longest path is longer) and also claims `/b`: the acls give
        // `/b/x/…` to `wide`, a prefix tree would give it to `narrow`.
        let (lines, _) = outline(vec![
            ("wide", path(&["/a/long/path", "/b"], "wide-be1")),
            ("narrow", path(&["/b/x"], "narrow-be1")),
            ("other", path(&["/c"], "other-be1")),
        ]);
        assert_eq!(
            lines,
            vec![
                "map http-1.map /a/long/path=wide-be1 /b=wide-be1",
                "map http-2.map /b/x=narrow-be1 /c=other-be1",
            ]
        );
    }

    #[test]
    fn a_longer_key_first_and_a_repeated_key_stay_in_one_map() {
        let (lines, _) = outline(vec![
            ("long", path(&["/api/v2"], "long-be1")),
            ("short", path(&["/api", "/api/v2"], "short-be1")),
        ]);
        assert_eq!(
            lines,
            vec!["map http-1.map /api/v2=long-be1 /api=short-be1"]
        );
    }

    #[test]
    fn kinds_do_not_mix_and_host_path_keys_need_the_path_variable() {
        let (lines, path_var) = outline(vec![
            (
                "shop",
                PlainRoute::new(
                    &["/"],
                    &["Shop.example.com", "shop.example.org"],
                    "shop-be1",
                ),
            ),
            (
                "blog",
                PlainRoute::new(&[], &["blog.example.com"], "blog-be1"),
            ),
            ("api", path(&["/api"], "api-be1")),
        ]);
        assert_eq!(
            lines,
            vec![
                "map http-1.map shop.example.com/=shop-be1 shop.example.org/=shop-be1",
                "map http-2.map blog.example.com=blog-be1",
                "map http-3.map /api=api-be1",
            ]
        );
        assert!(path_var);
    }

    #[test]
    fn a_host_rule_moves_up_to_its_kind_past_rules_of_other_hosts_only() {
        let host = |d: &str, b: &str| PlainRoute::new(&[], &[d], b);
        let host_path = |d: &str, b: &str| PlainRoute::new(&["/"], &[d], b);
        // Domain-only and domain+`/` rules sort by name among themselves: their kinds alternate.
        let (lines, _) = outline(vec![
            ("a", host("a.com", "a-be0")),
            ("b", host_path("b.com", "b-be0")),
            ("c", host("c.com", "c-be0")),
            ("d", host_path("d.com", "d-be0")),
        ]);
        assert_eq!(
            lines,
            vec![
                "map http-1.map a.com=a-be0 c.com=c-be0",
                "map http-2.map b.com/=b-be0 d.com/=d-be0",
            ]
        );
        // Not past a rule of the same host, nor past a rule with acls or a path-only one.
        let (lines, _) = outline(vec![
            ("b", host_path("b.com", "b-be0")),
            ("shared", host("shared.com", "shared-be0")),
            ("shared-root", host_path("shared.com", "shared-root-be0")),
            ("acl", None),
            ("e", host("e.com", "e-be0")),
            ("api", path(&["/api"], "api-be0")),
            ("f", host("f.com", "f-be0")),
        ]);
        assert_eq!(
            lines,
            vec![
                "map http-1.map b.com/=b-be0",
                "map http-2.map shared.com=shared-be0",
                "map http-3.map shared.com/=shared-root-be0",
                "rule acl",
                "map http-4.map e.com=e-be0",
                "map http-5.map /api=api-be0",
                "map http-6.map f.com=f-be0",
            ]
        );
    }

    #[test]
    fn map_lines_look_up_the_right_key_and_files_hold_two_words_a_line() {
        let routing = route_through_maps(
            "https",
            vec![
                PlainRoute::new(&["/a"], &["x.io"], "a-be1"),
                PlainRoute::new(&[], &["y.io"], "b-be1"),
                PlainRoute::new(&["/c;v=1"], &[], "c-be1"),
            ],
            Clone::clone,
        );
        let lookups: Vec<String> = routing
            .rules
            .iter()
            .filter_map(|item| match item {
                Routed::Map(_, view) => Some(view.lookup.clone()),
                Routed::Rule(_) => None,
            })
            .collect();
        assert_eq!(
            lookups,
            vec![
                "req.hdr(host),field(1,:),lower,concat(,txn.flow_proxy_path,),map_beg(maps/https-1.map)",
                "req.hdr(host),field(1,:),lower,map_str(maps/https-2.map)",
                "path,map_beg(maps/https-3.map)",
            ]
        );
        assert_eq!(routing.maps[0].text(), "x.io/a a-be1\n");
        assert_eq!(routing.maps[2].text(), "/c;v=1 c-be1\n");
        assert_eq!(
            path_var_line(),
            "http-request set-var(txn.flow_proxy_path) path"
        );
    }
}
