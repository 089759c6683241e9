//! Records the git commit the crate is built from (`AMEND_GIT_COMMIT`, reported in
//! `results.json`). An `AMEND_GIT_COMMIT` set in the environment wins; outside a git checkout the
//! value is empty and reported as unknown.

use std::path::PathBuf;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=AMEND_GIT_COMMIT");
    let commit = std::env::var("AMEND_GIT_COMMIT")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| git(&["rev-parse", "HEAD"]))
        .unwrap_or_default();
    println!("cargo:rustc-env=AMEND_GIT_COMMIT={commit}");
    // Rebuild when HEAD moves: the HEAD file and the branch it points to.
    let cwd = std::env::current_dir().unwrap_or_default();
    let mut watch = vec![git(&["rev-parse", "--git-path", "HEAD"])];
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        watch.push(git(&["rev-parse", "--git-path", &branch]));
    }
    for p in watch.into_iter().flatten() {
        let p = PathBuf::from(p);
        let p = if p.is_absolute() { p } else { cwd.join(p) };
        if p.exists() {
            println!("cargo:rerun-if-changed={}", p.display());
        }
    }
}
