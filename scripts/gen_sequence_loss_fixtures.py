#!/usr/bin/env python3
"""Fixtures for the sequence-level losses of amend-losses, computed independently in PyTorch.

Writes crates/amend-losses/tests/fixtures/sequence_losses.json, read by
crates/amend-losses/tests/sequence_fixtures.rs. CI never runs this script; rerun it by hand and
commit the result when a loss changes:

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_sequence_loss_fixtures.py

Everything is float64 and written the way a PyTorch user would write it, following the sources
named in specs/sequence-losses.md (TRL's dpo_trainer / cpo_trainer / orpo_trainer / kto_trainer,
princeton-nlp/SimPO, locuslab/open-unlearning, GanjinZero/RRHF, the contrastive-perplexity
train_mistral.py compute_loss), not by translating the Rust code: full log_softmax + gather for
the primitive, torch.nn.functional.cross_entropy with label_smoothing for CP's reference form,
explicit Python loops over candidate pairs for RRHF/NEAT. Gradients come from torch autograd.

Inputs are random (shapes, masks, ties) with some extreme values (saturated sigmoids, large
logits, -inf vocabulary entries, A close to 0 for ORPO). JSON cannot hold infinities: -inf logits
are written as null.
"""

import json
import math
import os
import sys

import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
OUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "..",
    "crates",
    "amend-losses",
    "tests",
    "fixtures",
    "sequence_losses.json",
)


def flat(t):
    return [None if (isinstance(x, float) and math.isinf(x) and x < 0) else x for x in t.detach().reshape(-1).tolist()]


def leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


def grad_of(loss, *xs):
    gs = torch.autograd.grad(loss, xs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, gs)]


def mean_metric(x, mask=None):
    x = x.detach()
    if mask is None:
        return float(x.mean()) if x.numel() else 0.0
    return float(x[mask].sum() / mask.sum()) if mask.any() else 0.0


# --------------------------------------------------------------------------- primitive


def seq_logps_cases(gen):
    cases = []
    shapes = [(2, 5, 7), (3, 9, 31), (1, 2, 4), (4, 12, 50), (2, 6, 5)]
    for i, (b, t, v) in enumerate(shapes):
        logits = torch.randn(b, t, v, generator=gen) * [1.0, 3.0, 1.0, 10.0, 2.0][i]
        ids = torch.randint(0, v, (b, t), generator=gen)
        mask = torch.randint(0, 2, (b, t), generator=gen)
        if i == 3:
            logits[0, 2, :] *= 400.0  # extreme row (magnitudes ~1e4)
            mask[1, :] = 0  # a fully masked sequence
        if i == 4:
            # -inf vocabulary entries away from the targets
            for bb in range(b):
                for tt in range(t - 1):
                    y = int(ids[bb, tt + 1])
                    logits[bb, tt, (y + 1) % v] = -math.inf
        weights = torch.randn(b, generator=gen)
        x = logits.clone().requires_grad_(True)
        lsm = torch.log_softmax(x[:, :-1], dim=-1)  # the composite a PyTorch user writes
        lp = lsm.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        m = mask[:, 1:].bool()
        lp = torch.where(m, lp, torch.zeros_like(lp))
        s = lp.sum(-1)
        (g,) = grad_of((s * weights).sum(), x)
        cases.append(
            dict(
                name=f"seq_logps_{i}",
                shape=[b, t, v],
                logits=flat(logits),
                input_ids=ids.reshape(-1).tolist(),
                completion_mask=mask.reshape(-1).tolist(),
                weights=weights.tolist(),
                sum=s.tolist(),
                len=m.sum(-1).tolist(),
                per_token=lp.reshape(-1).tolist(),
                grad_logits=g.reshape(-1).tolist(),
            )
        )
    return cases


# --------------------------------------------------------------------------- pairs


def random_pairs(gen, p, extreme=False):
    n_c = torch.randint(1, 12, (p,), generator=gen)
    n_r = torch.randint(1, 12, (p,), generator=gen)
    s_c = -torch.rand(p, generator=gen) * 3 * n_c
    s_r = -torch.rand(p, generator=gen) * 3 * n_r
    r_c = s_c - torch.randn(p, generator=gen)
    r_r = s_r - torch.randn(p, generator=gen)
    if extreme:
        s_c[0], r_c[0] = -5.0, -900.0  # beta*h very large: saturated sigmoid
        s_r[1], r_r[1] = -5.0, -2000.0  # very negative h
    return s_c, n_c, s_r, n_r, r_c, r_r


