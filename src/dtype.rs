//! Element types and the dtype markers that name them in precision types.
//!
//! Two layers, as in PyTorch's `torch.dtype` and the Python scalar it stores:
//!
//! - **Markers** [`F16`], [`BF16`], [`F32`], [`F64`] are zero-sized types used in precision types
//!   (`Mixed<BF16>`, `True<F64>`). Each carries its element type and its bit width as a typenum
//!   constant ([`Dtype::Bits`]), which is how `Mixed<F32>` is ruled out: mixed precision needs a
//!   dtype whose `Bits` is `U16`.
//! - **Elements** (`half::f16`, `half::bf16`, `f32`, `f64`, and the complex types) are the values
//!   tensors store. [`Element`] gives each its run-time [`DType`] tag.

use core::fmt::Debug;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use num_complex::Complex;
use typenum::{U16, U32, U64, Unsigned};

mod sealed {
    pub trait Sealed {}
}

/// The run-time name of an element type, with PyTorch's spelling (`torch.float16`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 half precision (`torch.float16`).
    F16,
    /// bfloat16: f32's exponent with a 7-bit mantissa (`torch.bfloat16`).
    BF16,
    /// IEEE 754 single precision (`torch.float32`).
    F32,
    /// IEEE 754 double precision (`torch.float64`).
    F64,
    /// Complex with f16 parts (`torch.complex32`).
    C32,
    /// Complex with f32 parts (`torch.complex64`).
    C64,
    /// Complex with f64 parts (`torch.complex128`).
    C128,
    /// 64-bit signed integers (`torch.int64`, PyTorch's `LongTensor`): token ids and class
    /// indices.
    I64,
}

impl DType {
    /// PyTorch's name for the dtype, e.g. `"bfloat16"`, `"complex128"`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::C32 => "complex32",
            DType::C64 => "complex64",
            DType::C128 => "complex128",
            DType::I64 => "int64",
        }
    }

    /// Storage bits per element (a complex element counts both parts).
    pub const fn bits(self) -> u32 {
        match self {
            DType::F16 | DType::BF16 => 16,
            DType::F32 | DType::C32 => 32,
            DType::F64 | DType::C64 | DType::I64 => 64,
            DType::C128 => 128,
        }
    }

    /// Storage bytes per element.
    pub const fn size_bytes(self) -> usize {
        self.bits() as usize / 8
    }
}

impl core::fmt::Display for DType {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// A value a tensor can store. Closed: every backend has kernels for exactly these types.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not an element type nbit tensors can store",
    note = "elements are f16, bf16, f32, f64, Complex<f16 | f32 | f64> and i64 (ids)",
    note = "`NoComplex` is the complex type of bf16-true, which has none (PyTorch has no bfloat16 complex): \
            create complex parameters under `True<F32>`, `True<F64>` or a mixed precision"
)]
pub trait Element: sealed::Sealed + Copy + Debug + Default + PartialEq + Send + Sync + 'static {
    /// The run-time tag of this type.
    const DTYPE: DType;
}

/// The type element-wise kernels compute in ("opmath" in PyTorch): f32 for f16, bf16 and f32, f64
/// for f64. A kernel widens its inputs, computes, and rounds once at the end.
pub trait Acc: num_traits::Float + Debug + Default + Send + Sync + 'static {
    /// Converts a constant.
    fn c(x: f64) -> Self;
    /// Widens to f64 (exact).
    fn f64(self) -> f64;
    /// The error function (for exact GELU).
    fn erf(self) -> Self;
}

impl Acc for f32 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erff(self)
    }
}

