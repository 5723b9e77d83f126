//! TLS certificates as validated values: a PEM bundle (certificate, chain, private key) checked
//! before HAProxy ever sees it, and what a user may know about it (names, expiry, fingerprint;
//! never the key).
//!
//! A [`Certificate`] is only built by [`Certificate::parse`], which refuses anything that is not
//! PEM, has no certificate or no private key, or whose key does not match the certificate. The
//! PEM it keeps is re-encoded from the parsed blocks (certificates first, then the key), so no
//! text of the caller's choosing reaches the files HAProxy reads.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::spec::ServiceName;

/// Largest PEM bundle accepted.
pub const MAX_PEM_BYTES: usize = 64 * 1024;

/// Why a PEM bundle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    /// The certificate's name is not a plain name.
    #[error("parameter `certName`: {0}")]
    Name(String),
    /// The bundle is larger than [`MAX_PEM_BYTES`].
    #[error("the PEM bundle has {0} bytes; at most {MAX_PEM_BYTES} are accepted")]
    TooLarge(usize),
    /// The body is not PEM.
    #[error("the body is not PEM: {0}")]
    NotPem(String),
    /// No `CERTIFICATE` block.
    #[error("the PEM bundle holds no certificate (a `-----BEGIN CERTIFICATE-----` block)")]
    NoCertificate,
    /// No private key block.
    #[error("the PEM bundle holds no private key (HAProxy needs the certificate and its key in one file)")]
    NoPrivateKey,
    /// More than one private key.
    #[error("the PEM bundle holds {0} private keys; give exactly one")]
    SeveralKeys(usize),
    /// A block of a kind HAProxy does not use here.
    #[error(
        "the PEM bundle holds a `{0}` block; only CERTIFICATE and PRIVATE KEY blocks are accepted"
    )]
    UnexpectedBlock(String),
    /// A certificate block that does not parse.
    #[error("certificate {position} of the bundle cannot be read: {message}")]
    BadCertificate { position: usize, message: String },
    /// A key that does not parse or of a type not supported.
    #[error("the private key cannot be used: {0}")]
    BadKey(String),
    /// The key is not the certificate's.
    #[error("the private key does not match the certificate (the first certificate of the bundle must be the one the key signs for)")]
    KeyMismatch,
}

/// What may be shown about a certificate: never its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct CertInfo {
    /// The name it is stored under.
    pub name: String,
    /// The DNS names it serves: the subject's CN and the SANs, as HAProxy uses them for SNI.
    pub dns_names: Vec<String>,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// End of validity, seconds since the epoch.
    #[serde(skip)]
    pub not_after_unix: i64,
    /// Start of validity, seconds since the epoch (ACME renews at two thirds of the lifetime).
    #[serde(skip)]
    pub not_before_unix: i64,
    /// Whether it had expired when it was read.
    pub expired: bool,
    /// SHA-256 of the leaf certificate (DER), hex.
    pub fingerprint: String,
}

/// A checked certificate bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct Certificate {
    name: ServiceName,
    pem: String,
    info: CertInfo,
}

impl std::fmt::Debug for Certificate {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The PEM holds the private key: never printed.
        formatter
            .debug_struct("Certificate")
            .field("name", &self.name)
            .field("fingerprint", &self.info.fingerprint)
            .finish()
    }
}

impl Certificate {
    /// Checks a PEM bundle stored as `name`.
    pub fn parse(name: &str, pem: &[u8]) -> Result<Certificate, CertError> {
        let name =
            ServiceName::parse("certName", name).map_err(|error| CertError::Name(error.message))?;
        if pem.len() > MAX_PEM_BYTES {
            return Err(CertError::TooLarge(pem.len()));
        }
        let blocks = pem::parse_many(pem).map_err(|error| CertError::NotPem(error.to_string()))?;
        if blocks.is_empty() {
            return Err(CertError::NotPem(
                "no `-----BEGIN …-----` block found".into(),
            ));
        }
        let mut certificates = Vec::new();
        let mut keys = Vec::new();
        for block in blocks {
            match block.tag() {
                "CERTIFICATE" => certificates.push(block),
                "PRIVATE KEY" | "RSA PRIVATE KEY" | "EC PRIVATE KEY" => keys.push(block),
                other => return Err(CertError::UnexpectedBlock(printable(other))),
            }
        }
        if certificates.is_empty() {
            return Err(CertError::NoCertificate);
        }
        let key = match keys.len() {
            0 => return Err(CertError::NoPrivateKey),
            1 => &keys[0],
            several => return Err(CertError::SeveralKeys(several)),
        };
        let info = describe(name.as_str(), &certificates)?;
        let key_der = match key.tag() {
            "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(key.contents().to_vec().into()),
            "EC PRIVATE KEY" => PrivateKeyDer::Sec1(key.contents().to_vec().into()),
            _ => PrivateKeyDer::Pkcs8(key.contents().to_vec().into()),
        };
        let signing_key = rustls::crypto::ring::sign::any_supported_type(&key_der)
            .map_err(|error| CertError::BadKey(error.to_string()))?;
        let chain: Vec<CertificateDer<'static>> = certificates
            .iter()
            .map(|block| CertificateDer::from(block.contents().to_vec()))
            .collect();
        CertifiedKey::new(chain, Arc::clone(&signing_key))
            .keys_match()
            .map_err(|_| CertError::KeyMismatch)?;
        let mut normalised = certificates;
        normalised.push(key.clone());
        let pem = pem::encode_many_config(
            &normalised,
            pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
        );
        Ok(Certificate { name, pem, info })
    }

