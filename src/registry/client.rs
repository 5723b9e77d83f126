//! flow-proxy's Consul client: healthy instances of a service, the two change detectors the
//! instance follower blocks on (every check's state, the catalog's service names and tags), and
//! the KV documents that hold the specs. It relies only on the Consul HTTP API subset in
//! `shared/consul-api.md`, so the same code talks to a real Consul cluster and to the embedded
//! registry. All requests share one connection pool that keeps at most
//! [`IDLE_CONNECTIONS_PER_ADDRESS`] idle connections to each address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use crate::settings::Secret;
use crate::spec::Instance;

/// How long a non-blocking request to one Consul address may take: well under the API's change
/// timeout, so a slow Consul is answered as such instead of holding every change.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// How long connecting to one Consul address may take before the next one is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Extra time a blocking query gets on top of its `wait` and Consul's `wait/16` jitter.
const BLOCKING_GRACE: Duration = Duration::from_secs(5);

/// Idle connections the pool keeps open to one Consul address, besides those in use (the
/// blocking queries each hold one): enough for the instance reads in flight to reuse theirs.
pub const IDLE_CONNECTIONS_PER_ADDRESS: usize = 2;

/// A registry call that failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No Consul address answered at all.
    #[error("Consul is unreachable (tried {addresses}): {message}")]
    Unreachable { addresses: String, message: String },
    /// Consul answered, but cannot serve requests now (e.g. `500 No cluster leader`).
    #[error("Consul cannot serve {request} now: {status} {body}")]
    Unavailable {
        request: String,
        status: u16,
        body: String,
    },
    /// Consul's ACL system refused the request (403): the token is missing, unknown, or lacks a right.
    #[error(
        "Consul's ACLs refused {request} (403 {body}): check the token given with --consul-token \
         (or CONSUL_HTTP_TOKEN) and that its policy grants service:read, node:read and key:write \
         on the KV prefix"
    )]
    AclDenied { request: String, body: String },
    /// Consul left entries out of a list because the token may not read them, and said so
    /// (`X-Consul-Results-Filtered-By-ACLs: true`, Consul 1.11 and later, for a token that is
    /// not the anonymous one): the list is not the truth about what is registered or stored.
    #[error(
        "Consul's ACLs left entries out of its answer to {request} \
         (X-Consul-Results-Filtered-By-ACLs): it is not taken as the truth; check that the token \
         given with --consul-token (or CONSUL_HTTP_TOKEN) grants service:read and node:read (and \
         key:read on the KV prefix)"
    )]
    FilteredByAcls { request: String },
    /// Consul answered with another error status.
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

/// Which instances a routed service takes: the passing instances of one Consul service, only
/// those carrying every one of `tags` (`serviceTag`) when tags are given, as Consul's repeated
/// `?tag=` filters them. It is also what the instance follower reads when the service may have
/// changed, so two routed services reading the same Consul service with different tags each get
/// their own read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceQuery {
    service: String,
    /// Sorted, unique: the same set of tags is the same query.
    tags: Vec<String>,
}

impl InstanceQuery {
    /// Every passing instance of `service` carrying all `tags` (none: every passing instance).
    pub fn new(service: impl Into<String>, tags: impl IntoIterator<Item = String>) -> Self {
        let mut tags: Vec<String> = tags.into_iter().collect();
        tags.sort();
        tags.dedup();
        InstanceQuery {
            service: service.into(),
            tags,
        }
    }

    /// Every passing instance of `service`.
    pub fn untagged(service: impl Into<String>) -> Self {
        InstanceQuery::new(service, Vec::new())
    }

    /// The Consul service.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The tags every instance must carry.
    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// `/v1/health/service/<service>?passing[&tag=…]…`, the tags percent-encoded.
    fn health_path(&self) -> String {
        let tags: Vec<(&str, &str)> = self.tags.iter().map(|tag| ("tag", tag.as_str())).collect();
        let mut path = format!("/v1/health/service/{}?passing", self.service);
        if let Ok(query) = serde_urlencoded::to_string(&tags) {
            if !query.is_empty() {
                path.push('&');
                path.push_str(&query);
            }
        }
        path
    }
}

