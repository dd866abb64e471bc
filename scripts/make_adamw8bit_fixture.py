#!/usr/bin/env python3
"""Write tests/fixtures/adamw8bit_ref.qref.gz: bitsandbytes' own 8-bit AdamW (bnb.optim.AdamW8bit,
what HF Trainer runs for optim "adamw_bnb_8bit" / "adamw_8bit", and, with paged memory, for
"paged_adamw_8bit"), run for 10 steps on CPU by bitsandbytes 0.50.2; tests/test_adamw8bit.c runs
qlora's optim/adamw8bit.c on the same inputs and compares.

Three parameter tensors with LoRA shapes, one bnb parameter group:
  a  (9, 500)  = 4500 elements  >= min_8bit_size 4096: blockwise 8-bit states (18 blocks of 256, the
                                 last one partial); its gradient is all zeros at step 1 (a LoRA A matrix's
                                 gradient is zero while B is still zero), so its first state blocks
                                 have absmax 0
  b  (8, 512)  = 4096 elements  = min_8bit_size: 8-bit (only fewer elements stay fp32), 16 whole blocks
  c  (64, 8)   =  512 elements  < 4096: bnb keeps fp32 states (its 32-bit update)
The gradient of step t (1-based) is G[(t-1) % 3] * s[t-1] in fp32 (three stored gradients, ten
scales), the learning rate lr[t-1] changes every step as a schedule would; betas (0.9, 0.999),
eps 1e-8, weight_decay 0.01.

Stored (format: tests/ref_fixture.h): qmap_signed, qmap_unsigned (bnb's create_dynamic_map as the
optimizer creates them), p0_{a,b,c}, g{0,1,2}_{a,b,c}, scales, lrs, and after the steps t in KEPT:
p{t}_{a,b,c}; for a and b state1_{t}_{x}, state2_{t}_{x} (u8 codes), absmax1_{t}_{x},
absmax2_{t}_{x} (f32, one per block); for c m_{t}_c, v_{t}_c (f32). Also qmap1_after, qmap2_after:
the optimizer's maps after the run (bnb's CPU quantizer sets code[0] = -1 in place).

Run (from the repo root, CPU torch + bitsandbytes; no GPU needed):
    /work/venv-ref/bin/python scripts/make_adamw8bit_fixture.py
"""
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sophia_fixture import write_qref  # noqa: E402  (the container of tests/ref_fixture.h)

import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as bnbF  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "adamw8bit_ref.qref.gz")
SHAPES = {"a": (9, 500), "b": (8, 512), "c": (64, 8)}
STEPS = 10
KEPT = (1, 2, 3, 10)  # the steps whose results are stored (the test runs all ten)


def main():
    torch.manual_seed(20261206)
    arrays = {}
    arrays["qmap_signed"] = bnbF.create_dynamic_map(signed=True).numpy()
    arrays["qmap_unsigned"] = bnbF.create_dynamic_map(signed=False).numpy()
    params = {}
    grads = {}
    for k, shp in SHAPES.items():
        p0 = (torch.randn(shp) * 0.02).float()
        params[k] = torch.nn.Parameter(p0.clone())
        arrays[f"p0_{k}"] = p0.numpy()
        for j in range(3):
            # wide magnitudes within a block, as LoRA gradients have
            g = torch.randn(shp) * torch.exp(torch.randn(shp) * 1.5) * 1e-3
            if k == "a" and j == 0:
                g = torch.zeros(shp)
            grads[(k, j)] = g.float()
            arrays[f"g{j}_{k}"] = g.float().numpy()
    scales = torch.tensor([1.0, 0.5, 2.0, 1.25, 0.75, 3.0, 0.1, 1.0, 1.5, 0.9], dtype=torch.float32)
    lrs = [1e-3 * (0.5 + 0.5 * np.cos(np.pi * t / STEPS)) + 1e-5 for t in range(STEPS)]
    arrays["scales"] = scales.numpy()
    arrays["lrs"] = np.array(lrs, dtype=np.float64)

    opt = bnb.optim.AdamW8bit(list(params.values()), lr=lrs[0], betas=(0.9, 0.999), eps=1e-8,
                              weight_decay=0.01)
    for t in range(1, STEPS + 1):
        for g in opt.param_groups:
            g["lr"] = lrs[t - 1]
        for k, p in params.items():
            p.grad = grads[(k, (t - 1) % 3)] * scales[t - 1]
        opt.step()
        if t not in KEPT:
            continue
        for k, p in params.items():
            arrays[f"p{t}_{k}"] = p.detach().numpy().copy()
            st = opt.state[p]
            if k in ("a", "b"):
                assert st["state1"].dtype == torch.uint8, k
                arrays[f"state1_{t}_{k}"] = st["state1"].numpy().copy().reshape(-1)
                arrays[f"state2_{t}_{k}"] = st["state2"].numpy().copy().reshape(-1)
                arrays[f"absmax1_{t}_{k}"] = st["absmax1"].numpy().copy()
                arrays[f"absmax2_{t}_{k}"] = st["absmax2"].numpy().copy()
            else:
                assert st["state1"].dtype == torch.float32, k
                arrays[f"m_{t}_{k}"] = st["state1"].numpy().copy().reshape(-1)
                arrays[f"v_{t}_{k}"] = st["state2"].numpy().copy().reshape(-1)
    st = opt.state[params["a"]]
    arrays["qmap1_after"] = st["qmap1"].numpy().copy()
    arrays["qmap2_after"] = st["qmap2"].numpy().copy()
    arrays["versions"] = f"torch {torch.__version__}, bitsandbytes {bnb.__version__}"
    write_qref(OUT, arrays)
    print(f"[adamw8bit-fixture] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
