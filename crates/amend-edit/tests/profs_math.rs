//! ProFS without a model: the test vectors of spec A.3 / A.11, numpy fixtures
//! (`scripts/gen_edit_fixtures.py`), projection properties, rank checks and target resolution.

use amend_edit::Error;
use amend_edit::profs::{
    BasisOptions, Centering, Pooling, RankPolicy, Side, SvdDtype, TargetDims, WeightLayout,
    apply_projection, check_layer_range, pool_hidden, profs_bases, profs_basis, profs_defaults,
    projected, resolve_targets,
};
use amend_testing::{F32, Tol, load_json_fixture};
use proptest::prelude::*;
use serde_json::Value;
use tch::{Kind, Tensor};

const F64_VEC: Tol = Tol { rel: 0.0, abs: 1e-6 };
const F32_VEC: Tol = Tol { rel: 0.0, abs: 1e-4 };

fn t2(rows: &[&[f64]]) -> Tensor {
    let flat: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, rows[0].len() as i64])
}

fn mat(v: &Value) -> Tensor {
    let rows: Vec<Vec<f64>> = serde_json::from_value(v.clone()).unwrap();
    let r: Vec<&[f64]> = rows.iter().map(Vec::as_slice).collect();
    t2(&r)
}

fn flat(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.to_kind(Kind::Double).flatten(0, -1)).unwrap()
}

fn xp() -> Tensor {
    t2(&[&[3., 2., 2.], &[2., 3., 2.], &[2., 2., 3.], &[3., 3., 2.]])
}

fn xn() -> Tensor {
    t2(&[&[1.1, 2.4, 1.4], &[0.4, 3.1, 1.4], &[0.9, 2.4, 2.1], &[0.1, 4.1, 1.4]])
}

fn w_conv() -> Tensor {
    t2(&[&[1., 2., 3.], &[4., 5., 6.]])
}

fn opts(k: usize, c: Centering, dtype: SvdDtype) -> BasisOptions {
    BasisOptions::new(k).with_centering(c).with_svd_dtype(dtype)
}

/// Spec A.11 for one centering and k, in f64 (1e-6) and f32 (1e-4).
fn check_a11(c: Centering, k: usize, sigma: &[f64], p: &[&[f64]], w_edited: &[&[f64]]) {
    for (dtype, tol) in [(SvdDtype::F64, F64_VEC), (SvdDtype::F32, F32_VEC)] {
        let (xp, xn) = match dtype {
            SvdDtype::F64 => (xp(), xn()),
            SvdDtype::F32 => (xp().to_kind(Kind::Float), xn().to_kind(Kind::Float)),
        };
        let b = profs_basis(&xp, &xn, 0, &opts(k, c, dtype)).unwrap();
        tol.assert_all_close("sigma", &b.singular_values, sigma);
        let proj = b.projector().unwrap().unwrap();
        tol.assert_all_close("P", &flat(&proj), &flat(&t2(p)));
        let basis = b.basis.as_ref().unwrap();
        let conv = projected(&w_conv(), basis, WeightLayout::Conv1D, Side::Output).unwrap();
        tol.assert_all_close("W(I-P)", &flat(&conv), &flat(&t2(w_edited)));
        let lin = projected(&w_conv().tr(), basis, WeightLayout::Linear, Side::Output).unwrap();
        tol.assert_all_close("(I-P)W_lin", &flat(&lin), &flat(&t2(w_edited).tr()));
    }
}

#[test]
fn pooling_test_vector_a3() {
    let h = Tensor::from_slice(&[1.0f32, 2., 3., 4., 100., 100.]).view([1, 3, 2]);
    let m = Tensor::from_slice(&[1i64, 1, 0]).view([1, 3]);
    let masked = pool_hidden(&h, &m, Pooling::MeanMasked).unwrap();
    F32.assert_all_close("masked", &flat(&masked), &[2.0, 3.0]);
    let all = pool_hidden(&h, &m, Pooling::MeanAllPositions).unwrap();
    F32.assert_all_close("all positions", &flat(&all), &[34.666667, 35.333333]);
}

#[test]
fn a11_centering_none_k1() {
    check_a11(
        Centering::None,
        1,
        &[2.157388, 0.325666, 0.211232],
        &[
            &[0.846347, -0.245887, 0.263786],
            &[-0.245887, 0.071437, -0.076637],
            &[0.263786, -0.076637, 0.082216],
        ],
        &[&[-0.145933, 2.332924, 2.64284], &[0.261326, 6.086185, 4.834745]],
    );
}