def dpo_family(cfg, s_c, n_c, s_r, n_r, r_c, r_r):
    beta = cfg.get("beta", 0.1)
    lt = cfg.get("loss_type", "sigmoid")
    eps = cfg.get("label_smoothing", 0.0)
    # trl/trainer/dpo_trainer.py
    chosen_logratios = s_c - r_c
    rejected_logratios = s_r - r_r
    logits = chosen_logratios - rejected_logratios
    if lt == "sigmoid":  # legacy TRL sigmoid with label_smoothing (cDPO)
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif lt == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif lt == "ipo":
        if cfg.get("ipo_length_normalize", True):
            logits = chosen_logratios / n_c - rejected_logratios / n_r
        losses = (logits - 1 / (2 * beta)) ** 2
    elif lt == "hinge":
        losses = torch.relu(1 - beta * logits)
    rc = beta * chosen_logratios.detach()
    rr = beta * rejected_logratios.detach()
    metrics = {
        "rewards/chosen": mean_metric(rc),
        "rewards/rejected": mean_metric(rr),
        "rewards/margins": mean_metric(rc - rr),
        "rewards/accuracies": mean_metric((rc > rr).double()),
        "logps/chosen": mean_metric(s_c),
        "logps/rejected": mean_metric(s_r),
    }
    return losses, metrics


def simpo(cfg, s_c, n_c, s_r, n_r):
    beta = cfg.get("beta", 2.0)
    gamma = cfg.get("gamma", cfg.get("simpo_gamma", 0.5))
    eps = cfg.get("label_smoothing", 0.0)
    w = cfg.get("nll_weight", cfg.get("cpo_alpha", 0.0))
    a_c, a_r = s_c / n_c, s_r / n_r
    # princeton-nlp/SimPO scripts/simpo_trainer.py simpo_loss
    logits = a_c - a_r - gamma / beta
    losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    nll = -s_c.sum() / n_c.sum()
    loss = losses.mean() + (w * nll if w > 0 else 0.0)
    rc, rr = beta * a_c.detach(), beta * a_r.detach()
    metrics = {
        "rewards/chosen": mean_metric(rc),
        "rewards/rejected": mean_metric(rr),
        "rewards/margins": mean_metric(rc - rr),
        "rewards/accuracies": mean_metric((rc > rr).double()),
        "logps/chosen": mean_metric(a_c),
        "logps/rejected": mean_metric(a_r),
        "nll_loss": float(nll.detach()),
    }
    return losses, loss, metrics


def orpo(cfg, s_c, n_c, s_r, n_r, s_nll, n_nll):
    lam = cfg.get("beta", 0.1)
    a_c, a_r = s_c / n_c, s_r / n_r
    # trl/experimental/orpo/orpo_trainer.py odds_ratio_loss, with the spec's clamp of A at -1e-6
    hc, hr = torch.clamp(a_c, max=-1e-6), torch.clamp(a_r, max=-1e-6)

    def log1mexp(x):
        return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))

    log_odds = (a_c - a_r) - (log1mexp(hc) - log1mexp(hr))
    ratio = F.logsigmoid(log_odds)
    losses = -lam * ratio
    nll = -s_nll.sum() / n_nll.sum()
    loss = losses.mean() + nll
    rc, rr = lam * a_c.detach(), lam * a_r.detach()
    metrics = {
        "rewards/chosen": mean_metric(rc),
        "rewards/rejected": mean_metric(rr),
        "rewards/margins": mean_metric(rc - rr),
        "rewards/accuracies": mean_metric((rc > rr).double()),
        "logps/chosen": mean_metric(a_c),
        "logps/rejected": mean_metric(a_r),
        "log_odds_ratio": mean_metric(ratio),
        "log_odds_chosen": mean_metric(log_odds),
        "nll_loss": float(nll.detach()),
    }
    return losses, loss, metrics


