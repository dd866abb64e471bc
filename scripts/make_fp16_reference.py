#!/usr/bin/env python3
"""fp16 fixture: the tiny Llama of ref_tiny.qref.gz under torch.autocast("cpu", float16) + torch.amp.GradScaler.

Writes tests/fixtures/ref_fp16.qref.gz for tests/test_reference_tiny.c (group tiny_fp16). Nobody here wrote
the maths it checks: transformers' LlamaForCausalLM + PEFT LoRA (fp32 weights, as PEFT keeps adapters) run under
torch's fp16 autocast (linear / matmul operands cast to fp16, fp32 accumulation, fp16 outputs) with
torch.amp.GradScaler's dynamic loss scaling, as axolotl's `fp16: true` runs on a GPU (accelerate's
mixed_precision "fp16": autocast + GradScaler; HF Trainer steps the LR scheduler only when the optimizer step was
not skipped). The model, weights, LoRA init and batch are read from ref_tiny.qref.gz (make_reference.py
make_tiny), so both fixtures describe the same model.

Cases:
  fp16.*      one forward/backward with GradScaler(init_scale 2^16): loss, logits, the unscaled LoRA gradients
  amp.*       10 AdamW steps (the tiny case's lr / betas / eps / weight decay / clip 1.0), GradScaler defaults:
              per step the loss, pre-clip norm, the scale used and whether the step was skipped; final adapter
  ovf.*       20 steps from init_scale 2^24 with growth_interval 3: the first steps overflow (inf gradients), are
              skipped and back off the scale until it fits, then it grows every 3 clean steps until it overflows
              again; a constant LR (no scheduler: a skipped step changes nothing but the scale)

Run with the pinned reference venv: /work/venv-ref/bin/python scripts/make_fp16_reference.py
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import FIX, LINEARS, TINY, read_qref, versions, write_qref  # noqa: E402


def build(ref):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    c = json.loads(bytes(ref["config"]).decode())
    assert c == json.loads(json.dumps(TINY)), "ref_tiny.qref.gz was made with another TINY"
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["d"], intermediate_size=c["ff"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], rms_norm_eps=c["eps"],
                      rope_theta=c["theta"], max_position_embeddings=64, tie_word_embeddings=True,
                      attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    t = lambda a: torch.from_numpy(np.array(a, dtype=np.float32))  # noqa: E731
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(t(ref["w.embed"]).reshape(c["vocab"], c["d"]))
        model.model.norm.weight.copy_(t(ref["w.norm"]))
        for l, layer in enumerate(model.model.layers):
            layer.input_layernorm.weight.copy_(t(ref[f"w.l{l}.attn_norm"]))
            layer.post_attention_layernorm.weight.copy_(t(ref[f"w.l{l}.ffn_norm"]))
            for mod, name in LINEARS:
                w = getattr(getattr(layer, mod), name).weight
                w.copy_(t(ref[f"w.l{l}.{name}"]).reshape(w.shape))
    lcfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=[n for _, n in LINEARS], init_lora_weights=True)
    pm = get_peft_model(model, lcfg)
    params = []
    for l, layer in enumerate(pm.base_model.model.model.layers):
        for mod, name in LINEARS:
            lin = getattr(getattr(layer, mod), name)
            params += [lin.lora_A["default"].weight, lin.lora_B["default"].weight]
    p0 = t(ref["lora_params"])
    off = 0
    with torch.no_grad():
        for p in params:
            assert p.dtype == torch.float32  # PEFT keeps the adapters in fp32
            p.copy_(p0[off:off + p.numel()].reshape(p.shape))
            off += p.numel()
    assert off == p0.numel()
    B, T = c["B"], c["T"]
    ids = torch.from_numpy(np.array(ref["input_ids"], dtype=np.int64)).reshape(B, T)
    labels = torch.from_numpy(np.array(ref["labels"], dtype=np.int64)).reshape(B, T)
    pos = torch.from_numpy(np.array(ref["position_ids"], dtype=np.int64)).reshape(B, T)
    return c, pm, params, p0, ids, labels, pos


def main():
    import torch
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ref = read_qref(os.path.join(FIX, "ref_tiny.qref.gz"))
    c, pm, params, p0, ids, labels, pos = build(ref)
    pm.train()

    def fwd():
        with torch.autocast("cpu", dtype=torch.float16):
            return pm(input_ids=ids, position_ids=pos, labels=labels)

    def flat_grads():
        return torch.cat([p.grad.detach().reshape(-1).float() for p in params])

    def reset():
        with torch.no_grad():
            off = 0
            for p in params:
                p.copy_(p0[off:off + p.numel()].reshape(p.shape))
                off += p.numel()

    o = {"versions": versions(), "config": json.dumps(c)}

    # one step's loss and unscaled gradients
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=c["betas"], eps=c["adam_eps"], weight_decay=c["wd"],
                            foreach=False)
    scaler = torch.amp.GradScaler("cpu")
    opt.zero_grad(set_to_none=True)
    out = fwd()
    assert out.logits.dtype == torch.float16 or out.logits.dtype == torch.float32
    scaler.scale(out.loss).backward()
    scaler.unscale_(opt)
    o["fp16.loss"] = float(out.loss.detach())
    o["fp16.logits"] = out.logits.detach().float().numpy()
    o["fp16.grads"] = flat_grads().numpy()
    o["fp16.init_scale"] = float(scaler.get_scale())
    print(f"[ref] fp16: loss {o['fp16.loss']:.6f}, |g| {float(np.linalg.norm(o['fp16.grads'])):.5f}")

    def train(prefix, init_scale, growth_interval=2000, steps=c["steps"]):
        reset()
        opt = torch.optim.AdamW(params, lr=c["lr"], betas=c["betas"], eps=c["adam_eps"], weight_decay=c["wd"],
                                foreach=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=growth_interval)
        losses, norms, scales, skipped = [], [], [], []
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            o_ = fwd()
            used = float(scaler.get_scale())
            scaler.scale(o_.loss).backward()
            scaler.unscale_(opt)
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, c["max_norm"])))
            losses.append(float(o_.loss.detach()))
            scaler.step(opt)
            scaler.update()
            scales.append(used)
            skipped.append(1 if float(scaler.get_scale()) < used else 0)
        with torch.no_grad():
            losses.append(float(fwd().loss))
        o[f"{prefix}.losses"] = np.array(losses, dtype=np.float64)
        o[f"{prefix}.grad_norms"] = np.array(norms, dtype=np.float64)
        o[f"{prefix}.scales"] = np.array(scales, dtype=np.float64)
        o[f"{prefix}.skipped"] = np.array(skipped, dtype=np.int32)
        o[f"{prefix}.final_scale"] = float(scaler.get_scale())
        o[f"{prefix}.final_params"] = torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float32)
        print(f"[ref] {prefix}: scales {scales}, skipped {skipped}, losses {['%.4f' % x for x in losses]}")

    train("amp", 2.0 ** 16)
    train("ovf", 2.0 ** 24, growth_interval=3, steps=20)
    o["ovf.growth_interval"] = 3
    o["ovf.steps"] = 20
    write_qref(os.path.join(FIX, "ref_fp16.qref.gz"), o)


if __name__ == "__main__":
    main()
