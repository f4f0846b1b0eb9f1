//! How busy the rest of the machine is: the CPU time of every other process, as a share of all
//! CPUs, over a recent window (Linux: /proc/stat less /proc/self/stat). Background passes pause
//! while it is high, so that asynchronous embedding takes what the database leaves idle — the
//! lowest thread priority alone is not enough where CPUs are hyperthreads of one core.

use std::time::{Duration, Instant};

/// Shorter windows than this reuse the last figure (the counters tick at 100 Hz).
const MIN_WINDOW: Duration = Duration::from_millis(40);

pub struct CpuShare {
    last: Option<Sample>,
    share: f64,
    cpus: f64,
    /// Clock ticks per second (the unit of both files).
    hz: f64,
}

#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    machine_busy: u64,
    ours: u64,
}

impl CpuShare {
    pub fn new() -> CpuShare {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        CpuShare { last: None, share: 0.0, cpus: cpus as f64, hz: if hz > 0 { hz as f64 } else { 100.0 } }
    }

    /// Other processes' CPU use since the previous call, as a share of all CPUs (0 where the
    /// counters cannot be read, or on the first call).
    pub fn others(&mut self) -> f64 {
        let Some(now) = sample() else { return 0.0 };
        match self.last {
            Some(last) if now.at.duration_since(last.at) < MIN_WINDOW => {}
            Some(last) => {
                let seconds = now.at.duration_since(last.at).as_secs_f64();
                let machine = now.machine_busy.saturating_sub(last.machine_busy) as f64;
                let ours = now.ours.saturating_sub(last.ours) as f64;
                self.share = ((machine - ours).max(0.0) / self.hz / seconds / self.cpus).min(1.0);
                self.last = Some(now);
            }
            None => self.last = Some(now),
        }
        self.share
    }
}

fn sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    Some(Sample { at: Instant::now(), machine_busy: machine_busy(&stat)?, ours: own_ticks(&own)? })
}

/// Busy ticks of all CPUs from /proc/stat's first line: user, nice, system, irq, softirq,
/// steal (not idle, iowait; guest time is inside user).
fn machine_busy(stat: &str) -> Option<u64> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum())
}

/// This process's user + system ticks (fields 14 and 15 of /proc/self/stat, counted after the
/// parenthesised command name, which may contain spaces).
fn own_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_counters() {
        let stat = "cpu  100 5 20 900 7 1 2 3 0 0\ncpu0 50 2 10 450 3 0 1 1 0 0\n";
        assert_eq!(machine_busy(stat), Some(100 + 5 + 20 + 1 + 2 + 3));
        let own = "4242 (embedding gemma) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 11 0 0 20 0 9 0";
        assert_eq!(own_ticks(own), Some(48));
    }

    #[test]
    fn a_busy_thread_elsewhere_shows_and_our_own_does_not() {
        let mut share = CpuShare::new();
        share.others();
        let spin = |d: Duration| {
            let t = Instant::now();
            let mut x = 0u64;
            while t.elapsed() < d {
                x = x.wrapping_add(std::hint::black_box(1));
            }
            x
        };
        // Our own work is not counted (the machine may be busy with others: bound loosely).
        spin(Duration::from_millis(300));
        let ours = share.others();
        assert!((0.0..=1.0).contains(&ours), "{ours}");
        // Another process spinning is.
        let mut child = std::process::Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(400));
        share.others();
        std::thread::sleep(Duration::from_millis(400));
        let others = share.others();
        child.kill().unwrap();
        let _ = child.wait();
        assert!(others * share.cpus >= 0.5, "a spinning process counted as {others} of {} CPUs", share.cpus);
    }
}
