//! vmm: boot our guest, snapshot, eager and lazy restore, bad state files.
