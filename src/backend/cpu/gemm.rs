//! nbit's CPU GEMM: `C = op(A) op(B) (+ bias)` for f32, f64, bf16 and f16 operands.
//!
//! The classic blocked design (Goto; BLIS): operands are copied ("packed") into panels that fit
//! the caches, and a register-blocked micro-kernel computes one `MR x NR` tile of C from an
//! `MR x kc` panel of A and a `kc x NR` panel of B. Packing reads any strides, so transposed and
//! strided operands cost nothing extra, and it is where 16-bit operands are widened to f32
//! (exactly: every bf16 and f16 value is an f32). The micro-kernel then runs f32 FMAs, and the
//! tile is rounded to the 16-bit type once, at the end (PyTorch's `addmm` numerics for half
//! types: f32 accumulation, one rounding). f64 runs the same code with f64 panels.
//!
//! Micro-kernels per instruction set, chosen once at run time: AVX-512F (12 x 32 f32, 12 x 16
//! f64), AVX2 with FMA (6 x 16, 6 x 8), and a portable one the compiler vectorises for the
//! baseline target; for bf16 operands also AVX-512 BF16's `vdpbf16ps` (12 x 32) and AMX tiles
//! (32 x 32, whose A panels are packed by rows and padded to 16 pairs of `k`). The packing buffers live per thread and are reused, so a steady training
//! loop allocates only its outputs.

use std::any::{Any, TypeId};
use std::cell::RefCell;
use std::mem::MaybeUninit;

use ndarray::ArrayView2;

use super::parallel::{PARALLEL_MIN_FMAS, for_ranges_with, num_threads};
use crate::dtype::{Acc, Float};
use crate::error::Error;

/// Rows of the packed A block (a multiple of every kernel's `mr`): A's block stays in L2.
const MC: usize = 192;
/// Depth of one packed block: the `kc x NR` panel of B stays in L1 while A panels stream by.
const KC: usize = 256;
/// Columns of the packed B block: `KC x NC` lanes stay in L2.
const NC: usize = 1024;
/// The deepest product a pairs kernel takes in one pass over `k` (see [`Dest::Round`]): a tile
/// is summed over all of `k` and rounded at once, so no f32 accumulator of C exists.
const K_WHOLE: usize = 4096;
/// Bytes of a packed block of B when `k` is taken whole (about a quarter of L2), and of A's
/// (which is then packed once for all of a thread's rows where they fit, not once per block of
/// B).
#[cfg(not(test))]
const WHOLE_B_BYTES: usize = 512 << 10;
#[cfg(not(test))]
const WHOLE_A_BYTES: usize = 512 << 10;
// Small blocks under test, so that the tests' small products span several.
#[cfg(test)]
const WHOLE_B_BYTES: usize = 8 << 10;
#[cfg(test)]
const WHOLE_A_BYTES: usize = 16 << 10;

/// A kernel's per-thread set-up and clean-up (see [`Kernel::around`]).
pub(crate) type Around = (unsafe fn(), unsafe fn());

/// One micro-kernel: `C[0..mr, 0..nr] += A_panel * B_panel`.
#[derive(Clone, Copy)]
pub(crate) struct Kernel<T> {
    /// For reports and tests, e.g. `"avx512f 12x32"`.
    pub name: &'static str,
    pub mr: usize,
    pub nr: usize,
    /// Operands packed as pairs of bf16 (`k` and `k + 1` in one 32-bit slot) for a dot-product
    /// instruction; the kernel then takes `kc.div_ceil(2)` steps. Only for bf16 operands.
    pub pairs: bool,
    /// A's panels are packed by rows, `[i][step]`, rather than `[step][i]` (AMX loads a tile row
    /// as consecutive values of `k`). Only with `pairs`.
    pub a_rows: bool,
    /// The steps a kernel takes are a multiple of this (the panels are zero-padded to it): 16
    /// for AMX, whose tiles hold 16 pairs of `k`; 1 otherwise.
    pub step_align: usize,
    /// Run by each thread before its first call of `f` in a product and after its last (AMX:
    /// load the tile configuration, release the tiles), so `f` does not do it per tile.
    pub around: Option<Around>,
    /// `f(steps, a, b, c, ldc, overwrite)`: with `overwrite`, C's tile is written without being
    /// read (the first block of `k` when C starts at zero). `steps` is `kc`, or for a `pairs`
    /// kernel `kc.div_ceil(2)` rounded up to `step_align`. Safety: `a` is readable for
    /// `steps * mr` values laid out `[step][i]` (`a_rows`: `[i][step]`), `b` for `steps * nr`
    /// laid out `[step][j]`, and `c` readable and writable at `i * ldc + j` for `i < mr`,
    /// `j < nr`, not aliased by `a` or `b`; the CPU has the kernel's instruction set (and, for
    /// AMX, the process has the tile state).
    pub f: unsafe fn(usize, *const T, *const T, *mut T, usize, bool),
}

/// The portable micro-kernel: plain loops over register-sized arrays, vectorised by the compiler
/// for the baseline target (SSE2 on x86-64, NEON on aarch64).
///
/// # Safety
/// As [`Kernel::f`] with `mr = MR`, `nr = NR`.
unsafe fn portable<T: Acc, const MR: usize, const NR: usize>(
    kc: usize,
    a: *const T,
    b: *const T,
    c: *mut T,
    ldc: usize,
    overwrite: bool,
) {
    let mut acc = [[T::zero(); NR]; MR];
    // SAFETY: the caller guarantees `kc * MR` values at `a` and `kc * NR` at `b`.
    let (a, b) = unsafe {
        (
            core::slice::from_raw_parts(a, kc * MR),
            core::slice::from_raw_parts(b, kc * NR),
        )
    };
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] = acc[i][j] + ap[i] * bp[j];
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            // SAFETY: i < MR, j < NR: inside the tile the caller guarantees.
            unsafe {
                let o = c.add(i * ldc + j);
                *o = if overwrite { *v } else { *o + *v };
            }
        }
    }
}

