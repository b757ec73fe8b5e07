// nbit's CUDA kernels: one source, compiled at run time by NVRTC for the device, and compiled for
// the host by the tests (with host_prelude.h, which emulates a launch) so that this exact text is
// what the host tests check against the CPU backend.
//
// No CUDA headers: 16-bit floats are stored as their bits (unsigned short) and converted with bit
// operations, so the driver and NVRTC are all a user needs. Every kernel keeps the CPU backend's
// numerics (src/backend/mod.rs): element-wise ops widen to the compute type (f32 for f16, bf16
// and f32; f64 for f64), compute, and round once; reductions accumulate in f64; conversions round
// to nearest even, and f64 to a 16-bit type rounds once (through f32 rounded to odd).
//
// Kernels are `extern "C"` and named `<op>_<dtype>`; dtypes are f16, bf16, f32, f64.

typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef long long i64;

// ---- conversions ---------------------------------------------------------------------------

__device__ __forceinline__ float nbit_bits_f32(u32 b) { return __uint_as_float(b); }
__device__ __forceinline__ u32 nbit_f32_bits(float f) { return __float_as_uint(f); }

// f32 -> bf16, round to nearest even; NaN stays a quiet NaN with its sign and top payload.
__device__ __forceinline__ u16 nbit_f32_to_bf16(float f) {
    u32 x = nbit_f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (u16)((x >> 16) | 0x0040u);
    x += 0x7fffu + ((x >> 16) & 1u);
    return (u16)(x >> 16);
}

__device__ __forceinline__ float nbit_bf16_to_f32(u16 h) { return nbit_bits_f32(((u32)h) << 16); }

// f32 -> f16, round to nearest even (overflow to infinity, underflow through subnormals to zero).
__device__ __forceinline__ u16 nbit_f32_to_f16(float f) {
    u32 x = nbit_f32_bits(f);
    u32 sign = x & 0x80000000u, exp = x & 0x7f800000u, man = x & 0x007fffffu;
    u32 hsign = sign >> 16;
    if (exp == 0x7f800000u) {
        u32 nan_bit = man == 0 ? 0u : 0x0200u;
        return (u16)(hsign | 0x7c00u | nan_bit | (man >> 13));
    }
    int half_exp = (int)(exp >> 23) - 127 + 15;
    if (half_exp >= 0x1f) return (u16)(hsign | 0x7c00u);
    if (half_exp <= 0) {
        if (14 - half_exp > 24) return (u16)hsign;
        man |= 0x00800000u;
        u32 half_man = man >> (14 - half_exp);
        u32 round_bit = 1u << (13 - half_exp);
        if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) half_man += 1;
        return (u16)(hsign | half_man);
    }
    u32 out = hsign | ((u32)half_exp << 10) | (man >> 13);
    u32 round_bit = 0x00001000u;
    if ((man & round_bit) != 0 && (man & (3u * round_bit - 1u)) != 0) out += 1;
    return (u16)out;
}

__device__ __forceinline__ float nbit_f16_to_f32(u16 h) {
    u32 sign = ((u32)h & 0x8000u) << 16, exp = (u32)h & 0x7c00u, man = (u32)h & 0x03ffu;
    if (exp == 0x7c00u) return nbit_bits_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        // Subnormal (or zero): man * 2^-24, exact in f32.
        float v = (float)man * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return nbit_bits_f32(sign | ((exp >> 10) + 112u) << 23 | (man << 13));
}

// f64 -> f32 rounded to odd: exact when representable, else the neighbour toward zero with its last
// bit set. Rounding that to a 16-bit type to nearest even equals rounding the f64 once.
__device__ __forceinline__ float nbit_f64_to_f32_odd(double d) {
    float f = (float)d;
    double back = (double)f;
    if (back == d || d != d) return f;
    u32 b = nbit_f32_bits(f);
    if (fabs(back) > fabs(d)) b -= 1u;
    return nbit_bits_f32(b | 1u);
}

// Loads widen to the compute type; stores round from it (and from f64, once).
#define NBIT_DTYPE_f32 float
#define NBIT_DTYPE_f64 double
#define NBIT_DTYPE_f16 u16
#define NBIT_DTYPE_bf16 u16

__device__ __forceinline__ float nbit_load_f32(const float* p, i64 i) { return p[i]; }
__device__ __forceinline__ double nbit_load_f64(const double* p, i64 i) { return p[i]; }
__device__ __forceinline__ float nbit_load_f16(const u16* p, i64 i) { return nbit_f16_to_f32(p[i]); }
__device__ __forceinline__ float nbit_load_bf16(const u16* p, i64 i) { return nbit_bf16_to_f32(p[i]); }

__device__ __forceinline__ void nbit_store_f32(float* p, i64 i, float v) { p[i] = v; }
__device__ __forceinline__ void nbit_store_f64(double* p, i64 i, double v) { p[i] = v; }
__device__ __forceinline__ void nbit_store_f16(u16* p, i64 i, float v) { p[i] = nbit_f32_to_f16(v); }
__device__ __forceinline__ void nbit_store_bf16(u16* p, i64 i, float v) { p[i] = nbit_f32_to_bf16(v); }

__device__ __forceinline__ void nbit_store64_f32(float* p, i64 i, double v) { p[i] = (float)v; }
__device__ __forceinline__ void nbit_store64_f64(double* p, i64 i, double v) { p[i] = v; }
__device__ __forceinline__ void nbit_store64_f16(u16* p, i64 i, double v) {
    p[i] = nbit_f32_to_f16(nbit_f64_to_f32_odd(v));
}
__device__ __forceinline__ void nbit_store64_bf16(u16* p, i64 i, double v) {
    p[i] = nbit_f32_to_bf16(nbit_f64_to_f32_odd(v));
}

// ---- element-wise --------------------------------------------------------------------------

// Op codes of `backend::Unary`, in its order.
#define NBIT_NEG 0
#define NBIT_ADD_SCALAR 1
#define NBIT_MUL_SCALAR 2
#define NBIT_POWF 3
#define NBIT_RELU 4
#define NBIT_GELU 5
#define NBIT_GELU_TANH 6
#define NBIT_TANH 7
#define NBIT_SIGMOID 8
#define NBIT_EXP 9
#define NBIT_LOG 10
#define NBIT_ABS 11
#define NBIT_HUBER 12
#define NBIT_SQRT 13
#define NBIT_CLAMP 14

__device__ __forceinline__ float nbit_unary_f(int op, float x, float a, float b) {
    switch (op) {
    case NBIT_NEG: return -x;
    case NBIT_ADD_SCALAR: return x + a;
    case NBIT_MUL_SCALAR: return x * a;
    case NBIT_POWF: return powf(x, a);
    case NBIT_RELU: return x < 0.0f ? 0.0f : x;
    case NBIT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    case NBIT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
    case NBIT_TANH: return tanhf(x);
    case NBIT_SIGMOID: return 1.0f / (1.0f + expf(-x));
    case NBIT_EXP: return expf(x);
    case NBIT_LOG: return logf(x);
    case NBIT_ABS: return fabsf(x);
    case NBIT_HUBER: return fabsf(x) <= a ? 0.5f * x * x : a * (fabsf(x) - 0.5f * a);
    case NBIT_SQRT: return sqrtf(x);
    case NBIT_CLAMP: return x < a ? a : (x > b ? b : x);
    }
    return x;
}

