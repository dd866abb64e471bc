/* trainer/memplan.c — predicted peak memory of a training run (see memplan.h).
 *
 * The activation model follows autograd/ops.c and autograd/tensor.c:
 *  - without checkpointing every block is an ag_segment: what stays until
 *    backward is what its ops saved in the keep arena — the block output and
 *    the residual after attention (fp32, RMSNorm backward needs them), the
 *    bf16 GEMM operands of the seven linears (normed inputs, attention output,
 *    SwiGLU output; q, k, v for attention), SwiGLU's g and u (bf16), LoRA's
 *    u = xAᵀ (bf16), per-row statistics; the block's other fp32 outputs live
 *    in the main arena only while the block runs;
 *  - with checkpointing only each block's fp32 input stays, and one block at
 *    a time is recomputed in backward (its fp32 outputs, bf16 memos and
 *    gradients together);
 *  - with selective recomputation (checkpointing 2) each block keeps what its
 *    attention half saved (as without checkpointing) plus the residual and
 *    the block output in fp32, and one MLP half at a time is recomputed;
 *  - the gradient at a block boundary is handed over from block to block
 *    (autograd/tensor.c), so it costs one buffer, not one per layer;
 * The two fractions of a block's fp32 outputs that are live at the peak (0.5
 * without, 1.7 with checkpointing) were measured with qlora-bench on the
 * SmolLM2-135M and Llama-2-7B shapes (arena peak at 2 and 6 layers).
 * Several ranks: SHARD_GRAD_OP and FULL_SHARD reduce-scatter each layer's
 * gradient in place (model/llama_fsdp.h llama_grad_buckets), FULL_SHARD then
 * gives the pages outside the shard back (gradients: ⌈n/W⌉ + two buckets), and
 * with its tables sharded holds its rows of the embedding and head, the
 * gather scratch grown to the whole head (gather_bytes).
 *  - plus the top of the graph (embedding output, final norm, dL/dh of the
 *    fused LM head + CE) and the CE chunk (128 rows of logits, fp32 + bf16).
 * Sizes are per micro-batch; gradient accumulation reuses the same arena.
 *
 * GPU (device_cuda): the device memory of the CUDA backend (autograd/backend_cuda.cu). The
 * frozen base is mirrored on the device as stored (NF4 linears, the bf16 LM head its GEMM reads;
 * an untied embedding table stays on the host, its rows gathered there), adapters, gradients and optimizer state
 * and the arenas are device memory, with the same activation model (the ops are the same). What
 * differs: attention needs no per-thread score blocks (flash-style kernels keep them in
 * registers; only a (B, H, T) fp32 row statistic is added), and the runtime is the CUDA context
 * with this fat binary's kernels (an estimate, CUDA_CONTEXT_BYTES, until `make test-gpu`
 * measures it), the cuBLASLt workspace (32 MiB) and the small argument buffers; host-side
 * extras (data, tokenizer) are not device memory.
 */
#include "trainer/memplan.h"

#include "autograd/backend.h"

#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Device memory of a CUDA context with cuBLASLt loaded and this binary's kernels: about 500 MiB
 * on recent drivers and Hopper/Ada cards (lazy module loading on); an estimate until `make
 * test-gpu` prints it measured (cudaMemGetInfo before and after the first kernel). */
#define CUDA_CONTEXT_BYTES (512.0 * 1048576.0)

/* The fraction of a recomputed MLP half's fp32 outputs live at the peak with selective
 * recomputation, measured as the two fractions above: qlora-bench's arena peak on the SmolLM2-135M
 * shape (seq 512 x 4) at 2 and 6 layers gives 1.42; the Llama-3-8B shape (seq 512 x 1, 2 and 4
 * layers) is then over-predicted by 15 MiB of 397 (4 %), as no checkpointing's is by 21 MiB. */
#define SEL_LIVE 1.4

int64_t memplan_nf4_bytes(int64_t rows, int64_t cols, int blocksize) {
    int64_t n = rows * cols, nb = (n + blocksize - 1) / blocksize;
    return (n + 1) / 2 + nb + ((nb + 255) / 256) * 4 + 4;
}

int64_t memplan_int8_bytes(int64_t rows, int64_t cols) { return rows * cols + 4 * rows; }

