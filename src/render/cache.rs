//! The rendered text of each piece of haproxy.cfg (one backend, one frontend), kept by what it
//! was rendered from, so a change re-renders only the pieces it touches.
//!
//! A piece's key is the SHA-256 of the template's name and of the complete view the template
//! receives (its JSON, exactly what handlebars would see). Whatever a view holds (a spec
//! parameter, an instance, a proxy-wide setting it reads, a later field another change adds),
//! a different value is a different key: a cached text is only ever served for the very view it
//! was rendered from. The templates themselves never change after the [`super::Renderer`] is
//! built, and rendering a template is a pure function of its view, so an equal key means equal
//! text.
//!
//! Pieces written from a service's custom fragment (`templateBePath`) are not cached here: their
//! file is read at each render.
//!
//! After each complete render, the pieces that render did not use are dropped: the cache holds at
//! most one text per piece of the configuration last rendered (plus the pieces of a render that
//! failed half-way and those of backends rendered alone, see the `splice` module, until the next
//! complete one). Pieces added between two complete renders are bounded: past twice the pieces
//! the last one kept (and [`MIN_ADDED`]), the cache starts over empty, which costs the next render
//! its hits and nothing else.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::RenderError;

/// The scratch space kept between pieces (a backend's view takes a few hundred bytes).
const MAX_KEPT_SCRATCH: usize = 64 * 1024;

/// Pieces that may be added between two complete renders however few the last one kept.
const MIN_ADDED: usize = 1024;

/// SHA-256 of (template name, view as JSON).
type PieceKey = [u8; 32];

/// Rendered pieces by key, each marked with the last render that used it.
#[derive(Debug, Default)]
pub(super) struct PieceCache {
    pieces: HashMap<PieceKey, CachedPiece>,
    /// Counts complete renders; a piece used by the current one carries its number.
    render: u64,
    /// Pieces rendered (not found) since the cache was made, for tests and logs.
    misses: u64,
    /// How many pieces the last complete render kept.
    kept: usize,
    /// The JSON of the view being keyed (kept to reuse its allocation).
    scratch: Vec<u8>,
}

#[derive(Debug)]
struct CachedPiece {
    text: Arc<str>,
    used_in: u64,
}

impl PieceCache {
    /// The text of `template` rendered with `view`: the cached one when this exact view was
    /// rendered before, else `render()`'s (then kept).
    pub(super) fn piece(
        &mut self,
        template: &str,
        view: &impl Serialize,
        render: impl FnOnce() -> Result<String, RenderError>,
    ) -> Result<Arc<str>, RenderError> {
        let key = key_of(&mut self.scratch, template, view)?;
        let render_number = self.render;
        if let Some(cached) = self.pieces.get_mut(&key) {
            cached.used_in = render_number;
            return Ok(Arc::clone(&cached.text));
        }
        let text: Arc<str> = Arc::from(render()?);
        self.misses += 1;
        self.pieces.insert(
            key,
            CachedPiece {
                text: Arc::clone(&text),
                used_in: render_number,
            },
        );
        Ok(text)
    }

    /// Before pieces are rendered outside a complete render: starts over empty when such pieces
    /// have piled up past the bound (see the module doc).
    pub(super) fn bound_added_pieces(&mut self) {
        if self.pieces.len() >= 2 * self.kept + MIN_ADDED {
            self.pieces.clear();
        }
    }

    /// Ends a complete render: drops every piece it did not use.
    pub(super) fn finish_render(&mut self) {
        let render_number = self.render;
        self.pieces
            .retain(|_, cached| cached.used_in == render_number);
        self.kept = self.pieces.len();
        self.render += 1;
    }

    /// How many pieces have been rendered rather than found.
    #[cfg(test)]
    pub(super) fn misses(&self) -> u64 {
        self.misses
    }

    /// How many pieces are kept.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.pieces.len()
    }
}

/// The key of `view` rendered by `template`; `json` is scratch space for the view's JSON (hashed
/// in one go: serde_json writes in many small pieces).
fn key_of(
    json: &mut Vec<u8>,
    template: &str,
    view: &impl Serialize,
) -> Result<PieceKey, RenderError> {
    json.clear();
    serde_json::to_writer(&mut *json, view)
        .map_err(|error| RenderError::Render(error.to_string()))?;
    let mut hasher = Sha256::new();
    // The name's length first, so no (name, view) pair can read as another.
    hasher.update((template.len() as u64).to_le_bytes());
    hasher.update(template.as_bytes());
    hasher.update(&json[..]);
    if json.capacity() > MAX_KEPT_SCRATCH {
        // A frontend with thousands of rules: not worth holding its size between renders.
        *json = Vec::new();
    }
    Ok(hasher.finalize().into())
}
