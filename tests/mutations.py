"""Mutation check: does each test fail when the behaviour it is named after is removed?

    python tests/mutations.py              # every mutation of tests/mutants/*.py
    python tests/mutations.py --only clip  # those whose file or note contains 'clip' (several words: any of them)
    python tests/mutations.py --list

Each entry of a `MUTATIONS` list in tests/mutants/*.py replaces one exact snippet of a source file (it must
occur once) and names the tests that must then fail. The runner copies the repository (tracked and
untracked-but-not-ignored files) to a temporary folder, runs the named tests there unmutated (they must
pass), then applies each mutation alone and runs its tests again. A mutation is *killed* when pytest reports
failing tests (exit code 1); it *survives* when they pass. Exit code: the number of survivors and errors.
Not part of the CI run (it takes minutes per mutation group); run it after changing a core module or a test.
"""
import argparse
import importlib.util
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent


def load_mutations():
    mutations = []
    for path in sorted((REPO / 'tests' / 'mutants').glob('*.py')):
        spec = importlib.util.spec_from_file_location(f'mutants_{path.stem}', path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for entry in module.MUTATIONS:
            mutations.append({**entry, 'group': path.stem})
    return mutations


def check(mutation):
    text = (REPO / mutation['file']).read_text()
    count = text.count(mutation['find'])
    if count != 1:
        raise ValueError(f"{mutation['group']}: {mutation['file']} holds {count} copies of {mutation['find']!r} "
                         f"(need exactly 1): update tests/mutants/{mutation['group']}.py")
    for test in mutation['tests']:
        path, _, name = test.partition('::')
        source = REPO / path
        if not source.is_file() or (name and f"def {name.split('[')[0]}(" not in source.read_text()):
            raise ValueError(f"{mutation['group']}: no test {test}: update tests/mutants/{mutation['group']}.py")


def copy_repository(dest):
    listed = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split('\0')
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def run_tests(copy, tests, timeout):
    start = time.time()
    try:
        done = subprocess.run([sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *tests],
                              cwd=copy, capture_output=True, text=True, timeout=timeout)
        lines = (done.stdout + done.stderr).strip().splitlines()
        code, tail = done.returncode, [line for line in lines if line.startswith('FAILED')] or lines[-1:]
    except subprocess.TimeoutExpired:
        code, tail = -1, ['timed out']
    return code, time.time() - start, tail[0][:160] if tail else ''


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--only', nargs='+', default=[''],
                        help='run the mutations whose file, group or note contains any of these')
    parser.add_argument('--list', action='store_true')
    parser.add_argument('--timeout', type=int, default=900, help='seconds per pytest run')
    args = parser.parse_args()
    mutations = [m for m in load_mutations() if any(word in m['file'] or word in m['group'] or
                                                    word in m.get('note', '') for word in args.only)]
    for mutation in mutations:
        check(mutation)
    if args.list:
        for m in mutations:
            print(f"{m['group']:>8}  {m['file']}: {m.get('note', '')}")
        return 0
    failures, start = 0, time.time()
    with tempfile.TemporaryDirectory(prefix='mutations_') as tmp:
        copy = pathlib.Path(tmp)
        copy_repository(copy)
        tests = sorted({t for m in mutations for t in m['tests']})
        code, seconds, tail = run_tests(copy, tests, args.timeout * 2)
        print(f'baseline: {len(tests)} test ids, exit {code} in {seconds:.0f} s ({tail})')
        if code != 0:
            print('the tests fail without any mutation: fix them first')
            return 1
        for m in mutations:
            target = copy / m['file']
            original = target.read_text()
            target.write_text(original.replace(m['find'], m['replace'], 1))
            try:
                code, seconds, tail = run_tests(copy, m['tests'], args.timeout)
            finally:
                target.write_text(original)
            status = {1: 'killed', 0: 'SURVIVED'}.get(code, f'ERROR (exit {code})')
            failures += status != 'killed'
            print(f"{status:>16}  {seconds:5.0f} s  {m['file']}: {m.get('note', '')}  [{tail}]", flush=True)
    print(f'{len(mutations)} mutations, {len(mutations) - failures} killed, {failures} survived or errored, '
          f'{time.time() - start:.0f} s in all')
    return failures


if __name__ == '__main__':
    sys.exit(main())
