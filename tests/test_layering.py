"""Which code may import which, read from the source with `ast` (imports inside functions included; nothing is
imported, so this runs without torch):

- `models/` imports nothing above it: not util/, engine_*.py, the entry scripts, bench/ or tests/.
- The shared modules, `util/*.py` and the shared subpackages (SHARED_SUBPACKAGES: util/data/), import no method
  subpackage (METHODS).
- A method subpackage imports no other one, except along an edge of ALLOWED (each with its reason).
- Nothing under util/ imports engine_*.py, an entry script, bench/ or tests/.
A forbidden import fails the first test with a line naming the file, the line and the import.
"""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
METHODS = ('freezeout', 'localmim', 'spark', 'slak', 'sce', 'video', 'export')  # util/<name>/: one method (or tool)
SHARED_SUBPACKAGES = ('data',)  # util/<name>/: shared like util/*.py
ALLOWED = {  # (importing method, imported method): why
    ('sce', 'video'): 'SCE is a video method: its clip data sets read videos with util/video/io.py, and --data_path '
                      'demo is util/video/demo.py',
    ('export', 'video'): "export reads every method's checkpoints: SCE's R3D-18 trunk through util/video/checkpoint.py",
}


def imports(path, root=REPO):
    """(line, the import as written, [dotted targets]) of every import of a file under `root`, at any depth;
    `from a import b` targets both a and a.b (b may be a module); `importlib.import_module('a.b')` and
    `__import__('a')` count too."""
    tree = ast.parse(path.read_text(), str(path))
    package = path.parent.relative_to(root).parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append((node.lineno, f'import {alias.name}', [alias.name]))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: from the file's own package
                parts = package[:len(package) - node.level + 1]
                base = '.'.join([*parts, *([base] if base else [])])
            names = ', '.join(alias.name for alias in node.names)
            found.append((node.lineno, f'from {"." * node.level}{node.module or ""} import {names}',
                          [base] + [f'{base}.{alias.name}' for alias in node.names]))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, 'attr', None) == 'import_module' or getattr(node.func, 'id', None) in
                   ('import_module', '__import__'))):
            found.append((node.lineno, ast.unparse(node), [node.args[0].value]))
    return found


def method_of(target):
    """The method subpackage a dotted module path lies in, or None."""
    parts = target.split('.')
    return parts[1] if parts[0] == 'util' and len(parts) > 1 and parts[1] in METHODS else None


def violations(root=REPO):
    """'file:line: import (rule)' for every import that breaks a rule above, in the tree at `root`."""
    top_level = {p.stem for p in root.glob('*.py')} | {'bench', 'tests'}  # engine_*.py, entry scripts, ...
    found = []
    for path in sorted([*root.glob('models/**/*.py'), *root.glob('util/**/*.py')]):
        rel = path.relative_to(root)
        if rel.parts[0] == 'models':
            forbidden, rule = top_level | {'util'}, 'models/ imports nothing above it'
        else:
            forbidden, rule = top_level, 'util/ imports no engine, entry script, bench or tests module'
        own = rel.parts[1] if len(rel.parts) > 2 else None  # util/<own>/...: a subpackage
        for line, statement, targets in imports(path, root):
            broken = None
            if any(t.split('.')[0] in forbidden for t in targets):
                broken = rule
            elif rel.parts[0] == 'util':
                used = {method_of(t) for t in targets} - {None, own}
                if used and (own is None or own in SHARED_SUBPACKAGES):
                    broken = f'shared code imports the method subpackage util/{sorted(used)[0]}/'
                elif any((own, m) not in ALLOWED for m in used):
                    other = sorted(m for m in used if (own, m) not in ALLOWED)[0]
                    broken = (f'util/{own}/ imports util/{other}/: method subpackages do not import each other '
                              f'(allowed: ALLOWED in tests/test_layering.py)')
            if broken:
                found.append(f'{rel}:{line}: {statement} ({broken})')
    return found


def test_the_repository_keeps_its_layers():
    found = violations()
    assert not found, 'forbidden imports:\n' + '\n'.join(found)


def test_every_util_subpackage_is_classified():
    subpackages = {p.parent.name for p in (REPO / 'util').glob('*/__init__.py')}
    assert subpackages == set(METHODS) | set(SHARED_SUBPACKAGES), \
        'add the new util/ subpackage to METHODS or SHARED_SUBPACKAGES of tests/test_layering.py'


def test_every_allowed_edge_joins_two_methods_and_is_used():
    assert all(a in METHODS and b in METHODS and a != b for a, b in ALLOWED)
    used = {(path.relative_to(REPO).parts[1], method_of(t)) for path in (REPO / 'util').glob('*/**/*.py')
            for _, _, targets in imports(path) for t in targets}
    assert set(ALLOWED) <= used, f'allowed but unused (remove them): {sorted(set(ALLOWED) - used)}'


def test_a_forbidden_import_is_reported_with_its_file_line_and_statement(tmp_path):
    files = {
        'run_x.py': '',
        'models/net.py': 'import torch\n\n\ndef f():\n    from util.dist import unwrap\n',
        'models/ok.py': 'from models.net import f\n',
        'util/cli.py': 'import argparse\nimport util.spark.vis\n',
        'util/data/reader.py': 'from ..video import io\nfrom util.cli import x\n',
        'util/spark/a.py': 'from util import sce\nimport run_x\n',
        'util/sce/b.py': 'from util.video.io import read_video_csv\nfrom util.data import reader\n',
        'util/video/c.py': 'import importlib\nm = importlib.import_module("util.sce.hooks")\n',
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = '\n'.join(violations(tmp_path))
    for expected in ('models/net.py:5: from util.dist import unwrap (models/ imports nothing above it)',
                     'util/cli.py:2: import util.spark.vis (shared code imports the method subpackage util/spark/)',
                     'util/data/reader.py:1: from ..video import io (shared code imports the method subpackage '
                     'util/video/)',
                     'util/spark/a.py:1: from util import sce (util/spark/ imports util/sce/',
                     'util/spark/a.py:2: import run_x (util/ imports no engine',
                     "util/video/c.py:2: importlib.import_module('util.sce.hooks') (util/video/ imports util/sce/"):
        assert expected in found, f'{expected!r} not in:\n{found}'
    assert len(found.splitlines()) == 6, found  # models/ok.py, util/sce/b.py (an allowed edge) and util.cli pass
