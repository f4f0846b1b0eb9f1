//! PostgreSQL helpers the rest of the extension builds on: errors, settings, SQL text and its
//! parameters, catalog lookups, rights, the checks of a table's columns, pgvector's `vector`,
//! Citus, and waiting while serving interrupts.

pub mod catalog;
pub mod citus;
pub mod columns;
pub mod errors;
pub mod guc;
pub mod interrupts;
pub mod quote;
pub mod rights;
pub mod spi;
pub mod subtransaction;
pub mod vector;
