"""
Training speed, measured: tokens/s, MFU, the MoE's overhead over an equal-FLOP dense model, peak memory, and
the same model in Hugging Face transformers (GptOssForCausalLM) side by side.
    python bench.py                          # config/mac_micro.py's shape, on whatever device train.py would pick
    python bench.py config/8b_moe.py --n_layer=2 --batch_size=1 --device=cuda
    python bench.py --decode=True            # decoding tok/s instead: the KV cache and rerunning the context, batch 1 and 8
A step is what train.py does: forward, loss + router losses, backward, gradient clipping, AdamW. Runs
alternate (ours, HF, ours, HF, ...) and medians are reported, since shared machines are noisy.
MFU: model FLOPs (sizing.flops_per_token) per second over the device's peak: on CUDA the GPU's dense bf16
(or fp32) peak (devices.peak_flops); on CPU the best of a square-matmul probe at the run's dtype, measured here.
transformers is optional (pip install transformers): without it the HF column says so.
"""
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import fields, replace

import torch

from model import GPT, GPTConfig

# the shape: every GPTConfig field is a setting; config/mac_micro.py is read first unless a config file is given
globals().update({f.name: f.default for f in fields(GPTConfig)})
block_size = 512
batch_size = 4
# the bench
device = "auto"
dtype = "auto"  # auto: what train.py picks (bf16 on CUDA, fp32 on CPU); on CPU bf16 autocast is timed too
compile = None  # None: on for CUDA
steps = 1  # timed steps per round
rounds = 5
hf = True  # also time transformers' GptOssForCausalLM on the identical model
dense = True  # also time the equal-FLOP dense model for the MoE overhead
loss_chunk = 512  # as train.py: the loss fused with its gradient, 512 tokens at a time
layer_T = 4096  # the per-layer line: one sliding and one full layer (attention alone, then the whole block), forward +
# backward at this sequence length, batch 1; 0 = skip
decode = False  # instead of training steps: decoding (generate.py, greedy) with and without the KV cache, batch 1 and 8
prompt_tokens = 400  # --decode: the prompt's length
max_new_tokens = 200  # --decode: new tokens per timed run with the cache (without it, an eighth: each one reruns the context)
# train.py settings that config files may set; accepted (None takes any value) and ignored here
out_dir = data_dir = grad_accum_steps = lr = min_lr = warmup_iters = lr_decay_iters = max_iters = None
eval_interval = eval_iters = save_every = sample_every = log_interval = keep_last_n = None
router_aux_loss_coef = activation_checkpointing = weight_decay = grad_clip = None
data_recipe = sync_grads_every_micro_step = init_from = None


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak(dev, dt, n=2048, reps=5):
    """FLOP/s of the best of a few n x n matmuls: what this device can do at this dtype, for CPU MFU."""
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    best = float("inf")
    for _ in range(reps + 1):
        sync(dev)
        t = time.perf_counter()
        a @ b
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def our_step_fn(cfg, dev, ctx, use_compile):
    from devices import compile_blocks

    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if use_compile:
        compile_blocks(model)  # as train.py does

    def step(x):
        with ctx:
            loss, stats = model(x, x, loss_chunk=loss_chunk)[1:]
            total = loss + 0.01 * stats["aux"] + 0.001 * stats["z"]
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def hf_step_fn(cfg, dev, ctx, dt):
    from transformers import GptOssConfig, GptOssForCausalLM

    from export_hf import hf_config

    # the config our export writes, with HF's router loss on (its loss then includes router_aux_loss_coef * aux)
    hc = GptOssConfig.from_dict({**hf_config(cfg), "output_router_logits": True, "router_aux_loss_coef": 0.01})
    hc._attn_implementation = "eager"  # the sinks need eager (or kernels that are not on CPU)
    torch.manual_seed(0)
    model = GptOssForCausalLM(hc).to(dev)
    ours = sum(p.numel() for p in GPT(cfg).parameters())
    assert sum(p.numel() for p in model.parameters()) == ours, "HF model differs in size from ours"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step(x):
        with ctx:
            out = model(input_ids=x, labels=x)  # its loss includes router_aux_loss_coef * aux
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def layer_step_fns(cfg, dev, ctx, T, use_compile=False):
    """Attention alone (q, k, v given), the attention sublayer (projections, RoPE, attention) and the whole
    block, sliding and full, forward + backward at sequence length T, batch 1; compiled as train.py compiles its
    blocks when use_compile (attention() then runs FlexAttention on CUDA)."""
    from model import Attention, Block, attention, rope_tables

    wrap = torch.compile if use_compile else (lambda f: f)
    cos, sin = (t.to(dev) for t in rope_tables(cfg, T))
    fns = {}
    torch.manual_seed(0)
    dt = getattr(ctx, "fast_dtype", torch.float32)  # q, k, v as autocast's projections give them
    q = torch.randn(1, T, cfg.n_head, cfg.head_dim, device=dev, dtype=dt, requires_grad=True)
    k, v = (torch.randn(1, T, cfg.n_kv_head, cfg.head_dim, device=dev, dtype=dt, requires_grad=True) for _ in range(2))
    sinks = torch.zeros(cfg.n_head, device=dev, requires_grad=True) if cfg.sinks else None
    op = wrap(attention)
    for kind, window in (("sliding", cfg.sliding_window), ("full", None)):
        def step(x, window=window):
            with ctx:
                y = op(q, k, v, sinks, window)
            y.float().square().mean().backward()
        fns[f"attention op, {kind}"] = step
    for part, make in (("attention", Attention), ("block", Block)):
        for kind, idx in (("sliding", 0), ("full", 1)):
            assert cfg.layer_is_sliding(idx) == (kind == "sliding"), "bench expects attn_pattern SF"
            torch.manual_seed(0)
            layer = make(cfg, idx).to(dev)
            layer.forward = wrap(layer.forward)

            def step(x, layer=layer, part=part):
                with ctx:
                    y = layer(x, cos, sin)
                    y = y if part == "attention" else y[0]
                y.float().square().mean().backward()
            fns[f"{part}, {kind}"] = step
    return fns


