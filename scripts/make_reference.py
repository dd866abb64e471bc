#!/usr/bin/env python3
"""Write the reference fixtures (tests/fixtures/ref_*.qref.gz) that tests/test_reference*.c
compare qlora against: outputs of tools nobody on this project wrote — bitsandbytes, Hugging Face
`tokenizers`, transformers, PEFT and PyTorch. `make test` reads only the committed fixtures; no
Python runs at test time.

Regenerate (from the repo root; needs the model, `make model`; about 6 minutes on 2 cores):

    make reference-fixtures                      # all five fixtures
    make reference-fixtures REF_ARGS='--only nf4,tiny' REF_VENV=/path/to/venv
    # = python3 -m venv $REF_VENV && $REF_VENV/bin/pip install -r scripts/requirements-reference.txt
    #   (skipped when $REF_VENV/bin/python exists; default /tmp/qlora-venv-ref), then
    #   $REF_VENV/bin/python scripts/make_reference.py $REF_ARGS
The output is deterministic: regenerating with the pinned versions reproduces the committed files
byte for byte (gzip written with mtime 0).

Versions the committed fixtures were written with: scripts/requirements-reference.txt (pinned from
the venv's `pip freeze`), Python 3.11.7, CPU only (torch's CPU wheel behaviour; bitsandbytes' CPU
backend). Every fixture also records the versions it was written with (array "versions").

Fixtures (each a gzip'd list of named arrays; format in tests/ref_fixture.h):

  ref_nf4.qref.gz        bitsandbytes.functional.quantize_4bit(quant_type="nf4", blocksize=64,
                         compress_statistics=True/False) on CPU: packed bytes, absmax, the double-
                         quant state (8-bit absmax codes, nested absmax, offset, code map) and
                         dequantize_4bit output (fp32 and bf16), for adversarial tensors.
  ref_tokenizer.qref.gz  >= 1 MB corpus in segments (prose, C and Python code, numbers, whitespace
                         runs, emoji, non-Latin scripts, special tokens), and HF `tokenizers`' ids
                         per segment.
  ref_chat.qref.gz       transformers' apply_chat_template (the GGUF's Jinja template) rendered
                         strings and ids for several conversations, and add_generation_prompt=True
                         prompts of one user turn (with / without / empty system turn).
  ref_tiny.qref.gz       a tiny random LlamaForCausalLM + PEFT LoRA (r=4, all 7 linears): weights,
                         batch, logits, loss, every LoRA gradient (also with gradient checkpointing),
                         10 AdamW steps (losses + final adapter), fp32; and the same forward/grads
                         under torch.autocast(bfloat16) as a yardstick for bf16 error.
  ref_real.qref.gz       SmolLM2-135M-Instruct from the GGUF in transformers: logits on a fixed batch
                         (log-sum-exp, top-k and a fixed vocab subset per position) for fp32 as
                         loaded, fp32 with bf16-rounded matrices, all-bf16 (the yardstick), and
                         bitsandbytes NF4 (compute bf16 and fp32; the model is saved as an HF
                         checkpoint first, since transformers does not quantize while loading a
                         GGUF).

The tokenizer corpus is built once from files on a Debian machine (man pages from
datasets/manpages, /usr/include headers, Python's stdlib, /usr/share/common-licenses, gettext
catalogs in /usr/share/locale) plus generated text, and is then reused from the committed fixture
(pass --new-corpus to rebuild it), so regenerating the ids never depends on what the machine has.
"""
import argparse
import gzip
import json
import os
import random
import struct
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
MODEL = os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf")

# ----------------------------------------------------------------------------- container

DT = {np.dtype(np.float32): 0, np.dtype(np.int32): 1, np.dtype(np.uint8): 2, np.dtype(np.uint16): 3,
      np.dtype(np.int64): 4, np.dtype(np.float64): 5}


def write_qref(path, arrays):
    """arrays: dict name -> numpy array (or str / bytes -> u8, float -> f64 scalar, int -> i64)."""
    out = bytearray(b"QLREF001")
    out += struct.pack("<I", len(arrays))
    for name, a in arrays.items():
        if isinstance(a, str):
            a = np.frombuffer(a.encode("utf-8"), dtype=np.uint8)
        elif isinstance(a, (bytes, bytearray)):
            a = np.frombuffer(bytes(a), dtype=np.uint8)
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
        for s in a.shape:
            out += struct.pack("<Q", s)
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        out += struct.pack("<Q", len(data)) + data
    with gzip.GzipFile(path, "wb", compresslevel=9, mtime=0) as f:
        f.write(bytes(out))
    print(f"[ref] wrote {os.path.relpath(path, ROOT)}: {len(arrays)} arrays, {len(out)} bytes raw, "
          f"{os.path.getsize(path)} bytes gzip")


def read_qref(path):
    with gzip.open(path, "rb") as f:
        buf = f.read()
    assert buf[:8] == b"QLREF001"
    (n,) = struct.unpack_from("<I", buf, 8)
    pos, res = 12, {}
    inv = {v: k for k, v in DT.items()}
    for _ in range(n):
        (nl,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        name = buf[pos:pos + nl].decode()
        pos += nl
        dt, nd = struct.unpack_from("<II", buf, pos)
        pos += 8
        shape = struct.unpack_from("<" + "Q" * nd, buf, pos)
        pos += 8 * nd
        (nbytes,) = struct.unpack_from("<Q", buf, pos)
        pos += 8
        res[name] = np.frombuffer(buf[pos:pos + nbytes], dtype=inv[dt]).reshape(shape)
        pos += nbytes
    return res


def versions():
    import importlib.metadata as md
    names = ["torch", "transformers", "peft", "bitsandbytes", "tokenizers", "safetensors", "gguf", "numpy"]
    vs = {}
    for n in names:
        try:
            vs[n] = md.version(n)
        except md.PackageNotFoundError:
            vs[n] = "absent"
    vs["python"] = sys.version.split()[0]
    return json.dumps(vs, sort_keys=True)


# ----------------------------------------------------------------------------- GGUF tokenizer


def bytes_to_unicode():
    """GPT-2 encoder.py's byte alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def gguf_tokenizer_parts(path):
    from gguf import GGUFReader
    r = GGUFReader(path)

    def fstr(key):
        f = r.fields[key]
        return bytes(f.parts[f.data[0]]).decode("utf-8")

    def farr_str(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def farr_int(key):
        f = r.fields[key]
        return [int(f.parts[i][0]) for i in f.data]

    assert fstr("tokenizer.ggml.model") == "gpt2"
    assert fstr("tokenizer.ggml.pre") == "smollm"
    tokens = farr_str("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in farr_str("tokenizer.ggml.merges")]
    types = farr_int("tokenizer.ggml.token_type")
    return tokens, merges, types, fstr("tokenizer.chat_template")


def hf_tokenizer(path):
    """SmolLM2's tokenizer.json pipeline rebuilt from the GGUF (as scripts/make_tokenizer_fixtures.py):
    BPE(vocab, merges), pre-tokenizer Sequence[Digits(individual_digits=True),
    ByteLevel(add_prefix_space=False, use_regex=True)], ByteLevel decoder, control tokens special."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    tokens, merges, types, tmpl = gguf_tokenizer_parts(path)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])
    return tok, tokens, types, tmpl


# ----------------------------------------------------------------------------- tokenizer corpus

KINDS = ["prose", "manpage", "c_code", "python_code", "numbers", "whitespace", "emoji", "non_latin",
         "mixed_special", "chatml"]


def _chunks(text, rng, lo=2000, hi=7000):
    """Cut text at line boundaries into pieces of lo..hi characters."""
    out, pos = [], 0
    while pos < len(text):
        want = rng.randint(lo, hi)
        end = text.find("\n", pos + want)
        end = len(text) if end < 0 else end + 1
        out.append(text[pos:end])
        pos = end
    return [c for c in out if c.strip()]


def _read(path):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def corpus_prose(rng):
    segs = []
    lic = "/usr/share/common-licenses"
    for name in ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1", "Artistic", "GFDL-1.3", "CC0-1.0"]:
        p = os.path.join(lic, name)
        if os.path.exists(p):
            segs += _chunks(_read(p), rng)
    return segs


def corpus_manpages(rng, budget):
    segs, total = [], 0
    p = os.path.join(ROOT, "datasets", "manpages", "heldout.jsonl")
    for line in open(p, encoding="utf-8"):
        for c in _chunks(json.loads(line)["text"], rng):
            segs.append(c)
            total += len(c)
        if total > budget:
            break
    return segs


def corpus_c(rng, budget):
    names = ["stdio.h", "stdlib.h", "string.h", "zlib.h", "cjson/cJSON.h", "yaml.h", "pcre2.h", "math.h",
             "pthread.h", "unistd.h", "elf.h", "png.h", "cmocka.h", "dnnl.h", "fenv.h", "regex.h"]
    segs, total = [], 0
    for n in names:
        p = os.path.join("/usr/include", n)
        if not os.path.exists(p):
            continue
        for c in _chunks(_read(p), rng):
            segs.append(c)
            total += len(c)
        if total > budget:
            break
    return segs


def corpus_python(rng, budget):
    import textwrap, json.decoder, argparse as ap, difflib, fractions, heapq  # noqa: E401
    segs, total = [], 0
    for mod in [textwrap, json.decoder, difflib, fractions, heapq, ap]:
        for c in _chunks(_read(mod.__file__), rng):
            segs.append(c)
            total += len(c)
        if total > budget:
            break
    return segs


def corpus_numbers(rng, n_segs):
    digit_sets = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯", "０１２３４５６７８９",
                  "⁰¹²³⁴⁵⁶⁷⁸⁹", "₀₁₂₃₄₅₆₇₈₉", "๐๑๒๓๔๕๖๗๘๙"]
    segs = []
    for _ in range(n_segs):
        lines = []
        for _ in range(rng.randint(40, 120)):
            k = rng.randint(0, 11)
            if k == 0:
                lines.append(f"{rng.randint(-10**12, 10**12):,}")
            elif k == 1:
                lines.append(repr(rng.uniform(-1e6, 1e6)))
            elif k == 2:
                lines.append(f"{rng.random():.{rng.randint(1, 17)}e}")
            elif k == 3:
                lines.append(f"0x{rng.getrandbits(64):016x}ULL, 0b{rng.getrandbits(12):b}, 0o{rng.getrandbits(9):o}")
            elif k == 4:
                lines.append(f"{rng.randint(1970, 2099)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}T"
                             f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}Z")
            elif k == 5:
                lines.append(f"+1 ({rng.randint(200, 999)}) {rng.randint(200, 999)}-{rng.randint(0, 9999):04d}")
            elif k == 6:
                ds = rng.choice(digit_sets)
                lines.append("".join(rng.choice(ds) for _ in range(rng.randint(1, 20))))
            elif k == 7:
                lines.append(" ".join(str(rng.randint(0, 999)) for _ in range(rng.randint(2, 12))))
            elif k == 8:
                lines.append(f"v{rng.randint(0, 9)}.{rng.randint(0, 99)}.{rng.randint(0, 999)}-rc{rng.randint(1, 9)}")
            elif k == 9:
                lines.append(f"| {rng.randint(0, 99999):>7} | {rng.uniform(0, 100):8.3f}% | ${rng.uniform(0, 1e5):,.2f} |")
            elif k == 10:
                lines.append(str(rng.getrandbits(rng.randint(64, 400))))
            else:
                lines.append(f"½ ¾ ⅞ {rng.randint(1, 9)}² x³ Ⅻ ⑤ 1st 2nd 3rd {rng.randint(4, 99)}th")
        segs.append("\n".join(lines) + "\n")
    return segs


