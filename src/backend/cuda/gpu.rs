//! [`Backend`] for [`Gpu`]: tensors in device memory, every op a launch of a `kernels.cu` kernel
//! or a cuBLAS product through the [`Driver`] of this process. Copies to the GPU do not make the
//! host wait (the driver stages them in pinned memory, 4 MiB between waits); copies to the host do: `to_array`, a
//! loss's value, the scaler's found-inf flag, the gradient norms (all in one copy) and `argmax`'s
//! indices. A training step waits once ([`host_waits`](super::host_waits) counts).

use core::ffi::c_void;
use core::marker::PhantomData;

use ndarray::ArrayD;

use super::driver::{Driver, Gemm, Kernel, driver, fail};
use crate::backend::{
    AdamWStep, Backend, Binary, Compare, ComplexBackend, ComplexUnary, Conv2dGeometry, SgdStep, Unary,
    UpdateRounding,
};
use crate::backend::{as_matrix, matmul_shape, rows_of};
use crate::device::Gpu;
use crate::dtype::{ComplexElement, DType, Element, Float};
use num_complex::Complex;

/// What the GPU backend does not run on the GPU: LAPACK (the `lapack` feature's solvers are
/// CPU-only). Every op of [`Backend`] and [`ComplexBackend`] is a kernel or a cuBLAS product.
pub const NOT_ON_THE_GPU: [&str; 1] = ["linalg (the lapack feature's solvers)"];

/// One device allocation, freed on drop.
struct Buffer {
    ptr: u64,
}

impl Buffer {
    fn new(op: &'static str, bytes: usize) -> Buffer {
        let ptr = drv()
            .alloc(bytes)
            .unwrap_or_else(|e| fail(op, format!("allocating {bytes} bytes: {e}")));
        Buffer { ptr }
    }

    /// A small host slice (targets, pointer tables, a flag) on the device.
    fn upload<T: Copy>(op: &'static str, values: &[T]) -> Buffer {
        let b = Buffer::new(op, size_of_val(values));
        // SAFETY: `b` holds the slice's bytes.
        unsafe { drv().upload(b.ptr, as_bytes(values)) }.unwrap_or_else(|e| fail(op, e));
        b
    }

    /// The first `n` values of type `T` (waits for the work before it).
    fn read<T: Copy + Default>(&self, op: &'static str, n: usize) -> Vec<T> {
        let mut v = vec![T::default(); n];
        // SAFETY: plain data; the buffer holds at least `n` values (the callers' sizes).
        let bytes =
            unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, size_of_val(&v[..])) };
        unsafe { drv().download(bytes, self.ptr) }.unwrap_or_else(|e| fail(op, e));
        v
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Ok(d) = driver() {
            // SAFETY: allocated by this driver, never used again.
            unsafe { d.free(self.ptr) }
        }
    }
}

/// A tensor's data in GPU memory: its shape (row-major, contiguous), the device it lives on, and
/// the allocation. Cloning copies on the device; dropping frees.
pub struct GpuStorage<E: Element> {
    shape: Vec<usize>,
    /// Owns the allocation.
    _buf: Buffer,
    /// Its address (the buffer's, kept here for the launch sites).
    ptr: u64,
    device: usize,
    _e: PhantomData<E>,
}

impl<E: Element> GpuStorage<E> {
    /// Uninitialised memory for `shape` (every kernel writing it covers every element).
    fn empty(op: &'static str, shape: &[usize]) -> Self {
        let buf = Buffer::new(op, shape.iter().product::<usize>() * size_of::<E>());
        GpuStorage {
            shape: shape.to_vec(),
            ptr: buf.ptr,
            _buf: buf,
            device: drv().ordinal(),
            _e: PhantomData,
        }
    }

    /// The device address and the element count, for another CUDA library (NCCL) to work on
    /// this memory in place.
    pub(crate) fn device_slice(&mut self) -> (u64, usize) {
        (self.ptr, self.len())
    }

    fn len(&self) -> usize {
        self.shape.iter().product()
    }

    fn bytes(&self) -> usize {
        self.len() * size_of::<E>()
    }

    /// The CUDA index of the GPU holding this tensor (one GPU per process for now, chosen by
    /// `NBIT_CUDA_DEVICE`).
    pub fn device_index(&self) -> usize {
        self.device
    }

    /// The same bytes under another element type of the same size and another shape.
    fn copied_as<F: Element>(&self, op: &'static str, shape: &[usize]) -> GpuStorage<F> {
        let out = GpuStorage::<F>::empty(op, shape);
        // SAFETY: both hold `bytes` bytes (same element count and size, checked by the callers).
        unsafe { drv().copy(out.ptr, self.ptr, self.bytes()) }.unwrap_or_else(|e| fail(op, e));
        out
    }
}

impl<E: Element> GpuStorage<E> {
    /// The same allocation under another element type of the same size.
    fn retyped<F: Element>(self) -> GpuStorage<F> {
        debug_assert_eq!(size_of::<E>(), size_of::<F>());
        GpuStorage {
            shape: self.shape,
            _buf: self._buf,
            ptr: self.ptr,
            device: self.device,
            _e: PhantomData,
        }
    }
}

impl<E: Element> Clone for GpuStorage<E> {
    fn clone(&self) -> Self {
        self.copied_as("clone", &self.shape)
    }
}

impl<E: Element> core::fmt::Debug for GpuStorage<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "GpuStorage<{}>{:?} on cuda:{}",
            E::DTYPE,
            self.shape,
            self.device
        )
    }
}

fn drv() -> &'static dyn Driver {
    driver().unwrap_or_else(|e| fail("start", e.to_string()))
}

/// The kernels' name for a real type.
fn suffix<E: Element>() -> &'static str {
    match E::DTYPE {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        other => fail("kernel", format!("no GPU kernels for {other}")),
    }
}

/// The data-movement kernels' name for an element size.
fn size_suffix<E: Element>() -> &'static str {
    match size_of::<E>() {
        2 => "b2",
        4 => "b4",
        8 => "b8",
        16 => "b16",
        n => fail("copy", format!("no GPU copy for {n}-byte elements")),
    }
}

/// Pointers to each launch argument (cuLaunchKernel's `kernelParams`); each argument must be a
/// local of the kernel parameter's exact C type (u64 for a pointer).
macro_rules! args {
    ($($a:expr),* $(,)?) => { &mut [$(&$a as *const _ as *mut c_void),*] };
}

/// Launches `kernel` on `grid` x `grid_y` blocks of the driver's block size.
fn launch(op: &'static str, kernel: Kernel, grid: (u32, u32), args: &mut [*mut c_void]) {
    let d = drv();
    // SAFETY: every caller passes the kernel's parameter types, with device pointers from live
    // storages of the sizes the kernel reads.
    unsafe { d.launch(kernel, grid, d.block(), args) }.unwrap_or_else(|e| fail(op, e));
}

