#!/usr/bin/env python3
"""Fixtures for the token-level losses of amend-losses (specs/token-losses.md).

Writes crates/amend-losses/tests/fixtures/token_random.json and token_parity.json. Run with the
cache venv's python (torch 2.13.0):

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_token_loss_fixtures.py

The losses are re-implemented here independently of the Rust code, in PyTorch float64:
values from direct formulas, gradients from torch autograd on those formulas; Welleck candidate
sets and n-gram masks with plain Python loops. The upstream google/t5patches formulas (including
their 1e9 "-inf", +1e-6 renormalisation, clip and the NL threshold as coded) are re-implemented in
pure Python for the parity fixtures (specs/token-losses.md section 13), so the tests can show
where amend agrees with upstream and where it deliberately differs.

Special floats are written as the strings "nan", "inf" and "-inf" (JSON has no such numbers).
The output is deterministic (fixed seeds).
"""

import json
import math
import os
import sys

import torch

torch.set_default_dtype(torch.float64)
NEG = float("-inf")
LN2 = math.log(2.0)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "amend-losses", "tests", "fixtures")


def enc(x):
    """Flattened list with non-finite values as strings."""
    out = []
    for v in torch.as_tensor(x).reshape(-1).tolist():
        if isinstance(v, bool):
            out.append(v)
        elif isinstance(v, int):
            out.append(v)
        elif math.isnan(v):
            out.append("nan")
        elif math.isinf(v):
            out.append("inf" if v > 0 else "-inf")
        else:
            out.append(v)
    return out


# ----------------------------------------------------------------------------------------------
# amend's formulas, one position (row) at a time, float64, autograd for gradients.


def log_probs(z):
    return torch.log_softmax(z, -1)


def ref_log_target(zo, z, exclude=None):
    """log of softmax(z°) over supp(z), with one token removed (masked log-sum-exp)."""
    drop = torch.isneginf(z).clone()
    if exclude is not None:
        drop[exclude] = True
    zm = zo.masked_fill(drop, NEG)
    return zm - torch.logsumexp(zm, -1)


def label_log_target(z, y):
    t = torch.full_like(z, NEG)
    t[y] = 0.0
    return t


def smooth(logu, z, eps):
    fin = ~torch.isneginf(z)
    vp = fin.sum().item()
    mixed = torch.where(fin, torch.logaddexp(logu, torch.tensor(math.log(eps))), logu)
    return mixed - math.log1p(vp * eps)


def cross_entropy(z, logt, divergence=False):
    l = log_probs(z)
    has = ~torch.isneginf(logt)
    t = torch.exp(logt)
    lt = torch.where(has, l, torch.zeros_like(l))
    if divergence:
        return (t * (torch.where(has, logt, torch.zeros_like(logt)) - lt)).sum()
    return -(t * lt).sum()


def reverse_kl(z, logd):
    l = log_probs(z)
    fin = ~torch.isneginf(z)
    ls = torch.where(fin, l, torch.zeros_like(l))
    ds = torch.where(fin, logd, torch.zeros_like(logd))
    return (torch.exp(l) * (ls - ds)).sum()


def log1m_p(z, c):
    """log(1 - p_c): log1p(-p_c) below p = 1/2, the masked log-sum-exp difference above."""
    l = log_probs(z)
    if l[c].item() <= -LN2:
        return torch.log1p(-torch.exp(l[c]))
    keep = torch.ones_like(z, dtype=torch.bool)
    keep[c] = False
    return torch.logsumexp(z[keep], -1) - torch.logsumexp(z, -1)


def tnt_row(kind, z, zo, y, w, alpha, eps):
    if w < 0:
        lq = ref_log_target(zo, z, exclude=y)
        if kind in ("tnff", "tnfll"):
            return alpha * cross_entropy(z, lq)
        return alpha * reverse_kl(z, smooth(lq, z, eps))
    lpo = ref_log_target(zo, z)
    if kind == "tnff":
        return cross_entropy(z, lpo)
    if kind == "tnfll":
        return -log_probs(z)[y]
    if kind == "tnrr":
        return reverse_kl(z, smooth(lpo, z, eps))
    if kind == "tnrf":
        return cross_entropy(z, smooth(lpo, z, eps))
    if kind == "tnrll":
        return cross_entropy(z, smooth(label_log_target(z, y), z, eps))
    raise ValueError(kind)


