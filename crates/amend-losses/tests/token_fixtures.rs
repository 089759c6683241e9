//! Token losses against fixtures computed independently in PyTorch by
//! `scripts/gen_token_loss_fixtures.py` (random shapes, masks, `−inf` columns, saturated rows,
//! NaN / inf at inactive positions; upstream t5patches formulas for parity).

mod token_support;

use amend_losses::token::*;
use amend_losses::{LossOutput, Reduction, Result};
use amend_testing::{F32, Tol, load_json_fixture};
use serde_json::Value;
use tch::{Kind, Tensor};
use token_support::*;

const PATHS: [TokenBackend; 3] =
    [TokenBackend::Composite, TokenBackend::ClosedForm, TokenBackend::Kernel];

/// Whether `backend` applies to `kind` (the fused kernels run on f32 only).
fn runs(kind: Kind, backend: TokenBackend) -> bool {
    kind == Kind::Float || backend != TokenBackend::Kernel
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| match x {
            Value::Number(n) => n.as_f64().expect("f64"),
            Value::String(s) => match s.as_str() {
                "nan" => f64::NAN,
                "inf" => f64::INFINITY,
                "-inf" => f64::NEG_INFINITY,
                other => panic!("bad float {other}"),
            },
            other => panic!("bad float {other}"),
        })
        .collect()
}

fn ints(v: &Value) -> Vec<i64> {
    v.as_array().expect("array").iter().map(|x| x.as_i64().expect("i64")).collect()
}

fn flags(v: &Value) -> Vec<bool> {
    v.as_array().expect("array").iter().map(|x| x.as_bool().expect("bool")).collect()
}

struct Case<'a> {
    c: &'a Value,
    b: i64,
    t: i64,
    v: i64,
}

impl<'a> Case<'a> {
    fn new(c: &'a Value) -> Self {
        let s = ints(&c["shape"]);
        Case { c, b: s[0], t: s[1], v: s[2] }
    }
    fn name(&self) -> &str {
        self.c["name"].as_str().unwrap()
    }
    fn logits(&self, key: &str, kind: Kind) -> Tensor {
        tensor(&floats(&self.c[key]), &[self.b, self.t, self.v], kind)
    }
    fn bt_ids(&self, key: &str) -> Tensor {
        ids(&ints(&self.c[key]), &[self.b, self.t])
    }
    fn bt_mask(&self, key: &str) -> Option<Tensor> {
        self.c.get(key).map(|m| Tensor::from_slice(&flags(m)).reshape([self.b, self.t]))
    }
    fn config<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_value(self.c["config"].clone()).expect("config deserialises")
    }

    /// Runs the case's loss with `reduction` and `backend` on `z`.
    fn run(
        &self,
        z: &Tensor,
        kind: Kind,
        reduction: Reduction,
        backend: TokenBackend,
    ) -> Result<LossOutput> {
        let labels = self.bt_ids("labels");
        let mask = self.bt_mask("loss_mask");
        match self.c["loss"].as_str().unwrap() {
            "tnt" => {
                let cfg: TntConfig = self.config();
                let w = TokenWeights::new(&self.bt_ids("weights"))?;
                tnt_loss(
                    z,
                    &self.logits("ref_logits", kind),
                    &labels,
                    &w,
                    &cfg.with_reduction(reduction).with_backend(backend),
                )
            }
            "nl" => {
                let cfg: NlConfig = self.config();
                let w = TokenWeights::new(&self.bt_ids("weights"))?;
                nl_loss(z, &labels, &w, &cfg.with_reduction(reduction).with_backend(backend))
            }
            "ul" => {
                let cfg: UlAnnotatedConfig = self.config();
                let w = TokenWeights::new(&self.bt_ids("weights"))?;
                ul_annotated_loss(
                    z,
                    &labels,
                    &w,
                    &cfg.with_reduction(reduction).with_backend(backend),
                )
            }
            "nll" => {
                let cfg: NllConfig = self.config();
                nll_loss(
                    z,
                    &labels,
                    mask.as_ref(),
                    &cfg.with_reduction(reduction).with_backend(backend),
                )
            }
            "welleck" => {
                let cfg: WelleckUlConfig = self.config();
                let cfg = cfg.with_reduction(reduction).with_backend(backend);
                match self.c.get("candidates") {
                    Some(c) => {
                        let k = self.c["k"].as_i64().unwrap();
                        let c = ids(&ints(c), &[self.b, self.t, k]);
                        welleck_ul_loss(z, &labels, mask.as_ref(), Candidates::Explicit(&c), &cfg)
                    }
                    None => welleck_ul_loss(
                        z,
                        &labels,
                        mask.as_ref(),
                        Candidates::PreviousContext,
                        &cfg,
                    ),
                }
            }
            "sequence_ul" => {
                let cfg: SequenceUlConfig = self.config();
                let cfg = cfg.with_reduction(reduction).with_backend(backend);
                let valid = self.bt_mask("valid");
                let out =
                    sequence_ul_loss(z, &labels, valid.as_ref(), SeqUlMask::RepeatNgram, &cfg)?;
                // The fixture's (independently computed) mask, passed explicitly, must agree.
                let m = ids(&ints(&self.c["mask"]), &[self.b, self.t]);
                let explicit =
                    sequence_ul_loss(z, &labels, valid.as_ref(), SeqUlMask::Explicit(&m), &cfg)?;
                assert_eq!(vals(&out.per_example), vals(&explicit.per_example), "{}", self.name());
                Ok(out)
            }
            "reference_kl" => {
                let cfg: RefKlConfig = self.config();
                let ex = self.c.get("exclude").map(|e| ids(&ints(e), &[self.b, self.t]));
                reference_kl_loss(
                    z,
                    &self.logits("ref_logits", kind),
                    ex.as_ref(),
                    mask.as_ref(),
                    &cfg.with_reduction(reduction).with_backend(backend),
                )
            }
            other => panic!("unknown loss {other}"),
        }
    }
}

