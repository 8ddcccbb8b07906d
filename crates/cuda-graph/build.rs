//! Compiles `src/graph.cpp` (the C glue over libtorch's CUDA graphs) when the libtorch tch
//! builds against has CUDA (`libtorch_cuda.so`) and CUDA's runtime headers can be found, and
//! then sets the `cuda_graphs` cfg. Without them the crate builds as a stub that says graphs are
//! unavailable, so CPU-only libtorch keeps building.
//!
//! libtorch's headers: `include/` beside torch-sys's library directory (`DEP_TCH_LIBTORCH_LIB`,
//! the same libtorch tch uses). CUDA's headers: `CUDA_HOME`'s or `/usr/local/cuda`'s, else the
//! `nvidia/*/include` of the Python environment a PyPI wheel of PyTorch came from (it pulls in
//! NVIDIA's runtime package; requirements.txt adds the `crt/` headers that one lacks).

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(cuda_graphs)");
    println!("cargo:rerun-if-changed=src/graph.cpp");
    println!("cargo:rerun-if-changed=../../cpp/loraloom_guarded.h");
    for var in ["DEP_TCH_LIBTORCH_LIB", "CUDA_HOME", "LIBTORCH_CXX11_ABI"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = PathBuf::from(lib);
    // This crate's own test binary finds libtorch without LD_LIBRARY_PATH (rpath-build.rs does
    // the same for the other crates).
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if !lib.join("libtorch_cuda.so").exists() {
        return;
    }
    // The test that this build has graphs wherever libtorch has CUDA reads it.
    println!("cargo:rustc-env=LORALOOM_LIBTORCH_HAS_CUDA=1");
    let Some(root) = lib.parent() else { return };
    let include = root.join("include");
    if !include.join("ATen/cuda/CUDAGraph.h").exists() {
        return;
    }
    let Some(cuda_includes) = cuda_includes(root) else {
        println!(
            "cargo:warning=libtorch has CUDA but CUDA's runtime headers (cuda_runtime_api.h, \
             crt/host_config.h) were not found: no CUDA graphs"
        );
        return;
    };
    // PyPI's wheels (PyTorch >= 2.7) and libtorch's cxx11 builds use the new ABI; torch-sys
    // reads the same variable for a libtorch of the old one.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let compiled = cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        // loraloom_guarded.h, shared with the other C glue.
        .include(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../cpp"))
        .includes(&cuda_includes)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/graph.cpp")
        .try_compile("loraloom_cuda_graph");
    if let Err(e) = compiled {
        println!("cargo:warning=the CUDA graph glue did not compile ({e}): no CUDA graphs");
        return;
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cuda");
    println!("cargo:rustc-link-lib=dylib=c10_cuda");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-cfg=cuda_graphs");
}

/// The directories holding `cuda_runtime_api.h` and the `crt/` headers it includes (one
/// directory in a CUDA toolkit; PyPI's `nvidia-cuda-runtime` lacks `crt/`, which
/// `nvidia-cuda-crt`, in requirements.txt, or CUDA 12's `nvidia-cuda-nvcc-cu12` has).
fn cuda_includes(torch_root: &Path) -> Option<Vec<PathBuf>> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(Path::new(&home).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    // A wheel: site-packages/torch beside site-packages/nvidia/<package>/include.
    if let Some(site) = torch_root.parent() {
        let nvidia = site.join("nvidia");
        // Installing a package there (the crt headers, say) builds the glue again.
        println!("cargo:rerun-if-changed={}", nvidia.display());
        if let Ok(entries) = std::fs::read_dir(&nvidia) {
            let mut found: Vec<PathBuf> = entries
                .flatten()
                .map(|e| e.path().join("include"))
                .collect();
            found.sort();
            candidates.extend(found);
        }
    }
    let with = |header: &str| {
        candidates
            .iter()
            .find(|dir| dir.join(header).exists())
            .cloned()
    };
    let runtime = with("cuda_runtime_api.h")?;
    let crt = with("crt/host_config.h")?;
    Some(if crt == runtime {
        vec![runtime]
    } else {
        vec![runtime, crt]
    })
}
