#!/usr/bin/env bash
# The GPU checks of the CUDA backend, for a machine with an NVIDIA GPU (CI has none and runs the
# same backend on the host emulation of its kernels instead). In one run, under eight minutes on
# an H100/H200 class GPU with 16 cores:
#   1. builds with `--features cuda`;
#   2. runs the GPU test suite on the device (NBIT_TEST_GPU=cuda): every op against the CPU
#      backend within per-dtype tolerances, optimizer steps, a seeded 16-mixed training run against
#      the CPU's fp16-AMP test precision, injected overflow steps skipped exactly as on the CPU,
#      every precision of the GPU column against the CPU, a device failure returned as an Err;
#   3. prints GEMM TFLOP/s per dtype at n = 4096 and 8192 (f32 without, then with, TF32);
#   4. prints samples/s per precision for the big MLP of benches/bench_mlp.rs, with the ratio to
#      the GPU's own 32-true and the CPU's 32-true measured in the same run.
#
# Needs the NVIDIA driver. NVRTC and cuBLAS come from the CUDA toolkit when the loader finds them,
# else from NVIDIA's pip packages, installed here into target/cuda-tools.
#
# Usage: tools/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi not found"
grep -m1 'model name' /proc/cpuinfo || true

if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc.so.12' || ! ldconfig -p 2>/dev/null | grep -q 'libcublas.so.12'; then
    echo "== NVRTC and cuBLAS from pip (target/cuda-tools)"
    python3 -m venv target/cuda-tools
    # CUDA 12 libraries run on every driver of CUDA 12.0 or newer, 13.x included (no cu13 pin:
    # cudarc 0.19 loads the .so.12 names). nbit loads its kernels as cubins, which any such driver
    # takes, so NVRTC may be newer than the driver.
    cuda="$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\)\.[0-9]*.*/\1/p' | head -1)"
    if [ -n "$cuda" ] && [ "$cuda" -lt 12 ]; then
        echo "the driver reports CUDA $cuda; nbit needs a driver of CUDA 12.0 or newer" >&2
        exit 1
    fi
    target/cuda-tools/bin/pip install -q nvidia-cuda-nvrtc-cu12 nvidia-cublas-cu12
    NVIDIA="$(target/cuda-tools/bin/python -c 'import nvidia; print(list(nvidia.__path__)[0])')"
    export LD_LIBRARY_PATH="$NVIDIA/cuda_nvrtc/lib:$NVIDIA/cublas/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

echo "== build (release, --features cuda)"
cargo build -q --release --features cuda --benches --tests --example quickstart

echo "== the GPU test suite on the device"
NBIT_TEST_GPU=cuda cargo test -q --release --features cuda --test integration -- gpu_backend::

echo "== GEMM"
cargo bench -q --features cuda --bench gpu
echo "-- f32 again with NBIT_TF32=1 (TF32 tensor cores; the other columns are unchanged)"
NBIT_TF32=1 cargo bench -q --features cuda --bench gpu | tail -2

echo "== MLP 784-1024-1024-10, batch 1024, SGD with momentum: samples/s per precision"
mlp() { # precision accelerator samples
    cargo bench -q --features cuda --bench bench_mlp -- --precision "$1" --accelerator "$2" \
        --batch-size 1024 --samples "$3" --epochs 3 | sed -n 's/^samples_per_sec=//p'
}
cpu=$(mlp 32-true cpu 16384)
gpu32=$(mlp 32-true gpu 131072)
printf '| precision | device | samples/s | vs GPU 32-true | vs CPU 32-true |\n|---|---|---|---|---|\n'
printf '| 32-true | cpu | %.0f | | 1.00 |\n' "$cpu"
for p in 16-mixed bf16-mixed 16-true bf16-true 32-true 64-true; do
    if [ "$p" = 32-true ]; then s=$gpu32; else s=$(mlp "$p" gpu 131072); fi
    awk -v p="$p" -v s="$s" -v g="$gpu32" -v c="$cpu" \
        'BEGIN { printf "| %s | gpu | %.0f | %.2f | %.1f |\n", p, s, s / g, s / c }'
done

echo "== quickstart (its last row is 16-mixed on the GPU)"
cargo run -q --release --features cuda --example quickstart | tail -6