#[test]
fn a11_centering_none_k2() {
    check_a11(
        Centering::None,
        2,
        &[2.157388, 0.325666, 0.211232],
        &[
            &[0.870267, -0.311562, 0.125823],
            &[-0.311562, 0.251764, 0.302172],
            &[0.125823, 0.302172, 0.877969],
        ],
        &[&[0.375388, 0.901517, -0.364074], &[1.321805, 3.174395, -1.281967]],
    );
}

#[test]
fn a11_top_singular_k1() {
    check_a11(
        Centering::TopSingularOfPreferred,
        1,
        &[1.817683, 0.265895, 0.0],
        &[
            &[0.504365, -0.499956, -0.004963],
            &[-0.499956, 0.495586, 0.00492],
            &[-0.004963, 0.00492, 0.000049],
        ],
        &[&[1.510438, 1.494023, 2.994977], &[4.512103, 4.492373, 5.99496]],
    );
}

#[test]
fn a11_top_singular_k2() {
    check_a11(
        Centering::TopSingularOfPreferred,
        2,
        &[1.817683, 0.265895, 0.0],
        &[
            &[0.64143, -0.35857, -0.318473],
            &[-0.35857, 0.64143, -0.318473],
            &[-0.318473, -0.318473, 0.717141],
        ],
        &[&[2.03113, 2.03113, 1.803997], &[5.13797, 5.13797, 4.563412]],
    );
}

#[test]
fn a11_top_singular_k3_is_identity_with_warnings_and_clamp() {
    let b =
        profs_basis(&xp(), &xn(), 0, &opts(3, Centering::TopSingularOfPreferred, SvdDtype::F64))
            .unwrap();
    let p = b.projector().unwrap().unwrap();
    F64_VEC.assert_all_close(
        "P = I",
        &flat(&p),
        &flat(&Tensor::eye(3, (Kind::Double, tch::Device::Cpu))),
    );
    let conv = projected(&w_conv(), b.basis.as_ref().unwrap(), WeightLayout::Conv1D, Side::Output)
        .unwrap();
    F64_VEC.assert_all_close("W(I-P) = 0", &flat(&conv), &[0.0; 6]);
    let codes: Vec<&str> = b.warnings.iter().map(|w| w.code.as_str()).collect();
    assert!(codes.contains(&"PF-6"), "k = D warns: {codes:?}");
    assert!(codes.contains(&"PF-7"), "sigma_3 = 0 warns: {codes:?}");
    assert_eq!(b.r_eff, 2);
    assert_eq!(b.k_eff, 3);
    // Clamp gives k_eff = 2; Error fails naming the layer.
    let c = profs_basis(
        &xp(),
        &xn(),
        4,
        &opts(3, Centering::TopSingularOfPreferred, SvdDtype::F64)
            .with_rank_policy(RankPolicy::Clamp),
    )
    .unwrap();
    assert_eq!(c.k_eff, 2);
    let e = profs_basis(
        &xp(),
        &xn(),
        4,
        &opts(3, Centering::TopSingularOfPreferred, SvdDtype::F64)
            .with_rank_policy(RankPolicy::Error),
    )
    .unwrap_err();
    assert!(matches!(e, Error::RankDeficient { layer: 4, k: 3, r_eff: 2, .. }), "{e}");
}

#[test]
fn a11_rank_too_large() {
    for k in [4, 5] {
        let e = profs_basis(&xp(), &xn(), 0, &BasisOptions::new(k)).unwrap_err();
        assert!(
            matches!(e, Error::RankTooLarge { k: kk, n_pairs: 4, hidden: 3 } if kk == k),
            "{e}"
        );
    }
    assert!(matches!(profs_basis(&xp(), &xn(), 0, &BasisOptions::new(0)), Err(Error::ZeroRank)));
}

