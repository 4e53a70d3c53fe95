"""
Sizes and costs from a config alone, no weights built: parameter counts, FLOPs per token, the activations a
layer keeps, and the memory a training run needs per device. For the log line's MFU, the README's numbers,
safe_train.py's preflight and bench/memory.py:
    python sizing.py config/8b_moe.py [--key=value]        # train.py's settings -> counts and memory per device
"""
import torch

from model import GPT, GPTConfig


def param_counts(cfg):
    """total, active (per token) and embedding parameter counts."""
    d, hd, E, I = cfg.n_embd, cfg.head_dim, cfg.n_expert, cfg.intermediate_size
    attn = d * hd * (cfg.n_head + 2 * cfg.n_kv_head) + hd * (cfg.n_head + 2 * cfg.n_kv_head)  # q, k, v
    attn += cfg.n_head * hd * d + d + (cfg.n_head if cfg.sinks else 0)  # o_proj, sinks
    expert = d * 2 * I + 2 * I + I * d + d
    router = d * E + E
    layer = attn + router + E * expert + 2 * d
    embedding = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    r = cfg.lora_rank
    shapes = {"q": (d, cfg.n_head * hd), "k": (d, cfg.n_kv_head * hd), "v": (d, cfg.n_kv_head * hd), "o": (cfg.n_head * hd, d), "router": (d, E)}
    lora_expert = r * (d + 2 * I) + r * (I + d) if cfg.lora_on("experts") else 0
    blocks = cfg.n_blocks()
    lora = blocks * (sum(r * (i + o) for t, (i, o) in shapes.items() if cfg.lora_on(t)) + E * lora_expert)
    mor = d * cfg.n_recursion if cfg.mor_router != "none" else 0
    total = blocks * layer + d + embedding + lora + mor
    active = total - blocks * (E - cfg.experts_per_token) * (expert + lora_expert)
    return {"total": total, "active": active, "embedding": embedding, "lora": lora, "layer_active": layer - (E - cfg.experts_per_token) * expert}


def layer_shares(cfg):
    """The share of a sequence's tokens that each applied layer computes: 1, or a recursion step's capacity."""
    plan, (first, m, last) = cfg.schedule()
    if cfg.mor_router == "none":
        return [1.0] * len(plan)
    return [1.0] * first + [c for c in cfg.capacities() for _ in range(m)] + [1.0] * last


def flops_per_token(cfg, seq_len):
    """Training FLOPs (forward + backward) per token, PaLM-style: 6 x active weights that do matmuls
    (the output layer counts, the embedding lookup does not) + attention scores over the context each
    layer really sees (sliding layers see at most sliding_window keys)."""
    n = param_counts(cfg)
    matmul_params = n["active"] - cfg.vocab_size * cfg.n_embd * (0 if cfg.tie_embeddings else 1) - cfg.n_blocks() * n["layer_active"]
    attn = 0
    # a recursion step's layers run a capacity's share of the tokens, each against that share of the keys
    for i, share in zip(cfg.schedule()[0], layer_shares(cfg)):
        ctx = min(seq_len, cfg.sliding_window) if cfg.layer_is_sliding(i) else seq_len
        attn += 12 * cfg.n_head * cfg.head_dim * ctx * share * share
        matmul_params += n["layer_active"] * share
    return 6 * matmul_params + attn


def output_layer_flops_share(cfg, seq_len):
    """The share of flops_per_token that the output layer's matmul takes (why small configs cut the vocabulary)."""
    return 6 * cfg.vocab_size * cfg.n_embd / flops_per_token(cfg, seq_len)