void memplan_predict(const memplan_input *in, memplan *out) {
    memset(out, 0, sizeof *out);
    const llama_hparams *hp = &in->hp;
    double D = hp->d_model, F = hp->d_ff, V = hp->vocab, L = hp->n_layer;
    double B = in->B, T = in->T, N = B * T, r = in->lora_r, H = hp->n_head;
    double qd = (double)hp->n_head * hp->head_dim, kd = (double)hp->n_kv_head * hp->head_dim;
    double nth = in->n_threads > 0 ? in->n_threads : 1;
    double es = in->bf16 ? 2.0 : 4.0; /* GEMM operand element size */
    /* gradient_checkpointing: offload moves block inputs only off a device; on the CPU it is checkpointing on */
    const int offload = in->checkpointing == 3 && in->device_cuda;
    /* Phi-3: 4 linears, two of them fused (qkv_proj, gate_up_proj), whose outputs exist once whole and once as
     * the q/k/v and gate/up parts (autograd op_cols) */
    const int fused = hp->arch == LLAMA_ARCH_PHI3;
    double nl = r > 0 ? (fused ? 4.0 : 7.0) : 0.0; /* adapted linears per block (lora_target_linear) */
    double fused_out = fused ? (qd + 2 * kd) + 2 * F : 0.0;

    /* frozen base: NF4 linears, bf16 embeddings (+ untied head), fp32 norms, RoPE table */
    /* on the GPU an untied embedding table stays on the host (the backend gathers its rows there) */
    double tables = in->device_cuda && !hp->tied_embeddings ? 1 : (hp->tied_embeddings ? 1 : 2);
    /* FULL_SHARD: this rank's shards of the linears; the tables and norms stay replicated */
    const double frozen = in->frozen_shard_bytes > 0 ? (double)in->frozen_shard_bytes : (double)in->frozen_bytes;
    const double table_bytes = in->table_shard_bytes > 0 ? (double)in->table_shard_bytes : V * D * 2.0 * tables;
    out->base = frozen + table_bytes + (2 * L + 1) * D * 4 + T * hp->head_dim * 4.0;
    out->adapters = 8.0 * (double)in->lora_params;  /* A, B and their gradients, fp32 */
    if (in->grad_accumulation > 1) out->adapters += 4.0 * (double)in->lora_params; /* the accumulation buffer */
    out->optimizer = in->optimizer_bytes > 0 ? (double)in->optimizer_bytes
                                             : 8.0 * (double)in->lora_params; /* AdamW m and v, fp32 */
    if (in->shard_optimizer && in->world > 1) {
        /* SHARD_GRAD_OP / FULL_SHARD: AdamW's m and v (Sophia's m and h) of ⌈n/W⌉ elements, or the caller's
         * per-rank figure (adamw_8bit: its shard on the block grid); the gradients reduce-scattered in place per
         * layer (no buffer); FULL_SHARD keeps only the gradient of its shard and of two buckets in flight */
        const double shard = (double)((in->lora_params + in->world - 1) / in->world);
        out->optimizer = in->optimizer_bytes > 0 ? (double)in->optimizer_bytes : 8.0 * shard;
        if (in->shard_grads) {
            double g = shard + 2.0 * (double)in->max_layer_params;
            if (g > (double)in->lora_params) g = (double)in->lora_params;
            out->adapters -= 4.0 * ((double)in->lora_params - g); /* the gradient: only g of n resident */
        }
    }
    out->gather = (double)in->gather_bytes;

    /* one block's fp32 outputs (the same sizes again as their gradients in backward) */
    double blk_f32 = 4.0 * N * (D + (qd + 2 * kd) + (qd + kd) + qd + 4 * D + 3 * F + nl * r + fused_out);
    /* outputs read only as their bf16 copies have no fp32 data in bf16 mode (model/llama.c, ctx->f32_unread):
     * RoPE's q and k always; the two pre-norms' and SwiGLU's without LoRA dropout on the linears reading them */
    const double unread_rope = in->bf16 ? qd + kd : 0.0, unread_lin = in->bf16 && !(in->lora_dropout > 0) ? 1.0 : 0.0;
    blk_f32 -= 4.0 * N * (unread_rope + unread_lin * (2 * D + F));
    /* GEMM operand copies kept for backward */
    double blk_ops = es * N * (2 * D + (qd + 2 * kd) + qd + 3 * F + nl * r);
    if (in->lora_dropout > 0) blk_ops += es * N * (3 * D + qd + 2 * D + F); /* dropout(x) per linear */
    double blk_stats = 8.0 * N + 8.0 * B * H * T + 4.0 * N;
    /* Gemma 3's extra RMSNorms (model/llama.c layer_attention_half / layer_mlp_half): each keeps its fp32
     * input for backward (op_rmsnorm: ag_keep(x)) and a per-row rstd, and adds its fp32 output to the block's.
     * QK-norm normalises q and k per head (inputs N·(qd + kd), rows N·(H + KVH)); the sandwich norms the
     * attention output and the MLP output (N·D each). Without them the planner was 15 % under Gemma 3 270M
     * without checkpointing (1618 MiB predicted, 1909 measured; the arena 233 MiB over the activations). */
    const double qkn = hp->qk_norm ? 1.0 : 0.0, pn = hp->post_norms ? 1.0 : 0.0;
    const double qk_keep = qkn * (4.0 * N * (qd + kd) + 4.0 * N * (H + hp->n_kv_head));
    const double post_keep = pn * (4.0 * N * D + 4.0 * N); /* one of the two sandwich norms */
    blk_f32 += 4.0 * N * (qkn * (qd + kd) + pn * 2.0 * D);
    blk_stats += qk_keep + 2.0 * post_keep;
    /* transients of one op: bf16 dy, attention scratch (per thread), dO */
    /* on the CPU: the attention kernel's own per-thread packs and tiles (autograd/backend_cpu_nn.inc,
     * ag_cpu_attention_scratch_bytes; it grows with head_dim: the former flat 128·T·12 bytes per thread was
     * the GEMM path's and missed 14 MiB at head_dim 128, T 8192, 2 threads) */
    double attn_tmp = in->device_cuda ? 4.0 * B * H * T
                                      : (double)ag_cpu_attention_scratch_bytes((int)B, in->T, (int)H, hp->n_kv_head,
                                                                               hp->head_dim, in->bf16, (int)nth);
    double widest = fused ? (2 * F > qd + 2 * kd ? 2 * F : qd + 2 * kd) : (F > qd + 2 * kd ? F : qd + 2 * kd);
    /* + the MLP backward's gradients live at its peak beyond the half block counted below (blk_f32 / 2,
     * mlp_f32): dmm, dg and du, fp32 (N, F) each, before the gate/up backward frees them. The full cost curve
     * (docs/cost_curve.md, 2026-12-07) measured the activation arena growing 10.0–10.7 bytes × d_ff per token
     * faster than predicted without this term, in all three modes and on all three shapes (SmolLM2-135M: 16 MiB
     * per 1k tokens, SmolLM2-1.7B: 80, Llama-3-8B: 142): one instance, not per layer */
    double mlp_bwd = 10.0 * N * F;
    double op_tmp = 2.0 * N * widest + 4.0 * N * r + attn_tmp + es * N * qd + mlp_bwd;
    double top = 4.0 * N * D * 5.0 + 128.0 * V * (4.0 + es) + es * 128.0 * D;
    if (!in->checkpointing) {
        double keep_layer = 4.0 * N * D * 2.0 + blk_ops + blk_stats;
        /* + the live part of one block's fp32 outputs (or gradients) */
        out->activations = L * keep_layer + 0.5 * blk_f32 + op_tmp + top;
    } else if (in->checkpointing == 2) {
        /* selective (model/llama.h LLAMA_CKPT_SELECTIVE): per layer the attention half's saved
         * operands (normed input, q/k/v, attention output as bf16; LoRA u of q, k, v, o), its row
         * statistics, and two fp32 boundaries (the residual after attention, the block output) */
        double na = r > 0 ? 4.0 : 0.0, nm = r > 0 ? 3.0 : 0.0;
        double attn_ops = es * N * (D + (qd + 2 * kd) + qd + na * r);
        if (in->lora_dropout > 0) attn_ops += es * N * (3 * D + qd);
        double keep_layer = 4.0 * N * D * 2.0 + attn_ops + 8.0 * N + 8.0 * B * H * T + qk_keep + post_keep;
        /* + one recomputed MLP half: its fp32 outputs (norm, gate, up, SwiGLU, down, residual, LoRA u)
         * and most of their gradients, its bf16 memos */
        double mlp_f32 = 4.0 * N * (3 * D + 3 * F + nm * r - unread_lin * (D + F)) +
                         2.0 * post_keep; /* + the post-MLP norm's in/out; − the fp32 outputs not written */
        double mlp_ops = es * N * (D + 3 * F + nm * r);
        if (in->lora_dropout > 0) mlp_ops += es * N * (2 * D + F);
        /* − the recomputed half's input, read in place (ckpt_backward) */
        out->activations = L * keep_layer + SEL_LIVE * mlp_f32 - 4.0 * N * D + mlp_ops + 4.0 * N + op_tmp + top;
    } else {
        /* every block's fp32 input (L of them); offloaded on a device (checkpointing 3,
         * autograd/tensor.h ag_checkpoint_offload): two slots the block outputs take in turn and the
         * last output moved into the arena, the other L - 1 inputs in pinned host memory; the block
         * being recomputed reads its input from its slot instead of a copy (one of blk_f32's D
         * terms), so 3 - 1. Without offload the recompute reads the kept input in place as well
         * (autograd/tensor.c ckpt_backward), so that term goes there too: L - 1 */
        double inputs = offload ? 2.0 * 4.0 * N * D : (L - 1.0) * 4.0 * N * D;
        if (offload) out->host_offload = (L - 1) * 4.0 * N * D;
        /* + one recomputed block: its outputs, most of their gradients, its bf16 memos */
        out->activations = inputs + 1.7 * blk_f32 + blk_ops + blk_stats + op_tmp + top;
    }
    /* dequantized weight of the largest linear, block-output copy buffer (not used when offloading:
     * the outputs go straight into their slot) */
    double wmax = (fused ? widest * D : (F * D > qd * D ? F * D : qd * D)) * es;
    /* fp32 and fp16 GEMMs (bf16: false, fp16: true): the LM head is a frozen operand too, its fp32 copy (fp16
     * values in fp16 mode) in the same scratch (autograd/ops.c frozen_operand); bf16 reads the bf16 table in
     * place, FULL_SHARD gathers it into its own scratch */
    if (!in->bf16 && in->table_shard_bytes <= 0 && V * D * 4.0 > wmax) wmax = V * D * 4.0;
    out->scratch = wmax + (offload ? 0.0 : 4.0 * N * D);
    /* the CPU's transposed dequantization for the input-gradient products (backend frozen_t_bf16): per thread a
     * 32-row tile of the widest input (int8 and fp32 weights; NF4's 4 KiB tiles are on the stack) */
    if (!in->device_cuda && in->bf16) out->scratch += nth * 32.0 * (F > D ? F : D) * 2.0;
    /* process baseline: code and libraries, oneDNN JIT kernels and scratchpads, thread stacks */
    if (in->device_cuda) /* CUDA context + kernels, cuBLASLt workspace, argument buffers */
        out->runtime = CUDA_CONTEXT_BYTES + 32.0 * 1048576.0 + 4.0 * 1048576.0;
    else
        out->runtime = 16.0 * 1048576.0 + nth * 2.0 * 1048576.0 + (double)in->extra_bytes;
    out->data = in->device_cuda ? 0.0 : (double)in->data_bytes; /* the packed rows stay on the host */
    out->total = out->base + out->adapters + out->optimizer + out->activations + out->scratch + out->runtime +
                 out->data + out->gather;
    /* arena chunks: big enough that a step needs few of them */
    double chunk = out->activations / 4;
    if (chunk < 64.0 * 1048576.0) chunk = 64.0 * 1048576.0;
    if (chunk > 512.0 * 1048576.0) chunk = 512.0 * 1048576.0;
    out->arena_chunk = chunk;
    out->checkpointing = in->checkpointing;
}

