//! The backend seam from safe code: a kernel's preconditions (agreeing shapes, indices in range,
//! buffers as long as the parameter) are checked before any memory is touched, on every backend.
//! Each case here read or wrote out of bounds before the checks (heap garbage, SIGSEGV, or on a
//! GPU a corrupted neighbouring block); now each is a panic whose message names the op, the
//! device and the shapes. `gpu_backend` runs the same cases on the GPU backend.

use nbit::backend::{AdamWStep, Backend, Binary, Conv2dGeometry, SgdStep, UpdateRounding};
use nbit::ndarray::{ArrayD, IxDyn};

/// Runs `f`, which must panic with a message containing each of `want`.
fn refused<T>(f: impl FnOnce() -> T, want: &[&str]) {
    let payload = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(_) => panic!("returned a value; expected a refusal naming {want:?}"),
        Err(p) => p,
    };
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default();
    for w in want {
        assert!(msg.contains(w), "expected '{w}' in: {msg}");
    }
}

fn zeros<D: Backend>(shape: &[usize]) -> D::Storage<f32> {
    D::from_array(ArrayD::zeros(IxDyn(shape)))
}

/// Every reproduction of the review, and one case per other checked kernel, on backend `D`
/// (`device` is its name in messages).
pub fn misuse_is_refused<D: Backend>(device: &str) {
    let on = format!("on {device}");
    // matmul of [1, 64] by [1, 1]: returned heap garbage.
    let (a, b) = (zeros::<D>(&[1, 64]), zeros::<D>(&[1, 1]));
    refused(
        || D::matmul(&a, &b, false, false, None),
        &["Backend::matmul", &on, "[1, 64]", "[1, 1]", "columns (64)"],
    );
    refused(
        || D::matmul(&b, &b, false, false, Some(&a)),
        &["bias [1, 64] must be [1]"],
    );
    // index_select with index 1000 on a 4-element tensor.
    let four = zeros::<D>(&[4]);
    refused(
        || D::index_select(&four, 0, &[1, 1000]),
        &["Backend::index_select", "index 1000", "size 4"],
    );
    refused(
        || D::index_select(&four, 1, &[0]),
        &["axis 1 is out of range for shape [4]"],
    );
    // sgd_step with a 1-element gradient for a 2^20-element parameter.
    let mut param = zeros::<D>(&[1 << 20]);
    let grad = zeros::<D>(&[1]);
    let sgd = SgdStep {
        lr: 0.1,
        momentum: 0.0,
        dampening: 0.0,
        nesterov: false,
        weight_decay: 0.0,
        first: true,
        rounding: UpdateRounding::Nearest,
        noise_key: 0,
    };
    refused(
        || D::sgd_step(&mut param, &grad, None, None, &sgd),
        &["Backend::sgd_step", "[1048576]", "[1]"],
    );
    let (mut p3, g3, mut m2, mut v3) = (
        zeros::<D>(&[3]),
        zeros::<D>(&[3]),
        zeros::<D>(&[2]),
        zeros::<D>(&[3]),
    );
    let adamw = AdamWStep {
        lr: 1e-3,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step: 1,
        rounding: UpdateRounding::Nearest,
        noise_key: 0,
    };
    refused(
        || D::adamw_step(&mut p3, &g3, &mut m2, &mut v3, None, &adamw),
        &["Backend::adamw_step", "exp_avg [2]"],
    );
    // Element-wise and shape ops.
    let (x23, x24) = (zeros::<D>(&[2, 3]), zeros::<D>(&[2, 4]));
    refused(
        || D::binary(Binary::Add, &x23, &x24, &[2, 4]),
        &["a [2, 3] does not broadcast to [2, 4]"],
    );
    refused(|| D::reshape(&x23, &[5]), &["cannot reshape [2, 3] to [5]"]);
    refused(|| D::sum(&x23, Some(2), false, 1.0), &["axis 2"]);
    refused(
        || D::sum_to_shape(&x23, &[4]),
        &["[4] does not broadcast to [2, 3]"],
    );
    refused(|| D::softmax_backward(&x23, &x24, false), &["[2, 3]", "[2, 4]"]);
    let mut acc = zeros::<D>(&[2, 3]);
    refused(
        || D::add_in_place(&mut acc, &x24),
        &["Backend::add_in_place", "[2, 4]"],
    );
    refused(|| D::concat(&[&x23, &x24], 0), &["differ outside axis 0"]);
    refused(|| D::concat::<f32>(&[], 0), &["no parts"]);
    // Losses, layer norm, indexing.
    refused(
        || D::nll_loss(&x23, &[0, 3]),
        &["index 3 is out of range for size 3"],
    );
    refused(|| D::nll_loss(&x23, &[0]), &["1 targets for 2 rows"]);
    refused(
        || D::layer_norm(&x23, Some(&four), None, 1e-5),
        &["weight [4] must be [3]"],
    );
    refused(|| D::gather(&x23, 1, &[0, 7], &[2, 1]), &["index 7"]);
    refused(|| D::scatter_add(&[2, 3], 1, &[0, 1, 2], &x24), &["index shape"]);
    refused(
        || D::index_add(&[4, 2], 0, &[9], &zeros::<D>(&[1, 2])),
        &["index 9"],
    );
    // Convolution geometry against the input.
    let g = Conv2dGeometry {
        batch: 1,
        channels: 1,
        input: (4, 4),
        kernel: (3, 3),
        stride: (1, 1),
        padding: (0, 0),
        dilation: (1, 1),
    };
    refused(
        || D::unfold2d(&zeros::<D>(&[1, 1, 4, 5]), &g),
        &["[1, 1, 4, 5] must be [1, 1, 4, 4]"],
    );
    refused(|| D::fold2d(&zeros::<D>(&[4, 8]), &g), &["[4, 8] must be [4, 9]"]);
}

#[test]
fn the_cpu_backend_refuses_what_its_kernels_cannot_take() {
    misuse_is_refused::<nbit::Cpu>("cpu");
}

#[test]
fn a_product_with_a_huge_mismatched_inner_size_is_refused_before_it_reads() {
    // k = 2^26 on the left and 1 on the right: the process died of SIGSEGV.
    let a = nbit::Cpu::from_array(ArrayD::<f32>::zeros(IxDyn(&[1, 1 << 26])));
    let b = nbit::Cpu::from_array(ArrayD::<f32>::zeros(IxDyn(&[1, 1])));
    refused(
        || nbit::Cpu::matmul(&a, &b, false, false, None),
        &["columns (67108864)", "rows (1)"],
    );
}
