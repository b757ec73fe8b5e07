//! [`Parameter`]: a named trainable tensor. It lives beside [`Tensor`], below both `nn` (which
//! creates parameters) and `optim` (which updates them), so neither imports the other for it;
//! `nbit::nn::Parameter` is the same type.

use super::Tensor;
use crate::backend::Backend;
use crate::device::Cpu;
use crate::dtype::Float;
use crate::error::Error;

/// A named trainable tensor.
#[derive(Clone, Debug)]
pub struct Parameter<E: Float, D: Backend = Cpu> {
    name: String,
    value: Tensor<E, D>,
}

impl<E: Float, D: Backend> Parameter<E, D> {
    /// A parameter named `name` holding `value` (made a gradient leaf).
    pub fn new(name: impl Into<String>, value: Tensor<E, D>) -> Self {
        Parameter {
            name: name.into(),
            value: value.detach().requires_grad(),
        }
    }

    /// Its name, e.g. `"0.weight"`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its current value.
    pub fn value(&self) -> &Tensor<E, D> {
        &self.value
    }

    /// Element count.
    pub fn numel(&self) -> usize {
        self.value.numel()
    }

    /// Replaces the value, keeping the name; the shape must match.
    pub fn set(&mut self, value: Tensor<E, D>) -> Result<(), Error> {
        if value.shape() != self.value.shape() {
            return Err(Error::ShapeMismatch {
                op: "set parameter",
                left: self.value.shape().to_vec(),
                right: value.shape().to_vec(),
                rule: "a parameter keeps its shape",
            });
        }
        self.value = value.detach().requires_grad();
        Ok(())
    }

    pub(crate) fn value_mut(&mut self) -> &mut Tensor<E, D> {
        &mut self.value
    }
}