def corpus_whitespace(rng, n_segs):
    ws = [" ", "  ", "   ", "    ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", "\u00a0", "\u3000", "\u2003",
          "\u200b", "\u0085", "\u2028", "\x0b", "\x0c", " \n", "\n ", " \t \n", "        "]
    words = ["a", "the", "x", "int", "foo();", "{", "}", "--", "#", "word", "WORD", "Ünïcode", "日本", "42"]
    segs = []
    for _ in range(n_segs):
        parts = []
        for _ in range(rng.randint(200, 600)):
            if rng.random() < 0.5:
                parts.append(rng.choice(ws) * rng.randint(1, 6))
            else:
                parts.append(rng.choice(words))
        segs.append("".join(parts))
    return segs


def corpus_emoji(rng, n_segs):
    base = [chr(c) for c in list(range(0x1F600, 0x1F650)) + list(range(0x1F300, 0x1F380)) +
            list(range(0x1F680, 0x1F6C0)) + list(range(0x1F900, 0x1F950))]
    tones = [chr(c) for c in range(0x1F3FB, 0x1F400)]
    people = ["\U0001F468", "\U0001F469", "\U0001F467", "\U0001F466"]
    flags = ["\U0001F1FA\U0001F1F8", "\U0001F1EF\U0001F1F5", "\U0001F1E9\U0001F1EA", "\U0001F1E7\U0001F1F7",
             "\U0001F1EE\U0001F1F3", "\U0001F3F4\U000E0067\U000E0062\U000E0073\U000E0063\U000E0074\U000E007F"]
    misc = ["\u2764\ufe0f", "\u263a\ufe0e", "1\ufe0f\u20e3", "#\ufe0f\u20e3", "\u2705", "\u2728", "\u00a9", "\u2122"]
    words = ["great", "ok", "lol", "wow", "see you", "!!!", "...", "good morning", "ship it"]
    segs = []
    for _ in range(n_segs):
        parts = []
        for _ in range(rng.randint(150, 400)):
            k = rng.randint(0, 6)
            if k == 0:
                parts.append(rng.choice(base))
            elif k == 1:
                parts.append(rng.choice(base[:80]) + rng.choice(tones))
            elif k == 2:
                parts.append("\u200d".join(rng.choice(people) for _ in range(rng.randint(2, 4))))
            elif k == 3:
                parts.append(rng.choice(flags))
            elif k == 4:
                parts.append(rng.choice(misc))
            elif k == 5:
                parts.append(" " + rng.choice(words) + " ")
            else:
                parts.append(rng.choice(["\n", " ", "", "  "]))
        segs.append("".join(parts))
    return segs


def corpus_non_latin(rng, budget):
    import gettext
    langs = ["ja", "zh_CN", "zh_TW", "ko", "ru", "uk", "el", "ka", "he", "ar", "hi", "th", "fa", "bn", "ta",
             "am", "hy", "vi", "tr", "pl", "cs", "de", "fr", "sr", "bg", "be", "km", "my", "si", "ml", "te",
             "gu", "pa", "mr", "ne", "lo", "ur", "kk", "mn"]
    segs, total = [], 0
    per_lang = budget // len(langs) + 1
    for lang in langs:
        d = os.path.join("/usr/share/locale", lang, "LC_MESSAGES")
        if not os.path.isdir(d):
            continue
        texts = []
        for fn in sorted(os.listdir(d)):
            if not fn.endswith(".mo"):
                continue
            try:
                with open(os.path.join(d, fn), "rb") as f:
                    cat = gettext.GNUTranslations(f)._catalog
            except Exception:  # noqa: BLE001 - a broken catalog is just skipped
                continue
            for k, v in cat.items():
                if k and isinstance(v, str) and v.strip() and v != k:
                    texts.append(v)
        texts = sorted(set(texts))
        rng.shuffle(texts)
        got, cur = 0, []
        for t in texts:
            cur.append(t)
            got += len(t)
            if sum(len(c) for c in cur) > rng.randint(1500, 5000):
                segs.append("\n".join(cur) + "\n")
                cur = []
            if got > per_lang:
                break
        if cur:
            segs.append("\n".join(cur) + "\n")
        total += got
    return segs


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>",
            "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
            "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]


def sprinkle_specials(rng, text, specials):
    """Insert special tokens (and near-misses) at random places, also mid-word."""
    out, pos = [], 0
    cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(3, 15)))
    for c in cuts:
        out.append(text[pos:c])
        s = rng.choice(specials)
        r = rng.random()
        if r < 0.15:
            s = s[:-1]  # near-miss: "<|im_end|"
        elif r < 0.25:
            s = " " + s + " "
        out.append(s)
        pos = c
    out.append(text[pos:])
    return "".join(out)


def corpus_chatml(rng, n_segs, pool):
    segs = []
    for _ in range(n_segs):
        turns = []
        if rng.random() < 0.5:
            turns.append(("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"))
        for _ in range(rng.randint(1, 6)):
            turns.append((rng.choice(["user", "assistant"]), rng.choice(pool)[:rng.randint(20, 600)]))
        segs.append("".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns))
    return segs


