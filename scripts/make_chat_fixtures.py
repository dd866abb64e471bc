#!/usr/bin/env python3
"""Write tests/fixtures/ref_chat_templates.qref.gz: transformers' apply_chat_template over the real Jinja
chat templates, for tests/test_reference_chat_templates.c.

Command (from the repo root, after scripts/fetch_vocab.sh; venv of scripts/requirements-reference.txt):

    /work/venv-ref/bin/python scripts/make_chat_fixtures.py

Each template is paired with the vocabulary of its family (the HF tokenizer built from it as in
scripts/make_vocab_fixtures.py); bos_token / eos_token are that vocabulary's. For every conversation in
CONVERSATIONS and add_generation_prompt in (False, True): the rendered string
(apply_chat_template(tokenize=False)) and the ids (apply_chat_template(tokenize=True), which
transformers encodes without adding special tokens). A conversation the template rejects
(raise_exception) is stored as an error; qlora must refuse it too.

Templates: llama.cpp's copies of the models' own templates (models/templates in the llama-cpp-python
0.3.36 sdist), the templates stored in the Qwen2 and Phi-3 GGUFs, and Llama-2-chat's
(tests/fixtures/templates/llama-2-chat.jinja: meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json
chat_template, not in that sdist).
"""
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_reference import versions, write_qref  # noqa: E402
import make_vocab_fixtures as mv  # noqa: E402

OUT = os.path.join(ROOT, "tests", "fixtures", "ref_chat_templates.qref.gz")
V = mv.VOCAB

# (name, template source, vocabulary shape of scripts/make_vocab_fixtures.py)
def gguf_template(name):
    from gguf import GGUFReader
    r = GGUFReader(os.path.join(V, f"ggml-vocab-{name}.gguf"))
    f = r.fields["tokenizer.chat_template"]
    return bytes(f.parts[f.data[0]]).decode("utf-8")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


TEMPLATES = [
    ("Llama 3.1", lambda: read(os.path.join(V, "meta-llama-Llama-3.1-8B-Instruct.jinja")), "llama-bpe"),
    ("Qwen2.5", lambda: read(os.path.join(V, "Qwen-Qwen2.5-7B-Instruct.jinja")), "qwen2"),
    ("Qwen2", lambda: gguf_template("qwen2"), "qwen2"),
    ("Phi-3.5", lambda: read(os.path.join(V, "microsoft-Phi-3.5-mini-instruct.jinja")), "phi-3"),
    ("Phi-3", lambda: gguf_template("phi-3"), "phi-3"),
    ("Mistral v3 (Nemo)", lambda: read(os.path.join(V, "mistralai-Mistral-Nemo-Instruct-2407.jinja")), "llama-spm"),
    ("Llama 2", lambda: read(os.path.join(ROOT, "tests", "fixtures", "templates", "llama-2-chat.jinja")), "llama-spm"),
]

S, U, A = "system", "user", "assistant"
CONVERSATIONS = [
    [(U, "Hello!")],
    [(S, "You are a terse assistant."), (U, "Summarise ls(1) in one line.")],
    [(U, "What is 2+2?"), (A, "2 + 2 = 4.")],
    [(S, "You are a terse assistant."), (U, "Summarise ls(1) in one line."), (A, "ls lists directory contents.")],
    [(U, "Hi!"), (A, "Hello! How can I help?"), (U, "What is 2+2?"), (A, "4.")],
    [(S, "System prompt\nwith lines"), (U, "first"), (A, "one"), (U, "second")],
    [(S, ""), (U, ""), (A, "")],
    [(U, "  leading and trailing spaces  \n\n"), (A, "\n  Pong \t"), (U, "\tTabbed\r\nCRLF line\n")],
    [(U, "Écris « bonjour » en 日本語 и по-русски 😀👍🏽 café"),
     (A, "```c\n#include <stdio.h>\nint main(void) { puts(\"hi\"); }\n```\nこんにちは — مرحبا")],
    [(S, "Be brief."), (U, "a"), (A, "b"), (U, "c"), (A, "d"), (U, "e")],
    # rejected by the templates that require alternation
    [(A, "An assistant turn first."), (U, "then a user")],
    [(U, "one"), (U, "two")],
]


def main():
    from transformers import PreTrainedTokenizerFast
    arrays = {"versions": versions(),
              "conversations": json.dumps([[{"role": r, "content": c} for r, c in conv] for conv in CONVERSATIONS],
                                          ensure_ascii=False)}
    names = []
    for ti, (name, src_fn, shape) in enumerate(TEMPLATES):
        src = src_fn()
        tok, d = mv.build(shape)
        tokens = d["tokens"]
        bos = tokens[d["bos_token_id"]] if d.get("bos_token_id") is not None else None
        eos = tokens[d["eos_token_id"]] if d.get("eos_token_id") is not None else None
        hft = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
        hft.chat_template = src
        rendered, ids, ids_off, err = [], [], [0], []
        for conv in CONVERSATIONS:
            msgs = [{"role": r, "content": c} for r, c in conv]
            for gen in (False, True):
                try:
                    s = hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                    t = hft.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, return_dict=False)
                    if hasattr(t, "keys"):
                        t = t["input_ids"]
                    t = list(t)
                    assert t == tok.encode(s, add_special_tokens=False).ids, (name, msgs)
                    rendered.append(s)
                    ids += t
                    err.append(0)
                except Exception as ex:  # the template's raise_exception
                    if "TemplateError" not in type(ex).__name__ and "raise" not in str(ex).lower() and \
                            "alternate" not in str(ex):
                        raise
                    rendered.append("")
                    err.append(1)
                ids_off.append(len(ids))
        key = f"t{ti}"
        names.append(name)
        arrays[f"{key}/source"] = src
        arrays[f"{key}/shape"] = shape
        arrays[f"{key}/rendered"] = json.dumps(rendered, ensure_ascii=False)
        arrays[f"{key}/ids"] = np.array(ids, dtype=np.int32)
        arrays[f"{key}/ids_off"] = np.array(ids_off, dtype=np.int64)
        arrays[f"{key}/error"] = np.array(err, dtype=np.uint8)
        print(f"[chat] {name:18s} ({shape}): {len(rendered) - sum(err)} renderings, {sum(err)} rejected, "
              f"{len(ids)} ids")
    arrays["names"] = json.dumps(names)
    write_qref(OUT, arrays)
    print(f"[chat] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
