"""torch.load for checkpoint files from anywhere: never runs code from the file, yet reads what official code writes.

torch.load(weights_only=True) refuses any class it does not know, and the official checkpoints hold a few:
argparse Namespaces (MAE, LocalMIM), numpy floats in optimizer groups (SLaK, ConvNeXt), omegaconf containers and
Lightning entries (eztorch). Here every class or function a file names is replaced, before loading, by an inert
stand-in that keeps its name and its pickled data (no method of the real one runs, nothing is imported), numpy
scalars become Python numbers, and torch's restricted unpickler does the rest. A file naming a function that runs
commands or code (os.system, eval, subprocess, ...) is refused outright, so that it is reported rather than
silently turned into data.
"""
import argparse
import pickle
import zipfile

import numpy as np
import torch
from torch.serialization import get_unsafe_globals_in_checkpoint, safe_globals


class UnsafeCheckpointError(ValueError):
    """A file that would run code when unpickled."""


class Foreign:
    """A pickled object of a class (or a call of a function) that was not imported: its name and data."""
    qualname = '?'

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self):
        return f'<{self.qualname}: not imported>'


def _stand_in(qualname):
    module, _, name = qualname.rpartition('.')
    return type(name, (Foreign,), {'qualname': qualname, '__module__': module, '__qualname__': name})


class _DType(Foreign):
    """numpy.dtype('f8', ...) as pickled: kept as its type string and byte order."""
    qualname = 'numpy.dtype'

    def numpy(self):
        byte_order = self.state[1] if isinstance(self.state, tuple) and len(self.state) > 1 else '='
        return np.dtype(str(self.args[0])).newbyteorder(byte_order if byte_order in '<>=|' else '=')


def _numpy_scalar(dtype, data=None):
    """numpy's scalar reconstructor: the value as a plain Python number (an object scalar: its object)."""
    kind = dtype.numpy() if isinstance(dtype, _DType) else None
    if kind is not None and kind.hasobject:
        return data
    if kind is None or not isinstance(data, bytes) or len(data) != kind.itemsize:
        return _stand_in('numpy.scalar')(dtype, data)
    return np.frombuffer(data, dtype=kind)[0].item()


# Names official files use, read as plain data: numpy 1.x and 2.x write different module paths.
KNOWN = {'numpy.core.multiarray.scalar': _numpy_scalar, 'numpy._core.multiarray.scalar': _numpy_scalar,
         'numpy.dtype': _DType, 'argparse.Namespace': argparse.Namespace}
# Modules and builtins whose functions run commands or code: a file naming one is refused.
CODE_RUNNING_MODULES = ('os', 'posix', 'nt', 'sys', 'subprocess', 'pty', 'shutil', 'socket', 'importlib', 'runpy',
                        'code', 'codeop', 'ctypes', 'marshal', 'pickle', '_pickle', 'webbrowser', 'multiprocessing',
                        'pdb', 'timeit', 'platform', 'commands', 'torch.hub', 'torch.load', 'torch.save')
CODE_RUNNING_BUILTINS = {'eval', 'exec', 'compile', '__import__', 'getattr', 'setattr', 'delattr', 'open', 'input',
                         'breakpoint', 'globals', 'locals', 'vars', 'apply', 'execfile'}


def runs_code(qualname):
    """Whether the global `qualname` (module.name) is a function that may run commands or code."""
    module, _, name = qualname.rpartition('.')
    if module in ('builtins', '__builtin__'):
        return name in CODE_RUNNING_BUILTINS
    return any(module == m or module.startswith(m + '.') or qualname == m for m in CODE_RUNNING_MODULES)


def _globals_in(path):
    """The globals the file's pickle names that torch's restricted unpickler does not know."""
    if zipfile.is_zipfile(path):
        return get_unsafe_globals_in_checkpoint(path)
    return []  # the legacy (torch < 1.6) format: found one at a time while loading


def _missing_global(error):
    """'module.name' from torch's "Unsupported global: GLOBAL module.name was not an allowed global" error."""
    text = str(error)
    marker = 'Unsupported global: GLOBAL '
    if marker not in text:
        return None
    return text.split(marker, 1)[1].split(' ', 1)[0]


def safe_load(path, mmap=False):
    """torch.load(path) on the CPU with weights_only=True, every unknown global an inert stand-in (see the module
    docstring). Raises UnsafeCheckpointError for a file naming a code-running function; other failures are torch's
    (the caller says whether the file is damaged)."""
    names = set(_globals_in(path))
    for _ in range(64):  # the legacy format names its globals only while loading
        dangerous = sorted(n for n in names if runs_code(n))
        if dangerous:
            raise UnsafeCheckpointError(f'{path} was refused: unpickling it would call {", ".join(dangerous)} (a '
                                        f'file that runs code when loaded); nothing from it was run or loaded')
        allowed = [(KNOWN.get(n) or _stand_in(n), n) for n in names]
        try:
            with safe_globals(allowed):
                return torch.load(path, map_location='cpu', weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
        except pickle.UnpicklingError as error:
            name = _missing_global(error)
            if name is None or name in names:
                raise
            names.add(name)
    raise pickle.UnpicklingError(f'{path} names more than {len(names)} unknown classes')


def foreign_classes(obj):
    """The stand-in classes inside a loaded checkpoint (dicts, lists, tuples and stand-ins walked; cycles allowed)."""
    found, seen, todo = set(), set(), [obj]
    while todo:
        item = todo.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, type) and issubclass(item, Foreign) and item is not Foreign:
            found.add(item)
        elif isinstance(item, Foreign):
            todo.extend([type(item), item.args, item.state])
        elif isinstance(item, dict):
            todo.extend(item.values())
        elif isinstance(item, (list, tuple)):
            todo.extend(item)
    return found


def foreign_names(obj):
    """The qualified names of the stand-ins inside a loaded checkpoint, sorted."""
    return sorted({cls.qualname for cls in foreign_classes(obj)})


def describe(obj):
    """What a loaded object is, in a few words: 'a pickled omegaconf.dictconfig.DictConfig object', 'a Tensor'."""
    if isinstance(obj, Foreign):
        return f'a pickled {obj.qualname} object'
    return f'a {type(obj).__name__}'

