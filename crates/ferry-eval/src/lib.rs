//! Evaluation of CPU compatibility verdicts against qemu CPU models.

use clap::Args;

#[derive(Args, Debug)]
pub struct EvalArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn run(_a: EvalArgs) -> anyhow::Result<u8> {
    anyhow::bail!("not yet")
}
