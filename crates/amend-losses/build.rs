//! Compiles `csrc/attach_rows.cpp` (a custom autograd function, see `src/attach.rs`) against the
//! libtorch that torch-sys links: the same headers, C++ standard and `_GLIBCXX_USE_CXX11_ABI`.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/attach_rows.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys (`links = "tch"`) exports its libtorch lib directory to direct dependents.
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB").unwrap_or_else(|_| {
        panic!(
            "torch-sys did not report its libtorch directory (DEP_TCH_LIBTORCH_LIB); \
             run `bash scripts/setup-libtorch.sh` (or `make setup`) first"
        )
    });
    let root =
        PathBuf::from(lib).parent().map(PathBuf::from).expect("libtorch lib dir has a parent");
    let include = root.join("include");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("csrc/attach_rows.cpp")
        .compile("amend_attach_rows");
}
