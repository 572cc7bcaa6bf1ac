"""Fine-tuning on your own data: the --val_fraction split (stratified, seeded, the same in every process), CSV label
files with class names and integer labels, the one-line errors, and a tiny run_finetune.py run on a split folder."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from helpers import finetune_args, free_port, gloo_group, killed_at_epoch, log_entries, slak_args, write_images

# Spawned workers re-import this module: the entry scripts and util.data.datasets are imported where they are used.

pytestmark = pytest.mark.usefixtures('one_thread')

CLASS_SIZES = {'cat': 10, 'dog': 7, 'eel': 1, 'fox': 4}
# validation images per class at --val_fraction 0.25, by hand: 10 x 0.25 = 2.5 -> 3 (half up), 7 x 0.25 = 1.75 -> 2,
# 1 image -> 0 (kept for training), 4 x 0.25 = 1
HELD_OUT_AT_QUARTER = {'cat': 3, 'dog': 2, 'eel': 0, 'fox': 1}


def touch_class_folders(root, sizes=CLASS_SIZES):
    """Class folders of empty .png files: the split reads names only."""
    for name, n in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f'{name}{i:02d}.png').touch()
    return root


def build_finetune_dataset(is_train, args):
    from util.data.datasets import build_finetune_dataset
    return build_finetune_dataset(is_train, args)


def split_of(root, *flags):
    """{'train': [(relative path, class name)], 'val': [...]} as run_finetune.py's data flags select them."""
    args = finetune_args(root / 'out', '--data_path', str(root), *flags)
    result = {}
    for split, is_train in (('train', True), ('val', False)):
        dataset = build_finetune_dataset(is_train, args)
        result[split] = [(Path(p).relative_to(root).as_posix(), dataset.classes[label])
                         for p, label in dataset.samples]
    return result


def test_validation_count_rounds_half_up_keeping_one_image_on_each_side():
    from util.data.user_data import validation_count
    table = {(10, 0.2): 2, (10, 0.25): 3, (9, 0.25): 2, (7, 0.25): 2, (2, 0.1): 1, (3, 0.9): 2, (1, 0.5): 0,
             (1000, 0.05): 50, (5, 0.5): 3}
    assert {key: validation_count(*key) for key in table} == table


def test_split_is_stratified_disjoint_complete_and_seeded(tmp_path):
    root = touch_class_folders(tmp_path / 'data')
    split = split_of(root, '--val_fraction', '0.25', '--nb_classes', '4')
    train, val = set(split['train']), set(split['val'])
    everything = {(f'{name}/{name}{i:02d}.png', name) for name, n in CLASS_SIZES.items() for i in range(n)}
    assert not train & val and train | val == everything and len(split['train']) + len(split['val']) == 22
    assert {name: sum(label == name for _, label in split['val']) for name in CLASS_SIZES} == HELD_OUT_AT_QUARTER
    assert split_of(root, '--val_fraction', '0.25', '--nb_classes', '4') == split  # deterministic
    torch.manual_seed(123)  # global random state plays no part
    assert split_of(root, '--val_fraction', '0.25', '--nb_classes', '4', '--seed', '0') == split
    other = split_of(root, '--val_fraction', '0.25', '--nb_classes', '4', '--seed', '1')
    assert set(other['val']) != val and len(other['val']) == len(val)
    # the split follows the files' names, not where the folder is
    moved = root.rename(tmp_path / 'elsewhere')
    assert split_of(moved, '--val_fraction', '0.25', '--nb_classes', '4') == split


def _split_in_process(rank, world, port, root, out):
    from util.data.user_data import class_folder_samples, stratified_split
    with gloo_group(rank, world, port):
        torch.manual_seed(rank)  # the per-rank seeding of util.runtime.seed_everything
        samples, classes = class_folder_samples(root)
        parts = stratified_split(samples, 0.25, 3, root)
        split = {name: [(Path(p).relative_to(root).as_posix(), classes[label]) for p, label in part]
                 for name, part in zip(('train', 'val'), parts)}
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, split)
        (out / f'rank{rank}.json').write_text(json.dumps(gathered))


