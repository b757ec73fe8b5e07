//! Devices as types ([`Cpu`], [`Gpu`], [`Tpu`]) and Lightning's accelerator strings.
//!
//! A device type says where tensors live. Whether a precision may run there is the support matrix,
//! [`Supports`](crate::Supports), in `src/matrix.rs`. Whether the hardware is present is checked
//! at run time by [`Device::probe`], when a [`Trainer`](crate::Trainer) is built.

mod cuda_probe;

#[cfg(feature = "cuda")]
pub(crate) use cuda_probe::cuda_device_count;

use core::fmt::Debug;

use crate::Error;

pub use crate::kinds::{ACCELERATORS, DeviceKind};

mod sealed {
    pub trait Sealed {}
}

/// A place tensors live. Closed: each device needs a backend inside nbit.
pub trait Device: sealed::Sealed + Copy + Default + Debug + Send + Sync + 'static {
    /// The run-time name of this device.
    const KIND: DeviceKind;

    /// `Ok` when this device can run work in this process; otherwise an error that says why and
    /// what to do. Cheap after the first call.
    fn probe() -> Result<(), Error>;

    /// The hardware in words, for reports beside a figure: the CPU's model and thread count, the
    /// GPU's name and architecture (or what runs the GPU backend), or the kind's name.
    fn describe() -> String {
        Self::KIND.name().to_string()
    }
}

/// The host CPU (tensors in ndarray arrays). Always available.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Cpu;

/// An NVIDIA GPU through CUDA: the backend of the `cuda` feature (cudarc, NVRTC-compiled kernels,
/// cuBLAS). Without that feature, or without a driver and a device, [`Device::probe`] returns
/// [`Error::DeviceUnavailable`] saying which, and `auto` picks the CPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Gpu;

/// A Google TPU. The type and its column of the support matrix exist so that code can be written
/// and checked against it; nbit has no TPU runtime yet, so [`Device::probe`] always returns
/// [`Error::DeviceUnavailable`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tpu;

impl sealed::Sealed for Cpu {}
impl sealed::Sealed for Gpu {}
impl sealed::Sealed for Tpu {}

impl Device for Cpu {
    const KIND: DeviceKind = DeviceKind::Cpu;
    fn probe() -> Result<(), Error> {
        Ok(())
    }
    fn describe() -> String {
        let model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("model name")?
                        .split_once(':')
                        .map(|(_, v)| v.trim().to_string())
                })
            })
            .unwrap_or_else(|| std::env::consts::ARCH.to_string());
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        format!("{model}, {threads} threads")
    }
}

/// Without the `cuda` feature (with it, the backend implements `Device` for `Gpu` beside its
/// kernels, where the probe starts the driver).
#[cfg(not(feature = "cuda"))]
impl Device for Gpu {
    const KIND: DeviceKind = DeviceKind::Gpu;
    fn probe() -> Result<(), Error> {
        gpu_without_backend(cuda_probe::cuda_device_count())
    }
}

/// Why a GPU cannot run work in a build without the `cuda` feature, given the driver's answer.
#[cfg(not(feature = "cuda"))]
fn gpu_without_backend(driver: Result<usize, String>) -> Result<(), Error> {
    let reason = match driver {
        Err(reason) => format!(
            "nbit was built without its `cuda` feature (rebuild with `--features cuda`), and {reason}; \
             use accelerator 'cpu' (or 'auto') on this machine"
        ),
        Ok(n) => format!(
            "nbit was built without its `cuda` feature (the driver reports {n} device{}): rebuild \
             with `--features cuda`, or use accelerator 'cpu' or 'auto'",
            if n == 1 { "" } else { "s" }
        ),
    };
    Err(Error::DeviceUnavailable {
        device: "gpu",
        reason,
    })
}

impl Device for Tpu {
    const KIND: DeviceKind = DeviceKind::Tpu;
    fn probe() -> Result<(), Error> {
        Err(Error::DeviceUnavailable {
            device: "tpu",
            reason: "nbit has no TPU runtime yet (the Tpu type exists for the support matrix only); \
                     use accelerator 'gpu' or 'cpu'"
                .into(),
        })
    }
}

/// Bytes of host memory available to this process now: the kernel's `MemAvailable`, lowered to
/// the cgroup's remaining limit in a container. `None` where the system does not say (not Linux).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()?
            .trim()
            .parse::<u64>()
            .ok()
    };
    let cgroup = read("memory.max").map(|max| max.saturating_sub(read("memory.current").unwrap_or(0)));
    Some(cgroup.map_or(kib * 1024, |c| c.min(kib * 1024)))
}

