"""
Where a training step's time goes: bench.py's step (forward, losses, backward, clipping, AdamW) under the torch
profiler, its kernels summed into the parts of the model, so the next thing to make faster is named by a number.
    python bench/profile_step.py config/8b_moe.py --n_layer=2 --batch_size=1 --block_size=4096 --device=cuda
    python bench/profile_step.py --device=cpu --steps=2          # config/mac_micro.py's shape on the CPU
Settings are bench.py's (the shape from the config, device, dtype, compile, loss_chunk) plus steps and top.
The table gives ms per step and the share of the device's busy time for each part (on CUDA the GPU kernels'
own time; on the CPU the operators' self time), then the `top` kernels by time. Kernel names are matched to
parts by the patterns in PARTS: a kernel that matches none is counted under "other" and listed, so a new
kernel name shows up rather than hides. With trace=FILE the chrome trace is written too (chrome://tracing,
or https://ui.perfetto.dev). Named profile_step.py: a profile.py here would hide the standard library's profile
module (this folder is first on sys.path), which torch._dynamo imports.
"""
import os
import re
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench.py is one folder up
import bench  # noqa: E402

steps = 3  # profiled steps, after two warm-up steps (compile, allocator)
top = 15  # kernels listed by time
trace = ""  # a file for the chrome trace; empty: none

# the model's parts, matched in this order against each kernel's (or CPU operator's) name, lower-cased
PARTS = [
    ("attention", r"flash|attention|fmha|cudnn|flex|sdpa|softmax_backward|_efficient"),
    ("experts (grouped GEMM)", r"grouped|group_gemm|_grouped_mm|cutlass.*grouped"),
    ("GEMM (projections, router, head)", r"gemm|matmul|cublas|cutlass|sm90_xmma|\bmm\b|addmm|\bbmm\b|linear|nvjet"),
    ("MoE dispatch (sort, gather, scatter)", r"sort|radix|gather|scatter|index|embedding|cumsum|argsort|topk|bincount"),
    ("loss (log-softmax, cross-entropy)", r"log_softmax|nll|cross_entropy|logsumexp"),
    ("optimizer (AdamW, clipping)", r"adam|foreach|multi_tensor|vector_norm|clip|zero_grad|_amp_"),
    ("elementwise and norms (fused by compile)", r"triton|elementwise|vectorized|reduce|mul|add|sub|div|exp|sum|mean|copy|cat|pow|rsqrt|sigmoid|silu|clamp|where|fill|to_copy"),
]


def part_of(name):
    low = name.lower()
    return next((part for part, pattern in PARTS if re.search(pattern, low)), "other")


def main():
    from configurator import check_device, configure
    from devices import pick_device, pick_dtype, set_tf32
    from model import GPTConfig
    from sizing import flops_per_token

    argv = sys.argv[1:]
    if not any(a.endswith(".py") for a in argv):
        argv = [os.path.join(bench.__file__.rsplit(os.sep, 1)[0], "config", "mac_micro.py"), *argv]
    scope = vars(bench)
    own = {"steps": steps, "top": top, "trace": trace}
    scope.update(own)  # bench.py's settings and this file's, read and checked together
    try:
        config = configure(scope, argv)
    finally:
        for k in own:
            globals()[k] = scope.pop(k)
    check_device(bench.device)
    dev = pick_device(bench.device)
    dev_type = dev.split(":")[0]
    tf32 = set_tf32(dev_type)
    dt_name = pick_dtype(bench.dtype, dev_type)
    dt = getattr(torch, dt_name)
    ctx = torch.autocast(dev_type, dtype=dt) if dt != torch.float32 else torch.autocast(dev_type, enabled=False)
    use_compile = dev_type == "cuda" if bench.compile is None else bench.compile
    cfg = GPTConfig.from_dict({k: v for k, v in config.items() if k in GPTConfig.__dataclass_fields__})
    step = bench.our_step_fn(cfg, dev, ctx, use_compile)
    x = torch.randint(0, cfg.vocab_size, (bench.batch_size, bench.block_size), device=dev)
    for _ in range(2):
        step(x)
    bench.sync(dev)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev_type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(x)
        bench.sync(dev)
    if trace:
        prof.export_chrome_trace(trace)
    on_gpu = dev_type == "cuda"
    # on CUDA the kernels themselves (events that ran on the GPU); on the CPU each operator's self time
    kernels = defaultdict(float)
    for e in prof.key_averages():
        us = e.self_device_time_total if on_gpu else e.self_cpu_time_total
        if us > 0 and (not on_gpu or e.device_type == torch.autograd.DeviceType.CUDA):
            kernels[e.key] += us / 1e3 / steps
    busy = sum(kernels.values())
    parts = defaultdict(float)
    for name, ms in kernels.items():
        parts[part_of(name)] += ms
    tokens = bench.batch_size * bench.block_size
    print(f"{cfg.n_layer} layers, batch {bench.batch_size} x {bench.block_size} | {dev} {dt_name} | compile {use_compile} | "
          f"tf32 {'on' if tf32 else 'off'} | {steps} steps profiled | {'GPU kernel' if on_gpu else 'CPU operator self'} time "
          f"{busy:.1f} ms per step ({tokens / busy * 1e3:,.0f} tok/s if nothing else ran; "
          f"{flops_per_token(cfg, bench.block_size) * tokens / 1e9:.0f} GFLOP per step)")
    print("\n| part | ms per step | share |\n| --- | --- | --- |")
    for part, ms in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {part} | {ms:.2f} | {ms / busy:.1%} |")
    print(f"\n| kernel (top {top}) | part | ms per step | share |\n| --- | --- | --- | --- |")
    for name, ms in sorted(kernels.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| `{name[:90]}` | {part_of(name)} | {ms:.2f} | {ms / busy:.1%} |")
    if trace:
        print(f"wrote {trace}")


if __name__ == "__main__":
    from configurator import run

    run(main)