    /// The name it is stored under.
    pub fn name(&self) -> &ServiceName {
        &self.name
    }

    /// The bundle as HAProxy reads it (certificates, then the key). Holds the private key.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// What may be shown about it.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }
}

/// A PEM tag safe to echo.
fn printable(tag: &str) -> String {
    tag.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == ' ')
        .take(40)
        .collect()
}

/// Names, expiry and fingerprint of the leaf (the first certificate); every other certificate of
/// the chain must parse too.
fn describe(name: &str, certificates: &[pem::Pem]) -> Result<CertInfo, CertError> {
    let mut info = None;
    for (position, block) in certificates.iter().enumerate() {
        let bad = |message: String| CertError::BadCertificate {
            position: position + 1,
            message,
        };
        let (_, certificate) = x509_parser::parse_x509_certificate(block.contents())
            .map_err(|error| bad(error.to_string()))?;
        if position > 0 {
            continue;
        }
        let mut dns_names: Vec<String> = certificate
            .subject()
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            // A CN that is not a DNS name ("My Company CA") serves no SNI name.
            .filter(|cn| {
                !cn.is_empty()
                    && cn
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '*'))
            })
            .map(str::to_ascii_lowercase)
            .collect();
        if let Ok(Some(alternative)) = certificate.subject_alternative_name() {
            for general in &alternative.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(dns) = general {
                    let dns = dns.to_ascii_lowercase();
                    if !dns_names.contains(&dns) {
                        dns_names.push(dns);
                    }
                }
            }
        }
        let not_after = certificate.validity().not_after;
        let not_after_text = not_after
            .to_datetime()
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|error| bad(error.to_string()))?;
        info = Some(CertInfo {
            name: name.to_string(),
            dns_names,
            not_after: not_after_text,
            not_after_unix: not_after.timestamp(),
            not_before_unix: certificate.validity().not_before.timestamp(),
            expired: not_after.timestamp() < now_unix(),
            fingerprint: hex(&Sha256::digest(block.contents())),
        });
    }
    info.ok_or(CertError::NoCertificate)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            i64::try_from(elapsed.as_secs()).unwrap_or(i64::MAX)
        })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names` with its key, as PEM: (certificate, key).
    fn self_signed(names: &[&str]) -> (String, String) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let certified = rcgen::generate_simple_self_signed(names).expect("generate");
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    #[test]
    fn a_bundle_is_described_by_its_names_expiry_and_fingerprint_and_re_encoded() {
        let (cert, key) = self_signed(&["shop.example.com", "www.shop.example.com"]);
        let bundle = format!("some text a tool left\n{cert}\n{key}");
        let parsed = Certificate::parse("shop", bundle.as_bytes()).expect("valid bundle");
        assert_eq!(
            parsed.info().dns_names,
            ["shop.example.com", "www.shop.example.com"]
        );
        assert!(!parsed.info().expired);
        assert_eq!(parsed.info().fingerprint.len(), 64);
        assert!(
            parsed.info().not_after.ends_with('Z'),
            "{}",
            parsed.info().not_after
        );
        assert!(!parsed.pem().contains("some text"));
        assert!(parsed.pem().starts_with("-----BEGIN CERTIFICATE-----\n"));
        assert!(parsed
            .pem()
            .trim_end()
            .ends_with("-----END PRIVATE KEY-----"));
        assert!(!format!("{parsed:?}").contains("PRIVATE"));
    }

    #[test]
    fn garbage_keyless_mismatched_and_misnamed_bundles_are_refused_saying_which() {
        let (cert, key) = self_signed(&["a.example.com"]);
        let (_, other_key) = self_signed(&["b.example.com"]);
        type Expected = fn(&CertError) -> bool;
        let cases: [(&str, &str, Expected); 7] = [
            ("a", "not a certificate", |e| {
                matches!(e, CertError::NotPem(_))
            }),
            ("a", &cert, |e| matches!(e, CertError::NoPrivateKey)),
            ("a", &key, |e| matches!(e, CertError::NoCertificate)),
            (
                "a",
                "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                |e| {
                    matches!(
                        e,
                        CertError::BadCertificate { .. } | CertError::NoPrivateKey
                    )
                },
            ),
            ("a", "", |e| matches!(e, CertError::NotPem(_))),
            ("bad name", "", |e| matches!(e, CertError::Name(_))),
            ("a", "x", |e| matches!(e, CertError::NotPem(_))),
        ];
        for (name, pem, expected) in cases {
            let error = Certificate::parse(name, pem.as_bytes()).expect_err("refused");
            assert!(expected(&error), "{name} {pem:.30}: {error}");
        }
        let mismatched = format!("{cert}{other_key}");
        assert_eq!(
            Certificate::parse("a", mismatched.as_bytes()),
            Err(CertError::KeyMismatch)
        );
        let oversized = format!("{cert}{key}{}", "x".repeat(MAX_PEM_BYTES));
        assert_eq!(
            Certificate::parse("a", oversized.as_bytes()),
            Err(CertError::TooLarge(oversized.len()))
        );
        let two_keys = format!("{cert}{key}{other_key}");
        assert_eq!(
            Certificate::parse("a", two_keys.as_bytes()),
            Err(CertError::SeveralKeys(2))
        );
    }
}
