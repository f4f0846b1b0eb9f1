//! `embeddinggemma.*` settings.

use std::ffi::{c_char, c_void, CStr, CString};

use embeddinggemma_engine::{DeviceChoice, Precision, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_MEMORY};
use pgrx::{pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// The upper bound of `embeddinggemma.async_max_workers`: the asynchronous workers' slots in
/// shared memory.
pub const ASYNC_WORKER_SLOTS: usize = 32;

/// Where `scripts/fetch-model` puts the model.
pub const DEFAULT_MODEL_PATH: &CStr = c"/var/cache/embeddinggemma/embeddinggemma-300m";

#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Dtype {
    #[name = c"auto"]
    Auto,
    #[name = c"f32"]
    F32,
    #[name = c"bf16"]
    Bf16,
}

impl Dtype {
    pub fn precision(self) -> Precision {
        match self {
            Dtype::Auto => Precision::Auto,
            Dtype::F32 => Precision::F32,
            Dtype::Bf16 => Precision::Bf16,
        }
    }
}

/// Where calls run: `auto` is the service when the library is preloaded.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Service {
    #[name = c"auto"]
    Auto,
    #[name = c"on"]
    On,
    #[name = c"off"]
    Off,
}

pub static MODEL_PATH: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(DEFAULT_MODEL_PATH));
pub static MODEL_CHECKSUMS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static DEVICE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(Some(c"auto"));
pub static DTYPE: GucSetting<Dtype> = GucSetting::<Dtype>::new(Dtype::Auto);
pub static MAX_BATCH_TOKENS: GucSetting<i32> = GucSetting::<i32>::new(DEFAULT_MAX_BATCH_TOKENS as i32);
pub static THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_THREADS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static TRUNCATE: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static SERVICE: GucSetting<Service> = GucSetting::<Service>::new(Service::Auto);
pub static SERVICE_BINARY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static BATCH_WAIT_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static ASYNC_MAX_WORKERS: GucSetting<i32> = GucSetting::<i32>::new(2);
pub static ASYNC_STATEMENT_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static ASYNC_LOCK_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static MAX_CALL_MEMORY: GucSetting<i32> = GucSetting::<i32>::new((DEFAULT_MAX_MEMORY >> 20) as i32);

/// Rejects a device name at SET time rather than at the next embed().
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn check_device(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: PostgreSQL passes a valid pointer to a NUL-terminated string (or NULL).
    let value = unsafe { newval.as_ref().and_then(|p| p.as_ref()).map(|p| CStr::from_ptr(p)) };
    match value.map(|v| v.to_string_lossy().parse::<DeviceChoice>()) {
        None | Some(Ok(_)) => true,
        Some(Err(e)) => {
            let detail = CString::new(e).unwrap_or_default();
            // SAFETY: GUC_check_errdetail_string takes ownership of a palloc'd copy.
            unsafe {
                pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
            }
            false
        }
    }
}

