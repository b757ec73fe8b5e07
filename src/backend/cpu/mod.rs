//! The CPU backend: ndarray arrays; matrix products on nbit's own GEMM (`gemm.rs`) or the
//! `gemm-f32` / `gemm-f64` kernels (the `gemm` family), complex ones as four real products.

use core::any::Any;

use ndarray::{Array2, ArrayD, ArrayView2, Axis, IxDyn, Zip};

use num_traits::Float as _;

use num_complex::Complex;

use super::{
    AdamWStep, Backend, Binary, Compare, ComplexBackend, ComplexUnary, Conv2dGeometry, SgdStep, Unary,
    UpdateRounding, random_bits, uniform,
};
use crate::device::Cpu;

/// The instruction sets the element-wise kernels are compiled for, best first; detected once.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Isa {
    /// AVX-512 F/BW/VL with AVX2 and FMA: 16 f32 lanes.
    Avx512,
    /// AVX2 and FMA: 8 f32 lanes, fused multiply-add in one instruction.
    Avx2,
    /// The build's baseline (`mul_add` may be a library call).
    Baseline,
}

pub(crate) fn isa() -> Isa {
    static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx2") && has!("fma") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// `fn $name` runs `$body` compiled for the best [`isa`] of this CPU: the same source and the same
/// arithmetic (`mul_add` is a fused multiply-add everywhere), wider vectors.
macro_rules! isa_dispatch {
    ($(#[$m:meta])* fn $name:ident<$($g:ident: $bound:path),+>($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name<$($g: $bound),+>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512<$($g: $bound),+>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2<$($g: $bound),+>($($arg: $ty),*) {
                    $body($($arg),*)
                }
                match $crate::backend::cpu::isa() {
                    // SAFETY: `isa` detected these features on this CPU.
                    $crate::backend::cpu::Isa::Avx512 => return unsafe { avx512($($arg),*) },
                    // SAFETY: as above.
                    $crate::backend::cpu::Isa::Avx2 => return unsafe { avx2($($arg),*) },
                    $crate::backend::cpu::Isa::Baseline => {}
                }
            }
            $body($($arg),*)
        }
    };
}

/// Row-major contiguous copy (no copy when already so).
fn standard<E: Element>(s: &ArrayD<E>) -> std::borrow::Cow<'_, [E]> {
    match s.as_slice() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(s.iter().copied().collect()),
    }
}

fn from_vec<T>(shape: &[usize], v: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), v).expect("kernel produced the element count of its shape")
}

/// The real element types whose products run on the `gemm-f32` / `gemm-f64` crates' kernels.
trait CrateGemm: Element + num_traits::Zero + num_traits::One {
    /// The crate's `gemm` for this type: `dst = alpha dst + beta lhs @ rhs` (`alpha` read only
    /// when `read_dst`), every operand given by a pointer and its column and row strides.
    ///
    /// # Safety
    /// The pointers and strides must describe live arrays of the stated sizes, `dst` not aliased.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        mnk: (usize, usize, usize),
        dst: (*mut Self, isize, isize),
        read_dst: bool,
        lhs: (*const Self, isize, isize),
        rhs: (*const Self, isize, isize),
        par: gemm_common::Parallelism,
    );
}

macro_rules! crate_gemm {
    ($t:ty, $kernel:path) => {
        impl CrateGemm for $t {
            unsafe fn gemm(
                (m, n, k): (usize, usize, usize),
                (dst, dst_cs, dst_rs): (*mut $t, isize, isize),
                read_dst: bool,
                (lhs, lhs_cs, lhs_rs): (*const $t, isize, isize),
                (rhs, rhs_cs, rhs_rs): (*const $t, isize, isize),
                par: gemm_common::Parallelism,
            ) {
                // SAFETY: forwarded from the caller.
                unsafe {
                    $kernel()(
                        m, n, k, dst, dst_cs, dst_rs, read_dst, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs,
                        1.0, 1.0, false, false, false, par,
                    )
                }
            }
        }
    };
}

crate_gemm!(f32, gemm_f32::gemm::f32::get_gemm_fn);
crate_gemm!(f64, gemm_f64::gemm::f64::get_gemm_fn);

/// `dst = a @ b (+ bias)` on the `gemm-f32` / `gemm-f64` kernels; views carry any transposition as
/// strides (nothing is copied).
fn gemm_into<T: CrateGemm>(a: ArrayView2<T>, b: ArrayView2<T>, bias: Option<&ArrayD<T>>) -> Array2<T> {
    let (m, k) = a.dim();
    let n = b.ncols();
    // With a bias the product is accumulated onto it, so `a @ b + bias` is rounded once.
    let mut dst = match bias {
        Some(v) => v
            .broadcast(IxDyn(&[m, n]))
            .expect("bias is [n] (checked by caller)")
            .to_owned()
            .into_dimensionality()
            .expect("2-D"),
        None => Array2::<T>::zeros((m, n)),
    };
    if m == 0 || n == 0 {
        return dst;
    }
    let par = if m * n * k >= PARALLEL_MIN_FMAS && num_threads() > 1 {
        gemm_common::Parallelism::Rayon(num_threads())
    } else {
        gemm_common::Parallelism::None
    };
    let (ars, acs) = (a.strides()[0], a.strides()[1]);
    let (brs, bcs) = (b.strides()[0], b.strides()[1]);
    // The kernels prefer a column-major destination: compute the row-major (m, n) result as the
    // column-major (n, m) product b^T a^T, which is the same memory (as the `gemm` crate does).
    // SAFETY: the pointers and strides describe live arrays of the stated dimensions; `dst` is a
    // fresh row-major (m, n) array not aliased by the inputs.
    unsafe {
        T::gemm(
            (n, m, k),
            (dst.as_mut_ptr(), n as isize, 1),
            bias.is_some(),
            (b.as_ptr(), brs, bcs),
            (a.as_ptr(), ars, acs),
            par,
        );
    }
    dst
}

/// A standard-layout operand as the matrix [`Backend::matmul`] reads (its last axis the columns,
/// the others merged into rows; a view, nothing copied), transposed when `t`.
fn as_2d<T>(s: ndarray::ArrayViewD<'_, T>, t: bool) -> ArrayView2<'_, T> {
    let matrix = super::as_matrix(s.shape());
    let v = s
        .into_shape_with_order(matrix)
        .expect("operands are in standard layout with at least two axes (checked by caller)");
    if t { v.reversed_axes() } else { v }
}

/// `a @ b (+ bias)` for 2-D views (any transposition carried as strides). f64, and f32 with both
/// operands row-major: the `gemm-f64` / `gemm-f32` kernels, measured faster there (f64 1024:
/// 110-125 against 73-86 GFLOP/s; f32 row-major 10-20% faster). Everything else (16-bit
/// operands, transposed or strided f32, narrow outputs): nbit's own GEMM. A kernel named by
/// NBIT_GEMM_KERNEL runs every product it can.
fn product<E: Float>(av: ArrayView2<'_, E>, bv: ArrayView2<'_, E>, bias: Option<&ArrayD<E>>) -> ArrayD<E> {
    let crate_gemm = !gemm::forced::<E>()
        && match E::DTYPE {
            crate::DType::F64 => true,
            crate::DType::F32 => av.strides()[1] == 1 && bv.strides()[1] == 1,
            _ => false,
        };
    if !crate_gemm {
        let bias = bias.map(|v| standard(v));
        let (m, n) = (av.nrows(), bv.ncols());
        return from_vec(&[m, n], gemm::gemm(av, bv, bias.as_deref()));
    }
    /// The product on the `gemm-f32` / `gemm-f64` kernel for `T`, when `E` is `T`.
    fn on<T: CrateGemm, E: 'static>(
        a: ArrayView2<'_, E>,
        b: ArrayView2<'_, E>,
        bias: Option<&ArrayD<E>>,
    ) -> ArrayD<E> {
        fn same<X: 'static, Y: 'static>(x: &X) -> &Y {
            (x as &dyn Any)
                .downcast_ref()
                .expect("element type checked by DTYPE")
        }
        /// `v` as a view of `T`, which is `E`.
        fn view<'a, E: 'static, T: 'static>(v: ArrayView2<'a, E>) -> ArrayView2<'a, T> {
            assert!(same_type::<E, T>(), "element type checked by DTYPE");
            // SAFETY: `E` and `T` are one type (asserted), so the view reads the same memory as
            // the same elements, for the lifetime of the original view.
            unsafe { v.raw_view().cast::<T>().deref_into_view() }
        }
        downcast(gemm_into(view::<E, T>(a), view::<E, T>(b), bias.map(same)).into_dyn())
    }
    if E::DTYPE == crate::DType::F64 {
        on::<f64, E>(av, bv, bias)
    } else {
        on::<f32, E>(av, bv, bias)
    }
}