impl Acc for f64 {
    #[inline(always)]
    fn c(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn erf(self) -> Self {
        libm::erf(self)
    }
}

/// A real floating-point element: `f16`, `bf16`, `f32` or `f64`.
///
/// The conversions are exact where the target can hold the value and round once to nearest even
/// otherwise; f64 reaches f16 and bf16 through f32 rounded to odd, so no value is rounded twice.
/// (PyTorch 2.15 casts float64 to float16 and bfloat16 through float32 and can be one ulp off
/// next to a tie: `1 + 2^-11 + 2^-30` becomes 1.0 in float16; NumPy and nbit round once.)
pub trait Float: Element + num_traits::Float + LeBytes {
    /// The compute type of element-wise kernels on this element (see [`Acc`]).
    type Acc: Acc;
    /// How Adam's second moment (`~0.001 g²`) is stored for parameters of this type: f32 for f16
    /// (whose range loses it to underflow for |g| < 8e-3), the type itself otherwise.
    type Moment: Float<Acc = Self::Acc>;
    /// Widens to the compute type (exact).
    fn to_acc(self) -> Self::Acc;
    /// Rounds from the compute type to nearest even.
    fn from_acc(x: Self::Acc) -> Self;
    /// Converts from f32, rounding to nearest even.
    fn from_f32(x: f32) -> Self;
    /// Converts to f32 (exact for f16 and bf16).
    fn as_f32(self) -> f32;
    /// Converts from f64, rounding to nearest even.
    fn from_f64(x: f64) -> Self;
    /// Converts to f64 (exact for every real element type).
    fn as_f64(self) -> f64;
    /// Whether kernels should convert this type a slice at a time ([`Float::widen_slice`],
    /// [`Float::round_slice`]) rather than element by element: true for f16, whose hardware
    /// conversions (F16C) cannot be inlined into generic code one element at a time; the others
    /// convert with a move or a shift that vectorises in place.
    const SLICE_CONVERSIONS: bool = false;
    /// Widens `src` into `dst` (same length) to the compute type: [`Float::to_acc`] on every
    /// element, vectorised where the type has a slice path (f16: F16C, 8 at a time).
    #[inline]
    fn widen_slice(src: &[Self], dst: &mut [Self::Acc]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_acc();
        }
    }
    /// Rounds `src` into `dst` (same length): [`Float::from_acc`] on every element, vectorised
    /// where the type has a slice path.
    #[inline]
    fn round_slice(src: &[Self::Acc], dst: &mut [Self]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = Self::from_acc(*s);
        }
    }
    /// Rounds `x` *stochastically* for the 16-bit types: to the neighbour above (in magnitude) with
    /// probability equal to `x`'s distance from the one below over their gap (to 2^-16), decided
    /// by `noise`, 16 uniform random bits, so that the expected result is `x` itself. f32 and f64
    /// round to nearest (their updates are never stochastically rounded).
    #[inline]
    fn round_stochastic(x: Self::Acc, _noise: u16) -> Self {
        Self::from_acc(x)
    }
}

/// `x` rounded to f32 *to odd*: exact values stay, others become the neighbour toward zero with
/// its last bit set. A value rounded to odd at 24 bits rounds to nearest even at 8 or 11 bits with
/// the result a single rounding of `x` would give (24 >= 11 + 2), so f64 reaches f16 and bf16
/// through f32 without the double-rounding error of `x as f32` followed by a second rounding.
/// (`half`'s own f64 conversions round twice near ties, or drop the low 32 bits before looking.)
fn f32_round_to_odd(x: f64) -> f32 {
    let r = x as f32;
    if !r.is_finite() || f64::from(r) == x {
        return r;
    }
    let mut bits = r.to_bits();
    if f64::from(r).abs() > x.abs() {
        bits -= 1; // one step toward zero: the truncation of x
    }
    f32::from_bits(bits | 1)
}

/// Stochastic rounding of f32 `x` to f16, whose ulp is not a fixed count of f32 bits: the two
/// candidates are the neighbours of `x` one magnitude step apart (f16 bits are sign and magnitude,
/// so a step is +-1 on the bits), and `noise / 2^16` decides between them.
#[inline]
fn f16_stochastic(x: f32, noise: u16) -> f16 {
    let near = f16::from_f32(x);
    let nv = near.to_f32();
    if !x.is_finite() || nv == x || !nv.is_finite() {
        return near;
    }
    let bits = near.to_bits();
    let other = f16::from_bits(if nv.abs() > x.abs() { bits - 1 } else { bits + 1 });
    let (lo, hi) = if nv.abs() < x.abs() {
        (near, other)
    } else {
        (other, near)
    };
    let (lv, hv) = (lo.to_f32().abs() as f64, hi.to_f32().abs() as f64);
    let up = (x.abs() as f64 - lv) / (hv - lv);
    if (noise as f64 + 0.5) / 65536.0 < up {
        hi
    } else {
        lo
    }
}

/// Stochastic rounding of f32 `x` to bf16: bf16 is f32 without its low 16 bits, so adding 16 random
/// bits to the magnitude and truncating rounds up with exactly the probability the dropped bits
/// give (the standard bf16 stochastic rounding).
#[inline]
fn bf16_stochastic(x: f32, noise: u16) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f32(x);
    }
    bf16::from_bits(((x.to_bits() + noise as u32) >> 16) as u16)
}

