#!/usr/bin/env python3
"""`make bench-curve`: how a LoRA step's cost grows with sequence length, LoRA rank, model shape and
checkpointing mode, measured with bin/qlora-bench, plotted and tabulated.

usage: python3 bench/cost_curve.py [--quick] [--out-dir docs] [--json build/bench/cost_curve.json]
                                   [--peer-python PY] [--load-limit X] [--from-json FILE]

Grid (full): shapes smollm2-135m (all 30 layers), smollm2-1.7b (first 6 of 24 layers), llama3-8b
(first 2 of 32 layers); checkpointing off / selective / on (full); sequence length 256 ... 8192 at
LoRA r 16, and LoRA r 8 ... 128 at sequence 512; batch 1. --quick: a subset that runs in minutes
(SmolLM2-135M at full depth: sequence 256 and 1024, r 8 / 16 / 64; SmolLM2-1.7B cut to 2 layers and
Llama-3-8B to 1, at sequence 256; one step each).

Nothing is extrapolated: where a shape runs fewer layers than it has, the table says how many ran;
tokens/s and RSS are those of what ran, the planner's prediction is given for what ran (the check
of the planner) and, separately, for the whole depth (a prediction only, marked so). MFU needs no
scaling (model FLOPs of what ran over the bf16 GEMM peak qlora-bench measures in the same run).

Timings on a loaded machine mislead: each point records the 1-minute load average before and after
it; when either exceeds the cores qlora-bench uses plus --load-limit (default 1.0), the point's
tokens/s and MFU are printed as "not measured (load X)". Memory (peak RSS, arena) does not depend on
load and is always reported.

The peer (../shared/bench/torch_lora_ref.py: plain PyTorch, bf16 autocast, no checkpointing; only
the SmolLM2-135M shape, r 16) runs beside the SmolLM2-135M sequence points when --peer-python (or
$QLORA_PEER_PYTHON) names a python with torch.
"""
import argparse, json, math, os, re, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bin", "qlora-bench")
PEER = os.path.join(ROOT, "..", "shared", "bench", "torch_lora_ref.py")
MODES = ["off", "selective", "on"]
FULL_DEPTH = {"smollm2-135m": 30, "smollm2-1.7b": 24, "llama3-8b": 32}


def load1():
    return float(open("/proc/loadavg").read().split()[0])


def grid(quick):
    """(shape, layers, seq, r, steps, warmup) points; every mode is run at each."""
    pts = []
    if quick:
        for T in (256, 1024):
            pts.append(("smollm2-135m", 30, T, 16, 1, 0))
        for r in (8, 64):
            pts.append(("smollm2-135m", 30, 256, r, 1, 0))
        pts.append(("smollm2-1.7b", 2, 256, 16, 1, 0))
        pts.append(("llama3-8b", 1, 256, 16, 1, 0))
        return pts
    layers = {"smollm2-135m": 30, "smollm2-1.7b": 6, "llama3-8b": 2}
    for shape, L in layers.items():
        for T in (256, 512, 1024, 2048, 4096, 8192):
            steps, warm = (2, 1) if T <= 2048 else (1, 0)
            pts.append((shape, L, T, 16, steps, warm))
        for r in (8, 32, 64, 128):  # r 16 at seq 512 is in the sequence sweep
            pts.append((shape, L, 512, r, 2, 1))
    return pts


def bench_cmd(shape, L, T, r, mode, steps, warmup):
    c = [BENCH, "--shape", shape, "--seq", str(T), "--batch", "1", "--lora-r", str(r), "--checkpointing", mode,
         "--steps", str(steps), "--warmup", str(warmup)]
    if L != FULL_DEPTH[shape]:
        c += ["--layers", str(L)]
    return c


