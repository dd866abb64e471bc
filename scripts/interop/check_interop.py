#!/usr/bin/env python3
"""Interop checks of qlora's outputs against the runtimes that consume them (`make test-interop`).

usage: check_interop.py --bin BIN_DIR --model MODEL.gguf --work WORK_DIR
       (then check_llama_cpp.py --model MODEL.gguf --work WORK_DIR for llama.cpp)

Every number compared here comes from two independent implementations fed the same token ids:
qlora's logits are written by `qlora-generate --dump-logits` (the evaluation forward pass), the
others by PyTorch (transformers + PEFT), llama.cpp (llama-cpp-python) and the `gguf` package.

Adapters under test:
  synth      random r=8 adapter on all seven linears, |B| large enough that the adapter moves the
             logits by O(1) (so a wrong Q/K row order, scaling or orientation cannot hide);
  synth_rs   the same idea with use_rslora and r=4 (GGUF alpha must become alpha*sqrt(r));
  trained    qlora's own adapter: build/e2e-out from `make test` if present (QLORA_INTEROP_TRAIN=1 to
             train one here instead), else a short qlora-train run on the man pages.

Checks (tolerances are on logits, in nats; the base logits span about 30):
  1. gguf      the GGUF LoRA read back with the `gguf` package: keys, F32, shapes {in,r}/{r,out},
               lora_a == PEFT A, lora_b == PEFT B with the converter's Q/K permutation, alpha.
  2. peft      transformers loads the GGUF base (gguf_file=...), weights rounded to bf16 as qlora
               holds them with load_in_4bit: false; PEFT loads the adapter; fp32 forward.
               vs qlora (--load-in-4bit 0 --bf16 0): max |diff| <= 2e-3.
  3. merged    qlora-export --merged against PEFT's merge_and_unload on the same base weights (bf16
               base; NF4 base = bitsandbytes' quantize/dequantize of the GGUF weights): every bf16
               weight within 1 ulp, and transformers' logits of the two directories within 2e-3
               (the difference to the unmerged base + adapter is reported: one bf16 rounding of W);
               tokenizer.json + chat template reproduce qlora's prompt ids; generation_config eos.
  4. llama.cpp (check_llama_cpp.py, same work directory).
  5. hf_dir    transformers save_pretrained of the GGUF-loaded model (fp32 safetensors) as base_model:
               qlora-train's losses equal the GGUF run's (|diff| <= 1e-6: the NF4 weights are the
               same); peak RSS of loading (info).
  7. family    the tiny llama3 / mistral / qwen2 / phi3 models of tests/fixtures/ref_<family>.qref.gz: qlora
               trains on the GGUF form, PEFT loads the adapter on the HF form (check_families; alone:
               --only families).
  6. bnb4      transformers + bitsandbytes quantize that directory (nf4, double quant) and save it;
               qlora adopts the checkpoint as stored and its logits equal those of qlora quantizing
               the fp32 directory itself (exactly: the NF4 bytes are bnb's); bnb's own
               dequantize_4bit of the stored weights in an fp32 forward agrees within 2e-3;
               transformers' Linear4bit forward (reduced-precision CPU matmul) is reported with
               top-1 agreement >= 0.95.
Exit status 0 = every check passed; results also go to WORK_DIR/results.json.
"""
import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np
from safetensors.numpy import load_file, save_file

FAILS = []
RESULTS = {}

PROMPT = ("Explain what the mmap system call does, and when munmap must be called. "
          "Mention MAP_SHARED versus MAP_PRIVATE in 2 sentences.")


def log(msg):
    print(f"[interop] {msg}", flush=True)


def check(name, ok, detail):
    RESULTS[name] = {"ok": bool(ok), **detail}
    log(f"{'PASS' if ok else 'FAIL'} {name}: " + ", ".join(f"{k}={v}" for k, v in detail.items()))
    if not ok:
        FAILS.append(name)


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    t = time.time()
    r = subprocess.run(cmd, **kw)
    if r.returncode != 0:
        raise SystemExit(f"[interop] command failed ({r.returncode}): {' '.join(cmd)}")
    return time.time() - t


# ---------------------------------------------------------------- adapters

DIMS = None  # module -> (in, out), filled from the GGUF


