"""Mutations of the downstream video evaluation (run_finetune_video.py, util/video/*.py, models/r3d.VideoClassifier):
each removes one behaviour of the protocols; the named tests must fail."""
UNIT = 'tests/test_video_eval.py'
SCRIPT = 'tests/test_run_finetune_video.py'
LINEAR = f'{SCRIPT}::test_linear_protocol_keeps_trunk_and_bn_statistics'
VIEWS = f'{UNIT}::test_thirty_views_are_clip_major_at_the_protocol_times_and_crops'
AVERAGE = f'{UNIT}::test_thirty_view_softmax_average_equals_hand_computation'
RECALL = f'{UNIT}::test_retrieval_recall_on_a_hand_built_bank_with_centring_and_ties'

MUTATIONS = [
    dict(file='models/r3d.py', find='            self.trunk.eval()\n        return self',
         replace='            pass\n        return self', tests=[LINEAR],
         note='linear protocol: the frozen trunk\'s BatchNorm runs in train mode and updates its statistics'),
    dict(file='run_finetune_video.py', find="freeze_trunk=args.protocol == 'linear'", replace='freeze_trunk=False',
         tests=[LINEAR], note='linear protocol: the trunk is trained too'),
    dict(file='run_finetune_video.py', find='args.epochs, steps_per_epoch, args.warmup_epochs)',
         replace='args.epochs, steps_per_epoch, 0)', tests=[LINEAR], note='no linear warm-up of the lr'),
    dict(file='util/video/eval.py', find='probs = logits.float().softmax(-1)', replace='probs = logits.float()',
         tests=[AVERAGE], note='test views: logits averaged instead of softmax probabilities'),
    dict(file='util/video/eval.py', find='return probs.view(-1, views_per_video, probs.shape[-1]).mean(1)',
         replace='return probs.view(views_per_video, -1, probs.shape[-1]).mean(0)',
         tests=[AVERAGE], note="test views: a video's views taken as strided instead of contiguous"),
    dict(file='util/video/eval.py', find='q = F.normalize(queries.double() - queries.double().mean(0), dim=1)',
         replace='q = F.normalize(queries.double(), dim=1)', tests=[RECALL], note='retrieval: queries not centred'),
    dict(file='util/video/eval.py', find='order = torch.sort(q @ b.T, dim=1, descending=True, stable=True).indices',
         replace='order = len(b) - 1 - torch.sort((q @ b.T).flip(1), dim=1, descending=True, stable=True).indices',
         tests=[RECALL], note='retrieval: equal similarities rank in reverse bank order'),
    dict(file='util/video/views.py', find='return [0, centre, length - size] if num_crops == 3 else [centre]',
         replace='return [0, centre, centre] if num_crops == 3 else [centre]', tests=[VIEWS],
         note='test views: the third crop is the centre one, not the end of the long side'),
    dict(file='util/video/views.py', find='return [latest * k / max(num_clips - 1, 1) for k in range(num_clips)]',
         replace='return [latest * k / max(num_clips, 1) for k in range(num_clips)]', tests=[VIEWS],
         note='test views: the last clip does not end at the end of the video'),
    dict(file='util/video/splits.py', find="files = sorted(p.name for p in split_dir.glob(f'*_test_split{split}.txt'))",
         replace="files = sorted((p.name for p in split_dir.glob(f'*_test_split{split}.txt')), "
                 "key=lambda n: pattern.match(n).group(1))",
         tests=[f'{UNIT}::test_hmdb51_split_files_label_order_and_flags'],
         note='HMDB51 labels in class-name order instead of split-file-name order (kick before kick_ball)'),
    dict(file='util/video/checkpoint.py', find="TRUNK_PREFIX = 'trunk.model.'",
         replace="TRUNK_PREFIX = 'momentum_trunk.model.'",
         tests=[f'{UNIT}::test_eztorch_checkpoint_loads_the_online_trunk_strictly'],
         note='checkpoints: the momentum trunk is loaded instead of the online one'),
]