def nl_row(z, y, w, alpha, threshold):
    ly = log_probs(z)[y]
    if w > 0:
        return -ly
    if threshold is not None and ly.item() < threshold:
        return (ly * 0.0) + alpha * threshold
    return alpha * ly


def ul_row(z, y, w, alpha):
    if w > 0:
        return -log_probs(z)[y]
    return -alpha * log1m_p(z, y)


def welleck_candidates(labels_row, t, pad, ignore):
    x = labels_row[t]
    seen = set()
    for j in range(t):
        v = labels_row[j]
        if v in (pad, ignore):
            continue
        seen.add(v)
    seen.discard(x)
    return sorted(seen)


def explicit_candidates(cands, x, pad):
    return sorted({c for c in cands if c >= 0 and c != x and c != pad})


def welleck_row(z, x, cands, alpha):
    loss = -log_probs(z)[x]
    for c in cands:
        loss = loss - alpha * log1m_p(z, c)
    return loss


def ngram_repeat_mask(x, valid, n):
    mask, seen = [0] * len(x), set()
    for j in range(len(x) - n + 1):
        if not all(valid[j:j + n]):
            continue
        g = tuple(x[j:j + n])
        if g in seen:
            mask[j:j + n] = [1] * n
        seen.add(g)
    return mask


def ref_kl_row(z, zo, ex, direction, value, eps, temperature):
    z = z / temperature
    zo = zo / temperature
    logt = ref_log_target(zo, z, exclude=ex if ex >= 0 else None)
    if eps > 0:
        logt = smooth(logt, z, eps)
    if direction == "forward":
        return cross_entropy(z, logt, divergence=(value == "divergence"))
    return reverse_kl(z, logt)


def evaluate(shape, logits, active, row_fn):
    """Token losses [B*T] and the gradient of their sum w.r.t. logits [B*T*V]."""
    b, t, v = shape
    leaf = logits.clone().reshape(b * t, v).requires_grad_(True)
    tokens = []
    total = torch.zeros(())
    for r in range(b * t):
        if not active[r]:
            tokens.append(0.0)
            continue
        lr = row_fn(r, leaf[r])
        tokens.append(lr.item())
        total = total + lr
    if total.requires_grad:
        total.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    return tokens, grad


# ----------------------------------------------------------------------------------------------
# Random inputs


class Rng:
    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def int(self, lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=self.g).item())

    def choice(self, items):
        return items[self.int(0, len(items) - 1)]

    def uniform(self):
        return float(torch.rand((1,), generator=self.g).item())

    def normal(self, *shape):
        return torch.randn(*shape, generator=self.g)


def random_logits(rng, b, t, v, scale, neg_inf_frac, keep):
    """Logits with -inf entries (never on the columns in keep[r], and at least 2 finite)."""
    z = rng.normal(b * t, v) * scale
    for r in range(b * t):
        for c in range(v):
            if c not in keep[r] and rng.uniform() < neg_inf_frac:
                z[r, c] = NEG
        fin = [c for c in range(v) if z[r, c] != NEG]
        while len(fin) < 2:
            c = rng.int(0, v - 1)
            z[r, c] = rng.normal(1).item() * scale
            fin = [c for c in range(v) if z[r, c] != NEG]
    return z


def garbage(z, inactive_rows, rng):
    for r in inactive_rows:
        z[r, 0] = float("nan")
        if z.shape[1] > 1:
            z[r, 1] = float("inf")
        if rng.uniform() < 0.5 and z.shape[1] > 2:
            z[r, 2] = NEG


SCALES = [0.5, 1.0, 3.0, 8.0, 30.0]


