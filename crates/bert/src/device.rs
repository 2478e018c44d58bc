//! Device and dtype selection, in one place: `auto | cpu | cuda[:N] | metal` and
//! `f32 | f16 | bf16`.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

use crate::error::{Error, Result};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// CUDA if compiled in and a GPU answers, else Metal likewise, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N (`cuda` is `cuda:0`).
    Cuda(usize),
    /// The Apple GPU.
    Metal,
}

impl FromStr for DeviceSpec {
    type Err = Error;

    fn from_str(spec: &str) -> Result<Self> {
        let spec = spec.trim().to_ascii_lowercase();
        Ok(match spec.as_str() {
            "auto" => Self::Auto,
            "cpu" => Self::Cpu,
            "cuda" | "gpu" => Self::Cuda(0),
            "metal" => Self::Metal,
            other => match other.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(ordinal)) => Self::Cuda(ordinal),
                _ => {
                    return Err(Error::Device(format!(
                        "unknown device {spec:?}; expected auto, cpu, cuda, cuda:N or metal"
                    )))
                }
            },
        })
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => write!(f, "auto"),
            Self::Cpu => write!(f, "cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
            Self::Metal => write!(f, "metal"),
        }
    }
}

impl DeviceSpec {
    /// Opens the device. Asking for a back-end this build does not include is an error that
    /// says how to build with it.
    pub fn open(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(ordinal) => {
                if !candle_core::utils::cuda_is_available() {
                    return Err(Error::Device(
                        "this build has no CUDA support; rebuild with `--features cuda`".into(),
                    ));
                }
                Device::new_cuda(ordinal)
                    .map_err(|e| Error::Device(format!("cannot open cuda:{ordinal}: {e}")))
            }
            Self::Metal => {
                if !candle_core::utils::metal_is_available() {
                    return Err(Error::Device(
                        "this build has no Metal support; rebuild with `--features metal`".into(),
                    ));
                }
                Device::new_metal(0).map_err(|e| Error::Device(format!("cannot open metal: {e}")))
            }
            Self::Auto => Ok(Self::Cuda(0)
                .open()
                .or_else(|_| Self::Metal.open())
                .unwrap_or(Device::Cpu)),
        }
    }
}

/// Parses `f32 | f16 | bf16` (also `float32`, `float16`, `bfloat16`).
pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" | "fp32" => Ok(DType::F32),
        "f16" | "float16" | "fp16" | "half" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::Device(format!(
            "unknown dtype {other:?}; expected f32, f16 or bf16"
        ))),
    }
}

/// A short name of a device for messages (`cpu`, `cuda:0`, `metal`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse() {
        assert_eq!("auto".parse::<DeviceSpec>().unwrap(), DeviceSpec::Auto);
        assert_eq!("CPU".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal);
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu"
            .parse::<DeviceSpec>()
            .unwrap_err()
            .to_string()
            .contains("tpu"));
        assert_eq!(parse_dtype("bf16").unwrap(), DType::BF16);
        assert_eq!(parse_dtype("F16").unwrap(), DType::F16);
        assert!(parse_dtype("int8")
            .unwrap_err()
            .to_string()
            .contains("int8"));
    }

    #[test]
    fn devices_not_compiled_in_are_clear_errors_and_auto_falls_back() {
        if !candle_core::utils::cuda_is_available() {
            let message = DeviceSpec::Cuda(0).open().unwrap_err().to_string();
            assert!(message.contains("--features cuda"), "{message}");
        }
        if !candle_core::utils::metal_is_available() {
            let message = DeviceSpec::Metal.open().unwrap_err().to_string();
            assert!(message.contains("--features metal"), "{message}");
        }
        assert!(DeviceSpec::Auto.open().is_ok());
        assert_eq!(device_name(&DeviceSpec::Cpu.open().unwrap()), "cpu");
    }
}
