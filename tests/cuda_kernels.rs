//! The CUDA kernels without a GPU (feature `cuda`): `kernels.cu` compiled for the host with the
//! launch emulation of `host_prelude.h` (g++, or `$CXX`) and compared with the CPU backend element
//! for element in every dtype; and the same source compiled by NVRTC for sm_80 and sm_90, its PTX
//! assembled by ptxas. `.ci/run` installs NVRTC and ptxas from NVIDIA's Python packages and runs
//! `cargo test --features cuda --test integration cuda_kernels`; without NVRTC the NVRTC test fails
//! and says what to install.

use std::any::Any;
use std::ffi::{CString, c_char, c_void};
use std::path::Path;
use std::sync::OnceLock;

use libloading::{Library, Symbol};
use nbit::backend::cuda::{self, ARCHS};
use nbit::backend::{Backend, Binary, Unary};
use nbit::half::{bf16, f16};
use nbit::ndarray::{ArrayD, IxDyn};
use nbit::scaler::{DynamicScaler, GradScaler};
use nbit::{Cpu, DType, Float};

/// The kernels built for the host (nbit's emulator), once per test process.
fn host() -> &'static Library {
    static LIB: OnceLock<Library> = OnceLock::new();
    LIB.get_or_init(|| {
        let lib =
            cuda::emulator::build(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a library built from nbit's own sources, with no initialisers.
        unsafe { Library::new(&lib) }.unwrap()
    })
}

type HostLaunch = unsafe extern "C" fn(*const c_char, u32, u32, u32, *mut *mut c_void) -> i32;

/// One emulated launch of kernel `name` with `args` as cuLaunchKernel's `kernelParams`.
fn host_launch(name: &str, grid: (u32, u32), block: u32, args: &mut [*mut c_void]) {
    // SAFETY: host_launchers.cpp defines the symbol with this signature.
    let f: Symbol<HostLaunch> = unsafe { host().get(b"nbit_host_launch\0") }.unwrap();
    let c = CString::new(name).unwrap();
    // SAFETY: each caller passes values of the kernel's parameter types, pointers to live memory.
    assert_eq!(
        unsafe { f(c.as_ptr(), grid.0, grid.1, block, args.as_mut_ptr()) },
        0,
        "no kernel {name}"
    );
}

/// `launch!(name, (grid_x, grid_y), block; args...)`: each argument boxed, a pointer to each passed.
macro_rules! launch {
    ($name:expr, $grid:expr, $block:expr; $($a:expr),* $(,)?) => {{
        let keep: Vec<Box<dyn Any>> = vec![$(Box::new($a)),*];
        let mut ptrs: Vec<*mut c_void> =
            keep.iter().map(|b| &**b as *const dyn Any as *const () as *mut c_void).collect();
        host_launch(&$name, $grid, $block, &mut ptrs);
    }};
}

fn suffix<E: Float>() -> &'static str {
    match E::DTYPE {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        other => panic!("no kernels for {other}"),
    }
}

/// A total order on the bits: equal values 0 apart, neighbours 1 apart (NaN compares by bits).
fn ordered<E: Float>(x: E) -> i128 {
    let (bits, sign): (u64, u64) = match size_of::<E>() {
        2 => (unsafe { std::mem::transmute_copy::<E, u16>(&x) } as u64, 1 << 15),
        4 => (unsafe { std::mem::transmute_copy::<E, u32>(&x) } as u64, 1 << 31),
        _ => (unsafe { std::mem::transmute_copy::<E, u64>(&x) }, 1 << 63),
    };
    if bits & sign != 0 {
        -((bits & !sign) as i128)
    } else {
        bits as i128
    }
}

/// Asserts `got` equals `want` element for element within `ulps` units in the last place.
fn assert_close<E: Float>(what: &str, got: &[E], want: &[E], ulps: i128) {
    assert_eq!(got.len(), want.len(), "{what}");
    let mut worst = (0i128, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = if g.is_nan() && w.is_nan() {
            0
        } else {
            (ordered(*g) - ordered(*w)).abs()
        };
        if d > worst.0 {
            worst = (d, i);
        }
    }
    let (d, i) = worst;
    assert!(
        d <= ulps,
        "{what}: element {i} is {:?}, the CPU backend's {:?} ({d} ulps apart)",
        got[i],
        want[i]
    );
}