@pytest.mark.slow
def test_split_is_the_same_in_two_processes_and_in_this_one(tmp_path):
    """The split function in two gloo processes (fresh interpreters, each with its own string-hash seed and RNG
    state) and run_finetune.py's data set in this one."""
    root = touch_class_folders(tmp_path / 'data')
    mp.spawn(_split_in_process, args=(2, free_port(), root, tmp_path), nprocs=2)
    here = json.loads(json.dumps(split_of(root, '--val_fraction', '0.25', '--nb_classes', '4', '--seed', '3')))
    for rank in range(2):
        assert json.loads((tmp_path / f'rank{rank}.json').read_text()) == [here, here]


def write_csv(path, text):
    path.write_text(text)
    return str(path)


def test_csv_with_class_names_gives_sorted_classes(tmp_path, capsys):
    train = write_csv(tmp_path / 'train.csv', 'path,label\nimg/a.jpg,zebra\nimg/b.jpg,ant\n"img/c,d.png", moth \n\n')
    val = write_csv(tmp_path / 'val.csv', 'x/1.png,moth\nx/2.png,zebra\n')
    args = finetune_args(tmp_path / 'out', '--data_path', str(tmp_path), '--train_csv', train, '--val_csv', val)
    train_set, val_set = build_finetune_dataset(True, args), build_finetune_dataset(False, args)
    assert train_set.classes == val_set.classes == ['ant', 'moth', 'zebra']
    assert train_set.samples == [(str(tmp_path / 'img/a.jpg'), 2), (str(tmp_path / 'img/b.jpg'), 0),
                                 (str(tmp_path / 'img/c,d.png'), 1)]
    assert val_set.samples == [(str(tmp_path / 'x/1.png'), 1), (str(tmp_path / 'x/2.png'), 2)]
    assert '3 classes (class names, sorted): 0=ant, 1=moth, 2=zebra' in capsys.readouterr().out


def test_csv_with_integer_labels_keeps_them(tmp_path):
    train = write_csv(tmp_path / 'train.csv', 'a.png,2\nb.png,0\nc.png,1\nd.png,02\n')
    val = write_csv(tmp_path / 'val.csv', 'file,class\n/abs/e.png,1\n')
    args = finetune_args(tmp_path / 'out', '--data_path', str(tmp_path), '--train_csv', train, '--val_csv', val)
    train_set, val_set = build_finetune_dataset(True, args), build_finetune_dataset(False, args)
    assert [label for _, label in train_set.samples] == [2, 0, 1, 2] and train_set.classes == ['0', '1', '2']
    assert val_set.samples == [('/abs/e.png', 1)]


def test_train_csv_with_val_fraction_splits_its_rows(tmp_path):
    rows = [f'{name}{i}.png,{name}' for name, n in CLASS_SIZES.items() for i in range(n)]
    train = write_csv(tmp_path / 'all.csv', '\n'.join(rows))
    split = split_of(tmp_path, '--train_csv', train, '--val_fraction', '0.25', '--nb_classes', '4')
    assert {name: sum(label == name for _, label in split['val']) for name in CLASS_SIZES} == HELD_OUT_AT_QUARTER
    assert len(split['train']) + len(split['val']) == 22 and not set(split['train']) & set(split['val'])


def test_missing_file_in_a_csv_is_skipped_and_counted(tmp_path):
    write_images(tmp_path / 'img', 2, size=32)
    train = write_csv(tmp_path / 'train.csv', 'img/img0.png,a\nimg/gone.png,b\nimg/img1.png,b\n')
    args = finetune_args(tmp_path / 'out', '--data_path', str(tmp_path), '--train_csv', train, '--val_csv', train)
    val_set, train_set = build_finetune_dataset(False, args), build_finetune_dataset(True, args)
    with pytest.warns(UserWarning, match='skipping unreadable image .*gone.png'):
        assert val_set[1] is None and val_set[0][1] == 0
        assert train_set[1][1] == 1  # replaced by the next readable image, of class b
    assert val_set.bad_files.count() == 1 and train_set.bad_files.count() == 1


