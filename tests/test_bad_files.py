"""Unreadable files: counted once each over DataLoader workers, epochs and ranks; left out of evaluation; listed once
in the output folder; reported in the progress line, log.txt and TensorBoard of a run."""
import types

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

import run_finetune
import run_pretrain
from engine_finetune import evaluate
from helpers import free_port, gloo_group, log_entries, pretrain_args, write_images
from util.data.bad_files import LIST_NAME, BadFiles, bad_files_of, write_bad_file_list
from util.data.datasets import ImageFolderOrFlat
from util.data.samplers import build_eval_loader


def spoil(folder, names):
    """Replaces each named image by a different kind of damage: random bytes, a truncated PNG, an empty file."""
    damages = [lambda data: np.random.default_rng(0).bytes(300), lambda data: data[:len(data) // 2], lambda _: b'']
    for k, name in enumerate(names):
        path = folder / name
        path.write_bytes(damages[k % 3](path.read_bytes()))
    return [str(folder / name) for name in names]


def test_workers_of_every_epoch_count_each_bad_file_once(tmp_path):
    data = write_images(tmp_path / 'flat', 10, size=16)
    bad = spoil(data, ['img1.png', 'img4.png', 'img7.png'])
    dataset = ImageFolderOrFlat(data, transform=lambda image: torch.from_numpy(np.asarray(image).copy()))
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=2)
    for _ in range(2):  # new worker processes each epoch
        images = torch.cat([batch for batch, _ in loader])
        assert images.shape == (10, 16, 16, 3)  # bad samples replaced by readable ones
        assert dataset.bad_files.count() == 3
    assert sorted(dataset.bad_files.new_paths()) == sorted(bad) and dataset.bad_files.new_paths() == []


def test_the_warning_names_the_file_and_the_first_line_of_its_error_once():
    bad_files = BadFiles(['a.jpg', 'b.png'])
    with pytest.warns(UserWarning) as caught:
        bad_files.add(0, OSError('image file is truncated\n(3 bytes not processed)'))
        bad_files.add(0, OSError('image file is truncated'))
        bad_files.add(1, ValueError())
    assert [str(w.message) for w in caught] == ['skipping unreadable file a.jpg (OSError: image file is truncated)',
                                               'skipping unreadable file b.png (ValueError: )']
    assert bad_files.flags.dtype == torch.uint8 and bad_files.flags.is_shared()  # one byte per sample, for workers


def test_the_bad_files_of_a_wrapped_dataset_are_found():
    class Wrapper:
        def __init__(self, dataset):
            self.dataset = dataset
    inner = types.SimpleNamespace(bad_files=BadFiles(['a.jpg']))
    assert bad_files_of(Wrapper(Wrapper(inner))) is inner.bad_files
    assert bad_files_of(Wrapper(types.SimpleNamespace())) is None


def test_under_nccl_the_flags_are_reduced_on_the_current_gpu(one_process_group, monkeypatch):
    """NCCL reduces CUDA tensors only; the merge itself is checked on CPU (gloo) by the two-process test below."""
    moved_to, to = [], torch.Tensor.to
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda: 2)
    monkeypatch.setattr(torch.distributed, 'get_backend', lambda: 'nccl')
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)
    monkeypatch.setattr(torch.Tensor, 'to', lambda t, device, copy: moved_to.append(device) or to(t, 'cpu', copy=copy))
    bad_files = BadFiles(['a.jpg', 'b.jpg'])
    bad_files.add(1, OSError('broken'))
    assert bad_files.count() == 1 and moved_to == [torch.device('cuda', 1)]


def _flag_and_count(rank, world, port, flagged, out):
    with gloo_group(rank, world, port):
        bad_files = BadFiles([f'f{i}' for i in range(8)])
        for index in flagged[rank]:
            bad_files.add(index, OSError('broken'))
        counts = [bad_files.count()]
        # a later epoch's DataLoader worker, a process forked after the count, still reports into the main process
        worker = mp.get_context('fork').Process(target=bad_files.add, args=(7, OSError('broken')))
        worker.start()
        worker.join()
        counts.append(bad_files.count())
        out[rank] = torch.tensor([*counts, *bad_files.flags.tolist()])


def test_count_is_the_union_over_ranks_and_later_workers_still_report():
    flagged, out = [[1, 2], [2, 5]], torch.zeros(2, 10, dtype=torch.long).share_memory_()
    mp.spawn(_flag_and_count, args=(2, free_port(), flagged, out), nprocs=2)
    union = [0, 1, 1, 0, 0, 1, 0, 1]
    assert out.tolist() == [[3, 4, *union], [3, 4, *union]]  # and each rank now knows the other's files