/// Blocks for a grid-stride kernel over `n` items.
fn blocks(n: usize) -> u32 {
    let d = drv();
    (n.div_ceil(d.block() as usize)).clamp(1, d.max_blocks() as usize) as u32
}

/// `NbitBroadcast` of kernels.cu: an iteration shape and two element strides per axis.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    ndim: i32,
    shape: [i64; MAX_DIMS],
    stride_a: [i64; MAX_DIMS],
    stride_b: [i64; MAX_DIMS],
}

/// The most axes a kernel's geometry holds.
pub(crate) const MAX_DIMS: usize = 8;

impl Geometry {
    /// Iterates `shape` reading at strides `a` and `b` (right-aligned: missing leading axes are 0).
    pub(crate) fn new(op: &'static str, shape: &[usize], a: &[i64], b: &[i64]) -> Geometry {
        if shape.len() > MAX_DIMS {
            fail(
                op,
                format!("shape {shape:?} has more than {MAX_DIMS} axes, the GPU kernels' limit"),
            );
        }
        let mut g = Geometry {
            ndim: shape.len() as i32,
            shape: [1; MAX_DIMS],
            stride_a: [0; MAX_DIMS],
            stride_b: [0; MAX_DIMS],
        };
        let n = shape.len();
        for (dst, &v) in g.shape.iter_mut().zip(shape) {
            *dst = v as i64;
        }
        for (dst, src) in [(&mut g.stride_a, a), (&mut g.stride_b, b)] {
            for (i, &s) in src.iter().enumerate() {
                dst[n - src.len() + i] = s;
            }
        }
        g
    }
}

/// Row-major element strides of `shape`.
pub(crate) fn strides(shape: &[usize]) -> Vec<i64> {
    let mut st = vec![0i64; shape.len()];
    let mut acc = 1i64;
    for d in (0..shape.len()).rev() {
        st[d] = acc;
        acc *= shape[d] as i64;
    }
    st
}

/// The strides that read `shape` broadcast to `out` (0 along broadcast axes).
pub(crate) fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<i64> {
    let st = strides(shape);
    let lead = out.len() - shape.len();
    (0..out.len())
        .map(|d| match d.checked_sub(lead) {
            Some(i) if shape[i] != 1 => st[i],
            _ => 0,
        })
        .collect()
}

/// Out-of-place copy of `x`'s elements through `g` (source strides a, destination strides b).
fn copy_into<E: Element>(op: &'static str, x: u64, out: u64, g: Geometry) {
    let n: i64 = g.shape[..g.ndim as usize].iter().product();
    launch(
        op,
        Kernel::new("copy", size_suffix::<E>()),
        (blocks(n as usize), 1),
        args![x, out, n, g],
    );
}

/// The sum over the axes in `reduced` of `s`, scaled, into a new tensor of `out_shape`.
fn reduce<E: Float>(
    op: &'static str,
    s: &GpuStorage<E>,
    reduced: &[bool],
    out_shape: &[usize],
    scale: f64,
) -> GpuStorage<E> {
    let st = strides(&s.shape);
    let pick = |want: bool| -> (Vec<usize>, Vec<i64>) {
        (0..s.shape.len())
            .filter(|&d| reduced[d] == want)
            .map(|d| (s.shape[d], st[d]))
            .unzip()
    };
    let (keep_shape, keep_st) = pick(false);
    let (red_shape, red_st) = pick(true);
    let keep = Geometry::new(op, &keep_shape, &keep_st, &[]);
    let red = Geometry::new(op, &red_shape, &red_st, &[]);
    let out = GpuStorage::<E>::empty(op, out_shape);
    let (n_out, n_red) = (out.len() as i64, red_shape.iter().product::<usize>() as i64);
    let (x, o) = (s.ptr, out.ptr);
    launch(
        op,
        Kernel::new("reduce", suffix::<E>()),
        (blocks(n_out as usize), 1),
        args![x, o, n_out, n_red, keep, red, scale],
    );
    out
}

/// The f64 sum of every element (of its square when `square`), scaled, into `out` (one element of
/// type `T`): two passes, block partials then one block.
/// The sum (of squares when `square`) of `s` times `scale`, written as a `T` at device address
/// `out`.
fn total<E: Float, T: Float>(op: &'static str, s: &GpuStorage<E>, square: bool, scale: f64, out: u64) {
    let n = s.len() as i64;
    let g = blocks(s.len());
    let partials = GpuStorage::<f64>::empty(op, &[g as usize]);
    let (x, p, sq) = (s.ptr, partials.ptr, square as i32);
    launch(
        op,
        Kernel::new("sum_partial", suffix::<E>()),
        (g, 1),
        args![x, n, sq, p],
    );
    let (count, o) = (g as i64, out);
    launch(
        op,
        Kernel::new("sum_finish", suffix::<T>()),
        (1, 1),
        args![p, count, o, scale],
    );
}

/// The op code and two scalars of a [`Unary`] in kernels.cu's numbering.
fn unary_code(op: Unary) -> (i32, f64, f64) {
    match op {
        Unary::Neg => (0, 0.0, 0.0),
        Unary::AddScalar(c) => (1, c, 0.0),
        Unary::MulScalar(c) => (2, c, 0.0),
        Unary::Powf(p) => (3, p, 0.0),
        Unary::Relu => (4, 0.0, 0.0),
        Unary::Gelu => (5, 0.0, 0.0),
        Unary::GeluTanh => (6, 0.0, 0.0),
        Unary::Tanh => (7, 0.0, 0.0),
        Unary::Sigmoid => (8, 0.0, 0.0),
        Unary::Exp => (9, 0.0, 0.0),
        Unary::Log => (10, 0.0, 0.0),
        Unary::Abs => (11, 0.0, 0.0),
        Unary::Huber(d) => (12, d, 0.0),
        Unary::Sqrt => (13, 0.0, 0.0),
        Unary::Clamp(lo, hi) => (14, lo, hi),
    }
}

/// `op(x)` written to `out` (which may be `x`).
fn unary_into<E: Float>(op: Unary, x: u64, out: u64, n: usize) {
    let (code, a, b) = unary_code(op);
    let n = n as i64;
    launch(
        "unary",
        Kernel::new("unary", suffix::<E>()),
        (blocks(n as usize), 1),
        args![x, out, n, code, a, b],
    );
}

/// kernels.cu's code of a [`Binary`].
fn binary_code(op: Binary) -> i32 {
    match op {
        Binary::Add => 0,
        Binary::Sub => 1,
        Binary::Mul => 2,
        Binary::Div => 3,
    }
}

