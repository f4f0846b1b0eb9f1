//! Asynchronous embedding: a table's target (`register`, `targets`; following DDL: `follow`)
//! has a trigger that records in a queue that a row needs a vector (`trigger`, `queue`); a
//! launcher starts a bounded number of workers, one database each at a time (`launcher`,
//! `registry`), that embed the queue in large batches through the service and write as each
//! table's owner, one owner at a time and in its own restricted session state (`worker`,
//! `drain`, `failure`, `claims`, `target`, `rows`, `owner`, `provenance`). DDL that must empty
//! a database finds its worker gone (`database_ddl`, called by the extension's utility hook).

mod claims;
pub mod database_ddl;
mod drain;
mod failure;
mod follow;
pub mod launcher;
mod owner;
mod provenance;
pub mod queue;
mod register;
pub mod registry;
mod rows;
mod target;
pub mod targets;
mod trigger;
mod worker;

/// From `_PG_init` while preloading: shared memory, the launcher.
pub fn register() {
    registry::init();
    launcher::register();
}