__device__ __forceinline__ double nbit_unary_d(int op, double x, double a, double b) {
    switch (op) {
    case NBIT_NEG: return -x;
    case NBIT_ADD_SCALAR: return x + a;
    case NBIT_MUL_SCALAR: return x * a;
    case NBIT_POWF: return pow(x, a);
    case NBIT_RELU: return x < 0.0 ? 0.0 : x;
    case NBIT_GELU: return 0.5 * x * (1.0 + erf(x * 0.70710678118654752));
    case NBIT_GELU_TANH: return 0.5 * x * (1.0 + tanh(0.79788456080286536 * (x + 0.044715 * x * x * x)));
    case NBIT_TANH: return tanh(x);
    case NBIT_SIGMOID: return 1.0 / (1.0 + exp(-x));
    case NBIT_EXP: return exp(x);
    case NBIT_LOG: return log(x);
    case NBIT_ABS: return fabs(x);
    case NBIT_HUBER: return fabs(x) <= a ? 0.5 * x * x : a * (fabs(x) - 0.5 * a);
    case NBIT_SQRT: return sqrt(x);
    case NBIT_CLAMP: return x < a ? a : (x > b ? b : x);
    }
    return x;
}

// The math functions by precision, so one gradient table serves f32 and f64.
#define f_pow powf
#define f_erf erff
#define f_exp expf
#define f_tanh tanhf
#define d_pow pow
#define d_erf erf
#define d_exp exp
#define d_tanh tanh

// dy * op'(x), from the forward input x and output y (`Backend::unary_backward`).
#define NBIT_UNARY_GRAD(NAME, T, C)                                                               \
    __device__ __forceinline__ T NAME(int op, T x, T y, T g, T a, T b) {                          \
        switch (op) {                                                                             \
        case NBIT_NEG: return -g;                                                                 \
        case NBIT_ADD_SCALAR: return g;                                                           \
        case NBIT_MUL_SCALAR: return g * a;                                                       \
        case NBIT_POWF: return g * a * C##pow(x, b); /* b = p - 1, formed in f64 */               \
        case NBIT_RELU: return x <= (T)0 ? (T)0 : g;                                              \
        case NBIT_GELU: {                                                                         \
            T cdf = (T)0.5 * ((T)1 + C##erf(x * (T)0.70710678118654752));                         \
            T pdf = C##exp((T)-0.5 * x * x) * (T)0.39894228040143268;                             \
            return g * (cdf + x * pdf);                                                           \
        }                                                                                         \
        case NBIT_GELU_TANH: {                                                                    \
            T k = (T)0.79788456080286536, c = (T)0.044715;                                        \
            T t = C##tanh(k * (x + c * x * x * x));                                               \
            T inner = k * ((T)1 + (T)3 * c * x * x);                                              \
            return g * ((T)0.5 * ((T)1 + t) + (T)0.5 * x * ((T)1 - t * t) * inner);              \
        }                                                                                         \
        case NBIT_TANH: return g * ((T)1 - y * y);                                                \
        case NBIT_SIGMOID: return g * y * ((T)1 - y);                                             \
        case NBIT_EXP: return g * y;                                                              \
        case NBIT_LOG: return g / x;                                                              \
        case NBIT_ABS: return x > (T)0 ? g : (x < (T)0 ? -g : (T)0);                              \
        case NBIT_HUBER: return g * (x < -a ? -a : (x > a ? a : x));                              \
        case NBIT_SQRT: return g / ((T)2 * y);                                                    \
        case NBIT_CLAMP: return x >= a && x <= b ? g : (T)0;                                      \
        }                                                                                         \
        return g;                                                                                 \
    }
NBIT_UNARY_GRAD(nbit_unary_grad_f, float, f_)
NBIT_UNARY_GRAD(nbit_unary_grad_d, double, d_)

#define NBIT_GRID_STRIDE(i, n) \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (i64)gridDim.x * blockDim.x)

// out[i] = op(x[i]); the scalars are given in f64 and used in the compute type.
#define NBIT_UNARY(S, FN, ACC)                                                                    \
    extern "C" __global__ void unary_##S(const NBIT_DTYPE_##S* x, NBIT_DTYPE_##S* out, i64 n, int op, \
                                          double a, double b) {                                    \
        NBIT_GRID_STRIDE(i, n) { nbit_store_##S(out, i, FN(op, nbit_load_##S(x, i), (ACC)a, (ACC)b)); } \
    }
NBIT_UNARY(f16, nbit_unary_f, float)
NBIT_UNARY(bf16, nbit_unary_f, float)
NBIT_UNARY(f32, nbit_unary_f, float)
NBIT_UNARY(f64, nbit_unary_d, double)

// out[i] = dy[i] * op'(x[i]) given the forward output y, in the compute type, rounded once.
#define NBIT_UNARY_BACKWARD(S, FN, ACC)                                                           \
    extern "C" __global__ void unary_backward_##S(const NBIT_DTYPE_##S* x, const NBIT_DTYPE_##S* y, \
                                                   const NBIT_DTYPE_##S* dy, NBIT_DTYPE_##S* out, i64 n, \
                                                   int op, double a, double b) {                  \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            nbit_store_##S(out, i, FN(op, nbit_load_##S(x, i), nbit_load_##S(y, i), nbit_load_##S(dy, i), \
                                      (ACC)a, (ACC)(op == NBIT_POWF ? a - 1.0 : b)));             \
        }                                                                                         \
    }
NBIT_UNARY_BACKWARD(f16, nbit_unary_grad_f, float)
NBIT_UNARY_BACKWARD(bf16, nbit_unary_grad_f, float)
NBIT_UNARY_BACKWARD(f32, nbit_unary_grad_f, float)
NBIT_UNARY_BACKWARD(f64, nbit_unary_grad_d, double)

// Broadcasting: the output's shape and each input's element strides (0 along a broadcast axis).
#define NBIT_MAX_DIMS 8
struct NbitBroadcast {
    int ndim;
    i64 shape[NBIT_MAX_DIMS];
    i64 stride_a[NBIT_MAX_DIMS];
    i64 stride_b[NBIT_MAX_DIMS];
};

// Op codes of `backend::Binary`, in its order.
#define NBIT_ADD 0
#define NBIT_SUB 1
#define NBIT_MUL 2
#define NBIT_DIV 3

// The offsets into a and b of element i of g's shape (row-major).
__device__ __forceinline__ void nbit_offsets(const NbitBroadcast& g, i64 i, i64* ia, i64* ib) {
    i64 rest = i, oa = 0, ob = 0;
    for (int d = g.ndim - 1; d >= 0; --d) {
        i64 c = rest % g.shape[d];
        rest /= g.shape[d];
        oa += c * g.stride_a[d];
        ob += c * g.stride_b[d];
    }
    *ia = oa;
    *ib = ob;
}

