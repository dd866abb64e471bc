#!/usr/bin/env python3
"""Print README "Coming from axolotl"'s key table from trainer/config_axolotl.c (the source of truth).

Usage: scripts/axolotl_keys_table.py > /tmp/table.md, then paste it into README.md between the
"<!-- axolotl keys -->" markers. Rows with the same decision and reason are grouped into one line;
tests/test_axolotl.c checks that the README names every key of the table.
"""
import collections
import re
import sys

SRC = "trainer/config_axolotl.c"
DECISION = {"AX_IMPL": "implemented", "AX_SAFE": "accepted: cannot change the result ([config] line)",
            "AX_REFUSE": "refused when set", "AX_MULTI": "see [Several processes](#several-processes)"}
ROW = re.compile(r'\{"([^"]+)", (AX_\w+), (NULL|"[^"]*"), (NULL|"(?:[^"\\]|\\.)*")\}')


def rows(text):
    top, ds = text.split("static const ax_key DS[]")
    return [m.groups() for m in ROW.finditer(top)], [m.groups() for m in ROW.finditer(ds)]


def table(rs, what):
    groups = collections.OrderedDict()
    for name, dec, allowed, why in rs:
        why = "" if why == "NULL" else why[1:-1].replace('\\"', '"')
        if dec == "AX_IMPL" and not why:
            why = "see the Configuration reference"
        if allowed != "NULL":
            why += " (accepted value: %s)" % allowed[1:-1]
        groups.setdefault((dec, why), []).append(name)
    out = ["| %s | decision | why |" % what, "|---|---|---|"]
    order = ["AX_IMPL", "AX_SAFE", "AX_REFUSE", "AX_MULTI"]
    for (dec, why), names in sorted(groups.items(), key=lambda kv: order.index(kv[0][0])):
        keys = ", ".join("`%s`" % n for n in names)
        out.append("| %s | %s | %s |" % (keys, DECISION[dec], why.replace("|", "\\|")))
    return "\n".join(out)


def main():
    text = open(SRC, encoding="utf-8").read()
    top, ds = rows(text)
    print(table(top, "keys"))
    print()
    print(table(ds, "keys of a `datasets:` entry"))


if __name__ == "__main__":
    sys.exit(main())