#[test]
fn a11_mlp_output_has_no_toxic_component() {
    let b =
        profs_basis(&xp(), &xn(), 0, &opts(1, Centering::TopSingularOfPreferred, SvdDtype::F64))
            .unwrap();
    let w = projected(&w_conv(), b.basis.as_ref().unwrap(), WeightLayout::Conv1D, Side::Output)
        .unwrap();
    let h = Tensor::from_slice(&[1.0f64, -1.0]).view([1, 2]);
    let out = h.matmul(&w);
    F64_VEC.assert_all_close("h W(I-P)", &flat(&out), &[-3.001665, -2.998349, -2.999984]);
    // Its component on the basis vector is 0.
    let comp = out.matmul(b.basis.as_ref().unwrap()).abs().max().double_value(&[]);
    assert!(comp < 1e-12, "{comp}");
}

#[test]
fn a11_mean_centering() {
    check_a11(
        Centering::Mean,
        1,
        &[1.817752, 0.265083, 0.0],
        &[
            &[0.506447, -0.499906, -0.007268],
            &[-0.499906, 0.493448, 0.007175],
            &[-0.007268, 0.007175, 0.000104],
        ],
        &[&[1.515169, 1.491485, 2.992606], &[4.51735, 4.489333, 5.992575]],
    );
    check_a11(
        Centering::Mean,
        2,
        &[1.817752, 0.265083, 0.0],
        &[
            &[0.644128, -0.355872, -0.320285],
            &[-0.355872, 0.644128, -0.320285],
            &[-0.320285, -0.320285, 0.711744],
        ],
        &[&[2.02847, 2.02847, 1.825623], &[5.124555, 5.124555, 4.6121]],
    );
    let b = profs_basis(&xp(), &xn(), 0, &opts(1, Centering::Mean, SvdDtype::F64)).unwrap();
    let w = projected(&w_conv(), b.basis.as_ref().unwrap(), WeightLayout::Conv1D, Side::Output)
        .unwrap();
    let out = Tensor::from_slice(&[1.0f64, -1.0]).view([1, 2]).matmul(&w);
    F64_VEC.assert_all_close("h W(I-P)", &flat(&out), &[-3.002181, -2.997848, -2.999969]);
}

#[test]
fn a11_matches_numpy_fixture() {
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_a11.json");
    let (xp, xn) = (mat(&fx["x_pos"]), mat(&fx["x_neg"]));
    for case in fx["cases"].as_array().unwrap() {
        let c = match case["centering"].as_str().unwrap() {
            "none" => Centering::None,
            "top" => Centering::TopSingularOfPreferred,
            _ => Centering::Mean,
        };
        let k = case["k"].as_u64().unwrap() as usize;
        let b = profs_basis(&xp, &xn, 0, &opts(k, c, SvdDtype::F64)).unwrap();
        let p = b.projector().unwrap().unwrap();
        F64_VEC.assert_all_close("P", &flat(&p), &flat(&mat(&case["projector"])));
        let w = projected(
            &mat(&fx["w_conv"]),
            b.basis.as_ref().unwrap(),
            WeightLayout::Conv1D,
            Side::Output,
        )
        .unwrap();
        F64_VEC.assert_all_close("W(I-P)", &flat(&w), &flat(&mat(&case["w_conv_edited"])));
    }
}

#[test]
fn random_cases_match_numpy_in_both_layouts() {
    let fx: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "profs_random.json");
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 20);
    for case in cases {
        let c = match case["centering"].as_str().unwrap() {
            "none" => Centering::None,
            "top" => Centering::TopSingularOfPreferred,
            _ => Centering::Mean,
        };
        let k = case["k"].as_u64().unwrap() as usize;
        let (xp, xn, w) = (mat(&case["x_pos"]), mat(&case["x_neg"]), mat(&case["w_conv"]));
        for (dtype, tol) in
            [(SvdDtype::F64, F64_VEC), (SvdDtype::F32, Tol { rel: 1e-3, abs: 1e-3 })]
        {
            let b = profs_basis(
                &xp.to_kind(dtype.kind()),
                &xn.to_kind(dtype.kind()),
                0,
                &opts(k, c, dtype),
            )
            .unwrap();
            tol.assert_all_close(
                "sigma",
                &b.singular_values,
                &serde_json::from_value::<Vec<f64>>(case["sigma"].clone()).unwrap(),
            );
            let basis = b.basis.as_ref().unwrap();
            let p = b.projector().unwrap().unwrap();
            tol.assert_all_close("P", &flat(&p), &flat(&mat(&case["projector"])));
            let conv =
                projected(&w.to_kind(dtype.kind()), basis, WeightLayout::Conv1D, Side::Output)
                    .unwrap();
            tol.assert_all_close("conv", &flat(&conv), &flat(&mat(&case["w_conv_edited"])));
            // d_ff = D is ambiguous by shape: the layout decides, never the shape.
            let lin =
                projected(&w.tr().to_kind(dtype.kind()), basis, WeightLayout::Linear, Side::Output)
                    .unwrap();
            tol.assert_all_close("linear", &flat(&lin), &flat(&mat(&case["w_lin_edited"])));
        }
    }
}

