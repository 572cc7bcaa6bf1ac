"""Behaviour tests for record.sh: run it for real inside a throwaway git repo."""
import os
import shlex
import subprocess
import sys

import pytest

from helpers import REPO

RECORD_SH = REPO / "record.sh"
PY = sys.executable


@pytest.fixture
def env(tmp_path):
    """Put a stub `python` first on PATH: `-m pip freeze` answers instantly (real pip takes ~1 s) and notes the
    FOO it sees in tmp_path/freeze_env.txt (record.sh's own environment, not the recorded command's)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "python"
    seen = shlex.quote(str(tmp_path / "freeze_env.txt"))
    stub.write_text(f'#!/bin/sh\n[ "$1 $2 $3" = "-m pip freeze" ] && {{ echo "FOO=${{FOO-unset}}" > {seen}; '
                    f'echo stub-pkg==1.0; exit 0; }}\n'
                    f'exec {shlex.quote(PY)} "$@"\n')
    stub.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "RECORD_DIR": str(tmp_path / "records")}


@pytest.fixture
def repo(tmp_path, env):
    """A git repo with one commit and a modified tracked file; records go to tmp_path/records."""
    work = tmp_path / "repo"
    work.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    (work / "train.py").write_text("print('v1')\n")
    subprocess.run(["git", "init", "-q"], cwd=work, check=True)
    subprocess.run(["git", "add", "train.py"], cwd=work, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "init"], cwd=work, check=True)
    (work / "train.py").write_text("print('v2')\n")
    (work / "notes.txt").write_text("untracked\n")
    return work, tmp_path / "records", env


def record(repo, *words):
    work, records, env = repo
    return subprocess.run(["bash", str(RECORD_SH), *words], cwd=work, env=env,
                          capture_output=True, text=True, timeout=60)


def only_record(records):
    dirs = list(records.iterdir())
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_env_vars_exit_code_and_files(repo, tmp_path):
    code = ("import os,sys; print(os.environ['FOO']); print(repr(os.environ['BAZ'])); print('err', file=sys.stderr); "
            "sys.exit(3)")
    res = record(repo, "FOO=bar", "BAZ=a b", PY, "-c", code)
    assert res.returncode == 3
    assert res.stdout.splitlines()[:2] == ["bar", "'a b'"]  # the command sees both, streamed live too
    d = only_record(repo[1])
    log = (d / "console.log").read_text()
    assert "bar" in log and "err" in log
    assert (d / "exit_code.txt").read_text().strip() == "3"
    assert (d / "env_vars.txt").read_text().splitlines() == ["FOO=bar", "BAZ=a b"]
    # exported for the command only: record.sh's own `python -m pip freeze` ran without them
    assert (tmp_path / "freeze_env.txt").read_text().strip() == "FOO=unset"
    git_txt = (d / "git.txt").read_text()
    assert "train.py" in git_txt and "notes.txt" in git_txt
    assert "records" not in git_txt
    assert "+print('v2')" in (d / "git_diff.patch").read_text()
    system = (d / "system.txt").read_text()
    assert "start:" in system and "end:" in system and "Python" in system
    assert (d / "pip_freeze.txt").read_text().strip() == "stub-pkg==1.0"
    assert str(d) in res.stderr


@pytest.mark.parametrize("words", [["--output_dir", "runs/full_pretrain_out"],
                                   ["--output_dir=runs/full_pretrain_out/"]])
def test_named_after_output_dir(repo, words):
    res = record(repo, PY, "train.py", "--epochs", "1", *words)
    assert res.returncode == 0, res.stderr
    d = only_record(repo[1])
    assert d.name.endswith("_full_pretrain_out")
    assert d.name.split("_")[0].replace("-", "").isdigit()
    assert "v2" in (d / "console.log").read_text()


def test_named_after_script_then_command(repo):
    assert record(repo, PY, "train.py").returncode == 0
    assert only_record(repo[1]).name.endswith("_train")
    res = record(repo, "true")
    assert res.returncode == 0
    assert sorted(p.name.split("_", 1)[1] for p in repo[1].iterdir()) == ["train", "true"]


def test_same_name_gets_suffix(repo, tmp_path):
    """Runs started within the same second get _2, _3: a fake `date` on PATH pins the time stamp."""
    fake_date = tmp_path / "bin" / "date"
    fake_date.write_text('#!/bin/sh\n[ "$1" = "+%Y%m%d-%H%M%S" ] && { echo 20240102-030405; exit 0; }\n'
                         'exec /bin/date "$@"\n')
    fake_date.chmod(0o755)
    for _ in range(3):
        res = record(repo, "true", "--output_dir", "x")
        assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in repo[1].iterdir()) == ["20240102-030405_x", "20240102-030405_x_2",
                                                         "20240102-030405_x_3"]
    assert "20240102-030405_x_3" in res.stderr


def test_command_txt_round_trips(repo):
    words = ["A=1", "B=x y", PY, "-c", "import sys; print(sys.argv[1:])",
             "it's", "", "$HOME", "a\nb", "--output_dir=o d"]
    res = record(repo, *words)
    assert res.returncode == 0, res.stderr
    d = only_record(repo[1])
    assert d.name.endswith("_o_d")
    assert shlex.split((d / "command.txt").read_text()) == words
    assert str(words[5:]) in (d / "console.log").read_text()


@pytest.mark.parametrize("words", [[], ["FOO=bar"]])
def test_usage_without_command(repo, words):
    res = record(repo, *words)
    assert res.returncode == 2
    assert "usage" in res.stderr.lower()
    assert not repo[1].exists()


def test_outside_git_repo(tmp_path, env):
    res = subprocess.run(["bash", str(RECORD_SH), "true"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60,
                         env={**env, "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)})
    assert res.returncode == 0, res.stderr
    d = only_record(tmp_path / "records")
    assert "commit: none" in (d / "git.txt").read_text()
    assert (d / "exit_code.txt").read_text().strip() == "0"


def test_default_parent_is_records_in_cwd(repo):
    work, _, env = repo
    env = {k: v for k, v in env.items() if k != "RECORD_DIR"}
    res = subprocess.run(["bash", str(RECORD_SH), "true"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    d = only_record(work / "records")
    assert "records" not in (d / "git.txt").read_text()  # git state taken before the folder exists