def pair_cases(gen):
    dpo, sim, orp = [], [], []
    configs = [
        {},
        {"beta": 0.5},
        {"label_smoothing": 0.2},
        {"loss_type": "robust", "label_smoothing": 0.1},
        {"loss_type": "robust", "label_smoothing": 0.3, "beta": 0.05},
        {"loss_type": "ipo"},
        {"loss_type": "ipo", "beta": 1.0, "ipo_length_normalize": False},
        {"loss_type": "hinge", "beta": 0.3},
    ]
    for i, cfg in enumerate(configs):
        for extreme in (False, True):
            p = 3 + (i % 4)
            s_c, n_c, s_r, n_r, r_c, r_r = random_pairs(gen, p, extreme)
            sc, sr = leaf(s_c.tolist()), leaf(s_r.tolist())
            losses, metrics = dpo_family(cfg, sc, n_c, sr, n_r, r_c, r_r)
            loss = losses.mean()
            gc, gr = grad_of(loss, sc, sr)
            dpo.append(
                dict(
                    name=f"dpo_{i}_{'extreme' if extreme else 'plain'}",
                    config=cfg,
                    chosen_sum=s_c.tolist(),
                    chosen_len=n_c.tolist(),
                    rejected_sum=s_r.tolist(),
                    rejected_len=n_r.tolist(),
                    ref_chosen=r_c.tolist(),
                    ref_rejected=r_r.tolist(),
                    loss=float(loss.detach()),
                    per_example=losses.tolist(),
                    grad_chosen=gc.tolist(),
                    grad_rejected=gr.tolist(),
                    metrics=metrics,
                )
            )
    simpo_configs = [
        {},
        {"beta": 2.5, "gamma": 1.375},
        {"beta": 0.1, "simpo_gamma": 0.5, "cpo_alpha": 1.0},
        {"beta": 10.0, "gamma": 3.0, "label_smoothing": 0.1, "nll_weight": 0.5},
    ]
    for i, cfg in enumerate(simpo_configs):
        s_c, n_c, s_r, n_r, _, _ = random_pairs(gen, 4, extreme=(i == 3))
        sc, sr = leaf(s_c.tolist()), leaf(s_r.tolist())
        losses, loss, metrics = simpo(cfg, sc, n_c, sr, n_r)
        gc, gr = grad_of(loss, sc, sr)
        sim.append(
            dict(
                name=f"simpo_{i}",
                config=cfg,
                chosen_sum=s_c.tolist(),
                chosen_len=n_c.tolist(),
                rejected_sum=s_r.tolist(),
                rejected_len=n_r.tolist(),
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_chosen=gc.tolist(),
                grad_rejected=gr.tolist(),
                metrics=metrics,
            )
        )
    for i, cfg in enumerate([{}, {"beta": 0.25}, {"beta": 1.0}]):
        s_c, n_c, s_r, n_r, _, _ = random_pairs(gen, 5)
        if i == 2:
            s_c[0] = -1e-8 * n_c[0]  # A_c ~ -1e-8: clamped
            s_r[1] = -60.0 * n_r[1]  # very unlikely rejected
        n_nll = n_c + torch.randint(1, 6, (5,), generator=gen)
        s_nll = s_c - torch.rand(5, generator=gen) * 4
        sc, sr, sn = leaf(s_c.tolist()), leaf(s_r.tolist()), leaf(s_nll.tolist())
        losses, loss, metrics = orpo(cfg, sc, n_c, sr, n_r, sn, n_nll)
        gc, gr, gn = grad_of(loss, sc, sr, sn)
        orp.append(
            dict(
                name=f"orpo_{i}",
                config=cfg,
                chosen_sum=s_c.tolist(),
                chosen_len=n_c.tolist(),
                rejected_sum=s_r.tolist(),
                rejected_len=n_r.tolist(),
                nll_sum=s_nll.tolist(),
                nll_len=n_nll.tolist(),
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_chosen=gc.tolist(),
                grad_rejected=gr.tolist(),
                grad_nll=gn.tolist(),
                metrics=metrics,
            )
        )
    return dpo, sim, orp


# --------------------------------------------------------------------------- KTO