#define NBIT_BINARY(S, ACC)                                                                       \
    extern "C" __global__ void binary_##S(const NBIT_DTYPE_##S* a, const NBIT_DTYPE_##S* b,       \
                                           NBIT_DTYPE_##S* out, i64 n, int op, NbitBroadcast g) { \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            i64 ia, ib;                                                                           \
            nbit_offsets(g, i, &ia, &ib);                                                         \
            ACC x = nbit_load_##S(a, ia), y = nbit_load_##S(b, ib);                               \
            ACC r = op == NBIT_ADD ? x + y : op == NBIT_SUB ? x - y : op == NBIT_MUL ? x * y : x / y; \
            nbit_store_##S(out, i, r);                                                            \
        }                                                                                         \
    }
NBIT_BINARY(f16, float)
NBIT_BINARY(bf16, float)
NBIT_BINARY(f32, float)
NBIT_BINARY(f64, double)

// Casts: through f32 when both types compute in f32 (exact widening, one rounding), through f64
// when either side is f64.
#define NBIT_CAST32(A, B)                                                                         \
    extern "C" __global__ void cast_##A##_##B(const NBIT_DTYPE_##A* x, NBIT_DTYPE_##B* out, i64 n) { \
        NBIT_GRID_STRIDE(i, n) { nbit_store_##B(out, i, nbit_load_##A(x, i)); }                   \
    }
#define NBIT_CAST64(A, B)                                                                         \
    extern "C" __global__ void cast_##A##_##B(const NBIT_DTYPE_##A* x, NBIT_DTYPE_##B* out, i64 n) { \
        NBIT_GRID_STRIDE(i, n) { nbit_store64_##B(out, i, (double)nbit_load_##A(x, i)); }         \
    }
NBIT_CAST32(f16, bf16)
NBIT_CAST32(f16, f32)
NBIT_CAST32(bf16, f16)
NBIT_CAST32(bf16, f32)
NBIT_CAST32(f32, f16)
NBIT_CAST32(f32, bf16)
NBIT_CAST64(f16, f64)
NBIT_CAST64(bf16, f64)
NBIT_CAST64(f32, f64)
NBIT_CAST64(f64, f16)
NBIT_CAST64(f64, bf16)
NBIT_CAST64(f64, f32)

// ---- reductions ------------------------------------------------------------------------------

// The block's sum (or, when `max`, maximum, ignoring NaN as fmax does) of one f64 per thread,
// returned to every thread: warp shuffles, then one value per warp through shared memory.
// blockDim.x must be a multiple of 32 (at most 1024), and every thread of the block must call it.
__device__ double nbit_block_all(double v, int max) {
    __shared__ double warp_vals[32];
    __shared__ double total;
    for (int off = 16; off > 0; off >>= 1) {
        double o = __shfl_down_sync(0xffffffffu, v, off);
        v = max ? fmax(v, o) : v + o;
    }
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_vals[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int warps = (blockDim.x + 31) / 32;
        double neutral = max ? -__longlong_as_double(0x7ff0000000000000ll) : 0.0;
        v = threadIdx.x < (unsigned)warps ? warp_vals[threadIdx.x] : neutral;
        for (int off = 16; off > 0; off >>= 1) {
            double o = __shfl_down_sync(0xffffffffu, v, off);
            v = max ? fmax(v, o) : v + o;
        }
        if (lane == 0) total = v;
    }
    __syncthreads();
    v = total;
    __syncthreads();
    return v;
}

// Pass one of a full sum (of squares when `square`): each block's f64 sum of its grid-stride share,
// in partials[blockIdx.x].
#define NBIT_SUM(S)                                                                               \
    extern "C" __global__ void sum_partial_##S(const NBIT_DTYPE_##S* x, i64 n, int square,        \
                                               double* partials) {                                \
        double acc = 0.0;                                                                         \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            double v = (double)nbit_load_##S(x, i);                                               \
            acc += square ? v * v : v;                                                            \
        }                                                                                         \
        double total = nbit_block_all(acc, 0);                                                    \
        if (threadIdx.x == 0) partials[blockIdx.x] = total;                                       \
    }                                                                                             \
    /* Pass two, one block: out[0] = scale * the sum of the partials, rounded once. */            \
    extern "C" __global__ void sum_finish_##S(const double* partials, i64 count, NBIT_DTYPE_##S* out, \
                                              double scale) {                                     \
        double acc = 0.0;                                                                         \
        for (i64 i = threadIdx.x; i < count; i += blockDim.x) acc += partials[i];                 \
        double total = nbit_block_all(acc, 0);                                                    \
        if (threadIdx.x == 0) nbit_store64_##S(out, 0, total * scale);                            \
    }
NBIT_SUM(f16)
NBIT_SUM(bf16)
NBIT_SUM(f32)
NBIT_SUM(f64)

// A value rounded to the element type and widened back, as `E::from_f64(v).as_f64()`.
__device__ __forceinline__ double nbit_round_f32(double v) { return (double)(float)v; }
__device__ __forceinline__ double nbit_round_f64(double v) { return v; }
__device__ __forceinline__ double nbit_round_f16(double v) {
    return (double)nbit_f16_to_f32(nbit_f32_to_f16(nbit_f64_to_f32_odd(v)));
}
__device__ __forceinline__ double nbit_round_bf16(double v) {
    return (double)nbit_bf16_to_f32(nbit_f32_to_bf16(nbit_f64_to_f32_odd(v)));
}

// Softmax (log-softmax when `log_`) over rows of `cols`, one block per row (grid-stride over rows):
// max-subtracted, the denominator in f64; log-softmax keeps the sum and its log in the element type
// before the subtraction, as PyTorch's CPU kernel and nbit's CPU backend do.
#define NBIT_SOFTMAX(S)                                                                           \
    extern "C" __global__ void softmax_##S(const NBIT_DTYPE_##S* x, NBIT_DTYPE_##S* out, i64 rows, \
                                           i64 cols, int log_) {                                  \
        for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {                                      \
            const NBIT_DTYPE_##S* xr = x + r * cols;                                              \
            double m = -__longlong_as_double(0x7ff0000000000000ll);                               \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) m = fmax(m, (double)nbit_load_##S(xr, c)); \
            m = nbit_block_all(m, 1);                                                             \
            if (!(m - m == 0.0)) m = 0.0;                                                         \
            double s = 0.0;                                                                       \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += exp((double)nbit_load_##S(xr, c) - m); \
            s = nbit_block_all(s, 0);                                                             \
            double lse = nbit_round_##S(log(nbit_round_##S(s)));                                  \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double v = (double)nbit_load_##S(xr, c) - m;                                      \
                nbit_store64_##S(out, r * cols + c, log_ ? v - lse : exp(v) / s);                 \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* The input gradient from the output y and its gradient g: g - exp(y) sum(g) for log-softmax, \
       y (g - sum(y g)) for softmax; the sums in f64. */                                          \
    extern "C" __global__ void softmax_backward_##S(const NBIT_DTYPE_##S* y, const NBIT_DTYPE_##S* g, \
                                                    NBIT_DTYPE_##S* out, i64 rows, i64 cols, int log_) { \
        for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {                                      \
            const NBIT_DTYPE_##S* yr = y + r * cols;                                              \
            const NBIT_DTYPE_##S* gr = g + r * cols;                                              \
            double acc = 0.0;                                                                     \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x)                                  \
                acc += log_ ? (double)nbit_load_##S(gr, c)                                        \
                            : (double)nbit_load_##S(yr, c) * (double)nbit_load_##S(gr, c);        \
            acc = nbit_block_all(acc, 0);                                                         \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double yv = (double)nbit_load_##S(yr, c), gv = (double)nbit_load_##S(gr, c);      \
                nbit_store64_##S(out, r * cols + c, log_ ? gv - exp(yv) * acc : yv * (gv - acc)); \
            }                                                                                     \
        }                                                                                         \
    }
