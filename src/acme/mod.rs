//! Certificates that get and renew themselves over ACME (RFC 8555, Let's Encrypt): the flags,
//! the account kept in Consul KV, the HTTP-01 challenge responder HAProxy routes
//! `/.well-known/acme-challenge/` to, and the ordering loop.
//!
//! What is stored where (all under `<kv-prefix>/acme/`):
//! - `account`: the account key (PKCS#8, base64), written once with `cas=0`, so every proxy of a
//!   fleet uses the same account. Never logged or shown.
//! - `challenges/<token>`: the key authorization of a pending HTTP-01 challenge, so whichever
//!   proxy the ACME server reaches answers it.
//! - `leases/<domain>`: who orders a domain now and until when (check-and-set, expiring), so
//!   one proxy of a fleet orders a domain at a time.
//!
//! An issued certificate goes into the certificate store (`<kv-prefix>/certs/acme.<domain>`),
//! from where every proxy serves it through the certificate watch.

mod manager;
mod responder;

use std::path::PathBuf;
use std::time::Duration;

pub use manager::{
    certificate_fields, AcmeBoard, AcmeDomainStatus, AcmeManager, CERTIFICATE_PREFIX,
};
pub use responder::ChallengeResponder;

/// Let's Encrypt's production directory, the default of `--acme-directory`.
pub const LETS_ENCRYPT_PRODUCTION: &str = "https://acme-v02.api.letsencrypt.org/directory";
/// Let's Encrypt's staging directory (`--acme-directory staging`).
pub const LETS_ENCRYPT_STAGING: &str = "https://acme-staging-v02.api.letsencrypt.org/directory";

/// The ACME flags.
#[derive(Debug, Clone, clap::Args)]
pub struct AcmeFlags {
    /// The ACME directory certificates are ordered from: a URL, or `production` / `staging` for
    /// Let's Encrypt's. Default: Let's Encrypt's production directory.
    #[arg(long, env = "ACME_DIRECTORY", default_value = "production")]
    pub acme_directory: String,

    /// Contact e-mail of the ACME account (expiry notices). Optional.
    #[arg(long, env = "ACME_EMAIL")]
    pub acme_email: Option<String>,

    /// Accept the ACME server's terms of service. ACME is off without it: `letsEncrypt=true`
    /// services are routed, but no certificate is ordered.
    #[arg(
        long,
        env = "ACME_ACCEPT_TERMS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub acme_accept_terms: bool,

    /// Order certificates for every exact `serviceDomain` routed, not only for services with
    /// `letsEncrypt=true`.
    #[arg(
        long,
        env = "ACME_ALL_DOMAINS",
        default_value_t = false,
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_missing_value = "true"
    )]
    pub acme_all_domains: bool,

    /// PEM file of the CA that signs the ACME directory's own HTTPS certificate, for a test
    /// server such as Pebble. Unset: the usual web roots.
    #[arg(long, env = "ACME_CA_FILE")]
    pub acme_ca_file: Option<PathBuf>,

    /// Seconds between two looks at what needs a certificate (and the shortest retry delay).
    #[arg(long, env = "ACME_CHECK_INTERVAL", default_value_t = 60)]
    pub acme_check_interval: u64,
}

impl Default for AcmeFlags {
    /// The flags' defaults: ACME off.
    fn default() -> Self {
        AcmeFlags {
            acme_directory: "production".into(),
            acme_email: None,
            acme_accept_terms: false,
            acme_all_domains: false,
            acme_ca_file: None,
            acme_check_interval: 60,
        }
    }
}

impl AcmeFlags {
    /// Whether ACME runs: the terms must be accepted.
    pub fn enabled(&self) -> bool {
        self.acme_accept_terms
    }

    /// The directory URL, with `production` and `staging` standing for Let's Encrypt's.
    pub fn directory_url(&self) -> &str {
        match self.acme_directory.as_str() {
            "production" => LETS_ENCRYPT_PRODUCTION,
            "staging" => LETS_ENCRYPT_STAGING,
            url => url,
        }
    }

