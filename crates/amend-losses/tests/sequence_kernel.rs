//! The fused selected-token kernel behind `SeqLogps` (`TokenBackend::Kernel`, what `Auto` runs
//! on CPU f32) against the tch path: values, per-token values and gradients under random
//! upstream weights, on random, extreme, `−inf`-column and fully masked batches with NaN in the
//! unscored rows; the fused-linear path (its value chunks and its in-place gradient chunks);
//! the non-finite policy; backend selection.

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{Error, NonFinitePolicy, Result, TokenBackend};
use amend_testing::{F32, F32_GRAD, Tol};
use proptest::prelude::*;
use sequence_support::*;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

#[derive(Debug, Clone)]
struct Batch {
    b: i64,
    t: i64,
    v: i64,
    logits: Vec<f32>,
    ids: Vec<i64>,
    mask: Vec<i64>,
    magnitude: f64,
}

fn batch(extreme: bool) -> impl Strategy<Value = Batch> {
    (1i64..=4, 1i64..=6, 2i64..=9, any::<bool>()).prop_flat_map(move |(b, t, v, masked)| {
        let n = (b * t) as usize;
        (
            prop::collection::vec(-10i32..=10, n * v as usize),
            prop::collection::vec(0..v, n),
            if masked {
                prop::collection::vec(Just(0i64), n).boxed()
            } else {
                prop::collection::vec(0i64..=1, n).boxed()
            },
            prop::collection::vec(0..v, n),
        )
            .prop_map(move |(z, ids, mask, col)| {
                let unit = if extreme { 1000.0 } else { 1.0 };
                let mut logits: Vec<f32> = z.into_iter().map(|x| x as f32 * unit).collect();
                let vu = v as usize;
                for (r, row) in logits.chunks_mut(vu).enumerate() {
                    // The row at position (b, t) scores ids[b, t + 1]: a −inf column anywhere
                    // but there (a −inf target has log-prob −inf: tested separately).
                    let target = if (r + 1) % t as usize != 0 { ids[r + 1] as usize } else { 0 };
                    if extreme && r % 2 == 0 && vu >= 2 {
                        let c = if col[r] as usize == target {
                            (target + 1) % vu
                        } else {
                            col[r] as usize
                        };
                        row[c] = f32::NEG_INFINITY;
                    }
                    // NaN in the rows that are not scored (and the last position).
                    let scored = (r + 1) % t as usize != 0 && mask[r + 1] == 1;
                    if !scored {
                        row[r % vu] = f32::NAN;
                    }
                }
                let magnitude = logits
                    .iter()
                    .filter(|x| x.is_finite())
                    .fold(1.0f64, |a, &x| a.max(f64::from(x.abs())));
                Batch { b, t, v, logits, ids, mask, magnitude }
            })
    })
}

impl Batch {
    fn logits(&self, kind: Kind) -> Tensor {
        Tensor::from_slice(&self.logits).reshape([self.b, self.t, self.v]).to_kind(kind)
    }
    fn ids(&self) -> Tensor {
        Tensor::from_slice(&self.ids).reshape([self.b, self.t])
    }
    fn mask(&self) -> Tensor {
        Tensor::from_slice(&self.mask).reshape([self.b, self.t])
    }

    /// `Σ w_s ⊙ S + Σ w_t ⊙ lp` and its gradient, plus the sums and per-token values.
    fn run(
        &self,
        kind: Kind,
        backend: TokenBackend,
        w_s: &Tensor,
        w_t: &Tensor,
    ) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let x = self.logits(kind).set_requires_grad(true);
        let cfg = SeqLogpsConfig::default().with_return_per_token(true).with_backend(backend);
        let lp = seq_logps(&x, &self.ids(), &self.mask(), &cfg)?;
        let per_token = lp.per_token.as_ref().expect("requested");
        let loss = (&lp.sum * w_s.to_kind(lp.sum.kind())).sum(Kind::Double)
            + (per_token * w_t.to_kind(per_token.kind())).sum(Kind::Double);
        loss.backward();
        let g = x.grad();
        let g = if g.defined() { vals(&g) } else { vec![0.0; x.numel()] };
        Ok((vals(&lp.sum), vals(per_token), g))
    }
}