/// An x86 micro-kernel of `$mr` rows by `$nv` vectors of `$w` lanes: `$mr * $nv` accumulators
/// live in registers; each step of `k` loads `$nv` vectors of B and broadcasts `$mr` values of A.
#[cfg(target_arch = "x86_64")]
macro_rules! x86_kernel {
    ($name:ident, $feat:literal, $t:ty, $mr:literal, $nv:literal, $w:literal,
     $zero:ident, $load:ident, $set1:ident, $fma:ident, $add:ident, $store:ident) => {
        /// # Safety
        /// As [`Kernel::f`]; the CPU has the features in the attribute.
        #[target_feature(enable = $feat)]
        unsafe fn $name(kc: usize, a: *const $t, b: *const $t, c: *mut $t, ldc: usize, overwrite: bool) {
            use core::arch::x86_64::*;
            // Fetch the C tile now: its cache misses then overlap the k loop.
            for i in 0..$mr {
                for v in 0..($nv * $w * size_of::<$t>()).div_ceil(64) {
                    _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + v * 64 / size_of::<$t>()).cast());
                }
            }
            let mut acc = [[$zero(); $nv]; $mr];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                // SAFETY: `kc` steps of `$mr` values of A and `$nv * $w` of B are readable.
                unsafe {
                    let mut bv = [$zero(); $nv];
                    for (v, x) in bv.iter_mut().enumerate() {
                        *x = $load(b.add(v * $w));
                    }
                    for (i, row) in acc.iter_mut().enumerate() {
                        let ai = $set1(*a.add(i));
                        for (x, bx) in row.iter_mut().zip(&bv) {
                            *x = $fma(ai, *bx, *x);
                        }
                    }
                    a = a.add($mr);
                    b = b.add($nv * $w);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (v, x) in row.iter().enumerate() {
                    // SAFETY: row i < $mr, lanes v * $w.. < $nv * $w: inside the tile.
                    unsafe {
                        let p = c.add(i * ldc + v * $w);
                        $store(p, if overwrite { *x } else { $add($load(p), *x) });
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernel;
    x86_kernel!(
        avx512_f32,
        "avx512f",
        f32,
        12,
        2,
        16,
        _mm512_setzero_ps,
        _mm512_loadu_ps,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_add_ps,
        _mm512_storeu_ps
    );
    x86_kernel!(
        avx512_f64,
        "avx512f",
        f64,
        12,
        2,
        8,
        _mm512_setzero_pd,
        _mm512_loadu_pd,
        _mm512_set1_pd,
        _mm512_fmadd_pd,
        _mm512_add_pd,
        _mm512_storeu_pd
    );
    x86_kernel!(
        avx2_f32,
        "avx2,fma",
        f32,
        6,
        2,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_add_ps,
        _mm256_storeu_ps
    );
    x86_kernel!(
        avx2_f64,
        "avx2,fma",
        f64,
        6,
        2,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_set1_pd,
        _mm256_fmadd_pd,
        _mm256_add_pd,
        _mm256_storeu_pd
    );

    /// Loads up to 16 values of one row as f32 (zero past `n`): f32 as is, bf16 by a shift,
    /// f16 by `vcvtph2ps`; all exact.
    macro_rules! load16 {
        (f32, $p:expr, $mask:expr) => {
            _mm512_maskz_loadu_ps($mask, $p.cast::<f32>())
        };
        (bf16, $p:expr, $mask:expr) => {
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_maskz_loadu_epi16($mask, $p.cast::<i16>()),
            )))
        };
        (f16, $p:expr, $mask:expr) => {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16($mask, $p.cast::<i16>()))
        };
    }

    /// Packs `rows` (at most 16) rows whose elements are contiguous (`src + i * rs + p`) into
    /// `dst[p * w + off + i]` for `p < kc`: 16 x 16 blocks transposed in registers.
    macro_rules! transpose_pack {
        ($name:ident, $kind:tt, $t:ty) => {
            /// # Safety
            /// Rows `i < rows <= 16` are readable for `kc` values from `src + i * rs`; `dst`
            /// is writable at `p * w + off + i` for `p < kc`, `i < rows`; the CPU has
            /// AVX-512F, BW and VL.
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            pub(super) unsafe fn $name(
                src: *const $t,
                rs: isize,
                rows: usize,
                kc: usize,
                dst: *mut f32,
                w: usize,
                off: usize,
            ) {
                use core::arch::x86_64::*;
                let rowmask: __mmask16 = if rows >= 16 {
                    0xffff
                } else {
                    (1u16 << rows) - 1
                };
                let mut p = 0;
                while p < kc {
                    let cols = (kc - p).min(16);
                    let colmask: __mmask16 = if cols >= 16 {
                        0xffff
                    } else {
                        (1u16 << cols) - 1
                    };
                    let mut r = [_mm512_setzero_ps(); 16];
                    for (i, v) in r.iter_mut().enumerate().take(rows) {
                        // SAFETY: row i < rows, values p..p + cols < kc (masked): readable.
                        *v = unsafe { load16!($kind, src.offset(i as isize * rs + p as isize), colmask) };
                    }
                    let mut t = [_mm512_setzero_ps(); 16];
                    for k in 0..8 {
                        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
                    }
                    let mut u = [_mm512_setzero_ps(); 16];
                    for k in 0..4 {
                        let pd = |x: __m512| _mm512_castps_pd(x);
                        let (t0, t1, t2, t3) = (
                            pd(t[4 * k]),
                            pd(t[4 * k + 1]),
                            pd(t[4 * k + 2]),
                            pd(t[4 * k + 3]),
                        );
                        u[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
                        u[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
                        u[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
                        u[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
                    }
                    // u[4g + q], 128-bit lane l: rows 4g..4g+3 of column 4l + q.
                    for q in 0..4 {
                        let v0 = _mm512_shuffle_f32x4::<0x88>(u[q], u[4 + q]);
                        let v1 = _mm512_shuffle_f32x4::<0xdd>(u[q], u[4 + q]);
                        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + q], u[12 + q]);
                        let w1 = _mm512_shuffle_f32x4::<0xdd>(u[8 + q], u[12 + q]);
                        let out = [
                            (q, _mm512_shuffle_f32x4::<0x88>(v0, w0)),
                            (4 + q, _mm512_shuffle_f32x4::<0x88>(v1, w1)),
                            (8 + q, _mm512_shuffle_f32x4::<0xdd>(v0, w0)),
                            (12 + q, _mm512_shuffle_f32x4::<0xdd>(v1, w1)),
                        ];
                        for (col, v) in out {
                            if col < cols {
                                // SAFETY: step p + col < kc, rows under `rowmask` < rows.
                                unsafe { _mm512_mask_storeu_ps(dst.add((p + col) * w + off), rowmask, v) };
                            }
                        }
                    }
                    p += 16;
                }
            }
        };
    }
    transpose_pack!(transpose_pack_f32, f32, f32);
    transpose_pack!(transpose_pack_bf16, bf16, half::bf16);
    transpose_pack!(transpose_pack_f16, f16, half::f16);

    /// The bf16 dot-product kernel (`vdpbf16ps`), 12 x 32: each step multiplies two bf16 pairs
    /// per lane and adds both products to f32 accumulators. The instruction treats subnormal
    /// inputs as zero and flushes subnormal results to zero, whatever MXCSR says.
    ///
    /// # Safety
    /// As [`Kernel::f`] with `a`, `b` holding bf16 pairs; the CPU has AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_bf16_pairs(
        steps: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        overwrite: bool,
    ) {
        use core::arch::x86_64::*;
        // SAFETY (transmutes): `__m512i` and `__m512bh` are both 64 bytes of plain bits.
        let bh = |x: __m512i| unsafe { core::mem::transmute::<__m512i, __m512bh>(x) };
        for i in 0..12 {
            for v in 0..2 {
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(i * ldc + v * 16).cast());
            }
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; 12];
        let (mut a, mut b) = (a.cast::<i32>(), b.cast::<i32>());
        for _ in 0..steps {
            // SAFETY: `steps` steps of 12 pairs of A and 32 of B are readable.
            unsafe {
                let b0 = bh(_mm512_loadu_si512(b.cast()));
                let b1 = bh(_mm512_loadu_si512(b.add(16).cast()));
                for (i, row) in acc.iter_mut().enumerate() {
                    let ai = bh(_mm512_set1_epi32(*a.add(i)));
                    row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
                }
                a = a.add(12);
                b = b.add(32);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: inside the 12 x 32 tile.
                unsafe {
                    let p = c.add(i * ldc + v * 16);
                    _mm512_storeu_ps(
                        p,
                        if overwrite {
                            *x
                        } else {
                            _mm512_add_ps(_mm512_loadu_ps(p), *x)
                        },
                    );
                }
            }
        }
    }

    pub(super) const AVX512_BF16_PAIRS: Kernel<f32> = Kernel {
        name: "avx512_bf16 vdpbf16ps 12x32",
        mr: 12,
        nr: 32,
        pairs: true,
        a_rows: false,
        step_align: 1,
        around: None,
        f: avx512_bf16_pairs,
    };

    pub(super) const AVX512_F32: Kernel<f32> = Kernel {
        name: "avx512f 12x32",
        mr: 12,
        nr: 32,
        pairs: false,
        a_rows: false,
        step_align: 1,
        around: None,
        f: avx512_f32,
    };
    pub(super) const AVX512_F64: Kernel<f64> = Kernel {
        name: "avx512f 12x16",
        mr: 12,
        nr: 16,
        pairs: false,
        a_rows: false,
        step_align: 1,
        around: None,
        f: avx512_f64,
    };
    pub(super) const AVX2_F32: Kernel<f32> = Kernel {
        name: "avx2+fma 6x16",
        mr: 6,
        nr: 16,
        pairs: false,
        a_rows: false,
        step_align: 1,
        around: None,
        f: avx2_f32,
    };
    pub(super) const AVX2_F64: Kernel<f64> = Kernel {
        name: "avx2+fma 6x8",
        mr: 6,
        nr: 8,
        pairs: false,
        a_rows: false,
        step_align: 1,
        around: None,
        f: avx2_f64,
    };
}

/// The AMX kernel: Intel's tile matrix unit (Sapphire Rapids and later), through `asm!` because
/// Rust's AMX intrinsics are not stable. Linux only: a process must ask the kernel for the tile
/// state before its first tile instruction.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    use super::Kernel;
    use core::arch::asm;

    /// Whether this process can run AMX bf16 tiles: CPUID reports AMX-TILE and AMX-BF16 and
    /// Linux grants the tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`), asked
    /// once per process, at its first bf16 product (or when `NBIT_GEMM_KERNEL` names the AMX
    /// kernel; naming another kernel never asks).
    ///
    /// So the choice depends on the kernel as well as on CPUID: Linux before 5.16, a seccomp
    /// filter, a hypervisor that hides the tile state, or a host process with a thread whose
    /// `sigaltstack` is smaller than the AMX signal frame (about 11 KiB) refuses, and that process
    /// widens instead (other bits). A grant is process-wide: a `sigaltstack` set up afterwards
    /// must fit that frame (Rust's own threads size theirs from `AT_MINSIGSTKSZ`). A host that
    /// must avoid both sets `NBIT_GEMM_KERNEL` to another kernel.
    pub(super) fn usable() -> bool {
        use std::sync::OnceLock;
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            // CPUID leaf 7 exists where leaf 0 says the maximum leaf is at least 7.
            if core::arch::x86_64::__cpuid(0).eax < 7 {
                return false;
            }
            let edx = core::arch::x86_64::__cpuid_count(7, 0).edx;
            let (amx_bf16, amx_tile) = (edx >> 22 & 1 == 1, edx >> 24 & 1 == 1);
            if !(amx_bf16 && amx_tile) {
                return false;
            }
            const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
            const XFEATURE_XTILEDATA: i64 = 18;
            const SYS_ARCH_PRCTL: i64 = 158;
            let ret: i64;
            // SAFETY: the arch_prctl system call with a request that only grants this process
            // permission to use the tile state; it reads and writes no memory of ours.
            unsafe {
                asm!(
                    "syscall",
                    inlateout("rax") SYS_ARCH_PRCTL => ret,
                    in("rdi") ARCH_REQ_XCOMP_PERM,
                    in("rsi") XFEATURE_XTILEDATA,
                    lateout("rcx") _,
                    lateout("r11") _,
                    options(nostack)
                );
            }
            ret == 0
        })
    }

    /// The tile configuration (`ldtilecfg`'s 64-byte operand): palette 1, all eight tiles 16
    /// rows of 64 bytes. Tiles 0-3 hold C (16 x 16 f32 each), 4-5 A (16 rows x 16 pairs), 6-7 B
    /// (16 pairs of rows x 16 columns).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64; // bytes per row
            c[48 + t] = 16; // rows
            t += 1;
        }
        Config(c)
    };

    /// The AMX bf16 kernel, 32 x 32: per 16 steps (32 values of `k`), four `tdpbf16ps` of two A
    /// tiles by two B tiles into four C tiles. Like `vdpbf16ps`, the tile unit treats subnormal
    /// inputs as zero and flushes subnormal results to zero.
    ///
    /// # Safety
    /// As [`Kernel::f`] with `a` packed by rows (`[i][step]`, 32 rows of `steps` pairs), `b` as
    /// `[step][j]` pairs (32 columns), `steps` a multiple of 16; [`usable`] has returned true and
    /// this thread has run [`configure`] since its last [`release`].
    unsafe fn amx_bf16(steps: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, overwrite: bool) {
        debug_assert!(steps > 0 && steps.is_multiple_of(16));
        let (sa, sb, sc) = (steps * 4, 32 * 4, ldc * 4);
        let (a, b) = (a.cast::<u8>(), b.cast::<u8>());
        let c = [
            c,
            c.wrapping_add(16),
            c.wrapping_add(16 * ldc),
            c.wrapping_add(16 * ldc + 16),
        ];
        // SAFETY: the caller's contract: every tile row loaded or stored below lies inside the
        // panels (32 rows of `steps` pairs; `steps` rows of 32 pairs) or C's 32 x 32 tile.
        unsafe {
            if overwrite {
                asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem)
                );
            } else {
                asm!(
                    "tileloadd tmm0, [{c0} + {sc}*1]",
                    "tileloadd tmm1, [{c1} + {sc}*1]",
                    "tileloadd tmm2, [{c2} + {sc}*1]",
                    "tileloadd tmm3, [{c3} + {sc}*1]",
                    c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
                    sc = in(reg) sc,
                    options(nostack, readonly)
                );
            }
            for kb in 0..steps / 16 {
                let a0 = a.add(kb * 64);
                let b0 = b.add(kb * 16 * sb);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0, a1 = in(reg) a0.add(16 * sa),
                    b0 = in(reg) b0, b1 = in(reg) b0.add(64),
                    sa = in(reg) sa, sb = in(reg) sb,
                    options(nostack, readonly)
                );
            }
            asm!(
                "tilestored [{c0} + {sc}*1], tmm0",
                "tilestored [{c1} + {sc}*1], tmm1",
                "tilestored [{c2} + {sc}*1], tmm2",
                "tilestored [{c3} + {sc}*1], tmm3",
                c0 = in(reg) c[0], c1 = in(reg) c[1], c2 = in(reg) c[2], c3 = in(reg) c[3],
                sc = in(reg) sc,
                options(nostack)
            );
        }
    }

    /// Loads the tile configuration: before a thread's first [`amx_bf16`] in a product.
    ///
    /// # Safety
    /// [`usable`] has returned true.
    unsafe fn configure() {
        // SAFETY: reads the 64-byte configuration; the caller's contract grants the tile state.
        unsafe { asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly)) };
    }

    /// Releases the tiles (back to their initial state): after a thread's last [`amx_bf16`].
    ///
    /// # Safety
    /// [`usable`] has returned true.
    unsafe fn release() {
        // SAFETY: touches only this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack, nomem)) };
    }

    pub(super) const AMX_BF16: Kernel<f32> = Kernel {
        name: super::AMX_NAME,
        mr: 32,
        nr: 32,
        pairs: true,
        a_rows: true,
        step_align: 16,
        around: Some((configure, release)),
        f: amx_bf16,
    };
}