def weighted_cases(rng, loss, count):
    cases = []
    for i in range(count):
        b, t, v = rng.int(1, 3), rng.int(1, 5), rng.int(2, 24)
        n = b * t
        scale = rng.choice(SCALES)
        labels = [rng.int(0, v - 1) for _ in range(n)]
        weights = [rng.choice([-1, 0, 1, 1]) for _ in range(n)]
        extreme = i % 3 == 2
        keep = [{labels[r]} for r in range(n)]
        z = random_logits(rng, b, t, v, scale, 0.15 if extreme else 0.0, keep)
        zo = rng.normal(n, v) * rng.choice(SCALES)
        if extreme:
            for r in range(n):
                if rng.uniform() < 0.3:
                    zo[r, labels[r]] = 60.0  # reference saturated on the label
                if rng.uniform() < 0.3:
                    z[r, labels[r]] = 25.0  # model saturated on the label
        inactive = [r for r in range(n) if weights[r] == 0]
        labels_in = list(labels)
        if extreme:
            garbage(z, inactive, rng)
            garbage(zo, inactive, rng)
            for r in inactive:
                labels_in[r] = 10_000
        alpha = rng.choice([0.5, 1.0, 2.0, 30.0])
        active = [w != 0 for w in weights]
        cfg = {"alpha": alpha}
        if loss == "tnt":
            variant = rng.choice(["tnff", "tnrr", "tnrf", "tnfll", "tnrll"])
            eps = rng.choice([1e-6, 1e-3, 0.05])
            cfg.update({"variant": variant, "smoothing_eps": eps})
            fn = lambda r, zr: tnt_row(variant, zr, zo[r], labels[r], weights[r], alpha, eps)
        elif loss == "nl":
            threshold = rng.choice([-10.3, -2.0, None])
            cfg["threshold"] = threshold
            fn = lambda r, zr: nl_row(zr, labels[r], weights[r], alpha, threshold)
        else:
            fn = lambda r, zr: ul_row(zr, labels[r], weights[r], alpha)
        tokens, grad = evaluate((b, t, v), z, active, fn)
        case = {
            "name": f"{loss}_{i}",
            "loss": loss,
            "shape": [b, t, v],
            "config": cfg,
            "f32": (not extreme) and scale <= 8.0,
            "logits": enc(z),
            "labels": labels_in,
            "weights": weights,
            "tokens": enc(torch.tensor(tokens)),
            "count": sum(active),
            "grad": enc(grad),
        }
        if loss == "tnt":
            case["ref_logits"] = enc(zo)
        cases.append(case)
    return cases


def nll_cases(rng, count):
    cases = []
    for i in range(count):
        b, t, v = rng.int(1, 3), rng.int(1, 5), rng.int(2, 24)
        n = b * t
        extreme = i % 3 == 2
        labels = [rng.int(0, v - 1) if rng.uniform() < 0.85 else -100 for _ in range(n)]
        mask = [rng.uniform() < 0.8 for _ in range(n)]
        active = [labels[r] != -100 and mask[r] for r in range(n)]
        keep = [{labels[r]} for r in range(n)]
        scale = rng.choice(SCALES)
        z = random_logits(rng, b, t, v, scale, 0.15 if extreme else 0.0, keep)
        if extreme:
            garbage(z, [r for r in range(n) if not active[r]], rng)
        tokens, grad = evaluate((b, t, v), z, active, lambda r, zr: -log_probs(zr)[labels[r]])
        cases.append({
            "name": f"nll_{i}",
            "loss": "nll",
            "shape": [b, t, v],
            "config": {},
            "f32": (not extreme) and scale <= 8.0,
            "logits": enc(z),
            "labels": labels,
            "loss_mask": mask,
            "tokens": enc(torch.tensor(tokens)),
            "count": sum(active),
            "grad": enc(grad),
        })
    return cases


def welleck_cases(rng, count):
    cases = []
    for i in range(count):
        b, t, v = rng.int(1, 3), rng.int(1, 7), rng.int(2, 12)
        n = b * t
        extreme = i % 3 == 2
        pad = rng.choice([None, 0, 1])
        labels = [rng.int(0, v - 1) if rng.uniform() < 0.9 else -100 for _ in range(n)]
        mask = [rng.uniform() < 0.85 for _ in range(n)]
        explicit = i % 4 == 3
        k = rng.int(0, 4)
        cands = [[rng.int(-1, v - 1) for _ in range(k)] for _ in range(n)]
        real = [labels[r] not in (pad, -100) for r in range(n)]
        active = [real[r] and mask[r] for r in range(n)]
        sets = []
        for bb in range(b):
            row = labels[bb * t:(bb + 1) * t]
            for tt in range(t):
                r = bb * t + tt
                if explicit:
                    sets.append(explicit_candidates(cands[r], labels[r], pad))
                else:
                    sets.append(welleck_candidates(row, tt, pad, -100))
        keep = [set(sets[r]) | ({labels[r]} if labels[r] >= 0 else set()) for r in range(n)]
        scale = rng.choice(SCALES)
        z = random_logits(rng, b, t, v, scale, 0.1 if extreme else 0.0, keep)
        if extreme:
            for r in range(n):
                if sets[r] and rng.uniform() < 0.5:
                    z[r, sets[r][0]] = 25.0  # a dominant candidate
            garbage(z, [r for r in range(n) if not active[r]], rng)
        alpha = rng.choice([0.5, 1.0, 3.0])
        tokens, grad = evaluate(
            (b, t, v), z, active, lambda r, zr: welleck_row(zr, labels[r], sets[r], alpha)
        )
        case = {
            "name": f"welleck_{i}",
            "loss": "welleck",
            "shape": [b, t, v],
            "config": {"alpha": alpha, "pad_id": pad},
            "f32": (not extreme) and scale <= 8.0,
            "logits": enc(z),
            "labels": labels,
            "loss_mask": mask,
            "tokens": enc(torch.tensor(tokens)),
            "count": sum(active),
            "grad": enc(grad),
        }
        if explicit:
            case["candidates"] = [c for row in cands for c in row]
            case["k"] = k
        cases.append(case)
    return cases


