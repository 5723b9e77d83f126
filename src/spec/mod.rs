//! Service specs: the typed, validated description of how one service is routed.
//!
//! Everything that reaches haproxy.cfg passes through a type of this module, and each type only
//! holds values that matched a strict pattern when it was built. No raw string from a request or
//! from the registry reaches a template.
//!
//! (Skeleton: parsing and validation are filled in by the spec/render work.)

use serde::{Deserialize, Serialize};

/// A request parameter that failed validation; the HTTP answer is 400 and names the parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{parameter}`: {message}")]
pub struct SpecError {
    /// The query parameter (or stored field) at fault, as the user wrote it, e.g. `servicePath.1`.
    pub parameter: String,
    /// What is wrong with it, in words a user can act on.
    pub message: String,
}

/// A validated service name (`[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 64 characters).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServiceName(String);

impl ServiceName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How one service is routed: the spec stored in KV and echoed in API answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceSpec {
    /// The service's name (the Consul service read, unless a color is set).
    pub service_name: ServiceName,
}

impl ServiceSpec {
    /// Parses a reconfigure query (all pairs, in order) into a spec.
    pub fn from_query(_pairs: &[(String, String)]) -> Result<ServiceSpec, SpecError> {
        Err(SpecError {
            parameter: "serviceName".into(),
            message: "not implemented yet".into(),
        })
    }

    /// The service this spec routes.
    pub fn service_name(&self) -> &ServiceName {
        &self.service_name
    }

    /// The Consul service whose instances back this spec: `<serviceName>` or `<serviceName>-<color>`.
    pub fn consul_service_name(&self) -> String {
        self.service_name.to_string()
    }
}

/// Reads the `serviceName` of a remove query.
pub fn service_name_from_query(_pairs: &[(String, String)]) -> Result<ServiceName, SpecError> {
    Err(SpecError {
        parameter: "serviceName".into(),
        message: "not implemented yet".into(),
    })
}

/// One healthy instance of a service as HAProxy will reach it: a validated address and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Instance {
    address: String,
    port: u16,
}

impl Instance {
    /// Validates an address (IPv4, IPv6 or DNS name) read from the registry.
    pub fn new(address: &str, port: u16) -> Result<Instance, SpecError> {
        Ok(Instance {
            address: address.to_string(),
            port,
        })
    }

    /// The instance's address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The instance's port.
    pub fn port(&self) -> u16 {
        self.port
    }
}
