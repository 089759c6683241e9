//! Bad input gets a typed error (never a panic), and configs round-trip through serde with the
//! documented defaults.

mod token_support;

use amend_losses::token::*;
use amend_losses::{Error, Reduction, Result};
use tch::{Kind, Tensor};
use token_support::*;

fn z(b: i64, t: i64, v: i64) -> Tensor {
    Tensor::zeros([b, t, v], (Kind::Float, CPU))
}

fn w(data: &[i64], shape: &[i64]) -> TokenWeights {
    TokenWeights::new(&ids(data, shape)).expect("valid weights")
}

#[test]
fn shape_and_dtype_errors_name_the_argument() {
    let y = ids(&[0, 1], &[1, 2]);
    let ww = w(&[1, 1], &[1, 2]);
    let cfg = TntConfig::default();
    // logits not 3-D
    let err = tnt_loss(&Tensor::zeros([2, 4], (Kind::Float, CPU)), &z(1, 2, 4), &y, &ww, &cfg)
        .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "logits", .. }), "{err}");
    // ref_logits of another shape
    let err = tnt_loss(&z(1, 2, 4), &z(1, 2, 5), &y, &ww, &cfg).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "ref_logits", .. }), "{err}");
    // labels of another shape
    let err = tnt_loss(&z(1, 2, 4), &z(1, 2, 4), &ids(&[0, 1, 2], &[1, 3]), &ww, &cfg).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "labels", .. }), "{err}");
    // weights of another shape
    let err = tnt_loss(&z(1, 2, 4), &z(1, 2, 4), &y, &w(&[1, 1, 1, 1], &[2, 2]), &cfg).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "weights", .. }), "{err}");
    // integer logits, float labels, float mask
    let err =
        nll_loss(&Tensor::zeros([1, 2, 4], (Kind::Int64, CPU)), &y, None, &NllConfig::default())
            .unwrap_err();
    assert!(matches!(err, Error::DtypeMismatch { name: "logits", .. }), "{err}");
    let err =
        nll_loss(&z(1, 2, 4), &y.to_kind(Kind::Float), None, &NllConfig::default()).unwrap_err();
    assert!(matches!(err, Error::DtypeMismatch { name: "labels", .. }), "{err}");
    let err = nll_loss(
        &z(1, 2, 4),
        &y,
        Some(&Tensor::ones([1, 2], (Kind::Float, CPU))),
        &NllConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::DtypeMismatch { name: "loss_mask", .. }), "{err}");
    // V < 2
    let err =
        nll_loss(&z(1, 2, 1), &ids(&[0, 0], &[1, 2]), None, &NllConfig::default()).unwrap_err();
    assert!(matches!(err, Error::VocabTooSmall { vocab: 1, .. }), "{err}");
    // weights that are not [B, T]
    let err = TokenWeights::new(&ids(&[1, 1], &[2])).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "weights", .. }), "{err}");
    // explicit candidates of the wrong shape, sequence-UL mask of the wrong shape
    let err = welleck_ul_loss(
        &z(1, 2, 4),
        &y,
        None,
        Candidates::Explicit(&ids(&[0, 1], &[2, 1, 1])),
        &WelleckUlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "candidates", .. }), "{err}");
    let err = sequence_ul_loss(
        &z(1, 2, 4),
        &y,
        None,
        SeqUlMask::Explicit(&ids(&[1], &[1, 1])),
        &SequenceUlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "mask", .. }), "{err}");
}

