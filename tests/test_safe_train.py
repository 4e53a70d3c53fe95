"""safe_train.py with real child processes: real train.py runs stopped at a memory line and resumed in a
smaller shape, a child that allocates fast, a child that keeps crashing, and preflight's refusals."""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, full_only, stdlib_docstrings, write_data_dir

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
    from model import GPTConfig
    from sizing import memory_estimate

    cfg = GPTConfig.from_dict(SHAPE)
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


def test_a_micro_batch_that_does_not_fit_starts_smaller_with_the_same_tokens_per_step(tmp_path, data):
    from model import GPTConfig
    from sizing import memory_estimate

    cfg = GPTConfig.from_dict(SHAPE)
    budget = memory_estimate(cfg, 8, 256, loss_chunk=512, grad_accum_steps=8)["total"] / 0.9 * 1.05  # micro batch 8 fits with 5% to spare; 32 does not
    args = [*[f"--{k}={v}" for k, v in SHAPE.items()], f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}",
            "--batch_size=32", "--grad_accum_steps=2", f"--budget_gb={budget / 1e9:.3f}", "--check-only"]
    r = supervise(*args)
    assert r.returncode == 0, r.stderr
    assert "starting at micro batch 8 x 8 accumulation steps instead (the same tokens per step" in r.stdout
    r = supervise(*args, "--strict")
    assert r.returncode != 0 and r.stderr.count("\n") == 1
    assert "(--strict): use --batch_size=8 --grad_accum_steps=8" in r.stderr


def test_a_model_that_cannot_fit_at_micro_batch_1_is_refused_before_it_is_built(tmp_path, data):
    """~140B parameters: building it to probe it would take ~560 GB. The estimate refuses it first."""
    huge = {**SHAPE, "n_layer": 32, "n_embd": 8192, "intermediate_size": 8192, "n_expert": 64, "head_dim": 128, "n_head": 64}
    t = time.time()
    r = supervise(*[f"--{k}={v}" for k, v in huge.items()], f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}",
                  "--batch_size=1", "--budget_gb=8", "--check-only")
    assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
    assert "even micro batch 1 needs" in r.stderr and time.time() - t < 60


