//! `vmm`: run, restore and control VMs. See `vmm --help`.

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
