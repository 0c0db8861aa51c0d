//! Where a program runs its model and in what precision: the `--device` and
//! `--dtype` flags as typed values, and the on-demand loading of libtorch's CUDA
//! half. Nothing here knows about models or files.

use std::fmt;
use std::str::FromStr;

use anyhow::{bail, Result};
use tch::{Device, Kind};

/// Where a program runs its model (`--device`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeviceArg {
    /// CUDA when a GPU is visible, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The tch device; `Cuda` without a GPU is an error rather than a silent CPU run.
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceArg::Auto if nvidia_driver_present() && cuda_available() => Ok(Device::Cuda(0)),
            DeviceArg::Auto | DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if cuda_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda if !load_cuda_backend() => bail!(
                "--device cuda: libtorch_cuda.so does not load (a libtorch built without CUDA?)"
            ),
            DeviceArg::Cuda => bail!("--device cuda: no CUDA device is available"),
        }
    }
}

/// Loads libtorch's CUDA half, libtorch_cuda.so, once; true if it is loaded.
///
/// The programs name none of its symbols, so the linker leaves it out, and without
/// it libtorch reports no GPU at all. Loading it at start-up would cost every CPU
/// run about 400 MB (it pulls in cuBLAS, cuDNN and the rest), so it is loaded here,
/// on demand, from the libtorch folder on the programs' run-time search path.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| dl::open(c"libtorch_cuda.so", dl::RTLD_NOW | dl::RTLD_GLOBAL))
}

/// Whether an NVIDIA driver is installed (its library loads): only then is the
/// CUDA half worth loading for `--device auto`.
fn nvidia_driver_present() -> bool {
    dl::open(c"libcuda.so.1", dl::RTLD_LAZY | dl::RTLD_LOCAL)
}

fn cuda_available() -> bool {
    load_cuda_backend() && tch::Cuda::is_available()
}

/// The dynamic loader (glibc's dlopen), for the libraries loaded on demand.
mod dl {
    use std::ffi::{c_char, c_int, c_void, CStr};

    pub const RTLD_LAZY: c_int = 0x1;
    pub const RTLD_NOW: c_int = 0x2;
    pub const RTLD_GLOBAL: c_int = 0x100;
    pub const RTLD_LOCAL: c_int = 0;

    extern "C" {
        fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    }

    /// Loads `name` (found as the dynamic loader finds libraries for the program,
    /// its run-time search path included) and keeps it loaded; true on success.
    pub fn open(name: &CStr, flags: c_int) -> bool {
        // SAFETY: `name` is a valid C string; a library that loads stays loaded for
        // the life of the process, so nothing refers to unloaded code.
        !unsafe { dlopen(name.as_ptr(), flags) }.is_null()
    }
}

impl FromStr for DeviceArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda),
            _ => bail!("unknown device `{s}` (expected auto, cpu or cuda)"),
        }
    }
}

impl fmt::Display for DeviceArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
        })
    }
}

/// The floating-point type of a model's weights (`--dtype`). In a stage's
/// parameters (and so its key) it is `"f32"` or `"bf16"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DTypeArg {
    #[default]
    F32,
    /// bfloat16: on CPUs with AVX512-BF16 several times faster than f32.
    Bf16,
}

impl From<DTypeArg> for Kind {
    fn from(d: DTypeArg) -> Kind {
        match d {
            DTypeArg::F32 => Kind::Float,
            DTypeArg::Bf16 => Kind::BFloat16,
        }
    }
}

impl FromStr for DTypeArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => bail!("unknown dtype `{s}` (expected f32 or bf16)"),
        }
    }
}

impl fmt::Display for DTypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!("bf16".parse::<DTypeArg>().unwrap(), DTypeArg::Bf16);
        assert_eq!(Kind::from(DTypeArg::F32), Kind::Float);
        assert_eq!(
            "cpu".parse::<DeviceArg>().unwrap().device().unwrap(),
            Device::Cpu
        );
        assert!("gpu".parse::<DeviceArg>().is_err());
    }
}
