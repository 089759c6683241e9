#!/usr/bin/env python3
"""Fixtures from the peers' own code: TRL's DPOTrainer loss and Liger-Kernel's preference losses.

Writes crates/amend-losses/tests/fixtures/peers.json, read by
crates/amend-losses/tests/peer_fixtures.rs. The peers are pinned below; `make peer-fixtures`
installs them into the setup's venv (they do not change torch or transformers) and reruns this
script. When a pin is bumped and a peer's behaviour changed, the regenerated fixtures make the
Rust test fail, which is the point.

TRL: `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) is called as an unbound function on a
stand-in trainer object holding exactly the attributes it reads, with a stand-in model whose
forward returns TRL's fused-LM-head outputs (`log_probs`, `log_sum_sq_probs`, ...) computed from a
float64 logits leaf the way TRL's chunked kernel defines them (log-softmax at the label, zero at
masked positions; log Σ p²). Nothing of TRL's loss code is copied. Gradients are taken with
respect to the logits, so the fixtures check amend's whole path: seq_logps -> (ld_logps) ->
dpo_loss (+ wpo_weights). The reference model is a second stand-in (precompute_ref_log_probs off)
so TRL's own ld_alpha split is applied to it too.

Liger-Kernel: the `preference_loss_fn` static methods of LigerFusedLinearDPOFunction,
LigerFusedLinearCPOFunction and LigerFusedLinearSimPOFunction, on random per-sequence log-probs.

open-unlearning is not on PyPI: its token-level unlearning losses and RMU's activation loss are
written here in torch from the formulas of locuslab/open-unlearning at commit d3d7cf9 (links at
each function), as a PyTorch user of that framework computes them: HF-style unshifted logits and
-100 labels, shifted here.

    make peer-fixtures
"""

import json
import math
import os
import sys
from collections import defaultdict
from types import SimpleNamespace

import torch
import torch.nn.functional as F

TRL_VERSION = "1.16.0"
LIGER_VERSION = "0.8.5"

import trl  # noqa: E402
import liger_kernel  # noqa: E402
from importlib.metadata import version  # noqa: E402

for name, want in (("trl", TRL_VERSION), ("liger_kernel", LIGER_VERSION)):
    got = version(name.replace("_", "-"))
    if got != want:
        sys.exit(f"{name} {got} is installed; these fixtures pin {want} (run `make peer-fixtures`)")

from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from liger_kernel.chunked_loss.cpo_loss import LigerFusedLinearCPOFunction  # noqa: E402
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction  # noqa: E402
from liger_kernel.chunked_loss.simpo_loss import LigerFusedLinearSimPOFunction  # noqa: E402

OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "crates", "amend-losses", "tests", "fixtures", "peers.json"
)

TRL_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]
F_DIV_OK = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}


def flat(t):
    return t.detach().reshape(-1).tolist()


