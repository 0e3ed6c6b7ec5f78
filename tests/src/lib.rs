//! Integration tests live in `integration/`; this library is empty. The `page-server-fixture`
//! binary is the real `page-server` program, built here so tests can run it as a separate
//! process (and kill it) without invoking cargo.
