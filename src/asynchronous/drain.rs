//! A worker's round over its database's queue: each round visits the targets in turn (one slow
//! or locked target does not hold back the others): it claims a target's due entries, reads
//! their current text, embeds them through the service (as background work, which interactive
//! calls overtake), writes the vectors or chunks and removes the entries. Reads and writes run
//! as the table's owner, one owner at a time (`owner`). A row whose text changed meanwhile is
//! left for its newer entry; a row whose write fails is retried with backoff, then kept as
//! failed, without holding back any other row.

use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::claims::{self, Claimed};
use super::failure::{embedding_step, txn, Failure};
use super::registry;
use super::rows::{self, Found};
use super::target::{targets, Target};
use crate::embedding;

/// How often the serving model's identity is read again.
const MODEL_CHECK: Duration = Duration::from_secs(10);

/// What a batch wrote: rows, and the entries it is done with (not those it gave back for a
/// later batch or refused).
struct Written {
    rows: usize,
    done: Vec<i64>,
}

/// What a round found to do.
pub(super) enum Round {
    Worked,
    Idle,
    NoTargets,
}

/// The claimed entries of one target, by key (a row queued twice is embedded once).
struct Batch {
    keys: Vec<String>,
    ids: Vec<Vec<i64>>,
}

impl Batch {
    fn of(claimed: Vec<Claimed>) -> Batch {
        let mut batch = Batch { keys: Vec::new(), ids: Vec::new() };
        let mut index: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
        for c in claimed {
            match index.get(&c.key) {
                Some(&i) => batch.ids[i].push(c.id),
                None => {
                    index.insert(c.key.clone(), batch.keys.len());
                    batch.keys.push(c.key);
                    batch.ids.push(vec![c.id]);
                }
            }
        }
        batch
    }

    fn all_ids(&self) -> Vec<i64> {
        self.ids.iter().flatten().copied().collect()
    }
}

pub(super) struct Worker {
    pub(super) slot: usize,
    pub(super) db: pg_sys::Oid,
    /// The serving model's identity, and when it was read.
    pub(super) model: Option<(crate::embedding::model_info::ModelInfo, Instant)>,
    /// The target whose turn comes first in the next round.
    pub(super) next: usize,
}

impl Worker {
    /// The serving model's identity, read again every `MODEL_CHECK`; None while it cannot be
    /// had (the service loading its model: calls wait for it meanwhile).
    fn serving_model(&mut self) -> Option<crate::embedding::model_info::ModelInfo> {
        if self.model.as_ref().is_none_or(|(_, at)| at.elapsed() > MODEL_CHECK) {
            let info = PgTryBuilder::new(AssertUnwindSafe(|| Some(embedding::info()))).catch_others(|_| None).execute();
            self.model = info.map(|i| (i, Instant::now()));
        }
        self.model.as_ref().map(|(m, _)| m.clone())
    }

    /// One round: queue rows of targets being scanned, then a batch of each target in turn.
    pub(super) fn round(&mut self) -> Result<Round, String> {
        let targets = txn(targets)?;
        if targets.is_empty() {
            return Ok(Round::NoTargets);
        }
        if let Some(model) = self.serving_model() {
            txn(|| super::provenance::record_serving(&targets, &model))?;
        }
        let mut worked = false;
        for t in targets.iter().filter(|t| t.scanning) {
            worked = true;
            if let Err(e) = txn(|| t.scan()) {
                pgrx::warning!("embeddinggemma async: queueing the rows of target {}: {e}", t.id);
            }
        }
        // An entry in hand when a worker stopped goes alone, before anything else.
        let ids: Vec<i32> = targets.iter().map(|t| t.id).collect();
        if let Some((id, entry)) = txn(|| claims::claim_interrupted(&ids))? {
            let t = targets.iter().find(|t| t.id == id).expect("claimed among these targets");
            if let Some(batch) = self.batch(t, vec![entry]) {
                self.process(t, batch)?;
            }
            return Ok(Round::Worked);
        }
        let first = self.next % targets.len();
        self.next = first + 1;
        for t in targets.iter().cycle().skip(first).take(targets.len()) {
            let claimed = txn(|| claims::claim(t.id, t.max_attempts))?;
            if claimed.is_empty() {
                continue;
            }
            worked = true;
            if let Some(batch) = self.batch(t, claimed) {
                self.process(t, batch)?;
            }
            if registry::must_leave(self.slot) {
                break;
            }
        }
        if !worked {
            txn(|| super::provenance::settle_models(&targets))?;
            return Ok(Round::Idle);
        }
        Ok(Round::Worked)
    }

    /// The batch of claimed entries, their keys read back in this worker's terms; entries
    /// whose key cannot be read back (its column retyped) are recorded as failed.
    fn batch(&self, t: &Target, mut claimed: Vec<Claimed>) -> Option<Batch> {
        match txn(|| rows::keys_in_worker_terms(t, &mut claimed)) {
            Ok(()) => Some(Batch::of(claimed)),
            Err(e) => {
                let ids: Vec<i64> = claimed.iter().map(|c| c.id).collect();
                if let Err(e) = txn(|| claims::failed(&ids, &e)) {
                    pgrx::warning!("embeddinggemma async: recording rows of target {}: {e}", t.id);
                }
                None
            }
        }
    }

