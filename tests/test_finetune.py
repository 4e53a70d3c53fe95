"""LoRA fine-tuning as a user runs it: train.py --init_from=BASE --lora_rank=8 on a real (tiny) pretrained base.
The base's files stay byte-identical, checkpoints hold the adapters and their optimizer only, a stop resumes
bit-identically, and a changed base or another rank is refused in one line."""
import json
import os
import shutil

import pytest

from conftest import TINY, full_only, run_script
from test_train import read_log, start, tree_digest


@pytest.fixture(scope="module")
def base(tmp_path_factory, data_dir):
    out = str(tmp_path_factory.mktemp("base") / "run")
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=20", "--eval_interval=0",
                   "--lr=3e-3", "--warmup_iters=2")
    assert r.returncode == 0, r.stderr
    return out


def finetune_args(base, data_dir, out, rank=8):
    return [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={base}", f"--lora_rank={rank}",
            "--max_iters=12", "--eval_interval=0", "--log_interval=1", "--save_every=6", "--lr=1e-3", "--warmup_iters=2"]


def test_lora_finetune_trains_adapters_only_and_leaves_the_base_alone(tmp_path, base, data_dir):
    from torch.distributed.checkpoint import FileSystemReader

    before = tree_digest(os.path.join(base, "ckpt_20"))
    out = str(tmp_path / "ft")
    r = run_script("train.py", *finetune_args(base, data_dir, out))
    assert r.returncode == 0, r.stderr
    assert "base from" in r.stdout and "frozen" in r.stdout
    assert "replace the config's" not in r.stdout, r.stdout  # the same model settings (a tuple read back as a list is one)
    assert tree_digest(os.path.join(base, "ckpt_20")) == before  # byte-identical
    saved = FileSystemReader(os.path.join(out, "ckpt_12")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys)  # adapters only
    assert all("lora_" in k for k in saved if k.startswith("optim.state."))  # and only their optimizer state
    cfg = json.load(open(os.path.join(out, "ckpt_12", "config.json")))
    assert cfg["base"]["path"] == os.path.abspath(os.path.join(base, "ckpt_20")) and len(cfg["base"]["fingerprint"]) == 16
    losses = [x["loss"] for x in read_log(out)]
    assert losses[-1] < losses[0]  # it learns


def test_a_stopped_finetune_resumes_bit_identically(tmp_path, base, data_dir):
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert run_script("train.py", *finetune_args(base, data_dir, ref)).returncode == 0
    p = start(finetune_args(base, data_dir, cut), hooks="sigterm:sync:4:0")
    p.communicate(timeout=120)
    assert p.returncode == 0 and open(os.path.join(cut, "latest")).read() == "ckpt_5"  # the vote after step 5 stops it
    r = run_script("train.py", *finetune_args(base, data_dir, cut))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert [x["loss"] for x in read_log(ref)] == [x["loss"] for x in read_log(cut)]


def test_a_changed_base_or_another_rank_is_one_line(tmp_path, base, data_dir):
    out = str(tmp_path / "ft")
    changed = str(tmp_path / "base")
    shutil.copytree(base, changed)
    assert run_script("train.py", *finetune_args(changed, data_dir, out)[:-5], "--max_iters=2", "--eval_interval=0").returncode == 0
    r = run_script("train.py", *finetune_args(changed, data_dir, out), "--lora_rank=16")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "lora_rank 8 vs 16" in r.stderr
    cfg_path = os.path.join(changed, "ckpt_20", "config.json")
    json.dump({**json.load(open(cfg_path)), "saved_at": 0.0}, open(cfg_path, "w"))  # the base was saved again
    before = tree_digest(out)
    r = run_script("train.py", *finetune_args(changed, data_dir, out))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "differs from the one the adapters" in r.stderr, r.stderr
    assert tree_digest(out) == before


@full_only
def test_a_finetune_killed_with_sigkill_resumes_bit_identically(tmp_path, base, data_dir):
    """kill -9 (no handler, no save) after the fine-tune's first checkpoint, in the middle of later steps: the
    rerun resumes from the adapters on disk and ends with the uninterrupted run's losses, step for step."""
    import time

    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    assert run_script("train.py", *finetune_args(base, data_dir, ref)).returncode == 0
    p = start(finetune_args(base, data_dir, cut))
    log = os.path.join(cut, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(log) and len(open(log).readlines()) >= 8):
        time.sleep(0.02)
    p.kill()
    p.communicate()
    assert open(os.path.join(cut, "latest")).read() == "ckpt_6"  # killed between saves: steps 7.. are lost on disk
    r = run_script("train.py", *finetune_args(base, data_dir, cut))
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert [x["loss"] for x in read_log(ref)] == [x["loss"] for x in read_log(cut)]
