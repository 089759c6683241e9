#!/usr/bin/env python3
"""Reference values for amend-models' training utilities, computed with PyTorch / transformers.

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_train_fixtures.py

Writes crates/amend-models/tests/fixtures/train.json:

* `adamw`: two parameter groups (weight decay 0.1 and 0), betas (0.9, 0.95), eps 1e-8,
  `torch.optim.AdamW(foreach=False)` over 5 steps with given gradients and per-step learning
  rates; the parameters after every step.
* `schedules`: transformers' get_{constant,linear,cosine}_schedule_with_warmup multipliers for
  warm-up 3, total 10, at steps 0..=10.
* `clip`: torch.nn.utils.clip_grad_norm_ on two gradients, clipping (max 1) and not (max 100).

Everything is float64 so the Rust side can compare at f64 tolerance.
"""

import json
from pathlib import Path

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

OUT = Path(__file__).resolve().parent.parent / "crates" / "amend-models" / "tests" / "fixtures" / "train.json"


def adamw():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    w0, b0 = w.detach().clone(), b.detach().clone()
    opt = torch.optim.AdamW(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
        lr=1.0, betas=(0.9, 0.95), eps=1e-8, foreach=False,
    )
    lrs = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2]
    steps = []
    for lr in lrs:
        for group in opt.param_groups:
            group["lr"] = lr
        gw = torch.randn(3, 2, generator=g, dtype=torch.float64)
        gb = torch.randn(2, generator=g, dtype=torch.float64)
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
        steps.append({"lr": lr, "grad_w": gw.flatten().tolist(), "grad_b": gb.tolist(),
                      "w": w.detach().flatten().tolist(), "b": b.detach().tolist()})
    return {"w0": w0.flatten().tolist(), "b0": b0.tolist(), "steps": steps}


def schedules():
    p = torch.nn.Parameter(torch.zeros(1))
    out = {}
    for name, make in [
        ("constant", lambda o: get_constant_schedule_with_warmup(o, 3)),
        ("linear", lambda o: get_linear_schedule_with_warmup(o, 3, 10)),
        ("cosine", lambda o: get_cosine_schedule_with_warmup(o, 3, 10)),
    ]:
        opt = torch.optim.SGD([p], lr=1.0)
        sched = make(opt)
        out[name] = [sched.lr_lambdas[0](s) for s in range(0, 11)]
    return out


def clip():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(4, generator=g, dtype=torch.float64)
    b = torch.randn(2, 3, generator=g, dtype=torch.float64)
    res = {"a": a.tolist(), "b": b.flatten().tolist()}
    for max_norm in [1.0, 100.0]:
        pa, pb = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64)), torch.nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
        pa.grad, pb.grad = a.clone(), b.clone()
        total = torch.nn.utils.clip_grad_norm_([pa, pb], max_norm)
        res[f"max_{int(max_norm)}"] = {"total": total.item(), "a": pa.grad.tolist(), "b": pb.grad.flatten().tolist()}
    return res


def main():
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = {"adamw": adamw(), "schedules": schedules(), "clip": clip()}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