#[test]
fn labels_out_of_range_at_active_positions_are_reported_with_index() {
    let y = ids(&[0, 9, 2, -3], &[2, 2]);
    // Positions (0,1) and (1,1) are active and out of range for V = 4.
    let err =
        tnt_loss(&z(2, 2, 4), &z(2, 2, 4), &y, &w(&[1, -1, 0, 1], &[2, 2]), &TntConfig::default())
            .unwrap_err();
    match err {
        Error::LabelOutOfRange { name, value, index, count, vocab, .. } => {
            assert_eq!((name, value, index, count, vocab), ("labels", 9, vec![0, 1], 2, 4));
        }
        other => panic!("{other}"),
    }
    // The same label at an inactive position is never read.
    assert!(
        tnt_loss(&z(2, 2, 4), &z(2, 2, 4), &y, &w(&[1, 0, 0, 0], &[2, 2]), &TntConfig::default())
            .is_ok()
    );
    // NLL: −100 is ignored, −3 is an error.
    let err = nll_loss(&z(2, 2, 4), &ids(&[0, -100, 2, -3], &[2, 2]), None, &NllConfig::default())
        .unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { value: -3, .. }), "{err}");
    // exclude ids, continuation tokens.
    let err = reference_kl_loss(
        &z(1, 2, 4),
        &z(1, 2, 4),
        Some(&ids(&[-1, 4], &[1, 2])),
        None,
        &RefKlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { name: "exclude", value: 4, .. }), "{err}");
    let err = sequence_ul_loss(
        &z(1, 2, 4),
        &ids(&[1, 7], &[1, 2]),
        None,
        SeqUlMask::RepeatNgram,
        &SequenceUlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { name: "continuation", value: 7, .. }), "{err}");
    // Welleck previous context reads every real label (also where loss_mask is false).
    let mask = Tensor::from_slice(&[false, true]).reshape([1, 2]);
    let err = welleck_ul_loss(
        &z(1, 2, 4),
        &ids(&[5, 1], &[1, 2]),
        Some(&mask),
        Candidates::PreviousContext,
        &WelleckUlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::LabelOutOfRange { value: 5, .. }), "{err}");
    // Explicit candidates ≥ V are an InvalidConfig (spec §1.3).
    let c = ids(&[0, -1, 2, 6], &[1, 2, 2]);
    let err = welleck_ul_loss(
        &z(1, 2, 4),
        &ids(&[1, 1], &[1, 2]),
        None,
        Candidates::Explicit(&c),
        &WelleckUlConfig::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { name: "candidates", .. }), "{err}");
    assert!(err.to_string().contains("candidate id 6 at (0, 1, 1)"), "{err}");
}