def build_corpus(seed=20251122):
    rng = random.Random(seed)
    segs = []  # (kind, text, parse_special)

    def add(kind, texts):
        for t in texts:
            segs.append((kind, t, 1))

    add("prose", corpus_prose(rng))
    add("manpage", corpus_manpages(rng, 200_000))
    add("c_code", corpus_c(rng, 220_000))
    add("python_code", corpus_python(rng, 110_000))
    add("numbers", corpus_numbers(rng, 25))
    add("whitespace", corpus_whitespace(rng, 25))
    add("emoji", corpus_emoji(rng, 25))
    add("non_latin", corpus_non_latin(rng, 160_000))
    pool = [t for k, t, _ in segs]
    mixed = [sprinkle_specials(rng, rng.choice(pool)[:rng.randint(200, 3000)], SPECIALS) for _ in range(40)]
    for i, t in enumerate(mixed):
        segs.append(("mixed_special", t, 1 if i % 4 else 0))  # every 4th: specials as plain text
    for i, t in enumerate(corpus_chatml(rng, 30, pool)):
        segs.append(("chatml", t, 1 if i % 5 else 0))
    rng.shuffle(segs)
    return segs


def make_tokenizer(args):
    tok, tokens, types, _ = hf_tokenizer(MODEL)
    path = os.path.join(FIX, "ref_tokenizer.qref.gz")
    if os.path.exists(path) and not args.new_corpus:
        old = read_qref(path)
        corpus = old["corpus"].tobytes()
        off = old["seg_off"]
        kinds = old["kinds"].tobytes().decode().split(",")
        segs = [(kinds[int(k)], corpus[off[i]:off[i + 1]].decode("utf-8"), int(p))
                for i, (k, p) in enumerate(zip(old["seg_kind"], old["seg_special"]))]
        print(f"[ref] tokenizer: reusing the committed corpus ({len(corpus)} bytes, {len(segs)} segments)")
    else:
        segs = build_corpus()
    corpus = bytearray()
    seg_off, ids_off, all_ids, seg_kind, seg_special = [0], [0], [], [], []
    for kind, text, ps in segs:
        tok.encode_special_tokens = not ps
        ids = tok.encode(text, add_special_tokens=False).ids
        corpus += text.encode("utf-8")
        seg_off.append(len(corpus))
        all_ids += ids
        ids_off.append(len(all_ids))
        seg_kind.append(KINDS.index(kind))
        seg_special.append(ps)
    assert max(all_ids) < 65536
    by_kind = {}
    for (kind, text, _), a, b in zip(segs, ids_off[:-1], ids_off[1:]):
        kb = by_kind.setdefault(kind, [0, 0, 0])
        kb[0] += 1
        kb[1] += len(text.encode("utf-8"))
        kb[2] += b - a
    for k, (n, nb, nt) in sorted(by_kind.items()):
        print(f"[ref]   {k:14s} {n:4d} segments {nb:8d} bytes {nt:7d} tokens")
    print(f"[ref] tokenizer corpus: {len(corpus)} bytes, {len(segs)} segments, {len(all_ids)} tokens")
    assert len(corpus) >= 1_000_000, "the corpus must be at least 1 MB"
    write_qref(path, {
        "versions": versions(),
        "oracle": "tokenizers BPE(vocab, merges from the GGUF) + Sequence[Digits(individual_digits=True), "
                  "ByteLevel(add_prefix_space=False)], control tokens special; parse_special=0 segments use "
                  "encode_special_tokens=True",
        "kinds": ",".join(KINDS),
        "corpus": bytes(corpus),
        "seg_off": np.array(seg_off, dtype=np.int64),
        "seg_kind": np.array(seg_kind, dtype=np.uint8),
        "seg_special": np.array(seg_special, dtype=np.uint8),
        "ids": np.array(all_ids, dtype=np.uint16),
        "ids_off": np.array(ids_off, dtype=np.int64),
    })


# ----------------------------------------------------------------------------- chat template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2 + 2 = 4."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Summarise ls(1) in one line."},
     {"role": "assistant", "content": "ls lists directory contents."}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}, {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "  leading and trailing spaces  \n\n"},
     {"role": "assistant", "content": "\tTabbed\r\nCRLF line\n"},
     {"role": "user", "content": "Multi\n\nparagraph\n\n\n"},
     {"role": "assistant", "content": "Sure."}],
    [{"role": "user", "content": "Écris « bonjour » en 日本語 и по-русски 😀👍🏽"},
     {"role": "assistant", "content": "こんにちは — Привет — مرحبا — שלום — 🇯🇵"}],
    [{"role": "user", "content": "A literal <|im_end|> and <|im_start|>assistant inside the text"},
     {"role": "assistant", "content": "and <|endoftext|> here"}],
    [{"role": "system", "content": "System prompt\nwith lines"},
     {"role": "user", "content": "int main(void) {\n    return 0;\n}\n"},
     {"role": "assistant", "content": "```c\n#include <stdio.h>\nint main(void) { puts(\"hi\"); }\n```"},
     {"role": "user", "content": "Numbers 1234567890 3.14159 -2e-10"},
     {"role": "assistant", "content": "OK: 1234567890."}],
    [{"role": "user", "content": "x"}, {"role": "tool", "content": "{\"result\": 42}"},
     {"role": "assistant", "content": "The tool said 42."}],
    [{"role": "assistant", "content": "An assistant turn first."}, {"role": "user", "content": "then a user"}],
]


# (system or None for the template's default, user): one user turn with add_generation_prompt=True, as
# data/chat.h chat_render_prompt renders it for generation
GEN_PROMPTS = [(None, "Hello!"), ("You are a terse assistant.", "Summarise ls(1) in one line."),
               ("", "x"), (None, "Écris « bonjour » en 日本語 😀\n\nthen\tstop  "),
               ("Line one\nline two", "<|im_end|> literal")]


def make_chat(args):
    from transformers import PreTrainedTokenizerFast
    tok, tokens, types, tmpl = hf_tokenizer(MODEL)
    tok.encode_special_tokens = False
    hft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>", unk_token=None)
    hft.chat_template = tmpl
    rendered, ids, offs, gen = [], [], [0], []
    for conv in CONVERSATIONS:
        s = hft.apply_chat_template(conv, tokenize=False, add_generation_prompt=False)
        t = hft.apply_chat_template(conv, tokenize=True, add_generation_prompt=False, return_dict=False)
        if isinstance(t, dict) or hasattr(t, "keys"):
            t = t["input_ids"]
        assert t == tok.encode(s, add_special_tokens=False).ids, "apply_chat_template ids != encode(rendered)"
        rendered.append(s)
        ids += t
        offs.append(len(ids))
        gen.append(hft.apply_chat_template(conv, tokenize=False, add_generation_prompt=True))
    gen_prompts, gen_ids, gen_off = [], [], [0]
    for system, user in GEN_PROMPTS:
        conv = ([] if system is None else [{"role": "system", "content": system}]) + \
            [{"role": "user", "content": user}]
        s = hft.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        gen_prompts.append({"system": system, "user": user, "rendered": s})
        gen_ids += tok.encode(s, add_special_tokens=False).ids
        gen_off.append(len(gen_ids))
    write_qref(os.path.join(FIX, "ref_chat.qref.gz"), {
        "gen_prompts": json.dumps(gen_prompts, ensure_ascii=False),
        "gen_ids": np.array(gen_ids, dtype=np.int32),
        "gen_ids_off": np.array(gen_off, dtype=np.int64),
        "versions": versions(),
        "chat_template": tmpl,
        "conversations": json.dumps(CONVERSATIONS, ensure_ascii=False),
        "rendered": json.dumps(rendered, ensure_ascii=False),
        "rendered_gen": json.dumps(gen, ensure_ascii=False),
        "ids": np.array(ids, dtype=np.int32),
        "ids_off": np.array(offs, dtype=np.int64),
    })


# ----------------------------------------------------------------------------- NF4 (bitsandbytes)

NF4_CODE = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0]


