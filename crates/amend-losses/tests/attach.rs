//! The kernel backend's gradient reaches autograd through a custom autograd function
//! (`src/attach.rs`): whatever the upstream gradient (a sum, a mean, per-token weights, a
//! retained graph, the loss and its per-token values together), the logits' gradient equals the
//! composite backend's.

use amend_losses::token::{
    NllConfig, TntConfig, TntVariant, TokenBackend, TokenWeights, nll_loss, tnt_loss,
};
use amend_losses::{LossOutput, Reduction};
use tch::{Device, Kind, Tensor};

fn inputs() -> (Tensor, Tensor, Tensor, TokenWeights) {
    tch::manual_seed(9);
    let z = Tensor::randn([3, 4, 17], (Kind::Float, Device::Cpu)) * 3.0;
    let zr = Tensor::randn([3, 4, 17], (Kind::Float, Device::Cpu)) * 3.0;
    let y = Tensor::randint(17, [3, 4], (Kind::Int64, Device::Cpu));
    let w = Tensor::from_slice(&[1i64, -1, 0, 1, -1, -1, 1, 0, 0, 1, -1, 1]).view([3, 4]);
    (z, zr, y, TokenWeights::new(&w).unwrap())
}

/// The gradient of `Σ outs` with respect to a fresh leaf copy of `z`: one `backward()` for a
/// single output (autograd accumulates into `.grad`), one retained `run_backward` per output
/// otherwise.
fn grad_of(z: &Tensor, f: impl Fn(&Tensor) -> Vec<Tensor>) -> Tensor {
    let leaf = z.copy().set_requires_grad(true);
    let outs = f(&leaf);
    if let [one] = outs.as_slice() {
        one.backward();
        return leaf.grad();
    }
    let mut total = leaf.zeros_like();
    for o in &outs {
        total += Tensor::run_backward(&[o], &[&leaf], true, false).remove(0);
    }
    total
}

#[track_caller]
fn same(what: &str, a: &Tensor, b: &Tensor) {
    let d = (a - b).abs().max().double_value(&[]);
    let s = b.abs().max().double_value(&[]).max(1e-6);
    assert!(d <= 2e-6 * s, "{what}: max |Δ| = {d:e} (scale {s:e})");
}

#[test]
fn every_upstream_gradient_matches_the_composite() {
    let (z, zr, y, w) = inputs();
    let (zr, y, w) = (&zr, &y, &w);
    let tnt = |backend, reduction| {
        move |l: &Tensor| -> LossOutput {
            let c = TntConfig::new(TntVariant::Rr).with_reduction(reduction).with_backend(backend);
            tnt_loss(l, zr, y, w, &c).unwrap()
        }
    };
    let weights = Tensor::rand([3, 4], (Kind::Float, Device::Cpu));
    for reduction in [Reduction::Sum, Reduction::Mean] {
        let k = tnt(TokenBackend::Kernel, reduction);
        let c = tnt(TokenBackend::Composite, reduction);
        // the reduced loss
        same(
            &format!("{reduction:?} loss"),
            &grad_of(&z, |l| vec![k(l).loss]),
            &grad_of(&z, |l| vec![c(l).loss]),
        );
        // per-token weights on per_example (a non-uniform upstream gradient)
        same(
            &format!("{reduction:?} weighted per_example"),
            &grad_of(&z, |l| vec![(k(l).per_example * &weights).sum(Kind::Float)]),
            &grad_of(&z, |l| vec![(c(l).per_example * &weights).sum(Kind::Float)]),
        );
        // the loss and its per-token values, two backward calls through one retained graph
        let both = |f: &dyn Fn(&Tensor) -> LossOutput| {
            grad_of(&z, |l| {
                let o = f(l);
                vec![o.loss, o.per_example.sum(Kind::Float)]
            })
        };
        same(&format!("{reduction:?} loss + per_example, retained"), &both(&k), &both(&c));
    }
}

#[test]
fn a_retained_graph_backpropagates_twice() {
    let (z, _, y, _) = inputs();
    for reduction in [Reduction::Sum, Reduction::Mean] {
        let leaf = z.copy().set_requires_grad(true);
        let cfg = NllConfig::default().with_reduction(reduction).with_backend(TokenBackend::Kernel);
        let out = nll_loss(&leaf, &y, None, &cfg).unwrap();
        let first = Tensor::run_backward(&[&out.loss], &[&leaf], true, false).remove(0);
        let second = Tensor::run_backward(&[&out.loss], &[&leaf], false, false).remove(0);
        same(&format!("{reduction:?}: the second pass"), &second, &first);
        let c =
            NllConfig::default().with_reduction(reduction).with_backend(TokenBackend::Composite);
        let reference = grad_of(&z, |l| vec![nll_loss(l, &y, None, &c).unwrap().loss]);
        same(&format!("{reduction:?}: the first pass"), &first, &reference);
    }
}

#[test]
fn a_scaled_loss_and_a_non_leaf_input_get_the_right_gradient() {
    let (z, _, y, _) = inputs();
    let k = NllConfig::default().with_backend(TokenBackend::Kernel);
    let c = NllConfig::default().with_backend(TokenBackend::Composite);
    // 3.5 · loss: the upstream gradient is uniform but not 1.
    same(
        "scaled",
        &grad_of(&z, |l| vec![nll_loss(l, &y, None, &k).unwrap().loss * 3.5]),
        &grad_of(&z, |l| vec![nll_loss(l, &y, None, &c).unwrap().loss * 3.5]),
    );
    // logits computed from the leaf (a model's output): the gradient flows on through `* 2`.
    same(
        "non-leaf",
        &grad_of(&z, |l| vec![nll_loss(&(l * 2.0), &y, None, &k).unwrap().loss]),
        &grad_of(&z, |l| vec![nll_loss(&(l * 2.0), &y, None, &c).unwrap().loss]),
    );
}