impl DeviceKind {
    /// [`Device::probe`] of the matching type.
    pub fn probe(self) -> Result<(), Error> {
        match self {
            DeviceKind::Cpu => Cpu::probe(),
            DeviceKind::Gpu => Gpu::probe(),
            DeviceKind::Tpu => Tpu::probe(),
        }
    }
}

/// Parses Lightning's accelerator strings: `"cpu"`, `"gpu"`, `"cuda"` (= gpu), `"tpu"` and
/// `"auto"`, which is `gpu` when a CUDA device is usable by nbit (a driver, a device and a
/// backend: [`Device::probe`]) and `cpu` otherwise, so never a device nbit cannot run on. (Lightning's `auto`
/// would also pick a TPU; nbit has no TPU runtime, so it never does.)
///
/// Selecting `"gpu"` on a machine without one is not an error here: the type exists everywhere.
/// Building a [`Trainer`](crate::Trainer) on it is, with a message that says why.
///
/// ```
/// use nbit::{parse_accelerator, DeviceKind};
/// assert_eq!(parse_accelerator("cuda")?, DeviceKind::Gpu);
/// assert!(parse_accelerator("mps").unwrap_err().to_string().contains("cpu, gpu, cuda, tpu, auto"));
/// # Ok::<(), nbit::Error>(())
/// ```
pub fn parse_accelerator(value: &str) -> Result<DeviceKind, Error> {
    resolve_accelerator(value, || Gpu::probe().is_ok())
}

/// [`parse_accelerator`] with the GPU question answered by the caller (for tests).
pub(crate) fn resolve_accelerator(
    value: &str,
    gpu_usable: impl FnOnce() -> bool,
) -> Result<DeviceKind, Error> {
    match value {
        "cpu" => Ok(DeviceKind::Cpu),
        "gpu" | "cuda" => Ok(DeviceKind::Gpu),
        "tpu" => Ok(DeviceKind::Tpu),
        "auto" => Ok(if gpu_usable() {
            DeviceKind::Gpu
        } else {
            DeviceKind::Cpu
        }),
        _ => Err(Error::UnknownAccelerator {
            value: value.to_owned(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accelerator_strings() {
        let no_gpu = || false;
        assert_eq!(resolve_accelerator("cpu", no_gpu).unwrap(), DeviceKind::Cpu);
        assert_eq!(resolve_accelerator("gpu", no_gpu).unwrap(), DeviceKind::Gpu);
        assert_eq!(resolve_accelerator("cuda", no_gpu).unwrap(), DeviceKind::Gpu);
        assert_eq!(resolve_accelerator("tpu", no_gpu).unwrap(), DeviceKind::Tpu);
        assert_eq!(resolve_accelerator("auto", no_gpu).unwrap(), DeviceKind::Cpu);
        assert_eq!(resolve_accelerator("auto", || true).unwrap(), DeviceKind::Gpu);
        for bad in ["", "mps", "CPU", "hpu", "gpu:0"] {
            let msg = resolve_accelerator(bad, no_gpu).unwrap_err().to_string();
            assert!(
                msg.contains(&format!("'{bad}'")) && msg.contains("cpu, gpu, cuda, tpu, auto"),
                "{msg}"
            );
        }
    }

    #[test]
    fn tpu_says_there_is_no_runtime() {
        let msg = Tpu::probe().unwrap_err().to_string();
        assert!(msg.contains("no TPU runtime"), "{msg}");
    }

    #[test]
    fn gpu_probe_answers_without_panicking() {
        // On a machine without the CUDA driver this is an error that names the library.
        if let Err(e) = Gpu::probe() {
            let msg = e.to_string();
            match cuda_probe::cuda_device_count() {
                Ok(_) => assert!(msg.contains("cuda"), "{msg}"),
                Err(reason) => assert!(msg.contains(&reason), "{msg}"),
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn without_the_feature_auto_never_picks_a_gpu() {
        // A machine with a driver and a device: the GPU is not usable, so auto is the CPU.
        let msg = gpu_without_backend(Ok(1)).unwrap_err().to_string();
        assert!(
            msg.contains("--features cuda") && msg.contains("reports 1 device)"),
            "{msg}"
        );
        let auto = resolve_accelerator("auto", || gpu_without_backend(Ok(2)).is_ok()).unwrap();
        assert_eq!(auto, DeviceKind::Cpu);
    }
}
