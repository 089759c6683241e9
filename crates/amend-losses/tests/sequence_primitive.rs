//! The `SeqLogps` primitive: agreement with the composite `gather(log_softmax(·))` (values and
//! gradients), masking by selection, dtypes, validation, and the fused-linear path against the
//! full-logits path.

mod sequence_support;

use amend_losses::sequence::*;
use amend_losses::{Error, NonFinitePolicy, Result, TokenBackend};
use sequence_support::*;
use tch::{Device, Kind, Tensor};

const CPU: Device = Device::Cpu;

/// The composite a user would write: full log-softmax, gather, masked sum (values at masked
/// positions selected away).
fn composite(logits: &Tensor, ids: &Tensor, mask: &Tensor) -> (Tensor, Tensor) {
    let t = logits.size()[1];
    let lsm = logits.narrow(1, 0, t - 1).log_softmax(-1, Kind::Double);
    let lp = lsm.gather(2, &ids.narrow(1, 1, t - 1).unsqueeze(-1), false).squeeze_dim(-1);
    let m = mask.narrow(1, 1, t - 1).ne(0);
    let lp = lp.where_scalarother(&m, 0.0);
    (lp.sum_dim_intlist([1i64].as_slice(), false, Kind::Double), lp)
}

fn random_batch(seed: i64, b: i64, t: i64, v: i64, kind: Kind) -> (Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let logits = (Tensor::randn([b, t, v], (Kind::Double, CPU)) * 3.0).to_kind(kind);
    let ids = Tensor::randint(v, [b, t], (Kind::Int64, CPU));
    let mask = Tensor::randint(2, [b, t], (Kind::Int64, CPU));
    (logits, ids, mask)
}

#[test]
fn seq_logps_matches_composite_values_and_gradients_f64() -> Result<()> {
    for seed in 0..4 {
        let (logits, ids, mask) = random_batch(seed, 3, 7, 11, Kind::Double);
        let a = logits.detach().set_requires_grad(true);
        let b = logits.detach().set_requires_grad(true);
        let lp =
            seq_logps(&a, &ids, &mask, &SeqLogpsConfig::default().with_return_per_token(true))?;
        let (sum, per_token) = composite(&b, &ids, &mask);
        assert_vals(Kind::Double, "S", &vals(&lp.sum), &vals(&sum));
        assert_vals(Kind::Double, "lp", &vals(lp.per_token.as_ref().unwrap()), &vals(&per_token));
        assert_eq!(
            vals(&lp.len),
            vals(&mask.narrow(1, 1, 6).sum_dim_intlist([1i64].as_slice(), false, Kind::Int64))
        );
        // Random upstream weights on both the sums and the per-token values.
        let w_s = Tensor::randn([3], (Kind::Double, CPU));
        let w_t = Tensor::randn([3, 6], (Kind::Double, CPU));
        let la =
            (&lp.sum * &w_s).sum(Kind::Double) + (lp.per_token.unwrap() * &w_t).sum(Kind::Double);
        let lb = (&sum * &w_s).sum(Kind::Double) + (per_token * &w_t).sum(Kind::Double);
        la.backward();
        lb.backward();
        assert_grads(Kind::Double, "dlogits", &vals(&a.grad()), &vals(&b.grad()));
    }
    Ok(())
}

#[test]
fn seq_logps_matches_composite_f32() -> Result<()> {
    let (logits, ids, mask) = random_batch(7, 4, 9, 50, Kind::Float);
    let a = logits.detach().set_requires_grad(true);
    let lp = seq_logps(&a, &ids, &mask, &SeqLogpsConfig::default())?;
    assert_eq!(lp.sum.kind(), Kind::Float);
    let (sum, _) = composite(&logits.to_kind(Kind::Double), &ids, &mask);
    assert_vals(Kind::Float, "S", &vals(&lp.sum), &vals(&sum));
    Ok(())
}