fn check(p: &Batch, seed: u64) -> Result<()> {
    tch::manual_seed(seed as i64);
    let w_s = Tensor::randn([p.b], (Kind::Double, CPU));
    let w_t = Tensor::randn([p.b, (p.t - 1).max(0)], (Kind::Double, CPU));
    let (ks, kt, kg) = p.run(Kind::Float, TokenBackend::Kernel, &w_s, &w_t)?;
    let (os, ot, og) = p.run(Kind::Double, TokenBackend::Composite, &w_s, &w_t)?;
    let extra = if p.magnitude > 10.0 { 4e-7 * p.magnitude } else { 0.0 };
    // Sums add up to T values: relative 1e-5 of the largest term.
    let vt = Tol { rel: F32.rel, abs: F32.abs * p.t as f64 + extra * p.t as f64 };
    let gt = Tol { rel: F32_GRAD.rel, abs: F32_GRAD.abs * 4.0 + extra };
    vt.assert_all_close("S", &ks, &os);
    vt.assert_all_close("lp", &kt, &ot);
    // The upstream weight of a row is w_s[b] + w_t[b, t] (|w| up to ≈ 4).
    gt.assert_all_close("dlogits", &kg, &og);
    assert!(kg.iter().all(|g| g.is_finite()), "NaN in unscored rows leaked: {kg:?}");
    if p.magnitude <= 10.0 {
        let (cs, ct, cg) = p.run(Kind::Float, TokenBackend::Composite, &w_s, &w_t)?;
        vt.assert_all_close("S vs f32 composite", &ks, &cs);
        vt.assert_all_close("lp vs f32 composite", &kt, &ct);
        Tol { rel: F32.rel, ..gt }.assert_all_close("dlogits vs f32 composite", &kg, &cg);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn seq_logps_kernel_matches_composite(p in batch(false), seed in any::<u64>()) {
        check(&p, seed)?;
    }

    #[test]
    fn seq_logps_kernel_matches_composite_on_extreme_logits(p in batch(true), seed in any::<u64>()) {
        check(&p, seed)?;
    }
}

fn small() -> Batch {
    let (b, t, v) = (2, 4, 5);
    Batch {
        b,
        t,
        v,
        logits: (0..b * t * v).map(|i| ((i * 7) % 11) as f32 * 0.6 - 3.0).collect(),
        ids: vec![0, 3, 1, 4, 2, 2, 0, 1],
        mask: vec![0, 1, 1, 1, 0, 0, 1, 1],
        magnitude: 3.0,
    }
}

#[test]
fn seq_logps_kernel_non_finite_policy_matches_composite() -> Result<()> {
    let mut p = small();
    // Scored row (0, 1) (it predicts ids[0, 2]) gets a NaN; row (1, 2) a −inf target logit.
    p.logits[5 + 2] = f32::NAN;
    let x = p.logits(Kind::Float);
    let run = |backend, policy| {
        let cfg = SeqLogpsConfig::default().with_backend(backend).with_non_finite(policy);
        seq_logps(&x, &p.ids(), &p.mask(), &cfg)
    };
    let k = run(TokenBackend::Kernel, NonFinitePolicy::Error).unwrap_err();
    let c = run(TokenBackend::Composite, NonFinitePolicy::Error).unwrap_err();
    assert_eq!(format!("{k}"), format!("{c}"));
    assert!(matches!(k, Error::NonFiniteLogits { ref index, .. } if *index == vec![0, 1]), "{k:?}");
    let k = run(TokenBackend::Kernel, NonFinitePolicy::Propagate)?;
    let c = run(TokenBackend::Composite, NonFinitePolicy::Propagate)?;
    let (ks, cs) = (vals(&k.sum), vals(&c.sum));
    assert!(ks[0].is_nan() && cs[0].is_nan());
    assert_eq!(ks[1], cs[1]);
    // A −inf target logit (and nothing else wrong): S = −inf, NonFinite under Error.
    let mut q = small();
    q.logits[(4 + 2) * 5 + 1] = f32::NEG_INFINITY; // row (1, 2) predicts ids[1, 3] = 1
    let x = q.logits(Kind::Float);
    for backend in [TokenBackend::Kernel, TokenBackend::Composite] {
        let cfg = SeqLogpsConfig::default().with_backend(backend);
        let err = seq_logps(&x, &q.ids(), &q.mask(), &cfg).unwrap_err();
        assert!(matches!(err, Error::NonFinite { .. }), "{backend:?}: {err:?}");
        let cfg = cfg.with_non_finite(NonFinitePolicy::Propagate);
        let lp = seq_logps(&x, &q.ids(), &q.mask(), &cfg)?;
        assert_eq!(vals(&lp.sum)[1], f64::NEG_INFINITY, "{backend:?}");
    }
    Ok(())
}

#[test]
fn seq_logps_kernel_backend_requires_cpu_f32() -> Result<()> {
    let p = small();
    for kind in [Kind::Double, Kind::BFloat16] {
        let cfg = SeqLogpsConfig::default().with_backend(TokenBackend::Kernel);
        let err = seq_logps(&p.logits(kind), &p.ids(), &p.mask(), &cfg).unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { name: "backend", .. }), "{err:?}");
    }
    // Auto is the kernel on f32, bit for bit, with the same token statistics.
    let x = p.logits(Kind::Float);
    let stats = |backend| -> Result<(Vec<f64>, TokenStats)> {
        let cfg = SeqLogpsConfig::default().with_token_stats(true).with_backend(backend);
        let lp = seq_logps(&x, &p.ids(), &p.mask(), &cfg)?;
        Ok((vals(&lp.sum), lp.stats.expect("requested")))
    };
    let (a, sa) = stats(TokenBackend::Auto)?;
    let (k, sk) = stats(TokenBackend::Kernel)?;
    let (_, sc) = stats(TokenBackend::Composite)?;
    assert_eq!(a, k);
    assert_eq!(sa, sk);
    assert_eq!((sk.correct, sk.scored, sk.logit_count), (sc.correct, sc.scored, sc.logit_count));
    assert!((sk.logit_sum - sc.logit_sum).abs() < 1e-9);
    Ok(())
}

