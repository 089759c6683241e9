//! The tensor bridge: zero-copy views, counted copies, and gradient injection that behaves in
//! autograd exactly like the torch-op composite, in f64 and f32, under random per-row upstream
//! weights (the `Reduction::None` path), loss scaling and gradient accumulation.

use amend_kernels::{
    KlValue, LogitsIo, SelectedLogpConfig, SelectedLogpOut, TntKernelConfig, TntVariant,
    selected_logp, tnt,
};
use amend_losses::bridge::{
    CpuBuf, CpuSlice, FusedRows, Sanitize, copies_made, fused_rows, inject_rows, inject_sum,
};
use amend_losses::{Error, Result};
use tch::{Device, Kind, Tensor};

const B: i64 = 3;
const T: i64 = 4;
const V: i64 = 11;

fn seeded(seed: i64, shape: &[i64], kind: Kind) -> Tensor {
    tch::manual_seed(seed);
    (Tensor::randn(shape, (Kind::Double, Device::Cpu)) * 2.0).to_kind(kind)
}

fn labels() -> Tensor {
    tch::manual_seed(7);
    Tensor::randint(V, [B, T], (Kind::Int64, Device::Cpu))
}

/// Token weights in {−1, 0, +1} with all three present.
fn token_weights() -> Tensor {
    Tensor::from_slice(&[-1.0f32, 1.0, 0.0, 1.0, 1.0, -1.0, -1.0, 0.0, 1.0, 1.0, -1.0, 1.0])
        .reshape([B, T])
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    f64::try_from((a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max()).unwrap()
}

/// The torch-op composite of a TNT variant, per token (no fused kernel anywhere): masked
/// log-softmax target, forward CE or reverse KL, sign-selected with `where`.
fn tnt_composite(
    z: &Tensor,
    zr: &Tensor,
    y: &Tensor,
    w: &Tensor,
    variant: TntVariant,
    alpha: f64,
    eps: f64,
) -> Tensor {
    let kind = z.kind();
    let logp = z.log_softmax(-1, kind);
    let p = logp.exp();
    let onehot = y.one_hot(V).to_kind(Kind::Bool);
    let zr = zr.to_kind(kind);
    let q_neg = zr.masked_fill(&onehot, f64::NEG_INFINITY).softmax(-1, kind);
    let q_pos = zr.softmax(-1, kind);
    let ce = |q: &Tensor| -(q * &logp).sum_dim_intlist(-1, false, kind);
    let smooth = |q: &Tensor| (q + eps) / (1.0 + V as f64 * eps);
    let rkl = |d: &Tensor| (&p * (&logp - d.log())).sum_dim_intlist(-1, false, kind);
    let (neg, pos) = match variant {
        TntVariant::Tnff => (ce(&q_neg), ce(&q_pos)),
        TntVariant::Tnrr => (rkl(&smooth(&q_neg)), rkl(&smooth(&q_pos))),
        TntVariant::Tnrf => (rkl(&smooth(&q_neg)), ce(&smooth(&q_pos))),
        _ => unreachable!("not used here"),
    };
    let w = w.to_kind(kind);
    let zero = neg.zeros_like();
    (neg * alpha).where_self(&w.lt(0.0), &pos.where_self(&w.gt(0.0), &zero))
}

/// The fused path: kernel on tensors, injected per row.
fn tnt_fused(
    z: &Tensor,
    zr: &Tensor,
    y: &Tensor,
    w: &Tensor,
    cfg: &TntKernelConfig,
) -> Result<(Tensor, FusedRows)> {
    let zr_v = CpuSlice::<f32>::new(zr, "test", "ref_logits")?;
    let y_v = CpuSlice::<i64>::strict(y, "test", "labels")?;
    let w_v = CpuSlice::<f32>::new(w, "test", "weights")?;
    let fused = fused_rows(z, "test", z.requires_grad(), |io, vocab, loss| {
        tnt(io, vocab, Some(zr_v.as_slice()), y_v.as_slice(), w_v.as_slice(), cfg, loss)
    })?;
    let out = inject_rows(z, &fused.values, fused.grad.as_ref(), Sanitize::None)?;
    Ok((out, fused))
}

#[test]
fn views_are_zero_copy_for_contiguous_cpu_f32() -> Result<()> {
    let t = seeded(1, &[B, T, V], Kind::Float);
    let before = copies_made();
    let v = CpuSlice::<f32>::strict(&t, "test", "logits")?;
    assert_eq!(v.as_slice().as_ptr() as usize, t.data_ptr() as usize);
    assert_eq!(v.len(), (B * T * V) as usize);
    assert!(!v.was_copied());
    let v2 = CpuSlice::<f32>::new(&t, "test", "logits")?;
    assert_eq!(v2.as_slice().as_ptr() as usize, t.data_ptr() as usize);
    assert_eq!(v.as_slice(), Vec::<f32>::try_from(t.flatten(0, -1))?.as_slice());
    // Views of tensors that require grad read the same storage.
    let r = t.set_requires_grad(true);
    assert_eq!(
        CpuSlice::<f32>::strict(&r, "test", "logits")?.as_slice().as_ptr() as usize,
        r.data_ptr() as usize
    );
    let _ = before;
    Ok(())
}

#[test]
fn strict_views_reject_dtype_layout_and_device() {
    let d = seeded(1, &[2, 3], Kind::Double);
    assert!(matches!(
        CpuSlice::<f32>::strict(&d, "op", "logits"),
        Err(Error::DtypeMismatch { op: "op", name: "logits", got: Kind::Double, .. })
    ));
    let f = seeded(1, &[2, 3], Kind::Float).tr();
    assert!(!f.is_contiguous());
    match CpuSlice::<f32>::strict(&f, "op", "logits") {
        Err(Error::InvalidInput { reason, .. }) => {
            assert!(reason.contains("not contiguous"), "{reason}")
        }
        other => panic!("{:?}", other.err()),
    }
    if tch::Cuda::is_available() {
        let g = f.to_device(Device::Cuda(0));
        assert!(matches!(
            CpuSlice::<f32>::new(&g, "op", "logits"),
            Err(Error::InvalidInput { .. })
        ));
    }
    let y = Tensor::from_slice(&[1i32, 2]);
    assert!(matches!(
        CpuSlice::<i64>::strict(&y, "op", "labels"),
        Err(Error::DtypeMismatch { .. })
    ));
}

#[test]
fn converting_views_copy_and_count() -> Result<()> {
    let d = seeded(2, &[2, 3], Kind::Double);
    let before = copies_made();
    let v = CpuSlice::<f32>::new(&d, "op", "logits")?;
    assert!(v.was_copied());
    let expected: Vec<f32> =
        Vec::<f64>::try_from(d.flatten(0, -1))?.iter().map(|&x| x as f32).collect();
    assert_eq!(v.as_slice(), expected.as_slice());
    let nc = seeded(3, &[3, 2], Kind::Float).tr();
    let w = CpuSlice::<f32>::new(&nc, "op", "logits")?;
    assert!(w.was_copied());
    assert_eq!(w.as_slice(), Vec::<f32>::try_from(nc.contiguous().flatten(0, -1))?.as_slice());
    assert!(copies_made() >= before + 2, "copies are counted");
    // Empty tensors give empty slices.
    let e = Tensor::zeros([0, 5], (Kind::Float, Device::Cpu));
    assert!(CpuSlice::<f32>::strict(&e, "op", "logits")?.is_empty());
    Ok(())
}

#[test]
fn cpu_buffers_hand_kernel_outputs_to_libtorch() -> Result<()> {
    let mut b = CpuBuf::empty(&[2, 3])?;
    b.as_mut_slice().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(b.as_slice()[4], 5.0);
    let t = b.into_tensor();
    assert_eq!(t.size(), vec![2, 3]);
    assert_eq!(Vec::<f32>::try_from(t.flatten(0, -1))?, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(Vec::<f32>::try_from(CpuBuf::zeros(&[4])?.into_tensor())?, vec![0.0; 4]);
    Ok(())
}

/// Per-row injection under random per-token upstream weights matches autograd through the
/// composite, in f64 and f32 logits, for forward and reverse TNT variants.
#[test]
fn injected_gradients_match_composite_under_per_token_weights() -> Result<()> {
    let y = labels();
    let w = token_weights();
    for kind in [Kind::Double, Kind::Float] {
        for (variant, alpha, eps) in [
            (TntVariant::Tnff, 2.0, 1e-6),
            (TntVariant::Tnrr, 0.5, 1e-3),
            (TntVariant::Tnrf, 1.0, 1e-6),
        ] {
            let cfg = TntKernelConfig::new(variant).with_alpha(alpha).with_smoothing_eps(eps);
            let z0 = seeded(11, &[B, T, V], kind);
            let zr = seeded(12, &[B, T, V], kind);
            let upstream = seeded(13, &[B, T], kind); // random per-token weights after Reduction::None

            let z = z0.detach().set_requires_grad(true);
            let (out, fused) = tnt_fused(&z, &zr, &y, &w, &cfg)?;
            assert_eq!(out.kind(), kind);
            assert_eq!(out.size(), vec![B, T]);
            (&out * &upstream).sum(kind).backward();

            let zc = z0.detach().set_requires_grad(true);
            let comp = tnt_composite(&zc, &zr, &y, &w, variant, alpha, eps);
            (&comp * &upstream).sum(kind).backward();

            let tag = format!("{variant:?} {kind:?}");
            assert!(
                max_abs_diff(&out, &comp) < 2e-5,
                "{tag}: values differ by {}",
                max_abs_diff(&out, &comp)
            );
            assert!(
                max_abs_diff(&out, &fused.values) == 0.0,
                "{tag}: injected value must equal the kernel's"
            );
            let dg = max_abs_diff(&z.grad(), &zc.grad());
            assert!(dg < 5e-6, "{tag}: gradients differ by {dg}");
            assert_eq!(fused.stats.count, 10);
        }
    }
    Ok(())
}

/// Loss scaling, a mean over the active count, and gradient accumulation over two backward calls
/// (two micro-batches) agree with the composite.
#[test]
fn loss_scaling_and_gradient_accumulation_match_composite() -> Result<()> {
    let y = labels();
    let w = token_weights();
    let cfg = TntKernelConfig::new(TntVariant::Tnff).with_alpha(1.5);
    let z0 = seeded(21, &[B, T, V], Kind::Double);
    let zr = seeded(22, &[B, T, V], Kind::Double);
    let z = z0.detach().set_requires_grad(true);
    let zc = z0.detach().set_requires_grad(true);
    let n = 10.0; // active tokens
    for (mb, scale) in [(0i64, 3.5), (1, -0.25)] {
        // Micro-batch `mb` is sequence mb of the batch; normalise by the global count, scale.
        let (zs, ys, ws, rs) =
            (z.narrow(0, mb, 1), y.narrow(0, mb, 1), w.narrow(0, mb, 1), zr.narrow(0, mb, 1));
        let (out, _) = tnt_fused(&zs, &rs.contiguous(), &ys.contiguous(), &ws.contiguous(), &cfg)?;
        (out.sum(Kind::Double) * (scale / n)).backward();
        let zcs = zc.narrow(0, mb, 1);
        let comp = tnt_composite(&zcs, &rs, &ys, &ws, TntVariant::Tnff, 1.5, 1e-6);
        (comp.sum(Kind::Double) * (scale / n)).backward();
    }
    let dg = max_abs_diff(&z.grad(), &zc.grad());
    assert!(dg < 2e-6, "accumulated gradients differ by {dg}");
    // Rows of the third sequence never took part: exactly zero gradient.
    assert_eq!(f64::try_from(z.grad().narrow(0, 2, 1).abs().sum(Kind::Double))?, 0.0);
    Ok(())
}

/// The scalar surrogate (`dot`) gives the same value and gradient as summing the per-row one.
#[test]
fn scalar_injection_matches_row_injection() -> Result<()> {
    let y = labels();
    let w = token_weights();
    let cfg = TntKernelConfig::new(TntVariant::Tnff).with_alpha(1.0);
    let z0 = seeded(31, &[B, T, V], Kind::Float);
    let zr = seeded(32, &[B, T, V], Kind::Float);
    let a = z0.detach().set_requires_grad(true);
    let (rows, _) = tnt_fused(&a, &zr, &y, &w, &cfg)?;
    rows.sum(Kind::Float).backward();
    let b = z0.detach().set_requires_grad(true);
    let zr_v = CpuSlice::<f32>::new(&zr, "t", "zr")?;
    let y_v = CpuSlice::<i64>::strict(&y, "t", "y")?;
    let w_v = CpuSlice::<f32>::new(&w, "t", "w")?;
    let fused = fused_rows(&b, "t", true, |io, vocab, loss| {
        tnt(io, vocab, Some(zr_v.as_slice()), y_v.as_slice(), w_v.as_slice(), &cfg, loss)
    })?;
    let total = Tensor::from(fused.stats.sum as f32);
    let s = inject_sum(&b, &total, fused.grad.as_ref(), Sanitize::None)?;
    assert!((f64::try_from(&s)? - f64::try_from(rows.sum(Kind::Float))?).abs() < 1e-4);
    s.backward();
    assert!(max_abs_diff(&a.grad(), &b.grad()) < 1e-6);
    Ok(())
}

/// NaN and ±inf at inactive rows never reach the injected output or the gradient
/// (token-losses §1.4, T-MASK), with the cheap row-select sanitising.
#[test]
fn inactive_rows_with_nan_stay_out_of_the_graph() -> Result<()> {
    let y = labels();
    let w = token_weights(); // rows 2 and 7 are inactive
    let cfg = TntKernelConfig::new(TntVariant::Tnff).with_alpha(1.0);
    let z0 = seeded(41, &[B * T, V], Kind::Float);
    let _ = z0.narrow(0, 2, 1).fill_(f64::NAN);
    let _ = z0.narrow(0, 7, 1).fill_(f64::INFINITY);
    let z0 = z0.reshape([B, T, V]);
    let zr = seeded(42, &[B, T, V], Kind::Float);
    let z = z0.detach().set_requires_grad(true);
    let zr_v = CpuSlice::<f32>::new(&zr, "t", "zr")?;
    let y_v = CpuSlice::<i64>::strict(&y, "t", "y")?;
    let w_v = CpuSlice::<f32>::new(&w, "t", "w")?;
    let fused = fused_rows(&z, "t", true, |io, vocab, loss| {
        tnt(io, vocab, Some(zr_v.as_slice()), y_v.as_slice(), w_v.as_slice(), &cfg, loss)
    })?;
    let active = w.ne(0.0);
    let out = inject_rows(&z, &fused.values, fused.grad.as_ref(), Sanitize::InactiveRows(&active))?;
    assert!(bool::try_from(out.isfinite().all())?);
    assert_eq!(f64::try_from(out.reshape([-1]).get(2))?, 0.0);
    (&out * seeded(43, &[B, T], Kind::Float)).sum(Kind::Float).backward();
    let g = z.grad();
    assert!(bool::try_from(g.isfinite().all())?);
    assert_eq!(f64::try_from(g.reshape([B * T, V]).narrow(0, 2, 1).abs().sum(Kind::Double))?, 0.0);
    // Without sanitising, the NaN row poisons the value (which is why the option exists).
    let bad = inject_rows(&z, &fused.values, fused.grad.as_ref(), Sanitize::None)?;
    assert!(!bool::try_from(bad.isfinite().all())?);
    Ok(())
}

/// `−inf` logits inside active rows (a masked vocabulary) need the full sanitising; the kernel
/// reports them, and the result matches the composite.
#[test]
fn masked_vocabulary_with_full_sanitising_matches_composite() -> Result<()> {
    let labels = Tensor::from_slice(&[0i64, 3]);
    let z0 = Tensor::from_slice(&[
        2.0f64,
        1.0,
        f64::NEG_INFINITY,
        0.5,
        -1.0,
        0.3,
        0.2,
        f64::NEG_INFINITY,
        1.0,
        0.0,
    ])
    .reshape([2, 5]);
    let z = z0.detach().set_requires_grad(true);
    let y = CpuSlice::<i64>::strict(&labels, "t", "y")?;
    let cfg = SelectedLogpConfig::default();
    let fused = fused_rows(&z, "t", true, |io, vocab, loss| {
        selected_logp(io, vocab, y.as_slice(), None, &cfg, SelectedLogpOut::new(loss))
    })?;
    assert_eq!(fused.stats.masked_vocab_rows, 2);
    let out = inject_rows(&z, &fused.values, fused.grad.as_ref(), Sanitize::Full)?;
    let up = Tensor::from_slice(&[0.7f64, -1.3]);
    (&out * &up).sum(Kind::Double).backward();
    let zc = z0.detach().set_requires_grad(true);
    let comp =
        -zc.log_softmax(-1, Kind::Double).gather(-1, &labels.unsqueeze(-1), false).squeeze_dim(-1);
    (&comp * &up).sum(Kind::Double).backward();
    assert!(max_abs_diff(&out, &comp) < 1e-5);
    assert!(max_abs_diff(&z.grad(), &zc.grad()) < 1e-6);
    let g: Vec<f64> = Vec::try_from(z.grad().flatten(0, -1))?;
    assert_eq!((g[2], g[7]), (0.0, 0.0));
    Ok(())
}

/// Without `requires_grad` (reference passes, evaluation) no gradient is computed and the result
/// carries no graph; bf16 logits are converted (one counted copy) and keep their dtype.
#[test]
fn value_only_and_converted_dtypes() -> Result<()> {
    let y = labels();
    let w = token_weights();
    let cfg = TntKernelConfig::new(TntVariant::Tnff).with_forward_value(KlValue::Divergence);
    let z = seeded(51, &[B, T, V], Kind::Float);
    let zr = seeded(52, &[B, T, V], Kind::Float);
    let (out, fused) = tnt_fused(&z, &zr, &y, &w, &cfg)?;
    assert!(fused.grad.is_none());
    assert!(!out.requires_grad());
    let zb = z.to_kind(Kind::BFloat16).set_requires_grad(true);
    let before = copies_made();
    let (outb, fb) = tnt_fused(&zb, &zr, &y, &w, &cfg)?;
    assert!(copies_made() > before);
    assert_eq!(outb.kind(), Kind::BFloat16);
    assert!(fb.grad.is_some());
    outb.sum(Kind::Float).backward();
    assert_eq!(zb.grad().kind(), Kind::BFloat16);
    Ok(())
}

#[test]
fn injection_checks_shapes() -> Result<()> {
    let z = seeded(61, &[2, 3], Kind::Float);
    let g = Tensor::zeros([2, 4], (Kind::Float, Device::Cpu));
    let v = Tensor::zeros([2], (Kind::Float, Device::Cpu));
    assert!(matches!(
        inject_rows(&z, &v, Some(&g), Sanitize::None),
        Err(Error::ShapeMismatch { name: "grad", .. })
    ));
    let v3 = Tensor::zeros([3], (Kind::Float, Device::Cpu));
    assert!(matches!(
        inject_rows(&z, &v3, None, Sanitize::None),
        Err(Error::ShapeMismatch { name: "value", .. })
    ));
    assert!(matches!(
        inject_sum(&z, &v, None, Sanitize::None),
        Err(Error::ShapeMismatch { name: "value", .. })
    ));
    // Kernel errors surface as `Error::Kernel`.
    let bad = Tensor::from_slice(&[f32::NAN, 0.0]).reshape([1, 2]);
    let r = fused_rows(&bad, "t", false, |io, vocab, loss| {
        selected_logp(
            io,
            vocab,
            &[0],
            None,
            &SelectedLogpConfig::default(),
            SelectedLogpOut::new(loss),
        )
    });
    assert!(matches!(r, Err(Error::Kernel(amend_kernels::KernelError::NonFiniteRow { .. }))));
    let _ = LogitsIo::value(&[]);
    Ok(())
}