/// bf16 to f32: the bf16 bits are the f32's high half (exact), a NaN made quiet, bit for bit
/// `bf16::to_f32`; a shift and a select, so loops of it vectorise.
#[inline(always)]
fn bf16_widen(x: bf16) -> f32 {
    let h = x.to_bits() as u32;
    let quiet = if (h & 0x7fff) > 0x7f80 { 0x0040 } else { 0 };
    f32::from_bits((h | quiet) << 16)
}

/// f32 to bf16, to nearest even, bit for bit `bf16::from_f32` (NaN keeps its sign and high
/// payload and becomes quiet) but without branches, so loops of it vectorise.
#[inline(always)]
fn bf16_round(x: f32) -> bf16 {
    let b = x.to_bits();
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    bf16::from_bits(if nan { (b >> 16) | 0x0040 } else { rounded } as u16)
}

/// f16 to f32 over slices: 16 at a time with AVX-512F where the CPU has it, else the `half`
/// crate's F16C (or software) path. Exact either way.
#[inline]
fn f16_widen_slice(src: &[f16], dst: &mut [f32]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512f() {
        // SAFETY: the CPU has AVX-512F (checked); both slices hold `n` values.
        done = unsafe { x86_f16::widen(&src[..n], &mut dst[..n]) };
    }
    src[done..n].convert_to_f32_slice(&mut dst[done..n]);
}

/// f32 to f16 over slices, to nearest even (as `f16::from_f32`, NaN kept quiet): AVX-512F 16 at
/// a time where available, else the `half` crate's path.
#[inline]
fn f16_round_slice(src: &[f32], dst: &mut [f16]) {
    let n = src.len().min(dst.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx512f() {
        // SAFETY: as in `f16_widen_slice`.
        done = unsafe { x86_f16::round(&src[..n], &mut dst[..n]) };
    }
    dst[done..n].convert_from_f32_slice(&src[done..n]);
}

/// Whether the CPU has AVX-512F (asked once).
#[cfg(target_arch = "x86_64")]
fn avx512f() -> bool {
    static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HAS.get_or_init(|| std::arch::is_x86_feature_detected!("avx512f"))
}

#[cfg(target_arch = "x86_64")]
mod x86_f16 {
    use core::arch::x86_64::*;
    use half::f16;

    /// Widens whole groups of 16; returns how many values it converted.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `dst` is at least as long as `src`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(src: &[f16], dst: &mut [f32]) -> usize {
        let whole = src.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: values i..i + 16 exist in both slices.
            unsafe {
                let h = _mm256_loadu_si256(src.as_ptr().add(i).cast());
                _mm512_storeu_ps(dst.as_mut_ptr().add(i), _mm512_cvtph_ps(h));
            }
        }
        whole
    }

    /// Rounds whole groups of 16 to nearest even; returns how many values it converted.
    ///
    /// # Safety
    /// As [`widen`].
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round(src: &[f32], dst: &mut [f16]) -> usize {
        let whole = src.len() / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: values i..i + 16 exist in both slices.
            unsafe {
                let x = _mm512_loadu_ps(src.as_ptr().add(i));
                let h = _mm512_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
                _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), h);
            }
        }
        whole
    }
}

macro_rules! real_elements {
    ($($ty:ty => $dtype:ident, acc $acc:ty, moment $moment:ty, $tacc:expr, $facc:expr, from_f32 $ff32:expr, to_f32 $tf32:expr, from_f64 $ff64:expr, to_f64 $tf64:expr $(, stochastic $stoch:expr)? $(, slices $widen:expr, $round:expr)?;)*) => {$(
        impl sealed::Sealed for $ty {}
        impl Element for $ty {
            const DTYPE: DType = DType::$dtype;
        }
        impl Float for $ty {
            type Acc = $acc;
            type Moment = $moment;
            #[inline(always)]
            fn to_acc(self) -> $acc { ($tacc)(self) }
            #[inline(always)]
            fn from_acc(x: $acc) -> Self { ($facc)(x) }
            #[inline(always)]
            fn from_f32(x: f32) -> Self { ($ff32)(x) }
            #[inline(always)]
            fn as_f32(self) -> f32 { ($tf32)(self) }
            #[inline(always)]
            fn from_f64(x: f64) -> Self { ($ff64)(x) }
            #[inline(always)]
            fn as_f64(self) -> f64 { ($tf64)(self) }
            $(
                #[inline]
                fn round_stochastic(x: f32, noise: u16) -> Self { ($stoch)(x, noise) }
            )?
            $(
                const SLICE_CONVERSIONS: bool = true;
                #[inline]
                fn widen_slice(src: &[Self], dst: &mut [$acc]) { ($widen)(src, dst) }
                #[inline]
                fn round_slice(src: &[$acc], dst: &mut [Self]) { ($round)(src, dst) }
            )?
        }
    )*};
}