def nf4_generated(nblocks):
    """The large generated case, computed identically in tests/test_reference_nf4.c (integers and
    powers of two only, so every value is exact): element i of block b is
    ((h(i) >> 8) & 0xffff) - 32768, times 2^-15, times 2^-(b % 23), h(i) = (i * 2654435761) mod 2^32."""
    i = np.arange(nblocks * 64, dtype=np.uint64)
    h = (i * np.uint64(2654435761)) & np.uint64(0xffffffff)
    v = ((h >> np.uint64(8)) & np.uint64(0xffff)).astype(np.int64) - 32768
    b = (i // np.uint64(64)).astype(np.int64)
    return (v.astype(np.float64) * np.ldexp(1.0, -15) * np.ldexp(1.0, -(b % 23))).astype(np.float32)


def crc32(data):
    import zlib
    return np.array([zlib.crc32(data)], dtype=np.int64)


def nf4_cases():
    rng = np.random.default_rng(1234)
    f32 = np.float32
    code = np.array(NF4_CODE, dtype=f32)
    # bitsandbytes' own fp32 bounds ((c_k + c_{k+1}) / 2 in fp32) and the exact midpoints
    mids32 = ((code[:-1] + code[1:]) / f32(2)).astype(f32)
    cases = {}
    cases["randn"] = (rng.standard_normal((70, 257)) * 0.05).astype(f32)  # 282 blocks (2 nested groups), partial last
    cases["odd_small"] = rng.standard_normal((7, 9)).astype(f32)  # 63 elements: one partial block, odd count
    cases["odd_129"] = rng.standard_normal((1, 129)).astype(f32)  # 2 full blocks + 1 element
    cases["one_element"] = np.array([[-0.75]], dtype=f32)
    z = rng.standard_normal((1, 64 * 10 + 10)).astype(f32)
    for b in (0, 3, 9):
        z[0, b * 64:(b + 1) * 64] = 0
    z[0, 640:] = 0  # the partial last block is all zero too
    cases["zero_blocks"] = z
    cases["all_zero"] = np.zeros((3, 64), dtype=f32)
    cases["all_zero_odd"] = np.zeros((1, 77), dtype=f32)
    cases["constant"] = np.full((4, 128), 0.125, dtype=f32)  # equal scales: nested deviations all 0
    cases["single_block"] = rng.standard_normal((1, 64)).astype(f32)
    # values on and around the code midpoints: per block, element 0 fixes absmax = s, the rest are
    # s * (fp32 midpoint, its neighbours, the exact (double) midpoint rounded both ways, the codes)
    vals = []
    for k in range(15):
        m = mids32[k]
        exact = (float(code[k]) + float(code[k + 1])) / 2
        vals += [m, np.nextafter(m, f32(-2)), np.nextafter(m, f32(2)),
                 np.float32(exact), np.nextafter(np.float32(exact), f32(-2)), np.nextafter(np.float32(exact), f32(2))]
    vals += list(code) + [-m for m in mids32]
    vals = np.array(vals, dtype=f32)
    blocks = []
    for s in [1.0, 2.0, 0.5, 2.0 ** -20, 2.0 ** 20, 0.3, 0.7, 1.7, 3e-5, 123.456]:
        for start in range(0, len(vals), 63):
            chunk = vals[start:start + 63]
            blk = np.zeros(64, dtype=f32)
            blk[0] = f32(s)
            blk[1:1 + len(chunk)] = (chunk.astype(np.float64) * s).astype(f32)
            blocks.append(blk)
    cases["midpoints"] = np.stack(blocks).reshape(-1, 64)
    # tiny and huge magnitudes: subnormals (absmax below bnb's 1e-38 clamp), FLT_MAX neighbours,
    # blocks mixing 1e-30 with 1e30 (the small ones go to 0)
    t = rng.standard_normal((12, 64)).astype(np.float64)
    scales = [1e-30, 1e-37, 2e-38, 1e-38, 5e-39, 1e-40, 1e-44, 1.4e-45, 1e30, 1e38, 3.4e38, 1.0]
    tiny = np.stack([(t[i] / np.abs(t[i]).max() * s) for i, s in enumerate(scales)]).astype(f32)
    tiny[11, ::2] = f32(1e-30)
    tiny[11, 1] = f32(1e30)
    tiny[10, 5] = np.finfo(f32).max
    cases["tiny_huge"] = tiny
    # block scales spanning 12 decades (stress the 8-bit double quantization)
    w = rng.standard_normal((300, 64)) * (10.0 ** rng.uniform(-9, 3, size=(300, 1)))
    cases["wide_scales"] = w.astype(f32)
    # a bf16 source (HF checkpoints): quantize_4bit promotes to fp32
    cases["bf16_source"] = (rng.standard_normal((33, 65)) * 0.02).astype(f32)
    return cases


def make_nf4(args):
    import torch
    import bitsandbytes.functional as bnbF
    # One torch thread: torch's float32 mean (the double-quant offset) splits its sum across
    # threads above 32768 elements, so bnb's offset for > 32768 blocks depends on the thread
    # count; qlora reproduces the 1-thread order (quant/nf4.c). The 2-thread result of the large
    # case is stored too (generated_2threads) so the test can show how far it is.
    torch.set_num_threads(1)
    out = {"versions": versions(), "torch_threads": 1,
           "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    cases = nf4_cases()
    names = []

    def bf16_bits(t):
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)

    def run(name, A, keep_input=True):
        names.append(name)
        out[f"{name}.shape"] = np.array(list(A.shape) if A.dim() == 2 else [1, A.numel()], dtype=np.int64)
        if keep_input:
            if A.dtype == torch.bfloat16:
                out[f"{name}.w_bf16"] = bf16_bits(A)
            else:
                out[f"{name}.w"] = A.numpy()
        res = {}
        for dq in (0, 1):
            p = f"{name}.{'dq' if dq else 'nodq'}"
            q, st = bnbF.quantize_4bit(A, blocksize=64, compress_statistics=bool(dq), quant_type="nf4")
            res[dq] = (q, st)
            packed = q.view(torch.uint8).reshape(-1).numpy()
            if keep_input:
                out[f"{p}.packed"] = packed
            else:
                out[f"{p}.packed_crc32"] = crc32(packed.tobytes())
                out[f"{p}.packed_len"] = np.array([packed.size], dtype=np.int64)
            if dq:
                assert st.nested and st.state2.blocksize == 256
                out[f"{p}.absmax_q"] = st.absmax.numpy()
                out[f"{p}.nested_absmax"] = st.state2.absmax.numpy()
                out[f"{p}.offset"] = np.array([st.offset.item()], dtype=np.float32)
                out[f"{p}.code"] = st.state2.code.numpy()
            else:
                out[f"{p}.absmax"] = st.absmax.numpy()
            for dt, key in ((torch.float32, "deq_f32"), (torch.bfloat16, "deq_bf16")):
                st.dtype = dt
                d = bnbF.dequantize_4bit(q, st).reshape(-1)
                if keep_input:
                    out[f"{p}.{key}"] = bf16_bits(d) if dt == torch.bfloat16 else d.numpy()
                else:
                    b = (bf16_bits(d) if dt == torch.bfloat16 else d.numpy()).tobytes()
                    out[f"{p}.{key}_crc32"] = crc32(b)

    for name, w in cases.items():
        A = torch.from_numpy(w.copy())
        if name == "bf16_source":
            A = A.to(torch.bfloat16)
        run(name, A)
    # 40000 blocks (2.56 M elements, > 32768 blocks: torch's mean over the absmax vector then
    # takes its multi-level cascade); only hashes of the large outputs are stored.
    nb = 40000
    A = torch.from_numpy(nf4_generated(nb)).reshape(nb, 64)
    run("generated", A, keep_input=False)
    torch.set_num_threads(2)
    _, st2 = bnbF.quantize_4bit(A, blocksize=64, compress_statistics=True, quant_type="nf4")
    out["generated_2threads.dq.offset"] = np.array([st2.offset.item()], dtype=np.float32)
    torch.set_num_threads(1)
    out["cases"] = ",".join(names)
    write_qref(os.path.join(FIX, "ref_nf4.qref.gz"), out)


# ----------------------------------------------------------------------------- tiny Llama + PEFT LoRA

LINEARS = [("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
           ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj")]  # qlora's LLAMA_Q .. LLAMA_DOWN order
TINY = dict(vocab=96, d=64, ff=128, layers=2, heads=4, kv_heads=2, head_dim=16, eps=1e-6, theta=500.0,
            r=4, alpha=8.0, B=2, T=16, lr=1e-2, wd=0.01, betas=(0.9, 0.999), adam_eps=1e-8, max_norm=1.0,
            steps=10)


def make_tiny(args, mts=False):
    """The tiny Llama case; mts: the same with PEFT modules_to_save=["embed_tokens", "lm_head"] on the tied
    model (ensure_weight_tying left at its default False: two independent trainable copies), whose gradients
    and AdamW updates follow the LoRA ones in the flat order (qlora's lora_set: the copies after the layers),
    written to ref_tiny_mts.qref.gz."""
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
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # weights with some spread, norms away from 1, so every parameter matters
        model.model.embed_tokens.weight.copy_(torch.randn(c["vocab"], c["d"], generator=g) * 0.2)
        for layer in model.model.layers:
            for mod, name in LINEARS:
                w = getattr(getattr(layer, mod), name).weight
                w.copy_(torch.randn(w.shape, generator=g) * (0.8 / w.shape[1] ** 0.5))
            layer.input_layernorm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
            layer.post_attention_layernorm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
        model.model.norm.weight.copy_(1 + 0.2 * torch.randn(c["d"], generator=g))
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "not tied"
    base = {"embed": model.model.embed_tokens.weight.detach().clone(), "norm": model.model.norm.weight.detach().clone()}
    for l, layer in enumerate(model.model.layers):
        base[f"l{l}.attn_norm"] = layer.input_layernorm.weight.detach().clone()
        base[f"l{l}.ffn_norm"] = layer.post_attention_layernorm.weight.detach().clone()
        for mod, name in LINEARS:
            base[f"l{l}.{name}"] = getattr(getattr(layer, mod), name).weight.detach().clone()

    lcfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=[n for _, n in LINEARS], init_lora_weights=True,
                      modules_to_save=["embed_tokens", "lm_head"] if mts else None)
    if mts:
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pm = get_peft_model(model, lcfg)
        tie_warn = [str(w.message) for w in caught if "ensure_weight_tying" in str(w.message)]
        print(f"[ref] tiny_mts: PEFT's tied-embedding warning: {tie_warn[0][:120] if tie_warn else '(none)'}")
    else:
        pm = get_peft_model(model, lcfg)
    lora = []  # (name, param) in qlora's flat order: per layer, per module: A then B
    for l, layer in enumerate(pm.base_model.model.model.layers):
        for mod, name in LINEARS:
            lin = getattr(getattr(layer, mod), name)
            A, Bm = lin.lora_A["default"].weight, lin.lora_B["default"].weight
            with torch.no_grad():  # A as PEFT's kaiming init draws it; B non-zero so every grad is informative
                Bm.copy_(torch.randn(Bm.shape, generator=g) * 0.1)
            assert lin.scaling["default"] == c["alpha"] / c["r"]
            lora += [(f"l{l}.{name}.A", A), (f"l{l}.{name}.B", Bm)]
    if mts:  # the copies, after every layer's adapters (qlora's flat order)
        emb_copy = pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight
        head_copy = pm.base_model.model.lm_head.modules_to_save["default"].weight
        assert emb_copy.data_ptr() != head_copy.data_ptr(), "copies tied"
        assert emb_copy.dtype == torch.float32 and torch.equal(emb_copy, base["embed"])
        lora += [("embed_tokens", emb_copy), ("lm_head", head_copy)]
        from peft import get_peft_model_state_dict
        keys = sorted(k for k in get_peft_model_state_dict(pm) if "lora_" not in k)
        print(f"[ref] tiny_mts: saved module keys {keys}")
        assert keys == ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"], keys
    params = [p for _, p in lora]
    n_trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert n_trainable == sum(p.numel() for p in params), "unexpected trainable parameters"
    p0 = torch.cat([p.detach().reshape(-1) for p in params]).clone()

    B, T = c["B"], c["T"]
    ids = torch.randint(0, c["vocab"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100                      # a masked prompt
    labels[1, torch.tensor([3, 8, 9])] = -100  # scattered ignored labels
    pos = torch.stack([torch.arange(T), torch.arange(T) + 5])  # row 1 starts at position 5
    n_tok = int((labels[:, 1:] != -100).sum())

    def fwd(autocast=False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return pm(input_ids=ids, position_ids=pos, labels=labels)

    def grads():
        return torch.cat([p.grad.detach().reshape(-1).float() for p in params])

    pm.train()  # dropout is 0; train mode only so that gradient checkpointing is active below
    for p in params:
        p.grad = None
    out = fwd()
    out.loss.backward()
    g_ref = grads()
    logits = out.logits.detach().float()
    loss = float(out.loss.detach())
    # the same with transformers' gradient checkpointing (the "silently zero grads" trap)
    pm.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.base_model.model.enable_input_require_grads()
    for p in params:
        p.grad = None
    fwd().loss.backward()
    g_ck = grads()
    pm.base_model.model.gradient_checkpointing_disable()
    ck_diff = float((g_ck - g_ref).abs().max() / g_ref.abs().max())
    print(f"[ref] tiny{'_mts' if mts else ''}: loss {loss:.6f} over {n_tok} tokens, |grad| {float(g_ref.norm()):.4f}, "
          f"HF checkpointing vs not: max rel diff {ck_diff:.2e}")
    assert ck_diff < 1e-5 and float(g_ck.abs().max()) > 0
    # bf16 yardstick: torch.autocast(bfloat16) on the same model and batch
    for p in params:
        p.grad = None
    out_bf = fwd(autocast=True)
    out_bf.loss.backward()
    g_bf = grads()
    logits_bf = out_bf.logits.detach().float()

    # 10 AdamW steps (torch.optim.AdamW, CPU single-tensor path) with global-norm clipping
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=c["betas"], eps=c["adam_eps"], weight_decay=c["wd"],
                            foreach=False)
    losses, norms = [], []
    for step in range(c["steps"]):
        opt.zero_grad(set_to_none=True)
        o = fwd()
        o.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, c["max_norm"])))
        losses.append(float(o.loss.detach()))
        opt.step()
    with torch.no_grad():
        losses.append(float(fwd().loss))  # after the last step
    p_final = torch.cat([p.detach().reshape(-1) for p in params])
    print(f"[ref] tiny: AdamW losses {['%.4f' % x for x in losses]}, pre-clip norms "
          f"{['%.3f' % x for x in norms]}")

    o = {"versions": versions(), "config": json.dumps(c), "n_tokens": n_tok}
    for k, v in base.items():
        o[f"w.{k}"] = v.numpy().astype(np.float32)
    o["lora_params"] = p0.numpy().astype(np.float32)
    o["lora_names"] = ",".join(n for n, _ in lora)
    o["input_ids"] = ids.numpy().astype(np.int32)
    o["labels"] = labels.numpy().astype(np.int32)
    o["position_ids"] = pos.numpy().astype(np.int32)
    o["logits"] = logits.numpy()
    o["loss"] = loss
    o["grads"] = g_ref.numpy()
    o["grads_checkpointing_max_rel_diff"] = ck_diff  # HF with vs without checkpointing (asserted < 1e-5 above)
    o["bf16.logits"] = logits_bf.numpy()
    o["bf16.loss"] = float(out_bf.loss.detach())
    o["bf16.grads"] = g_bf.numpy()
    o["adamw.losses"] = np.array(losses, dtype=np.float64)
    o["adamw.grad_norms"] = np.array(norms, dtype=np.float64)
    o["adamw.final_params"] = p_final.numpy().astype(np.float32)
    write_qref(os.path.join(FIX, "ref_tiny_mts.qref.gz" if mts else "ref_tiny.qref.gz"), o)


# ----------------------------------------------------------------------------- model families

# llama.cpp's own converter (convert_hf_to_gguf.py and its conversion/ package and gguf-py) as shipped in
# the llama-cpp-python 0.3.36 sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`,
# then unpack): --llama-cpp points at its vendor/llama.cpp. The GGUF forms of the family fixtures are
# written by it, not by us.
#   sha256 of llama_cpp_python-0.3.36.tar.gz: 832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
#   pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d build/lcp &&
#   tar xzf build/lcp/llama_cpp_python-0.3.36.tar.gz -C build/lcp
LLAMA_CPP_DEFAULT = os.path.join(ROOT, "build", "lcp", "llama_cpp_python-0.3.36", "vendor", "llama.cpp")

# Tiny random models per family. llama3: rope_scaling llama3 with original_max_position_embeddings 128,
# low 1, high 8 and head_dim 16 at theta 500: pair wavelengths 6.3, 13.6 (< 16: unchanged), 29.6, 64.5
# (smoothed), 140 .. 1431 (> 128: divided by 8): all three regimes in rows of 16 tokens. Untied head.
FAMILIES = {
    "llama3": dict(TINY, hf_class="LlamaForCausalLM", tied=False,
                   rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=8.0,
                                     original_max_position_embeddings=128)),
    # Mistral: the Llama block under model_type "mistral"; its sliding_window (4096, as v0.1) is longer than
    # every row here, where it equals full attention
    "mistral": dict(TINY, hf_class="MistralForCausalLM", tied=False, sliding_window=4096),
    # Qwen2 / Qwen2.5: q/k/v biases (drawn at 0.5 so they matter), tied embeddings as the small Qwen2.5s,
    # theta 1e6 as Qwen2.5 (the default RoPE); GGUF arch qwen2: no Q/K permutation
    "qwen2": dict(TINY, hf_class="Qwen2ForCausalLM", tied=True, theta=1000000.0),
    # Phi-3 mini: fused qkv_proj (rows q, k, v) and gate_up_proj (rows gate, up): one LoRA pair each, as PEFT
    # puts it on the fused module; untied; sliding_window 2047 as Phi-3-mini-4k (longer than every row here,
    # so full attention); pad/eos ids inside the tiny vocabulary (Phi3Config's defaults are 32000); head_dim
    # is hidden_size / heads (Phi3Config has no head_dim); GGUF arch phi3: fused attn_qkv, ffn_up = gate|up
    "phi3": dict(TINY, hf_class="Phi3ForCausalLM", tied=False, theta=10000.0, sliding_window=2047,
                 linears=[("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"),
                          ("mlp", "down_proj")]),  # qlora's slots LLAMA_Q, LLAMA_O, LLAMA_GATE, LLAMA_DOWN
    # Gemma 3 text (Gemma3TextConfig, Gemma3ForCausalLM): 6 layers so that the default pattern (5 sliding, then
    # 1 full) has both kinds; sliding_window 4, far shorter than the rows of 16, so the window mask decides;
    # RoPE bases 1e6 (full) and 10000 (sliding, what llama.cpp assumes when the GGUF has no freq_base_swa);
    # query_pre_attn_scalar = head_dim (the 1/sqrt(head_dim) of every size but 27B); tied; QK-norm and the four
    # block norms drawn as k/64 so that both w and the converter's bf16 1 + w are exact in bf16
    "gemma3": dict(TINY, hf_class="Gemma3ForCausalLM", cfg_class="Gemma3TextConfig", tied=True, theta=1000000.0,
                   layers=6, sliding_window=4, theta_local=10000.0),
}


