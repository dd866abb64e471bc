#!/usr/bin/env python3
"""Write tests/fixtures/ref_vocabs.qref.gz: token ids from Hugging Face `tokenizers` for the real
vocabularies of Llama 2 (llama-spm), Phi-3, Qwen2 and Llama 3 (llama-bpe), for tests/test_vocabs.c.

Command (from the repo root, after scripts/fetch_vocab.sh; venv of scripts/requirements-reference.txt):

    /work/venv-ref/bin/python scripts/make_vocab_fixtures.py

Text: the >= 1 MB corpus already committed in tests/fixtures/ref_tokenizer.qref.gz (prose, man pages,
C and Python code, numbers, whitespace runs, emoji, non-Latin scripts, special-token near-misses, ChatML
transcripts), segment by segment with its parse_special flag, plus EDGE_CASES below (text right after
a special token, leading and repeated spaces, bytes missing from the vocabulary, NFD input).
Stored compactly: per shape and corpus segment the number of ids and the FNV-1a-64 of the ids as
little-endian int32; the edge cases with their full ids.

The oracle is independent of qlora's code: every HF tokenizer below is built by transformers/tokenizers
from the vocabulary file alone (their code derives merges, normalizers and pre-tokenizers), and run by
the Rust `tokenizers` library:

  llama-spm     transformers' GGUF loader (integrations/gguf/gguf_tokenizer_mapping.py,
                sentencepiece_tokenizer: merges from generate_merges over the scores), with the
                legacy normalizer Sequence[Prepend(U+2581), Replace(" ", U+2581)] and no pre-tokenizer:
                the shape of Llama 2's own tokenizer.json, and what llama.cpp and sentencepiece do for
                a GGUF "llama" vocabulary (a prefix space after every special token).
  llama-spm-ms  the same vocabulary as transformers 5's LlamaTokenizer builds it: no normalizer,
                Metaspace(replacement U+2581, prepend_scheme "first", split false). qlora loads this
                one from a tokenizer.json (its own writer's output with HF's normalizer and
                pre-tokenizer JSON, stored here, put in place), so this shape tests tokenizer_json.c.
  phi-3         transformers' GGUF loader (phi3_tokenizer: the legacy normalizer).
  phi-3-json    the same, loaded by qlora from a tokenizer.json as llama-spm-ms.
  phi-3-strip   phi-3-json with the added tokens of id >= 32001 rstrip (as Phi-3's own tokenizer.json)
                and <|endoftext|> lstrip; qlora gets HF's added_tokens JSON as well.
  qwen2         transformers' Qwen2Tokenizer(vocab, merges) (NFC normalizer, Split(Qwen2 regex) +
                ByteLevel) with the control tokens as special tokens: Qwen2's tokenizer.json shape.
                (transformers' GGUF loader builds Qwen2 without the NFC normalizer; its tokenizer.json
                has it. The count of corpus segments where the two differ is printed.)
  llama-bpe     Llama 3's tokenizer.json shape: BPE(ignore_merges=True), Split(Llama 3 regex) +
                ByteLevel(use_regex=False), control tokens special.
"""
import gzip
import json
import os
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_reference import read_qref, versions, write_qref  # noqa: E402

VOCAB = os.path.join(ROOT, "models", "vocab")
OUT = os.path.join(ROOT, "tests", "fixtures", "ref_vocabs.qref.gz")

