"""train.py as a user runs it: it learns, stops on SIGTERM, resumes exactly, refuses bad input in one line."""
import glob
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY, padded_checkpoint, run_script, write_data_dir


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def unigram_baseline(data_dir, vocab_size=4097):
    """Val loss of the best model that ignores context, fitted on the train split: each val token scored
    by its train frequency (add-half smoothing for tokens train never saw)."""
    load = lambda split: np.concatenate([np.load(f).astype(np.int64) for f in sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))])
    train, val = load("train"), load("val")
    p = (np.bincount(train, minlength=vocab_size) + 0.5) / (len(train) + 0.5 * vocab_size)
    return float(-np.log(p[val]).mean())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus):
    """One real training run shared by the tests that read its outputs."""
    data = str(tmp_path_factory.mktemp("data_big_val"))
    write_data_dir(data, corpus, val_tokens=7500)
    out = str(tmp_path_factory.mktemp("run"))
    r = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--batch_size=16", "--max_iters=400",
                   "--eval_interval=100", "--eval_iters=10", "--log_interval=10", "--save_every=100", "--keep_last_n=2",
                   "--warmup_iters=20", "--lr=4e-3", "--lr_decay_iters=400", "--min_lr=4e-4", "--sample_every=200",
                   "--sample_tokens=16")
    assert r.returncode == 0, r.stderr
    return data, out, r.stdout


def test_val_loss_falls_clearly_below_a_unigram_model(trained):
    data, out, _ = trained
    evals = [r for r in read_log(out) if r.get("eval")]
    h = unigram_baseline(data)  # ~6.6 nats here
    assert evals[-1]["val_loss"] < h - 0.5, (evals[-1], h)  # 0.5 nats: 40% lower perplexity, from context alone
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert math.isclose(evals[-1]["val_ppl"], math.exp(evals[-1]["val_loss"]))


def test_log_has_raw_router_stats_per_layer(trained):
    _, out, stdout = trained
    steps = [r for r in read_log(out) if not r.get("eval")]
    assert len(steps) == 40
    for r in steps:
        assert len(r["load_min"]) == 2 and len(r["load_max"]) == 2  # one per layer
        assert all(0 <= lo <= 0.25 <= hi <= 1 for lo, hi in zip(r["load_min"], r["load_max"]))
        assert 1.0 <= r["aux"] <= 4.0  # the raw value: 1 balanced, n_expert collapsed; never 0.0000
    line = next(l for l in stdout.splitlines() if l.startswith("iter 10 |"))
    assert f"aux {steps[0]['aux']:.2f}" in line and "tok/s" in line and "mem " in line


def test_checkpoints_are_pruned_and_latest_points_at_the_newest(trained):
    _, out, stdout = trained
    assert sorted(os.listdir(out)) == [".lock", "ckpt_300", "ckpt_400", "heartbeat.json", "latest", "log.jsonl", "loss.png"]
    assert open(os.path.join(out, "latest")).read() == "ckpt_400"
    cfg = json.load(open(os.path.join(out, "ckpt_400", "config.json")))
    assert cfg["n_layer"] == 2 and cfg["tokenizer"] == "o200k_base:4096"
    assert "sample 200 |" in stdout
    beat = json.load(open(os.path.join(out, "heartbeat.json")))
    assert beat["iter"] == 400 and beat["phase"] == "done"