/// `op(a, b)` written to `out` (which may be `a`), broadcasting to `out_shape`.
fn binary_into<E: Float>(op: Binary, a: &GpuStorage<E>, b: &GpuStorage<E>, out: u64, out_shape: &[usize]) {
    let g = Geometry::new(
        "binary",
        out_shape,
        &broadcast_strides(&a.shape, out_shape),
        &broadcast_strides(&b.shape, out_shape),
    );
    let code = binary_code(op);
    let n = out_shape.iter().product::<usize>() as i64;
    let (pa, pb) = (a.ptr, b.ptr);
    launch(
        "binary",
        Kernel::new("binary", suffix::<E>()),
        (blocks(n as usize), 1),
        args![pa, pb, out, n, code, g],
    );
}

/// `(outer, n, inner)` around `axis` ([`crate::backend::split`]) as the kernels' i64.
fn split(shape: &[usize], axis: usize) -> (i64, i64, i64) {
    let (outer, n, inner) = crate::backend::split(shape, axis);
    (outer as i64, n as i64, inner as i64)
}

/// One block per row, at most the driver's grid.
fn row_blocks(rows: usize) -> u32 {
    rows.clamp(1, drv().max_blocks() as usize) as u32
}

/// A device pointer, or null (0) for an absent optional operand.
fn ptr_or_null<E: Element>(s: Option<&GpuStorage<E>>) -> u64 {
    s.map_or(0, |s| s.ptr)
}

/// Host indices as the kernels' i64 on the device.
fn indices(op: &'static str, index: &[usize]) -> Buffer {
    Buffer::upload(op, &index.iter().map(|&i| i as i64).collect::<Vec<i64>>())
}

/// `NbitConv` of kernels.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConvGeometry {
    batch: i64,
    channels: i64,
    h: i64,
    w: i64,
    kh: i64,
    kw: i64,
    sh: i64,
    sw: i64,
    ph: i64,
    pw: i64,
    dh: i64,
    dw: i64,
    oh: i64,
    ow: i64,
}

impl ConvGeometry {
    fn new(g: &Conv2dGeometry) -> ConvGeometry {
        let (oh, ow) = g
            .output()
            .unwrap_or_else(|| fail("conv2d", format!("{g:?} has no output")));
        let i = |v: usize| v as i64;
        ConvGeometry {
            batch: i(g.batch),
            channels: i(g.channels),
            h: i(g.input.0),
            w: i(g.input.1),
            kh: i(g.kernel.0),
            kw: i(g.kernel.1),
            sh: i(g.stride.0),
            sw: i(g.stride.1),
            ph: i(g.padding.0),
            pw: i(g.padding.1),
            dh: i(g.dilation.0),
            dw: i(g.dilation.1),
            oh: i(oh),
            ow: i(ow),
        }
    }
}

/// `NbitSgd` of kernels.cu.
#[repr(C)]
struct SgdScalars {
    lr: f64,
    momentum: f64,
    dampening: f64,
    weight_decay: f64,
    nesterov: i32,
    first: i32,
    rounding: i32,
    unused: i32,
    key: u64,
}

/// `NbitAdamW` of kernels.cu: [`AdamWStep::scalars`] and the rounding.
#[repr(C)]
struct AdamWKernelScalars {
    decay: f64,
    one_minus_b1: f64,
    beta2: f64,
    one_minus_b2: f64,
    step_size: f64,
    bias2_sqrt: f64,
    eps: f64,
    rounding: i32,
    unused: i32,
    key: u64,
}

/// kernels.cu's `NBIT_NEAREST`, `NBIT_COMPENSATED`, `NBIT_STOCHASTIC`.
/// `op(a[i]) @ op(b[i])` for every matrix `i` of two operands with the same leading axes
/// (checked by `Backend::bmm`): one product per matrix, each on its slice of the buffers.
fn batched_matmul<E: Float>(a: &GpuStorage<E>, b: &GpuStorage<E>, ta: bool, tb: bool) -> GpuStorage<E> {
    let r = a.shape.len() - 2;
    let batch: usize = a.shape[..r].iter().product();
    let (m, k) = if ta {
        (a.shape[r + 1], a.shape[r])
    } else {
        (a.shape[r], a.shape[r + 1])
    };
    let n = if tb { b.shape[r] } else { b.shape[r + 1] };
    let shape: Vec<usize> = a.shape[..r].iter().copied().chain([m, n]).collect();
    if k == 0 {
        // An empty k is zeros: never an unwritten (recycled, dirty) block.
        return Gpu::full(&shape, E::zero());
    }
    let out = GpuStorage::<E>::empty("bmm", &shape);
    let size = size_of::<E>() as u64;
    for i in 0..batch as u64 {
        if m == 0 || n == 0 {
            break;
        }
        let g = Gemm {
            dtype: E::DTYPE,
            ta,
            tb,
            m,
            n,
            k,
            a: a.ptr + i * (m * k) as u64 * size,
            b: b.ptr + i * (k * n) as u64 * size,
            c: out.ptr + i * (m * n) as u64 * size,
            bias: None,
            ca: false,
            cb: false,
        };
        // SAFETY: matrix `i` of each operand is `m x k`, `k x n` and `m x n` elements at these
        // offsets inside buffers of `batch` such matrices (shapes checked by `Backend::bmm`).
        unsafe { drv().gemm(&g) }.unwrap_or_else(|e| fail("bmm", e));
    }
    out
}

fn rounding_code(r: UpdateRounding) -> i32 {
    match r {
        UpdateRounding::Nearest => 0,
        UpdateRounding::Compensated => 1,
        UpdateRounding::Stochastic => 2,
    }
}

fn as_bytes<T: Copy>(s: &[T]) -> &[u8] {
    // SAFETY: plain data: nbit's element types (floats, their bits, pairs of them) and integers.
    unsafe { core::slice::from_raw_parts(s.as_ptr() as *const u8, size_of_val(s)) }
}

#[diagnostic::do_not_recommend]
impl Backend for Gpu {
    type Storage<E: Element> = GpuStorage<E>;

    fn from_array<E: Element>(a: ArrayD<E>) -> GpuStorage<E> {
        let a = a.as_standard_layout();
        let s = a.as_slice().expect("standard layout");
        let out = GpuStorage::<E>::empty("copy to the GPU", a.shape());
        // SAFETY: `out` holds `s.len()` elements.
        unsafe { drv().upload(out.ptr, as_bytes(s)) }.unwrap_or_else(|e| fail("copy to the GPU", e));
        out
    }

