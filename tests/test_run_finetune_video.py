"""run_finetune_video.py on the demo videos under hand-written UCF101 split files: the linear protocol (frozen trunk
and BN statistics, the protocol's lr schedule), fine-tuning resumed = uninterrupted, retrieval with its feature
cache, --eval, one-line errors, and two gloo processes that count every test video once."""
import json
import os
import pickle
import shlex
import subprocess
import sys

import pytest
import torch

import run_finetune_video
from helpers import REPO, log_entries, straight_and_resumed
from models.r3d import r3d18_trunk
from official_files import LIGHTNING_SCE_GLOBALS, LIGHTNING_SCE_TINY, eztorch_checkpoint
from util.checkpoint import LAST, read_checkpoint
from util.runtime import run_cli
from util.video.checkpoint import r3d_trunk_state_dict
from util.video.demo import make_demo_video_files, make_demo_videos
from util.video.eval import retrieval_recall
from util.video.io import VideoDecoderUnavailable, require_torchcodec

pytestmark = pytest.mark.usefixtures('one_thread')
parse = run_finetune_video.get_args_parser().parse_args
TINY = ('--dataset ucf101 --device cpu --train_crop_size 32 --train_short_side 32 36 --eval_crop_size 32 '
        '--num_frames 2 --num_clips 2 --num_crops 1 --batch_size 4 --eval_batch_size 2 --num_workers 0 '
        '--num_threads_io 0 --num_threads_decode 0 --print_freq 100 --save_freq 1000')
NUM_TEST = 7  # odd: two processes get 4 and 3


@pytest.fixture(scope='module')
def data(module_tmp):
    """UCF101-format split files (classInd in reverse alphabetical order) over the demo's train videos: two train
    videos per class (12), one test video per class plus one (7); and an eztorch (Lightning) checkpoint whose BN
    statistics are not the defaults. Returns the flags naming them."""
    root = make_demo_videos() / 'train'
    classes = sorted(p.name for p in root.iterdir())
    splits = module_tmp / 'splits'
    splits.mkdir()
    (splits / 'classInd.txt').write_text(''.join(f'{i + 1} {c}\r\n' for i, c in enumerate(classes[::-1])))
    (splits / 'trainlist01.txt').write_text(''.join(f'{c}/{c}_{i:03d}.avi 1\r\n' for c in classes for i in (0, 1)))
    test = [f'{c}/{c}_002.avi' for c in classes] + [f'{classes[0]}/{classes[0]}_003.avi']
    (splits / 'testlist01.txt').write_text(''.join(f'{v}\r\n' for v in test))
    torch.manual_seed(5)
    trunk = r3d18_trunk()
    for name, buffer in trunk.named_buffers():
        if name.endswith('running_mean'):
            buffer.normal_(0, 0.1)
        elif name.endswith('running_var'):
            buffer.uniform_(0.8, 1.2)
    state = {f'trunk.model.{k}': v for k, v in trunk.model.state_dict().items()}
    state['momentum_trunk.model.blocks.0.conv.weight'] = torch.zeros(1)  # dropped, as the projector, queue, ...
    ckpt = eztorch_checkpoint(module_tmp / 'sce_r3d18.ckpt', state)  # omegaconf hyper-parameters, callbacks, ...
    return f'--data_path {root} --split_dir {splits} --finetune {ckpt}'


def args_for(data, out, *extra):
    return parse(shlex.split(f'{TINY} {data} --output_dir {out}') + list(extra))


@pytest.fixture(scope='module')
def linear_run(data, module_tmp):
    out = module_tmp / 'linear'
    run_finetune_video.main(args_for(data, out, '--protocol', 'linear', '--epochs', '2', '--warmup_epochs', '1',
                                     '--eval_freq', '1'))
    return out


def pretrained(data):
    path = shlex.split(data)[-1]
    return {k[len('trunk.model.'):]: v for k, v in read_checkpoint(path)['state_dict'].items()
            if k.startswith('trunk.model.')}


