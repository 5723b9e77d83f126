//! The registry: flow-proxy's Consul client (healthy instances, KV) and the embedded
//! Consul-compatible server used when no Consul address is given.

pub mod embedded;
