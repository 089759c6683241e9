//! Bad input returns a typed error, names the operation and the offending index, never panics,
//! and leaves no half-written output.

use amend_kernels::{
    Candidates, KernelError, KlDirection, KlTarget, LogitsIo, SelectedLogpConfig, SelectedLogpOut,
    TntKernelConfig, TntVariant, TokenKlConfig, UnlikelihoodConfig, selected_logp, tnt, token_kl,
    unlikelihood,
};

const Z: [f32; 8] = [2.0, 1.0, 0.5, -1.0, 0.0, 3.0, -2.0, 1.0];

fn ce(
    z: &[f32],
    vocab: usize,
    labels: &[i64],
    cfg: &SelectedLogpConfig,
) -> Result<(), KernelError> {
    let mut l = vec![0.0; labels.len()];
    let mut g = vec![0.0; z.len()];
    selected_logp(LogitsIo::grad(z, &mut g), vocab, labels, None, cfg, SelectedLogpOut::new(&mut l))
        .map(|_| ())
}

#[test]
fn length_mismatches_are_typed() {
    let c = SelectedLogpConfig::default();
    assert!(matches!(
        ce(&Z[..7], 4, &[0, 1], &c),
        Err(KernelError::LengthMismatch {
            op: "selected_logp",
            name: "logits",
            expected: 8,
            got: 7
        })
    ));
    let mut g = [0.0f32; 7];
    let mut l = [0.0f32; 2];
    let r = selected_logp(
        LogitsIo::grad(&Z, &mut g),
        4,
        &[0, 1],
        None,
        &c,
        SelectedLogpOut::new(&mut l),
    );
    assert!(matches!(
        r,
        Err(KernelError::LengthMismatch { name: "grad", expected: 8, got: 7, .. })
    ));
    let mut l = [0.0f32; 2];
    let r = token_kl(
        LogitsIo::value(&Z),
        4,
        KlTarget::Reference { ref_logits: &Z[..4], exclude: None },
        None,
        &TokenKlConfig::default(),
        &mut l,
    );
    assert!(matches!(
        r,
        Err(KernelError::LengthMismatch { op: "token_kl", name: "ref_logits", .. })
    ));
    let r = tnt(
        LogitsIo::value(&Z),
        4,
        Some(&Z),
        &[0],
        &[1.0, 1.0],
        &TntKernelConfig::new(TntVariant::Tnff),
        &mut l,
    );
    assert!(matches!(
        r,
        Err(KernelError::LengthMismatch { name: "labels", expected: 2, got: 1, .. })
    ));
}

#[test]
fn vocab_below_two_is_rejected() {
    let r = ce(&Z[..2], 1, &[0, 0], &SelectedLogpConfig::default());
    assert!(matches!(r, Err(KernelError::VocabTooSmall { vocab: 1, .. })));
    let r = ce(&[], 0, &[], &SelectedLogpConfig::default());
    assert!(matches!(r, Err(KernelError::VocabTooSmall { vocab: 0, .. })));
}

#[test]
fn labels_out_of_range_name_the_row() {
    let c = SelectedLogpConfig::default();
    assert!(matches!(
        ce(&Z, 4, &[0, 4], &c),
        Err(KernelError::LabelOutOfRange { op: "selected_logp", row: 1, label: 4, vocab: 4 })
    ));
    assert!(matches!(
        ce(&Z, 4, &[-1, 0], &c),
        Err(KernelError::LabelOutOfRange { row: 0, label: -1, .. })
    ));
    // The ignore index is not a label, and ignored rows are never read.
    assert!(ce(&Z, 4, &[-100, 3], &c).is_ok());
    // Labels at rows with weight 0 are never read either (T-MASK).
    let mut l = [0.0f32; 2];
    let cfg = TntKernelConfig::new(TntVariant::Tnff);
    assert!(tnt(LogitsIo::value(&Z), 4, Some(&Z), &[999, 1], &[0.0, 1.0], &cfg, &mut l).is_ok());
    let r = tnt(LogitsIo::value(&Z), 4, Some(&Z), &[999, 1], &[1.0, 1.0], &cfg, &mut l);
    assert!(matches!(r, Err(KernelError::LabelOutOfRange { op: "tnt", row: 0, label: 999, .. })));
    // Excluded ids of active rows are checked too.
    let r = token_kl(
        LogitsIo::value(&Z),
        4,
        KlTarget::Reference { ref_logits: &Z, exclude: Some(&[1, 7]) },
        None,
        &TokenKlConfig::default(),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::LabelOutOfRange { row: 1, label: 7, .. })));
}

