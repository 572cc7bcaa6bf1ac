#!/usr/bin/env bash
# record.sh - run a command and keep what is needed to reproduce it.
#
# Usage: bash record.sh [VAR=value ...] command args...
#   e.g. bash record.sh CUDA_VISIBLE_DEVICES=0,1 python3 run_pretrain.py --output_dir out
#
# Leading VAR=value words are exported for the command only. A folder
# records/<YYYYmmdd-HHMMSS>_<name>/ is created (parent overridable with RECORD_DIR),
# <name> = basename of --output_dir, else of the first *.py script, else the command.
# It holds command.txt, env_vars.txt, git.txt, git_diff.patch, pip_freeze.txt,
# system.txt, console.log (stdout+stderr, also shown live) and exit_code.txt.
# PYTHONUNBUFFERED=1 is set (unless already set) so Python output streams live.
# The exit code of record.sh is the exit code of the command.
set -u

envs=()
while [[ $# -gt 0 && $1 =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; do envs+=("$1"); shift; done
if [[ $# -eq 0 ]]; then echo "usage: bash record.sh [VAR=value ...] command args..." >&2; exit 2; fi

# Shell-quote words so the line can be pasted back (same style as Python's shlex.quote).
quote() {
  local w out=()
  for w; do
    if [[ $w =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+=("$w"); else out+=("'${w//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

name="" args=("$@")  # record name: --output_dir, else first *.py script, else command
for ((i = 0; i < ${#args[@]}; i++)); do
  case ${args[i]} in
    --output_dir=*) name=${args[i]#--output_dir=} ;;
    --output_dir) name=${args[i + 1]:-} ;;
  esac
done
[[ -z $name ]] && for a in "$@"; do [[ $a == *.py ]] && { name=$(basename -- "$a" .py); break; }; done
[[ -z $name ]] && name=$1
[[ -n $name ]] && name=$(basename -- "$name")
name=${name//[^A-Za-z0-9._-]/_}; name=${name:-run}

# Git state is taken before the record folder exists, so it does not list it.
git_info=$(
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo none)"
  echo "branch: $(git rev-parse --abbrev-ref HEAD 2>/dev/null || echo none)"
  echo "status (git status --short):"; git status --short 2>/dev/null
  echo "untracked files:"; git ls-files --others --exclude-standard 2>/dev/null
)

parent=${RECORD_DIR:-records} ts=$(date +%Y%m%d-%H%M%S)
mkdir -p -- "$parent" || exit 1
dir=$parent/${ts}_$name n=1
until mkdir -- "$dir" 2>/dev/null; do
  [[ -e $dir ]] || { echo "record.sh: cannot create $dir" >&2; exit 1; }
  n=$((n + 1)); dir=$parent/${ts}_${name}_$n
done
dir=$(CDPATH="" cd -- "$dir" && pwd)
echo "record.sh: recording to $dir" >&2

quote "${envs[@]}" "$@" > "$dir/command.txt"
for e in "${envs[@]}"; do echo "$e"; done > "$dir/env_vars.txt"
echo "$git_info" > "$dir/git.txt"
git diff HEAD > "$dir/git_diff.patch" 2>/dev/null
py=$(command -v python || command -v python3)
{ [[ -n $py ]] && "$py" -m pip freeze; } > "$dir/pip_freeze.txt" 2>&1
{
  echo "start: $(date '+%Y-%m-%d %H:%M:%S %z')"
  echo "host: $(uname -n)"; uname -a
  echo "python: ${py:-none} $([[ -n $py ]] && "$py" --version 2>&1)"
  command -v nvidia-smi > /dev/null && nvidia-smi 2>&1
} > "$dir/system.txt"

# Ctrl-C reaches the command; tee -i keeps logging and the trap lets us write exit_code.txt.
trap 'echo "record.sh: interrupted" >&2' INT
env PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}" "${envs[@]}" "$@" 2>&1 | tee -i "$dir/console.log"
rc=${PIPESTATUS[0]}
echo "$rc" > "$dir/exit_code.txt"
echo "end: $(date '+%Y-%m-%d %H:%M:%S %z')" >> "$dir/system.txt"
echo "record.sh: exit code $rc, record in $dir" >&2
exit "$rc"
