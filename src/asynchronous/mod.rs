//! Asynchronous embedding: a write records in a queue that a row needs a vector
//! (`targets`, `queue`); a launcher starts a bounded number of workers, one database each at a
//! time (`launcher`, `registry`), that embed the queue in large batches through the service
//! and write as each table's owner, one owner at a time and in its own restricted session state
//! (`drain`, `claims`, `rows`, `owner`). DDL that must empty a database finds its worker gone
//! (`database_ddl`, called by the extension's utility hook).

mod claims;
pub mod database_ddl;
pub mod drain;
mod follow;
pub mod launcher;
mod owner;
mod provenance;
pub mod queue;
pub mod registry;
mod rows;
mod target;
pub mod targets;

/// From `_PG_init` while preloading: shared memory, the launcher.
pub fn register() {
    registry::init();
    launcher::register();
}