    fn to_array<E: Element>(s: &GpuStorage<E>) -> ArrayD<E> {
        let mut v = vec![E::default(); s.len()];
        // SAFETY: as `as_bytes`; `s` holds `v.len()` elements.
        let bytes = unsafe { core::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, s.bytes()) };
        unsafe { drv().download(bytes, s.ptr) }.unwrap_or_else(|e| fail("copy from the GPU", e));
        ArrayD::from_shape_vec(s.shape.clone(), v).expect("the element count of the shape")
    }

    fn shape<E: Element>(s: &GpuStorage<E>) -> &[usize] {
        &s.shape
    }

    fn full<E: Element>(shape: &[usize], value: E) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("full", shape);
        let mut bits = [0u64; 2];
        // SAFETY: at most 16 bytes (the largest element) into a 16-byte buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(
                &value as *const E as *const u8,
                bits.as_mut_ptr() as *mut u8,
                size_of::<E>(),
            )
        };
        let (o, n) = (out.ptr, out.len() as i64);
        launch(
            "full",
            Kernel::new("fill", size_suffix::<E>()),
            (blocks(n as usize), 1),
            args![o, n, bits],
        );
        out
    }

    unsafe fn reshape_unchecked<E: Element>(s: &GpuStorage<E>, shape: &[usize]) -> GpuStorage<E> {
        s.copied_as("reshape", shape)
    }

    unsafe fn permute_unchecked<E: Element>(s: &GpuStorage<E>, axes: &[usize]) -> GpuStorage<E> {
        let out_shape: Vec<usize> = axes.iter().map(|&a| s.shape[a]).collect();
        let from = strides(&s.shape);
        let src: Vec<i64> = axes.iter().map(|&a| from[a]).collect();
        let out = GpuStorage::<E>::empty("permute", &out_shape);
        copy_into::<E>(
            "permute",
            s.ptr,
            out.ptr,
            Geometry::new("permute", &out_shape, &src, &strides(&out_shape)),
        );
        out
    }

    fn cast<A: Float, B: Float>(s: &GpuStorage<A>) -> GpuStorage<B> {
        if A::DTYPE == B::DTYPE {
            return s.copied_as("cast", &s.shape);
        }
        let out = GpuStorage::<B>::empty("cast", &s.shape);
        let (x, o, n) = (s.ptr, out.ptr, s.len() as i64);
        launch(
            "cast",
            Kernel::cast(suffix::<A>(), suffix::<B>()),
            (blocks(s.len()), 1),
            args![x, o, n],
        );
        out
    }

    fn unary<E: Float>(op: Unary, x: &GpuStorage<E>) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("unary", &x.shape);
        unary_into::<E>(op, x.ptr, out.ptr, x.len());
        out
    }

    unsafe fn unary_backward_unchecked<E: Float>(
        op: Unary,
        x: &GpuStorage<E>,
        y: &GpuStorage<E>,
        dy: &GpuStorage<E>,
    ) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("unary_backward", &x.shape);
        let (code, a, b) = unary_code(op);
        let (px, py, pd, o, n) = (x.ptr, y.ptr, dy.ptr, out.ptr, x.len() as i64);
        launch(
            "unary_backward",
            Kernel::new("unary_backward", suffix::<E>()),
            (blocks(x.len()), 1),
            args![px, py, pd, o, n, code, a, b],
        );
        out
    }

    unsafe fn binary_unchecked<E: Float>(
        op: Binary,
        a: &GpuStorage<E>,
        b: &GpuStorage<E>,
        out_shape: &[usize],
    ) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("binary", out_shape);
        binary_into(op, a, b, out.ptr, out_shape);
        out
    }

    unsafe fn sum_to_shape_unchecked<E: Float>(s: &GpuStorage<E>, shape: &[usize]) -> GpuStorage<E> {
        if s.shape == shape {
            return s.clone();
        }
        let lead = s.shape.len() - shape.len();
        let reduced: Vec<bool> = (0..s.shape.len())
            .map(|d| d < lead || (shape[d - lead] == 1 && s.shape[d] != 1))
            .collect();
        reduce("sum_to_shape", s, &reduced, shape, 1.0)
    }

    unsafe fn broadcast_to_unchecked<E: Element>(s: &GpuStorage<E>, shape: &[usize]) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("broadcast_to", shape);
        let g = Geometry::new(
            "broadcast_to",
            shape,
            &broadcast_strides(&s.shape, shape),
            &strides(shape),
        );
        copy_into::<E>("broadcast_to", s.ptr, out.ptr, g);
        out
    }

    unsafe fn sum_unchecked<E: Float>(
        s: &GpuStorage<E>,
        axis: Option<usize>,
        keepdim: bool,
        scale: f64,
    ) -> GpuStorage<E> {
        match axis {
            None => {
                let shape = if keepdim { vec![1; s.shape.len()] } else { vec![] };
                let out = GpuStorage::<E>::empty("sum", &shape);
                total::<E, E>("sum", s, false, scale, out.ptr);
                out
            }
            Some(ax) => {
                let mut shape = s.shape.clone();
                match keepdim {
                    true => shape[ax] = 1,
                    false => {
                        shape.remove(ax);
                    }
                }
                let reduced: Vec<bool> = (0..s.shape.len()).map(|d| d == ax).collect();
                reduce("sum", s, &reduced, &shape, scale)
            }
        }
    }

    unsafe fn matmul_unchecked<E: Float>(
        a: &GpuStorage<E>,
        b: &GpuStorage<E>,
        ta: bool,
        tb: bool,
        bias: Option<&GpuStorage<E>>,
    ) -> GpuStorage<E> {
        // Each operand as a matrix: its last axis the columns, the others merged into rows (the
        // buffers are row-major, so nothing moves).
        let ((ar, ac), (br, bc)) = (as_matrix(&a.shape), as_matrix(&b.shape));
        let (m, k) = if ta { (ac, ar) } else { (ar, ac) };
        let n = if tb { br } else { bc };
        let shape = matmul_shape(&a.shape, &b.shape, ta, tb);
        // An empty k is the bias alone, or zeros: never an unwritten (recycled, dirty) block.
        let out = match bias {
            Some(bias) => Self::broadcast_to(bias, &shape),
            None if k == 0 => Self::full(&shape, E::zero()),
            None => GpuStorage::<E>::empty("matmul", &shape),
        };
        if m == 0 || n == 0 || k == 0 {
            return out;
        }
        let g = Gemm {
            dtype: E::DTYPE,
            ta,
            tb,
            m,
            n,
            k,
            a: a.ptr,
            b: b.ptr,
            c: out.ptr,
            bias: bias.map(|b| b.ptr),
            ca: false,
            cb: false,
        };
        // SAFETY: the operands' shapes are the sizes in `g` (checked by `Backend::matmul`).
        unsafe { drv().gemm(&g) }.unwrap_or_else(|e| fail("matmul", e));
        out
    }

    unsafe fn bmm_unchecked<E: Float>(
        a: &GpuStorage<E>,
        b: &GpuStorage<E>,
        ta: bool,
        tb: bool,
    ) -> GpuStorage<E> {
        batched_matmul(a, b, ta, tb)
    }

    fn softmax<E: Float>(x: &GpuStorage<E>, log: bool) -> GpuStorage<E> {
        let (rows, cols) = rows_of(&x.shape);
        let out = GpuStorage::<E>::empty("softmax", &x.shape);
        let (px, o, r, c, l) = (x.ptr, out.ptr, rows as i64, cols as i64, log as i32);
        let grid = (rows.clamp(1, drv().max_blocks() as usize)) as u32;
        launch(
            "softmax",
            Kernel::new("softmax", suffix::<E>()),
            (grid, 1),
            args![px, o, r, c, l],
        );
        out
    }

    unsafe fn softmax_backward_unchecked<E: Float>(
        y: &GpuStorage<E>,
        dy: &GpuStorage<E>,
        log: bool,
    ) -> GpuStorage<E> {
        let (rows, cols) = rows_of(&y.shape);
        let out = GpuStorage::<E>::empty("softmax_backward", &y.shape);
        let (py, pd, o, r, c, l) = (y.ptr, dy.ptr, out.ptr, rows as i64, cols as i64, log as i32);
        let grid = (rows.clamp(1, drv().max_blocks() as usize)) as u32;
        launch(
            "softmax_backward",
            Kernel::new("softmax_backward", suffix::<E>()),
            (grid, 1),
            args![py, pd, o, r, c, l],
        );
        out
    }

    unsafe fn nll_loss_unchecked<E: Float>(logp: &GpuStorage<E>, targets: &[usize]) -> GpuStorage<E> {
        let t = indices("nll_loss", targets);
        let out = GpuStorage::<E>::empty("nll_loss", &[]);
        let (rows, cols) = rows_of(&logp.shape);
        let (rows, cols) = (rows as i64, cols as i64);
        let (p, pt, o) = (logp.ptr, t.ptr, out.ptr);
        launch(
            "nll_loss",
            Kernel::new("nll_loss", suffix::<E>()),
            (1, 1),
            args![p, pt, o, rows, cols],
        );
        out
    }

    unsafe fn nll_loss_backward_unchecked<E: Float>(
        shape: &[usize],
        targets: &[usize],
        dy: &GpuStorage<E>,
    ) -> GpuStorage<E> {
        let t = indices("nll_loss_backward", targets);
        let out = GpuStorage::<E>::empty("nll_loss_backward", shape);
        let (rows, cols) = rows_of(shape);
        let (rows, cols) = (rows as i64, cols as i64);
        let (pd, pt, o) = (dy.ptr, t.ptr, out.ptr);
        launch(
            "nll_loss_backward",
            Kernel::new("nll_loss_backward", suffix::<E>()),
            (blocks(out.len()), 1),
            args![pd, pt, o, rows, cols],
        );
        out
    }

    unsafe fn layer_norm_unchecked<E: Float>(
        x: &GpuStorage<E>,
        weight: Option<&GpuStorage<E>>,
        bias: Option<&GpuStorage<E>>,
        eps: f64,
    ) -> (GpuStorage<E>, GpuStorage<f64>) {
        let (rows, cols) = rows_of(&x.shape);
        let y = GpuStorage::<E>::empty("layer_norm", &x.shape);
        let stats = GpuStorage::<f64>::empty("layer_norm", &[rows, 2]);
        let (px, pw, pb, py, ps) = (x.ptr, ptr_or_null(weight), ptr_or_null(bias), y.ptr, stats.ptr);
        let (r, c) = (rows as i64, cols as i64);
        launch(
            "layer_norm",
            Kernel::new("layer_norm", suffix::<E>()),
            (row_blocks(rows), 1),
            args![px, pw, pb, py, ps, r, c, eps],
        );
        (y, stats)
    }

    unsafe fn layer_norm_backward_unchecked<E: Float>(
        x: &GpuStorage<E>,
        weight: Option<&GpuStorage<E>>,
        stats: &GpuStorage<f64>,
        dy: &GpuStorage<E>,
        with_bias: bool,
    ) -> (GpuStorage<E>, Option<GpuStorage<E>>, Option<GpuStorage<E>>) {
        let (rows, cols) = rows_of(&x.shape);
        let dx = GpuStorage::<E>::empty("layer_norm_backward", &x.shape);
        let (px, pw, ps, pd, pdx) = (x.ptr, ptr_or_null(weight), stats.ptr, dy.ptr, dx.ptr);
        let (r, c) = (rows as i64, cols as i64);
        let s = suffix::<E>();
        launch(
            "layer_norm_backward",
            Kernel::new("layer_norm_backward", s),
            (row_blocks(rows), 1),
            args![px, pw, ps, pd, pdx, r, c],
        );
        let dw = weight.map(|_| GpuStorage::<E>::empty("layer_norm_backward", &[cols]));
        let db = with_bias.then(|| GpuStorage::<E>::empty("layer_norm_backward", &[cols]));
        if dw.is_some() || db.is_some() {
            let (pdw, pdb) = (ptr_or_null(dw.as_ref()), ptr_or_null(db.as_ref()));
            launch(
                "layer_norm_backward",
                Kernel::new("layer_norm_params", s),
                (blocks(cols), 1),
                args![px, ps, pd, pdw, pdb, r, c],
            );
        }
        (dx, dw, db)
    }

    unsafe fn index_select_unchecked<E: Element>(
        s: &GpuStorage<E>,
        axis: usize,
        index: &[usize],
    ) -> GpuStorage<E> {
        let (outer, n, inner) = split(&s.shape, axis);
        let mut shape = s.shape.clone();
        shape[axis] = index.len();
        let out = GpuStorage::<E>::empty("index_select", &shape);
        let idx = indices("index_select", index);
        let (x, o, pi, m) = (s.ptr, out.ptr, idx.ptr, index.len() as i64);
        launch(
            "index_select",
            Kernel::new("index_select", size_suffix::<E>()),
            (blocks(out.len()), 1),
            args![x, o, pi, outer, n, m, inner],
        );
        out
    }

    unsafe fn index_add_unchecked<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &GpuStorage<E>,
    ) -> GpuStorage<E> {
        let (outer, n, inner) = split(shape, axis);
        let acc = Gpu::full::<f64>(shape, 0.0);
        let idx = indices("index_add", index);
        let (ps, pa, pi, m) = (src.ptr, acc.ptr, idx.ptr, index.len() as i64);
        launch(
            "index_add",
            Kernel::new("index_add", suffix::<E>()),
            (blocks(src.len()), 1),
            args![ps, pa, pi, outer, n, m, inner],
        );
        Gpu::cast::<f64, E>(&acc)
    }

    unsafe fn gather_unchecked<E: Element>(
        s: &GpuStorage<E>,
        axis: usize,
        index: &[usize],
        index_shape: &[usize],
    ) -> GpuStorage<E> {
        let (_, n, inner) = split(&s.shape, axis);
        let m = index_shape[axis] as i64;
        let out = GpuStorage::<E>::empty("gather", index_shape);
        let idx = indices("gather", index);
        let (x, o, pi, total) = (s.ptr, out.ptr, idx.ptr, index.len() as i64);
        launch(
            "gather",
            Kernel::new("gather", size_suffix::<E>()),
            (blocks(index.len()), 1),
            args![x, o, pi, total, n, m, inner],
        );
        out
    }

    unsafe fn scatter_add_unchecked<E: Float>(
        shape: &[usize],
        axis: usize,
        index: &[usize],
        src: &GpuStorage<E>,
    ) -> GpuStorage<E> {
        let (_, n, inner) = split(shape, axis);
        let m = src.shape[axis] as i64;
        let acc = Gpu::full::<f64>(shape, 0.0);
        let idx = indices("scatter_add", index);
        let (ps, pa, pi, total) = (src.ptr, acc.ptr, idx.ptr, index.len() as i64);
        launch(
            "scatter_add",
            Kernel::new("scatter_add", suffix::<E>()),
            (blocks(index.len()), 1),
            args![ps, pa, pi, total, n, m, inner],
        );
        Gpu::cast::<f64, E>(&acc)
    }

    unsafe fn concat_unchecked<E: Element>(parts: &[&GpuStorage<E>], axis: usize) -> GpuStorage<E> {
        let mut shape = parts[0].shape.clone();
        shape[axis] = parts.iter().map(|p| p.shape[axis]).sum();
        let out = GpuStorage::<E>::empty("concat", &shape);
        let out_strides = strides(&shape);
        let mut at = 0usize;
        for p in parts {
            let g = Geometry::new("concat", &p.shape, &strides(&p.shape), &out_strides);
            let dst = out.ptr + (at as i64 * out_strides[axis]) as u64 * size_of::<E>() as u64;
            if p.len() > 0 {
                copy_into::<E>("concat", p.ptr, dst, g);
            }
            at += p.shape[axis];
        }
        out
    }

    unsafe fn arg_extreme_unchecked<E: Float>(s: &GpuStorage<E>, axis: usize, largest: bool) -> Vec<usize> {
        let (outer, n, inner) = split(&s.shape, axis);
        let count = (outer * inner) as usize;
        let out = Buffer::new("arg_extreme", 8 * count.max(1));
        let (x, o, l) = (s.ptr, out.ptr, largest as i32);
        launch(
            "arg_extreme",
            Kernel::new("arg_extreme", suffix::<E>()),
            (blocks(count), 1),
            args![x, o, outer, n, inner, l],
        );
        out.read::<i64>("arg_extreme", count)
            .into_iter()
            .map(|i| i as usize)
            .collect()
    }

    unsafe fn select_unchecked<E: Float>(
        cond: &GpuStorage<E>,
        a: &GpuStorage<E>,
        b: &GpuStorage<E>,
        out_shape: &[usize],
    ) -> GpuStorage<E> {
        let spread;
        let cond = if cond.shape == out_shape {
            cond
        } else {
            spread = Self::broadcast_to(cond, out_shape);
            &spread
        };
        let g = Geometry::new(
            "select",
            out_shape,
            &broadcast_strides(&a.shape, out_shape),
            &broadcast_strides(&b.shape, out_shape),
        );
        let out = GpuStorage::<E>::empty("select", out_shape);
        let (pc, pa, pb, o, n) = (cond.ptr, a.ptr, b.ptr, out.ptr, out.len() as i64);
        launch(
            "select",
            Kernel::new("select", suffix::<E>()),
            (blocks(out.len()), 1),
            args![pc, pa, pb, o, n, g],
        );
        out
    }

    unsafe fn compare_unchecked<E: Float>(
        op: Compare,
        a: &GpuStorage<E>,
        b: &GpuStorage<E>,
        out_shape: &[usize],
    ) -> GpuStorage<E> {
        let g = Geometry::new(
            "compare",
            out_shape,
            &broadcast_strides(&a.shape, out_shape),
            &broadcast_strides(&b.shape, out_shape),
        );
        let code = match op {
            Compare::Eq => 0i32,
            Compare::Ne => 1,
            Compare::Lt => 2,
            Compare::Le => 3,
            Compare::Gt => 4,
            Compare::Ge => 5,
        };
        let out = GpuStorage::<E>::empty("compare", out_shape);
        let (pa, pb, o, n) = (a.ptr, b.ptr, out.ptr, out.len() as i64);
        launch(
            "compare",
            Kernel::new("compare", suffix::<E>()),
            (blocks(out.len()), 1),
            args![pa, pb, o, n, code, g],
        );
        out
    }

    unsafe fn unfold2d_unchecked<E: Float>(x: &GpuStorage<E>, geometry: &Conv2dGeometry) -> GpuStorage<E> {
        let g = ConvGeometry::new(geometry);
        let (rows, cols) = (
            (g.batch * g.oh * g.ow) as usize,
            (g.channels * g.kh * g.kw) as usize,
        );
        let out = GpuStorage::<E>::empty("unfold2d", &[rows, cols]);
        let (px, o) = (x.ptr, out.ptr);
        launch(
            "unfold2d",
            Kernel::new("unfold2d", suffix::<E>()),
            (blocks(out.len()), 1),
            args![px, o, g],
        );
        out
    }

    unsafe fn fold2d_unchecked<E: Float>(cols: &GpuStorage<E>, geometry: &Conv2dGeometry) -> GpuStorage<E> {
        let g = ConvGeometry::new(geometry);
        let shape = [
            geometry.batch,
            geometry.channels,
            geometry.input.0,
            geometry.input.1,
        ];
        let out = GpuStorage::<E>::empty("fold2d", &shape);
        let (pc, o) = (cols.ptr, out.ptr);
        launch(
            "fold2d",
            Kernel::new("fold2d", suffix::<E>()),
            (blocks(out.len()), 1),
            args![pc, o, g],
        );
        out
    }

    fn dropout_mask<E: Float>(shape: &[usize], p: f64, seed: u64) -> GpuStorage<E> {
        let out = GpuStorage::<E>::empty("dropout_mask", shape);
        let (o, n) = (out.ptr, out.len() as i64);
        launch(
            "dropout_mask",
            Kernel::new("dropout_mask", suffix::<E>()),
            (blocks(out.len()), 1),
            args![o, n, p, seed],
        );
        out
    }

    fn any_non_finite<E: Float>(s: &GpuStorage<E>) -> bool {
        let found = Buffer::upload("any_non_finite", &[0i32]);
        let (x, n, f) = (s.ptr, s.len() as i64, found.ptr);
        launch(
            "any_non_finite",
            Kernel::new("non_finite", suffix::<E>()),
            (blocks(s.len()), 1),
            args![x, n, f],
        );
        found.read::<i32>("any_non_finite", 1)[0] != 0
    }

    fn unscale_check<E: Float>(s: &mut GpuStorage<E>, factor: f32) -> bool {
        Self::unscale_check_all(&mut [s], factor)
    }

    fn unscale_check_all<E: Float>(grads: &mut [&mut GpuStorage<E>], factor: f32) -> bool {
        if grads.is_empty() {
            return false;
        }
        let found = Buffer::upload("unscale", &[0i32]);
        // One launch per 65535 tensors (the grid's y limit): blockIdx.y picks the tensor.
        for chunk in grads.chunks(65_535) {
            let ptrs = Buffer::upload("unscale", &chunk.iter().map(|g| g.ptr).collect::<Vec<u64>>());
            let lens = Buffer::upload(
                "unscale",
                &chunk.iter().map(|g| g.len() as i64).collect::<Vec<i64>>(),
            );
            let longest = chunk.iter().map(|g| g.len()).max().unwrap_or(0);
            let (p, l, f) = (ptrs.ptr, lens.ptr, found.ptr);
            launch(
                "unscale",
                Kernel::new("unscale_check", suffix::<E>()),
                (blocks(longest), chunk.len() as u32),
                args![p, l, factor, f],
            );
        }
        // The one host synchronisation of the step: the skip decision needs the flag.
        found.read::<i32>("unscale", 1)[0] != 0
    }

    fn scale_in_place<E: Float>(s: &mut GpuStorage<E>, factor: f64) {
        unary_into::<E>(Unary::MulScalar(factor), s.ptr, s.ptr, s.len());
    }

    fn clamp_in_place<E: Float>(s: &mut GpuStorage<E>, limit: f64) {
        // The limits rounded to E first, as the CPU backend compares in E.
        let (lo, hi) = (E::from_f64(-limit).as_f64(), E::from_f64(limit).as_f64());
        unary_into::<E>(Unary::Clamp(lo, hi), s.ptr, s.ptr, s.len());
    }

    fn sum_squares<E: Float>(s: &GpuStorage<E>) -> f64 {
        Self::sums_of_squares(&[s])[0]
    }

    fn sums_of_squares<E: Float>(tensors: &[&GpuStorage<E>]) -> Vec<f64> {
        let out = Buffer::new("sum_squares", tensors.len() * 8);
        for (i, s) in tensors.iter().enumerate() {
            total::<E, f64>("sum_squares", s, true, 1.0, out.ptr + 8 * i as u64);
        }
        out.read::<f64>("sum_squares", tensors.len())
    }

    unsafe fn add_in_place_unchecked<E: Float>(a: &mut GpuStorage<E>, b: &GpuStorage<E>) {
        let shape = a.shape.clone();
        binary_into(Binary::Add, a, b, a.ptr, &shape);
    }

    unsafe fn sgd_step_unchecked<E: Float>(
        param: &mut GpuStorage<E>,
        grad: &GpuStorage<E>,
        momentum_buffer: Option<&mut GpuStorage<E>>,
        compensation: Option<&mut GpuStorage<E>>,
        hp: &SgdStep,
    ) {
        let h = SgdScalars {
            lr: hp.lr,
            momentum: hp.momentum,
            dampening: hp.dampening,
            weight_decay: hp.weight_decay,
            nesterov: hp.nesterov as i32,
            first: hp.first as i32,
            rounding: rounding_code(hp.rounding),
            unused: 0,
            key: hp.noise_key,
        };
        let (p, g, n) = (param.ptr, grad.ptr, param.len() as i64);
        let buf = momentum_buffer.map_or(0u64, |b| b.ptr);
        let comp = compensation.map_or(0u64, |c| c.ptr);
        launch(
            "sgd_step",
            Kernel::new("sgd_step", suffix::<E>()),
            (blocks(n as usize), 1),
            args![p, g, buf, comp, n, h],
        );
    }

    unsafe fn adamw_step_unchecked<E: Float>(
        param: &mut GpuStorage<E>,
        grad: &GpuStorage<E>,
        exp_avg: &mut GpuStorage<E>,
        exp_avg_sq: &mut GpuStorage<E::Moment>,
        compensation: Option<&mut GpuStorage<E>>,
        hp: &AdamWStep,
    ) {
        let k = hp.scalars();
        let h = AdamWKernelScalars {
            decay: k.decay,
            one_minus_b1: k.one_minus_b1,
            beta2: k.beta2,
            one_minus_b2: k.one_minus_b2,
            step_size: k.step_size,
            bias2_sqrt: k.bias2_sqrt,
            eps: k.eps,
            rounding: rounding_code(hp.rounding),
            unused: 0,
            key: hp.noise_key,
        };
        let (p, g, m, v, n) = (
            param.ptr,
            grad.ptr,
            exp_avg.ptr,
            exp_avg_sq.ptr,
            param.len() as i64,
        );
        let comp = compensation.map_or(0u64, |c| c.ptr);
        launch(
            "adamw_step",
            Kernel::new("adamw_step", suffix::<E>()),
            (blocks(n as usize), 1),
            args![p, g, m, v, comp, n, h],
        );
    }

    fn catch_device_failures<T>(f: impl FnOnce() -> Result<T, crate::Error>) -> Result<T, crate::Error> {
        super::driver::catch(f)
    }
}