/// `op(a[i]) @ op(b[i])` for every matrix `i` of two operands with the same leading axes.
/// Products too small to split across threads (each below [`PARALLEL_MIN_FMAS`], as attention's
/// per-head products are) run whole on different threads; larger ones one after another, each
/// split.
fn batched_product<E: Float>(a: &ArrayD<E>, b: &ArrayD<E>, ta: bool, tb: bool) -> ArrayD<E> {
    let (sa, sb) = (a.shape(), b.shape());
    let r = sa.len() - 2;
    let batch: usize = sa[..r].iter().product();
    let (m, k) = if ta {
        (sa[r + 1], sa[r])
    } else {
        (sa[r], sa[r + 1])
    };
    let n = if tb { sb[r] } else { sb[r + 1] };
    let (a3, b3) = (a.as_standard_layout(), b.as_standard_layout());
    fn view3<'a, E>(
        x: &'a ndarray::CowArray<'_, E, IxDyn>,
        shape: (usize, usize, usize),
    ) -> ndarray::ArrayView3<'a, E> {
        x.view()
            .into_shape_with_order(shape)
            .expect("standard layout, same element count")
    }
    fn mat<'a, E>(v: &ndarray::ArrayView3<'a, E>, i: usize, t: bool) -> ArrayView2<'a, E> {
        let m = (*v).index_axis_move(Axis(0), i);
        if t { m.reversed_axes() } else { m }
    }
    let (av, bv) = (
        view3(&a3, (batch, sa[r], sa[r + 1])),
        view3(&b3, (batch, sb[r], sb[r + 1])),
    );
    let (each, fmas) = (m * n, m.saturating_mul(n).saturating_mul(k));
    let mut out = vec![E::zero(); batch * each];
    if each > 0 {
        let shared = Disjoint::new(&mut out);
        let run = |lo: usize, hi: usize| {
            for i in lo..hi {
                let c = product(mat(&av, i, ta), mat(&bv, i, tb), None);
                // SAFETY: matrix `i` of the output is written by this call alone.
                let dst = unsafe { shared.range(i * each, (i + 1) * each) };
                dst.copy_from_slice(c.as_slice().expect("a fresh product is row-major"));
            }
        };
        if fmas >= PARALLEL_MIN_FMAS {
            run(0, batch);
        } else {
            let min_batch = PARALLEL_MIN_FMAS.div_ceil(fmas.max(1));
            for_ranges(batch, min_batch, 1, run);
        }
    }
    let shape: Vec<usize> = sa[..r].iter().copied().chain([m, n]).collect();
    from_vec(&shape, out)
}

/// Whether `A` and `B` are one type (decided at compile time).
fn same_type<A: 'static, B: 'static>() -> bool {
    core::any::TypeId::of::<A>() == core::any::TypeId::of::<B>()
}

fn downcast<T: 'static, U: 'static>(x: T) -> U {
    *(Box::new(x) as Box<dyn Any>)
        .downcast::<U>()
        .expect("element type checked by DTYPE")
}

/// Elements a chunked kernel widens at a time: its buffers stay in the L1 cache.
const CHUNK: usize = 256;

/// `out[i] = round(f([widen(x[i]) for x in inputs]))` over slices of one length, in a plain
/// loop the compiler vectorises. Types with [`Float::SLICE_CONVERSIONS`] (f16) go a chunk at a
/// time: inputs widened and results rounded by the slice conversions (F16C), `f` looping over
/// the compute type in between. The same arithmetic and single rounding either way.
///
/// Compiled for the best instruction set, with `f` inlined into it.
fn zip_map<E: Float, const N: usize, F: Fn([E::Acc; N]) -> E::Acc>(inputs: [&[E]; N], out: &mut [E], f: &F) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        fn avx512<E: Float, const N: usize, F: Fn([E::Acc; N]) -> E::Acc>(x: [&[E]; N], o: &mut [E], f: &F) {
            zip_map_body(x, o, f)
        }
        #[target_feature(enable = "avx2,fma")]
        fn avx2<E: Float, const N: usize, F: Fn([E::Acc; N]) -> E::Acc>(x: [&[E]; N], o: &mut [E], f: &F) {
            zip_map_body(x, o, f)
        }
        match isa() {
            // SAFETY: `isa` detected these features on this CPU.
            Isa::Avx512 => return unsafe { avx512(inputs, out, f) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { avx2(inputs, out, f) },
            Isa::Baseline => {}
        }
    }
    zip_map_body(inputs, out, f)
}

#[inline(always)]
fn zip_map_body<E: Float, const N: usize, F: Fn([E::Acc; N]) -> E::Acc>(
    inputs: [&[E]; N],
    out: &mut [E],
    f: &F,
) {
    let inputs = inputs.map(|x| &x[..out.len()]);
    if !E::SLICE_CONVERSIONS {
        for (i, o) in out.iter_mut().enumerate() {
            *o = E::from_acc(f(core::array::from_fn(|k| inputs[k][i].to_acc())));
        }
        return;
    }
    let zero = <E::Acc as Acc>::c(0.0);
    let mut wide = [[zero; CHUNK]; N];
    let mut res = [zero; CHUNK];
    for start in (0..out.len()).step_by(CHUNK) {
        let len = CHUNK.min(out.len() - start);
        for (w, x) in wide.iter_mut().zip(&inputs) {
            E::widen_slice(&x[start..start + len], &mut w[..len]);
        }
        for (i, r) in res[..len].iter_mut().enumerate() {
            *r = f(core::array::from_fn(|k| wide[k][i]));
        }
        E::round_slice(&res[..len], &mut out[start..start + len]);
    }
}

/// A new vector of `len` values written by `f(lo, part)`, which fills `part` with the values at
/// `lo..lo + part.len()`. Parts are split across threads above `min_len`, and each is filled
/// [`CHUNK`] values at a time in a buffer in L1 and copied out, so the vector's memory is written
/// once, never cleared first (clearing was a tenth of a bf16-mixed step).
fn par_new<T: Element>(len: usize, min_len: usize, f: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let mut out = Vec::with_capacity(len);
    par_parts(
        &mut out.spare_capacity_mut()[..len],
        min_len,
        CHUNK,
        |lo, part| {
            let mut buf = [T::default(); CHUNK];
            for (i, dst) in part.chunks_mut(CHUNK).enumerate() {
                let b = &mut buf[..dst.len()];
                f(lo + i * CHUNK, b);
                // SAFETY: `MaybeUninit<T>` has `T`'s layout, `b` is initialised, and the two are
                // distinct buffers of `dst.len()` values.
                unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), dst.as_mut_ptr().cast::<T>(), dst.len()) };
            }
        },
    );
    // SAFETY: the parts cover `0..len` (`par_parts`), and every value of each was written.
    unsafe { out.set_len(len) };
    out
}

/// [`zip_map`] over arrays of one shape.
/// Split across threads above [`PARALLEL_MIN_ELEMENTS`].
fn map_n<E: Float, const N: usize>(
    xs: [&ArrayD<E>; N],
    f: impl Fn([E::Acc; N]) -> E::Acc + Sync,
) -> ArrayD<E> {
    let shape = xs[0].shape().to_vec();
    let data = xs.map(standard);
    let out = par_new(data[0].len(), PARALLEL_MIN_ELEMENTS, |lo, part| {
        zip_map(data.each_ref().map(|d| &d[lo..lo + part.len()]), part, &f)
    });
    from_vec(&shape, out)
}