void memplan_predict_host_of_device(const memplan_input *in, memplan *out) {
    memplan_input h = *in, d = *in;
    h.device_cuda = 0;
    d.device_cuda = 1;
    memplan dev;
    memplan_predict(&d, &dev);
    memplan_predict(&h, out);
    out->adapters = out->optimizer = out->activations = out->scratch = out->gather = 0.0;
    out->runtime += 2.0 * 8.0 * 1048576.0; /* backend_cuda.cu PIN_BYTES, two staging buffers */
    out->host_offload = dev.host_offload;
    out->total = out->base + out->runtime + out->data + out->host_offload;
}

void memplan_print(FILE *f, const memplan *p) {
    const double M = 1048576.0;
    fprintf(f,
            "[memory] predicted peak %.0f MiB = base %.0f + adapters %.1f + optimizer %.1f + activations %.0f%s + "
            "scratch %.0f + runtime %.0f + data %.0f\n",
            p->total / M, p->base / M, p->adapters / M, p->optimizer / M, p->activations / M,
            p->checkpointing == 2 ? " (selective recomputation)" : p->checkpointing == 3 && p->host_offload > 0 ? " (gradient checkpointing, inputs offloaded)" : p->checkpointing ? " (gradient checkpointing)" : "", p->scratch / M, p->runtime / M, p->data / M);
    if (p->host_offload > 0)
        fprintf(f, "[memory] gradient_checkpointing: offload: + %.0f MiB of pinned host memory for the block inputs "
                   "(not device memory)\n", p->host_offload / M);
    if (p->gather > 0)
        fprintf(f, "[memory] (per rank; FULL_SHARD: base holds this rank's shards of the frozen linears, + gather "
                   "scratch %.0f MiB included in the peak)\n", p->gather / M);
}

