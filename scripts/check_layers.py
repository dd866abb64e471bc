#!/usr/bin/env python3
"""check_layers.py — the include graph follows the layer order of docs/design.md.

usage: scripts/check_layers.py [--root DIR] [--graph]

The layer order is read from docs/design.md, from the one line that starts with
"Layer order:" and names the folders lowest first, separated by arrows, e.g.

    Layer order: core → quant → format → data → autograd → optim → model → trainer

(the line is the single source of the order; this script holds no copy of it).
Every C/CUDA source and header under those folders (*.c *.h *.cu *.cuh, any depth)
is read for `#include "..."` lines, resolved as the compiler does with -I. (first
relative to the including file's folder, then to the repository root). Checked:

  1. a folder includes only itself and folders below it in the order;
  2. a project include resolves to a file that exists (a quoted include that names
     no project file and no layer folder is taken for an outside header);
  3. the file-level include graph has no cycle (tests/, fuzz/ and bench/, which sit
     on top of every layer and may include anything, are part of this graph);
  4. the Makefile's MODULES line names the same folders as the order.

Each violation is printed as `file:line: #include "x": why`; the exit status is 0
when there is none, 1 when there are some, 2 when the order cannot be read.
--graph also prints the folder-level include matrix (how many includes go from
each folder to each other folder).
Python 3 standard library only.
"""
import argparse
import os
import re
import sys

ORDER_LINE = re.compile(r"^\s*Layer order:\s*(.+?)\s*$")
INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"')
SOURCE_EXT = (".c", ".h", ".cu", ".cuh")
TOP_FOLDERS = ("tests", "fuzz", "bench")  # above every layer: may include anything


