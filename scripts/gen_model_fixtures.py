#!/usr/bin/env python3
"""Builds the tiny Hugging Face checkpoints and reference outputs amend-models' parity tests use.

Run with the cache venv's python (torch 2.13.0, transformers 5.23.0, tokenizers, safetensors):

    $(grep AMEND_TORCH_PYTHON .cargo/config.toml | cut -d'"' -f2) scripts/gen_model_fixtures.py

It writes crates/amend-models/tests/fixtures/models/<case>/ for every supported architecture:

    config.json, model.safetensors (or a sharded index), tokenizer.json,
    generation_config.json (some cases), and
    reference.safetensors  input ids and the reference tensors computed by transformers
    reference.json         metadata: sizes, prompts and greedy generations

Each case is a tiny random model (hidden 32, 2 layers) with weights re-drawn from wider
distributions than transformers' init so that logits are far from uniform and greedy decoding
has clear winners. Reference tensors (all f32, computed in eval mode):

    logits               [2, 12, V]   forward of `ids` (no padding)
    hidden_{i}           [2, 12, H]   transformers' hidden_states[i], i < num_layers
    hidden_last_block    [2, 12, H]   output of the last block, before the final norm (hook)
    hidden_final         [2, 12, H]   transformers' hidden_states[num_layers] (after the norm)
    row{j}_logits        [1, L_j, V]  each row of `padded_ids` alone, unpadded
    padded_ids           [3, 12]      rows of lengths 12, 7, 4 (the Rust test pads them)

Greedy generations (10 new tokens, no stop token) of two prompts are computed one prompt at a
time. `reference.json` also records the smallest top-1/top-2 logit gap seen while decoding, so
a near tie can be told apart from a real divergence.

CI never runs this script; its outputs are committed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "crates" / "amend-models" / "tests" / "fixtures" / "models"

VOCAB = 320  # model rows; the tokenizer uses fewer
HIDDEN = 32
LAYERS = 2
HEADS = 4
SEQ = 12

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a small model learns the words it sees most often",
    "every parity test compares logits within a tight tolerance",
    "rust and python agree when both compute the same thing",
    "hidden states flow through every layer of the network",
    "the cat sat on the mat and the dog sat on the log",
] * 4


def build_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    assert tok.get_vocab_size() <= VOCAB, tok.get_vocab_size()
    return tok


def widen(model: torch.nn.Module, seed: int) -> None:
    """Redraws every parameter: weights N(0, 0.2), biases N(0, 0.1), norm gains 1 + N(0, 0.1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def last_block(model):
    if hasattr(model, "transformer"):
        return model.transformer.h[-1]
    return model.model.layers[-1]


@torch.no_grad()
def references(model, seed: int, dtype: torch.dtype) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed + 1000)
    ids = torch.randint(1, 300, (2, SEQ), generator=g)
    lengths = [SEQ, 7, 4]
    padded = torch.randint(1, 300, (3, SEQ), generator=g)
    for j, n in enumerate(lengths):
        padded[j, n:] = 0

    captured = {}

    def hook(_m, _inp, out):
        captured["h"] = out[0] if isinstance(out, tuple) else out

    handle = last_block(model).register_forward_hook(hook)
    out = model(input_ids=ids, output_hidden_states=True)
    handle.remove()
    tensors = {
        "ids": ids,
        "logits": out.logits.float(),
        "hidden_last_block": captured["h"].float(),
        "hidden_final": out.hidden_states[-1].float(),
        "padded_ids": padded,
    }
    for i in range(LAYERS):
        tensors[f"hidden_{i}"] = out.hidden_states[i].float()
    for j, n in enumerate(lengths):
        tensors[f"row{j}_logits"] = model(input_ids=padded[j : j + 1, :n]).logits.float()

    prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]
    gens, gaps = [], []
    for p in prompts:
        x = torch.tensor([p])
        res = model.generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=10,
            eos_token_id=None,
            pad_token_id=0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        gens.append(res.sequences[0, len(p) :].tolist())
        gap = min(float((s[0].topk(2).values[0] - s[0].topk(2).values[1])) for s in res.scores)
        gaps.append(gap)
    meta = {
        "dtype": str(dtype).replace("torch.", ""),
        "num_layers": LAYERS,
        "lengths": lengths,
        "prompts": prompts,
        "greedy": gens,
        "min_top2_gap": gaps,
    }
    return {k: v.contiguous() for k, v in tensors.items()}, meta


