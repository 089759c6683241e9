//! Helpers shared by the integration tests: fixture paths, reference tensors, comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amend_testing::Tol;
use tch::{Kind, Tensor};

/// The f32 parity tolerance against transformers (issue 5: within 1e-4).
pub const PARITY: Tol = Tol { rel: 1e-4, abs: 1e-4 };

/// One libtorch intra-op thread per test process: the test harness already runs tests in
/// parallel, and libtorch's spinning OpenMP workers on top of that oversubscribe a 2-core
/// machine badly (10-30x slower). Called by the fixture helpers below, so every test that touches
/// a fixture gets it.
pub fn setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| tch::set_num_threads(1));
}

/// `crates/amend-models/tests/fixtures/models/<name>`.
pub fn model_dir(name: &str) -> PathBuf {
    setup();
    amend_testing::fixture_path(env!("CARGO_MANIFEST_DIR"), "models").join(name)
}

/// The reference tensors of a fixture model.
pub fn reference(name: &str) -> HashMap<String, Tensor> {
    let path = model_dir(name).join("reference.safetensors");
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// The reference metadata of a fixture model.
pub fn meta(name: &str) -> serde_json::Value {
    let path = model_dir(name).join("reference.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// Tensor values as f64.
pub fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

/// Asserts equal shapes and elementwise closeness.
#[track_caller]
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tol: Tol) {
    assert_eq!(got.size(), want.size(), "{what}: shape");
    tol.assert_all_close(what, &values(got), &values(want));
}

/// Copies a directory (flat) into a new temporary directory and returns it.
pub fn copy_to_temp(src: &Path) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), tmp.path().join(entry.file_name())).unwrap();
    }
    tmp
}

/// Token ids of row `row` of an i64 tensor `[b, t]`, first `len` entries.
pub fn row_ids(t: &Tensor, row: i64, len: usize) -> Vec<u32> {
    Vec::<i64>::try_from(t.get(row)).unwrap()[..len].iter().map(|&x| x as u32).collect()
}
