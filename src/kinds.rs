//! The run-time names of the precisions and devices: plain data at the ground floor, so that
//! [`Error`](crate::Error), which names them, depends on nothing above it. The types they stand
//! for are in `precision` and `device`, the table of which pairs run in `matrix`.

/// The built-in precisions as a run-time value, for configuration files and command lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PrecisionKind {
    /// `"16-mixed"`, the type [`Mixed<F16>`](crate::Mixed).
    Mixed16,
    /// `"bf16-mixed"`, the type [`Mixed<BF16>`](crate::Mixed).
    MixedBf16,
    /// `"16-true"`, the type [`True<F16>`](crate::True).
    True16,
    /// `"bf16-true"`, the type [`True<BF16>`](crate::True).
    TrueBf16,
    /// `"32-true"`, the type [`True<F32>`](crate::True) (the default).
    True32,
    /// `"64-true"`, the type [`True<F64>`](crate::True).
    True64,
}

impl PrecisionKind {
    /// Every built-in precision, in the order of the seed documentation's table.
    pub const ALL: [PrecisionKind; 6] = [
        PrecisionKind::Mixed16,
        PrecisionKind::MixedBf16,
        PrecisionKind::True16,
        PrecisionKind::TrueBf16,
        PrecisionKind::True32,
        PrecisionKind::True64,
    ];

    /// Lightning's canonical string, e.g. `"bf16-mixed"` (also each precision type's `NAME`).
    pub const fn name(self) -> &'static str {
        match self {
            PrecisionKind::Mixed16 => "16-mixed",
            PrecisionKind::MixedBf16 => "bf16-mixed",
            PrecisionKind::True16 => "16-true",
            PrecisionKind::TrueBf16 => "bf16-true",
            PrecisionKind::True32 => "32-true",
            PrecisionKind::True64 => "64-true",
        }
    }
}

impl core::fmt::Display for PrecisionKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The built-in devices as a run-time value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceKind {
    /// [`Cpu`](crate::Cpu).
    Cpu,
    /// [`Gpu`](crate::Gpu).
    Gpu,
    /// [`Tpu`](crate::Tpu).
    Tpu,
}

impl DeviceKind {
    /// Every device, in the order of the seed documentation's columns.
    pub const ALL: [DeviceKind; 3] = [DeviceKind::Cpu, DeviceKind::Gpu, DeviceKind::Tpu];

    /// Lightning's accelerator name: `"cpu"`, `"gpu"` or `"tpu"`.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Gpu => "gpu",
            DeviceKind::Tpu => "tpu",
        }
    }

    /// The Rust type, as written in code: `"Cpu"`, `"Gpu"` or `"Tpu"`.
    pub const fn type_name(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "Cpu",
            DeviceKind::Gpu => "Gpu",
            DeviceKind::Tpu => "Tpu",
        }
    }
}

impl core::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// The accelerator strings accepted, as listed in error messages.
pub const ACCELERATORS: [&str; 5] = ["cpu", "gpu", "cuda", "tpu", "auto"];