/// The complex kernels' name for a complex type.
fn complex_suffix<C: ComplexElement>() -> &'static str {
    match C::DTYPE {
        DType::C32 => "c32",
        DType::C64 => "c64",
        DType::C128 => "c128",
        other => fail("kernel", format!("no complex GPU kernels for {other}")),
    }
}

/// The parts of `z` as complex128 (exact), or a copy when it already is.
fn widened<C: ComplexElement>(z: &GpuStorage<C>) -> GpuStorage<Complex<f64>> {
    if C::DTYPE == DType::C128 {
        return z.copied_as("cmatmul", &z.shape);
    }
    let out = GpuStorage::<Complex<f64>>::empty("cmatmul", &z.shape);
    let (x, o, n) = (z.ptr, out.ptr, 2 * z.len() as i64);
    let name = Kernel::cast(suffix::<C::Real>(), "f64");
    launch("cmatmul", name, (blocks(n as usize), 1), args![x, o, n]);
    out
}

/// complex128 values rounded once per part into `C`.
fn narrowed<C: ComplexElement>(z: GpuStorage<Complex<f64>>) -> GpuStorage<C> {
    if C::DTYPE == DType::C128 {
        return z.retyped();
    }
    let out = GpuStorage::<C>::empty("cmatmul", &z.shape);
    let (x, o, n) = (z.ptr, out.ptr, 2 * z.len() as i64);
    let name = Kernel::cast("f64", suffix::<C::Real>());
    launch("cmatmul", name, (blocks(n as usize), 1), args![x, o, n]);
    out
}

