#!/usr/bin/env python3
"""Checks that transformers loads a directory written by amend unchanged.

    python scripts/check_saved_model.py SAVED_DIR REFERENCE_DIR [RUST_LOGITS.safetensors]

Loads both directories with `AutoModelForCausalLM.from_pretrained` (and the tokenizer with
`AutoTokenizer` when REFERENCE_DIR has one) and requires:

* the same config class and the same config values (ignoring `transformers_version`);
* every state-dict tensor equal (same name, dtype, shape, values);
* identical logits on a fixed batch of token ids;
* no missing or unexpected keys reported by transformers;
* with RUST_LOGITS (a safetensors file holding `ids` and `logits` computed by amend), the
  logits transformers computes for `ids` from SAVED_DIR within 1e-4.

Exits with status 1 and a message on the first difference. amend's `#[ignore]`d test
`transformers_loads_rust_saved_directories` (crates/amend-models/tests/save.rs) runs this script
on directories written by Rust; run it with

    cargo test -p amend-models --test save -- --ignored
"""

from __future__ import annotations

import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def fail(msg: str) -> None:
    print(f"check_saved_model: {msg}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    saved, ref = sys.argv[1], sys.argv[2]
    a, info = AutoModelForCausalLM.from_pretrained(saved, dtype="auto", output_loading_info=True)
    b = AutoModelForCausalLM.from_pretrained(ref, dtype="auto")
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if info.get(kind):
            fail(f"{kind}: {info[kind]}")
    if type(a) is not type(b):
        fail(f"class {type(a).__name__} != {type(b).__name__}")
    ca = {k: v for k, v in a.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    cb = {k: v for k, v in b.config.to_dict().items() if k not in ("transformers_version", "_name_or_path")}
    if ca != cb:
        diff = {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k)}
        fail(f"config differs: {diff}")
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        fail(f"state dict keys differ: {sorted(set(sa) ^ set(sb))}")
    for k in sa:
        if sa[k].dtype != sb[k].dtype or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k]):
            fail(f"tensor {k} differs")
    ids = torch.arange(1, 17).view(2, 8) % a.config.vocab_size
    with torch.no_grad():
        la, lb = a.eval()(ids).logits, b.eval()(ids).logits
    if not torch.equal(la, lb):
        fail(f"logits differ by {(la - lb).abs().max().item()}")
    if len(sys.argv) > 3:
        from safetensors.torch import load_file

        r = load_file(sys.argv[3])
        with torch.no_grad():
            lt = a(r["ids"]).logits.float()
        err = (lt - r["logits"]).abs().max().item()
        if err > 1e-4:
            fail(f"transformers logits differ from amend's by {err}")
    try:
        ta, tb = AutoTokenizer.from_pretrained(saved), AutoTokenizer.from_pretrained(ref)
        text = "the quick brown fox"
        if ta(text)["input_ids"] != tb(text)["input_ids"]:
            fail("tokenizers disagree")
    except (OSError, ValueError):
        pass  # no tokenizer in the reference directory
    print(f"check_saved_model: {saved} matches {ref}")


if __name__ == "__main__":
    main()
