//! The model thread: takes what is queued, plans the texts of all requests together into
//! length buckets, runs one forward pass per bucket, and answers each request once all its
//! texts are done.
//!
//! Rounds: every round, each request in progress contributes one bucket of its pending texts:
//! the first (longest) bucket of planning its tokenized look-ahead of up to `LOOKAHEAD` ×
//! `max_batch_tokens` tokens. A small request is thus done in the round after it arrives,
//! however large the requests beside it, and a large one advances every round, in buckets as
//! full as planning it whole would make. The round then plans the texts of all requests
//! together (small requests share passes).
//!
//! Interactive requests come first. Background requests (an asynchronous queue draining) run
//! when no interactive one is in progress, and in at least every `BACKGROUND_SHARE`-th round
//! beside them, so they are never starved. While interactive requests have come recently,
//! background passes are small (`BACKGROUND_TOKENS`).
//!
//! On the CPU a background pass runs on a thread of its own, on idle-class threads (CPU time
//! nobody else wants), while the model thread serves the small interactive requests that
//! arrive meanwhile, whole, on the normal pool, the background threads at nice 19 meanwhile
//! (`Engine::soften_background`): the operating system gives the interactive threads nearly
//! all the CPU at once, so a search query does not wait for a background layer (one layer of a
//! 2,048-token text takes a few hundred milliseconds on two cores). Should interactive work keep
//! a background layer from ending for `STARVED`, the model thread lets the layer end before it
//! serves more: background work is never starved. Where the engine has no background pool
//! (GPUs), interactive requests are served between a background pass's layers instead.
//!
//! Before each of their layers background passes wait while other processes keep more than
//! `BUSY_SHARE` of the CPUs busy (the database's own writes come first): idle-class threads
//! alone still slowed sixteen inserting sessions by a third (their caches and memory bandwidth
//! are shared). The wait is at most `YIELD_FACTOR` times the layer before it took, so a machine
//! kept busy for hours still drains its queues, at one part in `YIELD_FACTOR + 1` of the time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::cpu_share::CpuShare;
use super::metrics::Metrics;
use super::protocol::{CallStats, Response};
use super::queue::{Job, Queue};
use crate::engine::Engine;
use crate::error::Error;
use crate::model::normalize;

/// Round budgets of tokens tokenized ahead per request.
const LOOKAHEAD: usize = 4;
/// Texts tokenized at once while filling a look-ahead.
const TOKENIZE_CHUNK: usize = 256;
/// With interactive work in progress, background work still runs every this many rounds.
const BACKGROUND_SHARE: u32 = 4;
/// Tokens in a background pass while interactive requests came within `RECENT`.
const BACKGROUND_TOKENS: usize = 512;
const RECENT: Duration = Duration::from_secs(10);
/// Interactive requests of at most this many texts are served between a background pass's
/// layers.
const PREEMPT_TEXTS: usize = 64;
/// Other processes' share of the CPUs above which background work waits.
const BUSY_SHARE: f64 = 0.5;
/// A background layer waits for busy CPUs at most this many times the time the layer before
/// it took (its guaranteed share: one part in `YIELD_FACTOR + 1`)…
const YIELD_FACTOR: u32 = 9;
/// …and at most this long.
const MAX_YIELD: Duration = Duration::from_secs(10);
/// How often a waiting background layer looks again (and serves interactive requests).
const YIELD_STEP: Duration = Duration::from_millis(50);
/// Interactive work that kept a background layer from ending this long waits for the layer.
const STARVED: Duration = Duration::from_secs(2);
/// How long the model thread waits for an arrival before looking at its background pass.
const ARRIVAL_CHECK: Duration = Duration::from_millis(50);

struct Active {
    job: Job,
    /// Texts tokenized so far.
    next: usize,
    /// Tokenized texts not yet run: (index in the request, ids).
    ahead: Vec<(usize, Vec<u32>)>,
    ahead_tokens: usize,
    done: usize,
    vectors: Vec<f32>,
    stats: CallStats,
    /// Why the request failed: its reply.
    failed: Option<Response>,
}

impl Active {
    fn new(job: Job) -> Active {
        let mut vectors = Vec::new();
        let failed = vectors
            .try_reserve_exact(job.texts.len().saturating_mul(job.dim))
            .err()
            .map(|e| Response::from_error(&Error::out_of_memory(format!("{} vectors: {e}", job.texts.len()))));
        vectors.resize(if failed.is_none() { job.texts.len() * job.dim } else { 0 }, 0.0);
        Active {
            job,
            next: 0,
            ahead: Vec::new(),
            ahead_tokens: 0,
            done: 0,
            vectors,
            stats: CallStats::default(),
            failed,
        }
    }