def test_bad_input_and_a_non_finite_loss_are_not_retried(tmp_path, data):
    base = [*TINY, f"--data_dir={data}", "--max_iters=20", "--eval_interval=0", "--interval=0.2"]
    r = supervise(*base, f"--out_dir={tmp_path / 'nan'}", "--lr=1e30", "--warmup_iters=0", "--grad_clip=0", "--weight_decay=0")
    assert r.returncode == 3  # train.py's code, passed on: a non-finite loss
    log = open(tmp_path / "nan" / "safe_training.log").read()
    assert log.count("] starting ") == 1 and "train.py exited with code 3" in log
    assert "not restarting: stopping: loss is not finite" in log
    assert r.stderr.strip().splitlines()[-1].startswith("stopping: loss is not finite")  # train.py's line, once
    r = supervise(*base, f"--out_dir={tmp_path / 'bad'}", "--preflight=False", f"--data_dir={tmp_path / 'nowhere'}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr  # bad input, as train.py said
    assert open(tmp_path / "bad" / "safe_training.log").read().count("] starting ") == 1


def test_disk_preflight_counts_keep_last_n_plus_the_checkpoint_being_written(tmp_path, data):
    r = supervise(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--keep_last_n=5",
                  "--min_free_disk_gb=1000000", "--check-only")
    assert r.returncode != 0 and "(6 checkpoints of" in r.stderr and "keep_last_n 5 and the one being written" in r.stderr


def test_torchrun_is_refused_in_one_line():
    r = subprocess.run([sys.executable, "safe_train.py", *TINY], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, WORLD_SIZE="2", LOCAL_RANK="0"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "does not supervise torchrun" in r.stderr


def test_a_spike_counts_once_and_swap_is_counted_from_each_childs_start_simulated_swap():
    """The accounting alone, on made-up samples: this machine has no swap to grow."""
    sys.path.insert(0, ROOT)
    import safe_train

    GB = 1e9
    watch = {"peak": 0.0, "swap0": 5 * GB}
    # an eval spike to 3 GB between two samples: its rise counts in the sample that sees it ...
    assert safe_train.sample_used(watch, 1 * GB, {"peak_rss_gb": 3.0}, 5 * GB, "cpu") == 3 * GB
    # ... and not after: the lifetime peak stays at 3 GB, the process is back at 1 GB
    assert safe_train.sample_used(watch, 1 * GB, {"peak_rss_gb": 3.0}, 5 * GB, "cpu") == 1 * GB
    assert safe_train.sample_used(watch, 1 * GB, {"peak_rss_gb": 3.0}, 5.5 * GB, "cpu") == 1.5 * GB  # swap growth counts
    # after a memory stop the next child gets a new watch: swap the first one left behind is not its own
    new = {"peak": 0.0, "swap0": 6 * GB}
    assert safe_train.sample_used(new, 1 * GB, {"peak_rss_gb": 1.0}, 6 * GB, "cpu") == 1 * GB


def test_check_only_passes_a_good_setup_and_names_a_bad_one_in_one_line(tmp_path, data):
    base = [*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'o'}", "--check-only"]
    r = supervise(*base, "--budget_gb=10")
    assert r.returncode == 0, r.stderr
    assert "probe loss" in r.stdout and "preflight passed" in r.stdout
    # the stop line is named as what it is, a share of the budget, never as "the budget" (issue 21 item 14)
    assert "budget 10.0 GB (stop at 90%: 9.0 GB)" in r.stdout and "GB of the 9.00 GB stop line (90% of the 10.0 GB budget)" in r.stdout
    assert not os.path.exists(tmp_path / "o" / "log.jsonl")  # nothing was trained
    cases = [
        ([f"--data_dir={tmp_path / 'nowhere'}"], "does not exist"),
        (["--vocab_size=1000"], "larger than the model's vocab_size 1000"),
        (["--min_free_disk_gb=1000000"], "disk: "),
        (["--batch_sise=4"], "did you mean 'batch_size'"),
    ]
    for extra, msg in cases:
        r = supervise(*base, *extra)
        assert r.returncode == 2 and msg in r.stderr and r.stderr.count("\n") == 1, (extra, r.stderr)
    # out of range, the supervisor's own settings and train.py's alike: refused before its log exists (issue 21)
    for extra, msg in ((["--stop_pct=0"], "stop_pct=0.0: stop_pct must be a number > 0 and <= 100"),
                       (["--interval=-1"], "interval=-1.0: interval must be a number > 0"),
                       (["--block_size=0"], "block_size=0: block_size must be an int >= 1")):
        r = supervise(*TINY, f"--data_dir={data}", f"--out_dir={tmp_path / 'new'}", *extra)
        assert r.returncode == 2 and r.stderr == f"safe_train.py: {msg}\n" and not os.path.exists(tmp_path / "new"), r.stderr


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


def test_on_cuda_the_estimate_meets_gpu_memory_not_host_ram_simulated_gpu(monkeypatch, data):
    """No GPU here: torch is told there is one of 0.3 GB. With a host budget of 100 GB, the line is still the GPU's."""
    sys.path.insert(0, ROOT)
    import types

    import torch

    import devices
    import safe_train
    from configurator import script_defaults

    config = {**script_defaults(os.path.join(ROOT, "train.py")), **SHAPE, "data_dir": data, "batch_size": 64,
              "grad_accum_steps": 1, "_line": 100e9, "_stop_pct": 90.0, "_strict": False, "_fit": True}
    monkeypatch.setattr(devices, "pick_device", lambda want: "cuda")
    monkeypatch.setattr(devices, "pick_dtype", lambda want, dev_type: "bfloat16")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda dev: types.SimpleNamespace(total_memory=0.3e9))
    report = safe_train.probe(config)
    assert "GPU memory" in report["error"] and "even micro batch 1" in report["error"]  # refused before any model is built


@full_only
def test_the_finetune_example_runs_to_the_end_under_a_budget_that_forces_one_memory_stop(tmp_path, data):
    """`python safe_train.py config/finetune_mac.py`, as the README gives it, on a small real base and the real
    stdlib_api set (at the tests' 4k vocabulary): stopped once at the memory line, resumed at half the micro
    batch, and finished with its adapters written."""
    from model import GPTConfig
    from sizing import memory_estimate

    base = tmp_path / "base"
    r = subprocess.run([sys.executable, "train.py", *[f"--{k}={v}" for k, v in SHAPE.items()], f"--data_dir={data}",
                        f"--out_dir={base}", "--batch_size=8", "--grad_accum_steps=1", "--max_iters=2", "--eval_interval=0",
                        "--sample_every=0", "--compile=False"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    api = tmp_path / "api"
    r = subprocess.run([sys.executable, "prepare_fineweb.py", "--corpus=stdlib_api", "--encoding=o200k_base:4096",
                        f"--out_dir={api}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    cfg = GPTConfig.from_dict({**SHAPE, "lora_rank": 8})
    big, small = (memory_estimate(cfg, b, 256, loss_chunk=512)["total"] for b in (64, 32))
    line = (big * small) ** 0.5
    out = tmp_path / "ft"
    r = supervise("config/finetune_mac.py", f"--init_from={base}", f"--data_dir={api}", f"--out_dir={out}", "--batch_size=64",
                  "--block_size=256", "--max_iters=6", "--lr_decay_iters=6", "--warmup_iters=1", "--eval_interval=3",
                  "--eval_iters=1", "--log_interval=1", "--compile=False", f"--budget_gb={line / 0.9 / 1e9:.3f}",
                  "--preflight_fit=False", "--interval=0.5")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = open(out / "safe_training.log").read()
    assert "(memory stop)" in log and "resuming with micro batch 32 x 2 accumulation steps" in log, log
    assert "summary: finished" in log and "restarts: 1 after 1 memory stops, 0 after 0 crashes" in log
    steps = [rec for rec in read_jsonl(out / "log.jsonl") if "loss" in rec]
    assert [s["iter"] for s in steps] == list(range(1, 7))
    assert os.path.exists(out / "adapter" / "adapter_model.safetensors")  # the end of the run: its adapters, peft's format
