//! `vdevd`: serve virtual PCI devices over vfio-user. See `vdevd --help`.

use std::process::ExitCode;

use clap::Parser;
use vdevd::cli::{Cli, Plan};
use vdevd::ctl::{CtlCli, run_ctl};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "ctl") {
        let cli = CtlCli::parse_from(args.iter().skip(1));
        return match run_ctl(cli) {
            Ok(()) => ExitCode::SUCCESS,
            Err((errno, text)) => {
                eprintln!("vdevd ctl: {text} (errno {errno})");
                ExitCode::from(u8::try_from(errno).unwrap_or(1).max(1))
            }
        };
    }
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