def model_dims(gguf_path):
    from gguf import GGUFReader
    r = GGUFReader(gguf_path)
    f = {k: v.contents() for k, v in r.fields.items() if k.startswith("llama.")}
    D, F = f["llama.embedding_length"], f["llama.feed_forward_length"]
    H, KVH, L = f["llama.attention.head_count"], f["llama.attention.head_count_kv"], f["llama.block_count"]
    hd = D // H
    return {"layers": L, "heads": H, "kv_heads": KVH, "head_dim": hd,
            "q_proj": (D, H * hd), "k_proj": (D, KVH * hd), "v_proj": (D, KVH * hd), "o_proj": (H * hd, D),
            "gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}


MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_synth_adapter(out_dir, base, r, alpha, rslora, b_std, seed):
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    t = {}
    for layer in range(DIMS["layers"]):
        for m in MODULES:
            i, o = DIMS[m]
            parent = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            pre = f"base_model.model.model.layers.{layer}.{parent}.{m}"
            t[pre + ".lora_A.weight"] = rng.uniform(-1 / math.sqrt(i), 1 / math.sqrt(i), (r, i)).astype(np.float32)
            t[pre + ".lora_B.weight"] = (rng.standard_normal((o, r)) * b_std).astype(np.float32)
    save_file(t, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
           "use_rslora": rslora, "target_modules": MODULES, "bias": "none", "base_model_name_or_path": base,
           "inference_mode": True}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def train_losses(bin_dir, base_model, work, out):
    """A short qlora-train run; returns (train + eval losses in order, peak RSS MiB)."""
    cfg = os.path.join(work, os.path.basename(out) + ".yaml")
    with open(cfg, "w") as f:
        f.write(f"base_model: {base_model}\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
                "lora_dropout: 0.05\nlora_target_linear: true\n"
                "datasets:\n  - path: datasets/manpages/heldout.jsonl\n    type: completion\n"
                "sequence_len: 64\nsample_packing: true\nmicro_batch_size: 2\nmax_steps: 3\n"
                f"learning_rate: 1e-3\nval_set_size: 2\neval_max_tokens: 256\noutput_dir: {out}\n")
    r = subprocess.run(["/usr/bin/time", "-f", "%M", os.path.join(bin_dir, "qlora-train"), cfg],
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"[interop] qlora-train on {base_model} failed")
    rss = round(int(r.stderr.strip().splitlines()[-1]) / 1024, 1)
    vals = []
    for line in open(os.path.join(out, "metrics.jsonl")):
        j = json.loads(line)
        vals.append(j["loss"] if "loss" in j else j["eval_loss"])
    return vals, rss


def load_peak_rss(bin_dir, base_model, work):
    """Peak RSS (MiB) of loading the base as NF4 and running one token."""
    r = subprocess.run(["/usr/bin/time", "-f", "%M", os.path.join(bin_dir, "qlora-generate"), "--base", base_model,
                        "--ids", "1", "--dump-logits", os.path.join(work, "rss.safetensors")],
                       stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit("[interop] qlora-generate failed")
    return round(int(r.stderr.strip().splitlines()[-1]) / 1024, 1)


def train_adapter(bin_dir, model, work):
    out = os.path.join(work, "trained")
    cfg = os.path.join(work, "train.yaml")
    with open(cfg, "w") as f:
        f.write(f"base_model: {model}\nadapter: qlora\nload_in_4bit: true\nlora_r: 8\nlora_alpha: 16\n"
                "lora_dropout: 0.0\nlora_target_linear: true\n"
                "datasets:\n  - path: datasets/manpages/heldout.jsonl\n    type: completion\n"
                "sequence_len: 64\nsample_packing: true\nmicro_batch_size: 2\nmax_steps: 6\n"
                "learning_rate: 5e-3\nwarmup_steps: 0\nlr_scheduler: constant\n"
                f"eval_max_tokens: 256\nval_set_size: 2\noutput_dir: {out}\n")
    run([os.path.join(bin_dir, "qlora-train"), cfg])
    return out


# ---------------------------------------------------------------- qlora side

def qlora_logits(bin_dir, work, tag, adapter, model, prompt, nf4, bf16, raw=False):
    path = os.path.join(work, f"q_{tag}.safetensors")
    cmd = [os.path.join(bin_dir, "qlora-generate")]
    cmd += [adapter] if adapter else ["--no-adapter"]
    cmd += ["--raw"] if raw else []
    cmd += ["--base", model, "--prompt", prompt, "--load-in-4bit", str(int(nf4)), "--bf16", str(int(bf16)),
            "--dump-logits", path]
    run(cmd, stdout=subprocess.DEVNULL)
    d = load_file(path)
    return d["logits"], d["input_ids"]


def compare(name, ref, got, atol, extra=None):
    diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
    top_ref, top_got = ref.argmax(-1), got.argmax(-1)
    agree = float((top_ref == top_got).mean())
    detail = {"max_abs": float(f"{diff.max():.3g}"), "mean_abs": float(f"{diff.mean():.3g}"),
              "top1_agree": round(agree, 3), "atol": atol}
    if extra:
        detail.update(extra)
    check(name, diff.max() <= atol, detail)


# ---------------------------------------------------------------- 1. GGUF structure

def permute_hf_to_gguf(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def check_gguf_lora(path, adapter_dir, expect_alpha):
    from gguf import GGUFReader
    r = GGUFReader(path)
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    st = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    gg = {t.name: t for t in r.tensors}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    bad = []
    for key, a in st.items():
        parts = key.split(".")
        layer, mod, ab = int(parts[4]), parts[6], parts[7]
        gname = f"blk.{layer}.{names[mod]}.weight.lora_{'a' if ab == 'lora_A' else 'b'}"
        t = gg.get(gname)
        if t is None:
            bad.append(f"{gname} missing")
            continue
        data = np.asarray(t.data)
        want = a
        if ab == "lora_B" and mod in ("q_proj", "k_proj"):
            want = permute_hf_to_gguf(a, DIMS["heads"] if mod == "q_proj" else DIMS["kv_heads"])
        if t.tensor_type.name != "F32" or list(t.shape) != [a.shape[1], a.shape[0]] or not np.array_equal(data, want):
            bad.append(f"{gname}: type {t.tensor_type.name} shape {list(t.shape)} equal {np.array_equal(data, want)}")
    ok = (kv.get("general.type") == "adapter" and kv.get("adapter.type") == "lora"
          and kv.get("general.architecture") == "llama"
          and abs(kv.get("adapter.lora.alpha", -1) - expect_alpha) < 1e-4 * expect_alpha
          and len(gg) == len(st) and not bad)
    check(f"gguf:{os.path.basename(adapter_dir)}", ok,
          {"tensors": len(gg), "alpha": round(float(kv.get("adapter.lora.alpha", -1)), 4),
           "expect_alpha": round(expect_alpha, 4), "problems": bad[:3]})


# ---------------------------------------------------------------- 2. PEFT + transformers

def hf_logits(model, ids):
    import torch
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long)[None, :])
    return out.logits[0].float().numpy()


# ---------------------------------------------------------------- 7. the tiny model families

FAMILIES = ["llama3", "mistral", "qwen2", "phi3"]
FAMILY_TEXT = "thequickbrownfoxjumpsoverthelazydog.THEQUICKBROWNFOX!0123456789(interin)"  # in the tiny vocabulary


def check_family_gguf_lora(fam, path, adapter_dir, base_gguf):
    """family:<f>:gguf_lora: the GGUF LoRA names llama.cpp's tensors of the family's architecture (Phi-3: fused
    attn_qkv and ffn_up = gate|up, one pair each), each lora_a/lora_b equal to PEFT's A/B (Q/K rows permuted
    as the converter permutes W_q/W_k for arch llama only), every adapted base tensor present in the base."""
    from gguf import GGUFReader
    r, base = GGUFReader(path), GGUFReader(base_gguf)
    arch = base.fields["general.architecture"].contents()
    heads = {k: base.fields[f"{arch}.attention.{k}"].contents() for k in ("head_count", "head_count_kv")}
    st = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down",
             "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up"}
    gg, base_names = {t.name: t for t in r.tensors}, {t.name for t in base.tensors}
    bad = []
    for key, a in st.items():
        parts = key.split(".")
        layer, mod, ab = int(parts[4]), parts[6], parts[7]
        gname = f"blk.{layer}.{names[mod]}.weight"
        t = gg.get(f"{gname}.lora_{'a' if ab == 'lora_A' else 'b'}")
        want = a
        if ab == "lora_B" and mod in ("q_proj", "k_proj") and arch == "llama":
            want = permute_hf_to_gguf(a, heads["head_count" if mod == "q_proj" else "head_count_kv"])
        if t is None or gname not in base_names or not np.array_equal(np.asarray(t.data), want):
            bad.append(gname)
    ok = r.fields["general.architecture"].contents() == arch and len(gg) == len(st) and not bad
    check(f"family:{fam}:gguf_lora", ok, {"arch": arch, "tensors": len(gg), "modules": sorted({k.split(".")[6] for k in st}),
                                          "problems": bad[:3]})