#[test]
fn seq_logps_masked_rows_are_never_read() -> Result<()> {
    let (logits, ids, _) = random_batch(3, 2, 5, 7, Kind::Double);
    let mask = ti(&[0, 1, 1, 0, 0, 0, 0, 1, 1, 1]).view([2, 5]);
    // Rows whose next token is not scored: (0,2), (0,3), (0,4), (1,0), (1,4). Poison them.
    let poisoned = logits.copy();
    for (b, t) in [(0, 2), (0, 3), (0, 4), (1, 0), (1, 4)] {
        let _ = poisoned.get(b).get(t).fill_(f64::NAN);
    }
    let x = poisoned.set_requires_grad(true);
    let lp = seq_logps(&x, &ids, &mask, &SeqLogpsConfig::default())?;
    let clean = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default())?;
    assert_eq!(vals(&lp.sum), vals(&clean.sum));
    lp.sum.sum(Kind::Double).backward();
    let g = x.grad();
    for (b, t) in [(0, 2), (0, 3), (0, 4), (1, 0), (1, 4)] {
        assert_eq!(vals(&g.get(b).get(t)), vec![0.0; 7], "row ({b},{t}) must get exactly 0");
    }
    assert!(vals(&g).iter().all(|v| v.is_finite()));
    Ok(())
}

#[test]
fn seq_logps_bf16_and_f16_equal_the_same_values_in_f32() -> Result<()> {
    for low in [Kind::BFloat16, Kind::Half] {
        let (logits, ids, mask) = random_batch(11, 3, 6, 9, low);
        let a = logits.detach().set_requires_grad(true);
        let b = logits.to_kind(Kind::Float).detach().set_requires_grad(true);
        let la = seq_logps(&a, &ids, &mask, &SeqLogpsConfig::default())?;
        // The same arithmetic on f32 logits is the tch path (the kernel, which `Auto` picks for
        // f32, agrees to rounding; see sequence_kernel.rs).
        let composite = SeqLogpsConfig::default().with_backend(TokenBackend::Composite);
        let lb = seq_logps(&b, &ids, &mask, &composite)?;
        assert_eq!(la.sum.kind(), Kind::Float, "{low:?} is upcast");
        assert_eq!(vals(&la.sum), vals(&lb.sum), "{low:?}: identical values");
        la.sum.sum(Kind::Float).backward();
        lb.sum.sum(Kind::Float).backward();
        assert_eq!(a.grad().kind(), low);
        assert_eq!(
            vals(&a.grad()),
            vals(&b.grad().to_kind(low)),
            "{low:?}: gradient = f32 gradient rounded"
        );
    }
    Ok(())
}

#[test]
fn seq_logps_non_contiguous_logits() -> Result<()> {
    let (logits, ids, mask) = random_batch(5, 3, 6, 8, Kind::Double);
    let nc = logits.transpose(0, 1).contiguous().transpose(0, 1);
    assert!(!nc.is_contiguous());
    let a = seq_logps(&nc, &ids, &mask, &SeqLogpsConfig::default())?;
    let b = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default())?;
    assert_eq!(vals(&a.sum), vals(&b.sum));
    Ok(())
}

#[test]
fn seq_logps_fully_masked_batch_is_zero_with_zero_gradient() -> Result<()> {
    let (logits, ids, _) = random_batch(2, 2, 4, 5, Kind::Double);
    let x = logits.set_requires_grad(true);
    let mask = Tensor::zeros([2, 4], (Kind::Int64, CPU));
    let lp = seq_logps(&x, &ids, &mask, &SeqLogpsConfig::default())?;
    assert_eq!(vals(&lp.sum), vec![0.0, 0.0]);
    assert_eq!(vals(&lp.len), vec![0.0, 0.0]);
    lp.sum.sum(Kind::Double).backward();
    assert!(vals(&x.grad()).iter().all(|&g| g == 0.0));
    assert!(matches!(lp.f_mean(), Err(Error::EmptySequence { index: 0, .. })));
    // Sequence length 1: no scored position at all.
    let one = seq_logps(
        &x.narrow(1, 0, 1),
        &ids.narrow(1, 0, 1),
        &mask.narrow(1, 0, 1),
        &SeqLogpsConfig::default(),
    )?;
    assert_eq!(one.mask.unwrap().size(), vec![2, 0]);
    assert_eq!(vals(&one.sum), vec![0.0, 0.0]);
    Ok(())
}

