//! flow-proxy's Consul client: healthy instances of a service and the KV documents that hold the
//! specs. It relies only on the Consul HTTP API subset in `shared/consul-api.md`, so the same code
//! talks to a real Consul cluster and to the embedded registry.

use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::spec::Instance;

/// How long one request to Consul may take before the next address is tried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A registry call that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No Consul address answered at all.
    #[error("Consul is unreachable (tried {addresses}): {message}")]
    Unreachable { addresses: String, message: String },
    /// Consul answered, but with an error status.
    #[error("Consul answered {status} to {request}: {body}")]
    Status {
        request: String,
        status: u16,
        body: String,
    },
    /// Consul's answer was not what its API documents.
    #[error("Consul's answer to {request} could not be read: {message}")]
    Decode { request: String, message: String },
}

/// One KV entry, as `GET /v1/kv/<prefix>?recurse` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvEntry {
    /// The full key.
    pub key: String,
    /// The decoded value (empty when Consul stores `null`).
    pub value: Vec<u8>,
    /// The entry's `ModifyIndex`, usable for `?cas=`.
    pub modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct KvEntryWire {
    key: String,
    value: Option<String>,
    modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntryWire {
    node: HealthNodeWire,
    service: HealthServiceWire,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNodeWire {
    address: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthServiceWire {
    #[serde(rename = "ID")]
    id: String,
    address: String,
    port: u16,
}

/// A client for one Consul cluster, given as one or more agent addresses tried in order.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base_urls: Vec<String>,
}

impl ConsulClient {
    /// Builds a client for these addresses (`host:port` or `http://host:port`).
    pub fn new(addresses: &[String]) -> ConsulClient {
        let base_urls = addresses
            .iter()
            .map(|address| {
                let address = address.trim().trim_end_matches('/');
                if address.contains("://") {
                    address.to_string()
                } else {
                    format!("http://{address}")
                }
            })
            .collect();
        ConsulClient {
            http: reqwest::Client::builder()
                .timeout(REQUEST_TIMEOUT)
                .build()
                .unwrap_or_default(),
            base_urls,
        }
    }

    /// The first Consul address, as a base URL (`http://host:port`).
    pub fn primary_url(&self) -> &str {
        self.base_urls.first().map_or("", String::as_str)
    }

    /// The healthy instances of a Consul service (`/v1/health/service/<name>?passing`).
    ///
    /// An instance without its own address is reached at its node's address, as Consul documents.
    /// Instances whose address or port could never be valid in haproxy.cfg are skipped with a warning.
    pub async fn healthy_instances(&self, service: &str) -> Result<Vec<Instance>, RegistryError> {
        let path = format!("/v1/health/service/{service}?passing");
        let response = self.send(reqwest::Method::GET, &path, None).await?;
        let entries: Vec<HealthEntryWire> = decode_json(&path, response).await?;
        let mut instances = Vec::with_capacity(entries.len());
        for entry in entries {
            let address = if entry.service.address.is_empty() {
                entry.node.address
            } else {
                entry.service.address
            };
            match Instance::new(&address, entry.service.port) {
                Ok(instance) => instances.push(instance),
                Err(error) => tracing::warn!(
                    service,
                    instance = %entry.service.id,
                    %error,
                    "skipping an instance HAProxy could not reach"
                ),
            }
        }
        Ok(instances)
    }

    /// Every KV entry whose key starts with `prefix` (none when the prefix is empty in Consul).
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<KvEntry>, RegistryError> {
        let path = format!("/v1/kv/{prefix}?recurse");
        let response = self.send(reqwest::Method::GET, &path, None).await?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let entries: Vec<KvEntryWire> = decode_json(&path, response).await?;
        entries
            .into_iter()
            .map(|entry| {
                let value = match entry.value {
                    Some(encoded) => base64::engine::general_purpose::STANDARD
                        .decode(encoded)
                        .map_err(|error| RegistryError::Decode {
                            request: format!("GET {path}"),
                            message: format!("value of {}: {error}", entry.key),
                        })?,
                    None => Vec::new(),
                };
                Ok(KvEntry {
                    key: entry.key,
                    value,
                    modify_index: entry.modify_index,
                })
            })
            .collect()
    }

    /// Stores `value` at `key`.
    pub async fn kv_put(&self, key: &str, value: Vec<u8>) -> Result<(), RegistryError> {
        let path = format!("/v1/kv/{key}");
        let response = self.send(reqwest::Method::PUT, &path, Some(value)).await?;
        let stored: bool = decode_json(&path, response).await?;
        if stored {
            Ok(())
        } else {
            Err(RegistryError::Status {
                request: format!("PUT {path}"),
                status: 200,
                body: "false (the value was not stored)".into(),
            })
        }
    }

    /// Deletes `key` (deleting a missing key succeeds, as in Consul).
    pub async fn kv_delete(&self, key: &str) -> Result<(), RegistryError> {
        let path = format!("/v1/kv/{key}");
        let response = self.send(reqwest::Method::DELETE, &path, None).await?;
        let _: bool = decode_json(&path, response).await?;
        Ok(())
    }

    /// Sends one request to the first address that answers. 404 is passed back to the caller;
    /// any other non-2xx status becomes [`RegistryError::Status`].
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<reqwest::Response, RegistryError> {
        let mut failures = Vec::new();
        for base_url in &self.base_urls {
            let mut request = self
                .http
                .request(method.clone(), format!("{base_url}{path}"));
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            match request.send().await {
                Ok(response) => {
                    let status = response.status();
                    if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
                        return Ok(response);
                    }
                    let body = response.text().await.unwrap_or_default();
                    return Err(RegistryError::Status {
                        request: format!("{method} {path}"),
                        status: status.as_u16(),
                        body: body.trim().to_string(),
                    });
                }
                Err(error) => failures.push(format!("{base_url}: {error}")),
            }
        }
        Err(RegistryError::Unreachable {
            addresses: self.base_urls.join(", "),
            message: failures.join("; "),
        })
    }
}

async fn decode_json<T: serde::de::DeserializeOwned>(
    path: &str,
    response: reqwest::Response,
) -> Result<T, RegistryError> {
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|error| RegistryError::Decode {
            request: path.to_string(),
            message: error.to_string(),
        })?;
    if status == reqwest::StatusCode::NOT_FOUND {
        return Err(RegistryError::Status {
            request: path.to_string(),
            status: status.as_u16(),
            body: String::from_utf8_lossy(&bytes).trim().to_string(),
        });
    }
    serde_json::from_slice(&bytes).map_err(|error| RegistryError::Decode {
        request: path.to_string(),
        message: error.to_string(),
    })
}