const PORTABLE_F32: Kernel<f32> = Kernel {
    name: "portable 4x16",
    mr: 4,
    nr: 16,
    pairs: false,
    a_rows: false,
    step_align: 1,
    around: None,
    f: portable::<f32, 4, 16>,
};
const PORTABLE_F64: Kernel<f64> = Kernel {
    name: "portable 4x8",
    mr: 4,
    nr: 8,
    pairs: false,
    a_rows: false,
    step_align: 1,
    around: None,
    f: portable::<f64, 4, 8>,
};

/// Every micro-kernel this CPU can run for lanes of `T`, fastest first.
pub(crate) fn kernels<T: Acc>() -> Vec<Kernel<T>> {
    let mut f32s = Vec::new();
    let mut f64s = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            f32s.push(x86::AVX512_F32);
            f64s.push(x86::AVX512_F64);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            f32s.push(x86::AVX2_F32);
            f64s.push(x86::AVX2_F64);
        }
    }
    f32s.push(PORTABLE_F32);
    f64s.push(PORTABLE_F64);
    let any: Box<dyn Any> = if TypeId::of::<T>() == TypeId::of::<f32>() {
        Box::new(f32s)
    } else {
        Box::new(f64s)
    };
    *any.downcast::<Vec<Kernel<T>>>()
        .expect("the compute type of a float is f32 or f64")
}

/// The environment variable that names the micro-kernel to use instead of the one the CPU table
/// picks (a name as [`kernel_name`] prints it, e.g. `avx512f 12x32`). It applies to every
/// product the named kernel can compute: an f32-lane kernel to f32, f16 and bf16 products, the
/// bf16 dot-product kernel to bf16 products only.
pub const GEMM_KERNEL_ENV: &str = "NBIT_GEMM_KERNEL";

/// Reads [`GEMM_KERNEL_ENV`]: `None` when unset or empty, the kernel's name when this CPU runs a
/// kernel of that name, else an error naming the value.
pub fn gemm_kernel_from_env() -> Result<Option<&'static str>, Error> {
    let Ok(v) = std::env::var(GEMM_KERNEL_ENV) else {
        return Ok(None);
    };
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    // The AMX kernel is only looked for when named (looking asks Linux for the tile state).
    let lanes = match v.eq_ignore_ascii_case(AMX_NAME) {
        true => bf16_kernels(),
        false => bf16_kernels_but_amx(),
    };
    lanes
        .into_iter()
        .map(|k| k.name)
        .chain(kernels::<f64>().into_iter().map(|k| k.name))
        .find(|name| name.eq_ignore_ascii_case(v))
        .map(Some)
        .ok_or_else(|| Error::InvalidArgument {
            name: GEMM_KERNEL_ENV,
            value: v.to_string(),
            expected: "the name of a micro-kernel this CPU can run, as `nbit::backend::kernel_name` \
                       prints it: 'amx_bf16 32x32' or 'avx512_bf16 vdpbf16ps 12x32' (bf16 only), 'avx512f 12x32', \
                       'avx2+fma 6x16' or 'portable 4x16' (f32 lanes); 'avx512f 12x16', 'avx2+fma 6x8' \
                       or 'portable 4x8' (f64 lanes); unset it to let nbit choose",
        })
}

/// The kernel name [`GEMM_KERNEL_ENV`] gives, read once per process (`None` when unset or not a
/// kernel this CPU runs: `Trainer::build` reports the latter as an error).
fn override_name() -> Option<&'static str> {
    use std::sync::OnceLock;
    static NAME: OnceLock<Option<&'static str>> = OnceLock::new();
    *NAME.get_or_init(|| gemm_kernel_from_env().ok().flatten())
}

/// The kernel [`GEMM_KERNEL_ENV`] names, if it names one of `candidates`.
fn overridden<T: Copy>(candidates: &[Kernel<T>]) -> Option<Kernel<T>> {
    let name = override_name()?;
    candidates.iter().copied().find(|k| k.name == name)
}

/// Whether [`GEMM_KERNEL_ENV`] names the kernel for `E`'s lanes, so that products of `E` run on it
/// and never on the `gemm-f32` / `gemm-f64` crates. Asked on every product: two cached reads.
pub(crate) fn forced<E: Float>() -> bool {
    override_name().is_some_and(|name| kernel::<E::Acc>().name == name)
}

/// The kernel this process uses for lanes of `T`: the one [`GEMM_KERNEL_ENV`] names, else the
/// first (widest) of [`kernels`], chosen once.
fn kernel<T: Acc>() -> Kernel<T> {
    use std::sync::OnceLock;
    static F32: OnceLock<Kernel<f32>> = OnceLock::new();
    static F64: OnceLock<Kernel<f64>> = OnceLock::new();
    fn choose<T: Acc>() -> Kernel<T> {
        let ks = kernels::<T>();
        overridden(&ks).unwrap_or(ks[0])
    }
    let any: &dyn Any = if TypeId::of::<T>() == TypeId::of::<f32>() {
        F32.get_or_init(choose::<f32>)
    } else {
        F64.get_or_init(choose::<f64>)
    };
    *any.downcast_ref::<Kernel<T>>()
        .expect("the compute type of a float is f32 or f64")
}

/// The kernels that can multiply bf16 operands on this CPU: the f32 kernels (operands widened
/// while packing), where the CPU has AVX-512 BF16 the `vdpbf16ps` kernel, and where it has AMX
/// (and Linux grants it) the tile kernel.
pub(crate) fn bf16_kernels() -> Vec<Kernel<f32>> {
    let mut ks = bf16_kernels_but_amx();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    if amx::usable() {
        ks.insert(0, amx::AMX_BF16);
    }
    ks
}

/// [`bf16_kernels`] without the AMX kernel, which asking for would make the process ask Linux for
/// the tile state (a process-wide change: see [`amx::usable`]).
fn bf16_kernels_but_amx() -> Vec<Kernel<f32>> {
    let mut ks = kernels::<f32>();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16") {
        ks.insert(0, x86::AVX512_BF16_PAIRS);
    }
    ks
}

/// The AMX kernel's name, as [`GEMM_KERNEL_ENV`] takes it.
const AMX_NAME: &str = "amx_bf16 32x32";

/// What CPUID says about the processor: its vendor string and its family (base plus extended,
/// as `/proc/cpuinfo`'s `cpu family`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CpuId {
    pub vendor: [u8; 12],
    pub family: u32,
}

impl CpuId {
    /// This processor's, or `None` off x86-64.
    pub(crate) fn this() -> Option<CpuId> {
        #[cfg(target_arch = "x86_64")]
        {
            // CPUID leaves 0 and 1 exist on every x86-64 processor.
            let (l0, l1) = (core::arch::x86_64::__cpuid(0), core::arch::x86_64::__cpuid(1));
            let mut vendor = [0u8; 12];
            vendor[..4].copy_from_slice(&l0.ebx.to_le_bytes());
            vendor[4..8].copy_from_slice(&l0.edx.to_le_bytes());
            vendor[8..].copy_from_slice(&l0.ecx.to_le_bytes());
            let base = (l1.eax >> 8) & 0xF;
            let family = if base == 0xF {
                base + ((l1.eax >> 20) & 0xFF)
            } else {
                base
            };
            Some(CpuId { vendor, family })
        }
        #[cfg(not(target_arch = "x86_64"))]
        None
    }

    /// The vendor as text, e.g. `AuthenticAMD`.
    pub(crate) fn vendor(&self) -> &str {
        core::str::from_utf8(&self.vendor).unwrap_or("unknown")
    }
}

/// Whether the bf16 dot-product instruction (`vdpbf16ps`) multiplies faster than widening to
/// f32 FMAs on `cpu`: a fixed table from measurements on the development machines (DESIGN.md
/// section 8), so every process on a machine makes the same choice and a seeded run gives the
/// same bits. AMD Zen 4 (family 25) and Zen 5 (family 26) run `vdpbf16ps` at twice their f32 FMA
/// rate; Intel Xeon (Sapphire Rapids, family 6, with AVX512-FP16) at half of it. CPUs not in the
/// table widen, which is exact f32 arithmetic on every input.
pub(crate) fn bf16_dot_product_wins(cpu: CpuId) -> bool {
    cpu.vendor() == "AuthenticAMD" && matches!(cpu.family, 25 | 26)
}

