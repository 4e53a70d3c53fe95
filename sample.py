"""
Text from a checkpoint, in one process, whatever number of processes wrote it, or from an HF GptOss directory:
    python sample.py --out_dir=out --start="The meaning of life" --num_samples=3 --max_new_tokens=100
    python sample.py --init_from=path/to/gpt-oss-20b --start="Hello"       # HF weights (bf16 or MXFP4 experts)
    python sample.py --out_dir=out --start="def " --top_p=0.9 --repetition_penalty=1.2 --stop="['class ', 'def ']"
--start can also be FILE:prompt.txt. The sampling controls are transformers' (generate.process_logits). A sample ends
at end-of-text and before the first --stop string; one sample is printed as it comes. The samples run as one batch,
with a KV cache (one forward over the prompt, then one token at a time), in the precision train.py would pick
(devices.pick_dtype) unless --dtype says otherwise.
The tokenizer is the one named in the checkpoint's config.json (o200k_harmony for an HF directory), or --tokenizer.
"""
import os
import sys
import time

import torch

out_dir = "out"
ckpt = ""  # a ckpt_<iter> directory; empty = the one out_dir/latest names
init_from = ""  # an HF GptOss directory (or a nanoOSS checkpoint) instead of out_dir
tokenizer = ""  # empty: the checkpoint's (o200k_harmony for an HF directory)
start = "\n"
num_samples = 1  # sampled together, as one batch
max_new_tokens = 200
temperature = 0.8  # 0 = greedy
top_k = 200  # sample from the k likeliest tokens (0 = from every token)
top_p = 1.0  # then from the likeliest whose probabilities add up to top_p (1 = from every token)
min_p = 0.0  # then drop the tokens less likely than min_p times the likeliest (0 = off)
repetition_penalty = 1.0  # before all these, every id already in the context, the prompt's too, is made less likely:
# a positive logit divided by it, a negative one multiplied (1 = off; 1.1 to 1.3 is usual)
stop_at_eot = True  # end a sample at the tokenizer's end-of-text (plain text; --chat ends at the template's end of turn)
stop = ()  # end a sample before the first of these strings, even one that spans tokens: --stop=END, or a Python
# literal for several or for escapes: --stop="['\n\n', 'THE END']"
stream = True  # with num_samples 1, print the text as it comes (False: at the end)
seed = 1337
device = "auto"
dtype = "auto"  # auto: as train.py picks: bfloat16 on CUDA (float16 without bf16) and on MPS from macOS 14, else float32
compile = False  # torch.compile the one-token step (generate.compile_decode; on CUDA replayed as one CUDA graph per
# token); on a compiler error the samples are made eager, the same tokens
use_cache = True  # False: rerun the whole context for every token (slow; the reference the tests compare with)
chat = False  # wrap --start as a user turn in the chat template the fine-tune was trained with, print the answer only


def prompt_ids(text, enc, chat=False):
    """(ids, stop ids) to generate from. Plain text is encoded as prepare_fineweb.py encodes documents: a typed
    "<|endoftext|>" is those 13 characters, not the special token. With chat, a user turn in the chat template the
    fine-tune was trained with: the template's own markers are special, the text inside them is plain."""
    if chat:
        from data_loader import chat_prompt

        return chat_prompt(text, enc)
    return enc.encode_ordinary(text) or [enc.eot_token], set()


def main():
    import checkpoint
    from configurator import ConfigError, check_device, configure
    from data_loader import decodable, get_tokenizer
    from devices import compiler_error, pick_device, pick_dtype, set_tf32
    from generate import Stops, compile_decode, generate as generate_ids
    from weights import load_model

    configure(globals())
    check_device(device)
    path = init_from or ckpt
    if not path:
        latest = checkpoint.read_latest(out_dir)
        if not latest:
            raise checkpoint.CheckpointError(f"no checkpoint in {out_dir}: train first, or pass --out_dir, --ckpt or --init_from")
        path = os.path.join(out_dir, latest)
    if not init_from:
        problem = checkpoint.verify(path)
        if problem:
            raise checkpoint.CheckpointError(f"{problem}: pass --ckpt=<an older ckpt_N folder>")
    dev = pick_device(device)
    dev_type = dev.split(":")[0]
    tf32 = set_tf32(dev_type)
    dt = getattr(torch, pick_dtype(dtype, dev_type))
    model, settings = load_model(path, dev, dt)
    enc = get_tokenizer(tokenizer or settings.get("tokenizer") or "o200k_harmony")
    if enc.n_vocab > model.cfg.vocab_size:
        raise ConfigError(f"tokenizer {enc.name} has {enc.n_vocab} ids, more than the model's vocab_size {model.cfg.vocab_size}: pass --tokenizer")
    prompt = start
    if prompt.startswith("FILE:"):
        try:
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        except OSError as e:
            raise ConfigError(f"--start=FILE:{prompt[5:]}: {e.strerror}")
    ids, stops = prompt_ids(prompt, enc, chat)
    if not chat and stop_at_eot:
        stops = {enc.eot_token}
    x = torch.tensor([ids] * num_samples, device=dev)
    allowed = torch.from_numpy(decodable(enc, model.cfg.vocab_size)).to(dev)  # never an id the tokenizer cannot decode
    if compile:
        compile_decode(model)

    head = "" if chat else prompt  # plain text comes after its prompt (an empty one starts at end-of-text, not shown)
    streaming = stream and num_samples == 1
    if streaming:
        print(head, end="", flush=True)
    ends, shown = None, 0  # shown: the characters of the text printed so far, which a retry (compile off) skips

    def generate():
        nonlocal ends
        g = torch.Generator(device=dev).manual_seed(seed)
        ends = Stops(enc, num_samples, stops, stop)

        def on_token(nxt):
            nonlocal shown
            done = ends.push(nxt)
            text = ends.shown(0) if streaming else ""
            if len(text) > shown:
                print(text[shown:], end="", flush=True)
                shown = len(text)
            return done
        y = generate_ids(model, x, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                         repetition_penalty=repetition_penalty, generator=g, use_cache=use_cache, allowed=allowed,
                         on_token=on_token)
        ends.close()
        return y
    t = time.time()
    try:
        y = generate()
    except Exception as e:
        if not (compile and compiler_error(e)):
            raise
        print(f"sample.py: compile off ({compiler_error(e)}): sampling eager", file=sys.stderr, flush=True)
        compile_decode(model, False)
        t = time.time()
        y = generate()
    seconds = time.time() - t
    for row in range(num_samples):
        print(ends.text[0][shown:] if streaming else head + ends.text[row])
        print("---------------")
    steps = y.shape[1] - x.shape[1]  # fewer than max_new_tokens once every sample has ended
    print(f"{num_samples} x {steps} tokens in {seconds:.1f} s: {num_samples * steps / seconds:.1f} tok/s "
          f"({dev}, {str(dt).removeprefix('torch.')}, {'KV cache' if use_cache else 'no cache'}, tf32 {'on' if tf32 else 'off'}, "
          f"compile {'on' if compile else 'off'})", file=sys.stderr)


if __name__ == "__main__":
    from configurator import run

    run(main)
