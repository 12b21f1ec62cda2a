use std::path::PathBuf;

use crate::engine::Engine;
use crate::error::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The pipeline file.
    pub file: PathBuf,
    /// Override a param: key=value (repeatable).
    #[arg(long = "set", value_parser = super::parse_kv)]
    pub set: Vec<(String, String)>,
    /// Apply a named param profile from the pipeline's `profiles:` (before any --set).
    #[arg(long)]
    pub profile: Option<String>,
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let plan = super::compile_file(&a.file, &super::with_profile(&a.set, &a.profile), engine)?;
    let stages = plan.pipeline.stages.len();
    let inputs = plan.pipeline.inputs.len();
    println!(
        "{}: valid ({inputs} input{}, {stages} stage{})",
        a.file.display(),
        if inputs == 1 { "" } else { "s" },
        if stages == 1 { "" } else { "s" }
    );
    for id in &plan.order {
        let cols: Vec<String> = plan.schemas[id]
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        println!("  {id}: {}", cols.join(", "));
    }
    Ok(())
}
