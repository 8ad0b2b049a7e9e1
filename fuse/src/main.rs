//! `coro-fuse IMAGE MOUNTPOINT`: the command-line entry point.
//!
//! The export itself (block layer, mount, request loop) is being built; until it lands this
//! binary says so plainly instead of pretending to work.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("usage: coro-fuse [OPTIONS] IMAGE MOUNTPOINT");
        println!();
        println!("Exports a disk image through FUSE as one regular file.");
        println!("Status: the runtime is done; the export itself is not implemented yet.");
        return ExitCode::SUCCESS;
    }
    eprintln!("coro-fuse: the FUSE export is not implemented yet (see README.md, 'Status')");
    ExitCode::from(2)
}
