//! The installation works as the README promises: built binaries find libtorch 2.13.0 through
//! their rpath, with no `LD_LIBRARY_PATH`.

use std::process::Command;

#[test]
fn runtime_reports_libtorch_2_13() {
    let info = amend::runtime::RuntimeInfo::detect();
    let version = info.libtorch_version.expect("libtorch version not found next to libtorch_cpu");
    assert!(version.starts_with("2.13.0"), "tch 0.26.0 needs libtorch 2.13.0, found {version}");
    assert!(info.threads >= 1);
}

#[test]
fn cli_runs_without_ld_library_path() {
    let out = Command::new(env!("CARGO_BIN_EXE_amend"))
        .args(["info", "--json"])
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("failed to start the amend binary");
    assert!(out.status.success(), "amend info failed: {}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("invalid JSON");
    let version = json["libtorch_version"].as_str().unwrap_or_default();
    assert!(version.starts_with("2.13.0"), "unexpected libtorch version {version:?}");
}