void memplan_print_table(FILE *f, const memplan *p) {
    const double M = 1048576.0, G = 1073741824.0;
    const struct {
        const char *name;
        double v;
    } rows[] = {{"frozen base (NF4 linears, bf16 tables, norms)", p->base},
                {"LoRA adapters + gradients (fp32)", p->adapters},
                {"optimizer state (AdamW m, v fp32)", p->optimizer},
                {p->checkpointing == 2                       ? "activations (selective recomputation)"
                 : p->checkpointing == 3 && p->host_offload > 0 ? "activations (checkpointing, inputs offloaded)"
                 : p->checkpointing                           ? "activations (gradient checkpointing)"
                                                              : "activations (no checkpointing)",
                 p->activations},
                {"scratch (dequantized weight, block copy)", p->scratch},
                {"runtime", p->runtime},
                {"FULL_SHARD gather scratch (a layer + receive buffer)", p->gather}};
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++)
        if (rows[i].v > 0 || i + 1 < sizeof rows / sizeof rows[0]) /* the gather row only under FULL_SHARD */
            fprintf(f, "  %-56s %9.0f MiB %7.2f GiB\n", rows[i].name, rows[i].v / M, rows[i].v / G);
    fprintf(f, "  %-56s %9.0f MiB %7.2f GiB\n", "total", p->total / M, p->total / G);
    if (p->host_offload > 0)
        fprintf(f, "  %-56s %9.0f MiB %7.2f GiB\n", "(host, pinned: offloaded block inputs; not in the total)",
                p->host_offload / M, p->host_offload / G);
}

