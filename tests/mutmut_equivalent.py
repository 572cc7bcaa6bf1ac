"""Mutants of tests/mutmut_sample.py that cannot change behaviour, so it skips them: `find` and `replace` are the
removed and the added lines of the mutant (stripped, joined by newlines), with the reason."""
EQUIVALENT = [
]