def check_families(bin_dir, work):
    """Each tiny family of tests/fixtures/ref_<family>.qref.gz (llama3 RoPE scaling, Mistral, Qwen2 biases,
    Phi-3's fused qkv_proj / gate_up_proj, whose adapter PEFT puts on the fused modules):
    qlora-train (bf16 base, 3 steps) on the GGUF form written by llama.cpp's converter; then
      family:<f>:peft     transformers loads the HF form (the same weights), PEFT loads qlora's adapter:
                          logits vs qlora-generate --dump-logits (fp32) on the HF form, max |diff| <= 2e-3;
      family:<f>:gguf_hf  qlora's logits of the GGUF form vs the HF form (same weights): <= 1e-4;
      family:<f>:merged   qlora-export --merged of the GGUF form, loaded by transformers: its config
                          (architecture, rope_parameters) equals the HF form's (a Mistral GGUF is arch llama:
                          LlamaForCausalLM), logits vs PEFT's within one
                          bf16 rounding of the merged weights (<= 5e-2)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from make_reference import read_qref
    data = os.path.join(work, "family_data.jsonl")
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": FAMILY_TEXT[i % 7:] + FAMILY_TEXT[:i % 7]}) + "\n")
    for fam in FAMILIES:
        d = os.path.join(work, f"family_{fam}")
        hf = os.path.join(d, "hf")
        os.makedirs(hf, exist_ok=True)
        r = read_qref(os.path.join("tests", "fixtures", f"ref_{fam}.qref.gz"))
        for name, key in [("config.json", "hf.config_json"), ("model.safetensors", "hf.safetensors"),
                          ("tokenizer.json", "hf.tokenizer_json"), ("tokenizer_config.json", "hf.tokenizer_config_json")]:
            with open(os.path.join(hf, name), "wb") as f:
                f.write(r[key].tobytes())
        gg = os.path.join(d, "model.gguf")
        with open(gg, "wb") as f:
            f.write(r["gguf"].tobytes())
        out = os.path.join(d, "run")
        cfg = os.path.join(d, "train.yaml")
        with open(cfg, "w") as f:
            f.write(f"base_model: {gg}\nadapter: lora\nload_in_4bit: false\nlora_r: 4\nlora_alpha: 8\n"
                    "lora_dropout: 0.0\nlora_target_linear: true\n"
                    f"datasets:\n  - path: {data}\n    type: completion\n"
                    "sequence_len: 32\nsample_packing: true\nmicro_batch_size: 2\nmax_steps: 3\n"
                    "learning_rate: 5e-2\nwarmup_steps: 0\nlr_scheduler: constant\nval_set_size: 0\n"
                    f"output_dir: {out}\n")
        run([os.path.join(bin_dir, "qlora-train"), cfg])
        q_hf, ids = qlora_logits(bin_dir, d, "hf", out, hf, FAMILY_TEXT[:20], nf4=False, bf16=False, raw=True)
        q_gg, ids2 = qlora_logits(bin_dir, d, "gguf", out, gg, FAMILY_TEXT[:20], nf4=False, bf16=False, raw=True)
        qlora_logits(bin_dir, d, "base", None, gg, FAMILY_TEXT[:20], nf4=False, bf16=False, raw=True)  # llama.cpp's
        assert np.array_equal(ids, ids2)
        ids = [int(x) for x in ids]
        compare(f"family:{fam}:gguf_hf", q_hf, q_gg, 1e-4)
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, out)
        pm.eval()
        p_logits = hf_logits(pm, ids)
        with pm.disable_adapter():
            effect = float(np.abs(p_logits - hf_logits(pm, ids)).max())
        compare(f"family:{fam}:peft", p_logits, q_hf, 2e-3, {"adapter_effect": float(f"{effect:.3g}")})
        merged = os.path.join(d, "merged")
        run([os.path.join(bin_dir, "qlora-export"), out, "--base", gg, "--merged", merged, "--load-in-4bit", "0",
             "--gguf", os.path.join(d, "adapter.gguf")])
        check_family_gguf_lora(fam, os.path.join(d, "adapter.gguf"), out, gg)
        mm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        # a Mistral GGUF is general.architecture llama (the converter keeps no window): LlamaForCausalLM is
        # the same model over rows within the window
        want = "LlamaForCausalLM" if fam == "mistral" else type(base).__name__
        same_cfg = type(mm).__name__ == want and mm.config.rope_parameters == base.config.rope_parameters
        diff = np.abs(hf_logits(mm, ids) - p_logits)
        check(f"family:{fam}:merged", same_cfg and diff.max() <= 5e-2,
              {"class": type(mm).__name__, "rope_parameters": mm.config.rope_parameters,
               "max_abs": float(f"{diff.max():.3g}"), "atol": 5e-2})


def check_modules_to_save(bin_dir, work):
    """lora_modules_to_save on the tiny tied Qwen2 family model (tests/fixtures/ref_qwen2.qref.gz; tied as
    SmolLM2): qlora-train (bf16 base, 3 steps, lr 5e-2 so the copies move) with [embed_tokens, lm_head] and
    with [embed_tokens] alone; then
      mts:<case>:peft    transformers loads the HF form, PEFT loads qlora's adapter (modules_to_save copies
                         included; PEFT's default keeps a lone embed_tokens copy apart from the tied, frozen
                         lm_head): logits vs qlora-generate --dump-logits (fp32), max |diff| <= 2e-3;
      mts:<case>:merged  qlora-export --merged, loaded by transformers: tie_word_embeddings false, logits vs
                         PEFT's within one bf16 rounding of the merged weights (<= 5e-2);
      mts:<case>:gguf    qlora-export --gguf refuses (non-zero exit, a message naming modules_to_save)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from make_reference import read_qref
    data = os.path.join(work, "mts_data.jsonl")
    with open(data, "w") as f:
        for i in range(24):
            f.write(json.dumps({"text": FAMILY_TEXT[i % 7:] + FAMILY_TEXT[:i % 7]}) + "\n")
    r = read_qref(os.path.join("tests", "fixtures", "ref_qwen2.qref.gz"))
    for case, mods in [("both", "[embed_tokens, lm_head]"), ("embed", "[embed_tokens]")]:
        d = os.path.join(work, f"mts_{case}")
        hf = os.path.join(d, "hf")
        os.makedirs(hf, exist_ok=True)
        for name, key in [("config.json", "hf.config_json"), ("model.safetensors", "hf.safetensors"),
                          ("tokenizer.json", "hf.tokenizer_json"), ("tokenizer_config.json", "hf.tokenizer_config_json")]:
            with open(os.path.join(hf, name), "wb") as f:
                f.write(r[key].tobytes())
        gg = os.path.join(d, "model.gguf")
        with open(gg, "wb") as f:
            f.write(r["gguf"].tobytes())
        out = os.path.join(d, "run")
        cfg = os.path.join(d, "train.yaml")
        with open(cfg, "w") as f:
            f.write(f"base_model: {gg}\nadapter: lora\nload_in_4bit: false\nlora_r: 4\nlora_alpha: 8\n"
                    f"lora_dropout: 0.0\nlora_target_linear: true\nlora_modules_to_save: {mods}\n"
                    f"datasets:\n  - path: {data}\n    type: completion\n"
                    "sequence_len: 32\nsample_packing: true\nmicro_batch_size: 2\nmax_steps: 3\n"
                    "learning_rate: 5e-2\nwarmup_steps: 0\nlr_scheduler: constant\nval_set_size: 0\n"
                    f"output_dir: {out}\n")
        run([os.path.join(bin_dir, "qlora-train"), cfg])
        q_hf, ids = qlora_logits(bin_dir, d, "hf", out, hf, FAMILY_TEXT[:20], nf4=False, bf16=False, raw=True)
        ids = [int(x) for x in ids]
        base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
        pm = PeftModel.from_pretrained(base, out)
        pm.eval()
        p_logits = hf_logits(pm, ids)
        with pm.disable_adapter():
            effect = float(np.abs(p_logits - hf_logits(pm, ids)).max())
        emb = pm.base_model.model.model.embed_tokens
        moved = float((emb.modules_to_save["default"].weight - emb.original_module.weight).abs().max())
        compare(f"mts:{case}:peft", p_logits, q_hf, 2e-3,
                {"adapter_effect": float(f"{effect:.3g}"), "embed_copy_moved": float(f"{moved:.3g}")})
        merged = os.path.join(d, "merged")
        run([os.path.join(bin_dir, "qlora-export"), out, "--base", gg, "--merged", merged, "--load-in-4bit", "0"])
        mm = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
        diff = np.abs(hf_logits(mm, ids) - p_logits)
        check(f"mts:{case}:merged", (not mm.config.tie_word_embeddings) and diff.max() <= 5e-2,
              {"tie_word_embeddings": mm.config.tie_word_embeddings, "max_abs": float(f"{diff.max():.3g}"),
               "atol": 5e-2})
        g = subprocess.run([os.path.join(bin_dir, "qlora-export"), out, "--base", gg, "--gguf",
                            os.path.join(d, "adapter.gguf")], capture_output=True, text=True)
        check(f"mts:{case}:gguf", g.returncode != 0 and "modules_to_save" in g.stderr
              and not os.path.exists(os.path.join(d, "adapter.gguf")),
              {"rc": g.returncode, "stderr": g.stderr.strip()[-200:]})