fn array<E: Float>(values: &[f64]) -> ArrayD<E> {
    ArrayD::from_shape_vec(
        IxDyn(&[values.len()]),
        values.iter().map(|&v| E::from_f64(v)).collect(),
    )
    .unwrap()
}

/// Awkward lengths (a partial block, several blocks with a grid-stride remainder) and values
/// that cover the ops' branches: signs, zero, values around 1 and the Huber threshold, large
/// magnitudes, inf and NaN.
fn inputs(n: usize) -> Vec<f64> {
    let special = [
        0.0,
        -0.0,
        1.0,
        -1.0,
        0.5,
        -2.5,
        3.0,
        88.0,
        -104.0,
        1e-3,
        f64::INFINITY,
        f64::NEG_INFINITY,
        f64::NAN,
    ];
    (0..n)
        .map(|i| match special.get(i) {
            Some(&v) => v,
            None => ((i as f64 * 0.6180339887).fract() - 0.5) * 8.0,
        })
        .collect()
}

/// Every `Unary` op with its code in kernels.cu and its scalars.
const OPS: [(Unary, i32, f64, f64); 15] = [
    (Unary::Neg, 0, 0.0, 0.0),
    (Unary::AddScalar(0.3), 1, 0.3, 0.0),
    (Unary::MulScalar(-1.7), 2, -1.7, 0.0),
    (Unary::Powf(2.5), 3, 2.5, 0.0),
    (Unary::Relu, 4, 0.0, 0.0),
    (Unary::Gelu, 5, 0.0, 0.0),
    (Unary::GeluTanh, 6, 0.0, 0.0),
    (Unary::Tanh, 7, 0.0, 0.0),
    (Unary::Sigmoid, 8, 0.0, 0.0),
    (Unary::Exp, 9, 0.0, 0.0),
    (Unary::Log, 10, 0.0, 0.0),
    (Unary::Abs, 11, 0.0, 0.0),
    (Unary::Huber(1.25), 12, 1.25, 0.0),
    (Unary::Sqrt, 13, 0.0, 0.0),
    (Unary::Clamp(-0.75, 2.0), 14, -0.75, 2.0),
];

/// Whether an op's result involves pow, erf, exp, log or tanh of the input: glibc's (the host
/// build here; CUDA's libdevice on a GPU) against the libm the CPU backend calls, each within an
/// ulp or two of the truth. Forward, every such op; backward, those that call one on x (the
/// others use the forward output y).
fn calls_libm(op: Unary, backward: bool) -> bool {
    match op {
        Unary::Powf(_) | Unary::Gelu | Unary::GeluTanh => true,
        Unary::Tanh | Unary::Sigmoid | Unary::Exp | Unary::Log => !backward,
        _ => false,
    }
}

/// `got` against `want` for an op that calls libm: two ulps of the result, or, where the formula
/// cancels (GELU's 1 + erf(x) for x < -1), `factor` ulps of the compute type times
/// `max(1, |x|)^power`.
fn assert_libm_close<E: Float>(what: &str, got: &[E], want: &[E], x: &ArrayD<E>, factor: f64, power: i32) {
    let eps = if E::DTYPE == DType::F64 {
        f64::EPSILON
    } else {
        f32::EPSILON as f64
    };
    for ((g, w), xi) in got.iter().zip(want).zip(x.iter()) {
        let close = (g.is_nan() && w.is_nan())
            || (ordered(*g) - ordered(*w)).abs() <= 2
            || (g.as_f64() - w.as_f64()).abs() <= factor * eps * xi.as_f64().abs().max(1.0).powi(power);
        assert!(close, "{what}: at x = {xi:?} got {g:?}, the CPU backend's {w:?}");
    }
}

