//! embeddinggemma: EmbeddingGemma-300m text embeddings as pgvector `vector`s, computed inside
//! PostgreSQL. A thin layer over `embeddinggemma-engine`: SQL functions, GUCs, the vector
//! datum, per-backend model state.

mod asynchronous;
mod embedding;
mod functions;
mod pg;
mod supervisor;
mod utility_hook;
mod write;

::pgrx::pg_module_magic!(name, version);

/// PostgreSQL owns this process's malloc settings, so rather than retune glibc the engine's
/// activations reuse freed blocks while a call or its transaction lasts (see `ReusingAllocator`
/// and `transaction_memory`).
#[global_allocator]
static ALLOCATOR: embeddinggemma_engine::reuse_alloc::ReusingAllocator =
    embeddinggemma_engine::reuse_alloc::ReusingAllocator;

pgrx::extension_sql_file!("../sql/embeddinggemma.sql", name = "embeddinggemma", finalize);

/// Registers the GUCs, and when preloaded the service's supervisor. Loading the model happens
/// on first use or in the service, never here: this may run in the postmaster, which must not
/// start threads.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: the library is being loaded; the process has not started any thread of ours, and
    // PostgreSQL's processes are single-threaded: no other thread reads the environment.
    let confined = unsafe { embeddinggemma_engine::confine_candle_threads() };
    pg::guc::register();
    utility_hook::install();
    supervisor::set_candle_confined(confined);
    supervisor::register();
}
