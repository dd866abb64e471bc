"""`make bench`: qlora-bench against its peers, side by side, in one run.

Runs (same machine, back to back, load printed with each figure):
  ours    bin/qlora-bench, SmolLM2-135M shape, seq 512 x batch 4, LoRA r 16 on all linears, AdamW,
          gradient checkpointing off and on; Llama-2-7B shape, seq 512 x batch 1, one step, checkpointing on
  peer a  bench/peer_peft.py: transformers + PEFT + bitsandbytes NF4 (QLoRA), same shape/LoRA/AdamW, ckpt off and on
  peer b  ../shared/bench/torch_lora_ref.py bf16: plain PyTorch, bf16 autocast, unquantized (no checkpointing mode)
and prints tokens/s, peak RSS and the ratios ours / faster peer.

usage: python bench/compare.py [--steps N] [--skip-7b] [--out build/bench/results.json]
(run with the peers' venv python; `bench/run_peers.sh` sets that up)
"""
import argparse, json, os, re, subprocess, sys, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load():
    return open("/proc/loadavg").read().split()[0]


def run(cmd, label):
    print(f"[bench] {label}: {' '.join(cmd)}  (load {load()})", flush=True)
    t0 = time.time()
    p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        print(p.stdout[-2000:], p.stderr[-4000:], sep="\n")
        return None
    lines = [l for l in p.stdout.strip().splitlines() if l.strip()]
    print(f"[bench] {label}: done in {time.time() - t0:.0f}s", flush=True)
    return lines


def ours(args, shape, ckpt, seq, batch, steps, warmup=1):
    out = run([os.path.join(ROOT, "bin/qlora-bench"), "--shape", shape, "--seq", str(seq), "--batch", str(batch),
               "--lora-r", "16", "--checkpointing", ckpt, "--steps", str(steps), "--warmup", str(warmup)],
              f"qlora {shape} ckpt {ckpt}")
    if not out:
        return None
    for l in out[:-1]:
        print("    " + l)
    r = json.loads(out[-1])
    r["load"] = load()
    return r


def peft_peer(args, ckpt):
    out = run([sys.executable, os.path.join(ROOT, "bench/peer_peft.py"), "--seq", "512", "--batch", "4",
               "--lora-r", "16", "--checkpointing", ckpt, "--steps", str(args.steps)], f"peft+bnb ckpt {ckpt}")
    if not out:
        return None
    r = json.loads(out[-1])
    r["load"] = load()
    return r