    fn live(&self) -> bool {
        self.failed.is_none() && !self.job.is_withdrawn()
    }

    /// Tokenizes texts until the look-ahead holds `tokens` or the request has no more.
    fn fill(&mut self, engine: &Engine, tokens: usize) -> Result<(), Error> {
        let limit = engine.info().max_seq_length;
        while self.ahead_tokens < tokens && self.next < self.job.texts.len() && self.ahead.len() < crate::WINDOW_TEXTS {
            let end = (self.next + TOKENIZE_CHUNK).min(self.job.texts.len());
            let chunk: Vec<&str> = self.job.texts[self.next..end].iter().map(String::as_str).collect();
            for (k, t) in engine.tokenize(&chunk, &self.job.task)?.into_iter().enumerate() {
                if t.truncated() {
                    if !self.job.truncate {
                        return Err(Error::TooLong { index: self.next + k, tokens: t.full_len, limit });
                    }
                    self.stats.truncated += 1;
                }
                self.ahead_tokens += t.ids.len();
                self.ahead.push((self.next + k, t.ids));
            }
            self.next = end;
        }
        Ok(())
    }

    /// The first bucket of the look-ahead's plan under `budget` tokens (its longest texts): for
    /// a request whose texts all fit in the look-ahead, the rounds then run exactly the buckets
    /// of planning it whole.
    fn take(&mut self, engine: &Engine, budget: usize) -> Vec<(usize, Vec<u32>)> {
        let lengths: Vec<usize> = self.ahead.iter().map(|t| t.1.len()).collect();
        let mut chosen = vec![false; lengths.len()];
        for &m in engine.plan_tokens(&lengths, budget).buckets.first().map_or(&[][..], |b| &b.members[..]) {
            chosen[m] = true;
        }
        let (taken, kept): (Vec<_>, Vec<_>) =
            std::mem::take(&mut self.ahead).into_iter().zip(chosen).partition(|(_, c)| *c);
        self.ahead = kept.into_iter().map(|(t, _)| t).collect();
        self.ahead_tokens -= taken.iter().map(|(t, _)| t.1.len()).sum::<usize>();
        taken.into_iter().map(|(t, _)| t).collect()
    }

    fn finished(&self) -> bool {
        self.done == self.job.texts.len()
    }
}

pub struct Scheduler {
    pub engine: Arc<Engine>,
    pub queue: Arc<Queue>,
    pub metrics: Arc<Metrics>,
    pub batch_wait: Duration,
    /// When an interactive request last arrived.
    pub last_interactive: Mutex<Option<Instant>>,
    cpu: Mutex<CpuShare>,
    /// How long the last background layer took (the first layer of a pass waits by it).
    last_layer: Mutex<Duration>,
    /// Background layers finished so far (the model thread sees a starved layer by it).
    layers_done: AtomicU64,
}

/// One text of a round: (request in `active`, index in the request, ids).
type Taken = (usize, usize, Vec<u32>);

impl Scheduler {
    pub fn new(engine: Arc<Engine>, queue: Arc<Queue>, metrics: Arc<Metrics>, batch_wait: Duration) -> Scheduler {
        Scheduler {
            engine,
            queue,
            metrics,
            batch_wait,
            last_interactive: Mutex::new(None),
            cpu: Mutex::new(CpuShare::new()),
            last_layer: Mutex::new(Duration::from_millis(100)),
            layers_done: AtomicU64::new(0),
        }
    }

    pub fn run(self) -> ! {
        let mut active: Vec<Active> = Vec::new();
        let mut interactive_rounds = 0;
        loop {
            let idle = active.is_empty();
            if idle {
                // Hands freed activations back to the system when the queue runs dry.
                crate::reuse_alloc::trim_malloc();
            }
            let window = if idle { self.batch_wait } else { Duration::ZERO };
            active.extend(self.queue.take(idle, window).into_iter().map(Active::new));
            let interactive = active.iter().any(|a| !a.job.background);
            let background = active.iter().any(|a| a.job.background);
            if interactive {
                self.saw_interactive();
                self.round(&mut active, false);
                interactive_rounds += 1;
            }
            if background && (!interactive || interactive_rounds >= BACKGROUND_SHARE) {
                interactive_rounds = 0;
                self.round(&mut active, true);
            }
            active.retain_mut(|a| !self.settle(a));
        }
    }

