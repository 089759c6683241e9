#!/usr/bin/env python3
"""Fixtures for the amend-kernels tests: per-row losses and gradients computed in float64 with
PyTorch autograd over composite ops (log_softmax, logsumexp, where), independently of the Rust
kernels and of their f64 oracles.

Writes crates/amend-kernels/tests/fixtures/kernel_cases.json. Run with the cache venv's python:

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_kernel_fixtures.py

Inputs are rounded to float32 first (the kernels run in f32). -inf is written as the string
"-inf" (JSON has no infinities). Each case names the kernel ("op"), its arguments as the Rust
API takes them, and the expected per-row `loss` and flattened `grad` (d sum_r loss[r] / d logits,
which is the per-row gradient because rows are independent).

Semantics follow docs of the kernels (token-losses spec s1.5: columns with z = -inf leave the row
vocabulary; smoothing S_eps(u) = (u + eps)/(1 + V' eps) over it).
"""
import json
import math
import os

import numpy as np
import torch

torch.set_default_dtype(torch.float64)
NEG_INF = float("-inf")
rng = np.random.default_rng(20240613)


def c32(x):
    """A configuration value as the Rust f32 config field holds it."""
    return None if x is None else float(np.float32(x))


def f32(a):
    return np.asarray(a, dtype=np.float32).astype(np.float64)


def enc(a):
    return ["-inf" if (isinstance(v, float) and v == NEG_INF) else float(v) for v in np.asarray(a, dtype=np.float64).ravel().tolist()]


def rand_logits(rows, vocab, scale=4.0, neg_inf_p=0.0, extreme=False):
    z = rng.normal(0.0, scale, size=(rows, vocab))
    if extreme:
        z = np.where(rng.random((rows, vocab)) < 0.3, rng.choice([-1e4, 1e4, -3e3, 50.0], size=(rows, vocab)), z)
    z = f32(z)
    if neg_inf_p > 0:
        mask = rng.random((rows, vocab)) < neg_inf_p
        for r in range(rows):  # keep at least two finite columns per row
            keep = rng.choice(vocab, size=2, replace=False)
            mask[r, keep] = False
        z = np.where(mask, NEG_INF, z)
    return z


def supp_mask(z):
    return torch.isfinite(z)


def masked_lse(x, keep):
    return torch.logsumexp(torch.where(keep, x, torch.tensor(NEG_INF)), dim=-1)


# ---------------------------------------------------------------------------------------------
# Composites (float64, autograd). Each returns per-row losses with the graph to z.


def selected_logp(z, labels, scale, ls, zl, softcap, temp, ignore=-100):
    zt = softcap * torch.tanh(z / softcap) if softcap else z
    zt = zt / temp
    active = torch.tensor([(l != ignore) and (s != 0) for l, s in zip(labels, scale)])
    y = torch.tensor([l if a else 0 for l, a in zip(labels, active)])
    lse = torch.logsumexp(zt, dim=-1)
    logp = torch.log_softmax(zt, dim=-1)
    lp_y = logp.gather(1, y[:, None])[:, 0]
    supp = supp_mask(zt)
    vp = supp.sum(-1)
    mean_l = torch.where(supp, logp, torch.zeros(())).sum(-1) / vp
    ce = -(1 - ls) * lp_y - ls * mean_l if ls > 0 else -lp_y
    loss = (ce + zl * lse * lse) * torch.tensor(scale)
    return torch.where(active, loss, torch.zeros(())), torch.where(active, lse, torch.zeros(())), torch.where(active, lp_y, torch.zeros(()))


def build_target(z, kind, zr=None, exclude=None, labels=None, lt=None, eps=0.0, temp=1.0):
    """Target probabilities t (rows x V), constants (no grad)."""
    rows, vocab = z.shape
    supp = supp_mask(z)
    if kind == "reference":
        zs = zr / temp
        keep = supp.clone()
        if exclude is not None:
            for r, e in enumerate(exclude):
                if e >= 0:
                    keep[r, e] = False
        t = torch.exp(zs - masked_lse(zs, keep)[:, None])
        t = torch.where(keep, t, torch.zeros(()))
    elif kind == "one_hot":
        t = torch.zeros(rows, vocab)
        for r, y in enumerate(labels):
            if y >= 0:
                t[r, y] = 1.0
    else:
        t = torch.exp(lt)
    if eps > 0:
        vp = supp.sum(-1, keepdim=True)
        t = torch.where(supp, (t + eps) / (1 + vp * eps), torch.zeros(()))
    return t