def torch_ref(args):
    ref = os.path.join(ROOT, "..", "shared", "bench", "torch_lora_ref.py")
    import resource
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = run([sys.executable, ref, "bf16", "30", "512", "4"], "torch_lora_ref bf16")
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime)
    if not out:
        return None
    m = re.search(r"torch (\S+) .*?: (\d+) tok/s, ([\d.]+) s/step, loss ([\d.]+), peak RSS (\d+) MiB", out[-1])
    if not m:
        print("[bench] cannot parse: " + out[-1])
        return None
    # the script times 3 steps after a warm-up step; its CPU time is only known for the whole
    # process (model init + 4 steps): an upper bound per step
    return {"peer": "torch_lora_ref bf16", "torch": m.group(1), "tokens_per_s": float(m.group(2)),
            "s_per_step": float(m.group(3)), "peak_rss_mb": float(m.group(5)), "load": load(),
            "cpu_s_per_step_upper": child_cpu / 4}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--skip-7b", action="store_true")
    ap.add_argument("--out", default=os.path.join(ROOT, "build/bench/results.json"))
    args = ap.parse_args()
    res = {}
    res["ours_off"] = ours(args, "smollm2-135m", "off", 512, 4, args.steps)
    res["peft_off"] = peft_peer(args, "off")
    res["torch_ref"] = torch_ref(args)
    res["ours_on"] = ours(args, "smollm2-135m", "on", 512, 4, args.steps)
    res["peft_on"] = peft_peer(args, "on")
    if not args.skip_7b:
        res["ours_7b"] = ours(args, "llama2-7b", "on", 512, 1, 1, warmup=0)
    # The same model FLOPs per token are done by every run of the SmolLM2 shape (forward, input
    # gradients, LoRA, attention), so a peer's tokens/s converts to an MFU against the bf16 GEMM peak
    # qlora measured in this run; 1/that MFU is the largest tokens/s ratio any implementation could
    # reach against that peer on this machine (at 100% of the GEMM peak).
    ref = res.get("ours_off") or res.get("ours_on")
    if ref:
        for k in ("peft_off", "peft_on", "torch_ref"):
            if res.get(k):
                res[k]["mfu_vs_our_peak"] = res[k]["tokens_per_s"] * ref["model_gflop_per_token"] / ref["peak_gflops"]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(res, open(args.out, "w"), indent=1)

    def f(r, k, fmt="{:.1f}"):
        return fmt.format(r[k]) if r and k in r else "n/a"

    print()
    print("| run | tokens/s | s/step | CPU s/step | peak RSS MiB | MFU | load |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    names = {"ours_off": "qlora, SmolLM2 shape, ckpt off", "ours_on": "qlora, SmolLM2 shape, ckpt on",
             "peft_off": "transformers+PEFT+bnb NF4, ckpt off", "peft_on": "transformers+PEFT+bnb NF4, ckpt on",
             "torch_ref": "torch_lora_ref bf16 (no ckpt)", "ours_7b": "qlora, Llama-2-7B shape, seq 512 x 1, ckpt on"}
    for k, name in names.items():
        r = res.get(k)
        if k not in res:
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r and "mfu" in r else "-"
        cpu = f(r, "cpu_s_per_step") if r and "cpu_s_per_step" in r else (
            "≤" + f(r, "cpu_s_per_step_upper") if r and "cpu_s_per_step_upper" in r else "n/a")
        print(f"| {name} | {f(r, 'tokens_per_s')} | {f(r, 's_per_step', '{:.2f}')} | {cpu} | "
              f"{f(r, 'peak_rss_mb', '{:.0f}')} | {mfu} | {r['load'] if r else '-'} |")
    print()
    for ck in ("off", "on"):
        o = res.get(f"ours_{ck}")
        peers = [p for p in (res.get(f"peft_{ck}"), res.get("torch_ref")) if p]
        if not o or not peers:
            continue
        fast = max(peers, key=lambda p: p["tokens_per_s"])
        print(f"ckpt {ck}: faster peer = {fast['peer']}{' (no ckpt)' if fast is res.get('torch_ref') else ''}: "
              f"tok/s ours/peer = {o['tokens_per_s'] / fast['tokens_per_s']:.2f}x, "
              f"peak RSS ours/peer = {o['peak_rss_mb'] / fast['peak_rss_mb']:.3f} "
              f"(1/{fast['peak_rss_mb'] / o['peak_rss_mb']:.1f}); MFU {100 * o['mfu']:.1f}%")
        for p in peers:
            print(f"    vs {p['peer']}{'' if 'checkpointing' not in p else ' ckpt ' + ck}: "
                  f"tok/s {o['tokens_per_s'] / p['tokens_per_s']:.2f}x, peak RSS 1/{p['peak_rss_mb'] / o['peak_rss_mb']:.1f}")
    if ref:
        fpt, peak = ref["model_gflop_per_token"], ref["peak_gflops"]
        print(f"peak bound: {peak:.1f} GFLOP/s measured bf16 GEMM peak / {fpt:.4f} GFLOP per token = "
              f"{peak / fpt:.1f} tokens/s at 100% MFU")
        for k in ("peft_off", "peft_on", "torch_ref"):
            p = res.get(k)
            if p:
                pm = p["mfu_vs_our_peak"]
                print(f"    {names[k]}: MFU {100 * pm:.1f}% of the same peak; the largest possible ratio against it "
                      f"is {1 / pm:.2f}x")
    for k in ("ours_off", "ours_on", "ours_7b"):
        o = res.get(k)
        if o:
            err = 100 * (o["predicted_peak_mb"] - o["peak_rss_mb"]) / o["peak_rss_mb"]
            print(f"memory planner {k}: predicted {o['predicted_peak_mb']:.0f} MiB, measured {o['peak_rss_mb']:.0f} MiB "
                  f"({err:+.1f}%)")
    print(json.dumps({k: ({kk: v[kk] for kk in ("tokens_per_s", "peak_rss_mb", "mfu") if kk in v} if v else None)
                      for k, v in res.items()}))


if __name__ == "__main__":
    main()
