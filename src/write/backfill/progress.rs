//! Where a backfill run stands: computed after each batch, shown in its NOTICE, and recorded in
//! the progress rows (`embeddinggemma_backfill_progress`). Those are written only here, with the
//! rights of the table's owner (the extension's owner) after checking that the caller may write
//! the table being backfilled, so no role can forge or alter another's progress.

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::run::{Kind, Run};
use crate::pg::spi::{param, text_param};
use crate::pg::{catalog, rights, spi};

/// Identifies one run's row: its table and columns, its session and start.
pub struct RunKey {
    pub relation: pg_sys::Oid,
    pub source: String,
    pub target: String,
    pub pid: i32,
    /// A `timestamptz` (microseconds since 2000-01-01).
    pub started_at: i64,
}

/// Where a run stands, as recorded after each batch.
pub struct Standing {
    pub done: i64,
    pub remaining: i64,
    pub rows_per_second: f64,
    pub eta_seconds: Option<f64>,
    pub finished: bool,
    pub note: Option<String>,
}

fn table() -> (String, pg_sys::Oid) {
    catalog::extension_table("embeddinggemma_backfill_progress")
}

impl RunKey {
    fn args<'a>(&self) -> Vec<pgrx::datum::DatumWithOid<'a>> {
        vec![
            param(self.relation, pg_sys::REGCLASSOID),
            text_param(self.source.clone()),
            text_param(self.target.clone()),
            text_param(self.pid),
            param(self.started_at, pg_sys::TIMESTAMPTZOID),
        ]
    }

    /// Rows done so far by the other runs on the same table and columns.
    pub fn others_done(&self) -> i64 {
        let (progress, owner) = table();
        let sql = format!(
            "SELECT pg_catalog.sum(rows_done)::pg_catalog.int8 FROM {progress}
              WHERE relation OPERATOR(pg_catalog.=) $1 AND source OPERATOR(pg_catalog.=) $2 AND target OPERATOR(pg_catalog.=) $3
                AND NOT (pid OPERATOR(pg_catalog.=) $4 AND started_at OPERATOR(pg_catalog.=) $5)"
        );
        let args = self.args();
        rights::as_role(owner, || spi::one::<i64>(&sql, &args).unwrap_or(0))
    }

    /// Records the start of a run.
    pub fn begin(&self, remaining: i64) {
        let (progress, owner) = table();
        let sql = format!(
            "INSERT INTO {progress} (relation, source, target, pid, started_at, updated_at, rows_done, rows_remaining, owner)
             VALUES ($1, $2, $3, $4, $5, pg_catalog.clock_timestamp(), 0, $6, $7::pg_catalog.name)"
        );
        let user = catalog::role_name(rights::current_role());
        let mut args = self.args();
        args.push(text_param(remaining));
        args.push(text_param(user));
        rights::as_role(owner, || spi::run(&sql, &args));
    }

    /// Records where the run stands, in the transaction of the batch it just did.
    pub fn record(&self, s: &Standing) {
        let (progress, owner) = table();
        let sql = format!(
            "UPDATE {progress}
                SET rows_done = $6, rows_remaining = $7, rows_per_second = $8, updated_at = pg_catalog.clock_timestamp(),
                    eta = pg_catalog.make_interval(secs => $9), note = $10,
                    finished_at = CASE WHEN $11 THEN pg_catalog.clock_timestamp() END
              WHERE relation OPERATOR(pg_catalog.=) $1 AND source OPERATOR(pg_catalog.=) $2 AND target OPERATOR(pg_catalog.=) $3
                AND pid OPERATOR(pg_catalog.=) $4 AND started_at OPERATOR(pg_catalog.=) $5"
        );
        let mut args = self.args();
        args.extend([
            text_param(s.done),
            text_param(s.remaining),
            text_param(s.rows_per_second),
            text_param(s.eta_seconds),
            text_param(s.note.clone()),
            text_param(s.finished),
        ]);
        rights::as_role(owner, || spi::run(&sql, &args));
    }
}

impl Run {
    pub(super) fn standing(&mut self) -> Standing {
        if !self.finished {
            // Counting the table after every batch would cost more than the batch: subtract
            // what every run on these columns did since this one started.
            let all_done = self.key.others_done() + self.done;
            self.remaining = (self.initial - (all_done - self.others_at_start)).max(0);
        }
        let rate = self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3);
        let eta = match (self.finished, self.remaining) {
            (_, 0) => Some(0.0),
            (true, _) => None,
            (false, left) => Some(left as f64 / rate.max(1e-9)),
        };
        Standing {
            done: self.done,
            remaining: self.remaining,
            rows_per_second: rate,
            eta_seconds: eta,
            finished: self.finished,
            note: self.note.clone(),
        }
    }

    pub(super) fn message(&self, s: &Standing) -> String {
        let name = self.name();
        let unit = match self.kind {
            Kind::Vectors { .. } => "rows",
            Kind::Chunks { .. } => "documents",
        };
        let table = catalog::display(self.key.relation);
        let elapsed = self.started.elapsed().as_secs();
        let clock = |secs: u64| format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60);
        if s.finished {
            let verb = if matches!(self.kind, Kind::Vectors { .. }) { "embedded" } else { "chunked" };
            let left = match &s.note {
                Some(note) => note.clone(),
                None => format!("{} left", s.remaining),
            };
            format!("{name} {table}: finished, {} {unit} {verb} by this run in {}, {left}", s.done, clock(elapsed))
        } else {
            let eta = s.eta_seconds.map_or("unknown".into(), |e| clock(e as u64));
            format!(
                "{name} {table}: {} {unit} done, {} remaining, {:.1} {unit}/s, ETA {eta}",
                s.done, s.remaining, s.rows_per_second
            )
        }
    }
}

/// Whether the backend `pid` is alive and started no later than `since` (a timestamptz): the
/// session that started a run is still there. Reads the backends' status array directly, so
/// it answers for other roles' sessions without any special right.
#[pg_extern(sql = "")]
fn embeddinggemma_backend_alive(pid: i32, since: pgrx::datum::TimestampWithTimeZone) -> bool {
    let since: i64 = since.into_inner();
    // SAFETY: the backend status snapshot of this transaction, indexed from 1 to its count.
    unsafe {
        let n = pg_sys::pgstat_fetch_stat_numbackends();
        (1..=n).any(|i| {
            let local = local_backend_status(i);
            !local.is_null()
                && (*local).backendStatus.st_procpid == pid
                && (*local).backendStatus.st_proc_start_timestamp <= since
        })
    }
}

#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn local_backend_status(i: i32) -> *mut pg_sys::LocalPgBackendStatus {
    // SAFETY: per the caller, 1 ≤ i ≤ the snapshot's count.
    unsafe { pg_sys::pgstat_fetch_stat_local_beentry(i) }
}

#[cfg(not(any(feature = "pg15", feature = "pg16")))]
unsafe fn local_backend_status(i: i32) -> *mut pg_sys::LocalPgBackendStatus {
    // SAFETY: per the caller, 1 ≤ i ≤ the snapshot's count.
    unsafe { pg_sys::pgstat_get_local_beentry_by_index(i) }
}
