"""Mutations of FreezeOut's stores across depth changes and processes: carrying stored prefixes on to a deeper
depth, and the rank-sticky sampler that keeps each process's store hitting."""
CACHE = 'tests/test_freezeout_cache.py'
MUTATIONS = [
    dict(file='models/localmim.py', find='        for blk in self.blocks[max(from_units - 1, 0):max(to_units - 1, 0)]:',
         replace='        for blk in self.blocks[from_units:max(to_units - 1, 0)]:',
         tests=[f'{CACHE}::test_a_deeper_depth_carries_the_stored_prefixes_on_and_equals_a_full_recomputation'],
         note='a stored prefix skips the first newly frozen block when carried on'),
    dict(file='util/freezeout/cache.py', find='            for row, tensor in zip(rows, advance(first, depth).to(first.dtype).cpu()):',
         replace='            for row, tensor in zip(rows, first):',
         tests=[f'{CACHE}::test_a_deeper_depth_carries_the_stored_prefixes_on_and_equals_a_full_recomputation'],
         note='a stored prefix of a shallower depth is served as if it were at the current one'),
    dict(file='util/freezeout/cache.py', find='        if self.depth == 0 or depth < self.depth:', replace='        if True:',
         tests=[f'{CACHE}::test_run_with_freeze_cache'], note='the store is emptied at every depth change'),
    dict(file='run_pretrain.py', find="sticky = args.sampler == 'rank_sticky' or (args.sampler == 'auto' and cached)",
         replace="sticky = args.sampler == 'rank_sticky'",
         tests=[f'{CACHE}::test_two_processes_hit_their_stores_after_the_first_frozen_epoch'],
         note='--freeze_cache under DDP keeps the official sampler: each process hits about 1/N of its samples'),
    dict(file='util/data/samplers.py', find='            order = order[torch.sort(torch.as_tensor(labels)[order], stable=True).indices]\n',
         replace='            pass\n', tests=['tests/test_samplers.py::test_shards_are_balanced_per_class'],
         note='rank-sticky shards ignore the labels (classes unbalanced across processes)'),
    dict(file='util/data/samplers.py', find='        return iter(indices + indices[:self.num_samples - len(indices)])',
         replace='        return iter(indices)',
         tests=['tests/test_samplers.py::test_every_sample_stays_on_one_rank_and_every_epoch_reshuffles'],
         note='rank-sticky shards of unequal length: processes run different numbers of steps (a DDP hang)'),
]