/// Fused-linear `SeqLogps` (values by the value-only kernel per chunk, gradients by the
/// in-place kernel with row scale `−u`) against the tch path of the same function and against
/// full logits, in f32, with a bias and several chunks.
#[test]
fn fused_linear_kernel_chunks_match_the_tch_chunks() -> Result<()> {
    tch::manual_seed(5);
    let (b, t, h, v) = (4, 7, 6, 13);
    let opts = (Kind::Float, CPU);
    let hidden = Tensor::randn([b, t, h], opts);
    let weight = Tensor::randn([v, h], opts) * 0.8;
    let bias = Tensor::randn([v], opts) * 0.3;
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, CPU));
    let mask = Tensor::randint(2, [b, t], (Kind::Int64, CPU));
    let w_s = Tensor::randn([b], opts);
    let w_t = Tensor::randn([b, t - 1], opts);
    let run = |backend: TokenBackend| -> Result<Vec<Vec<f64>>> {
        let (hh, ww, bb) = (
            hidden.detach().set_requires_grad(true),
            weight.detach().set_requires_grad(true),
            bias.detach().set_requires_grad(true),
        );
        let cfg = FusedLinearConfig::default()
            .with_chunk_rows(3)
            .with_logps(SeqLogpsConfig::default().with_backend(backend));
        let fl = seq_logps_fused_linear(&hh, &ww, Some(&bb), &ids, &mask, &cfg)?;
        let lp = fl.logps();
        let loss = (&lp.sum * &w_s).sum(Kind::Float)
            + (lp.per_token.as_ref().expect("always") * &w_t).sum(Kind::Float);
        fl.f_attach(&loss)?.backward();
        Ok(vec![
            vals(&lp.sum),
            vals(lp.per_token.as_ref().expect("always")),
            vals(&hh.grad()),
            vals(&ww.grad()),
            vals(&bb.grad()),
        ])
    };
    let k = run(TokenBackend::Kernel)?;
    let c = run(TokenBackend::Composite)?;
    assert_eq!(run(TokenBackend::Auto)?, k, "Auto is the kernel on CPU f32");
    for (i, what) in ["S", "lp", "dh", "dW", "db"].iter().enumerate() {
        Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close(what, &k[i], &c[i]);
    }
    // A double-precision run of the tch path is the oracle.
    let hd = hidden.to_kind(Kind::Double).set_requires_grad(true);
    let wd = weight.to_kind(Kind::Double).set_requires_grad(true);
    let bd = bias.to_kind(Kind::Double).set_requires_grad(true);
    let logits = hd.matmul(&wd.tr()) + &bd;
    let cfg = SeqLogpsConfig::default().with_return_per_token(true);
    let lp = seq_logps(&logits, &ids, &mask, &cfg)?;
    let loss = (&lp.sum * w_s.to_kind(Kind::Double)).sum(Kind::Double)
        + (lp.per_token.as_ref().expect("requested") * w_t.to_kind(Kind::Double)).sum(Kind::Double);
    loss.backward();
    let oracle = [
        vals(&lp.sum),
        vals(lp.per_token.as_ref().unwrap()),
        vals(&hd.grad()),
        vals(&wd.grad()),
        vals(&bd.grad()),
    ];
    for (i, what) in ["S", "lp", "dh", "dW", "db"].iter().enumerate() {
        Tol { rel: 1e-5, abs: 1e-5 }.assert_all_close(&format!("{what} vs f64"), &k[i], &oracle[i]);
    }
    Ok(())
}

