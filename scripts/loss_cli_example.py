"""Worked example of `amend loss` (docs/loss-cli.md): write a batch, compare amend with PyTorch.

    python scripts/loss_cli_example.py write batch.safetensors cfg.json
    amend loss tnff --config cfg.json --inputs batch.safetensors --out out.safetensors
    python scripts/loss_cli_example.py check batch.safetensors out.safetensors

`write` saves a random TNT batch (logits, ref_logits, labels, weights) and the config;
`check` recomputes TNFF (Zhang et al., arXiv 2406.13660; google/t5patches) with plain PyTorch
autograd and compares the loss, the token losses and the gradient with amend's output.
Needs torch and safetensors (both are in the venv that scripts/setup-libtorch.sh creates).
"""

import json
import sys

import torch
from safetensors.torch import load_file, save_file

ALPHA = 2.0


def write(batch_path, cfg_path):
    g = torch.Generator().manual_seed(0)
    b, t, v = 2, 6, 50
    batch = {
        "logits": torch.randn(b, t, v, generator=g) * 2,
        "ref_logits": torch.randn(b, t, v, generator=g) * 2,
        "labels": torch.randint(0, v, (b, t), generator=g),
        # -1 on unwanted tokens, +1 on the others, 0 on padding.
        "weights": torch.tensor([[1, 1, -1, 1, 0, 0], [1, -1, -1, 1, 1, 0]]),
    }
    save_file(batch, batch_path)
    with open(cfg_path, "w") as f:
        json.dump({"alpha": ALPHA, "reduction": "mean"}, f)


def tnff_torch(logits, ref_logits, labels, weights, alpha):
    """Token losses of TNFF: alpha * CE(z; q) at w = -1, CE(z; p_ref) at w = +1, 0 at w = 0."""
    logp = logits.log_softmax(-1)
    neg = (weights < 0).unsqueeze(-1)
    # q: the reference with the label removed and renormalised (softmax of the masked logits).
    q_neg = ref_logits.scatter(-1, labels.unsqueeze(-1), float("-inf")).softmax(-1)
    q = torch.where(neg, q_neg, ref_logits.softmax(-1))
    ce = -(q * logp).sum(-1)
    scale = torch.where(weights < 0, alpha, 1.0)
    return torch.where(weights != 0, scale * ce, torch.zeros_like(ce))


def check(batch_path, out_path):
    batch = load_file(batch_path)
    out = load_file(out_path)
    z = batch["logits"].double().requires_grad_(True)
    tok = tnff_torch(z, batch["ref_logits"].double(), batch["labels"], batch["weights"], ALPHA)
    count = (batch["weights"] != 0).sum()
    loss = tok.sum() / count
    loss.backward()
    checks = {
        "loss": (out["loss"].double(), loss.detach()),
        "per_example": (out["per_example"].double(), tok.detach()),
        "grad.logits": (out["grad.logits"].double(), z.grad),
    }
    for name, (got, want) in checks.items():
        err = (got - want).abs().max().item()
        print(f"{name:12s} max |amend - torch| = {err:.2e}")
        assert err < 1e-5, name
    print(f"loss {out['loss'].item():.6f}  count {out['part.tokens.count'].item():.0f}  "
          f"tnt/neg_mass {out['metric.tnt/neg_mass.sum'].item() / out['metric.tnt/neg_mass.count'].item():.4f}")
    print("amend matches PyTorch")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "write":
        write(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3])
    else:
        sys.exit(__doc__)