#[test]
fn non_finite_logits_are_an_error_by_default_and_propagate_on_request() -> Result<()> {
    let mut data = vec![0.0f64; 2 * 3 * 4];
    data[4 + 2] = f64::NAN; // position (0, 1)
    data[12] = f64::INFINITY; // position (1, 0)
    let zz = tensor(&data, &[2, 3, 4], Kind::Float);
    let y = ids(&[0; 6], &[2, 3]);
    let err = nll_loss(&zz, &y, None, &NllConfig::default()).unwrap_err();
    match &err {
        Error::NonFiniteLogits { name, index, count, .. } => {
            assert_eq!((*name, index.clone(), *count), ("logits", vec![0, 1], 2));
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("propagate"), "{err}");
    // A row without any finite logit is rejected too.
    let all_neg_inf = tensor(&[f64::NEG_INFINITY; 4], &[1, 1, 4], Kind::Float);
    assert!(matches!(
        nll_loss(&all_neg_inf, &ids(&[0], &[1, 1]), None, &NllConfig::default()),
        Err(Error::NonFiniteLogits { .. })
    ));
    // Reference logits are checked as well.
    let ww = w(&[1, 1, 1, 1, 1, 1], &[2, 3]);
    let err = tnt_loss(&z(2, 3, 4), &zz, &y, &ww, &TntConfig::default()).unwrap_err();
    assert!(matches!(err, Error::NonFiniteLogits { name: "ref_logits", .. }), "{err}");
    // Masked positions are never inspected.
    let mask = ids(&[1, 0, 1, 0, 1, 1], &[2, 3]).ne(0);
    assert!(nll_loss(&zz, &y, Some(&mask), &NllConfig::default()).is_ok());
    // Propagate: the NaN reaches that token's loss only.
    let out = nll_loss(
        &zz,
        &y,
        None,
        &NllConfig::default()
            .with_non_finite(NonFinitePolicy::Propagate)
            .with_reduction(Reduction::None),
    )?;
    let tok = vals(&out.loss);
    assert!(
        tok[1].is_nan() && tok[3].is_nan() && tok[0].is_finite() && tok[5].is_finite(),
        "{tok:?}"
    );
    Ok(())
}

#[test]
fn overflow_on_finite_logits_is_an_error_not_an_infinite_loss() -> Result<()> {
    // Finite f32 logits of ±3e38: log p of the label is about −6e38, beyond f32.
    let mut data = vec![0.0f64; 2 * 2 * 4];
    data[4] = 3e38; // position (0, 1), label 0
    data[5] = -3e38;
    data[4 + 3] = 3e38;
    let zz = tensor(&data, &[2, 2, 4], Kind::Float);
    let y = ids(&[0, 1, 0, 0], &[2, 2]);
    let backends = [TokenBackend::Composite, TokenBackend::Auto];
    for backend in backends {
        let cfg = NllConfig::default().with_backend(backend);
        match nll_loss(&zz, &y, None, &cfg) {
            Err(e @ Error::LossOverflow { .. }) => {
                let Error::LossOverflow { index, dtype, .. } = &e else { unreachable!() };
                assert_eq!((index.clone(), *dtype), (vec![0, 1], "float32"), "{e}");
                assert!(e.to_string().contains("overflowed float32"), "{e}");
            }
            // The fused kernel may carry the row in a wider type and stay finite.
            Ok(out) => assert!(vals(&out.loss).iter().all(|x| x.is_finite()), "{backend:?}"),
            Err(e) => panic!("{backend:?}: {e}"),
        }
        // The same values in f64 are fine.
        let out = nll_loss(&zz.to_kind(Kind::Double), &y, None, &cfg)?;
        assert!(vals(&out.loss)[0] > 1e38);
    }
    let composite = NllConfig::default().with_backend(TokenBackend::Composite);
    assert!(matches!(nll_loss(&zz, &y, None, &composite), Err(Error::LossOverflow { .. })));
    // Propagate returns the infinite loss as computed.
    let out =
        nll_loss(&zz, &y, None, &composite.clone().with_non_finite(NonFinitePolicy::Propagate))?;
    assert!(!vals(&out.loss)[0].is_finite());
    // alpha = 1e38 fits f32 but the TNT target overflows with it.
    let ww = w(&[1, -1, 1, -1], &[2, 2]);
    let zo = z(2, 2, 4);
    let cfg = TntConfig::new(TntVariant::Ff).with_alpha(1e38).with_backend(TokenBackend::Composite);
    match tnt_loss(&z(2, 2, 4), &zo, &y, &ww, &cfg) {
        Err(Error::LossOverflow { .. }) => {}
        Ok(out) => assert!(vals(&out.loss).iter().all(|x| x.is_finite()), "silent non-finite"),
        Err(e) => panic!("{e}"),
    }
    // A label outside the support (its logit is −inf) is +inf by definition (spec E5), not an
    // overflow.
    let mut masked = vec![0.0f64; 4];
    masked[2] = f64::NEG_INFINITY;
    let out =
        nll_loss(&tensor(&masked, &[1, 1, 4], Kind::Float), &ids(&[2], &[1, 1]), None, &composite)?;
    assert_eq!(vals(&out.loss)[0], f64::INFINITY);
    Ok(())
}

#[test]
fn invalid_configs_are_rejected() {
    let y = ids(&[0, 1], &[1, 2]);
    let ww = w(&[1, -1], &[1, 2]);
    let bad = |e: Result<amend_losses::LossOutput>, field: &str| match e {
        Err(Error::InvalidConfig { name, .. }) => assert_eq!(name, field),
        other => panic!("expected InvalidConfig for {field}, got {other:?}"),
    };
    for alpha in [-1.0, f64::NAN, f64::INFINITY] {
        bad(
            tnt_loss(&z(1, 2, 4), &z(1, 2, 4), &y, &ww, &TntConfig::default().with_alpha(alpha)),
            "alpha",
        );
        bad(nl_loss(&z(1, 2, 4), &y, &ww, &NlConfig::default().with_alpha(alpha)), "alpha");
        bad(
            ul_annotated_loss(
                &z(1, 2, 4),
                &y,
                &ww,
                &UlAnnotatedConfig::default().with_alpha(alpha),
            ),
            "alpha",
        );
        bad(
            welleck_ul_loss(
                &z(1, 2, 4),
                &y,
                None,
                Candidates::PreviousContext,
                &WelleckUlConfig::default().with_alpha(alpha),
            ),
            "alpha",
        );
    }
    for variant in [TntVariant::Rr, TntVariant::Rf, TntVariant::Rll] {
        bad(
            tnt_loss(
                &z(1, 2, 4),
                &z(1, 2, 4),
                &y,
                &ww,
                &TntConfig::new(variant).with_smoothing_eps(0.0),
            ),
            "smoothing_eps",
        );
    }
    // ε = 0 is fine for the forward variants.
    assert!(
        tnt_loss(
            &z(1, 2, 4),
            &z(1, 2, 4),
            &y,
            &ww,
            &TntConfig::new(TntVariant::Ff).with_smoothing_eps(0.0)
        )
        .is_ok()
    );
    bad(
        tnt_loss(
            &z(1, 2, 4),
            &z(1, 2, 4),
            &y,
            &ww,
            &TntConfig::default().with_smoothing_eps(-1e-6),
        ),
        "smoothing_eps",
    );
    for theta in [0.0, 1.0, f64::NAN, f64::NEG_INFINITY] {
        bad(
            nl_loss(&z(1, 2, 4), &y, &ww, &NlConfig::default().with_threshold(Some(theta))),
            "threshold",
        );
    }
    bad(
        sequence_ul_loss(
            &z(1, 2, 4),
            &y,
            None,
            SeqUlMask::RepeatNgram,
            &SequenceUlConfig::default().with_ngram_n(0),
        ),
        "ngram_n",
    );
    let ex = ids(&[1, -1], &[1, 2]);
    let rev = RefKlConfig::default().with_direction(KlDirection::Reverse);
    bad(reference_kl_loss(&z(1, 2, 4), &z(1, 2, 4), Some(&ex), None, &rev), "smoothing_eps");
    assert!(
        reference_kl_loss(&z(1, 2, 4), &z(1, 2, 4), Some(&ex), None, &rev.with_smoothing_eps(1e-6))
            .is_ok()
    );
    for tau in [0.0, -1.0, f64::NAN] {
        bad(
            reference_kl_loss(
                &z(1, 2, 4),
                &z(1, 2, 4),
                None,
                None,
                &RefKlConfig::default().with_temperature(tau),
            ),
            "temperature",
        );
    }
    let err = "tnxx".parse::<TntVariant>().unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { name: "variant", .. }));
    let h = Tensor::zeros([3, 4], (Kind::Float, CPU));
    let wt = Tensor::zeros([5, 4], (Kind::Float, CPU));
    bad(
        fused_linear_nll_loss(
            &h,
            LinearHead::new(&wt),
            &ids(&[0, 1, 2], &[3]),
            None,
            &NllConfig::default().with_reduction(Reduction::None),
            &FusedLinearOptions::default(),
        ),
        "reduction",
    );
}