/// One part (0: real, 1: imaginary) of every element of `z` copied to or from a real tensor:
/// `to_parts` reads every second part of `z`, else writes it.
fn move_part<C: ComplexElement>(z: u64, real: u64, part: u64, n: usize, to_parts: bool) {
    let shape = [n];
    let (interleaved, plain) = ([2i64], [1i64]);
    let at = z + part * size_of::<C::Real>() as u64;
    let (src, dst, g) = match to_parts {
        true => (
            at,
            real,
            Geometry::new("complex parts", &shape, &interleaved, &plain),
        ),
        false => (
            real,
            at,
            Geometry::new("complex parts", &shape, &plain, &interleaved),
        ),
    };
    copy_into::<C::Real>("complex parts", src, dst, g);
}

impl ComplexBackend for Gpu {
    unsafe fn cmatmul_unchecked<C: ComplexElement>(
        a: &GpuStorage<C>,
        b: &GpuStorage<C>,
        ta: bool,
        ca: bool,
        tb: bool,
        cb: bool,
    ) -> GpuStorage<C> {
        // In complex128 (the CPU computes the products in f64 too) and rounded once at the end.
        // BLAS conjugates only with a transpose, so a conjugate without one happens first.
        let prepare = |z: &GpuStorage<C>, t: bool, c: bool| {
            let w = widened(z);
            match c && !t {
                true => Self::cunary(ComplexUnary::Conj, &w),
                false => w,
            }
        };
        let (a64, b64) = (prepare(a, ta, ca), prepare(b, tb, cb));
        let (m, k) = if ta {
            (a.shape[1], a.shape[0])
        } else {
            (a.shape[0], a.shape[1])
        };
        let n = if tb { b.shape[0] } else { b.shape[1] };
        if k == 0 {
            return Self::full(&[m, n], C::from_parts(0.0, 0.0));
        }
        let out = GpuStorage::<Complex<f64>>::empty("cmatmul", &[m, n]);
        if m > 0 && n > 0 {
            let g = Gemm {
                dtype: DType::C128,
                ta,
                tb,
                m,
                n,
                k,
                a: a64.ptr,
                b: b64.ptr,
                c: out.ptr,
                bias: None,
                ca: ca && ta,
                cb: cb && tb,
            };
            // SAFETY: the operands' shapes are the sizes in `g` (checked by `Backend::matmul`).
            unsafe { drv().gemm(&g) }.unwrap_or_else(|e| fail("cmatmul", e));
        }
        narrowed(out)
    }

