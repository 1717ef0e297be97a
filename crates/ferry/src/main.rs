//! `ferry`: the command line. Thin: parse arguments, call a library, print (human or JSON),
//! exit 0 (ok / compatible), 1 (a "no" verdict) or 2 (error).

mod cpu;
mod demo;
mod engine;
mod migrate;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live-migrate running Linux processes between hosts whose CPUs differ",
    long_about = "Ferry moves running Linux processes between hosts whose CPUs differ.\n\n\
        Before anything moves, `ferry cpu` tells whether a process can run on a destination: \
        it profiles CPUs (CPUID, XCR0, xsave sizes), finds the CPU features the workload's code \
        really uses (instruction by instruction, following its execution paths) and gives a \
        verdict with evidence.\n\n\
        Exit codes: 0 ok or compatible, 1 incompatible or unknown, 2 error."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// CPU profiles, feature scans and compatibility verdicts.
    Cpu(cpu::CpuArgs),
    /// Checkpoint a running process into an image directory (killed afterwards by default).
    Dump(engine::DumpArgs),
    /// Rebuild a process from an image, with its saved PID.
    Restore(engine::RestoreArgs),
    /// Run the per-host agent that receives migrations (HTTP/JSON API + page stream).
    Agent(migrate::AgentArgs),
    /// Move a running process (and its descendants) to another host's agent.
    Migrate(migrate::MigrateArgs),
    /// Ferry's main job on one machine: two hosts and a client made of network namespaces,
    /// a service moved there and back with its address while the client keeps writing.
    Demo(demo::DemoArgs),
    /// The demo's built-in key-value service.
    #[command(hide = true)]
    DemoService(demo::ServiceArgs),
    /// Inspect images.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Processes, threads, mappings, fds and sizes of an image.
    Show(engine::ImageShowArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Ctrl-C (or SIGTERM, SIGHUP) during a dump, restore or migration stops it where the
    // process is left whole and running, instead of ending Ferry with it frozen or its copy
    // bound to die with Ferry.
    let installed = match cli.cmd {
        Cmd::Dump(_) | Cmd::Restore(_) | Cmd::Migrate(_) => ferry_sys::cancel::install(),
        // The agent drains instead: it finishes the migrations under way, then exits.
        Cmd::Agent(_) => ferry_sys::cancel::install_drain(),
        _ => Ok(()),
    };
    if let Err(e) = installed {
        eprintln!("ferry: warning: Ctrl-C will not stop safely: {e}");
    }
    let res = match cli.cmd {
        Cmd::Cpu(a) => cpu::run(a),
        Cmd::Dump(a) => engine::dump(a),
        Cmd::Restore(a) => engine::restore(a),
        Cmd::Agent(a) => migrate::agent(a),
        Cmd::Migrate(a) => migrate::migrate(a),
        Cmd::Demo(a) => demo::demo(a),
        Cmd::DemoService(a) => demo::service(a),
        Cmd::Image {
            cmd: ImageCmd::Show(a),
        } => engine::image_show(a),
    };
    // Blocks of TCP traffic lifted on the way finish their cleanup before Ferry exits.
    ferry_engine::netblock::finish_lifts();
    match res {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // One line; causes already quoted by their parent's message are not repeated.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg = format!("{msg}: {c}");
                }
            }
            let msg = msg.replace('\n', " ");
            eprintln!("ferry: error: {msg}");
            // Scripts that asked for JSON get the error as JSON too (clap has checked the
            // arguments, so a literal --json is the flag).
            if std::env::args().any(|a| a == "--json") {
                println!("{}", serde_json::json!({ "error": msg, "exit_code": 2 }));
            }
            ExitCode::from(2)
        }
    }
}
