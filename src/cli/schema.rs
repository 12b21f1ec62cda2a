use crate::error::Result;

pub fn run() -> Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&crate::spec::json_schema())?
    );
    Ok(())
}