class FakeModel:
    """Stands in for a model patched with TRL's fused LM head: returns TRL's per-token outputs."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, input_ids, labels, **_):
        z = self.logits[:, :-1]
        lab = labels[:, 1:]
        mask = lab != -100
        lsm = z.log_softmax(-1)
        lp = lsm.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        lss = torch.logsumexp(2 * lsm, dim=-1)
        zero = lambda x: x.masked_fill(~mask, 0)  # noqa: E731
        return SimpleNamespace(
            log_probs=zero(lp),
            log_sum_sq_probs=zero(lss),
            entropy=torch.zeros_like(lp),
            mean_logits=zero(z.mean(-1)),
            is_top1=(z.argmax(-1) == lab) & mask,
            aux_loss=None,
        )


def _policy_module():
    m = torch.nn.Module()  # .training is True: TRL logs under "train"
    m.is_gradient_checkpointing = False
    return m


def trl_trainer(cfg, ref_model):
    args = SimpleNamespace(discopop_tau=cfg.get("discopop_tau", 0.05), gradient_checkpointing_kwargs=None)
    return SimpleNamespace(
        model=_policy_module(),
        ref_model=ref_model,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        beta=cfg["beta"],
        loss_types=cfg["loss_type"],
        loss_weights=cfg.get("loss_weights") or [1.0] * len(cfg["loss_type"]),
        ld_alpha=cfg.get("ld_alpha"),
        f_divergence_type=cfg.get("f_divergence_type", "reverse_kl"),
        f_alpha_divergence_coef=cfg.get("f_alpha_divergence_coef", 0.5),
        label_smoothing=cfg.get("label_smoothing", 0.0),
        use_weighting=cfg.get("use_weighting", False),
        args=args,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )


def batch(gen, p, t, v, dtype):
    """A TRL-style concatenated batch: rows 0..p chosen, p..2p rejected; prompt, completion, pad."""
    ids = torch.randint(0, v, (2 * p, t), generator=gen)
    cmask = torch.zeros(2 * p, t, dtype=torch.long)
    for b in range(2 * p):
        prompt = int(torch.randint(1, 3, (1,), generator=gen))
        comp = int(torch.randint(1, t - prompt + 1, (1,), generator=gen))
        cmask[b, prompt : prompt + comp] = 1
    logits = (torch.randn(2 * p, t, v, generator=gen, dtype=torch.float64) * 2).to(dtype)
    ref = (logits.double() + 0.5 * torch.randn(2 * p, t, v, generator=gen, dtype=torch.float64)).to(dtype)
    return ids, cmask, logits, ref


def amend_config(cfg):
    """The same configuration in amend's DpoConfig names (ld_alpha and use_weighting are inputs)."""
    eps = cfg.get("label_smoothing", 0.0)
    # TRL 1.x's sigmoid ignores label_smoothing; amend's `sigmoid` is cDPO, `trl_sigmoid` is TRL's.
    types = ["trl_sigmoid" if (x == "sigmoid" and eps > 0) else x for x in cfg["loss_type"]]
    out = {"beta": cfg["beta"], "loss_type": types, "label_smoothing": eps}
    for k in ("loss_weights", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau"):
        if k in cfg:
            out[k] = cfg[k]
    return out


def trl_case(gen, name, cfg, dtype=torch.float64, p=4, t=6, v=7):
    ids, cmask, logits, ref = batch(gen, p, t, v, dtype)
    leaf = logits.clone().requires_grad_(True)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cmask}
    trainer = trl_trainer(cfg, FakeModel(ref))
    loss = DPOTrainer._compute_loss(trainer, FakeModel(leaf), inputs, return_outputs=False)
    (grad,) = torch.autograd.grad(loss, [leaf])
    m = trainer._metrics["train"]
    return dict(
        name=name,
        peer=f"trl {TRL_VERSION} DPOTrainer._compute_loss",
        dtype="f64" if dtype == torch.float64 else "f32",
        config=amend_config(cfg),
        ld_alpha=cfg.get("ld_alpha"),
        use_weighting=cfg.get("use_weighting", False),
        shape=[2 * p, t, v],
        logits=flat(logits),
        ref_logits=flat(ref),
        input_ids=flat(ids),
        completion_mask=flat(cmask),
        loss=float(loss.detach()),
        grad_logits=flat(grad),
        metrics={k: float(m[k][0]) for k in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                              "rewards/accuracies", "logps/chosen", "logps/rejected")},
    )