fn unary_matches_cpu<E: Float>() {
    for n in [1usize, 300, 1000] {
        let x = array::<E>(&inputs(n));
        for (op, code, a, b) in OPS {
            let want = Cpu::unary(op, &x);
            let mut got = vec![E::zero(); n];
            launch!(format!("unary_{}", suffix::<E>()), (2, 1), 64; x.as_ptr(), got.as_mut_ptr(), n as i64, code, a, b);
            let what = format!("{op:?} on {n} {}", suffix::<E>());
            match calls_libm(op, false) {
                true => assert_libm_close(&what, &got, want.as_slice().unwrap(), &x, 8.0, 1),
                false => assert_close(&what, &got, want.as_slice().unwrap(), 0),
            }
        }
    }
}

#[test]
fn unary_kernels_match_the_cpu_backend_in_every_dtype() {
    unary_matches_cpu::<f16>();
    unary_matches_cpu::<bf16>();
    unary_matches_cpu::<f32>();
    unary_matches_cpu::<f64>();
}

/// `NbitBroadcast` of kernels.cu.
#[repr(C)]
struct Broadcast {
    ndim: i32,
    shape: [i64; 8],
    stride_a: [i64; 8],
    stride_b: [i64; 8],
}

fn broadcast(out: &[usize], a: &[usize], b: &[usize]) -> Broadcast {
    let strides = |s: &[usize]| {
        let mut st = [0i64; 8];
        let lead = out.len() - s.len();
        let mut acc = 1i64;
        for d in (0..s.len()).rev() {
            st[lead + d] = if s[d] == 1 { 0 } else { acc };
            acc *= s[d] as i64;
        }
        st
    };
    let mut shape = [1i64; 8];
    for (d, &v) in out.iter().enumerate() {
        shape[d] = v as i64;
    }
    Broadcast {
        ndim: out.len() as i32,
        shape,
        stride_a: strides(a),
        stride_b: strides(b),
    }
}

fn binary_matches_cpu<E: Float>() {
    let cases: [(&[usize], &[usize], &[usize]); 3] = [
        (&[3, 1, 5], &[4, 1], &[3, 4, 5]),
        (&[7], &[7], &[7]),
        (&[2, 1], &[], &[2, 1]),
    ];
    for (sa, sb, out) in cases {
        let na: usize = sa.iter().product();
        let nb: usize = sb.iter().product();
        let a = array::<E>(&inputs(na)).into_shape_with_order(IxDyn(sa)).unwrap();
        let b = array::<E>(&inputs(nb + 3)[3..])
            .into_shape_with_order(IxDyn(sb))
            .unwrap();
        let n: usize = out.iter().product();
        for (op, code) in [
            (Binary::Add, 0),
            (Binary::Sub, 1),
            (Binary::Mul, 2),
            (Binary::Div, 3),
        ] {
            let want = Cpu::binary(op, &a, &b, out);
            let mut got = vec![E::zero(); n];
            let geo = broadcast(out, sa, sb);
            launch!(format!("binary_{}", suffix::<E>()), (1, 1), 32;
                a.as_ptr(), b.as_ptr(), got.as_mut_ptr(), n as i64, code, geo);
            assert_close(
                &format!("{op:?} {sa:?} {sb:?} {}", suffix::<E>()),
                &got,
                want.as_slice().unwrap(),
                0,
            );
        }
    }
}

#[test]
fn binary_kernels_broadcast_like_the_cpu_backend() {
    binary_matches_cpu::<f16>();
    binary_matches_cpu::<bf16>();
    binary_matches_cpu::<f32>();
    binary_matches_cpu::<f64>();
}

fn cast_matches_cpu<A: Float, B: Float>(x: &ArrayD<A>) {
    let name = format!("cast_{}_{}", suffix::<A>(), suffix::<B>());
    let want = Cpu::cast::<A, B>(x);
    let mut got = vec![B::zero(); x.len()];
    launch!(name, (4, 1), 256; x.as_ptr(), got.as_mut_ptr(), x.len() as i64);
    assert_close(&name, &got, want.as_slice().unwrap(), 0);
}

