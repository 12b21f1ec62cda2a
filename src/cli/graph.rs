use crate::engine::Engine;
use crate::error::Result;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// Print Graphviz DOT instead of text.
    #[arg(long)]
    pub dot: bool,
}

pub fn run(a: Args, engine: &Engine) -> Result<()> {
    let plan = a.pipeline.compile(engine)?;
    let kind = |id: &str| {
        plan.pipeline
            .stage(id)
            .map_or("input", |s| s.kind.as_str())
            .to_string()
    };
    if a.dot {
        println!("digraph \"{}\" {{\n  rankdir=LR;", plan.pipeline.name);
        for id in &plan.order {
            let shape = if plan.is_input(id) { "cylinder" } else { "box" };
            println!(
                "  \"{id}\" [shape={shape}, label=\"{id}\\n({})\"];",
                kind(id)
            );
        }
        for id in &plan.order {
            for d in plan.deps.get(id).into_iter().flatten() {
                println!("  \"{d}\" -> \"{id}\";");
            }
        }
        println!("}}");
    } else {
        for id in &plan.order {
            match plan.deps.get(id) {
                Some(ds) => println!("{id} ({}) <- {}", kind(id), ds.join(", ")),
                None => println!("{id} (input)"),
            }
        }
    }
    Ok(())
}
