//! Shared build script: lets binaries and tests of a crate find libtorch at run time
//! without `LD_LIBRARY_PATH`, by embedding torch-sys's library directory as an rpath.
//! (torch-sys (`links = "tch"`) publishes the directory as `DEP_TCH_LIBTORCH_LIB`.)

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
