"""Mutations of the shared engine (accumulation, DDP no_sync and re-wrapping, host syncs) and of atomic saves."""
ENGINE = 'tests/test_engine.py'
COMM = 'tests/test_engine_comm.py'
RUN_PRETRAIN_DDP = f'{COMM}::test_run_pretrain_ddp_all_reduces_once_per_window_and_never_frozen_parameters'
NO_SYNC = f'{COMM}::test_no_host_sync_inside_the_step_loop'
ATOMIC = 'tests/test_checkpoint.py::test_atomic_save_failure_keeps_the_previous_file_and_leaves_no_temporary'

MUTATIONS = [
    dict(file='util/train_step.py', find='loss = loss / self.accum_iter', replace='loss = loss',
         tests=[f'{ENGINE}::test_accumulation_equals_large_batch',
                'tests/test_engine_finetune.py::test_accumulated_classification_gradient_is_the_large_batch_gradient'],
         note='accumulation: loss not divided by accum_iter'),
    dict(file='util/train_step.py', find='DistributedDataParallel) and not update:',
         replace='DistributedDataParallel) and update:',
         tests=[RUN_PRETRAIN_DDP, f'{ENGINE}::test_ddp_two_processes_match_one_process',
                'tests/test_freezeout.py::test_ddp_across_freeze_events_matches_one_process'],
         note='DDP: no_sync on the wrong micro-steps (the window end does not all-reduce the accumulated gradient)'),
    dict(file='util/train_step.py', find='return self.model.no_sync()', replace='return contextlib.nullcontext()',
         tests=[RUN_PRETRAIN_DDP],
         note='DDP: every micro-step all-reduces (no no_sync during accumulation)'),
    dict(file='util/runtime.py', find='        schedule.on_freeze.append(wrap)', replace='        pass',
         tests=[RUN_PRETRAIN_DDP, 'tests/test_freezeout.py::test_ddp_across_freeze_events_matches_one_process'],
         note='FreezeOut under DDP: no re-wrap after a freeze (frozen parameters stay in the buckets)'),
    dict(file='util/train_step.py', find="self.fused = bool(optimizer.defaults.get('fused'))",
         replace='self.fused = False', tests=[NO_SYNC],
         note='host sync: the non-fused path (finite.item()) for a fused optimizer, once per step'),
    dict(file='util/train_step.py', find='self.grad_norm = norm.detach()',
         replace='self.grad_norm = norm.detach().item()', tests=[NO_SYNC],
         note='host sync: an .item() in every optimizer step'),
    dict(file='util/metric_logger.py', find='value = value.detach().float() if torch.is_tensor(value) else float(value)',
         replace='value = float(value)', tests=[NO_SYNC],
         note='host sync: metrics read on the host every step instead of at print steps'),
    dict(file='util/checkpoint.py', find="tmp = f'{path}.tmp.{os.getpid()}'", replace='tmp = path', tests=[ATOMIC],
         note='atomic save: written in place (a failed write destroys the previous checkpoint)'),
    dict(file='util/checkpoint.py', find='            os.remove(tmp)', replace='            pass', tests=[ATOMIC],
         note='atomic save: a failed write leaves its temporary file behind'),
]
