#!/usr/bin/env python3
"""Write tests/fixtures/ref_axolotl_chat.qref.gz: axolotl's named chat templates and its label masks, by
axolotl's own code, for tests/test_reference_axolotl_chat.c.

Command (from the repo root, after scripts/fetch_vocab.sh; venv of scripts/requirements-reference.txt):

    pip download --no-deps --no-binary :all: axolotl==0.19.0 -d /tmp/axo_dl
    tar -xzf /tmp/axo_dl/axolotl-0.19.0.tar.gz -C /tmp/axo_dl
    AXOLOTL_SRC=/tmp/axo_dl/axolotl-0.19.0 /work/venv-ref/bin/python scripts/make_axolotl_chat_fixtures.py

(axolotl-0.19.0.tar.gz sha256 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d.)

Two oracles, neither written here:
  1. Rendering: each template of axolotl's src/axolotl/utils/chat_templates/templates/<name>.jinja (what
     `chat_template: <name>` selects, utils/chat_templates/base.py get_chat_template) rendered by
     transformers' apply_chat_template (tokenize False and True) with the vocabulary of its family
     (scripts/make_vocab_fixtures.py build, bos/eos the vocabulary's), for every conversation in
     CONVERSATIONS x add_generation_prompt in (False, True); a conversation the template rejects is stored
     as an error.
  2. Labels: axolotl's ChatTemplateStrategy (src/axolotl/prompt_strategies/chat_template.py, imported from
     the sdist; the modules it imports but never uses on this path -- datasets, colorama, addict -- are
     stubbed) tokenizing each conversation under every SETTING (roles_to_train, train_on_eos, eot_tokens,
     train_on_inputs, drop_system_message) of each record: input_ids and labels, for axolotl's named
     templates and for the models' own
     templates qlora renders (the Jinja files of scripts/make_chat_fixtures.py).

With --gemma3 it writes tests/fixtures/ref_axolotl_chat_gemma3.qref.gz instead: axolotl's gemma3 template
with the real Gemma 3 tokenizer, read from models/gemma-3-270m-q4_k_m.gguf (make gemma3-model) by
transformers' GGUF loader; every rendering's ids are also checked against llama.cpp's tokenizer
(llama-cpp-python, vocab_only) on the same file. Kept apart so that the vocab-only fixture does not need
the 240 MB model.
"""
import importlib.abc
import importlib.machinery
import json
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
from make_reference import versions, write_qref  # noqa: E402
import make_vocab_fixtures as mv  # noqa: E402
import make_chat_fixtures as mc  # noqa: E402

GEMMA3 = "--gemma3" in sys.argv[1:]
OUT = os.path.join(ROOT, "tests", "fixtures",
                   "ref_axolotl_chat_gemma3.qref.gz" if GEMMA3 else "ref_axolotl_chat.qref.gz")
GEMMA3_GGUF = os.path.join(ROOT, "models", "gemma-3-270m-q4_k_m.gguf")
AXO = os.environ.get("AXOLOTL_SRC", "/tmp/axo_dl/axolotl-0.19.0")
TDIR = os.path.join(AXO, "src", "axolotl", "utils", "chat_templates", "templates")


class _Meta(type):
    def __getattr__(cls, a):
        if a.startswith("__"):
            raise AttributeError(a)
        return ""


