//! Backfills: embed every row whose vector is NULL (`embeddinggemma_backfill`), or chunk every
//! document that has no chunks (`embeddinggemma_chunk_backfill`), a batch per transaction. The
//! procedures in sql/ only commit between batches; a run's state lives here, in this backend.
//!
//! A batch claims rows with `FOR UPDATE SKIP LOCKED` (so several sessions share a table),
//! starting at the block where the last one stopped (so a batch costs the same at the end of a
//! big table as at its start). A pass over the table ends with a count of the rows left: none,
//! and the run is done; some but none claimed in the pass (other sessions hold them), and the
//! next pass waits for one row at a time instead of skipping; a waiting pass that still claims
//! none leaves rows this run cannot claim (hidden from it by row-level security for UPDATE, in
//! foreign partitions), and the run ends saying so.

use std::cell::RefCell;
use std::time::Instant;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use crate::chunk_trigger::{triggers_writing, ChunkSettings};
use crate::columns::{check_columns, open_checked};
use crate::errors::raise;
use crate::progress::{RunKey, Standing};
use crate::sql_text::{self, ident, relation, text_param};
use crate::statement_trigger::{write_back_sql, Writing};
use crate::{routing, vector};

enum Kind {
    Vectors { source: String, target: String, task: String, dim: i32 },
    Chunks { chunk_table: pg_sys::Oid },
}

struct Run {
    kind: Kind,
    key: RunKey,
    batch_size: i64,
    /// The relations holding rows (the table, or its partitions and children).
    leaves: Vec<pg_sys::Oid>,
    leaf: usize,
    block: u32,
    /// Rows claimed in this pass, and whether this pass waits for held rows.
    pass_rows: i64,
    waiting: bool,
    done: i64,
    initial: i64,
    /// Rows done by all runs on the same columns when this one started.
    others_at_start: i64,
    remaining: i64,
    started: Instant,
    finished: bool,
    note: Option<String>,
    /// On a Citus distributed table: the CALL each shard runs (see `dispatch`).
    on_shards: Option<String>,
}

thread_local! {
    static RUNS: RefCell<Vec<(i64, Run)>> = const { RefCell::new(Vec::new()) };
    static NEXT_RUN: std::cell::Cell<i64> = const { std::cell::Cell::new(1) };
}

/// `relation` and all its partitions and inheritance children, with their kinds.
fn family(relation: pg_sys::Oid) -> Vec<(pg_sys::Oid, String)> {
    let sql = "WITH RECURSIVE tree(oid) AS (
                   SELECT $1::pg_catalog.oid
                   UNION
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.oid)
               SELECT c.oid, c.relkind::pg_catalog.text FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.oid";
    Spi::connect_mut(|client| {
        let rows = client
            .update(sql, None, &[sql_text::param(relation, pg_sys::OIDOID)])
            .expect("SPI reports errors as ERRORs");
        rows.map(|r| {
            (
                r.get::<pg_sys::Oid>(1).ok().flatten().unwrap_or_default(),
                r.get::<String>(2).ok().flatten().unwrap_or_default(),
            )
        })
        .collect()
    })
}

/// The relations of `relation` that hold rows: itself, or its partitions and children that
/// are plain tables.
fn leaves(relation: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    let mut plain: Vec<pg_sys::Oid> =
        family(relation).into_iter().filter(|(_, kind)| kind == "r").map(|(o, _)| o).collect();
    plain.sort_by_key(|o| o.to_u32());
    plain
}

fn count(sql: &str) -> i64 {
    sql_text::one::<i64>(sql, &[]).unwrap_or(0)
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

fn check_batch_size(batch_size: i32, default: &str) -> i64 {
    if batch_size < 1 {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: batch_size must be positive, not {batch_size}"),
            format!("The default, {default}, suits most tables."),
        )
    }
    batch_size as i64
}