def tiny_tokenizer(vocab_size):
    """A GPT-2-style byte-level BPE over the tiny vocabulary (the first vocab_size - 6 characters of GPT-2's
    byte alphabet, four merges, two special tokens): an HF directory and a GGUF need a tokenizer; the model
    tests never tokenize with it."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    merges = [("t", "h"), ("h", "e"), ("i", "n"), ("e", "r")]
    chars = list(bytes_to_unicode().values())[:vocab_size - 2 - len(merges)]
    vocab = {ch: i for i, ch in enumerate(chars + [a + b for a, b in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken("<|bos|>", special=True, normalized=False),
                            AddedToken("<|eos|>", special=True, normalized=False)])
    assert tok.get_vocab_size() == vocab_size
    return tok


def gguf_convert(llama_cpp, hf_dir, out_path):
    """Run llama.cpp's converter on hf_dir (bf16 output, as `convert_hf_to_gguf.py --outtype bf16`). Only the
    pre-tokenizer name is given ("gpt2": the converter identifies pre-tokenizers by hashing the encoding of a
    test text, and the tiny tokenizer's hash is not registered); the vocabulary, the model tensors, the Q/K
    permutation, rope_freqs and every hyper-parameter key are the converter's own."""
    import importlib
    from pathlib import Path
    if not os.path.isdir(os.path.join(llama_cpp, "conversion")):
        sys.exit(f"{llama_cpp}: llama.cpp's converter not found; unpack the llama-cpp-python 0.3.36 sdist "
                 "(see LLAMA_CPP_DEFAULT in this script) or pass --llama-cpp DIR")
    sys.path.insert(0, llama_cpp)
    sys.path.insert(0, os.path.join(llama_cpp, "gguf-py"))
    for m in [k for k in sys.modules if k == "gguf" or k.startswith("gguf.")]:
        del sys.modules[m]
    gguf = importlib.import_module("gguf")
    conv = importlib.import_module("conversion")
    hparams = conv.ModelBase.load_hparams(Path(hf_dir), False)
    cls = conv.get_model_class(hparams["architectures"][0])

    class TinyVocab(cls):
        model_arch = cls.model_arch

        def get_vocab_base_pre(self, tokenizer):
            return "gpt2"  # the tiny tokenizer is GPT-2's ByteLevel pre-tokenizer; no hash of it is registered

        def set_vocab(self):
            self._set_vocab_gpt2()

    m = TinyVocab(Path(hf_dir), gguf.LlamaFileType.MOSTLY_BF16, Path(out_path))
    m.write()
    sys.path.remove(llama_cpp)
    sys.path.remove(os.path.join(llama_cpp, "gguf-py"))
    import hashlib
    with open(os.path.join(llama_cpp, "conversion", "base.py"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def make_family(name, args):
    """ref_<name>.qref.gz: as ref_tiny (logits, loss, every LoRA gradient, 10 AdamW steps, fp32), for a tiny
    model of one family, plus the model itself as transformers saves it (config.json, model.safetensors in
    bf16) and as llama.cpp's converter writes it (GGUF, bf16). The weights are drawn and then rounded to bf16,
    so the bf16 files hold exactly the weights of the fp32 reference computation."""
    import tempfile
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model
    torch.set_num_threads(1)
    torch.manual_seed(0)
    c = FAMILIES[name]
    linears = c.get("linears", LINEARS)
    kw = dict(vocab_size=c["vocab"], hidden_size=c["d"], intermediate_size=c["ff"],
              num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["kv_heads"],
              head_dim=c["head_dim"], rms_norm_eps=c["eps"], max_position_embeddings=256,
              tie_word_embeddings=c["tied"], attention_dropout=0.0, bos_token_id=c["vocab"] - 2,
              eos_token_id=c["vocab"] - 1)
    if c["hf_class"] == "Phi3ForCausalLM":
        assert c["head_dim"] * c["heads"] == c["d"]
        del kw["head_dim"]
        kw.update(pad_token_id=c["vocab"] - 1, original_max_position_embeddings=256, resid_pdrop=0.0,
                  embd_pdrop=0.0)
    rp = dict(rope_type="default", rope_theta=c["theta"])
    if c.get("sliding_window"):
        kw["sliding_window"] = c["sliding_window"]
    if c.get("rope_scaling"):
        rp = dict(c["rope_scaling"], rope_theta=c["theta"])
    if c["hf_class"] == "Gemma3ForCausalLM":
        rp = {"full_attention": dict(rope_type="default", rope_theta=c["theta"]),
              "sliding_attention": dict(rope_type="default", rope_theta=c["theta_local"])}
        kw.update(query_pre_attn_scalar=c["head_dim"], final_logit_softcapping=None, attn_logit_softcapping=None,
                  hidden_activation="gelu_pytorch_tanh", pad_token_id=c["vocab"] - 1)
    kw["rope_parameters"] = rp
    cfg_cls = getattr(transformers, c.get("cfg_class") or c["hf_class"].replace("ForCausalLM", "Config"))
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    model = getattr(transformers, c["hf_class"])(cfg).float()
    g = torch.Generator().manual_seed(1)

    def bf(t):
        return t.to(torch.bfloat16).float()

    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(bf(torch.randn(c["vocab"], c["d"], generator=g) * 0.2))
        if not c["tied"]:
            model.lm_head.weight.copy_(bf(torch.randn(c["vocab"], c["d"], generator=g) * 0.2))
        for layer in model.model.layers:
            for mod, lin in linears:
                w = getattr(getattr(layer, mod), lin).weight
                w.copy_(bf(torch.randn(w.shape, generator=g) * (0.8 / w.shape[1] ** 0.5)))
                b = getattr(getattr(layer, mod), lin).bias
                if b is not None:
                    b.copy_(bf(0.5 * torch.randn(b.shape, generator=g)))
            if c["hf_class"] == "Gemma3ForCausalLM":  # Gemma3RMSNorm: x·(1 + w), w near 0, w and 1 + w exact in bf16
                for nm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                           "post_feedforward_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
                    w = layer.get_submodule(nm).weight
                    w.copy_(torch.clamp(torch.round(0.2 * torch.randn(w.shape, generator=g) * 64), -32, 32) / 64)
                continue
            layer.input_layernorm.weight.copy_(bf(1 + 0.2 * torch.randn(c["d"], generator=g)))
            layer.post_attention_layernorm.weight.copy_(bf(1 + 0.2 * torch.randn(c["d"], generator=g)))
        if c["hf_class"] == "Gemma3ForCausalLM":
            model.model.norm.weight.copy_(torch.clamp(torch.round(0.2 * torch.randn(c["d"], generator=g) * 64), -32,
                                                      32) / 64)
        else:
            model.model.norm.weight.copy_(bf(1 + 0.2 * torch.randn(c["d"], generator=g)))
    o = {"versions": versions(), "config": json.dumps({k: v for k, v in c.items()})}
    with tempfile.TemporaryDirectory() as td:
        hf_dir = os.path.join(td, "hf")
        import copy
        copy.deepcopy(model).to(torch.bfloat16).save_pretrained(hf_dir)  # a copy: .to() would round inv_freq too
        tiny_tokenizer(c["vocab"]).save(os.path.join(hf_dir, "tokenizer.json"))
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:  # the generic class: no family's
            json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",  # own special tokens
                       "eos_token": "<|eos|>", "unk_token": "<|eos|>", "pad_token": "<|eos|>",
                       "add_bos_token": False}, f)
        for fn, key in [("tokenizer.json", "hf.tokenizer_json"), ("tokenizer_config.json", "hf.tokenizer_config_json")]:
            with open(os.path.join(hf_dir, fn), "rb") as f:
                o[key] = f.read()
        with open(os.path.join(hf_dir, "config.json"), "rb") as f:
            o["hf.config_json"] = f.read()
        with open(os.path.join(hf_dir, "model.safetensors"), "rb") as f:
            o["hf.safetensors"] = f.read()
        gpath = os.path.join(td, "model.gguf")
        o["gguf.converter_sha256"] = gguf_convert(args.llama_cpp, hf_dir, gpath)
        with open(gpath, "rb") as f:
            o["gguf"] = f.read()
    rot = model.model.rotary_emb
    if hasattr(rot, "inv_freq"):
        o["rope.inv_freq"] = rot.inv_freq.detach().float().numpy()
    else:  # Gemma 3: one table per layer type (full_attention first: rope_theta; then the sliding layers')
        o["rope.inv_freq"] = getattr(rot, "full_attention_inv_freq").detach().float().numpy()
        o["rope.inv_freq_local"] = getattr(rot, "sliding_attention_inv_freq").detach().float().numpy()

    lcfg = LoraConfig(r=c["r"], lora_alpha=c["alpha"], lora_dropout=0.0, bias="none",
                      target_modules=[n for _, n in linears], init_lora_weights=True)
    pm = get_peft_model(model, lcfg)
    lora = []
    for l, layer in enumerate(pm.base_model.model.model.layers):
        for mod, lin_name in linears:
            lin = getattr(getattr(layer, mod), lin_name)
            A, Bm = lin.lora_A["default"].weight, lin.lora_B["default"].weight
            with torch.no_grad():
                Bm.copy_(torch.randn(Bm.shape, generator=g) * 0.1)
            lora += [(f"l{l}.{lin_name}.A", A), (f"l{l}.{lin_name}.B", Bm)]
    params = [p for _, p in lora]
    assert sum(p.numel() for p in pm.parameters() if p.requires_grad) == sum(p.numel() for p in params)
    p0 = torch.cat([p.detach().reshape(-1) for p in params]).clone()
    B, T = c["B"], c["T"]
    ids = torch.randint(0, c["vocab"], (B, T), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100
    labels[1, torch.tensor([3, 8, 9])] = -100
    pos = torch.stack([torch.arange(T), torch.arange(T) + 5])
    n_tok = int((labels[:, 1:] != -100).sum())

    def fwd():
        return pm(input_ids=ids, position_ids=pos, labels=labels)

    pm.train()
    out = fwd()
    out.loss.backward()
    g_ref = torch.cat([p.grad.detach().reshape(-1).float() for p in params])
    logits, loss = out.logits.detach().float(), float(out.loss.detach())
    opt = torch.optim.AdamW(params, lr=c["lr"], betas=c["betas"], eps=c["adam_eps"], weight_decay=c["wd"],
                            foreach=False)
    losses, norms = [], []
    for step in range(c["steps"]):
        opt.zero_grad(set_to_none=True)
        ob = fwd()
        ob.loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, c["max_norm"])))
        losses.append(float(ob.loss.detach()))
        opt.step()
    with torch.no_grad():
        losses.append(float(fwd().loss))
    print(f"[ref] {name}: loss {loss:.6f} over {n_tok} tokens, |grad| {float(g_ref.norm()):.4f}, AdamW losses "
          f"{['%.4f' % x for x in losses]}")
    o["n_tokens"] = n_tok
    o["lora_params"] = p0.numpy().astype(np.float32)
    o["lora_names"] = ",".join(n for n, _ in lora)
    o["input_ids"] = ids.numpy().astype(np.int32)
    o["labels"] = labels.numpy().astype(np.int32)
    o["position_ids"] = pos.numpy().astype(np.int32)
    o["logits"] = logits.numpy()
    o["loss"] = loss
    o["grads"] = g_ref.numpy()
    o["adamw.losses"] = np.array(losses, dtype=np.float64)
    o["adamw.grad_norms"] = np.array(norms, dtype=np.float64)
    o["adamw.final_params"] = torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float32)
    write_qref(os.path.join(FIX, f"ref_{name}.qref.gz"), o)


