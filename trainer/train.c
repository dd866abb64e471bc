/* trainer/train.c — the training run (see train.h): set-up, the loop over
 * optimizer steps with evaluation, checkpoints and the stop signal, the
 * outputs, teardown. The pieces live in trainer/run.c (set-up, finish,
 * teardown), trainer/step.c (one optimizer step), trainer/eval.c (the
 * held-out loss) and trainer/run_state.c (checkpoint save / resume, the
 * adapter files).
 */
#include "trainer/train.h"

#include "trainer/run.h"

int train_run(const train_config *c, train_result *res, qerr *e) {
    comm *cm;
    if (comm_single(&cm, e)) return -1;
    int rc = train_run_comm(c, cm, res, e);
    comm_free(cm);
    return rc;
}

int train_run_comm(const train_config *c, comm *cm, train_result *res, qerr *e) {
    run_ctx r;
    int rc = run_setup(&r, c, cm, res, e);
    if (!rc) run_start(&r, e);
    for (int step = r.start_step + 1; !rc && step <= r.total_steps; step++) {
        if ((rc = train_step(&r, step, e))) break;
        run_check_outputs(); /* a closed stdout / stderr stops the run as SIGTERM does */
        /* a stop signal saves first: the periodic evaluation would delay it (and a second signal kills) */
        if (r.eval_set.n_rows > 0 && r.eval_every > 0 && step % r.eval_every == 0 && step != r.total_steps &&
            !run_stop(&r))
            run_eval(&r, step, e);
        if (step == r.total_steps || step % r.save_every == 0 || run_stop(&r) || r.watchdog_stop)
            rc = run_checkpoint_save(&r, step, e);
        if (run_stop(&r)) break;
        if (!rc && r.watchdog_stop) {
            rc = qerr_set(e, "step %d: the training loss stayed above loss_watchdog_threshold %g for %d steps "
                             "(loss_watchdog_patience); stopped with a checkpoint in %s", step,
                          (double)c->loss_watchdog_threshold, c->loss_watchdog_patience, r.last_ckpt);
            break;
        }
    }
    if (!rc) rc = run_finish(&r, e);
    run_free(&r);
    return rc;
}
