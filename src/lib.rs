//! embeddinggemma: EmbeddingGemma-300m text embeddings as pgvector `vector`s, computed inside
//! PostgreSQL. A thin layer over `embeddinggemma-engine`: SQL functions, GUCs, the vector
//! datum, per-backend model state.

mod cpu_slots;
mod errors;
mod functions;
mod guc;
mod model;
mod stats;
mod triggers;
mod vector;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/embeddinggemma.sql", name = "embeddinggemma", finalize);

/// Registers the GUCs. Loading the model happens on first use, never here: this may run in
/// the postmaster (shared_preload_libraries), which must not start threads.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::register();
}
