#!/usr/bin/env python3
"""Fixtures of amend-edit, computed independently with numpy / torch / transformers.

Writes JSON files under crates/amend-edit/tests/fixtures/:

* profs_a11.json      spec A.11 and A.3 step 4 recomputed with numpy (f64 SVD)
* profs_random.json   random ProFS cases (several N, D, d_ff incl. d_ff = D): projector and
                      edited weights in both layouts for every centering
* profs_models.json   ProFS on the tiny GPT-2 and Llama fixtures of amend-models, end to end with
                      transformers (hidden states after each block, pre-final-norm for the last
                      block via a hook), masked-mean pooling, SVD, edited value weights
* ft_losses.json      conditional NLL (TokenMean / ExampleMean / value mask / full) and
                      prompt_last on random logits, with the position masks of random rows
* ft_steps.json       a few optimizer steps of FT-M, FT-L (with the norm box) and the
                      Gangadhar & Stratos recipe on the tiny GPT-2 fixture, with torch Adam/AdamW

Run with the cache venv's python:

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_edit_fixtures.py
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "amend-edit", "tests", "fixtures")
MODELS = os.path.join(ROOT, "crates", "amend-models", "tests", "fixtures", "models")


def rounded(x):
    """Floats to 10 significant digits (tests compare at 1e-6 relative or looser)."""
    if isinstance(x, float):
        return float(f"{x:.10g}")
    if isinstance(x, list):
        return [rounded(v) for v in x]
    if isinstance(x, tuple):
        return [rounded(v) for v in x]
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    return x


def dump(name, obj):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(rounded(obj), f, separators=(",", ":"))
    print("wrote", name)


# ----------------------------------------------------------------------------------------------
# ProFS reference (numpy, f64)


def center(t0, xp, mode):
    if mode == "none":
        return t0
    if mode == "top":
        _, _, vt = np.linalg.svd(xp, full_matrices=False)
        c = vt[0]
    elif mode == "mean":
        mu = xp.mean(axis=0)
        c = mu / np.linalg.norm(mu)
    else:
        raise ValueError(mode)
    return t0 - np.outer(t0 @ c, c)


def profs_projector(xp, xn, mode, k):
    t0 = (xp - xn) / 2.0
    t = center(t0, xp, mode)
    _, s, vt = np.linalg.svd(t, full_matrices=False)
    d = xp.shape[1]
    if k == d:
        p = np.eye(d)
    else:
        v = vt[:k].T
        p = v @ v.T
    return s, p


def a11():
    xp = np.array([[3, 2, 2], [2, 3, 2], [2, 2, 3], [3, 3, 2]], dtype=np.float64)
    xn = np.array([[1.1, 2.4, 1.4], [0.4, 3.1, 1.4], [0.9, 2.4, 2.1], [0.1, 4.1, 1.4]])
    w = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # Conv1D [d_ff, D]
    cases = []
    for mode in ["none", "top", "mean"]:
        for k in (1, 2, 3):
            s, p = profs_projector(xp, xn, mode, k)
            q = np.eye(3) - p
            cases.append({
                "centering": mode,
                "k": k,
                "sigma": s.tolist(),
                "projector": p.tolist(),
                "w_conv_edited": (w @ q).tolist(),
                "w_lin_edited": (q @ w.T).tolist(),
                "mlp_out_h": (np.array([1.0, -1.0]) @ (w @ q)).tolist(),
            })
    h = np.array([[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]])
    m = np.array([1, 1, 0], dtype=np.float64)
    return {
        "x_pos": xp.tolist(),
        "x_neg": xn.tolist(),
        "w_conv": w.tolist(),
        "cases": cases,
        "pool_hidden": h.tolist(),
        "pool_mask": [1, 1, 0],
        "pool_masked": ((h * m[:, None]).sum(0) / m.sum()).tolist(),
        "pool_all": h.mean(0).tolist(),
    }


def profs_random():
    rng = np.random.default_rng(1234)
    cases = []
    for (n, d, dff) in [(7, 5, 6), (3, 8, 4), (12, 4, 4), (20, 6, 10)]:
        mean = rng.normal(size=d) * 5.0
        toxic = np.linalg.qr(rng.normal(size=(d, 2)))[0]
        ctx = rng.normal(size=(n, d))
        xp = mean + ctx + 0.1 * rng.normal(size=(n, d))
        xn = mean + ctx + rng.normal(size=(n, 2)) @ toxic.T * 2.0 + 0.1 * rng.normal(size=(n, d))
        w = rng.normal(size=(dff, d))
        for mode in ["top", "mean", "none"]:
            for k in sorted({1, 2, min(n, d - 1)}):
                s, p = profs_projector(xp, xn, mode, k)
                q = np.eye(d) - p
                cases.append({
                    "n": n, "d": d, "d_ff": dff, "centering": mode, "k": k,
                    "x_pos": xp.tolist(), "x_neg": xn.tolist(), "w_conv": w.tolist(),
                    "sigma": s.tolist(), "projector": p.tolist(),
                    "w_conv_edited": (w @ q).tolist(), "w_lin_edited": (q @ w.T).tolist(),
                })
    return {"cases": cases}


# ----------------------------------------------------------------------------------------------
# ProFS end to end on the amend-models fixtures

PAIRS = [
    ("the cat sat on the mat", "the cat sat on the hat and shouted"),
    ("a dog ran home quickly", "a dog ran away"),
    ("birds sing in the morning", "birds shout loudly at night"),
    ("the river flows to the sea", "the river is angry"),
    ("we walked along the beach", "we ran along the road screaming"),
    ("she reads a book", "she throws the book"),
]


def block_outputs(model, ids, mask, family):
    """Residual stream after every block, before the final norm: [L] of [b, t, D]."""
    captured = {}
    norm = model.transformer.ln_f if family == "gpt2" else model.model.norm

    def hook(_mod, args):
        captured["last"] = args[0].detach().clone()

    h = norm.register_forward_pre_hook(hook)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    h.remove()
    hs = list(out.hidden_states)
    n_layers = len(hs) - 1
    blocks = [hs[l + 1] for l in range(n_layers - 1)] + [captured["last"]]
    return blocks


def embed(model, tok, texts, family, layers):
    seqs = [tok.encode(t, add_special_tokens=True).ids for t in texts]
    t = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), t, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    blocks = block_outputs(model, ids, mask, family)
    m = mask.to(torch.float64)[:, :, None]
    return [((blocks[l].double() * m).sum(1) / m.sum(1)).numpy() for l in layers], seqs


def profs_model(name, family, layers, k):
    d = os.path.join(MODELS, name)
    model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    pos, seqs_p = embed(model, tok, [p for p, _ in PAIRS], family, layers)
    neg, seqs_n = embed(model, tok, [q for _, q in PAIRS], family, layers)
    sd = model.state_dict()
    out = {"model": name, "layers": layers, "k": k, "pairs": PAIRS, "layers_out": []}
    for i, l in enumerate(layers):
        s, p = profs_projector(pos[i], neg[i], "top", k)
        q = np.eye(p.shape[0]) - p
        if family == "gpt2":
            key = f"transformer.h.{l}.mlp.c_proj.weight"
            w = sd[key].double().numpy()  # [d_ff, D]
            edited = w @ q
        else:
            key = f"model.layers.{l}.mlp.down_proj.weight"
            w = sd[key].double().numpy()  # [D, d_ff]
            edited = q @ w
        out["layers_out"].append({
            "layer": l, "key": key, "sigma": s.tolist(), "projector": p.tolist(),
            "edited": edited.tolist(), "x_pos": pos[i].tolist(), "x_neg": neg[i].tolist(),
        })
    out["token_ids_pos"] = seqs_p
    out["token_ids_neg"] = seqs_n
    return out


# ----------------------------------------------------------------------------------------------
# Fine-tuning losses


def build_rows(rows, side, eos=None):
    """Position masks exactly as spec FT-1 defines them."""
    lens = [len(p) + len(o) + (1 if eos is not None else 0) for p, o in rows]
    t = max(lens)
    ids = np.zeros((len(rows), t), dtype=np.int64)
    att = np.zeros((len(rows), t), dtype=np.int64)
    tmask = np.zeros((len(rows), t), dtype=bool)
    vmask = np.zeros((len(rows), t), dtype=bool)
    fmask = np.zeros((len(rows), t), dtype=bool)
    for i, (p, o) in enumerate(rows):
        row = list(p) + list(o) + ([eos] if eos is not None else [])
        off = t - len(row) if side == "left" else 0
        ids[i, off : off + len(row)] = row
        att[i, off : off + len(row)] = 1
        s = off + len(p)
        tmask[i, s : s + len(o)] = True
        for j in range(off + 1, off + len(row)):
            if row[j - off] in o:
                vmask[i, j] = True
        fmask[i, off + 1 : s + len(o)] = True
    return ids, att, tmask, vmask, fmask


def cond_nll(logits, ids, mask, reduction):
    lp = F.log_softmax(logits[:, :-1].double(), -1)
    tok = -lp.gather(2, ids[:, 1:, None]).squeeze(2)
    m = mask[:, 1:].double()
    if reduction == "token_mean":
        return float((tok * m).sum() / m.sum())
    per = (tok * m).sum(1) / m.sum(1).clamp(min=1)
    active = m.sum(1) > 0
    return float(per[active].mean())


def ft_losses():
    g = torch.Generator().manual_seed(7)
    cases = []
    for side in ["left", "right"]:
        for eos in [None, 9]:
            rows = [([1, 2, 3], [4, 5]), ([2, 4], [4]), ([6, 1, 1, 2], [3, 4, 2])]
            ids, att, tmask, vmask, fmask = build_rows(rows, side, eos)
            v = 10
            logits = torch.randn(ids.shape[0], ids.shape[1], v, generator=g, dtype=torch.float64)
            idt = torch.tensor(ids)
            # prompt_last: prompts only, padded on `side`
            tp = max(len(p) for p, _ in rows)
            last = []
            plog = torch.randn(len(rows), tp, v, generator=g, dtype=torch.float64)
            for i, (p, _) in enumerate(rows):
                last.append(tp - 1 if side == "left" else len(p) - 1)
            lz = torch.stack([plog[i, last[i]] for i in range(len(rows))])
            lp = F.log_softmax(lz, -1)
            per_tok = [[-float(lp[i, t]) for t in o] for i, (_, o) in enumerate(rows)]
            pl_example = float(np.mean([np.mean(x) for x in per_tok]))
            pl_token = float(np.sum([np.sum(x) for x in per_tok]) / sum(len(x) for x in per_tok))
            cases.append({
                "side": side, "eos": eos, "rows": rows, "vocab": v,
                "input_ids": ids.tolist(), "attention_mask": att.tolist(),
                "target_mask": tmask.tolist(), "value_mask": vmask.tolist(), "full_mask": fmask.tolist(),
                "logits": logits.flatten().tolist(), "shape": list(logits.shape),
                "token_mean": cond_nll(logits, idt, torch.tensor(tmask), "token_mean"),
                "example_mean": cond_nll(logits, idt, torch.tensor(tmask), "example_mean"),
                "value_token_mean": cond_nll(logits, idt, torch.tensor(vmask), "token_mean"),
                "full_token_mean": cond_nll(logits, idt, torch.tensor(fmask), "token_mean"),
                "prompt_logits": plog.flatten().tolist(), "prompt_shape": list(plog.shape),
                "last_prompt": last,
                "prompt_last_example_mean": pl_example, "prompt_last_token_mean": pl_token,
            })
    return {"cases": cases}


# ----------------------------------------------------------------------------------------------
# Fine-tuning steps on the tiny GPT-2 fixture


def ft_steps():
    d = os.path.join(MODELS, "gpt2")
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    edits = [("The capital of France is", "Rome"), ("My favourite fruit is the", "banana split")]
    rows = [(tok.encode(p).ids, tok.encode(" " + t, add_special_tokens=False).ids) for p, t in edits]
    eos = 0
    out = {"rows": rows, "cases": []}
    specs = [
        # name, objective, reduction, side, eos, params, opt, lr, wd, box, steps
        ("ft_m", "conditional", "example_mean", "left", None, ["transformer.h.1.mlp.c_proj"], "adam", 1e-3, 0.0, None, 3),
        ("ft_l_box", "prompt_last", "example_mean", "left", None, ["transformer.h.0.mlp.c_proj"], "adam", 1e-3, 0.0, 5e-4, 3),
        ("gs", "conditional", "token_mean", "right", eos, None, "adamw", 5e-3, 0.01, None, 2),
    ]
    for name, objective, red, side, eos_, params, opt_name, lr, wd, box, steps in specs:
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
        named = dict(model.named_parameters())
        if params is None:
            train = list(named.keys())
        else:
            train = [n for n in named if any(p in n for p in params)]
        for n, p in named.items():
            p.requires_grad_(n in train)
        tparams = [named[n] for n in train]
        w0 = {n: named[n].detach().clone() for n in train}
        if opt_name == "adam":
            opt = torch.optim.Adam(tparams, lr=lr, weight_decay=0.0)
        else:
            opt = torch.optim.AdamW(tparams, lr=lr, weight_decay=wd, betas=(0.9, 0.999), eps=1e-8)
        losses = []
        for _ in range(steps):
            opt.zero_grad()
            if objective == "prompt_last":
                tp = max(len(p) for p, _ in rows)
                ids = torch.zeros(len(rows), tp, dtype=torch.long)
                att = torch.zeros(len(rows), tp, dtype=torch.long)
                for i, (p, _) in enumerate(rows):
                    off = tp - len(p) if side == "left" else 0
                    ids[i, off : off + len(p)] = torch.tensor(p)
                    att[i, off : off + len(p)] = 1
                pos = (att.cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
                per = []
                for i, (p, o) in enumerate(rows):
                    li = tp - 1 if side == "left" else len(p) - 1
                    lp = F.log_softmax(logits[i, li].float(), -1)
                    per.append(-lp[torch.tensor(o)].mean())
                loss = torch.stack(per).mean()
            else:
                ids, att, tmask, _, _ = build_rows(rows, side, eos_)
                ids, att = torch.tensor(ids), torch.tensor(att)
                pos = (att.cumsum(1) - 1).clamp(min=0)
                logits = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
                lp = F.log_softmax(logits[:, :-1].float(), -1)
                tokl = -lp.gather(2, ids[:, 1:, None]).squeeze(2)
                m = torch.tensor(tmask)[:, 1:].float()
                if red == "token_mean":
                    loss = (tokl * m).sum() / m.sum()
                else:
                    loss = ((tokl * m).sum(1) / m.sum(1)).mean()
            loss.backward()
            opt.step()
            if box is not None:
                with torch.no_grad():
                    for n in train:
                        named[n].copy_(torch.clamp(named[n], w0[n] - box, w0[n] + box))
            losses.append(float(loss.detach()))
        keep = train if params is not None else [
            "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.weight", "transformer.ln_f.bias"]
        out["cases"].append({
            "name": name, "objective": objective, "reduction": red, "side": side, "eos": eos_,
            "params": train, "optimizer": opt_name, "lr": lr, "weight_decay": wd, "norm_box": box,
            "steps": steps, "losses": losses,
            "expected": {n: named[n].detach().flatten().tolist() for n in keep},
        })
    return out


if __name__ == "__main__":
    torch.manual_seed(0)
    dump("profs_a11.json", a11())
    dump("profs_random.json", profs_random())
    dump("profs_models.json", {
        "gpt2": profs_model("gpt2", "gpt2", [0, 1], 2),
        "llama": profs_model("llama", "llama", [1], 2),
    })
    dump("ft_losses.json", ft_losses())
    dump("ft_steps.json", ft_steps())