isa_dispatch! {
    /// [`cast_slice_body`] for the best instruction set.
    fn cast_slice<A: Float, B: Float>(src: &[A], dst: &mut [B]) => cast_slice_body
}

/// `dst[i] = src[i]` converted, rounding to nearest even once; 16-bit conversions a chunk at a
/// time through the slice conversions (vectorised).
#[inline(always)]
fn cast_slice_body<A: Float, B: Float>(src: &[A], dst: &mut [B]) {
    if A::DTYPE.bits() == 64 || B::DTYPE.bits() == 64 {
        // Through f64 when either side is f64 (an exact widening).
        for (d, s) in dst.iter_mut().zip(src) {
            *d = B::from_f64(s.as_f64());
        }
        return;
    }
    // Otherwise both compute types are f32, and every value widens to it exactly.
    let mut wide = [<A::Acc as Acc>::c(0.0); CHUNK];
    for (s, d) in src.chunks(CHUNK).zip(dst.chunks_mut(CHUNK)) {
        A::widen_slice(s, &mut wide[..s.len()]);
        let same: &[B::Acc; CHUNK] = (&wide as &dyn Any)
            .downcast_ref()
            .expect("types of at most 32 bits compute in f32");
        B::round_slice(&same[..s.len()], d);
    }
}

// Not listed in "the trait is implemented for" hints: the `Runs` error explains which devices have kernels.
#[diagnostic::do_not_recommend]
impl Backend for Cpu {
    type Storage<E: Element> = ArrayD<E>;

    fn from_array<E: Element>(a: ArrayD<E>) -> ArrayD<E> {
        if a.is_standard_layout() {
            a
        } else {
            a.as_standard_layout().into_owned()
        }
    }

    fn to_array<E: Element>(s: &ArrayD<E>) -> ArrayD<E> {
        s.clone()
    }

    fn shape<E: Element>(s: &ArrayD<E>) -> &[usize] {
        s.shape()
    }

    fn full<E: Element>(shape: &[usize], value: E) -> ArrayD<E> {
        ArrayD::from_elem(IxDyn(shape), value)
    }

    unsafe fn reshape_unchecked<E: Element>(s: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
        from_vec(shape, standard(s).into_owned())
    }

    unsafe fn permute_unchecked<E: Element>(s: &ArrayD<E>, axes: &[usize]) -> ArrayD<E> {
        let n = axes.len();
        let src = standard(s);
        let shape = s.shape();
        let out_shape: Vec<usize> = axes.iter().map(|&a| shape[a]).collect();
        // The last axis stays last (attention's heads moving past the sequence): whole rows move,
        // each one copy; else element by element.
        if n >= 2 && axes[n - 1] == n - 1 && !src.is_empty() {
            let row = shape[n - 1];
            let mut strides = vec![1usize; n];
            for d in (0..n - 1).rev() {
                strides[d] = strides[d + 1] * shape[d + 1];
            }
            let from: Vec<usize> = axes.iter().map(|&a| strides[a]).collect();
            let mut out = Vec::with_capacity(src.len());
            let mut index = vec![0usize; n - 1];
            for _ in 0..src.len() / row.max(1) {
                let at: usize = index.iter().zip(&from).map(|(i, s)| i * s).sum();
                out.extend_from_slice(&src[at..at + row]);
                for d in (0..n - 1).rev() {
                    index[d] += 1;
                    if index[d] < out_shape[d] {
                        break;
                    }
                    index[d] = 0;
                }
            }
            return from_vec(&out_shape, out);
        }
        s.view()
            .permuted_axes(IxDyn(axes))
            .as_standard_layout()
            .into_owned()
    }

    fn cast<A: Float, B: Float>(s: &ArrayD<A>) -> ArrayD<B> {
        if A::DTYPE == B::DTYPE {
            return downcast(s.clone());
        }
        let src = standard(s);
        let out = par_new(src.len(), PARALLEL_MIN_ELEMENTS, |lo, part| {
            cast_slice(&src[lo..lo + part.len()], part)
        });
        from_vec(s.shape(), out)
    }

    fn unary<E: Float>(op: Unary, x: &ArrayD<E>) -> ArrayD<E> {
        let half = <E::Acc as Acc>::c(0.5);
        let one = <E::Acc as Acc>::c(1.0);
        let zero = <E::Acc as Acc>::c(0.0);
        match op {
            Unary::Neg => map_n([x], |[a]| -a),
            Unary::AddScalar(c) => {
                let c = <E::Acc as Acc>::c(c);
                map_n([x], |[a]| a + c)
            }
            Unary::MulScalar(c) => {
                let c = <E::Acc as Acc>::c(c);
                map_n([x], |[a]| a * c)
            }
            Unary::Powf(c) => {
                let c = <E::Acc as Acc>::c(c);
                map_n([x], |[a]| a.powf(c))
            }
            Unary::Relu => map_n([x], |[a]| if a < zero { zero } else { a }),
            Unary::Gelu => {
                let r = <E::Acc as Acc>::c(core::f64::consts::FRAC_1_SQRT_2);
                map_n([x], |[a]| half * a * (one + (a * r).erf()))
            }
            Unary::GeluTanh => {
                let k = <E::Acc as Acc>::c((2.0 / core::f64::consts::PI).sqrt());
                let c = <E::Acc as Acc>::c(0.044715);
                map_n([x], |[a]| half * a * (one + (k * (a + c * a * a * a)).tanh()))
            }
            Unary::Tanh => map_n([x], |[a]| a.tanh()),
            Unary::Sigmoid => map_n([x], |[a]| one / (one + (-a).exp())),
            Unary::Exp => map_n([x], |[a]| a.exp()),
            Unary::Log => map_n([x], |[a]| a.ln()),
            Unary::Abs => map_n([x], |[a]| a.abs()),
            Unary::Huber(d) => {
                let d = <E::Acc as Acc>::c(d);
                map_n([x], |[a]| {
                    if a.abs() <= d {
                        half * a * a
                    } else {
                        d * (a.abs() - half * d)
                    }
                })
            }
            Unary::Sqrt => map_n([x], |[a]| a.sqrt()),
            Unary::Clamp(lo, hi) => {
                let (lo, hi) = (<E::Acc as Acc>::c(lo), <E::Acc as Acc>::c(hi));
                // Comparisons with NaN are false, so NaN passes through.
                map_n([x], |[a]| {
                    if a < lo {
                        lo
                    } else if a > hi {
                        hi
                    } else {
                        a
                    }
                })
            }
        }
    }

