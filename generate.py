"""
Text from a model, one token at a time: the KV cache, the prefill and the one-token steps, and how the next token is
picked. Beside model.py as gpt-fast's generate.py is beside its model: the network stays the network.
"""
import codecs

import torch

from model import rope_tables


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, use_cache=True, allowed=None,
             top_p=1.0, min_p=0.0, repetition_penalty=1.0, on_token=None):
    """idx [B, T] -> [B, T + n] with n <= max_new_tokens. Sampling with transformers' controls (process_logits:
    temperature 0 is greedy; top_k None or 0, top_p 1, min_p 0 and repetition_penalty 1 are off). allowed: a bool
    tensor [vocab_size], True for the ids the tokenizer can decode (data_loader.decodable): no other id is ever picked,
    neither the padding past the tokenizer nor the holes inside it. on_token: called with each step's new ids [B, 1];
    when it returns True (every row has stopped: Stops.push) generation ends there, before max_new_tokens. With the
    KV cache: one forward over the prompt (the prefill), then
    one token at a time against the cached keys and values; sliding layers keep only their window. Up to
    the RoPE reach (past block_size for YaRN models); beyond it the context is cut to its last half and
    prefilled again. Without the cache every step reruns the context (the reference the tests hold it to)."""
    reach = model.cfg.rope_reach()
    if len(model.rope_cos) < min(idx.shape[1] + max_new_tokens, reach):  # tables for positions past block_size
        cos, sin = rope_tables(model.cfg, min(idx.shape[1] + max_new_tokens, reach), model.rope_cos.device)
        model.rope_cos, model.rope_sin = cos.to(model.rope_cos.dtype), sin.to(model.rope_sin.dtype)
    limit = reach if use_cache else model.cfg.block_size
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
    logits = process_logits(logits, context, temperature, **controls)
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1, generator=generator)


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
