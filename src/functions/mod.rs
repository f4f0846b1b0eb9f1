//! The SQL-callable functions over texts and the backend's statistics (declared in
//! sql/embeddinggemma.sql): `embed()`, `embed_batch()`, `chunks()`, `embed_chunks()`, `info()`,
//! `stats()` and `service_status()`.

mod chunks;
mod embed;
mod stats;
