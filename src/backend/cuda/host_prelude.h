// Compiles kernels.cu for the host so the tests run its exact text on the CPU: each CUDA thread of
// a block is an OS thread, blocks run one after another, `__shared__` variables are function
// statics (one block at a time uses them), `__syncthreads` is a barrier of the block, and a warp
// shuffle goes through a per-warp exchange guarded by a barrier of the warp. Only what
// kernels.cu uses is emulated; launches are one dimension in x, any number of blocks in y.
//
// Built by the tests with: g++ -std=c++20 -O1 -ffp-contract=off -shared -fPIC -include
// host_prelude.h -x c++ kernels.cu host_launchers.cpp.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

using std::cos;
using std::erf;
using std::hypot;
using std::sin;
using std::exp;
using std::fabs;
using std::fma;
using std::log;
using std::pow;
using std::sqrt;
using std::tanh;

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

inline std::barrier<>* nbit_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> nbit_warp_barriers;
inline unsigned long long nbit_exchange[1024];

inline void __syncthreads() { nbit_block_barrier->arrive_and_wait(); }

inline float __uint_as_float(unsigned b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned b;
    std::memcpy(&b, &f, 4);
    return b;
}

inline double __longlong_as_double(long long b) {
    double d;
    std::memcpy(&d, &b, 8);
    return d;
}
using std::fmax;

inline int atomicExch(int* p, int v) { return std::atomic_ref<int>(*p).exchange(v); }
inline double atomicAdd(double* p, double v) { return std::atomic_ref<double>(*p).fetch_add(v); }

template <class T>
T __shfl_down_sync(unsigned, T v, int delta) {
    static_assert(sizeof(T) <= sizeof(unsigned long long));
    unsigned t = threadIdx.x, lane = t % 32;
    std::barrier<>& warp = *nbit_warp_barriers[t / 32];
    std::memcpy(&nbit_exchange[t], &v, sizeof(T));
    warp.arrive_and_wait();
    T r = v;
    if (lane + delta < 32 && t + delta < blockDim.x) std::memcpy(&r, &nbit_exchange[t + delta], sizeof(T));
    warp.arrive_and_wait();
    return r;
}

inline std::mutex nbit_launch_lock;

// Runs `kernel()` as a grid of `grid` x `grid_y` blocks of `block` threads. One launch at a time in
// the process (the emulation's grid state is global, as a device's is per stream).
template <class F>
void nbit_launch(unsigned grid, unsigned grid_y, unsigned block, F kernel) {
    std::lock_guard<std::mutex> one_at_a_time(nbit_launch_lock);
    gridDim = dim3{grid, grid_y, 1};
    blockDim = dim3{block, 1, 1};
    for (unsigned by = 0; by < grid_y; ++by) {
        for (unsigned bx = 0; bx < grid; ++bx) {
            std::barrier<> sync(block);
            nbit_block_barrier = &sync;
            nbit_warp_barriers.clear();
            for (unsigned w = 0; w < (block + 31) / 32; ++w) {
                unsigned size = block - 32 * w < 32 ? block - 32 * w : 32;
                nbit_warp_barriers.push_back(std::make_unique<std::barrier<>>(size));
            }
            std::vector<std::thread> threads;
            for (unsigned tx = 0; tx < block; ++tx) {
                threads.emplace_back([=] {
                    threadIdx = dim3{tx, 0, 0};
                    blockIdx = dim3{bx, by, 0};
                    kernel();
                });
            }
            for (auto& t : threads) t.join();
        }
    }
}
