//! Every integration test, as one test binary: one link, and nbit's generic code (the trainer for
//! each precision, the kernels per dtype) compiled once rather than once per file. Each file here
//! is a module named as the file was; run one with `cargo test --test integration <module>::`.

mod common;

mod autocast;
mod backend_contract;
#[cfg(feature = "cli")]
mod cli;
mod complex;
#[cfg(feature = "cuda")]
mod cuda_kernels;
mod custom_model;
#[cfg(feature = "cli")]
mod ddp;
#[cfg(feature = "cuda")]
mod gpu_backend;
mod gradcheck;
#[cfg(feature = "lapack")]
mod linalg;
mod matrix;
mod numerics;
mod pytorch_reference;
mod tensor_ops;
mod trainer;
mod transformer;
mod ui;
mod update_rounding;
