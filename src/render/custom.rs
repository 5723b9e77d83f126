//! Custom fragments (`templateFePath`, `templateBePath`) and raw backend lines
//! (`backendExtra`): what the operator allows, and where fragments are read from.
//!
//! - A fragment is a handlebars file under `--templates-dir`, named by a path relative to it.
//!   It is read again at each render (so an edit on disk applies at the next change, instance
//!   update or `/reload`), after resolving symlinks: a path that leads outside the directory,
//!   or a file that is missing, unreadable, larger than [`MAX_FRAGMENT_BYTES`] or not valid
//!   handlebars, is refused. Without `--templates-dir` every fragment is refused, naming the
//!   flag.
//! - A fragment is rendered with the view the shipped fragment it replaces gets (the rule's
//!   acls and backend name, or the backend's name, mode, rules, servers and `extra` lines, plus
//!   `service`): validated values only, never raw request text. It may call the shipped
//!   partials (`{{> rule-acls this}}`, `{{> backend this}}`). Its output goes into haproxy.cfg
//!   as it is, and through `haproxy -c` like everything else.
//! - `backendExtra` lines are refused unless `--allow-backend-extra`.

use std::path::{Path, PathBuf};

use crate::spec::custom_templates::{BACKEND_EXTRA, TEMPLATE_BE_PATH, TEMPLATE_FE_PATH};
use crate::spec::{ServiceSpec, SpecError, TemplatePath};

/// Largest fragment file read.
pub const MAX_FRAGMENT_BYTES: u64 = 64 * 1024;

/// What the operator allows: the templates directory fragments are read from (resolved), and
/// whether `backendExtra` is accepted.
#[derive(Debug, Clone, Default)]
pub struct CustomPolicy {
    templates_dir: Option<PathBuf>,
    allow_backend_extra: bool,
}

impl CustomPolicy {
    /// The policy of a renderer reading fragments from `templates_dir` (already resolved).
    pub(super) fn new(templates_dir: Option<PathBuf>, allow_backend_extra: bool) -> CustomPolicy {
        CustomPolicy {
            templates_dir,
            allow_backend_extra,
        }
    }

    /// Whether `backendExtra` is accepted.
    pub(super) fn set_allow_backend_extra(&mut self, allow: bool) {
        self.allow_backend_extra = allow;
    }

    /// Checks a spec before it is applied: its fragments exist inside the templates directory
    /// and parse, and its `backendExtra` is allowed. The error names the parameter (a 400).
    pub fn check(&self, spec: &ServiceSpec) -> Result<(), SpecError> {
        let custom = spec.custom_templates();
        self.check_backend_extra(spec)
            .map_err(|message| SpecError {
                parameter: BACKEND_EXTRA.to_string(),
                message,
            })?;
        for (parameter, path) in [
            (TEMPLATE_FE_PATH, &custom.template_fe_path),
            (TEMPLATE_BE_PATH, &custom.template_be_path),
        ] {
            if let Some(path) = path {
                self.read(path)
                    .and_then(|text| {
                        handlebars::Template::compile(&text)
                            .map(|_| ())
                            .map_err(|error| {
                                format!("`{}` is not a valid template: {error}", path.as_str())
                            })
                    })
                    .map_err(|message| SpecError {
                        parameter: parameter.to_string(),
                        message,
                    })?;
            }
        }
        Ok(())
    }

    /// Refuses a spec with `backendExtra` unless the operator allows it.
    pub(super) fn check_backend_extra(&self, spec: &ServiceSpec) -> Result<(), String> {
        if spec.custom_templates().backend_extra.is_empty() || self.allow_backend_extra {
            Ok(())
        } else {
            Err(
                "raw backend lines are off: start flow-proxy with --allow-backend-extra (env \
                 ALLOW_BACKEND_EXTRA=true) to accept them"
                    .to_string(),
            )
        }
    }

    /// Reads a fragment from the templates directory; the error says why not, in words an
    /// operator can act on.
    pub(super) fn read(&self, path: &TemplatePath) -> Result<String, String> {
        let Some(dir) = &self.templates_dir else {
            return Err(
                "custom templates are off: start flow-proxy with --templates-dir (env \
                        TEMPLATES_DIR) naming the directory that holds them"
                    .to_string(),
            );
        };
        let joined = dir.join(path.as_str());
        let resolved = std::fs::canonicalize(&joined).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => {
                format!("`{}` does not exist in --templates-dir", path.as_str())
            }
            _ => format!("`{}` cannot be opened: {error}", path.as_str()),
        })?;
        if !resolved.starts_with(dir) {
            return Err(format!(
                "`{}` leads outside --templates-dir (through a symlink)",
                path.as_str()
            ));
        }
        read_fragment(&resolved).map_err(|why| format!("`{}` {why}", path.as_str()))
    }
}

