#!/usr/bin/env python3
"""Reference fixture for qlora's int8 frozen base (load_in_8bit: true), written by bitsandbytes itself.

    /work/venv-ref/bin/python scripts/make_int8_reference.py      (versions: scripts/requirements-reference.txt)

Writes tests/fixtures/ref_int8.qref.gz (format: tests/ref_fixture.h), read by tests/test_reference_int8.c:

  q<i>.w          f32 (rows, cols): a weight; cases: random normal, a zero row, exact .5 ties of
                  round-half-even, values fp16 rounds or flushes (subnormals, 1e-8), magnitudes near 65504
  q<i>.cb         u8 (rows, cols): the int8 codes (two's complement bytes) of Int8Params(w).to("cpu")
                  (nn/modules.py Int8Params._quantize -> functional.int8_vectorwise_quant)
  q<i>.scb        f32 (rows): Int8Params.SCB
  q<i>.deq        f32 (rows, cols): functional.int8_vectorwise_dequant(CB, SCB)
  q<i>.deq_train_f32 / .deq_train_bf16 (u16 bits): the weight a CPU training step multiplies with
                  (autograd/_functions.py MatMul8bitFp: CB.to(dtype).mul_(SCB * (1/127))), read out of
                  bnb.matmul itself with an identity input (one non-zero product per output: exact)
  lin.x           f32 (4, 64): inputs; lin.w is q0.w (96, 64)
  lin.y_t0 / lin.y_t6   f32 (4, 96): Linear8bitLt (has_fp16_weights=False) in eval mode, threshold 0.0 and
                  6.0: LLM.int8's int8 x int8 matmul with outlier decomposition, the inference forward
  lin.y_train_bf16      f32: the same layer in train mode on bf16 input (MatMul8bitFp on CPU)
  tiny.*          the tiny Llama of make_reference.py's TINY (other weights: seed 2), every linear an
                  8-bit Linear8bitLt (threshold 0.0), PEFT LoRA r 4 on all seven modules in fp32:
                  tiny.w.* (f32 weights before quantization), tiny.cb.l<l>.<module> / tiny.scb.*,
                  tiny.lora_params, tiny.lora_names, tiny.input_ids / labels / position_ids, tiny.loss,
                  tiny.grads (LoRA gradients, qlora's flat order), tiny.n_tokens
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_reference import FIX, LINEARS, TINY, versions, write_qref  # noqa: E402


def u8(t):
    import torch
    return t.contiguous().view(torch.uint8).numpy().copy()


def int8_params(w):
    """Int8Params of an fp32 weight, quantized as .to("cpu") does (Int8Params._quantize)."""
    import bitsandbytes as bnb
    p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    p = p.to("cpu")
    assert p.CB is not None and p.SCB is not None
    return p


def train_weight(p, dtype):
    """The weight MatMul8bitFp multiplies with, read through bnb.matmul with an identity input."""
    import bitsandbytes as bnb
    import torch
    rows, cols = p.CB.shape
    st = bnb.MatmulLtState()
    st.CB, st.SCB, st.has_fp16_weights, st.is_training = p.CB, p.SCB, False, True
    eye = torch.eye(cols, dtype=dtype)
    y = bnb.matmul(eye, p, state=st)  # (cols, rows) = W'^T
    return y.t().contiguous()


def quant_cases():
    import torch
    g = torch.Generator().manual_seed(7)
    cases = []
    cases.append(torch.randn(96, 64, generator=g) * 0.05)  # q0: a Llama-like weight (also lin.w)
    w = torch.randn(8, 48, generator=g)
    w[3] = 0.0  # a zero row: SCB 0, 127/0 = inf, 0*inf = NaN -> int8
    w[5, :] = 0.0
    w[5, 7] = -1e-9  # fp16 flushes it to -0: the row's absmax is 0
    cases.append(w)
    # exact ties: absmax 127 gives scale 1, so x.5 values land on round-half-even
    t = torch.tensor([127.0, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5, -126.5, 0.0, 64.5])
    tw = torch.stack([t, -t, t / 4, t * 0.001])
    cases.append(tw)
    # values fp16 rounds (0.1), flushes (1e-8) or keeps as subnormals (1e-6), and a row near fp16's max
    w = torch.randn(6, 40, generator=g) * 1e-3
    w[0, :4] = torch.tensor([1e-8, 1e-6, 0.1, 3e-5])
    w[1] *= 1e4
    w[2, 0] = 65504.0
    w[2, 1] = 60000.0
    w[3] = torch.linspace(-1, 1, 40)
    cases.append(w)
    return cases


def make_quant(o):
    import bitsandbytes.functional as F
    import torch
    for i, w in enumerate(quant_cases()):
        p = int8_params(w)
        o[f"q{i}.w"] = w.numpy().astype(np.float32)
        o[f"q{i}.cb"] = u8(p.CB)
        o[f"q{i}.scb"] = p.SCB.numpy().astype(np.float32)
        o[f"q{i}.deq"] = F.int8_vectorwise_dequant(p.CB, p.SCB).numpy().astype(np.float32)
        o[f"q{i}.deq_train_f32"] = train_weight(p, torch.float32).numpy().astype(np.float32)
        o[f"q{i}.deq_train_bf16"] = train_weight(p, torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        zero_rows = int((p.SCB == 0).sum())
        print(f"[ref] int8 q{i}: {tuple(w.shape)}, zero rows {zero_rows}, codes in "
              f"[{int(p.CB.min())}, {int(p.CB.max())}]")


def make_linear(o):
    import bitsandbytes as bnb
    import torch
    g = torch.Generator().manual_seed(8)
    w = quant_cases()[0]
    x = torch.randn(4, 64, generator=g)
    x[1, 5] = 9.0  # an outlier feature column (|x| >= 6): decomposed in fp16 when threshold 6.0
    o["lin.x"] = x.numpy().astype(np.float32)
    for th, name in ((0.0, "t0"), (6.0, "t6")):
        lin = bnb.nn.Linear8bitLt(64, 96, bias=False, has_fp16_weights=False, threshold=th)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        lin = lin.to("cpu")
        lin.eval()
        with torch.no_grad():
            y = lin(x.half()).float()
        o[f"lin.y_{name}"] = y.numpy().astype(np.float32)
    lin = bnb.nn.Linear8bitLt(64, 96, bias=False, has_fp16_weights=False, threshold=0.0)
    lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
    lin = lin.to("cpu")
    lin.train()
    with torch.no_grad():
        o["lin.y_train_bf16"] = lin(x.bfloat16()).float().numpy().astype(np.float32)


def make_tiny8(o):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = TINY
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["d"], intermediate_size=c["ff"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"],
                      num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], rms_norm_eps=c["eps"],
                      rope_theta=c["theta"], max_position_embeddings=64, tie_word_embeddings=True,
                      attention_dropout=0.0)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).float()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.randn(c["vocab"], c["d"], generator=g) * 0.2)
        for layer in model.model.layers:
            for mod, name in LINEARS:
                w = getattr(getattr(layer, mod), name).weight
                w.copy_(torch.randn(w.shape, generator=g) * (0.8 / w.shape[1] ** 0.5))
            layer.input_layernorm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
            layer.post_attention_layernorm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
        model.model.norm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
    o["tiny.w.embed"] = model.model.embed_tokens.weight.detach().numpy().astype(np.float32).copy()
    o["tiny.w.norm"] = model.model.norm.weight.detach().numpy().astype(np.float32).copy()
    for l, layer in enumerate(model.model.layers):
        o[f"tiny.w.l{l}.attn_norm"] = layer.input_layernorm.weight.detach().numpy().astype(np.float32).copy()
        o[f"tiny.w.l{l}.ffn_norm"] = layer.post_attention_layernorm.weight.detach().numpy().astype(np.float32).copy()
        for mod, name in LINEARS:  # the 8-bit base: every linear an Int8Params Linear8bitLt
            parent = getattr(layer, mod)
            lin = getattr(parent, name)
            w = lin.weight.detach().clone()
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False, has_fp16_weights=False,
                                    threshold=0.0)
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
            q = q.to("cpu")
            setattr(parent, name, q)
            o[f"tiny.w.l{l}.{name}"] = w.numpy().astype(np.float32)
            o[f"tiny.cb.l{l}.{name}"] = u8(q.weight.CB)
            o[f"tiny.scb.l{l}.{name}"] = q.weight.SCB.numpy().astype(np.float32)
    lcfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=[n for _, n in LINEARS], init_lora_weights=True)
    model.is_loaded_in_8bit = True  # as transformers marks a load_in_8bit model: PEFT's bnb 8-bit LoRA layer
    pm = get_peft_model(model, lcfg)
    lora = []
    for l, layer in enumerate(pm.base_model.model.model.layers):
        for mod, name in LINEARS:
            lin = getattr(getattr(layer, mod), name)
            assert type(lin).__name__ == "Linear8bitLt" and isinstance(lin.base_layer, bnb.nn.Linear8bitLt), type(lin)
            A, Bm = lin.lora_A["default"].weight, lin.lora_B["default"].weight
            with torch.no_grad():
                Bm.copy_(torch.randn(Bm.shape, generator=g) * 0.1)
            lora += [(f"l{l}.{name}.A", A), (f"l{l}.{name}.B", Bm)]
    params = [p for _, p in lora]
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in params), "unexpected trainable parameters"
    B, T = c["B"], c["T"]
    ids = torch.randint(0, c["vocab"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 5])
    pm.train()
    out = pm(input_ids=ids, position_ids=pos, labels=labels)
    out.loss.backward()
    grads = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
    print(f"[ref] int8 tiny: loss {float(out.loss.detach()):.6f}, |grad| {float(grads.norm()):.4f}, "
          f"LoRA layer {type(pm.base_model.model.model.layers[0].self_attn.q_proj).__module__}")
    o["tiny.config"] = json.dumps(c)
    o["tiny.lora_params"] = torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float32)
    o["tiny.lora_names"] = ",".join(n for n, _ in lora)
    o["tiny.input_ids"] = ids.numpy().astype(np.int32)
    o["tiny.labels"] = labels.numpy().astype(np.int32)
    o["tiny.position_ids"] = pos.numpy().astype(np.int32)
    o["tiny.n_tokens"] = int((labels[:, 1:] != -100).sum())
    o["tiny.loss"] = float(out.loss.detach())
    o["tiny.grads"] = grads.numpy()


def main():
    import torch
    torch.set_num_threads(1)
    o = {"versions": versions()}
    make_quant(o)
    make_linear(o)
    make_tiny8(o)
    write_qref(os.path.join(FIX, "ref_int8.qref.gz"), o)


if __name__ == "__main__":
    main()