def read_order(design_path):
    """The folder order, lowest first, from the 'Layer order:' line of docs/design.md."""
    try:
        with open(design_path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise SystemExit(f"[layers] error: cannot read {design_path}: {err.strerror}") from None
    found = [m.group(1) for m in map(ORDER_LINE.match, lines) if m]
    if len(found) != 1:
        print(f"[layers] error: {design_path}: expected exactly one line starting with 'Layer order:', "
              f"found {len(found)}", file=sys.stderr)
        sys.exit(2)
    names = [n.strip().strip("`").rstrip("/") for n in re.split(r"→|->", found[0])]
    if len(names) < 2 or any(not re.fullmatch(r"[A-Za-z0-9_]+", n) for n in names) or len(set(names)) != len(names):
        print(f"[layers] error: {design_path}: cannot parse the layer order {found[0]!r} "
              "(folder names separated by → or ->, each once)", file=sys.stderr)
        sys.exit(2)
    return names


def read_makefile_modules(path):
    """The folder list of the Makefile's `MODULES := ...` line, or None when there is none."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read().replace("\\\n", " ")  # join continuation lines
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(r"^MODULES\s*:?=\s*(.*?)\s*$", line)
        if m:
            return m.group(1).split()
    return None


def source_files(root, folders):
    """Repository-relative paths of the C/CUDA files under the given top-level folders."""
    out = []
    for top in folders:
        base = os.path.join(root, top)
        if not os.path.isdir(base):
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(SOURCE_EXT):
                    out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return out


def includes_of(root, path):
    """(line number, quoted include) for every #include "..." line of a file."""
    out = []
    with open(os.path.join(root, path), encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            m = INCLUDE.match(line)
            if m:
                out.append((lineno, m.group(1)))
    return out


def resolve(root, path, inc):
    """The repository-relative file an include names, or None when it names no project file."""
    here = os.path.dirname(path)
    for cand in (os.path.join(here, inc), inc):
        norm = os.path.normpath(cand).replace(os.sep, "/")
        if not norm.startswith("../") and os.path.isfile(os.path.join(root, norm)):
            return norm
    return None


def find_cycles(graph):
    """Strongly connected components with a cycle (Tarjan, iterative), each as one cycle path."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            advanced = False
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in graph[node]:
                    sccs.append(sorted(comp))
    cycles = []
    for comp in sccs:
        members = set(comp)
        # shortest path from comp[0] back to itself inside the component (BFS)
        first = comp[0]
        prev = {first: None}
        queue = [first]
        closing = None
        while queue and closing is None:
            nxt_queue = []
            for u in queue:
                for v in sorted(graph[u]):
                    if v == first:
                        closing = u
                        break
                    if v in members and v not in prev:
                        prev[v] = u
                        nxt_queue.append(v)
                if closing is not None:
                    break
            queue = nxt_queue
        path = [first]
        u = closing
        while u is not None and u != first:
            path.append(u)
            u = prev[u]
        path = [first] + list(reversed(path[1:])) + [first]
        cycles.append(path)
    return cycles


def main():
    ap = argparse.ArgumentParser(description="Check the include graph against the layer order of docs/design.md.")
    ap.add_argument("--root", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="repository root (default: the parent of scripts/)")
    ap.add_argument("--graph", action="store_true", help="also print the folder-level include matrix")
    args = ap.parse_args()
    root = os.path.normpath(args.root)

    order = read_order(os.path.join(root, "docs", "design.md"))
    rank = {name: i for i, name in enumerate(order)}
    missing = [n for n in order if not os.path.isdir(os.path.join(root, n))]
    if missing:
        print(f"[layers] error: docs/design.md names folders that do not exist: {' '.join(missing)}",
              file=sys.stderr)
        return 2

    # The Makefile's MODULES (the folders compiled into the library) must be the same set.
    modules = read_makefile_modules(os.path.join(root, "Makefile"))
    if modules is not None and set(modules) != set(order):
        print(f"[layers] Makefile MODULES ({' '.join(modules)}) and the layer order of docs/design.md "
              f"({' '.join(order)}) name different folders")
        mismatch = 1
    else:
        mismatch = 0

    layer_files = source_files(root, order)
    top_files = source_files(root, TOP_FOLDERS)
    violations = []
    graph = {}
    matrix = {}
    n_includes = 0
    for path in layer_files + top_files:
        src = path.split("/", 1)[0]
        graph.setdefault(path, set())
        for lineno, inc in includes_of(root, path):
            n_includes += 1
            target = resolve(root, path, inc)
            head = inc.split("/", 1)[0] if "/" in inc else None
            if target is None:
                if head in rank or head in TOP_FOLDERS:
                    violations.append((path, lineno, inc, "no such file in the repository"))
                continue  # an outside header written with quotes
            graph[path].add(target)
            dst = target.split("/", 1)[0]
            if src not in rank:
                continue  # tests/, fuzz/, bench/: anything below is fine
            matrix[(src, dst)] = matrix.get((src, dst), 0) + 1
            if dst in rank:
                if rank[dst] > rank[src]:
                    violations.append((path, lineno, inc,
                                       f"{src}/ may include only {' '.join(order[:rank[src] + 1])}; "
                                       f"{dst}/ is above it in the layer order (docs/design.md)"))
            else:
                violations.append((path, lineno, inc,
                                   f"{dst}/ is not a library layer (only {' '.join(order)} may be included "
                                   "from library code)"))

    for path, lineno, inc, why in violations:
        print(f"{path}:{lineno}: #include \"{inc}\": {why}")

    cycles = find_cycles(graph)
    for cyc in cycles:
        print(f"[layers] include cycle: {' -> '.join(cyc)}")

    if args.graph:
        width = max(len(n) for n in order)
        print(f"[layers] folder-level includes (row includes column; order {' → '.join(order)}):")
        print(" " * (width + 1) + " ".join(f"{n[:8]:>8}" for n in order))
        for s in order:
            print(f"{s:>{width}} " + " ".join(f"{matrix.get((s, d), 0) or '.':>8}" for d in order))

    n_files = len(layer_files) + len(top_files)
    if violations or cycles or mismatch:
        print(f"[layers] ✗ {len(violations)} layering violation(s), {len(cycles)} include cycle(s)"
              f"{', Makefile MODULES differ' if mismatch else ''} "
              f"in {n_files} files ({n_includes} quoted includes); order: {' → '.join(order)}")
        return 1
    print(f"[layers] ✓ {n_files} files, {n_includes} quoted includes: no include goes up the layer order "
          f"({' → '.join(order)}), no include cycle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
