//! Builds the guest kernel (kernel/main.rs + boot.s) into a freestanding,
//! statically linked ELF with the installed toolchain: the host target, no
//! std, panic=abort, our linker script.  No extra rustup target is needed.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let elf = out.join("guest.elf");
    let ld = dir.join("kernel/link.ld");
    for f in [
        "kernel/main.rs",
        "kernel/virtio.rs",
        "kernel/blk.rs",
        "kernel/net.rs",
        "kernel/params.rs",
        "kernel/serial.rs",
        "kernel/simd.rs",
        "kernel/time.rs",
        "kernel/boot.s",
        "kernel/link.ld",
        "src/shared.rs",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    let status = Command::new(&rustc)
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "guest_kernel",
        ])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "opt-level=2",
            "-C",
            "relocation-model=static",
        ])
        .args([
            "-C",
            "target-cpu=x86-64",
            "-C",
            "debuginfo=0",
            "-C",
            "codegen-units=1",
        ])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-static",
            "-C",
            "link-arg=-no-pie",
        ])
        .args([
            "-C",
            "link-arg=-Wl,--build-id=none",
            "-C",
            "link-arg=-Wl,-n",
        ])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", ld.display()))
        .arg(dir.join("kernel/main.rs"))
        .arg("-o")
        .arg(&elf)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .expect("run rustc for the guest kernel");
    assert!(status.success(), "building the guest kernel failed");
}
