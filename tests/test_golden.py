"""What commit 6087689 trained and saved still holds: the same commands give its losses bit for bit (one
process, two under torchrun, a LoRA fine-tune), and a checkpoint it wrote still resumes, samples and exports.
The fixtures and how they were made: tests/fixtures/golden/make_golden.py."""
import json
import os
import shutil
import sys
import tarfile

import pytest

from conftest import ROOT, full_only, run_script

HERE = os.path.join(ROOT, "tests", "fixtures", "golden")
sys.path.insert(0, HERE)
import make_golden  # noqa: E402


@full_only
def test_the_same_commands_give_the_losses_of_6087689_bit_for_bit(tmp_path):
    with open(os.path.join(HERE, "losses.json")) as f:
        golden = json.load(f)
    outs = make_golden.runs(str(tmp_path), make_golden.data_dir(str(tmp_path)))
    for name, out in outs.items():
        assert make_golden.loss_fields(out) == golden[name], name  # floats from JSON: equal means bit for bit


@pytest.fixture(scope="module")
def old_run(tmp_path_factory):
    """An out_dir holding the checkpoint 6087689 wrote, as that run left it."""
    out = tmp_path_factory.mktemp("golden") / "run"
    with tarfile.open(os.path.join(HERE, "ckpt_tiny.tar.gz")) as tar:
        tar.extractall(out)
    (out / "latest").write_text("ckpt_8")
    return str(out)


def test_a_checkpoint_of_6087689_resumes_samples_and_exports(old_run, data_dir, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(old_run, out)
    with open(os.path.join(out, "ckpt_8", "config.json")) as f:
        saved = json.load(f)
    model_args = [f"--{k}={saved[k]}" for k in ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_expert",
                                                "intermediate_size", "sliding_window", "block_size", "vocab_size",
                                                "tie_embeddings", "batch_size")]
    r = run_script("train.py", *model_args, f"--data_dir={data_dir}", f"--out_dir={out}", "--max_iters=10",
                   "--eval_interval=0", "--sample_every=0", "--compile=False", "--plot=False")
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "ckpt_8" in r.stdout
    assert open(os.path.join(out, "latest")).read().strip() == "ckpt_10"
    r = run_script("sample.py", f"--out_dir={old_run}", "--max_new_tokens=8", "--start=The", "--temperature=0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The") and len(r.stdout.split("---------------")[0]) > len("The\n")
    r = run_script("export_hf.py", f"--ckpt={old_run}", f"--out={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(tmp_path / "hf" / "model.safetensors")
