#!/usr/bin/env python3
"""Write tests/fixtures/tokenizer_cases.json: token ids from Hugging Face `tokenizers`
(the oracle) for varied strings, for tests/test_tokenizer.c.

Command (from the repo root, after `make model`):

    pip install tokenizers==0.23.3 gguf==0.19.0
    python3 scripts/make_tokenizer_fixtures.py models/SmolLM2-135M-Instruct.Q4_1.gguf

Versions used to write the committed fixture (pip show): tokenizers 0.23.3, gguf 0.19.0,
numpy 2.4.6, Python 3.11.7 (transformers 5.23.0 only for the side check below).

The oracle is SmolLM2's own tokenizer.json pipeline, rebuilt from the GGUF's vocabulary and
merges: BPE(vocab, merges) with pre_tokenizer
Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True,
use_regex=True)], no normalizer, ByteLevel decoder, and the 17 control tokens
(`tokenizer.ggml.token_type` == 3) as special AddedTokens. This is the tokenizer.json of
HuggingFaceTB/SmolLM2-*, and what llama.cpp's pre-tokenizer "smollm" emulates.

parse_special = 0 cases use `encode_special_tokens = True` (HF then tokenizes "<|im_start|>" as
plain text, like llama.cpp's parse_special = false).

Side check, printed but not written: transformers' own GGUF loader
(`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, integrations/gguf/gguf_tokenizer_mapping.py)
has no entry for pre "smollm" and builds a plain GPT2Tokenizer (ByteLevel regex, no digit
split); it also needs torch. We emulate it with transformers' GPT2Tokenizer on the same
vocab/merges and count the cases where it differs from the tokenizer.json pipeline (digits).
"""
import json
import sys

from gguf import GGUFReader
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers


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

CASES = [
    ("Hello world", 1),
    ("Hello, world! How are you today?", 1),
    ("", 1),
    (" leading space", 1),
    ("   three leading spaces", 1),
    ("trailing spaces   ", 1),
    ("multiple   internal    spaces", 1),
    ("tabs\tand\nnewlines\r\nmixed\n\n\nend", 1),
    ("12345", 1),
    ("pi is 3.14 and e is 2.71828; 1,000,000 items cost $1,234.56", 1),
    ('int main(void) {\n    printf("%d\\n", 42);\n    return 0;\n}\n', 1),
    ("#include <stdio.h>\nstatic inline uint64_t rng_mix64(uint64_t z) { z += 0x9e3779b97f4a7c15ull; }", 1),
    ("I'm sure they'll say it's fine, don't you think? We've seen it. I'd go. You're right.", 1),
    ("DON'T SHOUT: IT'S LOUD, WE'LL SEE", 1),
    ("it\u2019s a curly apostrophe", 1),
    ("Emoji: \U0001F600\U0001F44D\U0001F3FD\U0001F1FA\U0001F1F8 and \u2764\ufe0f", 1),
    ("\u4f60\u597d\uff0c\u4e16\u754c\uff01\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5\u3002", 1),
    ("\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8\u3068\u30ab\u30bf\u30ab\u30ca \u30fc", 1),
    ("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u041a\u0430\u043a \u0434\u0435\u043b\u0430?", 1),
    ("\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", 1),
    ("Arabic-Indic \u0661\u0662\u0663, fraction \u00bd, superscript x\u00b2, roman \u2167", 1),
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 fa\u00e7ade \u00c5ngstr\u00f6m", 1),
    ("e\u0301 combining mark", 1),
    ("a\u00a0b c\u2003d\u0085e\u3000f\u200bg", 1),
    # U+180E is white space to PCRE2 (its \\h list) but not to Oniguruma/HF
    ("x  \u180e\u180e y\u180e  z", 1),
    ("\u0391\u03bb\u03c6\u03ac\u03b2\u03b7\u03c4\u03bf \u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac", 1),
    ("\u0928\u092e\u0938\u094d\u0924\u0947 \u0926\u0941\u0928\u093f\u092f\u093e", 1),
    ("\ud55c\uad6d\uc5b4 \ud14d\uc2a4\ud2b8\uc785\ub2c8\ub2e4", 1),
    ("<|im_start|>user\nHi there<|im_end|>\n", 1),
    ("<|im_start|>user\nHi there<|im_end|>\n", 0),
    ("<|endoftext|>", 1),
    ("<|endoftext|>", 0),
    ("text<|im_end|>more<|im_start|>assistant\n  indented", 1),
    ("<|im_start|partial <|im_end| and <repo_name>x<file_sep>", 1),
    ("<|im_start|partial <|im_end| and <repo_name>x<file_sep>", 0),
    ("   \n\n   \t  ", 1),
    ("ls - list directory contents\n\nSYNOPSIS\n       ls [OPTION]... [FILE]...\n", 1),
    ("=" * 40 + " " + "a" * 37 + " " + "-" * 23, 1),
    ("https://example.com/path?q=1&r=2#frag", 1),
    ("x=1;y=22;z=333;w=4444", 1),
    ("The quick brown fox jumps over the lazy dog.", 1),
    ("  \n  indented\n\tcode\n", 1),
    ("a\r\nb\rc", 1),
    ("v1.2.3-rc4 2024-01-15T12:34:56Z", 1),
    ("<s>[INST] not special here [/INST]</s>", 1),
    ("\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35", 1),
    ("  Hello", 1),
    ("\n\nHello\n", 1),
    ("snake_case_name and camelCaseName and SCREAMING_CASE", 1),
    # bytes the vocabulary cannot spell (0x04, 0x13, 0x14, the 0xF1 lead byte of U+40000): HF drops
    # them (BPE without unk_token), so these two do not round-trip; "decoded_hex" holds the bytes
    # HF's ByteLevel decoder produces before its lossy UTF-8 conversion.
    ("a\x04b and \x13\x14 x", 1),
    ("x\U00040000y", 1),
]