#[test]
fn non_finite_rows_are_rejected_and_outputs_reset() {
    for (bad, reason) in
        [(f32::NAN, "contains NaN or +inf"), (f32::INFINITY, "contains NaN or +inf")]
    {
        let mut z = Z;
        z[6] = bad;
        let mut g = [7.0f32; 8];
        let mut l = [7.0f32; 2];
        let r = selected_logp(
            LogitsIo::grad(&z, &mut g),
            4,
            &[0, 1],
            None,
            &SelectedLogpConfig::default(),
            SelectedLogpOut::new(&mut l),
        );
        assert_eq!(
            r.unwrap_err(),
            KernelError::NonFiniteRow { op: "selected_logp", name: "logits", row: 1, reason }
        );
        // Row 0 was computed before row 1 failed: everything is reset, nothing half-written.
        assert_eq!((g, l), ([0.0; 8], [0.0; 2]));
    }
    // A row without a finite logit.
    let z = [f32::NEG_INFINITY; 4];
    let r = ce(&z, 4, &[0], &SelectedLogpConfig::default());
    assert!(
        matches!(r, Err(KernelError::NonFiniteRow { row: 0, reason, .. }) if reason.contains("no finite"))
    );
    // NaN in the reference logits of an active row.
    let mut zr = Z;
    zr[1] = f32::NAN;
    let mut l = [0.0f32; 2];
    let r = tnt(
        LogitsIo::value(&Z),
        4,
        Some(&zr),
        &[0, 0],
        &[1.0, 1.0],
        &TntKernelConfig::new(TntVariant::Tnff),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::NonFiniteRow { name: "ref_logits", row: 0, .. })));
    // ...but not in an inactive row.
    assert!(
        tnt(
            LogitsIo::value(&Z),
            4,
            Some(&zr),
            &[0, 0],
            &[0.0, 1.0],
            &TntKernelConfig::new(TntVariant::Tnff),
            &mut l
        )
        .is_ok()
    );
    // A negative target with no admissible token: the only finite reference entry is the label.
    let zr = [f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
    let r = tnt(
        LogitsIo::value(&Z[..4]),
        4,
        Some(&zr),
        &[1],
        &[-1.0],
        &TntKernelConfig::new(TntVariant::Tnff),
        &mut l[..1],
    );
    assert!(matches!(r, Err(KernelError::NonFiniteRow { name: "ref_logits", .. })));
}

#[test]
fn in_place_calls_fail_before_writing() {
    let mut z = Z;
    z[5] = f32::NAN;
    let before = z;
    let mut l = [0.0f32; 2];
    let r = selected_logp(
        LogitsIo::in_place(&mut z),
        4,
        &[0, 1],
        None,
        &SelectedLogpConfig::default(),
        SelectedLogpOut::new(&mut l),
    );
    assert!(matches!(r, Err(KernelError::NonFiniteRow { row: 1, .. })));
    // Row 0 is valid but was not overwritten with its gradient: the call validated first.
    assert_eq!(z.map(f32::to_bits), before.map(f32::to_bits));
}

