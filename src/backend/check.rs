//! What each kernel assumes of its arguments, checked on the host before it runs.
//!
//! [`Backend`](super::Backend)'s safe methods call these and then the backend's `unsafe`
//! `*_unchecked` kernel, so every backend (the CPU's, the GPU's, the next one) gets the same checks
//! from one place. Each returns why the arguments are wrong, in words that name the shapes.

use super::{Conv2dGeometry, rows_of};

/// `Err(why)` names a broken precondition.
pub(super) type Check = Result<(), String>;

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Check {
    if ok { Ok(()) } else { Err(why()) }
}

fn count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
}

/// `a` and `b` are one shape.
pub(super) fn same(a_name: &str, a: &[usize], b_name: &str, b: &[usize]) -> Check {
    ensure(a == b, || {
        format!("{a_name} {a:?} and {b_name} {b:?} must have the same shape")
    })
}

/// `from` broadcasts to `to` (NumPy rules: equal or 1 in every trailing dimension).
pub(super) fn broadcasts(name: &str, from: &[usize], to: &[usize]) -> Check {
    let ok = from.len() <= to.len()
        && from
            .iter()
            .rev()
            .zip(to.iter().rev())
            .all(|(&f, &t)| f == t || f == 1);
    ensure(ok, || format!("{name} {from:?} does not broadcast to {to:?}"))
}

/// Both operands of an element-wise op broadcast to its output.
pub(super) fn operands(a: &[usize], b: &[usize], out: &[usize]) -> Check {
    broadcasts("a", a, out).and(broadcasts("b", b, out))
}

/// `axis` is an axis of a tensor of `shape`.
pub(super) fn axis(shape: &[usize], axis: usize) -> Check {
    ensure(axis < shape.len(), || {
        format!("axis {axis} is out of range for shape {shape:?}")
    })
}

/// Every index is below `len`, the size of `axis`.
pub(super) fn indices(index: &[usize], len: usize, axis: usize) -> Check {
    match index.iter().find(|&&i| i >= len) {
        Some(i) => Err(format!(
            "index {i} is out of range for size {len} along axis {axis}"
        )),
        None => Ok(()),
    }
}

/// `to` holds as many elements as `from`.
pub(super) fn reshape(from: &[usize], to: &[usize]) -> Check {
    ensure(count(from).is_some() && count(from) == count(to), || {
        format!("cannot reshape {from:?} to {to:?}: the element counts differ")
    })
}

/// At least two axes.
pub(super) fn matrix_axes(shape: &[usize]) -> Check {
    ensure(shape.len() >= 2, || {
        format!("shape {shape:?} has fewer than two axes to swap")
    })
}

/// `op(a) @ op(b) (+ bias)`: operands of two axes or more, read as matrices (the last axis the
/// columns, the others merged into rows), whose inner sizes agree; a bias of `[n]`.
pub(super) fn matmul(a: &[usize], b: &[usize], ta: bool, tb: bool, bias: Option<&[usize]>) -> Check {
    ensure(a.len() >= 2 && b.len() >= 2, || {
        format!("operands {a:?} and {b:?} must have two axes or more")
    })?;
    let ((ar, ac), (br, bc)) = (super::as_matrix(a), super::as_matrix(b));
    matmul_2d(&[ar, ac], &[br, bc], ta, tb, bias)
}

/// A batch of products: operands `[.., m, k]` and `[.., k, n]` with the same leading axes (at
/// least one).
pub(super) fn bmm(a: &[usize], b: &[usize], ta: bool, tb: bool) -> Check {
    ensure(
        a.len() >= 3 && a.len() == b.len() && a[..a.len() - 2] == b[..b.len() - 2],
        || format!("the batch axes of {a:?} and {b:?} must be the same (and at least one)"),
    )?;
    matmul_2d(&a[a.len() - 2..], &b[b.len() - 2..], ta, tb, None)
}

