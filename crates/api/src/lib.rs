//! loraloom's HTTP API: the only crate that knows the Tinker wire format (JSON and the SDK's
//! protobuf messages). It authenticates tenants, turns requests into validated engine work and
//! engine results into what the official `tinker` SDK parses. See `docs/protocol.md`.

pub mod auth;
pub mod downloads;
pub mod encoding;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod proto;
pub mod provenance;
pub mod responses;
pub mod results;
pub mod routes;
pub mod serve;
pub mod state;
pub mod stats;
pub mod tokens;
pub mod wire;

pub use auth::{parse_keys, Auth};
pub use routes::router;
pub use serve::{serve, ServeOptions};
pub use state::AppState;
