//! The process's memory: jemalloc as the allocator, tuned to hold little memory it does not use,
//! and the one call that hands freed memory back to the system after a large piece of work
//! (a complete render, a `/metrics` scrape, a burst of changes).
//!
//! With 10,000 services a render or a scrape allocates and frees tens of megabytes. glibc's
//! allocator kept much of that resident even after `malloc_trim`: the long-lived allocations made
//! afterwards were scattered over the pages the peak had used (measured: 63.7 MB resident for
//! about 31 MB in use). jemalloc groups allocations by size class, so freed pages become whole
//! free pages again, which it returns to the system.

use std::ffi::{c_char, CStr};

#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main` (`_RJEM_MALLOC_CONF` in the environment still
/// overrides them):
/// - `narenas:1`: one arena for every thread. flow-proxy's work goes through one core task, so
///   more arenas only keep more memory apart;
/// - `tcache_max:4096`: the threads' caches keep small allocations only;
/// - `background_thread:true`, `dirty_decay_ms:200`, `muzzy_decay_ms:0`: pages freed and not
///   reused go back to the system from jemalloc's own thread within about 200 ms, without a
///   call. (Measured at 10,000 services: 0 ms, pages returned at once, kept idle RSS at 46 MB
///   but made each change's large strings fault their pages in again, +2 ms per new service;
///   1,000 ms left 48–52 MB a couple of seconds after a restore; 200 ms, 48 MB and no slower.)
const OPTIONS: &CStr =
    c"narenas:1,tcache_max:4096,background_thread:true,dirty_decay_ms:200,muzzy_decay_ms:0";

/// A C string pointer jemalloc reads once at its start; nothing writes it.
#[repr(transparent)]
pub struct MallocConf(*const c_char);

// SAFETY: the pointer is to a `'static` constant that nothing ever writes.
unsafe impl Sync for MallocConf {}

/// jemalloc looks this symbol up by name (the crate prefixes jemalloc's symbols with `_rjem_`).
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static MALLOC_CONF: MallocConf = MallocConf(OPTIONS.as_ptr());

/// Hands the pages freed since the last call back to the system now rather than within the
/// decay time: after a complete render, a scrape, or a quiet second, so that the resident memory
/// an idle proxy shows is what it uses.
pub fn release_freed_memory() {
    // `arena.<MALLCTL_ARENAS_ALL>.purge`: every arena's unused dirty pages.
    let name = c"arena.4096.purge";
    // SAFETY: the name is a NUL-terminated string; a purge reads and writes no value, so the
    // value pointers are null and their lengths zero, as jemalloc's `mallctl` requires.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The options above are the ones jemalloc runs with (a name it does not know, or a symbol
    /// the linker dropped, would leave it on its defaults without a word).
    #[test]
    fn jemalloc_runs_with_the_options_given() {
        let mut arenas: u32 = 0;
        let mut length = std::mem::size_of::<u32>();
        let name = c"opt.narenas";
        // SAFETY: `opt.narenas` is an unsigned int; the pointers are to a u32 and its size.
        let status = unsafe {
            tikv_jemalloc_sys::mallctl(
                name.as_ptr(),
                (&mut arenas as *mut u32).cast(),
                &mut length,
                std::ptr::null_mut(),
                0,
            )
        };
        assert_eq!(status, 0);
        assert_eq!(arenas, 1);
        release_freed_memory();
    }
}