/// The kernel for products of `E`, chosen once per process from what the CPU reports: for bf16,
/// the AMX tile kernel where the CPU has AMX (Intel Sapphire Rapids and later), else the table in
/// [`bf16_dot_product_wins`] between widening to f32 FMAs and the bf16 dot-product instruction;
/// [`GEMM_KERNEL_ENV`] overrides the choice.
fn kernel_for<E: Float>() -> Kernel<E::Acc> {
    if E::DTYPE != crate::DType::BF16 {
        return kernel::<E::Acc>();
    }
    use std::sync::OnceLock;
    static BF16: OnceLock<Kernel<f32>> = OnceLock::new();
    let chosen = BF16.get_or_init(|| {
        // A kernel named in the environment is taken without asking for AMX (unless named).
        if override_name().is_some_and(|n| n != AMX_NAME)
            && let Some(k) = overridden(&bf16_kernels_but_amx())
        {
            return k;
        }
        let ks = bf16_kernels();
        if let Some(k) = overridden(&ks) {
            return k;
        }
        // AMX wherever the CPU has it (its tiles multiply at 16 times the f32 FMA rate); else the
        // table's choice between the dot product and widening.
        if let Some(&tiles) = ks.iter().find(|k| k.a_rows) {
            return tiles;
        }
        match ks.iter().find(|k| k.pairs) {
            Some(&dot) if CpuId::this().is_some_and(bf16_dot_product_wins) => dot,
            _ => kernel::<f32>(),
        }
    });
    *(chosen as &dyn Any)
        .downcast_ref::<Kernel<E::Acc>>()
        .expect("bf16 computes in f32")
}

/// The name of the micro-kernel used for `E`'s products, e.g. `"avx512f 12x32"`; for f64,
/// `"gemm crate"` (the `gemm-f64` kernels; f32 products whose operands are both row-major also
/// run on `gemm-f32`, where it measured faster) unless [`GEMM_KERNEL_ENV`] names an f64 kernel.
pub fn kernel_name<E: Float>() -> &'static str {
    if E::DTYPE == crate::DType::F64 && !forced::<E>() {
        return "gemm crate";
    }
    kernel_for::<E>().name
}

/// A raw view of an operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Operand<E> {
    ptr: *const E,
    rs: isize,
    cs: isize,
}

impl<E> Operand<E> {
    /// The operand transposed (its strides swapped): B for the packing routine, whose "rows"
    /// are C's columns.
    fn t(self) -> Self {
        Operand {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

// SAFETY: an `Operand` is only built from a borrowed array view that outlives every thread that
// reads it (the threads are joined inside `gemm`), and it is only read.
unsafe impl<E: Sync> Send for Operand<E> {}
unsafe impl<E: Sync> Sync for Operand<E> {}

/// The output, shared by threads that write disjoint tiles: element `(i, j)` at
/// `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Out<T> {
    ptr: *mut T,
    rs: usize,
    cs: usize,
}
// SAFETY: threads write disjoint column or row ranges of the output (see `gemm`).
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

/// Where a product's tiles go.
#[derive(Clone, Copy)]
enum Dest<'a, E: Float> {
    /// Added to an accumulator of `E::Acc`, a block of `k` at a time; with `overwrite_first`
    /// (no bias), the first block writes it without reading it.
    Acc { out: Out<E::Acc>, overwrite_first: bool },
    /// Summed over all of `k` in a tile on the stack, the bias added, and rounded once into the
    /// output of `E`: the rounding is the tile's epilogue, so C is written once, in `E`. The bias
    /// is widened and indexed by the output's columns; `bias_by_rows` when the product is
    /// computed transposed (C^T), whose rows are the output's columns.
    Round {
        out: Out<E>,
        bias: Option<&'a [E::Acc]>,
        bias_by_rows: bool,
    },
}

thread_local! {
    /// Packing space of this thread, kept between calls (8-byte words, carved at 64-byte
    /// alignment).
    static ARENA: RefCell<Vec<u64>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with `words` 8-byte words of this thread's packing space (a fresh buffer when the
/// thread's own is in use, as when a product runs inside another's work).
fn with_arena<R>(words: usize, f: impl FnOnce(*mut u64) -> R) -> R {
    ARENA.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => {
            if v.len() < words {
                *v = vec![0u64; words];
            }
            f(v.as_mut_ptr())
        }
        Err(_) => f(vec![0u64; words].as_mut_ptr()),
    })
}

/// Space for `n` values of `T`, in 8-byte words, with room to align the start to 64 bytes.
fn words_for<T>(n: usize) -> usize {
    (n * size_of::<T>()).div_ceil(8) + 8
}

/// `p` advanced to the next 64-byte boundary.
fn align64<T>(p: *mut u64) -> *mut T {
    let off = p.align_offset(64);
    p.wrapping_add(off / 8).cast()
}

/// `C = op(A) op(B) (+ bias)` as a row-major `m x n` vector, `A` `m x k`, `B` `k x n` (views carry
/// any transposition as strides). 16-bit operands are widened to f32 while packing, the products
/// accumulate in f32 onto the bias, and each output is rounded once.
pub(crate) fn gemm<E: Float>(a: ArrayView2<E>, b: ArrayView2<E>, bias: Option<&[E]>) -> Vec<E> {
    gemm_with(kernel_for::<E>(), num_threads(), a, b, bias)
}

/// [`gemm`] with a given micro-kernel and thread count (tests run every kernel).
pub(crate) fn gemm_with<E: Float>(
    kern: Kernel<E::Acc>,
    threads: usize,
    a: ArrayView2<E>,
    b: ArrayView2<E>,
    bias: Option<&[E]>,
) -> Vec<E> {
    if same::<E, E::Acc>() {
        // f32, f64: the accumulator is the result.
        let mut c = Vec::new();
        accumulate(kern, threads, a, b, bias, &mut c, b.ncols());
        let any: Box<dyn Any> = Box::new(c);
        return *any.downcast::<Vec<E>>().expect("E is its own compute type");
    }
    let ((m, k), n) = (a.dim(), b.ncols());
    if kern.pairs && (1..=K_WHOLE).contains(&k) && m > 0 && n > 0 {
        // Each tile summed over all of `k` and rounded in its epilogue: no f32 accumulator,
        // and C written once, in bf16.
        let bias_acc = bias.map(|v| {
            let mut w = vec![<E::Acc as Acc>::c(0.0); v.len()];
            E::widen_slice(v, &mut w);
            w
        });
        let mut r: Vec<E> = Vec::with_capacity(m * n);
        let out = Out {
            ptr: r.as_mut_ptr(),
            rs: n,
            cs: 1,
        };
        product(kern, threads, a, b, out, |out, transposed| Dest::Round {
            out,
            bias: bias_acc.as_deref(),
            bias_by_rows: transposed,
        });
        // SAFETY: `product` wrote every element of the `m x n` output (every tile of every
        // thread's range, whole or through the edge tile), each once.
        unsafe { r.set_len(m * n) };
        return r;
    }
    // 16-bit: the f32 accumulator is scratch, kept per thread (a fresh one when in use), so
    // a training loop does not map and fault in a new one for every product.
    thread_local! {
        static ACC: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    }
    // The scratch accumulator's rows are padded off a multiple of 1 KiB: a C tile's rows 4 KiB
    // apart share an L1 set, and a kernel that loads and stores whole tiles (AMX) then runs at
    // two thirds of its speed.
    let ldc = if n >= 256 && n.is_multiple_of(256) {
        n + 16
    } else {
        n
    };
    let round = |c: &mut Vec<E::Acc>| {
        accumulate(kern, threads, a, b, bias, c, ldc);
        let mut r = vec![E::zero(); a.nrows() * n];
        if ldc == n {
            super::parallel::par_parts(&mut r, super::parallel::PARALLEL_MIN_ELEMENTS, 64, |lo, part| {
                round_out(&c[lo..lo + part.len()], part)
            });
        } else {
            super::parallel::par_parts(&mut r, super::parallel::PARALLEL_MIN_ELEMENTS, n, |lo, part| {
                for (i, row) in part.chunks_mut(n).enumerate() {
                    let at = (lo / n + i) * ldc;
                    round_out(&c[at..at + n], row);
                }
            });
        }
        r
    };
    ACC.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => match (&mut *v as &mut dyn Any).downcast_mut::<Vec<E::Acc>>() {
            Some(c) => round(c),
            None => round(&mut Vec::new()),
        },
        Err(_) => round(&mut Vec::new()),
    })
}

isa_dispatch! {
    /// Rounds the f32 accumulator into the 16-bit output, compiled for the best instruction set.
    fn round_out<E: Float>(src: &[E::Acc], dst: &mut [E]) => round_out_body
}

#[inline(always)]
fn round_out_body<E: Float>(src: &[E::Acc], dst: &mut [E]) {
    E::round_slice(src, dst)
}

/// Whether `A` and `B` are one type.
fn same<A: 'static, B: 'static>() -> bool {
    TypeId::of::<A>() == TypeId::of::<B>()
}

