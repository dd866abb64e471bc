/* tests/test_config_parallel.c — the keys of several processes in the config
 * (trainer/config.c's "several processes" block): ddp_timeout; fsdp,
 * fsdp_version, fsdp_config and deepspeed, where data parallel (NO_SHARD,
 * ZeRO stage 0), SHARD_GRAD_OP (ZeRO 2) and FULL_SHARD (ZeRO 3) are accepted
 * and every other strategy (HYBRID_SHARD, ZeRO 1, DeepSpeed offloading) is refused with
 * one line naming it; the resolved config reads back to the same values.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "tests/tmpdir.h"
#include "core/file.h"
#include "trainer/config.h"

static const char *BASE = "base_model: m.gguf\nadapter: qlora\n"
                          "lora_target_linear: true\n"
                          "datasets:\n  - path: d.jsonl\n    type: completion\n";

static void write_text(const char *path, const char *text) {
    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
}

/* Load BASE + extra; returns load's result (and validate's when load passed); e gets the message. */
static int load_with(const tmpdir *t, const char *extra, train_config *c, qerr *e) {
    char path[256], text[2048];
    snprintf(path, sizeof path, "%s/c.yaml", t->dir);
    snprintf(text, sizeof text, "%s%s", BASE, extra);
    write_text(path, text);
    if (train_config_load(path, c, e)) return -1;
    if (train_config_validate(c, e)) {
        train_config_free(c);
        return -1;
    }
    return 0;
}

static void expect_refused(const tmpdir *t, const char *extra, const char *want) {
    train_config c;
    qerr e;
    int rc = load_with(t, extra, &c, &e);
    if (rc == 0) {
        train_config_free(&c);
        fail_msg("accepted: %s", extra);
    }
    if (!strstr(e.msg, want)) fail_msg("for %s: \"%s\" lacks \"%s\"", extra, e.msg, want);
    assert_null(strchr(e.msg, '\n'));
}

static void test_ddp_timeout(void **st) {
    const tmpdir *t = *st;
    train_config c;
    qerr e;
    assert_int_equal(load_with(t, "", &c, &e), 0);
    assert_int_equal(c.ddp_timeout, 1800);
    assert_int_equal(c.fsdp_no_shard, 0);
    assert_null(c.deepspeed);
    assert_int_equal(train_config_apply_override(&c, "ddp_timeout=30", &e), 0);
    assert_int_equal(c.ddp_timeout, 30);
    assert_int_equal(train_config_apply_override(&c, "ddp_timeout=0", &e), -1);
    assert_non_null(strstr(e.msg, "ddp_timeout"));
    train_config_free(&c);
}

/* Sophia and 8-bit AdamW run with their state sharded (SHARD_GRAD_OP, FULL_SHARD; README "Several processes"). */
static void test_sharded_optimizers_accepted(void **st) {
    const tmpdir *t = *st;
    static const char *const extra[] = {"fsdp: [full_shard]\noptimizer: sophia\n",
                                        "fsdp: [shard_grad_op]\noptimizer: sophia\n",
                                        "fsdp: [shard_grad_op]\noptimizer: adamw_8bit\n",
                                        "fsdp: [full_shard]\noptimizer: adamw_8bit\n",
                                        "fsdp_config:\n  fsdp_state_dict_type: SHARDED_STATE_DICT\noptimizer: adamw_8bit\n"};
    for (size_t i = 0; i < sizeof extra / sizeof *extra; i++) {
        train_config c;
        qerr e;
        if (load_with(t, extra[i], &c, &e)) fail_msg("refused: %s: %s", extra[i], e.msg);
        assert_true(train_config_sharded_state_dict(&c));
        train_config_free(&c);
    }
}

