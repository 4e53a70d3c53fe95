"""
Text from a model, one token at a time: the KV cache, the prefill and the one-token steps, and how the next token is
picked. Beside model.py as gpt-fast's generate.py is beside its model: the network stays the network.
"""
import torch

from model import rope_tables


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True, allowed=None):
    """Sampling (temperature 0: greedy; top_k None or 0: from every token). allowed: a bool tensor [vocab_size], True
    for the ids the tokenizer can decode (data_loader.decodable): no other id is ever picked, neither the padding
    past the tokenizer nor the holes inside it. With the KV cache: one forward over the prompt (the prefill), then
    one token at a time against the cached keys and values; sliding layers keep only their window. Up to
    the RoPE reach (past block_size for YaRN models); beyond it the context is cut to its last half and
    prefilled again. Without the cache every step reruns the context (the reference the tests hold it to)."""
    reach = model.cfg.rope_reach()
    if len(model.rope_cos) < min(idx.shape[1] + max_new_tokens, reach):  # tables for positions past block_size
        cos, sin = rope_tables(model.cfg, min(idx.shape[1] + max_new_tokens, reach), model.rope_cos.device)
        model.rope_cos, model.rope_sin = cos.to(model.rope_cos.dtype), sin.to(model.rope_sin.dtype)
    limit = reach if use_cache else model.cfg.block_size
    banned = None if allowed is None else ~allowed
    cache, pos = None, 0
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = model(idx[:, -limit:])[0]
        elif cache is None or pos >= limit:  # the prefill (again, past the reach: positions restart at 0)
            ctx = idx[:, -(limit if cache is None else limit // 2):]
            cache = [{} for _ in model.plan]  # one per applied layer: a shared block keeps each use's keys
            logits, pos = model(ctx, cache=cache)[0], ctx.shape[1]
        else:
            logits = model(idx[:, -1:], cache=cache, pos=pos)[0]
            pos += 1
        logits = logits[:, -1, :].float()
        if banned is not None:
            logits = logits.masked_fill(banned, -float("inf"))
        if temperature == 0:
            nxt = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            nxt = torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)
        idx = torch.cat([idx, nxt], dim=1)
    return idx
