//! A global allocator for hosts whose malloc the engine must not retune (a PostgreSQL backend).
//! glibc serves blocks above its mmap threshold (32 MiB at most) with a fresh mapping each
//! time, so every layer's activations were faulted in and zeroed again (about 3.5 µs a page
//! here); in bf16, where the products are fast, that cost a backend's batches 10 %. While a
//! `ReuseScope` is alive (each engine call holds one; a host may hold one longer, such as a
//! transaction), freed blocks of 1 MiB and more are kept for the next layer, pass or call (the
//! smallest that fits, else a smaller one grown); when the last scope ends they, and malloc's
//! own free memory, go back to the system.
//! Everything else, and everything outside a scope, goes straight to the system allocator.

use std::alloc::{GlobalAlloc, Layout, System};
use std::ptr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Install with `#[global_allocator] static A: ReusingAllocator = ReusingAllocator;`.
pub struct ReusingAllocator;

const MIN_CACHED: usize = 1 << 20;
const MIN_CACHED_LOG2: u32 = 20;
/// The alignment large blocks give: 16, their header taking the start of a page.
const ALIGN: usize = 16;
/// Before each large block: its class, and while cached the next block of its list.
const HEADER: usize = 16;
/// Size classes per power of two: a new block is at most 12.5 % larger than asked.
const STEPS_LOG2: u32 = 3;
const CLASSES: usize = ((usize::BITS - MIN_CACHED_LOG2) << STEPS_LOG2) as usize;
/// The most freed memory kept at once, as the CLI's malloc settings keep (512 MiB).
pub const CACHE_LIMIT: usize = 512 << 20;

struct Cache {
    /// Per class, a list of free blocks threaded through their headers.
    heads: [*mut u8; CLASSES],
    bytes: usize,
}

// SAFETY: the pointers are owned free blocks, only touched under the mutex.
unsafe impl Send for Cache {}

static CACHE: Mutex<Cache> = Mutex::new(Cache { heads: [ptr::null_mut(); CLASSES], bytes: 0 });
static SCOPES: AtomicUsize = AtomicUsize::new(0);
static GIVE_BACK_HOOK: AtomicUsize = AtomicUsize::new(0);

/// For tests: a function every free of a large block calls before it takes the cache's lock,
/// to hold a free there while a scope ends.
#[doc(hidden)]
pub fn set_give_back_hook(hook: Option<fn()>) {
    GIVE_BACK_HOOK.store(hook.map_or(0, |f| f as usize), Ordering::Release);
}

fn lock() -> std::sync::MutexGuard<'static, Cache> {
    CACHE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a layout is served as a large block: decided by the layout alone, so `dealloc`
/// decides as `alloc` did.
fn is_large(layout: Layout) -> bool {
    layout.size() >= MIN_CACHED && layout.align() <= ALIGN && layout.size() <= isize::MAX as usize / 2
}

/// The smallest class holding `size` (>= MIN_CACHED) bytes.
fn class_of(size: usize) -> usize {
    let step = 1usize << (usize::BITS - 1 - size.leading_zeros() - STEPS_LOG2);
    let bytes = (size + step - 1) & !(step - 1);
    let log2 = usize::BITS - 1 - bytes.leading_zeros();
    let sub = (bytes >> (log2 - STEPS_LOG2)) - (1 << STEPS_LOG2);
    (((log2 - MIN_CACHED_LOG2) << STEPS_LOG2) as usize) + sub
}

fn class_bytes(class: usize) -> usize {
    let log2 = (class >> STEPS_LOG2) as u32 + MIN_CACHED_LOG2;
    let sub = class & ((1 << STEPS_LOG2) - 1);
    (1usize << log2) + (sub << (log2 - STEPS_LOG2))
}

fn block_layout(class: usize) -> Layout {
    // SAFETY: is_large keeps sizes at most isize::MAX / 2, so a class (< 2x) plus the header
    // stays below isize::MAX; ALIGN is a power of two.
    unsafe { Layout::from_size_align_unchecked(class_bytes(class) + HEADER, ALIGN) }
}