    unsafe fn unary_backward_unchecked<E: Float>(
        op: Unary,
        x: &ArrayD<E>,
        y: &ArrayD<E>,
        dy: &ArrayD<E>,
    ) -> ArrayD<E> {
        let c = <E::Acc as Acc>::c;
        let (half, one, zero) = (c(0.5), c(1.0), c(0.0));
        macro_rules! grad {
            (|$x:pat_param, $y:pat_param, $g:ident| $body:expr) => {
                map_n([x, y, dy], |[$x, $y, $g]| $body)
            };
        }
        match op {
            Unary::Neg => grad!(|_, _, g| -g),
            Unary::AddScalar(_) => grad!(|_, _, g| g),
            Unary::MulScalar(s) => grad!(|_, _, g| g * c(s)),
            Unary::Powf(p) => grad!(|x, _, g| g * c(p) * x.powf(c(p - 1.0))),
            Unary::Relu => grad!(|x, _, g| if x <= zero { zero } else { g }),
            Unary::Gelu => {
                let r2 = c(core::f64::consts::FRAC_1_SQRT_2);
                let rpi = c(0.5 * core::f64::consts::FRAC_2_SQRT_PI * core::f64::consts::FRAC_1_SQRT_2);
                grad!(|x, _, g| {
                    let cdf = half * (one + (x * r2).erf());
                    let pdf = (-half * x * x).exp() * rpi;
                    g * (cdf + x * pdf)
                })
            }
            Unary::GeluTanh => {
                let k = c((2.0 / core::f64::consts::PI).sqrt());
                let a = c(0.044715);
                grad!(|x, _, g| {
                    let t = (k * (x + a * x * x * x)).tanh();
                    let inner_d = k * (one + c(3.0) * a * x * x);
                    g * (half * (one + t) + half * x * (one - t * t) * inner_d)
                })
            }
            Unary::Tanh => grad!(|_, y, g| g * (one - y * y)),
            Unary::Sigmoid => grad!(|_, y, g| g * y * (one - y)),
            Unary::Exp => grad!(|_, y, g| g * y),
            Unary::Log => grad!(|x, _, g| g / x),
            Unary::Abs => grad!(|x, _, g| if x > zero {
                g
            } else if x < zero {
                -g
            } else {
                zero
            }),
            Unary::Huber(d) => {
                let d = c(d);
                // clamp(x, -delta, delta), NaN passed through.
                grad!(|x, _, g| g * if x < -d {
                    -d
                } else if x > d {
                    d
                } else {
                    x
                })
            }
            Unary::Sqrt => grad!(|_, y, g| g / (c(2.0) * y)),
            Unary::Clamp(lo, hi) => {
                let (lo, hi) = (c(lo), c(hi));
                grad!(|x, _, g| if x >= lo && x <= hi { g } else { zero })
            }
        }
    }