# ----------------------------------------------------------------------------- Gemma 3 270M from its GGUF

# The real Gemma 3 270M (scripts/fetch_gemma3.sh) in llama.cpp (llama-cpp-python 0.3.36): its shipped K-quant
# kernels stop with SIGILL on this machine's CPU, so llama.cpp runs the file dequantized to F32 with the matrices
# rounded to bf16 (what qlora holds with load_in_4bit: false; scripts/interop/check_llama_cpp.py
# write_exact_base) and an F32 KV cache: then both compute in fp32 up to summation order. The ids are
# llama.cpp's tokenization (BOS, special tokens parsed), also checked against qlora's tokenizer. The long text
# (> 512 tokens) passes Gemma 3's sliding window on the local layers.
GEMMA3_MODEL = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
GEMMA3_TOPK = 16
GEMMA3_SUBSET = 256


def gemma3_texts():
    chat = ("<start_of_turn>user\nWhat does the ls command do? Answer in one sentence.<end_of_turn>\n"
            "<start_of_turn>model\nIt lists the files in a directory.<end_of_turn>\n<start_of_turn>user\nAnd cp?"
            "<end_of_turn>\n<start_of_turn>model\n")
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "datasets", "manpages", "heldout.jsonl"))]
    long = ""
    for r in rows:
        long += r["text"] + "\n\n"
        if len(long) > 3000:
            break
    return [REAL_TEXTS[0], chat, "  Leading spaces,\ttabs, émigré façade — ✓ 日本語のテキスト\n\n\nend", long]


