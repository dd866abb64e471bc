#!/usr/bin/env python3
"""llama.cpp side of `make test-interop`: the GGUF base + qlora's GGUF LoRA adapters in llama.cpp
(llama-cpp-python) against qlora's logits for the same token ids.

usage: check_llama_cpp.py --model MODEL.gguf --work WORK_DIR      (after check_interop.py)
       check_llama_cpp.py --work WORK_DIR --only families          (after check_interop.py --only families)
Needs: llama-cpp-python, numpy, safetensors.

Two bases:
  exact   the Q4_1 base dequantized and rounded to bf16, stored as F32 (what qlora holds with
          load_in_4bit: false; norms stay F32), with an F32 KV cache: llama.cpp then does the same
          arithmetic as qlora's fp32 reference up to summation order. Checked:
              effect_rel_err = ||d_lcpp - d_qlora|| / ||d_qlora|| <= 0.01,
              d = logits(base + lora) - logits(base),
          and max |logits difference| <= 0.02 with every adapter. A wrong Q/K row order, a
          transposed A/B or a wrong alpha (rsLoRA) gives errors of order 1.
  q4_1    the shipped Q4_1 GGUF as llama.cpp users run it: llama.cpp multiplies 4-bit weights with
          8-bit-quantized activations and keeps an F16 KV cache, so logits differ from qlora's by
          ~0.2 on average already for the base; reported, with the looser check top-1 agreement >= 90%.

The tiny families (WORK_DIR/family_<f>/ from check_interop.py's check_families: llama3 RoPE scaling,
Mistral, Qwen2 biases, Phi-3's fused attn_qkv / ffn_up; llama.cpp implements every one of these
architectures): the family's GGUF (as llama.cpp's converter wrote it, bf16) stored as F32, F32 KV
cache, with qlora's GGUF LoRA export of the adapter qlora trained on it, against qlora-generate's fp32
logits of the GGUF form with that adapter: effect_rel_err <= 0.01 and max |diff| <= 0.02, as "exact".
(llama.cpp disables Phi-3's sliding window; the rows are far shorter than it.)
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def bf16_round(x):
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def write_exact_base(src, dst):
    """The GGUF with every tensor dequantized to F32, matrices rounded to bf16 (qlora's bf16 base)."""
    import gguf
    from gguf.quants import dequantize
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
            continue
        vt = f.types[0]
        sub = f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None
        val = f.contents()
        if f.name == "tokenizer.ggml.pre" and val == "gpt2":
            # the tiny families' fixtures name GPT-2's ByteLevel pre-tokenizer "gpt2" (scripts/make_reference.py;
            # qlora reads "gpt2", "gpt-2" and "default" alike); llama.cpp's loader knows it only as "gpt-2".
            # The check feeds token ids, so the name changes nothing it compares.
            val = "gpt-2"
        w.add_key_value(f.name, val, vt, sub_type=sub)
    w.add_file_type(0)
    for t in r.tensors:
        x = dequantize(t.data, t.tensor_type).astype(np.float32).reshape([int(d) for d in reversed(t.shape)])
        if x.ndim > 1:
            x = bf16_round(x)
        w.add_tensor(t.name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_logits(model, ids, lora):
    """llama.cpp's logits of every position of ids (F32 KV cache), with the GGUF LoRA lora or none."""
    from llama_cpp import Llama
    kw = dict(model_path=model, n_ctx=max(256, len(ids) + 8), logits_all=True, verbose=False,
              n_threads=os.cpu_count() or 1, seed=0, type_k=0, type_v=0)
    if lora:
        kw["lora_path"] = lora
    llm = Llama(**kw)
    llm.reset()
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def check_families(work, results, fails):
    fams = sorted(d[len("family_"):] for d in os.listdir(work) if d.startswith("family_")
                  and os.path.exists(os.path.join(work, d, "adapter.gguf")))
    if not fams:
        print("[interop] llama.cpp families: none in the work directory (check_interop.py runs them first)")
    for fam in fams:
        d = os.path.join(work, f"family_{fam}")
        q = load_file(os.path.join(d, "q_gguf.safetensors"))  # qlora, GGUF form + adapter, fp32
        ids = [int(x) for x in q["input_ids"]]
        exact = os.path.join(d, "model_f32.gguf")
        write_exact_base(os.path.join(d, "model.gguf"), exact)
        lb = llama_logits(exact, ids, None)
        ll = llama_logits(exact, ids, os.path.join(d, "adapter.gguf"))
        # qlora's base logits of the same form: the adapter's effect is compared, as for the real model
        qb_path = os.path.join(d, "q_base.safetensors")
        qb = load_file(qb_path)["logits"] if os.path.exists(qb_path) else None
        qt = q["logits"]
        diff = np.abs(ll - qt)
        res = {"max_abs": float(f"{diff.max():.3g}"), "top1_agree": round(float((ll.argmax(-1) == qt.argmax(-1)).mean()), 3)}
        ok = diff.max() <= 0.02
        if qb is not None:
            dq, dl = qt - qb, ll - lb
            rel = float(np.linalg.norm(dl - dq) / max(np.linalg.norm(dq), 1e-12))
            res.update(effect_rel_err=round(rel, 5), effect_norm=float(f"{np.linalg.norm(dq):.3g}"),
                       base_max_abs=float(f"{np.abs(lb - qb).max():.3g}"))
            ok = ok and rel <= 0.01
        results[f"llama.cpp:family:{fam}"] = {"ok": bool(ok), **res}
        print(f"[interop] {'PASS' if ok else 'FAIL'} llama.cpp:family:{fam}: {res}", flush=True)
        if not ok:
            fails.append(f"family:{fam}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--work", required=True)
    ap.add_argument("--only", default="", help="families: only the tiny families")
    args = ap.parse_args()
    from llama_cpp import Llama
    if args.only == "families":
        results, fails = {}, []
        check_families(args.work, results, fails)
        with open(os.path.join(args.work, "results_llama_cpp_families.json"), "w") as f:
            json.dump(results, f, indent=2)
        return 1 if fails else 0

    q = {t: load_file(os.path.join(args.work, f"q_{t}.safetensors")) for t in ("base", "synth", "synth_rs", "trained")}
    ids = [int(x) for x in q["base"]["input_ids"]]

    def logits(model, lora, exact):
        kw = dict(model_path=model, n_ctx=max(256, len(ids) + 8), logits_all=True, verbose=False,
                  n_threads=os.cpu_count() or 1, seed=0)
        if exact:
            kw.update(type_k=0, type_v=0)  # GGML_TYPE_F32 KV cache
        if lora:
            kw["lora_path"] = lora
        llm = Llama(**kw)
        llm.reset()
        llm.eval(ids)
        out = np.array(llm.scores[:len(ids)], dtype=np.float32)
        llm.close()
        return out

    exact_base = os.path.join(args.work, "base_bf16_as_f32.gguf")
    write_exact_base(args.model, exact_base)
    results, fails = {}, []
    qb = q["base"]["logits"]
    for mode, model in (("exact", exact_base), ("q4_1", args.model)):
        exact = mode == "exact"
        lb = logits(model, None, exact)
        d = np.abs(lb - qb)
        res = {"max_abs": float(f"{d.max():.3g}"), "mean_abs": float(f"{d.mean():.3g}"),
               "top1_agree": round(float((lb.argmax(-1) == qb.argmax(-1)).mean()), 3)}
        ok = d.max() <= 0.02 if exact else True
        results[f"llama.cpp:{mode}:base"] = {"ok": bool(ok), **res}
        print(f"[interop] {'PASS' if ok else 'FAIL'} llama.cpp:{mode}:base: {res}", flush=True)
        if not ok:
            fails.append(f"{mode}:base")
        for tag in ("synth", "synth_rs", "trained"):
            ll = logits(model, os.path.join(args.work, f"{tag}.gguf"), exact)
            qt = q[tag]["logits"]
            dq, dl = qt - qb, ll - lb
            rel = float(np.linalg.norm(dl - dq) / max(np.linalg.norm(dq), 1e-12))
            agree = float((ll.argmax(-1) == qt.argmax(-1)).mean())
            diff = np.abs(ll - qt)
            ok = (rel <= 0.01 and diff.max() <= 0.02) if exact else agree >= 0.9
            res = {"effect_rel_err": round(rel, 5), "top1_agree": round(agree, 3), "max_abs": float(f"{diff.max():.3g}"),
                   "mean_abs": float(f"{diff.mean():.3g}"), "effect_norm": float(f"{np.linalg.norm(dq):.3g}")}
            results[f"llama.cpp:{mode}:{tag}"] = {"ok": bool(ok), **res}
            print(f"[interop] {'PASS' if ok else 'FAIL'} llama.cpp:{mode}:{tag}: {res}", flush=True)
            if not ok:
                fails.append(f"{mode}:{tag}")
    check_families(args.work, results, fails)
    with open(os.path.join(args.work, "results_llama_cpp.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
