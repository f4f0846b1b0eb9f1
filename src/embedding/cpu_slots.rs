//! A cluster-wide cap on CPU threads used for embedding. Each of `embeddinggemma.max_threads`
//! slots is one byte of a lock file in the data directory, held with an open-file-description
//! lock while a backend embeds: the kernel drops it when the backend exits, however it exits.
//!
//! Fairness: a backend that finds no free slot marks itself waiting (a shared lock on the
//! byte before the slots). A backend about to take slots while others wait joins them instead,
//! so one that embeds call after call cannot starve the rest.

use std::cell::OnceCell;
use std::fs::File;
use std::os::fd::AsRawFd;

use pgrx::pg_sys;

use crate::pg::errors::raise;

/// Relative to the data directory, a backend's working directory.
const LOCK_FILE: &str = "pg_stat_tmp/embeddinggemma.threads";

thread_local! {
    static FILE: OnceCell<File> = const { OnceCell::new() };
}

/// Slots held by this backend; released on drop (including during an ERROR's unwinding).
pub struct Slots {
    held: Vec<i64>,
}

impl Slots {
    pub fn count(&self) -> usize {
        self.held.len()
    }
}

/// The byte waiting backends hold shared; slots follow it.
const WAITING: i64 = 0;

fn fcntl_lock(fd: i32, command: i32, byte: i64, kind: i32) -> Option<libc::flock> {
    // SAFETY: a plain fcntl on a descriptor we own, with a zero-initialised flock.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = kind as i16;
        fl.l_whence = libc::SEEK_SET as i16;
        fl.l_start = byte;
        fl.l_len = 1;
        (libc::fcntl(fd, command, &mut fl) == 0).then_some(fl)
    }
}

fn lock(fd: i32, byte: i64, kind: i32) -> bool {
    fcntl_lock(fd, libc::F_OFD_SETLK, byte, kind).is_some()
}

/// Whether another backend holds the waiting mark (our own lock never conflicts with us).
fn others_waiting(fd: i32) -> bool {
    fcntl_lock(fd, libc::F_OFD_GETLK, WAITING, libc::F_WRLCK).is_some_and(|fl| fl.l_type != libc::F_UNLCK as i16)
}

impl Drop for Slots {
    fn drop(&mut self) {
        FILE.with(|f| {
            if let Some(file) = f.get() {
                for &byte in &self.held {
                    lock(file.as_raw_fd(), byte, libc::F_UNLCK);
                }
            }
        });
    }
}

fn open() -> File {
    File::options().read(true).write(true).create(true).truncate(false).open(LOCK_FILE).unwrap_or_else(|e| {
        raise(
            pgrx::PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("embeddinggemma: cannot open {LOCK_FILE} in the data directory: {e}"),
            "The thread limit needs a writable pg_stat_tmp directory.",
        )
    })
}

/// This backend's waiting mark; dropped when it gets its slots or an ERROR unwinds the wait.
struct WaitingMark(i32);

impl Drop for WaitingMark {
    fn drop(&mut self) {
        lock(self.0, WAITING, libc::F_UNLCK);
    }
}

/// Takes up to `want` of `total` slots, waiting (interruptibly) until at least one is free.
pub fn acquire(want: usize, total: usize) -> Slots {
    let want = want.clamp(1, total.max(1));
    FILE.with(|f| {
        let fd = f.get_or_init(open).as_raw_fd();
        let mut waiting: Option<WaitingMark> = None;
        loop {
            if waiting.is_some() || !others_waiting(fd) {
                let mut held = Vec::with_capacity(want);
                for byte in 1..=total as i64 {
                    if held.len() == want {
                        break;
                    }
                    if lock(fd, byte, libc::F_WRLCK) {
                        held.push(byte);
                    }
                }
                if !held.is_empty() {
                    return Slots { held };
                }
            }
            if waiting.is_none() && lock(fd, WAITING, libc::F_RDLCK) {
                waiting = Some(WaitingMark(fd));
            }
            // SAFETY: waiting on our own latch from the backend's main thread.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                    10,
                    pg_sys::PG_WAIT_EXTENSION,
                );
                pg_sys::ResetLatch(pg_sys::MyLatch);
            }
            pg_sys::check_for_interrupts!();
        }
    })
}
