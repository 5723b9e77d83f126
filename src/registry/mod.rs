//! The registry: flow-proxy's Consul client (healthy instances, KV) and the embedded
//! Consul-compatible server used when no Consul address is given.

mod client;
pub mod embedded;

pub use client::{ConsulClient, KvEntry, RegistryError};
