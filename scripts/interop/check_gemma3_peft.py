#!/usr/bin/env python3
"""PEFT loads an adapter qlora trained on the Gemma 3 GGUF onto transformers' Gemma3ForCausalLM.

usage: check_gemma3_peft.py RUN_DIR [--model models/gemma-3-270m-q4_k_m.gguf]
Needs: torch, transformers, peft, gguf (scripts/requirements-reference.txt).

The Gemma3TextConfig is built from the GGUF's hyper-parameters (layers, widths, heads, head_dim, window,
RoPE bases, vocabulary); the base weights are left at their random initialisation, since only what PEFT
does with the adapter is checked: PeftModel.from_pretrained(model, RUN_DIR) must report no missing or
unexpected LoRA keys, every lora_A / lora_B it holds must equal the file's tensor bit for bit, the
adapter config's r, lora_alpha and target_modules must be what the modules got (scaling = alpha / r),
and the adapted model must run a forward pass. Exit status 0 = OK.
"""
import argparse
import json
import os
import sys

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--model", default="models/gemma-3-270m-q4_k_m.gguf")
    a = ap.parse_args()
    import gguf
    import torch
    from peft import PeftModel
    from safetensors.numpy import load_file
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    r = gguf.GGUFReader(a.model)

    def kv(name):
        return r.fields[name].contents()

    n_layer = int(kv("gemma3.block_count"))
    vocab = [t for t in r.tensors if t.name == "token_embd.weight"][0].shape[1]
    pattern = 6
    cfg = Gemma3TextConfig(
        vocab_size=int(vocab), hidden_size=int(kv("gemma3.embedding_length")),
        intermediate_size=int(kv("gemma3.feed_forward_length")), num_hidden_layers=n_layer,
        num_attention_heads=int(kv("gemma3.attention.head_count")),
        num_key_value_heads=int(kv("gemma3.attention.head_count_kv")),
        head_dim=int(kv("gemma3.attention.key_length")), query_pre_attn_scalar=int(kv("gemma3.attention.key_length")),
        sliding_window=int(kv("gemma3.attention.sliding_window")), rms_norm_eps=float(kv("gemma3.attention.layer_norm_rms_epsilon")),
        layer_types=["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layer)],
        rope_parameters={"full_attention": dict(rope_type="default", rope_theta=float(kv("gemma3.rope.freq_base"))),
                         "sliding_attention": dict(rope_type="default", rope_theta=10000.0)},
        tie_word_embeddings=True, max_position_embeddings=int(kv("gemma3.context_length")))
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).float()
    pm = PeftModel.from_pretrained(model, a.run_dir, is_trainable=False)
    with open(os.path.join(a.run_dir, "adapter_config.json")) as f:
        acfg = json.load(f)
    want = load_file(os.path.join(a.run_dir, "adapter_model.safetensors"))
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    got = {k.replace(".default", ""): v for k, v in sd.items()}
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        sys.exit(f"FAIL: missing {missing[:4]} unexpected {unexpected[:4]}")
    for k, v in want.items():
        if not np.array_equal(got[k].detach().numpy(), v):
            sys.exit(f"FAIL: {k} differs after loading")
    n_mod = 0
    for name, mod in pm.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            n_mod += 1
            if mod.r["default"] != acfg["r"] or abs(mod.scaling["default"] - acfg["lora_alpha"] / acfg["r"]) > 1e-9:
                sys.exit(f"FAIL: {name}: r {mod.r['default']} scaling {mod.scaling['default']}")
    with torch.no_grad():
        out = pm(input_ids=torch.tensor([[2, 818, 5279, 529]])).logits
    if not torch.isfinite(out).all():
        sys.exit("FAIL: non-finite logits")
    print(f"[peft] gemma3: PeftModel.from_pretrained loaded {len(want)} tensors on {n_mod} modules "
          f"(target_modules {acfg['target_modules']}, r {acfg['r']}, alpha {acfg['lora_alpha']}) onto "
          f"Gemma3ForCausalLM ({n_layer} layers); every tensor equal to the file's; forward pass finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