NBIT_SOFTMAX(f16)
NBIT_SOFTMAX(bf16)
NBIT_SOFTMAX(f32)
NBIT_SOFTMAX(f64)

// A sum over some axes (`Backend::sum_to_shape`, `Backend::sum` along an axis), one thread per
// output element: out[o] = scale * the f64 sum of x over the reduced axes, rounded once. `keep`
// walks the kept axes in row-major order (shape, input strides in stride_a), `red` the reduced ones.
#define NBIT_REDUCE(S)                                                                            \
    extern "C" __global__ void reduce_##S(const NBIT_DTYPE_##S* x, NBIT_DTYPE_##S* out, i64 n_out, \
                                          i64 n_red, NbitBroadcast keep, NbitBroadcast red,       \
                                          double scale) {                                         \
        NBIT_GRID_STRIDE(o, n_out) {                                                              \
            i64 base, unused;                                                                     \
            nbit_offsets(keep, o, &base, &unused);                                                \
            double acc = 0.0;                                                                     \
            for (i64 j = 0; j < n_red; ++j) {                                                     \
                i64 off;                                                                          \
                nbit_offsets(red, j, &off, &unused);                                              \
                acc += (double)nbit_load_##S(x, base + off);                                      \
            }                                                                                     \
            nbit_store64_##S(out, o, acc * scale);                                                \
        }                                                                                         \
    }
NBIT_REDUCE(f16)
NBIT_REDUCE(bf16)
NBIT_REDUCE(f32)
NBIT_REDUCE(f64)

// ---- data movement, by element size (any dtype, complex included) ------------------------------

struct NbitB16 {
    u64 lo, hi;
};

// out[offset_b(i)] = x[offset_a(i)] for every element i of g's shape: transposes (permuted
// strides), broadcasts (stride 0), and copies into or out of a slice (concatenation).
// fill_<size>: every element of out is v.
#define NBIT_MOVE(B, T)                                                                           \
    extern "C" __global__ void copy_##B(const T* x, T* out, i64 n, NbitBroadcast g) {             \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            i64 ia, ib;                                                                           \
            nbit_offsets(g, i, &ia, &ib);                                                         \
            out[ib] = x[ia];                                                                      \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void fill_##B(T* out, i64 n, T v) {                                     \
        NBIT_GRID_STRIDE(i, n) { out[i] = v; }                                                    \
    }
NBIT_MOVE(b2, u16)
NBIT_MOVE(b4, u32)
NBIT_MOVE(b8, u64)
NBIT_MOVE(b16, NbitB16)

// ---- the classification loss -----------------------------------------------------------------

// The mean negative log-likelihood of one target per row, one block: -sum(logp[r, t[r]]) / rows in
// f64, rounded once (`Backend::nll_loss`).
#define NBIT_NLL(S)                                                                               \
    extern "C" __global__ void nll_loss_##S(const NBIT_DTYPE_##S* logp, const i64* targets,       \
                                            NBIT_DTYPE_##S* out, i64 rows, i64 cols) {            \
        double acc = 0.0;                                                                         \
        for (i64 r = threadIdx.x; r < rows; r += blockDim.x)                                      \
            acc += (double)nbit_load_##S(logp, r * cols + targets[r]);                            \
        acc = nbit_block_all(acc, 0);                                                             \
        if (threadIdx.x == 0) nbit_store64_##S(out, 0, -acc / (double)(rows > 0 ? rows : 1));     \
    }                                                                                             \
    /* Its gradient: -dy / rows at each target, 0 elsewhere. */                                   \
    extern "C" __global__ void nll_loss_backward_##S(const NBIT_DTYPE_##S* dy, const i64* targets, \
                                                     NBIT_DTYPE_##S* out, i64 rows, i64 cols) {   \
        double g = -(double)nbit_load_##S(dy, 0) / (double)(rows > 0 ? rows : 1);                 \
        NBIT_GRID_STRIDE(i, rows * cols) {                                                        \
            nbit_store64_##S(out, i, targets[i / cols] == i % cols ? g : 0.0);                    \
        }                                                                                         \
    }
NBIT_NLL(f16)
NBIT_NLL(bf16)
NBIT_NLL(f32)
NBIT_NLL(f64)

// ---- indexing, selection, convolution unfold (`backend/cpu/indexing.rs`'s kernels) ---------------

