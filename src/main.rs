use std::process::ExitCode;

use clap::Parser;

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
