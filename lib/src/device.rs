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

/// The floating-point type a model computes in, once resolved. In a stage's
/// parameters (and so its key) it is `"f32"` or `"bf16"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    #[default]
    F32,
    /// bfloat16: on CPUs with AVX512-BF16 or AMX, and on GPUs, several times faster
    /// than f32; with f32 master weights and Adam state in quark-fit.
    Bf16,
}

impl From<DType> for Kind {
    fn from(d: DType) -> Kind {
        match d {
            DType::F32 => Kind::Float,
            DType::Bf16 => Kind::BFloat16,
        }
    }
}

impl FromStr for DType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            _ => bail!("unknown dtype `{s}` (expected f32 or bf16)"),
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        })
    }
}

/// The `--dtype` flag: a dtype, or `auto`, which is bf16 where the device computes
/// it natively (CUDA; a CPU with AVX512-BF16 or AMX) and f32 elsewhere: on a CPU
/// with AVX2 alone, libtorch's bf16 matrix products are 10 to 75 times slower than
/// f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DTypeArg {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl DTypeArg {
    /// The dtype to compute in on `device`. An explicit bf16 on a CPU without native
    /// bf16 is kept, with a warning that gives the measured cost.
    pub fn resolve(self, device: Device) -> DType {
        let native = device.is_cuda() || (self != DTypeArg::F32 && cpu_has_native_bf16());
        if self == DTypeArg::Bf16 && !native {
            warn_slow_bf16();
        }
        self.resolve_where(native)
    }

    /// The dtype on a device that computes bf16 natively or not.
    fn resolve_where(self, native: bool) -> DType {
        match self {
            DTypeArg::Auto if native => DType::Bf16,
            DTypeArg::Auto | DTypeArg::F32 => DType::F32,
            DTypeArg::Bf16 => DType::Bf16,
        }
    }
}

/// The environment variable that overrides the CPU's bf16 flags (`0` or `1`), for
/// tests of either branch on any machine.
pub const NATIVE_BF16_VAR: &str = "QUARK_NATIVE_BF16";

/// Whether this CPU computes bf16 matrix products natively: AVX512-BF16 or AMX in
/// its flags (`/proc/cpuinfo`), or [`NATIVE_BF16_VAR`].
pub fn cpu_has_native_bf16() -> bool {
    native_bf16(
        std::env::var(NATIVE_BF16_VAR).ok().as_deref(),
        &std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default(),
    )
}

/// [`cpu_has_native_bf16`] from the override's value and the text of /proc/cpuinfo.
fn native_bf16(forced: Option<&str>, cpuinfo: &str) -> bool {
    match forced {
        Some("1") => true,
        Some("0") => false,
        _ => cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(str::split_whitespace)
            .any(|f| f == "avx512_bf16" || f == "amx_bf16"),
    }
}

/// Says once why bf16 is slow here: a small matrix product timed in both dtypes.
fn warn_slow_bf16() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        let speed = |kind: Kind| -> f64 {
            let _guard = tch::no_grad_guard();
            let a = tch::Tensor::ones([256, 256], (kind, Device::Cpu));
            let _ = a.matmul(&a);
            let t = std::time::Instant::now();
            for _ in 0..4 {
                let _ = a.matmul(&a);
            }
            4.0 * 2.0 * 256f64.powi(3) / t.elapsed().as_secs_f64().max(1e-9) / 1e9
        };
        let (f32, bf16) = (speed(Kind::Float), speed(Kind::BFloat16));
        eprintln!(
            "warning: --dtype bf16 on a CPU without AVX512-BF16 or AMX: a bf16 matrix product runs at {bf16:.1} GFLOP/s here against {f32:.1} in f32 ({:.0}x slower); --dtype auto picks f32",
            f32 / bf16.max(1e-9)
        );
    });
}

impl FromStr for DTypeArg {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            _ => match s.parse::<DType>() {
                Ok(DType::F32) => Ok(Self::F32),
                Ok(DType::Bf16) => Ok(Self::Bf16),
                Err(_) => bail!("unknown dtype `{s}` (expected auto, f32 or bf16)"),
            },
        }
    }
}

impl fmt::Display for DTypeArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::F32 => DType::F32.fmt(f),
            Self::Bf16 => DType::Bf16.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        assert_eq!("bf16".parse::<DTypeArg>().unwrap(), DTypeArg::Bf16);
        assert_eq!("auto".parse::<DTypeArg>().unwrap(), DTypeArg::Auto);
        assert_eq!(Kind::from(DType::F32), Kind::Float);
        assert_eq!(
            "cpu".parse::<DeviceArg>().unwrap().device().unwrap(),
            Device::Cpu
        );
        assert!("gpu".parse::<DeviceArg>().is_err());
    }

    /// `--dtype auto` is f32 where bf16 is not native, bf16 where it is; an explicit
    /// dtype stays as given. The CPU's flags decide, unless the override says.
    #[test]
    fn auto_is_bf16_only_where_the_cpu_computes_it_natively() {
        assert_eq!(DTypeArg::Auto.resolve_where(false), DType::F32);
        assert_eq!(DTypeArg::Auto.resolve_where(true), DType::Bf16);
        assert_eq!(DTypeArg::Bf16.resolve_where(false), DType::Bf16);
        assert_eq!(DTypeArg::F32.resolve_where(true), DType::F32);
        let avx2 = "processor : 0\nflags : fpu sse2 avx avx2 fma\n";
        let zen5 = "processor : 0\nflags : fpu avx2 avx512f avx512_bf16\n";
        let sapphire = "flags\t\t: avx2 amx_bf16 amx_tile\n";
        assert!(!native_bf16(None, avx2));
        assert!(native_bf16(None, zen5) && native_bf16(None, sapphire));
        assert!(native_bf16(Some("1"), avx2) && !native_bf16(Some("0"), zen5));
        assert!(
            !native_bf16(Some("yes"), avx2),
            "other values leave the flags to decide"
        );
    }
}