// Arrays are seen as [outer, n, inner] around the indexed axis; the result has m at that axis.
// index_select: out[o, k, r] = x[o, index[k], r]. gather: out[o, j, r] = x[o, index[o, j, r], r].
#define NBIT_GATHERS(B, T)                                                                        \
    extern "C" __global__ void index_select_##B(const T* x, T* out, const i64* index, i64 outer,  \
                                                i64 n, i64 m, i64 inner) {                        \
        NBIT_GRID_STRIDE(j, outer * m * inner) {                                                  \
            i64 o = j / (m * inner), k = (j / inner) % m, r = j % inner;                          \
            out[j] = x[(o * n + index[k]) * inner + r];                                           \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void gather_##B(const T* x, T* out, const i64* index, i64 total, i64 n, \
                                          i64 m, i64 inner) {                                     \
        NBIT_GRID_STRIDE(j, total) {                                                              \
            i64 o = j / (m * inner), r = j % inner;                                               \
            out[j] = x[(o * n + index[j]) * inner + r];                                           \
        }                                                                                         \
    }
NBIT_GATHERS(b2, u16)
NBIT_GATHERS(b4, u32)
NBIT_GATHERS(b8, u64)
NBIT_GATHERS(b16, NbitB16)

// Their gradients add into an f64 buffer (zeroed by the caller, rounded once afterwards by a cast):
// index_add: acc[o, index[k], r] += src[o, k, r]; scatter_add: acc[o, index[o, j, r], r] +=
// src[o, j, r]. The f64 additions are atomic, so their order varies; the sum is rounded once.
#define NBIT_SCATTERS(S)                                                                          \
    extern "C" __global__ void index_add_##S(const NBIT_DTYPE_##S* src, double* acc, const i64* index, \
                                             i64 outer, i64 n, i64 m, i64 inner) {                \
        NBIT_GRID_STRIDE(j, outer * m * inner) {                                                  \
            i64 o = j / (m * inner), k = (j / inner) % m, r = j % inner;                          \
            atomicAdd(&acc[(o * n + index[k]) * inner + r], (double)nbit_load_##S(src, j));       \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void scatter_add_##S(const NBIT_DTYPE_##S* src, double* acc, const i64* index, \
                                               i64 total, i64 n, i64 m, i64 inner) {              \
        NBIT_GRID_STRIDE(j, total) {                                                              \
            i64 o = j / (m * inner), r = j % inner;                                               \
            atomicAdd(&acc[(o * n + index[j]) * inner + r], (double)nbit_load_##S(src, j));       \
        }                                                                                         \
    }
NBIT_SCATTERS(f16)
NBIT_SCATTERS(bf16)
NBIT_SCATTERS(f32)
NBIT_SCATTERS(f64)

// `Compare` codes.
#define NBIT_EQ 0
#define NBIT_NE 1
#define NBIT_LT 2
#define NBIT_LE 3
#define NBIT_GT 4
#define NBIT_GE 5

// where: out[i] = cond[i] != 0 ? a : b (cond already has the output's shape; a and b broadcast
// through g); compare: 1 where `op(a, b)` holds, else 0 (NaN compares false but under NE).
#define NBIT_SELECT(S)                                                                            \
    extern "C" __global__ void select_##S(const NBIT_DTYPE_##S* cond, const NBIT_DTYPE_##S* a,    \
                                          const NBIT_DTYPE_##S* b, NBIT_DTYPE_##S* out, i64 n,    \
                                          NbitBroadcast g) {                                      \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            i64 ia, ib;                                                                           \
            nbit_offsets(g, i, &ia, &ib);                                                         \
            out[i] = (double)nbit_load_##S(cond, i) != 0.0 ? a[ia] : b[ib];                       \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void compare_##S(const NBIT_DTYPE_##S* a, const NBIT_DTYPE_##S* b,      \
                                           NBIT_DTYPE_##S* out, i64 n, int op, NbitBroadcast g) { \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            i64 ia, ib;                                                                           \
            nbit_offsets(g, i, &ia, &ib);                                                         \
            double x = (double)nbit_load_##S(a, ia), y = (double)nbit_load_##S(b, ib);            \
            bool holds = op == NBIT_EQ ? x == y : op == NBIT_NE ? x != y : op == NBIT_LT ? x < y  \
                       : op == NBIT_LE ? x <= y : op == NBIT_GT ? x > y : x >= y;                 \
            nbit_store64_##S(out, i, holds ? 1.0 : 0.0);                                          \
        }                                                                                         \
    }
NBIT_SELECT(f16)
NBIT_SELECT(bf16)
NBIT_SELECT(f32)
NBIT_SELECT(f64)

// Where the largest (smallest unless `largest`) value along the axis is, for each (o, r): the
// first on ties, NaN wins (`torch.max(x, dim)`), as the CPU's loop.
#define NBIT_ARG_EXTREME(S)                                                                       \
    extern "C" __global__ void arg_extreme_##S(const NBIT_DTYPE_##S* x, i64* out, i64 outer, i64 n, \
                                               i64 inner, int largest) {                          \
        NBIT_GRID_STRIDE(j, outer * inner) {                                                      \
            i64 o = j / inner, r = j % inner, best = 0;                                           \
            for (i64 i = 1; i < n; ++i) {                                                         \
                double v = (double)nbit_load_##S(x, (o * n + i) * inner + r);                     \
                double b = (double)nbit_load_##S(x, (o * n + best) * inner + r);                  \
                if (b != b) break;                                                                \
                if (v != v || (largest && v > b) || (!largest && v < b)) best = i;                \
            }                                                                                     \
            out[j] = best;                                                                        \
        }                                                                                         \
    }
NBIT_ARG_EXTREME(f16)
NBIT_ARG_EXTREME(bf16)
NBIT_ARG_EXTREME(f32)
NBIT_ARG_EXTREME(f64)

// The shape of one 2-D convolution (`Conv2dGeometry`), with its output size.
struct NbitConv {
    i64 batch, channels, h, w, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow;
};

// im2col: the patches of x [batch, channels, h, w] as rows [batch * oh * ow, channels * kh * kw],
// columns in (channel, ky, kx) order, padding read as 0.
#define NBIT_UNFOLD(S)                                                                            \
    extern "C" __global__ void unfold2d_##S(const NBIT_DTYPE_##S* x, NBIT_DTYPE_##S* out, NbitConv g) { \
        i64 cols = g.channels * g.kh * g.kw;                                                      \
        NBIT_GRID_STRIDE(j, g.batch * g.oh * g.ow * cols) {                                       \
            i64 row = j / cols, col = j % cols;                                                   \
            i64 nb = row / (g.oh * g.ow), oy = (row / g.ow) % g.oh, ox = row % g.ow;              \
            i64 c = col / (g.kh * g.kw), ky = (col / g.kw) % g.kh, kx = col % g.kw;               \
            i64 y = oy * g.sh + ky * g.dh - g.ph, xx = ox * g.sw + kx * g.dw - g.pw;              \
            if (y >= 0 && y < g.h && xx >= 0 && xx < g.w)                                         \
                out[j] = x[((nb * g.channels + c) * g.h + y) * g.w + xx];                         \
            else                                                                                  \
                nbit_store64_##S(out, j, 0.0);                                                    \
        }                                                                                         \
    }                                                                                             \
    /* col2im, one thread per input element: the f64 sum of every column value read from it, in \
       the CPU's order (output positions ascending), rounded once. */                            \
    extern "C" __global__ void fold2d_##S(const NBIT_DTYPE_##S* cols_in, NBIT_DTYPE_##S* out, NbitConv g) { \
        i64 cols = g.channels * g.kh * g.kw;                                                      \
        NBIT_GRID_STRIDE(j, g.batch * g.channels * g.h * g.w) {                                   \
            i64 nb = j / (g.channels * g.h * g.w), c = (j / (g.h * g.w)) % g.channels;            \
            i64 y = (j / g.w) % g.h, xx = j % g.w;                                                \
            double acc = 0.0;                                                                     \
            for (i64 ky = g.kh - 1; ky >= 0; --ky) {                                              \
                i64 ty = y + g.ph - ky * g.dh;                                                    \
                if (ty < 0 || ty % g.sh != 0 || ty / g.sh >= g.oh) continue;                      \
                for (i64 kx = g.kw - 1; kx >= 0; --kx) {                                          \
                    i64 tx = xx + g.pw - kx * g.dw;                                               \
                    if (tx < 0 || tx % g.sw != 0 || tx / g.sw >= g.ow) continue;                  \
                    i64 row = (nb * g.oh + ty / g.sh) * g.ow + tx / g.sw;                         \
                    acc += (double)nbit_load_##S(cols_in, row * cols + (c * g.kh + ky) * g.kw + kx); \
                }                                                                                 \
            }                                                                                     \
            nbit_store64_##S(out, j, acc);                                                        \
        }                                                                                         \
    }
NBIT_UNFOLD(f16)
NBIT_UNFOLD(bf16)
NBIT_UNFOLD(f32)
NBIT_UNFOLD(f64)

// ---- layer normalisation ------------------------------------------------------------------------