def test_constants_are_not_settings_neither_on_the_command_line_nor_in_config_json(trained, tmp_path):
    """BAD_INPUT and NON_FINITE (exit codes) are upper-case constants of train.py, not settings (issue 22): a checkpoint's
    config.json holds the settings and what the run adds, and --BAD_INPUT=7 is an unknown key, before any work."""
    import train
    from configurator import settings

    _, out, _ = trained
    saved = json.load(open(os.path.join(out, "ckpt_400", "config.json")))
    assert (train.BAD_INPUT, train.NON_FINITE) == (2, 3) and not [k for k in saved if k.isupper()]
    assert sorted(saved) == sorted([*settings(vars(train)), "tokenizer", "eot", "world_size", "saved_at"])
    r = run_script("train.py", "--BAD_INPUT=7", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'run'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "unknown config key 'BAD_INPUT'" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_sample_py_reads_the_checkpoint(trained):
    _, out, _ = trained
    r = run_script("sample.py", f"--out_dir={out}", "--start=The function", "--num_samples=2", "--max_new_tokens=12")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("The function") == 2 and r.stdout.count("---------------") == 2


def load_weights(ckpt_dir):
    sys.path.insert(0, ROOT)
    from weights import load_model

    model, _ = load_model(ckpt_dir)
    return model.state_dict()


RESUME_ARGS = [*TINY, "--max_iters=30", "--grad_accum_steps=2", "--log_interval=1", "--eval_interval=0", "--save_every=1000",
               "--warmup_iters=5", "--lr=3e-3"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """An uninterrupted run that stopped-and-resumed runs must equal, loss for loss and weight for weight."""
    ref = str(tmp_path_factory.mktemp("ref"))
    r = run_script("train.py", *RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={ref}")
    assert r.returncode == 0, r.stderr
    return ref


def start(args, hooks=""):
    env = dict(os.environ, PYTHONUNBUFFERED="1", NANOOSS_TEST_HOOKS=hooks)
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def assert_same_run(ref, out):
    a, b = read_log(ref), read_log(out)
    assert [x["iter"] for x in b] == list(range(1, 31))  # nothing lost, nothing repeated
    assert [x["loss"] for x in a] == [x["loss"] for x in b]  # bit-identical at every step
    wa, wb = load_weights(os.path.join(ref, "ckpt_30")), load_weights(os.path.join(out, "ckpt_30"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, reference):
    cut = str(tmp_path / "cut")
    args = [*RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={cut}"]
    p = start(args)
    log = os.path.join(cut, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 12):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    stopped_at = int(open(os.path.join(cut, "latest")).read()[5:])
    assert 12 <= stopped_at < 30, "the signal should land mid-run"
    assert len(read_log(cut)) == stopped_at

    r = run_script("train.py", *args)  # a new process: resumes by itself
    assert r.returncode == 0, r.stderr
    assert f"resumed from {os.path.join(cut, f'ckpt_{stopped_at}')} at iter {stopped_at}" in r.stdout
    assert_same_run(reference, cut)


def test_signal_inside_the_sync_window_is_not_lost(tmp_path, data_dir):
    """SIGTERM delivered while the step waits for its agreement (on CUDA, most of a step): it used to be
    overwritten by the agreed 'no stop'."""
    out = str(tmp_path / "run")
    p = start([*RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"], hooks="sigterm:sync:5:0")
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0, stdout
    # the vote of step 5 was taken before the signal: step 5 finishes, step 6's first agreement stops the run
    assert open(os.path.join(out, "latest")).read() in ("ckpt_5", "ckpt_6")
    assert len(read_log(out)) < 30


def test_stop_between_micro_steps_drops_the_step_and_resumes_exactly(tmp_path, data_dir, reference):
    """A long step is not finished under a deadline: the stop is taken between micro steps, the half-done step
    is dropped, and the checkpoint holds the data position and RNG of its start."""
    cut = str(tmp_path / "cut")
    args = [*RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={cut}"]
    p = start(args, hooks="sigterm:micro:7.1:0")  # during step 7, after its first micro step
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == 0, stdout
    assert "step 7 dropped after 1 of 2 micro steps" in stdout
    assert open(os.path.join(cut, "latest")).read() == "ckpt_6" and len(read_log(cut)) == 6
    r = run_script("train.py", *args)
    assert r.returncode == 0, r.stderr
    assert_same_run(reference, cut)


def test_kill_9_at_random_moments_then_the_run_equals_an_uninterrupted_one(tmp_path, data_dir, reference):
    """SIGKILL (no handler, no save) at random moments, a save included; each restart resumes from what is on
    disk. CI runs 5 kills; KILLS=50 for a long fuzz (KILL_SEED=N replays one)."""
    import random

    kills = int(os.environ.get("KILLS", "5" if os.environ.get("NANOOSS_FULL_TESTS") else "0"))
    if not kills:
        pytest.skip("fuzzing: NANOOSS_FULL_TESTS=1 (as .ci/run sets) for 5 kills, KILLS=50 for a long fuzz")
    seed = int(os.environ.get("KILL_SEED", str(int(time.time()))))
    rng = random.Random(seed)
    out = str(tmp_path / "fuzz")
    args = [*RESUME_ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--save_every=3", "--keep_last_n=2"]
    for _ in range(kills):
        p = start(args)
        time.sleep(rng.uniform(1.0, 6.0))  # a few seconds: from start-up through several steps and saves
        p.kill()
        p.communicate()
    r = run_script("train.py", *args)
    assert r.returncode == 0, (seed, r.stderr)
    assert_same_run(reference, out)
    left = [os.path.join(d, n) for d, dirs, files in os.walk(out) for n in dirs + files if n.endswith((".tmp", ".old"))]
    assert not left, (seed, left)


def tree_digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            h.update(name.encode())
            h.update(open(os.path.join(root, name), "rb").read())
    return h.hexdigest()


@pytest.fixture
def bad_data(tmp_path, data_dir):
    """Copies of the good data dir, each broken in one way."""
    import shutil

    def make(name, breaker):
        d = str(tmp_path / name)
        shutil.copytree(data_dir, d)
        breaker(d)
        return d

    def shard(d, split):
        return glob.glob(os.path.join(d, f"*_{split}_*.npy"))[0]

    def truncate(d):
        p = shard(d, "train")
        os.truncate(p, os.path.getsize(p) // 2)

    def empty(d):
        np.save(shard(d, "val"), np.zeros(0, dtype=np.uint16))

    def wrong_dtype(d):
        meta = json.load(open(os.path.join(d, "meta.json")))
        json.dump({**meta, "dtype": "uint32"}, open(os.path.join(d, "meta.json"), "w"))

    return {
        "truncated": (make("truncated", truncate), "truncated"),
        "empty": (make("empty", empty), "empty"),
        "no_val": (make("no_val", lambda d: os.remove(shard(d, "val"))), "no val split"),
        "dtype": (make("dtype", wrong_dtype), "meta.json says uint32"),
        "no_meta": (make("no_meta", lambda d: os.remove(os.path.join(d, "meta.json"))), "meta.json is missing"),
    }


def test_bad_inputs_give_one_line_and_leave_the_checkpoint_alone(tmp_path, data_dir, bad_data):
    out = str(tmp_path / "run")
    base = [*TINY, f"--out_dir={out}", "--max_iters=4", "--eval_interval=0", "--log_interval=1", "--save_every=2"]
    assert run_script("train.py", *base, f"--data_dir={data_dir}").returncode == 0
    before = tree_digest(out)
    bad_file = tmp_path / "bad_config.py"
    bad_file.write_text("batch_size = 4\nlearning_rate = 1e-3\n")
    cases = [
        (["--batch_sise=4"], "did you mean 'batch_size'"),
        (["--batch_size=four"], "batch_size"),
        ([str(bad_file)], "unknown config key 'learning_rate' in " + str(bad_file)),
        (["--vocab_size=1000"], "--vocab_size=4097"),
        (["--n_layer=3"], "holds a different model"),
        (["--dtype=float64"], "dtype"),
        (["--n_embd=60"], "n_embd=60: n_embd must be a multiple of 8"),
        (["--resume=False"], "already holds checkpoints"),
        # out of range (issue 21 item 10; the whole sweep: tests/test_configurator.py), and a device this torch lacks
        (["--top_k=-1"], "top_k=-1: top_k must be an int >= 0 (0 = every token)"),
        (["--device=mps"], "device='mps': torch"),
    ]
    cases += [([f"--data_dir={d}"], msg) for d, msg in bad_data.values()]
    for extra, msg in cases:
        args = [*base, f"--data_dir={data_dir}", *extra]
        r = run_script("train.py", *args)
        assert r.returncode == 2, (extra, r.returncode)  # bad input: safe_train.py does not retry it
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and msg in lines[0], (extra, r.stderr)
        assert tree_digest(out) == before, f"{extra} changed the run's files"


def test_a_device_this_torch_lacks_is_one_line_before_out_dir_is_touched(tmp_path, data_dir):
    """--device=cuda on this CPU-only torch (issue 21 item 11: an AssertionError once the out_dir lock was taken)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this torch has CUDA")
    out = tmp_path / "run"
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--device=cuda")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "device='cuda': torch" in r.stderr, r.stderr
    assert "--device=cpu" in r.stderr and not out.exists()


def test_the_periodic_sample_emits_only_decodable_ids_when_padded_ids_score_highest(tmp_path, data_dir):
    """Issue 21's command (--sample_every=2, a sample of many tokens) from a model whose padded ids (past the
    tokenizer's 4,097) always have the largest logits: at 6087689 the sample's KeyError ended the run unsaved."""
    out = str(tmp_path / "run")
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={padded_checkpoint(str(tmp_path / 'base'))}",
                   "--max_iters=2", "--eval_interval=0", "--sample_every=2", "--sample_tokens=30", "--seed=1", "--lr=1e-9",
                   "--warmup_iters=0", "--plot=False")
    assert r.returncode == 0, r.stderr
    assert "sample 2 |" in r.stdout and "sampling off" not in r.stdout
    assert open(os.path.join(out, "latest")).read() == "ckpt_2"


def test_the_periodic_sample_ends_at_end_of_text_and_takes_the_sampling_controls(tmp_path, data_dir):
    """A sample starts a document and ends with it: from a model whose likeliest token is always end-of-text, the
    sample is empty (it printed 30 "<|endoftext|>" before), with sample.py's controls accepted and in range."""
    from data_loader import get_tokenizer

    eot = get_tokenizer("o200k_base:4096").eot_token
    out = str(tmp_path / "run")
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}",
                   f"--init_from={padded_checkpoint(str(tmp_path / 'base'), loudest=[eot])}", "--max_iters=2", "--eval_interval=0",
                   "--sample_every=2", "--sample_tokens=30", "--lr=1e-9", "--warmup_iters=0", "--plot=False",
                   "--top_p=0.9", "--min_p=0.05", "--repetition_penalty=1.3")
    assert r.returncode == 0, r.stderr
    assert "sample 2 | ''" in r.stdout.splitlines(), r.stdout


def test_a_sample_that_fails_turns_sampling_off_and_the_run_goes_on(tmp_path, data_dir):
    """A meta.json that names no tokenizer trains (the loader needs vocab_size and dtype), but cannot be sampled:
    whatever goes wrong inside the periodic sample is one line, and training and saving go on."""
    import shutil

    data = str(tmp_path / "data")
    shutil.copytree(data_dir, data)
    meta = json.load(open(os.path.join(data, "meta.json")))
    json.dump({k: v for k, v in meta.items() if k != "tokenizer"}, open(os.path.join(data, "meta.json"), "w"))
    out = str(tmp_path / "run")
    r = run_script("train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=0",
                   "--sample_every=1", "--sample_tokens=8", "--plot=False")
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stdout.splitlines() if l.startswith(("sample", "sampling"))] == ["sampling off: KeyError: 'tokenizer'"]
    assert open(os.path.join(out, "latest")).read() == "ckpt_2"  # trained on past the failed sample, and saved


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    out = str(tmp_path / "run")
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=50", "--eval_interval=0",
                   "--save_every=1", "--warmup_iters=0", "--lr=1e30", "--grad_clip=0", "--weight_decay=0")
    # lr 1e30: the first Adam update sets every weight to about +-1e30, so the next forward overflows fp32
    assert r.returncode == 3  # non-finite, distinct from a crash and from bad input
    assert "is not finite" in r.stderr.strip().splitlines()[-1]
    bad_iter = int(r.stderr.split("at iter ")[1].split(";")[0])
    latest = open(os.path.join(out, "latest")).read()
    assert latest == f"ckpt_{bad_iter - 1}"  # the step that went bad was never applied nor saved
    assert all(math.isfinite(x["loss"]) for x in read_log(out))


def test_eval_batch_size_sets_the_evals_micro_batch_and_leaves_training_alone(tmp_path, data_dir):
    """The evals read eval_iters batches of eval_batch_size rows (a device short of memory evaluates in smaller
    pieces): the logged val loss is the checkpoint's loss on the first val batch of that many rows, and the
    training losses are those of a run without the setting. Above batch_size it is held to batch_size: an eval
    never needs more memory than a training step."""
    from data_loader import DataLoader
    from weights import load_model

    runs = {}
    for eval_batch in (0, 3, 16):
        out = str(tmp_path / f"eval{eval_batch}")
        r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2", "--eval_interval=2",
                       "--eval_iters=1", f"--eval_batch_size={eval_batch}", "--plot=False", "--log_interval=1")
        assert r.returncode == 0, r.stderr
        runs[eval_batch] = out
    logs = {b: read_log(out) for b, out in runs.items()}
    assert [x["loss"] for x in logs[0] if "loss" in x] == [x["loss"] for x in logs[3] if "loss" in x]
    model, _ = load_model(os.path.join(runs[3], "ckpt_2"))
    x, y = DataLoader(data_dir, "val", 3, 64, 0, 1, 4097).next_batch()
    with torch.no_grad():
        want = model(x, y, loss_chunk=512)[1].item()
    got = [x["val_loss"] for x in logs[3] if "val_loss" in x]
    assert len(got) == 1 and math.isclose(got[0], want, rel_tol=0, abs_tol=1e-5), (got, want)
    val = {b: next(x["val_loss"] for x in log if "val_loss" in x) for b, log in logs.items()}
    assert not math.isclose(val[3], val[0], abs_tol=1e-5) and val[16] == val[0]  # 3 rows, not 8; 16 held to 8



def test_a_reader_that_leaves_does_not_end_the_run(tmp_path, data_dir):
    """`python train.py ... | tee run.log` and Ctrl-C: tee ends first, and the signal's own line went into a pipe with
    no reader (BrokenPipeError): a traceback, exit 1, nothing saved. The console is optional: the run stops as
    asked, saves, and exits 0, with every step in log.jsonl."""
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=400",
                          "--eval_interval=0", "--log_interval=1", "--save_every=1000", "--plot=False"],
                         cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in p.stdout:
        if line.startswith("iter 3 |"):
            break
    p.stdout.close()  # the reader is gone
    p.send_signal(signal.SIGINT)
    stderr = p.stderr.read()
    assert p.wait(timeout=120) == 0 and stderr == "", stderr
    saved = int(open(os.path.join(out, "latest")).read()[5:])
    assert 3 <= saved < 400 and [x["iter"] for x in read_log(out)] == list(range(1, saved + 1))


def test_a_signal_with_no_step_to_finish_or_a_second_one_stops_at_once_in_one_line(tmp_path, data_dir):
    """Ctrl-C while eval_only scores a checkpoint, and a second Ctrl-C during a training run's eval: the process ends
    now, in one line, exit 130 (a KeyboardInterrupt's traceback before; inside a checkpoint load, DCP made it "cannot
    read ckpt_N: move it away"). Nothing the run had saved is touched."""
    def start_and_interrupt(args, ready, signals):
        p = subprocess.Popen([sys.executable, "train.py", *TINY, f"--data_dir={data_dir}", *args, "--plot=False"], cwd=ROOT,
                             env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for wait_for in (ready, "signal SIGINT")[:signals]:
            for line in p.stdout:
                if line.startswith(wait_for):
                    break
            p.send_signal(signal.SIGINT)
        stdout, stderr = p.communicate(timeout=120)
        return p.returncode, stderr

    base = padded_checkpoint(str(tmp_path / "base"))
    rc, stderr = start_and_interrupt([f"--out_dir={tmp_path / 'none'}", f"--init_from={base}", "--eval_only=True",
                                      "--eval_iters=400"], "initialised from", 1)
    line = "train.py: stopped at once (SIGINT): nothing saved since the last checkpoint, which a rerun resumes from\n"
    assert rc == 130 and stderr == line, stderr
    out = tmp_path / "run"
    rc, stderr = start_and_interrupt([f"--out_dir={out}", "--max_iters=4", "--eval_interval=2", "--eval_iters=400", "--log_interval=1",
                                      "--save_every=1000"], "iter 2 |", 2)
    assert rc == 130 and stderr == line, stderr
    assert sorted(os.listdir(out)) == [".lock", "heartbeat.json", "log.jsonl"]  # no checkpoint, none half-made
