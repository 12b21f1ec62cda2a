use std::path::PathBuf;

use crate::error::Result;
use crate::llm_client::cache;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
    /// The cache file (default: $IFLOOM_CACHE, else ~/.cache/ifloom/llm-cache.sqlite).
    #[arg(long, global = true)]
    pub cache: Option<PathBuf>,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Responses stored, their size, and the models they came from.
    Stats {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete responses older than N days (0: all) and compact the file.
    Gc {
        #[arg(long, default_value_t = 30)]
        older_than_days: u64,
    },
}

pub fn run(a: Args) -> Result<()> {
    let path = a.cache.unwrap_or_else(cache::default_path);
    match a.action {
        Action::Stats { json } => {
            let s = cache::stats(&path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("cache: {}", s.path);
                println!("responses: {}", s.responses);
                println!(
                    "compressed bodies: {} bytes; file: {} bytes",
                    s.compressed_bytes, s.file_bytes
                );
                for (m, n) in s.models {
                    println!("  {m}: {n}");
                }
            }
        }
        Action::Gc { older_than_days } => {
            let n = cache::gc(&path, older_than_days)?;
            println!("removed {n} responses from {}", path.display());
        }
    }
    Ok(())
}