/// `c = op(A) op(B) (+ bias)` in the compute type, `c` resized to `m x n` (its capacity reused).
/// `c = a @ b (+ bias)` as an `m x n` matrix whose rows are `ldc >= n` apart (the padding
/// between rows zero, or the bias's padding).
fn accumulate<E: Float>(
    kern: Kernel<E::Acc>,
    threads: usize,
    a: ArrayView2<E>,
    b: ArrayView2<E>,
    bias: Option<&[E]>,
    c: &mut Vec<E::Acc>,
    ldc: usize,
) {
    let ((m, k), n) = (a.dim(), b.ncols());
    debug_assert_eq!(b.nrows(), k);
    debug_assert!(ldc >= n);
    // C's shape as the caller sees it (`m` and `n` swap below when C^T is computed).
    let (c_rows, c_cols) = (m, n);
    let zero = <E::Acc as Acc>::c(0.0);
    c.clear();
    c.reserve(m * ldc);
    // The accumulator starts as the bias, so `a @ b + bias` is rounded once. Without a bias the
    // first block of `k` writes C without reading it, so C is never zeroed first (and its
    // fresh pages are never read before written, which would cost a copy-on-write fault each).
    let overwrite_first = bias.is_none() && m > 0 && n > 0 && k > 0;
    match bias {
        Some(v) => {
            debug_assert_eq!(v.len(), n);
            let mut row = vec![zero; ldc];
            E::widen_slice(v, &mut row[..n]);
            for _ in 0..m {
                c.extend_from_slice(&row);
            }
        }
        None if !overwrite_first => c.resize(m * ldc, zero),
        None => {}
    }
    if m > 0 && n > 0 && k > 0 {
        let out = Out {
            ptr: c.as_mut_ptr(),
            rs: ldc,
            cs: 1,
        };
        product(kern, threads, a, b, out, |out, _| Dest::Acc {
            out,
            overwrite_first,
        });
        if overwrite_first {
            if ldc > c_cols {
                for i in 0..c_rows {
                    // SAFETY: row i's padding, inside the `c_rows * ldc` reserved above.
                    unsafe { c.as_mut_ptr().add(i * ldc + c_cols).write_bytes(0, ldc - c_cols) };
                }
            }
            // SAFETY: the first block of `k` wrote every element of C (each tile of each
            // thread's range, whole or through the edge tile) through `out`, and the padding
            // between rows (`ldc > c_cols`) is zeroed just above.
            unsafe { c.set_len(c_rows * ldc) };
        }
    }
}

/// Runs `C = op(A) op(B)` (`A` `m x k`, `B` `k x n`) over threads into `dest(out, transposed)`,
/// where `out` is C (`m x n` through its strides), or C^T when a narrow C is computed
/// transposed. `m`, `n`, `k` > 0.
fn product<'a, E: Float, T>(
    kern: Kernel<E::Acc>,
    threads: usize,
    a: ArrayView2<E>,
    b: ArrayView2<E>,
    out: Out<T>,
    dest: impl Fn(Out<T>, bool) -> Dest<'a, E> + Sync,
) {
    let ((m, k), n) = (a.dim(), b.ncols());
    let (mr, nr) = (kern.mr, kern.nr);
    // Fraction of the kernels' multiply-adds that land inside C, for C and for C^T.
    let used = |m: usize, n: usize| (m * n) as f64 / (m.div_ceil(mr) * mr * n.div_ceil(nr) * nr) as f64;
    // A narrow C (a classifier's 10 outputs against 32-wide tiles) wastes most of each tile:
    // compute C^T = B^T A^T instead, written through C's strides.
    let transposed = used(n, m) > 1.25 * used(m, n);
    let (a, b, m, n, out) = if transposed {
        let out = Out {
            ptr: out.ptr,
            rs: out.cs,
            cs: out.rs,
        };
        (b.reversed_axes(), a.reversed_axes(), n, m, out)
    } else {
        (a, b, m, n, out)
    };
    let dest = dest(out, transposed);
    let (opa, opb) = (
        Operand {
            ptr: a.as_ptr(),
            rs: a.strides()[0],
            cs: a.strides()[1],
        },
        Operand {
            ptr: b.as_ptr(),
            rs: b.strides()[0],
            cs: b.strides()[1],
        },
    );
    let fmas = m.saturating_mul(n).saturating_mul(k);
    let threads = if fmas < PARALLEL_MIN_FMAS { 1 } else { threads };
    // Split the dimension with more tiles, on tile boundaries, so threads write disjoint
    // parts of C and each packs only what it reads.
    let by_cols = n.div_ceil(nr) >= m.div_ceil(mr);
    let (len, align) = if by_cols { (n, nr) } else { (m, mr) };
    let run = |lo: usize, hi: usize| {
        let (rows, cols) = if by_cols {
            ((0, m), (lo, hi))
        } else {
            ((lo, hi), (0, n))
        };
        // SAFETY: `opa`/`opb` describe the live views `a`, `b`; `dest` is C seen as
        // `m x n`, and this call writes only rows `rows` x columns `cols` of it, disjoint
        // from other calls.
        unsafe {
            match dest {
                Dest::Acc { out, overwrite_first } => {
                    block(kern, opa, opb, out, overwrite_first, k, rows, cols)
                }
                Dest::Round {
                    out,
                    bias,
                    bias_by_rows,
                } => block_whole(kern, opa, opb, out, bias, bias_by_rows, k, rows, cols),
            }
        };
    };
    if threads <= 1 {
        run(0, len);
    } else {
        for_ranges_with(threads, len, 0, align, run);
    }
}

/// A packing routine that transposes 16 x 16 blocks in registers, for operands contiguous along
/// `k`: `f(src, row_stride, rows, kc, dst, w, offset)` (see `x86::transpose_pack_f32`).
type Transposer<E> = unsafe fn(*const E, isize, usize, usize, *mut f32, usize, usize);

/// The register-transposing packer for `E` on this CPU (AVX-512 with BW), if any.
fn transposer<E: Float>() -> Option<Transposer<E>> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        let ok = *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
        });
        static F32: Transposer<f32> = x86::transpose_pack_f32;
        static BF16: Transposer<half::bf16> = x86::transpose_pack_bf16;
        static F16: Transposer<half::f16> = x86::transpose_pack_f16;
        if ok {
            let f: &dyn Any = match E::DTYPE {
                crate::DType::F32 => &F32,
                crate::DType::BF16 => &BF16,
                crate::DType::F16 => &F16,
                _ => return None,
            };
            return f.downcast_ref::<Transposer<E>>().copied();
        }
    }
    None
}

/// Packs `kc` steps of `rows` rows of an operand, starting at (`r0`, `p0`), into panels of
/// `w` rows laid out `[panel][p][i]`, widened to the compute type, zero past `rows`. `E` values
/// are gathered into `scratch` first when the type widens fastest by slices (f16: F16C).
///
/// # Safety
/// `(r0 + i, p0 + p)` is inside the operand for `i < rows`, `p < kc`; `dst` has
/// `rows.div_ceil(w) * w * kc` values and `scratch` `w * kc`.
#[allow(clippy::too_many_arguments)]
unsafe fn pack<E: Float>(
    x: Operand<E>,
    r0: usize,
    p0: usize,
    rows: usize,
    kc: usize,
    w: usize,
    dst: *mut E::Acc,
    scratch: *mut E,
) {
    let zero = <E::Acc as Acc>::c(0.0);
    let transpose = if x.cs == 1 && x.rs != 1 {
        transposer::<E>()
    } else {
        None
    };
    for panel in 0..rows.div_ceil(w) {
        let live = w.min(rows - panel * w);
        // SAFETY (all pointer arithmetic below): `base` is element (r0 + panel * w, p0); with
        // i < live and p < kc every read stays inside the operand, and every write inside the
        // panel's `w * kc` values of `dst` (or of `scratch`), as the caller guarantees.
        let base = x
            .ptr
            .wrapping_offset((r0 + panel * w) as isize * x.rs + p0 as isize * x.cs);
        let d = dst.wrapping_add(panel * w * kc);
        {
            if let Some(t) = transpose {
                if live < w {
                    for p in 0..kc {
                        for i in live..w {
                            unsafe { *d.add(p * w + i) = zero };
                        }
                    }
                }
                for off in (0..live).step_by(16) {
                    let rows = (live - off).min(16);
                    // SAFETY: rows off..off + rows < live of the panel, `kc` contiguous values
                    // each; `d` is this panel, and E's compute type is f32 (`transposer`).
                    unsafe {
                        t(
                            base.wrapping_offset(off as isize * x.rs),
                            x.rs,
                            rows,
                            kc,
                            d.cast(),
                            w,
                            off,
                        )
                    };
                }
                continue;
            }
        }
        if x.rs == 1 {
            // The panel's rows are adjacent in memory (B of `A @ B` row-major, or a transposed
            // A): every step of `p` converts one contiguous run with the slice conversion (a
            // vectorised loop; F16C or AVX-512 for f16).
            for p in 0..kc {
                let (src, drow) = unsafe {
                    (
                        core::slice::from_raw_parts(base.wrapping_offset(p as isize * x.cs), live),
                        core::slice::from_raw_parts_mut(d.wrapping_add(p * w), w),
                    )
                };
                E::widen_slice(src, &mut drow[..live]);
                drow[live..].fill(zero);
            }
        } else if E::SLICE_CONVERSIONS {
            for p in 0..kc {
                let src = base.wrapping_offset(p as isize * x.cs);
                for i in 0..w {
                    let v = if i < live {
                        unsafe { *src.offset(i as isize * x.rs) }
                    } else {
                        E::zero()
                    };
                    unsafe { *scratch.add(p * w + i) = v };
                }
            }
            let (s, d) = unsafe {
                (
                    core::slice::from_raw_parts(scratch, w * kc),
                    core::slice::from_raw_parts_mut(d, w * kc),
                )
            };
            E::widen_slice(s, d);
        } else {
            if live < w {
                for p in 0..kc {
                    for i in live..w {
                        unsafe { *d.add(p * w + i) = zero };
                    }
                }
            }
            // Each row read along its length (contiguous when `cs` is 1), written every `w`.
            for i in 0..live {
                let src = base.wrapping_offset(i as isize * x.rs);
                for p in 0..kc {
                    unsafe { *d.add(p * w + i) = (*src.offset(p as isize * x.cs)).to_acc() };
                }
            }
        }
    }
}

