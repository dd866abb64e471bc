#!/usr/bin/env python3
"""Write data/chat_axolotl_jinja.inc: the Jinja texts of axolotl 0.19.0's named chat templates that
qlora renders (chat_template: <name>), byte for byte as axolotl reads them (utils/chat_templates/base.py
reads templates/<name>.jinja with f.read()).

qlora renders these templates from C (data/chat.c) and recognises them by hash; it needs their text only
to write it into an exported tokenizer (qlora-export --merged), as axolotl saves the tokenizer with
tokenizer.chat_template set to that text (loaders/tokenizer.py). The texts are axolotl's (Apache-2.0).
tests/test_export.c checks that each text hashes to its entry of data/chat.c's table.

Command (from the repo root):

    pip download --no-deps --no-binary :all: axolotl==0.19.0 -d /tmp/axo_dl
    tar -xzf /tmp/axo_dl/axolotl-0.19.0.tar.gz -C /tmp/axo_dl
    AXOLOTL_SRC=/tmp/axo_dl/axolotl-0.19.0 python3 scripts/axolotl_chat_jinja.py

(axolotl-0.19.0.tar.gz sha256 136d623f04c909c5149d7f5dbd4a0e215014ab4c3617cce9d64010b5b8ca609d.)
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "data", "chat_axolotl_jinja.inc")
NAMES = ["chatml", "qwen_25", "llama3", "mistral_v1", "mistral_v2v3", "mistral_v3_tekken", "phi_3", "phi_35",
         "gemma3"]


def c_string(text):
    """A C string literal, split into lines of the text; every byte outside printable ASCII escaped."""
    out = []
    for line in text.splitlines(keepends=True):
        s = []
        for b in line.encode("utf-8"):
            ch = chr(b)
            if ch == "\\":
                s.append("\\\\")
            elif ch == '"':
                s.append('\\"')
            elif ch == "\n":
                s.append("\\n")
            elif ch == "\t":
                s.append("\\t")
            elif ch == "?":
                s.append("\\?")  # no trigraphs
            elif 0x20 <= b < 0x7F:
                s.append(ch)
            else:
                s.append("\\%03o" % b)
        out.append('    "' + "".join(s) + '"')
    return "\n".join(out) if out else '    ""'


def main():
    src = os.environ.get("AXOLOTL_SRC")
    if not src:
        sys.exit("set AXOLOTL_SRC to the extracted axolotl-0.19.0 sdist")
    tdir = os.path.join(src, "src", "axolotl", "utils", "chat_templates", "templates")
    parts = [
        "/* data/chat_axolotl_jinja.inc - written by scripts/axolotl_chat_jinja.py from axolotl 0.19.0's\n"
        " * src/axolotl/utils/chat_templates/templates/<name>.jinja (Apache-2.0); do not edit. */\n"
    ]
    for name in NAMES:
        with open(os.path.join(tdir, name + ".jinja"), "r", encoding="utf-8") as f:
            text = f.read()
        parts.append("{\"%s\",\n%s},\n" % (name, c_string(text)))
    with open(OUT, "w", encoding="utf-8") as f:
        f.write("".join(parts))
    print("wrote", OUT)


if __name__ == "__main__":
    main()