def sequence_ul_cases(rng, count):
    cases = []
    for i in range(count):
        b, t, v = rng.int(1, 3), rng.int(1, 10), rng.int(2, 5)
        n = b * t
        extreme = i % 3 == 2
        ngram = rng.int(1, 3)
        tokens = [rng.int(0, v - 1) for _ in range(n)]
        valid = [True] * n
        for bb in range(b):  # a valid prefix per row, as after an EOS
            length = rng.int(0, t)
            for tt in range(length, t):
                valid[bb * t + tt] = False
        mask = []
        for bb in range(b):
            mask += ngram_repeat_mask(tokens[bb * t:(bb + 1) * t], valid[bb * t:(bb + 1) * t], ngram)
        penal = [bool(mask[r]) and valid[r] for r in range(n)]
        scale = rng.choice(SCALES)
        keep = [{tokens[r]} for r in range(n)]
        z = random_logits(rng, b, t, v, scale, 0.2 if extreme else 0.0, keep)
        if extreme:
            for r in range(n):
                if rng.uniform() < 0.4:
                    z[r, tokens[r]] = 30.0
            garbage(z, [r for r in range(n) if not penal[r]], rng)
        toks, grad = evaluate((b, t, v), z, penal, lambda r, zr: -log1m_p(zr, tokens[r]))
        cases.append({
            "name": f"sequence_ul_{i}",
            "loss": "sequence_ul",
            "shape": [b, t, v],
            "config": {"ngram_n": ngram},
            "f32": (not extreme) and scale <= 8.0,
            "logits": enc(z),
            "labels": tokens,
            "valid": valid,
            "mask": mask,
            "tokens": enc(torch.tensor(toks)),
            "count": sum(valid),
            "grad": enc(grad),
        })
    return cases


def ref_kl_cases(rng, count):
    cases = []
    for i in range(count):
        b, t, v = rng.int(1, 3), rng.int(1, 5), rng.int(2, 24)
        n = b * t
        extreme = i % 3 == 2
        direction = rng.choice(["forward", "reverse"])
        value = rng.choice(["divergence", "cross_entropy"])
        use_exclude = rng.uniform() < 0.5
        exclude = [rng.int(-1, v - 1) if use_exclude else -1 for _ in range(n)]
        eps = rng.choice([0.0, 1e-6, 1e-2])
        if direction == "reverse" and use_exclude and eps == 0.0:
            eps = 1e-4
        temperature = rng.choice([1.0, 1.0, 2.0, 0.5])
        mask = [rng.uniform() < 0.8 for _ in range(n)]
        scale = rng.choice(SCALES)
        keep = [set() for _ in range(n)]
        z = random_logits(rng, b, t, v, scale, 0.15 if extreme else 0.0, keep)
        zo = rng.normal(n, v) * rng.choice(SCALES)
        if direction == "reverse" and eps == 0.0:
            # supp(p) must lie in supp(t): no -inf in the reference there.
            pass
        if extreme:
            garbage(z, [r for r in range(n) if not mask[r]], rng)
            garbage(zo, [r for r in range(n) if not mask[r]], rng)
        tokens, grad = evaluate(
            (b, t, v), z, mask,
            lambda r, zr: ref_kl_row(zr, zo[r], exclude[r], direction, value, eps, temperature),
        )
        case = {
            "name": f"reference_kl_{i}",
            "loss": "reference_kl",
            "shape": [b, t, v],
            "config": {
                "direction": direction,
                "value": value,
                "smoothing_eps": eps,
                "temperature": temperature,
            },
            "f32": (not extreme) and scale <= 8.0,
            "logits": enc(z),
            "ref_logits": enc(zo),
            "labels": exclude,
            "loss_mask": mask,
            "tokens": enc(torch.tensor(tokens)),
            "count": sum(mask),
            "grad": enc(grad),
        }
        if use_exclude:
            case["exclude"] = exclude
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------------
# Upstream google/t5patches formulas (pure Python, float64), specs/token-losses.md section 13


