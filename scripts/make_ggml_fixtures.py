#!/usr/bin/env python3
"""Write the oracle fixtures for tests/test_gguf.c, using the PyPI `gguf` package
(gguf-py from llama.cpp) and numpy, which nobody on this project wrote.

Command (from the repo root):
    python3 scripts/make_ggml_fixtures.py \
        [--model models/SmolLM2-135M-Instruct.Q4_1.gguf]
Generated with gguf 0.19.0, numpy 2.4.6, Python 3.11.7 (`pip show gguf numpy`).

Outputs:
  tests/fixtures/ggml_types.gguf   (~90 KB)
    src                  F32 [512 x 4]  seeded random rows 0..2; row 3 = edge-case
                                        blocks (zeros, constant, rounding ties,
                                        +/- magnitude ties, f16-subnormal and
                                        near-f16-max scales)
    f32 f16 bf16 q8_0 q4_0 q4_1   `src` through gguf.quants.quantize(src, TYPE)
    q5_0 q5_1            `src` through gguf.quants.quantize (written after q6_k)
    q4_k q6_k q5_k       [512 x 3]  random block bytes with finite f16 scales:
                                    gguf 0.19 has no K-quant quantizer, and random
                                    bytes exercise every bit of the layouts
    <name>.expected      F32        gguf.quants.dequantize(<name>) (the oracle)
  tests/fixtures/smollm2_expected.gguf   (~10 KB, only with --model)
    attn_q.rows_0_2      F32 [576 x 2]  rows 0-1 of blk.0.attn_q.weight (Q4_1)
    token_embd.row_100   F32 [576]      row 100 of token_embd.weight (Q8_0)
    attn_norm            F32 [576]      blk.0.attn_norm.weight (F32)
    KV fixture.model_size (u64): size of the model the values came from.
The Q8_0/Q4_0/Q4_1 tensors double as the expected bytes of our reference
quantizers applied to `src`.
"""
import argparse
import importlib.metadata
import os

import numpy as np
import gguf
from gguf import GGMLQuantizationType as T
from gguf.quants import quantize, dequantize

SEED = 20250211


def edge_row(rng: np.random.Generator) -> np.ndarray:
    """512 values = 16 blocks of 32 that hit the corner cases of the quantizers."""
    blocks = []
    blocks.append(np.zeros(32))                                   # d = 0 -> id = 0
    blocks.append(np.full(32, 0.5))                               # Q4_1: max == min
    b = np.arange(32) - 15.5                                      # x/d lands on .5: roundf ties
    b[0] = 127.0
    blocks.append(b)
    b = rng.uniform(-1, 1, 32)                                    # Q4_0: -a before +a, first wins
    b[3], b[20] = -3.0, 3.0
    blocks.append(b)
    b = rng.uniform(-1, 1, 32)
    b[7], b[9] = 3.0, -3.0
    blocks.append(b)
    blocks.append(rng.uniform(-1e-6, 1e-6, 32))                   # d is an f16 subnormal
    blocks.append(rng.uniform(-6e4, 6e4, 32))                     # near the f16 max
    blocks.append(np.full(32, -2.0))                              # negative constant
    blocks.append(np.linspace(-1, 1, 32))
    blocks.append(rng.integers(-8, 8, 32).astype(np.float64))     # exact nibble values
    while len(blocks) < 16:
        blocks.append(rng.standard_normal(32) * rng.uniform(0.01, 10))
    return np.concatenate(blocks).astype(np.float32)


def random_kquant(rng: np.random.Generator, qtype, rows: int, ne0: int) -> np.ndarray:
    """Random block bytes with finite, moderate f16 scales in the right places."""
    bs, ts = gguf.GGML_QUANT_SIZES[qtype]
    nb = rows * ne0 // bs
    raw = rng.integers(0, 256, size=(nb, ts), dtype=np.uint8)
    if qtype in (T.Q4_K, T.Q5_K):
        fields = [0, 2]          # d, dmin
    else:
        fields = [ts - 2]        # Q6_K: d is the last field
    for off in fields:
        vals = rng.uniform(-0.02, 0.02, nb).astype(np.float16)
        vals[0] = np.float16(3e-6)   # subnormal f16
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, ne0 // bs * ts)


def add(w: gguf.GGUFWriter, name: str, data: np.ndarray, qtype) -> None:
    if qtype in (T.F32, T.F16):
        w.add_tensor(name, data)
    else:
        w.add_tensor(name, data, raw_dtype=qtype)
    exp = dequantize(data, qtype).astype(np.float32, copy=False)
    w.add_tensor(name + ".expected", np.ascontiguousarray(exp))


def write(w: gguf.GGUFWriter) -> None:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make_types(path: str) -> None:
    rng = np.random.default_rng(SEED)
    src = np.empty((4, 512), dtype=np.float32)
    src[0] = rng.standard_normal(512) * 0.02
    src[1] = rng.standard_normal(512)
    src[2] = rng.uniform(-5, 5, 512)
    src[3] = edge_row(rng)

    w = gguf.GGUFWriter(path, arch="qlora-fixture")
    w.add_string("fixture.generator", "scripts/make_ggml_fixtures.py gguf %s numpy %s"
                 % (importlib.metadata.version("gguf"), np.__version__))
    w.add_tensor("src", src)
    for name, qtype in [("f32", T.F32), ("f16", T.F16), ("bf16", T.BF16),
                        ("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1)]:
        add(w, name, quantize(src, qtype), qtype)
    add(w, "q4_k", random_kquant(rng, T.Q4_K, 3, 512), T.Q4_K)
    add(w, "q6_k", random_kquant(rng, T.Q6_K, 3, 512), T.Q6_K)
    # added for Gemma 3 270M's Q4_K_M file (Q5_0 linears), after the others so their bytes stay as they were
    add(w, "q5_0", quantize(src, T.Q5_0), T.Q5_0)
    add(w, "q5_1", quantize(src, T.Q5_1), T.Q5_1)
    add(w, "q5_k", random_kquant(rng, T.Q5_K, 3, 512), T.Q5_K)
    write(w)


def make_model_rows(model: str, path: str) -> None:
    r = gguf.GGUFReader(model)
    ts = {t.name: t for t in r.tensors}

    def rows(name, r0, r1):
        t = ts[name]
        return np.ascontiguousarray(dequantize(np.asarray(t.data[r0:r1]), t.tensor_type).astype(np.float32))

    w = gguf.GGUFWriter(path, arch="qlora-fixture")
    w.add_uint64("fixture.model_size", os.path.getsize(model))
    w.add_tensor("attn_q.rows_0_2", rows("blk.0.attn_q.weight", 0, 2))
    w.add_tensor("token_embd.row_100", rows("token_embd.weight", 100, 101).reshape(-1))
    w.add_tensor("attn_norm", np.asarray(ts["blk.0.attn_norm.weight"].data, dtype=np.float32).copy())
    write(w)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures")
    ap.add_argument("--model", default=None, help="also write smollm2_expected.gguf from this model")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    make_types(os.path.join(a.out, "ggml_types.gguf"))
    if a.model:
        make_model_rows(a.model, os.path.join(a.out, "smollm2_expected.gguf"))


if __name__ == "__main__":
    main()