// One block per row (grid-stride over rows): mean and biased variance in f64, y = (x - mean) * rstd
// (* w) (+ b) rounded once; stats[2 r] = mean, stats[2 r + 1] = rstd.
#define NBIT_LAYER_NORM(S)                                                                        \
    extern "C" __global__ void layer_norm_##S(const NBIT_DTYPE_##S* x, const NBIT_DTYPE_##S* w,   \
                                              const NBIT_DTYPE_##S* b, NBIT_DTYPE_##S* y,         \
                                              double* stats, i64 rows, i64 cols, double eps) {    \
        for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {                                      \
            const NBIT_DTYPE_##S* xr = x + r * cols;                                              \
            double s = 0.0;                                                                       \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) s += (double)nbit_load_##S(xr, c); \
            double mean = nbit_block_all(s, 0) / (double)cols;                                    \
            double q = 0.0;                                                                       \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double d = (double)nbit_load_##S(xr, c) - mean;                                   \
                q += d * d;                                                                       \
            }                                                                                     \
            double rstd = 1.0 / sqrt(nbit_block_all(q, 0) / (double)cols + eps);                  \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double h = ((double)nbit_load_##S(xr, c) - mean) * rstd;                          \
                if (w) h *= (double)nbit_load_##S(w, c);                                          \
                if (b) h += (double)nbit_load_##S(b, c);                                          \
                nbit_store64_##S(y, r * cols + c, h);                                             \
            }                                                                                     \
            if (threadIdx.x == 0) {                                                               \
                stats[2 * r] = mean;                                                              \
                stats[2 * r + 1] = rstd;                                                          \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* dx, one block per row: g = dy (* w), dx = rstd (g - mean(g) - xhat mean(g xhat)). */       \
    extern "C" __global__ void layer_norm_backward_##S(const NBIT_DTYPE_##S* x, const NBIT_DTYPE_##S* w, \
                                                       const double* stats, const NBIT_DTYPE_##S* dy, \
                                                       NBIT_DTYPE_##S* dx, i64 rows, i64 cols) {  \
        for (i64 r = blockIdx.x; r < rows; r += gridDim.x) {                                      \
            double mean = stats[2 * r], rstd = stats[2 * r + 1];                                  \
            double sg = 0.0, sgx = 0.0;                                                           \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double g = (double)nbit_load_##S(dy, r * cols + c) * (w ? (double)nbit_load_##S(w, c) : 1.0); \
                sg += g;                                                                          \
                sgx += g * (((double)nbit_load_##S(x, r * cols + c) - mean) * rstd);              \
            }                                                                                     \
            double mean_g = nbit_block_all(sg, 0) / (double)cols;                                 \
            double mean_gx = nbit_block_all(sgx, 0) / (double)cols;                               \
            for (i64 c = threadIdx.x; c < cols; c += blockDim.x) {                                \
                double g = (double)nbit_load_##S(dy, r * cols + c) * (w ? (double)nbit_load_##S(w, c) : 1.0); \
                double h = ((double)nbit_load_##S(x, r * cols + c) - mean) * rstd;                \
                nbit_store64_##S(dx, r * cols + c, rstd * (g - mean_g - h * mean_gx));            \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    /* dweight and dbias, one thread per column, rows in order: sum(dy xhat), sum(dy). */         \
    extern "C" __global__ void layer_norm_params_##S(const NBIT_DTYPE_##S* x, const double* stats, \
                                                     const NBIT_DTYPE_##S* dy, NBIT_DTYPE_##S* dw, \
                                                     NBIT_DTYPE_##S* db, i64 rows, i64 cols) {    \
        NBIT_GRID_STRIDE(c, cols) {                                                               \
            double sw = 0.0, sb = 0.0;                                                            \
            for (i64 r = 0; r < rows; ++r) {                                                      \
                double d = (double)nbit_load_##S(dy, r * cols + c);                               \
                sw += d * (((double)nbit_load_##S(x, r * cols + c) - stats[2 * r]) * stats[2 * r + 1]); \
                sb += d;                                                                          \
            }                                                                                     \
            if (dw) nbit_store64_##S(dw, c, sw);                                                  \
            if (db) nbit_store64_##S(db, c, sb);                                                  \
        }                                                                                         \
    }
NBIT_LAYER_NORM(f16)
NBIT_LAYER_NORM(bf16)
NBIT_LAYER_NORM(f32)
NBIT_LAYER_NORM(f64)

// ---- complex numbers ----------------------------------------------------------------------------

// Complex tensors are pairs of parts (re, im) of a real type: c32 of f16, c64 of f32, c128 of f64.
// Every op computes in complex128 (num-complex's formulas, no fused multiply-add) and rounds once
// per part, as the CPU backend does.
__device__ __forceinline__ bool nbit_is_nan(double v) { return v != v; }
__device__ __forceinline__ bool nbit_is_inf(double v) { return v == v && v - v != 0.0; }

// `ComplexUnary` codes.
#define NBIT_CNEG 0
#define NBIT_CCONJ 1
#define NBIT_CEXP 2
#define NBIT_CMUL_SCALAR 3
#define NBIT_CSIGN 4

#define NBIT_COMPLEX(CS, R)                                                                       \
    extern "C" __global__ void cbinary_##CS(const NBIT_DTYPE_##R* a, const NBIT_DTYPE_##R* b,     \
                                            NBIT_DTYPE_##R* out, i64 n, int op, NbitBroadcast g) { \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            i64 ia, ib;                                                                           \
            nbit_offsets(g, i, &ia, &ib);                                                         \
            double ar = (double)nbit_load_##R(a, 2 * ia), ai = (double)nbit_load_##R(a, 2 * ia + 1); \
            double br = (double)nbit_load_##R(b, 2 * ib), bi = (double)nbit_load_##R(b, 2 * ib + 1); \
            double re, im;                                                                        \
            if (op == NBIT_ADD) {                                                                 \
                re = ar + br;                                                                     \
                im = ai + bi;                                                                     \
            } else if (op == NBIT_SUB) {                                                          \
                re = ar - br;                                                                     \
                im = ai - bi;                                                                     \
            } else if (op == NBIT_MUL) {                                                          \
                re = ar * br - ai * bi;                                                           \
                im = ar * bi + ai * br;                                                           \
            } else {                                                                              \
                double ns = br * br + bi * bi;                                                    \
                re = (ar * br + ai * bi) / ns;                                                    \
                im = (ai * br - ar * bi) / ns;                                                    \
            }                                                                                     \
            nbit_store64_##R(out, 2 * i, re);                                                     \
            nbit_store64_##R(out, 2 * i + 1, im);                                                 \
        }                                                                                         \
    }                                                                                             \
    extern "C" __global__ void cunary_##CS(const NBIT_DTYPE_##R* z, NBIT_DTYPE_##R* out, i64 n,   \
                                           int op, double c) {                                    \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            double re = (double)nbit_load_##R(z, 2 * i), im = (double)nbit_load_##R(z, 2 * i + 1); \
            double r2 = re, i2 = im;                                                              \
            if (op == NBIT_CNEG) {                                                                \
                r2 = -re;                                                                         \
                i2 = -im;                                                                         \
            } else if (op == NBIT_CCONJ) {                                                        \
                i2 = -im;                                                                         \
            } else if (op == NBIT_CMUL_SCALAR) {                                                  \
                r2 = re * c;                                                                      \
                i2 = im * c;                                                                      \
            } else if (op == NBIT_CSIGN) {                                                        \
                double r = hypot(re, im);                                                         \
                r2 = r == 0.0 ? 0.0 : re / r;                                                     \
                i2 = r == 0.0 ? 0.0 : im / r;                                                     \
            } else if (nbit_is_inf(re) && re < 0.0 && !(im - im == 0.0)) {                        \
                /* exp, with num-complex's special cases */                                       \
                r2 = 0.0;                                                                         \
                i2 = 0.0;                                                                         \
            } else if (nbit_is_inf(re) && re > 0.0 && (im == 0.0 || !(im - im == 0.0))) {        \
                r2 = re;                                                                          \
                i2 = nbit_is_inf(im) ? (im - im) : im;                                            \
            } else if (nbit_is_nan(re) && im == 0.0) {                                            \
                r2 = re;                                                                          \
                i2 = im;                                                                          \
            } else {                                                                              \
                double e = exp(re);                                                               \
                r2 = e * cos(im);                                                                 \
                i2 = e * sin(im);                                                                 \
            }                                                                                     \
            nbit_store64_##R(out, 2 * i, r2);                                                     \
            nbit_store64_##R(out, 2 * i + 1, i2);                                                 \
        }                                                                                         \
    }                                                                                             \
    /* |z| without overflow (hypot), into a tensor of the part type. */                          \
    extern "C" __global__ void cabs_##CS(const NBIT_DTYPE_##R* z, NBIT_DTYPE_##R* out, i64 n) {   \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            nbit_store64_##R(out, i, hypot((double)nbit_load_##R(z, 2 * i), (double)nbit_load_##R(z, 2 * i + 1))); \
        }                                                                                         \
    }