FLAG_ERRORS = [
    (['--val_fraction', '1'], ValueError, '--val_fraction 1.0: must be in (0, 1)'),
    (['--val_fraction', '0'], ValueError, '--val_fraction 0.0: must be in (0, 1)'),
    (['--val_csv', '{csv}'], ValueError, '--val_csv needs --train_csv'),
    (['--train_csv', '{csv}'], ValueError, '--train_csv needs --val_csv FILE or --val_fraction F'),
    (['--train_csv', '{csv}', '--val_csv', '{csv}', '--val_fraction', '0.2'], ValueError,
     '--val_fraction and --val_csv both give a validation set'),
    (['--train_csv', '{missing}', '--val_fraction', '0.2'], FileNotFoundError, '--train_csv {missing}: no such file'),
]


@pytest.mark.parametrize('flags,error,message', FLAG_ERRORS, ids=[' '.join(f) for f, _, _ in FLAG_ERRORS])
def test_bad_flag_combinations_stop_before_the_output_folder(tmp_path, flags, error, message):
    names = dict(csv=write_csv(tmp_path / 'l.csv', 'a.png,0\n'), missing=str(tmp_path / 'missing.csv'))
    import run_finetune
    out = tmp_path / 'out'
    with pytest.raises(error, match=re.escape(message.format(**names))):
        run_finetune.main(finetune_args(out, *(f.format(**names) for f in flags)))
    assert not out.exists()


def test_main_slak_shares_the_flags_and_refuses_them_with_image_folder(tmp_path):
    import main_slak
    root = touch_class_folders(tmp_path / 'data')
    args = slak_args(tmp_path / 'out', '--data_path', str(root), '--val_fraction', '0.25', '--nb_classes', '4')
    main_slak.check_args(args)
    assert len(main_slak.build_dataset(False, args)) == sum(HELD_OUT_AT_QUARTER.values())
    with pytest.raises(ValueError, match='--val_fraction 1.5: must be in'):
        main_slak.check_args(slak_args(tmp_path / 'out', '--val_fraction', '1.5'))
    with pytest.raises(ValueError, match='--data_set image_folder reads --data_path and --eval_data_path as they are'):
        main_slak.check_args(slak_args(tmp_path / 'out', '--data_set', 'image_folder', '--eval_data_path', str(root),
                                       '--val_fraction', '0.2'))


DATA_ERRORS = [
    ('folders', {'cat': 3, 'empty': 0}, r"data: class 'empty' has no images; add images or remove the class"),
    ('flat', None, 'data has no class folders (one folder of images per class)'),
    ('csv', 'a.png,0\nb.png,2\n', r"train.csv: class '1' has no images"),
    ('folders', {'cat': 3, 'empty': 0, 'void': 0, 'zero': 0},
     "data: class 'empty' has no images (nor 2 more); add images or remove the class"),
    ('csv', 'a.png,0\nb.png,-1\n', 'train.csv line 2: label -1 is negative'),
    ('csv', 'a.png,cat\nb.png\n', "train.csv line 2: expected \"path,label\", got 'b.png'"),
    ('csv', 'path,label\n', 'train.csv: no "path,label" lines'),
    ('csv', ''.join(f'{i}.png,{name}\n' for i, name in enumerate(['cat', 'cat', 'dog', 'dog', 'eel', 'eel'])),
     '3 classes, more than --nb_classes 2'),
    ('csv', 'a.png,cat\nb.png,dog\n', 'holds out no images of'),
    ('val_csv', 'a.png,cat\nb.png,bird\n', "val.csv line 2: label 'bird' is not in the class list of the training "
                                           "CSV (cat, dog)"),
    ('val_csv', 'a.png,1\nb.png,x\n', "val.csv line 2: label 'x' is not in the class list of the training CSV (0..1)"),
]


