"""Files a data set cannot read: each warned about once, counted over DataLoader workers and ranks, listed once.

Every DataLoader worker holds its own copy of the dataset, so a plain counter dies with the worker. The flags
(one byte per sample) live in shared memory instead: workers set them, the main process reads them at print
steps and epoch ends and takes their maximum over ranks, which gives the number of distinct bad files whichever
worker or rank met them. Training replaces a bad sample (see the datasets); evaluation drops it
(`collate_readable`), so accuracy is over the files that were really read.
"""
import os
import warnings

import torch
import torch.distributed as dist
from torch.utils.data import default_collate

LIST_NAME = 'bad_files.txt'


class BadFiles:
    def __init__(self, paths, kind='file'):
        self.paths, self.kind = [str(p) for p in paths], kind
        self.flags = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()
        self._listed = set()

    def __contains__(self, index):
        return bool(self.flags[index])

    def add(self, index, error):
        """Flags sample `index` as unreadable; warns the first time."""
        if not self.flags[index]:
            self.flags[index] = 1
            reason = (str(error).strip().splitlines() or [''])[0][:200]
            warnings.warn(f'skipping unreadable {self.kind} {self.paths[index]} ({type(error).__name__}: {reason})')

    def count(self):
        """Distinct unreadable files met so far by all workers of all ranks. Under DDP this is a collective: every
        rank calls it at the same point (print steps and epoch ends are the same on every rank). Afterwards every
        rank knows all of them and skips them without reading."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            device = torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'
            merged = self.flags.to(device, copy=True)
            dist.all_reduce(merged, op=dist.ReduceOp.MAX)
            self.flags.copy_(merged.cpu())
        return int(self.flags.sum())

    def new_paths(self):
        """The flagged files not returned by an earlier call."""
        new = [i for i in self.flags.nonzero().flatten().tolist() if i not in self._listed]
        self._listed.update(new)
        return [self.paths[i] for i in new]


def bad_files_of(dataset):
    """The BadFiles of a dataset or of the dataset it wraps (`.dataset`), or None."""
    while dataset is not None:
        if isinstance(getattr(dataset, 'bad_files', None), BadFiles):
            return dataset.bad_files
        dataset = getattr(dataset, 'dataset', None)
    return None


def collate_readable(batch):
    """default_collate over the samples that could be read (a dataset returns None for the others); None when
    none could."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def write_bad_file_list(output_dir, *datasets):
    """Appends the files newly found unreadable in `datasets` to output_dir/bad_files.txt (main process only), so
    the folder holds one list with each file once, also across resumed runs. Call after `BadFiles.count()` (the
    engine and `evaluate` do), so that the main process knows the other ranks' files too."""
    from util.dist import is_main_process
    if not output_dir or not is_main_process():
        return
    path = os.path.join(output_dir, LIST_NAME)
    listed = set()
    if os.path.exists(path):
        with open(path) as f:
            listed = set(f.read().splitlines())
    new = [p for d in datasets if bad_files_of(d) is not None for p in bad_files_of(d).new_paths() if p not in listed]
    if new:
        with open(path, 'a') as f:
            f.write(''.join(f'{p}\n' for p in dict.fromkeys(new)))
        print(f'{len(new)} unreadable file(s) added to {path}')
