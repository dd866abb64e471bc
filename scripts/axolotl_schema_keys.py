#!/usr/bin/env python3
"""Every key of axolotl's config schema, read from its sources (no axolotl import needed).

Usage: scripts/axolotl_schema_keys.py AXOLOTL_SRC_DIR OUT_DIR
  AXOLOTL_SRC_DIR: src/axolotl of an axolotl checkout or sdist (pip download --no-deps
  --no-binary :all: axolotl==0.19.0). Writes OUT_DIR/schema_keys.txt (AxolotlInputConfig with
  its mixins, then the args of the liger and cut_cross_entropy plugins) and
  OUT_DIR/dataset_keys.txt (SFTDataset, the keys of one `datasets:` entry): one key a line,
  a field's alias where it has one (overrides_of_model_config is written `model_config`), in
  declaration order, base classes first. tests/test_axolotl.c checks that trainer/config_axolotl.c
  has a decision for each.
"""
import ast
import glob
import os
import sys


def classes_of(root):
    classes = {}
    for f in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        tree = ast.parse(open(f, encoding="utf-8").read())
        for n in ast.walk(tree):
            if not isinstance(n, ast.ClassDef):
                continue
            fields = []
            for s in n.body:
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
                    alias = None
                    if isinstance(s.value, ast.Call):
                        for kw in s.value.keywords:
                            if kw.arg == "alias" and isinstance(kw.value, ast.Constant):
                                alias = kw.value.value
                    fields.append(alias or s.target.id)
            bases = [b.id if isinstance(b, ast.Name) else getattr(b, "attr", None) for b in n.bases]
            classes.setdefault(n.name, (fields, bases))
    return classes


def collect(classes, name, seen):
    if name not in classes or name in seen:
        return []
    seen.add(name)
    fields, bases = classes[name]
    out = []
    for b in bases:
        out += collect(classes, b, seen)
    return out + fields


def main():
    src, out = sys.argv[1], sys.argv[2]
    classes = classes_of(src)
    for fname, roots in (("schema_keys.txt", ["AxolotlInputConfig", "LigerArgs", "CutCrossEntropyArgs"]),
                         ("dataset_keys.txt", ["SFTDataset"])):
        keys = []
        for r in roots:
            for k in collect(classes, r, set()):
                if k not in keys:
                    keys.append(k)
        with open(os.path.join(out, fname), "w", encoding="utf-8") as f:
            f.write("\n".join(keys) + "\n")
        print(fname, len(keys))


if __name__ == "__main__":
    main()
