"""
The GPT-OSS network at any size, in the order of the forward pass:
RMSNorm -> RoPE (with YaRN) -> attention (GQA, sinks, sliding window) -> SwiGLU experts -> MoE -> block -> GPT.
Parameter names match Hugging Face GptOssForCausalLM (add "model." in front of all but lm_head), so an
exporter is a rename. The loss sits just before GPT, whose forward ends with it. Sizes and costs from a config
alone (parameter counts, FLOPs, the memory estimate) are in sizing.py, the choice of device and dtype in devices.py.
This file imports nothing of ours; of torch.distributed only DTensor, lazily, to initialise a sharded model.
"""
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import AuxRequest, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint


@dataclass
class GPTConfig:
    vocab_size: int = 201088  # o200k_harmony padded, as in gpt-oss
    block_size: int = 1024  # training context
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12  # query heads
    n_kv_head: int = 4  # key/value heads (grouped-query attention)
    head_dim: int = 64
    n_expert: int = 8
    experts_per_token: int = 2
    intermediate_size: int = 768  # hidden width of one expert
    sliding_window: int = 128
    attn_pattern: str = "SF"  # per layer, repeated: S = sliding window, F = full causal
    sinks: bool = True  # learned per-head attention sink logits
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 1.0  # YaRN factor; 1.0 = plain RoPE
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    initial_context_length: int = 4096  # the context YaRN stretches from
    rope_truncate: bool = False  # YaRN: round the correction range to whole dimensions (HF's default; gpt-oss's is False)
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # LoRA (fine-tuning): rank-r updates beside frozen weights; 0 = none. targets: any of q, k, v, o (attention
    # projections), experts (per-expert updates of the stacked gate_up_proj and down_proj), router
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q,k,v,o,experts"
    # Mixture-of-Recursions (Bae et al. 2025): the n_layer applied layers come from fewer unique blocks, a shared
    # stack run n_recursion times. sharing: cycle (blocks 0..k-1, n_recursion times), sequence (each block
    # n_recursion times in a row), middle_cycle / middle_sequence (the first and last layers unshared).
    # mor_router: none (every token takes every recursion) | expert (each recursion step's router keeps the top
    # tokens of the sequence: capacity = a share of T per step, () = (n_recursion - r) / n_recursion; gate
    # mor_alpha * sigmoid(logit); eval and generation decide by sigmoid > 0.5 instead, causally) | token (one
    # router picks each token's depth as it enters, softmax over n_recursion; the same in training and eval)
    n_recursion: int = 1
    recursion_sharing: str = "middle_cycle"
    mor_router: str = "none"
    mor_capacity: tuple = ()
    mor_alpha: float = 0.1

    def schedule(self):
        """The unique block each applied layer runs, in order, and (first, shared, last) counts of the plan."""
        L, N, how = self.n_layer, self.n_recursion, self.recursion_sharing
        if N == 1:
            return list(range(L)), (0, L, 0)
        outer = 1 if how.startswith("middle_") else 0
        if how.removeprefix("middle_") not in ("cycle", "sequence") or (L - 2 * outer) % N or L - 2 * outer < N:
            raise ValueError(f"recursion_sharing {how!r} with n_layer {L}, n_recursion {N}: use cycle, sequence, middle_cycle "
                             f"or middle_sequence, with n_layer{' - 2' if outer else ''} a multiple of n_recursion")
        m = (L - 2 * outer) // N
        inner = [outer + j for j in range(m)]
        shared = inner * N if how.endswith("cycle") else [i for i in inner for _ in range(N)]
        return [0] * outer + shared + [outer + m] * outer, (outer, m, outer)

    def n_blocks(self):
        """Unique blocks: n_layer, fewer when recursion shares them."""
        return max(self.schedule()[0]) + 1

    def check_recursion(self):
        """ValueError, one line, for recursion settings that cannot run."""
        self.schedule()
        if self.mor_router not in ("none", "expert", "token"):
            raise ValueError(f"mor_router {self.mor_router!r} is not one of none, expert, token")
        if self.mor_router != "none" and (self.recursion_sharing.endswith("sequence") or self.n_recursion < 2):
            raise ValueError(f"mor_router {self.mor_router} routes whole recursions: it needs n_recursion >= 2 and cycle or "
                             "middle_cycle sharing")
        if self.mor_router == "token" and self.mor_capacity:
            raise ValueError("mor_capacity is for mor_router expert: token-choice routers pick each token's depth themselves")
        self.capacities()

    def capacities(self):
        """Share of the sequence each recursion step keeps: expert-choice's capacities; for token-choice, the even
        split of depths that its balancing loss aims at."""
        N = self.n_recursion
        caps = (self.mor_router == "expert" and [float(c) for c in self.mor_capacity]) or [(N - r) / N for r in range(N)]
        if len(caps) != N or any(not 0 < c <= 1 for c in caps) or caps != sorted(caps, reverse=True):
            raise ValueError(f"mor_capacity {tuple(self.mor_capacity)}: {N} shares in (0, 1], none larger than the one before")
        return caps

    def lora_on(self, target):
        return self.lora_rank > 0 and target in self.lora_targets.split(",")

    def layer_is_sliding(self, i):
        return self.attn_pattern[i % len(self.attn_pattern)] == "S"

    def rope_reach(self):
        """The longest context the RoPE settings cover: YaRN stretches the original context by its factor."""
        if self.rope_scaling_factor > 1.0:
            return int(self.initial_context_length * self.rope_scaling_factor)
        return self.block_size

    @classmethod
    def from_dict(cls, d):
        """The model settings among any settings (a script's config, a checkpoint's config.json); the rest is ignored."""
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics: bf16 squares lose too much precision
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rope_tables(cfg, seq_len, device=None):
    """cos/sin of shape [seq_len, head_dim/2]. With rope_scaling_factor > 1 this is YaRN as gpt-oss does it:
    low frequencies are interpolated, high ones kept, a linear ramp between, and the result scaled by a
    'concentration' that keeps attention logits as sharp as at the original length."""
    half = cfg.head_dim // 2
    freq = cfg.rope_theta ** (torch.arange(0, half, dtype=torch.float32, device=device) / half)
    concentration = 1.0
    inv_freq = 1.0 / freq
    if cfg.rope_scaling_factor > 1.0:
        concentration = 0.1 * math.log(cfg.rope_scaling_factor) + 1.0
        ctx, base = cfg.initial_context_length, cfg.rope_theta
        low = half * math.log(ctx / (cfg.rope_ntk_beta * 2 * math.pi)) / math.log(base)
        high = half * math.log(ctx / (cfg.rope_ntk_alpha * 2 * math.pi)) / math.log(base)
        if cfg.rope_truncate:
            low, high = math.floor(low), math.ceil(high)
        # clamped to real dimensions as HF and gpt-oss do (a short initial context would put low below 0)
        low, high = max(low, 0.0), min(high, 2 * half - 1.0)
        high = high if high > low else low + 0.001
        ramp = (torch.arange(half, dtype=torch.float32, device=device) - low) / (high - low)
        keep = 1 - ramp.clamp(0, 1)  # 1 where a frequency is high enough to extrapolate
        inv_freq = inv_freq / cfg.rope_scaling_factor * (1 - keep) + inv_freq * keep
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return angles.cos() * concentration, angles.sin() * concentration


