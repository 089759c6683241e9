//! The fused-linear (P-b) step shared by `benches/token_losses.rs` (wall time) and
//! `benches/peak_mem.rs` (peak memory): cross-entropy and TNFF from hidden states, through the
//! naive full-logits path or the chunked fused-linear path.

// Each includer uses a subset of these items.
#![allow(dead_code)]

use amend_losses::Reduction;
use amend_losses::token::{
    FusedLinearOptions, LinearHead, NllConfig, Reference, TntConfig, TntVariant, TokenBackend,
    TokenWeights, fused_linear_nll_loss, fused_linear_tnt_loss, tnt_loss,
};
use tch::{Device, Kind, Tensor};

fn opts() -> (Kind, Device) {
    (Kind::Float, Device::Cpu)
}

fn scalar(t: &Tensor) -> f64 {
    f64::try_from(t.detach().to_kind(Kind::Double).sum(Kind::Double)).expect("scalar")
}

/// Inputs of a fused-linear step: `h [N, H]` and `W [V, H]` (both require grad), labels, TNT
/// weights, and the frozen reference (`h°`, `W°`).
pub struct FlceInputs {
    pub h: Tensor,
    pub w: Tensor,
    pub labels: Tensor,
    pub weights: TokenWeights,
    pub h_ref: Tensor,
    pub w_ref: Tensor,
}

pub fn flce_inputs(n: i64, hd: i64, v: i64) -> FlceInputs {
    tch::manual_seed(11);
    let h = Tensor::randn([n, hd], opts());
    let w = Tensor::randn([v, hd], opts()) * (1.0 / (hd as f64).sqrt());
    let labels = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    let u = Tensor::rand([1, n], opts());
    let signs = Tensor::ones([1, n], (Kind::Int64, Device::Cpu))
        .where_self(&u.ge(0.125), &Tensor::from(-1i64));
    let h_ref = &h + Tensor::randn([n, hd], opts()) * 0.1;
    let w_ref = w.copy();
    FlceInputs {
        h: h.set_requires_grad(true),
        w: w.set_requires_grad(true),
        labels,
        weights: TokenWeights::new(&signs).expect("valid weights"),
        h_ref,
        w_ref,
    }
}

pub fn zero_grads(x: &FlceInputs) {
    for p in [&x.h, &x.w] {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// One cross-entropy step from hidden states:
///
/// * `naive`: `let logits = h·Wᵀ; let loss = cross_entropy(logits); loss.backward()`, the code
///   a user writes (and the spec's baseline): the logits stay in scope during `backward()`;
/// * `naive_lean`: the same with the logits dropped before `backward()` (autograd keeps only
///   the log-softmax), the smallest footprint of the full-logits path;
/// * `chunked`: `fused_linear_nll_loss`.
pub fn flce_ce_step(x: &FlceInputs, which: &str) -> f64 {
    let (loss, logits) = match which {
        "chunked" => {
            let cfg = NllConfig::default().with_reduction(Reduction::Sum);
            let out = fused_linear_nll_loss(
                &x.h,
                LinearHead::new(&x.w),
                &x.labels,
                None,
                &cfg,
                &FusedLinearOptions::default(),
            )
            .expect("fused_linear_nll_loss");
            (out.loss, None)
        }
        naive => {
            let logits = x.h.matmul(&x.w.tr());
            let loss = logits.cross_entropy_loss::<Tensor>(
                &x.labels,
                None,
                tch::Reduction::Sum,
                -100,
                0.0,
            );
            (loss, (naive == "naive").then_some(logits))
        }
    };
    loss.backward();
    drop(logits);
    scalar(&loss)
}

/// One TNFF step from hidden states: `naive` (full logits, composite autograd),
/// `naive_kernel` (full logits, kernel backend) or `chunked` (fused-linear).
pub fn flce_tnt_step(x: &FlceInputs, which: &str) -> f64 {
    let cfg = TntConfig::new(TntVariant::Ff).with_alpha(1.0).with_reduction(Reduction::Sum);
    let loss = match which {
        "chunked" => {
            let reference = Reference::Head { hidden: &x.h_ref, head: LinearHead::new(&x.w_ref) };
            fused_linear_tnt_loss(
                &x.h,
                LinearHead::new(&x.w),
                reference,
                &x.labels,
                &x.weights,
                &cfg,
                &FusedLinearOptions::default(),
            )
            .expect("fused_linear_tnt_loss")
            .loss
        }
        naive => {
            let backend = if naive == "naive_kernel" {
                TokenBackend::Kernel
            } else {
                TokenBackend::Composite
            };
            // As a user writes it: the logits stay in scope during backward().
            let n = x.h.size()[0];
            let logits = x.h.matmul(&x.w.tr()).reshape([1, n, -1]);
            let ref_logits = tch::no_grad(|| x.h_ref.matmul(&x.w_ref.tr())).reshape([1, n, -1]);
            let labels = x.labels.reshape([1, n]);
            let loss =
                tnt_loss(&logits, &ref_logits, &labels, &x.weights, &cfg.with_backend(backend))
                    .expect("tnt_loss")
                    .loss;
            loss.backward();
            return scalar(&loss);
        }
    };
    loss.backward();
    scalar(&loss)
}