    /// Checks `--acme-email` (a plain `local@domain`, nothing the ACME server could read as
    /// more than one contact).
    pub fn check(&self) -> Result<(), AcmeError> {
        if let Some(email) = &self.acme_email {
            let plain = email.split_once('@').is_some_and(|(local, domain)| {
                !local.is_empty()
                    && domain.contains('.')
                    && !domain.starts_with('.')
                    && !domain.ends_with('.')
                    && email.len() <= 254
            }) && email
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '@' | '.' | '-' | '_' | '+'))
                && email.matches('@').count() == 1;
            if !plain {
                return Err(AcmeError::Email(email.clone()));
            }
        }
        Ok(())
    }

    /// How often the ordering loop looks, at least one second.
    pub fn check_interval(&self) -> Duration {
        Duration::from_secs(self.acme_check_interval.max(1))
    }
}

/// Why an ACME step failed.
#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    /// The ACME server (or the connection to it) refused.
    #[error("ACME: {0}")]
    Protocol(#[from] instant_acme::Error),
    /// Consul KV could not be read or written.
    #[error("registry: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    /// The account stored in KV cannot be read.
    #[error("the ACME account stored at {key} cannot be read: {message}")]
    StoredAccount { key: String, message: String },
    /// An authorization ended in a state other than valid.
    #[error("the ACME server did not validate {domain}: {message}")]
    Validation { domain: String, message: String },
    /// The issued certificate does not form a usable bundle.
    #[error("the issued certificate cannot be used: {0}")]
    Certificate(#[from] crate::certs::CertError),
    /// The certificate store refused it.
    #[error("storing the certificate failed: {0}")]
    Store(String),
    /// `--acme-email` is not an address.
    #[error("--acme-email: `{0}` is not an e-mail address")]
    Email(String),
    /// The challenge responder could not listen.
    #[error("the ACME challenge responder cannot listen on loopback: {0}")]
    Bind(std::io::Error),
}

impl AcmeError {
    /// Whether the ACME server refused because a rate limit was reached (problem type
    /// `urn:ietf:params:acme:error:rateLimited`, or HTTP 429).
    pub fn is_rate_limited(&self) -> bool {
        match self {
            AcmeError::Protocol(instant_acme::Error::Api(problem)) => {
                problem.status == Some(429)
                    || problem
                        .r#type
                        .as_deref()
                        .is_some_and(|kind| kind.ends_with(":rateLimited"))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_limit_is_told_from_other_refusals() {
        let problem = |kind: &str, status: u16| {
            AcmeError::Protocol(instant_acme::Error::Api(
                serde_json::from_value(serde_json::json!({
                    "type": kind,
                    "detail": "too many certificates already issued",
                    "status": status,
                }))
                .expect("a problem document"),
            ))
        };
        assert!(problem("urn:ietf:params:acme:error:rateLimited", 429).is_rate_limited());
        assert!(problem("urn:ietf:params:acme:error:rateLimited", 400).is_rate_limited());
        assert!(!problem("urn:ietf:params:acme:error:unauthorized", 403).is_rate_limited());
        let validation = AcmeError::Validation {
            domain: "shop.test".into(),
            message: "refused".into(),
        };
        assert!(!validation.is_rate_limited());
    }

    #[test]
    fn staging_is_one_word_away_and_the_email_must_be_plain() {
        let mut flags = AcmeFlags::default();
        assert!(!flags.enabled());
        assert_eq!(flags.directory_url(), LETS_ENCRYPT_PRODUCTION);
        flags.acme_directory = "staging".into();
        assert_eq!(flags.directory_url(), LETS_ENCRYPT_STAGING);
        flags.acme_directory = "https://localhost:14000/dir".into();
        assert_eq!(flags.directory_url(), "https://localhost:14000/dir");
        for good in ["ops@example.com", "ops+certs@mail.example.org"] {
            flags.acme_email = Some(good.into());
            assert!(flags.check().is_ok(), "{good}");
        }
        for bad in [
            "ops",
            "ops@localhost",
            "a@b@example.com",
            "ops@example.com,x@y.z",
            "o ps@example.com",
            "@example.com",
        ] {
            flags.acme_email = Some(bad.into());
            let error = flags.check().expect_err(bad).to_string();
            assert!(error.contains("--acme-email"), "{error}");
        }
    }
}
