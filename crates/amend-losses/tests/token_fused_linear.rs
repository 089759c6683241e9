//! The fused-linear entry points against the naive path (full logits `h·Wᵀ + b` and autograd):
//! values, metrics and gradients with respect to `h`, `W` and `b`.

mod token_support;

use amend_losses::token::*;
use amend_losses::{LossOutput, Reduction, Result};
use amend_testing::Tol;
use tch::{Kind, Tensor};
use token_support::*;

const N: i64 = 7;
const H: i64 = 5;
const V: i64 = 9;

struct Params {
    h: Tensor,
    w: Tensor,
    b: Tensor,
}

impl Params {
    fn new(seed: i64, kind: Kind, lead: &[i64]) -> Params {
        tch::manual_seed(seed);
        let mut shape = lead.to_vec();
        shape.push(H);
        Params {
            h: Tensor::randn(shape.as_slice(), (Kind::Double, CPU)).to_kind(kind),
            w: (Tensor::randn([V, H], (Kind::Double, CPU)) * 0.8).to_kind(kind),
            b: (Tensor::randn([V], (Kind::Double, CPU)) * 0.3).to_kind(kind),
        }
    }

    fn leaves(&self) -> (Tensor, Tensor, Tensor) {
        (
            self.h.copy().set_requires_grad(true),
            self.w.copy().set_requires_grad(true),
            self.b.copy().set_requires_grad(true),
        )
    }
}

fn grads(ts: &[&Tensor]) -> Vec<Vec<f64>> {
    ts.iter().map(|t| vals(&t.grad())).collect()
}

fn logits_of(h: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let l = h.matmul(&w.tr()) + b;
    if l.dim() == 2 { l.unsqueeze(0) } else { l }
}

fn as_bt(x: &Tensor) -> Tensor {
    if x.dim() == 1 { x.unsqueeze(0) } else { x.shallow_clone() }
}

fn check(
    what: &str,
    tol: Tol,
    fused: &LossOutput,
    naive: &LossOutput,
    gf: &[Vec<f64>],
    gn: &[Vec<f64>],
) {
    tol.assert_all_close(&format!("{what} loss"), &[scalar(&fused.loss)], &[scalar(&naive.loss)]);
    tol.assert_all_close(
        &format!("{what} per_example"),
        &vals(&fused.per_example),
        &vals(&naive.per_example),
    );
    assert_eq!(fused.count(), naive.count(), "{what} count");
    for (name, sc) in naive.metrics.iter() {
        let f = fused.metrics.get(name).unwrap_or_else(|| panic!("{what}: metric {name} missing"));
        Tol { rel: 1e-6, abs: 1e-6 }.assert_all_close(
            &format!("{what} metric {name}"),
            &[f.sum, f.count],
            &[sc.sum, sc.count],
        );
    }
    for (i, (a, b)) in gf.iter().zip(gn).enumerate() {
        tol.assert_all_close(&format!("{what} grad[{}]", ["h", "W", "b"][i]), a, b);
    }
}