impl std::fmt::Display for InstanceQuery {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.service)?;
        if !self.tags.is_empty() {
            write!(formatter, " (tagged {})", self.tags.join(", "))?;
        }
        Ok(())
    }
}

/// What a read returned, with the `X-Consul-Index` it carried (0 when the header was absent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Indexed<T> {
    /// The data.
    pub value: T,
    /// The index to pass to the next blocking query on the same resource.
    pub index: u64,
}

/// Makes a read a blocking query: it returns once the resource's index passes `index`, or after
/// about `wait` with the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocking {
    /// The `X-Consul-Index` of the previous answer (never 0: 0 does not block).
    pub index: u64,
    /// The longest time Consul should hold the query.
    pub wait: Duration,
}

impl Blocking {
    fn query(&self) -> String {
        format!("index={}&wait={}s", self.index, self.wait.as_secs().max(1))
    }

    fn timeout(&self) -> Duration {
        self.wait + self.wait / 16 + BLOCKING_GRACE
    }
}

/// One health check as `/v1/health/state/any` lists it: what the instance follower compares
/// between two answers to know which services' instances may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// The node the check runs on.
    pub node: String,
    /// The check's ID (unique on its node).
    pub check_id: String,
    /// The instance it checks; empty for a node check (e.g. `serfHealth`).
    pub service_id: String,
    /// The Consul service of that instance; empty for a node check.
    pub service_name: String,
    /// `passing`, `warning` or `critical`.
    pub status: String,
    /// The index of the check's last write.
    pub modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheckWire {
    node: String,
    #[serde(rename = "CheckID")]
    check_id: String,
    #[serde(rename = "ServiceID", default)]
    service_id: String,
    #[serde(default)]
    service_name: String,
    status: String,
    #[serde(default)]
    modify_index: u64,
}

/// One instance as `/v1/catalog/node/<node>` lists it: what tells whether its service's
/// health answer may have changed when it is registered, changed or deregistered. Consul moves
/// an instance's `ModifyIndex` with every change to it (tags, address, port…), so the index is
/// kept rather than the values: a listing of 10,000 instances is followed in less memory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeInstance {
    /// The Consul service.
    pub service: String,
    /// The index of the instance's last write.
    #[serde(default)]
    pub modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeNameWire {
    node: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeServicesWire {
    #[serde(default)]
    services: Option<BTreeMap<String, NodeInstance>>,
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

/// One KV entry as a listing returns it, its value still in Consul's base64: a caller that follows
/// a prefix decodes only the entries whose `ModifyIndex` moved (see [`ConsulClient::watch_kv_list`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedKvEntry {
    /// The full key.
    pub key: String,
    /// The entry's `ModifyIndex`.
    pub modify_index: u64,
    /// The value in base64 (`None` when Consul stores `null`).
    encoded: Option<String>,
}

impl From<KvEntry> for ListedKvEntry {
    /// The entry as a listing would return it.
    fn from(entry: KvEntry) -> ListedKvEntry {
        ListedKvEntry {
            key: entry.key,
            modify_index: entry.modify_index,
            encoded: Some(base64::engine::general_purpose::STANDARD.encode(entry.value)),
        }
    }
}

impl ListedKvEntry {
    /// The entry with its value decoded.
    pub fn decode(self) -> Result<KvEntry, RegistryError> {
        let value = match self.encoded {
            Some(encoded) => base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|error| RegistryError::Decode {
                    request: format!("GET /v1/kv/{}", self.key),
                    message: format!("value of {}: {error}", self.key),
                })?,
            None => Vec::new(),
        };
        Ok(KvEntry {
            key: self.key,
            value,
            modify_index: self.modify_index,
        })
    }
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
    /// Read wide: one instance registered with an impossible port must not make the whole
    /// answer unreadable (it is skipped, the others are served).
    port: i64,
}

/// A client for one Consul cluster, given as one or more agent addresses tried in order.
#[derive(Debug, Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base_urls: Vec<String>,
    token: Option<Secret>,
}

