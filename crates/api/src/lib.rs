//! loraloom's HTTP API: the only crate that knows the Tinker wire format. It turns requests
//! into engine calls and engine results into the JSON the official `tinker` SDK parses.

pub mod routes;

pub use routes::{router, AppState};
