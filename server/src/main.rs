//! `vdevd`: serve virtual PCI devices over vfio-user. See `vdevd --help`.

use std::process::ExitCode;

use clap::Parser;
use vdevd::cli::{Cli, Plan};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let plan = match Plan::from_cli(cli) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vdevd: {e}");
            return ExitCode::from(2);
        }
    };
    match vdevd::daemon::run(plan) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vdevd: {e}");
            ExitCode::FAILURE
        }
    }
}
