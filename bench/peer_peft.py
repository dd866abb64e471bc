"""Peer (a) for qlora-bench: transformers + PEFT + bitsandbytes NF4 QLoRA on the CPU.

Same shape as `qlora-bench --shape smollm2-135m` (random weights: LlamaConfig with
SmolLM2-135M's dimensions, saved once and re-loaded through bitsandbytes' 4-bit
path: NF4, blocksize 64, double quantization, bf16 compute), LoRA r on all seven
linears with alpha = 2r and no dropout, torch AdamW, bf16 autocast, optional
gradient checkpointing. Prints one JSON line: tokens_per_s, peak_rss_mb, ...

usage: python peer_peft.py --seq 512 --batch 4 --lora-r 16 --checkpointing on|off [--steps 3]
"""
import argparse, json, os, resource, sys, tempfile, time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--checkpointing", choices=["on", "off"], default="off")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig
    from peft import LoraConfig, get_peft_model
    import transformers, peft, bitsandbytes

    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as d:
        AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).save_pretrained(d)
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(d, quantization_config=bnb, torch_dtype=torch.bfloat16,
                                                     device_map="cpu")
    if args.checkpointing == "on":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lc = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, bias="none",
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                    task_type="CAUSAL_LM")
    model = get_peft_model(model, lc)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up
    t0, c0 = time.time(), time.process_time()
    for _ in range(args.steps):
        loss = step()
    dt = (time.time() - t0) / args.steps
    dc = (time.process_time() - c0) / args.steps
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"peer": "transformers+peft+bitsandbytes NF4", "torch": torch.__version__,
                      "transformers": transformers.__version__, "peft": peft.__version__,
                      "bitsandbytes": bitsandbytes.__version__, "seq": args.seq, "batch": args.batch,
                      "lora_r": args.lora_r, "checkpointing": args.checkpointing == "on", "steps": args.steps,
                      "threads": args.threads, "tokens_per_s": args.batch * args.seq / dt, "s_per_step": dt, "cpu_s_per_step": dc,
                      "peak_rss_mb": rss, "loss": loss}))


if __name__ == "__main__":
    sys.exit(main())
