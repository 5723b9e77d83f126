//! The embedded registry speaks Consul's HTTP API (see ../shared/consul-api.md).