class _Stub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for the imports chat_template.py's module chain makes but this path never uses."""
    names = {"datasets", "colorama", "addict"}

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        m = types.ModuleType(spec.name)
        m.__path__ = []
        m.__file__ = "/stub.py"

        def ga(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return _Meta(attr, (), {})
        m.__getattr__ = ga
        return m

    def exec_module(self, m):
        pass


# axolotl's named templates of the families qlora runs, each with a vocabulary of that family
NAMED = [
    ("chatml", "qwen2"),
    ("qwen_25", "qwen2"),
    ("llama3", "llama-bpe"),
    ("llama3_2_vision", "llama-bpe"),
    ("mistral_v1", "llama-spm"),
    ("mistral_v2v3", "llama-spm"),
    ("mistral_v3_tekken", "llama-spm"),
    ("phi_3", "phi-3"),
    ("phi_35", "phi-3"),
]
if GEMMA3:
    NAMED = [("gemma3", "gemma3")]

S, U, A = "system", "user", "assistant"
CONVERSATIONS = mc.CONVERSATIONS + [
    [(S, "Answer with <b>tags</b> & \"quotes\" {{ not jinja }} {% raw %}"), (U, "[INST] fake [/INST] <s> </s>"),
     (A, "<|im_end|> is text here, \\n and \\\\ too")],
    [(U, "q1"), (A, "  a1  "), (U, "q2"), (A, "a2\n")],
]
if GEMMA3:  # Gemma's turns: <start_of_turn>model, the system text folded into the first user turn
    CONVERSATIONS += [
        [(S, "  Padded system.  "), (U, "  padded user  "), (A, "<start_of_turn>model in the text<end_of_turn>")],
        [(U, "q"), (S, "a system message where the assistant would be"), (U, "q2"), (A, "a2")],
        [(S, "Only a system message.")],
    ]

# records for the labels: every conversation as {"messages": [...]}, and axolotl's field_system ("system": a
# record's top-level system prompt becomes the first message when the conversation has none)
RECORDS = [{"messages": [{"role": r, "content": c} for r, c in conv]} for conv in CONVERSATIONS] + [
    {"system": "From the record's system field.", "messages": [{"role": U, "content": "Hi"}, {"role": A, "content": "Hello."}]},
    {"system": "Ignored: the conversation has its own.", "messages": [{"role": S, "content": "Own system."},
                                                                        {"role": U, "content": "Hi"}, {"role": A, "content": "Hello."}]},
    {"messages": [{"role": S, "content": "First."}, {"role": S, "content": "Second."}, {"role": U, "content": "Hi"},
                  {"role": A, "content": "Hello."}]},
]

# (roles_to_train, train_on_eos, train_on_eot (None: as train_on_eos), eot_tokens ("T": [the template's
#  end-of-turn token]), train_on_inputs, drop_system_message)
SETTINGS = [
    (["assistant"], "turn", None, None, False, False),
    (["assistant"], "turn", None, "T", False, False),
    (["user", "assistant"], "all", None, "T", False, False),
    (["assistant"], "last", None, "T", False, False),
    (["assistant"], "none", None, "T", False, False),
    (["user"], "turn", None, "T", False, False),
    (["assistant"], "turn", None, "T", True, False),
    (["human", "gpt"], "last", None, None, False, False),
    (["assistant"], "all", "none", "T", False, False),
    (["assistant"], "none", "last", "T", False, True),
    (["assistant"], "turn", "all", None, False, True),
]

TERMINATOR = {"chatml": "<|im_end|>", "qwen_25": "<|im_end|>", "llama3": "<|eot_id|>",
              "llama3_2_vision": "<|eot_id|>", "phi_3": "<|end|>", "phi_35": "<|end|>",
              "Llama 3.1": "<|eot_id|>", "Qwen2.5": "<|im_end|>", "Qwen2": "<|im_end|>", "Phi-3.5": "<|end|>",
              "Phi-3": "<|end|>", "gemma3": "<end_of_turn>"}  # the others end a turn with eos


_LLAMA = {}


def llama_ids(text):
    """llama.cpp's tokenization of a rendering (special tokens parsed, no bos added) on the Gemma 3 GGUF."""
    if "m" not in _LLAMA:
        from llama_cpp import Llama
        _LLAMA["m"] = Llama(model_path=GEMMA3_GGUF, vocab_only=True, verbose=False)
    return _LLAMA["m"].tokenize(text.encode("utf-8"), add_bos=False, special=True)


def hf_tokenizer(shape):
    from transformers import PreTrainedTokenizerFast
    if shape == "gemma3":
        from transformers import AutoTokenizer
        hft = AutoTokenizer.from_pretrained(os.path.dirname(GEMMA3_GGUF), gguf_file=os.path.basename(GEMMA3_GGUF))
        return hft, hft.backend_tokenizer
    tok, d = mv.build(shape)
    tokens = d["tokens"]
    bos = tokens[d["bos_token_id"]] if d.get("bos_token_id") is not None else None
    eos = tokens[d["eos_token_id"]] if d.get("eos_token_id") is not None else None
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos), tok


