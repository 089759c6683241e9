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


def main():
    gen = torch.Generator().manual_seed(20261207)
    out = dict(
        generated_by="scripts/gen_peer_fixtures.py",
        peers={"trl": TRL_VERSION, "liger-kernel": LIGER_VERSION, "torch": torch.__version__},
        trl=trl_cases(gen),
        liger=liger_cases(gen),
    )
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, separators=(",", ":"))
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {OUT}: {len(out['trl'])} TRL cases, {len(out['liger'])} Liger cases")


if __name__ == "__main__":
    main()
