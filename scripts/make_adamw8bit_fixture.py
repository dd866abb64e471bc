#!/usr/bin/env python3
"""Write tests/fixtures/adamw8bit_ref.qref.gz: bitsandbytes' own 8-bit AdamW (bnb.optim.AdamW8bit,
blockwise states) run on the CPU for 10 steps, the oracle of tests/test_adamw8bit.c. The states are
quantized by bnb's default kernel, not its native CPU one (use_default_quantizer says why).

Run with the pinned reference venv (scripts/requirements-reference.txt: torch, bitsandbytes 0.50.2):
    /work/venv-ref/bin/python scripts/make_adamw8bit_fixture.py

Four tensors as LoRA's arena holds them (each its own parameter, as PEFT's A and B are): 768
elements (3 whole blocks of 256), 700 (a partial last block), 1024, and 200 (under min_8bit_size:
32-bit states). To keep the fixture small, min_8bit_size is 256 here (bnb's default, 4096, is what
qlora uses; the rule is the same) and the gradients are fp16-representable values stored as fp16.
Gradients are seeded normals of varying scale; the first
tensor's gradient is zero at step 1 (LoRA's A while B = 0). The learning rate changes every step
(set in param_groups, as a scheduler does). Stored: both dynamic quantization maps
(create_dynamic_map(signed=True/False)), the initial parameters, every step's gradients and lr, and
after the last step the parameters, the uint8 states with their absmax, and the 32-bit states.
"""
import gzip  # noqa: F401  (write_qref)
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sophia_fixture import write_qref  # noqa: E402

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as BF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "adamw8bit_ref.qref.gz")
SIZES = [768, 700, 1024, 200]
MIN_8BIT = 256
STEPS = 10
BETAS = (0.9, 0.999)
EPS = 1e-8
WD = 0.01


def use_default_quantizer():
    """Run bnb's 8-bit CPU update with bnb's own default (pure PyTorch) quantize_blockwise kernel.

    The native CPU quantizer of bitsandbytes 0.50.2 (libbitsandbytes_cpu) resolves a normalized value only
    to 2^-15 (a 65536-bucket lookup): every |x/absmax| < 3e-5 becomes the entry nearest 1.5e-5, so small
    second moments are stored as 1.5e-5·absmax instead of ~0. bnb's CUDA kernel and its default kernel
    (backends/default/ops.py: x·(1/absmax) clamped to [-1, 1], then bucketize on the midpoints of the map:
    the nearest entry) do not; qlora implements that one. The default kernel is taken from the installed
    package's source and called in place of the native one inside bnb's CPU optimizer update."""
    import inspect
    import bitsandbytes.backends.cpu.ops as cpu_ops
    import bitsandbytes.backends.default.ops as default_ops
    src = inspect.getsource(default_ops)
    start = src.index('@register_kernel("bitsandbytes::quantize_blockwise", "default")')
    body = src[src.index("\n", start) + 1:]
    body = body[:body.index("\n\n\n")]
    ns = dict(vars(default_ops))
    exec(compile(body, default_ops.__file__, "exec"), ns)
    default_quantize = ns["_"]

    def quant(a_fp32, code, absmax_out, out_uint8, blocksize):
        out, absmax = default_quantize(a_fp32, code, blocksize)
        out_uint8.copy_(out)
        absmax_out.copy_(absmax)

    cpu_ops._quant_blockwise_fp32_direct = quant


def main():
    use_default_quantizer()
    torch.manual_seed(1234)
    params = [torch.nn.Parameter(torch.randn(n) * 0.02) for n in SIZES]
    arrays = {
        "sizes": np.array(SIZES, dtype=np.int64), "min_8bit_size": MIN_8BIT,
        "beta1": BETAS[0], "beta2": BETAS[1], "eps": EPS, "weight_decay": WD, "steps": STEPS,
        "qmap_signed": BF.create_dynamic_map(signed=True).numpy().astype(np.float32),
        "qmap_unsigned": BF.create_dynamic_map(signed=False).numpy().astype(np.float32),
        "param0": torch.cat([p.detach() for p in params]).numpy().copy(),
    }
    opt = bnb.optim.AdamW8bit(params, lr=1e-3, betas=BETAS, eps=EPS, weight_decay=WD, min_8bit_size=MIN_8BIT)
    lrs, grads = [], []
    for t in range(1, STEPS + 1):
        lr = 1e-3 * (0.5 + 0.5 * np.cos(np.pi * (t - 1) / STEPS))
        for g in opt.param_groups:
            g["lr"] = lr
        gs = []
        for i, p in enumerate(params):
            g = (torch.randn(SIZES[i]) * (10.0 ** (-1 - (t + i) % 3))).half().float()
            if i == 0 and t == 1:
                g = torch.zeros(SIZES[i])
            p.grad = g
            gs.append(g)
        opt.step()
        lrs.append(lr)
        grads.append(torch.cat(gs).numpy())
    arrays["lr"] = np.array(lrs, dtype=np.float64)
    arrays["grads_f16"] = np.stack(grads).astype(np.float16).view(np.uint16)
    arrays["param_final"] = torch.cat([p.detach() for p in params]).numpy().copy()
    for i, p in enumerate(params):
        st = opt.state[p]
        assert st["step"] == STEPS
        if SIZES[i] >= MIN_8BIT:
            assert st["state1"].dtype == torch.uint8
            arrays[f"t{i}.state1"] = st["state1"].numpy().copy()
            arrays[f"t{i}.state2"] = st["state2"].numpy().copy()
            arrays[f"t{i}.absmax1"] = st["absmax1"].numpy().copy()
            arrays[f"t{i}.absmax2"] = st["absmax2"].numpy().copy()
            assert torch.equal(st["qmap1"], BF.create_dynamic_map(signed=True))
        else:
            assert st["state1"].dtype == torch.float32
            arrays[f"t{i}.m"] = st["state1"].numpy().copy()
            arrays[f"t{i}.v"] = st["state2"].numpy().copy()
    arrays["versions"] = f"torch {torch.__version__}, bitsandbytes {bnb.__version__}"
    write_qref(OUT, arrays)
    print("wrote", OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