def make_gemma3_real(args):
    import tempfile
    sys.path.insert(0, os.path.join(ROOT, "scripts", "interop"))
    from check_llama_cpp import write_exact_base
    from llama_cpp import Llama
    texts = gemma3_texts()
    tmp = tempfile.mkdtemp(prefix="qlora_g3_")
    exact = os.path.join(tmp, "exact.gguf")
    write_exact_base(GEMMA3_MODEL, exact)
    llm = Llama(model_path=exact, n_ctx=1024, logits_all=True, verbose=False, n_threads=os.cpu_count() or 1,
                seed=0, type_k=0, type_v=0)
    V = llm.n_vocab()
    g = np.random.default_rng(7)
    subset = np.sort(g.choice(V, GEMMA3_SUBSET, replace=False)).astype(np.int32)
    out = {"versions": versions(), "texts": json.dumps(texts), "subset": subset, "topk": GEMMA3_TOPK,
           "model_sha256": "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"}
    for i, t in enumerate(texts):
        ids = llm.tokenize(t.encode(), add_bos=True, special=True)
        if i == len(texts) - 1:
            ids = ids[:600]
            assert len(ids) == 600
        llm.reset()
        llm.eval(ids)
        lg = np.array(llm.scores[:len(ids)], dtype=np.float64)
        lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
        top = np.argsort(-lg, axis=-1, kind="stable")[:, :GEMMA3_TOPK]
        out[f"t{i}.ids"] = np.array(ids, dtype=np.int32)
        out[f"t{i}.lse"] = lse
        out[f"t{i}.top_ids"] = top.astype(np.int32)
        out[f"t{i}.top_vals"] = np.take_along_axis(lg, top, -1).astype(np.float32)
        out[f"t{i}.subset_logits"] = lg[:, subset].astype(np.float32)
        print(f"[ref] gemma3 real text {i}: {len(ids)} tokens, max|logit| {np.abs(lg).max():.3f}, top1 "
              f"{top[:6, 0].tolist()}")
    llm.close()
    os.remove(exact)
    os.rmdir(tmp)
    write_qref(os.path.join(FIX, "ref_gemma3_real.qref.gz"), out)


