//! Steps of the worker's work that an ERROR must not end: each runs in a transaction of its own
//! (`txn`) or as one embedding call (`embedding_step`), and an ERROR comes back as a value that says
//! whose failure it is (the rows' or the service's).

use std::panic::AssertUnwindSafe;

use pgrx::prelude::*;

use crate::embedding;

/// Runs `f` in a transaction of its own; an ERROR rolls it back and comes back as `Err`.
pub(super) fn txn<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: a worker's top-level transaction, begun and ended here.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let done = PgTryBuilder::new(AssertUnwindSafe(|| {
        let r = f();
        // SAFETY: ends the transaction begun above (an ERROR while committing is caught too).
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(r)
    }))
    .catch_others(|e| Err(caught(e)))
    .execute();
    if done.is_err() {
        // SAFETY: cleans up the failed transaction, as PostgreSQL's own workers do.
        unsafe { pg_sys::AbortCurrentTransaction() };
    }
    done
}

fn caught(e: pg_sys::panic::CaughtError) -> String {
    match e {
        pg_sys::panic::CaughtError::PostgresError(r) => r.message().to_string(),
        pg_sys::panic::CaughtError::ErrorReport(r) => r.message().to_string(),
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
    }
}

/// Why a batch failed.
pub(super) enum Failure {
    /// The service could not embed (down, restarting, its model failing to load): nothing to
    /// hold against the rows, which go back to the queue untried.
    Service(String),
    /// Reading or writing the rows failed (the owner's triggers or constraints, a timeout), or
    /// the model refused a text.
    Rows(String),
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Failure::Rows(e)
    }
}

/// An ERROR of the embedding call: a text the model refuses (a data exception, a limit) is the
/// row's; anything else is the service's.
fn embedding_failure(e: pg_sys::panic::CaughtError) -> Failure {
    let code = match &e {
        pg_sys::panic::CaughtError::PostgresError(r) | pg_sys::panic::CaughtError::ErrorReport(r) => {
            Some(r.sql_error_code())
        }
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => Some(ereport.sql_error_code()),
    };
    let class = code.map(|c| {
        let sqlstate = c as u32;
        // The two first characters of the SQLSTATE, as PGUNSIXBIT packs them.
        ((sqlstate & 0x3F) as u8 + b'0', ((sqlstate >> 6) & 0x3F) as u8 + b'0')
    });
    let message = caught(e);
    match class {
        Some((b'2', b'2')) | Some((b'5', b'4')) => Failure::Rows(message),
        _ => Failure::Service(message),
    }
}

/// Runs the embedding step `f` (no transaction of its own is needed for a vector target).
pub(super) fn embedding_step<R>(f: impl FnOnce() -> R) -> Result<R, Failure> {
    PgTryBuilder::new(AssertUnwindSafe(|| Ok(embedding::in_background(f))))
        .catch_others(|e| Err(embedding_failure(e)))
        .execute()
}
