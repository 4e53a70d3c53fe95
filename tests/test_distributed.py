"""torchrun + FSDP2 on CPU (gloo, 2 processes): the same numbers as one process, checkpoints that resume on
any number of processes, and accumulation without a gradient sync. Real torchrun, real process groups,
real DCP checkpoints on disk.

Runs are judged by the files they wrote (log.jsonl, the checkpoint named by `latest`), not only by
torchrun's exit code: about 1 in 20 two-rank gloo runs aborts at interpreter exit after all work is done
and the process group is destroyed (DESIGN.md)."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY, full_only, write_data_dir

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


def launch(nproc, out, data, max_iters, timeout=300, extra=()):
    if nproc == 1:
        cmd = [sys.executable, "train.py"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run(cmd + ARGS + [f"--data_dir={data}", f"--out_dir={out}", f"--max_iters={max_iters}", *extra], cwd=ROOT,
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
    from weights import load_model

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


@full_only
@pytest.mark.parametrize("router", ["expert", "token"])
def test_a_routed_recursive_model_on_two_processes_matches_one(runs, tmp_path, router):
    """Mixture-of-Recursions under FSDP: one unit per unique block, though the shared one runs twice per forward
    (and twice in the backward): two processes give one process's losses and weights."""
    mor = ["--n_layer=4", "--n_recursion=2", "--recursion_sharing=middle_cycle", f"--mor_router={router}"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    launch(1, one, runs["data"], 6, extra=mor)
    launch(2, two, runs["data"], 6, extra=mor)
    a, b = losses(one), losses(two)
    for it in range(1, 7):
        assert a[it] == pytest.approx(b[it], rel=RTOL), (it, a[it], b[it])
    w1, w2 = weights(os.path.join(one, "ckpt_6")), weights(os.path.join(two, "ckpt_6"))
    assert "mor_router.weight" in w1 and len({k.split(".")[1] for k in w1 if k.startswith("layers.")}) == 3
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=WEIGHT_ATOL, msg=k)


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
    r = subprocess.run([sys.executable, "sizing.py", "config/8b_moe.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    readme = open(os.path.join(ROOT, "README.md")).read()
    lines = r.stdout.splitlines()
    params, gpu8 = lines[0], [line for line in lines if "cuda x8" in line][0]
    assert params in readme and gpu8 in readme
    total, _, active_in_layers = (int(part.split()[0].replace(",", "")) for part in params.removeprefix("parameters: ").split(" | "))
    assert 7.5e9 < total < 8.5e9 and 2.0e9 < active_in_layers < 2.4e9  # the guide: ~8B total, ~2.2B active
    assert float(gpu8.split(": ")[1].split()[0]) < 80  # fits an 80 GB GPU by the estimate


def torchrun(out, data, max_iters, hooks="", extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *ARGS,
           f"--data_dir={data}", f"--out_dir={out}", f"--max_iters={max_iters}", *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", NANOOSS_TEST_HOOKS=hooks)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(launcher, rank):
    """The train.py process of one rank under a torchrun launcher."""
    import psutil

    deadline = time.time() + 60
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if p.environ().get("RANK") == str(rank) and "train.py" in " ".join(p.cmdline()):
                    return p
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"no rank {rank} worker")


def test_sigterm_to_one_rank_alone_makes_both_save_the_same_checkpoint_and_exit_0(tmp_path, runs):
    out = str(tmp_path / "one_rank")
    launcher = torchrun(out, runs["data"], 1000, extra=["--eval_interval=0", "--save_every=1000"])
    rank1 = worker(launcher, 1)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 3):
        time.sleep(0.05)
    signalled = time.time()
    rank1.send_signal(signal.SIGTERM)  # rank 0 never hears of it but through the agreement
    _, err = launcher.communicate(timeout=120)
    assert time.time() - signalled < 60, "the stop took too long"
    latest = open(os.path.join(out, "latest")).read()
    stopped = int(latest[5:])
    assert 3 <= stopped < 1000 and len(losses(out)) == stopped, err[-3000:]
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(os.listdir(os.path.join(out, latest)))  # both ranks wrote it
    assert launcher.returncode == 0 or "terminate called" in err, err[-3000:]


def test_a_late_signal_on_one_rank_during_eval_is_agreed_at_the_next_step_not_a_hang(tmp_path, runs):
    """Rank 1 alone is signalled inside its eval (after that step's agreement): it used to enter the save alone
    while rank 0 ran the next forward. Then the run resumes and continues the one-process curve."""
    out = str(tmp_path / "late")
    launcher = torchrun(out, runs["data"], 10, hooks="sigterm:eval:4:1", extra=["--eval_interval=4", "--save_every=1000"])
    try:
        _, err = launcher.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        launcher.kill()
        raise AssertionError("hang: the ranks disagreed about stopping")
    assert open(os.path.join(out, "latest")).read() == "ckpt_4", err[-3000:]  # step 5 was dropped mid-way
    assert sorted(losses(out)) == [1, 2, 3, 4]
    r = launch(2, out, runs["data"], 10)  # resume on 2 processes
    assert "resumed from" in r.stdout
    a, b = losses(runs["a"]), losses(out)
    assert sorted(b) == list(range(1, 11))
    for it in range(1, 11):
        assert b[it] == pytest.approx(a[it], rel=RTOL), (it, a[it], b[it])


def test_a_rank_that_cannot_see_the_chosen_checkpoint_stops_the_job_in_one_line_simulated_second_node(tmp_path, runs):
    """Two nodes that do not share out_dir cannot be made here: a test hook hides the checkpoint from rank 1."""
    import shutil

    out = str(tmp_path / "b")
    shutil.copytree(runs["b"], out)
    launcher = torchrun(out, runs["data"], 30, hooks="hide_checkpoint:1")
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode != 0
    assert f"rank 1 cannot see {os.path.join(out, 'ckpt_20')}, the checkpoint rank 0 chose" in err
    assert "out_dir must be one filesystem" in err


def test_checkpoint_from_two_processes_exports_to_transformers_with_the_same_logits_and_tokens(tmp_path, runs):
    transformers = pytest.importorskip("transformers")
    from data_loader import get_tokenizer
    from export_hf import export

    ckpt = os.path.join(runs["b"], "ckpt_10")  # written by 2 processes
    out = export(ckpt, str(tmp_path / "hf"))
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager",
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours, _ = __import__("weights").load_model(ckpt)
    idx = torch.randint(0, 4097, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, ours(idx, idx)[0], atol=1e-5, rtol=1e-5)
    paragraph = ("Return a new list containing all items from the iterable in ascending order. A custom key function "
                 "can be supplied to customize the sort order, naïve café 東京 🙂, and the reverse flag can be set to "
                 "request the result in descending order.<|endoftext|>Next document:\n\n    indented    code = 1")
    enc = get_tokenizer("o200k_base:4096")
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(paragraph) == enc.encode(paragraph, allowed_special="all")
    assert hf_tok.eos_token_id == enc.eot_token == 4096


def test_export_refuses_bad_input_in_one_line_and_writes_nothing_over(tmp_path, runs):
    import shutil

    ckpt = str(tmp_path / "ckpt")
    shutil.copytree(os.path.join(runs["b"], "ckpt_10"), ckpt)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "model.safetensors").write_text("half an export")
    r = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={ckpt}", f"--out={taken}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "exists and is not empty" in r.stderr
    assert (taken / "model.safetensors").read_text() == "half an export"
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    json.dump({**cfg, "tokenizer": "o200k_base"}, open(os.path.join(ckpt, "config.json"), "w"))
    r = subprocess.run([sys.executable, "export_hf.py", f"--ckpt={ckpt}", f"--out={tmp_path / 'new'}"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "beyond the model's vocab_size 4097" in r.stderr
    assert not os.path.exists(tmp_path / "new")


def test_two_processes_start_from_hf_weights_as_one_does_each_reading_its_shard(tmp_path, runs):
    transformers = pytest.importorskip("transformers")
    from test_hf import tiny_hf_config

    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(tiny_hf_config(tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    hf = str(tmp_path / "hf")
    model.save_pretrained(hf)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    for n, out in ((1, one), (2, two)):
        cmd = [sys.executable, "train.py"] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
        r = subprocess.run(cmd + ARGS + [f"--data_dir={runs['data']}", f"--out_dir={out}", "--max_iters=2", f"--init_from={hf}",
                                         "--lr=1e-4"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert os.path.exists(os.path.join(out, "ckpt_2")), r.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert a[1] == pytest.approx(b[1], rel=RTOL) and a[2] == pytest.approx(b[2], rel=RTOL)
    from test_hf import first_loss

    assert a[1] == pytest.approx(first_loss(hf, runs["data"], 4, 4), rel=RTOL)  # the HF weights, not a fresh init
