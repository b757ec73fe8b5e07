//! Indexing, joining, selection and convolution-unfold kernels of the CPU backend.
//!
//! Every kernel sees its array as `[outer, n, inner]` around the axis it works on (row-major), so
//! one loop shape serves every rank. Scatters accumulate in f64 and round once, as the backend's
//! other reductions do.

use ndarray::ArrayD;

use super::{from_vec, standard};
use crate::backend::split;
use crate::backend::{Compare, Conv2dGeometry};
use crate::dtype::{Element, Float};

/// f64 sums rounded once into the element type.
fn rounded<E: Float>(shape: &[usize], acc: Vec<f64>) -> ArrayD<E> {
    from_vec(shape, acc.into_iter().map(E::from_f64).collect())
}

fn with_axis(shape: &[usize], axis: usize, n: usize) -> Vec<usize> {
    let mut out = shape.to_vec();
    out[axis] = n;
    out
}

pub(super) fn index_select<E: Element>(s: &ArrayD<E>, axis: usize, index: &[usize]) -> ArrayD<E> {
    let (outer, n, inner) = split(s.shape(), axis);
    let data = standard(s);
    let mut out = Vec::with_capacity(outer * index.len() * inner);
    for o in 0..outer {
        for &i in index {
            let start = (o * n + i) * inner;
            out.extend_from_slice(&data[start..start + inner]);
        }
    }
    from_vec(&with_axis(s.shape(), axis, index.len()), out)
}

pub(super) fn index_add<E: Float>(
    shape: &[usize],
    axis: usize,
    index: &[usize],
    src: &ArrayD<E>,
) -> ArrayD<E> {
    let (outer, n, inner) = split(shape, axis);
    let data = standard(src);
    let mut acc = vec![0.0f64; outer * n * inner];
    for o in 0..outer {
        for (k, &i) in index.iter().enumerate() {
            let from = (o * index.len() + k) * inner;
            let to = (o * n + i) * inner;
            for (a, v) in acc[to..to + inner].iter_mut().zip(&data[from..from + inner]) {
                *a += v.as_f64();
            }
        }
    }
    rounded(shape, acc)
}

pub(super) fn gather<E: Element>(
    s: &ArrayD<E>,
    axis: usize,
    index: &[usize],
    index_shape: &[usize],
) -> ArrayD<E> {
    let (_, n, inner) = split(s.shape(), axis);
    let (_, m, _) = split(index_shape, axis);
    let data = standard(s);
    let out = index
        .iter()
        .enumerate()
        .map(|(flat, &i)| {
            let (o, rest) = (flat / (m * inner), flat % inner);
            data[(o * n + i) * inner + rest]
        })
        .collect();
    from_vec(index_shape, out)
}

pub(super) fn scatter_add<E: Float>(
    shape: &[usize],
    axis: usize,
    index: &[usize],
    src: &ArrayD<E>,
) -> ArrayD<E> {
    let (outer, n, inner) = split(shape, axis);
    let m = src.shape()[axis];
    let data = standard(src);
    let mut acc = vec![0.0f64; outer * n * inner];
    for (flat, (&i, v)) in index.iter().zip(data.iter()).enumerate() {
        let (o, rest) = (flat / (m * inner), flat % inner);
        acc[(o * n + i) * inner + rest] += v.as_f64();
    }
    rounded(shape, acc)
}

pub(super) fn concat<E: Element>(parts: &[&ArrayD<E>], axis: usize) -> ArrayD<E> {
    let first = parts[0].shape();
    let (outer, _, inner) = split(first, axis);
    let total: usize = parts.iter().map(|p| p.shape()[axis]).sum();
    let datas: Vec<_> = parts.iter().map(|p| standard(p)).collect();
    let mut out = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for (p, d) in parts.iter().zip(&datas) {
            let run = p.shape()[axis] * inner;
            out.extend_from_slice(&d[o * run..(o + 1) * run]);
        }
    }
    from_vec(&with_axis(first, axis, total), out)
}

