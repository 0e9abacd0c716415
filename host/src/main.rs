//! The `goutube` binary: parse the command line and hand over to [`cli`].

mod cli;

use std::process::ExitCode;

use clap::Parser;

/// The process's allocator: jemalloc, not glibc's malloc. glibc keeps small freed chunks in
/// per-arena lists and merges all of them at the next large allocation in that arena, on the
/// thread that asks: after a leader let go of a million-point follower session, that took an
/// authorizer call past its 100 ms deadline (`docs/operations.md`, "Memory").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| runtime.block_on(cli::execute(args)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {}", message(&error));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes, for people, each said once: no backtrace, and a cause whose text
/// the message already holds (an error that prints its source) is not repeated.
fn message(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}
