//! The `page-server` program, for tests that need it as a process of its own.

fn main() {
    std::process::exit(page_server::cli::main());
}
