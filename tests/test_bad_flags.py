"""Bad flags stop every entry script before it does anything: a ValueError naming the flag, its value and what is
allowed, no output folder; on the command line one line on stderr and exit code 2 (argparse's code for bad usage)."""
import argparse
import re
import shlex
import subprocess
import sys

import pytest

import main_sce
import main_slak
import main_spark
import run_finetune
import run_pretrain
from helpers import REPO, finetune_args, pretrain_args, slak_args
from util.cli import check_flags
from util.runtime import run_cli
from util.train_step import NonFiniteLossError

SCRIPTS = {'run_pretrain': run_pretrain, 'run_finetune': run_finetune, 'main_spark': main_spark,
           'main_slak': main_slak, 'main_sce': main_sce}


def spark_args(out, *extra):
    argv = ['--exp_name=t', f'--exp_dir={out}', '--data_path=demo', '--model=resnet18', '--input_size=64', '--bs=4',
            '--ep=2', '--wp_ep=1', '--num_workers=0', '--device=cpu', *extra]
    return main_spark.get_args_parser().parse_args(argv)


def sce_args(out, *extra):
    argv = shlex.split('--data_path demo --device cpu --amp none --crop_size 32 --num_frames 4 --global_batch_size 8 '
                       '--queue_size 64 --epochs 2 --warmup_epochs 1 --num_workers 0')
    return main_sce.get_args_parser().parse_args([*argv, '--output_dir', str(out), *extra])


# tiny runs on the demo data that would train if their flags were not checked
ARGS = {'run_pretrain': lambda out, *extra: pretrain_args('demo', out, *extra), 'run_finetune': finetune_args,
        'main_spark': spark_args, 'main_slak': slak_args, 'main_sce': sce_args}

