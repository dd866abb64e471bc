#!/usr/bin/env python3
"""Check a PEFT LoRA adapter directory with the real consumer libraries.

Usage:  python3 scripts/check_peft_adapter.py ADAPTER_DIR [--layers N] [--r R]
Needs:  pip install safetensors numpy      (torch is not needed)

Loads adapter_model.safetensors with safetensors.numpy.load_file (the Rust
reader, which validates the header, offsets and coverage) and
adapter_config.json with json, then checks what PEFT relies on
(peft/utils/save_and_load.py, peft/tuners/lora/{config,layer}.py):
  * config: peft_type LORA, r, lora_alpha, target_modules (list), and that the
    text is exactly json.dumps(cfg, indent=2, sort_keys=True) as PEFT writes it;
  * file metadata {"format": "pt"};
  * every tensor named base_model.model.model.layers.N.{self_attn|mlp}.MODULE.lora_{A|B}.weight
    with the right parent for MODULE, MODULE listed in target_modules;
  * A is [r, in], B is [out, r], float32, finite; A/B come in pairs; in/out
    agree across layers; every target module has adapters in every layer;
  * the file is byte-identical to what safetensors.numpy.save_file writes for
    the same tensors and metadata (our writer mirrors the Rust one).
If `peft` is importable it also loads the config with LoraConfig.from_pretrained.
Exit status 0 = OK, 1 = a check failed (message on stderr).
"""
import argparse
import json
import math
import os
import re
import sys

ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}
MLP = {"gate_proj", "up_proj", "down_proj"}
NAME_RE = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.([a-z_]+)\.lora_(A|B)\.weight$")


def fail(msg):
    print(f"check_peft_adapter: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("adapter_dir")
    ap.add_argument("--layers", type=int, help="expected number of layers")
    ap.add_argument("--r", type=int, help="expected rank")
    args = ap.parse_args()

    try:
        import numpy as np
        from safetensors import safe_open
        from safetensors.numpy import load_file, save_file
    except ImportError as exc:
        fail(f"{exc}; run: pip install safetensors numpy")

    cfg_path = os.path.join(args.adapter_dir, "adapter_config.json")
    st_path = os.path.join(args.adapter_dir, "adapter_model.safetensors")
    for p in (cfg_path, st_path):
        if not os.path.isfile(p):
            fail(f"missing {p}")

    # --- adapter_config.json ---
    with open(cfg_path, encoding="utf-8") as f:
        text = f.read()
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"{cfg_path}: not JSON: {exc}")
    if text != json.dumps(cfg, indent=2, sort_keys=True):
        fail(f"{cfg_path}: text differs from json.dumps(indent=2, sort_keys=True) (PEFT's format)")
    if cfg.get("peft_type") != "LORA":
        fail(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}, expected 'LORA'")
    r = cfg.get("r")
    if not isinstance(r, int) or r <= 0:
        fail(f"{cfg_path}: r must be a positive int, got {r!r}")
    if args.r is not None and r != args.r:
        fail(f"{cfg_path}: r is {r}, expected {args.r}")
    alpha = cfg.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        fail(f"{cfg_path}: lora_alpha must be a positive number, got {alpha!r}")
    targets = cfg.get("target_modules")
    if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
        fail(f"{cfg_path}: target_modules must be a non-empty list of names, got {targets!r}")
    unknown = set(targets) - ATTN - MLP
    if unknown:
        fail(f"{cfg_path}: target_modules has non-Llama names {sorted(unknown)}")
    for key, want in (("task_type", "CAUSAL_LM"), ("bias", "none"), ("use_dora", False),
                      ("fan_in_fan_out", False)):
        if cfg.get(key) != want:
            fail(f"{cfg_path}: {key} is {cfg.get(key)!r}, expected {want!r}")

    # --- adapter_model.safetensors ---
    with safe_open(st_path, framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "pt":
        fail(f"{st_path}: __metadata__ is {meta!r}, expected {{'format': 'pt'}}")
    tensors = load_file(st_path)
    if not tensors:
        fail(f"{st_path}: no tensors")
    seen = {}  # (layer, module) -> {"A": shape, "B": shape}
    for name, arr in tensors.items():
        m = NAME_RE.match(name)
        if not m:
            fail(f"{st_path}: tensor name {name!r} is not a PEFT LoRA name")
        layer, parent, module, ab = int(m.group(1)), m.group(2), m.group(3), m.group(4)
        want_parent = "self_attn" if module in ATTN else "mlp" if module in MLP else None
        if want_parent is None:
            fail(f"{st_path}: {name}: unknown module {module!r}")
        if parent != want_parent:
            fail(f"{st_path}: {name}: {module} belongs under {want_parent}, not {parent}")
        if module not in targets:
            fail(f"{st_path}: {name}: {module} is not in target_modules {targets}")
        if arr.dtype != np.float32:
            fail(f"{st_path}: {name}: dtype {arr.dtype}, expected float32")
        if arr.ndim != 2:
            fail(f"{st_path}: {name}: shape {arr.shape}, expected 2 dimensions")
        if ab == "A" and arr.shape[0] != r:
            fail(f"{st_path}: {name}: lora_A shape {arr.shape}, expected [r={r}, in]")
        if ab == "B" and arr.shape[1] != r:
            fail(f"{st_path}: {name}: lora_B shape {arr.shape}, expected [out, r={r}]")
        if not np.isfinite(arr).all():
            fail(f"{st_path}: {name}: non-finite values")
        seen.setdefault((layer, module), {})[ab] = arr.shape

    import tempfile
    with tempfile.TemporaryDirectory() as td:
        ref = os.path.join(td, "ref.safetensors")
        save_file(tensors, ref, metadata=meta)
        with open(ref, "rb") as a, open(st_path, "rb") as b:
            if a.read() != b.read():
                fail(f"{st_path}: bytes differ from safetensors.numpy.save_file of the same tensors")

    layers = sorted({l for l, _ in seen})
    if layers != list(range(len(layers))):
        fail(f"{st_path}: layers {layers} are not 0..{len(layers) - 1}")
    if args.layers is not None and len(layers) != args.layers:
        fail(f"{st_path}: {len(layers)} layers, expected {args.layers}")
    dims = {}
    for (layer, module), d in sorted(seen.items()):
        if set(d) != {"A", "B"}:
            fail(f"{st_path}: layer {layer} {module}: lora_A and lora_B must both be present")
        io = (d["A"][1], d["B"][0])  # (in, out)
        if dims.setdefault(module, io) != io:
            fail(f"{st_path}: {module}: (in, out) {io} in layer {layer} differs from {dims[module]}")
    for layer in layers:
        for module in targets:
            if (layer, module) not in seen:
                fail(f"{st_path}: layer {layer} has no adapter for target {module}")

    peft_note = "peft not installed (skipped LoraConfig.from_pretrained)"
    try:
        from peft import LoraConfig  # noqa: needs torch
        LoraConfig.from_pretrained(args.adapter_dir)
        peft_note = "peft LoraConfig.from_pretrained OK"
    except ImportError:
        pass
    except Exception as exc:  # a real PEFT rejecting the config is a failure
        fail(f"peft LoraConfig.from_pretrained: {exc}")

    scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
    shapes = ", ".join(f"{m} in={i} out={o}" for m, (i, o) in sorted(dims.items()))
    print(f"check_peft_adapter: OK: {len(tensors)} tensors, {len(layers)} layers, r={r}, "
          f"alpha={alpha}, scaling={scale:g}; {shapes}; {peft_note}")


if __name__ == "__main__":
    main()
