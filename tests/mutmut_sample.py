"""Mechanical mutation testing: mutmut's mutation operators applied to chosen modules, a seeded random sample of
the mutants, each run against only the tests that execute the mutated line.

    pip install -r requirements-mutation.txt
    python tests/mutmut_sample.py --modules util/train_step.py engine.py --sample 30 --budget 40m
    python tests/mutmut_sample.py --list        # the modules and the test files searched for their coverage

Per module: its test files (MODULES) run once under coverage.py with one context per test function (the quick
tests; the slow ones launch processes coverage does not follow). Every mutant mutmut generates (numbers, strings,
comparisons, boolean and arithmetic operators, removed arguments, ...) is numbered in source order; a seeded
sample is applied one at a time to a copy of the repository, and the tests that executed the statement of its
first changed line (all of the module's test files for lines run at import or in a process a test spawned) run
until the first failure. Outcomes: killed (a test failed), survived (they passed), timed out, not covered (no test
runs the line: a survivor too), equivalent (listed in tests/mutmut_equivalent.py with the reason it cannot change
behaviour; not run). Each survivor is
printed as a diff. Outcomes are appended to --results; --reuse skips the mutants it records killed for the same
source (a rerun after adding tests runs the survivors only). Exit code: the number of modules below --target %
killed among their sampled, non-equivalent mutants (timeouts count as killed).
"""
import argparse
import ast
import difflib
import hashlib
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mutations import REPO, copy_repository

# module -> the test files that exercise it
MODULES = {
    'util/train_step.py': ['test_train_step.py', 'test_train_step_amp.py', 'test_engine.py', 'test_clip_grad.py'],
    'engine.py': ['test_engine.py', 'test_engine_contract.py', 'test_engine_comm.py', 'test_engine_finetune.py',
                  'test_preemption.py', 'test_bad_files.py'],
    'util/checkpoint.py': ['test_checkpoint.py', 'test_checkpoint_contract.py', 'test_checkpoint_faults.py',
                           'test_safe_load.py'],
    'util/preemption.py': ['test_preemption.py', 'test_preemption_unit.py'],
    'util/data/bad_files.py': ['test_bad_files.py'],
    'util/freezeout/schedule.py': ['test_freezeout.py'],
    'util/freezeout/cache.py': ['test_freezeout_cache.py'],
    'util/freezeout/feature_masking.py': ['test_feature_masking.py'],
    'util/export/read.py': ['test_export.py', 'test_export_read.py'],
    'util/export/formats.py': ['test_export.py', 'test_export_read.py', 'test_export_formats.py'],
    'util/data/user_data.py': ['test_user_data.py'],
    'util/data/fast_image.py': ['test_data_pipeline.py'],
    'util/video/views.py': ['test_video_eval.py', 'test_run_finetune_video.py'],
    'util/video/eval.py': ['test_video_eval.py', 'test_run_finetune_video.py'],
    'models/grad_ckpt.py': ['test_grad_ckpt.py', 'test_spark_grad_ckpt.py'],
    'models/spark_sparse.py': ['test_spark_sparse.py', 'test_spark_grad_ckpt.py'],
    'util/slak/sparse_training.py': ['test_slak_sparse_training.py'],
}
OUTCOMES = ('killed', 'survived', 'timed out', 'not covered', 'equivalent')


def generate(path):
    """Every mutant of the file, in source order: (first changed line, mutated source, diff lines)."""
    from mutmut.mutation.file_mutation import create_mutations, deep_replace
    code = path.read_text()
    module, mutations, _, _ = create_mutations(str(path), code)
    original = code.splitlines()
    mutants = []
    for mutation in mutations:
        mutated = deep_replace(module, mutation.original_node, mutation.mutated_node).code
        diff = list(difflib.unified_diff(original, mutated.splitlines(), lineterm='', n=0))[2:]
        if not diff:
            continue
        first = int(diff[0].split()[1].split(',')[0].lstrip('-'))
        mutants.append((first, mutated, diff))
    return sorted(mutants, key=lambda m: m[0])


