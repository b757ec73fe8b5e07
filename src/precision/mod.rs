//! Precisions as types: [`Mixed<H>`] and [`True<F>`], the open [`Precision`] trait, and the
//! run-time names Lightning accepts ([`PrecisionKind`], [`parse_precision`]).
//!
//! | Lightning string | type | `Param` | `Compute` | `Full` | `Complex` | `Scaler` |
//! |---|---|---|---|---|---|---|
//! | `"16-mixed"` | `Mixed<F16>` | f32 | f16 | f32 | `Complex<f32>` | [`DynamicScaler`] |
//! | `"bf16-mixed"` | `Mixed<BF16>` | f32 | bf16 | f32 | `Complex<f32>` | [`NoScaler`] |
//! | `"16-true"` | `True<F16>` | f16 | f16 | f16 | `Complex<f16>` | [`NoScaler`] |
//! | `"bf16-true"` | `True<BF16>` | bf16 | bf16 | bf16 | [`NoComplex`] | [`NoScaler`] |
//! | `"32-true"` | `True<F32>` | f32 | f32 | f32 | `Complex<f32>` | [`NoScaler`] |
//! | `"64-true"` | `True<F64>` | f64 | f64 | f64 | `Complex<f64>` | [`NoScaler`] |
//!
//! `Complex` follows PyTorch's default complex dtype for each default float dtype: complex32 for
//! float16, complex64 for float32, complex128 for float64, and none for bfloat16 (PyTorch raises;
//! nbit's [`NoComplex`] is not an element type, so a complex parameter under bf16-true does not
//! compile). Under the mixed precisions parameters are f32, so complex parameters are complex64.

mod parse;

use core::fmt::Debug;
use core::marker::PhantomData;

use half::{bf16, f16};
use num_complex::Complex;

use crate::dtype::{BF16, Dtype, Element, F16, F32, F64, Float, HalfDtype, Promote};
use crate::scaler::{DynamicScaler, GradScaler, NoScaler};

pub use crate::kinds::PrecisionKind;

pub use parse::{Parsed, PrecisionInput, parse_precision};

/// Mixed precision: f32 master weights, matmul-class ops in the 16-bit dtype `H`, reductions and
/// losses in f32 (PyTorch's autocast). `H` must be [`F16`] or [`BF16`]: `Mixed<F32>` does not compile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mixed<H: HalfDtype>(PhantomData<H>);

/// True precision: parameters, activations and gradients all in `F` (Lightning's `"*-true"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct True<F: Dtype>(PhantomData<F>);

/// The complex type of a precision that has none (bf16-true: PyTorch has no bfloat16 complex).
/// It is deliberately not an [`Element`], so tensors of it cannot be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoComplex {}

/// A training precision: what parameters are stored in, what each class of op computes in, and
/// which gradient scaler the loop uses.
///
/// Open on purpose, like Lightning's custom precision plugins: define a type, implement this trait,
/// then implement [`Supports<YourPrecision>`](crate::Supports) for the devices it runs on.
///
/// ```
/// use nbit::prelude::*;
/// use nbit::scaler::DynamicScaler;
///
/// /// fp16 compute with f32 master weights and loss scaling, allowed on the CPU.
/// #[derive(Clone, Copy, Debug, Default)]
/// struct CpuFp16Amp;
///
/// impl Precision for CpuFp16Amp {
///     type Param = f32;
///     type Compute = half::f16;
///     type Full = f32;
///     type Complex = num_complex::Complex<f32>;
///     type Scaler = DynamicScaler;
///     const NAME: &'static str = "cpu-16-mixed";
/// }
/// impl Supports<CpuFp16Amp> for Cpu {}
///
/// fn name<P: Precision, D: Supports<P>>(_: &Trainer<P, D>) -> &'static str { P::NAME }
/// let trainer = Trainer::<CpuFp16Amp, Cpu>::new()?;
/// assert_eq!(name(&trainer), "cpu-16-mixed");
/// assert_eq!(CpuFp16Amp::MODEL_BITS, 32);
/// # Ok::<(), nbit::Error>(())
/// ```
pub trait Precision: Copy + Default + Debug + Send + Sync + 'static {
    /// How parameters are stored (f32 master weights under mixed precision).
    ///
    /// The [`Promote`] bounds on the three float types hold for every float nbit has; they let
    /// generic code combine any two of a precision's types (`ac.mul(&w, &w)` on `P::Param`, or a
    /// parameter with a compute-dtype activation) without naming the promotion itself.
    type Param: Float
        + Promote<Self::Param, Output = Self::Param>
        + Promote<Self::Compute>
        + Promote<Self::Full>;
    /// The dtype of matmul-class ops (matmul, linear, attention).
    type Compute: Float
        + Promote<Self::Compute, Output = Self::Compute>
        + Promote<Self::Param>
        + Promote<Self::Full>;
    /// The dtype of fp32-class ops (softmax, losses, norms, reductions).
    type Full: Float
        + Promote<Self::Full, Output = Self::Full>
        + Promote<Self::Param>
        + Promote<Self::Compute>;
    /// The dtype of complex parameters created under this precision.
    type Complex: Copy + Debug + Send + Sync + 'static;
    /// The gradient scaler ([`DynamicScaler`] only for fp16 mixed precision).
    type Scaler: GradScaler;
    /// Lightning's name for the precision, e.g. `"bf16-mixed"`.
    const NAME: &'static str;
    /// Bits per parameter for model-size estimates: the stored parameter's width, so 32 for the
    /// mixed precisions (Lightning's rule).
    const MODEL_BITS: u32 = <Self::Param as Element>::DTYPE.bits();
}

