// The host emulation's one entry point, `nbit_host_launch(name, grid_x, grid_y, block, args)`: runs
// one emulated launch (host_prelude.h) of the kernel of kernels.cu called `name`, with `args` laid
// out as cuLaunchKernel's kernelParams (one pointer to each argument's value), so the Rust side
// marshals a launch the same way for the GPU and for the host. Compiled after host_prelude.h and
// kernels.cu in one translation unit.

#include <cstddef>
#include <map>
#include <string>
#include <type_traits>
#include <utility>

template <class... A>
constexpr std::size_t nbit_arity(void (*)(A...)) {
    return sizeof...(A);
}

template <class... A, std::size_t... I>
void nbit_call(void (*kernel)(A...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(args[I])...);
}

template <auto K>
void nbit_entry(unsigned gx, unsigned gy, unsigned block, void** args) {
    nbit_launch(gx, gy, block, [=] { nbit_call(K, args, std::make_index_sequence<nbit_arity(K)>{}); });
}

using NbitEntry = void (*)(unsigned, unsigned, unsigned, void**);

#define NBIT_E(k) {#k, &nbit_entry<&k>},
#define NBIT_E4(k) NBIT_E(k##_f16) NBIT_E(k##_bf16) NBIT_E(k##_f32) NBIT_E(k##_f64)
#define NBIT_EC(k) NBIT_E(k##_c32) NBIT_E(k##_c64) NBIT_E(k##_c128)
#define NBIT_EB(k) NBIT_E(k##_b2) NBIT_E(k##_b4) NBIT_E(k##_b8) NBIT_E(k##_b16)

static const std::map<std::string, NbitEntry>& nbit_kernels() {
    static const std::map<std::string, NbitEntry> table = {
        NBIT_E4(unary) NBIT_E4(unary_backward) NBIT_E4(binary)
        NBIT_E(cast_f16_bf16) NBIT_E(cast_f16_f32) NBIT_E(cast_bf16_f16) NBIT_E(cast_bf16_f32)
        NBIT_E(cast_f32_f16) NBIT_E(cast_f32_bf16) NBIT_E(cast_f16_f64) NBIT_E(cast_bf16_f64)
        NBIT_E(cast_f32_f64) NBIT_E(cast_f64_f16) NBIT_E(cast_f64_bf16) NBIT_E(cast_f64_f32)
        NBIT_E4(sum_partial) NBIT_E4(sum_finish) NBIT_E4(reduce) NBIT_E4(softmax)
        NBIT_E4(softmax_backward) NBIT_E4(nll_loss) NBIT_E4(nll_loss_backward) NBIT_E4(unscale_check)
        NBIT_E4(non_finite) NBIT_E(update_scale) NBIT_E4(dropout_mask) NBIT_EB(copy) NBIT_EB(fill)
        NBIT_E4(sgd_step) NBIT_E4(adamw_step) NBIT_EB(index_select) NBIT_EB(gather) NBIT_E4(index_add)
        NBIT_E4(scatter_add) NBIT_E4(select) NBIT_E4(compare) NBIT_E4(arg_extreme) NBIT_E4(unfold2d)
        NBIT_E4(fold2d) NBIT_E4(layer_norm) NBIT_E4(layer_norm_backward) NBIT_E4(layer_norm_params)
        NBIT_EC(cbinary) NBIT_EC(cunary) NBIT_EC(cabs)
    };
    return table;
}

// 0 after the launch, 1 when kernels.cu has no kernel called `name`.
extern "C" int nbit_host_launch(const char* name, unsigned gx, unsigned gy, unsigned block, void** args) {
    auto it = nbit_kernels().find(name);
    if (it == nbit_kernels().end()) return 1;
    it->second(gx, gy, block, args);
    return 0;
}

// Whether the emulation can launch `name`, and how many kernels it can launch (the tests check
// these against the kernels NVRTC compiles).
extern "C" int nbit_host_has(const char* name) { return nbit_kernels().count(name) ? 1 : 0; }
extern "C" int nbit_host_count() { return (int)nbit_kernels().size(); }