def load_equivalents():
    spec = importlib.util.spec_from_file_location('equivalent', REPO / 'tests' / 'mutmut_equivalent.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EQUIVALENT


def is_equivalent(file, diff, equivalents):
    removed = '\n'.join(line[1:].strip() for line in diff if line.startswith('-'))
    added = '\n'.join(line[1:].strip() for line in diff if line.startswith('+'))
    return next((e['reason'] for e in equivalents
                 if e['file'] == file and e['find'] == removed and e['replace'] == added), None)


def coverage_by_line(copy, file, test_files):
    """{line: set of pytest node ids that executed it}; lines run outside a test map to all of `test_files`."""
    from coverage import CoverageData
    rc, data = copy / '.mutmut_coveragerc', copy / '.mutmut_coverage'
    # processes a test spawns (mp.spawn, DataLoader workers) are measured too, their lines under no test context
    rc.write_text(f'[run]\ndata_file = {data}\ninclude = {file}\ndynamic_context = test_function\n'
                  'concurrency = multiprocessing,thread\nparallel = True\n')  # the processes read it too
    tests = [f'tests/{name}' for name in test_files]
    cmd = [sys.executable, '-m', 'coverage', 'run', f'--rcfile={rc}', '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
           '-m', 'not slow', *tests]
    done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f'{file}: its tests fail without a mutation:\n{done.stdout[-2000:]}')
    subprocess.run([sys.executable, '-m', 'coverage', 'combine', f'--rcfile={rc}', '-q'],
                   cwd=copy, check=True, capture_output=True)
    covered = CoverageData(str(data))
    covered.read()
    measured = next((f for f in covered.measured_files() if f.endswith(file)), None)
    lines = {}
    for line, contexts in (covered.contexts_by_lineno(measured) if measured else {}).items():
        ids = set()
        for context in contexts:
            if not context:  # run at import, or in a process a test spawned
                ids.update(tests)
            else:
                module, _, name = context.partition('.')
                ids.add(f"tests/{module}.py::{name.replace('.', '::')}")
        lines[line] = ids
    return lines


def statement_starts(source):
    """{line: first line of the innermost statement spanning it}: coverage.py records a statement under its first
    line, and a mutant of a continuation line must find the tests that ran the statement."""
    starts = {}
    for node in sorted((n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.stmt)), key=lambda n: n.lineno):
        body_start = min((child.lineno for field in ('body', 'orelse', 'finalbody', 'handlers')
                          for child in getattr(node, field, []) or []), default=node.end_lineno + 1)
        for line in range(node.lineno, min(node.end_lineno + 1, body_start)):
            starts[line] = node.lineno
    return starts