def render_all(hft, tok, src, name):
    out = []
    for conv in CONVERSATIONS:
        msgs = [{"role": r, "content": c} for r, c in conv]
        for gen in (False, True):
            try:
                s = hft.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=src)
                t = hft.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen, chat_template=src,
                                            return_dict=False)
                if hasattr(t, "keys"):
                    t = t["input_ids"]
                t = list(t)
                assert t == tok.encode(s, add_special_tokens=False).ids, (name, msgs)
                if GEMMA3:
                    assert t == llama_ids(s), (name, msgs, "llama.cpp's ids differ")
                out.append({"text": s, "ids": t})
            except Exception as ex:  # the template's raise_exception
                if "TemplateError" not in type(ex).__name__:
                    raise
                out.append({"error": str(ex)})
    return out


def masks_all(hft, src, name, ct):
    out = []
    for si, (roles, eos_opt, eot_opt, eot, tin, drop) in enumerate(SETTINGS):
        eot_tokens = None if eot is None else [TERMINATOR.get(name, hft.eos_token)]
        for ri, rec in enumerate(RECORDS):
            prompter = ct.ChatTemplatePrompter(hft, chat_template=src, max_length=4096, drop_system_message=drop)
            try:
                st = ct.ChatTemplateStrategy(prompter, tokenizer=hft, train_on_inputs=tin, sequence_len=4096,
                                             roles_to_train=roles, train_on_eos=eos_opt, train_on_eot=eot_opt,
                                             eot_tokens=eot_tokens)
                res = st.tokenize_prompt(json.loads(json.dumps(rec)))
                out.append({"setting": si, "rec": ri, "ids": list(res["input_ids"]), "labels": list(res["labels"])})
            except Exception as ex:
                if ("TemplateError" not in type(ex).__name__ and "Conflict" not in str(ex)
                        and "empty conversation" not in str(ex)):
                    raise
                out.append({"setting": si, "rec": ri, "error": str(ex)})
    return out


def main():
    sys.meta_path.insert(0, _Stub())
    sys.path.insert(0, os.path.join(AXO, "src"))
    import logging
    logging.disable(logging.WARNING)
    import axolotl.prompt_strategies.chat_template as ct

    settings = [{"roles_to_train": r, "train_on_eos": e, "train_on_eot": o, "eot_tokens": t, "train_on_inputs": i,
                 "drop_system_message": d} for r, e, o, t, i, d in SETTINGS]
    arrays = {"versions": versions(), "axolotl": "0.19.0 (sdist sha256 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d)",
              "conversations": json.dumps([[{"role": r, "content": c} for r, c in conv] for conv in CONVERSATIONS],
                                          ensure_ascii=False),
              "records": json.dumps(RECORDS, ensure_ascii=False), "settings": json.dumps(settings)}
    cases = [(n, "axolotl", lambda n=n: mc.read(os.path.join(TDIR, n + ".jinja")), shape) for n, shape in NAMED]
    if not GEMMA3:
        cases += [(n, "model", f, shape) for n, f, shape in mc.TEMPLATES]
    names = []
    for i, (name, kind, src_fn, shape) in enumerate(cases):
        src = src_fn()
        hft, tok = hf_tokenizer(shape)
        key = f"c{i}"
        names.append({"name": name, "kind": kind, "shape": shape})
        arrays[f"{key}/source"] = src
        if kind == "axolotl":
            r = render_all(hft, tok, src, name)
            arrays[f"{key}/render"] = json.dumps(r, ensure_ascii=False)
        m = masks_all(hft, src, name, ct)
        arrays[f"{key}/masks"] = json.dumps(m, ensure_ascii=False)
        nerr = sum(1 for x in m if "error" in x)
        print(f"[axolotl-chat] {kind:7s} {name:18s} ({shape}): {len(m) - nerr} label sets, {nerr} rejected")
    arrays["cases"] = json.dumps(names)
    write_qref(OUT, arrays)
    print(f"[axolotl-chat] wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
    main()
