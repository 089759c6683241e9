#!/usr/bin/env python3
"""PyTorch side of amend's peers bench (benches/peers.rs runs it; one process per measurement).

    python scripts/bench_peers.py --inputs FILE --loss LOSS --impl IMPL --mode time|mem \
        --threads N [--seconds S]

LOSS is `dpo`, `orpo`, `simpo` or `ce`; IMPL is

* `liger`:       Liger-Kernel 0.8.5's chunked fused-linear loss, `compiled=True` (its default;
                 torch.compile's CPU backend), default `chunk_size`;
* `liger-eager`: the same with `compiled=False`;
* `torch`:       the full-logits composite a PyTorch user writes: `logits = h @ W.T`,
                 `log_softmax`, gather, the loss, `backward()`.

FILE is a safetensors file the Rust bench wrote: `hidden [2P, T, H]` (the first P sequences are
the chosen responses, the last P the rejected ones, as Liger lays them out), `weight [V, H]`,
`ids [2P, T]`, `mask [2P, T]` (1 = completion token), `ref_hidden`, `ref_weight` (DPO's frozen
reference). Position t's logits score `ids[:, t+1]` where `mask[:, t+1] = 1` (TRL's shift), so
the peers get `hidden[:, :-1]` and `ids[:, 1:]` with non-completion labels set to -100. `ce`
uses `hidden` flattened to `[2P·T, H]` with `ids` as labels (all rows scored).

One step = drop the gradients of `hidden` and `weight`, forward, `backward()` (both require
grad). `--mode time`: 2 warm-up steps (compilation happens there), then steps for about S
seconds (at least 3); prints {"median_ms", "iters", "loss"}. `--mode mem`: one warm-up step,
then resets the peak RSS (/proc/self/clear_refs) and prints {"peak_step_kib": VmHWM - VmRSS
before, "loss"} of one step. Run mem children with MALLOC_MMAP_THRESHOLD_=131072 so that freed
large buffers leave the RSS (the Rust bench does this for every side). A loss or implementation
that cannot run prints {"error": "..."} and exits 0.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

IGNORE = -100
DPO_BETA = 0.1
ORPO_BETA = 0.1
SIMPO_BETA, SIMPO_GAMMA = 2.0, 0.5


def status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def shifted(x: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Peers' layout of the preference inputs: hidden[:, :-1] and masked ids[:, 1:]."""
    target = x["ids"][:, 1:].masked_fill(x["mask"][:, 1:] == 0, IGNORE)
    return target, x["ref_hidden"][:, :-1]


def composite_logps(h: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs and token counts per sequence, through full logits."""
    logits = h @ w.T
    logp = logits.float().log_softmax(-1)
    valid = target != IGNORE
    tok = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    tok = torch.where(valid, tok, torch.zeros_like(tok))
    return tok.sum(-1), valid.sum(-1)


def make_step(loss: str, impl: str, x: dict):
    hidden, weight = x["hidden"], x["weight"]
    target, ref_hidden = shifted(x)
    p = hidden.shape[0] // 2
    if loss == "ce":
        h2 = hidden.view(-1, hidden.shape[-1])
        labels = x["ids"].reshape(-1)
        if impl == "torch":
            return lambda: F.cross_entropy(h2 @ weight.T, labels)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        fn = LigerFusedLinearCrossEntropyLoss()
        return lambda: fn(weight, h2, labels)

    if impl in ("liger", "liger-eager"):
        compiled = impl == "liger"
        if loss == "dpo":
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

            fn = LigerFusedLinearDPOLoss(beta=DPO_BETA, compiled=compiled, use_ref_model=True)
            ref_w = x["ref_weight"]
            return lambda: fn(weight, hidden[:, :-1], target, ref_input=ref_hidden, ref_weight=ref_w)[0]
        if loss == "orpo":
            from liger_kernel.chunked_loss import LigerFusedLinearORPOLoss

            fn = LigerFusedLinearORPOLoss(beta=ORPO_BETA, compiled=compiled)
            return lambda: fn(weight, hidden[:, :-1], target)[0]
        if loss == "simpo":
            from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

            fn = LigerFusedLinearSimPOLoss(
                beta=SIMPO_BETA, gamma=SIMPO_GAMMA, compute_nll_loss=False, compiled=compiled
            )
            return lambda: fn(weight, hidden[:, :-1], target)[0]
        raise SystemExit(f"unknown loss {loss}")

    if impl != "torch":
        raise SystemExit(f"unknown impl {impl}")

    def step():
        s, n = composite_logps(hidden[:, :-1], weight, target)
        sc, sr, nc, nr = s[:p], s[p:], n[:p], n[p:]
        if loss == "dpo":
            with torch.no_grad():
                rs, _ = composite_logps(ref_hidden, x["ref_weight"], target)
            u = DPO_BETA * ((sc - rs[:p]) - (sr - rs[p:]))
            return -F.logsigmoid(u).mean()
        ac, ar = sc / nc, sr / nr
        if loss == "orpo":
            log_odds = (ac - ar) - (torch.log1p(-torch.exp(ac)) - torch.log1p(-torch.exp(ar)))
            nll = -sc.sum() / nc.sum()
            return nll - ORPO_BETA * F.logsigmoid(log_odds).mean()
        if loss == "simpo":
            return -F.logsigmoid(SIMPO_BETA * (ac - ar) - SIMPO_GAMMA).mean()
        raise SystemExit(f"unknown loss {loss}")

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--inputs", required=True)
    ap.add_argument("--loss", required=True, choices=["dpo", "orpo", "simpo", "ce"])
    ap.add_argument("--impl", required=True, choices=["liger", "liger-eager", "torch"])
    ap.add_argument("--mode", required=True, choices=["time", "mem"])
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    x = load_file(args.inputs)
    for k in ("hidden", "weight"):
        x[k].requires_grad_(True)

    def one() -> float:
        x["hidden"].grad = None
        x["weight"].grad = None
        loss = fwd()
        loss.backward()
        return loss.item()

    try:
        fwd = make_step(args.loss, args.impl, x)
        loss = one()
    except Exception as e:  # a peer without a path for this loss or device
        msg = str(e).strip().splitlines()
        print(json.dumps({"error": f"{type(e).__name__}: {msg[-1] if msg else ''}"[:300]}), flush=True)
        return

    if args.mode == "mem":
        x["hidden"].grad = None
        x["weight"].grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status_kib("VmRSS:")
        loss = one()
        peak = status_kib("VmHWM:")
        print(json.dumps({"peak_step_kib": max(peak - before, 0), "rss_before_kib": before, "loss": loss}), flush=True)
        return

    one()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < args.seconds:
        t0 = time.perf_counter()
        loss = one()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"median_ms": statistics.median(times) * 1e3, "iters": len(times), "loss": loss}), flush=True)


if __name__ == "__main__":
    main()