def run_mutant(copy, tests, timeout):
    cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', '-m', 'not slow', *sorted(tests)]
    try:
        done = subprocess.run(cmd, cwd=copy, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return 'timed out'
    return {0: 'survived', 1: 'killed'}.get(done.returncode, 'killed')  # 2-4: the mutant broke the import


def earlier_kills(results, file, sha):
    """{mutant index: outcome} of the mutants of the source of `file` with this `sha` that --results recorded as
    killed or timed out: tests only grow, so they are not run again; survivors are."""
    if not results or not Path(results).exists():
        return {}
    records = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    return {r['index']: r['outcome'] for r in records
            if r['file'] == file and r['sha'] == sha and r['outcome'] in ('killed', 'timed out')}


def record(results, file, sha, index, outcome):
    if results:
        Path(results).parent.mkdir(parents=True, exist_ok=True)
        with open(results, 'a') as out:
            out.write(json.dumps({'file': file, 'sha': sha, 'index': index, 'outcome': outcome}) + '\n')


def test_module(copy, file, args, equivalents, deadline):
    path = copy / file
    original = path.read_text()
    mutants = generate(path)
    sha = hashlib.sha256(original.encode()).hexdigest()
    earlier = earlier_kills(args.results, file, sha) if args.reuse else {}
    sample = sorted(random.Random(f'{args.seed}:{file}').sample(range(len(mutants)), min(args.sample, len(mutants))))
    starts = statement_starts(original)
    covered = {}  # the coverage run, once some sampled mutant needs it: {'lines': ..., 'timeout': ...}

    def covering_tests(line):
        if not covered:
            start = time.time()
            covered['lines'] = coverage_by_line(copy, file, MODULES[file])
            covered['timeout'] = max(120.0, 5 * (time.time() - start))
        return covered['lines'].get(line) or covered['lines'].get(starts.get(line), set())
    counts, survivors = dict.fromkeys(OUTCOMES, 0), []
    for n, index in enumerate(sample):
        if time.time() > deadline:
            print(f'  budget spent: {len(sample) - n} sampled mutants of {file} not run')
            break
        line, mutated, diff = mutants[index]
        reason = is_equivalent(file, diff, equivalents)
        if reason:
            outcome = 'equivalent'
        elif index in earlier:
            outcome = earlier[index]
        elif not covering_tests(line):
            outcome = 'not covered'
        else:
            path.write_text(mutated)
            try:
                outcome = run_mutant(copy, covering_tests(line), covered['timeout'])
            finally:
                path.write_text(original)
        if index not in earlier:
            record(args.results, file, sha, index, outcome)
        counts[outcome] += 1
        if outcome in ('survived', 'not covered'):
            survivors.append((index, outcome, diff))
        again = ' (earlier run)' if index in earlier else ''
        print(f'  #{index:<4} line {line:<5} {outcome + again:<12} {diff[-1][1:].strip()[:90]}', flush=True)
    return len(mutants), sum(counts.values()), counts, survivors


def stale_equivalents(copy, equivalents):
    stale = [e for e in equivalents if not any(is_equivalent(e['file'], diff, [e])
                                                for _, _, diff in generate(copy / e['file']))]
    for e in stale:
        print(f"stale: {e['file']}: {e['find']!r} -> {e['replace']!r}")
    print(f'{len(equivalents) - len(stale)} of {len(equivalents)} equivalent mutants still generated')
    return len(stale)


def parse_budget(text):
    units = {'s': 1, 'm': 60, 'h': 3600}
    return float(text[:-1]) * units[text[-1]] if text[-1] in units else float(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--modules', nargs='+', default=list(MODULES), help='files of MODULES (default: all)')
    parser.add_argument('--sample', type=int, default=30, help='mutants drawn per module')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--budget', default='40m', help='wall-clock for all modules: 90s, 40m, 2h')
    parser.add_argument('--target', type=float, default=90.0, help='percent of sampled mutants to kill')
    parser.add_argument('--list', action='store_true')
    parser.add_argument('--check_equivalents', action='store_true',
                        help='only list the entries of tests/mutmut_equivalent.py that no mutant matches any more '
                             '(the code changed under them); exit code: their number')
    parser.add_argument('--results', default=str(REPO / '.cache' / 'mutmut' / 'results.jsonl'),
                        help='every outcome is appended here (JSON lines: file, sha256 of its source, mutant, outcome)')
    parser.add_argument('--reuse', action='store_true',
                        help='take the mutants --results recorded killed for the same source as killed (a later run '
                             'after adding tests reruns the survivors only)')
    args = parser.parse_args()
    unknown = [m for m in args.modules if m not in MODULES]
    if unknown:
        parser.error(f'{unknown}: not in MODULES of tests/mutmut_sample.py ({", ".join(MODULES)})')
    if args.list:
        for file in args.modules:
            print(f"{file:36} {', '.join(MODULES[file])}")
        return 0
    args.results = args.results and str(Path(args.results).resolve())  # the runs chdir into a copy
    equivalents, start = load_equivalents(), time.time()
    deadline, rows = start + parse_budget(args.budget), []
    with tempfile.TemporaryDirectory(prefix='mutmut_') as tmp:
        copy = Path(tmp)
        copy_repository(copy)
        (copy / 'setup.cfg').write_text('[mutmut]\nsource_paths = .\n')  # mutmut reads its settings from here
        os.chdir(copy)
        if args.check_equivalents:
            return stale_equivalents(copy, equivalents)
        for file in args.modules:
            print(f'{file}:', flush=True)
            generated, sampled, counts, survivors = test_module(copy, file, args, equivalents, deadline)
            for index, outcome, diff in survivors:
                print(f'  {outcome}: #{index}\n' + '\n'.join(f'    {line}' for line in diff))
            rows.append((file, generated, sampled, counts))
    print(f'\n| module | generated | sampled | killed | survived | timed out | not covered | equivalent | killed % |')
    print('|---|---|---|---|---|---|---|---|---|')
    below = 0
    for file, generated, sampled, counts in rows:
        tried = sampled - counts['equivalent']
        rate = 100 * (counts['killed'] + counts['timed out']) / tried if tried else 100.0
        below += rate < args.target
        print(f"| {file} | {generated} | {sampled} | " + ' | '.join(str(counts[o]) for o in OUTCOMES) +
              f' | {rate:.0f} |')
    print(f'seed {args.seed}, {time.time() - start:.0f} s in all')
    return below


if __name__ == '__main__':
    sys.exit(main())