#[test]
fn configs_have_the_documented_defaults_and_round_trip_through_serde() -> Result<()> {
    let tnt = TntConfig::default();
    assert_eq!(
        (tnt.variant, tnt.alpha, tnt.smoothing_eps, tnt.reduction),
        (TntVariant::Ff, 1e4, 1e-6, Reduction::Sum)
    );
    let nl = NlConfig::default();
    assert_eq!((nl.alpha, nl.threshold, nl.reduction), (1e4, Some(-10.3), Reduction::Sum));
    let ul = UlAnnotatedConfig::default();
    assert_eq!((ul.alpha, ul.reduction), (1e4, Reduction::Sum));
    let wl = WelleckUlConfig::default();
    assert_eq!(
        (wl.alpha, wl.pad_id, wl.ignore_index, wl.reduction),
        (1.0, None, -100, Reduction::Mean)
    );
    let sq = SequenceUlConfig::default();
    assert_eq!((sq.ngram_n, sq.reduction), (4, Reduction::Mean));
    let nll = NllConfig::default();
    assert_eq!((nll.ignore_index, nll.reduction), (-100, Reduction::Mean));
    let kl = RefKlConfig::default();
    assert_eq!(
        (kl.direction, kl.value, kl.smoothing_eps, kl.temperature, kl.reduction),
        (KlDirection::Forward, KlValue::Divergence, 0.0, 1.0, Reduction::Mean)
    );
    for cfg in [
        tnt.clone(),
        TntConfig::new(TntVariant::Rll).with_alpha(3.0).with_backend(TokenBackend::ClosedForm),
    ] {
        let json = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<TntConfig>(&json).unwrap(), cfg);
    }
    // Partial JSON fills the defaults; names are the paper's, lower case; unknown fields fail.
    let cfg: TntConfig = serde_json::from_str(r#"{"variant": "tnrf", "alpha": 2.0}"#).unwrap();
    assert_eq!((cfg.variant, cfg.alpha, cfg.smoothing_eps), (TntVariant::Rf, 2.0, 1e-6));
    assert!(serde_json::from_str::<TntConfig>(r#"{"beta": 1.0}"#).is_err());
    assert_eq!(serde_json::to_string(&TntVariant::Fll).unwrap(), "\"tnfll\"");
    assert_eq!("TNRLL".parse::<TntVariant>()?, TntVariant::Rll);
    assert_eq!("ff".parse::<TntVariant>()?, TntVariant::Ff);
    let cfg: NlConfig = serde_json::from_str(r#"{"threshold": null}"#).unwrap();
    assert_eq!(cfg.threshold, None);
    let cfg: RefKlConfig = serde_json::from_str(
        r#"{"direction": "reverse", "value": "cross_entropy", "non_finite": "propagate"}"#,
    )
    .unwrap();
    assert_eq!(
        (cfg.direction, cfg.value, cfg.non_finite),
        (KlDirection::Reverse, KlValue::CrossEntropy, NonFinitePolicy::Propagate)
    );
    let cfg: WelleckUlConfig =
        serde_json::from_str(r#"{"pad_id": 1, "reduction": "sum"}"#).unwrap();
    assert_eq!((cfg.pad_id, cfg.reduction), (Some(1), Reduction::Sum));
    let opts: FusedLinearOptions = serde_json::from_str(r#"{"chunk_rows": 256}"#).unwrap();
    assert_eq!(opts.chunk_rows, Some(256));
    Ok(())
}

#[test]
fn count_active_functions_match_the_losses() -> Result<()> {
    let y = ids(&[1, -100, 2, 0, 3, 0], &[2, 3]);
    let mask = ids(&[1, 1, 0, 1, 1, 1], &[2, 3]).ne(0);
    let zz = z(2, 3, 4);
    let nll = nll_loss(&zz, &y, Some(&mask), &NllConfig::default())?;
    assert_eq!(count_active_nll(&y, Some(&mask), -100)?, nll.count());
    let cfg = WelleckUlConfig::default().with_pad_id(Some(0));
    let wl = welleck_ul_loss(&zz, &y, Some(&mask), Candidates::PreviousContext, &cfg)?;
    assert_eq!(count_active_welleck(&y, Some(&mask), &cfg)?, wl.count());
    assert_eq!(wl.count(), 2.0);
    let kl = reference_kl_loss(&zz, &zz, None, Some(&mask), &RefKlConfig::default())?;
    assert_eq!(count_active_reference_kl(Some(&mask), 2, 3)?, kl.count());
    let cont = ids(&[1, 2, 1, 2, 1, 2], &[2, 3]);
    let sq = sequence_ul_loss(
        &zz,
        &cont,
        Some(&mask),
        SeqUlMask::RepeatNgram,
        &SequenceUlConfig::default(),
    )?;
    assert_eq!(count_active_sequence_ul(&cont, Some(&mask))?, sq.count());
    let ww = w(&[1, -1, 0, 0, 1, 1], &[2, 3]);
    let tnt = tnt_loss(&zz, &zz, &y.clamp_min(0), &ww, &TntConfig::default())?;
    assert_eq!(count_active_weighted(&ww), tnt.count());
    Ok(())
}

#[test]
fn greedy_continuation_reports_closure_errors_and_bad_logits() {
    let prefix = ids(&[0, 1], &[2, 1]);
    let err =
        greedy_continuation(&prefix, 3, None, |_| -> std::result::Result<Tensor, std::io::Error> {
            Err(std::io::Error::other("model failed"))
        })
        .unwrap_err();
    assert!(matches!(err, Error::Callback { .. }), "{err}");
    assert_eq!(std::error::Error::source(&err).unwrap().to_string(), "model failed");
    let err = greedy_continuation(&prefix, 3, None, |_| {
        Ok::<_, tch::TchError>(Tensor::zeros([3, 4], (Kind::Float, CPU)))
    })
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "next_token_logits", .. }), "{err}");
    let err = greedy_continuation(&ids(&[0], &[1]), 3, None, |_| {
        Ok::<_, tch::TchError>(Tensor::zeros([1, 4], (Kind::Float, CPU)))
    })
    .unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { name: "prefix", .. }), "{err}");
}

#[test]
fn greedy_continuation_stops_rows_at_eos() -> Result<()> {
    // Row 0 emits EOS (3) at the second step; row 1 never does.
    let prefix = ids(&[0, 1], &[2, 1]);
    let mut step = 0;
    let cont = greedy_continuation(&prefix, 4, Some(3), |tokens| {
        step += 1;
        let b = tokens.size()[0];
        let next = if step == 2 { ids(&[3, 2], &[2]) } else { ids(&[1, 2], &[2]) };
        assert_eq!(b, 2);
        Ok::<_, tch::TchError>(next.one_hot(4).to_kind(Kind::Float))
    })?;
    assert_eq!(Vec::<i64>::try_from(cont.tokens.reshape([-1]))?, [1, 3, 3, 3, 2, 2, 2, 2]);
    assert_eq!(
        Vec::<bool>::try_from(cont.valid.reshape([-1]))?,
        [true, true, false, false, true, true, true, true]
    );
    assert_eq!(cont.sequence.size(), [2, 5]);
    assert_eq!(cont.prefix_len, 1);
    Ok(())
}