def save_case(name: str, model, tok: Tokenizer, seed: int, *, dtype=torch.float32, shard=None, gen_config=None, edit_config=None):
    d = OUT / name
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(seed)
    widen(model, seed)
    model = model.to(dtype).eval()
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(d, **kwargs)
    if not gen_config:
        (d / "generation_config.json").unlink(missing_ok=True)
    else:
        (d / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
    tok.save(str(d / "tokenizer.json"))
    if edit_config:
        cfg = json.loads((d / "config.json").read_text())
        edit_config(cfg)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
    # References come from the saved directory as transformers loads it (an in-memory
    # `model.to(bfloat16)` would also round RoPE's inverse frequencies, which loading does not).
    model = AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    tensors, meta = references(model, seed, dtype)
    meta["model_type"] = model.config.model_type
    save_file(tensors, str(d / "reference.safetensors"))
    (d / "reference.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in d.iterdir())
    print(f"{name:16s} {size / 1024:7.1f} KB  min top-2 gap {min(meta['min_top2_gap']):.4f}")


def legacy_gpt2(src: Path, dst: Path):
    """GPT-2 saved as old checkpoints were: keys without `transformer.` and `attn.bias` buffers."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    sd = load_file(str(src / "model.safetensors"))
    out = {}
    for k, v in sd.items():
        out[k.removeprefix("transformer.")] = v
    n_pos = json.loads((src / "config.json").read_text())["n_positions"]
    for i in range(LAYERS):
        out[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_pos, n_pos, dtype=torch.bool)).view(1, 1, n_pos, n_pos)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    # transformers must load it to the same model.
    a = GPT2LMHeadModel.from_pretrained(src).eval()
    b = GPT2LMHeadModel.from_pretrained(dst).eval()
    x = torch.arange(1, 9).view(1, 8)
    assert torch.equal(a(x).logits, b(x).logits)
    print(f"{dst.name:16s} (legacy key layout of gpt2)")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=None)

    gpt2 = GPT2Config(n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, **common)
    save_case("gpt2", GPT2LMHeadModel(gpt2), tok, 1,
              gen_config={"bos_token_id": 0, "eos_token_id": 0, "do_sample": True, "temperature": 0.7, "top_p": 0.9})
    legacy_gpt2(OUT / "gpt2", OUT / "gpt2_legacy")

    gpt2u = GPT2Config(n_positions=64, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=48,
                       activation_function="gelu", scale_attn_by_inverse_layer_idx=True,
                       tie_word_embeddings=False, **common)
    save_case("gpt2_untied", GPT2LMHeadModel(gpt2u), tok, 2)

    llama = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, max_position_embeddings=128, bos_token_id=0, eos_token_id=0)
    save_case("llama", LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **llama)), tok, 3)
    save_case("llama_sharded", LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **llama)), tok, 4, shard="40KB")

    rope3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    save_case("llama3_rope", LlamaForCausalLM(LlamaConfig(num_key_value_heads=1, rope_parameters=rope3,
                                                          tie_word_embeddings=True, **llama)), tok, 5)

    def to_legacy_rope(cfg):
        rp = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rp.pop("rope_theta")
        cfg["rope_scaling"] = {"type": rp.pop("rope_type"), **rp}

    lin = {"rope_type": "linear", "rope_theta": 500000.0, "factor": 2.0}
    save_case("llama_linear_bias", LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, head_dim=16,
                                                                 rope_parameters=lin, attention_bias=True,
                                                                 mlp_bias=True, **llama)), tok, 6,
              edit_config=to_legacy_rope)

    save_case("mistral", MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=4, **llama)), tok, 7)
    save_case("qwen2", Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True, **llama)), tok, 8)
    save_case("qwen2_sliding", Qwen2ForCausalLM(Qwen2Config(num_key_value_heads=2, use_sliding_window=True,
                                                            sliding_window=4, max_window_layers=1, **llama)), tok, 9)

    save_case("gpt2_bf16", GPT2LMHeadModel(gpt2), tok, 10, dtype=torch.bfloat16)
    save_case("llama_bf16", LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, **llama)), tok, 11, dtype=torch.bfloat16)


if __name__ == "__main__":
    main()
