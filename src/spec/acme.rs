//! The ACME parameter of a service: `letsEncrypt=true` asks flow-proxy to get (and renew) a
//! certificate for each of the service's exact `serviceDomain`s from the ACME directory
//! (`--acme-directory`). The ordering itself lives in `crate::acme`.

use super::values::{parse_flag, spec_error};
use super::{Domain, ServiceSpec, SpecError};

/// The reconfigure parameter, Docker Flow Proxy's name for it.
pub(crate) const LETS_ENCRYPT: &str = "letsEncrypt";

/// Reads `letsEncrypt` (absent: `false`).
pub(crate) fn parse_lets_encrypt(value: Option<&str>) -> Result<bool, SpecError> {
    value
        .map(|v| parse_flag(LETS_ENCRYPT, v))
        .transpose()
        .map(|flag| flag.unwrap_or(false))
}

/// `letsEncrypt=true` needs at least one exact domain: an ACME server validates HTTP-01 for a
/// name, never for a wildcard.
pub(crate) fn check_lets_encrypt(spec: &ServiceSpec) -> Result<(), SpecError> {
    if spec.lets_encrypt && acme_domains(spec).is_empty() {
        return Err(spec_error(
            LETS_ENCRYPT,
            "needs a serviceDomain that is not a wildcard: the certificate is validated over \
             HTTP (HTTP-01) for each exact name",
        ));
    }
    Ok(())
}

/// The domains of `spec` a certificate can be ordered for over HTTP-01: its exact
/// `serviceDomain`s (wildcards need DNS-01, which flow-proxy does not do).
pub fn acme_domains(spec: &ServiceSpec) -> Vec<&Domain> {
    spec.all_service_domains()
        .into_iter()
        .filter(|domain| !domain.is_wildcard())
        .collect()
}