EDGE_CASES = [
    ("", 1),
    ("Hello world", 1),
    (" Hello", 1),
    ("  Hello", 1),
    ("   three leading spaces and  two   inner", 1),
    ("trailing   ", 1),
    ("   ", 1),
    (" ", 1),
    ("\n\n  indented\n\tcode\n", 1),
    ("<s>Hello", 1),
    ("<s> Hello", 1),
    ("<s>  Hello", 1),
    ("Hello</s>world</s> again", 1),
    ("</s>\n\nx", 1),
    ("<s>", 1),
    ("<s>Hello", 0),
    ("<unk>x<unk>", 1),
    ("[INST] <<SYS>>\nYou are helpful.\n<</SYS>>\n\nHi [/INST] Hello </s><s>[INST] again [/INST]", 1),
    ("<|user|>\nHi<|end|>\n<|assistant|>\nHello<|end|>\n", 1),
    ("<|user|>Hi<|end|><|assistant|> Hello<|endoftext|>", 1),
    ("<|im_start|>system\nYou are Qwen.<|im_end|>\n<|im_start|>user\n hi<|im_end|>\n", 1),
    ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n hi<|eot_id|>", 1),
    ("\u2581already escaped \u2581\u2581 spaces", 1),
    # bytes missing from the vocabulary: control characters, rare CJK, astral symbols, private use
    ("a\x04b\x13\x14 x \x7f", 1),
    ("\U0001F916 \U0001F9EC \U0001FAE0 \U00010348 \U0001D518\U0001D52B \uA66E \U0010FFFD \uE000", 1),
    ("\u9fff\u3400\u4dbf\U00020000\U0002A6DF", 1),
    ("\u0f00\u1000\u1780\u1820\u2d30\ua4d0 mixed scripts", 1),
    # digits and numbers
    ("1 12 123 1234 12345 3.14159 1,000,000 \u0661\u0662\u0663 \u00bd \u2167", 1),
    # NFD and other non-NFC input (Qwen2 composes it; the others keep it)
    ("Cafe\u0301 nai\u0308ve re\u0301sume\u0301", 1),
    ("e\u0301", 1),
    ("\u212b \u2126 \u1e9b\u0323 \u0041\u030a", 1),
    ("\u1100\u1161\u11a8 \u1112\u1161\u11ab\u1100\u1173\u11af", 1),
    ("\u0915\u093c \u0958 \u09c7\u09be \u0b47\u0b3e", 1),
    ("o\u0308\u0301 a\u0328\u0301 \u1e0b\u0323", 1),
    ("x\u0301\u0301\u0301 \u0301leading combining", 1),
    ("int main(void) {\n    printf(\"%d\\n\", 42);\n}\n", 1),
    # added tokens that absorb white space (phi-3-strip: lstrip on <|endoftext|>, rstrip on <|user|> etc.)
    ("Hello  \n\t<|endoftext|>  after <|end|> \n\n <|user|>\u3000x<|assistant|>", 1),
    ("  <|endoftext|>", 1),
    ("I'm SURE they'LL say it's fine", 1),
]

SHAPES = ["llama-spm", "llama-spm-ms", "phi-3", "phi-3-json", "phi-3-strip", "qwen2", "llama-bpe"]
FILE_OF = {"llama-spm": "llama-spm", "llama-spm-ms": "llama-spm", "phi-3": "phi-3", "phi-3-json": "phi-3", "phi-3-strip": "phi-3",
           "qwen2": "qwen2", "llama-bpe": "llama-bpe"}


def fnv64(ids):
    h = 0xcbf29ce484222325
    for b in struct.pack(f"<{len(ids)}i", *ids):
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def fnv64_bytes(data):
    h = 0xcbf29ce484222325
    for b in data:
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def fnv64_np(ids):
    # the same as fnv64, vectorised enough for a megabyte of text
    h = 0xcbf29ce484222325
    for b in np.asarray(ids, dtype="<i4").tobytes():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h


def gguf_dict(name):
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer
    arch, tdict, tcfg = get_gguf_tokenizer(os.path.join(VOCAB, f"ggml-vocab-{name}.gguf"))
    # the reader leaves token_type / scores as counts; read them in full
    from gguf import GGUFReader
    r = GGUFReader(os.path.join(VOCAB, f"ggml-vocab-{name}.gguf"))
    for key, field in (("tokenizer.ggml.token_type", "token_type"), ("tokenizer.ggml.scores", "scores")):
        if key in r.fields:
            f = r.fields[key]
            tdict[field] = [f.parts[i][0].item() for i in f.data]
    return arch, tdict, tcfg


from transformers.integrations.gguf import gguf_tokenizer_mapping as gm  # noqa: E402


