"""The disk as it really fails: a small tmpfs that fills up during a save or a prepare, and a read-only mount,
mounted here for each test (root, as in CI) and unmounted after it; skipped where mounting is refused. A
monkeypatched OSError would miss what a full disk really gives during a save: DCP wraps torch.save's
`RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos` in a BaseException."""
import glob
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, TINY, run_script
from test_train import tree_digest

import checkpoint

ARGS = [*TINY, "--log_interval=1", "--eval_interval=0", "--save_every=2", "--keep_last_n=5"]


@pytest.fixture
def mount(tmp_path):
    """mount(size) -> a fresh tmpfs of that size ("8m"); every one is unmounted when the test ends."""
    points = []

    def make(size):
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        try:
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True, text=True)
        except OSError as e:
            pytest.skip(f"no mount command here ({e})")
        if r.returncode:
            pytest.skip(f"mounting is refused here: {r.stderr.strip()}")
        points.append(point)
        return str(point)

    yield make
    for point in reversed(points):
        subprocess.run(["umount", str(point)], check=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, data_dir):
    """A 2-step run with its checkpoint, on an ordinary disk."""
    out = str(tmp_path_factory.mktemp("saved") / "run")
    assert run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=2").returncode == 0
    return out


def remount(point, options):
    subprocess.run(["mount", "-o", f"remount,{options}", point], check=True)


def one_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, (r.returncode, r.stderr)
    return lines[0]


def test_a_save_that_fills_the_disk_is_one_line_exit_2_and_not_retried_and_keeps_latest(mount, saved, data_dir):
    """ckpt_2 fits on a disk of 1.5 checkpoints, ckpt_4 does not. Under safe_train.py, whose own log is there too."""
    size = sum(f.stat().st_size for f in os.scandir(os.path.join(saved, "ckpt_2")))  # ~5 MB: the model and AdamW state
    disk = mount(f"{int(size * 1.5) // 1024}k")
    out = os.path.join(disk, "run")
    r = subprocess.run([sys.executable, "safe_train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=6",
                        "--preflight=False", "--interval=0.2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"checkpoint error: no space left on {disk} ("), r.stderr
    assert f"writing {out}/.ckpt_4.tmp/__0_0.distcp" in line and "lower --keep_last_n (now 5)" in line
    assert "latest still names ckpt_2" in line and f"a checkpoint here takes {size / 1e6:.1f} MB" in line
    assert "train.py exited with code 2" in r.stdout and r.stdout.count("safe_train: starting ") == 1
    assert "not restarting: checkpoint error: no space left" in r.stdout
    assert sorted(os.listdir(out)) == [".lock", "ckpt_2", "heartbeat.json", "latest", "log.jsonl", "memory_monitoring.jsonl",
                                       "safe_training.log"]  # the partial ckpt_4 is gone
    assert checkpoint.read_latest(out) == "ckpt_2" and checkpoint.verify(os.path.join(out, "ckpt_2")) is None


def test_a_disk_that_fills_between_saves_stops_the_run_at_its_next_write_in_one_line(mount, data_dir):
    """Something else fills the disk: the log and the heartbeat meet it before any save does."""
    disk = mount("1m")
    with open(os.path.join(disk, "filler"), "wb") as f:
        f.write(bytes(1024 * 1024 - 3 * 4096))  # three pages left: the lock, the heartbeat, a few log lines
    out = os.path.join(disk, "run")
    r = run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=500", "--save_every=1000",
                   "--batch_size=1")
    line = one_line(r)
    assert r.returncode == 2 and line.startswith(f"no space left on {disk} (") and "latest still names none" in line, line
    assert any(f"writing {os.path.join(out, name)}" in line for name in ("log.jsonl", "heartbeat.json")), line


def test_prepare_that_fills_the_disk_is_one_line_exit_2_and_continues_when_there_is_space(mount, corpus, data_dir, tmp_path):
    """Val and the first 100k-token shard fit on the 300 KB disk; the second shard does not. Then, with room,
    the same command finishes, and its tokens are those of an uninterrupted preparation."""
    disk = mount("300k")
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in corpus))
    out = os.path.join(disk, "data")
    cmd = ["prepare_fineweb.py", f"--input={src}", "--encoding=o200k_base:4096", f"--out_dir={out}", "--val_tokens=2000",
           "--shard_size=100000"]
    line = one_line(run_script(*cmd))
    assert line.startswith(f"prepare_fineweb.py: no space left on {disk} (") and f"writing {out}/text_train_000002.npy" in line
    assert "run the same command again" in line
    assert not glob.glob(os.path.join(out, "*.tmp")) and not os.path.exists(os.path.join(out, "meta.json"))
    remount(disk, "size=2m")
    assert run_script(*cmd).returncode == 0
    tokens = lambda d: np.concatenate([np.load(f) for f in sorted(glob.glob(os.path.join(d, "*_train_*.npy")))])
    assert np.array_equal(tokens(out), tokens(data_dir))


def test_a_read_only_out_dir_is_one_line_before_any_work_in_train_safe_train_and_export(mount, saved, data_dir):
    """A run's disk remounted read-only (as a failing disk is), and a new out_dir on it."""
    disk = mount("16m")
    out = shutil.copytree(saved, os.path.join(disk, "run"))
    remount(disk, "ro")
    before = tree_digest(out)
    for r, where in ((run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=4"), out),
                     (run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={disk}/new/run"), f"{disk}/new/run"),
                     (run_script("safe_train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}"), out)):
        line = one_line(r)
        assert f"out_dir error: {where} cannot be written (Read-only file system" in line and "use another --out_dir" in line
    line = one_line(run_script("export_hf.py", f"--ckpt={out}", f"--out={disk}/hf"))
    assert f"--out {disk}/hf: {disk} cannot be written (Read-only file system)" in line
    assert tree_digest(out) == before


def test_exported_safetensors_are_readable_as_the_umask_allows(saved, tmp_path):
    """safetensors writes its files 0600: a model exported for others to load must not be private to its writer."""
    from export_hf import export

    old = os.umask(0o027)
    try:
        hf = export(saved, str(tmp_path / "hf"))
    finally:
        os.umask(old)
    assert os.stat(os.path.join(hf, "model.safetensors")).st_mode & 0o777 == 0o640
