//! `cargo bench`: GEMM GFLOP/s per dtype at n = 256..2048 against ndarray's own f32 `.dot()` in
//! the same run, and the micro-kernel each dtype uses. The same table as
//! `cargo run --release --example gemm_table`, whose code this runs (a plain program rather than
//! criterion: one table of ratios is what the figures are reported as, and criterion's
//! dependencies cost every fresh `cargo test` more build time than they gave).

#[path = "../examples/gemm_table.rs"]
mod table;

fn main() {
    table::main();
}