#[test]
fn casts_round_like_the_cpu_backend_bit_for_bit() {
    // Every f16 and bf16 pattern, f32 patterns across every exponent (ties, subnormals, NaN
    // payloads), and f64 values near 16-bit rounding boundaries (the single rounding from f64).
    let all16: Vec<u16> = (0..=u16::MAX).collect();
    let halfs = ArrayD::from_shape_vec(
        IxDyn(&[all16.len()]),
        all16.iter().map(|&b| f16::from_bits(b)).collect(),
    )
    .unwrap();
    let bhalfs = ArrayD::from_shape_vec(
        IxDyn(&[all16.len()]),
        all16.iter().map(|&b| bf16::from_bits(b)).collect(),
    )
    .unwrap();
    let f32s: Vec<f32> = (0..1u64 << 20)
        .map(|i| f32::from_bits((i * 4093) as u32 ^ (i << 12) as u32))
        .collect();
    let f32s = ArrayD::from_shape_vec(IxDyn(&[f32s.len()]), f32s).unwrap();
    let mut f64s: Vec<f64> = Vec::new();
    for i in 0..200_000u64 {
        let base = f32::from_bits((i as u32).wrapping_mul(2_654_435_761)) as f64;
        // A 16-bit tie nudged by less than an f32 ulp: rounding through f32 to nearest would
        // land on the tie and round it the wrong way.
        f64s.push(base * (1.0 + (i % 7) as f64 * 1e-12));
    }
    f64s.extend([
        65504.0,
        65519.99999,
        65520.0,
        1e-8,
        -6e-8,
        3.0e38,
        3.4e38,
        f64::MAX,
        1e-320,
    ]);
    let f64s = ArrayD::from_shape_vec(IxDyn(&[f64s.len()]), f64s).unwrap();

    cast_matches_cpu::<f16, f32>(&halfs);
    cast_matches_cpu::<f16, bf16>(&halfs);
    cast_matches_cpu::<f16, f64>(&halfs);
    cast_matches_cpu::<bf16, f32>(&bhalfs);
    cast_matches_cpu::<bf16, f16>(&bhalfs);
    cast_matches_cpu::<bf16, f64>(&bhalfs);
    cast_matches_cpu::<f32, f16>(&f32s);
    cast_matches_cpu::<f32, bf16>(&f32s);
    cast_matches_cpu::<f32, f64>(&f32s);
    cast_matches_cpu::<f64, f16>(&f64s);
    cast_matches_cpu::<f64, bf16>(&f64s);
    cast_matches_cpu::<f64, f32>(&f64s);
}

/// The kernels' sum of `values` in `E` against the CPU backend's, for a plain and a mean scale:
/// bit for bit when `exact`, else within the bound of any f64 summation order,
/// `2 n eps sum |x|`, plus one rounding to `E`.
fn sum_matches_cpu<E: Float>(values: &[f64], exact: bool) {
    let s = suffix::<E>();
    let x = array::<E>(values);
    for scale in [1.0, 1.0 / values.len() as f64] {
        let want = Cpu::sum(&x, None, false, scale);
        let blocks = 3u32;
        let mut partials = vec![0.0f64; blocks as usize];
        launch!(format!("sum_partial_{s}"), (blocks, 1), 64; x.as_ptr(), x.len() as i64, 0i32, partials.as_mut_ptr());
        let mut got = [E::zero()];
        launch!(format!("sum_finish_{s}"), (1, 1), 64; partials.as_ptr(), blocks as i64, got.as_mut_ptr(), scale);
        let what = format!("sum of {} {s}, scale {scale}", values.len());
        let want = want.as_slice().unwrap();
        if exact {
            assert_close(&what, &got, want, 0);
        } else {
            let abs: f64 = x.iter().map(|v| v.as_f64().abs()).sum::<f64>() * scale;
            let bound = 2.0 * values.len() as f64 * f64::EPSILON * abs;
            let (g, w) = (got[0].as_f64(), want[0].as_f64());
            assert!(
                (g - w).abs() <= bound || (ordered(got[0]) - ordered(want[0])).abs() <= 1,
                "{what}: {g} vs {w}"
            );
        }
    }
}