def trl_cases(gen):
    cases = []
    for lt in TRL_TYPES:
        eps = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.05, "aot_unpaired": 0.05}.get(lt, 0.0)
        cfg = {"beta": 0.7, "loss_type": [lt], "label_smoothing": eps}
        cases.append(trl_case(gen, f"trl_{lt}", cfg))
        if lt in ("sigmoid", "ipo", "hinge", "discopop"):
            cases.append(trl_case(gen, f"trl_{lt}_beta0.05", {**cfg, "beta": 0.05, "discopop_tau": 0.2}))
    # Mixtures (TRL's loss_type list with loss_weights); a shared label_smoothing that TRL's
    # sigmoid ignores.
    cases.append(trl_case(gen, "trl_mix_sigmoid_sft", {"beta": 0.3, "loss_type": ["sigmoid", "sft"],
                                                       "loss_weights": [1.0, 0.25]}))
    cases.append(trl_case(gen, "trl_mix_sigmoid_bco_sft", {"beta": 0.2, "loss_type": ["sigmoid", "bco_pair", "sft"],
                                                           "loss_weights": [0.8, 0.2, 1.0]}))
    cases.append(trl_case(gen, "trl_mix_sigmoid_exo_smoothed", {"beta": 0.5, "loss_type": ["sigmoid", "exo_pair"],
                                                               "label_smoothing": 0.01}))
    # f-divergences on every loss type TRL allows them with.
    for fd, coef in (("forward_kl", None), ("js_divergence", None), ("alpha_divergence", 0.3),
                     ("alpha_divergence", 1.0)):
        for lt in sorted(F_DIV_OK):
            eps = {"exo_pair": 1e-3, "robust": 0.1}.get(lt, 0.0)
            cfg = {"beta": 0.4, "loss_type": [lt], "label_smoothing": eps, "f_divergence_type": fd}
            if coef is not None:
                cfg["f_alpha_divergence_coef"] = coef
            # TRL's alpha-divergence clamp table has no float64 entry: those cases run in float32.
            dtype = torch.float32 if fd == "alpha_divergence" and coef != 1.0 else torch.float64
            cases.append(trl_case(gen, f"trl_{fd}{'' if coef is None else coef}_{lt}", cfg, dtype=dtype))
    # Length-desensitised DPO and WPO weighting.
    for alpha in (0.0, 0.3, 1.0):
        cases.append(trl_case(gen, f"trl_ld{alpha}_sigmoid", {"beta": 0.5, "loss_type": ["sigmoid"], "ld_alpha": alpha}))
    cases.append(trl_case(gen, "trl_ld0.5_ipo_sft", {"beta": 0.5, "loss_type": ["ipo", "sft"], "ld_alpha": 0.5}))
    # ("sft" with use_weighting raises in TRL 1.16: it multiplies an expanded tensor in place.)
    for lt in ("sigmoid", "ipo", "apo_zero"):
        cases.append(trl_case(gen, f"trl_wpo_{lt}", {"beta": 0.5, "loss_type": [lt], "use_weighting": True}))
    cases.append(trl_case(gen, "trl_wpo_ld_mix", {"beta": 0.5, "loss_type": ["sigmoid", "nca_pair"],
                                                  "loss_weights": [1.0, 0.5], "ld_alpha": 0.4, "use_weighting": True}))
    return cases