    unsafe fn binary_unchecked<E: Float>(
        op: Binary,
        a: &ArrayD<E>,
        b: &ArrayD<E>,
        out_shape: &[usize],
    ) -> ArrayD<E> {
        fn full<'a, E: Float>(x: &'a ArrayD<E>, shape: &[usize]) -> std::borrow::Cow<'a, ArrayD<E>> {
            match x.shape() == shape {
                true => std::borrow::Cow::Borrowed(x),
                false => std::borrow::Cow::Owned(Cpu::broadcast_to(x, shape)),
            }
        }
        let (a, b) = (full(a, out_shape), full(b, out_shape));
        let ab = [&*a, &*b];
        match op {
            Binary::Add => map_n(ab, |[x, y]| x + y),
            Binary::Sub => map_n(ab, |[x, y]| x - y),
            Binary::Mul => map_n(ab, |[x, y]| x * y),
            Binary::Div => map_n(ab, |[x, y]| x / y),
        }
    }

    unsafe fn sum_to_shape_unchecked<E: Float>(s: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
        if s.shape() == shape {
            return s.clone();
        }
        let lead = s.ndim() - shape.len();
        if s.shape()[lead..] == *shape {
            // Summing whole leading axes (a bias gradient from `[batch, out]`): rows added into
            // one f64 row, no widened copy of the input.
            let cols = shape.iter().product::<usize>().max(1);
            let data = standard(s);
            let mut acc = vec![0.0f64; cols];
            add_rows(&data, &mut acc);
            return from_vec(shape, acc.into_iter().map(E::from_f64).collect());
        }
        let mut acc: ArrayD<f64> = s.mapv(|v| v.as_f64());
        for _ in 0..lead {
            acc = acc.sum_axis(Axis(0));
        }
        for (i, &d) in shape.iter().enumerate() {
            if d == 1 && acc.shape()[i] != 1 {
                acc = acc.sum_axis(Axis(i)).insert_axis(Axis(i));
            }
        }
        acc.mapv(E::from_f64)
    }

    unsafe fn broadcast_to_unchecked<E: Element>(s: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
        s.broadcast(IxDyn(shape))
            .expect("shapes broadcast (checked by caller)")
            .as_standard_layout()
            .into_owned()
    }

    unsafe fn sum_unchecked<E: Float>(
        s: &ArrayD<E>,
        axis: Option<usize>,
        keepdim: bool,
        scale: f64,
    ) -> ArrayD<E> {
        match axis {
            None => {
                let total: f64 = s.iter().map(|v| v.as_f64()).sum();
                let out = ArrayD::from_elem(IxDyn(&[]), E::from_f64(total * scale));
                if keepdim {
                    out.into_shape_with_order(vec![1; s.ndim()]).expect("one element")
                } else {
                    out
                }
            }
            Some(ax) => {
                let r = s.map_axis(Axis(ax), |lane| {
                    E::from_f64(lane.iter().map(|v| v.as_f64()).sum::<f64>() * scale)
                });
                let r = if keepdim { r.insert_axis(Axis(ax)) } else { r };
                Self::from_array(r)
            }
        }
    }

    unsafe fn matmul_unchecked<E: Float>(
        a: &ArrayD<E>,
        b: &ArrayD<E>,
        ta: bool,
        tb: bool,
        bias: Option<&ArrayD<E>>,
    ) -> ArrayD<E> {
        let (sa, sb) = (a.as_standard_layout(), b.as_standard_layout());
        let c = product(as_2d(sa.view(), ta), as_2d(sb.view(), tb), bias);
        let shape = super::matmul_shape(a.shape(), b.shape(), ta, tb);
        c.into_shape_with_order(IxDyn(&shape))
            .expect("a fresh product is row-major with the result's element count")
    }

    unsafe fn bmm_unchecked<E: Float>(a: &ArrayD<E>, b: &ArrayD<E>, ta: bool, tb: bool) -> ArrayD<E> {
        batched_product(a, b, ta, tb)
    }

    fn softmax<E: Float>(x: &ArrayD<E>, log: bool) -> ArrayD<E> {
        let cols = rows_of(x.shape()).1.max(1);
        let data = standard(x);
        let mut out = vec![E::zero(); data.len()];
        // Rows split across threads (attention's scores are many rows); each row as before.
        par_parts(&mut out, PARALLEL_MIN_ELEMENTS, cols, |lo, part| {
            // Each row's exponentials, computed once for the sum and the outputs.
            let mut exps = vec![0.0f64; cols];
            for (row, o) in data[lo..lo + part.len()].chunks(cols).zip(part.chunks_mut(cols)) {
                let max = row.iter().map(|v| v.as_f64()).fold(f64::NEG_INFINITY, f64::max);
                let max = if max.is_finite() { max } else { 0.0 };
                for (e, v) in exps.iter_mut().zip(row) {
                    *e = (v.as_f64() - max).exp();
                }
                let denom: f64 = exps[..row.len()].iter().sum();
                if log {
                    // PyTorch's CPU kernel keeps the row's sum of exponentials, then its log, in
                    // the element type (`tmp_sum_scalar` in LogSoftmaxKernelImpl.h) before
                    // computing `x - max - lse` wide and rounding once; so does nbit. In bf16 that
                    // moves about one output in six by an ulp, and the ulps compound over a
                    // 16-true run.
                    let lse = E::from_f64(E::from_f64(denom).as_f64().ln()).as_f64();
                    for (o, v) in o.iter_mut().zip(row) {
                        *o = E::from_f64(v.as_f64() - max - lse);
                    }
                } else {
                    for (o, e) in o.iter_mut().zip(&exps) {
                        *o = E::from_f64(e / denom);
                    }
                }
            }
        });
        from_vec(x.shape(), out)
    }

    unsafe fn softmax_backward_unchecked<E: Float>(y: &ArrayD<E>, dy: &ArrayD<E>, log: bool) -> ArrayD<E> {
        let cols = rows_of(y.shape()).1.max(1);
        let (y_s, dy_s) = (standard(y), standard(dy));
        let mut out = vec![E::zero(); y_s.len()];
        par_parts(&mut out, PARALLEL_MIN_ELEMENTS, cols, |lo, part| {
            let (ys, gs) = (&y_s[lo..lo + part.len()], &dy_s[lo..lo + part.len()]);
            for ((yr, gr), o) in ys.chunks(cols).zip(gs.chunks(cols)).zip(part.chunks_mut(cols)) {
                if log {
                    let gsum: f64 = gr.iter().map(|g| g.as_f64()).sum();
                    for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                        *o = E::from_f64(g.as_f64() - y.as_f64().exp() * gsum);
                    }
                } else {
                    let dot: f64 = yr.iter().zip(gr).map(|(y, g)| y.as_f64() * g.as_f64()).sum();
                    for ((o, y), g) in o.iter_mut().zip(yr).zip(gr) {
                        *o = E::from_f64(y.as_f64() * (g.as_f64() - dot));
                    }
                }
            }
        });
        from_vec(y.shape(), out)
    }

    unsafe fn nll_loss_unchecked<E: Float>(logp: &ArrayD<E>, targets: &[usize]) -> ArrayD<E> {
        let (rows, cols) = rows_of(logp.shape());
        let data = standard(logp);
        let total: f64 = targets
            .iter()
            .enumerate()
            .map(|(i, &t)| data[i * cols + t].as_f64())
            .sum();
        ArrayD::from_elem(IxDyn(&[]), E::from_f64(-total / rows.max(1) as f64))
    }

    unsafe fn nll_loss_backward_unchecked<E: Float>(
        shape: &[usize],
        targets: &[usize],
        dy: &ArrayD<E>,
    ) -> ArrayD<E> {
        let (rows, cols) = rows_of(shape);
        let g = -dy.iter().next().map_or(0.0, |v| v.as_f64()) / rows.max(1) as f64;
        let mut out = vec![E::from_f64(0.0); rows * cols];
        for (i, &t) in targets.iter().enumerate() {
            out[i * cols + t] = E::from_f64(g);
        }
        from_vec(shape, out)
    }

    unsafe fn layer_norm_unchecked<E: Float>(
        x: &ArrayD<E>,
        weight: Option<&ArrayD<E>>,
        bias: Option<&ArrayD<E>>,
        eps: f64,
    ) -> (ArrayD<E>, ArrayD<f64>) {
        let (rows, cols) = rows_of(x.shape());
        let data = standard(x);
        let w = weight.map(|w| standard(w).iter().map(|v| v.as_f64()).collect::<Vec<_>>());
        let b = bias.map(|b| standard(b).iter().map(|v| v.as_f64()).collect::<Vec<_>>());
        let cols = cols.max(1);
        let mut out = vec![E::zero(); data.len()];
        let mut stats = vec![0.0f64; 2 * rows];
        let shared = Disjoint::new(&mut stats);
        // Rows split across threads, each row as before (f64 statistics).
        par_parts(&mut out, PARALLEL_MIN_ELEMENTS, cols, |lo, part| {
            // SAFETY: the row ranges of `par_parts` are disjoint, so are their statistics.
            let st = unsafe { shared.range(2 * lo / cols, 2 * (lo + part.len()) / cols) };
            let rows_here = data[lo..lo + part.len()].chunks(cols).zip(part.chunks_mut(cols));
            for ((row, o), st) in rows_here.zip(st.chunks_mut(2)) {
                let n = row.len() as f64;
                let mean = row.iter().map(|v| v.as_f64()).sum::<f64>() / n;
                let var = row.iter().map(|v| (v.as_f64() - mean).powi(2)).sum::<f64>() / n;
                let rstd = 1.0 / (var + eps).sqrt();
                st.copy_from_slice(&[mean, rstd]);
                for (j, (o, v)) in o.iter_mut().zip(row).enumerate() {
                    let mut h = (v.as_f64() - mean) * rstd;
                    if let Some(w) = &w {
                        h *= w[j];
                    }
                    if let Some(b) = &b {
                        h += b[j];
                    }
                    *o = E::from_f64(h);
                }
            }
        });
        (from_vec(x.shape(), out), from_vec(&[rows, 2], stats))
    }

    unsafe fn layer_norm_backward_unchecked<E: Float>(
        x: &ArrayD<E>,
        weight: Option<&ArrayD<E>>,
        stats: &ArrayD<f64>,
        dy: &ArrayD<E>,
        with_bias: bool,
    ) -> (ArrayD<E>, Option<ArrayD<E>>, Option<ArrayD<E>>) {
        let (_, cols) = rows_of(x.shape());
        let (xs, gs) = (standard(x), standard(dy));
        let w = weight.map(|w| standard(w).iter().map(|v| v.as_f64()).collect::<Vec<_>>());
        let mut dx = Vec::with_capacity(xs.len());
        let mut dw = vec![0.0f64; cols];
        let mut db = vec![0.0f64; cols];
        let stats = standard(stats);
        for ((xr, gr), ms) in xs
            .chunks(cols.max(1))
            .zip(gs.chunks(cols.max(1)))
            .zip(stats.chunks_exact(2))
        {
            let (mean, rstd) = (ms[0], ms[1]);
            let n = xr.len() as f64;
            let xhat: Vec<f64> = xr.iter().map(|v| (v.as_f64() - mean) * rstd).collect();
            let g: Vec<f64> = gr
                .iter()
                .enumerate()
                .map(|(j, v)| v.as_f64() * w.as_ref().map_or(1.0, |w| w[j]))
                .collect();
            let mean_g = g.iter().sum::<f64>() / n;
            let mean_gx = g.iter().zip(&xhat).map(|(a, b)| a * b).sum::<f64>() / n;
            dx.extend(
                g.iter()
                    .zip(&xhat)
                    .map(|(g, h)| E::from_f64(rstd * (g - mean_g - h * mean_gx))),
            );
            for j in 0..xr.len() {
                let d = gr[j].as_f64();
                dw[j] += d * xhat[j];
                db[j] += d;
            }
        }
        let param = |v: Vec<f64>| from_vec(&[cols], v.into_iter().map(E::from_f64).collect());
        (
            from_vec(x.shape(), dx),
            weight.map(|_| param(dw)),
            with_bias.then(|| param(db)),
        )
    }

    unsafe fn index_select_unchecked<E: Element>(s: &ArrayD<E>, axis: usize, index: &[usize]) -> ArrayD<E> {
        indexing::index_select(s, axis, index)
    }

    unsafe fn index_add_unchecked<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &ArrayD<E>,
    ) -> ArrayD<E> {
        indexing::index_add(shape, axis, index, src)
    }

    unsafe fn gather_unchecked<E: Element>(
        s: &ArrayD<E>,
        axis: usize,
        index: &[usize],
        index_shape: &[usize],
    ) -> ArrayD<E> {
        indexing::gather(s, axis, index, index_shape)
    }

    unsafe fn scatter_add_unchecked<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &ArrayD<E>,
    ) -> ArrayD<E> {
        indexing::scatter_add(shape, axis, index, src)
    }

    unsafe fn concat_unchecked<E: Element>(parts: &[&ArrayD<E>], axis: usize) -> ArrayD<E> {
        indexing::concat(parts, axis)
    }

    unsafe fn arg_extreme_unchecked<E: Float>(s: &ArrayD<E>, axis: usize, largest: bool) -> Vec<usize> {
        indexing::arg_extreme(s, axis, largest)
    }

    unsafe fn select_unchecked<E: Float>(
        cond: &ArrayD<E>,
        a: &ArrayD<E>,
        b: &ArrayD<E>,
        out_shape: &[usize],
    ) -> ArrayD<E> {
        indexing::select(cond, a, b, out_shape)
    }

    unsafe fn compare_unchecked<E: Float>(
        op: Compare,
        a: &ArrayD<E>,
        b: &ArrayD<E>,
        out_shape: &[usize],
    ) -> ArrayD<E> {
        indexing::compare(op, a, b, out_shape)
    }

    unsafe fn unfold2d_unchecked<E: Float>(x: &ArrayD<E>, geometry: &Conv2dGeometry) -> ArrayD<E> {
        indexing::unfold2d(x, geometry)
    }

    unsafe fn fold2d_unchecked<E: Float>(cols: &ArrayD<E>, geometry: &Conv2dGeometry) -> ArrayD<E> {
        indexing::fold2d(cols, geometry)
    }

    fn dropout_mask<E: Float>(shape: &[usize], p: f64, seed: u64) -> ArrayD<E> {
        let n: usize = shape.iter().product();
        let keep = if p >= 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
        // Counter-based draws: each element's from its index alone, so threads split freely.
        let v = par_new(n, PARALLEL_MIN_ELEMENTS, |lo, part| {
            for (i, o) in part.iter_mut().enumerate() {
                *o = E::from_f64(if uniform(seed, (lo + i) as u64) >= p {
                    keep
                } else {
                    0.0
                });
            }
        });
        from_vec(shape, v)
    }

    fn any_non_finite<E: Float>(s: &ArrayD<E>) -> bool {
        s.iter().any(|v| !v.is_finite())
    }

    fn unscale_check<E: Float>(s: &mut ArrayD<E>, factor: f32) -> bool {
        let f = <E::Acc as Acc>::c(factor as f64);
        let mut found = false;
        s.mapv_inplace(|v| {
            found |= !v.is_finite();
            E::from_acc(v.to_acc() * f)
        });
        found
    }

    fn scale_in_place<E: Float>(s: &mut ArrayD<E>, factor: f64) {
        let f = <E::Acc as Acc>::c(factor);
        s.mapv_inplace(|v| E::from_acc(v.to_acc() * f));
    }

    fn clamp_in_place<E: Float>(s: &mut ArrayD<E>, limit: f64) {
        let (lo, hi) = (E::from_f64(-limit), E::from_f64(limit));
        // NaN stays NaN (comparisons are false), as torch.clamp leaves it.
        s.mapv_inplace(|v| {
            if v < lo {
                lo
            } else if v > hi {
                hi
            } else {
                v
            }
        });
    }

    fn sum_squares<E: Float>(s: &ArrayD<E>) -> f64 {
        s.iter().map(|v| v.as_f64() * v.as_f64()).sum()
    }

    unsafe fn add_in_place_unchecked<E: Float>(a: &mut ArrayD<E>, b: &ArrayD<E>) {
        *a = map_n([&*a, b], |[x, y]| x + y);
    }

    unsafe fn sgd_step_unchecked<E: Float>(
        param: &mut ArrayD<E>,
        grad: &ArrayD<E>,
        momentum_buffer: Option<&mut ArrayD<E>>,
        compensation: Option<&mut ArrayD<E>>,
        hp: &SgdStep,
    ) {
        let p = standard_mut(param);
        let n = p.len();
        let g = standard(grad);
        let (p, buf, comp) = (
            Disjoint::new(p),
            momentum_buffer.map(|b| Disjoint::new(&mut standard_mut(b)[..n])),
            compensation.map(|c| Disjoint::new(&mut standard_mut(c)[..n])),
        );
        // Element-wise, so split across threads; ranges start at multiples of CHUNK (which
        // keeps the stochastic-rounding draws of an element the same for any thread count).
        for_ranges(n, PARALLEL_MIN_ELEMENTS, CHUNK, |lo, hi| {
            // SAFETY: `for_ranges` passes disjoint ranges.
            let (p, b, c) = unsafe {
                (
                    p.range(lo, hi),
                    buf.as_ref().map(|b| b.range(lo, hi)),
                    comp.as_ref().map(|c| c.range(lo, hi)),
                )
            };
            sgd_step_isa(p, &g[lo..hi], b, c, hp, lo);
        });
    }

    unsafe fn adamw_step_unchecked<E: Float>(
        param: &mut ArrayD<E>,
        grad: &ArrayD<E>,
        exp_avg: &mut ArrayD<E>,
        exp_avg_sq: &mut ArrayD<E::Moment>,
        compensation: Option<&mut ArrayD<E>>,
        hp: &AdamWStep,
    ) {
        let p = standard_mut(param);
        let n = p.len();
        let g = standard(grad);
        let (p, m, v, comp) = (
            Disjoint::new(p),
            Disjoint::new(&mut standard_mut(exp_avg)[..n]),
            Disjoint::new(&mut standard_mut(exp_avg_sq)[..n]),
            compensation.map(|c| Disjoint::new(&mut standard_mut(c)[..n])),
        );
        // Split across threads as `sgd_step` is.
        for_ranges(n, PARALLEL_MIN_ELEMENTS, CHUNK, |lo, hi| {
            // SAFETY: `for_ranges` passes disjoint ranges.
            let (p, m, v, c) = unsafe {
                (
                    p.range(lo, hi),
                    m.range(lo, hi),
                    v.range(lo, hi),
                    comp.as_ref().map(|c| c.range(lo, hi)),
                )
            };
            adamw_step_isa(p, &g[lo..hi], m, v, c, hp, lo);
        });
    }
}

