#!/usr/bin/env python3
"""prepare_manpages.py — the default dataset: the Linux programmer's manual as JSONL.

Called by scripts/prepare_manpages.sh (which fixes the locale and the man environment); standard
library only. One document per manual page of the Debian package `manpages-dev` (sections 2 and 3),
rendered by man-db/groff to plain UTF-8 text, written as `{"text": "..."}` one per line.

Which pages: the regular files that `dpkg -L manpages-dev` lists under man2/ and man3/, in bytewise
sorted order of their page names. Skipped, so that no text appears twice:
  - symlinks (Debian turns most `.so` aliases, e.g. fprintf.3 -> printf.3, into symlinks);
  - files whose only request is a `.so` redirect to another page;
  - a rendering identical to one already taken (belt and braces; does not happen with 6.03).

Rendering: `man --nh --nj -l -P cat FILE` with MANWIDTH=80 and LC_ALL=C.UTF-8: no hyphenation
(--nh), ragged right instead of justified padding (--nj), no pager. Any overstrike (x\bx, _\bx) or
ANSI SGR sequence left over is stripped, tabs are expanded, trailing spaces dropped, runs of blank
lines squeezed to one. The man header and footer lines are kept. Long pages are kept whole; the
trainer chunks long texts itself.

Split (fixed, independent of file-system order, randomness and of which other pages exist):
  held-out  <=>  int(md5(page name)[:8], 16) % 20 == 0      page name = file name without .gz,
                                                              e.g. "printf.3"   (about 5 %)
  train     <=>  every other page.

Output: OUT_DIR/train.jsonl and OUT_DIR/heldout.jsonl, each written to a temporary name and
renamed; heldout first, so an existing train.jsonl (make's target) implies a complete dataset.
"""
import concurrent.futures
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys

PACKAGE = "manpages-dev"
PAGE_RE = re.compile(r"^/usr/share/man/man([23])/([^/]+\.[23][^/]*?)(\.gz)?$")
HELDOUT_MOD = 20
OVERSTRIKE_RE = re.compile(r".\x08")
SGR_RE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def log(msg):
    print(f"[data] {msg}", flush=True)


def die(msg):
    print(f"[data] error: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def list_pages():
    """(page name, path) of every real section 2/3 page of the package, sorted by page name."""
    try:
        out = subprocess.run(["dpkg", "-L", PACKAGE], check=True, capture_output=True,
                             text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        die(f"`dpkg -L {PACKAGE}` failed ({e}); install it: apt-get install {PACKAGE} "
            f"(or run scripts/setup.sh)")
    pages, missing, links = [], 0, 0
    for path in out.splitlines():
        m = PAGE_RE.match(path)
        if not m:
            continue
        if os.path.islink(path):
            links += 1
            continue
        if not os.path.isfile(path):
            missing += 1
            continue
        pages.append((m.group(2), path))
    if missing and not pages:
        die(f"{PACKAGE} is installed but its man pages are not on disk; a dpkg path-exclude "
            f"(see /etc/dpkg/dpkg.cfg.d/) probably dropped them. scripts/setup.sh reinstalls "
            f"the package with --path-include=/usr/share/man/*")
    if missing:
        log(f"warning: {missing} listed pages missing on disk")
    pages.sort(key=lambda p: p[0].encode())
    names = [p[0] for p in pages]
    if len(set(names)) != len(names):
        die("duplicate page names in the package listing")
    return pages, links


def read_source(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".gz"):
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def is_so_redirect(src):
    """True if the page's only request (besides comments and blank lines) is `.so other/page`."""
    lines = [l for l in src.splitlines()
             if l.strip() and not l.startswith(('.\\"', "'\\\"", '.\\#', '\\"', '\\#'))]
    return len(lines) == 1 and lines[0].startswith(".so ")


def clean(text):
    text = SGR_RE.sub("", OVERSTRIKE_RE.sub("", text))
    lines = [l.expandtabs(8).rstrip() for l in text.split("\n")]
    out, blank = [], False
    for l in lines:
        if not l:
            if out and not blank:
                out.append("")
            blank = True
            continue
        out.append(l)
        blank = False
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def render(path):
    """(text, stderr) of one page; raises RuntimeError if man fails or prints nothing."""
    p = subprocess.run(["man", "--nh", "--nj", "-l", "-P", "cat", path],
                       capture_output=True)
    err = p.stderr.decode("utf-8", errors="replace").strip()
    if p.returncode != 0:
        raise RuntimeError(f"man exited {p.returncode} on {path}: {err}")
    text = clean(p.stdout.decode("utf-8", errors="replace"))
    if not text.strip():
        raise RuntimeError(f"man rendered nothing for {path}: {err}")
    return text, err


def heldout(name):
    return int(hashlib.md5(name.encode()).hexdigest()[:8], 16) % HELDOUT_MOD == 0


def write_jsonl(path, docs):
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp.{os.getpid()}"
    nbytes = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for text in docs:
                line = json.dumps({"text": text}, ensure_ascii=False) + "\n"
                f.write(line)
                nbytes += len(text.encode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return nbytes


def main():
    if len(sys.argv) != 2:
        die("usage: prepare_manpages.py OUT_DIR")
    out_dir = sys.argv[1]
    os.makedirs(out_dir, exist_ok=True)

    pages, links = list_pages()
    kept, redirects = [], 0
    for name, path in pages:
        if is_so_redirect(read_source(path)):
            redirects += 1
        else:
            kept.append((name, path))
    log(f"{PACKAGE}: {len(pages) + links} pages in man2/man3, {links} symlink aliases and "
        f"{redirects} .so redirects skipped, rendering {len(kept)}")

    jobs = max(1, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as ex:
        try:
            rendered = list(ex.map(lambda p: render(p[1]), kept))  # keeps input order
        except RuntimeError as e:
            die(str(e))

    warned = sum(1 for _, err in rendered if err)
    if warned:
        log(f"note: groff printed warnings for {warned} pages (kept; e.g. \"can't break line\" in a table)")

    train, held, seen, dups = [], [], set(), 0
    for (name, _), (text, _) in zip(kept, rendered):
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen:
            dups += 1
            continue
        seen.add(digest)
        (held if heldout(name) else train).append(text)
    if dups:
        log(f"{dups} pages with identical text skipped")
    if not train or not held:
        die(f"split produced {len(train)} train / {len(held)} held-out documents")

    hb = write_jsonl(os.path.join(out_dir, "heldout.jsonl"), held)
    tb = write_jsonl(os.path.join(out_dir, "train.jsonl"), train)
    longest = max(len(t.encode()) for t in train + held)
    for label, n, nb, fn in (("train:   ", len(train), tb, "train.jsonl"),
                             ("held-out:", len(held), hb, "heldout.jsonl")):
        path = os.path.join(out_dir, fn)
        log(f"{label} {n:4d} documents, {nb:8d} bytes of text, "
            f"{os.path.getsize(path):8d} bytes of JSONL -> {path}")
    log(f"longest document {longest} bytes (kept whole; the trainer chunks long texts)")


if __name__ == "__main__":
    main()
