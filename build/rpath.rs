//! Shared build script: put libtorch's folder on the run-time search path of every
//! binary and test of the package, so that nobody has to set LD_LIBRARY_PATH.
//! torch-sys (links = "tch") exports the folder it linked against to its direct
//! dependents as DEP_TCH_LIBTORCH_LIB.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
        // libtorch_cpu pulls in its CUDA runtime siblings from the nvidia wheels by
        // its own RUNPATH; nothing else is needed here.
    }
}