real_elements! {
    f16 => F16, acc f32, moment f32, f16::to_f32, f16::from_f32,
        from_f32 f16::from_f32, to_f32 f16::to_f32, from_f64 |x| f16::from_f32(f32_round_to_odd(x)),
        to_f64 f16::to_f64, stochastic f16_stochastic,
        slices f16_widen_slice, f16_round_slice;
    bf16 => BF16, acc f32, moment bf16, bf16_widen, bf16_round,
        from_f32 bf16_round, to_f32 bf16_widen, from_f64 |x| bf16_round(f32_round_to_odd(x)),
        to_f64 |x| bf16_widen(x) as f64, stochastic bf16_stochastic;
    f32 => F32, acc f32, moment f32, |x| x, |x| x,
        from_f32 |x| x, to_f32 |x| x, from_f64 |x: f64| x as f32, to_f64 |x: f32| x as f64;
    f64 => F64, acc f64, moment f64, |x| x, |x| x,
        from_f32 |x: f32| x as f64, to_f32 |x: f64| x as f32, from_f64 |x| x, to_f64 |x| x;
}

macro_rules! complex_elements {
    ($($part:ty => $dtype:ident;)*) => {$(
        impl sealed::Sealed for Complex<$part> {}
        impl Element for Complex<$part> {
            const DTYPE: DType = DType::$dtype;
        }
    )*};
}

complex_elements! {
    f16 => C32;
    f32 => C64;
    f64 => C128;
}

impl sealed::Sealed for i64 {}
/// Integer tensors hold token ids and class indices (PyTorch's `LongTensor`); they are data, not
/// differentiable values: no [`Float`] arithmetic runs on them.
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// A complex element: `Complex<f16>`, `Complex<f32>` or `Complex<f64>`. Kernels compute in
/// `Complex<f64>` and round each part once.
pub trait ComplexElement: Element {
    /// The type of the real and imaginary parts.
    type Real: Float;
    /// Builds a value from its parts (rounded to nearest even).
    fn from_parts(re: f64, im: f64) -> Self;
    /// The value widened to complex128 (exact).
    fn to_c64(self) -> Complex<f64>;
    /// Rounds a complex128 value into this type.
    fn from_c64(z: Complex<f64>) -> Self {
        Self::from_parts(z.re, z.im)
    }
}

impl<R: Float> ComplexElement for Complex<R>
where
    Complex<R>: Element,
{
    type Real = R;
    fn from_parts(re: f64, im: f64) -> Self {
        Complex::new(R::from_f64(re), R::from_f64(im))
    }
    fn to_c64(self) -> Complex<f64> {
        Complex::new(self.re.as_f64(), self.im.as_f64())
    }
}

/// Bytes of an element in little-endian order, for checkpoints (safetensors is little-endian).
pub trait LeBytes: Sized {
    /// Appends the little-endian bytes of `self`.
    fn put_le(self, out: &mut Vec<u8>);
    /// Reads one value from exactly `size_of::<Self>()` little-endian bytes.
    fn get_le(bytes: &[u8]) -> Self;
}

macro_rules! le_bytes {
    ($($t:ty, $n:literal;)*) => {$(
        impl LeBytes for $t {
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn get_le(bytes: &[u8]) -> Self {
                let mut b = [0u8; $n];
                b.copy_from_slice(bytes);
                <$t>::from_le_bytes(b)
            }
        }
    )*};
}

le_bytes! { f16, 2; bf16, 2; f32, 4; f64, 8; }

/// A dtype marker: a zero-sized name for an element type, used as a type parameter of precisions.
pub trait Dtype: Copy + Default + Debug + Send + Sync + 'static {
    /// The element type this marker names.
    type Elem: Float;
    /// The bit width as a typenum constant (`U16`, `U32`, `U64`).
    type Bits: Unsigned;
}