def rotate(x, cos, sin):
    """Each position's pairs (x1[i], x2[i]) turned by its angle; halves, not interleaved pairs: the layout of
    gpt-oss and HF. Written into one output, four kernels, no temporaries (autograd's version takes twelve)."""
    if torch.compiler.is_compiling():  # out= into views is not traceable; inductor fuses this into one kernel anyway
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    out = torch.empty_like(x)
    (x1, x2), (o1, o2) = x.chunk(2, dim=-1), out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1).addcmul_(x2, sin, value=-1.0)
    torch.mul(x2, cos, out=o2).addcmul_(x1, sin)
    return out


class Rope(torch.autograd.Function):
    """A rotation's gradient is the rotation back: nothing kept but the angles."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, g):
        cos, sin = ctx.saved_tensors
        return rotate(g, cos, -sin), None, None


def apply_rope(x, cos, sin):
    """x [..., T, heads, D] or [..., T, D] with cos, sin broadcastable to its halves; bf16 / fp16 turn in fp32."""
    return Rope.apply(x if x.element_size() >= 4 else x.float(), cos, sin).to(x.dtype)


def attention(q, k, v, sinks, window, mask=None):
    """Causal softmax attention, optional window, per-head sinks: SDPA's fused kernels (compiled CUDA: flex_attention_sinks).
    q: [B, T, H, D]; k, v: [B, S, Hkv, D], H a multiple of Hkv (GQA: SDPA's enable_gqa shares each kv head, no
    copies); sinks: [H] or None; window: int or None. Returns [B, T, H, D]. The [B, T, heads, D] layout is the
    projections' own: SDPA reads its transpose as a strided view (one token against the KV cache: generate.py).
    A sink is an extra logit in the softmax that takes probability mass and adds no value. SDPA has no such
    input, so it becomes a real key: it holds a 1 in an extra channel where real keys hold 0, and each query
    holds its head's sink / scale there, so their product is the sink logit; its value is zero. One sink key
    serves all heads, so GQA still holds. Channels are padded to a multiple of 8, the same for q, k and v (the
    CPU kernel falls back to a 10x slower path otherwise). Sliding layers run block-local (sliding_attention).
    mask [B, T, S] (True = seen) replaces causality and window: the masked path, for tokens gathered out of order
    of their positions or partly inactive (Mixture-of-Recursions)."""
    B, T, H, D = q.shape
    scale = 1.0 / math.sqrt(D)
    gqa = k.shape[2] != H
    if mask is None and k.shape[1] == T and q.is_cuda and torch.compiler.is_compiling():
        return flex_attention_sinks(q, k, v, sinks, window, scale, gqa)  # FlexAttention is fast only compiled
    if mask is None and window is not None and window < T:
        return sliding_attention(q, k, v, sinks, window, scale)
    causal = mask is None  # a given mask [B, T, S] says who sees whom instead (MoR: positions, active keys)
    if sinks is None:
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                           attn_mask=None if mask is None else mask[:, None], scale=scale, enable_gqa=gqa)
        return y.transpose(1, 2)
    lead = 1 if causal else 0  # a dummy query row first, so that is_causal lines up: query i+1 sees the sink and 0..i
    if mask is not None:
        mask = torch.cat([mask.new_ones(B, T, 1), mask], dim=-1)[:, None]  # the sink is seen by all
    qs = padded(q, T + lead, lead, sinks / scale)
    ks, vs = padded(k, k.shape[1] + 1, 1, "key"), padded(v, v.shape[1] + 1, 1)  # the sink key and its zero value first
    y = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), is_causal=causal,
                                       attn_mask=mask, scale=scale, enable_gqa=gqa)
    return y.transpose(1, 2)[:, lead:, :, :D]


_flex_masks = {}  # FlexAttention's block masks by (T, window, device): see flex_attention_sinks


def flex_attention_sinks(q, k, v, sinks, window, scale, gqa):
    """attention() on FlexAttention, taken on CUDA when compiled: key blocks outside the window are skipped whole (a
    sliding layer costs its window, not T); full layers too, as torchtitan's gpt-oss (models/gpt_oss/model/model.py).
    Sinks via the lse: softmax([s, sink])[:-1] = softmax(s) * sigmoid(lse - sink). A shape's first compiled call builds
    its mask in-graph and keeps it; the next recompiles once to read it: once per shape. Shapes as attention()'s."""
    T, key = q.shape[1], (q.shape[1], window, str(q.device))
    if key not in _flex_masks:
        if len(_flex_masks) >= 8:  # a run meets a few shapes (training, eval, a prefill); past 8 the oldest goes
            del _flex_masks[next(iter(_flex_masks))]
        _flex_masks[key] = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < (window or T)), None, None, T, T,
                                             device=q.device)
    y, aux = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=_flex_masks[key],
                            scale=scale, enable_gqa=gqa, return_aux=AuxRequest(lse=True))
    y = y if sinks is None else (y * torch.sigmoid(aux.lse - sinks[:, None]).unsqueeze(-1)).to(y.dtype)  # grads via lse
    return y.transpose(1, 2)