NBIT_COMPLEX(c32, f16)
NBIT_COMPLEX(c64, f32)
NBIT_COMPLEX(c128, f64)

// ---- the gradient scaler -------------------------------------------------------------------

__device__ __forceinline__ bool nbit_finite_f(float v) { return v - v == 0.0f; }
__device__ __forceinline__ bool nbit_finite_d(double v) { return v - v == 0.0; }

// The fused unscale-and-check over every gradient of one dtype in one launch: tensor t =
// blockIdx.y has lens[t] elements at ptrs[t]; each is multiplied by inv (an f32, as PyTorch's
// inverse scale) in the compute type and rounded once, and *found is set to 1 if any element was
// inf or NaN before the multiply.
#define NBIT_UNSCALE(S, ACC, FINITE)                                                              \
    extern "C" __global__ void unscale_check_##S(NBIT_DTYPE_##S* const* ptrs, const i64* lens,   \
                                                 float inv, int* found) {                         \
        NBIT_DTYPE_##S* p = ptrs[blockIdx.y];                                                     \
        i64 n = lens[blockIdx.y];                                                                 \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            ACC v = nbit_load_##S(p, i);                                                          \
            if (!FINITE(v)) atomicExch(found, 1);                                                 \
            nbit_store_##S(p, i, v * (ACC)inv);                                                   \
        }                                                                                         \
    }
NBIT_UNSCALE(f16, float, nbit_finite_f)
NBIT_UNSCALE(bf16, float, nbit_finite_f)
NBIT_UNSCALE(f32, float, nbit_finite_f)
NBIT_UNSCALE(f64, double, nbit_finite_d)

// *found = 1 if any of the n elements is inf or NaN (`Backend::any_non_finite`).
#define NBIT_NON_FINITE(S, FINITE)                                                                \
    extern "C" __global__ void non_finite_##S(const NBIT_DTYPE_##S* x, i64 n, int* found) {       \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            if (!FINITE(nbit_load_##S(x, i))) atomicExch(found, 1);                               \
        }                                                                                         \
    }
NBIT_NON_FINITE(f16, nbit_finite_f)
NBIT_NON_FINITE(bf16, nbit_finite_f)
NBIT_NON_FINITE(f32, nbit_finite_f)
NBIT_NON_FINITE(f64, nbit_finite_d)

// PyTorch's `_amp_update_scale_` on the device (one thread), as `DynamicScaler::update`: the f32
// scale times an f64 factor, rounded once; `min_scale` < 0 means no floor. Reads *found and resets
// it for the next step, so the host syncs at most once per step (to read the scale for its log).
extern "C" __global__ void update_scale(float* scale, unsigned* tracker, int* found, double growth,
                                        double backoff, unsigned interval, float min_scale) {
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    if (*found) {
        float s = (float)((double)*scale * backoff);
        if (min_scale >= 0.0f && s < min_scale) s = min_scale;
        *scale = s;
        *tracker = 0;
    } else {
        unsigned successful = *tracker + 1;
        if (successful == interval) {
            float grown = (float)((double)*scale * growth);
            if (nbit_finite_f(grown)) *scale = grown;
            *tracker = 0;
        } else {
            *tracker = successful;
        }
    }
    *found = 0;
}

// ---- optimizer steps --------------------------------------------------------------------------

// The 64 random bits of draw `index` of stream `seed` (the CPU backend's `random_bits`).
__device__ __forceinline__ u64 nbit_random_bits(u64 seed, u64 index) {
    u64 z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// A compute-type value rounded to the element type and widened back: what keeping it in a tensor
// of that type does.
__device__ __forceinline__ float nbit_keep_f16(float x) { return nbit_f16_to_f32(nbit_f32_to_f16(x)); }
__device__ __forceinline__ float nbit_keep_bf16(float x) { return nbit_bf16_to_f32(nbit_f32_to_bf16(x)); }
__device__ __forceinline__ float nbit_keep_f32(float x) { return x; }
__device__ __forceinline__ double nbit_keep_f64(double x) { return x; }

// Stochastic rounding from f32 with 16 random bits, as the CPU backend's `round_stochastic`.
// f16: between the two neighbours one magnitude step apart, up with probability by distance.
__device__ __forceinline__ u16 nbit_stochastic_f16(float x, u32 noise) {
    u16 near = nbit_f32_to_f16(x);
    float nv = nbit_f16_to_f32(near);
    if (!(x - x == 0.0f) || nv == x || !(nv - nv == 0.0f)) return near;
    u16 other = fabsf(nv) > fabsf(x) ? (u16)(near - 1) : (u16)(near + 1);
    u16 lo = fabsf(nv) < fabsf(x) ? near : other;
    u16 hi = fabsf(nv) < fabsf(x) ? other : near;
    double lv = fabs((double)nbit_f16_to_f32(lo)), hv = fabs((double)nbit_f16_to_f32(hi));
    double up = (fabs((double)x) - lv) / (hv - lv);
    return ((double)noise + 0.5) / 65536.0 < up ? hi : lo;
}
// bf16: add the noise to the magnitude's dropped bits and truncate.
__device__ __forceinline__ u16 nbit_stochastic_bf16(float x, u32 noise) {
    if (!(x - x == 0.0f)) return nbit_f32_to_bf16(x);
    return (u16)((nbit_f32_bits(x) + noise) >> 16);
}
// f32 and f64 updates are never rounded stochastically (the optimizer refuses it): nearest.
__device__ __forceinline__ float nbit_stochastic_f32(float x, u32) { return x; }
__device__ __forceinline__ double nbit_stochastic_f64(double x, u32) { return x; }

// `UpdateRounding` codes.
#define NBIT_NEAREST 0
#define NBIT_COMPENSATED 1
#define NBIT_STOCHASTIC 2

// Writes the updated weight t of element i as the rounding says (the CPU's `write_update`):
// nearest; Kahan-compensated through comp; or stochastic with 16 bits of draw i / 4 of `key`.
#define NBIT_WRITE_UPDATE(S, ACC)                                                                 \
    __device__ __forceinline__ void nbit_write_update_##S(NBIT_DTYPE_##S* p, NBIT_DTYPE_##S* comp, i64 i, \
                                                          ACC t, int rounding, u64 key) {         \
        if (rounding == NBIT_COMPENSATED && comp) {                                               \
            ACC target = t + nbit_load_##S(comp, i);                                              \
            nbit_store_##S(p, i, target);                                                         \
            nbit_store_##S(comp, i, target - nbit_load_##S(p, i));                                \
        } else if (rounding == NBIT_STOCHASTIC) {                                                 \
            u32 noise = (u32)(nbit_random_bits(key, (u64)i / 4) >> (16 * (i % 4))) & 0xffffu;     \
            p[i] = nbit_stochastic_##S(t, noise);                                                 \
        } else {                                                                                  \
            nbit_store_##S(p, i, t);                                                              \
        }                                                                                         \
    }
