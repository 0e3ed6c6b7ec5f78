//! The `page-server` program, for tests that need it as a process of its own.

fn main() {
    page_server::cli::exit_quietly_on_broken_pipe();
    std::process::exit(page_server::cli::main());
}
