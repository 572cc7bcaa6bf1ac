"""Shared ending of the benchmarks: print the result and, with --json PATH, append it as one JSON line."""
import json


def report(result, json_path=None):
    print(json.dumps(result, indent=1))
    if json_path:
        with open(json_path, 'a') as f:
            f.write(json.dumps(result) + '\n')