def build(shape):
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers
    arch, d, cfg = gguf_dict(FILE_OF[shape])
    if shape in ("llama-spm", "llama-spm-ms", "phi-3", "phi-3-json", "phi-3-strip"):
        backend, _ = gm.convert_gguf_tokenizer(arch, d)
        if shape == "phi-3-strip":
            # Phi-3's own tokenizer.json marks its chat tokens rstrip; lstrip on <|endoftext|> exercises the
            # other direction. Built by editing HF's serialization, read back by tokenizers.
            j = json.loads(backend.to_str())
            for a in j["added_tokens"]:
                if a["id"] >= 32001:
                    a["rstrip"] = True
                if a["content"] == "<|endoftext|>":
                    a["lstrip"] = True
            backend = Tokenizer.from_str(json.dumps(j))
        if shape == "llama-spm":
            backend.normalizer = normalizers.Sequence(
                [normalizers.Prepend(prepend="\u2581"), normalizers.Replace(pattern=" ", content="\u2581")])
            backend.pre_tokenizer = None
        return backend, d
    if shape == "qwen2":
        from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer
        vocab = {t: i for i, t in enumerate(d["tokens"])}
        q = Qwen2Tokenizer(vocab=vocab, merges=[tuple(m.split(" ")) for m in d["merges"]])
        q = gm.add_gguf_special_tokens(q, d)
        return q.backend_tokenizer, d
    if shape == "llama-bpe":
        vocab = {t: i for i, t in enumerate(d["tokens"])}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in d["merges"]],
                                   ignore_merges=True, fuse_unk=False, byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(gm._LLAMA3_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t, ty in zip(d["tokens"], d["token_type"]) if ty == 3])
        return tok, d
    raise ValueError(shape)


def encode(tok, text, ps):
    tok.encode_special_tokens = not ps
    return tok.encode(text, add_special_tokens=False).ids


def main():
    ref = read_qref(os.path.join(ROOT, "tests", "fixtures", "ref_tokenizer.qref.gz"))
    corpus = ref["corpus"].tobytes()
    off = ref["seg_off"]
    special = ref["seg_special"]
    segs = [(corpus[off[i]:off[i + 1]].decode("utf-8"), int(special[i])) for i in range(len(off) - 1)]
    print(f"[vocab] corpus: {len(corpus)} bytes, {len(segs)} segments; {len(EDGE_CASES)} edge cases")
    edge_text = bytearray()
    edge_off = [0]
    for t, _ in EDGE_CASES:
        edge_text += t.encode("utf-8")
        edge_off.append(len(edge_text))
    arrays = {
        "versions": versions(),
        "shapes": ",".join(SHAPES),
        "edge_text": bytes(edge_text),
        "edge_off": np.array(edge_off, dtype=np.int64),
        "edge_special": np.array([p for _, p in EDGE_CASES], dtype=np.uint8),
    }
    for shape in SHAPES:
        tok, d = build(shape)
        hashes, counts = [], []
        for text, ps in segs:
            ids = encode(tok, text, ps)
            hashes.append(fnv64_np(ids))
            counts.append(len(ids))
        eids, eoff = [], [0]
        for text, ps in EDGE_CASES:
            eids += encode(tok, text, ps)
            eoff.append(len(eids))
        arrays[f"{shape}/seg_hash"] = np.array(hashes, dtype=np.uint64).view(np.int64)
        arrays[f"{shape}/seg_ntok"] = np.array(counts, dtype=np.int32)
        arrays[f"{shape}/edge_ids"] = np.array(eids, dtype=np.int32)
        arrays[f"{shape}/edge_ids_off"] = np.array(eoff, dtype=np.int64)
        j = json.loads(tok.to_str())
        arrays[f"{shape}/normalizer"] = json.dumps(j["normalizer"])
        arrays[f"{shape}/pre_tokenizer"] = json.dumps(j["pre_tokenizer"])
        arrays[f"{shape}/added_tokens"] = json.dumps(j["added_tokens"])
        arrays[f"{shape}/model_flags"] = json.dumps({k: j["model"].get(k) for k in
                                                    ("byte_fallback", "fuse_unk", "ignore_merges", "unk_token")})
        merges = j["model"]["merges"]
        mtext = "\n".join(m if isinstance(m, str) else " ".join(m) for m in merges)
        arrays[f"{shape}/merges_hash"] = np.array([fnv64_bytes(mtext.encode("utf-8"))], dtype=np.uint64).view(np.int64)
        arrays[f"{shape}/n_merges"] = len(merges)
        print(f"[vocab] {shape:13s} {sum(counts):8d} corpus tokens, {len(eids)} edge-case tokens, "
              f"{len(merges)} merges; normalizer {json.dumps(j['normalizer'])[:80]} "
              f"pre {json.dumps(j['pre_tokenizer'])[:100]}")
        if shape == "qwen2":
            arch, dd, _ = gguf_dict("qwen2")
            alt, _ = gm.convert_gguf_tokenizer(arch, dd)
            differ = sum(encode(alt, t, p) != encode(tok, t, p) for t, p in segs + EDGE_CASES)
            print(f"[vocab]   transformers' GGUF loader (no NFC) differs on {differ} segments/edge cases")
    write_qref(OUT, arrays)
    print(f"[vocab] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
