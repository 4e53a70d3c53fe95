"""
Text from a checkpoint, in one process, whatever number of processes wrote it:
    python sample.py --out_dir=out --start="The meaning of life" --num_samples=3 --max_new_tokens=100
--start can also be FILE:prompt.txt. The tokenizer is the one named in the checkpoint's config.json.
"""
import json
import os
import sys
import warnings

import torch

out_dir = "out"
ckpt = ""  # a ckpt_<iter> directory; empty = the one out_dir/latest names
start = "\n"
num_samples = 1
max_new_tokens = 200
temperature = 0.8
top_k = 200
seed = 1337
device = "auto"


def load_model(ckpt_dir, dev="cpu"):
    """(model, config dict) from a DCP checkpoint directory, weights only."""
    import torch.distributed.checkpoint as dcp
    from model import GPT, GPTConfig

    with open(os.path.join(ckpt_dir, "config.json")) as f:
        config = json.load(f)
    cfg = GPTConfig.from_dict(config)
    model = GPT(cfg)
    state = {"model": model.state_dict()}
    with warnings.catch_warnings():  # DCP warns that it runs without a process group: that is the point here
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, checkpoint_id=ckpt_dir)
    model.load_state_dict(state["model"])
    return model.to(dev).eval(), config


def main():
    from configurator import configure
    from data_loader import DataError, get_tokenizer

    configure(globals())
    import checkpoint

    latest = checkpoint.read_latest(out_dir)
    path = ckpt or (os.path.join(out_dir, latest) if latest else "")
    if not path:
        sys.exit(f"sample.py: no checkpoint in {out_dir}: train first, or pass --out_dir / --ckpt")
    problem = checkpoint.verify(path)
    if problem:
        sys.exit(f"sample.py: {problem}: pass --ckpt=<an older ckpt_N folder>")
    from model import pick_device

    dev = pick_device(device)
    model, config = load_model(path, dev)
    try:
        enc = get_tokenizer(config["tokenizer"])
    except DataError as e:
        sys.exit(f"sample.py: {e}")
    prompt = start
    if prompt.startswith("FILE:"):
        with open(prompt[5:], encoding="utf-8") as f:
            prompt = f.read()
    ids = enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [config["eot"]]
    x = torch.tensor([ids], device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    for _ in range(num_samples):
        y = model.generate(x, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
        print(enc.decode(y[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    main()