def decode_rows(cfg, dev, dt, use_compile):
    """Decoding tokens/s, medians of interleaved rounds: the KV cache (and, with use_compile, its compiled one-token
    step: generate.compile_decode) and rerunning the context, at batch 1 and 8 (one prompt, repeated as sample.py's
    --num_samples repeats it). Random weights: greedy tokens from them cost what a trained model's do."""
    from generate import compile_decode, generate

    torch.manual_seed(0)
    model = GPT(cfg).to(dev, dt).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_tokens), device=dev)
    runs = {f"{how}, batch {b}": (how, b) for how in ("KV cache", "no cache") + (("KV cache, compiled",) if use_compile else ())
            for b in (1, 8)}

    def run(how, b, n):
        compile_decode(model, how.endswith("compiled"))
        sync(dev)
        t = time.perf_counter()
        generate(model, prompt.expand(b, -1), n, temperature=0, use_cache=how != "no cache")
        sync(dev)
        return time.perf_counter() - t

    def tokens(how):
        return max(1, max_new_tokens // 8) if how == "no cache" else max_new_tokens
    for how, b in runs.values():  # warm-up: allocations; the compile and its CUDA graph (for these very shapes: the cache
        run(how, b, tokens(how))  # is as long as prompt and new tokens together)
    times = {k: [] for k in runs}
    for r in range(rounds):
        for name, (how, b) in runs.items():
            times[name].append(run(how, b, tokens(how)))
            print(f"round {r + 1} {name:28s} {b * tokens(how) / times[name][-1]:8.1f} tok/s", flush=True)
    print(f"\n| decoding ({prompt_tokens}-token prompt, greedy) | new tokens | tok/s |\n| --- | --- | --- |")
    for name, (how, b) in runs.items():
        print(f"| {name} | {tokens(how)} | {b * tokens(how) / statistics.median(times[name]):,.1f} |")


def timed(step, x, dev, n):
    sync(dev)
    t = time.perf_counter()
    for _ in range(n):
        step(x)
    sync(dev)
    return (time.perf_counter() - t) / n


def peak_memory_gb(dev):
    if dev.startswith("cuda"):
        return torch.cuda.max_memory_allocated(dev) / 1e9
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


def main():
    from configurator import check_device, configure
    from devices import peak_flops, pick_device, pick_dtype, set_tf32
    from model import _flex_masks
    from sizing import flops_per_token, param_counts

    argv = sys.argv[1:]
    if not any(a.endswith(".py") for a in argv):
        argv = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "mac_micro.py"), *argv]
    config = configure(globals(), argv)
    check_device(device)
    dev = pick_device(device)
    dev_type = dev.split(":")[0]
    tf32 = set_tf32(dev_type)
    if dev_type == "cpu":
        torch.manual_seed(0)
        fp32_peak, bf16_peak = matmul_peak(dev, torch.float32), matmul_peak(dev, torch.bfloat16)
    dt_name = pick_dtype(dtype, dev_type)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dt_name]
    ctx = nullcontext() if dt == torch.float32 else torch.autocast(dev_type, dtype=dt)
    use_compile = dev_type == "cuda" if compile is None else compile
    cfg = GPTConfig.from_dict(config)
    if dev_type == "cpu":
        peak, where = (bf16_peak if dt == torch.bfloat16 else fp32_peak), f"CPU, {torch.get_num_threads()} threads, matmul probe"
        print(f"matmul probe ({torch.get_num_threads()} threads): fp32 {fp32_peak / 1e9:.0f} GFLOP/s, bf16 {bf16_peak / 1e9:.0f} GFLOP/s"
              f" -> dtype {dt_name}")
    elif dev_type == "cuda":
        peak, where = peak_flops(dev, dt_name), f"{torch.cuda.get_device_name(dev)}, dense {dt_name} peak"
    else:
        peak, where = None, "MPS (no peak known)"
    tokens = batch_size * block_size
    n = param_counts(cfg)
    fpt = flops_per_token(cfg, block_size)
    print(f"model: {n['total'] / 1e6:.1f}M parameters, {n['active'] / 1e6:.1f}M active | batch {batch_size} x {block_size} | "
          f"{fpt / 1e6:.0f} MFLOP per token | device {dev} | dtype {dt_name} | compile {use_compile} | "
          f"tf32 {'on' if tf32 else 'off'}", flush=True)
    if decode:
        return decode_rows(cfg, dev, dt, use_compile)
    x = torch.randint(0, cfg.vocab_size, (batch_size, block_size), device=dev)

    runners = {"nanoOSS": our_step_fn(cfg, dev, ctx, use_compile)}
    row_peak = {"nanoOSS": peak}
    if dev_type == "cpu" and dt == torch.float32:  # does bf16 autocast pay on this CPU? (train.py stays fp32 unless it does)
        runners["nanoOSS, bf16 autocast"] = our_step_fn(cfg, dev, torch.autocast("cpu", dtype=torch.bfloat16), use_compile)
        row_peak["nanoOSS, bf16 autocast"] = bf16_peak
    if hf and cfg.n_recursion == 1:  # HF has no shared layers
        try:
            runners["HF GptOssForCausalLM"] = hf_step_fn(cfg, dev, ctx, dt)
            row_peak["HF GptOssForCausalLM"] = peak
        except ImportError:
            print("HF: transformers is not installed (pip install transformers): no side-by-side", flush=True)
    if cfg.mor_router != "none":  # Mixture-of-Recursions: what routing saves against running every recursion
        runners["same recursion, no routing"] = our_step_fn(replace(cfg, mor_router="none"), dev, ctx, use_compile)
        row_peak["same recursion, no routing"] = None
    if dense:  # one expert, k x I wide, always chosen: the same active FLOPs with no routing
        dense_cfg = replace(cfg, n_expert=1, experts_per_token=1, intermediate_size=cfg.experts_per_token * cfg.intermediate_size)
        runners["nanoOSS dense, equal FLOPs"] = our_step_fn(dense_cfg, dev, ctx, use_compile)
        row_peak["nanoOSS dense, equal FLOPs"] = peak
    for step in runners.values():  # warm-up: allocations, compile
        step(x)
    times = {k: [] for k in runners}
    for r in range(rounds):
        for name, step in runners.items():
            times[name].append(timed(step, x, dev, steps))
            print(f"round {r + 1} {name:28s} {times[name][-1]:7.3f} s/step  {tokens / times[name][-1]:8.0f} tok/s", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\n| | s/step | tokens/s | MFU ({where}; bf16 rows against the bf16 probe) |\n| --- | --- | --- | --- |")
    for name, t in med.items():
        mfu = f"{fpt * tokens / t / row_peak[name]:.0%}" if row_peak[name] else "-"
        print(f"| {name} | {t:.3f} | {tokens / t:,.0f} | {mfu} |")
    ours = med["nanoOSS"]
    if "HF GptOssForCausalLM" in med:
        print(f"nanoOSS vs HF: {med['HF GptOssForCausalLM'] / ours:.2f}x the tokens/s")
    if dense:
        print(f"MoE overhead: {ours / med['nanoOSS dense, equal FLOPs']:.2f} (MoE step time / dense step time)")
    if "same recursion, no routing" in med:
        print(f"MoR step time / the same recursion without routing: {ours / med['same recursion, no routing']:.2f}")
    print(f"peak memory of this process (all models): {peak_memory_gb(dev):.2f} GB")
    if layer_T:
        lcfg = replace(cfg, block_size=max(cfg.block_size, layer_T))
        fns = layer_step_fns(lcfg, dev, ctx, layer_T, use_compile)
        x = torch.randn(1, layer_T, cfg.n_embd, device=dev, requires_grad=True)
        for step in fns.values():
            for _ in range(2 if use_compile else 1):  # compiled, a shape's first call keeps FlexAttention's block mask
                step(x)  # and the second compiles the graph that reads it
        flex = any(key[0] == layer_T for key in _flex_masks)
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for name, step in fns.items():
                times[name].append(timed(step, x, dev, steps))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(f"\nper layer, forward + backward, 1 x {layer_T} tokens, window {cfg.sliding_window}, "
              f"{'FlexAttention' if flex else 'SDPA'}{', compiled' if use_compile else ''} (medians of {rounds}): "
              + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items()))
        print("sliding / full: " + ", ".join(f"{part} {med[part + ', sliding'] / med[part + ', full']:.2f}"
                                             for part in ("attention op", "attention", "block")))


if __name__ == "__main__":
    from configurator import run

    run(main)