#[test]
fn seq_logps_validation_errors() -> Result<()> {
    let (logits, ids, mask) = random_batch(1, 2, 4, 5, Kind::Float);
    let cfg = SeqLogpsConfig::default();
    assert!(matches!(
        seq_logps(&logits.view([8, 5]), &ids, &mask, &cfg),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        seq_logps(&logits, &ids.narrow(1, 0, 3), &mask, &cfg),
        Err(Error::ShapeMismatch { .. })
    ));
    assert!(matches!(
        seq_logps(&logits, &ids, &mask.narrow(0, 0, 1), &cfg),
        Err(Error::ShapeMismatch { name: "completion_mask", .. })
    ));
    assert!(matches!(
        seq_logps(&logits.to_kind(Kind::Int64), &ids, &mask, &cfg),
        Err(Error::DtypeMismatch { name: "logits", .. })
    ));
    assert!(matches!(
        seq_logps(&logits, &ids.to_kind(Kind::Float), &mask, &cfg),
        Err(Error::DtypeMismatch { name: "input_ids", .. })
    ));
    assert!(matches!(
        seq_logps(&logits.narrow(2, 0, 1), &ids.zeros_like(), &mask, &cfg),
        Err(Error::VocabTooSmall { vocab: 1, .. })
    ));
    let bad_mask = mask.to_kind(Kind::Float) * 0.5;
    assert!(matches!(seq_logps(&logits, &ids, &bad_mask, &cfg), Err(Error::InvalidInput { .. })));
    // Out-of-range ids at unscored positions are fine (e.g. -100 padding) ...
    let full = ti(&[0, 1, 1, 0, 0, 1, 1, 1]).view([2, 4]);
    let ids2 = ti(&[-100, 2, 3, -100, 4, 1, 0, 2]).view([2, 4]);
    seq_logps(&logits, &ids2, &full, &cfg)?;
    // ... but not at scored ones.
    let ids3 = ti(&[-100, 2, 7, -100, 4, 1, 0, 9]).view([2, 4]);
    match seq_logps(&logits, &ids3, &full, &cfg) {
        Err(Error::LabelOutOfRange { value: 7, index, count: 2, vocab: 5, .. }) => {
            assert_eq!(index, vec![0, 2])
        }
        other => panic!("unexpected {other:?}"),
    }
    Ok(())
}

#[test]
fn seq_logps_non_finite_policy() -> Result<()> {
    let (logits, ids, _) = random_batch(4, 1, 4, 5, Kind::Float);
    let mask = ti(&[0, 1, 1, 1]).view([1, 4]);
    let _ = logits.get(0).get(1).get(3).fill_(f64::NAN);
    match seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default()) {
        Err(Error::NonFiniteLogits { index, count: 1, .. }) => assert_eq!(index, vec![0, 1]),
        other => panic!("unexpected {other:?}"),
    }
    let lp = seq_logps(
        &logits,
        &ids,
        &mask,
        &SeqLogpsConfig::default().with_non_finite(NonFinitePolicy::Propagate),
    )?;
    assert!(vals(&lp.sum)[0].is_nan());
    // A −inf logit off the target is fine (masked vocabulary).
    let (logits, ids, _) = random_batch(4, 1, 4, 5, Kind::Float);
    let target = i64::try_from(ids.get(0).get(2))?;
    let _ = logits.get(0).get(1).get((target + 1) % 5).fill_(f64::NEG_INFINITY);
    let lp = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default())?;
    assert!(vals(&lp.sum)[0].is_finite());
    // A −inf logit on the target gives S = −inf: a typed error naming the position.
    let _ = logits.get(0).get(2).get(i64::try_from(ids.get(0).get(3))?).fill_(f64::NEG_INFINITY);
    match seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default()) {
        Err(Error::NonFinite { index, count: 1, .. }) => assert_eq!(index, vec![0, 2]),
        other => panic!("unexpected {other:?}"),
    }
    // The fused-linear path classifies the same way.
    let hidden = Tensor::randn([1, 4, 3], (Kind::Float, CPU));
    let _ = hidden.get(0).get(2).get(1).fill_(f64::NAN);
    let head = Tensor::randn([5, 3], (Kind::Float, CPU));
    match seq_logps_fused_linear(&hidden, &head, None, &ids, &mask, &FusedLinearConfig::default()) {
        Err(Error::NonFiniteLogits { index, .. }) => assert_eq!(index, vec![0, 2]),
        other => panic!("unexpected {other:?}"),
    }
    Ok(())
}