impl Run {
    /// The rows (or documents) left to do, in the whole table, as `what` (a count or a claim).
    fn todo(&self, what: &str, from: &str) -> String {
        match &self.kind {
            Kind::Vectors { source, target, .. } => {
                format!(
                    "SELECT {what} FROM {from} d WHERE d.{} IS NULL AND d.{} IS NOT NULL",
                    ident(target),
                    ident(source)
                )
            }
            Kind::Chunks { chunk_table } => {
                let s = self.chunk_settings(*chunk_table);
                format!(
                    "SELECT {what} FROM {from} d
                      WHERE d.{src} IS NOT NULL AND d.{src}::pg_catalog.text OPERATOR(pg_catalog.<>) ''
                        AND NOT EXISTS (SELECT FROM {chunks} c WHERE c.{ck} OPERATOR(pg_catalog.=) d.{key})",
                    src = ident(&s.source),
                    chunks = relation(s.chunk_table),
                    ck = ident(&s.chunk_key),
                    key = ident(&s.key.name),
                )
            }
        }
    }

    fn chunk_settings(&self, chunk_table: pg_sys::Oid) -> ChunkSettings {
        chunk_settings(self.key.relation, chunk_table)
    }

    fn count_remaining(&self) -> i64 {
        count(&self.todo("pg_catalog.count(*)", &relation(self.key.relation)))
    }

    /// Claims up to a batch of rows of the current leaf from the current block: (ctid, then
    /// the claim's columns) as text.
    fn claim(&self, columns: &str) -> Vec<Vec<Option<String>>> {
        let leaf = format!("ONLY {}", relation(self.leaves[self.leaf]));
        let (limit, lock) =
            if self.waiting { (1, "FOR UPDATE OF d") } else { (self.batch_size, "FOR UPDATE OF d SKIP LOCKED") };
        let sql = format!(
            "{} AND d.ctid OPERATOR(pg_catalog.>=) $1 LIMIT {limit} {lock}",
            self.todo(&format!("d.ctid::pg_catalog.text, {columns}"), &leaf)
        );
        let from = sql_text::param(format!("({},0)", self.block), pg_sys::TEXTOID);
        let sql = sql.replace("$1", "$1::pg_catalog.tid");
        Spi::connect_mut(|client| {
            let rows = client.update(sql.as_str(), None, &[from]).expect("SPI reports errors as ERRORs");
            let n = rows.columns().unwrap_or(0);
            rows.map(|row| (1..=n).map(|i| row.get::<String>(i).expect("text columns")).collect()).collect()
        })
    }

    /// One batch: claims rows, embeds them, writes them; or ends a pass. False when the run is
    /// over.
    fn batch(&mut self) {
        if let Some(command) = self.on_shards.clone() {
            return self.dispatch(&command);
        }
        loop {
            if self.leaf >= self.leaves.len() {
                self.remaining = self.count_remaining();
                if self.remaining == 0 {
                    self.finished = true;
                    return;
                }
                if self.waiting && self.pass_rows == 0 {
                    // Even waiting for held rows, this pass claimed none: the rows left are
                    // rows this run cannot claim.
                    self.finished = true;
                    self.note = Some(self.why_unclaimable());
                    return;
                }
                self.waiting = self.pass_rows == 0;
                self.pass_rows = 0;
                self.leaf = 0;
                self.block = 0;
                continue;
            }
            let claimed = match &self.kind {
                Kind::Vectors { .. } => self.embed_batch(),
                Kind::Chunks { chunk_table } => self.chunk_batch(*chunk_table),
            };
            if claimed > 0 {
                self.waiting = false;
                self.pass_rows += claimed;
                return;
            }
            self.leaf += 1;
            self.block = 0;
        }
    }