def test_eztorch_checkpoint_is_read_as_lightning_wrote_it(data, capsys):
    """The checkpoint the protocols use names the classes of a file Lightning and omegaconf wrote (the committed
    fixture), which torch.load(weights_only=True) refuses; its omegaconf parts are read as inert data."""
    path = shlex.split(data)[-1]
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path)) == LIGHTNING_SCE_GLOBALS
    assert sorted(torch.serialization.get_unsafe_globals_in_checkpoint(LIGHTNING_SCE_TINY)) == LIGHTNING_SCE_GLOBALS
    with pytest.raises(pickle.UnpicklingError, match='omegaconf.dictconfig.DictConfig'):
        torch.load(path, weights_only=True)
    ckpt = read_checkpoint(path)
    assert {'hyper_parameters', 'callbacks', 'loops', 'optimizer_states', 'lr_schedulers'} <= ckpt.keys()
    assert ckpt['hyper_parameters']['optimizer'].qualname == 'omegaconf.dictconfig.DictConfig'
    r3d_trunk_state_dict(path)
    assert f'{path}: ignored hyper_parameters (pickled ' in capsys.readouterr().out


def test_linear_protocol_keeps_trunk_and_bn_statistics(data, linear_run):
    expected = pretrained(data)
    first, last = (torch.load(linear_run / name, weights_only=True) for name in ('checkpoint-0.pth', LAST))
    for ckpt in (first, last):
        trunk = {k[len('trunk.model.'):]: v for k, v in ckpt['model'].items() if k.startswith('trunk.model.')}
        assert trunk.keys() == expected.keys()
        changed = [k for k in expected if not torch.equal(trunk[k], expected[k])]
        assert not changed  # weights, running means and variances, num_batches_tracked
    assert not torch.equal(first['model']['fc.weight'], last['model']['fc.weight'])
    assert [len(g['params']) for g in last['optimizer']['param_groups']] == [2]  # fc weight and bias only
    log = log_entries(linear_run)
    # 12 train videos / batch 4 = 3 steps per epoch: lr 2.0 x 4 / 256 = 0.03125, warmup t / 2 over epoch 0, then
    # cosine 0.5 (1 + cos(pi t / 3)) over epoch 1: epoch means 0.5 and 2/3 of it
    assert log[0]['train_lr'] == pytest.approx(0.03125 / 2) and log[1]['train_lr'] == pytest.approx(0.03125 * 2 / 3)
    assert [x['val_count'] for x in log] == [NUM_TEST] * 2 and 'test_acc1' in log[1] and 'test_acc1' not in log[0]
    assert log[1]['best_val_acc1'] == max(x['val_acc1'] for x in log)
    assert (linear_run / 'checkpoint-best.pth').is_file() and any((linear_run / 'tensorboard').iterdir())


def test_eval_only_reproduces_the_logged_validation(data, linear_run):
    stats = run_finetune_video.main(args_for(data, linear_run, '--protocol', 'linear', '--eval'))
    logged = log_entries(linear_run)[-1]
    assert stats['count'] == NUM_TEST and stats['acc1'] == logged['val_acc1']
    assert stats['loss'] == pytest.approx(logged['val_loss'], rel=1e-6)


def test_finetune_resume_equals_uninterrupted_run(data, module_tmp):
    def make_args(out):
        return args_for(data, out, '--protocol', 'finetune', '--epochs', '2', '--eval_freq', '2')
    straight, resumed = straight_and_resumed(run_finetune_video, make_args, 1, module_tmp / 'finetune')
    a, b = (torch.load(run / LAST, weights_only=True) for run in (straight, resumed))
    assert a['epoch'] == b['epoch'] == 1 and a['step'] == b['step'] == 6
    assert not [k for k in a['model'] if not torch.equal(a['model'][k], b['model'][k])]
    assert [x['train_loss'] for x in log_entries(straight)] == [x['train_loss'] for x in log_entries(resumed)]
    assert log_entries(straight)[-1]['val_acc1'] == log_entries(resumed)[-1]['val_acc1']
    expected = pretrained(data)  # fine-tuning trains the whole trunk, BN statistics included
    for key in ('blocks.0.conv.weight', 'blocks.4.res_blocks.1.branch2.norm_b.running_mean'):
        assert not torch.equal(a['model'][f'trunk.model.{key}'], expected[key])


def test_retrieval_caches_features_and_reports_recall(data, module_tmp, monkeypatch, capsys):
    out = module_tmp / 'retrieval'
    recall = run_finetune_video.main(args_for(data, out, '--protocol', 'retrieval'))
    bank, queries = (torch.load(out / f'features_{name}.pth', weights_only=True) for name in ('bank', 'queries'))
    assert bank['features'].shape == (12, 512) and queries['features'].shape == (NUM_TEST, 512)
    assert bank['counts'].tolist() == [1] * 12 and queries['counts'].tolist() == [1] * NUM_TEST
    assert recall == retrieval_recall(queries['features'], queries['labels'], bank['features'], bank['labels'])
    assert json.loads((out / 'log.txt').read_text())['R@1'] == recall[1]
    # other k: the cached features, no trunk built
    monkeypatch.setattr(run_finetune_video, 'build_trunk', lambda args: pytest.fail('features were recomputed'))
    again = run_finetune_video.main(args_for(data, out, '--protocol', 'retrieval', '--ks', '1', '2'))
    assert list(again) == [1, 2] and again[1] == recall[1] and 'features from' in capsys.readouterr().out