NBIT_WRITE_UPDATE(f16, float)
NBIT_WRITE_UPDATE(bf16, float)
NBIT_WRITE_UPDATE(f32, float)
NBIT_WRITE_UPDATE(f64, double)

// The scalars of one SGD update (`backend::SgdStep`).
struct NbitSgd {
    double lr, momentum, dampening, weight_decay;
    int nesterov, first, rounding, unused;
    u64 key;
};

// One SGD update as PyTorch's single-tensor SGD takes it (the CPU backend's `sgd_step_body`):
// each value PyTorch keeps in a tensor (the decayed gradient, the momentum buffer) rounded to the
// element type; `add(x, alpha=a)` one fused multiply-add. `buf` and `comp` may be null.
#define NBIT_SGD(S, ACC, FMA)                                                                     \
    extern "C" __global__ void sgd_step_##S(NBIT_DTYPE_##S* p, const NBIT_DTYPE_##S* g,           \
                                            NBIT_DTYPE_##S* buf, NBIT_DTYPE_##S* comp, i64 n, NbitSgd h) { \
        ACC neg_lr = (ACC)(-h.lr), wd = (ACC)h.weight_decay, mom = (ACC)h.momentum;               \
        ACC damp = (ACC)(1.0 - h.dampening);                                                      \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            ACC pa = nbit_load_##S(p, i), d = nbit_load_##S(g, i);                                \
            if (h.weight_decay != 0.0) d = nbit_keep_##S(FMA(wd, pa, d));                         \
            ACC s = d;                                                                            \
            if (buf) {                                                                            \
                ACC nb = h.first ? d : nbit_keep_##S(FMA(damp, d, nbit_keep_##S(mom * nbit_load_##S(buf, i)))); \
                nbit_store_##S(buf, i, nb);                                                       \
                nb = nbit_load_##S(buf, i);                                                       \
                s = h.nesterov ? nbit_keep_##S(FMA(mom, nb, d)) : nb;                             \
            }                                                                                     \
            nbit_write_update_##S(p, comp, i, FMA(neg_lr, s, pa), h.rounding, h.key);             \
        }                                                                                         \
    }
NBIT_SGD(f16, float, fmaf)
NBIT_SGD(bf16, float, fmaf)
NBIT_SGD(f32, float, fmaf)
NBIT_SGD(f64, double, fma)

// The scalars of one AdamW update, derived in f64 on the host (`AdamWStep::scalars`).
struct NbitAdamW {
    double decay, one_minus_b1, beta2, one_minus_b2, step_size, bias2_sqrt, eps;
    int rounding, unused;
    u64 key;
};

// One AdamW update as PyTorch's single-tensor AdamW takes it (the CPU backend's
// `adamw_step_body`): the decayed weight, exp_avg.lerp_ (fused, the other form for weights >= 0.5),
// exp_avg_sq.mul_().addcmul_() in the moment type M, denom rounded as the tensor ops round it, and
// param.addcdiv_().
#define NBIT_ADAMW(S, ACC, M, FMA, SQRT)                                                          \
    extern "C" __global__ void adamw_step_##S(NBIT_DTYPE_##S* p, const NBIT_DTYPE_##S* g,         \
                                              NBIT_DTYPE_##S* m, NBIT_DTYPE_##M* v, NBIT_DTYPE_##S* comp, \
                                              i64 n, NbitAdamW h) {                               \
        ACC decay = (ACC)h.decay, omb1 = (ACC)h.one_minus_b1, b2 = (ACC)h.beta2;                  \
        ACC omb2 = (ACC)h.one_minus_b2, step = (ACC)h.step_size, b2s = (ACC)h.bias2_sqrt;         \
        ACC eps = (ACC)h.eps;                                                                     \
        NBIT_GRID_STRIDE(i, n) {                                                                  \
            ACC gv = nbit_load_##S(g, i);                                                         \
            ACC pd = nbit_load_##S(p, i) * decay;                                                 \
            if (h.rounding == NBIT_NEAREST) pd = nbit_keep_##S(pd);                               \
            ACC mv = nbit_load_##S(m, i);                                                         \
            ACC mn = omb1 < (ACC)0.5 ? FMA(omb1, gv - mv, mv) : FMA(mv - gv, (ACC)1 - omb1, gv);  \
            nbit_store_##S(m, i, mn);                                                             \
            mn = nbit_load_##S(m, i);                                                             \
            ACC vn = FMA(omb2 * gv, gv, nbit_keep_##M(nbit_load_##M(v, i) * b2));                 \
            nbit_store_##M(v, i, vn);                                                             \
            vn = nbit_load_##M(v, i);                                                             \
            ACC den = nbit_keep_##M(nbit_keep_##M(nbit_keep_##M(SQRT(vn)) / b2s) + eps);          \
            nbit_write_update_##S(p, comp, i, pd - step * mn / den, h.rounding, h.key);           \
        }                                                                                         \
    }
NBIT_ADAMW(f16, float, f32, fmaf, sqrtf)
NBIT_ADAMW(bf16, float, bf16, fmaf, sqrtf)
NBIT_ADAMW(f32, float, f32, fmaf, sqrtf)
NBIT_ADAMW(f64, double, f64, fma, sqrt)

// ---- dropout -------------------------------------------------------------------------------

// SplitMix64 of seed + (i + 1) * golden: the same draw as the CPU backend's `uniform(seed, i)`, so a
// seeded run draws the same mask on both.
__device__ __forceinline__ double nbit_uniform(u64 seed, u64 i) {
    u64 z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);
}

#define NBIT_DROPOUT(S)                                                                           \
    extern "C" __global__ void dropout_mask_##S(NBIT_DTYPE_##S* out, i64 n, double p, u64 seed) { \
        double keep = p >= 1.0 ? 0.0 : 1.0 / (1.0 - p);                                           \
        NBIT_GRID_STRIDE(i, n) { nbit_store64_##S(out, i, nbit_uniform(seed, (u64)i) >= p ? keep : 0.0); } \
    }
NBIT_DROPOUT(f16)
NBIT_DROPOUT(bf16)
NBIT_DROPOUT(f32)
NBIT_DROPOUT(f64)