    /// A distributed table: the same backfill on every shard at once, each on its worker
    /// (which embeds with its own service and records the shard's progress there; see
    /// `embeddinggemma_backfill_shards`), in one batch that ends when all have.
    fn dispatch(&mut self, command: &str) {
        let results = crate::citus::on_every_shard(self.key.relation, command);
        let failed: Vec<String> = results
            .iter()
            .filter(|r| !r.1)
            .map(|(shard, _, e)| format!("shard {shard}: {}", e.as_deref().unwrap_or("failed")))
            .collect();
        self.remaining = self.count_remaining();
        self.done = (self.initial - self.remaining).max(0);
        self.finished = true;
        if let Some(first) = failed.first() {
            raise(
                PgSqlErrorCode::ERRCODE_EXTERNAL_ROUTINE_EXCEPTION,
                format!("{}: {} of {} shards failed; {first}", self.name(), failed.len(), results.len()),
                "Run it again once the cause is fixed: every shard continues where it stopped.",
            );
        }
        if self.remaining > 0 {
            self.note = Some(format!(
                "{} left that the shards' runs could not claim, across {} shards",
                self.remaining,
                results.len()
            ));
        }
    }

    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Vectors { .. } => "embeddinggemma_backfill",
            Kind::Chunks { .. } => "embeddinggemma_chunk_backfill",
        }
    }

    /// Notes where the claimed rows end, for the next batch's start.
    fn advance(&mut self, ctids: &[String]) {
        let block =
            |t: &String| t.trim_matches(|c| c == '(' || c == ')').split(',').next().and_then(|b| b.parse::<u32>().ok());
        self.block = ctids.iter().filter_map(block).max().unwrap_or(self.block);
    }

    fn embed_batch(&mut self) -> i64 {
        let Kind::Vectors { source, target, task, dim } = &self.kind else { unreachable!() };
        let (task, dim, target) = (task.clone(), *dim, target.clone());
        let leaf = self.leaves[self.leaf];
        let rel = open_checked(leaf);
        check_columns(&rel, source, &target, dim);
        let vector_type = rel
            .tuple_desc()
            .iter()
            .find(|a| !a.attisdropped && a.name() == target.as_str())
            .map(|a| a.atttypid)
            .expect("checked");
        let rows = self.claim(&format!("d.{}::pg_catalog.text", ident(source)));
        if rows.is_empty() {
            return 0;
        }
        let ctids: Vec<String> = rows.iter().map(|r| r[0].clone().expect("a ctid")).collect();
        let texts: Vec<&str> = rows.iter().map(|r| r[1].as_deref().expect("claimed rows have text")).collect();
        let vectors = routing::embed(&texts, &task, dim);
        let sql = write_back_sql(&format!("ONLY {}", relation(leaf)), &target, "ctid", "pg_catalog.tid");
        let _writing = Writing::start(leaf);
        let written = Spi::connect_mut(|client| {
            let args = [text_param(ctids.clone()), vector::array_param(&vectors, vector_type)];
            client.update(sql.as_str(), None, &args).expect("SPI reports errors as ERRORs").len()
        });
        self.done += written as i64;
        self.advance(&ctids);
        rows.len() as i64
    }

    fn chunk_batch(&mut self, chunk_table: pg_sys::Oid) -> i64 {
        let s = self.chunk_settings(chunk_table);
        let rows =
            self.claim(&format!("d.{}::pg_catalog.text, d.{}::pg_catalog.text", ident(&s.key.name), ident(&s.source)));
        if rows.is_empty() {
            return 0;
        }
        let ctids: Vec<String> = rows.iter().map(|r| r[0].clone().expect("a ctid")).collect();
        let keys: Vec<String> = rows.iter().map(|r| r[1].clone().expect("keys are NOT NULL")).collect();
        let texts: Vec<Option<String>> = rows.iter().map(|r| r[2].clone()).collect();
        // The documents are locked; this statement's snapshot sees chunks a trigger committed
        // after the claim's, which the fresh ones replace.
        let delete = format!(
            "DELETE FROM {} c WHERE c.{} OPERATOR(pg_catalog.=) ANY ($1::pg_catalog.text[]::{}[])",
            relation(s.chunk_table),
            ident(&s.chunk_key),
            s.key.sql_type()
        );
        Spi::connect_mut(|client| {
            client.update(delete.as_str(), None, &[text_param(keys.clone())]).expect("SPI reports errors as ERRORs");
            s.insert_chunks(client, &keys, &texts);
        });
        self.done += rows.len() as i64;
        self.advance(&ctids);
        rows.len() as i64
    }

    fn why_unclaimable(&self) -> String {
        let mut reasons = Vec::new();
        let all = family(self.key.relation);
        if all.iter().any(|(_, kind)| kind == "f") {
            reasons.push("rows in foreign-table partitions");
        }
        // SAFETY: relrowsecurity of existing relations.
        if all.iter().any(|&(o, _)| unsafe { (*PgRelation::open(o).rd_rel).relrowsecurity }) {
            reasons.push("rows row-level security lets this role see but not update");
        }
        reasons.push("rows deleted, or locked by another session until this run's end");
        format!("{} left that this run cannot claim: {}", self.remaining, reasons.join(", or "))
    }

    fn standing(&mut self) -> Standing {
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

    fn message(&self, s: &Standing) -> String {
        let name = self.name();
        let unit = match self.kind {
            Kind::Vectors { .. } => "rows",
            Kind::Chunks { .. } => "documents",
        };
        let table = sql_text::display(self.key.relation);
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

/// The settings of the chunk trigger on `documents` that writes `chunk_table`: the backfill
/// chunks as the trigger does.
fn chunk_settings(documents: pg_sys::Oid, chunk_table: pg_sys::Oid) -> ChunkSettings {
    let rel = open_checked(documents);
    match triggers_writing(&rel, chunk_table).into_iter().next() {
        Some(args) => ChunkSettings::parse(&rel, &args),
        None => raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("embeddinggemma_chunk_backfill: no embeddinggemma_chunk_trigger on {} writes {}", sql_text::display(documents), sql_text::display(chunk_table)),
            format!(
                "The backfill chunks as the trigger does, with its settings: CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', {}, 'doc_id');",
                ident(&format!("{}_chunks", sql_text::relation_name(documents))),
                sql_text::display(documents),
                sql_text::literal(&sql_text::display(chunk_table)),
            ),
        ),
    }
}

fn store(run: Run) -> i64 {
    let id = NEXT_RUN.with(|n| n.replace(n.get() + 1));
    RUNS.with(|runs| {
        let mut runs = runs.borrow_mut();
        // Runs an ERROR cut short stay behind; a session runs one at a time, so a few suffice.
        if runs.len() >= 8 {
            runs.remove(0);
        }
        runs.push((id, run));
    });
    id
}

/// Starts a run: checks, counts, records it; the state it returns goes to the batches.
fn begin(
    kind: Kind,
    relation_oid: pg_sys::Oid,
    source: String,
    target: String,
    batch_size: i64,
    on_shards: Option<String>,
) -> i64 {
    let leaves = if on_shards.is_some() { Vec::new() } else { leaves(relation_oid) };
    let key = RunKey {
        relation: relation_oid,
        source,
        target,
        // SAFETY: this backend's pid.
        pid: unsafe { pg_sys::MyProcPid },
        started_at: now(),
    };
    let mut run = Run {
        kind,
        key,
        batch_size,
        leaves,
        leaf: 0,
        block: 0,
        pass_rows: 0,
        waiting: false,
        done: 0,
        initial: 0,
        others_at_start: 0,
        remaining: 0,
        started: Instant::now(),
        finished: false,
        note: None,
        on_shards,
    };
    run.initial = run.count_remaining();
    run.remaining = run.initial;
    run.others_at_start = run.key.others_done();
    run.key.begin(run.remaining);
    store(run)
}

/// Whether `relation` has one of the triggers that keep `target` fresh.
fn has_vector_trigger(relation: &PgRelation) -> bool {
    let schema = sql_text::extension_schema(c"embeddinggemma");
    // SAFETY: the relation's trigger descriptor (NULL when it has none) and catalog lookups of
    // its triggers' functions.
    unsafe {
        let Some(desc) = relation.trigdesc.as_ref() else { return false };
        std::slice::from_raw_parts(desc.triggers, desc.numtriggers as usize).iter().any(|t| {
            let name = pg_sys::get_func_name(t.tgfoid);
            !name.is_null()
                && [c"embeddinggemma_trigger", c"embeddinggemma_statement_trigger"]
                    .contains(&std::ffi::CStr::from_ptr(name))
                && pg_sys::get_func_namespace(t.tgfoid) == schema
        })
    }
}

#[pg_extern(sql = "")]
fn embeddinggemma_backfill_begin(
    tbl: pg_sys::Oid,
    source: &str,
    target: &str,
    task: &str,
    dim: i32,
    batch_size: i32,
) -> i64 {
    let batch_size = check_batch_size(batch_size, "256");
    let rel = open_checked(tbl);
    check_columns(&rel, source, target, dim);
    sql_text::require_privilege(tbl, pg_sys::ACL_UPDATE, "backfill");
    routing::check_request(task, dim);
    if !has_vector_trigger(&rel) {
        let table = sql_text::display(tbl);
        let hint = format!(
            "CREATE TRIGGER {} BEFORE INSERT OR UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_trigger({}, {}, {}, {});",
            ident(&format!("{}_embed", sql_text::relation_name(tbl))),
            sql_text::literal(source),
            sql_text::literal(target),
            sql_text::literal(task),
            sql_text::literal(&dim.to_string()),
        );
        pgrx::pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_WARNING,
            format!("embeddinggemma_backfill: no embeddinggemma trigger on {table}: rows whose {source} changes later keep a stale {target}"),
            "embeddinggemma_backfill_begin",
        )
        .set_hint(hint)
        .report(PgLogLevel::WARNING);
    }
    drop(rel);
    let on_shards = crate::citus::is_distributed(tbl).then(|| {
        shard_command(&format!(
            "embeddinggemma_backfill(%L, {}, {}, {}, {dim}, {batch_size})",
            sql_text::literal(source),
            sql_text::literal(target),
            sql_text::literal(task)
        ))
    });
    let kind = Kind::Vectors { source: source.into(), target: target.into(), task: task.into(), dim };
    begin(kind, tbl, source.into(), target.into(), batch_size, on_shards)
}