#[test]
fn sums_accumulate_in_f64_like_the_cpu_backend() {
    // Multiples of 1/64 below 4 in magnitude: exact in every dtype, and every partial sum exact in
    // f64, so any summation order gives the CPU backend's bits.
    for n in [1usize, 63, 1000, 20_011] {
        let v: Vec<f64> = (0..n).map(|i| ((i * 37 % 511) as f64 - 255.0) / 64.0).collect();
        sum_matches_cpu::<f16>(&v, true);
        sum_matches_cpu::<bf16>(&v, true);
        sum_matches_cpu::<f32>(&v, true);
        sum_matches_cpu::<f64>(&v, true);
    }
    // Arbitrary values that cancel: the order differs from the CPU's, so the last bits may.
    let v: Vec<f64> = (0..5000).map(|i| (i as f64 * 0.7).sin() * 1e3).collect();
    sum_matches_cpu::<f64>(&v, false);
    sum_matches_cpu::<f32>(&v, false);
}

fn unscale_matches_cpu<E: Float>() {
    for poison in [false, true] {
        let mut grads: Vec<ArrayD<E>> = [1000usize, 37, 300]
            .iter()
            .map(|&n| {
                array::<E>(
                    &(0..n)
                        .map(|i| ((i as f64) * 0.37).sin() * 3e4)
                        .collect::<Vec<_>>(),
                )
            })
            .collect();
        if poison {
            grads[1][[5]] = E::from_f64(f64::NAN);
        }
        let inv = (1.0f64 / 65536.0) as f32;
        let mut want = grads.clone();
        let want_found = want
            .iter_mut()
            .fold(false, |acc, g| Cpu::unscale_check(g, inv) | acc);
        let ptrs: Vec<*mut E> = grads.iter_mut().map(|g| g.as_mut_ptr()).collect();
        let lens: Vec<i64> = grads.iter().map(|g| g.len() as i64).collect();
        let mut found = 0i32;
        launch!(format!("unscale_check_{}", suffix::<E>()), (2, grads.len() as u32), 64;
            ptrs.as_ptr(), lens.as_ptr(), inv, &mut found as *mut i32);
        assert_eq!(found != 0, want_found, "{}", suffix::<E>());
        for (g, w) in grads.iter().zip(&want) {
            assert_close("unscale", g.as_slice().unwrap(), w.as_slice().unwrap(), 0);
        }
    }
}

#[test]
fn the_fused_unscale_and_check_matches_the_cpu_backend() {
    unscale_matches_cpu::<f16>();
    unscale_matches_cpu::<bf16>();
    unscale_matches_cpu::<f32>();
    unscale_matches_cpu::<f64>();
}

#[test]
fn the_scale_update_on_the_device_is_pytorchs_bit_for_bit() {
    for (init, growth, backoff, interval) in [(65536.0f32, 2.0, 0.5, 3u32), (1000.0, 1.1, 0.9, 2)] {
        let mut cpu = DynamicScaler::new(init, growth, backoff, interval);
        let (mut scale, mut tracker) = (init, 0u32);
        for step in 0..60u32 {
            let inf = step % 7 == 3 || step % 11 == 0;
            let mut found = i32::from(inf);
            launch!("update_scale", (1, 1), 32;
                &mut scale as *mut f32, &mut tracker as *mut u32, &mut found as *mut i32,
                growth, backoff, interval, -1.0f32);
            cpu.update(inf);
            assert_eq!(scale.to_bits(), cpu.scale().to_bits(), "step {step}");
            assert_eq!(tracker, cpu.growth_tracker(), "step {step}");
            assert_eq!(found, 0, "the flag is reset for the next step");
        }
    }
}

fn dropout_matches_cpu<E: Float>() {
    for (n, p, seed) in [(1000usize, 0.3, 42u64), (77, 0.9, 7), (10, 1.0, 1)] {
        let want = Cpu::dropout_mask::<E>(&[n], p, seed);
        let mut got = vec![E::zero(); n];
        launch!(format!("dropout_mask_{}", suffix::<E>()), (2, 1), 32; got.as_mut_ptr(), n as i64, p, seed);
        assert_close("dropout mask", &got, want.as_slice().unwrap(), 0);
    }
}

#[test]
fn dropout_draws_the_cpu_backends_mask() {
    dropout_matches_cpu::<f16>();
    dropout_matches_cpu::<bf16>();
    dropout_matches_cpu::<f32>();
    dropout_matches_cpu::<f64>();
}

