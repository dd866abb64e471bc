#!/usr/bin/env python3
"""`make bench-curve`: how a LoRA step's cost grows with sequence length, LoRA rank, model shape and
checkpointing mode, measured with bin/qlora-bench, plotted and tabulated.

usage: python3 bench/cost_curve.py [--quick] [--out-dir DIR] [--json FILE] [--peer-python PY]
                                   [--load-limit X] [--max-mib M] [--rate-gflops G] [--from-json FILE]
                                   [--select KEY=V,...] [--one-step] [--dry-run] [--repredict]

Grid (full): shapes smollm2-135m (all 30 layers), smollm2-1.7b (first 6 of 24 layers), llama3-8b
(first 2 of 32 layers); checkpointing off / selective / on (full); sequence length 256 ... 8192 at
LoRA r 16, and LoRA r 8 ... 128 at sequence 512; batch 1; plus SmolLM2-1.7B and Llama-3-8B at full
depth (seq 512, r 16), where the planner says they fit. --quick: a subset that runs in minutes
(SmolLM2-135M at full depth: sequence 256 and 1024, r 16 and 64; SmolLM2-1.7B cut to 2 layers and
Llama-3-8B to 1, at sequence 256; one step each).

Memory first: before each point the planner (qlora-bench --plan-only, what will run) predicts its
peak; a point predicted over --max-mib (default: 90 % of MemAvailable at the start) is not run and
is listed as skipped with its prediction. The full curve's expected duration (model FLOPs of every
point at --rate-gflops, with recomputation) is printed at the start.

Nothing is extrapolated: where a shape runs fewer layers than it has, the table says how many ran;
tokens/s and RSS are those of what ran, the planner's prediction is given for what ran (the check
of the planner) and, separately, for the whole depth (a prediction only, marked so). MFU needs no
scaling (model FLOPs of what ran over the bf16 GEMM peak qlora-bench measures in the same run).

Timings on a loaded machine mislead: each point records the 1-minute load average before and after
it; when either exceeds the cores qlora-bench uses plus --load-limit (default 1.0), the point's
tokens/s and MFU are printed as "not measured (load X)". Memory (peak RSS, arena) does not depend on
load and is always reported.

Where it writes: a full run on a quiet machine (every timed point within the load limit) writes
docs/cost_curve.md and docs/cost_curve.png; a full run with any point over the load limit writes
docs/bench/curve-LOADED-<date>.md/.png instead (its timings are not results); --quick writes
build/bench/cost_curve-quick.md/.png. --out-dir/--name override.

The peer (../shared/bench/torch_lora_ref.py: plain PyTorch, bf16 autocast, no checkpointing; only
the SmolLM2-135M shape, r 16; arguments: mode layers seq batch) runs beside the SmolLM2-135M sequence
points when --peer-python (or $QLORA_PEER_PYTHON) names a python with torch; its memory is predicted
from a line through its own measured points (the first from PEER_MIB_* below) and skipped likewise.
"""
import argparse, json, math, os, re, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bin", "qlora-bench")
PEER = os.path.join(ROOT, "..", "shared", "bench", "torch_lora_ref.py")
MODES = ["off", "selective", "on"]
FULL_DEPTH = {"smollm2-135m": 30, "smollm2-1.7b": 24, "llama3-8b": 32}
# the peer's peak RSS before any of its points ran: 2109 MiB at seq 256 and 3572 MiB at seq 1024 (30 layers,
# batch 1, torch 2.15; the QUICK run of 2026-12-07 01:40 UTC, docs/cost_curve.md of commit 4c3a7c4), the line through them
PEER_MIB_0, PEER_MIB_PER_TOKEN = 1621.0, 1.905
# model FLOPs a step runs per model FLOP (recomputation): selective recomputes the MLP half's forward, full every
# block's forward (2 of the 4·P per token of a frozen base); for the duration estimate only
RECOMPUTE = {"off": 1.0, "selective": 1.35, "on": 1.5}


def load1():
    return float(open("/proc/loadavg").read().split()[0])