    fn saw_interactive(&self) {
        *self.last_interactive.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    /// One round over the requests of one class (background or not).
    fn round(&self, active: &mut [Active], background: bool) {
        let full = self.engine.info().max_batch_tokens;
        let recent =
            self.last_interactive.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| t.elapsed() < RECENT);
        let budget = if background && recent { BACKGROUND_TOKENS.min(full) } else { full };
        let mut taken: Vec<Taken> = Vec::new();
        for (r, a) in active.iter_mut().enumerate() {
            if !a.live() || a.job.background != background {
                continue;
            }
            match a.fill(&self.engine, LOOKAHEAD * budget) {
                Ok(()) => taken.extend(a.take(&self.engine, budget).into_iter().map(|(i, ids)| (r, i, ids))),
                Err(e) => a.failed = Some(Response::from_error(&e)),
            }
        }
        let lengths: Vec<usize> = taken.iter().map(|t| t.2.len()).collect();
        for bucket in self.engine.plan_tokens(&lengths, budget).buckets {
            let members: Vec<usize> = bucket.members.into_iter().filter(|&m| active[taken[m].0].live()).collect();
            if !members.is_empty() {
                self.pass(active, &taken, &members, background);
            }
        }
    }

    /// During a background pass (between its layers, or `beside` it): serves the small
    /// interactive requests that arrived meanwhile, whole, before the pass goes on.
    fn serve_interactive_now(&self, beside: bool) {
        let mut jobs: Vec<Active> = self
            .queue
            .take_matching(|j| !j.background && j.texts.len() <= PREEMPT_TEXTS)
            .into_iter()
            .map(Active::new)
            .collect();
        if jobs.is_empty() {
            return;
        }
        self.saw_interactive();
        self.metrics.preempted();
        if beside {
            self.engine.soften_background();
        }
        while !jobs.is_empty() {
            self.round(&mut jobs, false);
            jobs.retain_mut(|a| !self.settle(a));
        }
        if beside {
            self.engine.calm_background();
        }
    }

    /// While a background pass runs on its own thread (until `finished`): serves the small
    /// interactive requests that arrive, but lets a layer they starved end first.
    fn serve_interactive_beside(&self, finished: &dyn Fn() -> bool) {
        let mut watched = (self.layers_done.load(Ordering::Acquire), Duration::ZERO);
        while !finished() {
            let layers = self.layers_done.load(Ordering::Acquire);
            if layers != watched.0 {
                watched = (layers, Duration::ZERO);
            }
            if watched.1 < STARVED {
                let started = Instant::now();
                self.serve_interactive_now(true);
                watched.1 += started.elapsed();
                self.queue.wait_arrival(ARRIVAL_CHECK, |j| !j.background && j.texts.len() <= PREEMPT_TEXTS);
            } else {
                self.queue.wait_arrival(ARRIVAL_CHECK, |_| false);
            }
        }
    }

    /// Waits (serving interactive requests unless `apart`: the model thread does) while other
    /// processes keep the CPUs busy, for at most `YIELD_FACTOR` times the last background
    /// layer's time.
    fn yield_to_busy_cpus(&self, apart: bool) {
        let last_layer = *self.last_layer.lock().unwrap_or_else(|e| e.into_inner());
        let most = (last_layer * YIELD_FACTOR).min(MAX_YIELD);
        let started = Instant::now();
        while started.elapsed() < most && self.cpu.lock().unwrap_or_else(|e| e.into_inner()).others() > BUSY_SHARE {
            std::thread::sleep(YIELD_STEP);
            if !apart {
                self.serve_interactive_now(false);
            }
        }
        let waited = started.elapsed();
        if waited >= YIELD_STEP {
            self.metrics.yielded(waited);
        }
    }