def padded(x, length, at, sink=None):
    """x [B, T, heads, D] copied into zeros [B, length, heads, D'] from row `at`, D' = D + 1 rounded up to 8.
    sink: for queries, their heads' sink / scale [heads], put in channel D; "key": row 0 is the sink key."""
    B, T, Hx, D = x.shape
    out = x.new_zeros(B, length, Hx, -(-(D + 1) // 8) * 8)
    out[:, at:at + T, :, :D] = x
    if isinstance(sink, str):
        out[:, 0, :, D] = 1.0
    elif sink is not None:
        out[:, at:at + T, :, D] = sink.to(x.dtype)
    return out


def sliding_attention(q, k, v, sinks, window, scale):
    """Queries in blocks of `window`; each block sees its own keys and those of the block before (2 x window
    keys, plus the sink) under a mask that keeps 0 <= i - j < window: T x 2 x window scores, where one [T, T]
    mask costs T x T and pushes SDPA off its fused kernel. The blocks fold into SDPA's batch dimension (4-D:
    a 5-D input takes the unfused path)."""
    B, T, H, D = q.shape
    Hk, W = k.shape[2], window
    n = -(-T // W)  # blocks; the last is padded, and no real query sees the padding (causal)
    if sinks is None:
        qs = F.pad(q, (0, 0, 0, 0, 0, n * W - T))
        kp, vp = (F.pad(x, (0, 0, 0, 0, W, n * W - T)) for x in (k, v))  # a block of zeros before the first
    else:
        qs = padded(q, n * W, 0, sinks / scale)
        kp, vp = padded(k, (n + 1) * W, W), padded(v, (n + 1) * W, W)
    Dp = qs.shape[-1]
    kb, vb = (x.unfold(1, 2 * W, W).transpose(-1, -2) for x in (kp, vp))  # views [B, n, Hk, 2W, D']: previous + own
    if sinks is not None:
        sink_k = kp.new_zeros(B, n, Hk, 1, Dp)
        sink_k[..., D] = 1.0
        kb, vb = torch.cat([kb, sink_k], dim=3), torch.cat([vb, torch.zeros_like(sink_k)], dim=3)
    kb, vb = kb.reshape(B * n, Hk, -1, Dp), vb.reshape(B * n, Hk, -1, Dp)
    y = F.scaled_dot_product_attention(qs.view(B * n, W, H, Dp).transpose(1, 2), kb, vb, scale=scale, enable_gqa=H != Hk,
                                       attn_mask=block_mask(B, n, W, sinks is not None, q.device))
    return y.transpose(1, 2).reshape(B, n * W, H, Dp)[:, :T, :, :D]


# block_mask's masks by shape: building one took 28 ms at 1 x 4096 on a 2-core CPU, a tenth of that sliding
# attention's forward and backward. A run meets a few shapes (training, eval, the sample); past 8 the oldest goes.
_masks = {}


def block_mask(B, n, window, has_sink, device):
    """[B x n, 1, window, 2 x window (+1)]: query i of a block sees key j of (previous block, own block) when
    0 <= window + i - j < window; block 0 has no previous block; the sink (last column) is seen by all."""
    compiling = torch.compiler.is_compiling()  # then the mask is built in the graph: a lookup here would be a guard
    key = None if compiling else (B, n, window, has_sink, str(device))  # on the cache, a recompile for each new entry
    if key in _masks:
        return _masks[key]
    i, j = torch.arange(window, device=device), torch.arange(2 * window, device=device)
    d = window + i[:, None] - j[None, :]
    m = ((d >= 0) & (d < window)).expand(n, window, 2 * window).clone()
    m[0, :, :window] = False
    if has_sink:
        m = torch.cat([m, m.new_ones(n, window, 1)], dim=-1)
    m = m.repeat(B, 1, 1).unsqueeze(1)
    if not compiling:
        if len(_masks) >= 8:  # a few shapes per run (training, eval, the sample); bounded all the same
            del _masks[next(iter(_masks))]
        _masks[key] = m
    return m


class FrozenMatmul(torch.autograd.Function):
    """mm(x, w) for a frozen w stored in a narrower dtype than x (train.py's base_dtype, fp32 compute): w is cast
    for the product and again in the backward, so no full-precision copy of it waits in between. mm_t(g, w) is
    the product with w transposed: x's gradient, the only one."""

    @staticmethod
    def forward(ctx, x, w, mm, mm_t):
        ctx.save_for_backward(w)
        ctx.mm_t = mm_t
        return mm(x, w.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        (w,) = ctx.saved_tensors
        return ctx.mm_t(g, w.to(g.dtype)), None, None, None


def cast_on_use(x, w):
    """True where w must be cast to x's dtype by FrozenMatmul (autocast casts both to its own dtype itself)."""
    return w.dtype != x.dtype and not w.requires_grad and not torch.is_autocast_enabled(x.device.type)


class LoRALinear(nn.Linear):
    """nn.Linear with an optional rank-r update (loralib's idea): y = x W^T + b + (x A^T B^T) * alpha / r. B starts
    at zero, so a fresh adapter changes nothing; training moves only A and B; merge() folds them into W."""

    def __init__(self, d_in, d_out, rank=0, alpha=16.0):
        super().__init__(d_in, d_out, bias=True)
        self.scaling = alpha / rank if rank else 0.0
        self.lora_A = nn.Parameter(torch.empty(rank, d_in)) if rank else None
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank)) if rank else None

    def forward(self, x):
        if cast_on_use(x, self.weight):  # a frozen base in bf16
            y = FrozenMatmul.apply(x, self.weight, F.linear, torch.matmul) + self.bias.to(x.dtype)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora_A is not None:
            y = y + F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype)) * self.scaling
        return y

    @torch.no_grad()
    def merge(self):
        if self.lora_A is not None:
            self.weight += (self.lora_B.float() @ self.lora_A.float() * self.scaling).to(self.weight.dtype)
            self.lora_A = self.lora_B = None


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.window = cfg.sliding_window if cfg.layer_is_sliding(layer_idx) else None
        lora = lambda t: (cfg.lora_rank if cfg.lora_on(t) else 0, cfg.lora_alpha)
        self.q_proj = LoRALinear(cfg.n_embd, cfg.n_head * cfg.head_dim, *lora("q"))
        self.k_proj = LoRALinear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, *lora("k"))
        self.v_proj = LoRALinear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, *lora("v"))
        self.o_proj = LoRALinear(cfg.n_head * cfg.head_dim, cfg.n_embd, *lora("o"))
        self.sinks = nn.Parameter(torch.zeros(cfg.n_head)) if cfg.sinks else None

    def forward(self, x, cos, sin, cache=None, pos=None, active=None):
        """pos [B, T]: the positions of tokens gathered from a longer sequence (sorted), which set causality and
        the window; active [B, T]: which tokens are keys at this depth (the others' outputs are discarded); cache:
        this layer's generate.KVCache, which keeps the keys and values after RoPE (a prompt, then one token at a time)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # [(B,) T, 1, D/2]: one rotation per position, for every head
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None and T == 1:  # a one-token step of generation: attention over the whole static cache
            return self.o_proj(cache.step(q, k, v, active, self.sinks).reshape(B, T, self.n_head * self.head_dim))
        if cache is not None:  # the prefill: the cache keeps the prompt's keys and values
            cache.prefill(k, v, active)
        mask = None
        if pos is not None:
            d = pos[:, :, None] - pos[:, None, :]
            mask = (d >= 0) & (d < self.window) if self.window else d >= 0
        elif active is not None:  # keys still active at this depth; every query sees itself (so no row is empty)
            i, j = torch.arange(T, device=x.device)[:, None], torch.arange(T, device=x.device)[None, :]
            near = (i >= j) & ((i - j < self.window) if self.window else True)
            mask = (near & active[:, None, :]) | (i == j)
        y = attention(q, k, v, self.sinks, self.window, mask=mask)
        return self.o_proj(y.reshape(B, T, self.n_head * self.head_dim))


def swiglu(h, alpha, limit):
    """gpt-oss's clamped SwiGLU. Gate and linear halves are interleaved in the last dim (HF layout)."""
    gate, lin = h[..., ::2], h[..., 1::2]
    gate = gate.clamp(max=limit)
    lin = lin.clamp(-limit, limit)
    return gate * torch.sigmoid(alpha * gate) * (lin + 1)


