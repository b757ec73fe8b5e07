//! Compile-time proofs of the support matrix (precision and strategy by device) and the precision
//! rules.
//!
//! `ui-tests/*/fail` holds one program per refused cell or rule, with the compiler's message in
//! the `.stderr` beside it; trybuild checks each fails with exactly that message. Regenerate them
//! with `TRYBUILD=overwrite cargo test --test integration ui::` and read the diff.
//!
//! `ui-tests/*/pass` holds the programs that must compile (every allowed cell, a user-defined
//! precision). They are compiled here as modules of this test and run below, rather than through
//! trybuild: with no passing case trybuild only type-checks (`cargo check`), so its second build of
//! nbit's dependencies skips code generation, which cut a fresh `cargo test` by about a minute.

// The snapshots are of a default build: with `cuda`, `Gpu` has kernels and the `Runs` note differs.
#[cfg(not(feature = "cuda"))]
#[test]
fn refused_cells_and_rules_fail_with_their_messages() {
    trybuild::TestCases::new().compile_fail("ui-tests/*/fail/*.rs");
}

#[path = "../ui-tests/matrix/pass/every_allowed_cell.rs"]
mod every_allowed_cell;
#[path = "../ui-tests/strategy/pass/every_allowed_strategy_cell.rs"]
mod every_allowed_strategy_cell;
#[path = "../ui-tests/precision/pass/users_can_define_a_precision.rs"]
mod users_can_define_a_precision;

#[test]
fn every_allowed_strategy_cell_compiles() {
    every_allowed_strategy_cell::main();
}

#[test]
fn every_allowed_cell_compiles_and_runs() {
    every_allowed_cell::main();
}

#[test]
fn a_user_defined_precision_compiles_and_runs() {
    users_can_define_a_precision::main();
}
