//! Where a new plain service's rules go in the map routing of the last complete render, found
//! without rendering: what lets a new `serviceName` + `servicePath` service cost about the same
//! with 10,000 services routed as with one.
//!
//! A complete render keeps, for each main frontend (`http`, and `https` when certificates exist),
//! its rules in order (their [`RuleKey`]s) with the map segment each plain rule joined and how
//! many entries it added ([`RoutingIndex`]; the `maps` module says what a segment is). A new
//! path-only plain rule R sorts among the path-only rules, after every rule with a domain, so
//! only path-only rules (of path segments, or keeping their acls) come after it. R joins a
//! segment S, and the frontend's text stays the same, when:
//! - the rule just before R is a plain path rule of S (so S is the last path segment, and nothing
//!   that could block it came between); or, when the rule before R is none of a path segment (so
//!   R joins no earlier segment), the rule just after R is the first of S: R starts a segment
//!   that S's rules all join, with S's number, and its map line (which names only the file)
//!   stands where S's stood;
//! - no key of S's rules before R is one of R's keys or a proper prefix of one (S takes R);
//! - no key of S's rules after R starts with one of R's keys (each of them is still taken).
//!
//! The rules after R then see the same segments as before (R only adds keys to S, and no later
//! rule is of another kind), so nothing else moves; R's entries go into S's map file after the
//! entries of S's rules before R, as a complete render writes them. Otherwise
//! [`RoutingIndex::place`] answers `None` and the caller renders everything.

use std::sync::Arc;

use imbl::Vector;

use super::maps::{MapFile, MapKind, PlainRoute};
use super::view::{plain_route, rule_view, FrontendKind, RuleKey};
use super::BackendPool;
use crate::spec::{DomainAlgo, ServiceSpec};

/// Where the main frontends' rules went in a complete render.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingIndex {
    frontends: Vec<FrontendIndex>,
    /// `RenderSettings::service_domain_algo` of the render (rules sort by it).
    domain_algo: DomainAlgo,
}

/// One main frontend's rules, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FrontendIndex {
    name: String,
    kind: FrontendKind,
    rules: Vector<IndexedRule>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexedRule {
    key: RuleKey,
    /// `None` for a rule that keeps its acls.
    placed: Option<Arc<PlacedRule>>,
}

/// A plain rule in a map segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlacedRule {
    pub(super) route: PlainRoute,
    /// Its segment: the frontend's map file `<frontend>-<segment + 1>.map`.
    pub(super) segment: usize,
    /// How many entries it added to the file (keys an earlier rule had are left out).
    pub(super) added: usize,
}

impl FrontendIndex {
    /// The rules of frontend `name`, rendered as `kind`: each key with where it went.
    pub(super) fn new(
        name: String,
        kind: FrontendKind,
        rules: impl Iterator<Item = (RuleKey, Option<PlacedRule>)>,
    ) -> FrontendIndex {
        FrontendIndex {
            name,
            kind,
            rules: rules
                .map(|(key, placed)| IndexedRule {
                    key,
                    placed: placed.map(Arc::new),
                })
                .collect(),
        }
    }

    /// Where path rule `route` (sorting at `key`) goes: its segment, its place among the rules
    /// and how many of the segment's entries come before its own; `None` when it would not just
    /// join a segment (see the module doc).
    fn insertion(&self, key: &RuleKey, route: &PlainRoute) -> Option<(usize, usize, usize)> {
        let position = self
            .rules
            .binary_search_by(|rule| rule.key.cmp(key))
            .err()?;
        let path_segment = |at: Option<usize>| {
            let placed = self.rules.get(at?)?.placed.as_ref()?;
            (placed.route.kind == MapKind::Path).then_some(placed.segment)
        };
        // The segment of the rule before, else the one the next rule leads (then led by R).
        let (segment, leads) = match path_segment(position.checked_sub(1)) {
            Some(segment) => (segment, false),
            None => (path_segment(Some(position))?, true),
        };
        let mut entries_before = 0;
        for (at, rule) in self.rules.iter().enumerate() {
            let Some(other) = rule
                .placed
                .as_ref()
                .filter(|other| other.segment == segment)
            else {
                continue;
            };
            if leads && at < position {
                // The next rule is not the first of its segment.
                return None;
            }
            let keys = || other.route.keys.iter();
            let clash = if at < position {
                entries_before += other.added;
                keys().any(|earlier| {
                    route
                        .keys
                        .iter()
                        .any(|new| new.starts_with(earlier.as_str()))
                })
            } else {
                keys().any(|later| route.keys.iter().any(|new| later.starts_with(new.as_str())))
            };
            if clash {
                return None;
            }
        }
        Some((segment, position, entries_before))
    }
}

impl RoutingIndex {
    pub(super) fn new(frontends: Vec<FrontendIndex>, domain_algo: DomainAlgo) -> RoutingIndex {
        RoutingIndex {
            frontends,
            domain_algo,
        }
    }

    /// The index and the map files after `spec`, a new service whose every destination sits in
    /// a pool backend of `pool`, is routed through the maps `maps` of the render this index comes
    /// from; `None` unless each of its rules is a path-only plain rule that just joins a segment
    /// in every main frontend (see the module doc).
    pub fn place(
        &self,
        spec: &ServiceSpec,
        pool: &BackendPool,
        maps: &[MapFile],
    ) -> Option<(RoutingIndex, Vec<MapFile>)> {
        if self.frontends.is_empty() {
            // Nothing was routed through maps (a replaced `http-frontend.hbs`).
            return None;
        }
        let mut index = self.clone();
        let mut maps = maps.to_vec();
        for frontend in &mut index.frontends {
            for destination in spec.destinations() {
                pool.number_of(spec.service_name(), destination)?;
                let backend = pool.backend_name(spec, destination);
                let rule = rule_view(spec, destination, frontend.kind, self.domain_algo, backend);
                let route = plain_route(&rule)?;
                let key = RuleKey::of(spec, destination, self.domain_algo);
                if route.kind != MapKind::Path || !key.path_only() {
                    return None;
                }
                let (segment, position, entries_before) = frontend.insertion(&key, &route)?;
                let name = format!("{}-{}.map", frontend.name, segment + 1);
                let map = maps.iter_mut().find(|map| map.name == name)?;
                let mut entries: Vec<(String, String)> = Vec::with_capacity(route.keys.len());
                for key in &route.keys {
                    if !entries.iter().any(|(known, _)| known == key) {
                        entries.push((key.clone(), route.backend.clone()));
                    }
                }
                let added = entries.len();
                if entries_before > map.entries.len() {
                    return None;
                }
                for (offset, entry) in entries.into_iter().enumerate() {
                    map.entries.insert(entries_before + offset, entry);
                }
                frontend.rules.insert(
                    position,
                    IndexedRule {
                        key,
                        placed: Some(Arc::new(PlacedRule {
                            route,
                            segment,
                            added,
                        })),
                    },
                );
            }
        }
        Some((index, maps))
    }
}
