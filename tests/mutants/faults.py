"""Mutations of the long-run safety nets (mid-epoch checkpoints, damaged files, non-finite saves): each removes
one behaviour; the named tests must fail."""
PREEMPT = 'tests/test_preemption.py::test_signal_mid_epoch_resumes_as_if_never_stopped[localmim_freezeout]'
MUTATIONS = [
    dict(file='util/preemption.py', find='        set_rng_state(now)\n', replace='',
         tests=[PREEMPT], note='mid-epoch resume: the random state of the skipped batches is kept (other masks)'),
    dict(file='util/preemption.py', find='        for _ in range(mid[\'step\']):\n            next(iterator)\n',
         replace='', tests=[PREEMPT], note='mid-epoch resume: the epoch restarts from its first batch'),
    dict(file='util/metric_logger.py', find='        self._total = dict(sums)', replace='        pass',
         tests=[PREEMPT], note='mid-epoch resume: the epoch mean forgets the steps before the stop'),
    dict(file='util/checkpoint.py', find='    if bad is not None:', replace='    if False:',
         tests=['tests/test_checkpoint_faults.py::test_non_finite_model_is_not_saved'],
         note='a NaN model is saved over the good checkpoint'),
    dict(file='util/runtime.py', find='    remove_stale_temp_files(output_dir)', replace='    pass',
         tests=['tests/test_checkpoint_faults.py::test_stale_temporary_files_are_removed_at_start'],
         note='temporary files of killed writes stay'),
]
