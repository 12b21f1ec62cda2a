use crate::engine::Engine;
use crate::error::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let plan = a.pipeline.compile(engine)?;
    let stages = plan.pipeline.stages.len();
    let inputs = plan.pipeline.inputs.len();
    println!(
        "{}: valid ({inputs} input{}, {stages} stage{})",
        a.pipeline.file.display(),
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
