"""Mutations of AMP (autocast, fp32 targets and losses, fp16 GradScaler), --clip_grad per entry script and the
FreezeOut prefix cache in a real run: each removes one behaviour; the named tests must fail."""
AMP_LOCALMIM = 'tests/test_train_step_amp.py::test_localmim_hog_targets_and_loss_are_float32_under_autocast'
AMP_SCE = 'tests/test_sce_model.py::test_loss_is_float32_with_autocast_off_inside_amp'
SCALER = 'tests/test_train_step_amp.py::test_fp16_grad_scaler_skips_an_overflow_then_steps_unscaled'
CLIP = ['tests/test_clip_grad.py::test_run_pretrain_clips_in_fp32',
        'tests/test_clip_grad.py::test_run_finetune_clips_in_fp32',
        'tests/test_clip_grad.py::test_main_slak_clips_in_fp32']
FREEZE_RUN = 'tests/test_freezeout_cache.py::test_run_with_freeze_cache'

MUTATIONS = [
    # ---- autocast and fp32 islands
    dict(file='models/localmim.py', find='enabled=False):\n            hog = self.hog_enc[k]',
         replace='enabled=True):\n            hog = self.hog_enc[k]', tests=[AMP_LOCALMIM],
         note='LocalMIM: per-scale HOG targets (--hog_bias) computed under autocast'),
    dict(file='models/localmim.py', find='enabled=False):\n            return self.hog_enc[0].histogram',
         replace='enabled=True):\n            return self.hog_enc[0].histogram', tests=[AMP_LOCALMIM],
         note='LocalMIM: shared HOG histogram computed under autocast'),
    dict(file='models/sce.py', find='torch.autocast(device.type, enabled=False)',
         replace='torch.autocast(device.type, enabled=True)', tests=[AMP_SCE],
         note='SCE: loss computed with autocast on'),
    dict(file='models/sce.py', find='terms = [_sce_terms(at_least_fp32(online[j][2]), at_least_fp32(targets[i])',
         replace='terms = [_sce_terms(online[j][2], at_least_fp32(targets[i])', tests=[AMP_SCE],
         note='SCE: online predictions enter the loss in half precision'),
    dict(file='util/train_step.py', find='enabled=self.amp_dtype is not None)', replace='enabled=False)',
         tests=[AMP_LOCALMIM, AMP_SCE, SCALER], note='TrainStep: --amp never enables autocast'),
    # ---- fp16 GradScaler branch of TrainStep
    dict(file='util/train_step.py',
         find="self.scaler = torch.amp.GradScaler(self.device.type) if amp == 'fp16' else None",
         replace='self.scaler = None', tests=[SCALER], note='fp16 without a GradScaler'),
    dict(file='util/train_step.py', find='self.scaler.update()', replace='pass', tests=[SCALER],
         note='GradScaler: scale never updated (no halving after an overflow)'),
    dict(file='util/train_step.py', find='self.scaler.unscale_(self.optimizer)', replace='pass', tests=[SCALER],
         note='GradScaler: gradients clipped and measured while still scaled'),
    dict(file='util/train_step.py', find='(self.scaler.scale(loss) if self.scaler is not None else loss).backward()',
         replace='loss.backward()', tests=[SCALER], note='GradScaler: loss not scaled before backward'),
    dict(file='util/train_step.py', find='self.scaler.step(self.optimizer)', replace='self.optimizer.step()',
         tests=[SCALER], note='GradScaler: optimizer steps on an overflowed window'),
    dict(file='util/train_step.py', find='self._window_finite &= torch.isfinite(loss.detach())', replace='pass',
         tests=[SCALER], note='a non-finite loss is not counted as a skipped step'),
    # ---- --clip_grad in fp32, through each script's trainer
    dict(file='util/train_step.py', find='torch.nn.utils.clip_grads_with_norm_(params, self.clip_grad, norm)',
         replace='pass', tests=[*CLIP, SCALER], note='--clip_grad never clips'),
    dict(file='util/train_step.py', find='if self.clip_grad is not None and self.clip_grad > 0 and grads:',
         replace='if self.clip_grad is not None and self.clip_grad > 0 and grads and self.scaler is not None:',
         tests=CLIP, note='--clip_grad ignored in fp32 (the official SLaK bug)'),
    dict(file='run_pretrain.py', find='args.accum_iter, args.clip_grad, args.max_nonfinite)',
         replace='args.accum_iter, None, args.max_nonfinite)', tests=[CLIP[0]],
         note='run_pretrain ignores --clip_grad'),
    dict(file='run_finetune.py', find='args.accum_iter, args.clip_grad, args.max_nonfinite)',
         replace='args.accum_iter, None, args.max_nonfinite)', tests=[CLIP[1]],
         note='run_finetune ignores --clip_grad'),
    dict(file='main_slak.py', find='args.update_freq, args.clip_grad, args.max_nonfinite)',
         replace='args.update_freq, None, args.max_nonfinite)', tests=[CLIP[2]], note='main_slak ignores --clip_grad'),
    # ---- FreezeOut prefix cache in a real run
    dict(file='util/freezeout/cache.py', find='missing = [row for row, entry in enumerate(rows) if entry is None]',
         replace='missing = list(range(len(rows)))', tests=[FREEZE_RUN],
         note='freeze cache: never served from the cache'),
    dict(file='run_pretrain.py', find='cache.compute_loss(args.mask_ratio) if cache else',
         replace='None if cache else', tests=[FREEZE_RUN], note='--freeze_cache: the cache is built but never used'),
    dict(file='util/freezeout/cache.py', find='self.seed * _SEED_STRIDE + int(i) + 1', replace='torch.seed()',
         tests=[FREEZE_RUN], note='freeze cache: a new mask each visit, stale cached prefixes'),
    dict(file='util/freezeout/cache.py', find='torch.manual_seed(self.seed * _SEED_STRIDE + index)',
         replace='torch.seed()', tests=[FREEZE_RUN],
         note='freeze cache: a new view each visit, stale cached prefixes'),
]