/// Parameter storage of a precision: `ParamOf<Mixed<BF16>>` is `f32`.
pub type ParamOf<P> = <P as Precision>::Param;
/// Matmul-class compute dtype of a precision.
pub type ComputeOf<P> = <P as Precision>::Compute;
/// Complex parameter type of a precision.
pub type ComplexOf<P> = <P as Precision>::Complex;

macro_rules! precisions {
    ($(
        $(#[$doc:meta])*
        $kind:ident = $ty:ty:
            param $param:ty, compute $compute:ty, full $full:ty, complex $complex:ty, scaler $scaler:ty;
    )*) => {
        $(
            $(#[$doc])*
            impl Precision for $ty {
                type Param = $param;
                type Compute = $compute;
                type Full = $full;
                type Complex = $complex;
                type Scaler = $scaler;
                const NAME: &'static str = PrecisionKind::$kind.name();
            }
        )*

        impl PrecisionKind {
            /// The Rust type this precision is, as written in code, e.g. `"Mixed<BF16>"`.
            pub const fn type_name(self) -> &'static str {
                match self { $(PrecisionKind::$kind => stringify!($ty)),* }
            }

            /// Bits per parameter for model-size estimates (32 for the mixed precisions).
            pub const fn model_bits(self) -> u32 {
                match self { $(PrecisionKind::$kind => <$ty as Precision>::MODEL_BITS),* }
            }

            /// The element types `(Param, Compute, Full)` of this precision.
            pub const fn dtypes(self) -> [crate::DType; 3] {
                match self {
                    $(PrecisionKind::$kind => [
                        <$param as Element>::DTYPE,
                        <$compute as Element>::DTYPE,
                        <$full as Element>::DTYPE,
                    ]),*
                }
            }

            /// Whether this precision uses the dynamic gradient scaler.
            pub const fn scales_loss(self) -> bool {
                match self { $(PrecisionKind::$kind => <$scaler as GradScaler>::ENABLED),* }
            }
        }
    };
}

// The table of DESIGN.md section 1, one row per precision.
precisions! {
    /// fp16 autocast with f32 master weights and dynamic loss scaling.
    Mixed16 = Mixed<F16>:
        param f32, compute f16, full f32, complex Complex<f32>, scaler DynamicScaler;
    /// bf16 autocast with f32 master weights; bf16 has f32's range, so no loss scaling.
    MixedBf16 = Mixed<BF16>:
        param f32, compute bf16, full f32, complex Complex<f32>, scaler NoScaler;
    /// Everything in f16.
    True16 = True<F16>:
        param f16, compute f16, full f16, complex Complex<f16>, scaler NoScaler;
    /// Everything in bf16.
    TrueBf16 = True<BF16>:
        param bf16, compute bf16, full bf16, complex NoComplex, scaler NoScaler;
    /// Everything in f32: Lightning's default.
    True32 = True<F32>:
        param f32, compute f32, full f32, complex Complex<f32>, scaler NoScaler;
    /// Everything in f64, complex parameters in complex128.
    True64 = True<F64>:
        param f64, compute f64, full f64, complex Complex<f64>, scaler NoScaler;
}

impl Default for PrecisionKind {
    /// `32-true`, as in Lightning.
    fn default() -> Self {
        PrecisionKind::True32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DType;
    use core::any::TypeId;

    fn same<A: 'static, B: 'static>() -> bool {
        TypeId::of::<A>() == TypeId::of::<B>()
    }

    #[test]
    fn associated_types_follow_the_design_table() {
        assert!(same::<ParamOf<Mixed<F16>>, f32>());
        assert!(same::<ComputeOf<Mixed<F16>>, f16>());
        assert!(same::<ComputeOf<Mixed<BF16>>, bf16>());
        assert!(same::<<Mixed<BF16> as Precision>::Full, f32>());
        assert!(same::<ParamOf<True<BF16>>, bf16>());
        assert!(same::<<True<F16> as Precision>::Full, f16>());
        assert!(same::<ComplexOf<True<F64>>, Complex<f64>>());
        assert!(same::<ComplexOf<True<F32>>, Complex<f32>>());
        assert!(same::<ComplexOf<True<F16>>, Complex<f16>>());
        assert!(same::<ComplexOf<True<BF16>>, NoComplex>());
        assert!(same::<<Mixed<F16> as Precision>::Scaler, DynamicScaler>());
        assert!(same::<<Mixed<BF16> as Precision>::Scaler, NoScaler>());
        assert!(same::<<True<F16> as Precision>::Scaler, NoScaler>());
    }

    #[test]
    fn model_bits_are_32_for_mixed_and_the_width_for_true() {
        let bits: Vec<u32> = PrecisionKind::ALL.iter().map(|k| k.model_bits()).collect();
        assert_eq!(bits, [32, 32, 16, 16, 32, 64]);
        assert_eq!(<True<F64> as Precision>::MODEL_BITS, 64);
    }

    #[test]
    fn kinds_name_their_types_and_dtypes() {
        assert_eq!(PrecisionKind::MixedBf16.type_name(), "Mixed<BF16>");
        assert_eq!(
            PrecisionKind::MixedBf16.dtypes(),
            [DType::F32, DType::BF16, DType::F32]
        );
        assert_eq!(PrecisionKind::True16.dtypes(), [DType::F16; 3]);
        let scaled: Vec<_> = PrecisionKind::ALL.iter().filter(|k| k.scales_loss()).collect();
        assert_eq!(scaled, [&PrecisionKind::Mixed16]);
        assert_eq!(PrecisionKind::default().name(), "32-true");
    }
}