def kto_cases(gen):
    cases = []
    configs = [
        ({}, "estimate"),
        ({"beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 1.0}, "estimate"),
        ({"beta": 0.1}, 0.7),
        ({"loss_type": "apo_zero_unpaired", "beta": 0.2}, 0.0),
    ]
    for i, (cfg, z_mode) in enumerate(configs):
        b = 6
        s = -torch.rand(b, generator=gen) * 30
        r = s - torch.randn(b, generator=gen) * 3
        des = torch.tensor([True, False, True, True, False, i == 3])
        kl_p = -torch.rand(b, generator=gen) * 30
        kl_r = kl_p - torch.randn(b, generator=gen)
        beta = cfg.get("beta", 0.1)
        wd, wu = cfg.get("desirable_weight", 1.0), cfg.get("undesirable_weight", 1.0)
        # trl/trainer/kto_trainer.py kto_loss
        if cfg.get("loss_type", "kto") == "kto":
            z = max(0.0, float((kl_p - kl_r).mean())) if z_mode == "estimate" else z_mode
        else:
            z = 0.0
        sl = leaf(s.tolist())
        rho = sl - r
        if cfg.get("loss_type", "kto") == "kto":
            ld = 1 - torch.sigmoid(beta * (rho - z))
            lu = 1 - torch.sigmoid(beta * (z - rho))
        else:
            ld = 1 - torch.sigmoid(beta * rho)
            lu = torch.sigmoid(beta * rho)
        losses = torch.where(des, wd * ld, wu * lu)
        loss = losses.mean()
        (g,) = grad_of(loss, sl)
        rew = beta * rho.detach()
        metrics = {
            "rewards/chosen": mean_metric(rew, des),
            "rewards/rejected": mean_metric(rew, ~des),
            "logps/chosen": mean_metric(s, des),
            "logps/rejected": mean_metric(s, ~des),
        }
        if cfg.get("loss_type", "kto") == "kto":
            metrics["kl"] = z
        cases.append(
            dict(
                name=f"kto_{i}",
                config=cfg,
                policy_sum=s.tolist(),
                reference=r.tolist(),
                desirable=des.tolist(),
                policy_kl=kl_p.tolist() if z_mode == "estimate" else None,
                reference_kl=kl_r.tolist() if z_mode == "estimate" else None,
                z=None if z_mode == "estimate" else z_mode,
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad=g.tolist(),
                metrics=metrics,
            )
        )
    return cases


# --------------------------------------------------------------------------- unlearning


def unlearning_cases(gen):
    npo, simnpo, ga = [], [], []
    for i, cfg in enumerate([{}, {"beta": 1.0, "retain_weight": 0.5}, {"beta": 0.05, "gamma": 2.0, "alpha": 0.0}]):
        b = 5
        n = torch.randint(1, 20, (b,), generator=gen)
        s = -torch.rand(b, generator=gen) * 4 * n
        r = s + torch.randn(b, generator=gen) * 5
        rn = torch.randint(1, 10, (3,), generator=gen)
        rs = -torch.rand(3, generator=gen) * 2 * rn
        sl, rl = leaf(s.tolist()), leaf(rs.tolist())
        beta = cfg.get("beta", 0.1)
        fw = cfg.get("forget_weight", cfg.get("gamma", 1.0))
        rw = cfg.get("retain_weight", cfg.get("alpha", 1.0))
        # locuslab/open-unlearning src/trainer/utils.py compute_dpo_loss (no winner)
        neg_log_ratios = sl - r
        losses = -2 / beta * F.logsigmoid(-beta * neg_log_ratios)
        retain = -rl.sum() / rn.sum()
        loss = fw * losses.mean() + rw * retain
        gs, gr = grad_of(loss, sl, rl)
        npo.append(
            dict(
                name=f"npo_{i}",
                config=cfg,
                forget_sum=s.tolist(),
                forget_len=n.tolist(),
                forget_ref=r.tolist(),
                retain_sum=rs.tolist(),
                retain_len=rn.tolist(),
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_forget=gs.tolist(),
                grad_retain=gr.tolist(),
                metrics={"npo/weight": mean_metric(2 * torch.sigmoid(beta * neg_log_ratios)), "forget_loss": mean_metric(losses)},
            )
        )
    for i, cfg in enumerate([{}, {"beta": 2.0, "delta": 1.5, "gamma": 1.0}, {"beta": 20.0, "delta": -0.5, "forget_weight": 0.3, "retain_weight": 2.0}]):
        b = 5
        n = torch.randint(1, 20, (b,), generator=gen)
        s = -torch.rand(b, generator=gen) * 4 * n
        rn = torch.randint(1, 10, (3,), generator=gen)
        rs = -torch.rand(3, generator=gen) * 2 * rn
        sl, rl = leaf(s.tolist()), leaf(rs.tolist())
        beta, delta = cfg.get("beta", 4.5), cfg.get("delta", 0.0)
        fw = cfg.get("forget_weight", cfg.get("gamma", 0.125))
        rw = cfg.get("retain_weight", cfg.get("alpha", 1.0))
        # open-unlearning simnpo.py: loss = -2/beta * logsigmoid(beta * (nll/len - delta))... with
        # nll/len = -A  (forget_loss = -logsigmoid(beta * loss - delta) form, delta inside β here)
        nu = -sl / n
        losses = -2 / beta * F.logsigmoid(beta * (nu - delta))
        retain = -rl.sum() / rn.sum()
        loss = fw * losses.mean() + rw * retain
        gs, gr = grad_of(loss, sl, rl)
        simnpo.append(
            dict(
                name=f"simnpo_{i}",
                config=cfg,
                forget_sum=s.tolist(),
                forget_len=n.tolist(),
                retain_sum=rs.tolist(),
                retain_len=rn.tolist(),
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_forget=gs.tolist(),
                grad_retain=gr.tolist(),
                metrics={"forget_loss": mean_metric(losses)},
            )
        )
    for i, cfg in enumerate([{}, {"norm": "sequence"}, {"norm": "sequence_sum", "forget_weight": 0.5}]):
        b = 4
        n = torch.randint(1, 15, (b,), generator=gen)
        s = -torch.rand(b, generator=gen) * 3 * n
        sl = leaf(s.tolist())
        norm = cfg.get("norm", "token")
        if norm == "token":
            per, l = sl, sl.sum() / n.sum()
        elif norm == "sequence":
            per = sl / n
            l = per.mean()
        else:
            per, l = sl, sl.mean()
        loss = cfg.get("forget_weight", 1.0) * l
        (g,) = grad_of(loss, sl)
        ga.append(
            dict(
                name=f"ga_{i}",
                config=cfg,
                forget_sum=s.tolist(),
                forget_len=n.tolist(),
                loss=float(loss.detach()),
                per_example=per.tolist(),
                grad_forget=g.tolist(),
            )
        )
    return npo, simnpo, ga


# --------------------------------------------------------------------------- CP


def cp_paper(phi_pos, m_pos, phi_neg, m_neg, phi_rnd, m_rnd, tau, alpha, beta, detach):
    g = phi_pos.shape[0]
    losses = []
    for i in range(g):
        pp = phi_pos[i][m_pos[i]]
        pn = phi_neg[i][m_neg[i]]
        pr = phi_rnd[i][m_rnd[i]] if phi_rnd is not None else phi_pos.new_zeros(0)
        c = pp.mean()
        if detach:
            c = c.detach()
        zp = -(pp - c).abs() / tau
        zo = torch.cat([-(pn - c).abs() / tau + math.log(alpha), -(pr - c).abs() / tau])
        if zo.numel() == 0:
            losses.append(torch.zeros((), dtype=torch.float64) * pp.sum())
        else:
            losses.append(-torch.logsumexp(zp, 0) + torch.logsumexp(torch.cat([zp, zo]), 0))
    return beta * torch.stack(losses)


def cp_reference(phi_pos, phi_neg, phi_rnd, tau, alpha, beta, eps):
    # SAP-samples/acl2025-contrastive-perplexity train_mistral.py compute_loss: shared prototype,
    # exp-of-exp logits, additive alpha on hard negatives, multi-hot targets through
    # nn.CrossEntropyLoss(label_smoothing=eps) with probability targets, divisor p + 1 + r.
    b, p = phi_pos.shape
    n = phi_neg.shape[1]
    r = phi_rnd.shape[1] if phi_rnd is not None else 0
    c = phi_pos.mean()
    parts = [torch.exp(-(phi_pos - c).abs()) / tau, torch.exp(-(phi_neg - c).abs()) / tau + alpha]
    if phi_rnd is not None:
        parts.append(torch.exp(-(phi_rnd - c).abs()) / tau)
    z = torch.cat(parts, 1)
    y = torch.cat([torch.ones(b, p), torch.zeros(b, n + r)], 1)
    ce = F.cross_entropy(z, y, label_smoothing=eps, reduction="none")
    return beta * ce / (p + 1 + r)


def cp_cases(gen):
    cases = []
    for i in range(6):
        g, p, n = [(2, 3, 4), (3, 2, 2), (1, 1, 3), (4, 3, 0), (2, 4, 5), (3, 2, 3)][i]
        phi_pos = torch.rand(g, p, generator=gen) * 3 + 0.5
        phi_neg = torch.rand(g, n, generator=gen) * 4 + 0.5
        m_pos = torch.rand(g, p, generator=gen) > 0.3
        m_pos[:, 0] = True
        m_neg = torch.rand(g, n, generator=gen) > 0.3
        with_rnd = i in (1, 4)
        phi_rnd = torch.rand(g, 2, generator=gen) * 4 if with_rnd else None
        m_rnd = torch.rand(g, 2, generator=gen) > 0.2 if with_rnd else None
        cfg = [
            {},
            {"tau": 0.5, "alpha": 1.1},
            {"detach_prototype": True, "beta": 2.0},
            {},
            {"tau": 2.0, "alpha": 0.7},
            {"tau": 0.2},
        ][i]
        lp, ln_ = leaf(phi_pos.tolist()), leaf(phi_neg.tolist()) if n else leaf(phi_neg.tolist()).reshape(g, 0)
        lr = leaf(phi_rnd.tolist()) if with_rnd else None
        losses = cp_paper(
            lp, m_pos, ln_, m_neg, lr, m_rnd, cfg.get("tau", 1.0), cfg.get("alpha", 1.0), cfg.get("beta", 1.0), cfg.get("detach_prototype", False)
        )
        loss = losses.mean()
        grads = grad_of(loss, lp, ln_, *([lr] if with_rnd else []))
        cases.append(
            dict(
                name=f"cp_paper_{i}",
                config=cfg,
                shape=[g, p, n, 2 if with_rnd else 0],
                phi_pos=phi_pos.reshape(-1).tolist(),
                mask_pos=m_pos.reshape(-1).tolist(),
                phi_neg=phi_neg.reshape(-1).tolist(),
                mask_neg=m_neg.reshape(-1).tolist(),
                phi_rnd=phi_rnd.reshape(-1).tolist() if with_rnd else None,
                mask_rnd=m_rnd.reshape(-1).tolist() if with_rnd else None,
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_pos=grads[0].reshape(-1).tolist(),
                grad_neg=grads[1].reshape(-1).tolist(),
                grad_rnd=grads[2].reshape(-1).tolist() if with_rnd else None,
            )
        )
    ref_cfgs = [
        {"form": "reference"},
        {"form": "reference", "alpha": 0.0, "label_smoothing": 0.1},
        {"form": "reference", "tau": 0.5, "label_smoothing": 0.3, "beta": 0.5},
        {"form": "reference", "alpha": 2.0},
    ]
    for i, cfg in enumerate(ref_cfgs):
        b, p, n, r = [(2, 6, 6, 6), (1, 2, 2, 0), (3, 3, 2, 1), (2, 5, 5, 6)][i]
        phi_pos = torch.rand(b, p, generator=gen) * 3 + 1
        phi_neg = torch.rand(b, n, generator=gen) * 4 + 1
        phi_rnd = torch.rand(b, r, generator=gen) * 4 + 1 if r else None
        lp, ln_ = leaf(phi_pos.tolist()), leaf(phi_neg.tolist())
        lr = leaf(phi_rnd.tolist()) if r else None
        losses = cp_reference(lp, ln_, lr, cfg.get("tau", 1.0), cfg.get("alpha", 100.0), cfg.get("beta", 1.0), cfg.get("label_smoothing", 0.0))
        loss = losses.mean()
        grads = grad_of(loss, lp, ln_, *([lr] if r else []))
        cases.append(
            dict(
                name=f"cp_reference_{i}",
                config=cfg,
                shape=[b, p, n, r],
                phi_pos=phi_pos.reshape(-1).tolist(),
                mask_pos=None,
                phi_neg=phi_neg.reshape(-1).tolist(),
                mask_neg=None,
                phi_rnd=phi_rnd.reshape(-1).tolist() if r else None,
                mask_rnd=None,
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad_pos=grads[0].reshape(-1).tolist(),
                grad_neg=grads[1].reshape(-1).tolist(),
                grad_rnd=grads[2].reshape(-1).tolist() if r else None,
            )
        )
    # The spec's label-smoothing vector (§3.5, "confirm vs torch"): one row, alpha = 0, eps = 0.1.
    lp, ln_ = leaf([[2.0, 1.5]]), leaf([[3.0, 4.0 / 3.0]])
    l = cp_reference(lp, ln_, None, 1.0, 0.0, 1.0, 0.1).mean()
    gp, gn = grad_of(l, lp, ln_)
    spec_check = dict(loss=float(l), grad=gp.reshape(-1).tolist() + gn.reshape(-1).tolist())
    return cases, spec_check


# --------------------------------------------------------------------------- RRHF / NEAT


def rank_group(s, n, r, valid, eligible, lam, w_rank, w_sft, sft_norm):
    """One query group, written as loops over candidate pairs (RRHF train.py, Eqs. 1-5)."""
    k = len(r)
    idx = [i for i in range(k) if valid[i]]
    p = {i: s[i] / (float(n[i]) ** lam) for i in idx}
    l_rank = s.sum() * 0.0
    for i in idx:
        for j in idx:
            if r[i] < r[j]:
                l_rank = l_rank + torch.relu(p[i] - p[j])
    elig = [i for i in idx if eligible[i]]
    if elig:
        best_r = max(r[i] for i in elig)
        best = min(i for i in elig if r[i] == best_r)
        if sft_norm == "token_mean":
            l_sft = -s[best] / float(n[best])
        elif sft_norm == "sum":
            l_sft = -s[best]
        else:
            l_sft = -s[best] / float(sft_norm["padded_row_mean"]["t_pad"])
    else:
        l_sft = s.sum() * 0.0
    return w_rank * l_rank + w_sft * l_sft


def ranking_cases(gen):
    rrhf, neat = [], []
    for i in range(6):
        g, k = [(1, 4), (3, 5), (2, 6), (4, 3), (2, 7), (3, 4)][i]
        n = torch.randint(1, 10, (g, k), generator=gen)
        s = -torch.rand(g, k, generator=gen) * 2 * n
        r = torch.randint(0, 4, (g, k), generator=gen).double() * 0.5  # many ties
        mask = torch.rand(g, k, generator=gen) > 0.15
        mask[:, 0] = True
        cfg = [
            {},
            {"length_penalty": 0.0},
            {"sft_norm": "sum", "rank_weight": 2.0},
            {"sft_norm": {"padded_row_mean": {"t_pad": 16}}, "rrhf_weight": 0.5},
            {"length_penalty": 0.5, "sft_weight": 0.0},
            {},
        ][i]
        sl = leaf(s.tolist())
        lam = cfg.get("length_penalty", 1.0)
        w_rank = cfg.get("rank_weight", cfg.get("rrhf_weight", 1.0))
        w_sft = cfg.get("sft_weight", 1.0)
        norm = cfg.get("sft_norm", "token_mean")
        losses = torch.stack(
            [rank_group(sl[gg], n[gg], r[gg].tolist(), mask[gg].tolist(), mask[gg].tolist(), lam, w_rank, w_sft, norm) for gg in range(g)]
        )
        loss = losses.mean()
        (gs,) = grad_of(loss, sl)
        rrhf.append(
            dict(
                name=f"rrhf_{i}",
                config=cfg,
                shape=[g, k],
                sum=s.reshape(-1).tolist(),
                len=n.reshape(-1).tolist(),
                rewards=r.reshape(-1).tolist(),
                mask=mask.reshape(-1).tolist(),
                origin=None,
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad=gs.reshape(-1).tolist(),
            )
        )
    for i in range(6):
        g, k = [(2, 6), (3, 5), (1, 4), (2, 8), (3, 6), (2, 3)][i]
        n = torch.randint(1, 10, (g, k), generator=gen)
        s = -torch.rand(g, k, generator=gen) * 2 * n
        r = torch.randn(g, k, generator=gen)
        r[:, 1] = r[:, 0]  # a tie
        origin = torch.randint(0, 3, (g, k), generator=gen)
        if i == 2:
            origin[:] = 2  # only NegPrompt candidates
        mask = torch.rand(g, k, generator=gen) > 0.1
        mask[:, 0] = True
        cfg = [
            {},
            {"neg_scoring": "reward_model"},
            {},
            {"neg_scoring": {"forced_lowest": {"delta": 3.0}}, "sft_norm": "sum"},
            {"sft_allow_negative_prompt": True, "neg_scoring": "reward_model"},
            {"length_penalty": 0.0, "rank_weight": 0.5},
        ][i]
        lam = cfg.get("length_penalty", 1.0)
        w_rank, w_sft = cfg.get("rank_weight", 1.0), cfg.get("sft_weight", 1.0)
        norm = cfg.get("sft_norm", "token_mean")
        forced = cfg.get("neg_scoring", "forced") != "reward_model"
        delta = cfg["neg_scoring"]["forced_lowest"]["delta"] if isinstance(cfg.get("neg_scoring"), dict) else 1.0
        allow = cfg.get("sft_allow_negative_prompt", False)
        sl = leaf(s.tolist())
        group_losses = []
        for gg in range(g):
            valid = mask[gg].tolist()
            neg = [valid[j] and int(origin[gg, j]) == 2 for j in range(k)]
            rr = r[gg].tolist()
            if forced:
                others = [rr[j] for j in range(k) if valid[j] and not neg[j]]
                low = (min(others) if others else 0.0) - delta
                rr = [low if neg[j] else rr[j] for j in range(k)]
            eligible = [valid[j] and (allow or not neg[j]) for j in range(k)]
            group_losses.append(rank_group(sl[gg], n[gg], rr, valid, eligible, lam, w_rank, w_sft, norm))
        losses = torch.stack(group_losses)
        loss = losses.mean()
        (gs,) = grad_of(loss, sl)
        neat.append(
            dict(
                name=f"neat_{i}",
                config=cfg,
                shape=[g, k],
                sum=s.reshape(-1).tolist(),
                len=n.reshape(-1).tolist(),
                rewards=r.reshape(-1).tolist(),
                mask=mask.reshape(-1).tolist(),
                origin=origin.reshape(-1).tolist(),
                loss=float(loss.detach()),
                per_example=losses.tolist(),
                grad=gs.reshape(-1).tolist(),
            )
        )
    return rrhf, neat


def main():
    gen = torch.Generator().manual_seed(20250117)
    dpo, sim, orp = pair_cases(gen)
    npo, simnpo, ga = unlearning_cases(gen)
    cp, cp_spec = cp_cases(gen)
    rrhf, neat = ranking_cases(gen)
    out = dict(
        generator="scripts/gen_sequence_loss_fixtures.py",
        torch=torch.__version__,
        seq_logps=seq_logps_cases(gen),
        dpo=dpo,
        simpo=sim,
        orpo=orp,
        kto=kto_cases(gen),
        npo=npo,
        simnpo=simnpo,
        gradient_ascent=ga,
        cp=cp,
        cp_reference_label_smoothing_spec_vector=cp_spec,
        rrhf=rrhf,
        neat=neat,
    )
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f, allow_nan=False)
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {os.path.relpath(OUT)}", file=sys.stderr)
    s = cp_spec
    print(f"CP reference eps=0.1 spec vector via torch cross_entropy: loss {s['loss']:.10f}, grad {[round(x, 10) for x in s['grad']]}", file=sys.stderr)


if __name__ == "__main__":
    main()
