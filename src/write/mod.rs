//! Keeping vectors and chunks in step with their texts as the statement writes them (the row,
//! statement and chunk triggers), filling them in afterwards (backfills), and what they share:
//! writing vectors back by key, a chunk trigger's settings, where triggers fire, and trigger
//! arguments following renames.

pub mod backfill;
pub mod chunk_settings;
pub mod chunk_trigger;
mod row_trigger;
mod statement_trigger;
pub mod trigger_order;
pub mod trigger_renames;
pub mod write_back;