def token_kl(z, t, direction, value, temp):
    zs = z / temp
    logp = torch.log_softmax(zs, dim=-1)
    if direction == "forward":
        pos = t > 0
        ce = -torch.where(pos, t * logp, torch.zeros(())).sum(-1)
        # CE with an unnormalised target has gradient p*sum(t) - t, which is what -sum t log p gives.
        if value == "divergence":
            h = -torch.where(pos, t * torch.log(torch.where(pos, t, torch.ones(()))), torch.zeros(())).sum(-1)
            return ce - h
        return ce
    p = torch.exp(logp)
    pos = p > 0
    # Sanitise both logs before the product so that the unselected branch has no 0*inf.
    lp = torch.where(pos, logp, torch.zeros(()))
    logt = torch.where(pos, torch.log(t), torch.zeros(()))
    terms = torch.where(pos, p * (lp - logt), torch.zeros(()))
    return terms.sum(-1)


def ul(z, nll, cands, alpha):
    lse = torch.logsumexp(z, dim=-1)
    out = []
    for r in range(z.shape[0]):
        l = torch.zeros(())
        if nll[r] is not None:
            l = l + lse[r] - z[r, nll[r]]
        for c in cands[r]:
            keep = torch.ones(z.shape[1], dtype=torch.bool)
            keep[c] = False
            lam = masked_lse(z[r], keep) - lse[r]
            l = l - alpha * lam
        out.append(l)
    return torch.stack(out)


def grad_of(losses, z, active):
    (g,) = torch.autograd.grad(losses.sum(), z, allow_unused=True)
    g = torch.zeros_like(z) if g is None else g
    active = torch.as_tensor(active)
    assert not torch.isnan(g[active]).any(), "NaN gradient on an active row"
    return torch.where(active[:, None], g, torch.zeros(()))  # inactive rows are exactly 0


# ---------------------------------------------------------------------------------------------

cases = []


def add(case, loss, grad, **extra):
    case["loss"] = enc(loss.detach().numpy())
    case["grad"] = enc(grad.detach().numpy())
    for k, v in extra.items():
        case[k] = enc(v.detach().numpy())
    cases.append(case)


def gen_selected_logp():
    for i, (rows, vocab, ls, zl, cap, temp, ninf) in enumerate([
        (4, 5, 0.0, 0.0, None, 1.0, 0.0),
        (5, 17, 0.1, 0.0, None, 1.0, 0.0),
        (3, 40, 0.0, 1e-3, None, 1.0, 0.0),
        (4, 9, 0.0, 0.0, 5.0, 1.0, 0.0),
        (4, 9, 0.05, 1e-2, 3.0, 2.0, 0.0),
        (6, 7, 0.2, 0.0, None, 0.5, 0.3),
        (2, 2, 0.0, 0.0, None, 1.0, 0.0),
    ]):
        ls, zl, cap, temp = c32(ls), c32(zl), c32(cap), c32(temp)
        z = rand_logits(rows, vocab, neg_inf_p=ninf)
        labels = []
        for r in range(rows):
            fin = np.where(np.isfinite(z[r]))[0]
            labels.append(int(rng.choice([fin[0], fin[-1], rng.choice(fin)])))
        labels[-1] = -100
        scale = [float(np.float32(s)) for s in rng.choice([1.0, 0.5, -1.0, 2.0], size=rows)]
        zt = torch.tensor(z, requires_grad=True)
        loss, lse, lp = selected_logp(zt, labels, scale, ls, zl, cap, temp)
        add(dict(op="selected_logp", name=f"selected_logp_{i}", vocab=vocab, logits=enc(z), labels=labels,
                 row_scale=scale, label_smoothing=ls, lse_square_scale=zl, softcap=cap, temperature=temp),
            loss, grad_of(loss, zt, [(l != -100) and (s != 0) for l, s in zip(labels, scale)]), lse=lse, logp=lp)