def use_grouped_mm(x):
    """torch._grouped_mm runs the experts in one kernel on CPU and on CUDA in bf16; elsewhere (MPS, fp32 CUDA)
    a loop over experts does."""
    return x.device.type == "cpu" or (x.device.type == "cuda" and x.dtype == torch.bfloat16)


def grouped_mm(x, w, offs, ends=None):
    """Rows of x are grouped by expert (group e ends at offs[e]); returns x[group e] @ w[e] for every e.
    The loop needs the group ends on the host (`ends`, a list: one device sync, made once per layer)."""
    if ends is None:
        return torch._grouped_mm(x, w, offs=offs)
    starts = [0] + ends[:-1]
    return torch.cat([x[s:e] @ w[i] for i, (s, e) in enumerate(zip(starts, ends))])


class Experts(nn.Module):
    """All experts of one layer as stacked 3-D parameters (FSDP shards them like any tensor, and ranks
    never disagree about which modules ran)."""

    def __init__(self, cfg):
        super().__init__()
        E, d, I = cfg.n_expert, cfg.n_embd, cfg.intermediate_size
        self.alpha, self.limit = cfg.swiglu_alpha, cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, d, 2 * I))
        self.gate_up_proj_bias = nn.Parameter(torch.zeros(E, 2 * I))
        self.down_proj = nn.Parameter(torch.empty(E, I, d))
        self.down_proj_bias = nn.Parameter(torch.zeros(E, d))
        # LoRA per expert: [E, in, r] and [E, r, out], the same grouped matmuls as the weights (r a multiple of 8)
        r = cfg.lora_rank if cfg.lora_on("experts") else 0
        self.scaling = cfg.lora_alpha / r if r else 0.0
        self.gate_up_lora_A = nn.Parameter(torch.empty(E, d, r)) if r else None
        self.gate_up_lora_B = nn.Parameter(torch.zeros(E, r, 2 * I)) if r else None
        self.down_lora_A = nn.Parameter(torch.empty(E, I, r)) if r else None
        self.down_lora_B = nn.Parameter(torch.zeros(E, r, d)) if r else None

    def project(self, x, name, offs, ends, dt):
        """x @ W[e] per expert group, plus the adapter's (x @ A[e]) @ B[e] * scaling when there is one."""
        W = getattr(self, name)
        if W.dtype != dt and not W.requires_grad:  # a frozen base in bf16, fp32 compute
            mm = lambda a, w: grouped_mm(a, w, offs, ends)
            y = FrozenMatmul.apply(x, W, mm, lambda g, w: grouped_mm(g, w.transpose(-1, -2), offs, ends))
        else:
            y = grouped_mm(x, W.to(dt), offs, ends)
        A = getattr(self, name.removesuffix("_proj") + "_lora_A")
        if A is not None:
            B = getattr(self, name.removesuffix("_proj") + "_lora_B")
            y = y + grouped_mm(grouped_mm(x, A.to(dt), offs, ends), B.to(dt), offs, ends) * self.scaling
        return y

    @torch.no_grad()
    def merge(self):
        if self.gate_up_lora_A is not None:
            for name in ("gate_up", "down"):
                W, A, B = getattr(self, name + "_proj"), getattr(self, name + "_lora_A"), getattr(self, name + "_lora_B")
                W += (A.float() @ B.float() * self.scaling).to(W.dtype)
                setattr(self, name + "_lora_A", None)
                setattr(self, name + "_lora_B", None)

    def forward(self, x, expert_of_row, offs):
        """x: [R, d] rows sorted by expert; expert_of_row: [R]; offs: int32 [E] group ends."""
        dt = x.dtype
        if torch.is_autocast_enabled(x.device.type):  # autocast does not cover grouped_mm
            dt = torch.get_autocast_dtype(x.device.type)
        x = x.to(dt)
        if torch.compiler.is_compiling() and not (x.is_cuda and use_grouped_mm(x)):
            # left out of the graph, run eagerly: the loop needs the group sizes on the host (in a graph, a guard on
            # each size would recompile it every step), and the CPU kernel's fake-tensor rule fails (torch 2.13)
            return torch.compiler.disable(self.forward)(x, expert_of_row, offs)
        ends = None if use_grouped_mm(x) else offs.tolist()
        # per-row biases via F.embedding: its backward is deterministic, that of bias[expert_of_row] is not on CPU
        h = self.project(x, "gate_up_proj", offs, ends, dt) + F.embedding(expert_of_row, self.gate_up_proj_bias.to(dt))
        h = swiglu(h, self.alpha, self.limit)
        return self.project(h, "down_proj", offs, ends, dt) + F.embedding(expert_of_row, self.down_proj_bias.to(dt))