mod gemm;
mod indexing;
mod parallel;

use crate::backend::rows_of;
use parallel::{Disjoint, PARALLEL_MIN_ELEMENTS, PARALLEL_MIN_FMAS, for_ranges, par_parts};

use crate::dtype::{Acc, ComplexElement, Element, Float};
pub use gemm::{GEMM_KERNEL_ENV, gemm_kernel_from_env, kernel_name};
pub use parallel::{THREADS_ENV, num_threads, retain_freed_memory, set_num_threads, threads_from_env};

isa_dispatch! {
    /// [`adamw_step_body`] for the best instruction set.
    fn adamw_step_isa<E: Float>(p: &mut [E], g: &[E], m: &mut [E], v: &mut [E::Moment], comp: Option<&mut [E]>, hp: &AdamWStep, offset: usize) => adamw_step_body
}

isa_dispatch! {
    /// Adds the rows of `data` (`acc.len()` wide) into `acc` in f64, compiled for the best
    /// instruction set (the same additions in the same order on every one).
    fn add_rows<E: Float>(data: &[E], acc: &mut [f64]) => add_rows_body
}

#[inline(always)]
fn add_rows_body<E: Float>(data: &[E], acc: &mut [f64]) {
    for row in data.chunks_exact(acc.len()) {
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.as_f64();
        }
    }
}

isa_dispatch! {
    /// [`sgd_step_body`] for the best instruction set.
    fn sgd_step_isa<E: Float>(p: &mut [E], g: &[E], buf: Option<&mut [E]>, comp: Option<&mut [E]>, hp: &SgdStep, offset: usize) => sgd_step_body
}

