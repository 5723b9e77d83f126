//! flow-proxy's integration tests: one binary, one module per user story.

mod embedded_registry;