/// NVRTC compiles every kernel for sm_80 and sm_90, to PTX that ptxas assembles and to cubins.
#[test]
fn nvrtc_compiles_the_kernels_and_ptxas_assembles_them() {
    if let Err(e) = cuda::nvrtc_available() {
        panic!("{e} (.ci/run installs it; this test needs it)");
    }
    let ptxas = std::env::var("NBIT_PTXAS").unwrap_or_else(|_| "ptxas".into());
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    for arch in ARCHS {
        let ptx = cuda::compile_ptx(arch).unwrap_or_else(|e| panic!("{e}"));
        // Every kernel in the PTX can be launched under the emulation too (the same source, and
        // the launcher's table is complete), and the PTX has them all.
        type Has = unsafe extern "C" fn(*const c_char) -> i32;
        // SAFETY: host_launchers.cpp defines the symbol with this signature.
        let has: Symbol<Has> = unsafe { host().get(b"nbit_host_has\0") }.unwrap();
        let entries: Vec<&str> = ptx
            .match_indices(".entry ")
            .map(|(i, m)| ptx[i + m.len()..].split('(').next().unwrap_or("").trim())
            .collect();
        type Count = unsafe extern "C" fn() -> i32;
        // SAFETY: host_launchers.cpp defines the symbol with this signature.
        let count: Symbol<Count> = unsafe { host().get(b"nbit_host_count\0") }.unwrap();
        // SAFETY: no arguments.
        let table = unsafe { count() } as usize;
        assert_eq!(
            entries.len(),
            table,
            "{arch}: the PTX and the emulation's table differ"
        );
        assert!(table >= 129, "{arch}: only {table} kernels");
        for kernel in &entries {
            let c = CString::new(*kernel).unwrap();
            // SAFETY: a NUL-terminated name.
            assert_eq!(
                unsafe { has(c.as_ptr()) },
                1,
                "the emulation cannot launch {kernel}"
            );
        }
        let file = dir.join(format!("nbit_kernels_{arch}.ptx"));
        std::fs::write(&file, &ptx).unwrap();
        let out = std::process::Command::new(&ptxas)
            .arg(format!("-arch={arch}"))
            .arg("-o")
            .arg(file.with_extension("cubin"))
            .arg(&file)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {ptxas} (set NBIT_PTXAS): {e}"));
        assert!(
            out.status.success(),
            "ptxas {arch}:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The second call is the process's cache.
        assert_eq!(cuda::compile_ptx(arch).unwrap(), ptx);
        // NVRTC's own machine code for the architecture (what a GPU loads): a CUDA ELF image
        // (e_machine 190, EM_CUDA) naming every kernel of the PTX.
        let cubin = cuda::compile_cubin(arch).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "{arch}: not an ELF image");
        assert_eq!(
            u16::from_le_bytes([cubin[18], cubin[19]]),
            190,
            "{arch}: not EM_CUDA"
        );
        for kernel in &entries {
            assert!(
                cubin
                    .windows(kernel.len() + 1)
                    .any(|w| &w[..kernel.len()] == kernel.as_bytes() && w[kernel.len()] == 0),
                "{arch}: the cubin has no {kernel}"
            );
        }
    }
}

