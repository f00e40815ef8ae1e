//! The `gradc` binary: parses the command line and runs it. Everything else
//! is in the library (`gradc::cli`). A panic is a compiler bug; it is
//! reported as an internal error with exit status 2, never 101.

use clap::Parser;

fn main() {
    let cli = gradc::cli::Cli::parse();
    let status = std::panic::catch_unwind(|| gradc::cli::run(cli));
    let code = match status {
        Ok(status) => status.code(),
        Err(_) => {
            eprintln!(
                "error: internal compiler error (a bug in gradc); please report it with the input file"
            );
            2
        }
    };
    std::process::exit(code);
}
