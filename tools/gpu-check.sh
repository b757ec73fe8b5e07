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
#      the GPU's own 32-true and the CPU's 32-true measured in the same run;
#   5. on a machine with two GPUs: data parallel under Ddp<Nccl> (the `ddp` example's check-nccl
#      mode) and Ddp<Mpi> (`nbit fit --strategy ddp`), each against one GPU accumulating 2 batches
#      (installs OpenMPI with apt-get and NCCL from pip).
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

echo "== two GPUs: data parallel, gradients summed by NCCL (Ddp<Nccl>) and through host memory (Ddp<Mpi>)"
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l)
if [ "$gpus" -lt 2 ]; then
    echo "skipped: this machine has $gpus GPU(s); Ddp<Nccl> needs two (NCCL refuses two ranks on one GPU)"
    exit 0
fi
# OpenMPI starts the ranks and hands them NCCL's id; NCCL itself from NVIDIA's pip package.
if ! command -v mpirun >/dev/null; then
    apt-get install -y -q libopenmpi-dev openmpi-bin libclang-dev >/dev/null
fi
python3 -m venv target/cuda-tools
target/cuda-tools/bin/pip install -q nvidia-nccl-cu12
NVIDIA="$(target/cuda-tools/bin/python -c 'import nvidia; print(list(nvidia.__path__)[0])')"
export LD_LIBRARY_PATH="$NVIDIA/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
cargo build -q --release --features cuda,mpi --example ddp --bin nbit
out=target/ddp-gpu-check
rm -rf "$out" && mkdir -p "$out/nccl" "$out/one"
# Each rank takes the GPU of its local rank (NBIT_CUDA_DEVICE unset): rank 0 GPU 0, rank 1 GPU 1.
mpirun -np 2 -x LD_LIBRARY_PATH target/release/examples/ddp check-nccl "$out/nccl"
target/release/examples/ddp check-nccl "$out/one" 2
cmp -s "$out/nccl/rank0.txt" "$out/nccl/rank1.txt" && echo "NCCL: the two ranks are identical at every step" \
    || echo "NCCL: THE RANKS DIFFER"
cmp -s "$out/nccl/rank0.txt" "$out/one/rank0.txt" \
    && echo "NCCL: 2 GPUs equal 1 GPU accumulating 2 batches, bit for bit" \
    || echo "NCCL: 2 GPUs differ from 1 GPU accumulating 2 (first differing line below)"
diff "$out/nccl/rank0.txt" "$out/one/rank0.txt" | head -2 | cut -c1-120 || true
mpirun -np 2 -x LD_LIBRARY_PATH target/release/nbit fit --data examples/data/digits.csv --accelerator gpu \
    --precision bf16-mixed --strategy ddp --batch-size 30 --epochs 2 --val-split 0.2 --json --no-progress \
    --save "$out/ddp.safetensors" | grep -E '"(strategy|world_size|final_loss|val_loss)"'
target/release/nbit fit --data examples/data/digits.csv --accelerator gpu --precision bf16-mixed \
    --accumulate-grad-batches 2 --batch-size 30 --epochs 2 --val-split 0.2 --json \
    --save "$out/one.safetensors" | grep -E '"(final_loss|val_loss)"'
cmp -s "$out/ddp.safetensors" "$out/one.safetensors" && echo "Ddp<Mpi> on GPUs: equal to one GPU accumulating 2, bit for bit" \
    || echo "Ddp<Mpi> on GPUs: DIFFERS from one GPU accumulating 2"