fn scale_of(case: &Case<'_>) -> f64 {
    case.c["config"].get("alpha").and_then(Value::as_f64).unwrap_or(1.0).max(1.0)
}

#[test]
fn token_losses_match_pytorch_fixtures() -> Result<()> {
    let data: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "token_random.json");
    let cases = data["cases"].as_array().expect("cases");
    assert!(cases.len() >= 100, "fixture has {} cases", cases.len());
    let mut f32_cases = 0;
    for c in cases {
        let case = Case::new(c);
        let tokens = floats(&c["tokens"]);
        let grad = floats(&c["grad"]);
        let count = c["count"].as_f64().unwrap();
        let sum: f64 = tokens.iter().sum();
        let alpha = scale_of(&case);
        let mut kinds = vec![Kind::Double];
        if c["f32"].as_bool().unwrap() {
            kinds.push(Kind::Float);
            f32_cases += 1;
        }
        for kind in kinds {
            let (val_tol, grad_tol) = match kind {
                Kind::Double => {
                    (Tol { rel: 1e-9, abs: 1e-11 }, Tol { rel: 1e-9, abs: 1e-11 * alpha })
                }
                _ => (
                    Tol { rel: F32.rel, abs: F32.abs * alpha },
                    Tol { rel: 1e-5, abs: 2e-6 * alpha },
                ),
            };
            for backend in PATHS.into_iter().filter(|&b| runs(kind, b)) {
                let what = format!("{} {kind:?} {backend:?}", case.name());
                let z = case.logits("logits", kind);
                let none = case.run(&z, kind, Reduction::None, backend)?;
                val_tol.assert_all_close(&format!("{what} tokens"), &vals(&none.loss), &tokens);
                assert_eq!(none.count(), count, "{what} count");
                let (s, g) = loss_and_grad(&z, |z| case.run(z, kind, Reduction::Sum, backend))?;
                val_tol.assert_all_close(&format!("{what} sum"), &[scalar(&s.loss)], &[sum]);
                grad_tol.assert_all_close(&format!("{what} grad"), &g, &grad);
            }
        }
    }
    assert!(f32_cases >= 40, "only {f32_cases} f32 cases");
    Ok(())
}

#[test]
fn parity_fixtures_match_upstream_where_upstream_is_defined() -> Result<()> {
    let data: Value = load_json_fixture(env!("CARGO_MANIFEST_DIR"), "token_parity.json");
    let cases = data["cases"].as_array().expect("cases");
    let mut deviations = 0;
    for c in cases {
        let case = Case::new(c);
        let alpha = c["alpha"].as_f64().unwrap();
        let w = TokenWeights::new(&case.bt_ids("weights"))?;
        let labels = case.bt_ids("labels");
        let upstream = floats(&c["upstream"]);
        let amend = floats(&c["amend"]);
        for kind in [Kind::Double, Kind::Float] {
            for backend in PATHS.into_iter().filter(|&b| runs(kind, b)) {
                let z = case.logits("logits", kind);
                let zo = case.logits("ref_logits", kind);
                let out = match c["loss"].as_str().unwrap() {
                    "ul" => ul_annotated_loss(
                        &z,
                        &labels,
                        &w,
                        &UlAnnotatedConfig::default()
                            .with_alpha(alpha)
                            .with_reduction(Reduction::PerSequence)
                            .with_backend(backend),
                    )?,
                    "nl" => nl_loss(
                        &z,
                        &labels,
                        &w,
                        &NlConfig::default()
                            .with_alpha(alpha)
                            .with_reduction(Reduction::PerSequence)
                            .with_backend(backend),
                    )?,
                    v => {
                        let variant: TntVariant = v.parse()?;
                        tnt_loss(
                            &z,
                            &zo,
                            &labels,
                            &w,
                            &TntConfig::new(variant)
                                .with_alpha(alpha)
                                .with_reduction(Reduction::PerSequence)
                                .with_backend(backend),
                        )?
                    }
                };
                let scores: Vec<f64> = vals(&out.loss).into_iter().map(|x| -x).collect();
                let what = format!("{} {kind:?} {backend:?}", case.name());
                let tol = if kind == Kind::Double {
                    Tol { rel: 1e-9, abs: 1e-12 }
                } else {
                    Tol { rel: 1e-5, abs: 1e-6 }
                };
                tol.assert_all_close(&format!("{what} vs amend formulas"), &scores, &amend);
                if c["agree"].as_bool().unwrap() {
                    tol.assert_all_close(&format!("{what} vs upstream"), &scores, &upstream);
                } else if kind == Kind::Double && backend == TokenBackend::Composite {
                    deviations += 1;
                    for (s, u) in scores.iter().zip(&upstream) {
                        assert!(
                            u.is_nan() || (s - u).abs() > 1e-3,
                            "{what}: expected a deliberate deviation, got {s} vs upstream {u}"
                        );
                    }
                }
            }
        }
    }
    assert_eq!(deviations, 4);
    Ok(())
}
