//! With the `lapack` feature, check for the system OpenBLAS before anything tries to link it, so a
//! missing library is one clear message instead of a linker error.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_LAPACK").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=LIBRARY_PATH");
    let mut dirs: Vec<std::path::PathBuf> = std::env::var_os("LIBRARY_PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for d in [
        "/usr/lib",
        "/usr/lib64",
        "/usr/local/lib",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/opt/homebrew/opt/openblas/lib",
        "/usr/local/opt/openblas/lib",
    ] {
        dirs.push(d.into());
    }
    let found = dirs.iter().any(|d| {
        ["libopenblas.so", "libopenblas.a", "libopenblas.dylib"]
            .iter()
            .any(|f| d.join(f).exists())
    });
    if !found {
        panic!(
            "\n\nnbit's `lapack` feature needs the system OpenBLAS (with LAPACK), which was not found.\n\
             Install it: `apt-get install libopenblas-dev` (Debian/Ubuntu), `dnf install openblas-devel` \
             (Fedora), `brew install openblas` (macOS); or set LIBRARY_PATH to the folder holding \
             libopenblas. Builds without `--features lapack` need no system library.\n\n"
        );
    }
}