/// One AdamW update as PyTorch's single-tensor implementation takes it (see the comments inside),
/// over elements `offset..offset + p.len()` of the parameter.
#[inline(always)]
fn adamw_step_body<E: Float>(
    p: &mut [E],
    g: &[E],
    m: &mut [E],
    v: &mut [E::Moment],
    mut comp: Option<&mut [E]>,
    hp: &AdamWStep,
    offset: usize,
) {
    let c = <E::Acc as Acc>::c;
    // `1 - beta` and the bias corrections in f64, then rounded: PyTorch passes them as Python
    // floats.
    let k = hp.scalars();
    let (b2, one_minus_b1, one_minus_b2) = (c(k.beta2), c(k.one_minus_b1), c(k.one_minus_b2));
    let decay = c(k.decay);
    let (step_size, b2s, eps) = (c(k.step_size), c(k.bias2_sqrt), c(k.eps));
    // PyTorch's single-tensor AdamW, one tensor op after another, each rounding to the dtype
    // of the tensor it writes:
    //   param.mul_(1 - lr * wd)
    //   exp_avg.lerp_(grad, 1 - beta1)                       (fused)
    //   exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)   (addcmul fused)
    //   denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    //   param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
    // The second moment and `denom` are tensors of `E::Moment`, so they round there.
    // PyTorch's vectorised `lerp_` and `addcmul_` fuse their multiply-add (one rounding), and
    // `lerp_` takes the other form for weights >= 0.5, so these do too (`mul_add` is IEEE's
    // fused multiply-add on every target).
    let decayed = |p: E::Acc| p * decay;
    let first = |m: E::Acc, g: E::Acc| {
        if one_minus_b1 < c(0.5) {
            one_minus_b1.mul_add(g - m, m)
        } else {
            (m - g).mul_add(c(1.0) - one_minus_b1, g)
        }
    };
    let moment = |v: E::Acc| <E::Moment as Float>::from_acc(v);
    let widen = |v: E::Moment| v.to_acc();
    let in_moment = |v: E::Acc| widen(moment(v));
    let second = |v: &E::Moment, g: E::Acc| moment((one_minus_b2 * g).mul_add(g, in_moment(widen(*v) * b2)));
    let denom = |v: &E::Moment| in_moment(in_moment(in_moment(widen(*v).sqrt()) / b2s) + eps);
    let updated = |p: E::Acc, m: E::Acc, d: E::Acc| p - step_size * m / d;
    // Under nearest rounding the decayed weight is rounded into storage, as `param.mul_` does;
    // the other roundings carry it unrounded into the one rounding of the new weight.
    let (rounding, key) = (hp.rounding, hp.noise_key);
    let nearest = rounding == UpdateRounding::Nearest;
    // One element at a time where nothing is rounded between steps (f32, f64); 16-bit types a
    // chunk at a time, so each conversion is a vectorised loop.
    if same_type::<E, E::Acc>() && nearest {
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
            let g = g.to_acc();
            let pa = E::from_acc(decayed(p.to_acc())).to_acc();
            *m = E::from_acc(first(m.to_acc(), g));
            *v = second(v, g);
            *p = E::from_acc(updated(pa, m.to_acc(), denom(v)));
        }
        return;
    }
    // A chunk at a time, widening and rounding with the slice conversions (see `zip_map`); the
    // other roundings take this path for every type, to round a chunk at a time.
    let zero = c(0.0);
    let (mut wp, mut wg, mut wm, mut t) = ([zero; CHUNK], [zero; CHUNK], [zero; CHUNK], [zero; CHUNK]);
    for start in (0..p.len()).step_by(CHUNK) {
        let r = start..(start + CHUNK).min(p.len());
        let n = r.len();
        let c = comp.as_deref_mut().map(|c| &mut c[r.clone()]);
        let (p, g, m, v) = (&mut p[r.clone()], &g[r.clone()], &mut m[r.clone()], &mut v[r]);
        let (wp, wg, wm, t) = (&mut wp[..n], &mut wg[..n], &mut wm[..n], &mut t[..n]);
        E::widen_slice(p, wp);
        wp.iter_mut().for_each(|p| *p = decayed(*p));
        if nearest {
            store(wp, p);
        }
        E::widen_slice(g, wg);
        E::widen_slice(m, wm);
        for (m, g) in wm.iter_mut().zip(wg.iter()) {
            *m = first(*m, *g);
        }
        store(wm, m);
        for (((t, v), g), (p, m)) in t
            .iter_mut()
            .zip(v.iter_mut())
            .zip(wg.iter())
            .zip(wp.iter().zip(wm.iter()))
        {
            *v = second(v, *g);
            *t = updated(*p, *m, denom(v));
        }
        write_update(t, p, c, rounding, key, offset + start);
    }
}

/// One SGD update as PyTorch's single-tensor implementation takes it (see the comments inside).
#[inline(always)]
fn sgd_step_body<E: Float>(
    p: &mut [E],
    g: &[E],
    mut buf: Option<&mut [E]>,
    mut comp: Option<&mut [E]>,
    hp: &SgdStep,
    offset: usize,
) {
    let c = <E::Acc as Acc>::c;
    let (neg_lr, wd, mom, damp) = (
        c(-hp.lr),
        c(hp.weight_decay),
        c(hp.momentum),
        c(1.0 - hp.dampening),
    );
    // Each value PyTorch keeps as a tensor (the decayed gradient, the momentum buffer) is
    // rounded to the storage dtype before it is used, as PyTorch's tensor ops round it; the
    // arithmetic itself is in E::Acc. PyTorch:
    //   grad = grad.add(param, alpha=wd)                       (if wd != 0)
    //   buf = grad.clone() (first step) | buf.mul_(momentum).add_(grad, alpha=1 - dampening)
    //   grad = grad.add(buf, alpha=momentum) (nesterov) | buf
    //   param.add_(grad, alpha=-lr)
    // `add(x, alpha=a)` is one fused multiply-add in PyTorch's vectorised kernel, so here too.
    let decay = hp.weight_decay != 0.0;
    let decayed = |g: E::Acc, p: E::Acc| wd.mul_add(p, g);
    let scaled = |b: E::Acc| mom * b;
    let accumulated = |sb: E::Acc, d: E::Acc| damp.mul_add(d, sb);
    let nesterov = |d: E::Acc, b: E::Acc| mom.mul_add(b, d);
    let stepped = |p: E::Acc, s: E::Acc| neg_lr.mul_add(s, p);
    let (rounding, key) = (hp.rounding, hp.noise_key);
    // As in `adamw_step_body`: element by element for f32 and f64, by chunks for 16-bit types.
    if same_type::<E, E::Acc>() && rounding == UpdateRounding::Nearest {
        let round = |x: E::Acc| E::from_acc(x).to_acc();
        for (i, (p, g)) in p.iter_mut().zip(g).enumerate() {
            let pa = p.to_acc();
            let d = if decay {
                round(decayed(g.to_acc(), pa))
            } else {
                g.to_acc()
            };
            let s = match buf.as_deref_mut() {
                None => d,
                Some(b) => {
                    let nb = if hp.first {
                        d
                    } else {
                        round(accumulated(round(scaled(b[i].to_acc())), d))
                    };
                    b[i] = E::from_acc(nb);
                    if hp.nesterov { round(nesterov(d, nb)) } else { nb }
                }
            };
            *p = E::from_acc(stepped(pa, s));
        }
        return;
    }
    // A chunk at a time, widening and rounding with the slice conversions (see `zip_map`).
    let zero = c(0.0);
    let (mut wp, mut wd, mut wb, mut t) = ([zero; CHUNK], [zero; CHUNK], [zero; CHUNK], [zero; CHUNK]);
    let mut scratch = [E::zero(); CHUNK];
    // Rounds values to E and back, in place: what keeping them in a tensor does.
    let mut round = |x: &mut [E::Acc]| store(x, &mut scratch[..x.len()]);
    for start in (0..p.len()).step_by(CHUNK) {
        let r = start..(start + CHUNK).min(p.len());
        let n = r.len();
        let (wp, wd, wb, t) = (&mut wp[..n], &mut wd[..n], &mut wb[..n], &mut t[..n]);
        E::widen_slice(&p[r.clone()], wp);
        E::widen_slice(&g[r.clone()], wd);
        if decay {
            for (d, p) in wd.iter_mut().zip(wp.iter()) {
                *d = decayed(*d, *p);
            }
            round(wd);
        }
        let s: &[E::Acc] = match buf.as_deref_mut() {
            None => wd,
            Some(b) => {
                let b = &mut b[r.clone()];
                if hp.first {
                    wb.copy_from_slice(wd);
                } else {
                    E::widen_slice(b, wb);
                    wb.iter_mut().for_each(|b| *b = scaled(*b));
                    round(wb);
                    for (b, d) in wb.iter_mut().zip(wd.iter()) {
                        *b = accumulated(*b, *d);
                    }
                }
                store(wb, b);
                if hp.nesterov {
                    for ((t, d), b) in t.iter_mut().zip(wd.iter()).zip(wb.iter()) {
                        *t = nesterov(*d, *b);
                    }
                    round(t);
                    t
                } else {
                    wb
                }
            }
        };
        for (p, s) in wp.iter_mut().zip(s) {
            *p = stepped(*p, *s);
        }
        let c = comp.as_deref_mut().map(|c| &mut c[r.clone()]);
        write_update(wp, &mut p[r.clone()], c, rounding, key, offset + r.start);
    }
}