/// Packs like [`pack`], for a [`Kernel::pairs`] kernel: values `k` and `k + 1` of a row share a
/// 32-bit slot (bf16 bits, `k` in the low half), laid out `[panel][k / 2][i]` (or, `by_rows`,
/// `[panel][i][k / 2]`), `steps` slots deep (at least `kc.div_ceil(2)`), zero past `rows` and
/// past `kc`.
///
/// # Safety
/// As [`pack`], with `dst` holding `rows.div_ceil(w) * w * steps` slots; `E` is bf16.
#[allow(clippy::too_many_arguments)]
unsafe fn pack_pairs<E: Float>(
    x: Operand<E>,
    r0: usize,
    p0: usize,
    rows: usize,
    kc: usize,
    w: usize,
    steps: usize,
    by_rows: bool,
    dst: *mut u32,
) {
    debug_assert_eq!(E::DTYPE, crate::DType::BF16);
    debug_assert!(steps >= kc.div_ceil(2));
    // The operand's bf16 values as their bits (`E` is bf16: two bytes, the same layout). A pair
    // read as one u32 has the even `k` in its low half on a little-endian CPU (x86-64, aarch64).
    let raw = x.ptr.cast::<u16>();
    // Pairs are 32-bit lanes, so f32's in-register 16 x 16 transpose moves them where a panel
    // needs them across its rows; and a panel of another layout is built `[step][i]` here first.
    let tp = transposer::<f32>();
    let mut staged: Vec<u32> = Vec::new();
    for panel in 0..rows.div_ceil(w) {
        let live = w.min(rows - panel * w);
        let base = raw.wrapping_offset((r0 + panel * w) as isize * x.rs + p0 as isize * x.cs);
        let d = dst.wrapping_add(panel * w * steps);
        let slot = |s: usize, i: usize| if by_rows { i * steps + s } else { s * w + i };
        // SAFETY (every read below): row i < live and depth p < kc lie inside the operand, and
        // every slot (s < steps, i < w) inside this panel of `dst` (caller).
        if x.cs == 1 {
            // Rows contiguous along k (a row-major A, or B = W^T): a pair is one unaligned u32,
            // and a row's `kc / 2` full pairs are its bytes as they are.
            let full = kc / 2;
            // Across the rows (`[step][i]`, a B = W^T): 16 rows at a time through the transpose,
            // which takes a row stride in pairs (so an even one).
            let transposed = match tp {
                Some(tp) if !by_rows && x.rs.rem_euclid(2) == 0 && full > 0 => {
                    for r in (0..live).step_by(16) {
                        let src = base.wrapping_offset(r as isize * x.rs).cast::<f32>();
                        // SAFETY: rows r.. r + 16 (at most `live`) hold `full` pairs each, and
                        // `d` takes slot `s * w + r + i` for s < full <= steps, i < 16, r + i < w.
                        unsafe { tp(src, x.rs / 2, (live - r).min(16), full, d.cast(), w, r) };
                    }
                    true
                }
                _ => false,
            };
            for i in 0..w {
                let row = base.wrapping_offset(i as isize * x.rs);
                let pairs = if i < live { full } else { 0 };
                if by_rows {
                    let out = d.wrapping_add(i * steps);
                    // SAFETY: `pairs` pairs of this row, into its `steps` slots.
                    unsafe { core::ptr::copy_nonoverlapping(row.cast::<u8>(), out.cast::<u8>(), pairs * 4) };
                } else if !transposed {
                    for s in 0..pairs {
                        unsafe { *d.add(s * w + i) = row.add(2 * s).cast::<u32>().read_unaligned() };
                    }
                }
                for s in pairs..steps {
                    let v = match i < live && 2 * s < kc {
                        true => u32::from(unsafe { *row.add(2 * s) }),
                        false => 0,
                    };
                    unsafe { *d.add(slot(s, i)) = v };
                }
            }
        } else if let Some(tp) = tp.filter(|_| by_rows && x.rs == 1 && live == w && w.is_multiple_of(16)) {
            // Contiguous along the rows but wanted by rows (an A = dy^T): interleaved into
            // `[step][i]` first, in the loop the compiler vectorises, then transposed into place.
            staged.clear();
            staged.resize(steps * w, 0);
            for s in 0..kc.div_ceil(2) {
                let (lo, hi) = (2 * s, 2 * s + 1);
                // SAFETY: rows lo (and hi, when < kc) are inside the operand, `w` values each.
                let lo_row =
                    unsafe { core::slice::from_raw_parts(base.wrapping_offset(lo as isize * x.cs), w) };
                let out = &mut staged[s * w..(s + 1) * w];
                if hi < kc {
                    let hi_row =
                        unsafe { core::slice::from_raw_parts(base.wrapping_offset(hi as isize * x.cs), w) };
                    for ((o, &l), &h) in out.iter_mut().zip(lo_row).zip(hi_row) {
                        *o = u32::from(l) | u32::from(h) << 16;
                    }
                } else {
                    for (o, &l) in out.iter_mut().zip(lo_row) {
                        *o = u32::from(l);
                    }
                }
            }
            for s0 in (0..steps).step_by(16) {
                // SAFETY: staged rows s0.. s0 + 16 (at most `steps`) hold `w` lanes each, and `d`
                // takes slot `i * steps + s0 + r` for i < w, r < 16, s0 + r < steps.
                unsafe {
                    tp(
                        staged.as_ptr().add(s0 * w).cast(),
                        w as isize,
                        (steps - s0).min(16),
                        w,
                        d.cast(),
                        steps,
                        s0,
                    )
                };
            }
        } else {
            // Any other layout (contiguous along the rows, as a row-major B, or strided): two
            // values of k at a time for every row, interleaved.
            for s in 0..steps {
                let (lo, hi) = (2 * s, 2 * s + 1);
                let lo_row = base.wrapping_offset(lo as isize * x.cs);
                let hi_row = base.wrapping_offset(hi as isize * x.cs);
                if x.rs == 1 && live == w && hi < kc {
                    // The common case, in a loop the compiler vectorises: both rows whole.
                    let (lo_row, hi_row) = unsafe {
                        (
                            core::slice::from_raw_parts(lo_row, w),
                            core::slice::from_raw_parts(hi_row, w),
                        )
                    };
                    for (i, (&l, &h)) in lo_row.iter().zip(hi_row).enumerate() {
                        unsafe { *d.add(slot(s, i)) = u32::from(l) | u32::from(h) << 16 };
                    }
                    continue;
                }
                for i in 0..w {
                    let at = |row: *const u16, p: usize| match i < live && p < kc {
                        true => u32::from(unsafe { *row.offset(i as isize * x.rs) }),
                        false => 0,
                    };
                    unsafe { *d.add(slot(s, i)) = at(lo_row, lo) | at(hi_row, hi) << 16 };
                }
            }
        }
    }
}

/// Runs a kernel's clean-up when dropped (also when a panic unwinds through the product).
struct Defer(unsafe fn());

/// Runs `kern`'s per-thread set-up (if it has one); its clean-up runs when the guard returned
/// drops.
///
/// # Safety
/// The CPU runs the kernel.
unsafe fn set_up<T>(kern: &Kernel<T>) -> Option<Defer> {
    let (before, after) = kern.around?;
    // SAFETY: the caller's contract.
    unsafe { before() };
    Some(Defer(after))
}

impl Drop for Defer {
    fn drop(&mut self) {
        // SAFETY: built only from a kernel's `around`, after its set-up ran on this thread.
        unsafe { (self.0)() };
    }
}

/// The blocked product for output rows `rows.0..rows.1` and columns `cols.0..cols.1`.
///
/// # Safety
/// `a` is `m x k` and `b` `k x n` for an `m` covering `rows` and an `n` covering `cols`; `c`
/// is a live `m x n` accumulator that no other thread reads or writes in this block.
#[allow(clippy::too_many_arguments)]
unsafe fn block<E: Float>(
    kern: Kernel<E::Acc>,
    a: Operand<E>,
    b: Operand<E>,
    c: Out<E::Acc>,
    overwrite_first: bool,
    k: usize,
    rows: (usize, usize),
    cols: (usize, usize),
) {
    let (mr, nr) = (kern.mr, kern.nr);
    // A pairs kernel's panels are `steps` deep, padded to its alignment (which can exceed `kc`).
    let steps_for = |kc: usize| match kern.pairs {
        true => kc.div_ceil(2).next_multiple_of(kern.step_align),
        false => kc,
    };
    let (mc_max, nc_max, kc_max) = (MC.div_ceil(mr) * mr, NC.div_ceil(nr) * nr, KC.min(k));
    // Slots of `E::Acc` per packed row: a pair of bf16 per slot for a pairs kernel.
    let depth_max = if kern.pairs { steps_for(kc_max) } else { kc_max };
    let a_len = mc_max * depth_max;
    let b_len = nc_max * depth_max;
    let s_len = mr.max(nr) * kc_max;
    let words = words_for::<E::Acc>(a_len) + words_for::<E::Acc>(b_len) + words_for::<E>(s_len);
    let bt = b.t();
    // SAFETY: the CPU runs the kernel (the caller's contract), so its set-up too.
    let _after = unsafe { set_up(&kern) };
    with_arena(words, |arena| {
        let abuf: *mut E::Acc = align64(arena);
        let bbuf: *mut E::Acc = align64(arena.wrapping_add(words_for::<E::Acc>(a_len)));
        let scratch: *mut E =
            align64(arena.wrapping_add(words_for::<E::Acc>(a_len) + words_for::<E::Acc>(b_len)));
        let zero = <E::Acc as Acc>::c(0.0);
        // The largest tile of any kernel (AMX's 32 x 32), on the stack.
        let mut tile = [zero; 1024];
        debug_assert!(mr * nr <= tile.len());
        let mut packed_a = None;
        for jc in (cols.0..cols.1).step_by(nc_max) {
            let nc = nc_max.min(cols.1 - jc);
            for pc in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - pc);
                // SAFETY: columns jc..jc+nc of B over depth pc..pc+kc are inside B, and
                // `bbuf` holds `nc_max * depth_max` slots (`depth_max >= steps`).
                // SAFETY (pairs): as above; a pairs kernel only ever gets bf16 operands.
                let steps = steps_for(kc);
                unsafe {
                    if kern.pairs {
                        pack_pairs(bt, jc, pc, nc, kc, nr, steps, false, bbuf.cast())
                    } else {
                        pack(bt, jc, pc, nc, kc, nr, bbuf, scratch)
                    }
                };
                for ic in (rows.0..rows.1).step_by(mc_max) {
                    let mc = mc_max.min(rows.1 - ic);
                    // A's block is packed already when it is the last one packed (one block of
                    // rows and of `k`: then A is packed once, not once per block of B).
                    if packed_a.replace((ic, pc)) != Some((ic, pc)) {
                        // SAFETY: rows ic..ic+mc of A over depth pc..pc+kc are inside A.
                        unsafe {
                            if kern.pairs {
                                pack_pairs(a, ic, pc, mc, kc, mr, steps, kern.a_rows, abuf.cast())
                            } else {
                                pack(a, ic, pc, mc, kc, mr, abuf, scratch)
                            }
                        };
                    }
                    for ir in (0..mc).step_by(mr) {
                        let ap = abuf.wrapping_add(ir * steps);
                        let mlive = mr.min(mc - ir);
                        for jr in (0..nc).step_by(nr) {
                            let bp = bbuf.wrapping_add(jr * steps);
                            let nlive = nr.min(nc - jr);
                            let (i0, j0) = (ic + ir, jc + jr);
                            let overwrite = overwrite_first && pc == 0;
                            let dst = c.ptr.wrapping_add(i0 * c.rs + j0 * c.cs);
                            // SAFETY: (i0, j0) is this block's tile of C, whose first
                            // `mlive x nlive` elements are inside C.
                            unsafe {
                                add_tile(kern, steps, ap, bp, dst, c, mlive, nlive, overwrite, &mut tile)
                            };
                        }
                    }
                }
            }
        }
    });
}