#[test]
fn mismatched_pairs_and_shapes_are_errors() {
    let a = Tensor::zeros([4, 3], (Kind::Float, tch::Device::Cpu));
    let b = Tensor::zeros([5, 3], (Kind::Float, tch::Device::Cpu));
    let e = profs_basis(&a, &b, 0, &BasisOptions::new(1)).unwrap_err();
    assert!(matches!(e, Error::PairCountMismatch { preferred: 4, dispreferred: 5, .. }), "{e}");
    let c = Tensor::zeros([4, 2], (Kind::Float, tch::Device::Cpu));
    assert!(matches!(
        profs_basis(&a, &c, 0, &BasisOptions::new(1)),
        Err(Error::ShapeMismatch { .. })
    ));
    let e = profs_bases(&[a.shallow_clone()], &[], &[0], &BasisOptions::new(1)).unwrap_err();
    assert!(matches!(e, Error::InvalidInput { .. }), "{e}");
    let nan = Tensor::from_slice(&[f32::NAN, 0., 0., 1.]).view([2, 2]);
    let ok = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
    assert!(matches!(
        profs_basis(&nan, &ok, 0, &BasisOptions::new(1)),
        Err(Error::InvalidInput { .. })
    ));
}

#[test]
fn identical_pairs_are_a_degenerate_layer() {
    let e = profs_basis(&xp(), &xp(), 7, &BasisOptions::new(1)).unwrap_err();
    assert!(matches!(e, Error::DegenerateLayer { layer: 7 }), "{e}");
    let mut o = BasisOptions::new(1);
    o.allow_degenerate_layers = true;
    let b = profs_basis(&xp(), &xp(), 7, &o).unwrap();
    assert!(b.skipped && b.basis.is_none());
    assert!(b.warnings.iter().any(|w| w.code == "PF-8" && w.layer == Some(7)));
}

#[test]
fn centering_none_warns() {
    let b = profs_basis(&xp(), &xn(), 2, &opts(1, Centering::None, SvdDtype::F64)).unwrap();
    assert!(b.warnings.iter().any(|w| w.code == "PF-5" && w.layer == Some(2)));
}

