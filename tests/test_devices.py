"""devices.py: the device, the dtype and the peak FLOP/s that every script picks. No GPU here: the CUDA cases tell
torch a GPU's name, and say so in their names."""
import pytest
import torch

from devices import peak_flops, pick_device, pick_dtype


def test_auto_picks_the_cpu_and_fp32_here_and_anything_asked_is_kept():
    assert pick_device("auto") == "cpu" and pick_device("cuda:1") == "cuda:1"
    assert pick_dtype("auto", "cpu") == "float32" and pick_dtype("bfloat16", "cpu") == "bfloat16"
    assert peak_flops("cpu", "bfloat16") is None


@pytest.mark.parametrize("name, dt, tf32, peak", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", True, 989e12),
    ("NVIDIA H100 80GB HBM3", "float32", False, 67e12),
    ("NVIDIA H100 80GB HBM3", "float32", True, None),  # TF32's rate: no fp32 peak describes it
    ("NVIDIA A100-SXM4-80GB", "bfloat16", True, 312e12),  # not the A10's
    ("NVIDIA A10", "float16", True, 125e12),
    ("NVIDIA L40S", "float32", False, None),  # fp32 peak not in the table
    ("Some Future GPU", "bfloat16", True, None)])
def test_one_peak_table_for_train_and_bench_on_a_gpu_named_by_a_mock(monkeypatch, name, dt, tf32, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda dev: name)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    assert peak_flops("cuda:0", dt) == peak
