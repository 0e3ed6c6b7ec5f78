//! The `vmm` command line, built inside the tests package so integration tests can run it
//! (`CARGO_BIN_EXE_vmm-fixture`).

fn main() -> std::process::ExitCode {
    page_server::cli::exit_quietly_on_broken_pipe();
    vmm::cli::main()
}
