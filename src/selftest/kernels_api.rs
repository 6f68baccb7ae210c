//! stub
use super::Ctx;
use anyhow::Result;

pub fn run(_ctx: &mut Ctx) -> Result<()> {
    Ok(())
}
