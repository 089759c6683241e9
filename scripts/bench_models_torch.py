#!/usr/bin/env python3
"""PyTorch-eager side of amend's model throughput bench (benches/models.rs runs it).

    python scripts/bench_models_torch.py --model DIR --batch B --seq T --threads N --seconds S \
        [--batch-file FILE] [--check FILE]

Loads DIR (a checkpoint the Rust bench just wrote, so both sides run the same weights) with
transformers' `AutoModelForCausalLM` (SDPA attention, f32, dropout 0) and times, on CPU with N
intra-op threads:

* forward:    `model(ids).logits` under `torch.no_grad()`, eval mode;
* train step: zero_grad(set_to_none) → forward → next-token cross-entropy (f32) → backward →
              clip_grad_norm_(1.0) → AdamW(lr 1e-4, weight decay 0.01, PyTorch's default
              implementation for CPU tensors) step, train mode;
* tnt step:   the train step with TNFF (alpha 1, token mean over the non-zero weights) written as
              the torch composite a Python user would write (`tnff_torch` of
              scripts/loss_cli_example.py), against reference logits computed once, untimed.

--batch-file FILE (a safetensors file with `ids [B, T]`, `labels [B, T]` and TNT `weights
[B, T]` from amend) gives every mode the same batch as the Rust side; without it the ids are
random and the tnt mode is unavailable.

Each mode runs 2 warm-up iterations, then iterations for about S seconds (at least 3). Prints
one JSON object per mode: {"mode", "iters", "median_ms", "tokens_per_s"}. With --check FILE (a
safetensors file with `ids` and `logits` from amend), first prints {"check": max |Δlogit|}.
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loss_cli_example import tnff_torch


def timed(fn, seconds: float) -> list[float]:
    for _ in range(2):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--seq", type=int, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--modes", default="forward,train,tnt")
    ap.add_argument("--batch-file")
    ap.add_argument("--check")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    vocab = model.config.vocab_size

    if args.check:
        r = load_file(args.check)
        model.eval()
        with torch.no_grad():
            diff = (model(r["ids"]).logits - r["logits"]).abs().max().item()
        print(json.dumps({"check": diff}), flush=True)

    batch = load_file(args.batch_file) if args.batch_file else None
    ids = batch["ids"] if batch else torch.randint(0, vocab, (args.batch, args.seq))
    tokens = args.batch * args.seq

    for mode in args.modes.split(","):
        if mode == "forward":
            model.eval()

            def step():
                with torch.no_grad():
                    model(ids).logits

        elif mode == "train":
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

            def step():
                opt.zero_grad(set_to_none=True)
                logits = model(ids).logits
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        elif mode == "tnt":
            if batch is None:
                raise SystemExit("the tnt mode needs --batch-file")
            labels, weights = batch["labels"], batch["weights"]
            count = (weights != 0).sum()
            model.eval()
            with torch.no_grad():
                ref_logits = model(ids).logits
            model.train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

            def step():
                opt.zero_grad(set_to_none=True)
                logits = model(ids).logits
                loss = tnff_torch(logits, ref_logits, labels, weights, 1.0).sum() / count
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()

        else:
            raise SystemExit(f"unknown mode {mode}")
        times = timed(step, args.seconds)
        med = statistics.median(times)
        print(json.dumps({"mode": mode, "iters": len(times), "median_ms": med * 1e3, "tokens_per_s": tokens / med}), flush=True)


if __name__ == "__main__":
    main()
