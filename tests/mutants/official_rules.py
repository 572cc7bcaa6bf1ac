"""Mutations of rules that whole runs need to equal the official ones: SLaK's pruning ties and prune-rate cosine,
the unfinished accumulation window of each official loop, SparK's --dp 0."""
SLAK = 'tests/test_slak_sparse_training.py'
MUTATIONS = [
    dict(file='util/slak/sparse_training.py', find='            mask.view(-1)[order[:mask.numel() - active + num_remove]] = False',
         replace='            mask.view(-1)[order[:mask.numel() - active + num_remove][-num_remove:]] = False',
         tests=[f'{SLAK}::test_active_weights_at_exactly_zero_are_pruned_as_the_official_rule_prunes_them'],
         note='SLaK prunes exactly ceil(rate x active): zero-valued active weights no longer tie with inactive ones'),
    dict(file='util/slak/sparse_training.py', find="        return self.optimizer.param_groups[0]['lr']",
         replace='        return self.eta_min + (self.prune_rate - self.eta_min) * (1 + math.cos(math.pi * self.t / self.T_max)) / 2',
         tests=[f'{SLAK}::test_prune_rate_schedule_is_the_official_recursive_cosine'],
         note="SLaK's prune rate from the closed-form cosine, not torch's recursive one"),
    dict(file='main_slak.py', find=", partial_window='skip')", replace=')',
         tests=['tests/test_main_slak.py::test_the_batches_of_an_unfinished_update_freq_window_never_run'],
         note='SLaK runs the batches of an unfinished --update_freq window'),
    dict(file='engine.py', find=" or (partial_window == 'step' and step + 1 == steps)", replace='',
         tests=['tests/test_engine.py::test_an_unfinished_accumulation_window_ends_the_epoch_as_each_official_loop_ends_it'],
         note="partial_window 'step' drops the unfinished window instead of stepping on it"),
    dict(file='main_spark.py', find='    if not args.dp:  # the official meaning of 0', replace='    if args.dp is None:',
         tests=['tests/test_main_spark.py::test_dp_0_means_the_official_rate_of_the_model'],
         note='SparK --dp 0 turns drop path off (officially: the model default)'),
]
