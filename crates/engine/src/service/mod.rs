//! `embeddinggemma serve`: one model per machine behind a Unix socket, batching the requests
//! of all its clients together (see `scheduler` for the policy, `protocol` for the wire format),
//! and chunking texts for them (tokenizing only, on each connection's thread).

mod client;
mod cpu_share;
mod metrics;
pub mod protocol;
mod queue;
mod scheduler;
mod server;

pub use client::{Client, Embedding, Opened, ServiceError};
pub use protocol::{CallStats, ErrorKind};
pub use server::{bind, exit_with_parent, serve, start, ServeOptions, Service, SocketFile};
