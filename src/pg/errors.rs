//! Engine errors as PostgreSQL ERRORs with a SQLSTATE and a HINT saying what to do.

use embeddinggemma_engine::Error;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{pg_sys, PgSqlErrorCode};

const SETUP_HINT: &str = "A superuser can SET embeddinggemma.model_path to a model directory; ./scripts/fetch-model (or ./scripts/demo) puts a verified copy at /var/cache/embeddinggemma/embeddinggemma-300m.";

/// Raises `message` as an ERROR with `hint`.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: impl Into<String>) -> ! {
    ErrorReport::new(code, message.into(), function_name!()).set_hint(hint.into()).report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// Reports `message` as a WARNING with `hint`.
pub fn warn(message: impl Into<String>, hint: impl Into<String>) {
    ErrorReport::new(PgSqlErrorCode::ERRCODE_WARNING, message.into(), function_name!())
        .set_hint(hint.into())
        .report(PgLogLevel::WARNING);
}

/// Raises the engine error `e` as an ERROR.
pub fn raise_engine(e: Error) -> ! {
    use PgSqlErrorCode::*;
    let message = format!("embeddinggemma: {e}");
    match e {
        Error::Cancelled => {
            // A cancel or terminate request stopped the engine: let PostgreSQL raise it.
            pg_sys::check_for_interrupts!();
            raise(ERRCODE_QUERY_CANCELED, "canceling statement due to user request", "The embedding was interrupted.")
        }
        Error::ModelFile { .. } => raise(ERRCODE_UNDEFINED_FILE, message, SETUP_HINT),
        Error::Checksum { .. } => raise(
            ERRCODE_DATA_CORRUPTED,
            message,
            "Fetch the model again with ./scripts/fetch-model. For other weights, a superuser can SET embeddinggemma.model_checksums to their sha256sum file.",
        ),
        Error::UnknownTask { .. } => raise(ERRCODE_INVALID_PARAMETER_VALUE, message, "Pass one of the listed task names, or 'none' for raw text."),
        Error::InvalidDim { .. } => raise(ERRCODE_INVALID_PARAMETER_VALUE, message, "Matryoshka dimensions are the first values of the full vector, normalised again."),
        Error::TooLong { .. } => raise(
            ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            message,
            "SET embeddinggemma.truncate = on to embed the first tokens of long texts instead.",
        ),
        Error::InvalidOption(_) => raise(ERRCODE_INVALID_PARAMETER_VALUE, message, "Check the embeddinggemma.* settings."),
        Error::Device { .. } => raise(
            ERRCODE_FEATURE_NOT_SUPPORTED,
            message,
            "SET embeddinggemma.device = 'cpu', or install a build with CUDA on a machine with a GPU.",
        ),
        ref e if e.is_out_of_memory() => raise(
            ERRCODE_OUT_OF_MEMORY,
            message,
            "Embed fewer or shorter texts per call, or SET embeddinggemma.max_batch_tokens lower; a superuser sets embeddinggemma.max_call_memory.",
        ),
        Error::Tokenizer(_) | Error::Inference(_) | Error::Panic(_) => raise(
            ERRCODE_INTERNAL_ERROR,
            message,
            "This is a bug in embeddinggemma; please report it with the input that caused it.",
        ),
    }
}

pub fn setup_hint() -> &'static str {
    SETUP_HINT
}

const CHUNK_HINT: &str = "max_tokens counts the task's prompt, <bos> and <eos> as embedded, up to the model's 2048; overlap is at most half of the tokens left for text. The defaults, 512 and 64, suit most documents.";

/// Raises the ERROR for chunk settings out of range (`why` names the range), in-process or
/// from the service.
pub fn raise_bad_cut(why: impl std::fmt::Display) -> ! {
    raise(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, format!("embeddinggemma: {why}"), CHUNK_HINT)
}

/// What to do when a session's model settings differ from the service's.
pub fn service_settings_hint() -> &'static str {
    "The service runs the server's configuration (postgresql.conf, ALTER SYSTEM): set embeddinggemma.model_path, model_checksums, device and dtype there and SELECT pg_reload_conf(), or SET embeddinggemma.service = auto to embed with this session's settings in this backend."
}