/// A 16-bit dtype: the only kind a mixed precision can compute in.
///
/// The supertrait pins the typenum bit width to 16, so no 32- or 64-bit marker can implement it.
#[diagnostic::on_unimplemented(
    message = "`Mixed<{Self}>` is not a precision: mixed precision computes in a 16-bit dtype, and `{Self}` is not one",
    label = "mixed precision needs `F16` or `BF16` here",
    note = "use `Mixed<BF16>` (bf16-mixed) or `Mixed<F16>` (16-mixed), or `True<{Self}>` to train purely in `{Self}`"
)]
pub trait HalfDtype: Dtype<Bits = U16> {}

macro_rules! dtype_markers {
    ($($(#[$doc:meta])* $marker:ident => $elem:ty, $bits:ty;)*) => {$(
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
        pub struct $marker;
        impl Dtype for $marker {
            type Elem = $elem;
            type Bits = $bits;
        }
    )*};
}

dtype_markers! {
    /// IEEE half precision, element [`half::f16`].
    F16 => f16, U16;
    /// bfloat16, element [`half::bf16`].
    BF16 => bf16, U16;
    /// Single precision, element `f32`.
    F32 => f32, U32;
    /// Double precision, element `f64`.
    F64 => f64, U64;
}

impl HalfDtype for F16 {}
impl HalfDtype for BF16 {}

/// The dtype a binary op on `Self` and `B` computes in: the wider of the two, as PyTorch's type
/// promotion (f16 with bf16 gives f32, since neither holds the other).
pub trait Promote<B: Float>: Float {
    /// The promoted element type.
    type Output: Float;
}

macro_rules! promote {
    ($($a:ty, $b:ty => $o:ty;)*) => {$(
        impl Promote<$b> for $a { type Output = $o; }
    )*};
}

promote! {
    f16, f16 => f16;   f16, bf16 => f32;   f16, f32 => f32;   f16, f64 => f64;
    bf16, f16 => f32;  bf16, bf16 => bf16; bf16, f32 => f32;  bf16, f64 => f64;
    f32, f16 => f32;   f32, bf16 => f32;   f32, f32 => f32;   f32, f64 => f64;
    f64, f16 => f64;   f64, bf16 => f64;   f64, f32 => f64;   f64, f64 => f64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f16_slice_conversions_agree_with_the_half_crate_bit_for_bit() {
        // Every f16 value widened, in slices of awkward lengths (vector groups and tails).
        let all: Vec<f16> = (0..=u16::MAX).map(f16::from_bits).collect();
        let mut wide = vec![0.0f32; all.len()];
        for len in [1usize, 15, 16, 17, 33, all.len()] {
            f16_widen_slice(&all[..len], &mut wide[..len]);
            for (h, w) in all[..len].iter().zip(&wide) {
                assert_eq!(w.to_bits(), h.to_f32().to_bits(), "{:#06x}", h.to_bits());
            }
        }
        // Every 2^-9th f32 bit pattern, and the rounding boundaries between f16 neighbours.
        let mut xs: Vec<f32> = (0..=u32::MAX).step_by(511).map(f32::from_bits).collect();
        for h in (0..=u16::MAX).step_by(3) {
            let v = f16::from_bits(h).to_f32() as f64;
            let next = f16::from_bits(h.wrapping_add(1)).to_f32() as f64;
            if v.is_finite() && next.is_finite() {
                xs.push(((v + next) / 2.0) as f32);
            }
        }
        let mut narrow = vec![f16::ZERO; xs.len()];
        f16_round_slice(&xs, &mut narrow);
        for (x, h) in xs.iter().zip(&narrow) {
            let want = f16::from_f32(*x);
            if want.is_nan() {
                assert!(h.is_nan(), "{:#010x}", x.to_bits());
            } else {
                assert_eq!(h.to_bits(), want.to_bits(), "{:#010x}", x.to_bits());
            }
        }
    }

    #[test]
    fn the_branch_free_bf16_conversions_agree_with_the_half_crate_bit_for_bit() {
        // Every 2^-11th f32 bit pattern (2 million, all exponents and signs, NaNs with several
        // payloads), plus the rounding boundaries around each bf16 value of a sample.
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(2047).collect();
        for h in (0..=u16::MAX as u32).step_by(7) {
            for low in [0u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
                bits.push(h << 16 | low);
            }
        }
        bits.extend([
            0x7f80_0000,
            0xff80_0000,
            0x7f7f_ffff,
            0x7fc0_0000,
            0x7f80_0001,
            0xffff_ffff,
            0x8000_0000,
        ]);
        for b in bits {
            let x = f32::from_bits(b);
            assert_eq!(bf16_round(x).to_bits(), bf16::from_f32(x).to_bits(), "{b:#010x}");
        }
        for h in 0..=u16::MAX {
            let v = bf16::from_bits(h);
            assert_eq!(bf16_widen(v).to_bits(), v.to_f32().to_bits(), "{h:#06x}");
        }
    }

    #[test]
    fn element_tags_match_pytorch_names_and_sizes() {
        assert_eq!(<f16 as Element>::DTYPE.name(), "float16");
        assert_eq!(<bf16 as Element>::DTYPE.name(), "bfloat16");
        assert_eq!(<Complex<f64> as Element>::DTYPE.name(), "complex128");
        assert_eq!(<Complex<f32> as Element>::DTYPE.size_bytes(), 8);
        assert_eq!(<bf16 as Element>::DTYPE.size_bytes(), 2);
        assert_eq!(DType::C128.size_bytes(), 16);
    }

    #[test]
    fn marker_bits_are_the_element_sizes() {
        fn bits<D: Dtype>() -> u32 {
            D::Bits::U32
        }
        assert_eq!(bits::<F16>(), 16);
        assert_eq!(bits::<BF16>(), 16);
        assert_eq!(bits::<F32>(), 32);
        assert_eq!(bits::<F64>(), 64);
        assert_eq!(bits::<BF16>(), <bf16 as Element>::DTYPE.bits());
    }

    #[test]
    fn conversions_round_to_nearest_even() {
        // 1 + 2^-8 is a tie between bf16 neighbours 1.0 and 1.0078125: even mantissa wins.
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).as_f32(), 1.0);
        // 2049 is not representable in f16 (11-bit significand): ties to 2048.
        assert_eq!(<f16 as Float>::from_f64(2049.0).as_f64(), 2048.0);
        assert_eq!(<f32 as Float>::from_f64(0.1), 0.1f32);
    }

    #[test]
    fn f64_rounds_once_into_16_bits() {
        let (tiny, eps16, epsb) = (2f64.powi(-30), 2f64.powi(-10), 2f64.powi(-7));
        // Just above the tie between 1 and 1 + 2^-10: rounds up. Through f32 (1 + 2^-11 exactly, a
        // tie, then to even) or by `half::f16::from_f64` (the same on F16C machines) it gives 1.
        let above = 1.0 + eps16 / 2.0 + tiny;
        assert_eq!(<f16 as Float>::from_f64(above).as_f64(), 1.0 + eps16);
        assert_eq!(<f16 as Float>::from_f64(-above).as_f64(), -1.0 - eps16);
        assert_eq!(<f16 as Float>::from_f64(1.0 + eps16 / 2.0 - tiny).as_f64(), 1.0);
        // bf16: `half::bf16::from_f64` drops the low 32 bits of the f64 first and misses the excess.
        let above = 1.0 + epsb / 2.0 + tiny;
        assert_eq!(<bf16 as Float>::from_f64(above).as_f64(), 1.0 + epsb);
        assert_eq!(<bf16 as Float>::from_f64(1.0 + epsb / 2.0 - tiny).as_f64(), 1.0);
        // Exact ties still go to even, and the edges hold: overflow, subnormals, zero, NaN.
        assert_eq!(<f16 as Float>::from_f64(1.0 + eps16 / 2.0).as_f64(), 1.0);
        assert_eq!(<f16 as Float>::from_f64(65520.0).as_f64(), f64::INFINITY);
        assert_eq!(<f16 as Float>::from_f64(65519.99).as_f64(), 65504.0);
        assert_eq!(
            <f16 as Float>::from_f64(2f64.powi(-25) + tiny * tiny).as_f64(),
            2f64.powi(-24)
        );
        assert_eq!(<f16 as Float>::from_f64(2f64.powi(-25)).as_f64(), 0.0);
        assert_eq!(<bf16 as Float>::from_f64(1e300).as_f64(), f64::INFINITY);
        assert_eq!(<bf16 as Float>::from_f64(1e-300).as_f64(), 0.0);
        assert!(<bf16 as Float>::from_f64(f64::NAN).is_nan());
        assert_eq!(<f16 as Float>::from_f64(-0.0).to_bits(), 0x8000);
    }
}
