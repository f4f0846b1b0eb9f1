//! Embedding texts with the session's model (`embed`, `chunk`, `info`), and what it takes:
//! the model in this backend (`in_process`, with `threads`, `cpu_slots`, `transaction_memory`)
//! or the cluster's service (`service_client`, `service_state`); texts held for a call and their
//! windows (`texts`), documents cut into chunks (`chunking`); `counters`, `model_info`.
//!
//! This module decides where a call runs, the one place that chooses between the cluster's
//! service and this backend's own model (its two peers, `service_client` and `in_process`). A
//! call is computed by a model whose path, checksums, device and dtype are the session's
//! effective settings, wherever those come from (file, ALTER SYSTEM, database, role, startup
//! option, SET): by the service when they equal its own (it checks again on every request),
//! otherwise in this backend (`service = auto`) or not at all (`service = on`: an ERROR saying
//! why).

pub mod chunking;
pub mod counters;
mod cpu_slots;
pub mod in_process;
pub mod model_info;
pub mod service_client;
pub mod service_state;
pub mod texts;
mod threads;
mod transaction_memory;

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use embeddinggemma_engine::Chunk;
use pgrx::PgSqlErrorCode;

use crate::pg::errors::{raise, service_settings_hint};
use crate::pg::guc;
use crate::pg::interrupts::serve_interrupts;
use model_info::ModelInfo;
use service_state::{key_hash, STATUS};

/// How long a session whose settings differ from the service's waits for the service to take
/// them up (a reload the supervisor has yet to act on), once per difference.
const SETTLE: Duration = Duration::from_secs(2);

thread_local! {
    /// (the service's key hash, the session's) of a difference already waited for.
    static SETTLED: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
    /// Set while an asynchronous worker embeds: the service then runs its requests after
    /// interactive ones.
    static BACKGROUND: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the calls it makes marked as background work.
pub fn in_background<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            BACKGROUND.set(self.0);
        }
    }
    let _restore = Restore(BACKGROUND.replace(true));
    f()
}

/// The model settings of this session when its calls go to the service; None when they run
/// in this backend.
fn service_key() -> Option<String> {
    let required = match guc::SERVICE.get() {
        guc::Service::Off => return None,
        guc::Service::Auto if !service_state::preloaded() => return None,
        guc::Service::Auto => false,
        guc::Service::On if !service_state::preloaded() => raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "embeddinggemma.service is on, but the service is not running",
            "Add embeddinggemma to shared_preload_libraries and restart the server, or SET embeddinggemma.service = auto.",
        ),
        guc::Service::On => true,
    };
    let key = guc::model_key();
    let ours = key_hash(&key);
    let theirs = || STATUS.get().model_key_hash.load(Ordering::Relaxed);
    if theirs() != ours && SETTLED.get() != (theirs(), ours) {
        // Right after a reload, or before the supervisor's first start, the service may be
        // about to run these settings.
        let deadline = Instant::now() + SETTLE;
        while theirs() != ours && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            serve_interrupts();
        }
        SETTLED.set((theirs(), ours));
    }
    if theirs() == ours {
        return Some(key);
    }
    if required {
        refuse();
    }
    None
}

fn refuse() -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        "embeddinggemma.service is on, but this session's model settings (model_path, model_checksums, device, dtype) differ from the service's",
        service_settings_hint(),
    )
}

/// `result` of the service, or None (it runs other settings) handled as `service_key` does.
fn or_in_process<T>(result: Option<T>) -> Option<T> {
    if result.is_none() && guc::SERVICE.get() == guc::Service::On {
        refuse();
    }
    result
}

/// Whether calls now go to the service.
pub fn to_service() -> bool {
    service_key().is_some()
}

/// Embeds `texts` (all non-NULL) with the session's model; raises an ERROR on failure.
pub fn embed(texts: &[&str], task: &str, dim: i32) -> Vec<Vec<f32>> {
    let served = service_key().and_then(|key| {
        or_in_process(service_client::embed(
            texts,
            task,
            dim.max(0) as usize,
            guc::TRUNCATE.get(),
            &key,
            BACKGROUND.get(),
        ))
    });
    let Some((vectors, s)) = served else { return in_process::embed(texts, task, dim) };
    counters::update(|st| {
        st.calls += 1;
        st.engine.texts += s.texts;
        st.engine.real_tokens += s.tokens;
        st.engine.truncated += s.truncated;
        st.engine.forward_passes += s.forward_passes;
        st.engine.forward_time += s.forward_time;
        st.wait_time += s.queue_wait;
    });
    vectors
}

/// Cuts `text` into chunks for `task` (tokenizing only); raises an ERROR on failure.
pub fn chunk(text: &str, task: &str, max_tokens: usize, overlap: usize) -> Vec<Chunk> {
    let served =
        service_key().and_then(|key| or_in_process(service_client::chunk(text, task, max_tokens, overlap, &key)));
    served.unwrap_or_else(|| in_process::chunk(text, task, max_tokens, overlap))
}

/// Raises the ERROR an unknown task or dimension gets, before any text is embedded.
pub fn check_request(task: &str, dim: i32) {
    if !to_service() {
        in_process::check_request(task, dim); // the service checks them itself
    }
}

/// The model a call would use now.
pub fn info() -> ModelInfo {
    if to_service() {
        service_client::info()
    } else {
        in_process::info()
    }
}