def run_json(cmd):
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:])
        raise SystemExit(f"[curve] failed: {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def plan_full(shape, T, r, mode):
    """The planner's total for the whole depth (bytes): a prediction, never a measurement."""
    c = [BENCH, "--plan-only", "--shape", shape, "--seq", str(T), "--batch", "1", "--lora-r", str(r),
         "--checkpointing", mode]
    return run_json(c)["predicted_bytes"] / 1048576.0


def peer_point(py, L, T):
    cmd = [py, PEER, "bf16", str(L), str(T), "1"]
    l0 = load1()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    l1 = load1()
    m = re.search(r"torch (\S+) .*?: (\d+) tok/s, ([\d.]+) s/step, loss ([\d.]+), peak RSS (\d+) MiB",
                  p.stdout.strip().splitlines()[-1] if p.stdout.strip() else "")
    if p.returncode != 0 or not m:
        sys.stderr.write(p.stdout[-1000:] + p.stderr[-1000:])
        return None
    return {"torch": m.group(1), "tokens_per_s": float(m.group(2)), "peak_rss_mb": float(m.group(5)),
            "load": [l0, l1], "cmd": " ".join(["python3", "../shared/bench/torch_lora_ref.py", "bf16", str(L), str(T), "1"])}


def fit_line(xs, ys):
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss = sum((y - my) ** 2 for y in ys)
    r2 = 1 - sum((y - a - b * x) ** 2 for x, y in zip(xs, ys)) / ss if ss > 0 else 1.0
    return a, b, r2


def rsq(fr, n):
    return "2 points: the line through them, no test of linearity" if n == 2 else f"R² {fr[2]:.4f} over {n} points"


def timed(res, limit):
    return max(res["load"]) <= res["threads"] + limit


def fmt_time(res, key, limit, f):
    if not timed(res, limit):
        return f"not measured (load {max(res['load']):.1f})"
    return f.format(res[key])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "docs"))
    ap.add_argument("--json", default=os.path.join(ROOT, "build", "bench", "cost_curve.json"))
    ap.add_argument("--peer-python", default=os.environ.get("QLORA_PEER_PYTHON", ""))
    ap.add_argument("--load-limit", type=float, default=1.0)
    ap.add_argument("--from-json", default="", help="re-render docs from an earlier run's JSON (runs nothing)")
    a = ap.parse_args()
    if not os.access(BENCH, os.X_OK):
        raise SystemExit("[curve] bin/qlora-bench is missing: run make first")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("[curve] needs matplotlib (Debian: apt-get install python3-matplotlib; scripts/setup.sh)")

    t_start = time.time()
    results = []
    if a.from_json:  # re-render the table and figure of an earlier run, nothing is run
        with open(a.from_json) as f:
            d = json.load(f)
        a.quick = d["quick"]
        t_start -= d.get("minutes", 0) * 60
    for (shape, L, T, r, steps, warm) in ([] if a.from_json else grid(a.quick)):
        for mode in MODES:
            cmd = bench_cmd(shape, L, T, r, mode, steps, warm)
            l0 = load1()
            t0 = time.time()
            res = run_json(cmd)
            res["load"] = [l0, load1()]
            res["wall_s"] = time.time() - t0
            res["cmd"] = " ".join(["bin/qlora-bench"] + cmd[1:])
            res["full_depth"] = FULL_DEPTH[shape]
            res["shape"] = shape
            res["predicted_full_depth_mb"] = plan_full(shape, T, r, mode)
            results.append(res)
            print(f"[curve] {shape} L{L} seq {T} r {r} {mode}: RSS {res['peak_rss_mb']:.0f} MiB "
                  f"(predicted {res['predicted_peak_mb']:.0f}), {res['tokens_per_s']:.1f} tok/s, "
                  f"load {res['load'][0]:.1f}/{res['load'][1]:.1f}, {res['wall_s']:.0f}s", flush=True)
    peers = []
    if a.from_json:
        results, peers = d["points"], d["peers"]
    elif a.peer_python:
        pts = sorted({(L, T) for (s, L, T, r, _, _) in grid(a.quick) if s == "smollm2-135m" and r == 16})
        for (L, T) in pts:
            p = peer_point(a.peer_python, L, T)
            if p:
                p.update({"layers": L, "seq": T})
                peers.append(p)
                print(f"[curve] peer torch_lora_ref L{L} seq {T}: RSS {p['peak_rss_mb']:.0f} MiB, "
                      f"{p['tokens_per_s']:.0f} tok/s", flush=True)
    if not a.from_json:
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"quick": a.quick, "points": results, "peers": peers,
                       "minutes": (time.time() - t_start) / 60,
                       "date": time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, f, indent=1)

    # ---- growth laws (least squares on what ran) ----
    laws = []
    shapes = list(dict.fromkeys(r["shape"] for r in results))
    for shape in shapes:
        for mode in MODES:
            pts = [r for r in results if r["shape"] == shape and r["checkpointing_mode"] == mode and r["lora_r"] == 16]
            # one depth per law: the depth most points of this shape ran at
            Ls = [p["layers"] for p in pts]
            if Ls:
                pts = [p for p in pts if p["layers"] == max(set(Ls), key=Ls.count)]
            pts = sorted({r["seq"]: r for r in pts}.values(), key=lambda r: r["seq"])
            if len(pts) >= 2:
                fr = fit_line([p["seq"] for p in pts], [p["arena_peak_mb"] for p in pts])
                att = [p["op_seconds_per_step"]["attention"] / max(1e-9, sum(p["op_seconds_per_step"].values()))
                       for p in pts]
                if fr:
                    laws.append(f"| {shape} ({pts[0]['layers']} layers) | {mode} | activation arena = "
                                f"{fr[0]:.0f} MiB + {1024 * fr[1]:.1f} MiB per 1k tokens ({rsq(fr, len(pts))}, "
                                f"seq {pts[0]['seq']}–{pts[-1]['seq']}) | attention's share of op time "
                                f"{100 * att[0]:.0f} % → {100 * att[-1]:.0f} %"
                                f"{' (loaded machine: shares indicative only)' if not all(timed(p, a.load_limit) for p in pts) else ''} |")
            rp = [r for r in results if r["shape"] == shape and r["checkpointing_mode"] == mode]
            if rp:
                Ls = [p["layers"] for p in rp]
                rp = [p for p in rp if p["layers"] == max(set(Ls), key=Ls.count)]
            seqs = {r["seq"] for r in rp}
            for T in sorted(seqs):
                rr = sorted({r["lora_r"]: r for r in rp if r["seq"] == T}.values(), key=lambda r: r["lora_r"])
                if len(rr) >= 3:
                    fr = fit_line([p["lora_r"] for p in rr], [p["peak_rss_mb"] for p in rr])
                    if fr:
                        laws.append(f"| {shape} ({rr[0]['layers']} layers) | {mode} | peak RSS = {fr[0]:.0f} MiB + "
                                    f"{fr[1]:.2f} MiB per unit of r at seq {T} ({rsq(fr, len(rr))}, r "
                                    f"{rr[0]['lora_r']}–{rr[-1]['lora_r']}) | |")

    # ---- table ----
    md = []
    title = "QUICK subset" if a.quick else "full curve"
    md.append(f"# Cost curve ({title})\n")
    md.append(f"Generated by `{'QUICK=1 ' if a.quick else ''}make bench-curve` (bench/cost_curve.py) on "
              f"{d['date'] if a.from_json else time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
              f"{len(results)} qlora-bench runs in {(time.time() - t_start) / 60:.1f} min. Batch 1, LoRA on all 7 "
              f"linears (alpha 2r, no dropout), AdamW, bf16 GEMMs; random NF4 base of the shape.\n")
    md.append("Columns: **layers** = how many of the shape's layers ran (`--layers`; tokens/s, RSS and the planner "
              "check are for what ran — nothing is scaled); **RSS** = measured peak resident memory; **pred.** = "
              "the planner for what ran, and its error; **pred. full depth** = the planner for all layers (a "
              "prediction only, not measured when layers < full). tokens/s and MFU (model FLOPs over the bf16 GEMM "
              f"peak measured in the same run) are printed only when the 1-minute load stayed ≤ the bench's "
              f"threads + {a.load_limit:g} before and after the point.\n")
    md.append("| shape | layers | seq | r | ckpt | tokens/s | MFU | RSS MiB | pred. MiB (err) | arena MiB | "
              "pred. full depth MiB | command |")
    md.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    worst = 0.0
    for r in results:
        err = (r["predicted_peak_mb"] - r["peak_rss_mb"]) / r["peak_rss_mb"]
        worst = max(worst, abs(err))
        full = f"{r['predicted_full_depth_mb']:.0f}" + ("" if r["layers"] == r["full_depth"] else " (predicted)")
        md.append(f"| {r['shape']} | {r['layers']}/{r['full_depth']} | {r['seq']} | {r['lora_r']} | "
                  f"{r['checkpointing_mode']} | {fmt_time(r, 'tokens_per_s', a.load_limit, '{:.1f}')} | "
                  f"{fmt_time(r, 'mfu', a.load_limit, '{:.3f}')} | {r['peak_rss_mb']:.0f} | "
                  f"{r['predicted_peak_mb']:.0f} ({100 * err:+.1f} %) | {r['arena_peak_mb']:.0f} | {full} | "
                  f"`{r['cmd']}` |")
    md.append(f"\nPlanner vs measured peak RSS: worst error {100 * worst:.1f} % over {len(results)} points.\n")
    if peers:
        md.append("Peer: `../shared/bench/torch_lora_ref.py` (plain PyTorch, bf16 autocast, unquantized, no "
                  "checkpointing; SmolLM2-135M shape, r 16, batch 1).\n")
        md.append("| layers | seq | torch | tokens/s | RSS MiB | qlora RSS off / selective / on (ratio to peer) | command |")
        md.append("|---:|---:|---|---:|---:|---|---|")
        for p in peers:
            ours = {r["checkpointing_mode"]: r for r in results
                    if r["shape"] == "smollm2-135m" and r["layers"] == p["layers"] and r["seq"] == p["seq"]
                    and r["lora_r"] == 16}
            cells = " / ".join(f"{ours[m]['peak_rss_mb']:.0f} ({ours[m]['peak_rss_mb'] / p['peak_rss_mb']:.2f})"
                               for m in MODES if m in ours)
            tps = (f"{p['tokens_per_s']:.0f}" if max(p["load"]) <= 2 + a.load_limit
                   else f"not measured (load {max(p['load']):.1f})")
            md.append(f"| {p['layers']} | {p['seq']} | {p['torch']} | {tps} | {p['peak_rss_mb']:.0f} | {cells} | "
                      f"`{p['cmd']}` |")
        md.append("")
    if laws:
        md.append("Growth laws (least squares over the points above):\n")
        md.append("| shape | ckpt | law | time |")
        md.append("|---|---|---|---|")
        md.extend(laws)
        md.append("")
    os.makedirs(a.out_dir, exist_ok=True)
    with open(os.path.join(a.out_dir, "cost_curve.md"), "w") as f:
        f.write("\n".join(md) + "\n")

    # ---- figure: memory vs seq and vs r (measured solid, predicted dashed); tokens/s vs seq where timed ----
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colors = {"off": "tab:red", "selective": "tab:blue", "on": "tab:green"}
    styles = ["o", "s", "^"]
    for si, shape in enumerate(shapes):
        for mode in MODES:
            pts = sorted([r for r in results if r["shape"] == shape and r["checkpointing_mode"] == mode
                          and r["lora_r"] == 16], key=lambda r: r["seq"])
            pts = list({p["seq"]: p for p in pts}.values())
            if not pts:
                continue
            lab = f"{shape} ({pts[0]['layers']}/{pts[0]['full_depth']} layers) {mode}"
            x = [p["seq"] for p in pts]
            axes[0].plot(x, [p["peak_rss_mb"] for p in pts], marker=styles[si % 3], color=colors[mode], label=lab)
            axes[0].plot(x, [p["predicted_peak_mb"] for p in pts], ls="--", color=colors[mode], alpha=0.6)
            tp = [(p["seq"], p["tokens_per_s"]) for p in pts if timed(p, a.load_limit)]
            if tp:
                axes[2].plot([t[0] for t in tp], [t[1] for t in tp], marker=styles[si % 3], color=colors[mode], label=lab)
            rp = sorted([r for r in results if r["shape"] == shape and r["checkpointing_mode"] == mode],
                        key=lambda r: r["lora_r"])
            seq_r = max({r["seq"] for r in rp}, key=lambda T: sum(1 for r in rp if r["seq"] == T))
            rp = [r for r in rp if r["seq"] == seq_r]
            if len(rp) >= 2:
                axes[1].plot([p["lora_r"] for p in rp], [p["peak_rss_mb"] for p in rp], marker=styles[si % 3],
                             color=colors[mode], label=f"{shape} {mode} (seq {seq_r})")
    for p in peers:
        axes[0].scatter([p["seq"]], [p["peak_rss_mb"]], marker="x", color="black", s=60,
                        label="torch_lora_ref (peer)" if p is peers[0] else None)
    axes[0].set(xscale="log", yscale="log", xlabel="sequence length (tokens, batch 1)", ylabel="peak RSS (MiB)",
                title="memory vs sequence (solid measured, dashed planner)")
    axes[1].set(xscale="log", xlabel="LoRA rank r", ylabel="peak RSS (MiB)", title="memory vs LoRA rank")
    axes[2].set(xscale="log", xlabel="sequence length", ylabel="tokens/s", title="throughput vs sequence")
    if not axes[2].lines:
        axes[2].text(0.5, 0.5, "not measured\n(loaded machine: every point\nabove the load limit)",
                     ha="center", va="center", transform=axes[2].transAxes, fontsize=13)
    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6.5)
    fig.suptitle(f"qlora cost curve ({title}; {'layers cut as the table says' if any(r['layers'] != r['full_depth'] for r in results) else 'full depth'})")
    fig.tight_layout()
    fig.savefig(os.path.join(a.out_dir, "cost_curve.png"), dpi=110)
    print(f"[curve] wrote {os.path.join(a.out_dir, 'cost_curve.md')}, cost_curve.png and {a.json}; "
          f"planner worst error {100 * worst:.1f} %")


if __name__ == "__main__":
    main()
