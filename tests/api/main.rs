//! flow-proxy's integration tests: one binary, one module per user story. Every test drives a
//! real HAProxy and sends real HTTP through it to real backend servers on 127.0.0.1.

mod consul_access;
mod convergence;
mod data_loss;
mod embedded_registry;
mod failover;
mod fleet;
mod fleet_smoke;
mod front;
mod helpers;
mod injection;
mod live_instances;
mod migration;
mod outages;
mod proxy_client;
mod restore;
mod routing;
mod skeleton;
mod supervision;
mod validation;
