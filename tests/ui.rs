//! Compile-time proofs of the support matrix and the precision rules (trybuild).
//!
//! `ui-tests/*/pass` holds one program per allowed cell; `ui-tests/*/fail` one per refused cell or
//! rule, with the compiler's message in the `.stderr` beside it. Regenerate those with
//! `TRYBUILD=overwrite cargo test --test ui` and read the diff.

#[test]
fn ui() {
    let t = trybuild::TestCases::new();
    t.pass("ui-tests/*/pass/*.rs");
    t.compile_fail("ui-tests/*/fail/*.rs");
}
