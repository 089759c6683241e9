//! `tnt_with_stats`: the per-row diagnostics against an f64 oracle, for every variant, buffer
//! mode and thread count, with `−inf` logits (a masked row vocabulary) and ties; the loss and
//! gradient are bitwise those of `tnt`.
//!
//! `ProptestConfig::with_cases(64)` by default; set `PROPTEST_CASES` for more.

use amend_kernels::{
    KernelError, LogitsIo, TntKernelConfig, TntRowStats, TntVariant, tnt, tnt_with_stats,
};
use proptest::prelude::*;

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
    ProptestConfig::with_cases(cases)
}

#[derive(Debug, Clone)]
struct Case {
    vocab: usize,
    z: Vec<f32>,
    zr: Vec<f32>,
    labels: Vec<i64>,
    weights: Vec<f32>,
    variant: TntVariant,
}

fn logit(neg_inf_weight: u32) -> impl Strategy<Value = f32> {
    prop_oneof![
        12 => (-10i32..=10).prop_map(|v| v as f32 * 0.5),
        neg_inf_weight => Just(f32::NEG_INFINITY),
    ]
}

fn case() -> impl Strategy<Value = Case> {
    let variant = prop_oneof![
        Just(TntVariant::Tnff),
        Just(TntVariant::Tnrr),
        Just(TntVariant::Tnrf),
        Just(TntVariant::Tnfll),
        Just(TntVariant::Tnrll),
        Just(TntVariant::Nl { threshold: None }),
        Just(TntVariant::UlAnnotated),
    ];
    (2usize..=48, 1usize..=6, variant).prop_flat_map(|(vocab, rows, variant)| {
        let n = vocab * rows;
        (
            prop::collection::vec(logit(2), n),
            prop::collection::vec(logit(1), n),
            prop::collection::vec(prop_oneof![Just(0usize), Just(vocab - 1), 0..vocab], rows),
            prop::collection::vec(prop_oneof![Just(-1.0f32), Just(0.0), Just(1.0)], rows),
        )
            .prop_map(move |(mut z, mut zr, labels, weights)| {
                for (r, &y) in labels.iter().enumerate() {
                    // The label and one other column stay finite in both, so that every target
                    // (with or without the label) has mass on the row vocabulary.
                    let other = (y + 1) % vocab;
                    for c in [y, other] {
                        let i = r * vocab + c;
                        if !z[i].is_finite() {
                            z[i] = 1.0;
                        }
                        if !zr[i].is_finite() {
                            zr[i] = -1.0;
                        }
                    }
                }
                Case {
                    vocab,
                    z,
                    zr,
                    labels: labels.into_iter().map(|y| y as i64).collect(),
                    weights,
                    variant,
                }
            })
    })
}

/// The f64 oracle of one row: everything over the support of `z`.
fn oracle_row(z: &[f32], zr: &[f32], y: usize, neg: bool) -> TntRowStats {
    let sup: Vec<usize> = (0..z.len()).filter(|&v| z[v] > f32::NEG_INFINITY).collect();
    let lse = |x: &[f32], idx: &[usize]| {
        let m = idx.iter().map(|&v| f64::from(x[v])).fold(f64::NEG_INFINITY, f64::max);
        m + idx.iter().map(|&v| (f64::from(x[v]) - m).exp()).sum::<f64>().ln()
    };
    let first_max = |x: &[f32], idx: &[usize]| {
        let m = idx.iter().map(|&v| x[v]).fold(f32::NEG_INFINITY, f32::max);
        idx.iter().copied().find(|&v| x[v] == m).unwrap() as i64
    };
    let l = lse(z, &sup);
    let ref_full = lse(zr, &sup);
    let tgt: Vec<usize> = sup.iter().copied().filter(|&v| !(neg && v == y)).collect();
    let lt = lse(zr, &tgt);
    let kl: f64 = tgt
        .iter()
        .filter(|&&v| zr[v] > f32::NEG_INFINITY)
        .map(|&v| {
            let log_t = f64::from(zr[v]) - lt;
            log_t.exp() * (log_t - (f64::from(z[v]) - l))
        })
        .sum();
    TntRowStats {
        logp_y: (f64::from(z[y]) - l) as f32,
        ref_logp_y: (f64::from(zr[y]) - ref_full) as f32,
        kl: kl as f32,
        argmax: first_max(z, &sup),
        ref_argmax: first_max(zr, &sup),
    }
}

fn close(a: f32, b: f32, tol: f32) -> bool {
    (a == b) || (a - b).abs() <= tol * (1.0 + b.abs())
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Value,
    Grad,
    InPlace,
}

/// Loss, gradient (empty for value-only calls) and statistics of one call.
type Outputs = (Vec<f32>, Vec<f32>, Vec<TntRowStats>);

