//! A backfill run's state in this backend, and its batches.
//!
//! A batch claims rows with `FOR UPDATE SKIP LOCKED` (so several sessions share a table),
//! starting at the block where the last one stopped (so a batch costs the same at the end of a
//! big table as at its start). A pass over the table ends with a count of the rows left: none,
//! and the run is done; some but none claimed in the pass (other sessions hold them), and the
//! next pass waits for one row at a time instead of skipping; a waiting pass that still claims
//! none leaves rows this run cannot claim (hidden from it by row-level security for UPDATE, in
//! foreign partitions), and the run ends saying so.

use std::time::Instant;

use pgrx::prelude::*;
use pgrx::{pg_sys, PgRelation, PgSqlErrorCode};

use super::progress::RunKey;
use crate::embedding;
use crate::pg::columns::{check_columns, open_checked};
use crate::pg::errors::raise;
use crate::pg::quote::{ident, relation};
use crate::pg::spi::text_param;
use crate::pg::vector;
use crate::pg::{catalog, quote, spi};
use crate::write::chunk_settings::ChunkSettings;
use crate::write::chunk_trigger::triggers_writing;
use crate::write::write_back::{write_back_sql, Writing};

pub(super) enum Kind {
    Vectors { source: String, target: String, task: String, dim: i32 },
    Chunks { chunk_table: pg_sys::Oid },
}

pub(super) struct Run {
    pub(super) kind: Kind,
    pub(super) key: RunKey,
    batch_size: i64,
    /// The relations holding rows (the table, or its partitions and children).
    leaves: Vec<pg_sys::Oid>,
    leaf: usize,
    block: u32,
    /// Rows claimed in this pass, and whether this pass waits for held rows.
    pass_rows: i64,
    waiting: bool,
    pub(super) done: i64,
    pub(super) initial: i64,
    /// Rows done by all runs on the same columns when this one started.
    pub(super) others_at_start: i64,
    pub(super) remaining: i64,
    pub(super) started: Instant,
    pub(super) finished: bool,
    pub(super) note: Option<String>,
    /// On a Citus distributed table: the CALL each shard runs (see `dispatch`).
    on_shards: Option<String>,
}

/// `relation` and all its partitions and inheritance children, with their kinds.
fn family(relation: pg_sys::Oid) -> Vec<(pg_sys::Oid, String)> {
    let sql = "WITH RECURSIVE tree(oid) AS (
                   SELECT $1::pg_catalog.oid
                   UNION
                   SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN tree t ON i.inhparent OPERATOR(pg_catalog.=) t.oid)
               SELECT c.oid, c.relkind::pg_catalog.text FROM tree JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) tree.oid";
    Spi::connect_mut(|client| {
        let rows =
            client.update(sql, None, &[spi::param(relation, pg_sys::OIDOID)]).expect("SPI reports errors as ERRORs");
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
    spi::one::<i64>(sql, &[]).unwrap_or(0)
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

impl Run {
    /// Starts a run: counts and records it.
    pub(super) fn start(
        kind: Kind,
        relation_oid: pg_sys::Oid,
        source: String,
        target: String,
        batch_size: i64,
        on_shards: Option<String>,
    ) -> Run {
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
        run
    }

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
        let from = spi::param(format!("({},0)", self.block), pg_sys::TEXTOID);
        let sql = sql.replace("$1", "$1::pg_catalog.tid");
        Spi::connect_mut(|client| {
            let rows = client.update(sql.as_str(), None, &[from]).expect("SPI reports errors as ERRORs");
            let n = rows.columns().unwrap_or(0);
            rows.map(|row| (1..=n).map(|i| row.get::<String>(i).expect("text columns")).collect()).collect()
        })
    }

    /// One batch: claims rows, embeds them, writes them; or ends a pass. Sets `finished` when
    /// the run is over.
    pub(super) fn batch(&mut self) {
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
                Kind::Vectors { source, target, task, dim } => {
                    let (source, target, task, dim) = (source.clone(), target.clone(), task.clone(), *dim);
                    self.embed_batch(&source, &target, &task, dim)
                }
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
        let results = crate::pg::citus::on_every_shard(self.key.relation, command);
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

    pub(super) fn name(&self) -> &'static str {
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

    fn embed_batch(&mut self, source: &str, target: &str, task: &str, dim: i32) -> i64 {
        let leaf = self.leaves[self.leaf];
        let rel = open_checked(leaf);
        let vector_type = check_columns(&rel, source, target, dim).target_type;
        let rows = self.claim(&format!("d.{}::pg_catalog.text", ident(source)));
        if rows.is_empty() {
            return 0;
        }
        let ctids: Vec<String> = rows.iter().map(|r| r[0].clone().expect("a ctid")).collect();
        let texts: Vec<&str> = rows.iter().map(|r| r[1].as_deref().expect("claimed rows have text")).collect();
        let vectors = embedding::embed(&texts, task, dim);
        let sql = write_back_sql(&format!("ONLY {}", relation(leaf)), target, "ctid", "pg_catalog.tid");
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
}

/// The settings of the chunk trigger on `documents` that writes `chunk_table`: the backfill
/// chunks as the trigger does.
pub(super) fn chunk_settings(documents: pg_sys::Oid, chunk_table: pg_sys::Oid) -> ChunkSettings {
    let rel = open_checked(documents);
    match triggers_writing(&rel, chunk_table).into_iter().next() {
        Some(args) => ChunkSettings::parse(&rel, &args),
        None => raise(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("embeddinggemma_chunk_backfill: no embeddinggemma_chunk_trigger on {} writes {}", catalog::display(documents), catalog::display(chunk_table)),
            format!(
                "The backfill chunks as the trigger does, with its settings: CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION embeddinggemma_chunk_trigger('id', 'body', {}, 'doc_id');",
                ident(&format!("{}_chunks", catalog::relation_name(documents))),
                catalog::display(documents),
                quote::literal(&catalog::display(chunk_table)),
            ),
        ),
    }
}
