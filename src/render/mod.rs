//! Rendering: the complete routing state becomes haproxy.cfg text through the handlebars templates.
//!
//! (Skeleton: filled in by the spec/render work.)

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use crate::spec::{Instance, ServiceSpec};

/// A template that did not load or did not render.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// A template file could not be read or parsed.
    #[error("template {name}: {message}")]
    Template { name: String, message: String },
    /// Rendering failed.
    #[error("rendering haproxy.cfg failed: {0}")]
    Render(String),
}

/// Everything the templates need besides the services.
#[derive(Debug, Clone)]
pub struct RenderSettings {
    /// Address the frontends bind to; `None` binds every address.
    pub bind_host: Option<IpAddr>,
    /// Port of the main HTTP frontend.
    pub http_port: u16,
    /// HAProxy's stats socket (admin level, exposes listeners for `-x`).
    pub stats_socket: PathBuf,
    /// Directory holding HAProxy's error pages (`503.http`, …).
    pub errors_dir: PathBuf,
}

/// One routed service and its healthy instances.
#[derive(Debug, Clone, Copy)]
pub struct ServiceRoute<'a> {
    /// The service's spec.
    pub spec: &'a ServiceSpec,
    /// The instances to put in its backend(s), in any order.
    pub instances: &'a [Instance],
}

/// Holds the compiled templates.
pub struct Renderer {}

impl Renderer {
    /// Loads the templates from `templates_dir`, or the built-in ones when `None`.
    pub fn new(_templates_dir: Option<&Path>) -> Result<Renderer, RenderError> {
        Ok(Renderer {})
    }

    /// Renders the complete haproxy.cfg for these services.
    pub fn render(
        &self,
        _settings: &RenderSettings,
        _services: &[ServiceRoute<'_>],
    ) -> Result<String, RenderError> {
        Err(RenderError::Render("not implemented yet".into()))
    }
}