/// Runs `tnt_with_stats` in `mode`.
fn run(c: &Case, mode: Mode, threads: usize) -> Result<Outputs, KernelError> {
    let rows = c.labels.len();
    let cfg = TntKernelConfig::new(c.variant).with_alpha(1.5).with_threads(threads);
    let (mut loss, mut stats) = (vec![0.0f32; rows], vec![TntRowStats::INACTIVE; rows]);
    let mut grad = vec![0.0f32; c.z.len()];
    let mut inplace = c.z.clone();
    let io = match mode {
        Mode::Value => LogitsIo::value(&c.z),
        Mode::Grad => LogitsIo::grad(&c.z, &mut grad),
        Mode::InPlace => LogitsIo::in_place(&mut inplace),
    };
    tnt_with_stats(io, c.vocab, &c.zr, &c.labels, &c.weights, &cfg, &mut loss, &mut stats)?;
    let g = match mode {
        Mode::Value => vec![],
        Mode::Grad => grad,
        Mode::InPlace => inplace,
    };
    Ok((loss, g, stats))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn stats_match_the_oracle_in_every_mode(c in case()) {
        let v = c.vocab;
        for mode in [Mode::Value, Mode::Grad, Mode::InPlace] {
            let (_, _, stats) = run(&c, mode, 1).expect("valid inputs");
            for (r, st) in stats.iter().enumerate() {
                let w = c.weights[r];
                if w == 0.0 {
                    prop_assert_eq!(*st, TntRowStats::INACTIVE);
                    continue;
                }
                let o = oracle_row(
                    &c.z[r * v..(r + 1) * v],
                    &c.zr[r * v..(r + 1) * v],
                    c.labels[r] as usize,
                    w < 0.0,
                );
                let what = format!("{mode:?} row {r}: {st:?} vs oracle {o:?}");
                prop_assert_eq!(st.argmax, o.argmax, "{}", what);
                prop_assert_eq!(st.ref_argmax, o.ref_argmax, "{}", what);
                prop_assert!(close(st.logp_y, o.logp_y, 1e-5), "{}", what);
                prop_assert!(close(st.ref_logp_y, o.ref_logp_y, 1e-5), "{}", what);
                prop_assert!((st.kl - o.kl).abs() <= 2e-5 * (1.0 + o.kl.abs()), "{}", what);
            }
        }
    }

    #[test]
    fn loss_and_gradient_are_those_of_tnt_and_threads_agree(c in case()) {
        let rows = c.labels.len();
        let cfg = TntKernelConfig::new(c.variant).with_alpha(1.5);
        let (mut loss, mut grad) = (vec![0.0f32; rows], vec![0.0f32; c.z.len()]);
        let plain = tnt(
            LogitsIo::grad(&c.z, &mut grad), c.vocab, Some(&c.zr), &c.labels, &c.weights, &cfg,
            &mut loss,
        ).expect("valid inputs");
        let (l1, g1, s1) = run(&c, Mode::Grad, 1).expect("valid inputs");
        let (l2, g2, s2) = run(&c, Mode::Grad, 3).expect("valid inputs");
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(&l1), bits(&loss));
        prop_assert_eq!(bits(&g1), bits(&grad));
        prop_assert_eq!(bits(&l2), bits(&loss));
        prop_assert_eq!(bits(&g2), bits(&grad));
        prop_assert_eq!(s1, s2);
        let sum: f64 = l1.iter().map(|&x| f64::from(x)).sum();
        prop_assert_eq!(sum, plain.sum);
    }
}

#[test]
fn errors_reset_the_stats_and_name_the_buffer() {
    let z = [1.0f32, f32::NAN, 0.0, 2.0];
    let zr = [0.0f32; 4];
    let cfg = TntKernelConfig::new(TntVariant::Tnff);
    let mut loss = [0.0f32; 2];
    let mut stats = [TntRowStats { kl: 7.0, ..TntRowStats::INACTIVE }; 2];
    let err = tnt_with_stats(
        LogitsIo::value(&z),
        2,
        &zr,
        &[0, 1],
        &[-1.0, 1.0],
        &cfg,
        &mut loss,
        &mut stats,
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::NonFiniteRow { row: 0, .. }), "{err}");
    assert_eq!(stats, [TntRowStats::INACTIVE; 2]);
    let mut short = [TntRowStats::INACTIVE; 1];
    let err = tnt_with_stats(
        LogitsIo::value(&[0.0f32; 4]),
        2,
        &zr,
        &[0, 1],
        &[-1.0, 1.0],
        &cfg,
        &mut loss,
        &mut short,
    )
    .unwrap_err();
    assert!(matches!(err, KernelError::LengthMismatch { name: "stats", .. }), "{err}");
}

/// A row of the size of GPT-2's vocabulary on the SIMD path: the blocked sums stay accurate.
#[test]
fn large_rows_match_the_oracle() {
    let v = 50257;
    let mut z = vec![0.0f32; 2 * v];
    let mut zr = vec![0.0f32; 2 * v];
    let mut s = 12345u64;
    let mut next = || {
        s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 8.0
    };
    for i in 0..2 * v {
        z[i] = next();
        zr[i] = z[i] + 0.3 * next();
    }
    z[17] = f32::NEG_INFINITY; // one masked column
    let labels = [42i64, 50000];
    let weights = [-1.0f32, 1.0];
    let (mut loss, mut stats) = ([0.0f32; 2], [TntRowStats::INACTIVE; 2]);
    let cfg = TntKernelConfig::new(TntVariant::Tnff);
    let mut grad = vec![0.0f32; 2 * v];
    tnt_with_stats(
        LogitsIo::grad(&z, &mut grad),
        v,
        &zr,
        &labels,
        &weights,
        &cfg,
        &mut loss,
        &mut stats,
    )
    .unwrap();
    for r in 0..2 {
        let o =
            oracle_row(&z[r * v..(r + 1) * v], &zr[r * v..(r + 1) * v], labels[r] as usize, r == 0);
        let st = stats[r];
        assert_eq!((st.argmax, st.ref_argmax), (o.argmax, o.ref_argmax), "row {r}");
        assert!(close(st.logp_y, o.logp_y, 1e-5), "row {r}: {st:?} vs {o:?}");
        assert!(close(st.ref_logp_y, o.ref_logp_y, 1e-5), "row {r}: {st:?} vs {o:?}");
        assert!((st.kl - o.kl).abs() <= 1e-4 * (1.0 + o.kl), "row {r}: {st:?} vs {o:?}");
    }
}
