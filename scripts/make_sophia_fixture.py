#!/usr/bin/env python3
"""Write tests/fixtures/sophia_ref.qref.gz: the reference SophiaG run that tests/test_sophia.c
compares qlora's optim/sophia.c and its training-loop order against.

The optimizer below is written from the documented update of the official SophiaG
(Liuhong99/Sophia, sophia.py `_single_tensor_sophiag` and `update_hessian`; the official repo is
not on PyPI and no code of it is copied here — the update is restated in
docs/formats.md §5) as PyTorch tensor ops in the same order and with the same
in-place ops, so torch's own fp32 kernels are the oracle:

    step += 1
    p.mul_(1 - lr * wd)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(None, 1)
    p.addcmul_(m.sign(), ratio, value=-lr)
    every k steps (after the step):  h.mul_(beta2).addcmul_(ghat, ghat, value=1 - beta2)

and the loop order is train_sophiag.py's: forward/backward, clip_grad_norm_(grad_clip), step(bs),
zero_grad; when iter % k == k - 1: forward, y ~ Categorical(logits=logits), mean cross-entropy
with y, backward, clip_grad_norm_(grad_clip), update_hessian, zero_grad.

Contents (format: tests/ref_fixture.h; names below are the array names):

  exact_*      one SophiaG step and one Hessian update on 4099 random elements (m and h with
               exact zeros, wide magnitudes), computed by torch: qlora must match bit for bit.
  tiny_*       a tiny LoRA problem: x (24, 16) -> frozen W0 (16, 16) + LoRA A (4, 16), B (16, 4)
               with scaling 2 -> frozen head Wh (11, 16) -> mean cross-entropy over the target
               positions. 20 SophiaG steps, k = 8 (Hessian updates after steps 8 and 16, so both
               change later steps), three batches of targets used in turn, bs = target tokens of
               the step, cosine lr with warmup, grad clipping at 1.0. Stored: inputs, the sampled
               labels of both Hessian updates (so qlora feeds the same labels), and after every
               step the parameters, m, h, the win count (|m| < rho*bs*h), the loss and the
               gradient norm. Parameters are one flat arena: A row-major, then B row-major.

Run (from the repo root, CPU torch; no GPU needed):
    /work/venv-ref/bin/python scripts/make_sophia_fixture.py
"""
import gzip
import math
import os
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "sophia_ref.qref.gz")

DT = {np.dtype(np.float32): 0, np.dtype(np.int32): 1, np.dtype(np.uint8): 2, np.dtype(np.uint16): 3,
      np.dtype(np.int64): 4, np.dtype(np.float64): 5}


def write_qref(path, arrays):
    """The container of tests/ref_fixture.h: "QLREF001", count, then named typed n-d arrays."""
    out = bytearray(b"QLREF001")
    out += struct.pack("<I", len(arrays))
    for name, a in arrays.items():
        if isinstance(a, str):
            a = np.frombuffer(a.encode("utf-8"), dtype=np.uint8)
        elif isinstance(a, float):
            a = np.array([a], dtype=np.float64)
        elif isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            a = np.array([int(a)], dtype=np.int64)
        a = np.ascontiguousarray(a)
        if a.dtype not in DT:
            raise TypeError(f"{name}: unsupported dtype {a.dtype}")
        nb = name.encode("utf-8")
        out += struct.pack("<I", len(nb)) + nb
        out += struct.pack("<II", DT[a.dtype], a.ndim)
        out += b"".join(struct.pack("<Q", d) for d in a.shape)
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        out += struct.pack("<Q", len(raw)) + raw
    tmp = path + ".tmp"
    with gzip.GzipFile(tmp, "wb", compresslevel=9, mtime=0) as f:
        f.write(bytes(out))
    os.replace(tmp, path)