/// [`block`] for a [`Dest::Round`] product (a pairs kernel, `0 < k <= K_WHOLE`). Both blocks
/// are packed for all of `k`, in slices `KC` deep; each row of tiles is summed over every slice
/// into a buffer of `mr x nc` sums (the A slice in use stays in L1 while B's stream past it),
/// starting from the bias, and is then rounded into the output: C is written once, in `E`.
///
/// # Safety
/// As [`block`]; `out` is the live `m x n` output, and a bias is as long as its columns.
#[allow(clippy::too_many_arguments)]
unsafe fn block_whole<E: Float>(
    kern: Kernel<E::Acc>,
    a: Operand<E>,
    b: Operand<E>,
    out: Out<E>,
    bias: Option<&[E::Acc]>,
    bias_by_rows: bool,
    k: usize,
    rows: (usize, usize),
    cols: (usize, usize),
) {
    debug_assert!(kern.pairs && k > 0 && k <= K_WHOLE);
    let (mr, nr) = (kern.mr, kern.nr);
    let steps_for = |kc: usize| kc.div_ceil(2).next_multiple_of(kern.step_align);
    let slices = k.div_ceil(KC);
    // Slots (pairs) per packed row in each slice, and in all of them.
    let slice_steps = steps_for(KC.min(k));
    let row_slots = slices * slice_steps;
    // Blocks of about L2's size.
    let fit = |bytes: usize, align: usize, most: usize| {
        ((bytes / (row_slots * 4) / align).max(1) * align).min(most.div_ceil(align) * align)
    };
    let (mc_max, nc_max) = (
        fit(WHOLE_A_BYTES, mr, rows.1 - rows.0),
        fit(WHOLE_B_BYTES, nr, NC),
    );
    let (a_len, b_len, c_len) = (mc_max * row_slots, nc_max * row_slots, mr * nc_max);
    let words = words_for::<u32>(a_len) + words_for::<u32>(b_len) + words_for::<E::Acc>(c_len);
    let bt = b.t();
    // SAFETY: the CPU runs the kernel (the caller's contract), so its set-up too.
    let _after = unsafe { set_up(&kern) };
    with_arena(words, |arena| {
        let abuf: *mut u32 = align64(arena);
        let bbuf: *mut u32 = align64(arena.wrapping_add(words_for::<u32>(a_len)));
        let cbuf: *mut E::Acc =
            align64(arena.wrapping_add(words_for::<u32>(a_len) + words_for::<u32>(b_len)));
        // Rows r0..r0+n of `x` in panels `w` wide, slice `s` at `s * padded rows * slice_steps`.
        let pack_all = |x: Operand<E>, r0: usize, n: usize, w: usize, by_rows: bool, dst: *mut u32| {
            let pad = n.div_ceil(w) * w;
            for s in 0..slices {
                let (pc, kc) = (s * KC, KC.min(k - s * KC));
                // SAFETY: rows r0..r0+n over depth pc..pc+kc are inside `x`; the slice's
                // `pad * steps_for(kc)` slots lie inside `dst`'s `pad * row_slots`.
                unsafe {
                    pack_pairs(
                        x,
                        r0,
                        pc,
                        n,
                        kc,
                        w,
                        steps_for(kc),
                        by_rows,
                        dst.add(s * pad * slice_steps),
                    )
                };
            }
        };
        let mut packed_a = None;
        for jc in (cols.0..cols.1).step_by(nc_max) {
            let nc = nc_max.min(cols.1 - jc);
            let nc_pad = nc.div_ceil(nr) * nr;
            pack_all(bt, jc, nc, nr, false, bbuf);
            for ic in (rows.0..rows.1).step_by(mc_max) {
                let mc = mc_max.min(rows.1 - ic);
                let mc_pad = mc.div_ceil(mr) * mr;
                // Packed already when it is the block packed last (then A is packed once).
                if packed_a.replace(ic) != Some(ic) {
                    pack_all(a, ic, mc, mr, kern.a_rows, abuf);
                }
                for ir in (0..mc).step_by(mr) {
                    let mlive = mr.min(mc - ir);
                    let i0 = ic + ir;
                    // The row of tiles starts as the bias (or the first slice writes over it).
                    if let Some(v) = bias {
                        // SAFETY: `cbuf` holds `mr * nc_max >= mr * nc_pad` sums, this
                        // thread's, and nothing else refers to them while this slice lives.
                        let sums = unsafe { std::slice::from_raw_parts_mut(cbuf, mr * nc_pad) };
                        for (t, tile) in sums.chunks_mut(mr * nr).enumerate() {
                            let (j0, nlive) = (jc + t * nr, nr.min(nc - t * nr));
                            if bias_by_rows {
                                for i in 0..mlive {
                                    tile[i * nr..(i + 1) * nr].fill(v[i0 + i]);
                                }
                            } else {
                                tile[..nlive].copy_from_slice(&v[j0..j0 + nlive]);
                                for i in 1..mlive {
                                    tile.copy_within(..nlive, i * nr);
                                }
                            }
                        }
                    }
                    for s in 0..slices {
                        let steps = steps_for(KC.min(k - s * KC));
                        let ap = abuf.wrapping_add(s * mc_pad * slice_steps + ir * steps);
                        for (t, jr) in (0..nc).step_by(nr).enumerate() {
                            let bp = bbuf.wrapping_add(s * nc_pad * slice_steps + jr * steps);
                            // SAFETY: the panels hold `steps` steps of this slice; the tile is an
                            // `mr x nr` part of `sums`; the CPU has the kernel's features.
                            unsafe {
                                (kern.f)(
                                    steps,
                                    ap.cast(),
                                    bp.cast(),
                                    cbuf.add(t * mr * nr),
                                    nr,
                                    s == 0 && bias.is_none(),
                                )
                            };
                        }
                    }
                    // SAFETY: as above; the kernels' writes are done.
                    let sums = unsafe { std::slice::from_raw_parts(cbuf, mr * nc_pad) };
                    for (t, jr) in (0..nc).step_by(nr).enumerate() {
                        let nlive = nr.min(nc - jr);
                        let tile = &sums[t * mr * nr..(t + 1) * mr * nr];
                        // The output from (i0, jc + jr), this block's tile.
                        let at = Out {
                            ptr: out.ptr.wrapping_add(i0 * out.rs + (jc + jr) * out.cs),
                            ..out
                        };
                        // SAFETY: the tile's first `mlive x nlive` elements are inside the
                        // output and this thread's.
                        unsafe { round_tile(tile, nr, at, (mlive, nlive)) };
                    }
                }
            }
        }
    });
}

/// One tile of `C += A_panel B_panel` (or `=`, with `overwrite`) into an accumulator: straight
/// into C when the tile is whole and C's rows are contiguous, else through `tile`.
///
/// # Safety
/// As [`Kernel::f`] for the panels; `dst` is element `(i0, j0)` of `c`, and the `mlive x nlive`
/// elements from it are inside C and this thread's.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn add_tile<T: Acc>(
    kern: Kernel<T>,
    steps: usize,
    ap: *const T,
    bp: *const T,
    dst: *mut T,
    c: Out<T>,
    mlive: usize,
    nlive: usize,
    overwrite: bool,
    tile: &mut [T; 1024],
) {
    let (mr, nr) = (kern.mr, kern.nr);
    if mlive == mr && nlive == nr && c.cs == 1 {
        // SAFETY: a full tile inside C with unit column stride (the caller's contract).
        unsafe { (kern.f)(steps, ap, bp, dst, c.rs, overwrite) };
        return;
    }
    // SAFETY: `tile` is a private `mr x nr` buffer.
    unsafe { (kern.f)(steps, ap, bp, tile.as_mut_ptr(), nr, true) };
    for i in 0..mlive {
        for j in 0..nlive {
            // SAFETY: (i0 + i, j0 + j) is inside this block of C.
            unsafe {
                let o = dst.add(i * c.rs + j * c.cs);
                let t = tile[i * nr + j];
                *o = if overwrite { t } else { *o + t };
            }
        }
    }
}

