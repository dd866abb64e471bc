#!/usr/bin/env python3
"""make_fuzz_seeds_hf.py — write the seed inputs of the HF-directory fuzz target (fuzz/fuzz_hf.c).

usage: scripts/make_fuzz_seeds_hf.py TOKENIZER_JSON OUT_DIR

TOKENIZER_JSON is a real byte-level BPE tokenizer.json (the seeds in fuzz/seeds/hf/ were made from
SmolLM2-135M's, as qlora writes it from the GGUF: data/tokenizer_json.c); its vocabulary is cut to
the first VOCAB ids (the special tokens, the 256 byte symbols and the earliest merges) so that a whole
model directory fits in the fuzzer's 64 KiB input limit. Each seed is one model directory, its files
joined by the separator line of fuzz/fuzz_hf.c in the order that file lists: config.json,
tokenizer.json, tokenizer_config.json, model.safetensors.index.json, model.safetensors,
model-00001-of-00002.safetensors (an empty part: no such file). The weights are small random bf16
tensors with the shapes of a one-layer LlamaForCausalLM. Standard library only.
"""
import json
import random
import struct
import sys

SEP = b"\n--qlora-fuzz-file--\n"
VOCAB, D, FF, HEADS, KV = 300, 16, 32, 2, 1


def safetensors(tensors):
    """The safetensors layout: u64 header length, JSON header, then the data (bf16 little-endian)."""
    header, blobs, off = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in tensors:
        n = 1
        for s in shape:
            n *= s
        rnd = random.Random(name)
        data = b"".join(struct.pack("<H", (0x3C00 + rnd.randrange(0, 0x200)) ^ (0x8000 * rnd.randrange(2)))
                        for _ in range(n))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tok = json.load(open(sys.argv[1], encoding="utf-8"))
    model = tok["model"]
    keep = {t: i for t, i in model["vocab"].items() if i < VOCAB}
    model["vocab"] = keep
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        if a in keep and b in keep and (a + b) in keep:
            merges.append(m)
    model["merges"] = merges
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] < VOCAB]
    tok_bytes = json.dumps(tok, ensure_ascii=False, separators=(",", ":")).encode()

    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": D, "intermediate_size": FF, "num_hidden_layers": 1, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "vocab_size": VOCAB, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    }
    hd = D // HEADS
    layer = [
        ("model.layers.0.input_layernorm.weight", (D,)),
        ("model.layers.0.self_attn.q_proj.weight", (HEADS * hd, D)),
        ("model.layers.0.self_attn.k_proj.weight", (KV * hd, D)),
        ("model.layers.0.self_attn.v_proj.weight", (KV * hd, D)),
        ("model.layers.0.self_attn.o_proj.weight", (D, HEADS * hd)),
        ("model.layers.0.post_attention_layernorm.weight", (D,)),
        ("model.layers.0.mlp.gate_proj.weight", (FF, D)),
        ("model.layers.0.mlp.up_proj.weight", (FF, D)),
        ("model.layers.0.mlp.down_proj.weight", (D, FF)),
    ]
    top = [("model.embed_tokens.weight", (VOCAB, D)), ("model.norm.weight", (D,))]
    tok_cfg = {"bos_token": None, "eos_token": "<|endoftext|>", "add_bos_token": False,
               "chat_template": tok.get("chat_template") or
               "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}

    def seed(name, parts):
        with open(f"{sys.argv[2]}/{name}", "wb") as f:
            f.write(SEP.join(parts))

    cfg = json.dumps(config, indent=2).encode()
    # 1: one model.safetensors, no tokenizer_config.json, no index
    seed("single_file", [cfg, tok_bytes, b"", b"", safetensors(top + layer), b""])
    # 2: two shards through model.safetensors.index.json
    index = {"metadata": {"total_size": 0},
             "weight_map": {**{n: "model-00001-of-00002.safetensors" for n, _ in top},
                            **{n: "model.safetensors" for n, _ in layer}}}
    seed("sharded", [cfg, tok_bytes, json.dumps(tok_cfg).encode(), json.dumps(index, indent=2).encode(),
                     safetensors(layer), safetensors(top)])
    # 3: an untied head and a bitsandbytes quantization_config (refused or read, never crashed on)
    config2 = dict(config, tie_word_embeddings=False,
                   quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True,
                                        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True})
    seed("untied_bnb", [json.dumps(config2, indent=2).encode(), tok_bytes, json.dumps(tok_cfg).encode(), b"",
                        safetensors(top + layer + [("lm_head.weight", (VOCAB, D))]), b""])


if __name__ == "__main__":
    main()