    fn pass(&self, active: &mut [Active], taken: &[Taken], members: &[usize], background: bool) {
        let seqs: Vec<&[u32]> = members.iter().map(|&m| taken[m].2.as_slice()).collect();
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut requests: Vec<usize> = members.iter().map(|&m| taken[m].0).collect();
        requests.sort_unstable();
        requests.dedup();
        if members.len() == 1 && self.engine.estimate_memory(1, len) > self.engine.memory_limit() {
            let a = &mut active[requests[0]];
            a.failed = Some(Response::from_error(&Error::InvalidOption(format!(
                "text {} ({len} tokens) needs about {} MiB for its forward pass, more than the memory limit of {} MiB",
                taken[members[0]].1,
                self.engine.estimate_memory(1, len) >> 20,
                self.engine.memory_limit() >> 20
            ))));
            return;
        }
        let flags: Vec<_> = requests.iter().map(|&r| active[r].job.withdrawn.clone()).collect();
        let cancel = || flags.iter().all(|f| f.load(Ordering::Relaxed));
        let apart = background && self.engine.has_background_pool();
        // Checked between layers: a background pass waits there while other processes keep
        // the CPUs busy, and (not apart) lets interactive requests through.
        let layer_started = Mutex::new(Instant::now());
        let between_layers = || {
            if background {
                let mut layer_started = layer_started.lock().unwrap_or_else(|e| e.into_inner());
                *self.last_layer.lock().unwrap_or_else(|e| e.into_inner()) = layer_started.elapsed();
                self.layers_done.fetch_add(1, Ordering::AcqRel);
                if !apart {
                    self.serve_interactive_now(false);
                }
                self.yield_to_busy_cpus(apart);
                *layer_started = Instant::now();
            }
            cancel()
        };
        // The pass's start (after the wait for busy CPUs), its result and its time.
        let run = || {
            if background {
                self.yield_to_busy_cpus(apart);
            }
            let started = Instant::now();
            *layer_started.lock().unwrap_or_else(|e| e.into_inner()) = started;
            let result = if background {
                self.engine.forward_ids_background(&seqs, &between_layers)
            } else {
                self.engine.forward_ids(&seqs, &between_layers)
            };
            (started, result, started.elapsed())
        };
        let (started, result, time) = if apart {
            std::thread::scope(|scope| {
                let running = scope.spawn(|| {
                    let outcome = run();
                    self.queue.nudge();
                    outcome
                });
                self.serve_interactive_beside(&|| running.is_finished());
                running.join().unwrap_or_else(|_| {
                    (
                        Instant::now(),
                        Err(Error::Inference("the background pass's thread panicked".into())),
                        Duration::ZERO,
                    )
                })
            })
        } else {
            run()
        };
        match result {
            Ok(vectors) => {
                for (&m, v) in members.iter().zip(vectors) {
                    let (r, i, ids) = &taken[m];
                    let a = &mut active[*r];
                    let dim = a.job.dim;
                    let v = if v.len() == dim { v } else { normalize(&v[..dim]) };
                    a.vectors[i * dim..(i + 1) * dim].copy_from_slice(&v);
                    a.done += 1;
                    a.stats.tokens += ids.len() as u64;
                }
                let mut connections: Vec<u64> = requests.iter().map(|&r| active[r].job.connection).collect();
                connections.sort_unstable();
                connections.dedup();
                let real: usize = seqs.iter().map(|s| s.len()).sum();
                self.metrics.pass(
                    members.len(),
                    connections.len(),
                    real,
                    self.engine.computed_tokens(real, len * members.len()),
                    time,
                );
            }
            Err(Error::Cancelled) if cancel() => {}
            Err(e) => {
                for &r in &requests {
                    active[r].failed = Some(Response::from_error(&e));
                }
                return;
            }
        }
        for &r in &requests {
            let s = &mut active[r].stats;
            if s.forward_passes == 0 {
                s.queue_wait = started.duration_since(active[r].job.arrived);
            }
            let s = &mut active[r].stats;
            s.forward_passes += 1;
            s.forward_time += time;
        }
    }

    /// Answers a request that is done, failed or withdrawn; true when it leaves.
    fn settle(&self, a: &mut Active) -> bool {
        let response = if a.job.is_withdrawn() {
            self.metrics.withdrawn();
            return true;
        } else if let Some(failed) = a.failed.take() {
            failed
        } else if a.finished() {
            let s = &mut a.stats;
            s.texts = a.job.texts.len() as u64;
            self.metrics.served(s.texts, s.tokens, s.truncated, s.queue_wait, a.job.background);
            Response::Embedded { dim: a.job.dim as u32, vectors: std::mem::take(&mut a.vectors), stats: a.stats }
        } else {
            return false;
        };
        if a.job.reply.send(response).is_err() {
            self.metrics.withdrawn();
        }
        true
    }
}