    unsafe fn cbinary_unchecked<C: ComplexElement>(
        op: Binary,
        a: &GpuStorage<C>,
        b: &GpuStorage<C>,
        out_shape: &[usize],
    ) -> GpuStorage<C> {
        let g = Geometry::new(
            "cbinary",
            out_shape,
            &broadcast_strides(&a.shape, out_shape),
            &broadcast_strides(&b.shape, out_shape),
        );
        let code = binary_code(op);
        let out = GpuStorage::<C>::empty("cbinary", out_shape);
        let (pa, pb, o, n) = (a.ptr, b.ptr, out.ptr, out.len() as i64);
        launch(
            "cbinary",
            Kernel::new("cbinary", complex_suffix::<C>()),
            (blocks(out.len()), 1),
            args![pa, pb, o, n, code, g],
        );
        out
    }

    fn cunary<C: ComplexElement>(op: ComplexUnary, z: &GpuStorage<C>) -> GpuStorage<C> {
        let (code, c) = match op {
            ComplexUnary::Neg => (0i32, 0.0),
            ComplexUnary::Conj => (1, 0.0),
            ComplexUnary::Exp => (2, 0.0),
            ComplexUnary::MulScalar(c) => (3, c),
            ComplexUnary::Sign => (4, 0.0),
        };
        let out = GpuStorage::<C>::empty("cunary", &z.shape);
        let (x, o, n) = (z.ptr, out.ptr, z.len() as i64);
        launch(
            "cunary",
            Kernel::new("cunary", complex_suffix::<C>()),
            (blocks(z.len()), 1),
            args![x, o, n, code, c],
        );
        out
    }