#[test]
fn invalid_configurations_are_rejected() {
    let bad_ce = [
        SelectedLogpConfig::default().with_label_smoothing(1.5),
        SelectedLogpConfig::default().with_label_smoothing(f64::NAN),
        SelectedLogpConfig::default().with_lse_square_scale(-1.0),
        SelectedLogpConfig::default().with_softcap(Some(0.0)),
        SelectedLogpConfig::default().with_temperature(0.0),
        SelectedLogpConfig::default().with_threads(0),
    ];
    for c in bad_ce {
        assert!(matches!(ce(&Z, 4, &[0, 1], &c), Err(KernelError::InvalidArg { .. })), "{c:?}");
    }
    let mut l = [0.0f32; 2];
    // Reverse KL to a token-excluding target needs ε > 0.
    let r = token_kl(
        LogitsIo::value(&Z),
        4,
        KlTarget::Reference { ref_logits: &Z, exclude: Some(&[0, 1]) },
        None,
        &TokenKlConfig::default().with_direction(KlDirection::Reverse),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "smoothing_eps", .. })));
    let r = token_kl(
        LogitsIo::value(&Z),
        4,
        KlTarget::OneHot { labels: &[0, 1] },
        None,
        &TokenKlConfig::default().with_smoothing_eps(-1e-3),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "smoothing_eps", .. })));
    for cfg in [
        TntKernelConfig::new(TntVariant::Tnrr).with_smoothing_eps(0.0),
        TntKernelConfig::new(TntVariant::Tnff).with_alpha(-1.0),
        TntKernelConfig::new(TntVariant::Tnff).with_alpha(f64::INFINITY),
        TntKernelConfig::new(TntVariant::Nl { threshold: Some(1.0) }),
        TntKernelConfig::new(TntVariant::Tnff).with_threads(0),
    ] {
        let r = tnt(LogitsIo::value(&Z), 4, Some(&Z), &[0, 1], &[1.0, -1.0], &cfg, &mut l);
        assert!(matches!(r, Err(KernelError::InvalidArg { .. })), "{cfg:?}");
    }
    // A TNT variant without reference logits.
    let r = tnt(
        LogitsIo::value(&Z),
        4,
        None,
        &[0, 1],
        &[1.0, -1.0],
        &TntKernelConfig::new(TntVariant::Tnrf),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "ref_logits", .. })));
    // NL and UL need none.
    let cfg = TntKernelConfig::new(TntVariant::UlAnnotated);
    assert!(tnt(LogitsIo::value(&Z), 4, None, &[0, 1], &[1.0, -1.0], &cfg, &mut l).is_ok());
}

#[test]
fn token_weights_must_be_signs() {
    let mut l = [0.0f32; 2];
    for w in [0.5f32, 5.0, -2.0, f32::NAN] {
        let r = tnt(
            LogitsIo::value(&Z),
            4,
            Some(&Z),
            &[0, 1],
            &[1.0, w],
            &TntKernelConfig::new(TntVariant::Tnff),
            &mut l,
        );
        match r {
            Err(KernelError::InvalidArg { name: "weights", reason, .. }) => {
                assert!(reason.contains("row 1"), "{reason}")
            }
            other => panic!("weight {w}: {other:?}"),
        }
    }
}

#[test]
fn candidates_are_validated() {
    let mut l = [0.0f32; 2];
    let c = UnlikelihoodConfig::default();
    let r = unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Csr { offsets: &[0, 1, 2], ids: &[1, 4] },
        None,
        &c,
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::CandidateOutOfRange { row: 1, id: 4, vocab: 4, .. })));
    let r = unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Csr { offsets: &[0, 2, 1], ids: &[1, 2] },
        None,
        &c,
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "candidates.offsets", .. })));
    let r = unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Csr { offsets: &[0, 1], ids: &[1] },
        None,
        &c,
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::LengthMismatch { name: "candidates.offsets", .. })));
    let r = unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Padded { ids: &[1, 2, 3], width: 2 },
        None,
        &c,
        &mut l,
    );
    assert!(matches!(
        r,
        Err(KernelError::LengthMismatch { name: "candidates.ids", expected: 4, got: 3, .. })
    ));
    // Negative ids are empty slots; duplicates count once.
    let mut l2 = [0.0f32; 2];
    unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Padded { ids: &[1, -1, 2, 2], width: 2 },
        None,
        &c,
        &mut l,
    )
    .unwrap();
    unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::Csr { offsets: &[0, 1, 2], ids: &[1, 2] },
        None,
        &c,
        &mut l2,
    )
    .unwrap();
    assert_eq!(l, l2);
    let r = unlikelihood(
        LogitsIo::value(&Z),
        4,
        None,
        Candidates::NONE,
        None,
        &c.with_alpha(-1.0),
        &mut l,
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "alpha", .. })));
}

#[test]
fn row_scales_must_be_finite() {
    let mut l = [0.0f32; 2];
    let r = selected_logp(
        LogitsIo::value(&Z),
        4,
        &[0, 1],
        Some(&[1.0, f32::NAN]),
        &SelectedLogpConfig::default(),
        SelectedLogpOut::new(&mut l),
    );
    assert!(matches!(r, Err(KernelError::InvalidArg { name: "row_scale", .. })));
}

#[test]
fn error_messages_name_op_and_index() {
    let e = ce(&Z, 4, &[0, 9], &SelectedLogpConfig::default()).unwrap_err();
    assert_eq!(e.to_string(), "selected_logp: label 9 at row 1 is outside [0, 4)");
}
