"""README's quick start as a new user meets it: the first code block is two lines, install-and-train and the
test line that CI runs; and in a fresh clone with a fresh venv (CPU torch first, as README's note says, and no
tiktoken cache) the install-and-train line works as written, with flags appended to stop after the first eval.
That one takes minutes: NANOOSS_FULL_TESTS=1 (.ci/run sets it) switches it on."""
import os
import shlex
import subprocess
import sys
import time

import pytest

from conftest import ROOT

FULL = bool(os.environ.get("NANOOSS_FULL_TESTS"))
SHORT = ["--max_iters=4", "--eval_interval=4", "--eval_iters=2", "--grad_accum_steps=2", "--sample_every=4", "--sample_tokens=16"]


def first_block():
    readme = open(os.path.join(ROOT, "README.md")).read()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_starts_with_install_and_train_then_the_test_line_that_ci_runs():
    lines = first_block()
    assert len(lines) == 2, lines
    install_train, test_line = lines
    assert install_train.startswith("pip install -r requirements.txt") and "python train.py config/mac_micro.py" in install_train
    assert test_line == "python -m pytest -q tests"
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert test_line in ci and ci[-1] == test_line  # exactly the README's line, last


@pytest.mark.skipif(not FULL, reason="minutes: a fresh venv and install (NANOOSS_FULL_TESTS=1, as .ci/run sets)")
def test_quick_start_in_a_fresh_clone_and_venv(tmp_path):
    clone, venv = tmp_path / "clone", tmp_path / "venv"
    subprocess.run(["git", "clone", "-q", ROOT, str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if k not in ("TIKTOKEN_CACHE_DIR", "PYTHONPATH", "NANOOSS_FULL_TESTS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"  # `pip` and `python` are the venv's, as after `activate`
    env["PYTHONUNBUFFERED"] = "1"
    subprocess.run(["python", "-m", "pip", "install", "-q", "torch==2.13.0"], cwd=clone, env=env, check=True)  # the CPU build
    install, train = first_block()[0].split(" && ")
    times = {}
    for name, line in (("install", install), ("train", f"{train} {shlex.join(SHORT)}")):
        t = time.time()
        r = subprocess.run(["bash", "-c", line], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
        times[name] = time.time() - t
        assert r.returncode == 0, f"{line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    print(f"quick start: install {times['install']:.0f} s, train {times['train']:.0f} s")
    assert "data/mac_micro is missing: building it with prepare_fineweb.py" in r.stdout  # the one line
    assert "eval 4 |" in r.stdout and "sample 4 |" in r.stdout
    assert open(clone / "out" / "mac_micro" / "latest").read() == "ckpt_4"
    assert (clone / "out" / "mac_micro" / "loss.png").exists()
