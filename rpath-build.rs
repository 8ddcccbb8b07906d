//! Shared build script of every crate whose binaries or tests link libtorch.
//!
//! 1. Lets them find libtorch at run time without `LD_LIBRARY_PATH`, by embedding torch-sys's
//!    library directory as an rpath. (torch-sys (`links = "tch"`) publishes the directory as
//!    `DEP_TCH_LIBTORCH_LIB`.)
//! 2. Links `libtorch_cuda.so` when that libtorch has it. rustc links with `--as-needed`, which
//!    drops the library (nothing references its symbols directly); without it loaded, libtorch
//!    never registers its CUDA backend and every device query answers "no GPU". torch-sys's own
//!    build script cannot pass linker flags to downstream binaries, so each binary's build must.
//!    `scripts/check_cuda_link.sh` (run by `make test`) fails when a built binary lacks it.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    let cuda = Path::new(&dir).join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg={}", cuda.display());
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