static void test_strategies_refused(void **st) {
    const tmpdir *t = *st;
    char ds[256], text[512];
    expect_refused(t, "fsdp: [hybrid_shard]\n", "HYBRID_SHARD is not implemented yet");
    expect_refused(t, "fsdp: [zero_shard]\n", "fsdp: unknown option \"zero_shard\"");
    expect_refused(t, "fsdp_version: 3\n", "fsdp_version: expected 1 or 2");
    expect_refused(t, "fsdp_config:\n  fsdp_sharding_strategy: 4\n", "HYBRID_SHARD is not implemented yet");
    expect_refused(t, "fsdp_config:\n  fsdp_sharding_strategy: HYBRID_SHARD_ZERO2\n",
                   "HYBRID_SHARD_ZERO2 is not implemented yet");
    expect_refused(t, "fsdp: [no_shard]\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
                   "more than one of NO_SHARD, SHARD_GRAD_OP and FULL_SHARD");
    expect_refused(t, "fsdp: [full_shard]\nfsdp_config:\n  fsdp_sharding_strategy: SHARD_GRAD_OP\n",
                   "more than one of NO_SHARD, SHARD_GRAD_OP and FULL_SHARD");
    expect_refused(t, "fsdp: [full_shard]\nfsdp_config:\n  reshard_after_forward: false\n",
                   "more than one of NO_SHARD, SHARD_GRAD_OP and FULL_SHARD");
    expect_refused(t, "fsdp_config:\n  fsdp_state_dict_type: LOCAL_STATE_DICT\n",
                   "expected FULL_STATE_DICT (one state file written by rank 0) or SHARDED_STATE_DICT");
    expect_refused(t, "fsdp_config:\n  fsdp_shard_everything: true\n", "fsdp_config.fsdp_shard_everything: unknown key");
    expect_refused(t, "fsdp_config: NO_SHARD\n", "fsdp_config: expected a mapping");
    for (int stage = 1; stage <= 1; stage++) {
        snprintf(ds, sizeof ds, "%s/z%d.json", t->dir, stage);
        snprintf(text, sizeof text, "{\"zero_optimization\": {\"stage\": %d}}", stage);
        write_text(ds, text);
        snprintf(text, sizeof text, "deepspeed: %s\n", ds);
        char want[64];
        snprintf(want, sizeof want, "ZeRO stage %d", stage);
        expect_refused(t, text, want);
    }
    snprintf(ds, sizeof ds, "%s/mb.json", t->dir);
    write_text(ds, "{\"zero_optimization\": {\"stage\": 0}, \"train_micro_batch_size_per_gpu\": 8}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    expect_refused(t, text, "train_micro_batch_size_per_gpu: expected \"auto\"");
    snprintf(ds, sizeof ds, "%s/opt.json", t->dir);
    write_text(ds, "{\"optimizer\": {\"type\": \"AdamW\"}}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    expect_refused(t, text, "\"optimizer\": not supported");
    snprintf(ds, sizeof ds, "%s/off.json", t->dir);
    write_text(ds, "{\"zero_optimization\": {\"stage\": 0, \"offload_optimizer\": {\"device\": \"cpu\"}}}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    expect_refused(t, text, "offload_optimizer: offloading is not implemented yet");
    expect_refused(t, "deepspeed: /nonexistent/ds.json\n", "deepspeed: /nonexistent/ds.json");
}

static void test_no_shard_accepted_and_resolved(void **st) {
    const tmpdir *t = *st;
    train_config c, back;
    qerr e;
    assert_int_equal(load_with(t,
                               "fsdp: [no_shard, auto_wrap]\nfsdp_version: 1\nfsdp_config:\n"
                               "  fsdp_sharding_strategy: NO_SHARD\n  fsdp_state_dict_type: FULL_STATE_DICT\n"
                               "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"
                               "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
                               "  fsdp_cpu_ram_efficient_loading: true\n  fsdp_offload_params: false\n"
                               "ddp_timeout: 99\n",
                               &c, &e),
                     0);
    assert_int_equal(c.fsdp_no_shard, 1);
    assert_int_equal(c.ddp_timeout, 99);
    int warned = 0;
    for (int i = 0; i < c.n_warnings; i++) warned |= strstr(c.warnings[i], "every rank loads the base model") != NULL;
    assert_true(warned);
    char out[256];
    snprintf(out, sizeof out, "%s/resolved.yaml", t->dir);
    assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
    assert_int_equal(train_config_load(out, &back, &e), 0);
    assert_int_equal(back.fsdp_no_shard, 1);
    assert_int_equal(back.ddp_timeout, 99);
    train_config_free(&back);
    train_config_free(&c);
    /* DeepSpeed ZeRO stage 0 with "auto" values: data parallel */
    char ds[256], text[512];
    snprintf(ds, sizeof ds, "%s/z0.json", t->dir);
    write_text(ds, "{\"zero_optimization\": {\"stage\": 0, \"overlap_comm\": true}, \"bf16\": {\"enabled\": \"auto\"},"
                   " \"train_micro_batch_size_per_gpu\": \"auto\", \"gradient_clipping\": \"auto\"}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    assert_int_equal(load_with(t, text, &c, &e), 0);
    assert_string_equal(c.deepspeed, ds);
    assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
    assert_int_equal(train_config_load(out, &back, &e), 0);
    assert_string_equal(back.deepspeed, ds);
    train_config_free(&back);
    train_config_free(&c);
    /* SHARD_GRAD_OP from each spelling, and back from the resolved config */
    static const char *const sgo[] = {"fsdp: shard_grad_op auto_wrap\n",
                                      "fsdp_config:\n  fsdp_sharding_strategy: 2\n",
                                      "fsdp_config:\n  fsdp_version: 2\n  reshard_after_forward: false\n"};
    for (int i = 0; i < 3; i++) {
        assert_int_equal(load_with(t, sgo[i], &c, &e), 0);
        assert_int_equal(c.fsdp_shard_grad_op, 1);
        assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
        assert_int_equal(train_config_load(out, &back, &e), 0);
        assert_int_equal(back.fsdp_shard_grad_op, 1);
        train_config_free(&back);
        train_config_free(&c);
    }
    /* FULL_SHARD from each spelling (names, torch's value 1, FSDP2's reshard_after_forward), and back */
    static const char *const fs[] = {"fsdp: [full_shard, auto_wrap]\n",
                                     "fsdp_config:\n  fsdp_sharding_strategy: FULL_SHARD\n",
                                     "fsdp_config:\n  fsdp_sharding_strategy: 1\n",
                                     "fsdp_config:\n  fsdp_version: 2\n  reshard_after_forward: true\n"};
    for (int i = 0; i < 4; i++) {
        assert_int_equal(load_with(t, fs[i], &c, &e), 0);
        assert_int_equal(c.fsdp_full_shard, 1);
        assert_int_equal(c.fsdp_shard_grad_op, 0);
        assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
        assert_int_equal(train_config_load(out, &back, &e), 0);
        assert_int_equal(back.fsdp_full_shard, 1);
        train_config_free(&back);
        train_config_free(&c);
    }
    snprintf(ds, sizeof ds, "%s/z3ok.json", t->dir);
    write_text(ds, "{\"zero_optimization\": {\"stage\": 3}}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    assert_int_equal(load_with(t, text, &c, &e), 0);
    assert_int_equal(c.fsdp_full_shard, 2);
    train_config_free(&c);
    snprintf(text, sizeof text, "deepspeed: %s\nfsdp: [full_shard]\n", ds);
    expect_refused(t, text, "fsdp / fsdp_config and deepspeed are both set");
    /* fsdp_state_dict_type: the strategy's default (sharded for SHARD_GRAD_OP and FULL_SHARD), each spelling,
     * and back from the resolved config; a config without it resolves without it */
    static const struct {
        const char *yaml;
        int type, sharded;
    } sd[] = {{"fsdp: [shard_grad_op]\n", 0, 1},
              {"fsdp: [full_shard]\n", 0, 1},
              {"fsdp: [full_shard]\nfsdp_config:\n  fsdp_state_dict_type: FULL_STATE_DICT\n", 1, 0},
              {"fsdp: [no_shard]\n", 0, 0},
              {"fsdp: [shard_grad_op]\nfsdp_config:\n  fsdp_state_dict_type: FULL_STATE_DICT\n", 1, 0},
              {"fsdp_config:\n  fsdp_sharding_strategy: NO_SHARD\n  state_dict_type: StateDictType.SHARDED_STATE_DICT\n",
               2, 1},
              {"fsdp_config:\n  fsdp_state_dict_type: sharded_state_dict\n", 2, 1}};
    for (size_t i = 0; i < sizeof sd / sizeof *sd; i++) {
        assert_int_equal(load_with(t, sd[i].yaml, &c, &e), 0);
        assert_int_equal(c.fsdp_state_dict_type, sd[i].type);
        assert_int_equal(train_config_sharded_state_dict(&c), sd[i].sharded);
        assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
        assert_int_equal(train_config_load(out, &back, &e), 0);
        assert_int_equal(back.fsdp_state_dict_type, sd[i].type);
        assert_int_equal(train_config_sharded_state_dict(&back), sd[i].sharded);
        size_t len = 0;
        char *y = file_read_all(out, &len, &e);
        assert_non_null(y);
        assert_true((strstr(y, "fsdp_state_dict_type") != NULL) == (sd[i].type != 0));
        free(y);
        train_config_free(&back);
        train_config_free(&c);
    }
    snprintf(ds, sizeof ds, "%s/z2ok.json", t->dir);
    write_text(ds, "{\"zero_optimization\": {\"stage\": 2}}");
    snprintf(text, sizeof text, "deepspeed: %s\n", ds);
    assert_int_equal(load_with(t, text, &c, &e), 0);
    assert_int_equal(c.fsdp_shard_grad_op, 2);
    train_config_free(&c);
    /* both is one too many */
    snprintf(text, sizeof text, "deepspeed: %s\nfsdp: [shard_grad_op]\n", ds);
    expect_refused(t, text, "fsdp / fsdp_config and deepspeed are both set");
    snprintf(text, sizeof text, "deepspeed: %s\nfsdp: [no_shard]\n", ds);
    expect_refused(t, text, "fsdp / fsdp_config and deepspeed are both set");
}

/* FSDP's parameter offload (fsdp_offload_params: true, fsdp: [..., offload]): on CPU ranks everything is in host
 * memory already, so it is accepted with a [config] line, kept through the resolved config (device cuda refuses it
 * at start, trainer/run.c); false leaves it off. */
static void test_offload_params_on_cpu(void **st) {
    const tmpdir *t = *st;
    static const char *const spellings[] = {
        "fsdp: [full_shard, auto_wrap, offload]\n",
        "fsdp: [full_shard]\nfsdp_config:\n  fsdp_offload_params: true\n  fsdp_state_dict_type: FULL_STATE_DICT\n",
        "fsdp_config:\n  offload_params: true\n  fsdp_state_dict_type: SHARDED_STATE_DICT\n",
        "fsdp_config:\n  fsdp_offload_params: true\n"};
    char out[256];
    snprintf(out, sizeof out, "%s/resolved_offload.yaml", t->dir);
    for (size_t i = 0; i < sizeof spellings / sizeof *spellings; i++) {
        train_config c, back;
        qerr e;
        assert_int_equal(load_with(t, spellings[i], &c, &e), 0);
        assert_int_equal(c.fsdp_offload_params, 1);
        int warned = 0;
        for (int w = 0; w < c.n_warnings; w++) warned |= strstr(c.warnings[w], "in host memory already") != NULL;
        assert_true(warned);
        assert_int_equal(train_config_write_yaml(&c, out, &e), 0);
        if (train_config_load(out, &back, &e)) fail_msg("%s: %s", spellings[i], e.msg);
        assert_int_equal(back.fsdp_offload_params, 1);
        assert_int_equal(back.fsdp_full_shard != 0, c.fsdp_full_shard != 0);
        assert_int_equal(back.fsdp_state_dict_type, c.fsdp_state_dict_type);
        train_config_free(&back);
        train_config_free(&c);
    }
    train_config c;
    qerr e;
    assert_int_equal(load_with(t, "fsdp_config:\n  fsdp_offload_params: false\n", &c, &e), 0);
    assert_int_equal(c.fsdp_offload_params, 0);
    train_config_free(&c);
}

static int group_setup(void **state) { return tmpdir_setup(state, "qlora_test_config_parallel"); }

int main(void) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ddp_timeout),
        cmocka_unit_test(test_sharded_optimizers_accepted),
        cmocka_unit_test(test_strategies_refused),
        cmocka_unit_test(test_no_shard_accepted_and_resolved),
        cmocka_unit_test(test_offload_params_on_cpu),
    };
    return cmocka_run_group_tests(tests, group_setup, tmpdir_teardown);
}
