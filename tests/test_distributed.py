"""torchrun + FSDP2 on CPU (gloo, 2 processes): the same numbers as one process, checkpoints that resume on
any number of processes, and accumulation without a gradient sync. Real torchrun, real process groups,
real DCP checkpoints on disk.

Runs are judged by the files they wrote (log.jsonl, the checkpoint named by `latest`), not only by
torchrun's exit code: about 1 in 20 two-rank gloo runs aborts at interpreter exit after all work is done
and the process group is destroyed (DESIGN.md)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, write_data_dir

# same-batch comparisons: each optimizer step sees the same four micro batches of 4 x 64 tokens whether one
# process runs all four or two processes run two each; only the order of float additions differs
ARGS = [*TINY, "--batch_size=4", "--grad_accum_steps=4", "--log_interval=1", "--eval_interval=10", "--eval_iters=2",
        "--save_every=10", "--lr=3e-3", "--warmup_iters=2", "--lr_decay_iters=20", "--min_lr=3e-4", "--keep_last_n=5"]
# Tolerance: with identical micro batches the runs differ only in how fp32 sums are grouped (one process
# adds four micro-batch gradients in turn; two processes each add two, then gloo averages the halves):
# rounding, ~1e-7 relative. AdamW divides by sqrt(v), so on near-zero gradients that rounding can move a
# weight by a good part of one step (lr = 3e-3). Measured over 20 steps: losses within 1.2e-7 relative,
# weights within 1.1e-6 absolute. So: losses to 1e-5 relative, weights to 1e-5 absolute (0.3% of one step),
# both far below what a real bug moves (a wrong data slice or a missing average moves losses by >1e-3).
RTOL, WEIGHT_ATOL = 1e-5, 1e-5


def launch(nproc, out, data, max_iters, timeout=300):
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd + ARGS + [f"--data_dir={data}", f"--out_dir={out}", f"--max_iters={max_iters}"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=timeout)
    latest = os.path.join(out, "latest")
    done = os.path.exists(latest) and open(latest).read().strip() == f"ckpt_{max_iters}"
    assert done, f"{nproc}-process run to {max_iters} did not finish (rc {r.returncode}):\n{r.stderr[-3000:]}"
    return r


def losses(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def weights(ckpt):
    sys.path.insert(0, ROOT)
    from sample import load_model

    model, _ = load_model(ckpt, "cpu")
    return model.state_dict()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A: one process, 20 steps. B: two processes to 10, then one process to 20. C: one to 10, then two to 20."""
    from conftest import stdlib_docstrings

    root = tmp_path_factory.mktemp("dist")
    data = str(root / "data")
    write_data_dir(data, stdlib_docstrings(300_000))
    a, b, c = (str(root / n) for n in "abc")
    launch(1, a, data, 20)
    b_first = launch(2, b, data, 10)
    launch(1, b, data, 20)
    launch(1, c, data, 10)
    launch(2, c, data, 20)
    return {"a": a, "b": b, "c": c, "data": data, "b_first_stdout": b_first.stdout}


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    a, b = losses(runs["a"]), losses(runs["b"])
    assert "2 processes (FSDP)" in runs["b_first_stdout"]
    for it in range(1, 11):
        assert a[it] == pytest.approx(b[it], rel=RTOL), (it, a[it], b[it])
    assert a[10] < a[1] - 0.2  # it learned something, so equal curves mean something
    one, two = weights(os.path.join(runs["c"], "ckpt_10")), weights(os.path.join(runs["b"], "ckpt_10"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


@pytest.mark.parametrize("run", ["b", "c"])  # b: saved by 2 processes, resumed by 1; c: saved by 1, resumed by 2
def test_resume_on_another_world_size_continues_the_curve(runs, run):
    a, r = losses(runs["a"]), losses(runs[run])
    assert sorted(r) == list(range(1, 21))  # no step lost or repeated
    for it in range(11, 21):
        assert r[it] == pytest.approx(a[it], rel=RTOL), (run, it, a[it], r[it])


def test_checkpoint_from_two_processes_samples_in_one(runs):
    r = subprocess.run([sys.executable, "sample.py", f"--ckpt={os.path.join(runs['b'], 'ckpt_10')}", "--num_samples=1",
                        "--max_new_tokens=12", "--start=The function"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "The function" in r.stdout and len(r.stdout.strip()) > len("The function")
    assert json.load(open(os.path.join(runs["b"], "ckpt_10", "config.json")))["world_size"] == 2


def test_accumulation_without_sync_gives_the_gradients_of_accumulation_with_sync(tmp_path):
    out = tmp_path / "grads.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "helpers", "fsdp_accum_check.py"), str(out)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.exists(), f"rc {r.returncode}:\n{r.stderr[-3000:]}"
    res = json.loads(out.read_text())
    assert res["params"] > 10 and res["grad_norm"] > 0
    assert res["max_abs_diff"] <= 1e-6 * res["max_abs_grad"], res


def test_readme_8b_numbers_come_from_the_code():
    r = subprocess.run([sys.executable, "model.py", "config/8b_moe.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    readme = open(os.path.join(ROOT, "README.md")).read()
    lines = r.stdout.splitlines()
    params, gpu8 = lines[0], [line for line in lines if "cuda x8" in line][0]
    assert params in readme and gpu8 in readme
    total, _, active_in_layers = (int(part.split()[0].replace(",", "")) for part in params.removeprefix("parameters: ").split(" | "))
    assert 7.5e9 < total < 8.5e9 and 2.0e9 < active_in_layers < 2.4e9  # the guide: ~8B total, ~2.2B active
    assert float(gpu8.split(": ")[1].split()[0]) < 80  # fits an 80 GB GPU by the estimate
