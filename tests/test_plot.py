"""Seeing a run: plot.py draws real runs' logs into a PNG that holds what it says; train.py redraws loss.png at
each eval; W&B (offline) and TensorBoard, when installed, receive the same numbers as log.jsonl."""
import glob
import json
import os

import numpy as np
import pytest

from conftest import TINY, run_script
from test_train import read_log

pytest.importorskip("matplotlib")
ARGS = [*TINY, "--max_iters=12", "--eval_interval=6", "--eval_iters=2", "--log_interval=2", "--warmup_iters=2"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    """Two short real runs at different learning rates; the first also logs to W&B and TensorBoard when they
    are installed."""
    root = tmp_path_factory.mktemp("plots")
    a, b = str(root / "lr_3e-3"), str(root / "lr_1e-3")
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=a, WANDB_SILENT="true")
    for out, extra in ((a, ["--lr=3e-3", "--wandb_log=True", "--tensorboard_log=True"]), (b, ["--lr=1e-3"])):
        r = run_script("train.py", *ARGS, f"--data_dir={data_dir}", f"--out_dir={out}", *extra, env=env)
        assert r.returncode == 0, r.stderr
    return a, b, r.stdout


def test_train_py_draws_loss_png_at_each_eval_and_plot_py_overlays_two_runs(tmp_path, two_runs):
    import matplotlib.image

    import plot

    a, b, _ = two_runs
    assert os.path.getsize(os.path.join(a, "loss.png")) > 10_000  # drawn by train.py's child process
    out = str(tmp_path / "ab.png")
    r = run_script("plot.py", a, b, f"--out={out}")
    assert r.returncode == 0 and os.path.exists(out), r.stderr
    img = matplotlib.image.imread(out)
    fig = plot.figure(plot.read_runs([a, b]))
    assert img.shape[:2] == (int(fig.bbox.height), int(fig.bbox.width))
    loss_ax = fig.axes[0]
    assert [line.get_label() for line in loss_ax.lines] == ["lr_3e-3 train", "lr_3e-3 val", "lr_1e-3 train", "lr_1e-3 val"]
    x0, y0, x1, y1 = loss_ax.get_window_extent().extents.astype(int)
    panel = img[img.shape[0] - y1:img.shape[0] - y0, x0:x1, :3]  # image rows run top-down
    inked = (panel < 0.9).any(axis=-1)
    assert inked.mean() > 0.01  # lines, not a blank frame
    for colour in ((0.122, 0.467, 0.706), (1.0, 0.498, 0.055)):  # matplotlib's first two line colours: both runs
        assert (np.abs(panel[inked] - colour).max(axis=-1) < 0.05).sum() > 50, colour
    heat = fig.axes[3]
    assert heat.images and heat.images[0].get_array().shape[0] == 2  # two layers, over time


def test_plot_py_refuses_a_bad_out_dir_in_one_line(tmp_path):
    r = run_script("plot.py", str(tmp_path / "nowhere"))
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "log.jsonl does not exist" in r.stderr


def wandb_history(run_dir):
    """W&B's offline record file, read without its server: LevelDB-style log records of protobuf Records."""
    import wandb.proto.wandb_internal_pb2 as pb

    data = open(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))[0], "rb").read()
    pos, block, records, buf = 7, 32768, [], b""  # 7: the ':W&B' header, magic and version
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            records.append(buf)
            buf = b""
    out = {}
    for raw in records:
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out.setdefault(rec.history.step.num, {}).update(items)
    return out


def test_wandb_offline_gets_the_losses_of_log_jsonl(two_runs):
    pytest.importorskip("wandb")
    a, _, _ = two_runs
    logged = {r["iter"]: r for r in read_log(a) if "loss" in r}
    history = wandb_history(a)
    assert sorted(logged) == [2, 4, 6, 8, 10, 12]
    for it, r in logged.items():
        assert history[it]["loss"] == r["loss"] and history[it]["aux"] == r["aux"]
    evals = {r["iter"]: r["val_loss"] for r in read_log(a) if r.get("eval")}
    assert {it: history[it]["val_loss"] for it in evals} == evals


def test_tensorboard_gets_the_losses_of_log_jsonl(two_runs):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a, _, _ = two_runs
    acc = EventAccumulator(os.path.join(a, "tensorboard"))
    acc.Reload()
    logged = {r["iter"]: r["loss"] for r in read_log(a) if "loss" in r}
    got = {e.step: e.value for e in acc.Scalars("loss")}
    assert got.keys() == logged.keys()
    assert all(got[k] == pytest.approx(logged[k], rel=1e-6) for k in got)  # float32 in the event file
    evals = {r["iter"]: r["val_loss"] for r in read_log(a) if r.get("eval")}
    assert {e.step: e.value for e in acc.Scalars("val_loss")} == pytest.approx(evals, rel=1e-6)


def test_a_missing_tracker_package_is_one_line_not_a_crash(tmp_path, data_dir):
    """Hide wandb and tensorboard from train.py (a shadowing module that fails to import, as when absent)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "wandb.py").write_text("raise ImportError('No module named wandb')\n")
    (shadow / "tensorboard.py").write_text("raise ImportError('No module named tensorboard')\n")
    env = dict(os.environ, PYTHONPATH=str(shadow))
    r = run_script("train.py", *TINY, "--max_iters=2", "--eval_interval=0", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'o'}", "--wandb_log=True", "--tensorboard_log=True", env=env)
    assert r.returncode == 0, r.stderr
    assert "wandb_log: off" in r.stdout and "tensorboard_log: off (pip install tensorboard)" in r.stdout


def test_train_py_says_once_where_it_wrote_loss_png(two_runs):
    _, b, stdout = two_runs
    assert "eval 6 |" in stdout and "eval 12 |" in stdout  # two evals, two drawings (or one, if the first still drew)
    assert stdout.splitlines().count(f"wrote {os.path.join(b, 'loss.png')}") == 1, stdout


def test_a_run_with_one_logged_point_is_drawn_visibly(tmp_path, two_runs):
    """The first step record of a real run's log alone: a line through one point draws nothing, so it needs a marker."""
    import matplotlib.image

    import plot

    one = tmp_path / "one_point"
    one.mkdir()
    first = next(line for line in open(os.path.join(two_runs[0], "log.jsonl")) if '"loss"' in line)
    (one / "log.jsonl").write_text(first)
    r = run_script("plot.py", str(one))
    assert r.returncode == 0, r.stderr
    img = matplotlib.image.imread(str(one / "loss.png"))
    fig = plot.figure(plot.read_runs([str(one)]))
    fig.canvas.draw()
    record = json.loads(first)
    for ax, key in ((fig.axes[0], "loss"), (fig.axes[2], "tok_per_s")):
        x, y = ax.transData.transform((plot.tokens(record, {"steps": [record]}), record[key]))
        row, col = img.shape[0] - int(round(y)), int(round(x))  # image rows run top-down
        patch = img[row - 3:row + 4, col - 3:col + 4, :3]
        assert (patch[..., 2] - patch[..., 0] > 0.2).sum() >= 9, key  # matplotlib's first colour (blue) at the point
