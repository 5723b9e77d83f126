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
//!
//! The last two conditions are checked on the keys of S alone, not on its rules (with 10,000
//! services, one segment holds 10,000 rules): each key of S is kept with the coarse places
//! (group, longest path, conditions) of the first and the last rule holding it, which tell
//! whether a rule holding it comes before or after R. R's keys and each of their prefixes are
//! looked up, and the keys that start with one of R's keys are a range of the sorted keys. When
//! a clashing key's holders have R's own coarse place, the keys cannot tell, and `None` makes the
//! caller render everything.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use imbl::{OrdMap, Vector};

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

/// One main frontend's rules, in order, and the keys of each path segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FrontendIndex {
    name: String,
    kind: FrontendKind,
    rules: Vector<IndexedRule>,
    /// For each path segment (by number), the keys of its rules, each with the coarse places of
    /// the first and the last rule holding it: what tells whether a new rule clashes with the
    /// segment without visiting its rules (and without keeping each rule's keys).
    path_keys: BTreeMap<usize, OrdMap<String, Holders>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IndexedRule {
    key: RuleKey,
    /// `None` for a rule that keeps its acls.
    placed: Option<PlacedAt>,
}

/// Where a plain rule went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PlacedAt {
    kind: MapKind,
    /// Its segment: the frontend's map file `<frontend>-<segment + 1>.map`.
    segment: usize,
    /// How many entries it added to the file (keys an earlier rule had are left out).
    added: usize,
}

/// A plain rule in a map segment, as a complete render placed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlacedRule {
    pub(super) route: PlainRoute,
    /// Its segment: the frontend's map file `<frontend>-<segment + 1>.map`.
    pub(super) segment: usize,
    /// How many entries it added to the file (keys an earlier rule had are left out).
    pub(super) added: usize,
}

/// The first fields of a [`RuleKey`] (group, longest path, conditions): a rule whose coarse
/// place is before another's sorts before it; two rules with the same coarse place are told
/// apart only by the rest of their keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct CoarsePlace(u8, Reverse<u32>, Reverse<u32>);

impl From<&RuleKey> for CoarsePlace {
    fn from(key: &RuleKey) -> CoarsePlace {
        let (group, Reverse(longest_path), Reverse(conditions)) = key.coarse();
        // Saturated, two huge values become equal: a tie, which only makes a placement render
        // everything.
        let narrow = |value: usize| Reverse(u32::try_from(value).unwrap_or(u32::MAX));
        CoarsePlace(group, narrow(longest_path), narrow(conditions))
    }
}

/// The rules of a segment holding one key: the coarse places of the first and the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Holders {
    first: CoarsePlace,
    last: CoarsePlace,
}

impl FrontendIndex {
    /// The rules of frontend `name`, rendered as `kind`: each key with where it went.
    pub(super) fn new(
        name: String,
        kind: FrontendKind,
        rules: impl Iterator<Item = (RuleKey, Option<PlacedRule>)>,
    ) -> FrontendIndex {
        let mut path_keys: BTreeMap<usize, OrdMap<String, Holders>> = BTreeMap::new();
        let rules = rules
            .map(|(key, placed)| {
                let placed = placed.map(|placed| {
                    if placed.route.kind == MapKind::Path {
                        let keys = path_keys.entry(placed.segment).or_default();
                        hold(keys, placed.route.keys, CoarsePlace::from(&key));
                    }
                    PlacedAt {
                        kind: placed.route.kind,
                        segment: placed.segment,
                        added: placed.added,
                    }
                });
                IndexedRule { key, placed }
            })
            .collect();
        FrontendIndex {
            name,
            kind,
            rules,
            path_keys,
        }
    }