#[test]
fn fused_linear_kernel_falls_back_on_non_finite_upstream_gradients() -> Result<()> {
    // An upstream gradient of +inf at one row: the kernel rejects the row scale, the chunk is
    // recomputed with tch ops, and the result is the tch path's (inf/NaN where it propagates).
    tch::manual_seed(6);
    let (b, t, h, v) = (2, 4, 3, 5);
    let hidden = Tensor::randn([b, t, h], (Kind::Float, CPU));
    let weight = Tensor::randn([v, h], (Kind::Float, CPU));
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, CPU));
    let mask = Tensor::ones([b, t], (Kind::Int64, CPU));
    let run = |backend: TokenBackend| -> Result<Vec<f64>> {
        let ww = weight.detach().set_requires_grad(true);
        let cfg = FusedLinearConfig::default()
            .with_logps(SeqLogpsConfig::default().with_backend(backend));
        let fl = seq_logps_fused_linear(&hidden, &ww, None, &ids, &mask, &cfg)?;
        let per_token = fl.logps().per_token.as_ref().expect("always");
        let w = Tensor::from_slice(&[1.0f32, f32::INFINITY, 1.0, 1.0, 1.0, 1.0]).reshape([2, 3]);
        let loss = (per_token * w).sum(Kind::Float);
        fl.f_attach(&loss)?.backward();
        Ok(vals(&ww.grad()))
    };
    let k = run(TokenBackend::Kernel)?;
    let c = run(TokenBackend::Composite)?;
    assert!(k.iter().any(|g| !g.is_finite()));
    for (a, b) in k.iter().zip(&c) {
        let same = if a.is_finite() {
            (a - b).abs() <= 1e-5 * b.abs().max(1.0)
        } else {
            a == b || (a.is_nan() && b.is_nan())
        };
        assert!(same, "{a} vs {b}");
    }
    Ok(())
}