def lse(xs):
    xs = [x for x in xs if x != NEG]
    if not xs:
        return NEG
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


def logp(z):
    c = lse(z)
    return [v - c for v in z]


def probs(z):
    return [math.exp(v) for v in logp(z)]


def up_ce(a, b):
    return -sum(bv * lv for bv, lv in zip(b, logp(a)))


def up_desired_logits(dlog, eps=1e-6):
    d = probs(dlog)
    s = sum(d) + len(d) * eps
    return [math.log((x + eps) / s) for x in d]


def up_token(kind, z, zo, y, w, a):
    e = [float(i == y) for i in range(len(z))]
    neg, pos = w < 0, w > 0
    if kind in ("FF", "FLL"):
        base = e if (kind == "FLL" and pos) else probs(zo)
        qu = base if pos else [b + ev * w * b for b, ev in zip(base, e)]
        return up_ce(z, [x / sum(qu) for x in qu]) * (a * neg + pos)
    if kind in ("RR", "RF", "RLL"):
        if kind == "RLL" and pos:
            dlog = [ev * 1e9 for ev in e]
        else:
            dlog = zo if pos else [u + ev * w * 1e9 for u, ev in zip(zo, e)]
        dl, p = up_desired_logits(dlog), probs(z)
        rkl = up_ce(dl, p) - up_ce(z, p)
        if kind == "RR":
            return rkl * (a * neg + pos)
        return rkl * (w == -1) * a + up_ce(z, probs(dl)) * (w == 1)
    if kind == "NL":
        s = up_ce(z, e) * w * (a if neg else 1.0)
        return 10.3 if -s < -10.3 else s
    if kind == "UL":
        ly = logp(z)[y]
        pc = min(max(math.exp(ly), 0.0), 1 - 1e-7)
        return (-ly if pos else 0.0) + (-a * math.log(1 - pc) if neg else 0.0)
    raise ValueError(kind)


def up_scores(kind, Z, ZO, Y, W, a):
    return [-sum(up_token(kind, Z[b][t], ZO[b][t], Y[b][t], W[b][t], a)
                 for t in range(len(Z[b]))) for b in range(len(Z))]


UP_NAMES = {"tnff": "FF", "tnrr": "RR", "tnrf": "RF", "tnfll": "FLL", "tnrll": "RLL", "ul": "UL",
            "nl": "NL"}


def amend_scores(loss, z, zo, labels, weights, alpha):
    b, t, v = z.shape
    scores = []
    for bb in range(b):
        s = 0.0
        for tt in range(t):
            w = weights[bb][tt]
            if w == 0:
                continue
            zr, zor, y = z[bb, tt], zo[bb, tt], labels[bb][tt]
            if loss == "ul":
                s += ul_row(zr, y, w, alpha).item()
            elif loss == "nl":
                s += nl_row(zr, y, w, alpha, -10.3).item()
            else:
                s += tnt_row(loss, zr, zor, y, w, alpha, 1e-6).item()
        scores.append(-s)
    return scores