/// Softmax and log-softmax, forward and backward, against the CPU backend: rows of 1, 10 and 300
/// columns (a partial warp, several warps with a strided remainder), with -inf (a masked logit),
/// large magnitudes and a NaN row. The row sums are in f64 in another order, so the outputs may
/// differ by an ulp of the element type (a few in f64).
fn softmax_matches_cpu<E: Float>(ulps: i128) {
    let s = suffix::<E>();
    for cols in [1usize, 10, 300] {
        let rows = 4;
        let mut v: Vec<f64> = (0..rows * cols)
            .map(|i| ((i as f64 * 0.37).sin() * 6.0).round() / 2.0)
            .collect();
        v[0] = f64::NEG_INFINITY;
        if cols > 1 {
            v[cols + 1] = 60.0;
        }
        v[3 * cols] = f64::NAN;
        let x = ArrayD::from_shape_vec(IxDyn(&[rows, cols]), v.iter().map(|&a| E::from_f64(a)).collect())
            .unwrap();
        let g = ArrayD::from_shape_vec(
            IxDyn(&[rows, cols]),
            (0..rows * cols)
                .map(|i| E::from_f64(((i * 7 % 11) as f64 - 5.0) / 4.0))
                .collect(),
        )
        .unwrap();
        for log in [false, true] {
            let what = format!("{}softmax of {rows}x{cols} {s}", if log { "log_" } else { "" });
            let want = Cpu::softmax(&x, log);
            let mut got = vec![E::zero(); rows * cols];
            launch!(format!("softmax_{s}"), (2, 1), 64;
                x.as_ptr(),
                got.as_mut_ptr(),
                rows as i64,
                cols as i64,
                i32::from(log),
            );
            assert_close(&what, &got, want.as_slice().unwrap(), ulps);
            let y = want;
            let want = Cpu::softmax_backward(&y, &g, log);
            let mut got = vec![E::zero(); rows * cols];
            launch!(format!("softmax_backward_{s}"), (3, 1), 96;
                y.as_ptr(),
                g.as_ptr(),
                got.as_mut_ptr(),
                rows as i64,
                cols as i64,
                i32::from(log),
            );
            assert_close(&format!("{what}, backward"), &got, want.as_slice().unwrap(), ulps);
        }
    }
}

#[test]
fn softmax_forward_and_backward_match_the_cpu_backend() {
    softmax_matches_cpu::<f16>(1);
    softmax_matches_cpu::<bf16>(1);
    softmax_matches_cpu::<f32>(1);
    softmax_matches_cpu::<f64>(8);
}

/// Every op's gradient, from the CPU backend's forward output, against its `unary_backward`:
/// bit for bit where it is arithmetic on x, y and dy (the same operations in the same order).
fn unary_backward_matches_cpu<E: Float>() {
    let n = 500;
    let x = array::<E>(&inputs(n));
    let dy = array::<E>(
        &(0..n)
            .map(|i| ((i * 13 % 17) as f64 - 8.0) / 4.0)
            .collect::<Vec<_>>(),
    );
    for (op, code, a, b) in OPS {
        let y = Cpu::unary(op, &x);
        let want = Cpu::unary_backward(op, &x, &y, &dy);
        let mut got = vec![E::zero(); n];
        launch!(format!("unary_backward_{}", suffix::<E>()), (2, 1), 64;
            x.as_ptr(),
            y.as_ptr(),
            dy.as_ptr(),
            got.as_mut_ptr(),
            n as i64,
            code,
            a,
            b,
        );
        let what = format!("{op:?} backward, {}", suffix::<E>());
        match calls_libm(op, true) {
            true => assert_libm_close(&what, &got, want.as_slice().unwrap(), &x, 16.0, 2),
            false => assert_close(&what, &got, want.as_slice().unwrap(), 0),
        }
    }
}

#[test]
fn unary_gradients_match_the_cpu_backend_in_every_dtype() {
    unary_backward_matches_cpu::<f16>();
    unary_backward_matches_cpu::<bf16>();
    unary_backward_matches_cpu::<f32>();
    unary_backward_matches_cpu::<f64>();
}

/// Threads of one process that build the emulation into the same empty folder at once each get a
/// library that loads, and one compile serves them all. The test threads of `cargo test` do exactly
/// this; when builds in one process ran side by side under one partial name, one thread renamed
/// another's library away and its build failed with "cannot write ...: No such file or directory"
/// (CI, session 5).
#[test]
fn concurrent_emulator_builds_in_one_process_all_succeed() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("concurrent_build_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = std::sync::Barrier::new(3);
    let built: Vec<_> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    cuda::emulator::build(&dir)
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    for lib in built {
        let lib = lib.unwrap_or_else(|e| panic!("{e}"));
        // SAFETY: a library built from nbit's own sources, with no initialisers.
        let loaded = unsafe { Library::new(&lib) }.unwrap();
        // SAFETY: host_launchers.cpp defines the symbol with this signature.
        let count: Symbol<unsafe extern "C" fn() -> i32> =
            unsafe { loaded.get(b"nbit_host_count\0") }.unwrap();
        // SAFETY: takes nothing, reads a static table.
        assert!(unsafe { count() } > 0);
    }
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "only the finished library stays: {left:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
