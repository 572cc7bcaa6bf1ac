"""bench/learning.py: every row's command lines are accepted by the scripts they call (a renamed flag breaks the
benchmark here, not hours into a run), and the tables read what those scripts write."""
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))
import bench_freezeout  # noqa: E402
import learning  # noqa: E402


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A work folder whose localmim and SparK rows (seed 0) have pretrained; the data folders are only named."""
    monkeypatch.setattr(learning, 'train_subset', lambda per_class: tmp_path / f'train{per_class}')
    monkeypatch.setattr(learning, 'fashion_mnist_clips', lambda per_class: tmp_path / f'clips{per_class}')
    monkeypatch.setattr(learning, 'DOCS', tmp_path / 'docs')  # no results.json: only what the test writes
    spark = 'your_convnet_32px_still_pretraining.pth'
    pretrained = {e.row for e in learning.ENCODERS.values()} | {row.source for row in learning.ROWS.values()
                                                                if row.source}
    for row in pretrained:
        name = spark if row.startswith('spark') else 'checkpoint-last.pth'
        checkpoint = tmp_path / 'work' / row / 'seed0' / 'pretrain' / name
        checkpoint.parent.mkdir(parents=True)
        checkpoint.touch()
    return tmp_path / 'work'


@pytest.mark.parametrize('name', list(learning.ROWS))
def test_every_command_parses(name, work, monkeypatch):
    steps = learning.commands(name, 0, work, Path('data'))
    assert steps
    for _, argv, done in steps:
        assert argv[0] == 'python' and done.is_relative_to(work)
        if argv[1] == '-m':  # a multi-process row: torchrun's own parser reads the launch
            assert argv[2] == 'torch.distributed.run'
            launch = torch.distributed.run.get_args_parser().parse_args(argv[3:])
            argv = ['python', launch.training_script, *launch.training_script_args]
        if argv[1] == 'bench/bench_freezeout.py':
            monkeypatch.setattr(sys, 'argv', argv[1:])
            assert bench_freezeout.get_args().feature_masking
        else:
            args = importlib.import_module(argv[1][:-3]).get_args_parser().parse_args(argv[2:])
            assert args.seed == 0


def test_fine_tuning_starts_from_the_localmim_row_and_scratch_does_not(work):
    (_, tuned, _), = learning.commands('finetune_1', 0, work, Path('data'))
    (_, scratch, _), = learning.commands('scratch_1', 0, work, Path('data'))
    assert tuned[tuned.index('--finetune') + 1] == str(work / 'localmim' / 'seed0' / 'pretrain' /
                                                       'checkpoint-last.pth')
    assert '--finetune' not in scratch and scratch[scratch.index('--layer_decay') + 1] == '1.0'
    assert tuned[tuned.index('--data_path') + 1].endswith('train10')  # 1% of 1,000 per class


def test_two_process_rows_split_the_batch_and_differ_only_in_the_sampler(work):
    import run_pretrain
    pretrain_argv = lambda row: next(argv for what, argv, _ in learning.commands(row, 0, work, Path('data'))  # noqa
                                     if what == 'pretrain')
    launched = {}
    for sampler in ('sticky', 'standard'):
        pretrain = pretrain_argv(f'cache_2proc_{sampler}')
        launch = torch.distributed.run.get_args_parser().parse_args(pretrain[3:])
        assert launch.nproc_per_node == '2' and launch.standalone and launch.training_script == 'run_pretrain.py'
        launched[sampler] = vars(run_pretrain.get_args_parser().parse_args(launch.training_script_args))
    single = vars(run_pretrain.get_args_parser().parse_args(pretrain_argv('freezeout_cubic_cache')[2:]))
    assert launched['sticky']['batch_size'] * 2 == single['batch_size'] == 128
    assert (launched['sticky'].pop('sampler'), launched['standard'].pop('sampler')) == ('rank_sticky', 'standard')
    differ = {k for k in single if k != 'sampler' and launched['sticky'][k] != single[k]}
    assert differ == {'batch_size', 'output_dir', 'log_dir'}
    assert {k for k in launched['sticky'] if launched['sticky'][k] != launched['standard'][k]} == \
        {'output_dir', 'log_dir'}


def test_spark_rows_score_and_fine_tune_the_spark_rows_encoder(work):
    checkpoint = lambda row: str(work / row / 'seed0' / 'pretrain' / 'your_convnet_32px_still_pretraining.pth')  # noqa
    (_, tuned, _), = learning.commands('spark_beta2_finetune_1', 0, work, Path('data'))
    (_, tuned_beta2_0, _), = learning.commands('spark_finetune_1', 0, work, Path('data'))
    (_, scratch, _), = learning.commands('spark_scratch_100', 0, work, Path('data'))
    random_eval = learning.commands('spark_random', 0, work, Path('data'))[0][1]
    assert tuned[tuned.index('--finetune') + 1] == checkpoint('spark_beta2')
    assert tuned_beta2_0[tuned_beta2_0.index('--finetune') + 1] == checkpoint('spark')
    assert random_eval[2] == checkpoint('spark_beta2') and '--random_init' in random_eval  # its architecture only
    assert tuned[tuned.index('--model') + 1] == scratch[scratch.index('--model') + 1] == 'your_convnet_32px'
    assert '--finetune' not in scratch and scratch[scratch.index('--data_path') + 1].endswith('train1000')
    for row, ada in (('spark', 1e-9), ('spark_beta2', 0.95)):
        (what, pretrain, _), *evals = learning.commands(row, 0, work, Path('data'))
        args = importlib.import_module('main_spark').get_args_parser().parse_args(pretrain[2:])
        assert pretrain[1] == 'main_spark.py' and args.ada == ada
        assert all(argv[2] == checkpoint(row) for _, argv, _ in evals)


def test_rows_in_results_json_stay_when_their_work_folder_is_gone(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(learning, 'DOCS', tmp_path)
    entry = {'knn_top1_k20': 81.3, 'linear_top1': 83.0, 'commands': ['python eval_knn.py pixels']}
    (tmp_path / 'results.json').write_text(json.dumps({'pixels': {'0': entry}, 'no_such_row': {'0': entry}}))
    assert learning.collect(tmp_path / 'work', Path('data')) == {'pixels': {0: entry}}
    ran = []
    monkeypatch.setattr(learning, 'run_row', lambda *a: ran.append(a))
    monkeypatch.setattr(learning, 'report', lambda *a: None)
    monkeypatch.setattr(learning, 'train_subset', lambda per_class: tmp_path / 'data')
    monkeypatch.setattr(sys, 'argv', ['learning.py', '--rows', 'pixels', '--seeds', '0', '1', '--work',
                                      str(tmp_path / 'work')])
    learning.main()
    assert [a[:2] for a in ran] == [('pixels', 1)] and 'pixels seed 0: in' in capsys.readouterr().out


def test_a_spark_variant_pretrains_with_its_flags_and_its_fine_tuning_reads_it(work):
    (_, pretrain, _), *_ = learning.commands('spark_sqrtlr', 0, work, Path('data'))
    args = importlib.import_module('main_spark').get_args_parser().parse_args(pretrain[2:])
    assert args.base_lr == 1.13e-3 and args.ep == 15 and args.exp_dir == str(work / 'spark_sqrtlr' / 'seed0' /
                                                                             'pretrain')
    (_, tuned, _), = learning.commands('spark_sqrtlr_finetune_1', 0, work, Path('data'))
    assert tuned[tuned.index('--finetune') + 1] == str(work / 'spark_sqrtlr' / 'seed0' / 'pretrain' /
                                                       'your_convnet_32px_still_pretraining.pth')


def test_the_linear_probe_rows_run_mae_s_probe_at_batch_64_with_lars_and_with_adamw(work):
    run_finetune = importlib.import_module('run_finetune')
    chosen = {}
    for name in ('linprobe_lars', 'linprobe_adamw'):
        (_, argv, _), = learning.commands(name, 0, work, Path('data'))
        args = run_finetune.resolve_defaults(run_finetune.get_args_parser().parse_args(argv[2:]))
        assert args.linprobe and args.global_pool and args.batch_size == 64 and args.finetune.endswith(
            'checkpoint-last.pth')
        chosen[name] = (args.opt, args.blr)
    assert chosen == {'linprobe_lars': ('lars', 0.1), 'linprobe_adamw': ('adamw', 4e-3)}


def test_tables_read_the_fine_tuning_log_and_the_kernel_nonzeros(work):
    for name, accuracy in (('finetune_1', 61.5), ('scratch_1', 40.25)):
        folder = work / name / 'seed0'
        folder.mkdir(parents=True)
        (folder / 'log.txt').write_text(json.dumps({'train_loss': 2.0, 'epoch': 0}) + '\n' + json.dumps(
            {'train_loss': 1.0, 'test_acc1': accuracy, 'test_count': 10000, 'epoch': 1}) + '\n')
        (folder / 'done').touch()
    folder = work / 'slak_sparse' / 'seed0'
    folder.mkdir(parents=True)
    (folder / 'log.txt').write_text(json.dumps({'train_loss': 1.0, 'test_acc1': 70.0, 'test_count': 10000}) + '\n')
    (folder / 'done').touch()
    kernel = torch.zeros(8, 1, 7, 3)
    kernel.view(-1)[:50] = 1.0
    state = {'stages.0.0.large_kernel.LoRA1.conv.weight': kernel, 'stages.0.0.large_kernel.LoRA1.bn.weight':
             torch.ones(8), 'stages.0.0.pwconv1.weight': torch.ones(32, 8)}
    torch.save({'model': state}, folder / 'checkpoint-last.pth')
    results = learning.collect(work, Path('data'))
    assert results['finetune_1'][0]['test_top1'] == 61.5 and results['scratch_1'][0]['test_top1'] == 40.25
    assert (results['slak_sparse'][0]['kernel_nonzeros'], results['slak_sparse'][0]['kernel_weights']) == (50, 168)
    text = learning.table(results)
    assert '| LocalMIM ViT-Tiny/16, fine-tuned | 100 (1%) | 1 | 61.5 |' in text
    assert '| 50 of 168 (30%) |' in text
