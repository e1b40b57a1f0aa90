//! `vxnet lab …`.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Run the seed walk-through end to end and print each step; exit 0 only if all held.
    Demo,
}

pub async fn run(cmd: LabCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LabCommand::Demo => {
            let ok = crate::lab::demo::run(std::env::current_exe()?).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
