//! The servers of a backend: fixed server slots that HAProxy's Runtime API can fill, empty and
//! refill without a reload.
//!
//! A backend fed by Consul instances has [`ServerSlots::capacity`] server lines named `s1`,
//! `s2`, …: an occupied slot is `server s<n> <address>:<port> [check]…`, a spare one
//! `server s<n> 127.0.0.1:1 [check] disabled …` (in maintenance, never sent traffic, never
//! checked). Which instance sits in which slot is decided by the caller (the proxy core keeps an
//! instance in its slot while it lives, see `proxy::slots`); without a decision the instances
//! are packed in sorted order ([`ServerSlots::packed`]). Every backend of a service holds the
//! same slots (a destination's `port` replaces the instance's port in its own backend).
//!
//! A destination with `outboundHostname` keeps its one server `<host>_<port>`, no slots.

use serde::Serialize;

use super::backend::server_cookie;
use crate::spec::{Destination, Instance, ServiceSpec};

/// Fewest slots a backend has.
pub const MIN_SLOTS: usize = 2;

/// The address a spare slot holds in the file: never reached, the slot is `disabled`.
pub const SPARE_ADDRESS: &str = "127.0.0.1:1";

/// How many slots a backend gets for `instances` instances: the next power of two at or above
/// twice their number, at least [`MIN_SLOTS`]. Twice, so that replacing every instance at once
/// (a blue-green switch) finds free slots without reusing the ones being emptied.
pub fn capacity_for(instances: usize) -> usize {
    instances
        .saturating_mul(2)
        .max(MIN_SLOTS)
        .checked_next_power_of_two()
        .unwrap_or(usize::MAX)
}

/// The name of the slot at `position` (0-based): `s1`, `s2`, …
pub fn slot_name(position: usize) -> String {
    format!("s{}", position + 1)
}

/// Which instance sits in which server slot of a service's backends; `None` is a spare slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServerSlots {
    slots: Vec<Option<Instance>>,
}

impl ServerSlots {
    /// The instances (duplicates dropped) in sorted order in the first slots of a backend of
    /// [`capacity_for`] their number.
    pub fn packed(instances: &[Instance]) -> ServerSlots {
        let mut unique: Vec<Instance> = instances.to_vec();
        unique.sort();
        unique.dedup();
        let capacity = capacity_for(unique.len());
        let mut slots: Vec<Option<Instance>> = unique.into_iter().map(Some).collect();
        slots.resize(capacity, None);
        ServerSlots { slots }
    }

    /// Slots as given: `slots[n]` is slot `s<n+1>`.
    pub fn from_slots(slots: Vec<Option<Instance>>) -> ServerSlots {
        ServerSlots { slots }
    }

    /// The slots in order.
    pub fn slots(&self) -> &[Option<Instance>] {
        &self.slots
    }

    /// How many slots (server lines) each backend has.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The instances in their slots, in slot order.
    pub fn instances(&self) -> impl Iterator<Item = &Instance> {
        self.slots.iter().flatten()
    }

    /// The slots `spec`'s backends have in a rendered file (`config`, e.g. the live file a
    /// restarted flow-proxy finds HAProxy serving), each slot holding the one of `instances` its
    /// server line names, or spare. Instances the file does not name are left out for the
    /// caller to place. `None` when the file has no slots for the service.
    pub fn read_back(
        config: &str,
        spec: &ServiceSpec,
        instances: &[Instance],
    ) -> Option<ServerSlots> {
        let destination = spec
            .destinations()
            .iter()
            .find(|destination| destination.routing().outbound_hostname.is_none())?;
        let backend = super::view::backend_name(spec, destination);
        let slots = SlotLines::of_backend(config, &backend);
        let lines = slots.backends.get(backend.as_str())?;
        let mut placed: Vec<&Instance> = Vec::new();
        let mut read = Vec::with_capacity(lines.len());
        for line in lines {
            let instance = line.address.and_then(|address| {
                instances.iter().find(|instance| {
                    !placed.contains(instance) && server_address(destination, instance) == address
                })
            });
            if let Some(instance) = instance {
                placed.push(instance);
            }
            read.push(instance.cloned());
        }
        Some(ServerSlots { slots: read })
    }
}

