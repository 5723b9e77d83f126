//! flow-proxy's integration tests: one binary, one module per user story. Every test drives a
//! real HAProxy and sends real HTTP through it to real backend servers on 127.0.0.1.

mod api_access;
mod backend_tuning;
mod chaos;
mod consul_access;
mod convergence;
mod crash;
mod data_loss;
mod dfp_callers;
mod embedded_registry;
mod failover;
mod fleet;
mod fleet_smoke;
mod front;
mod haproxy_faults;
mod helpers;
mod https;
mod injection;
mod live_instances;
mod migration;
mod open_files;
mod outages;
mod proxy_client;
mod registry_crash;
mod restore;
mod route_conflicts;
mod routing;
mod service_auth;
mod skeleton;
mod slow_registry;
mod stats_page;
mod supervision;
mod tls;
mod tls_services;
mod traffic_rules;
mod validation;
