//! One service's backends rendered alone, put in place of their previous text in a rendered
//! haproxy.cfg: what a change that only moves instances between server slots costs, whatever the
//! number of services routed.
//!
//! A backend's text is a function of the settings, its service's spec, its slots and the pool
//! backend it sits in, never of another service (see `view::backend_view`). So when only a
//! service's slots change, the complete render differs from the applied text in that service's
//! backends only, and in one more place: `no strict-limits` in `global`, which counts the
//! health-checked servers of the whole file ([`CheckedServers`]). [`Renderer::service_backends`]
//! renders the backends (through the same piece cache as a complete render), and
//! [`ServiceBackends::replace_in`] swaps their text in; the caller counts the checked servers with
//! [`CheckedServers::strict_limits_relaxed`] and renders everything when that flag would move.
//!
//! A `haproxy.cfg.hbs` of `--templates-dir` may write backends any way it likes, so with one
//! there is no service's text to find: [`Renderer::service_backends`] answers `None` and the
//! caller renders everything.

use std::sync::Arc;

use super::pool::{free_pool_spec, pool_backend_name, POOL_SLOTS};
use super::view::{self, BackendView};
use super::{
    BackendPool, RenderError, RenderSettings, Renderer, ServerSlots, ServiceRoute, BACKEND_TEMPLATE,
};

/// The health-checked server lines of a configuration (or of some of its backends): HAProxy
/// counts one file descriptor for each, spare (disabled) slots included.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CheckedServers {
    /// Spare slots (`disabled`).
    pub spare: u64,
    /// Slots holding an instance.
    pub occupied: u64,
}

impl CheckedServers {
    /// Counts the checked servers of `backends`.
    pub(super) fn of<'a>(backends: impl IntoIterator<Item = &'a BackendView>) -> CheckedServers {
        let mut counted = CheckedServers::default();
        for server in backends
            .into_iter()
            .flat_map(|backend| backend.servers.iter())
            .filter(|server| server.checked())
        {
            if server.is_spare() {
                counted.spare += 1;
            } else {
                counted.occupied += 1;
            }
        }
        counted
    }

    /// These counts with `old`'s taken out and `new`'s put in.
    pub fn replaced(self, old: CheckedServers, new: CheckedServers) -> CheckedServers {
        CheckedServers {
            spare: (self.spare + new.spare).saturating_sub(old.spare),
            occupied: (self.occupied + new.occupied).saturating_sub(old.occupied),
        }
    }

    /// Whether a configuration with these servers is written with `no strict-limits`: when the
    /// spare slots alone push the descriptors HAProxy counts past `open_files_limit`, on top of
    /// two per connection of `maxconn`. A configuration that does not fit even without its spare
    /// slots (e.g. a `maxconn` too high for the limit) keeps `strict-limits`, so HAProxy refuses
    /// it as before.
    pub fn strict_limits_relaxed(self, proxy_wide: &super::ProxyWide) -> bool {
        /// Descriptors for listeners, the stats socket and the like, on top of HAProxy's count.
        const MARGIN: u64 = 256;
        let Some(limit) = proxy_wide.open_files_limit else {
            return false;
        };
        let without_spares = 2 * u64::from(proxy_wide.maxconn) + self.occupied + MARGIN;
        without_spares <= limit && without_spares + self.spare > limit
    }
}

/// The backends of one service as a complete render writes them.
#[derive(Debug, Clone)]
pub struct ServiceBackends {
    /// Each backend's text, as it stands in haproxy.cfg.
    pieces: Vec<Arc<str>>,
    /// Their health-checked servers.
    pub checked: CheckedServers,
}

impl ServiceBackends {
    /// `config` with each of `old`'s backends replaced by the one of `self` at the same place.
    /// `None` when `old` and `self` do not have the same backends, or when one of `old`'s is not
    /// in `config` exactly once, as a whole section.
    pub fn replace_in(&self, config: &str, old: &ServiceBackends) -> Option<String> {
        if self.pieces.len() != old.pieces.len() {
            return None;
        }
        let mut places = Vec::with_capacity(old.pieces.len());
        for (old_piece, new_piece) in old.pieces.iter().zip(&self.pieces) {
            let at = section_at(config, old_piece)?;
            places.push((at, old_piece.len(), new_piece));
        }
        places.sort_by_key(|(at, _, _)| *at);
        let grown: usize = self.pieces.iter().map(|piece| piece.len()).sum();
        let mut text = String::with_capacity(config.len() + grown);
        let mut copied = 0;
        for (at, old_len, new_piece) in places {
            if at < copied {
                return None;
            }
            text.push_str(&config[copied..at]);
            text.push_str(new_piece);
            copied = at + old_len;
        }
        text.push_str(&config[copied..]);
        Some(text)
    }