/// Reads a fragment file that must be a regular file of at most [`MAX_FRAGMENT_BYTES`].
fn read_fragment(path: &Path) -> Result<String, String> {
    let metadata = std::fs::metadata(path).map_err(|error| format!("cannot be read: {error}"))?;
    if !metadata.is_file() {
        return Err("is not a file".to_string());
    }
    if metadata.len() > MAX_FRAGMENT_BYTES {
        return Err(format!(
            "has {} bytes; at most {MAX_FRAGMENT_BYTES} are read",
            metadata.len()
        ));
    }
    std::fs::read_to_string(path).map_err(|error| format!("cannot be read: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::{RenderError, RenderSettings, Renderer, ServiceRoute};
    use crate::spec::Instance;

    fn spec(extra: &[(&str, &str)]) -> ServiceSpec {
        let pairs: Vec<(String, String)> = [("serviceName", "app"), ("servicePath", "/app")]
            .iter()
            .chain(extra)
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        ServiceSpec::from_query(&pairs).expect("accepted")
    }

    fn settings() -> RenderSettings {
        RenderSettings {
            bind_host: None,
            http_port: 80,
            stats_socket: PathBuf::from("haproxy.sock"),
            errors_dir: PathBuf::from("errors"),
            https_only: false,
            users: Vec::new(),
            stats: None,
            service_domain_algo: Default::default(),
            proxy_wide: Default::default(),
            acme_challenge: None,
        }
    }

    fn render(renderer: &Renderer, spec: &ServiceSpec) -> Result<String, RenderError> {
        let instances = [Instance::new("10.0.0.1", 8080).expect("instance")];
        renderer.render(
            &settings(),
            &[ServiceRoute {
                spec,
                instances: &instances,
            }],
        )
    }

    fn templates(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("templates directory");
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).expect("write");
        }
        dir
    }

    #[test]
    fn fragments_get_the_view_of_what_they_replace_and_are_reread_at_each_render() {
        let dir = templates(&[
            ("be.hbs", "backend {{name}} # of {{service}}\n{{#each servers}}    server {{name}} {{address}}\n{{/each}}\n\n"),
            ("fe.hbs", "{{> rule-acls this}}\n    use_backend {{backend}} if {{path_acl.name}} # custom\n"),
        ]);
        let renderer = Renderer::new(Some(dir.path())).expect("renderer");
        let spec = spec(&[("templateBePath", "be.hbs"), ("templateFePath", "fe.hbs")]);
        renderer.custom_policy().check(&spec).expect("accepted");
        let text = render(&renderer, &spec).expect("renders");
        assert!(
            text.contains("\nbackend app-be0 # of app\n    server s1 10.0.0.1:8080\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "    acl path_app-be0 path_beg /app\n    use_backend app-be0 if path_app-be0 # custom\n"
            ),
            "{text}"
        );
        assert!(!text.contains("balance roundrobin"), "{text}");

        std::fs::write(dir.path().join("be.hbs"), "backend {{name}} # edited\n").expect("edit");
        let text = render(&renderer, &spec).expect("renders");
        assert!(text.contains("backend app-be0 # edited\n"), "{text}");
    }

    #[test]
    fn missing_escaping_or_broken_fragments_are_refused_naming_the_parameter() {
        let outside = templates(&[("secret.hbs", "backend x\n")]);
        let dir = templates(&[("bad-syntax.hbs", "{{#if}}\n")]);
        std::os::unix::fs::symlink(
            outside.path().join("secret.hbs"),
            dir.path().join("escape.hbs"),
        )
        .expect("symlink");
        std::fs::create_dir(dir.path().join("sub")).expect("sub");
        let renderer = Renderer::new(Some(dir.path())).expect("renderer");
        let policy = renderer.custom_policy();
        for (parameter, path, words) in [
            ("templateBePath", "missing.hbs", "does not exist"),
            ("templateBePath", "escape.hbs", "outside --templates-dir"),
            ("templateFePath", "sub", "not a file"),
            ("templateFePath", "bad-syntax.hbs", "not a valid template"),
        ] {
            let spec = spec(&[(parameter, path)]);
            let error = policy.check(&spec).expect_err("refused");
            assert_eq!(error.parameter, parameter);
            assert!(error.message.contains(words), "{path}: {error}");
            // The render refuses it too (a stored spec is rendered without the API's check).
            let error = render(&renderer, &spec).expect_err("refused");
            assert!(
                matches!(&error, RenderError::Custom { service, parameter: p, .. } if service == "app" && p == &parameter),
                "{error}"
            );
        }

        let without_dir = Renderer::new(None).expect("renderer");
        let spec = spec(&[("templateBePath", "be.hbs")]);
        let error = without_dir
            .custom_policy()
            .check(&spec)
            .expect_err("refused");
        assert!(error.message.contains("--templates-dir"), "{error}");
    }

    #[test]
    fn backend_extra_is_written_at_the_bottom_only_when_allowed() {
        let spec = spec(&[(
            "backendExtra",
            "http-response set-header X-Extra yes\nretries 3",
        )]);
        let refusing = Renderer::new(None).expect("renderer");
        let error = refusing.custom_policy().check(&spec).expect_err("refused");
        assert_eq!(error.parameter, "backendExtra");
        assert!(error.message.contains("--allow-backend-extra"), "{error}");
        assert!(matches!(
            render(&refusing, &spec),
            Err(RenderError::Custom { .. })
        ));

        let allowing = Renderer::new(None)
            .expect("renderer")
            .allow_backend_extra(true);
        allowing.custom_policy().check(&spec).expect("accepted");
        let text = render(&allowing, &spec).expect("renders");
        assert!(
            text.contains(
                "    server s1 10.0.0.1:8080 check\n    server s2 127.0.0.1:1 check disabled\n    http-response set-header X-Extra yes\n    retries 3\n"
            ),
            "{text}"
        );
    }
}