impl ConsulClient {
    /// Builds a client for these addresses (`host:port` or `http://host:port`), sending `token`
    /// (when given) as `X-Consul-Token` with every request.
    pub fn new(addresses: &[String], token: Option<String>) -> ConsulClient {
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
                .connect_timeout(CONNECT_TIMEOUT)
                .pool_max_idle_per_host(IDLE_CONNECTIONS_PER_ADDRESS)
                .build()
                .unwrap_or_default(),
            base_urls,
            token: token.filter(|token| !token.is_empty()).map(Secret::new),
        }
    }

    /// The first Consul address, as a base URL (`http://host:port`).
    pub fn primary_url(&self) -> &str {
        self.base_urls.first().map_or("", String::as_str)
    }

    /// The healthy instances of a Consul service (`/v1/health/service/<name>?passing`), only
    /// those carrying the query's tags (`&tag=…`).
    pub async fn healthy_instances(
        &self,
        query: &InstanceQuery,
    ) -> Result<Vec<Instance>, RegistryError> {
        Ok(self.watch_healthy_instances(query, None).await?.value)
    }

    /// Like [`ConsulClient::healthy_instances`], as a blocking query when `blocking` is given.
    ///
    /// An instance without its own address is reached at its node's address, as Consul documents.
    /// Instances whose address or port could never be valid in haproxy.cfg are skipped with a warning.
    /// An answer Consul's ACLs filtered is [`RegistryError::FilteredByAcls`]: instances the token
    /// may not see are not instances that left.
    pub async fn watch_healthy_instances(
        &self,
        query: &InstanceQuery,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<Instance>>, RegistryError> {
        let service = query.service();
        let path = with_blocking(query.health_path(), blocking);
        let response = unfiltered(&path, self.get(&path, blocking).await?)?;
        let index = consul_index(&response);
        let entries: Vec<HealthEntryWire> = decode_json(&path, response).await?;
        let mut instances = Vec::with_capacity(entries.len());
        for entry in entries {
            let address = if entry.service.address.is_empty() {
                entry.node.address
            } else {
                entry.service.address
            };
            let port = u16::try_from(entry.service.port).map_err(|_| crate::spec::SpecError {
                parameter: "ServicePort".into(),
                message: format!("{} is not a TCP port", entry.service.port),
            });
            match port.and_then(|port| Instance::new(&address, port)) {
                Ok(instance) => instances.push(instance),
                Err(error) => tracing::warn!(
                    service,
                    instance = %entry.service.id,
                    %error,
                    "skipping an instance HAProxy could not reach"
                ),
            }
        }
        Ok(Indexed {
            value: instances,
            index,
        })
    }

    /// Every health check of the datacenter (`/v1/health/state/any`), as a blocking query when
    /// `blocking` is given. Its index is Consul's checks-table index: it moves when a check is
    /// added, changes (status, output, service tags) or is removed. An answer the ACLs filtered
    /// is taken as it is: it only names services to read, and those reads are checked.
    pub async fn watch_checks(
        &self,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<HealthCheck>>, RegistryError> {
        let path = with_blocking("/v1/health/state/any".to_string(), blocking);
        let response = self.get(&path, blocking).await?;
        let index = consul_index(&response);
        let checks: Vec<HealthCheckWire> = decode_json(&path, response).await?;
        let value = checks
            .into_iter()
            .map(|check| HealthCheck {
                node: check.node,
                check_id: check.check_id,
                service_id: check.service_id,
                service_name: check.service_name,
                status: check.status,
                modify_index: check.modify_index,
            })
            .collect();
        Ok(Indexed { value, index })
    }

    /// Every Consul service with the union of its instances' tags (`/v1/catalog/services`), as a
    /// blocking query when `blocking` is given. Its index is Consul's services-table index: it
    /// moves when any instance is registered, changed or deregistered. Like
    /// [`ConsulClient::watch_checks`], an answer the ACLs filtered is taken as it is.
    pub async fn watch_service_tags(
        &self,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<BTreeMap<String, BTreeSet<String>>>, RegistryError> {
        let path = with_blocking("/v1/catalog/services".to_string(), blocking);
        let response = self.get(&path, blocking).await?;
        let index = consul_index(&response);
        let services: BTreeMap<String, Option<Vec<String>>> = decode_json(&path, response).await?;
        let value = services
            .into_iter()
            .map(|(name, tags)| (name, tags.unwrap_or_default().into_iter().collect()))
            .collect();
        Ok(Indexed { value, index })
    }

    /// The names of the datacenter's nodes (`/v1/catalog/nodes`); [`RegistryError::FilteredByAcls`]
    /// when the ACLs left some out.
    pub async fn node_names(&self) -> Result<Indexed<Vec<String>>, RegistryError> {
        let path = "/v1/catalog/nodes";
        let response = unfiltered(path, self.get(path, None).await?)?;
        let index = consul_index(&response);
        let nodes: Vec<NodeNameWire> = decode_json(path, response).await?;
        Ok(Indexed {
            value: nodes.into_iter().map(|node| node.node).collect(),
            index,
        })
    }

    /// Every instance registered on `node`, by instance ID (`/v1/catalog/node/<node>`; none when
    /// the node is gone); [`RegistryError::FilteredByAcls`] when the ACLs left some out.
    pub async fn node_instances(
        &self,
        node: &str,
    ) -> Result<BTreeMap<String, NodeInstance>, RegistryError> {
        let path = format!("/v1/catalog/node/{}", path_segment(node));
        let response = unfiltered(&path, self.get(&path, None).await?)?;
        let listing: Option<NodeServicesWire> = decode_json(&path, response).await?;
        Ok(listing
            .and_then(|listing| listing.services)
            .unwrap_or_default())
    }

    /// Every KV entry whose key starts with `prefix` (none when the prefix is empty in Consul).
    pub async fn kv_list(&self, prefix: &str) -> Result<Vec<KvEntry>, RegistryError> {
        self.watch_kv_list(prefix, None)
            .await?
            .value
            .into_iter()
            .map(ListedKvEntry::decode)
            .collect()
    }

    /// Like [`ConsulClient::kv_list`], as a blocking query when `blocking` is given, with the
    /// values left to decode.
    pub async fn watch_kv_list(
        &self,
        prefix: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<ListedKvEntry>>, RegistryError> {
        let path = with_blocking(format!("/v1/kv/{prefix}?recurse"), blocking);
        self.kv_listing(&path, blocking).await
    }

    /// One KV entry (`None` when the key does not exist), with the index of the read: the entry's
    /// `ModifyIndex`, or for a missing key the KV store's index counting deletions.
    pub async fn kv_get(&self, key: &str) -> Result<Indexed<Option<KvEntry>>, RegistryError> {
        let read = self.kv_read(&format!("/v1/kv/{key}"), None).await?;
        Ok(Indexed {
            value: read.value.into_iter().next(),
            index: read.index,
        })
    }

    /// A KV read: the entries Consul lists (none on 404) and the answer's index. A listing the
    /// ACLs filtered is [`RegistryError::FilteredByAcls`]: a spec the token may not read is not
    /// a removed one.
    async fn kv_read(
        &self,
        path: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<KvEntry>>, RegistryError> {
        let listed = self.kv_listing(path, blocking).await?;
        let value = listed
            .value
            .into_iter()
            .map(ListedKvEntry::decode)
            .collect::<Result<_, _>>()?;
        Ok(Indexed {
            value,
            index: listed.index,
        })
    }

    /// [`ConsulClient::kv_read`] with the values left in base64.
    async fn kv_listing(
        &self,
        path: &str,
        blocking: Option<Blocking>,
    ) -> Result<Indexed<Vec<ListedKvEntry>>, RegistryError> {
        let response = unfiltered(path, self.get(path, blocking).await?)?;
        let index = consul_index(&response);
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(Indexed {
                value: Vec::new(),
                index,
            });
        }
        let entries: Vec<KvEntryWire> = decode_json(path, response).await?;
        let value = entries
            .into_iter()
            .map(|entry| ListedKvEntry {
                key: entry.key,
                modify_index: entry.modify_index,
                encoded: entry.value,
            })
            .collect();
        Ok(Indexed { value, index })
    }

    /// Stores `value` at `key` only if the key's `ModifyIndex` is still `modify_index` (0: only if
    /// the key does not exist). `false` means another writer got there first.
    pub async fn kv_put_cas(
        &self,
        key: &str,
        value: Vec<u8>,
        modify_index: u64,
    ) -> Result<bool, RegistryError> {
        let query = format!("?cas={modify_index}");
        self.kv_write(reqwest::Method::PUT, key, &query, Some(value))
            .await
    }

    /// Deletes `key` only if its `ModifyIndex` is still `modify_index`. `false` means another
    /// writer changed it first.
    pub async fn kv_delete_cas(&self, key: &str, modify_index: u64) -> Result<bool, RegistryError> {
        let query = format!("?cas={modify_index}");
        self.kv_write(reqwest::Method::DELETE, key, &query, None)
            .await
    }

    /// A KV PUT or DELETE; Consul answers `true` or `false`.
    async fn kv_write(
        &self,
        method: reqwest::Method,
        key: &str,
        query: &str,
        body: Option<Vec<u8>>,
    ) -> Result<bool, RegistryError> {
        let path = format!("/v1/kv/{key}{query}");
        let response = self.send(method, &path, body, REQUEST_TIMEOUT).await?;
        decode_json(&path, response).await
    }

    async fn get(
        &self,
        path: &str,
        blocking: Option<Blocking>,
    ) -> Result<reqwest::Response, RegistryError> {
        let timeout = blocking.map_or(REQUEST_TIMEOUT, |blocking| blocking.timeout());
        self.send(reqwest::Method::GET, path, None, timeout).await
    }

    /// Sends one request to the addresses in order until one answers. An address that cannot be
    /// reached, or answers 5xx (e.g. `No cluster leader`), hands over to the next one. 404 is
    /// passed back to the caller; 403 becomes [`RegistryError::AclDenied`] at once (a token
    /// refused by one agent is refused by all); any other error status becomes
    /// [`RegistryError::Status`].
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<reqwest::Response, RegistryError> {
        let request_name = format!("{method} {}", path_without_query(path));
        let mut unreachable = Vec::new();
        let mut unavailable = None;
        for base_url in &self.base_urls {
            let mut request = self
                .http
                .request(method.clone(), format!("{base_url}{path}"))
                .timeout(timeout);
            if let Some(token) = &self.token {
                request = request.header("X-Consul-Token", token.expose());
            }
            if let Some(body) = &body {
                request = request.body(body.clone());
            }
            let response = match request.send().await {
                Ok(response) => response,
                Err(error) => {
                    unreachable.push(format!("{base_url}: {}", with_causes(&error)));
                    continue;
                }
            };
            let status = response.status();
            if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
                return Ok(response);
            }
            let body = response.text().await.unwrap_or_default().trim().to_string();
            if status == reqwest::StatusCode::FORBIDDEN {
                return Err(RegistryError::AclDenied {
                    request: request_name,
                    body,
                });
            }
            if status.is_server_error() {
                tracing::debug!(%base_url, %status, %body, "Consul address cannot serve; trying the next");
                unavailable = Some(RegistryError::Unavailable {
                    request: request_name.clone(),
                    status: status.as_u16(),
                    body,
                });
                continue;
            }
            return Err(RegistryError::Status {
                request: request_name,
                status: status.as_u16(),
                body,
            });
        }
        Err(unavailable.unwrap_or_else(|| RegistryError::Unreachable {
            addresses: self.base_urls.join(", "),
            message: unreachable.join("; "),
        }))
    }
}

fn with_blocking(path: String, blocking: Option<Blocking>) -> String {
    match blocking {
        Some(blocking) => {
            let separator = if path.contains('?') { '&' } else { '?' };
            format!("{path}{separator}{}", blocking.query())
        }
        None => path,
    }
}

/// An error and its causes, outermost first: reqwest's own text ("error sending request for
/// url") leaves out the reason, e.g. "Connection refused" or "Too many open files".
fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        let inner_text = inner.to_string();
        if !text.contains(&inner_text) {
            text.push_str(": ");
            text.push_str(&inner_text);
        }
        cause = inner.source();
    }
    text
}

