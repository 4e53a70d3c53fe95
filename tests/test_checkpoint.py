"""The checkpoint lifecycle, as a user meets it: latest always names a complete checkpoint, pruning never
deletes the newest, a damaged or missing checkpoint is a loud fallback (never a silent start from zero), and
one writer per out_dir. Real train.py runs and real DCP checkpoints on disk, damaged the way disks and kills do."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, full_only, run_script, write_data_dir
from test_train import read_log, tree_digest

import checkpoint

ARGS = [*TINY, "--log_interval=1", "--eval_interval=0", "--save_every=2", "--keep_last_n=5", "--lr=3e-3", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_dir):
    """A finished 6-step run with checkpoints at 2, 4 and 6."""
    out = str(tmp_path_factory.mktemp("saved") / "run")
    r = run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def run_dir(tmp_path, saved):
    """A private copy of the saved run to damage."""
    out = str(tmp_path / "run")
    shutil.copytree(saved, out)
    return out


def train(out, data_dir, *extra):
    return run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", *extra)


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stderr)
    return lines[0]


def test_dangling_latest_falls_back_to_the_newest_complete_checkpoint_with_a_line(run_dir, data_dir):
    shutil.rmtree(os.path.join(run_dir, "ckpt_6"))  # latest names a folder that is gone
    r = train(run_dir, data_dir, "--max_iters=8")
    assert r.returncode == 0, r.stderr
    assert "latest names ckpt_6, but" in r.stdout and "resuming from ckpt_4" in r.stdout
    assert "at iter 4" in r.stdout and checkpoint.read_latest(run_dir) == "ckpt_8"
    assert [x["iter"] for x in read_log(run_dir)] == list(range(1, 9))  # steps 5, 6 redone, logged once


def test_no_complete_checkpoint_is_one_line_never_a_fresh_start(run_dir, data_dir):
    for n in ("ckpt_2", "ckpt_4", "ckpt_6"):
        os.remove(os.path.join(run_dir, n, ".metadata"))
    before = tree_digest(run_dir)
    line = one_line(train(run_dir, data_dir, "--max_iters=8"))
    assert "ckpt_6/.metadata is missing" in line and "no other complete checkpoint" in line
    assert tree_digest(run_dir) == before


def test_a_shard_cut_short_falls_back_in_train_and_is_one_line_in_sample(run_dir, data_dir):
    shard = glob.glob(os.path.join(run_dir, "ckpt_6", "*.distcp"))[0]
    os.truncate(shard, os.path.getsize(shard) // 2)
    r = run_script("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=4")
    line = one_line(r)
    assert shard in line and "is cut short" in line
    r = train(run_dir, data_dir, "--max_iters=8")
    assert r.returncode == 0, r.stderr
    assert f"{shard} is cut short" in r.stdout and "resuming from ckpt_4" in r.stdout


def zero_fill(path):
    """What some filesystems leave after a power loss: the file at its full length, all zeros."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(bytes(size))
    return path


def test_zero_filled_shards_fall_back_in_train_naming_each_file_and_are_one_line_in_sample_and_export(run_dir, data_dir, tmp_path):
    """Their sizes are right, so the damage shows only when loading, after the choice: train.py passes over
    ckpt_6, then ckpt_4, and resumes from ckpt_2; sample.py and export_hf.py name the file in one line."""
    from export_hf import BridgeError, export

    shard6, shard4 = (zero_fill(glob.glob(os.path.join(run_dir, f"ckpt_{i}", "*.distcp"))[0]) for i in (6, 4))
    line = one_line(run_script("sample.py", f"--out_dir={run_dir}", "--max_new_tokens=4"))
    assert f"{shard6} is damaged" in line and "use an older checkpoint" in line
    with pytest.raises(BridgeError, match=f"{shard6} is damaged"):  # export_hf.py's one line (its main prints it)
        export(run_dir, str(tmp_path / "hf"))
    assert not os.path.exists(tmp_path / "hf")
    r = train(run_dir, data_dir, "--max_iters=6")
    assert r.returncode == 0, r.stderr
    assert f"latest names ckpt_6, but {shard6} is damaged" in r.stdout and "resuming from ckpt_4" in r.stdout
    assert f"{shard4} is damaged" in r.stdout and "resuming from ckpt_2" in r.stdout and "at iter 2" in r.stdout
    assert checkpoint.read_latest(run_dir) == "ckpt_6" and checkpoint.unreadable(os.path.join(run_dir, "ckpt_6")) is None
    assert [x["iter"] for x in read_log(run_dir)] == list(range(1, 7))


def test_resuming_on_data_made_with_another_tokenizer_is_refused_unless_switched_on_purpose(run_dir, corpus, tmp_path):
    """The same documents and shard names, another tokenizer whose ids still fit the model (eot 2048, not 4096)."""
    other = str(tmp_path / "data_2048")
    write_data_dir(other, corpus, tokenizer="o200k_base:2048")
    before = tree_digest(run_dir)
    line = one_line(train(run_dir, other, "--max_iters=8"))
    assert r"tokenizer o200k_base:2048 (eot 2048)" in line and "trained on o200k_base:4096 (eot 4096)" in line
    assert "--allow_new_tokenizer=True" in line and line.startswith("data error: ")
    assert tree_digest(run_dir) == before
    r = train(run_dir, other, "--max_iters=7", "--allow_new_tokenizer=True")
    assert r.returncode == 0, r.stderr
    saved = json.load(open(os.path.join(run_dir, "ckpt_7", "config.json")))
    assert (saved["tokenizer"], saved["eot"]) == ("o200k_base:2048", 2048)