def parity_cases(rng):
    cases = []
    w_both = [[1, 1, -1, 0], [1, -1, 1, -1]]
    w_first = [[1, 1, -1, 0], [0, 0, 0, 0]]
    w_second = [[0, 0, 0, 0], [1, -1, 1, -1]]
    table = [("ul", w_both), ("nl", w_both), ("tnfll", w_first), ("tnff", w_second),
             ("tnrr", w_both), ("tnrll", w_first), ("tnrf", w_second)]
    z = torch.arange(24.0).reshape(2, 4, 3)
    labels = [[1, 2, 1, 0], [0, 1, 0, 2]]
    for loss, w in table:
        for alpha in (1.0, 0.5):
            zl = z.tolist()
            up = up_scores(UP_NAMES[loss], zl, zl, labels, w, alpha)
            ours = amend_scores(loss, z, z, labels, w, alpha)
            assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12) for a, b in zip(up, ours))
            cases.append({
                "name": f"models_test_{loss}_alpha{alpha}",
                "loss": loss,
                "shape": [2, 4, 3],
                "alpha": alpha,
                "logits": enc(z),
                "ref_logits": enc(z),
                "labels": [x for row in labels for x in row],
                "weights": [x for row in w for x in row],
                "upstream": up,
                "amend": ours,
                "agree": True,
            })
    # Random non-degenerate inputs: upstream and amend agree (validated weights, finite logits,
    # no saturation, NL positives below the upstream cap).
    for i in range(24):
        loss = ["tnff", "tnrr", "tnrf", "tnfll", "tnrll", "ul", "nl"][i % 7]
        b, t, v = rng.int(1, 3), rng.int(1, 4), rng.int(2, 8)
        z = rng.normal(b, t, v) * 2.0
        zo = rng.normal(b, t, v) * 2.0
        labels = [[rng.int(0, v - 1) for _ in range(t)] for _ in range(b)]
        weights = [[rng.choice([-1, 0, 1]) for _ in range(t)] for _ in range(b)]
        alpha = rng.choice([0.5, 1.0, 2.0])
        up = up_scores(UP_NAMES[loss], z.tolist(), zo.tolist(), labels, weights, alpha)
        ours = amend_scores(loss, z, zo, labels, weights, alpha)
        assert all(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) for a, b in zip(up, ours)), (
            loss, up, ours)
        cases.append({
            "name": f"random_{loss}_{i}",
            "loss": loss,
            "shape": [b, t, v],
            "alpha": alpha,
            "logits": enc(z),
            "ref_logits": enc(zo),
            "labels": [x for row in labels for x in row],
            "weights": [x for row in weights for x in row],
            "upstream": up,
            "amend": ours,
            "agree": True,
        })
    # Deliberate differences (spec section 10): upstream clips, caps or returns NaN here.
    diffs = [
        # E1: the UL clip at p = 1 - 1e-7 (upstream 16.118096 in f64, exact 18.901387718).
        ("ul", [[[0.0, 20.0, 0.0, 0.0]]], [[[0.5, 1.0, 0.2, -0.3]]], [[1]], [[-1]], 1.0),
        # E4: upstream caps the positive NLL at 10.3 and never floors negatives.
        ("nl", [[[12.0, 0.0, 0.0, 0.0]]], [[[0.0] * 4]], [[1]], [[1]], 1.0),
        ("nl", [[[12.0, 0.0, 0.0, 0.0]]], [[[0.0] * 4]], [[1]], [[-1]], 1.0),
        # E2 in f64: the renormalised target is 0/0 upstream.
        ("tnff", [[[0.0, 0.0, 0.0, 0.0]]], [[[0.0, 800.0, 0.0, 0.0]]], [[1]], [[-1]], 1.0),
    ]
    for loss, zl, zol, labels, weights, alpha in diffs:
        z, zo = torch.tensor(zl), torch.tensor(zol)
        with_nan = up_scores_safe(UP_NAMES[loss], zl, zol, labels, weights, alpha)
        cases.append({
            "name": f"deviation_{loss}_{len(cases)}",
            "loss": loss,
            "shape": list(z.shape),
            "alpha": alpha,
            "logits": enc(z),
            "ref_logits": enc(zo),
            "labels": [x for row in labels for x in row],
            "weights": [x for row in weights for x in row],
            "upstream": enc(torch.tensor(with_nan)),
            "amend": amend_scores(loss, z, zo, labels, weights, alpha),
            "agree": False,
        })
    return cases


def up_scores_safe(kind, Z, ZO, Y, W, a):
    try:
        return up_scores(kind, Z, ZO, Y, W, a)
    except (ZeroDivisionError, ValueError):
        return [float("nan")] * len(Z)


def main():
    os.makedirs(OUT, exist_ok=True)
    rng = Rng(4_2024)
    cases = []
    cases += weighted_cases(rng, "tnt", 30)
    cases += weighted_cases(rng, "nl", 12)
    cases += weighted_cases(rng, "ul", 12)
    cases += nll_cases(rng, 10)
    cases += welleck_cases(rng, 16)
    cases += sequence_ul_cases(rng, 12)
    cases += ref_kl_cases(rng, 20)
    meta = {"generator": "scripts/gen_token_loss_fixtures.py", "torch": torch.__version__}
    with open(os.path.join(OUT, "token_random.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
    parity = parity_cases(Rng(1_0919))
    with open(os.path.join(OUT, "token_parity.json"), "w") as f:
        json.dump({"meta": meta, "cases": parity}, f, indent=1)
    print(f"wrote {len(cases)} random cases and {len(parity)} parity cases to {OUT}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