def liger_cases(gen):
    cases = []
    for i in range(6):
        p = 5
        s_c = -torch.rand(p, generator=gen, dtype=torch.float64) * 30
        s_r = -torch.rand(p, generator=gen, dtype=torch.float64) * 30
        n_c = torch.randint(1, 20, (p,), generator=gen)
        n_r = torch.randint(1, 20, (p,), generator=gen)
        r_c = s_c + torch.randn(p, generator=gen, dtype=torch.float64) * 3
        r_r = s_r + torch.randn(p, generator=gen, dtype=torch.float64) * 3
        target = torch.zeros(2 * p, 3)
        beta = [0.1, 0.5, 2.0][i % 3]
        common = dict(s_c=flat(s_c), s_r=flat(s_r), n_c=flat(n_c), n_r=flat(n_r), ref_c=flat(r_c), ref_r=flat(r_r))

        def run(fn, *args, **kw):
            a, b = s_c.clone().requires_grad_(True), s_r.clone().requires_grad_(True)
            xa, xb = (a / n_c, b / n_r) if kw.pop("average", False) else (a, b)
            loss = fn(xa, xb, target, *args, **kw)[0]
            ga, gb = torch.autograd.grad(loss, [a, b])
            return dict(loss=float(loss.detach()), grad_c=flat(ga), grad_r=flat(gb))

        for lt in ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                   "apo_down", "discopop"):
            eps = {"exo_pair": 1e-3, "robust": 0.2}.get(lt, 0.0)
            r = run(LigerFusedLinearDPOFunction.preference_loss_fn, r_c, r_r, beta=beta, loss_type=lt,
                    label_smoothing=eps, discopop_tau=0.05)
            cases.append(dict(name=f"liger_dpo_{lt}_{i}", peer=f"liger-kernel {LIGER_VERSION} DPO preference_loss_fn",
                              loss_fn="dpo", config={"beta": beta, "loss_type": lt, "label_smoothing": eps},
                              **common, **r))
        eps = [0.0, 0.1, 0.3][i % 3]
        r = run(LigerFusedLinearCPOFunction.preference_loss_fn, beta=beta, label_smoothing=eps)
        cases.append(dict(name=f"liger_cpo_{i}", peer=f"liger-kernel {LIGER_VERSION} CPO preference_loss_fn",
                          loss_fn="cpo", config={"beta": beta, "label_smoothing": eps, "cpo_alpha": 0.0},
                          **common, **r))
        gamma = [0.5, 1.0, 0.0][i % 3]
        r = run(LigerFusedLinearSimPOFunction.preference_loss_fn, beta=beta, gamma=gamma, label_smoothing=eps,
                average=True)
        cases.append(dict(name=f"liger_simpo_{i}", peer=f"liger-kernel {LIGER_VERSION} SimPO preference_loss_fn",
                          loss_fn="simpo", config={"beta": beta, "gamma": gamma, "label_smoothing": eps},
                          **common, **r))
    return cases


OU = "https://github.com/locuslab/open-unlearning/blob/d3d7cf9"


def ou_ceu(logits, labels, n_first=1):
    # OU/src/trainer/unlearn/ceu.py: cross_entropy_unlearning_loss, compute_batch_ceu
    valid = labels != -100
    drop = (valid.cumsum(-1) <= n_first) & valid
    labels = labels.masked_fill(drop, -100)
    z, y = logits[:, :-1], labels[:, 1:]
    m = y != -100
    zv, yv = z[m], y[m]
    t = zv.detach().clone().scatter(-1, yv.unsqueeze(-1), float("-inf")).softmax(-1)
    return F.cross_entropy(zv, t)


def ou_undial(logits, ref_logits, labels, beta):
    # OU/src/trainer/utils.py#L70 compute_undial_loss (every position, as there)
    z, zr, y = logits[:, :-1], ref_logits[:, :-1], labels[:, 1:]
    mask = torch.zeros_like(zr)
    mask.scatter_(-1, y.unsqueeze(-1), 1.0)
    soft = F.softmax(zr - mask * beta, dim=-1)
    return F.cross_entropy(z.reshape(-1, z.size(-1)), soft.reshape(-1, soft.size(-1)), reduction="none").mean()


def ou_weighted(logits, labels, weight):
    # OU/src/trainer/utils.py#L102 compute_wga_loss, #L118 compute_satimp_loss
    z, y = logits[:, :-1], labels[:, 1:]
    ce = F.cross_entropy(z.reshape(-1, z.size(-1)), y.reshape(-1), ignore_index=-100, reduction="none")
    w = weight((-ce).exp().detach())
    return -(w * ce)[y.reshape(-1) != -100].mean()


def ou_activation_loss(a, b, mask):
    # OU/src/trainer/unlearn/rmu.py: RMU.compute_activation_loss
    sq = F.mse_loss(a, b, reduction="none")
    s = (sq * mask.unsqueeze(-1).expand_as(sq)).mean(dim=2).sum(dim=1)
    return (s / mask.sum(dim=-1)).mean()