#[test]
fn projection_shape_errors() {
    let v = Tensor::eye(3, (Kind::Float, tch::Device::Cpu)).narrow(1, 0, 1);
    let w = Tensor::zeros([2, 4], (Kind::Float, tch::Device::Cpu));
    // Conv1D output side needs dim 1 = D = 3.
    assert!(matches!(
        projected(&w, &v, WeightLayout::Conv1D, Side::Output),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        projected(&w, &v, WeightLayout::Linear, Side::Output),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn key_edit_formulas_per_layout() {
    // Conv1D key weight c_fc [D, d_ff]: W ← (I − P) W; Linear key up_proj [d_ff, D]: W ← W (I − P).
    let v = Tensor::from_slice(&[0.6f64, 0.8, 0.0]).view([3, 1]);
    let p = v.matmul(&v.tr());
    let q = Tensor::eye(3, (Kind::Double, tch::Device::Cpu)) - p;
    let w = Tensor::from_slice(&[1.0f64, 2., 3., 4., 5., 6.]).view([3, 2]);
    let conv_key = projected(&w, &v, WeightLayout::Conv1D, Side::Input).unwrap();
    F64_VEC.assert_all_close("(I-P)W", &flat(&conv_key), &flat(&q.matmul(&w)));
    let lin_key = projected(&w.tr(), &v, WeightLayout::Linear, Side::Input).unwrap();
    F64_VEC.assert_all_close("W(I-P)", &flat(&lin_key), &flat(&w.tr().matmul(&q)));
    let b = Tensor::from_slice(&[1.0f64, 1.0, 1.0]);
    let pb = projected(&b, &v, WeightLayout::Linear, Side::Output).unwrap();
    F64_VEC.assert_all_close("(I-P)b", &flat(&pb), &flat(&q.matmul(&b.view([3, 1]))));
}

#[test]
fn apply_projection_casts_once_to_bf16() {
    let b =
        profs_basis(&xp(), &xn(), 0, &opts(1, Centering::TopSingularOfPreferred, SvdDtype::F32))
            .unwrap();
    let mut w = w_conv().to_kind(Kind::BFloat16);
    let expected = projected(&w, b.basis.as_ref().unwrap(), WeightLayout::Conv1D, Side::Output)
        .unwrap()
        .to_kind(Kind::BFloat16);
    apply_projection(&mut w, b.basis.as_ref().unwrap(), WeightLayout::Conv1D, Side::Output)
        .unwrap();
    assert_eq!(w.kind(), Kind::BFloat16);
    assert!(w.equal(&expected));
}

#[test]
fn targets_per_family_and_no_match_rule() {
    // OPT: exactly fc2 of layers 10..31.
    let dims = TargetDims { num_layers: 32, hidden: 4096, intermediate: 16384 };
    let opt_shape = |k: &str| {
        if k.contains(".fc2.weight") {
            Some(vec![4096, 16384])
        } else if k.contains(".fc1.weight") {
            Some(vec![16384, 4096])
        } else {
            None
        }
    };
    let t = resolve_targets("opt", &opt_shape, dims, &(10..32), true, false, false).unwrap();
    let names: Vec<String> = t.iter().map(|x| x.name.clone()).collect();
    let expected: Vec<String> =
        (10..32).map(|l| format!("model.decoder.layers.{l}.fc2.weight")).collect();
    assert_eq!(names, expected);
    assert!(t.iter().all(|x| x.layout == WeightLayout::Linear && x.side == Side::Output));
    // Keys too (GPT-J): fc_in is edited on the input side.
    let gptj = |k: &str| {
        if k.ends_with("fc_out.weight") {
            Some(vec![4096, 16384])
        } else if k.ends_with("fc_in.weight") {
            Some(vec![16384, 4096])
        } else {
            None
        }
    };
    let dims_j = TargetDims { num_layers: 28, hidden: 4096, intermediate: 16384 };
    let t = resolve_targets("gptj", &gptj, dims_j, &(10..12), true, true, false).unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(t[1].name, "transformer.h.10.mlp.fc_in.weight");
    assert_eq!(t[1].side, Side::Input);
    // Unknown family.
    let e = resolve_targets("bert", &opt_shape, dims, &(0..2), true, false, false).unwrap_err();
    assert!(
        matches!(&e, Error::NoMatchingTarget { model_type, layer: None, .. } if model_type == "bert"),
        "{e}"
    );
    // A missing key in one layer: error naming it, nothing returned.
    let holey =
        |k: &str| (k != "model.decoder.layers.12.fc2.weight").then(|| opt_shape(k)).flatten();
    let e = resolve_targets("opt", &holey, dims, &(10..32), true, false, false).unwrap_err();
    assert!(matches!(&e, Error::NoMatchingTarget { layer: Some(12), .. }), "{e}");
    assert!(e.to_string().contains("model.decoder.layers.12.fc2.weight"));
    // Wrong shape (a Conv1D-shaped weight in a Linear family).
    let wrong = |k: &str| k.contains("fc2").then(|| vec![16384, 4096]);
    assert!(matches!(
        resolve_targets("opt", &wrong, dims, &(10..11), true, false, false),
        Err(Error::NoMatchingTarget { layer: Some(10), .. })
    ));
    // Range past the last layer (the reference Mistral config writes 33).
    let e = resolve_targets("opt", &opt_shape, dims, &(15..33), true, false, false).unwrap_err();
    assert!(matches!(e, Error::LayerRange { start: 15, end: 33, num_layers: 32, .. }), "{e}");
    assert!(matches!(check_layer_range("x", &(3..3), 8), Err(Error::LayerRange { .. })));
}

#[test]
fn reference_defaults_only_for_reference_shapes() {
    assert_eq!(profs_defaults("gpt2", 24, 1024, 4096), Some((10..24, 2)));
    assert_eq!(profs_defaults("mistral", 32, 4096, 14336), Some((15..32, 10)));
    assert_eq!(profs_defaults("gptj", 28, 4096, 16384), Some((10..27, 10)));
    assert_eq!(profs_defaults("opt", 32, 4096, 16384), Some((10..32, 10)));
    assert_eq!(profs_defaults("gpt2", 12, 768, 3072), None);
    assert_eq!(profs_defaults("llama", 32, 4096, 11008), None);
}

fn arb_case() -> impl Strategy<Value = (usize, usize, usize, Vec<f64>, Vec<f64>, Vec<f64>)> {
    (2usize..9, 2usize..7, 1usize..6).prop_flat_map(|(n, d, f)| {
        let v = |len| {
            proptest::collection::vec(-10i32..=10, len)
                .prop_map(|x| x.into_iter().map(f64::from).collect::<Vec<f64>>())
        };
        (Just(n), Just(d), Just(f), v(n * d), v(n * d), v(f * d))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// P is symmetric and idempotent with trace k; edited weights annihilate span(V_k) in both
    /// layouts; editing twice equals editing once; Conv1D = transpose of Linear; sign flips of
    /// the basis and joint permutations of the pairs do not change the result.
    #[test]
    fn projector_properties((n, d, f, a, b, w) in arb_case(), centering in 0usize..3) {
        let xp = Tensor::from_slice(&a).view([n as i64, d as i64]) + 20.0;
        let xn = Tensor::from_slice(&b).view([n as i64, d as i64]) + 20.0;
        let c = [Centering::TopSingularOfPreferred, Centering::Mean, Centering::None][centering];
        let k = 1.max(n.min(d) / 2);
        let mut o = opts(k, c, SvdDtype::F64);
        o.allow_degenerate_layers = true;
        let basis = profs_basis(&xp, &xn, 0, &o).unwrap();
        prop_assume!(!basis.skipped);
        let v = basis.basis.as_ref().unwrap();
        let p = basis.projector().unwrap().unwrap();
        let tol = Tol { rel: 0.0, abs: 1e-9 };
        tol.assert_all_close("P^T", &flat(&p.tr()), &flat(&p));
        tol.assert_all_close("P^2", &flat(&p.matmul(&p)), &flat(&p));
        tol.assert_all_close("trace", &[p.trace().double_value(&[])], &[basis.k_eff as f64]);
        let wc = Tensor::from_slice(&w).view([f as i64, d as i64]);
        let conv = projected(&wc, v, WeightLayout::Conv1D, Side::Output).unwrap();
        tol.assert_all_close("W(I-P)V", &flat(&conv.matmul(v)), &vec![0.0; f * basis.k_eff]);
        let lin = projected(&wc.tr(), v, WeightLayout::Linear, Side::Output).unwrap();
        tol.assert_all_close("V^T(I-P)W", &flat(&v.tr().matmul(&lin)), &vec![0.0; f * basis.k_eff]);
        tol.assert_all_close("conv = lin^T", &flat(&conv), &flat(&lin.tr()));
        let twice = projected(&conv, v, WeightLayout::Conv1D, Side::Output).unwrap();
        tol.assert_all_close("idempotent edit", &flat(&twice), &flat(&conv));
        // Sign flip of the first basis column.
        let mut sign = vec![1.0f64; basis.k_eff];
        sign[0] = -1.0;
        let flipped = v * Tensor::from_slice(&sign).view([1, basis.k_eff as i64]);
        let conv2 = projected(&wc, &flipped, WeightLayout::Conv1D, Side::Output).unwrap();
        tol.assert_all_close("sign flip", &flat(&conv2), &flat(&conv));
        // Joint permutation of the pairs (reverse order): same P.
        let rev = Tensor::arange_start_step((n - 1) as i64, -1, -1, (Kind::Int64, tch::Device::Cpu));
        let pb = profs_basis(&xp.index_select(0, &rev), &xn.index_select(0, &rev), 0, &o).unwrap();
        let gap = basis.singular_values.get(basis.k_eff).map_or(1.0, |s| basis.singular_values[basis.k_eff - 1] - s);
        prop_assume!(gap > 1e-6);
        Tol { rel: 0.0, abs: 1e-6 }.assert_all_close("P(perm)", &flat(&pb.projector().unwrap().unwrap()), &flat(&p));
    }
}
