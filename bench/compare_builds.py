#!/usr/bin/env python3
"""Two builds of qlora side by side, in one run: does a refactor move a number?

  1. identity: the same short training run (real model, real data, fixed threads) with each build's
     qlora-train; every train/eval loss and grad-norm in metrics.jsonl and the adapter bytes must be
     identical (timings are left out of the comparison).
  2. speed: qlora-bench of both builds, interleaved in ABBA order (old/new, new/old, ...) on the same
     shapes, so a drift of the machine hits both alike; prints each run's tokens/s, the medians and new/old.

usage: python3 bench/compare_builds.py OLD_ROOT NEW_ROOT [--reps 3] [--steps 3] [--skip-identity] [--skip-bench]
OLD_ROOT and NEW_ROOT are checkouts with bin/ built (e.g. a `git worktree` of the previous commit).
Standard library only. Exit status 1 if the identity check finds a difference.
"""
import argparse, filecmp, json, os, statistics, subprocess, sys, tempfile

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def identity(old, new, steps, tmp):
    cfg = os.path.join(HERE, "configs", "smollm2-135m-manpages.yaml")
    outs = {}
    for name, root in (("old", old), ("new", new)):
        out = os.path.join(tmp, name)
        cmd = [os.path.join(root, "bin", "qlora-train"), cfg, f"max_steps={steps}", "eval_steps=2",
               "eval_max_tokens=2048", "save_steps=2", "num_threads=2", f"output_dir={out}"]
        print(f"[compare] {name}: {' '.join(cmd)}", flush=True)
        p = subprocess.run(cmd, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if p.returncode != 0:
            print(p.stderr[-3000:])
            sys.exit(f"[compare] {name} build failed (exit {p.returncode})")
        outs[name] = out
    bad = 0
    rows = []
    for name in ("old", "new"):
        recs = []
        with open(os.path.join(outs[name], "metrics.jsonl")) as f:
            for line in f:
                r = json.loads(line)
                recs.append({k: v for k, v in r.items() if k in ("step", "loss", "grad_norm", "lr", "eval_loss",
                                                                   "eval_tokens", "epoch")})
        rows.append(recs)
    if rows[0] != rows[1]:
        bad += 1
        print("[compare] metrics differ:\n  old", rows[0], "\n  new", rows[1])
    else:
        for r in rows[0]:
            print("[compare]   ", json.dumps(r))
    for fn in ("adapter_model.safetensors", "adapter_config.json"):
        same = filecmp.cmp(os.path.join(outs["old"], fn), os.path.join(outs["new"], fn), shallow=False)
        print(f"[compare] {fn}: {'identical' if same else 'DIFFERENT'}")
        bad += not same
    print(f"[compare] identity: {'every loss, grad-norm and adapter byte identical' if not bad else 'DIFFERENCES'}")
    return bad


def bench(old, new, reps, shapes):
    res = {}
    for shape in shapes:
        for i in range(reps):
            # ABBA: old/new, then new/old, so a drift of the machine over time hits both builds alike
            pair = (("old", old), ("new", new))
            for name, root in (pair if i % 2 == 0 else pair[::-1]):
                cmd = [os.path.join(root, "bin", "qlora-bench")] + shape.split()
                p = subprocess.run(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                if p.returncode != 0:
                    sys.exit(f"[compare] {name}: {' '.join(cmd)} failed")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                res.setdefault((shape, name), []).append(r)
                print(f"[compare] {shape} | {name} rep {i + 1}: {r['tokens_per_s']:.1f} tok/s, MFU {100 * r['mfu']:.1f}%,"
                      f" RSS {r['peak_rss_mb']:.0f} MiB, loss {r['loss']:.5f}", flush=True)
    print("\n| shape | old tok/s (median) | new tok/s (median) | new/old | old RSS MiB | new RSS MiB | same loss |")
    print("|---|---|---|---|---|---|---|")
    for shape in shapes:
        o, n = res[(shape, "old")], res[(shape, "new")]
        mo = statistics.median(r["tokens_per_s"] for r in o)
        mn = statistics.median(r["tokens_per_s"] for r in n)
        same = {r["loss"] for r in o} == {r["loss"] for r in n}
        print(f"| {shape} | {mo:.1f} | {mn:.1f} | {mn / mo:.3f} | {o[0]['peak_rss_mb']:.0f} | {n[0]['peak_rss_mb']:.0f} |"
              f" {'yes' if same else 'NO'} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-identity", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    a = ap.parse_args()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"[compare] cpu: {os.cpu_count()} x {cpu}; load {open('/proc/loadavg').read().split()[0]}")
    bad = 0
    if not a.skip_identity:
        with tempfile.TemporaryDirectory(prefix="qlora-compare-") as tmp:
            bad = identity(a.old, a.new, a.steps, tmp)
    if not a.skip_bench:
        shapes = [f"--shape smollm2-135m --seq 512 --batch 4 --lora-r 16 --checkpointing {c} --steps 3 --warmup 1"
                  for c in ("off", "on") if a.checkpointing in (c, "both")]
        bench(a.old, a.new, a.reps, shapes)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