def unlearning_cases(gen):
    cases = []
    for i in range(4):
        b, t, v = 3, 6, 9
        logits = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * 2
        ref = logits + torch.randn(b, t, v, generator=gen, dtype=torch.float64)
        labels = torch.randint(0, v, (b, t), generator=gen)
        prompt = torch.randint(1, 3, (b,), generator=gen)
        pad = torch.randint(0, 2, (b,), generator=gen)
        masked = labels.clone()
        for r in range(b):
            masked[r, : prompt[r]] = -100
            if pad[r]:
                masked[r, t - 1] = -100
        if i == 3:
            logits[0, 2, masked[0, 3].clamp(min=0)] += 30.0  # a token the model is sure of
        common = dict(shape=[b, t, v], logits=flat(logits), ref_logits=flat(ref))

        def run(name, fn, lab, cfg):
            leaf = logits.clone().requires_grad_(True)
            loss = fn(leaf, lab)
            (g,) = torch.autograd.grad(loss, [leaf])
            cases.append(dict(name=f"{name}_{i}", peer="open-unlearning d3d7cf9 (formulas)", loss_fn=name,
                              config=cfg, labels=flat(lab), loss=float(loss.detach()), grad_logits=flat(g),
                              **common))

        run("ceu", lambda z, y: ou_ceu(z, y, 1), masked, {})
        run("ceu", lambda z, y: ou_ceu(z, y, 0), masked, {"ignore_first_n_answer_tokens": 0})
        beta = [10.0, 1.0, 3.0, 0.5][i]
        run("undial", lambda z, y: ou_undial(z, ref, y, beta), labels, {"beta": beta})
        wb = [1.0, 0.5, 2.0, 0.0][i]
        run("wga", lambda z, y: ou_weighted(z, y, lambda p: p ** wb), masked, {"beta": wb})
        b1, b2 = [(5.0, 1.0), (1.0, 2.0), (0.5, 0.0), (2.0, 3.0)][i]
        run("satimp", lambda z, y: ou_weighted(z, y, lambda p: p ** b1 * (1 - p) ** b2), masked,
            {"beta1": b1, "beta2": b2})
    for i in range(3):
        b, t, d = 2 + i, 5, 8
        hf = torch.randn(b, t, d, generator=gen, dtype=torch.float64)
        hr = torch.randn(b + 1, t, d, generator=gen, dtype=torch.float64)
        hr_ref = hr + 0.3 * torch.randn(b + 1, t, d, generator=gen, dtype=torch.float64)
        mf = torch.rand(b, t, generator=gen) > 0.3
        mf[:, 0] = True
        mr = torch.rand(b + 1, t, generator=gen) > 0.3
        mr[:, 1] = True
        u = torch.rand(1, 1, d, generator=gen, dtype=torch.float64)
        control = u / torch.norm(u) * [2.0, 6.5, 20.0][i]
        gamma, alpha = [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)][i]
        a, c = hf.clone().requires_grad_(True), hr.clone().requires_grad_(True)
        loss = gamma * ou_activation_loss(a, control.expand_as(a), mf) + alpha * ou_activation_loss(c, hr_ref, mr)
        ga, gc = torch.autograd.grad(loss, [a, c])
        cases.append(dict(name=f"rmu_{i}", peer="open-unlearning d3d7cf9 (formulas)", loss_fn="rmu",
                          config={"gamma": gamma, "alpha": alpha}, forget_hidden=flat(hf), forget_shape=[b, t, d],
                          forget_mask=flat(mf.long()), control=flat(control), retain_hidden=flat(hr),
                          retain_ref_hidden=flat(hr_ref), retain_shape=[b + 1, t, d], retain_mask=flat(mr.long()),
                          loss=float(loss.detach()), grad_forget=flat(ga), grad_retain=flat(gc)))
    return cases


def main():
    gen = torch.Generator().manual_seed(20261207)
    out = dict(
        generated_by="scripts/gen_peer_fixtures.py",
        peers={"trl": TRL_VERSION, "liger-kernel": LIGER_VERSION, "torch": torch.__version__},
        trl=trl_cases(gen),
        liger=liger_cases(gen),
        open_unlearning=unlearning_cases(gen),
    )
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}: {len(out['trl'])} TRL, {len(out['liger'])} Liger, "
          f"{len(out['open_unlearning'])} open-unlearning cases")


if __name__ == "__main__":
    main()