#[test]
fn seq_logps_token_stats() -> Result<()> {
    let (logits, ids, mask) = random_batch(9, 3, 6, 4, Kind::Double);
    let lp = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default().with_token_stats(true))?;
    let stats = lp.stats.unwrap();
    let m = mask.narrow(1, 1, 5).ne(0);
    let pred = logits.narrow(1, 0, 5).argmax(-1, false);
    let correct = pred.eq_tensor(&ids.narrow(1, 1, 5)).logical_and(&m).sum(Kind::Int64);
    assert_eq!(stats.correct, i64::try_from(&correct)? as f64);
    assert_eq!(stats.scored, i64::try_from(m.sum(Kind::Int64))? as f64);
    let logit_sum = logits
        .narrow(1, 0, 5)
        .sum_dim_intlist([2i64].as_slice(), false, Kind::Double)
        .where_scalarother(&m, 0.0)
        .sum(Kind::Double);
    assert_vals(Kind::Double, "logit sum", &[stats.logit_sum], &[val(&logit_sum)]);
    assert_eq!(stats.logit_count, stats.scored * 4.0);
    Ok(())
}

#[test]
fn seq_logps_restrict_equals_direct_scoring() -> Result<()> {
    let (logits, ids, _) = random_batch(6, 2, 6, 7, Kind::Double);
    let attention = ti(&[1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]).view([2, 6]);
    let completion = ti(&[0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1]).view([2, 6]);
    let cfg = SeqLogpsConfig::default().with_return_per_token(true);
    let all = seq_logps(&logits, &ids, &attention, &cfg)?;
    let restricted = all.f_restrict(&completion)?;
    let direct = seq_logps(&logits, &ids, &completion, &cfg)?;
    assert_vals(Kind::Double, "S", &vals(&restricted.sum), &vals(&direct.sum));
    assert_eq!(vals(&restricted.len), vals(&direct.len));
    // A sub-mask must be a subset.
    let not_subset = ti(&[0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0]).view([2, 6]);
    assert!(matches!(all.f_restrict(&not_subset), Err(Error::InvalidInput { .. })));
    Ok(())
}

#[test]
fn seq_logps_from_sums_validation() {
    let s = t(&[-1.0, -2.0], Kind::Float);
    assert!(matches!(SeqLogps::from_sums(&s, &ti(&[1])), Err(Error::ShapeMismatch { .. })));
    assert!(matches!(SeqLogps::from_sums(&s, &ti(&[1, -1])), Err(Error::InvalidInput { .. })));
    assert!(matches!(
        SeqLogps::from_sums(&s, &t(&[1.0, 1.0], Kind::Float)),
        Err(Error::DtypeMismatch { .. })
    ));
    assert!(matches!(
        SeqLogps::from_sums(&t(&[f64::NAN, 0.0], Kind::Float), &ti(&[1, 1])),
        Err(Error::NonFinite { .. })
    ));
}

#[test]
fn seq_logps_split_and_narrow() -> Result<()> {
    let (logits, ids, mask) = random_batch(8, 4, 5, 6, Kind::Double);
    let lp = seq_logps(&logits, &ids, &mask, &SeqLogpsConfig::default())?;
    let (a, b) = lp.f_split_at(1)?;
    assert_eq!(a.batch_size(), 1);
    assert_eq!(b.batch_size(), 3);
    assert_eq!(vals(&b.sum), vals(&lp.sum)[1..].to_vec());
    assert!(lp.f_narrow(3, 2).is_err());
    Ok(())
}

// ------------------------------------------------------------------ fused-linear path

struct Head {
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor,
    ids: Tensor,
    mask: Tensor,
}

fn head(seed: i64, b: i64, t: i64, h: i64, v: i64, kind: Kind) -> Head {
    tch::manual_seed(seed);
    let opts = (Kind::Double, CPU);
    Head {
        hidden: Tensor::randn([b, t, h], opts).to_kind(kind),
        weight: (Tensor::randn([v, h], opts) * 0.5).to_kind(kind),
        bias: (Tensor::randn([v], opts) * 0.1).to_kind(kind),
        ids: Tensor::randint(v, [b, t], (Kind::Int64, CPU)),
        mask: Tensor::randint(2, [b, t], (Kind::Int64, CPU)),
    }
}

/// A downstream loss that couples sequences (DPO over the two halves) and uses per-token
/// values, so the upstream gradient differs per row.
fn downstream(lp: &SeqLogps, w_tok: &Tensor) -> Result<Tensor> {
    let b = lp.batch_size();
    let (c, r) = lp.f_split_at(b / 2)?;
    let zeros = Tensor::zeros([b / 2], (lp.sum.kind(), CPU));
    let dpo = dpo_loss(&c, &r, &zeros, &zeros, &DpoConfig::default().with_beta(0.5))?;
    let tok = (lp.per_token.as_ref().unwrap() * w_tok).sum(lp.sum.kind());
    Ok(dpo.loss + tok)
}