def field_str(r, key):
    f = r.fields[key]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def field_arr_str(r, key):
    f = r.fields[key]
    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]


def field_arr_int(r, key):
    f = r.fields[key]
    return [int(f.parts[i][0]) for i in f.data]


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    out = sys.argv[2] if len(sys.argv) > 2 else "tests/fixtures/tokenizer_cases.json"
    r = GGUFReader(path)
    assert field_str(r, "tokenizer.ggml.model") == "gpt2"
    assert field_str(r, "tokenizer.ggml.pre") == "smollm"
    tokens = field_arr_str(r, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field_arr_str(r, "tokenizer.ggml.merges")]
    types = field_arr_int(r, "tokenizer.ggml.token_type")
    vocab = {t: i for i, t in enumerate(tokens)}
    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == 3])

    cases = []
    for text, parse_special in CASES:
        tok.encode_special_tokens = not parse_special
        ids = tok.encode(text, add_special_tokens=False).ids
        back = tok.decode(ids, skip_special_tokens=False)
        case = {"text": text, "parse_special": parse_special, "ids": ids}
        if back != text:
            raw = b"".join(bytes(byte_decoder[ch] for ch in tokens[i]) for i in ids)
            case["decoded_hex"] = raw.hex()
        cases.append(case)

    # Side check: transformers' GGUF path (GPT2Tokenizer, no digit split).
    try:
        from transformers.models.gpt2.tokenization_gpt2 import GPT2Tokenizer
        gt = GPT2Tokenizer(vocab=vocab, merges=merges)
        ctrl = [t for t, ty in zip(tokens, types) if ty == 3]
        gt.add_special_tokens({"additional_special_tokens": ctrl})
        differ = sum(1 for c in cases if c["parse_special"]
                     and gt(c["text"], add_special_tokens=False)["input_ids"] != c["ids"])
        print(f"[fixtures] transformers GGUF-style GPT2Tokenizer differs on {differ} of "
              f"{sum(c['parse_special'] for c in cases)} parse_special cases (no digit split)")
    except Exception as ex:  # noqa: BLE001 - informational only
        print(f"[fixtures] transformers side check skipped: {ex}")

    doc = {
        "model": path.split("/")[-1],
        "oracle": "tokenizers BPE + Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False)]",
        "cases": cases,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=True, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"[fixtures] wrote {len(cases)} cases to {out}")


if __name__ == "__main__":
    main()
