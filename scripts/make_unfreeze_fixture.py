#!/usr/bin/env python3
"""Write tests/fixtures/ref_unfreeze.json.gz: what axolotl's unfrozen_parameters does under an adapter,
by axolotl's and PEFT's own code, for tests/test_unfreeze.c.

Command (from the repo root; venv of scripts/requirements-reference.txt):

    pip download --no-deps --no-binary :all: axolotl==0.19.0 -d /tmp/axo_dl
    tar -xzf /tmp/axo_dl/axolotl-0.19.0.tar.gz -C /tmp/axo_dl
    AXOLOTL_SRC=/tmp/axo_dl/axolotl-0.19.0 /work/venv-ref/bin/python scripts/make_unfreeze_fixture.py

(axolotl-0.19.0.tar.gz sha256 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d.)

For tiny models of each architecture qlora runs (transformers' text-only classes, random weights), wrapped
by PEFT's get_peft_model as axolotl's ModelLoader does before train.py calls freeze_layers_except: the
names of model.named_parameters() with requires_grad as PEFT leaves them (the LoRA weights and
modules_to_save copies), and, for each list of patterns, the names axolotl's own freeze_layers_except
(src/axolotl/utils/freeze.py, loaded from the sdist; its two imports, is_main_process and get_logger,
stubbed) leaves trainable, or the error it raises.
"""
import gzip
import importlib.util
import json
import logging
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_reference import versions  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "ref_unfreeze.json.gz")
AXO = os.environ.get("AXOLOTL_SRC", "/tmp/axo_dl/axolotl-0.19.0")

PATTERNS = [
    ["^model.language_model.*", "^lm_head.*"],  # axolotl's Gemma 3 examples
    [".+lora_.+"],
    [".+lora_.+", ".+modules_to_save.+"],
    [".+lora_.+", "^.+layers.0.input_layernorm.weight$"],  # axolotl's tests/e2e/multigpu/test_fsdp2.py
    [".+layers.0.+lora_.+"],
    ["lm_head"],
    ["^base_model.model.model.embed_tokens.+"],
    [".+lora_[AB].default.weight$"],
]


def load_freeze():
    for n in ["axolotl", "axolotl.utils", "axolotl.utils.distributed", "axolotl.utils.logging"]:
        m = types.ModuleType(n)
        m.__path__ = []
        sys.modules[n] = m
    sys.modules["axolotl.utils.distributed"].is_main_process = lambda: True
    sys.modules["axolotl.utils.logging"].get_logger = logging.getLogger
    spec = importlib.util.spec_from_file_location("axolotl.utils.freeze",
                                                  os.path.join(AXO, "src", "axolotl", "utils", "freeze.py"))
    fr = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fr)
    return fr


def models():
    import transformers as tf
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return [
        # (name, arch for qlora, model, target_modules, modules_to_save)
        ("gemma3", "gemma3", tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=16, **common)), all7, None),
        ("llama_untied_qv_lm_head", "llama",
         tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=False, **common)), ["q_proj", "v_proj"], ["lm_head"]),
        ("llama_tied_embed", "llama", tf.LlamaForCausalLM(tf.LlamaConfig(tie_word_embeddings=True, **common)), all7,
         ["embed_tokens"]),
        ("qwen2", "qwen2", tf.Qwen2ForCausalLM(tf.Qwen2Config(tie_word_embeddings=False, **common)), all7, None),
        ("phi3", "phi3", tf.Phi3ForCausalLM(tf.Phi3Config(tie_word_embeddings=False, pad_token_id=0, **common)),
         ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"], None),
    ]


def main():
    import torch
    from peft import LoraConfig, get_peft_model
    logging.disable(logging.WARNING)
    fr = load_freeze()
    torch.manual_seed(0)
    cases = []
    for name, arch, model, targets, mts in models():
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=mts))
        names = [n for n, _ in pm.named_parameters()]
        trainable = [int(p.requires_grad) for _, p in pm.named_parameters()]
        res = []
        for pats in PATTERNS:
            for (_, p), t in zip(pm.named_parameters(), trainable):
                p.requires_grad = bool(t)
            try:
                fr.freeze_layers_except(pm, pats)
                res.append({"patterns": pats, "trainable": [n for n, p in pm.named_parameters() if p.requires_grad]})
            except Exception as ex:  # noqa: BLE001
                res.append({"patterns": pats, "error": str(ex)})
        cases.append({"name": name, "arch": arch, "n_layer": 2, "targets": targets, "modules_to_save": mts or [],
                      "tied": int(bool(model.config.tie_word_embeddings)), "names": names, "trainable": trainable,
                      "results": res})
        print(f"[unfreeze] {name}: {len(names)} names, {sum(trainable)} trainable")
    out = {"versions": versions(), "axolotl": "0.19.0 (sdist sha256 "
           "136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d)", "cases": cases}
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(json.dumps(out, indent=0).encode())
    print(f"[unfreeze] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
