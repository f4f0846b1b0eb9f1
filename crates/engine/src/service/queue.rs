//! The one bounded queue between connection threads and the model thread. Room is reserved
//! before a request is read (its frame bytes) and before it is queued (its texts), and given
//! back when the model thread is done with it, so queued work stays within the bounds. A
//! request larger than a bound is admitted only into an empty queue and counts as half of it:
//! one at a time, and smaller requests still get in beside it (fairness needs them queued).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::metrics::Depth;
use super::protocol::Response;

/// How often a waiting connection thread checks whether its client is still there.
pub const PEER_CHECK: Duration = Duration::from_millis(20);

pub struct Job {
    pub connection: u64,
    pub task: String,
    pub dim: usize,
    pub truncate: bool,
    pub texts: Vec<String>,
    /// Nobody waits on it interactively (an asynchronous queue draining).
    pub background: bool,
    pub arrived: Instant,
    /// Set by the connection thread when its client goes away.
    pub withdrawn: Arc<AtomicBool>,
    pub reply: Sender<Response>,
    pub permit: Permit,
}

impl Job {
    pub fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct State {
    jobs: Vec<Job>,
    depth: Depth,
}

pub struct Queue {
    state: Mutex<State>,
    arrived: Condvar,
    room: Condvar,
    max_texts: usize,
    max_bytes: usize,
}

/// Queue room held by one request; given back on drop.
pub struct Permit {
    queue: Arc<Queue>,
    texts: usize,
    bytes: usize,
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.queue.lock();
        s.depth.texts -= self.texts;
        s.depth.bytes -= self.bytes;
        s.depth.requests -= (self.texts > 0) as usize;
        drop(s);
        self.queue.room.notify_all();
    }
}

/// What `n` more counts against a bound of `max` with `now` taken, if it may come in now.
fn admit(now: usize, n: usize, max: usize) -> Option<usize> {
    if n > max {
        (now == 0).then_some((max / 2).max(1))
    } else {
        (now + n <= max).then_some(n)
    }
}

impl Queue {
    pub fn new(max_texts: usize, max_bytes: usize) -> Arc<Queue> {
        Arc::new(Queue { state: Mutex::default(), arrived: Condvar::new(), room: Condvar::new(), max_texts, max_bytes })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn depth(&self) -> Depth {
        self.lock().depth
    }

    /// Waits until `fits` holds for the state, or `gone` says the client left (None).
    fn wait_room<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        fits: impl Fn(&Depth) -> bool,
        gone: &dyn Fn() -> bool,
    ) -> Option<MutexGuard<'a, State>> {
        while !fits(&s.depth) {
            if gone() {
                return None;
            }
            s = self.room.wait_timeout(s, PEER_CHECK).unwrap_or_else(|e| e.into_inner()).0;
        }
        Some(s)
    }

    /// Reserves `bytes` for a request about to be read.
    pub fn reserve_bytes(self: &Arc<Self>, bytes: usize, gone: &dyn Fn() -> bool) -> Option<Permit> {
        let max = self.max_bytes;
        let mut s = self.wait_room(self.lock(), |d| admit(d.bytes, bytes, max).is_some(), gone)?;
        let counted = admit(s.depth.bytes, bytes, max).unwrap_or(0);
        s.depth.bytes += counted;
        Some(Permit { queue: self.clone(), texts: 0, bytes: counted })
    }

    /// Reserves room for `texts` and `bytes` more (the bytes of a frame read before reserving),
    /// then queues the job made by `make`, its permit holding all. None (nothing queued) when
    /// the client left while waiting.
    pub fn push(
        &self,
        texts: usize,
        bytes: usize,
        mut make: impl FnMut() -> Job,
        gone: &dyn Fn() -> bool,
    ) -> Option<()> {
        let (max_texts, max_bytes) = (self.max_texts, self.max_bytes);
        let fits = |d: &Depth| admit(d.texts, texts, max_texts).zip(admit(d.bytes, bytes, max_bytes));
        let mut s = self.wait_room(self.lock(), |d| fits(d).is_some(), gone)?;
        let (texts, bytes) = fits(&s.depth).unwrap_or_default();
        let mut job = make();
        job.permit.texts = texts;
        job.permit.bytes += bytes;
        s.depth.bytes += bytes;
        s.depth.texts += texts;
        s.depth.requests += 1;
        s.depth.peak_texts = s.depth.peak_texts.max(s.depth.texts);
        s.depth.peak_requests = s.depth.peak_requests.max(s.depth.requests);
        s.jobs.push(job);
        drop(s);
        self.arrived.notify_all();
        Some(())
    }

    /// The queued jobs `pick` accepts, without waiting (the others stay queued).
    pub fn take_matching(&self, pick: impl Fn(&Job) -> bool) -> Vec<Job> {
        let mut s = self.lock();
        let (picked, kept) = std::mem::take(&mut s.jobs).into_iter().partition(|j| pick(j));
        s.jobs = kept;
        picked
    }

    /// Waits until a queued job `pick` accepts is there, `nudge` is called, or `timeout` passes.
    pub fn wait_arrival(&self, timeout: Duration, pick: impl Fn(&Job) -> bool) {
        let s = self.lock();
        if !s.jobs.iter().any(&pick) {
            drop(self.arrived.wait_timeout(s, timeout).unwrap_or_else(|e| e.into_inner()));
        }
    }

    /// Wakes the model thread from `wait_arrival` (its background pass has ended).
    pub fn nudge(&self) {
        let _s = self.lock();
        self.arrived.notify_all();
    }

    /// The model thread's intake: what is queued now, or when `block`, waits for something and
    /// then (the collection window) until `window` after the first request arrived.
    pub fn take(&self, block: bool, window: Duration) -> Vec<Job> {
        let mut s = self.lock();
        if block {
            while s.jobs.is_empty() {
                s = self.arrived.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            let deadline = s.jobs[0].arrived + window;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                s = self.arrived.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        std::mem::take(&mut s.jobs)
    }
}