/// `CALL <extension schema>.<call>` for run_command_on_shards, a format() string: `%L`, the
/// shard's name as a literal; every other `%` escaped.
fn shard_command(call: &str) -> String {
    let schema = sql_text::extension_schema(c"embeddinggemma");
    // SAFETY: a catalog lookup of an existing schema's name.
    let schema = unsafe { std::ffi::CStr::from_ptr(pg_sys::get_namespace_name(schema)) }.to_string_lossy().into_owned();
    let (before, after) = call.split_once("%L").expect("a shard placeholder");
    format!(
        "CALL {}.{}%L{}",
        crate::citus::escape_format(&ident(&schema)),
        crate::citus::escape_format(before),
        crate::citus::escape_format(after)
    )
}

#[pg_extern(sql = "")]
fn embeddinggemma_chunk_backfill_begin(tbl: pg_sys::Oid, chunk_table: pg_sys::Oid, batch_size: i32) -> i64 {
    let batch_size = check_batch_size(batch_size, "16");
    open_checked(chunk_table);
    // On a shard (a distributed run's part), the distributed chunk table means its shard here.
    let named = chunk_table;
    let chunk_table = match crate::citus::shard_of(tbl) {
        Some((shard, _)) if crate::citus::is_distributed(chunk_table) => {
            crate::citus::colocated_shard(shard, chunk_table).unwrap_or_else(|why| {
                raise(
                    PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                    format!("embeddinggemma_chunk_backfill: {why}"),
                    "Distribute the chunk table by the document key, co-located with the documents.",
                )
            })
        }
        _ => chunk_table,
    };
    let kind = Kind::Chunks { chunk_table };
    let s = chunk_settings(tbl, chunk_table);
    sql_text::require_privilege(chunk_table, pg_sys::ACL_INSERT, "chunk into");
    routing::check_request(&s.task, s.dim);
    let on_shards = crate::citus::is_distributed(tbl).then(|| {
        shard_command(&format!(
            "embeddinggemma_chunk_backfill(%L, {}, {batch_size})",
            sql_text::literal(&relation(named))
        ))
    });
    begin(kind, tbl, s.source, sql_text::display(chunk_table), batch_size, on_shards)
}

/// One batch of the run `run` (from `embeddinggemma_*_begin` in this session): the NOTICE to
/// show after it commits, and whether the run is over.
#[pg_extern(sql = "")]
fn embeddinggemma_backfill_batch(run: i64) -> TableIterator<'static, (name!(message, String), name!(finished, bool))> {
    let taken = RUNS.with(|runs| {
        let mut runs = runs.borrow_mut();
        runs.iter().position(|(id, _)| *id == run).map(|i| runs.remove(i).1)
    });
    let Some(mut state) = taken else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("embeddinggemma: no backfill run {run} in this session"),
            "CALL embeddinggemma_backfill(…) or embeddinggemma_chunk_backfill(…): they start a run and do its batches.",
        )
    };
    state.batch();
    let standing = state.standing();
    state.key.record(&standing);
    let message = state.message(&standing);
    let finished = state.finished;
    if !finished {
        // Back only once the batch went well: an ERROR leaves no half-updated state.
        RUNS.with(|runs| runs.borrow_mut().push((run, state)));
    }
    TableIterator::once((message, finished))
}