fn fused_vs_full(kind: Kind, chunk: Option<usize>, with_bias: bool, tol: f64) -> Result<()> {
    let hd = head(21, 4, 7, 6, 13, kind);
    let w_tok = Tensor::randn([4, 6], (kind, CPU));
    // Full-logits path with autograd.
    let (h1, w1, b1) = (
        hd.hidden.detach().set_requires_grad(true),
        hd.weight.detach().set_requires_grad(true),
        hd.bias.detach().set_requires_grad(true),
    );
    let mut logits = h1.matmul(&w1.tr());
    if with_bias {
        logits += &b1;
    }
    let cfg = SeqLogpsConfig::default().with_return_per_token(true);
    let full = seq_logps(&logits, &hd.ids, &hd.mask, &cfg)?;
    let l_full = downstream(&full, &w_tok)?;
    l_full.backward();
    // Fused path.
    let (h2, w2, b2) = (
        hd.hidden.detach().set_requires_grad(true),
        hd.weight.detach().set_requires_grad(true),
        hd.bias.detach().set_requires_grad(true),
    );
    let fcfg = match chunk {
        Some(c) => FusedLinearConfig::default().with_chunk_rows(c),
        None => FusedLinearConfig::default(),
    };
    let fl = seq_logps_fused_linear(&h2, &w2, with_bias.then_some(&b2), &hd.ids, &hd.mask, &fcfg)?;
    let l_fused = downstream(fl.logps(), &w_tok)?;
    let out = fl.f_attach(&l_fused)?;
    assert!((val(&out) - val(&l_full)).abs() <= tol, "loss {} vs {}", val(&out), val(&l_full));
    out.backward();
    let close = |what: &str, a: &Tensor, b: &Tensor| {
        let (a, b) = (vals(a), vals(b));
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!((x - y).abs() <= tol * y.abs().max(1.0), "{what}[{i}]: {x} vs {y}");
        }
    };
    close("S", &fl.logps().sum, &full.sum);
    close("dh", &h2.grad(), &h1.grad());
    close("dW", &w2.grad(), &w1.grad());
    if with_bias {
        close("db", &b2.grad(), &b1.grad());
    } else {
        assert!(!b2.grad().defined());
    }
    Ok(())
}

#[test]
fn fused_linear_matches_full_logits_f64_chunked() -> Result<()> {
    for chunk in [Some(1), Some(3), Some(5), Some(1000), None] {
        fused_vs_full(Kind::Double, chunk, true, 1e-10)?;
    }
    fused_vs_full(Kind::Double, Some(4), false, 1e-10)
}

#[test]
fn fused_linear_matches_full_logits_f32() -> Result<()> {
    fused_vs_full(Kind::Float, Some(4), true, 1e-5)
}

#[test]
fn fused_linear_bf16_head_accumulates_in_f32() -> Result<()> {
    let hd = head(5, 2, 5, 8, 11, Kind::BFloat16);
    let h = hd.hidden.detach().set_requires_grad(true);
    let w = hd.weight.detach().set_requires_grad(true);
    let fl =
        seq_logps_fused_linear(&h, &w, None, &hd.ids, &hd.mask, &FusedLinearConfig::default())?;
    assert_eq!(fl.logps().sum.kind(), Kind::Float);
    // Same values as the f32 path on the upcast operands.
    let logits = hd.hidden.to_kind(Kind::Float).matmul(&hd.weight.to_kind(Kind::Float).tr());
    let full = seq_logps(&logits, &hd.ids, &hd.mask, &SeqLogpsConfig::default())?;
    assert_vals(Kind::Float, "S", &vals(&fl.logps().sum), &vals(&full.sum));
    let loss = fl.logps().sum.sum(Kind::Float);
    fl.f_attach(&loss)?.backward();
    assert_eq!(w.grad().kind(), Kind::BFloat16);
    assert_eq!(h.grad().kind(), Kind::BFloat16);
    Ok(())
}