/// Rounds the first `mlive x nlive` values of a tile (rows `nr` apart) into `out`, the output
/// seen from the tile's first element; compiled for the best instruction set once per tile (a
/// dispatch per row cost as much as the rounding of a short row).
///
/// # Safety
/// The `mlive x nlive` elements of `out` are inside the output and this thread's.
unsafe fn round_tile<E: Float>(tile: &[E::Acc], nr: usize, out: Out<E>, (mlive, nlive): (usize, usize)) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
        unsafe fn avx512<E: Float>(tile: &[E::Acc], nr: usize, out: Out<E>, live: (usize, usize)) {
            // SAFETY: the caller's contract.
            unsafe { round_tile_body(tile, nr, out, live) }
        }
        if super::isa() == super::Isa::Avx512 {
            // SAFETY: the CPU has these features (`isa`); the rest is the caller's contract.
            return unsafe { avx512(tile, nr, out, (mlive, nlive)) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { round_tile_body(tile, nr, out, (mlive, nlive)) }
}

/// [`round_tile`]'s work.
///
/// # Safety
/// As [`round_tile`].
#[inline(always)]
unsafe fn round_tile_body<E: Float>(tile: &[E::Acc], nr: usize, out: Out<E>, (mlive, nlive): (usize, usize)) {
    for i in 0..mlive {
        let src = &tile[i * nr..i * nr + nlive];
        let row = out.ptr.wrapping_add(i * out.rs);
        if out.cs == 1 {
            // SAFETY: row i's `nlive` elements are inside the output and this thread's (the
            // contract); seen as `MaybeUninit`, since they are not written yet.
            let row = unsafe { std::slice::from_raw_parts_mut(row.cast::<MaybeUninit<E>>(), nlive) };
            for (d, s) in row.iter_mut().zip(src) {
                d.write(E::from_acc(*s));
            }
        } else {
            for (j, s) in src.iter().enumerate() {
                // SAFETY: as above.
                unsafe { row.add(j * out.cs).write(E::from_acc(*s)) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};
    use ndarray::{Array2, ShapeBuilder, s};

    /// Values in [-1, 1) from a counter, rounded to `E`.
    fn values<E: Float>(rows: usize, cols: usize, seed: u64) -> Array2<E> {
        Array2::from_shape_fn((rows, cols), |(i, j)| {
            let h = crate::backend::mix64(seed ^ ((i as u64) << 32 | j as u64));
            E::from_f64((h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
    }

    /// Checks `gemm_with` against an f64 product of the same (exactly widened) values: every
    /// element within one rounding to `E` plus f32/f64 accumulation error.
    fn check<E: Float>(
        kern: Kernel<E::Acc>,
        threads: usize,
        a: ArrayView2<E>,
        b: ArrayView2<E>,
        bias: Option<&[E]>,
    ) {
        let ((m, k), n) = (a.dim(), b.ncols());
        let got = gemm_with(kern, threads, a, b, bias);
        assert_eq!(got.len(), m * n);
        let eps_acc = if size_of::<E::Acc>() == 4 {
            f32::EPSILON as f64
        } else {
            f64::EPSILON
        };
        let eps_e = match E::DTYPE {
            crate::DType::BF16 => 2f64.powi(-8),
            crate::DType::F16 => 2f64.powi(-11),
            _ => eps_acc,
        };
        for i in 0..m {
            for j in 0..n {
                let (mut sum, mut mag) = (
                    bias.map_or(0.0, |v| v[j].as_f64()),
                    bias.map_or(0.0, |v| v[j].as_f64().abs()),
                );
                for p in 0..k {
                    let t = a[(i, p)].as_f64() * b[(p, j)].as_f64();
                    sum += t;
                    mag += t.abs();
                }
                let g = got[i * n + j].as_f64();
                let tol = sum.abs() * eps_e + (k as f64 + 2.0) * eps_acc * mag + 1e-30;
                assert!(
                    (g - sum).abs() <= tol,
                    "{} {:?} m{m} k{k} n{n} threads {threads}: C[{i},{j}] = {g}, f64 reference {sum} (tolerance {tol})",
                    kern.name,
                    E::DTYPE
                );
            }
        }
    }

    /// Awkward shapes (one, prime, past a tile, past a cache block), each with B plain,
    /// transposed and strided, with and without a bias, on one and three threads.
    fn every_shape<E: Float>(kern: Kernel<E::Acc>) {
        for (m, k, n) in [
            (1, 1, 1),
            (7, 33, 5),
            (33, 7, 257),
            (257, 33, 7),
            (12, 256, 32),
            (13, 300, 33),
            (2, 600, 70),
            (64, 1, 10),
            // C's rows 256 apart (the 16-bit accumulator's rows are padded), also as C^T.
            (9, 40, 256),
            (3, 10, 512),
            // Deeper than K_WHOLE, a pairs kernel takes `k` a block at a time into an
            // accumulator (below it, whole, in blocks that the tests' budgets keep small).
            (3, K_WHOLE + 4, 40),
            (0, 5, 3),
            (5, 0, 3),
            (3, 5, 0),
        ] {
            let a = values::<E>(m, k, 1);
            let b = values::<E>(k, n, 2);
            let bt = values::<E>(n, k, 3);
            let a_col = Array2::from_shape_vec((m, k).f(), a.t().iter().copied().collect()).unwrap();
            let wide = values::<E>(m, 2 * k, 4);
            let bias = values::<E>(1, n, 5).into_raw_vec_and_offset().0;
            for threads in [1, 3] {
                check(kern, threads, a.view(), b.view(), None);
                check(kern, threads, a_col.view(), bt.t(), Some(&bias));
                check(kern, threads, wide.slice(s![.., ..;2]), b.view(), Some(&bias));
                check(kern, threads, a.view(), bt.t(), None);
            }
        }
    }

    #[test]
    fn every_f32_lane_kernel_matches_an_f64_reference_in_f32_bf16_and_f16() {
        let ks = kernels::<f32>();
        assert!(ks.iter().any(|k| k.name.starts_with("portable")));
        for kern in ks {
            every_shape::<f32>(kern);
            every_shape::<f16>(kern);
        }
        for kern in bf16_kernels() {
            every_shape::<bf16>(kern);
        }
    }

    #[test]
    fn every_f64_kernel_matches_an_f64_reference() {
        for kern in kernels::<f64>() {
            every_shape::<f64>(kern);
        }
    }

    #[test]
    fn a_product_has_the_same_bits_on_any_number_of_threads() {
        // Large enough to split (above PARALLEL_MIN_FMAS), by columns and by rows.
        for (m, k, n) in [(64, 300, 300), (300, 300, 64)] {
            let (a, b) = (values::<bf16>(m, k, 7), values::<bf16>(k, n, 8));
            let one = gemm_with(kernel_for::<bf16>(), 1, a.view(), b.view(), None);
            for threads in [2, 3, 5] {
                let many = gemm_with(kernel_for::<bf16>(), threads, a.view(), b.view(), None);
                assert!(one.iter().zip(&many).all(|(x, y)| x.to_bits() == y.to_bits()));
            }
        }
    }

    #[test]
    fn sixteen_bit_products_are_rounded_once_from_the_f32_accumulator() {
        // 1 + 3 x 2^-9 with bf16's ulp at 1 being 2^-7: accumulated in bf16, each addition
        // rounds back to 1; accumulated in f32 the sum is 1 + 0.75 ulp, rounded once to 1 + ulp.
        let one = bf16::from_f32(1.0);
        let tiny = bf16::from_f32(2f32.powi(-9));
        let a = Array2::from_shape_vec((1, 4), vec![one, tiny, tiny, tiny]).unwrap();
        let b = Array2::from_shape_vec((4, 1), vec![one; 4]).unwrap();
        let c = gemm(a.view(), b.view(), None);
        assert_eq!(c[0].to_f32(), 1.0 + 2f32.powi(-7));
    }

    #[test]
    fn the_bf16_kernel_table_picks_the_dot_product_on_amd_zen_4_and_5_only() {
        let cpu = |vendor: &[u8; 12], family| CpuId {
            vendor: *vendor,
            family,
        };
        assert!(bf16_dot_product_wins(cpu(b"AuthenticAMD", 25)));
        assert!(bf16_dot_product_wins(cpu(b"AuthenticAMD", 26)));
        assert!(!bf16_dot_product_wins(cpu(b"AuthenticAMD", 23)));
        assert!(!bf16_dot_product_wins(cpu(b"GenuineIntel", 6)));
    }

    #[test]
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn cpuid_reads_the_vendor_and_family_that_proc_cpuinfo_shows() {
        let info = std::fs::read_to_string("/proc/cpuinfo").unwrap();
        let field = |name: &str| {
            let line = info.lines().find(|l| l.starts_with(name)).unwrap();
            line.split(':').nth(1).unwrap().trim().to_string()
        };
        let cpu = CpuId::this().unwrap();
        assert_eq!(cpu.vendor(), field("vendor_id"));
        assert_eq!(cpu.family.to_string(), field("cpu family"));
    }

    #[test]
    fn the_dot_product_kernel_flushes_a_bf16_subnormal_input_and_widening_keeps_it() {
        // 2^-130 is a bf16 subnormal (the smallest normal is 2^-126); times 2^100 it is 2^-30.
        let tiny = f32::from_bits(1 << 19);
        assert_eq!(tiny, 2f32.powi(-65) * 2f32.powi(-65));
        let a = Array2::from_shape_vec((1, 1), vec![bf16::from_f32(tiny)]).unwrap();
        let b = Array2::from_shape_vec((1, 1), vec![bf16::from_f32(2f32.powi(100))]).unwrap();
        assert_eq!(a[[0, 0]].to_f32(), tiny, "the input is representable");
        for kern in bf16_kernels() {
            let c = gemm_with(kern, 1, a.view(), b.view(), None)[0].to_f32();
            let want = if kern.pairs { 0.0 } else { 2f32.powi(-30) };
            assert_eq!(c, want, "{}", kern.name);
        }
    }

    #[test]
    fn the_kernel_in_use_is_named_for_its_instruction_set() {
        let name = kernel_name::<f32>();
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            assert!(name.starts_with("avx512f"), "{name}");
        }
        assert_eq!(kernel_name::<f16>(), name, "f16 products widen to the f32 kernel");
        assert!(bf16_kernels().iter().any(|k| k.name == kernel_name::<bf16>()));
        // Where the CPU has AMX and Linux grants it, bf16 products run on the tiles.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        if override_name().is_none() {
            assert_eq!(
                kernel_name::<bf16>() == "amx_bf16 32x32",
                amx::usable(),
                "{}",
                kernel_name::<bf16>()
            );
        }
    }
}