class MoE(nn.Module):
    """Top-k routing with softmax over the k chosen logits; dropless: every token reaches its k experts.
    Tokens are sorted by expert and run through grouped matmuls, never through all experts."""

    def __init__(self, cfg):
        super().__init__()
        self.n_expert, self.k = cfg.n_expert, cfg.experts_per_token
        self.router = LoRALinear(cfg.n_embd, cfg.n_expert, cfg.lora_rank if cfg.lora_on("router") else 0, cfg.lora_alpha)
        self.experts = Experts(cfg)

    def forward(self, x, keep=None):
        """keep [B, T] (Mixture-of-Recursions): the tokens whose routing counts in the balance losses and loads;
        the rest (padding, tokens past their depth) are computed and their outputs thrown away."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.n_expert, self.k
        logits = self.router(x).float()
        top_logits, top_idx = logits.topk(k, dim=-1)
        weights = top_logits.softmax(dim=-1)
        flat_expert = top_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        counts = torch.zeros(E, device=x.device, dtype=torch.float32).scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.float32))
        offs = counts.cumsum(0).to(torch.int32)  # no host sync: sizes stay on the device
        # each token repeated k times, then permuted into expert order: a gather with unique indices, whose
        # backward is deterministic (x[order // k] repeats indices and its backward is not, on CPU)
        rows = x.unsqueeze(1).expand(N, k, x.shape[-1]).reshape(N * k, -1)[order]
        y = self.experts(rows, flat_expert[order], offs)
        # undo the sort, then mix each token's k outputs (a gather, deterministic, unlike index_add)
        y = y[order.argsort()].view(N, k, -1)
        out = (y * weights.unsqueeze(-1).to(y.dtype)).sum(dim=1)
        # load balancing: f = share of assignments per expert (sums to 1), P = mean router probability
        probs, zz = logits.softmax(dim=-1), torch.logsumexp(logits, dim=-1).square()
        if keep is None:
            f, P, z = counts / (N * k), probs.mean(dim=0), zz.mean()
        else:
            w = keep.reshape(-1).float()
            counts = torch.zeros_like(counts).scatter_add_(0, flat_expert, w.repeat_interleave(k))
            n = w.sum().clamp(min=1)
            f, P, z = counts / (n * k), (probs * w[:, None]).sum(dim=0) / n, (zz * w).sum() / n
        aux = E * (f * P).sum()  # 1.0 when balanced, E when every token picks the same expert
        return out.to(x.dtype).view(shape), aux, z, counts.detach()


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MoE(cfg)

    def forward(self, x, cos, sin, cache=None, pos=None, active=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos, active)
        h, aux, z, load = self.mlp(self.post_attention_layernorm(x), active)
        return x + h, aux, z, load


# The loss, beside the forward that computes it: the LM cross-entropy over the head's logits.

class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ head.T against targets, `chunk` rows at a time, with its gradients computed
    in the forward (softmax minus one-hot is the gradient of the logits): the [tokens, vocab] logits never
    exist whole and nothing is recomputed. On CPU this is also faster: small chunks reuse the same memory,
    where whole logits are fresh pages every step (measured: the log-softmax and its backward were 17% of
    a mac_micro step, most of it page faults)."""

    @staticmethod
    def forward(ctx, x, head, targets, chunk):
        n = (targets != -1).sum().clamp(min=1)
        loss = torch.zeros((), device=x.device, dtype=torch.float32)
        grad_x = torch.empty_like(x)
        # a frozen head (a LoRA fine-tune) needs no gradient: not the [vocab, width] fp32 buffer, nor its matmuls
        grad_head = torch.zeros(head.shape, device=head.device, dtype=torch.float32) if ctx.needs_input_grad[1] else None
        for i in range(0, len(x), chunk):
            xs, ts = x[i:i + chunk], targets[i:i + chunk]
            logits = F.linear(xs, head).float()
            lse = torch.logsumexp(logits, dim=-1)
            valid = ts != -1
            picked = logits.gather(1, ts.clamp(min=0)[:, None]).squeeze(1)
            loss += ((lse - picked) * valid).sum()
            probs = logits.sub_(lse[:, None]).exp_()  # in place: the logits are not needed again
            probs[torch.arange(len(ts), device=ts.device), ts.clamp(min=0)] -= 1.0
            probs *= valid[:, None]
            g = probs.to(xs.dtype)
            grad_x[i:i + chunk] = g @ head.to(g.dtype)
            if grad_head is not None:
                grad_head += (g.t() @ xs).float()
        ctx.save_for_backward(grad_x, grad_head, n)
        ctx.head_dtype = head.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_head, n = ctx.saved_tensors
        scale = grad_loss / n
        return grad_x * scale.to(grad_x.dtype), None if grad_head is None else (grad_head * scale).to(ctx.head_dtype), None, None