#[test]
fn fused_linear_drops_masked_rows_and_ignores_their_values() -> Result<()> {
    let hd = head(13, 2, 5, 4, 9, Kind::Double);
    let mask = ti(&[0, 0, 1, 1, 0, 0, 1, 0, 0, 1]).view([2, 5]);
    // Scored rows: (0,1), (0,2), (1,0), (1,3). Poison every other row of the hidden states.
    let poisoned = hd.hidden.copy();
    for (b, t) in [(0, 0), (0, 3), (0, 4), (1, 1), (1, 2), (1, 4)] {
        let _ = poisoned.get(b).get(t).fill_(f64::NAN);
    }
    let h = poisoned.set_requires_grad(true);
    let w = hd.weight.detach().set_requires_grad(true);
    let fl = seq_logps_fused_linear(
        &h,
        &w,
        None,
        &hd.ids,
        &mask,
        &FusedLinearConfig::default().with_chunk_rows(3),
    )?;
    let clean =
        seq_logps(&hd.hidden.matmul(&hd.weight.tr()), &hd.ids, &mask, &SeqLogpsConfig::default())?;
    assert_vals(Kind::Double, "S", &vals(&fl.logps().sum), &vals(&clean.sum));
    let loss = fl.logps().sum.sum(Kind::Double);
    fl.f_attach(&loss)?.backward();
    let g = h.grad();
    for (b, t) in [(0, 0), (0, 3), (0, 4), (1, 1), (1, 2), (1, 4)] {
        assert_eq!(vals(&g.get(b).get(t)), vec![0.0; 4]);
    }
    assert!(vals(&w.grad()).iter().all(|x| x.is_finite()));
    Ok(())
}

#[test]
fn fused_linear_attach_is_a_no_op_without_dependence_or_grad() -> Result<()> {
    let hd = head(3, 2, 4, 3, 5, Kind::Double);
    // No parameter requires grad: no leaf, attach returns the loss.
    let fl = seq_logps_fused_linear(
        &hd.hidden,
        &hd.weight,
        None,
        &hd.ids,
        &hd.mask,
        &FusedLinearConfig::default(),
    )?;
    let x = Tensor::ones([1], (Kind::Double, CPU)).set_requires_grad(true);
    let l = (&x * 2.0).sum(Kind::Double);
    assert_eq!(val(&fl.f_attach(&l)?), 2.0);
    // The loss does not use the log-probs: returned unchanged.
    let w = hd.weight.detach().set_requires_grad(true);
    let fl = seq_logps_fused_linear(
        &hd.hidden,
        &w,
        None,
        &hd.ids,
        &hd.mask,
        &FusedLinearConfig::default(),
    )?;
    let out = fl.f_attach(&l)?;
    out.backward();
    assert!(!w.grad().defined());
    assert!(matches!(fl.f_attach(&x.view([1, 1]).repeat([2, 1])), Err(Error::InvalidInput { .. })));
    Ok(())
}

#[test]
fn fused_linear_chunk_size_rule() {
    let cfg = FusedLinearConfig::default();
    assert_eq!(cfg.resolve_chunk(50257, 2048), 256);
    assert_eq!(cfg.resolve_chunk(128256, 4096), 128);
    assert_eq!(cfg.resolve_chunk(1000, 4096), 1024);
    assert_eq!(cfg.resolve_chunk(50257, 10), 10);
    assert_eq!(cfg.clone().with_chunk_rows(7).resolve_chunk(50257, 100), 7);
}

#[test]
fn fused_linear_validation_errors() {
    let hd = head(1, 2, 4, 3, 5, Kind::Float);
    let cfg = FusedLinearConfig::default();
    assert!(matches!(
        seq_logps_fused_linear(&hd.hidden, &hd.weight.tr(), None, &hd.ids, &hd.mask, &cfg),
        Err(Error::ShapeMismatch { name: "lm_head", .. })
    ));
    assert!(matches!(
        seq_logps_fused_linear(
            &hd.hidden,
            &hd.weight,
            Some(&hd.bias.narrow(0, 0, 2)),
            &hd.ids,
            &hd.mask,
            &cfg
        ),
        Err(Error::ShapeMismatch { name: "bias", .. })
    ));
    let ids = hd.ids.fill(9);
    assert!(matches!(
        seq_logps_fused_linear(&hd.hidden, &hd.weight, None, &ids, &hd.mask.ones_like(), &cfg),
        Err(Error::LabelOutOfRange { .. })
    ));
}
