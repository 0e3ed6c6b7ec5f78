//! Workspace integration tests: one binary, one module per area. Tests that need userfaultfd
//! check for it at run time and print `SKIPPED: <test>: <reason>` where it is missing.

mod common;
mod devices;
mod hostile;
mod hybrid;
mod linux_boot;
mod load;
mod migration;
mod netns;
mod paging;
mod precopy;
mod recovery;
mod security;
mod server_robustness;
mod snapshot;
mod vm;