CASES = [
    ('run_pretrain', ['--mask_ratio', '1.5'], '--mask_ratio 1.5: must be in (0, 1)'),
    ('run_pretrain', ['--mask_ratio', '0'], '--mask_ratio 0.0: must be in (0, 1)'),
    ('run_pretrain', ['--accum_iter', '0'], '--accum_iter 0: must be >= 1'),
    ('run_pretrain', ['--epochs', '0'], '--epochs 0: must be >= 1'),
    ('run_pretrain', ['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    ('run_pretrain', ['--warmup_epochs', '-1'], '--warmup_epochs -1: must be >= 0'),
    ('run_finetune', ['--reprob', '-0.1'], '--reprob -0.1: must be in [0, 1]'),
    ('run_finetune', ['--drop_path', '1'], '--drop_path 1.0: must be in [0, 1)'),
    ('run_finetune', ['--accum_iter', '0'], '--accum_iter 0: must be >= 1'),
    ('run_finetune', ['--epochs', '0'], '--epochs 0: must be >= 1'),
    ('main_spark', ['--mask=1.5'], '--mask 1.5: must be in (0, 1)'),
    ('main_spark', ['--bs=0'], '--bs 0: must be >= 1'),
    ('main_spark', ['--accum_iter=0'], '--accum_iter 0: must be >= 1'),
    ('main_spark', ['--bs=6', '--accum_iter=4'], '--bs 6 is the global batch size'),
    ('main_spark', ['--ep=0'], '--ep 0: must be >= 1'),
    ('main_spark', ['--input_size=70'], '--input_size 70: must be a multiple of 32'),
    ('main_slak', ['--update_freq', '0'], '--update_freq 0: must be >= 1'),
    ('main_slak', ['--mixup_prob', '-0.5'], '--mixup_prob -0.5: must be in [0, 1]'),
    ('main_slak', ['--epochs', '0'], '--epochs 0: must be >= 1'),
    ('main_slak', ['--batch_size', '0'], '--batch_size 0: must be >= 1'),
    ('main_sce', ['--time_difference_prob', '-0.1'], '--time_difference_prob -0.1: must be in [0, 1]'),
    ('main_sce', ['--accum_iter', '0'], '--accum_iter 0: must be >= 1'),
    ('main_sce', ['--epochs', '0'], '--epochs 0: must be >= 1'),
    ('main_sce', ['--global_batch_size', '0'], '--global_batch_size 0: must be >= 1'),
]


@pytest.mark.parametrize('script,flags,message', CASES, ids=[f'{s}{"".join(f)}' for s, f, _ in CASES])
def test_bad_flag_stops_before_the_output_folder(tmp_path, script, flags, message):
    out = tmp_path / 'out'
    with pytest.raises(ValueError, match=re.escape(message)):
        SCRIPTS[script].main(ARGS[script](out, *flags))
    assert not out.exists()


@pytest.mark.parametrize('script', SCRIPTS)
def test_official_defaults_and_the_tiny_runs_pass(tmp_path, script):
    SCRIPTS[script].check_args(SCRIPTS[script].get_args_parser().parse_args(['--data_path', 'demo']))
    SCRIPTS[script].check_args(ARGS[script](tmp_path))


def test_warmup_longer_than_training_where_the_official_schedule_allows_it(tmp_path):
    main_spark.check_args(spark_args(tmp_path, '--ep=1', '--wp_ep=40'))
    run_pretrain.check_args(pretrain_args(tmp_path / 'data', tmp_path, '--epochs', '10', '--warmup_epochs', '40'))
    main_slak.check_args(slak_args(tmp_path, '--epochs', '1', '--warmup_epochs', '20', '--warmup_steps', '2'))


def test_check_flags_rules():
    args = argparse.Namespace(ratio=0.5, epochs=10, warmup=3, lr=None, sizes=[1, 0], update_frequency=0)
    check_flags(args, {'--ratio': '(0, 1)', '--warmup': '[0, --epochs]', '--lr': '> 0', '--epochs': '>= 10'})
    for rules, message in (({'--ratio': '[0, 0.5)'}, '--ratio 0.5: must be in [0, 0.5)'),
                           ({'--warmup': '(3, 4]'}, '--warmup 3: must be in (3, 4]'),
                           ({'--warmup': '[0, --ratio]'}, '--warmup 3: must be in [0, --ratio] (--ratio is 0.5)'),
                           ({'--sizes': '>= 1'}, '--sizes [1, 0]: must be >= 1'),
                           ({'--update-frequency': '> 0'}, '--update-frequency 0: must be > 0')):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_flags(args, rules)


# ------------------------------------------------------------------------------------------------ run_cli

def cli(monkeypatch, capsys, script, *argv, main=None):
    """run_cli of `script` in this process: (exit code, stderr lines)."""
    monkeypatch.setattr(sys, 'argv', [f'{script}.py', *argv])
    with pytest.raises(SystemExit) as stop:
        run_cli(main or SCRIPTS[script].main, SCRIPTS[script].get_args_parser())
    return stop.value.code, capsys.readouterr().err.strip().splitlines()


def test_user_error_after_the_folder_was_made_removes_it(monkeypatch, capsys, tmp_path):
    """A missing --data_path is found after setup_run made the output folder: the folders it made go again."""
    out = tmp_path / 'new' / 'out'
    argv = ['--data_path', str(tmp_path / 'missing'), '--device', 'cpu', '--output_dir', str(out)]
    code, err = cli(monkeypatch, capsys, 'run_pretrain', *argv)
    assert code == 2 and len(err) == 1 and err[0].startswith('run_pretrain.py: error: --data_path'), err
    assert not (tmp_path / 'new').exists()
    out.mkdir(parents=True)  # a folder the user made is kept, even empty
    assert cli(monkeypatch, capsys, 'run_pretrain', *argv)[0] == 2 and out.is_dir()


def test_diverged_run_exits_with_1(monkeypatch, capsys):
    def diverge(args):
        raise NonFiniteLossError('the loss is nan at step 3')
    code, err = cli(monkeypatch, capsys, 'run_pretrain', main=diverge)
    assert code == 1 and len(err) == 1 and err[0].startswith('run_pretrain.py: error: the loss is nan at step 3')


@pytest.mark.parametrize('script,argv,flag', [
    ('run_pretrain', ['--data_path', 'demo', '--device', 'cpu', '--mask_ratio', '1.5', '--output_dir', '{out}'],
     '--mask_ratio 1.5'),
    ('main_spark', ['--data_path=demo', '--device=cpu', '--mask=1.5', '--exp_dir={out}'], '--mask 1.5')])
def test_command_line_is_one_line_and_exit_code_2(tmp_path, script, argv, flag):
    out = tmp_path / 'out'
    done = subprocess.run([sys.executable, f'{script}.py', *(a.format(out=out) for a in argv)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and 'Traceback' not in done.stderr, done.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f'{script}.py: error: {flag}'), lines
    assert not out.exists()


@pytest.mark.parametrize('script', ['run_pretrain', 'run_finetune', 'main_spark', 'main_slak', 'main_sce',
                                    'run_finetune_video', 'export', 'prepare_video', 'eval_knn'])
def test_every_entry_script_prints_its_help(script):
    """`-h` formats every help string (a lone '%' in one made `run_pretrain.py -h` crash)."""
    parser = __import__(script).get_args_parser()
    text = parser.format_help()
    assert all(action.option_strings[-1] in text for action in parser._actions
               if action.option_strings and action.help != argparse.SUPPRESS)