#[test]
fn fused_linear_nll_matches_naive_values_and_gradients() -> Result<()> {
    let labels = ids(&[3, -100, 8, 0, 5, -100, 1], &[N]);
    let mask = Tensor::from_slice(&[true, true, true, false, true, true, true]);
    for kind in [Kind::Double, Kind::Float] {
        let tol = if kind == Kind::Double {
            Tol { rel: 1e-10, abs: 1e-12 }
        } else {
            Tol { rel: 1e-5, abs: 1e-5 }
        };
        for lead in [vec![N], vec![1, N]] {
            let p = Params::new(11, kind, &lead);
            let labels = labels.reshape(lead.as_slice());
            let mask = mask.reshape(lead.as_slice());
            for reduction in [Reduction::Sum, Reduction::Mean, Reduction::BatchMean] {
                for backend in [TokenBackend::Auto, TokenBackend::Composite] {
                    for chunk in [1usize, 2, 3, 64] {
                        let cfg =
                            NllConfig::default().with_reduction(reduction).with_backend(backend);
                        let (h, w, b) = p.leaves();
                        let fused = fused_linear_nll_loss(
                            &h,
                            LinearHead::new(&w).with_bias(&b),
                            &labels,
                            Some(&mask),
                            &cfg,
                            &FusedLinearOptions::default().with_chunk_rows(chunk),
                        )?;
                        fused.loss.backward();
                        let gf = grads(&[&h, &w, &b]);
                        let (h, w, b) = p.leaves();
                        let naive = nll_loss(
                            &logits_of(&h, &w, &b),
                            &as_bt(&labels),
                            Some(&as_bt(&mask)),
                            &cfg,
                        )?;
                        naive.loss.backward();
                        let gn = grads(&[&h, &w, &b]);
                        let what = format!(
                            "NLL {kind:?} lead {lead:?} {reduction:?} {backend:?} chunk {chunk}"
                        );
                        // BatchMean: the fused path divides by the leading dim of `hidden`.
                        if reduction == Reduction::BatchMean && lead.len() == 1 {
                            let expected = scalar(&naive.parts[0].sum) / N as f64;
                            tol.assert_all_close(&what, &[scalar(&fused.loss)], &[expected]);
                            continue;
                        }
                        check(&what, tol, &fused, &naive, &gf, &gn);
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fused_linear_tnt_matches_naive_for_every_variant_and_reference() -> Result<()> {
    let labels = ids(&[3, 4, 8, 0, 5, 2, 1], &[N]);
    let weights = TokenWeights::new(&ids(&[1, -1, 0, -1, 1, 1, -1], &[N]).reshape([1, N]))?;
    let weights_flat = TokenWeights::new(&ids(&[1, -1, 0, -1, 1, 1, -1], &[1, N]))?;
    for kind in [Kind::Double, Kind::Float] {
        let tol = if kind == Kind::Double {
            Tol { rel: 1e-10, abs: 1e-12 }
        } else {
            Tol { rel: 1e-5, abs: 2e-5 }
        };
        let p = Params::new(5, kind, &[1, N]);
        // A reference with its own hidden size and head.
        tch::manual_seed(6);
        let rh = Tensor::randn([1, N, 4], (Kind::Double, CPU)).to_kind(kind);
        let rw = Tensor::randn([V, 4], (Kind::Double, CPU)).to_kind(kind);
        let rb = Tensor::randn([V], (Kind::Double, CPU)).to_kind(kind);
        let ref_logits = rh.matmul(&rw.tr()) + &rb;
        let labels = labels.reshape([1, N]);
        for variant in TntVariant::ALL {
            for (ri, reference) in [
                Reference::Head { hidden: &rh, head: LinearHead::new(&rw).with_bias(&rb) },
                Reference::Logits(&ref_logits),
            ]
            .into_iter()
            .enumerate()
            {
                for backend in [TokenBackend::Auto, TokenBackend::Composite] {
                    for chunk in [2usize, 5] {
                        let cfg = TntConfig::new(variant)
                            .with_alpha(2.5)
                            .with_smoothing_eps(1e-3)
                            .with_backend(backend)
                            .with_reduction(Reduction::Mean);
                        let (h, w, b) = p.leaves();
                        let fused = fused_linear_tnt_loss(
                            &h,
                            LinearHead::new(&w).with_bias(&b),
                            reference,
                            &labels,
                            &weights,
                            &cfg,
                            &FusedLinearOptions::default().with_chunk_rows(chunk),
                        )?;
                        fused.loss.backward();
                        let gf = grads(&[&h, &w, &b]);
                        let (h, w, b) = p.leaves();
                        let naive = tnt_loss(
                            &logits_of(&h, &w, &b),
                            &ref_logits,
                            &labels,
                            &weights_flat,
                            &cfg,
                        )?;
                        naive.loss.backward();
                        let gn = grads(&[&h, &w, &b]);
                        check(
                            &format!("{variant} {kind:?} ref {ri} {backend:?} chunk {chunk}"),
                            tol,
                            &fused,
                            &naive,
                            &gf,
                            &gn,
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

#[test]
fn fused_linear_part_sum_carries_the_gradient_for_exact_normalisation() -> Result<()> {
    let p = Params::new(21, Kind::Double, &[N]);
    let labels = ids(&[3, -100, 8, 0, 5, -100, 1], &[N]);
    let (h, w, _) = p.leaves();
    let opts = FusedLinearOptions::default().with_chunk_rows(3);
    let mut total = 0.0;
    let mut outs = Vec::new();
    for (start, len) in [(0, 4), (4, 3)] {
        outs.push(fused_linear_nll_loss(
            &h.narrow(0, start, len),
            LinearHead::new(&w),
            &labels.narrow(0, start, len),
            None,
            &NllConfig::default(),
            &opts,
        )?);
        total += outs.last().unwrap().count();
    }
    assert_eq!(total, count_active_nll(&labels, None, -100)?);
    for o in &outs {
        o.normalized_by(&[total])?.backward();
    }
    let gf = grads(&[&h, &w]);
    let (h2, w2, _) = p.leaves();
    let naive = nll_loss(
        &(h2.matmul(&w2.tr())).unsqueeze(0),
        &labels.unsqueeze(0),
        None,
        &NllConfig::default(),
    )?;
    naive.loss.backward();
    let gn = grads(&[&h2, &w2]);
    for (a, b) in gf.iter().zip(&gn) {
        Tol { rel: 1e-10, abs: 1e-12 }.assert_all_close("accumulated", a, b);
    }
    Ok(())
}

#[test]
fn fused_linear_frozen_head_and_value_only_calls() -> Result<()> {
    let p = Params::new(31, Kind::Float, &[N]);
    let labels = ids(&[3, 1, 8, 0, 5, 4, 1], &[N]);
    // Only h requires grad (an adapter-style fine-tune): W gets no gradient.
    let h = p.h.copy().set_requires_grad(true);
    let out = fused_linear_nll_loss(
        &h,
        LinearHead::new(&p.w),
        &labels,
        None,
        &NllConfig::default(),
        &FusedLinearOptions::default(),
    )?;
    out.loss.backward();
    assert!(!p.w.grad().defined());
    let h2 = p.h.copy().set_requires_grad(true);
    let naive = nll_loss(
        &h2.matmul(&p.w.tr()).unsqueeze(0),
        &labels.unsqueeze(0),
        None,
        &NllConfig::default(),
    )?;
    naive.loss.backward();
    Tol { rel: 1e-5, abs: 1e-6 }.assert_all_close("grad h", &vals(&h.grad()), &vals(&h2.grad()));
    // Nothing requires grad: value only, no graph.
    let out = fused_linear_nll_loss(
        &p.h,
        LinearHead::new(&p.w),
        &labels,
        None,
        &NllConfig::default(),
        &FusedLinearOptions::default(),
    )?;
    assert!(!out.loss.requires_grad());
    Tol { rel: 1e-5, abs: 1e-6 }.assert_all_close(
        "value",
        &[scalar(&out.loss)],
        &[scalar(&naive.loss)],
    );
    // A bf16 head is upcast; the loss is f32 and close to the f32 result.
    let hb = p.h.to_kind(Kind::BFloat16).set_requires_grad(true);
    let wb = p.w.to_kind(Kind::BFloat16).set_requires_grad(true);
    let out = fused_linear_nll_loss(
        &hb,
        LinearHead::new(&wb),
        &labels,
        None,
        &NllConfig::default(),
        &FusedLinearOptions::default(),
    )?;
    out.loss.backward();
    assert_eq!(out.loss.kind(), Kind::Float);
    assert_eq!(wb.grad().kind(), Kind::BFloat16);
    Tol { rel: 2e-2, abs: 1e-2 }.assert_all_close(
        "bf16 value",
        &[scalar(&out.loss)],
        &[scalar(&naive.loss)],
    );
    Ok(())
}

#[test]
fn fused_linear_all_rows_masked_gives_zero() -> Result<()> {
    let p = Params::new(41, Kind::Float, &[N]);
    let (h, w, b) = p.leaves();
    let labels = Tensor::full([N], -100, (Kind::Int64, CPU));
    let out = fused_linear_nll_loss(
        &h,
        LinearHead::new(&w).with_bias(&b),
        &labels,
        None,
        &NllConfig::default(),
        &FusedLinearOptions::default(),
    )?;
    out.loss.backward();
    assert_eq!((scalar(&out.loss), out.count()), (0.0, 0.0));
    for g in grads(&[&h, &w, &b]) {
        assert!(g.iter().all(|&x| x == 0.0));
    }
    Ok(())
}

#[test]
fn fused_linear_rejects_bad_shapes_and_reports_non_finite_positions() {
    let p = Params::new(51, Kind::Float, &[N]);
    let labels = ids(&[3, 1, 8, 0, 5, 4, 1], &[N]);
    let cfg = NllConfig::default();
    let opts = FusedLinearOptions::default();
    let bad_w = Tensor::zeros([V, H + 1], (Kind::Float, CPU));
    assert!(matches!(
        fused_linear_nll_loss(&p.h, LinearHead::new(&bad_w), &labels, None, &cfg, &opts),
        Err(amend_losses::Error::ShapeMismatch { name: "weight", .. })
    ));
    let bad_b = Tensor::zeros([V + 1], (Kind::Float, CPU));
    assert!(matches!(
        fused_linear_nll_loss(
            &p.h,
            LinearHead::new(&p.w).with_bias(&bad_b),
            &labels,
            None,
            &cfg,
            &opts
        ),
        Err(amend_losses::Error::ShapeMismatch { name: "bias", .. })
    ));
    assert!(matches!(
        fused_linear_nll_loss(
            &p.h,
            LinearHead::new(&p.w),
            &labels.narrow(0, 0, 3),
            None,
            &cfg,
            &opts
        ),
        Err(amend_losses::Error::ShapeMismatch { name: "labels", .. })
    ));
    let w = TokenWeights::new(&ids(&[1, 1, 1, 1, 1, 1, 1], &[1, N])).unwrap();
    let wrong_ref = Tensor::zeros([N, V + 1], (Kind::Float, CPU));
    let err = fused_linear_tnt_loss(
        &p.h.unsqueeze(0),
        LinearHead::new(&p.w),
        Reference::Logits(&wrong_ref),
        &labels.unsqueeze(0),
        &w,
        &TntConfig::default(),
        &opts,
    )
    .unwrap_err();
    assert!(matches!(err, amend_losses::Error::ShapeMismatch { name: "ref_logits", .. }), "{err}");
    // A NaN hidden state at row 5 (the 4th active row after row 2 is masked) is reported at 5.
    let h = p.h.copy();
    let _ = h.get(5).get(0).fill_(f64::NAN);
    let labels = ids(&[3, 1, -100, 0, 5, 4, 1], &[N]);
    let err = fused_linear_nll_loss(
        &h,
        LinearHead::new(&p.w),
        &labels,
        None,
        &cfg,
        &FusedLinearOptions::default().with_chunk_rows(2),
    )
    .unwrap_err();
    assert!(
        matches!(err, amend_losses::Error::NonFiniteLogits { ref index, .. } if index == &vec![5]),
        "{err}"
    );
}

#[test]
fn fused_linear_tnt_accepts_flat_hidden_states_and_empty_batches() -> Result<()> {
    let p = Params::new(61, Kind::Double, &[N]);
    let labels = ids(&[3, 4, 8, 0, 5, 2, 1], &[N]);
    let w_row = TokenWeights::new(&ids(&[1, -1, 0, -1, 1, 1, -1], &[1, N]))?;
    let ref_logits = p.h.matmul(&p.w.tr());
    let cfg = TntConfig::new(TntVariant::Rf).with_alpha(2.0);
    let flat = fused_linear_tnt_loss(
        &p.h,
        LinearHead::new(&p.w),
        Reference::Logits(&ref_logits),
        &labels,
        &w_row,
        &cfg,
        &FusedLinearOptions::default(),
    )?;
    let naive = tnt_loss(
        &ref_logits.unsqueeze(0),
        &ref_logits.unsqueeze(0),
        &labels.unsqueeze(0),
        &w_row,
        &cfg,
    )?;
    Tol { rel: 1e-10, abs: 1e-12 }.assert_all_close(
        "flat",
        &[scalar(&flat.loss)],
        &[scalar(&naive.loss)],
    );
    let w_bad = TokenWeights::new(&ids(&[1, 1, 1, 1, 1, 1], &[2, 3]))?;
    assert!(
        fused_linear_tnt_loss(
            &p.h,
            LinearHead::new(&p.w),
            Reference::Logits(&ref_logits),
            &labels,
            &w_bad,
            &cfg,
            &FusedLinearOptions::default()
        )
        .is_err()
    );
    // N = 0.
    let h0 = Tensor::zeros([0, H], (Kind::Double, CPU)).set_requires_grad(true);
    let out = fused_linear_nll_loss(
        &h0,
        LinearHead::new(&p.w),
        &Tensor::zeros([0], (Kind::Int64, CPU)),
        None,
        &NllConfig::default(),
        &FusedLinearOptions::default(),
    )?;
    assert_eq!((scalar(&out.loss), out.count()), (0.0, 0.0));
    Ok(())
}