class SophiaG(torch.optim.Optimizer):
    """SophiaG as documented (docs/formats.md §5); plain per-tensor loop (the official _single_tensor path)."""

    def __init__(self, params, lr=1e-4, betas=(0.965, 0.99), rho=0.04, weight_decay=1e-1):
        super().__init__(params, dict(lr=lr, betas=betas, rho=rho, weight_decay=weight_decay))

    def _state(self, p):
        st = self.state[p]
        if len(st) == 0:
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p)
            st["hessian"] = torch.zeros_like(p)
        return st

    @torch.no_grad()
    def update_hessian(self):
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                st["hessian"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)

    @torch.no_grad()
    def step(self, bs):
        wins = 0
        for group in self.param_groups:
            beta1 = group["betas"][0]
            lr, rho, wd = group["lr"], group["rho"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._state(p)
                m, h = st["exp_avg"], st["hessian"]
                st["step"] += 1
                p.mul_(1 - lr * wd)
                m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                ratio = (m.abs() / (rho * bs * h + 1e-15)).clamp(None, 1)
                wins += int((m.abs() < rho * bs * h).sum())  # the README's win_rate: |m| < rho*bs*h
                p.addcmul_(m.sign(), ratio, value=-lr)
        return wins


def exact_case(arrays):
    g = torch.Generator().manual_seed(7)
    n = 4099
    p = torch.randn(n, generator=g) * 0.1
    grad = torch.randn(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 2) * 1e-3
    m = torch.randn(n, generator=g) * 1e-3
    h = torch.rand(n, generator=g) * torch.exp(torch.randn(n, generator=g) * 3) * 1e-6
    m[::17] = 0.0  # no momentum yet
    h[::5] = 0.0   # no Hessian yet: ratio saturates at 1
    grad[::23] = 0.0
    p0, m0, h0 = p.clone(), m.clone(), h.clone()
    lr, bs, rho, wd, b1, b2 = 3.1e-4, 1024.0, 0.04, 0.1, 0.965, 0.99
    pp = torch.nn.Parameter(p.clone())
    opt = SophiaG([pp], lr=lr, betas=(b1, b2), rho=rho, weight_decay=wd)
    st = opt._state(pp)
    st["exp_avg"].copy_(m)
    st["hessian"].copy_(h)
    pp.grad = grad.clone()
    wins = opt.step(bs=bs)
    ghat = torch.randn(n, generator=g) * 1e-3
    pp.grad = ghat.clone()
    opt.update_hessian()
    arrays.update({
        "exact_p0": p0.numpy(), "exact_grad": grad.numpy(), "exact_m0": m0.numpy(), "exact_h0": h0.numpy(),
        "exact_ghat": ghat.numpy(),
        "exact_hyper": np.array([lr, bs, rho, wd, b1, b2], dtype=np.float64),
        "exact_p1": pp.detach().numpy().copy(), "exact_m1": st["exp_avg"].numpy().copy(),
        "exact_h1": st["hessian"].numpy().copy(), "exact_wins": np.array([wins], dtype=np.int64),
    })
    print(f"[sophia-fixture] exact: {n} elements, win {wins}/{n}")


def cosine_lr(step0, total, warmup, base):
    """HF get_cosine_schedule_with_warmup multiplier at 0-based step, times base (as optim/schedule.h)."""
    if step0 < warmup:
        return base * step0 / max(1, warmup)
    progress = (step0 - warmup) / max(1, total - warmup)
    return base * max(0.0, 0.5 * (1.0 + math.cos(math.pi * 2 * 0.5 * progress)))


def tiny_case(arrays):
    g = torch.Generator().manual_seed(11)
    N, DIN, D, V, R, SCALING = 24, 16, 16, 11, 4, 2.0
    STEPS, K, BASE_LR, WARMUP, CLIP = 20, 8, 2e-2, 2, 1.0
    RHO, WD, B1, B2 = 2.0, 0.1, 0.965, 0.99
    x = torch.randn(N, DIN, generator=g)
    W0 = torch.randn(D, DIN, generator=g) / 4
    Wh = torch.randn(V, D, generator=g)
    A = (torch.rand(R, DIN, generator=g) * 2 - 1) / 4   # kaiming-uniform bound 1/sqrt(in)
    B = torch.randn(D, R, generator=g) * 0.3           # non-zero so A gets gradients from step 1
    targets = torch.randint(0, V, (3, N), generator=g)
    for b in range(3):  # some masked positions (prompt tokens / padding), different per batch
        targets[b, torch.randperm(N, generator=g)[: 2 + 2 * b]] = -100
    pA, pB = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
    opt = SophiaG([pA, pB], lr=BASE_LR, betas=(B1, B2), rho=RHO, weight_decay=WD)

    def logits_of():
        y = F.linear(x, W0) + SCALING * F.linear(F.linear(x, pA), pB)
        return F.linear(y, Wh)

    torch.manual_seed(1234)  # the Categorical draws
    n_par = pA.numel() + pB.numel()
    out = {k: [] for k in ("params", "m", "h", "grad", "wins", "loss", "gnorm", "lr", "bs")}
    labels, hess_steps, hess_gnorm = [], [], []
    flat = lambda a, b: torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)]).numpy().copy()
    for step in range(1, STEPS + 1):
        tg = targets[(step - 1) % 3]
        bs = int((tg != -100).sum())
        lr = cosine_lr(step - 1, STEPS, WARMUP, BASE_LR)
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss = F.cross_entropy(logits_of(), tg, ignore_index=-100)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([pA, pB], CLIP)
        out["grad"].append(flat(pA.grad, pB.grad))
        wins = opt.step(bs=bs)
        opt.zero_grad(set_to_none=True)
        if (step - 1) % K == K - 1:  # train_sophiag.py: iter_num % hess_interval == hess_interval - 1
            logits = logits_of()
            y = torch.distributions.Categorical(logits=logits.detach()).sample()
            y = torch.where(tg != -100, y, torch.full_like(y, -100))  # only the trained positions
            F.cross_entropy(logits, y, ignore_index=-100).backward()
            hg = torch.nn.utils.clip_grad_norm_([pA, pB], CLIP)
            opt.update_hessian()
            opt.zero_grad(set_to_none=True)
            labels.append(y.to(torch.int32).numpy())
            hess_steps.append(step)
            hess_gnorm.append(float(hg))
        stA, stB = opt.state[pA], opt.state[pB]
        out["params"].append(flat(pA, pB))
        out["m"].append(flat(stA["exp_avg"], stB["exp_avg"]))
        out["h"].append(flat(stA["hessian"], stB["hessian"]))
        out["wins"].append(wins)
        out["loss"].append(float(loss.detach()))
        out["gnorm"].append(float(gn))
        out["lr"].append(lr)
        out["bs"].append(bs)
        print(f"[sophia-fixture] tiny step {step:2d}: loss {float(loss):.4f} grad_norm {float(gn):.3f} "
              f"lr {lr:.4g} bs {bs} win {wins}/{n_par}")
    assert len(hess_steps) == 2, hess_steps
    arrays.update({
        "tiny_x": x.numpy(), "tiny_W0": W0.numpy(), "tiny_Wh": Wh.numpy(), "tiny_A0": A.numpy(),
        "tiny_B0": B.numpy(), "tiny_targets": targets.to(torch.int32).numpy(),
        "tiny_hyper": np.array([SCALING, RHO, WD, B1, B2, CLIP], dtype=np.float64),
        "tiny_k": K, "tiny_steps": STEPS,
        "tiny_hess_steps": np.array(hess_steps, dtype=np.int64),
        "tiny_hess_labels": np.stack(labels), "tiny_hess_gnorm": np.array(hess_gnorm, dtype=np.float64),
        "tiny_params": np.stack(out["params"]), "tiny_m": np.stack(out["m"]), "tiny_h": np.stack(out["h"]),
        "tiny_grad": np.stack(out["grad"]),
        "tiny_wins": np.array(out["wins"], dtype=np.int64), "tiny_loss": np.array(out["loss"], dtype=np.float64),
        "tiny_gnorm": np.array(out["gnorm"], dtype=np.float64), "tiny_lr": np.array(out["lr"], dtype=np.float64),
        "tiny_bs": np.array(out["bs"], dtype=np.float64),
    })


def main():
    torch.set_num_threads(1)
    arrays = {"versions": f"torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}, "
                          f"cpu capability {torch.backends.cpu.get_cpu_capability()}"}
    exact_case(arrays)
    tiny_case(arrays)
    write_qref(OUT, arrays)
    print(f"[sophia-fixture] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
