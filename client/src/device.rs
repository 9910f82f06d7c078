//! Where tensors live: `cpu`, `cuda:N`, or `auto` (a GPU when this build has CUDA support and one
//! is present, else the CPU).

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

/// A device as the user names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceChoice {
    /// The CPU.
    Cpu,
    /// The CUDA GPU with this ordinal.
    Cuda(usize),
    /// GPU 0 if this build has CUDA and it is present, else the CPU.
    #[default]
    Auto,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Auto => f.write_str("auto"),
        }
    }
}

/// A device that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not `cpu`, `cuda`, `cuda:N` or `auto`.
    #[error("unknown device {0:?}: expected cpu, cuda:N or auto")]
    Unknown(String),
    /// A GPU was asked of a build without CUDA.
    #[error(
        "device {0} asked, but this fedpool-client was built without CUDA support: rebuild with \
         `cargo build --release --features cuda`, or use --device cpu"
    )]
    NoCudaSupport(DeviceChoice),
    /// The GPU could not be opened.
    #[error("cannot open device {choice}: {message}")]
    Open {
        /// The device asked.
        choice: DeviceChoice,
        /// candle's error.
        message: String,
    },
}

impl FromStr for DeviceChoice {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Unknown(s.to_string())),
        }
    }
}

/// True when this build was compiled with the `cuda` feature.
pub fn built_with_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// Opens the device `choice` names; returns it with a one-line description for the log.
pub fn open(choice: DeviceChoice) -> Result<(Device, String), DeviceError> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, cpu_description())),
        DeviceChoice::Cuda(n) => {
            if !built_with_cuda() {
                return Err(DeviceError::NoCudaSupport(choice));
            }
            let device = Device::new_cuda(n).map_err(|e| DeviceError::Open { choice, message: e.to_string() })?;
            Ok((device, format!("cuda:{n} (asked)")))
        }
        DeviceChoice::Auto => {
            if built_with_cuda() && candle_core::utils::cuda_is_available() {
                if let Ok(device) = Device::new_cuda(0) {
                    return Ok((device, "cuda:0 (auto: a GPU is present)".into()));
                }
            }
            let why = if built_with_cuda() { "no usable GPU" } else { "built without CUDA" };
            Ok((Device::Cpu, format!("{} (auto: {why})", cpu_description())))
        }
    }
}

/// "cpu, N threads".
fn cpu_description() -> String {
    format!("cpu, {} threads", candle_core::utils::get_num_threads())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse() {
        assert_eq!("cpu".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cpu);
        assert_eq!("cuda:1".parse::<DeviceChoice>().unwrap(), DeviceChoice::Cuda(1));
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert!("tpu".parse::<DeviceChoice>().is_err());
    }

    #[test]
    fn auto_falls_back_to_cpu_and_a_gpu_without_cuda_is_one_clear_line() {
        let (device, said) = open(DeviceChoice::Auto).unwrap();
        if !built_with_cuda() {
            assert!(device.is_cpu() && said.contains("built without CUDA"), "{said}");
            let err = open(DeviceChoice::Cuda(0)).unwrap_err().to_string();
            assert!(err.contains("--features cuda") && !err.contains('\n'), "{err}");
        }
    }
}
