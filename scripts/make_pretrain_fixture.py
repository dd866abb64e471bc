#!/usr/bin/env python3
"""Write tests/fixtures/ref_pretrain.json.gz: axolotl's pretraining_dataset windows and packed rows, by
axolotl's own code, for tests/test_stream.c.

Command (from the repo root, after `make model`; venv of scripts/requirements-reference.txt):

    pip download --no-deps --no-binary :all: axolotl==0.19.0 -d /tmp/axo_dl
    tar -xzf /tmp/axo_dl/axolotl-0.19.0.tar.gz -C /tmp/axo_dl
    AXOLOTL_SRC=/tmp/axo_dl/axolotl-0.19.0 /work/venv-ref/bin/python scripts/make_pretrain_fixture.py

(axolotl-0.19.0.tar.gz sha256 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d.)

The oracle, none of it written here:
  1. Windows: axolotl's PretrainTokenizationStrategy (src/axolotl/prompt_strategies/pretrain.py, imported
     from the sdist) over transformers' PreTrainedTokenizerFast wrapping SmolLM2's tokenizer.json pipeline
     rebuilt from the GGUF (as scripts/make_tokenizer_fixtures.py builds it; eos/pad <|im_end|>, no bos),
     i.e. HF's truncation with return_overflowing_tokens and stride, then axolotl's eos; windows shorter
     than 2 tokens dropped as axolotl's filter_sequences_by_length does (src/axolotl/utils/trainer.py,
     called on the same lists).
  2. Packing: axolotl's pack_group (src/axolotl/utils/samplers/multipack.py, the numba decorator
     replaced by the identity) over the windows in a given order (the fixture stores it: axolotl draws it
     from an unseeded RandomSampler, so the C test feeds the same order), bin capacity sequence_len,
     bin_size 200; each bin's input_ids concatenated and padded to sequence_len, labels = input_ids
     (axolotl's encode_packed_streaming: features["labels"] = input_ids.copy()), pad label -100, and
     position ids restarting per window (add_position_ids).
"""
import gzip
import importlib
import json
import os
import random
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
AXO = os.environ.get("AXOLOTL_SRC", "/tmp/axo_dl/axolotl-0.19.0")
OUT = os.path.join(ROOT, "tests", "fixtures", "ref_pretrain.json.gz")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

TEXTS = [
    "NAME\n       ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...",
    "",
    "x",
    "The quick brown fox jumps over the lazy dog. " * 9,
    "grep searches for PATTERNS in each FILE. A FILE of \"-\" stands for standard input. " * 5,
    "<|im_start|>user\nhi<|im_end|> control tokens are parsed",
    "tar - an archiving utility",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u65e5\u672c\u8a9e 12345 67890",
    "short",
    "sed is a stream editor. " * 14,
]


def build_tokenizer():
    from gguf import GGUFReader
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    import make_tokenizer_fixtures as mt
    r = GGUFReader(MODEL)
    tokens = mt.field_arr_str(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in mt.field_arr_str(r, "tokenizer.ggml.merges")]
    types_ = mt.field_arr_int(r, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types_) if ty == 3])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=tokens[2], pad_token=tokens[2],
                                   unk_token=tokens[0])


def import_axolotl():
    sys.path.insert(0, os.path.join(AXO, "src"))
    numba = types.ModuleType("numba")
    numba.njit = lambda f=None, **kw: f if f is not None else (lambda g: g)
    sys.modules["numba"] = numba
    from make_axolotl_chat_fixtures import _Stub  # empty modules for imports this path never uses
    _Stub.names = set(_Stub.names) | {"pyarrow"}  # trainer.py imports it for token counts only
    sys.meta_path.insert(0, _Stub())
    pretrain = importlib.import_module("axolotl.prompt_strategies.pretrain")
    multipack = importlib.import_module("axolotl.utils.samplers.multipack")
    trainer = importlib.import_module("axolotl.utils.trainer")
    return pretrain, multipack, trainer


def main():
    import numpy as np
    hf = build_tokenizer()
    pretrain, multipack, trainer = import_axolotl()
    cases = []
    for seq_len in (32, 64):
        cfg = types.SimpleNamespace(train_on_inputs=False, sequence_len=seq_len,
                                    pretraining_dataset=[{"text_column": "text"}])
        strat = pretrain.load(hf, cfg)
        windows = []
        per_text = []
        for t in TEXTS:
            res = strat.tokenize_prompt({"text": t})
            ids = [w for w in res["input_ids"]
                   if trainer.filter_sequences_by_length({"input_ids": w}, sequence_len=seq_len)]
            per_text.append(ids)
            windows.extend(ids)
        rng = random.Random(1000 + seq_len)
        order = list(range(len(windows)))
        rng.shuffle(order)
        lengths = np.array([len(windows[i]) for i in order], dtype=np.int32)
        bins = multipack.pack_group(lengths, 0, seq_len, len(lengths), 200, True)
        rows = []
        for b in bins:
            ids, pos = [], []
            for k in b:
                w = windows[order[k]]
                ids += w
                pos += list(range(len(w)))
            labels = ids + [-100] * (seq_len - len(ids))
            rows.append({"input_ids": ids + [hf.pad_token_id] * (seq_len - len(ids)), "labels": labels,
                         "position_ids": pos + [0] * (seq_len - len(pos)), "n": len(ids)})
        cases.append({"sequence_len": seq_len, "windows_per_text": per_text, "order": order, "rows": rows})
    doc = {"texts": TEXTS, "cases": cases, "eos": hf.eos_token_id, "pad": hf.pad_token_id,
           "versions": {"axolotl": "0.19.0", "transformers": __import__("transformers").__version__,
                        "tokenizers": __import__("tokenizers").__version__}}
    with gzip.open(OUT, "wt", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, separators=(",", ":"))
    print("wrote", OUT, [(c["sequence_len"], sum(len(w) for w in c["windows_per_text"]), len(c["rows"]))
                         for c in cases])


if __name__ == "__main__":
    main()
