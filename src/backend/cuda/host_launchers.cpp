// Host entry points for the tests: `host_<kernel>(grid, [grid_y,] block, args...)` runs one
// emulated launch of the kernel of the same name in kernels.cu (see host_prelude.h). Compiled only
// by the tests, after host_prelude.h and kernels.cu in one translation unit.

#define NBIT_HOST_DTYPES(X) X(f16) X(bf16) X(f32) X(f64)

#define NBIT_HOST_UNARY(S)                                                                       \
    extern "C" void host_unary_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* x,              \
                                   NBIT_DTYPE_##S* out, i64 n, int op, double p, double q) {     \
        nbit_launch(g, 1, b, [=] { unary_##S(x, out, n, op, p, q); });                          \
    }
NBIT_HOST_DTYPES(NBIT_HOST_UNARY)

#define NBIT_HOST_UNARY_BACKWARD(S)                                                              \
    extern "C" void host_unary_backward_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* x,     \
                                            const NBIT_DTYPE_##S* y, const NBIT_DTYPE_##S* dy,   \
                                            NBIT_DTYPE_##S* out, i64 n, int op, double p, double q) { \
        nbit_launch(g, 1, b, [=] { unary_backward_##S(x, y, dy, out, n, op, p, q); });          \
    }
NBIT_HOST_DTYPES(NBIT_HOST_UNARY_BACKWARD)

#define NBIT_HOST_BINARY(S)                                                                      \
    extern "C" void host_binary_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* x,             \
                                    const NBIT_DTYPE_##S* y, NBIT_DTYPE_##S* out, i64 n, int op, \
                                    const NbitBroadcast* geo) {                                  \
        NbitBroadcast copy = *geo;                                                               \
        nbit_launch(g, 1, b, [=] { binary_##S(x, y, out, n, op, copy); });                      \
    }
NBIT_HOST_DTYPES(NBIT_HOST_BINARY)

#define NBIT_HOST_CAST(A, B)                                                                     \
    extern "C" void host_cast_##A##_##B(unsigned g, unsigned b, const NBIT_DTYPE_##A* x,         \
                                        NBIT_DTYPE_##B* out, i64 n) {                            \
        nbit_launch(g, 1, b, [=] { cast_##A##_##B(x, out, n); });                               \
    }
NBIT_HOST_CAST(f16, bf16)
NBIT_HOST_CAST(f16, f32)
NBIT_HOST_CAST(bf16, f16)
NBIT_HOST_CAST(bf16, f32)
NBIT_HOST_CAST(f32, f16)
NBIT_HOST_CAST(f32, bf16)
NBIT_HOST_CAST(f16, f64)
NBIT_HOST_CAST(bf16, f64)
NBIT_HOST_CAST(f32, f64)
NBIT_HOST_CAST(f64, f16)
NBIT_HOST_CAST(f64, bf16)
NBIT_HOST_CAST(f64, f32)

#define NBIT_HOST_SUM(S)                                                                         \
    extern "C" void host_sum_partial_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* x, i64 n, \
                                         double* partials) {                                     \
        nbit_launch(g, 1, b, [=] { sum_partial_##S(x, n, partials); });                         \
    }                                                                                            \
    extern "C" void host_sum_finish_##S(unsigned b, const double* partials, i64 count,           \
                                        NBIT_DTYPE_##S* out, double scale) {                     \
        nbit_launch(1, 1, b, [=] { sum_finish_##S(partials, count, out, scale); });             \
    }
NBIT_HOST_DTYPES(NBIT_HOST_SUM)

#define NBIT_HOST_UNSCALE(S)                                                                     \
    extern "C" void host_unscale_check_##S(unsigned g, unsigned tensors, unsigned b,             \
                                           NBIT_DTYPE_##S* const* ptrs, const i64* lens,         \
                                           float inv, int* found) {                              \
        nbit_launch(g, tensors, b, [=] { unscale_check_##S(ptrs, lens, inv, found); });         \
    }
NBIT_HOST_DTYPES(NBIT_HOST_UNSCALE)

extern "C" void host_update_scale(float* scale, unsigned* tracker, int* found, double growth,
                                  double backoff, unsigned interval, float min_scale) {
    nbit_launch(1, 1, 1, [=] { update_scale(scale, tracker, found, growth, backoff, interval, min_scale); });
}

#define NBIT_HOST_DROPOUT(S)                                                                     \
    extern "C" void host_dropout_mask_##S(unsigned g, unsigned b, NBIT_DTYPE_##S* out, i64 n,    \
                                          double p, u64 seed) {                                  \
        nbit_launch(g, 1, b, [=] { dropout_mask_##S(out, n, p, seed); });                       \
    }
NBIT_HOST_DTYPES(NBIT_HOST_DROPOUT)

#define NBIT_HOST_SOFTMAX(S)                                                                     \
    extern "C" void host_softmax_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* x,            \
                                     NBIT_DTYPE_##S* out, i64 rows, i64 cols, int log_) {        \
        nbit_launch(g, 1, b, [=] { softmax_##S(x, out, rows, cols, log_); });                   \
    }                                                                                            \
    extern "C" void host_softmax_backward_##S(unsigned g, unsigned b, const NBIT_DTYPE_##S* y,   \
                                              const NBIT_DTYPE_##S* dy, NBIT_DTYPE_##S* out,     \
                                              i64 rows, i64 cols, int log_) {                    \
        nbit_launch(g, 1, b, [=] { softmax_backward_##S(y, dy, out, rows, cols, log_); });      \
    }
NBIT_HOST_DTYPES(NBIT_HOST_SOFTMAX)
