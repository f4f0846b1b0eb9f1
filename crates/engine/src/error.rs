use std::path::PathBuf;

/// Everything the engine can refuse or fail at. Messages name the thing at fault so that a
/// caller (CLI, PostgreSQL) can show them as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },

    #[error("checksum mismatch for {path}: expected sha256 {expected}, found {actual}")]
    Checksum { path: PathBuf, expected: String, actual: String },

    #[error("unknown task {name:?}; valid tasks: {valid}")]
    UnknownTask { name: String, valid: String },

    #[error("invalid dimension {dim}; valid dimensions: {valid}")]
    InvalidDim { dim: i64, valid: String },

    /// `tokens` counts the whole text, or for a text cut before tokenizing a lower bound.
    #[error("text {index} has at least {tokens} tokens, more than the model's limit of {limit}")]
    TooLong { index: usize, tokens: usize, limit: usize },

    #[error("invalid option: {0}")]
    InvalidOption(String),

    #[error("device {device}: {reason}")]
    Device { device: String, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("inference failed: {0}")]
    Inference(String),

    #[error("cancelled")]
    Cancelled,

    #[error("internal error: {0}")]
    Panic(String),
}

const OUT_OF_MEMORY: &str = "out of memory";

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// An allocation the engine could not make (instead of aborting the process). Reported as
    /// `Inference` so that callers matching every variant keep compiling.
    pub(crate) fn out_of_memory(what: impl std::fmt::Display) -> Self {
        Error::Inference(format!("{OUT_OF_MEMORY}: {what}"))
    }

    /// Whether this error is an allocation failure (`Error::out_of_memory`).
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::Inference(m) if m.starts_with(OUT_OF_MEMORY))
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl ToString) -> Self {
        Error::ModelFile { path: path.into(), reason: reason.to_string() }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Inference(candle_message(e))
    }
}

/// candle's message without the backtrace it attaches when RUST_BACKTRACE is set: callers show
/// the message to users (an ERROR in PostgreSQL), where a stack dump does not belong.
pub(crate) fn candle_message(e: candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(*inner),
        other => other.to_string(),
    }
}

/// Runs `f`, turning a panic into `Error::Panic` so that none crosses the public API.
pub(crate) fn catch_panic<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic".to_string());
            Err(Error::Panic(msg))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candle_errors_lose_their_backtrace() {
        let e: Error = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("no CUDA-capable device".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
        .into();
        assert_eq!(e.to_string(), "inference failed: no CUDA-capable device");
    }

    #[test]
    fn a_panic_becomes_an_error() {
        let r: Result<()> = catch_panic(|| panic!("boom {}", 1));
        assert!(matches!(r, Err(Error::Panic(m)) if m == "boom 1"));
        let r: Result<()> = catch_panic(|| std::panic::panic_any(42));
        assert!(matches!(r, Err(Error::Panic(_))));
    }
}