def grid(quick):
    """(shape, layers, seq, r, steps, warmup) points; every mode is run at each."""
    pts = []
    if quick:
        for T in (256, 1024):
            pts.append(("smollm2-135m", 30, T, 16, 1, 0))
        pts.append(("smollm2-135m", 30, 256, 64, 1, 0))
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
    for shape in ("smollm2-1.7b", "llama3-8b"):  # the whole depth, where it fits
        pts.append((shape, FULL_DEPTH[shape], 512, 16, 1, 1))
    return pts


def bench_cmd(shape, L, T, r, mode, steps, warmup, calib=None):
    c = [BENCH, "--shape", shape, "--seq", str(T), "--batch", "1", "--lora-r", str(r), "--checkpointing", mode,
         "--steps", str(steps), "--warmup", str(warmup)]
    if L != FULL_DEPTH[shape]:
        c += ["--layers", str(L)]
    if calib is not None:
        c += ["--calib-seconds", f"{calib:g}"]
    return c


def run_json(cmd):
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-2000:])
        raise SystemExit(f"[curve] failed: {' '.join(cmd)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def plan(shape, T, r, mode, L=None):
    """The planner for `L` layers of the shape (all when None): (predicted MiB, model GFLOP per token); a
    prediction, never a measurement."""
    c = [BENCH, "--plan-only", "--shape", shape, "--seq", str(T), "--batch", "1", "--lora-r", str(r),
         "--checkpointing", mode]
    if L is not None and L != FULL_DEPTH[shape]:
        c += ["--layers", str(L)]
    j = run_json(c)
    return j["predicted_bytes"] / 1048576.0, j["model_gflop_per_token"]


def plan_full(shape, T, r, mode):
    return plan(shape, T, r, mode)[0]


def mem_available_mib():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return float(line.split()[1]) / 1024.0
    return 0.0


def peer_predicted_mib(peers, T):
    """The peer's peak RSS at seq T: the line through its measured points (two or more), else PEER_MIB_*."""
    peers = [p for p in peers if not p.get("skipped")]
    fr = fit_line([p["seq"] for p in peers], [p["peak_rss_mb"] for p in peers]) if len(peers) >= 2 else None
    return fr[0] + fr[1] * T if fr else PEER_MIB_0 + PEER_MIB_PER_TOKEN * T


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
    return bool(res.get("load")) and max(res["load"]) <= res["threads"] + limit


def fmt_time(res, key, limit, f):
    if not timed(res, limit):
        return f"not measured (load {max(res['load']):.1f})" if res.get("load") else "not measured (load not recorded)"
    return f.format(res[key])


def selected(sel, shape, L, T, r, mode):
    """Whether a grid point matches every KEY=VALUE of `sel` (--select)."""
    have = {"shape": shape, "layers": str(L), "seq": str(T), "r": str(r), "ckpt": mode}
    for kv in sel.split(","):
        k, _, v = kv.partition("=")
        if k.strip() not in have:
            raise SystemExit(f"[curve] --select {sel}: unknown key {k!r} (expected shape, layers, seq, r, ckpt)")
        if have[k.strip()] != v.strip():
            return False
    return True


def run_desc(quick, select, one_step=False, max_mib=0):
    omp = os.environ.get("OMP_WAIT_POLICY", "")  # changes timings on a loaded machine, so it is recorded
    return (f"`OMP_WAIT_POLICY={omp} " + run_desc_(quick, select, one_step, max_mib)[1:]) if omp else \
        run_desc_(quick, select, one_step, max_mib)


def run_desc_(quick, select, one_step, max_mib):
    if not select and not one_step:
        return f"`{'QUICK=1 ' if quick else ''}{f'MAX_MIB={max_mib:g} ' if max_mib else ''}make bench-curve`"
    return (f"`python3 bench/cost_curve.py{' --quick' if quick else ''}{' --one-step' if one_step else ''}"
            f"{f' --max-mib {max_mib:g}' if max_mib else ''} " + " ".join(f"--select {x}" for x in select) + "`")


def fmt_dur(sec):
    return f"{sec / 3600:.1f} h" if sec >= 5400 else f"{sec / 60:.0f} min"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default="", help="where the table and figure go (default: see the docstring)")
    ap.add_argument("--name", default="", help="file name stem (default cost_curve, or curve-LOADED-<date>)")
    ap.add_argument("--json", default=os.path.join(ROOT, "build", "bench", "cost_curve.json"))
    ap.add_argument("--peer-python", default=os.environ.get("QLORA_PEER_PYTHON", ""))
    ap.add_argument("--load-limit", type=float, default=1.0)
    ap.add_argument("--max-mib", type=float, default=float(os.environ.get("CURVE_MAX_MIB", "0") or 0),
                    help="skip points the planner predicts above this (MiB; default 90 %% of MemAvailable)")
    ap.add_argument("--rate-gflops", type=float, default=300.0,
                    help="model GFLOP/s assumed for the duration estimate (the quiet 2-core machine ran ~375)")
    ap.add_argument("--one-step", action="store_true",
                    help="every point runs one step, no warmup (the peak RSS is reached in the first step: the "
                         "optimizer state and the arena are allocated there; for a memory-only run on a loaded "
                         "machine, whose timings are no result anyway)")
    ap.add_argument("--dry-run", action="store_true", help="print the points, the skipped ones and the expected "
                                                            "duration, and stop")
    ap.add_argument("--select", action="append", default=[],
                    help="run only the grid points matching every KEY=VALUE of a comma list (keys shape, layers, seq, "
                         "r, ckpt); several --select: any of them (a subset on a busy machine)")
    ap.add_argument("--from-json", action="append", default=[],
                    help="re-render docs from earlier runs' JSON (runs nothing; several: merged)")
    ap.add_argument("--repredict", action="store_true",
                    help="with --from-json: the planner of this build predicts every measured point again (the "
                         "prediction made at run time is kept beside it as predicted_peak_mb_at_run)")
    a = ap.parse_args()
    if not os.access(BENCH, os.X_OK):
        raise SystemExit("[curve] bin/qlora-bench is missing: run make first")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(f"[curve] {sys.executable} has no matplotlib (Debian: apt-get install python3-matplotlib, "
                         "scripts/setup.sh; or CURVE_PYTHON=a python with it)")

    t_start = time.time()
    results, skipped, peers, runs = [], [], [], []
    if a.from_json:  # re-render the table and figure of an earlier run, nothing is run
        for fn in a.from_json:
            with open(fn) as f:
                d = json.load(f)
            a.quick = a.quick or d["quick"]
            t_start -= d.get("minutes", 0) * 60
            runs.append(d.get("desc") or run_desc(d["quick"], d.get("select", [])))
            results += d["points"]
            skipped += d.get("skipped", [])
            peers += d["peers"]
            limit = d.get("max_mib", 0)
        if a.repredict:
            for r in results:
                r.setdefault("predicted_peak_mb_at_run", r["predicted_peak_mb"])
                r["predicted_peak_mb"] = plan(r["shape"], r["seq"], r["lora_r"], r["checkpointing_mode"], r["layers"])[0]
                r["predicted_full_depth_mb"] = plan_full(r["shape"], r["seq"], r["lora_r"], r["checkpointing_mode"])
            os.makedirs(os.path.dirname(a.json), exist_ok=True)
            with open(a.json, "w") as f:  # the measurements as they were, the predictions of this build
                json.dump(dict(d, points=results, skipped=skipped, peers=peers, repredicted=True), f, indent=1)
    else:
        limit = a.max_mib if a.max_mib > 0 else 0.9 * mem_available_mib()
        runs.append(run_desc(a.quick, a.select, a.one_step, a.max_mib))
        calib = 0.5 if a.quick else None
        # plan every point first: what is skipped, and how long the rest should take
        todo, est = [], 0.0
        for (shape, L, T, r, steps, warm) in grid(a.quick):
            if a.one_step:
                steps, warm = 1, 0
            for mode in MODES:
                if a.select and not any(selected(sel, shape, L, T, r, mode) for sel in a.select):
                    continue
                mib, gft = plan(shape, T, r, mode, L)
                if mib > limit:
                    skipped.append({"shape": shape, "layers": L, "full_depth": FULL_DEPTH[shape], "seq": T, "lora_r": r,
                                    "checkpointing_mode": mode, "predicted_peak_mb": mib, "limit_mb": limit,
                                    "cmd": " ".join(["bin/qlora-bench"] + bench_cmd(shape, L, T, r, mode, steps, warm,
                                                                                   calib)[1:])})
                    continue
                # + the calibration and the random model (~1 GB/s of NF4 and bf16 tables)
                sec = (steps + warm) * T * gft * RECOMPUTE[mode] / a.rate_gflops + (calib or 2.0) + 1.0 + mib / 1024.0
                todo.append((shape, L, T, r, steps, warm, mode, sec))
                est += sec
        print(f"[curve] {'QUICK subset' if a.quick else 'subset (--select)' if a.select else 'full curve'}: {len(todo)} qlora-bench runs, "
              f"{len(skipped)} skipped (predicted over {limit:.0f} MiB); expected duration ~{fmt_dur(est)} "
              f"(model FLOPs at {a.rate_gflops:g} GFLOP/s, recomputation included; a loaded machine takes longer)",
              flush=True)
        for sk in skipped:
            print(f"[curve] skipped: {sk['shape']} L{sk['layers']} seq {sk['seq']} r {sk['lora_r']} "
                  f"{sk['checkpointing_mode']}: predicted {sk['predicted_peak_mb']:.0f} MiB > {limit:.0f} MiB", flush=True)
        if a.dry_run:
            for t in todo:
                print(f"[curve] would run: {t[0]} L{t[1]} seq {t[2]} r {t[3]} {t[6]} (~{fmt_dur(t[7])})")
            return
        done_est = 0.0
        for (shape, L, T, r, steps, warm, mode, sec) in todo:
            cmd = bench_cmd(shape, L, T, r, mode, steps, warm, calib)
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
            done_est += sec
            left = (est - done_est) * (time.time() - t_start) / max(done_est, 1e-9)
            print(f"[curve] {shape} L{L} seq {T} r {r} {mode}: RSS {res['peak_rss_mb']:.0f} MiB "
                  f"(predicted {res['predicted_peak_mb']:.0f}), {res['tokens_per_s']:.1f} tok/s, "
                  f"load {res['load'][0]:.1f}/{res['load'][1]:.1f}, {res['wall_s']:.0f}s; ~{fmt_dur(left)} left",
                  flush=True)
        if a.peer_python:
            pts = sorted({(L, T) for (s_, L, T, r, _, _) in grid(a.quick) if s_ == "smollm2-135m" and r == 16})
            for (L, T) in pts:
                pred = peer_predicted_mib(peers, T)
                if pred > limit:
                    print(f"[curve] peer torch_lora_ref L{L} seq {T}: skipped, predicted {pred:.0f} MiB "
                          f"(a line through its measured points) > {limit:.0f} MiB", flush=True)
                    peers.append({"layers": L, "seq": T, "skipped": True, "predicted_mb": pred,
                                  "cmd": f"python3 ../shared/bench/torch_lora_ref.py bf16 {L} {T} 1"})
                    continue
                p = peer_point(a.peer_python, L, T)
                if p:
                    p.update({"layers": L, "seq": T, "predicted_mb": pred})
                    peers.append(p)
                    print(f"[curve] peer torch_lora_ref L{L} seq {T}: RSS {p['peak_rss_mb']:.0f} MiB "
                          f"(predicted {pred:.0f}), {p['tokens_per_s']:.0f} tok/s", flush=True)
        os.makedirs(os.path.dirname(a.json), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"quick": a.quick, "select": a.select, "desc": runs[0], "points": results, "skipped": skipped, "peers": peers, "max_mib": limit,
                       "minutes": (time.time() - t_start) / 60,
                       "date": time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, f, indent=1)
    measured_peers = [p for p in peers if not p.get("skipped")]
    date = d["date"] if a.from_json else time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    loaded = any(not timed(r, a.load_limit) for r in results)
    out_dir = a.out_dir or (os.path.join(ROOT, "build", "bench") if a.quick
                            else os.path.join(ROOT, "docs", "bench") if loaded else os.path.join(ROOT, "docs"))
    name = a.name or ("cost_curve-quick" if a.quick else f"curve-LOADED-{date[:10]}" if loaded else "cost_curve")

    # ---- growth laws (least squares on what ran) ----
    laws = []
    shapes = list(dict.fromkeys(r["shape"] for r in results))

    def depth_pts(shape, mode, r16=True):
        pts = [r for r in results if r["shape"] == shape and r["checkpointing_mode"] == mode
               and (r["lora_r"] == 16 or not r16)]
        Ls = [p["layers"] for p in pts]  # one depth per law: the depth most points of this shape ran at
        return [p for p in pts if p["layers"] == max(set(Ls), key=Ls.count)] if Ls else []

    def loglog(pts, key):
        return fit_line([math.log(p["seq"]) for p in pts], [math.log(p[key]) for p in pts])

    for shape in shapes:
        for mode in MODES:
            pts = sorted({r["seq"]: r for r in depth_pts(shape, mode)}.values(), key=lambda r: r["seq"])
            if len(pts) >= 2:
                span = f"seq {pts[0]['seq']}–{pts[-1]['seq']}, {rsq(None, len(pts)) if len(pts) == 2 else f'{len(pts)} points'}"
                fr = fit_line([p["seq"] for p in pts], [p["arena_peak_mb"] for p in pts])
                sl, sa = loglog(pts, "peak_rss_mb"), loglog(pts, "arena_peak_mb")
                att = [p["op_seconds_per_step"]["attention"] / max(1e-9, sum(p["op_seconds_per_step"].values()))
                       for p in pts]
                tim = all(timed(p, a.load_limit) for p in pts)
                tps = loglog(pts, "tokens_per_s") if tim else None
                laws.append(f"| {shape} ({pts[0]['layers']}/{pts[0]['full_depth']} layers) | {mode} | peak RSS ∝ T^"
                            f"{sl[1]:.2f} ({pts[0]['peak_rss_mb']:.0f} → {pts[-1]['peak_rss_mb']:.0f} MiB); activation "
                            f"arena ∝ T^{sa[1]:.2f}, = {fr[0]:.0f} MiB + {1024 * fr[1]:.1f} MiB per 1k tokens"
                            f"{f' (R² {fr[2]:.4f})' if len(pts) > 2 else ''}; {span} | attention's share of op time "
                            f"{100 * att[0]:.0f} % → {100 * att[-1]:.0f} %"
                            + (f"; tokens/s ∝ T^{tps[1]:.2f}" if tps else " (loaded machine: shares indicative only)")
                            + " |")
            rp = depth_pts(shape, mode, r16=False)
            for T in sorted({r["seq"] for r in rp}):
                rr = sorted({r["lora_r"]: r for r in rp if r["seq"] == T}.values(), key=lambda r: r["lora_r"])
                if len(rr) >= 2:
                    fr = fit_line([p["lora_r"] for p in rr], [p["peak_rss_mb"] for p in rr])
                    if fr:
                        laws.append(f"| {shape} ({rr[0]['layers']}/{rr[0]['full_depth']} layers) | {mode} | peak RSS = "
                                    f"{fr[0]:.0f} MiB + {fr[1]:.2f} MiB per unit of r at seq {T} ({rsq(fr, len(rr))}, r "
                                    f"{rr[0]['lora_r']}–{rr[-1]['lora_r']}) | |")

    # ---- table ----
    md = []
    partial = a.quick or a.select or any("--select" in x for x in runs)
    title = "QUICK subset" if a.quick and len(runs) == 1 else "subset of the grid" if partial else "full curve"
    md.append(f"# Cost curve ({title}{', LOADED machine: timings are not results' if loaded else ''})\n")
    md.append(f"Generated by {' + '.join(runs)} (bench/cost_curve.py) on {date}, "
              f"{os.cpu_count()} cores, {len(results)} qlora-bench runs in {(time.time() - t_start) / 60:.1f} min"
              f"{f', {len(skipped)} points skipped (predicted over {limit:.0f} MiB)' if skipped else ''}. Batch 1, "
              f"LoRA on all 7 linears (alpha 2r, no dropout), AdamW, bf16 GEMMs; random NF4 base of the shape.\n")
    if loaded:
        md.append("**Taken on a loaded machine** (other jobs running; the load average is in each timing cell): "
                  "tokens/s, MFU and the attention shares are not results. The memory columns do not depend on "
                  "load.\n")
    md.append("Columns: **layers** = how many of the shape's layers ran (`--layers`; tokens/s, RSS and the planner "
              "check are for what ran — nothing is scaled); **RSS** = measured peak resident memory; **pred.** = "
              "the planner for what ran, and its error; **pred. full depth** = the planner for all layers (a "
              "prediction only, not measured when layers < full). tokens/s and MFU (model FLOPs over the bf16 GEMM "
              f"peak measured in the same run: the best of the calibration's runs, and against the median run's rate, "
              "the rate the machine sustains) are printed only when the 1-minute load stayed ≤ the bench's "
              f"threads + {a.load_limit:g} before and after the point.\n")
    md.append("| shape | layers | seq | r | ckpt | tokens/s | MFU (peak / median rate) | RSS MiB | pred. MiB (err) | arena MiB | "
              "pred. full depth MiB | command |")
    md.append("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|")
    worst, over = 0.0, []
    rows = sorted(results + skipped, key=lambda r: (list(FULL_DEPTH).index(r["shape"]), r["layers"], r["lora_r"] != 16,
                                                    r["lora_r"], r["seq"], MODES.index(r["checkpointing_mode"])))
    for r in rows:
        if "peak_rss_mb" not in r:  # skipped: the prediction, never run
            md.append(f"| {r['shape']} | {r['layers']}/{r['full_depth']} | {r['seq']} | {r['lora_r']} | "
                      f"{r['checkpointing_mode']} | skipped | skipped | — | {r['predicted_peak_mb']:.0f} (over the "
                      f"{r['limit_mb']:.0f} MiB limit) | — | — | `{r['cmd']}` |")
            continue
        err = (r["predicted_peak_mb"] - r["peak_rss_mb"]) / r["peak_rss_mb"]
        worst = max(worst, abs(err))
        if abs(err) > 0.15:
            over.append(r)
        full = f"{r['predicted_full_depth_mb']:.0f}" + ("" if r["layers"] == r["full_depth"] else " (predicted)")
        md.append(f"| {r['shape']} | {r['layers']}/{r['full_depth']} | {r['seq']} | {r['lora_r']} | "
                  f"{r['checkpointing_mode']} | {fmt_time(r, 'tokens_per_s', a.load_limit, '{:.1f}')} | "
                  f"{fmt_time(r, 'mfu', a.load_limit, '{:.3f}')}"
                  f"{fmt_time(r, 'mfu_sustained', a.load_limit, ' / {:.3f}') if 'mfu_sustained' in r else ''} | "
                  f"{r['peak_rss_mb']:.0f} | "
                  f"{r['predicted_peak_mb']:.0f} ({100 * err:+.1f} %) | {r['arena_peak_mb']:.0f} | {full} | "
                  f"`{r['cmd']}` |")
    at_run = [r for r in results if "predicted_peak_mb_at_run" in r]
    if at_run:
        w0 = max(abs(r["predicted_peak_mb_at_run"] - r["peak_rss_mb"]) / r["peak_rss_mb"] for r in at_run)
        md.append(f"\nThe **pred.** columns are this build's planner, run again for the measured points (`--repredict`); "
                  f"the planner of the run itself was off by up to {100 * w0:.1f} % "
                  f"({sum(abs(r['predicted_peak_mb_at_run'] - r['peak_rss_mb']) / r['peak_rss_mb'] > 0.15 for r in at_run)}"
                  f" points beyond 15 %; `predicted_peak_mb_at_run` in the JSON).")
    md.append(f"\nPlanner vs measured peak RSS: worst error {100 * worst:.1f} % over {len(results)} points; "
              + ("within 15 % at every point.\n" if not over else
                 f"{len(over)} beyond 15 %: " + ", ".join(f"{r['shape']} L{r['layers']} seq {r['seq']} r {r['lora_r']} "
                                                          f"{r['checkpointing_mode']}" for r in over) + ".\n"))
    if peers:
        md.append("Peer: `../shared/bench/torch_lora_ref.py` (plain PyTorch, bf16 autocast, unquantized, no "
                  "checkpointing; SmolLM2-135M shape, r 16, batch 1). Its memory before a point is predicted from "
                  "a line through its measured points (skipped when over the limit).\n")
        md.append("| layers | seq | torch | tokens/s | RSS MiB (predicted) | qlora RSS off / selective / on (ratio to peer) | command |")
        md.append("|---:|---:|---|---:|---:|---|---|")
        for p in peers:
            if p.get("skipped"):
                md.append(f"| {p['layers']} | {p['seq']} | — | skipped | — ({p['predicted_mb']:.0f}) | | `{p['cmd']}` |")
                continue
            ours = {r["checkpointing_mode"]: r for r in results
                    if r["shape"] == "smollm2-135m" and r["layers"] == p["layers"] and r["seq"] == p["seq"]
                    and r["lora_r"] == 16}
            cells = " / ".join(f"{ours[m]['peak_rss_mb']:.0f} ({ours[m]['peak_rss_mb'] / p['peak_rss_mb']:.2f})"
                               for m in MODES if m in ours)
            tps = (f"{p['tokens_per_s']:.0f}" if max(p["load"]) <= 2 + a.load_limit
                   else f"not measured (load {max(p['load']):.1f})")
            pm = f" ({p['predicted_mb']:.0f})" if "predicted_mb" in p else ""
            md.append(f"| {p['layers']} | {p['seq']} | {p['torch']} | {tps} | {p['peak_rss_mb']:.0f}{pm} | {cells} | "
                      f"`{p['cmd']}` |")
        md.append("")
    if laws:
        md.append("Growth laws (least squares over the points above; T = sequence length, r = LoRA rank):\n")
        md.append("| shape | ckpt | memory | time |")
        md.append("|---|---|---|---|")
        md.extend(laws)
        md.append("")
    os.makedirs(out_dir, exist_ok=True)
    md_path, png_path = os.path.join(out_dir, name + ".md"), os.path.join(out_dir, name + ".png")
    with open(md_path, "w") as f:
        f.write("\n".join(md) + "\n")

    # ---- figure: memory vs seq and vs r (measured solid, predicted dashed); tokens/s vs seq where timed ----
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colors = {"off": "tab:red", "selective": "tab:blue", "on": "tab:green"}
    styles = ["o", "s", "^"]
    for si, shape in enumerate(shapes):
        for mode in MODES:
            pts = sorted({p["seq"]: p for p in depth_pts(shape, mode)}.values(), key=lambda r: r["seq"])
            if not pts:
                continue
            lab = f"{shape} ({pts[0]['layers']}/{pts[0]['full_depth']} layers) {mode}"
            x = [p["seq"] for p in pts]
            axes[0].plot(x, [p["peak_rss_mb"] for p in pts], marker=styles[si % 3], color=colors[mode], label=lab)
            axes[0].plot(x, [p["predicted_peak_mb"] for p in pts], ls="--", color=colors[mode], alpha=0.6)
            tp = [(p["seq"], p["tokens_per_s"]) for p in pts if timed(p, a.load_limit)]
            if tp:
                axes[2].plot([t[0] for t in tp], [t[1] for t in tp], marker=styles[si % 3], color=colors[mode], label=lab)
            rp = depth_pts(shape, mode, r16=False)
            seq_r = max({r["seq"] for r in rp}, key=lambda T: sum(1 for r in rp if r["seq"] == T))
            rp = sorted({r["lora_r"]: r for r in rp if r["seq"] == seq_r}.values(), key=lambda r: r["lora_r"])
            if len(rp) >= 2:
                axes[1].plot([p["lora_r"] for p in rp], [p["peak_rss_mb"] for p in rp], marker=styles[si % 3],
                             color=colors[mode], label=f"{shape} {mode} (seq {seq_r})")
    for p in measured_peers:
        axes[0].scatter([p["seq"]], [p["peak_rss_mb"]], marker="x", color="black", s=60,
                        label="torch_lora_ref (peer)" if p is measured_peers[0] else None)
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
    cut = any(r["layers"] != r["full_depth"] for r in results)
    fig.suptitle(f"qlora cost curve ({title}; {'layers cut as the table says' if cut else 'full depth'}"
                 f"{'; LOADED machine: timings are not results' if loaded else ''})")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    print(f"[curve] wrote {os.path.relpath(md_path, ROOT)}, {os.path.relpath(png_path, ROOT)} and "
          f"{os.path.relpath(a.json, ROOT)}; planner worst error {100 * worst:.1f} %"
          f"{'' if not over else f' ({len(over)} points beyond 15 %)'}")

if __name__ == "__main__":
    main()
