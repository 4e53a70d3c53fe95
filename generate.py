"""
Text from a model, one token at a time: the KV cache, the prefill and the one-token steps, and how the next token is
picked. Beside model.py as gpt-fast's generate.py is beside its model: the network stays the network.
The cache is static, as gpt-fast's: allocated once per generation at its full size, so that every one-token step has
the same shapes (what is compiled for the first token serves all of them; on CUDA, one CUDA graph) and nothing is
copied as the text grows.
"""
import codecs
import contextlib

import torch
import torch.nn.functional as F

from model import rope_tables


def decode_kernels(device):
    """The SDPA kernels a one-token step may use (KVCache.step). On CUDA not cuDNN's: it built a plan for every new key
    length, 7.7 ms of CPU per call and 67% of decoding's time (issue 23's profile, H200, before the cache was static);
    memory-efficient attention, else the math path, plan nothing. Elsewhere SDPA's own choice (the CPU's fused kernel)."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class KVCache:
    """One applied layer's keys and values after RoPE, allocated once, in the layout SDPA reads: k, v [B, n_kv_head,
    sink + slots, head_dim]. A full layer has a slot for every position of the generation; a sliding one only its
    window, as a ring buffer (position p in slot p % window: a key is overwritten when no query can see it any more).
    Slots fill in order, so at position p the slots up to p hold keys (all of a ring once p has gone round it); the rest
    are masked. With sinks, a zero key and value stand in front of the slots for the sink (step). active [B, slots], for
    Mixture-of-Recursions (a shared block's every use has its own cache): whether that token was a key at this depth.
    pos: the step's position, [1] on the device and shared by all layers, so that a step reads it with no host sync
    and no graph per position."""

    def __init__(self, B, slots, n_kv_head, head_dim, dtype, device, pos, routed, sinks):
        self.sink = int(sinks)
        self.k = torch.zeros(B, n_kv_head, self.sink + slots, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.keys, self.values = self.k[:, :, self.sink:], self.v[:, :, self.sink:]  # the slots
        self.ids = torch.arange(slots, device=device)  # slot numbers, to compare with pos
        self.active = torch.zeros(B, slots, dtype=torch.bool, device=device) if routed else None
        self.pos = pos
        for t in (self.k, self.v, self.active):
            if t is not None:  # written in place by a captured step: a CUDA graph may keep their addresses
                torch._dynamo.mark_static_address(t)

    def prefill(self, k, v, active=None):
        """Keeps the prompt's k, v [B, T, n_kv_head, head_dim], at positions 0..T-1 (a ring its last window of them),
        and active [B, T] or None."""
        T, slots = k.shape[1], len(self.ids)
        n = min(T, slots)
        where = torch.arange(T - n, T, device=k.device) % slots
        self.keys.index_copy_(2, where, k[:, T - n:].transpose(1, 2))
        self.values.index_copy_(2, where, v[:, T - n:].transpose(1, 2))
        if active is not None:
            self.active.index_copy_(1, where, active[:, T - n:])

    def step(self, q, k, v, active, sinks):
        """Attention of one token, q [B, 1, n_head, head_dim], over the whole cache once its own k, v [B, 1, n_kv_head,
        head_dim] (and active [B, 1]) are written at self.pos: the slots filled so far (a ring holds only its window),
        of these the keys active at this depth, and always its own. The same shapes at every position. Returns
        [B, 1, n_head, head_dim]."""
        B, _, H, D = q.shape
        Hkv = self.k.shape[1]
        slot = self.pos % len(self.ids)
        self.keys.index_copy_(2, slot, k.transpose(1, 2))
        self.values.index_copy_(2, slot, v.transpose(1, 2))
        seen = (self.ids <= self.pos)[None]
        if active is not None:
            self.active.index_copy_(1, slot, active)
            seen = (seen & self.active) | (self.ids == slot)
        bias = torch.where(seen, 0.0, float("-inf")).to(q.dtype)[:, None, None, :]
        if sinks is not None:  # an extra logit that takes probability mass and adds no value: a bias on the zero key
            bias = torch.cat([sinks.to(q.dtype).view(1, Hkv, H // Hkv, 1).expand(len(bias), -1, -1, 1),
                              bias.expand(-1, Hkv, H // Hkv, -1)], dim=-1)
        # one query per head: the heads that share a key/value head are its rows of queries, plain attention (SDPA's GQA
        # broadcast runs on none of CUDA's kernels once there is a mask: it would fall back to the math path)
        with decode_kernels(q.device):
            y = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D), self.k, self.v, attn_mask=bias)
        return y.view(B, 1, H, D)


def new_cache(model, B, length):
    """One KVCache per applied layer (a shared block keeps each use's keys) for B rows of up to `length` positions."""
    cfg, dev = model.cfg, model.rope_cos.device
    # the keys' dtype: autocast's when it is on, else the residual stream's (the embedding's)
    dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else model.embed_tokens.weight.dtype
    pos = torch.zeros(1, dtype=torch.long, device=dev)
    torch._dynamo.mark_static_address(pos)
    return [KVCache(B, min(length, cfg.sliding_window) if cfg.layer_is_sliding(i) else length, cfg.n_kv_head, cfg.head_dim,
                    dtype, dev, pos, model.mor_router is not None, cfg.sinks) for i in model.plan]


def prefill(model, ids, cache):
    """Logits [B, 1, vocab] after ids [B, T], which start the text at position 0 (what the cache held before is masked)."""
    pos = cache[0].pos.zero_()
    logits = model(ids, cache=cache)[0]
    pos.fill_(ids.shape[1])
    return logits


def decode_step(model, ids, cache):
    """Logits [B, 1, vocab] of ids [B, 1], one token per row at the cache's position, which then moves on by one. Every
    call has the same shapes and reads its position on the device: compiled, one graph serves every token."""
    pos = cache[0].pos
    logits = model(ids, cache=cache, pos=pos)[0]
    pos += 1
    return logits


def compile_decode(model, on=True):
    """torch.compile the model's one-token step for generate (sample.py --compile=True), gpt-fast's way: dynamic=False,
    its shapes never change; on CUDA mode "reduce-overhead", one CUDA graph replayed per token instead of ~520 kernel
    launches (issue 23's profile). on=False: eager again (the fallback after a compiler error). Returns model."""
    model.__dict__.pop("decode_step", None)
    if on:
        model.decode_step = torch.compile(decode_step, dynamic=False,
                                          mode="reduce-overhead" if model.rope_cos.is_cuda else None)
    return model


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True, allowed=None,
             top_p=1.0, min_p=0.0, repetition_penalty=1.0, on_token=None):
    """idx [B, T] -> [B, T + n] with n <= max_new_tokens. Sampling with transformers' controls (process_logits:
    temperature 0 is greedy; top_k None or 0, top_p 1, min_p 0 and repetition_penalty 1 are off). allowed: a bool
    tensor [vocab_size], True for the ids the tokenizer can decode (data_loader.decodable): no other id is ever picked,
    neither the padding past the tokenizer nor the holes inside it. on_token: called with each step's new ids [B, 1];
    when it returns True (every row has stopped: Stops.push) generation ends there, before max_new_tokens. With the
    KV cache: a static cache for the whole generation (new_cache), one forward over the prompt (prefill), then one
    token at a time against it (decode_step, or compile_decode's); sliding layers keep only their window. Up to the
    RoPE reach (past block_size for YaRN models); beyond it the context is cut to its last half and prefilled again.
    Without the cache every step reruns the context (the reference the tests hold it to)."""
    reach = model.cfg.rope_reach()
    if len(model.rope_cos) < min(idx.shape[1] + max_new_tokens, reach):  # tables for positions past block_size
        cos, sin = rope_tables(model.cfg, min(idx.shape[1] + max_new_tokens, reach), model.rope_cos.device)
        model.rope_cos, model.rope_sin = cos.to(model.rope_cos.dtype), sin.to(model.rope_sin.dtype)
    limit = reach if use_cache else model.cfg.block_size
    step = vars(model).get("decode_step", decode_step)
    cache, pos = None, 0
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -limit:])[0]
        elif cache is None or pos >= limit:  # the prefill (again, past the reach: positions restart at 0)
            ctx = idx[:, -(limit if cache is None else limit // 2):]
            cache = cache or new_cache(model, len(idx), min(ctx.shape[1] + max_new_tokens, limit))
            logits, pos = prefill(model, ctx, cache), ctx.shape[1]
        else:
            if step is not decode_step:  # compiled: a new step, whose CUDA graph replay may overwrite the last logits
                torch.compiler.cudagraph_mark_step_begin()
            logits = step(model, idx[:, -1:], cache)
            pos += 1
        nxt = next_token(logits[:, -1, :].float(), idx, allowed, generator, temperature=temperature, top_k=top_k,
                         top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
        idx = torch.cat([idx, nxt], dim=1)
        if on_token is not None and on_token(nxt):
            break
    return idx


def process_logits(logits, context, temperature=1.0, top_k=None, top_p=1.0, min_p=0.0, repetition_penalty=1.0):
    """One step's logits [B, vocab] (float32) -> the scores to sample from, [B, vocab], -inf where a token is cut.
    transformers' logits processors in transformers' order, each with its meaning there: the repetition penalty over
    every id in context [B, T] (the prompt too): a positive logit divided by it, a negative one multiplied; then
    temperature; top_k (the k likeliest, ties at the k-th kept); top_p (the likeliest whose probabilities add up to
    top_p, at least one); min_p (drop those less likely than min_p times the likeliest). At temperature 0 (greedy)
    only the penalty applies: the rest never cut the likeliest token."""
    if repetition_penalty != 1.0:
        seen = logits.gather(1, context)
        logits = logits.scatter(1, context, torch.where(seen < 0, seen * repetition_penalty, seen / repetition_penalty))
    if temperature == 0:
        return logits
    if temperature != 1.0:
        logits = logits / temperature
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, min(top_k, logits.size(-1)))[0][:, -1:], -float("inf"))
    if top_p < 1.0:
        ascending, order = torch.sort(logits)
        cut = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        cut[:, -1] = False
        logits = logits.masked_fill(cut.scatter(1, order, cut), -float("inf"))
    if min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), -float("inf"))
    return logits