/// The server slots of the backends of a rendered haproxy.cfg (see [`ServerSlots::read_back`]).
#[derive(Debug, Default)]
struct SlotLines<'a> {
    backends: std::collections::HashMap<&'a str, Vec<SlotLine<'a>>>,
}

/// One `server s<n> …` line: the address it sends to, `None` for a spare (`disabled`) slot.
#[derive(Debug)]
struct SlotLine<'a> {
    address: Option<&'a str>,
}

impl<'a> SlotLines<'a> {
    /// [`SlotLines::of`] the one backend named `backend`: its section is found by its header
    /// line, without reading the other backends' lines.
    fn of_backend(config: &'a str, backend: &str) -> SlotLines<'a> {
        let header = format!("backend {backend}\n");
        let start = if config.starts_with(&header) {
            Some(0)
        } else {
            // SIMD substring search: the text can be megabytes, and a new service's backend is
            // not in it, so the whole text is searched.
            memchr::memmem::find(config.as_bytes(), format!("\n{header}").as_bytes())
                .map(|newline| newline + 1)
        };
        let Some(start) = start else {
            return SlotLines::default();
        };
        let section = &config[start..];
        // The section ends at the next line that is neither indented nor empty.
        let end = section
            .match_indices('\n')
            .map(|(newline, _)| newline + 1)
            .find(|&next| {
                section[next..]
                    .chars()
                    .next()
                    .is_some_and(|first| first != ' ' && first != '\n')
            })
            .unwrap_or(section.len());
        SlotLines::of(&section[..end])
    }

    /// Reads the slot lines of each backend of `config`; a backend whose servers are not the
    /// slots `s1`, `s2`, … in order is left out.
    fn of(config: &'a str) -> SlotLines<'a> {
        let mut backends = std::collections::HashMap::new();
        let mut current: Option<(&str, Vec<SlotLine<'a>>, bool)> = None;
        let mut finish = |current: Option<(&'a str, Vec<SlotLine<'a>>, bool)>| {
            if let Some((name, lines, true)) = current {
                if !lines.is_empty() {
                    backends.insert(name, lines);
                }
            }
        };
        for line in config.lines() {
            if let Some(name) = line.strip_prefix("backend ") {
                finish(current.take());
                current = Some((name.trim(), Vec::new(), true));
                continue;
            }
            if !line.starts_with(' ') && !line.is_empty() {
                finish(current.take());
                continue;
            }
            let Some((_, lines, in_order)) = current.as_mut() else {
                continue;
            };
            let mut words = line.split_whitespace();
            if words.next() != Some("server") {
                continue;
            }
            let (Some(name), Some(address)) = (words.next(), words.next()) else {
                *in_order = false;
                continue;
            };
            if name != slot_name(lines.len()) {
                *in_order = false;
                continue;
            }
            let disabled = words.any(|word| word == "disabled");
            lines.push(SlotLine {
                address: (!disabled).then_some(address),
            });
        }
        finish(current);
        SlotLines { backends }
    }
}

/// One `server` line of a backend.
#[derive(Debug, Serialize)]
pub(super) struct ServerView {
    name: String,
    address: String,
    check: bool,
    /// A spare slot: `disabled` (maintenance) until the Runtime API fills it.
    disabled: bool,
    /// `sslVerifyNone`: connect to the instance over TLS without verifying its certificate.
    ssl_verify_none: bool,
    /// `sessionType=sticky-server`: the cookie value that pins a client to this server (the
    /// server's name).
    cookie: Option<String>,
}

impl ServerView {
    /// Whether this is a spare slot (no instance).
    pub(super) fn is_spare(&self) -> bool {
        self.disabled
    }

    /// Whether HAProxy health-checks this server (and so counts a descriptor for it).
    pub(super) fn checked(&self) -> bool {
        self.check
    }
}

/// `address:port` as a server line wants it (IPv6 in brackets), with the destination's `port`
/// in place of the instance's when it has one.
fn server_address(destination: &Destination, instance: &Instance) -> String {
    let port = destination
        .port()
        .map_or(instance.port(), |override_port| override_port.get());
    if instance.is_ipv6() {
        format!("[{}]:{port}", instance.address())
    } else {
        format!("{}:{port}", instance.address())
    }
}

/// The server lines of `destination`'s backend: its slots, or, for an `outboundHostname`
/// destination, its one server `<host>_<port>`.
pub(super) fn server_views(
    spec: &ServiceSpec,
    destination: &Destination,
    slots: &ServerSlots,
    outbound: Option<&Instance>,
) -> Vec<ServerView> {
    let server = |name: String, address: String, disabled: bool| ServerView {
        cookie: server_cookie(spec, destination, &name),
        name,
        address,
        check: !spec.skip_check(),
        disabled,
        ssl_verify_none: spec.ssl_verify_none(),
    };
    if let Some(outbound) = outbound {
        let name = format!("{}_{}", outbound.address(), outbound.port());
        return vec![server(name, server_address(destination, outbound), false)];
    }
    slots
        .slots()
        .iter()
        .enumerate()
        .map(|(position, slot)| match slot {
            Some(instance) => server(
                slot_name(position),
                server_address(destination, instance),
                false,
            ),
            None => server(slot_name(position), SPARE_ADDRESS.to_string(), true),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(port: u16) -> Instance {
        Instance::new("10.0.0.1", port).expect("valid instance")
    }

    #[test]
    fn capacity_leaves_room_to_replace_every_instance_at_once() {
        assert_eq!(capacity_for(0), 2);
        assert_eq!(capacity_for(1), 2);
        assert_eq!(capacity_for(2), 4);
        assert_eq!(capacity_for(3), 8);
        assert_eq!(capacity_for(4), 8);
        assert_eq!(capacity_for(5), 16);
        for n in 0..100 {
            assert!(capacity_for(n) >= 2 * n, "{n}");
        }
    }

    #[test]
    fn slots_are_read_back_from_a_rendered_file_by_address() {
        let spec = crate::spec::ServiceSpec::from_query(&[
            ("serviceName".to_string(), "web".to_string()),
            ("servicePath".to_string(), "/web".to_string()),
        ])
        .expect("valid spec");
        let web = "backend web-be0\n    mode http\n    server s1 127.0.0.1:1 check disabled\n    server s2 10.0.0.1:2 check\n    server s3 10.0.0.1:9 check\n    server s4 10.0.0.1:1 check\n";
        let other = "backend other-be0\n    server s1 10.0.0.1:1\n";
        // 10.0.0.1:9 is gone, 10.0.0.1:3 is new: left for the caller to place. The backend is
        // found anywhere in the file, and ends where the next section starts.
        for config in [
            format!("{web}\nbackend zzz-be0\n    server s1 10.0.0.1:3\n"),
            format!("global\n    maxconn 10\n\n{other}\n{web}\nbackend zzz-be0\n"),
            format!("{other}\n{web}frontend http\n    server s5 10.0.0.1:3\n"),
        ] {
            let read =
                ServerSlots::read_back(&config, &spec, &[instance(1), instance(2), instance(3)])
                    .expect("slots in the file");
            assert_eq!(
                read.slots(),
                &[None, Some(instance(2)), None, Some(instance(1))],
                "{config}"
            );
        }
        assert_eq!(ServerSlots::read_back(other, &spec, &[instance(1)]), None);
        // A backend whose name only starts like the service's is another backend.
        let longer = "backend web-be00\n    server s1 10.0.0.1:1 check\n";
        assert_eq!(ServerSlots::read_back(longer, &spec, &[instance(1)]), None);
        let outbound = "backend web-be0\n    server example.com_80 10.0.0.1:1\n";
        assert_eq!(
            ServerSlots::read_back(outbound, &spec, &[instance(1)]),
            None
        );
    }

    #[test]
    fn packed_slots_are_sorted_unique_and_padded_with_spares() {
        let slots = ServerSlots::packed(&[instance(2), instance(1), instance(2)]);
        assert_eq!(
            slots.slots(),
            &[Some(instance(1)), Some(instance(2)), None, None]
        );
        assert_eq!(ServerSlots::packed(&[]).slots(), &[None, None]);
    }
}