/// A block's class, read from the header before the pointer handed out.
unsafe fn class_at(user: *mut u8) -> usize {
    user.sub(HEADER).cast::<usize>().read()
}

unsafe fn next_at(block: *mut u8) -> *mut *mut u8 {
    block.add(std::mem::size_of::<usize>()).cast()
}

/// Classes above a request's that may serve it: blocks up to twice its size. A larger block
/// would hold idle memory for the request's life (a 1 MiB buffer in a 1 GiB block).
const LARGER_CLASSES: usize = 1 << STEPS_LOG2;

/// A cached block for `size` bytes, or null: the smallest that holds it (at most twice as
/// large), else the largest smaller one grown in place or moved (its pages stay resident; only
/// the growth faults in). Passes of other lengths thus reuse what earlier ones left, as a heap
/// would.
fn take(size: usize) -> *mut u8 {
    let first = class_of(size);
    let mut cache = lock();
    let larger = first..(first + LARGER_CLASSES + 1).min(CLASSES);
    let found = larger.chain((0..first).rev()).find(|&class| !cache.heads[class].is_null());
    let Some(class) = found else { return ptr::null_mut() };
    let block = cache.heads[class];
    // SAFETY: a cached block's header holds the next block of its list.
    cache.heads[class] = unsafe { next_at(block).read() };
    cache.bytes -= class_bytes(class);
    drop(cache);
    if class >= first {
        return unsafe { block.add(HEADER) };
    }
    // SAFETY: the block is ours alone now, mapped with block_layout(class).
    unsafe {
        let grown = remap(block, block_layout(class), block_layout(first));
        if grown.is_null() {
            return grown;
        }
        grown.cast::<usize>().write(first);
        grown.add(HEADER)
    }
}

/// A new block of `size`'s class, its header written: mapped directly, so it comes zeroed and
/// unmapping it returns every page (glibc would carve it from a thread's arena, whose top
/// `malloc_trim` leaves resident).
unsafe fn fresh(size: usize) -> *mut u8 {
    let class = class_of(size);
    let block = map(block_layout(class));
    if block.is_null() {
        return block;
    }
    block.cast::<usize>().write(class);
    block.add(HEADER)
}

#[cfg(unix)]
unsafe fn map(layout: Layout) -> *mut u8 {
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    match libc::mmap(ptr::null_mut(), layout.size(), prot, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) {
        libc::MAP_FAILED => ptr::null_mut(),
        block => block.cast(),
    }
}

#[cfg(unix)]
unsafe fn unmap(block: *mut u8, layout: Layout) {
    libc::munmap(block.cast(), layout.size());
}

/// Grows a mapped block (moving it if need be); null if it cannot, the block then unmapped.
#[cfg(target_os = "linux")]
unsafe fn remap(block: *mut u8, old: Layout, new: Layout) -> *mut u8 {
    match libc::mremap(block.cast(), old.size(), new.size(), libc::MREMAP_MAYMOVE) {
        libc::MAP_FAILED => {
            unmap(block, old);
            ptr::null_mut()
        }
        grown => grown.cast(),
    }
}

#[cfg(not(target_os = "linux"))]
unsafe fn remap(block: *mut u8, old: Layout, _new: Layout) -> *mut u8 {
    unmap(block, old);
    ptr::null_mut()
}

#[cfg(not(unix))]
unsafe fn map(layout: Layout) -> *mut u8 {
    System.alloc_zeroed(layout)
}

#[cfg(not(unix))]
unsafe fn unmap(block: *mut u8, layout: Layout) {
    System.dealloc(block, layout)
}

/// Keeps a freed block if a scope is alive and the cache has room, else frees it. The scope
/// count is read under the cache's lock, under which the last scope's end empties the cache:
/// no block is kept once no scope is alive.
unsafe fn give_back(user: *mut u8) {
    let block = user.sub(HEADER);
    let class = class_at(user);
    let hook = GIVE_BACK_HOOK.load(Ordering::Acquire);
    if hook != 0 {
        // SAFETY: only `set_give_back_hook` stores here, and only `fn()` pointers.
        unsafe { std::mem::transmute::<usize, fn()>(hook)() };
    }
    let mut cache = lock();
    if SCOPES.load(Ordering::Acquire) > 0 && cache.bytes + class_bytes(class) <= CACHE_LIMIT {
        next_at(block).write(cache.heads[class]);
        cache.heads[class] = block;
        cache.bytes += class_bytes(class);
        return;
    }
    drop(cache);
    unmap(block, block_layout(class));
}

