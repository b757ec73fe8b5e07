//! Complex autodiff by PyTorch's convention, checked by finite differences on the real and
//! imaginary parts: for a real loss L of z = x + iy the gradient is ∂L/∂x + i ∂L/∂y.

use crate::common::{fd_check, values};
use nbit::Error;
use nbit::tensor::{ComplexOps, Tensor};
use ndarray::ArrayD;
use num_complex::Complex;

type R = Tensor<f64>;
type C = Tensor<Complex<f64>>;

/// `shapes[k]` is the shape of complex input k, built from a real and an imaginary leaf; `f`
/// returns a complex output whose real and imaginary parts the loss weights differently.
fn check(name: &str, shapes: &[&[usize]], f: impl Fn(&[C]) -> Result<C, Error>) {
    let parts: Vec<ArrayD<f64>> = shapes
        .iter()
        .enumerate()
        .flat_map(|(k, s)| {
            [
                values(s, 2 * k as u64 + 1, -1.0, 1.0),
                values(s, 2 * k as u64 + 2, -1.0, 1.0),
            ]
        })
        .collect();
    fd_check(name, &parts, |leaves| {
        let zs: Vec<C> = leaves
            .chunks(2)
            .map(|p| C::complex(&p[0], &p[1]))
            .collect::<Result<_, _>>()?;
        let out = f(&zs)?;
        let wr = R::from_array(values(out.shape(), 90, 0.5, 2.5));
        let wi = R::from_array(values(out.shape(), 91, -2.5, -0.5));
        out.real().mul(&wr)?.sum().add(&out.imag().mul(&wi)?.sum())
    });
}

/// Makes a complex output from a real one, so real-valued ops are checked in the same harness.
fn lift(r: R) -> Result<C, Error> {
    C::complex(&r, &R::zeros(r.shape()))
}

#[test]
fn arithmetic_with_broadcasting() {
    check("add", &[&[2, 3], &[3]], |z| z[0].add(&z[1]));
    check("sub", &[&[2, 1], &[1, 3]], |z| z[0].sub(&z[1]));
    check("mul", &[&[2, 3], &[2, 3]], |z| z[0].mul(&z[1]));
    check("mul broadcast", &[&[2, 3], &[3]], |z| z[0].mul(&z[1]));
    check("div", &[&[4], &[4]], |z| z[0].div(&z[1]));
    check("same input twice", &[&[3]], |z| z[0].mul(&z[0]));
}

#[test]
fn matmul_conj_exp_and_scalars() {
    check("matmul", &[&[2, 3], &[3, 4]], |z| z[0].matmul(&z[1]));
    check("conj", &[&[3]], |z| z[0].conj().mul(&z[0]));
    check("exp", &[&[4]], |z| Ok(z[0].exp()));
    check("neg and scale", &[&[3]], |z| Ok(z[0].neg().mul_scalar(2.5)));
}

#[test]
fn real_valued_maps_and_sums() {
    check("abs", &[&[5]], |z| lift(z[0].abs()));
    check("real", &[&[3]], |z| lift(z[0].real().mul(&z[0].imag())?));
    check("sum", &[&[2, 3]], |z| Ok(z[0].sum()));
    check("sum axis", &[&[2, 3]], |z| z[0].sum_axis(1));
    check("a unitary-style loss", &[&[2, 2]], |z| {
        // || U^H U - I ||^2 pieces: U^H U built from conj and matmul.
        let uh_u = z[0].conj().matmul(&z[0])?;
        lift(uh_u.abs().powf(2.0).sum())
    });
}

#[test]
fn gradients_follow_pytorchs_convention() {
    // L = |z|^2 = z conj(z): PyTorch's z.grad is 2z.
    let x = R::from_vec(&[1], vec![3.0]).unwrap().requires_grad();
    let y = R::from_vec(&[1], vec![4.0]).unwrap().requires_grad();
    let z = C::complex(&x, &y).unwrap();
    z.retain_grad();
    let l = z.abs().powf(2.0).sum();
    let g = l.backward().unwrap();
    assert_eq!(
        (g.get(&x).unwrap().to_vec()[0], g.get(&y).unwrap().to_vec()[0]),
        (6.0, 8.0)
    );
    // The gradient of the complex tensor itself is available too.
    assert!((g.get(&z).unwrap().to_vec()[0] - Complex::new(6.0, 8.0)).norm() < 1e-12);
}

#[test]
fn complex_dtypes_follow_the_precision() {
    use nbit::{ComplexOf, DType, F32, F64, True};
    let z32 =
        Tensor::<ComplexOf<True<F32>>>::complex(&Tensor::<f32>::zeros(&[2]), &Tensor::zeros(&[2])).unwrap();
    let z64 =
        Tensor::<ComplexOf<True<F64>>>::complex(&Tensor::<f64>::zeros(&[2]), &Tensor::zeros(&[2])).unwrap();
    assert_eq!((z32.dtype(), z64.dtype()), (DType::C64, DType::C128));
    let bad = Tensor::<Complex<f64>>::complex(&Tensor::zeros(&[2]), &Tensor::zeros(&[3]));
    assert!(bad.unwrap_err().to_string().contains("[2]"));
}