def next_token(logits, context, allowed=None, generator=None, temperature=1.0, **controls):
    """The next ids [B, 1] from one step's logits [B, vocab] (float32) after context [B, T]: never an id that allowed
    [vocab] (bool) leaves out; greedy at temperature 0, else drawn (with generator) from process_logits' scores."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -float("inf"))
    scores = process_logits(logits, context, temperature, **controls)
    if temperature == 0:
        return scores.argmax(dim=-1, keepdim=True)
    # a tiny temperature or penalty (1e-45) overflows scores to inf, whose softmax is NaN; in a row where one did, the
    # limit of a shrinking temperature: the likeliest of those (they were divided alike, so their order is the logits')
    over = torch.isposinf(scores)
    likeliest = logits.masked_fill(~over, -float("inf")).argmax(dim=-1, keepdim=True)
    scores = torch.where(over.any(dim=-1, keepdim=True), torch.full_like(scores, -float("inf")).scatter(1, likeliest, 0.0), scores)
    return torch.multinomial(scores.softmax(dim=-1), num_samples=1, generator=generator)


class Stops:
    """Where each row of a batch ends, as its tokens come, and the text it has made: a row ends at one of stop_ids
    (an end token, left out of the text) or before the first of stop_strings in its text (found also when one spans
    tokens). enc: a tiktoken Encoding. Tokens are decoded as bytes, and a character split between tokens waits for
    its last byte, so the text never holds half a character (tiktoken's decode of a prefix can end in one)."""

    def __init__(self, enc, rows, stop_ids=(), stop_strings=()):
        self.enc, self.stop_ids, self.strings = enc, set(stop_ids), [s for s in stop_strings if s]
        self.decoders = [codecs.getincrementaldecoder("utf-8")("replace") for _ in range(rows)]  # tiktoken's errors
        self.text, self.done = [""] * rows, [False] * rows

    def push(self, ids):
        """ids [rows, 1]: each row's next token. Returns True once every row has ended."""
        for row, t in enumerate(ids.reshape(-1).tolist()):
            if self.done[row]:
                continue
            if t in self.stop_ids:
                self._end(row)
            else:
                self._add(row, self.decoders[row].decode(self.enc.decode_single_token_bytes(t)))
        return all(self.done)

    def close(self):
        """The end of generation (max_new_tokens) for the rows still going."""
        for row, done in enumerate(self.done):
            if not done:
                self._end(row)

    def _end(self, row):  # a character still waiting for bytes ends as tiktoken's decode ends it: U+FFFD
        self._add(row, self.decoders[row].decode(b"", final=True))
        self.done[row] = True

    def _add(self, row, piece):
        old, text = len(self.text[row]), self.text[row] + piece
        since = max(0, old - max(map(len, self.strings), default=0) + 1)  # a stop string ending in the new piece
        found = [i for i in (text.find(s, since) for s in self.strings) if i >= 0]
        if found:
            text, self.done[row] = text[:min(found)], True
        self.text[row] = text

    def shown(self, row):
        """The row's text that can be shown now: all of it once the row has ended; before that, less any tail that
        could still grow into a stop string. What shown() returned is always the start of what it returns later."""
        text = self.text[row]
        if self.done[row]:
            return text
        hold = max((k for s in self.strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return text[:len(text) - hold]