def gen_token_kl():
    specs = [
        # (direction, value, kind, eps, temp, neg_inf_p, extreme, exclude)
        ("forward", "divergence", "reference", 0.0, 1.0, 0.0, False, False),
        ("forward", "cross_entropy", "reference", 0.0, 1.0, 0.0, False, True),
        ("forward", "divergence", "reference", 0.0, 2.0, 0.25, False, True),
        ("forward", "cross_entropy", "reference", 1e-3, 1.0, 0.25, False, False),
        ("forward", "divergence", "reference", 1e-3, 1.0, 0.0, False, True),
        ("forward", "cross_entropy", "one_hot", 0.0, 1.0, 0.0, False, False),
        ("forward", "cross_entropy", "one_hot", 1e-2, 1.0, 0.2, False, False),
        ("forward", "divergence", "one_hot", 1e-2, 0.7, 0.0, False, False),
        ("forward", "divergence", "log_probs", 0.0, 1.0, 0.0, False, False),
        ("forward", "cross_entropy", "log_probs", 1e-3, 1.0, 0.0, False, False),
        ("reverse", "divergence", "reference", 0.0, 1.0, 0.0, False, False),
        ("reverse", "divergence", "reference", 1e-6, 1.0, 0.0, False, True),
        ("reverse", "divergence", "reference", 1e-3, 1.5, 0.25, False, True),
        ("reverse", "divergence", "one_hot", 1e-3, 1.0, 0.0, False, False),
        ("reverse", "divergence", "log_probs", 1e-4, 1.0, 0.0, False, False),
        ("forward", "divergence", "reference", 0.0, 1.0, 0.0, True, True),
        ("reverse", "divergence", "reference", 1e-6, 1.0, 0.0, True, True),
    ]
    for i, (direction, value, kind, eps, temp, ninf, extreme, excl) in enumerate(specs):
        eps, temp = c32(eps), c32(temp)
        rows, vocab = int(rng.integers(3, 6)), int(rng.choice([2, 5, 13, 33]))
        z = rand_logits(rows, vocab, neg_inf_p=ninf, extreme=extreme)
        scale = [float(np.float32(s)) for s in rng.choice([1.0, 0.25, 3.0], size=rows)]
        scale[0] = 0.0  # one inactive row
        case = dict(op="token_kl", name=f"token_kl_{i}_{direction}_{kind}", vocab=vocab, logits=enc(z),
                    direction=direction, value=value, smoothing_eps=eps, temperature=temp, row_scale=scale,
                    target=kind)
        zt = torch.tensor(z, requires_grad=True)
        if kind == "reference":
            zr = rand_logits(rows, vocab, neg_inf_p=0.0, extreme=extreme)
            exclude = None
            if excl:
                exclude = []
                for r in range(rows):
                    fin = np.where(np.isfinite(z[r]))[0]
                    exclude.append(int(rng.choice(fin)) if r % 3 != 2 else -1)
            case.update(ref_logits=enc(zr), exclude=exclude)
            t = build_target(torch.tensor(z), kind, zr=torch.tensor(zr), exclude=exclude, eps=eps, temp=temp)
        elif kind == "one_hot":
            labels = []
            for r in range(rows):
                fin = np.where(np.isfinite(z[r]))[0]
                labels.append(int(rng.choice(fin)))
            labels[-1] = -100
            case.update(labels=labels)
            t = build_target(torch.tensor(z), kind, labels=[l if l >= 0 else -1 for l in labels], eps=eps)
        else:
            lt = f32(torch.log_softmax(torch.tensor(rand_logits(rows, vocab)), dim=-1).numpy())
            lt[0, 0] = NEG_INF
            case.update(log_target=enc(lt))
            t = build_target(torch.tensor(z), kind, lt=torch.tensor(lt), eps=eps)
        loss = token_kl(zt, t, direction, value, temp) * torch.tensor(scale)
        active = torch.tensor([s != 0 for s in scale])
        if kind == "one_hot":
            active = active & torch.tensor([l >= 0 for l in case["labels"]])
        loss = torch.where(active, loss, torch.zeros(()))
        add(case, loss, grad_of(loss, zt, active))


def gen_unlikelihood():
    for i, (rows, vocab, alpha, with_labels, sat) in enumerate([
        (4, 6, 1.0, True, False),
        (5, 11, 0.5, False, False),
        (3, 4, 2.0, True, True),
        (4, 30, 1.0, True, False),
    ]):
        alpha = c32(alpha)
        z = rand_logits(rows, vocab)
        if sat:
            z[0] = f32([0.0, 20.0, 0.0, 0.0])
            z[1] = f32([0.0, 120.0, -3.0, 1.0])
        offsets, ids, cands = [0], [], []
        labels = []
        for r in range(rows):
            k = int(rng.integers(0, min(4, vocab)))
            c = [int(v) for v in rng.choice(vocab, size=k, replace=True)]
            if sat and r < 2:
                c = [1, 1]  # the saturated argmax, duplicated
            if r == 2:
                c = c + [-1]  # an empty slot
            ids += c
            offsets.append(len(ids))
            cands.append(sorted(set(v for v in c if v >= 0)))
            labels.append(int(rng.integers(0, vocab)) if (with_labels and r != 1) else -100)
        scale = [1.0] * rows
        nll = [l if l >= 0 else None for l in labels]
        zt = torch.tensor(z, requires_grad=True)
        loss = ul(zt, nll, cands, alpha)
        active = torch.tensor([(n is not None) or len(c) > 0 for n, c in zip(nll, cands)])
        loss = torch.where(active, loss, torch.zeros(()))
        add(dict(op="unlikelihood", name=f"unlikelihood_{i}", vocab=vocab, logits=enc(z),
                 labels=labels if with_labels else None, offsets=offsets, ids=ids, alpha=alpha, row_scale=scale),
            loss, grad_of(loss, zt, active))