def activation_elements(cfg, tokens):
    """Elements the backward keeps per layer for `tokens` tokens, counted from model.py's forward with
    saved-tensor hooks (tests/test_model.py checks the count): SwiGLU experts keep 7 tensors of k x I per
    token (gate_up out, clamp and sigmoid intermediates, down_proj in), the dispatch 2 of k x d; attention
    keeps q and its output (padded to hp channels with sinks; without, the output is o_proj's input), k and v
    at the kv heads (a sliding layer's blocks hold each key twice), the softmax statistics; then norms and
    projection inputs. Sliding layers are assumed shorter than the sequence, as they are when training."""
    hp = -(-(cfg.head_dim + 1) // 8) * 8 if cfg.sinks else cfg.head_dim
    H, Hk = cfg.n_head, cfg.n_kv_head
    plan = cfg.schedule()[0]
    sliding = sum(cfg.layer_is_sliding(i) for i in plan) / len(plan) if cfg.sliding_window else 0.0
    attn = (2 if cfg.sinks else 1) * H * hp + 2 * Hk * hp * (1 + sliding) + H
    k, d = cfg.experts_per_token, cfg.n_embd
    per_token = 7 * k * cfg.intermediate_size + 2 * k * d + attn + 6 * d + H * cfg.head_dim
    return per_token * tokens


def memory_estimate(cfg, batch_size, block_size=None, dtype="float32", world_size=1, device="cpu",
                    activation_checkpointing=False, loss_chunk=0, grad_accum_steps=1, sync_every_micro_step=False,
                    base_dtype="float32"):
    """Peak training memory per device, in bytes, by part, from a config alone. AdamW with fp32 master
    weights, gradients and two moments, all sharded over world_size (FSDP); under FSDP one layer is
    gathered at a time (plus the next, prefetched). Activations as activation_elements counts them, times
    1.3 for the gradients alive during the backward and allocator slack, or 2.35 where little state fills
    that slack (see below; fitted to peak RSS on CPU, the README has the table); bf16 autocast keeps about 0.78x the bytes of fp32 (measured 0.73-0.82x).
    Logits: the float copy, log-softmax and its gradient for the whole micro batch, or with loss_chunk one
    chunk of them plus the gradients LinearCrossEntropy keeps.
    With gradient accumulation (grad_accum_steps per device > 1) later micro steps run their forward with
    the gradients already allocated, and each backward adds its gradient next to the running sum: two more
    gradient-sized buffers (measured: +0.43 GB for mac_micro's 0.23 GB of gradients). Under FSDP, skipping
    the gradient sync costs whole (unsharded) gradients on every rank until the last micro step, kept in the
    reduce dtype (fp32, 4 bytes a parameter, measured on CPU with bf16 parameters); sync_every_micro_step
    (train.py's sync_grads_every_micro_step) reduce-scatters each micro step and keeps only the shard.
    A LoRA run (cfg.lora_rank) keeps gradients and moments for its adapters alone; base_dtype bfloat16 halves
    the frozen layers' weights.
    'process' is what the runtime holds before any tensor: Python + torch on CPU, the CUDA context.
    On CUDA the parts are cuda_peak's instead, counted from what CUDA allocates (bf16 autocast copies of the weights,
    activations saved in bf16, the caching allocator's reserve) and 'reserved' (the total without the CUDA context)
    is the figure to set beside torch.cuda.max_memory_reserved (README, "The memory estimate on CUDA")."""
    T = block_size or cfg.block_size
    tokens = batch_size * T
    n = param_counts(cfg)
    P, shard = n["total"], n["total"] / world_size
    trained = n["lora"] / world_size if cfg.lora_rank else shard  # a LoRA run: grads and AdamW for the adapters alone
    act_bytes = 4.0 if dtype == "float32" else 3.1
    per_layer = activation_elements(cfg, tokens) * act_bytes
    applied = sum(layer_shares(cfg))  # layers' worth of tokens: recursion steps compute their capacity's share
    if activation_checkpointing:  # keep each block's input; the block being recomputed holds its tensors and their grads
        saved = applied * tokens * cfg.n_embd * 4 + 2 * per_layer
    else:
        saved = applied * per_layer
    if loss_chunk:  # fused: one chunk of float logits (turned into probabilities in place), the head's gradient (not for
        head_grad = 0 if cfg.lora_rank else 4 * cfg.vocab_size * cfg.n_embd  # a frozen head), x's
        logits = min(loss_chunk, tokens) * cfg.vocab_size * (4 + (2 if dtype != "float32" else 0)) + head_grad + 4 * tokens * cfg.n_embd
    else:  # whole: the float logits, the log-softmax kept for the backward, and its gradient
        logits = tokens * cfg.vocab_size * (12 + (2 if dtype != "float32" else 0))
    layer_params = (P - n["embedding"]) / cfg.n_blocks()
    gathered = 0 if world_size == 1 else layer_params * (2 if device == "cuda" and dtype == "bfloat16" else 4) * 2 + layer_params * 4
    grads = 4 * trained
    if grad_accum_steps > 1 and world_size > 1:
        if not sync_every_micro_step:  # FSDP skips the reduce-scatter until the last micro step: every rank holds
            grads += trained * world_size * 4  # whole gradients, in the fp32 reduce dtype
    elif grad_accum_steps > 1:
        grads += 8 * trained
    if device == "cuda":
        return cuda_peak(cfg, tokens, dtype, world_size, activation_checkpointing, loss_chunk, grad_accum_steps > 1,
                         sync_every_micro_step, base_dtype, gathered)
    # The backward's gradients and the allocator's slack come on top of the saved tensors: 1.3x. The host heap
    # also keeps about 0.7 GB of freed activations it cannot give back (it cannot shrink round live blocks), which
    # gradients and AdamW moments allocated later move into: a full run hides it, a LoRA run (almost no such
    # state) shows it. Fitted on CPU with bench/memory.py; CUDA's caching allocator reuses its blocks: not
    # measured here, left out.
    activations = 1.3 * saved
    if device != "cuda":
        activations += max(0.0, 0.7e9 - grads - 8 * trained)
    weights = 4 * shard
    if cfg.lora_rank and base_dtype == "bfloat16":  # train.py keeps the frozen layers' matrices in bf16
        weights -= 2 * (P - n["embedding"] - n["lora"])
    parts = {"weights": weights, "grads": grads, "optimizer": 8 * trained, "gathered": gathered,
             "activations": activations, "logits": logits,
             "process": {"cpu": 0.4e9, "cuda": 0.5e9, "mps": 0.4e9}.get(device, 0.4e9)}
    parts["total"] = sum(parts.values())
    return parts


def activation_bytes(cfg, tokens, dtype):
    """Bytes the backward keeps per layer on CUDA for `tokens` tokens, the bf16 copies of the layer's weights not
    included. float32: 4 an element of activation_elements. bf16 / fp16 autocast: 2, but the norms' inputs (the fp32
    residual stream; CUDA's fused rms_norm keeps nothing else) and the softmax statistics stay fp32, and autocast casts
    x once per linear that reads it (q, k, v, router). Measured on an H200 with saved-tensor hooks, weight copies
    included: 85.6 MB a mac_micro layer at 4 x 512 (84.8 by this count), 3.63 GB an 8b_moe layer at 4 x 4096 (3.62)."""
    if dtype == "float32":
        return 4 * activation_elements(cfg, tokens)
    return 2 * activation_elements(cfg, tokens) + (4 * cfg.n_embd + 2 * cfg.n_head) * tokens


# The two fitted constants of the CUDA estimate, from issue 20's five H200 rows (torch 2.11, bf16 autocast, eager): the
# caching allocator's reservation over its peak allocation (sizes rounded up, freed blocks kept for reuse; 1.00-1.16x
# on 22 runs), and workspaces and small buffers (cuBLAS keeps 32 MiB per thread on Hopper: the forward's and autograd's).
CUDA_RESERVE, CUDA_WORKSPACE = 1.06, 0.1e9


def cuda_peak(cfg, tokens, dtype, world_size, activation_checkpointing, loss_chunk, accumulating, sync_every_micro_step,
              base_dtype, gathered):
    """memory_estimate on CUDA, in bytes by part, at the peak: the larger of two moments. The end of the forward: every
    layer's saved tensors (with activation checkpointing, each block's fp32 input and the bf16 weight copies autocast
    caches until the forward ends) and the loss's buffers. The backward of one layer: its saved tensors, the gradient
    of its experts' gate_up output (the largest one) and the incoming fp32 gradient, with all other blocks' gradients
    allocated. Weights, gradients and AdamW moments are fp32 (fused AdamW makes no copies); with accumulation the
    gradients stay allocated through the next forwards, without it they appear during the backward. 'reserved' is the
    figure torch.cuda.max_memory_reserved reports (what an out-of-memory error is about); 'total' adds the CUDA context,
    to set beside the device's memory. Measured runs: README; none yet of LoRA, FSDP, recursion or compile on CUDA."""
    n = param_counts(cfg)
    P, blocks, d, V = n["total"], cfg.n_blocks(), cfg.n_embd, cfg.vocab_size
    trained = (n["lora"] if cfg.lora_rank else P) / world_size
    applied = sum(layer_shares(cfg))
    autocast = dtype != "float32"
    per_layer, eb = activation_bytes(cfg, tokens, dtype), 2 if autocast else 4  # eb: bytes of a bf16 or fp32 element
    # the bf16 copy of each fp32 weight a matmul keeps for the backward: none where the weights are bf16 already (FSDP
    # gathers them so; a bf16 frozen base); a frozen fp32 base's experts are cast on use (FrozenMatmul), not kept
    attn_params = 2 * d * cfg.head_dim * (cfg.n_head + cfg.n_kv_head) + d * cfg.n_expert  # q, k, v, o, router
    fp32_weights = autocast and world_size == 1 and not (cfg.lora_rank and base_dtype == "bfloat16")
    copies = 2 * (attn_params if cfg.lora_rank else (P - n["embedding"] - n["lora"]) / blocks) if fp32_weights else 0
    cached = 2 * attn_params if fp32_weights and not cfg.lora_rank else 0  # autocast caches trained weights only
    if loss_chunk:  # LinearCrossEntropy: the head's fp32 gradient, x's, one chunk's fp32 logits (probabilities in place),
        c = min(loss_chunk, tokens)  # their bf16 copy for the matmuls, and g.t() @ x in bf16, then fp32 [V, d]
        head = not cfg.lora_rank  # a frozen head needs no gradient
        loss = 4 * tokens * d + V * (4 * d * head + max(6 * c + 6 * d * head, 10 * c))
    else:  # the float logits, the log-softmax kept for the backward, and its gradient
        loss = 12 * tokens * V
    loss += 2 * V * d if autocast else 0  # the head's bf16 copy
    if accumulating and world_size > 1 and not sync_every_micro_step:  # FSDP: whole fp32 gradients until the last micro step
        grads = 4 * trained * world_size + 4 * trained
    else:
        grads = 4 * trained if accumulating else 0
    kept, kept_copies = (4 * tokens * d, cached) if activation_checkpointing else (per_layer, copies)
    end_of_forward = {"grads": grads, "autocast": applied * kept_copies, "activations": applied * kept, "logits": loss}
    others = applied - 1 if accumulating else 0  # without accumulation: the last layer's backward, all but its gradients made
    backward = {"grads": grads if accumulating else 4 * trained * (1 - 1 / blocks),
                "autocast": copies * (1 if activation_checkpointing else 1 + others),
                "activations": per_layer + 2 * cfg.experts_per_token * cfg.intermediate_size * tokens * eb + 4 * tokens * d
                + (4 * tokens * d * (1 + others) if activation_checkpointing else others * per_layer), "logits": 0}
    weights = 4 * P / world_size
    if cfg.lora_rank and base_dtype == "bfloat16":
        weights -= 2 * (P - n["embedding"] - n["lora"]) / world_size
    parts = {"weights": weights, "optimizer": 8 * trained, "gathered": gathered,
             **max(end_of_forward, backward, key=lambda p: sum(p.values())), "workspace": CUDA_WORKSPACE}
    parts["allocator"] = (CUDA_RESERVE - 1) * sum(parts.values())
    parts["reserved"] = sum(parts.values())
    parts["process"] = 0.5e9  # the CUDA context, outside the allocator
    parts["total"] = parts["reserved"] + parts["process"]
    return parts




def main(argv):
    """python sizing.py config/8b_moe.py [--key=value]: train.py's settings -> counts, FLOPs and memory, on the meta device."""
    import os

    from configurator import ConfigError, configure, script_defaults

    settings = configure(script_defaults(os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")), argv)
    cfg = GPTConfig.from_dict(settings)
    try:
        cfg.check_recursion()
    except ValueError as e:  # model.py raises plain ValueErrors: it imports nothing of ours
        raise ConfigError(str(e))
    with torch.device("meta"):
        built = sum(p.numel() for p in GPT(cfg).parameters())
    n = param_counts(cfg)
    assert built == n["total"], (built, n["total"])
    print(f"parameters: {n['total']:,} total | {n['active']:,} active per token | {n['active'] - n['embedding']:,} active "
          f"without the embedding and output matrices ({n['embedding']:,})")
    B, T = settings["batch_size"], settings["block_size"]
    print(f"training FLOPs per token at {T} tokens: {flops_per_token(cfg, T) / 1e6:,.0f} M, "
          f"{output_layer_flops_share(cfg, T):.0%} of them in the output layer")
    dtype = settings["dtype"]
    for device, world in (("cpu", 1), ("cuda", 1), ("cuda", 8)):
        dt = "bfloat16" if device == "cuda" and dtype in ("auto", "bfloat16") else "float32" if dtype == "auto" else dtype
        m = memory_estimate(cfg, B, T, dt, world, device, settings["activation_checkpointing"], settings["loss_chunk"],
                            max(1, settings["grad_accum_steps"] // world), settings["sync_grads_every_micro_step"])
        print(f"memory per device, {device} x{world} {dt}, micro batch {B} x {T}: {m['total'] / 1e9:.1f} GB ("
              + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in m.items() if k not in ("total", "reserved")) + ")")


if __name__ == "__main__":
    import sys

    from configurator import run

    run(main, sys.argv[1:])