pub(super) fn arg_extreme<E: Float>(s: &ArrayD<E>, axis: usize, largest: bool) -> Vec<usize> {
    let (outer, n, inner) = split(s.shape(), axis);
    let data = standard(s);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        for r in 0..inner {
            let at = |i: usize| data[(o * n + i) * inner + r].as_f64();
            let mut best = 0;
            for i in 1..n {
                let (v, b) = (at(i), at(best));
                if b.is_nan() {
                    break;
                }
                if v.is_nan() || (largest && v > b) || (!largest && v < b) {
                    best = i;
                }
            }
            out.push(best);
        }
    }
    out
}

/// `x` repeated to `shape` (a borrowed copy when it already has it).
fn full<'a, E: Element>(x: &'a ArrayD<E>, shape: &[usize]) -> std::borrow::Cow<'a, [E]> {
    if x.shape() == shape {
        standard(x)
    } else {
        let b = x
            .broadcast(ndarray::IxDyn(shape))
            .expect("shapes broadcast (checked by caller)");
        std::borrow::Cow::Owned(b.iter().copied().collect())
    }
}

pub(super) fn select<E: Float>(cond: &ArrayD<E>, a: &ArrayD<E>, b: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
    let (c, a, b) = (full(cond, shape), full(a, shape), full(b, shape));
    let out = c
        .iter()
        .zip(a.iter().zip(b.iter()))
        .map(|(c, (&a, &b))| if c.as_f64() != 0.0 { a } else { b })
        .collect();
    from_vec(shape, out)
}

pub(super) fn compare<E: Float>(op: Compare, a: &ArrayD<E>, b: &ArrayD<E>, shape: &[usize]) -> ArrayD<E> {
    let (a, b) = (full(a, shape), full(b, shape));
    let out = a
        .iter()
        .zip(b.iter())
        .map(|(a, b)| {
            let (a, b) = (a.as_f64(), b.as_f64());
            let holds = match op {
                Compare::Eq => a == b,
                Compare::Ne => a != b,
                Compare::Lt => a < b,
                Compare::Le => a <= b,
                Compare::Gt => a > b,
                Compare::Ge => a >= b,
            };
            if holds { E::one() } else { E::zero() }
        })
        .collect();
    from_vec(shape, out)
}

/// Calls `f(column-matrix offset, input offset)` for every patch element that reads inside the
/// input (padding positions are skipped), in the column matrix's row-major order.
fn for_each_tap(g: &Conv2dGeometry, mut f: impl FnMut(usize, usize)) {
    let (oh, ow) = g.output().expect("geometry checked by the caller");
    let (h, w) = g.input;
    let (kh, kw) = g.kernel;
    let cols = g.channels * kh * kw;
    for n in 0..g.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                let row = ((n * oh + oy) * ow + ox) * cols;
                for c in 0..g.channels {
                    let plane = (n * g.channels + c) * h * w;
                    for ky in 0..kh {
                        let y = (oy * g.stride.0 + ky * g.dilation.0).wrapping_sub(g.padding.0);
                        if y >= h {
                            continue;
                        }
                        for kx in 0..kw {
                            let x = (ox * g.stride.1 + kx * g.dilation.1).wrapping_sub(g.padding.1);
                            if x < w {
                                f(row + (c * kh + ky) * kw + kx, plane + y * w + x);
                            }
                        }
                    }
                }
            }
        }
    }
}

pub(super) fn unfold2d<E: Float>(x: &ArrayD<E>, g: &Conv2dGeometry) -> ArrayD<E> {
    let (oh, ow) = g.output().expect("geometry checked by the caller");
    let (rows, cols) = (g.batch * oh * ow, g.channels * g.kernel.0 * g.kernel.1);
    let data = standard(x);
    let mut out = vec![E::zero(); rows * cols];
    for_each_tap(g, |to, from| out[to] = data[from]);
    from_vec(&[rows, cols], out)
}

pub(super) fn fold2d<E: Float>(cols: &ArrayD<E>, g: &Conv2dGeometry) -> ArrayD<E> {
    let data = standard(cols);
    let mut acc = vec![0.0f64; g.batch * g.channels * g.input.0 * g.input.1];
    for_each_tap(g, |from, to| acc[to] += data[from].as_f64());
    rounded(&[g.batch, g.channels, g.input.0, g.input.1], acc)
}
