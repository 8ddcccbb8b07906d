//! Compiles `src/mxfp4.cpp` (autograd functions over libtorch's ATen, which tch cannot define)
//! against the headers of the libtorch tch builds against: `include/` beside torch-sys's
//! library directory (`DEP_TCH_LIBTORCH_LIB`). torch-sys compiles its own C++ against the same
//! headers, so wherever tch builds, this does; a failure here is a build failure.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=src/mxfp4.cpp");
    println!("cargo:rerun-if-changed=../../cpp/loraloom_guarded.h");
    for var in ["DEP_TCH_LIBTORCH_LIB", "LIBTORCH_CXX11_ABI"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys did not say where libtorch is"),
    );
    // This crate's own test binary finds libtorch without LD_LIBRARY_PATH, and loads its CUDA
    // backend where libtorch has one (as `rpath-build.rs` does for the other crates: rustc's
    // `--as-needed` would drop `libtorch_cuda.so`).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    let cuda = lib.join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg={}", cuda.display());
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let include = lib
        .parent()
        .expect("libtorch's library directory has a parent")
        .join("include");
    // PyPI's wheels (PyTorch >= 2.7) and libtorch's cxx11 builds use the new ABI; torch-sys
    // reads the same variable for a libtorch of the old one.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // loraloom_guarded.h, shared with the other C glue.
        .include(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../cpp"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/mxfp4.cpp")
        .compile("loraloom_mxfp4");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
