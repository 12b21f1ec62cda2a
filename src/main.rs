use std::process::ExitCode;

use clap::Parser;

/// mimalloc instead of glibc's malloc: a sending run allocates and frees small buffers on
/// many threads (HTTP, JSON, Arrow), and glibc's arenas spent ~20% of its CPU in
/// malloc/free/consolidate (perf, 100k requests).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
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