def class_folders(root, per_class=(5, 4), size=32, seed=0):
    for label, n in enumerate(per_class):
        write_images(root / f'class{label}', n, size=size, seed=seed + label)
    return root


class MeanColourClassifier(torch.nn.Module):
    """Logits from each image's mean colour: deterministic and different per image."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[3.0, -1.0, 0.5], [-2.0, 1.0, 2.0]]))
            self.fc.bias.zero_()

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


def test_evaluation_leaves_unreadable_images_out(tmp_path):
    def stats_of(root):
        dataset = ImageFolderOrFlat(root, transform=lambda image: torch.from_numpy(
            np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255), drop_unreadable=True)
        return evaluate(build_eval_loader(dataset, 2, 0, False, False), MeanColourClassifier(), 'cpu')

    full = class_folders(tmp_path / 'full')
    # class0: img0 and img1 form the first batch of 2, both bad (a batch with nothing readable); img4 a third
    spoil(full / 'class0', ['img0.png', 'img1.png', 'img4.png'])
    readable = class_folders(tmp_path / 'readable')
    for name in ['img0.png', 'img1.png', 'img4.png']:
        (readable / 'class0' / name).unlink()
    got, expected = stats_of(full), stats_of(readable)
    assert got['count'] == expected['count'] == 6 and got['skipped_files'] == 3 and 'skipped_files' not in expected
    for key in ('loss', 'acc1', 'acc5'):
        assert got[key] == pytest.approx(expected[key], rel=1e-6)


def test_the_list_names_each_file_once_also_after_a_resume(tmp_path):
    data = write_images(tmp_path / 'flat', 5, size=16)
    spoil(data, ['img0.png', 'img2.png', 'img3.png'])
    dataset = ImageFolderOrFlat(data)
    for index in (0, 2):
        dataset._decode(index)
    (tmp_path / 'out').mkdir()
    write_bad_file_list(tmp_path / 'out', dataset)
    resumed = ImageFolderOrFlat(dataset.root)  # a new process: nothing flagged yet
    for index in (2, 0, 3):
        resumed._decode(index)
    write_bad_file_list(tmp_path / 'out', resumed)
    write_bad_file_list(tmp_path / 'out', resumed)
    listed = (tmp_path / 'out' / 'bad_files.txt').read_text().splitlines()  # the name the docs give
    assert listed == [dataset.samples[0][0], dataset.samples[2][0], dataset.samples[3][0]]


def test_pretraining_reports_bad_files_in_line_log_tensorboard_and_list(tmp_path, capsys):
    data = write_images(tmp_path / 'flat', 8, size=40)
    bad = spoil(data, ['img2.png', 'img5.png'])
    out = tmp_path / 'out'
    run_pretrain.main(pretrain_args(data, out, '--log_dir', str(out / 'tb')))
    lines = [line for line in capsys.readouterr().out.splitlines() if 'Epoch: [' in line]
    assert lines and all('skipped_files: 2' in line for line in lines)
    assert [entry['train_skipped_files'] for entry in log_entries(out)] == [2, 2]
    assert sorted((out / LIST_NAME).read_text().splitlines()) == sorted(bad)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / 'tb')).Reload()
    assert {event.value for event in events.Scalars('train/skipped_files')} == {2}


def test_fine_tuning_accuracy_is_over_the_readable_validation_images(tmp_path, capsys):
    root = tmp_path / 'data'
    class_folders(root / 'train', per_class=(6, 6))
    class_folders(root / 'val', per_class=(5, 4), seed=7)
    bad = spoil(root / 'val' / 'class1', ['img3.png'])
    out = tmp_path / 'out'
    args = run_finetune.get_args_parser().parse_args([
        '--data_path', str(root), '--model', 'vit_tiny_patch16', '--input_size', '32', '--batch_size', '4',
        '--epochs', '1', '--warmup_epochs', '0', '--nb_classes', '2', '--num_workers', '1', '--device', 'cpu',
        '--output_dir', str(out), '--aa', 'none', '--reprob', '0'])
    run_finetune.main(args)
    entry = log_entries(out)[-1]
    assert entry['test_count'] == 8 and entry['test_skipped_files'] == 1 and entry['train_skipped_files'] == 0
    assert 'accuracy of the network on 8 test images' in capsys.readouterr().out
    assert (out / LIST_NAME).read_text().splitlines() == bad