    /// Where path rule `route` (sorting at `key`) goes: its segment, its place among the rules
    /// and how many of the segment's entries come before its own (`file_len` tells how many
    /// entries a segment's map file holds); `None` when it would not just
    /// join a segment (see the module doc), or when the segment's keys cannot tell without the
    /// rules themselves (a rule holding a key that clashes with the new one has the same coarse
    /// place: the caller then renders everything).
    fn insertion(
        &self,
        key: &RuleKey,
        route: &PlainRoute,
        file_len: impl Fn(usize) -> Option<usize>,
    ) -> Option<(usize, usize, usize)> {
        let position = self
            .rules
            .binary_search_by(|rule| rule.key.cmp(key))
            .err()?;
        let path_segment = |at: Option<usize>| {
            let placed = self.rules.get(at?)?.placed?;
            (placed.kind == MapKind::Path).then_some(placed.segment)
        };
        // The segment of the rule before, else the one the next rule leads (then led by R).
        let (segment, leads) = match path_segment(position.checked_sub(1)) {
            Some(segment) => (segment, false),
            None => (path_segment(Some(position))?, true),
        };
        if self.clashes(segment, CoarsePlace::from(key), route) {
            return None;
        }
        let before = self.rules.take(position);
        let entries_before = if leads {
            if in_segment(&before, segment).next().is_some() {
                // The next rule is not the first of its segment.
                return None;
            }
            0
        } else if position <= self.rules.len() / 2 {
            in_segment(&before, segment)
                .map(|placed| placed.added)
                .sum()
        } else {
            // Fewer rules after R than before it: the segment's entries less those of its rules
            // after R (each rule's entries follow the previous rule's in the file).
            let after = self.rules.skip(position);
            file_len(segment)?
                .checked_sub(in_segment(&after, segment).map(|placed| placed.added).sum())?
        };
        Some((segment, position, entries_before))
    }

    /// Whether a new rule at coarse place `place` with `route`'s keys may clash with segment
    /// `segment`: a key of an earlier rule of it is one of the new keys or a proper prefix of
    /// one (it would take the new rule's requests), or a key of a later rule starts with one of
    /// them (the new rule would take that rule's requests). Answers `true` when the coarse places
    /// cannot tell earlier from later.
    fn clashes(&self, segment: usize, place: CoarsePlace, route: &PlainRoute) -> bool {
        let Some(keys) = self.path_keys.get(&segment) else {
            return false;
        };
        route.keys.iter().any(|new| {
            // Keys of the segment that `new` starts with: a clash if a rule before holds one.
            let held_prefix = (1..=new.len())
                .filter(|&end| new.is_char_boundary(end))
                .filter_map(|end| keys.get(&new[..end]).map(|holders| (end, holders)))
                .any(|(end, holders)| end == new.len() || holders.first <= place);
            // Keys of the segment that start with `new`: a clash if a rule after holds one.
            let held_extension = keys
                .range(new.clone()..)
                .take_while(|(held, _)| held.starts_with(new.as_str()))
                .any(|(held, holders)| held == new || holders.last >= place);
            held_prefix || held_extension
        })
    }
}

/// The rules of `rules` placed in `segment`, a slice of the vector at a time (there are
/// thousands).
fn in_segment(rules: &Vector<IndexedRule>, segment: usize) -> impl Iterator<Item = PlacedAt> + '_ {
    rules
        .leaves()
        .flat_map(|chunk| chunk.iter().filter_map(|rule| rule.placed))
        .filter(move |placed| placed.segment == segment)
}

/// Adds `keys`, held by a rule at coarse place `place`, to a segment's keys.
fn hold(segment_keys: &mut OrdMap<String, Holders>, keys: Vec<String>, place: CoarsePlace) {
    for held in keys {
        let holders = segment_keys.entry(held).or_insert(Holders {
            first: place,
            last: place,
        });
        holders.first = holders.first.min(place);
        holders.last = holders.last.max(place);
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
                let file_name = |segment: usize| format!("{}-{}.map", frontend.name, segment + 1);
                let file_len = |segment: usize| {
                    let name = file_name(segment);
                    Some(maps.iter().find(|map| map.name == name)?.entries.len())
                };
                let (segment, position, entries_before) =
                    frontend.insertion(&key, &route, file_len)?;
                let name = file_name(segment);
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
                let keys = frontend.path_keys.entry(segment).or_default();
                hold(keys, route.keys, CoarsePlace::from(&key));
                frontend.rules.insert(
                    position,
                    IndexedRule {
                        key,
                        placed: Some(PlacedAt {
                            kind: MapKind::Path,
                            segment,
                            added,
                        }),
                    },
                );
            }
        }
        Some((index, maps))
    }
}