def test_checkpoint_missing_its_metadata_is_one_line_in_sample(run_dir):
    os.remove(os.path.join(run_dir, "ckpt_6", ".metadata"))
    assert "ckpt_6/.metadata is missing" in one_line(run_script("sample.py", f"--out_dir={run_dir}"))


def test_resume_false_into_a_run_is_refused_and_overwrite_prunes_by_save_order(run_dir, data_dir):
    before = tree_digest(run_dir)
    line = one_line(train(run_dir, data_dir, "--resume=False", "--max_iters=4"))
    assert "already holds checkpoints" in line and "--resume=True" in line and "--overwrite=True" in line
    assert tree_digest(run_dir) == before
    os.rename(os.path.join(run_dir, "ckpt_6"), os.path.join(run_dir, "ckpt_5000"))  # an old, long run
    with open(os.path.join(run_dir, "latest"), "w") as f:
        f.write("ckpt_5000")
    # a new run from zero there: its ckpt_2 is the newest by save order, though not by number
    r = train(run_dir, data_dir, "--resume=False", "--overwrite=True", "--max_iters=4", "--keep_last_n=1")
    assert r.returncode == 0, r.stderr
    assert sorted(checkpoint.names(run_dir)) == ["ckpt_4"] and checkpoint.read_latest(run_dir) == "ckpt_4"
    assert [x["iter"] for x in read_log(run_dir)] == [1, 2, 3, 4]  # the old run's log went with it


def test_a_file_replaced_by_write_atomic_is_the_old_one_or_the_new_one_never_a_part(tmp_path):
    """checkpoint.write_atomic (latest, config.json, the heartbeat, log.jsonl's trim, shards, meta.json, loss.png, the
    tokenizer cache): a write that fails midway leaves the old file whole and no temporary file behind."""
    path = str(tmp_path / "latest")
    checkpoint.write_atomic(path, "ckpt_2")
    checkpoint.write_atomic(path, b"ckpt_4", sync=False)

    def dies_midway(f):
        f.write(b"ckpt_")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        checkpoint.write_atomic(path, dies_midway)
    assert open(path).read() == "ckpt_4" and os.listdir(tmp_path) == ["latest"]


def test_prune_keeps_latest_and_everything_saved_after_it(tmp_path, saved):
    out = str(tmp_path / "run")
    shutil.copytree(saved, out)
    assert checkpoint.by_save_order(out) == ["ckpt_2", "ckpt_4", "ckpt_6"]
    with open(os.path.join(out, "latest"), "w") as f:
        f.write("ckpt_4")  # as if ckpt_6 were saved after latest was last switched
    assert checkpoint.prune(out, 1) == ["ckpt_2"]
    assert sorted(checkpoint.names(out)) == ["ckpt_4", "ckpt_6"]


def test_leftovers_of_a_killed_save_are_removed_with_a_line(run_dir, data_dir):
    os.makedirs(os.path.join(run_dir, ".ckpt_8.tmp"))
    open(os.path.join(run_dir, ".ckpt_8.tmp", "__0_0.distcp"), "w").close()
    r = train(run_dir, data_dir, "--max_iters=8")
    assert r.returncode == 0, r.stderr
    assert f"removed {os.path.join(run_dir, '.ckpt_8.tmp')}, left by a save that was cut short" in r.stdout
    assert not os.path.exists(os.path.join(run_dir, ".ckpt_8.tmp"))


def test_a_second_writer_is_refused_naming_the_pid_and_kill_9_leaves_no_stale_lock(run_dir, data_dir):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first = subprocess.Popen([sys.executable, "train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={run_dir}",
                              "--max_iters=100000", "--save_every=100000"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 60
        while checkpoint.holder(run_dir) is None and time.time() < deadline:
            time.sleep(0.1)
        assert checkpoint.holder(run_dir) == str(first.pid)
        line = one_line(train(run_dir, data_dir, "--max_iters=8"))
        assert f"in use by another training run (pid {first.pid})" in line
        line = one_line(subprocess.run([sys.executable, "safe_train.py", *ARGS, f"--data_dir={data_dir}",
                                        f"--out_dir={run_dir}"], cwd=ROOT, capture_output=True, text=True, timeout=120))
        assert f"pid {first.pid}" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate()
    r = train(run_dir, data_dir, "--max_iters=8")  # the OS released the lock with the process
    assert r.returncode == 0, r.stderr


@full_only
def test_a_shard_found_damaged_on_loading_under_torchrun_makes_every_rank_resume_the_one_before(tmp_path, data_dir):
    """Two processes (gloo): rank 1's shard of ckpt_4 is zeros. Both ranks fail to load it; rank 0 names the file
    and picks ckpt_2, and both load that. Judged by the files the run wrote (DESIGN.md: gloo's exit aborts)."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *ARGS,
           "--grad_accum_steps=2", f"--data_dir={data_dir}", f"--out_dir={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    r = subprocess.run([*cmd, "--max_iters=4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert checkpoint.read_latest(out) == "ckpt_4", r.stderr[-3000:]
    shard = zero_fill(os.path.join(out, "ckpt_4", "__1_0.distcp"))
    r = subprocess.run([*cmd, "--max_iters=6"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert checkpoint.read_latest(out) == "ckpt_6", r.stderr[-3000:]
    assert f"{shard} is damaged" in r.stdout and "resuming from ckpt_2" in r.stdout and "at iter 2" in r.stdout
    assert [x["iter"] for x in read_log(out)] == list(range(1, 7))