# ----------------------------------------------------------------------------- SmolLM2-135M from the GGUF

REAL_TEXTS = [
    "ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n\nDESCRIPTION\n       List "
    "information about the FILEs (the current directory by default).",
    "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\n"
    "Paris.<|im_end|>\n<|im_start|>user\nAnd of Italy?",
]
REAL_T = 32
REAL_TOPK = 16
REAL_SUBSET = 256


def make_real(args):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    torch.set_num_threads(1)  # bnb's double-quant offset is a torch mean: one thread (see make_nf4)
    tok, _, _, _ = hf_tokenizer(MODEL)
    tok.encode_special_tokens = False
    rows = []
    for t in REAL_TEXTS:
        ids = tok.encode(t, add_special_tokens=False).ids
        assert len(ids) >= REAL_T, (len(ids), t)
        rows.append(ids[:REAL_T])
    ids = torch.tensor(rows, dtype=torch.long)
    B, T = ids.shape
    V = 49152
    g = np.random.default_rng(7)
    subset = np.sort(g.choice(V, REAL_SUBSET, replace=False)).astype(np.int32)
    d, f = os.path.dirname(MODEL), os.path.basename(MODEL)

    def load(**kw):
        m = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, **kw)
        m.eval()
        return m

    def round_bf16_(model, linears=True):
        """Round the embedding (tied LM head) and, optionally, every linear weight to bf16 (RNE),
        in place, leaving them fp32 tensors: the weights qlora's bf16 base holds."""
        with torch.no_grad():
            e = model.model.embed_tokens.weight
            e.copy_(e.to(torch.bfloat16).float())
            if linears:
                for layer in model.model.layers:
                    for mod, name in LINEARS:
                        w = getattr(getattr(layer, mod), name).weight
                        w.copy_(w.to(torch.bfloat16).float())

    out = {"versions": versions(), "input_ids": ids.numpy().astype(np.int32), "subset": subset,
           "topk": REAL_TOPK, "texts": json.dumps(REAL_TEXTS)}

    def record(name, model):
        with torch.no_grad():
            lg = model(input_ids=ids, position_ids=torch.arange(T).expand(B, T)).logits.float()
        lg = lg.reshape(B * T, -1)
        assert lg.shape[1] == V
        lse = torch.logsumexp(lg.double(), dim=-1)
        top = torch.topk(lg, REAL_TOPK, dim=-1)
        out[f"{name}.lse"] = lse.numpy().astype(np.float64)
        out[f"{name}.top_ids"] = top.indices.numpy().astype(np.int32)
        out[f"{name}.top_vals"] = top.values.numpy().astype(np.float32)
        out[f"{name}.subset_logits"] = lg[:, torch.from_numpy(subset).long()].numpy().astype(np.float32)
        print(f"[ref] real {name}: max|logit| {float(lg.abs().max()):.3f}, lse[0] {float(lse[0]):.4f}, "
              f"top1 row0 pos0..4 {top.indices[:5, 0].tolist()}")
        return lg

    m = load(torch_dtype=torch.float32)
    assert m.config.tie_word_embeddings
    ref_f32 = record("f32", m)                  # transformers as it loads the GGUF (fp32)
    round_bf16_(m)
    ref_bw = record("f32_bf16w", m)             # the same with qlora's bf16 weights, fp32 compute
    del m
    m = load(torch_dtype=torch.bfloat16)
    ref_bf = record("bf16", m)                  # transformers entirely in bf16: the bf16 yardstick
    del m
    # transformers will not quantize while loading a GGUF, so the dequantized fp32 model is saved as an
    # HF checkpoint (safetensors) first and loaded from there with BitsAndBytesConfig: bitsandbytes
    # then quantizes exactly the fp32 weights transformers dequantized from the GGUF.
    import tempfile
    tmp = tempfile.mkdtemp(prefix="qlora_ref_")
    src = load(torch_dtype=torch.float32)
    cfg = src.config.to_dict()
    cfg.pop("quantization_config", None)  # the GGUF marker; a plain checkpoint has none
    from safetensors.torch import save_file
    from transformers import LlamaConfig
    LlamaConfig.from_dict(cfg).save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if k != "lm_head.weight"},
              os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    del src
    for cd, name in ((torch.bfloat16, "nf4_bf16"), (torch.float32, "nf4_f32")):
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=cd)
        m = AutoModelForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32, quantization_config=q)
        m.eval()
        # On an AVX512-BF16 CPU, Linear4bit in eval mode without grad repacks its weight for a bf16
        # inference kernel (bf16 block scales, activations cast to bf16 whatever the compute dtype).
        # Training never takes that path: it dequantizes and calls F.linear in the compute dtype
        # (bnb's gemm_4bit default op), which is the arithmetic qlora's trainer shares. Turn the
        # inference path off so the reference is the training one.
        for mod in m.modules():
            if type(mod).__name__ == "Linear4bit":
                mod.support_avx512bf16_for_cpu = False
        lin = m.model.layers[0].self_attn.q_proj
        assert type(lin).__name__ == "Linear4bit" and lin.weight.quant_state.nested, type(lin)
        if cd == torch.float32:
            round_bf16_(m, linears=False)       # qlora holds the (tied) embedding in bf16
        record(name, m)
        del m
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[ref] real: bf16-weights vs fp32: max|Δ| {float((ref_bw - ref_f32).abs().max()):.4f}; torch bf16 vs "
          f"fp32: {float((ref_bf - ref_f32).abs().max()):.4f}")
    write_qref(os.path.join(FIX, "ref_real.qref.gz"), out)


# ----------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="nf4,tokenizer,chat,tiny,tiny_mts,real,gemma3_real," + ",".join(FAMILIES),
                    help="comma-separated subset of nf4,tokenizer,chat,tiny,tiny_mts,real,gemma3_real," + ",".join(FAMILIES))
    ap.add_argument("--new-corpus", action="store_true", help="rebuild the tokenizer corpus from this machine")
    ap.add_argument("--llama-cpp", default=LLAMA_CPP_DEFAULT,
                    help="vendor/llama.cpp of the unpacked llama-cpp-python 0.3.36 sdist (its converter)")
    args = ap.parse_args()
    os.makedirs(FIX, exist_ok=True)
    todo = args.only.split(",")
    steps = {"nf4": "make_nf4", "tokenizer": "make_tokenizer", "chat": "make_chat", "tiny": "make_tiny",
             "real": "make_real", "gemma3_real": "make_gemma3_real"}
    for k in todo:
        if k in FAMILIES:
            make_family(k, args)
            continue
        if k == "tiny_mts":
            make_tiny(args, mts=True)
            continue
        if k not in steps:
            sys.exit(f"unknown part {k!r}")
        globals()[steps[k]](args)


if __name__ == "__main__":
    main()