/// Frees the blocks of detached lists.
fn release(heads: [*mut u8; CLASSES]) {
    for (class, mut block) in heads.into_iter().enumerate() {
        while !block.is_null() {
            // SAFETY: as in `take`; the lists were detached above, so no one else sees them.
            let next = unsafe { next_at(block).read() };
            unsafe { unmap(block, block_layout(class)) };
            block = next;
        }
    }
}

/// Bytes held in freed blocks now.
pub fn cached_bytes() -> usize {
    lock().bytes
}

/// While one is alive, freed large blocks are kept for reuse; dropping the last frees them and
/// trims malloc's heap, so an idle process holds little more than the weights.
pub struct ReuseScope(());

impl ReuseScope {
    pub fn enter() -> ReuseScope {
        SCOPES.fetch_add(1, Ordering::AcqRel);
        ReuseScope(())
    }
}

impl Drop for ReuseScope {
    fn drop(&mut self) {
        let detached = {
            let mut cache = lock();
            (SCOPES.fetch_sub(1, Ordering::AcqRel) == 1).then(|| {
                cache.bytes = 0;
                std::mem::replace(&mut cache.heads, [ptr::null_mut(); CLASSES])
            })
        };
        if let Some(heads) = detached {
            release(heads);
            trim_malloc();
        }
    }
}

/// Hands malloc's free heap pages back to the system (glibc; elsewhere nothing).
pub(crate) fn trim_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks glibc's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

// SAFETY: small layouts go to System unchanged; large ones are mapped blocks with a header
// naming their class, which every path reads back to unmap them with the same length.
unsafe impl GlobalAlloc for ReusingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !is_large(layout) {
            return System.alloc(layout);
        }
        match take(layout.size()) {
            user if user.is_null() => fresh(layout.size()),
            user => user,
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !is_large(layout) {
            return System.alloc_zeroed(layout);
        }
        match take(layout.size()) {
            user if user.is_null() => fresh(layout.size()),
            user => {
                user.write_bytes(0, layout.size());
                user
            }
        }
    }

    unsafe fn dealloc(&self, user: *mut u8, layout: Layout) {
        if is_large(layout) {
            give_back(user)
        } else {
            System.dealloc(user, layout)
        }
    }

    unsafe fn realloc(&self, user: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (is_large(layout), is_large(new_layout)) {
            (false, false) => System.realloc(user, layout, new_size),
            (true, true) if (class_bytes(class_at(user)) / 2..=class_bytes(class_at(user))).contains(&new_size) => user,
            _ => {
                let moved = self.alloc(new_layout);
                if !moved.is_null() {
                    ptr::copy_nonoverlapping(user, moved, layout.size().min(new_size));
                    self.dealloc(user, layout);
                }
                moved
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_round_up_by_at_most_an_eighth_and_invert() {
        let mut last = 0;
        for size in
            [1 << 20, (1 << 20) + 1, 3 << 20, 5_000_000, 37 << 20, (1 << 30) - 1, 1 << 40, isize::MAX as usize / 2]
        {
            let class = class_of(size);
            let bytes = class_bytes(class);
            assert!(bytes >= size && bytes - size <= size / 8, "{size} -> {bytes}");
            assert!(class < CLASSES && class >= last);
            assert!(class == 0 || class_bytes(class - 1) < size, "{size}: a smaller class holds it");
            last = class;
        }
        assert!(!is_large(Layout::from_size_align((1 << 20) - 1, 4).unwrap()));
        assert!(!is_large(Layout::from_size_align(1 << 20, 64).unwrap()));
        assert!(is_large(Layout::from_size_align(1 << 20, 16).unwrap()));
        assert!(block_layout(class_of(isize::MAX as usize / 2)).size() < isize::MAX as usize);
    }
}
