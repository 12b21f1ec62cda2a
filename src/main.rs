use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a sending run allocates and frees small buffers on
/// many threads (HTTP, JSON, Arrow), and glibc's arenas spent ~20% of its CPU in
/// malloc/free/consolidate (perf, 100k requests).
///
/// Built with libmimalloc-sys's `no_thp` feature: by default mimalloc `madvise`s its arenas
/// for transparent huge pages, and every first touch of a fresh (or purged) 2 MiB region made
/// the kernel zero all of it: `clear_page_erms` under `do_huge_pmd_anonymous_page` was 17.5%
/// of a zero-latency 20k-request run's CPU (perf), for memory the stage mostly never used.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (`mimalloc.h`: between `eager_commit_delay` = 14 and
/// `use_numa_nodes` = 16, which libmimalloc-sys names; it does not name this one).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // Return freed memory to the OS after 1 s instead of 10 ms: a stage frees and reallocates
    // chunk-sized buffers all the time, and with the default the kernel zeroed fresh pages for
    // ~18% of a cached rerun's CPU (perf; 0.83-1.33 s -> 0.65-0.70 s sys over 100k rows).
    // `MIMALLOC_PURGE_DELAY` in the environment still wins (mimalloc reads it itself).
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options lazily and allows this
        // anytime.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1000) };
    }
    let cli = ifloom::cli::Cli::parse();
    match ifloom::cli::main(cli) {
        Ok(code) => code,
        Err(e) => {
            let e = anyhow::Error::from(e);
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