def gen_tnt():
    variants = ["tnff", "tnrr", "tnrf", "tnfll", "tnrll", "nl", "ul_annotated"]
    for i, variant in enumerate(variants):
        rows, vocab = 6, int(rng.choice([3, 7, 20]))
        alpha, eps, threshold = 1.5, c32(1e-3), -2.0
        z = rand_logits(rows, vocab, neg_inf_p=0.15 if variant.startswith("tn") else 0.0)
        zr = rand_logits(rows, vocab)
        w = [-1.0, 1.0, 0.0, -1.0, 1.0, -1.0]
        labels = []
        for r in range(rows):
            fin = np.where(np.isfinite(z[r]))[0]
            labels.append(int(rng.choice([fin[0], fin[-1]])))
        zt = torch.tensor(z, requires_grad=True)
        zd = torch.tensor(z)
        out = []
        for r in range(rows):
            if w[r] == 0:
                out.append(torch.zeros(()))
                continue
            neg = w[r] < 0
            y = labels[r]
            zr_r = torch.tensor(zr[r:r + 1])
            z_r = zt[r:r + 1]
            zd_r = zd[r:r + 1]
            if variant in ("tnff", "tnfll") and neg:
                l = alpha * token_kl(z_r, build_target(zd_r, "reference", zr=zr_r, exclude=[y]), "forward", "cross_entropy", 1.0)
            elif variant in ("tnrr", "tnrf", "tnrll") and neg:
                l = alpha * token_kl(z_r, build_target(zd_r, "reference", zr=zr_r, exclude=[y], eps=eps), "reverse", "divergence", 1.0)
            elif variant == "tnff":
                l = token_kl(z_r, build_target(zd_r, "reference", zr=zr_r), "forward", "cross_entropy", 1.0)
            elif variant == "tnrr":
                l = token_kl(z_r, build_target(zd_r, "reference", zr=zr_r, eps=eps), "reverse", "divergence", 1.0)
            elif variant == "tnrf":
                l = token_kl(z_r, build_target(zd_r, "reference", zr=zr_r, eps=eps), "forward", "cross_entropy", 1.0)
            elif variant == "tnrll":
                l = token_kl(z_r, build_target(zd_r, "one_hot", labels=[y], eps=eps), "forward", "cross_entropy", 1.0)
            elif variant == "nl" and neg:
                lp = torch.log_softmax(z_r, -1)[0, y]
                l = alpha * lp if lp.item() >= threshold else alpha * threshold + 0 * lp
                l = l[None]
            elif variant == "ul_annotated" and neg:
                l = ul(z_r, [None], [[y]], alpha)
            else:  # positive NLL
                l = (torch.logsumexp(z_r, -1) - z_r[0, y])
            out.append(l.reshape(()))
        loss = torch.stack(out)
        add(dict(op="tnt", name=f"tnt_{variant}", vocab=vocab, logits=enc(z), ref_logits=enc(zr), labels=labels,
                 weights=w, variant=variant, alpha=alpha, smoothing_eps=eps, threshold=threshold),
            loss, grad_of(loss, zt, [x != 0 for x in w]))


gen_selected_logp()
gen_token_kl()
gen_unlikelihood()
gen_tnt()

out = os.path.join(os.path.dirname(__file__), "..", "crates", "amend-kernels", "tests", "fixtures", "kernel_cases.json")
os.makedirs(os.path.dirname(out), exist_ok=True)
with open(out, "w") as f:
    json.dump({"generator": "scripts/gen_kernel_fixtures.py", "torch": torch.__version__, "cases": cases}, f, indent=1)
print(f"wrote {len(cases)} cases to {os.path.normpath(out)}")