    /// The backends' texts, in the order of the service's destinations.
    pub fn pieces(&self) -> impl Iterator<Item = &str> {
        self.pieces.iter().map(|piece| &**piece)
    }
}

/// Where `section` starts in `config`, when it is there once as a whole section: at the start or
/// after a newline, followed by a newline, and not by an indented line (which would still belong
/// to the section).
fn section_at(config: &str, section: &str) -> Option<usize> {
    let bytes = config.as_bytes();
    // SIMD substring search: the text can be megabytes, the section a few hundred bytes.
    let finder = memchr::memmem::Finder::new(section.as_bytes());
    let mut found = None;
    let mut from = 0;
    while let Some(offset) = finder.find(&bytes[from..]) {
        let at = from + offset;
        let end = at + section.len();
        let starts_line = at == 0 || bytes[at - 1] == b'\n';
        let ends_section =
            bytes.get(end) == Some(&b'\n') && !matches!(bytes.get(end + 1), Some(b' ' | b'\t'));
        if starts_line && ends_section {
            if found.is_some() {
                return None;
            }
            found = Some(at);
        }
        from = at + 1;
    }
    found
}

impl Renderer {
    /// The backends of `route` alone, with `slots` and the pool backends of `pool`, exactly as
    /// [`Renderer::render_slotted`] writes them (without their last newline, as the main template
    /// places them); `None` with a `haproxy.cfg.hbs` of `--templates-dir`. The pieces rendered
    /// are kept in the cache a complete render reads.
    pub fn service_backends(
        &self,
        settings: &RenderSettings,
        route: ServiceRoute<'_>,
        slots: &ServerSlots,
        pool: &BackendPool,
    ) -> Result<Option<ServiceBackends>, RenderError> {
        if self.custom_main {
            return Ok(None);
        }
        let spec = route.spec;
        let views = spec
            .destinations()
            .iter()
            .map(|destination| {
                let name = pool.backend_name(spec, destination);
                view::backend_view(settings, spec, destination, slots, name)
            })
            .collect();
        self.backend_pieces(views).map(Some)
    }

    /// For a new service whose every destination sits in a pool backend of `pool`: the free pool
    /// backends it takes, and its own backends under their names, as
    /// [`Renderer::render_slotted`] writes each; `None` with a `haproxy.cfg.hbs` of
    /// `--templates-dir` or a destination outside the pool.
    pub fn pool_backends_taken(
        &self,
        settings: &RenderSettings,
        route: ServiceRoute<'_>,
        slots: &ServerSlots,
        pool: &BackendPool,
    ) -> Result<Option<(ServiceBackends, ServiceBackends)>, RenderError> {
        if self.custom_main {
            return Ok(None);
        }
        let spec = route.spec;
        let mut free = Vec::new();
        let mut taken = Vec::new();
        for destination in spec.destinations() {
            let Some(number) = pool.number_of(spec.service_name(), destination) else {
                return Ok(None);
            };
            let free_spec = free_pool_spec(number)?;
            let Some(free_destination) = free_spec.destinations().first() else {
                return Ok(None);
            };
            let spare = ServerSlots::from_slots(vec![None; POOL_SLOTS]);
            let name = pool_backend_name(number);
            free.push(view::backend_view(
                settings,
                &free_spec,
                free_destination,
                &spare,
                name.clone(),
            ));
            taken.push(view::backend_view(settings, spec, destination, slots, name));
        }
        Ok(Some((
            self.backend_pieces(free)?,
            self.backend_pieces(taken)?,
        )))
    }

    /// The text of each of `views` as a complete render writes it, through the piece cache.
    fn backend_pieces(&self, mut views: Vec<BackendView>) -> Result<ServiceBackends, RenderError> {
        for view in &mut views {
            if self.custom_backend_partial {
                view.drop_spare_servers();
            }
            view.render_custom(|fragment, data| self.render_fragment(fragment, data))?;
        }
        let checked = CheckedServers::of(&views);
        let mut cache = self.lock_pieces();
        cache.bound_added_pieces();
        let mut pieces = Vec::with_capacity(views.len());
        for backend in &views {
            let text = match backend.custom_text() {
                Some(custom) => Arc::from(custom),
                None => cache.piece(BACKEND_TEMPLATE, backend, || {
                    self.render_piece(BACKEND_TEMPLATE, backend)
                })?,
            };
            let line = text.strip_suffix('\n').map_or(Arc::clone(&text), Arc::from);
            pieces.push(line);
        }
        Ok(ServiceBackends { pieces, checked })
    }
}