pub fn register() {
    GucRegistry::define_string_guc(
        c"embeddinggemma.model_path",
        c"Directory of the EmbeddingGemma model (sentence-transformers layout).",
        c"Only superusers may change it. scripts/fetch-model puts a verified copy at the default.",
        &MODEL_PATH,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"embeddinggemma.model_checksums",
        c"sha256sum file the model's weights and tokenizer must match; empty means the published checksums of google/embeddinggemma-300m.",
        c"Only superusers may change it.",
        &MODEL_CHECKSUMS,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the hook has the signature PostgreSQL expects and never raises an error.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"embeddinggemma.device",
            c"Where to run the model: auto, cpu, cuda or cuda:N.",
            c"Only superusers may change it: device and dtype are part of the model, and embed() is IMMUTABLE.",
            &DEVICE,
            GucContext::Suset,
            GucFlags::default(),
            Some(check_device),
            None,
            None,
        );
    }
    GucRegistry::define_enum_guc(
        c"embeddinggemma.dtype",
        c"Precision of the weights: auto (f32 on CPU, bf16 on CUDA), f32 or bf16.",
        c"Only superusers may change it: device and dtype are part of the model, and embed() is IMMUTABLE.",
        &DTYPE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.max_batch_tokens",
        c"Most padded tokens in one forward pass of embed_batch().",
        c"Longer texts still run, alone.",
        &MAX_BATCH_TOKENS,
        64,
        1 << 20,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.threads",
        c"CPU threads one backend uses to embed; 0 means as many as embeddinggemma.max_threads allows.",
        c"",
        &THREADS,
        0,
        1024,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.max_threads",
        c"CPU threads all backends together use to embed; 0 means one per core.",
        c"A backend that finds every thread busy waits for one.",
        &MAX_THREADS,
        0,
        1024,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.max_call_memory",
        c"Most memory one call may use for its work beyond the loaded model (activations, token ids, vectors).",
        c"Only superusers may change it. Forward passes are planned to fit; a text that cannot fit alone is refused.",
        &MAX_CALL_MEMORY,
        64,
        i32::MAX,
        GucContext::Suset,
        GucFlags::UNIT_MB,
    );
    GucRegistry::define_bool_guc(
        c"embeddinggemma.truncate",
        c"Truncate texts longer than the model's limit (on) or raise an error (off).",
        c"",
        &TRUNCATE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"embeddinggemma.service",
        c"Where embedding runs: auto (the cluster's service when embeddinggemma is in shared_preload_libraries, else in this backend), on (the service, or an error), off (in this backend).",
        c"Only superusers may change it: in-process mode loads the model into the backend.",
        &SERVICE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"embeddinggemma.service_binary",
        c"The engine binary the service runs; empty means embeddinggemma beside the postgres executable.",
        c"Set in postgresql.conf.",
        &SERVICE_BINARY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.batch_wait_ms",
        c"How long the service, when idle, waits after a request for more to batch with it; 0 runs at once.",
        c"Set in postgresql.conf; a change restarts the service.",
        &BATCH_WAIT_MS,
        0,
        10_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.async_max_workers",
        c"Most asynchronous worker processes in the whole cluster; databases with queued rows are served in turn.",
        c"Set in postgresql.conf. Each takes a max_worker_processes slot while it drains.",
        &ASYNC_MAX_WORKERS,
        1,
        ASYNC_WORKER_SLOTS as i32,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.async_statement_timeout",
        c"How long the asynchronous worker lets one batch of a table owner's work (reading texts, writing vectors and the table's triggers) run; 0 means no limit.",
        c"Set in postgresql.conf. A batch that runs out is written again row by row, and rows that keep failing are kept apart.",
        &ASYNC_STATEMENT_TIMEOUT,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"embeddinggemma.async_lock_timeout",
        c"How long the asynchronous worker waits for a lock on a user's table (a row another session holds); 0 means no limit.",
        c"Set in postgresql.conf. A row it cannot lock is tried again later; other rows and tables go on.",
        &ASYNC_LOCK_TIMEOUT,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    // SAFETY: called once from _PG_init with a static NUL-terminated prefix.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"embeddinggemma".as_ptr()) };
}

pub fn string(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting.get().map(|s| s.to_string_lossy().into_owned()).filter(|s| !s.is_empty())
}

/// The settings that shape the model, as one string: a session whose key differs from the
/// service's is computed by another model, so the service refuses it (and the session embeds
/// in-process, or is refused with `service = on`).
pub fn model_key() -> String {
    let dtype = match DTYPE.get() {
        Dtype::Auto => "auto",
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
    };
    format!(
        "model_path={}\nmodel_checksums={}\ndevice={}\ndtype={dtype}",
        string(&MODEL_PATH).unwrap_or_default(),
        string(&MODEL_CHECKSUMS).unwrap_or_default(),
        string(&DEVICE).unwrap_or_else(|| "auto".into()),
    )
}