    /// Embeds and writes a batch; a batch that fails is written row by row (each in its own
    /// transaction, so that one bad row fails alone) while the time allows. Err: the service
    /// failed (the batch is back in the queue, untried).
    fn process(&self, t: &Target, batch: Batch) -> Result<(), String> {
        let started = Instant::now();
        match self.write(t, &batch) {
            Ok(w) => {
                let rate = w.rows as f64 / started.elapsed().as_secs_f64().max(1e-3);
                self.record(t, &w.done, w.rows, rate);
                Ok(())
            }
            Err(Failure::Service(e)) => {
                let _ = txn(|| claims::give_back(&batch.all_ids()));
                Err(e)
            }
            Err(_) if registry::must_leave(self.slot) => {
                let _ = txn(|| claims::give_back(&batch.all_ids()));
                Ok(())
            }
            Err(Failure::Rows(e)) => {
                pgrx::log!(
                    "embeddinggemma async: a batch of {} rows of target {} failed ({e}); writing them one by one",
                    batch.keys.len(),
                    t.id
                );
                self.one_by_one(t, batch)
            }
        }
    }

    fn one_by_one(&self, t: &Target, batch: Batch) -> Result<(), String> {
        // A slow or locked table gets about one more batch's time, then waits for the next
        // round (the other targets go first).
        let bound = super::owner::Bounds::configured().statement_ms;
        let budget = Duration::from_millis(if bound > 0 { bound.max(1_000) as u64 } else { 60_000 });
        let started = Instant::now();
        let mut left: Vec<i64> = Vec::new();
        let mut service = None;
        for (key, ids) in batch.keys.into_iter().zip(batch.ids) {
            if started.elapsed() > budget || registry::must_leave(self.slot) || service.is_some() {
                left.extend(ids);
                continue;
            }
            let one = Batch { keys: vec![key.clone()], ids: vec![ids.clone()] };
            match self.write(t, &one) {
                Ok(w) => self.record(t, &w.done, w.rows, t.rows_per_second.unwrap_or(0.0)),
                Err(Failure::Rows(e)) => {
                    if let Err(e) = txn(|| claims::failed(&ids, &e)) {
                        pgrx::warning!("embeddinggemma async: recording row {key} of target {}: {e}", t.id);
                    }
                }
                Err(Failure::Service(e)) => {
                    left.extend(ids);
                    service = Some(e);
                }
            }
        }
        if let Err(e) = txn(|| claims::give_back(&left)) {
            pgrx::warning!("embeddinggemma async: giving back rows of target {}: {e}", t.id);
        }
        service.map_or(Ok(()), Err)
    }

    fn record(&self, t: &Target, ids: &[i64], n: usize, rate: f64) {
        if let Err(e) = txn(|| {
            claims::remove(ids);
            super::provenance::record_batch(t, n, rate);
        }) {
            pgrx::warning!("embeddinggemma async: recording a batch of target {}: {e}", t.id);
        }
    }

    /// Reads, embeds and writes `batch`; entries left for later are given back and refused
    /// ones recorded, in the transaction of the read. The rows written.
    fn write(&self, t: &Target, batch: &Batch) -> Result<Written, Failure> {
        let found = txn(|| {
            let found = rows::read(t, &batch.keys);
            let pick = |want: fn(&Found) -> bool| -> Vec<i64> {
                found.iter().zip(&batch.ids).filter(|(f, _)| want(f)).flat_map(|(_, ids)| ids.iter().copied()).collect()
            };
            claims::give_back(&pick(|f| matches!(f, Found::Later)));
            for (f, ids) in found.iter().zip(&batch.ids) {
                if let Found::TooLarge(bytes) = f {
                    let message = format!(
                        "embeddinggemma: the document has {bytes} bytes; asynchronous chunking embeds documents of at most {} bytes",
                        rows::CHUNK_DOCUMENT_BYTES
                    );
                    claims::refused(ids, &message);
                }
            }
            found
        })?;
        let done: Vec<i64> = found
            .iter()
            .zip(&batch.ids)
            .filter(|(f, _)| matches!(f, Found::Text(..) | Found::Nothing))
            .flat_map(|(_, ids)| ids.iter().copied())
            .collect();
        let rows = match &t.column {
            Some(column) => self.write_vectors(t, column, &batch.keys, found)?,
            None => {
                let (keys, texts): (Vec<String>, Vec<Option<String>>) = batch
                    .keys
                    .iter()
                    .cloned()
                    .zip(found)
                    .filter_map(|(k, f)| match f {
                        Found::Text(text, _) => Some((k, Some(text))),
                        Found::Nothing => Some((k, None)),
                        Found::Later | Found::TooLarge(_) => None,
                    })
                    .unzip();
                if keys.is_empty() {
                    0
                } else {
                    let chunks =
                        txn(|| embedding_step(|| rows::embed_chunks(t, &keys, &texts))).map_err(Failure::Rows)??;
                    txn(|| rows::write_chunks(t, &keys, chunks))?
                }
            }
        };
        Ok(Written { rows, done })
    }

    fn write_vectors(&self, t: &Target, column: &str, keys: &[String], found: Vec<Found>) -> Result<usize, Failure> {
        let (mut live, mut texts, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for (k, f) in keys.iter().zip(found) {
            if let Found::Text(text, len) = f {
                live.push(k.clone());
                texts.push(text);
                lens.push(len);
            }
        }
        if live.is_empty() {
            return Ok(0);
        }
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let vectors = embedding_step(|| embedding::embed(&refs, &t.task, t.dim))?;
        drop(refs);
        Ok(txn(|| rows::write_vectors(t, column, &live, &texts, &lens, &vectors))?)
    }
}