size_t memplan_arena_chunk(const memplan *p) { return (size_t)p->arena_chunk; }

/* The limit in the cgroup v2 file memory.max of this process's cgroup
 * (/proc/self/cgroup "0::<path>"), in bytes; 0 when there is none ("max", no
 * cgroup v2). */
static double cgroup_memory_max(void) {
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (!f) return 0;
    char line[1024], path[1200] = "";
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "0::", 3)) {
            line[strcspn(line, "\n")] = 0;
            snprintf(path, sizeof path, "/sys/fs/cgroup%s/memory.max", strcmp(line + 3, "/") ? line + 3 : "");
            break;
        }
    fclose(f);
    if (!path[0] || !(f = fopen(path, "r"))) return 0;
    char v[64] = "";
    char *got = fgets(v, sizeof v, f);
    fclose(f);
    char *end;
    double b = got ? strtod(v, &end) : 0;
    return got && end != v && b > 0 ? b : 0; /* "max": no limit */
}

double memplan_machine_bytes(const char **what) {
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    double phys = pages > 0 && page > 0 ? (double)pages * (double)page : 0;
    double cg = cgroup_memory_max();
    if (cg > 0 && (phys <= 0 || cg < phys)) {
        if (what) *what = "the cgroup's memory.max";
        return cg;
    }
    if (what) *what = "physical memory (MemTotal)";
    return phys;
}

double memplan_available_bytes(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) return -1;
    char line[256];
    double kib = -1;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemAvailable: %lf kB", &kib) == 1) break;
    fclose(f);
    return kib >= 0 ? kib * 1024.0 : -1;
}