/// `op(a) @ op(b) (+ bias)`: 2-D operands whose inner sizes agree, a bias of `[n]`.
pub(super) fn matmul_2d(a: &[usize], b: &[usize], ta: bool, tb: bool, bias: Option<&[usize]>) -> Check {
    ensure(a.len() == 2 && b.len() == 2, || {
        format!("operands {a:?} and {b:?} must both be 2-D")
    })?;
    let (k_a, k_b) = (if ta { a[0] } else { a[1] }, if tb { b[1] } else { b[0] });
    ensure(k_a == k_b, || {
        format!(
            "the left's columns ({k_a}) must equal the right's rows ({k_b}): shapes {a:?}{} and {b:?}{}",
            if ta { " transposed" } else { "" },
            if tb { " transposed" } else { "" }
        )
    })?;
    let n = if tb { b[0] } else { b[1] };
    match bias {
        Some(bias) => ensure(bias == [n], || {
            format!("the bias {bias:?} must be [{n}], one value per output column")
        }),
        None => Ok(()),
    }
}

/// `axes` lists every axis of `shape` once.
pub(super) fn permutation(shape: &[usize], axes: &[usize]) -> Check {
    let mut seen = vec![false; shape.len()];
    let ok = axes.len() == shape.len()
        && axes
            .iter()
            .all(|&a| a < seen.len() && !std::mem::replace(&mut seen[a], true));
    ensure(ok, || {
        format!(
            "axes {axes:?} are not a permutation of the {} axes of {shape:?}",
            shape.len()
        )
    })
}

/// Log-probabilities `[rows, classes]` and one target class per row.
pub(super) fn nll(shape: &[usize], targets: &[usize]) -> Check {
    ensure(shape.len() == 2, || {
        format!("log-probabilities {shape:?} must be [rows, classes]")
    })?;
    ensure(targets.len() == shape[0], || {
        format!("{} targets for {} rows", targets.len(), shape[0])
    })?;
    indices(targets, shape[1], 1)
}

/// A scalar (shape `[]`) gradient.
pub(super) fn scalar(name: &str, shape: &[usize]) -> Check {
    ensure(shape.is_empty(), || {
        format!("{name} {shape:?} must be a scalar (shape [])")
    })
}

/// Layer norm's weight and bias are `[cols]`.
pub(super) fn layer_norm(x: &[usize], weight: Option<&[usize]>, bias: Option<&[usize]>) -> Check {
    let cols = [rows_of(x).1];
    for (name, s) in [("weight", weight), ("bias", bias)] {
        if let Some(s) = s {
            ensure(s == cols, || {
                format!("the {name} {s:?} must be {cols:?}, the last axis of the input {x:?}")
            })?;
        }
    }
    Ok(())
}

/// Layer norm's backward: `dy` like `x`, the statistics `[rows, 2]`.
pub(super) fn layer_norm_backward(
    x: &[usize],
    weight: Option<&[usize]>,
    stats: &[usize],
    dy: &[usize],
) -> Check {
    same("x", x, "dy", dy)?;
    layer_norm(x, weight, None)?;
    let rows = rows_of(x).0;
    ensure(stats == [rows, 2], || {
        format!("the statistics {stats:?} must be [{rows}, 2] for the input {x:?}")
    })
}

/// `shape` with `n` at `axis`.
fn with_axis(shape: &[usize], axis: usize, n: usize) -> Vec<usize> {
    let mut s = shape.to_vec();
    s[axis] = n;
    s
}

/// `index_add`: `src` is `shape` with `index.len()` at `axis`, every index in range.
pub(super) fn index_add(shape: &[usize], axis: usize, index: &[usize], src: &[usize]) -> Check {
    self::axis(shape, axis)?;
    same(
        "src",
        src,
        "the indexed slices",
        &with_axis(shape, axis, index.len()),
    )?;
    indices(index, shape[axis], axis)
}

/// `gather` and `scatter_add`: `index_shape` is `shape` except at `axis`, `index` holds its
/// elements, every index in range.
pub(super) fn gather(shape: &[usize], axis: usize, index: &[usize], index_shape: &[usize]) -> Check {
    self::axis(shape, axis)?;
    ensure(index_shape.len() == shape.len(), || {
        format!(
            "the index shape {index_shape:?} must have the {} axes of {shape:?}",
            shape.len()
        )
    })?;
    same(
        "the index shape",
        &with_axis(index_shape, axis, 0),
        "the data's other axes",
        &with_axis(shape, axis, 0),
    )?;
    ensure(count(index_shape) == Some(index.len()), || {
        format!("{} indices for the index shape {index_shape:?}", index.len())
    })?;
    indices(index, shape[axis], axis)
}