@pytest.mark.parametrize('kind,content,message', DATA_ERRORS, ids=[m[:30] for _, _, m in DATA_ERRORS])
def test_bad_data_is_one_clear_error(tmp_path, kind, content, message):
    import run_finetune
    data = tmp_path / 'data'
    data.mkdir()
    if kind == 'folders':
        flags = ['--val_fraction', '0.5']
        touch_class_folders(data, content)
    elif kind == 'flat':
        flags = ['--val_fraction', '0.5']
        (data / 'a.png').touch()
    elif kind == 'csv':
        flags = ['--train_csv', write_csv(data / 'train.csv', content), '--val_fraction', '0.5']
    else:
        is_integer = content.startswith('a.png,1')
        train = write_csv(data / 'train.csv', 'a.png,0\nb.png,1\n' if is_integer else 'a.png,cat\nb.png,dog\n')
        flags = ['--train_csv', train, '--val_csv', write_csv(data / 'val.csv', content)]
    args = finetune_args(tmp_path / 'out', '--data_path', str(data), '--nb_classes', '2', *flags)
    run_finetune.check_args(args)  # the flags are fine: the data is not
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        build_finetune_dataset(False, args)


def test_empty_class_folder_in_train_is_an_error(tmp_path):
    touch_class_folders(tmp_path / 'data' / 'train', {'cat': 2, 'dog': 0})
    touch_class_folders(tmp_path / 'data' / 'val', {'cat': 1, 'dog': 1})
    args = finetune_args(tmp_path / 'out', '--data_path', str(tmp_path / 'data'), '--nb_classes', '2')
    assert len(build_finetune_dataset(False, args)) == 2
    with pytest.raises(ValueError, match="train: class 'dog' has no images"):
        build_finetune_dataset(True, args)


def test_run_finetune_on_a_split_folder_resumes_with_the_same_split(tmp_path, capsys):
    import run_finetune
    root = tmp_path / 'data'
    for label in range(2):
        write_images(root / f'class{label}', 10, size=32, seed=label)
    out = tmp_path / 'out'
    flags = ['--data_path', str(root), '--val_fraction', '0.3', '--nb_classes', '2', '--batch_size', '7', '--epochs',
             '2', '--warmup_epochs', '0']
    with killed_at_epoch(run_finetune, 1):
        run_finetune.main(finetune_args(out, *flags))
    run_finetune.main(finetune_args(out, *flags))  # auto-resumes at epoch 1
    entries = log_entries(out)
    # 10 x 0.3 = 3 validation images per class
    assert [(e['epoch'], e['test_count']) for e in entries] == [(0, 6), (1, 6)]
    printed = capsys.readouterr().out
    assert printed.count('--val_fraction 0.3 (--seed 0): 6 validation images') == 2
    assert printed.count('--val_fraction 0.3 (--seed 0): 14 training images') == 2
    for changed in (['--val_fraction', '0.4'], ['--seed', '1']):  # another split: refused, nothing trained
        with pytest.raises(ValueError, match=f'trained with {changed[0]} (0.3|0), not {changed[1]}: resume with'):
            run_finetune.main(finetune_args(out, *flags, *changed, '--epochs', '3'))
    assert len(log_entries(out)) == 2


def test_val_folder_missing_a_class_keeps_the_training_labels(tmp_path):
    """val/ without `dog`: `eel` is still label 2, as in train/ (torchvision's ImageFolder alone would make it 1)."""
    touch_class_folders(tmp_path / 'data' / 'train', {'cat': 1, 'dog': 1, 'eel': 1})
    touch_class_folders(tmp_path / 'data' / 'val', {'cat': 1, 'eel': 2})
    args = finetune_args(tmp_path / 'out', '--data_path', str(tmp_path / 'data'), '--nb_classes', '3')
    val = build_finetune_dataset(False, args)
    assert val.classes == ['cat', 'dog', 'eel']
    assert sorted((Path(p).name, label) for p, label in val.samples) == [('cat00.png', 0), ('eel00.png', 2),
                                                                         ('eel01.png', 2)]
    (tmp_path / 'data' / 'val' / 'yak').mkdir()
    (tmp_path / 'data' / 'val' / 'yak' / 'y.png').touch()
    with pytest.raises(ValueError, match='yak are not in'):
        build_finetune_dataset(False, args)