    unsafe fn csum_to_shape_unchecked<C: ComplexElement>(
        s: &GpuStorage<C>,
        shape: &[usize],
    ) -> GpuStorage<C> {
        // Each part summed in f64 and rounded once, as the CPU's sum of the complex128 parts.
        let (re, im) = Self::complex_parts(s);
        Self::complex_from_parts(&Self::sum_to_shape(&re, shape), &Self::sum_to_shape(&im, shape))
    }

    fn complex_parts<C: ComplexElement>(z: &GpuStorage<C>) -> (GpuStorage<C::Real>, GpuStorage<C::Real>) {
        let (re, im) = (
            GpuStorage::<C::Real>::empty("complex parts", &z.shape),
            GpuStorage::<C::Real>::empty("complex parts", &z.shape),
        );
        if z.len() > 0 {
            move_part::<C>(z.ptr, re.ptr, 0, z.len(), true);
            move_part::<C>(z.ptr, im.ptr, 1, z.len(), true);
        }
        (re, im)
    }

    unsafe fn complex_from_parts_unchecked<C: ComplexElement>(
        re: &GpuStorage<C::Real>,
        im: &GpuStorage<C::Real>,
    ) -> GpuStorage<C> {
        let out = GpuStorage::<C>::empty("complex parts", &re.shape);
        if out.len() > 0 {
            move_part::<C>(out.ptr, re.ptr, 0, out.len(), false);
            move_part::<C>(out.ptr, im.ptr, 1, out.len(), false);
        }
        out
    }

    fn cabs<C: ComplexElement>(z: &GpuStorage<C>) -> GpuStorage<C::Real> {
        let out = GpuStorage::<C::Real>::empty("cabs", &z.shape);
        let (x, o, n) = (z.ptr, out.ptr, z.len() as i64);
        launch(
            "cabs",
            Kernel::new("cabs", complex_suffix::<C>()),
            (blocks(z.len()), 1),
            args![x, o, n],
        );
        out
    }
}
