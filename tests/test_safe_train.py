"""safe_train.py with real child processes: real train.py runs stopped at a memory line and resumed in a
smaller shape, a child that allocates fast, a child that keeps crashing, and preflight's refusals."""
import json
import os
import subprocess
import sys
from dataclasses import fields

import pytest

from conftest import ROOT, TINY, stdlib_docstrings, write_data_dir

# a model whose activations dominate its memory, so halving the micro batch really halves the need
SHAPE = dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, head_dim=32, n_expert=4, experts_per_token=2,
             intermediate_size=512, vocab_size=4097, tie_embeddings=True, block_size=256, sliding_window=64)


def supervise(*args, timeout=300):
    return subprocess.run([sys.executable, "safe_train.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("data"))
    write_data_dir(path, stdlib_docstrings(600_000), val_tokens=20_000)  # the val split must hold a 64 x 256 batch
    return path


def test_run_over_budget_is_stopped_and_finishes_with_half_the_micro_batch(tmp_path, data):
    from model import GPTConfig, memory_estimate

    cfg = GPTConfig(**{f.name: SHAPE[f.name] for f in fields(GPTConfig) if f.name in SHAPE})
    big, small = (memory_estimate(cfg, b, 256, loss_chunk=512)["total"] for b in (64, 32))  # ~2.8 and ~1.6 GB
    line = (big * small) ** 0.5  # the stop line between the two: ~30% from each (a run's peak creeps up ~15%)
    budget = line / 0.9
    out = tmp_path / "run"
    args = [*[f"--{k}={v}" for k, v in SHAPE.items()], f"--data_dir={data}", f"--out_dir={out}", "--batch_size=64",
            "--grad_accum_steps=1", "--max_iters=8", "--log_interval=1", "--eval_interval=4", "--eval_iters=2",
            "--save_every=100", "--sample_every=0", "--compile=False", f"--budget_gb={budget / 1e9:.3f}",
            "--preflight_fit=False", "--interval=0.5"]
    r = supervise(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = open(out / "safe_training.log").read()
    assert "stop: " in log and "resuming with micro batch 32 x 2 accumulation steps" in log
    assert "train.py exited with code 0" in log and "(memory stop)" in log  # it saved and left cleanly
    assert "summary: finished" in log and "restarts: 1 after 1 memory stops, 0 after 0 crashes" in log
    steps = [rec for rec in read_jsonl(out / "log.jsonl") if "loss" in rec]
    assert [s["iter"] for s in steps] == list(range(1, 9))  # no iteration lost or repeated
    assert {s["tokens_per_iter"] for s in steps} == {64 * 256}  # the same tokens per step throughout
    assert steps[0]["batch_size"] == 64 and steps[-1]["batch_size"] == 32
    # the resumed process stayed under the line
    samples = read_jsonl(out / "memory_monitoring.jsonl")
    last_pid = samples[-1]["pid"]
    assert max(s["used_gb"] for s in samples if s["pid"] == last_pid) < line / 1e9


def test_fast_allocating_child_is_stopped_before_the_stop_line(tmp_path):
    out = tmp_path / "alloc"
    budget_gb, stop_pct = 2.5, 90
    r = supervise("--train_script=tests/helpers/alloc_fast.py", "--preflight=False", f"--budget_gb={budget_gb}",
                  f"--stop_pct={stop_pct}", "--interval=0.25", "--max_memory_restarts=0", f"--out_dir={out}")
    assert r.returncode == 1 and "summary: gave up (0 memory restarts used up)" in r.stdout, r.stdout + r.stderr
    allocated = [int(x) for x in open(out / "allocated.txt").read().split()]
    assert allocated[-1] > 300  # it really was growing, fast
    assert allocated[-1] < budget_gb * 1000 * stop_pct / 100, allocated[-1]  # MB: stopped before the line
    samples = read_jsonl(out / "memory_monitoring.jsonl")
    assert max(s["used_gb"] for s in samples) < budget_gb * stop_pct / 100


def test_crashing_child_is_restarted_a_bounded_number_of_times(tmp_path):
    out = tmp_path / "crash"
    r = supervise("--train_script=tests/helpers/crash.py", "--preflight=False", "--max_crash_restarts=2",
                  "--interval=0.2", f"--out_dir={out}")
    assert r.returncode == 1
    log = open(out / "safe_training.log").read()
    assert log.count("] starting ") == 3 and log.count("crash.py exited with code 1") == 3
    assert "summary: gave up (exit code 1, and 2 crash restarts used up)" in log
    assert "restarts: 0 after 0 memory stops, 2 after 3 crashes" in log


def test_preflight_refuses_a_config_that_cannot_fit_and_names_one_that_does(tmp_path, data):
    from model import GPTConfig, memory_estimate

    cfg = GPTConfig(**{f.name: SHAPE[f.name] for f in fields(GPTConfig) if f.name in SHAPE})
    budget = memory_estimate(cfg, 8, 256, loss_chunk=512, grad_accum_steps=8)["total"] / 0.9 * 1.05  # micro batch 8 fits with 5% to spare; 32 does not
    r = supervise(*[f"--{k}={v}" for k, v in SHAPE.items()], f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}",
                  "--batch_size=32", "--grad_accum_steps=2", f"--budget_gb={budget / 1e9:.3f}", "--check-only")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and "use --batch_size=8 --grad_accum_steps=8 (the same tokens per step)" in r.stderr


def test_check_only_passes_a_good_setup_and_names_a_bad_one_in_one_line(tmp_path, data):
    base = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--check-only"]
    r = supervise(*base)
    assert r.returncode == 0, r.stderr
    assert "probe loss" in r.stdout and "preflight passed" in r.stdout
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")  # nothing was trained
    cases = [
        ([f"--data_dir={tmp_path / 'nowhere'}"], "does not exist"),
        (["--vocab_size=1000"], "larger than the model's vocab_size 1000"),
        (["--min_free_disk_gb=1000000"], "disk: "),
        (["--batch_sise=4"], "did you mean 'batch_size'"),
    ]
    for extra, msg in cases:
        r = supervise(*base, *extra)
        assert r.returncode != 0 and msg in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)


def test_macos_commands_and_mps_cap_are_built_right_without_a_mac():
    """Unit level only: caffeinate and MPS exist only on macOS; on a Mac safe_train.py runs them for real."""
    sys.path.insert(0, ROOT)
    import safe_train

    assert safe_train.caffeinate_cmd(4242) == ["caffeinate", "-i", "-m", "-s", "-w", "4242"]
    # 16 GB Mac: Metal recommends ~10.7 GB; a 12 GB budget stops at 10.8 GB, so MPS must fail past that
    env = safe_train.mps_env(12e9, 10.7e9)
    high, low = float(env["PYTORCH_MPS_HIGH_WATERMARK_RATIO"]), float(env["PYTORCH_MPS_LOW_WATERMARK_RATIO"])
    assert high * 10.7e9 == pytest.approx(12e9 * 0.9, rel=1e-3) and high < 1.7  # below PyTorch's 1.7x default
    assert 0 < low < high  # PyTorch refuses a low watermark above the high one