/// `text` as one URL path segment: every byte but the unreserved ones percent-encoded.
fn path_segment(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn path_without_query(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// The header Consul (1.11 and later) sets on a list it filtered with the token's ACLs.
pub const FILTERED_BY_ACLS_HEADER: &str = "X-Consul-Results-Filtered-By-ACLs";

/// `response`, unless Consul says its ACLs left entries out of it
/// ([`FILTERED_BY_ACLS_HEADER`]`: true`).
fn unfiltered(path: &str, response: reqwest::Response) -> Result<reqwest::Response, RegistryError> {
    let filtered = response
        .headers()
        .get(FILTERED_BY_ACLS_HEADER)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.trim().eq_ignore_ascii_case("true"));
    if filtered {
        return Err(RegistryError::FilteredByAcls {
            request: format!("GET {}", path_without_query(path)),
        });
    }
    Ok(response)
}

/// The `X-Consul-Index` header (header names are case-insensitive); 0 when absent or unreadable.
fn consul_index(response: &reqwest::Response) -> u64 {
    response
        .headers()
        .get("x-consul-index")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
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

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::Duration;

    use super::*;
    use crate::registry::embedded::{EmbeddedRegistry, Fault};

    #[test]
    fn an_instance_query_asks_consul_for_every_tag_once_in_order() {
        let query = InstanceQuery::new("web", ["v1", "rest", "rest"].map(String::from));
        assert_eq!(
            query.health_path(),
            "/v1/health/service/web?passing&tag=rest&tag=v1"
        );
        assert_eq!(query.to_string(), "web (tagged rest, v1)");
        assert_eq!(
            query,
            InstanceQuery::new("web", ["rest", "v1"].map(String::from)),
            "the same tags are the same watch"
        );
        let untagged = InstanceQuery::untagged("web");
        assert_eq!(untagged.health_path(), "/v1/health/service/web?passing");
        assert_ne!(untagged, query);
        let odd = InstanceQuery::new("web", ["a b&c".to_string()]);
        assert_eq!(
            odd.health_path(),
            "/v1/health/service/web?passing&tag=a+b%26c"
        );
    }

    async fn registry() -> (EmbeddedRegistry, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry =
            EmbeddedRegistry::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), dir.path())
                .await
                .expect("embedded registry starts");
        (registry, dir)
    }

    /// An address nobody listens on.
    fn dead_address() -> String {
        let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        address.to_string()
    }

    #[tokio::test]
    async fn instances_with_impossible_ports_or_addresses_are_skipped_and_the_others_kept() {
        // What a Consul that accepted such registrations answers (the embedded registry refuses
        // them, so this answer is served by hand).
        let entry = |id: &str, address: &str, port: i64| {
            serde_json::json!({
                "Node": {"Node": "n", "Address": "127.0.0.1"},
                "Service": {"ID": id, "Service": "web", "Address": address, "Port": port},
                "Checks": []
            })
        };
        let answer = serde_json::json!([
            entry("bad-negative", "127.0.0.1", -1),
            entry("good-1", "127.0.0.1", 8080),
            entry("bad-too-high", "127.0.0.1", 99999),
            entry("bad-zero", "127.0.0.1", 0),
            entry("bad-address", "10.0.0.1\nbind :1", 80),
            entry("good-2", "", 8081),
        ]);
        let app = axum::Router::new().route(
            "/v1/health/service/web",
            axum::routing::get(
                move || async move { ([("X-Consul-Index", "7")], axum::Json(answer)) },
            ),
        );
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = ConsulClient::new(&[address], None);
        let instances = client
            .healthy_instances(&InstanceQuery::untagged("web"))
            .await
            .expect("readable");
        let served: Vec<(String, u16)> = instances
            .iter()
            .map(|instance| (instance.address().to_string(), instance.port()))
            .collect();
        assert_eq!(
            served,
            [
                ("127.0.0.1".to_string(), 8080),
                ("127.0.0.1".to_string(), 8081)
            ]
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_list_consul_says_its_acls_filtered_is_not_taken_as_the_truth() {
        // What a Consul 1.11+ answers a token that may not read everything: the entries it may
        // not see left out, and the header saying so.
        let filtered = |body: serde_json::Value| {
            move || async move {
                (
                    [("X-Consul-Index", "7"), (FILTERED_BY_ACLS_HEADER, "true")],
                    axum::Json(body),
                )
            }
        };
        let app = axum::Router::new()
            .route(
                "/v1/health/service/web",
                axum::routing::get(filtered(serde_json::json!([]))),
            )
            .route(
                "/v1/kv/flow-proxy/services/",
                axum::routing::get(filtered(serde_json::json!([]))),
            )
            .route(
                "/v1/catalog/nodes",
                axum::routing::get(filtered(serde_json::json!([]))),
            )
            .route(
                "/v1/health/state/any",
                axum::routing::get(filtered(serde_json::json!([]))),
            )
            .route(
                "/v1/catalog/services",
                axum::routing::get(filtered(serde_json::json!({"web": []}))),
            );
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address").to_string();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let client = ConsulClient::new(&[address], Some("a-token".into()));

        let error = client
            .healthy_instances(&InstanceQuery::untagged("web"))
            .await
            .expect_err("a filtered instance list is no list of instances");
        assert!(
            matches!(&error, RegistryError::FilteredByAcls { request } if request == "GET /v1/health/service/web"),
            "{error:?}"
        );
        assert!(error.to_string().contains("--consul-token"), "{error}");
        assert!(matches!(
            client.kv_list("flow-proxy/services/").await,
            Err(RegistryError::FilteredByAcls { .. })
        ));
        assert!(matches!(
            client.node_names().await,
            Err(RegistryError::FilteredByAcls { .. })
        ));
        // The change detectors only name services to read: their answers are taken as they are.
        assert_eq!(client.watch_checks(None).await.expect("checks").index, 7);
        let tags = client.watch_service_tags(None).await.expect("services");
        assert!(tags.value.contains_key("web"));
        server.abort();
    }

    #[tokio::test]
    async fn an_unreachable_or_leaderless_address_hands_over_to_the_next_one() {
        let (sick, _sick_dir) = registry().await;
        sick.set_fault(Some(Fault::NoLeader));
        let (healthy, _healthy_dir) = registry().await;
        let client = ConsulClient::new(
            &[
                dead_address(),
                sick.address().to_string(),
                healthy.address().to_string(),
            ],
            None,
        );

        assert!(client
            .kv_put_cas("flow-proxy/services/web", b"{}".to_vec(), 0)
            .await
            .expect("the third address takes the write"));
        let stored = client
            .kv_get("flow-proxy/services/web")
            .await
            .expect("read");
        assert_eq!(stored.value.map(|entry| entry.value), Some(b"{}".to_vec()));
    }

    #[tokio::test]
    async fn when_every_address_fails_the_error_says_why() {
        let (sick, _dir) = registry().await;
        sick.set_fault(Some(Fault::NoLeader));
        let leaderless = ConsulClient::new(&[sick.address().to_string()], None);
        let error = leaderless
            .kv_list("flow-proxy/")
            .await
            .expect_err("no leader");
        assert!(
            matches!(&error, RegistryError::Unavailable { status: 500, body, .. } if body == "No cluster leader"),
            "{error:?}"
        );

        let nobody = ConsulClient::new(&[dead_address(), dead_address()], None);
        let error = nobody
            .kv_list("flow-proxy/")
            .await
            .expect_err("unreachable");
        assert!(
            matches!(error, RegistryError::Unreachable { .. }),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_403_is_an_acl_refusal_and_no_other_address_is_tried() {
        let (refusing, _refusing_dir) = registry().await;
        refusing.set_fault(Some(Fault::PermissionDenied));
        let (healthy, _healthy_dir) = registry().await;
        let client = ConsulClient::new(
            &[
                refusing.address().to_string(),
                healthy.address().to_string(),
            ],
            Some("weak-token".into()),
        );

        let error = client
            .kv_put_cas("flow-proxy/services/web", b"{}".to_vec(), 0)
            .await
            .expect_err("refused");

        assert!(
            matches!(&error, RegistryError::AclDenied { body, .. } if body.contains("Permission denied")),
            "{error:?}"
        );
        assert!(error.to_string().contains("--consul-token"), "{error}");
        let untouched = ConsulClient::new(&[healthy.address().to_string()], None);
        assert_eq!(
            untouched
                .kv_get("flow-proxy/services/web")
                .await
                .expect("read")
                .value,
            None,
            "the refusal was final: the next address was not written to"
        );
    }

    #[tokio::test]
    async fn check_and_set_writes_only_over_the_index_read() {
        let (registry, _dir) = registry().await;
        let client = ConsulClient::new(&[registry.address().to_string()], None);
        let key = "flow-proxy/services/web";

        assert!(client
            .kv_put_cas(key, b"one".to_vec(), 0)
            .await
            .expect("create"));
        assert!(!client
            .kv_put_cas(key, b"two".to_vec(), 0)
            .await
            .expect("create again"));
        let read = client
            .kv_get(key)
            .await
            .expect("read")
            .value
            .expect("an entry");
        assert!(!client
            .kv_put_cas(key, b"two".to_vec(), read.modify_index + 1)
            .await
            .expect("stale index"));
        assert!(client
            .kv_put_cas(key, b"two".to_vec(), read.modify_index)
            .await
            .expect("current index"));
        let read = client
            .kv_get(key)
            .await
            .expect("read")
            .value
            .expect("an entry");
        assert_eq!(read.value, b"two");
        assert!(!client
            .kv_delete_cas(key, read.modify_index - 1)
            .await
            .expect("stale delete"));
        assert!(client
            .kv_delete_cas(key, read.modify_index)
            .await
            .expect("delete"));
        assert_eq!(client.kv_get(key).await.expect("read").value, None);
    }

    #[tokio::test]
    async fn a_blocking_list_returns_when_the_prefix_changes_with_a_higher_index() {
        let (registry, _dir) = registry().await;
        let client = ConsulClient::new(&[registry.address().to_string()], None);
        assert!(client
            .kv_put_cas("flow-proxy/services/a", b"a".to_vec(), 0)
            .await
            .expect("write"));
        let first = client
            .watch_kv_list("flow-proxy/services/", None)
            .await
            .expect("list");
        assert!(first.index > 0);

        let watcher = client.clone();
        let mut blocked = tokio::spawn(async move {
            watcher
                .watch_kv_list(
                    "flow-proxy/services/",
                    Some(Blocking {
                        index: first.index,
                        wait: Duration::from_secs(30),
                    }),
                )
                .await
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut blocked)
                .await
                .is_err(),
            "with nothing changed, the query keeps waiting"
        );
        assert!(client
            .kv_put_cas("flow-proxy/services/b", b"b".to_vec(), 0)
            .await
            .expect("write"));

        let changed = tokio::time::timeout(Duration::from_secs(5), blocked)
            .await
            .expect("the blocking query returns on the change")
            .expect("task")
            .expect("list");
        assert!(changed.index > first.index);
        let keys: Vec<_> = changed
            .value
            .iter()
            .map(|entry| entry.key.as_str())
            .collect();
        assert_eq!(keys, ["flow-proxy/services/a", "flow-proxy/services/b"]);
    }

    #[test]
    fn a_listed_entry_decodes_its_value_and_a_broken_one_names_its_key() {
        let entry = KvEntry {
            key: "flow-proxy/services/web".into(),
            value: b"{\"serviceName\":\"web\"}".to_vec(),
            modify_index: 7,
        };
        let listed = ListedKvEntry::from(entry.clone());
        assert_eq!(listed.modify_index, 7);
        assert_eq!(listed.decode().expect("decodes"), entry);

        let broken = ListedKvEntry {
            key: "flow-proxy/services/broken".into(),
            modify_index: 8,
            encoded: Some("not base64!".into()),
        };
        let error = broken.decode().expect_err("not base64").to_string();
        assert!(error.contains("flow-proxy/services/broken"), "{error}");
        let null = ListedKvEntry {
            key: "flow-proxy/imported/docker-flow".into(),
            modify_index: 9,
            encoded: None,
        };
        assert!(null.decode().expect("decodes").value.is_empty());
    }
}
