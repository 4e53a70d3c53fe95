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


def set_tf32(dev_type, on=True):
    """The TF32 policy of every script: fp32 matmuls on CUDA's tensor cores (Ampere and later: several times the
    fp32 rate, a 10-bit mantissa; bf16 autocast's matmuls are bf16 anyway). on=False for parity checks of fp32
    CUDA against the CPU. The CPU's own setting is left alone. Returns whether TF32 is on, for the start line."""
    if dev_type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = on  # not set_float32_matmul_precision: that one switches the CPU's too
    torch.backends.cudnn.allow_tf32 = on
    return on


def compile_blocks(model, backend="inductor"):
    """torch.compile each block, as torchtitan does (train.py, sample.py and bench.py compile this way).
    Measured on CPU against compiling the whole model (README, "torch.compile"): the blocks share their compiled
    code (what serves one sliding layer serves all, and so for full layers), so compile time does not grow with
    n_layer; the embedding, the recursion routers and the fused loss (its own schedule) stay eager, and so do
    FSDP2's per-block hooks. dynamic=None: each graph is compiled first for the shapes it meets, and a dimension
    that changes later (eval's, the sample's) becomes symbolic at its first change: one recompile, not one per
    shape. backend: a name torch.compile knows (inductor, aot_eager, ...) or "module:function". Returns model."""
    if isinstance(backend, str) and ":" in backend:
        import importlib

        module, name = backend.split(":")
        backend = getattr(importlib.import_module(module), name)
    # a run meets the block's code in more variants than dynamo's 8 (sliding and full; training, eval, the
    # sample's prefill and decode; MoR's gathered and masked calls); past the limit it would run eager, silently
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    for block in model.layers:
        block.forward = torch.compile(block.forward, backend=backend)
    return model


def uncompile_blocks(model):
    """Back to eager: the blocks' own forward again (compile_blocks set each one's on the instance)."""
    for block in model.layers:
        block.__dict__.pop("forward", None)


def compiler_error(e):
    """For an exception of torch.compile's making, raised by dynamo, AOTAutograd or inductor while compiling (the
    first call, a recompile, the backward's compile at its first use) or from inside compiled code: one line that
    names it (what the backend raised, unwrapped). None for any other exception."""
    import traceback

    parts = ("torch/_dynamo/", "torch/_functorch/", "torch/_inductor/")
    ours = isinstance(e, torch._dynamo.exc.TorchDynamoException) or any(
        p in f.filename.replace("\\", "/") for f in traceback.extract_tb(e.__traceback__) for p in parts)
    if not ours:
        return None
    e = getattr(e, "inner_exception", None) or e  # BackendCompilerFailed wraps what the backend raised
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
