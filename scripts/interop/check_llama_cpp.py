#!/usr/bin/env python3
"""llama.cpp side of `make test-interop`: the GGUF base + qlora's GGUF LoRA adapters in llama.cpp
(llama-cpp-python) against qlora's logits for the same token ids.

usage: check_llama_cpp.py --model MODEL.gguf --work WORK_DIR      (after check_interop.py)
Needs: llama-cpp-python, numpy, safetensors.

llama.cpp multiplies the Q4_1 weights with 8-bit-quantized activations while qlora's reference run
uses the dequantized weights in bf16 with fp32 GEMMs, so the base logits already differ a little
(reported). The check is on what the adapter does:
    effect_rel_err = ||d_lcpp - d_qlora|| / ||d_qlora||  <= 0.1,  d = logits(base + lora) - logits(base)
and greedy next tokens with the adapter agree on >= 90% of positions. A wrong Q/K row order, a
transposed A/B or a wrong alpha (rsLoRA) gives an error of order 1.
"""
import argparse
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", required=True)
    args = ap.parse_args()
    from llama_cpp import Llama

    q = {t: load_file(os.path.join(args.work, f"q_{t}.safetensors")) for t in ("base", "synth", "synth_rs", "trained")}
    ids = [int(x) for x in q["base"]["input_ids"]]

    def logits(lora):
        kw = dict(model_path=args.model, n_ctx=max(256, len(ids) + 8), logits_all=True, verbose=False,
                  n_threads=os.cpu_count() or 1, seed=0)
        if lora:
            kw["lora_path"] = lora
        llm = Llama(**kw)
        llm.reset()
        llm.eval(ids)
        out = np.array(llm.scores[:len(ids)], dtype=np.float32)
        llm.close()
        return out

    results, fails = {}, []
    lb = logits(None)
    qb = q["base"]["logits"]
    d = np.abs(lb - qb)
    results["llama.cpp:base(info)"] = {"max_abs": float(f"{d.max():.3g}"), "mean_abs": float(f"{d.mean():.3g}"),
                                       "top1_agree": round(float((lb.argmax(-1) == qb.argmax(-1)).mean()), 3)}
    print(f"[interop] INFO llama.cpp:base vs qlora: {results['llama.cpp:base(info)']}", flush=True)
    for tag in ("synth", "synth_rs", "trained"):
        ll = logits(os.path.join(args.work, f"{tag}.gguf"))
        qt = q[tag]["logits"]
        dq, dl = qt - qb, ll - lb
        rel = float(np.linalg.norm(dl - dq) / max(np.linalg.norm(dq), 1e-12))
        agree = float((ll.argmax(-1) == qt.argmax(-1)).mean())
        diff = np.abs(ll - qt)
        ok = rel <= 0.1 and agree >= 0.9
        results[f"llama.cpp:{tag}"] = {"ok": ok, "effect_rel_err": round(rel, 4), "top1_agree": round(agree, 3),
                                       "max_abs": float(f"{diff.max():.3g}"), "mean_abs": float(f"{diff.mean():.3g}"),
                                       "effect_norm": float(f"{np.linalg.norm(dq):.3g}")}
        print(f"[interop] {'PASS' if ok else 'FAIL'} llama.cpp:{tag}: {results[f'llama.cpp:{tag}']}", flush=True)
        if not ok:
            fails.append(tag)
    with open(os.path.join(args.work, "results_llama_cpp.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
