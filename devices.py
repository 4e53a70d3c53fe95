"""
Where a run computes and in what precision: the device and dtype that `auto` picks, and the peak FLOP/s of
known GPUs that MFU is measured against. train.py, sample.py, bench.py and safe_train.py's preflight all choose
here, so the same settings pick the same device and precision in every script.
"""
import torch


def pick_device(want="auto"):
    """'auto': CUDA, else Apple MPS, else CPU; anything else as asked."""
    if want != "auto":
        return want
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(want, dev_type):
    """'auto': bf16 autocast on CUDA (fp16 where the GPU has no bf16) and on MPS from macOS 14 (before it only
    fp32 is reliable), fp32 on CPU (bf16 pays only on CPUs with bf16 matmul units: bench.py tells)."""
    if want != "auto":
        return want
    if dev_type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if dev_type == "mps":
        return "bfloat16" if torch.backends.mps.is_macos_or_newer(14, 0) else "float32"
    return "float32"


# Dense peak FLOP/s of known GPUs, from the vendors' data sheets: (bf16 / fp16 tensor cores, fp32 without TF32),
# None where not known. Matched in this order against the device's name (A100 before A10).
GPU_PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12), "L40": (181e12, None),
                  "4090": (165e12, None), "A10": (125e12, None)}


def peak_flops(dev, dt):
    """The FLOP/s that MFU divides by on device dev (a torch device string) at dtype dt ('float32', 'bfloat16', ...):
    GPU_PEAK_FLOPS's; None on CPU and MPS, for a GPU not in the table, and for fp32 with TF32 on (its matmuls then
    run at TF32's rate, which no fp32 peak describes)."""
    if not dev.startswith("cuda") or (dt == "float32" and torch.backends.cuda.matmul.allow_tf32):
        return None
    name = torch.cuda.get_device_name(dev)
    for key, (half, single) in GPU_PEAK_FLOPS.items():
        if key in name:
            return single if dt == "float32" else half
    return None