/// Writes updated weights `t` (in the compute type) into `p` as `rounding` says: to nearest; with
/// Kahan compensation, adding the buffer `comp` (the same elements) and keeping in it what this
/// rounding drops; or stochastically, element `offset + i` taking 16 bits of draw
/// `(offset + i) / 4` of stream `key`.
#[inline(always)]
fn write_update<E: Float>(
    t: &mut [E::Acc],
    p: &mut [E],
    comp: Option<&mut [E]>,
    rounding: UpdateRounding,
    key: u64,
    offset: usize,
) {
    match (rounding, comp) {
        (UpdateRounding::Compensated, Some(comp)) => {
            for ((t, p), c) in t.iter().zip(p.iter_mut()).zip(comp.iter_mut()) {
                let target = *t + c.to_acc();
                *p = E::from_acc(target);
                *c = E::from_acc(target - p.to_acc());
            }
        }
        (UpdateRounding::Stochastic, _) => {
            // 16 random bits per element, four elements per draw; `offset` is a multiple of 4.
            for (g, (t, p)) in t.chunks(4).zip(p.chunks_mut(4)).enumerate() {
                let bits = random_bits(key, (offset / 4 + g) as u64);
                for (j, (t, p)) in t.iter().zip(p).enumerate() {
                    *p = E::round_stochastic(*t, (bits >> (16 * j)) as u16);
                }
            }
        }
        _ => E::round_slice(t, p),
    }
}

/// Stores `x` in `dst` rounded to `E`, and reads back into `x` what was stored: what a later
/// PyTorch op sees of a value kept in a tensor.
fn store<E: Float>(x: &mut [E::Acc], dst: &mut [E]) {
    E::round_slice(x, dst);
    E::widen_slice(dst, x);
}

/// The elements of `a` as one mutable slice, made row-major first if they are not.
fn standard_mut<E: Element>(a: &mut ArrayD<E>) -> &mut [E] {
    if !a.is_standard_layout() {
        *a = a.as_standard_layout().into_owned();
    }
    a.as_slice_mut().expect("standard layout")
}

fn c64_of<C: ComplexElement>(a: &ArrayD<C>) -> ArrayD<Complex<f64>> {
    a.mapv(ComplexElement::to_c64)
}

impl ComplexBackend for Cpu {
    unsafe fn cmatmul_unchecked<C: ComplexElement>(
        a: &ArrayD<C>,
        b: &ArrayD<C>,
        ta: bool,
        ca: bool,
        tb: bool,
        cb: bool,
    ) -> ArrayD<C> {
        // Four f64 products of the parts (conjugation negates an imaginary part):
        // (ar + i ai)(br + i bi) = (ar br - ai bi) + i (ar bi + ai br), rounded once per part.
        let parts = |z: &ArrayD<C>, conj: bool| {
            let sign = if conj { -1.0 } else { 1.0 };
            (z.mapv(|v| v.to_c64().re), z.mapv(|v| sign * v.to_c64().im))
        };
        let ((ar, ai), (br, bi)) = (parts(a, ca), parts(b, cb));
        let mul =
            |x: &ArrayD<f64>, y: &ArrayD<f64>| gemm_into(as_2d(x.view(), ta), as_2d(y.view(), tb), None);
        let (rr, ii, ri, ir) = (mul(&ar, &br), mul(&ai, &bi), mul(&ar, &bi), mul(&ai, &br));
        Zip::from(&rr)
            .and(&ii)
            .and(&ri)
            .and(&ir)
            .map_collect(|&rr, &ii, &ri, &ir| C::from_c64(Complex::new(rr - ii, ri + ir)))
            .into_dyn()
    }

    unsafe fn cbinary_unchecked<C: ComplexElement>(
        op: Binary,
        a: &ArrayD<C>,
        b: &ArrayD<C>,
        out_shape: &[usize],
    ) -> ArrayD<C> {
        let shape = IxDyn(out_shape);
        let a = a
            .broadcast(shape.clone())
            .expect("shapes broadcast (checked by caller)");
        let b = b.broadcast(shape).expect("shapes broadcast (checked by caller)");
        let f = |x: &C, y: &C| {
            let (x, y) = (x.to_c64(), y.to_c64());
            C::from_c64(match op {
                Binary::Add => x + y,
                Binary::Sub => x - y,
                Binary::Mul => x * y,
                Binary::Div => x / y,
            })
        };
        Self::from_array(Zip::from(&a).and(&b).map_collect(f))
    }

    fn cunary<C: ComplexElement>(op: ComplexUnary, z: &ArrayD<C>) -> ArrayD<C> {
        z.mapv(|v| {
            let v = v.to_c64();
            C::from_c64(match op {
                ComplexUnary::Neg => -v,
                ComplexUnary::Conj => v.conj(),
                ComplexUnary::Exp => v.exp(),
                ComplexUnary::MulScalar(c) => v * c,
                ComplexUnary::Sign => {
                    let r = v.norm();
                    if r == 0.0 { Complex::new(0.0, 0.0) } else { v / r }
                }
            })
        })
    }

    unsafe fn csum_to_shape_unchecked<C: ComplexElement>(s: &ArrayD<C>, shape: &[usize]) -> ArrayD<C> {
        let (re, im) = Self::complex_parts::<Complex<f64>>(&c64_of(s));
        let (re, im) = (Self::sum_to_shape(&re, shape), Self::sum_to_shape(&im, shape));
        Zip::from(&re).and(&im).map_collect(|r, i| C::from_parts(*r, *i))
    }

    fn complex_parts<C: ComplexElement>(z: &ArrayD<C>) -> (ArrayD<C::Real>, ArrayD<C::Real>) {
        let re = z.mapv(|v| C::Real::from_f64(v.to_c64().re));
        let im = z.mapv(|v| C::Real::from_f64(v.to_c64().im));
        (re, im)
    }

    unsafe fn complex_from_parts_unchecked<C: ComplexElement>(
        re: &ArrayD<C::Real>,
        im: &ArrayD<C::Real>,
    ) -> ArrayD<C> {
        Self::from_array(
            Zip::from(re)
                .and(im)
                .map_collect(|r, i| C::from_parts(r.as_f64(), i.as_f64())),
        )
    }

    fn cabs<C: ComplexElement>(z: &ArrayD<C>) -> ArrayD<C::Real> {
        z.mapv(|v| C::Real::from_f64(v.to_c64().norm()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::mix64;
    use super::*;
    use half::bf16;

    #[test]
    fn element_wise_kernels_give_the_same_bits_on_any_number_of_threads() {
        // Above PARALLEL_MIN_ELEMENTS, so the work splits; stochastic rounding included, whose
        // draws depend on the element's index, not on the thread that rounds it.
        let n = PARALLEL_MIN_ELEMENTS + 1000;
        let v = |seed: u64| {
            ArrayD::from_shape_fn(IxDyn(&[n]), |i| {
                bf16::from_f64(((mix64(seed ^ i[0] as u64) >> 11) as f64 / (1u64 << 53) as f64) - 0.5)
            })
        };
        let run = |threads: usize, rounding: UpdateRounding| {
            set_num_threads(threads);
            let (mut p, g, mut buf) = (v(1), v(2), v(3));
            let hp = SgdStep {
                lr: 0.1,
                momentum: 0.9,
                dampening: 0.0,
                nesterov: false,
                weight_decay: 0.01,
                first: false,
                rounding,
                noise_key: 42,
            };
            <Cpu as Backend>::sgd_step(&mut p, &g, Some(&mut buf), None, &hp);
            let cast: ArrayD<f32> = <Cpu as Backend>::cast(&p);
            let rows = g
                .clone()
                .into_shape_with_order(IxDyn(&[n / 8, 8]))
                .expect("n is a multiple of 8");
            let sum = <Cpu as Backend>::sum_to_shape(&rows, &[8]);
            (p, buf, cast, sum)
        };
        for rounding in [UpdateRounding::Nearest, UpdateRounding::Stochastic] {
            let one = run(1, rounding);
            for threads in [2, 3] {
                assert_eq!(run(threads, rounding), one, "{threads} threads, {rounding:?}");
            }
        }
        set_num_threads(0);
    }
}