def chunked_cross_entropy(x, head, targets, chunk, stats=None):
    """Mean next-token loss `chunk` rows at a time: fused with its gradient when training, plain without (and
    then, into stats, how many of the scored tokens the model's top guess got right: token accuracy)."""
    x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled():
        return LinearCrossEntropy.apply(x, head, targets, chunk)
    total, correct = 0.0, 0
    for i in range(0, len(targets), chunk):
        logits, t = F.linear(x[i:i + chunk], head).float(), targets[i:i + chunk]
        total = total + F.cross_entropy(logits, t, ignore_index=-1, reduction="sum")
        correct = correct + (logits.argmax(-1) == t).sum()  # t = -1 never matches
    scored = (targets != -1).sum()
    if stats is not None:
        stats["correct"], stats["scored"] = correct, scored
    return total / scored.clamp(min=1)


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()  # the settings' ranges (n_head a multiple of n_kv_head, ...) are checked before: configurator.RULES
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.plan, (self.n_first, self.n_shared, _) = cfg.schedule()  # the unique block of each applied layer
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_blocks()))
        # recursion routers: expert-choice, one logit per token per recursion step (row r of the weight);
        # token-choice, one logit per depth
        self.mor_router = nn.Linear(cfg.n_embd, cfg.n_recursion, bias=False) if cfg.mor_router != "none" else None
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        # tied: the head reads embed_tokens.weight directly, so there is one parameter, not two sharing a
        # tensor (to_empty() and FSDP would quietly untie those)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg, cfg.block_size)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # a training-time memory saver, not architecture (train.py sets it once, as the model is built): recompute
        # each block in the backward instead of keeping its activations
        self.activation_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """GPT-2 style: N(0, 0.02), biases and sinks 0, norms 1, projections into the residual scaled by 1/sqrt(2 * n_layer).
        Each parameter's full values are drawn on the CPU, in a fixed order, from the global RNG, then
        copied in: the same numbers on any device, after to_empty() from the meta device, or sharded over
        any number of ranks (a DTensor keeps its own shard), so runs on 1 and on 8 GPUs start alike."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.is_meta:
                continue
            full = torch.empty(p.shape)
            if "lora_B" in name:  # zero: a fresh adapter leaves the model as it was
                full.zero_()
            elif "lora_A" in name:  # [r, in] or per expert [E, in, r]: N(0, 1/fan_in)
                full.normal_(0.0, 1.0 / math.sqrt(p.shape[-1] if p.dim() == 2 else p.shape[-2]))
            elif p.dim() >= 2 and not name.endswith("bias"):  # expert biases are 2-D, yet biases: they start at 0
                resid = name.endswith(("o_proj.weight", "down_proj"))
                full.normal_(0.0, std / math.sqrt(2 * self.cfg.n_layer) if resid else std)
            else:
                full.fill_(1.0 if name.endswith("norm.weight") else 0.0)
            if hasattr(p, "device_mesh"):  # an FSDP shard: keep this rank's slice, no communication
                from torch.distributed.tensor import distribute_tensor

                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(full)
        if self.rope_cos.device.type != "meta":  # recompute: to_empty() leaves buffers uninitialised
            self.rope_cos, self.rope_sin = rope_tables(self.cfg, self.cfg.block_size, self.rope_cos.device)

    def forward(self, idx, targets=None, cache=None, pos=0, loss_chunk=0, mor_topk=None):
        """Returns (logits, loss, stats). loss is the LM cross-entropy alone; stats holds the router's
        raw aux and z losses (means over layers) and the per-layer expert counts [n_layer, n_expert],
        so the caller chooses the coefficients and logs the raw values. Generation passes a cache (generate.KVCache
        per applied layer) and idx's first position (an int, or [T] positions). loss_chunk: the loss this many tokens at
        a time, fused with its gradient when training, so the [tokens, vocab] logits never exist whole (0 = all at
        once; logits are then returned, else None). mor_topk (expert-choice recursion): None, top-k over the
        sequence while training and the causal threshold otherwise; True / False force one."""
        B, T = idx.shape
        assert cache is not None or T <= self.cfg.block_size, f"sequence of {T} tokens is longer than block_size {self.cfg.block_size}"
        if torch.is_tensor(pos):  # [T] on the device (generate.decode_step): one graph for every position, no host sync
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]
        else:
            assert pos + T <= len(self.rope_cos), f"position {pos + T} is past the RoPE tables ({len(self.rope_cos)})"
            cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.embed_tokens(idx)
        if self.mor_router is None:
            x, per_layer = self.run_layers(range(len(self.plan)), x, cos, sin, cache)
            stats = {}
        else:  # the unshared first layers, the routed recursion steps, the unshared last ones
            x, first = self.run_layers(range(self.n_first), x, cos, sin, cache)
            if self.cfg.mor_router == "token":
                x, shared, stats = self.token_recursions(x, cos, sin, cache)
            else:
                x, shared, stats = self.expert_recursions(x, cos, sin, cache, self.training if mor_topk is None else mor_topk)
            x, last = self.run_layers(range(self.n_first + self.n_shared * self.cfg.n_recursion, len(self.plan)), x, cos, sin, cache)
            per_layer = first + shared + last
        x = self.norm(x)
        aux, z, load = (torch.stack(t) for t in zip(*per_layer))
        stats.update({"aux": aux.mean(), "z": z.mean(), "load": load})
        head = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x[:, [-1], :], head), None, stats  # generation needs the last position only
        if loss_chunk:
            return None, chunked_cross_entropy(x, head, targets, loss_chunk, stats), stats
        logits = F.linear(x, head)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss, stats

    def run_layers(self, layers, x, cos, sin, cache=None, where=None, active=None):
        """The applied layers `layers` in order (each runs its unique block) on x: the whole sequence, or tokens
        gathered from it at positions `where`, or the sequence with only `active` tokens as keys. Returns (x, the
        (aux, z, load) of each layer)."""
        stats = []
        for j in layers:
            block = self.layers[self.plan[j]]
            if where is not None and "forward" in vars(block):  # gathered tokens (MoR training) into a compiled block
                # (compile_blocks): their count changes with the recursion step and, for token-choice, every step. Marked
                # dynamic, so that the block takes any count with no recompile (and ranks never recompile at different steps).
                for t in (x, cos, sin, where, active):
                    if t is not None:
                        torch._dynamo.maybe_mark_dynamic(t, 1)
            if self.activation_checkpointing and torch.is_grad_enabled():
                x, *s = checkpoint(block, x, cos, sin, None, where, active, use_reentrant=False)
            else:
                x, *s = block(x, cos, sin, None if cache is None else cache[j], where, active)
            stats.append(s)
        return x, stats

    def expert_recursions(self, x, cos, sin, cache, topk):
        """Expert-choice Mixture-of-Recursions over the shared layers. Step r's router scores the tokens still in;
        gate g = mor_alpha * sigmoid(logit). Training: the top capacity_r x T of them by g go on (hierarchical:
        only those of step r-1 are candidates), gathered and run alone at their own positions (compute falls with
        capacity), and become H + g * f(H); the others keep H. A BCE loss teaches each router to say "top-k" by
        itself (mor_aux). topk False (eval and generation): a token goes on while sigmoid(logit) > 0.5, causally
        (top-k over a sequence would read its future); every token is computed, only those going on are keys.
        Returns (x, the (aux, z, load) of each layer run, {mor_aux, mor_share})."""
        B, T, d = x.shape
        caps, W, alpha, m = self.cfg.capacities(), self.mor_router.weight, self.cfg.mor_alpha, self.n_shared
        first = self.n_first
        bce, share, per_layer = [], [], []
        if topk:
            cand = torch.arange(T, device=x.device).expand(B, T)
            for r, cap in enumerate(caps):
                xc = x.gather(1, cand[..., None].expand(-1, -1, d))
                logit = F.linear(xc, W[r:r + 1]).squeeze(-1).float()
                k = max(1, int(cap * T))
                top = logit.topk(k, dim=1).indices.sort(dim=1).values  # sigmoid is monotonic: the top g; kept in order
                bce.append(F.binary_cross_entropy_with_logits(logit, torch.zeros_like(logit).scatter(1, top, 1.0)))
                where = cand.gather(1, top)  # positions in the sequence
                h = xc.gather(1, top[..., None].expand(-1, -1, d))
                out, s = self.run_layers(range(first + r * m, first + (r + 1) * m), h, cos[where], sin[where], cache, where)
                per_layer += s
                g = alpha * torch.sigmoid(logit.gather(1, top))
                x = x.scatter(1, where[..., None].expand(-1, -1, d), h + g[..., None].to(h.dtype) * out)
                cand = where
                share.append(k / T)
        else:
            active = None  # all tokens, until a step with capacity below 1 lets its router decide
            for r, cap in enumerate(caps):
                logit = F.linear(x, W[r:r + 1]).squeeze(-1).float()
                if cap < 1:
                    active = (logit > 0) if active is None else active & (logit > 0)
                out, s = self.run_layers(range(first + r * m, first + (r + 1) * m), x, cos, sin, cache, active=active)
                per_layer += s
                new = x + (alpha * torch.sigmoid(logit))[..., None].to(x.dtype) * out
                x = new if active is None else torch.where(active[..., None], new, x)
                share.append(1.0 if active is None else active.float().mean())
                if active is not None:
                    bce.append(F.binary_cross_entropy_with_logits(logit, active.float()))
        # share of tokens through each recursion step, on the device: no host sync per step
        share = torch.stack([torch.as_tensor(s, dtype=torch.float32, device=x.device) for s in share])
        return x, per_layer, {"mor_aux": torch.stack(bce).mean() if bce else x.new_zeros(()), "mor_share": share}

    def token_recursions(self, x, cos, sin, cache):
        """Token-choice Mixture-of-Recursions: the router reads each token as it enters the shared layers and picks
        its depth, 1..n_recursion, by softmax (p: the chosen depth's probability). A token runs that many steps and
        leaves as H + p * f^depth(H), f being the shared layers' whole output, as in the paper's code. The choice is
        the token's own, so training, eval and generation route alike (causal). Training gathers the tokens still
        going at each step, padded to the longest row with a zero state at position T (after every real position,
        so no real token sees it; the MoE leaves it out of its counts); eval and generation compute every
        token and keep only those going on as keys, the way the KV cache wants. Losses: the MoE balancing loss
        over depths (mor_aux, 1 when even) and the z-loss (mor_z). Returns (x, the (aux, z, load) of each layer run,
        {mor_aux, mor_z, mor_share})."""
        B, T, d = x.shape
        N, m, first = self.cfg.n_recursion, self.n_shared, self.n_first
        logits = self.mor_router(x).float()
        probs = logits.softmax(-1)
        p, depth = probs.max(-1)  # depth 0..N-1: the token takes recursion steps 0..depth
        h, share, per_layer = x, [], []
        for r in range(N):
            going = depth >= r
            share.append(going.float().mean())
            layers = range(first + r * m, first + (r + 1) * m)
            if r == 0:  # every token takes the first step: the whole sequence, on the contiguous kernels
                h, s = self.run_layers(layers, h, cos, sin, cache)
            elif self.training:
                i = torch.arange(T, device=x.device).expand(B, T)
                n = max(1, int(going.sum(1).max()))  # the longest row; the others padded
                where = torch.where(going, i, T + i).sort(1).values[:, :n].clamp(max=T)  # going first, in order; pads at T
                hp = torch.cat([h, h.new_zeros(B, 1, d)], dim=1)
                idx = where[..., None].expand(-1, -1, d)
                out, at = hp.gather(1, idx), where.clamp(max=T - 1)  # a pad's RoPE angle does not matter: no real token sees it
                # active: pads are not counted by the MoE (attention keeps them out by position)
                out, s = self.run_layers(layers, out, cos[at], sin[at], cache, where, where < T)
                h = hp.scatter(1, idx, out)[:, :T]
            else:
                out, s = self.run_layers(layers, h, cos, sin, cache, active=going)
                h = torch.where(going[..., None], out, h)
            per_layer += s
        frac = F.one_hot(depth, N).float().mean(dim=(0, 1))  # share of tokens at each depth
        return x + p[..., None].to(x.dtype) * h, per_layer, {"mor_aux": N * (frac * probs.mean(dim=(0, 1))).sum(),
                                                             "mor_z": torch.logsumexp(logits, dim=-1).square().mean(),
                                                             "mor_share": torch.stack(share)}

    def merge_lora(self):
        """Fold every adapter into its weights: a plain model (lora_rank 0) that sample.py and export_hf.py read."""
        for m in self.modules():
            if isinstance(m, (LoRALinear, Experts)):
                m.merge()
        self.cfg = replace(self.cfg, lora_rank=0)
        return self