def main():
    global DIMS
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--only", default="", help="run only this check group (families, modules_to_save)")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    model = os.path.abspath(args.model)
    bin_dir = os.path.abspath(args.bin)
    DIMS = model_dims(model)
    t_all = time.time()
    if args.only == "families":
        check_families(bin_dir, work)
        return finish(work, t_all)
    if args.only == "modules_to_save":
        check_modules_to_save(bin_dir, work)
        return finish(work, t_all)

    # adapters
    synth = os.path.join(work, "synth")
    synth_rs = os.path.join(work, "synth_rs")
    write_synth_adapter(synth, model, r=8, alpha=16, rslora=False, b_std=0.02, seed=1)
    write_synth_adapter(synth_rs, model, r=4, alpha=16, rslora=True, b_std=0.02, seed=2)
    e2e = os.path.join(os.path.dirname(bin_dir), "build", "e2e-out")
    if os.path.exists(os.path.join(e2e, "adapter_model.safetensors")) and os.environ.get("QLORA_INTEROP_TRAIN") != "1":
        trained = os.path.join(work, "trained")  # the adapter `make test` trained (tests/test_e2e.c)
        shutil.copytree(e2e, trained, dirs_exist_ok=True)
        log(f"trained adapter: {e2e} (from make test)")
    else:
        trained = train_adapter(bin_dir, model, work)
    adapters = {"synth": (synth, 16.0), "synth_rs": (synth_rs, 16.0 * math.sqrt(4)), "trained": (trained, 16.0)}

    # exports
    for tag, (d, _) in adapters.items():
        run([os.path.join(bin_dir, "qlora-export"), d, "--base", model, "--gguf", os.path.join(work, f"{tag}.gguf"),
             "--merged", os.path.join(work, f"merged_{tag}_bf16"), "--load-in-4bit", "0"])
    run([os.path.join(bin_dir, "qlora-export"), synth, "--base", model, "--merged",
         os.path.join(work, "merged_synth_nf4"), "--load-in-4bit", "1"])

    # 1. GGUF structure
    for tag, (d, alpha) in adapters.items():
        check_gguf_lora(os.path.join(work, f"{tag}.gguf"), d, alpha)

    # qlora logits (fp32 GEMMs; bf16 base as with load_in_4bit: false, and NF4)
    q = {}
    q["base"], ids = qlora_logits(bin_dir, work, "base", None, model, PROMPT, nf4=False, bf16=False)
    for tag, (d, _) in adapters.items():
        q[tag], ids2 = qlora_logits(bin_dir, work, tag, d, model, PROMPT, nf4=False, bf16=False)
        assert np.array_equal(ids, ids2)
    q["synth_nf4"], _ = qlora_logits(bin_dir, work, "synth_nf4", synth, model, PROMPT, nf4=True, bf16=False)
    ids = [int(x) for x in ids]
    log(f"prompt: {len(ids)} tokens; adapter effect (synth): max |d logits| = "
        f"{np.abs(q['synth'] - q['base']).max():.2f}, trained: {np.abs(q['trained'] - q['base']).max():.3f}")

    # 2. PEFT + transformers on the GGUF base
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file as load_torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.set_num_threads(os.cpu_count() or 1)
    t0 = time.time()
    base = AutoModelForCausalLM.from_pretrained(os.path.dirname(model), gguf_file=os.path.basename(model),
                                                dtype=torch.float32)
    base.eval()
    log(f"transformers loaded the GGUF base in {time.time() - t0:.1f}s")
    sd32 = {k: v.clone() for k, v in base.state_dict().items()}       # the GGUF dequantized, fp32
    sd_bf = {k: v.to(torch.bfloat16).to(torch.float32) for k, v in sd32.items()}  # as qlora holds it in bf16
    base.load_state_dict(sd_bf)
    compare("peft:base", q["base"], hf_logits(base, ids), 2e-3)
    for tag, (d, _) in adapters.items():
        pm = PeftModel.from_pretrained(base, d)
        pm.eval()
        got = hf_logits(pm, ids)
        eff = np.abs(q[tag] - q["base"]).max()
        compare(f"peft:{tag}", q[tag], got, 2e-3, {"adapter_effect_max": float(f"{eff:.3g}")})
        base = pm.unload()

    # 3. merged models: the weights against PEFT's own merge_and_unload on the same base, then
    #    transformers' logits of qlora's merged directory against that reference model
    import bitsandbytes.functional as bnbf
    sd_nf4 = dict(sd_bf)
    for k, v in sd32.items():
        if k.endswith("_proj.weight"):
            qw, st = bnbf.quantize_4bit(v.contiguous(), blocksize=64, compress_statistics=True, quant_type="nf4")
            sd_nf4[k] = bnbf.dequantize_4bit(qw, st).to(torch.float32)
    for tag, adir, base_sd, qref in (("synth_bf16", synth, sd_bf, q["synth"]), ("trained_bf16", trained, sd_bf, q["trained"]),
                                     ("synth_nf4", synth, sd_nf4, q["synth_nf4"])):
        base.load_state_dict(base_sd)
        ref = PeftModel.from_pretrained(base, adir).merge_and_unload()
        ref_sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
        d = os.path.join(work, f"merged_{tag}")
        ours = load_torch(os.path.join(d, "model.safetensors"))
        # bf16 values within one rounding step of each other (the fp32 sums differ in order),
        # except where W + dW cancels to nearly 0 (relative ulps are meaningless there)
        worst, n_off, n_all = 0.0, 0, 0
        for k, v in ours.items():
            a, r = v.to(torch.float32), ref_sd[k].to(torch.float32)
            diff = (a - r).abs()
            ulp = torch.maximum(a.abs(), r.abs()) * 2.0 ** -7
            floor = 1e-3 * float(r.pow(2).mean().sqrt())
            off = (diff > ulp) & (diff > floor)
            n_off += int(off.sum())
            n_all += r.numel()
            worst = max(worst, float((diff / torch.clamp(torch.maximum(a.abs(), r.abs()), min=floor)).max()))
        missing = sorted(set(k for k in ref_sd if k != "lm_head.weight") - set(ours))
        check(f"merged:{tag}:weights", n_off == 0 and not missing,
              {"tensors": len(ours), "elements": n_all, "max_rel_diff": float(f"{worst:.3g}"),
               "elements_beyond_1_bf16_step": n_off, "missing": missing[:3]})
        ref.load_state_dict({k: v.to(torch.float32) for k, v in ref_sd.items()})
        ref_logits = hf_logits(ref, ids)
        mm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        mm.eval()
        got = hf_logits(mm, ids)
        diff_unmerged = np.abs(got - qref)
        compare(f"merged:{tag}:logits", ref_logits, got, 2e-3,
                {"vs_unmerged_max_abs(info)": float(f"{diff_unmerged.max():.3g}"),
                 "vs_unmerged_top1": round(float((got.argmax(-1) == qref.argmax(-1)).mean()), 3)})
        del mm
        base = ref
    d = os.path.join(work, "merged_synth_bf16")
    tok = AutoTokenizer.from_pretrained(d)
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    hf_ids = tok(text, add_special_tokens=False)["input_ids"]
    gen = json.load(open(os.path.join(d, "generation_config.json")))
    eos = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    check("merged:tokenizer+template", hf_ids == ids and im_end in eos,
          {"hf_ids_equal": hf_ids == ids, "eos_ids": eos, "im_end": im_end, "tokenizer_class": type(tok).__name__})

    # 5. HF directories as base_model: transformers saves the GGUF-loaded model (fp32), qlora trains on
    #    it and on the GGUF; the NF4 weights are then identical, so are the losses.
    hf_dir = os.path.join(work, "hf_fp32")
    # a GGUF-loaded model refuses save_pretrained ("quantized with gguf"): the same weights in a
    # plain LlamaForCausalLM built from its config
    cfg = base.config.to_dict()
    cfg.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(base.config).from_dict(cfg), dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(sd32, strict=False)
    assert not [k for k in missing if k != "lm_head.weight"] and not unexpected, (missing, unexpected)
    plain.tie_weights()
    plain.save_pretrained(hf_dir)
    del plain
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(d, f), hf_dir)
    losses = {}
    for tag, bm in (("gguf", model), ("hf", hf_dir)):
        out = os.path.join(work, f"train_{tag}")
        losses[tag], rss = train_losses(bin_dir, bm, work, out)
        RESULTS[f"train_peak_rss_mib:{tag}"] = rss
    lg, lh = np.array(losses["gguf"]), np.array(losses["hf"])
    check("hf_dir:training_losses", len(lg) == len(lh) and np.abs(lg - lh).max() <= 1e-6,
          {"gguf": [round(float(x), 5) for x in lg], "hf": [round(float(x), 5) for x in lh]})
    rss = {}
    for tag, bm in (("gguf", model), ("hf_fp32", hf_dir)):
        rss[tag] = load_peak_rss(bin_dir, bm, work)
    check("hf_dir:load_peak_rss_mib(info)", True, rss)

    # 6. bitsandbytes 4-bit checkpoint written by transformers + bitsandbytes, loaded as it is
    from transformers import BitsAndBytesConfig
    bnb_dir = os.path.join(work, "hf_bnb4")
    qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            bnb_4bit_compute_dtype=torch.float32)
    t0 = time.time()
    qm = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=qc, dtype=torch.float32, device_map="cpu")
    qm.save_pretrained(bnb_dir)
    log(f"transformers + bitsandbytes quantized and saved {bnb_dir} in {time.time() - t0:.1f}s")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(d, f), bnb_dir)
    qb, _ = qlora_logits(bin_dir, work, "bnb4_adopted", None, bnb_dir, PROMPT, nf4=True, bf16=False)
    qs, _ = qlora_logits(bin_dir, work, "hf_fp32_nf4", None, hf_dir, PROMPT, nf4=True, bf16=False)
    compare("bnb4:adopted_vs_qlora_quantized", qs, qb, 0.0)
    # what the checkpoint means to bitsandbytes: its own dequantize_4bit of every stored weight,
    # then an fp32 forward (embeddings and norms as qlora holds them)
    import bitsandbytes as bnb
    sd_deq = dict(sd_bf)
    for name, mod in qm.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            sd_deq[name + ".weight"] = bnbf.dequantize_4bit(mod.weight.data, mod.weight.quant_state).to(torch.float32)
    base.load_state_dict(sd_deq)
    compare("bnb4:bnb_dequantized_vs_qlora", qb, hf_logits(base, ids), 2e-3)
    # bitsandbytes' own 4-bit CPU matmul computes in reduced precision (about 0.4% of |y| on one
    # linear, measured against the fp32 product of the same dequantized weight): looser, reported
    qm.eval()
    got = hf_logits(qm, ids)
    agree = float((got.argmax(-1) == qb.argmax(-1)).mean())
    diff = np.abs(got - qb)
    check("bnb4:Linear4bit_forward_vs_qlora", agree >= 0.95 and diff.mean() <= 0.25,
          {"max_abs": float(f"{diff.max():.3g}"), "mean_abs": float(f"{diff.mean():.3g}"), "top1_agree": round(agree, 3),
           "bounds": "top1 >= 0.95, mean_abs <= 0.25"})
    del qm

    check_families(bin_dir, work)
    check_modules_to_save(bin_dir, work)
    return finish(work, t_all)


def finish(work, t_all):
    RESULTS["_seconds"] = round(time.time() - t_all, 1)
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump(RESULTS, f, indent=2)
    if FAILS:
        log(f"FAILED: {', '.join(FAILS)}")
        return 1
    log(f"all {len(RESULTS) - 1} checks passed in {RESULTS['_seconds']}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
