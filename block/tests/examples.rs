//! The block layer's teaching example (`block/examples/07_toy_server.rs`; 01–06 are in
//! `runtime/examples/`) prints what its module doc promises. See
//! `runtime/tests/support/examples.rs` for how.

use std::path::Path;

#[path = "../../runtime/tests/support/examples.rs"]
mod support;

#[test]
fn the_toy_server_prints_its_expected_output() {
    support::check(Path::new(env!("CARGO_MANIFEST_DIR")), "07_toy_server");
}