/// `concat`: at least one part; the parts agree except at `axis`.
pub(super) fn concat(parts: &[&[usize]], axis: usize) -> Check {
    let Some(first) = parts.first() else {
        return Err("no parts to join".into());
    };
    self::axis(first, axis)?;
    for p in parts {
        ensure(
            p.len() == first.len() && with_axis(p, axis, 0) == with_axis(first, axis, 0),
            || format!("parts {first:?} and {p:?} differ outside axis {axis}"),
        )?;
    }
    Ok(())
}

/// `unfold2d`: the input is `[batch, channels, h, w]` as the geometry says, and the kernel fits.
pub(super) fn unfold(x: &[usize], g: &Conv2dGeometry) -> Check {
    let want = [g.batch, g.channels, g.input.0, g.input.1];
    ensure(x == want, || {
        format!("the input {x:?} must be {want:?} for {g:?}")
    })?;
    ensure(g.output().is_some(), || {
        format!("the kernel does not fit the padded input: {g:?}")
    })
}

/// `fold2d`: the columns are `[batch * oh * ow, channels * kh * kw]`.
pub(super) fn fold(cols: &[usize], g: &Conv2dGeometry) -> Check {
    let (oh, ow) = g
        .output()
        .ok_or_else(|| format!("the kernel does not fit the padded input: {g:?}"))?;
    let want = [g.batch * oh * ow, g.channels * g.kernel.0 * g.kernel.1];
    ensure(cols == want, || {
        format!("the columns {cols:?} must be {want:?} for {g:?}")
    })
}

/// An optimizer step: the gradient and every buffer shaped as the parameter.
pub(super) fn optimizer(param: &[usize], grad: &[usize], buffers: &[(&str, Option<&[usize]>)]) -> Check {
    same("the parameter", param, "its gradient", grad)?;
    for (name, b) in buffers {
        if let Some(b) = b {
            same("the parameter", param, name, b)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_check_names_the_shapes_it_refuses() {
        let e = matmul(&[1, 64], &[1, 1], false, false, None).unwrap_err();
        assert!(
            e.contains("(64)") && e.contains("[1, 64]") && e.contains("[1, 1]"),
            "{e}"
        );
        assert!(matmul(&[2, 3], &[2, 4], true, false, Some(&[4])).is_ok());
        assert!(matmul(&[2, 3], &[3, 4], false, false, Some(&[3])).is_err());
        assert!(broadcasts("a", &[3, 1], &[2, 3, 4]).is_ok());
        assert!(broadcasts("a", &[2, 4], &[2, 3, 4]).is_err());
        assert!(broadcasts("a", &[1, 2, 3], &[2, 3]).is_err());
        let e = indices(&[0, 1000], 4, 0).unwrap_err();
        assert!(e.contains("1000") && e.contains("size 4"), "{e}");
        assert!(reshape(&[2, 3], &[3, 2]).is_ok() && reshape(&[2, 3], &[4]).is_err());
        assert!(gather(&[2, 3], 1, &[0, 2], &[2, 1]).is_ok());
        assert!(gather(&[2, 3], 1, &[0, 3], &[2, 1]).is_err());
        assert!(gather(&[2, 3], 1, &[0], &[2, 1]).is_err());
        assert!(gather(&[2, 3], 1, &[0, 0, 0], &[3, 1]).is_err());
        assert!(index_add(&[4, 2], 0, &[3, 0, 1], &[3, 2]).is_ok());
        assert!(index_add(&[4, 2], 0, &[3, 0], &[3, 2]).is_err());
        assert!(concat(&[&[2, 3], &[4, 3]], 0).is_ok());
        assert!(concat(&[&[2, 3], &[4, 2]], 0).is_err());
        assert!(concat(&[], 0).is_err());
        assert!(
            nll(&[2, 3], &[0, 2]).is_ok() && nll(&[2, 3], &[0, 3]).is_err() && nll(&[2, 3], &[0]).is_err()
        );
        assert!(layer_norm_backward(&[4, 3], Some(&[3]), &[4, 2], &[4, 3]).is_ok());
        assert!(layer_norm_backward(&[4, 3], Some(&[3]), &[3, 2], &[4, 3]).is_err());
        let e = optimizer(&[1 << 20], &[1], &[]).unwrap_err();
        assert!(e.contains("[1048576]") && e.contains("[1]"), "{e}");
        assert!(optimizer(&[3], &[3], &[("the momentum buffer", Some(&[2]))]).is_err());
    }
}