@pytest.mark.parametrize('extra, message', [
    ('--protocol linear --data_path demo --dataset ucf101', 'use --dataset kinetics'),
    ('--protocol finetune --train_short_side 24 30', '--train_short_side'),
    ('--protocol finetune --finetune /no/such.ckpt', '--finetune /no/such.ckpt'),
    ('--protocol retrieval --split 2', 'trainlist02.txt'),
])
def test_bad_input_is_one_clear_line(data, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.setattr(sys, 'argv', ['run_finetune_video.py', *shlex.split(f'{TINY} {data} {extra}'),
                                      '--output_dir', str(tmp_path / 'out')])
    with pytest.raises(SystemExit) as error:
        run_cli(run_finetune_video.main, run_finetune_video.get_args_parser())
    err = capsys.readouterr().err
    assert error.value.code == 2 and err.startswith('run_finetune_video.py: error:') and message in err
    assert err.count('\n') == 1 and not (tmp_path / 'out').exists()


def test_wrong_checkpoint_is_one_clear_line(data, tmp_path, monkeypatch, capsys):
    torch.save({'model': {'blocks.0.conv.weight': torch.zeros(64, 3, 1, 7, 7)}}, tmp_path / 'partial.pth')
    monkeypatch.setattr(sys, 'argv', ['run_finetune_video.py', *shlex.split(f'{TINY} {data}'), '--protocol', 'linear',
                                      '--finetune', str(tmp_path / 'partial.pth'), '--output_dir', str(tmp_path / 'o')])
    with pytest.raises(SystemExit):
        run_cli(run_finetune_video.main, run_finetune_video.get_args_parser())
    err = capsys.readouterr().err
    assert 'is not an R3D-18 trunk' in err and 'missing' in err and err.count('\n') == 1


def test_two_processes_count_every_test_video_once(data, module_tmp):
    """gloo on CPU: DDP training of the linear head; the 7 test videos are shared 4 + 3 between the ranks."""
    out = module_tmp / 'ddp'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                             'run_finetune_video.py', *shlex.split(f'{TINY} {data}'), '--protocol', 'linear',
                             '--epochs', '1', '--warmup_epochs', '0', '--batch_size', '2', '--output_dir', str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'batch 4 = 2 x 2 x 1' in result.stdout
    logged = log_entries(out)[-1]
    assert logged['val_count'] == NUM_TEST and logged['step'] == 3
    stats = run_finetune_video.main(args_for(data, out, '--protocol', 'linear', '--eval'))  # one process
    assert stats['count'] == NUM_TEST and stats['acc1'] == logged['val_acc1']
    assert stats['loss'] == pytest.approx(logged['val_loss'], rel=1e-5)


def test_video_files_give_the_frame_folders_features(tmp_path):
    """--decoder video (torchcodec) on mp4/avi files encoded from demo frame folders: the same videos, labels and
    views as the frame folders, so nearly the same features (the video codec's loss apart) and the same recall."""
    try:
        require_torchcodec()
    except VideoDecoderUnavailable as error:
        pytest.skip(str(error))
    frames = make_demo_videos(tmp_path / 'frames', videos_per_class={'train': 2, 'val': 1}, frame_range=(8, 12))
    make_demo_video_files(tmp_path / 'files', frames)
    results = {}
    for decoder, root in (('frame', frames), ('video', tmp_path / 'files')):
        args = parse(shlex.split(f'{TINY} --protocol retrieval --dataset kinetics --data_path {root} --decoder '
                                 f'{decoder} --output_dir {tmp_path / decoder}'))
        recall = run_finetune_video.main(args)
        results[decoder] = recall, torch.load(tmp_path / decoder / 'features_queries.pth', weights_only=True)
    (recall_frames, frames_q), (recall_video, video_q) = results['frame'], results['video']
    assert recall_video == recall_frames and torch.equal(video_q['labels'], frames_q['labels'])
    cosine = torch.nn.functional.cosine_similarity(video_q['features'], frames_q['features'])
    assert cosine.shape == (6,) and cosine.min() > 0.98
