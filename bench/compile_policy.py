"""
What torch.compile costs for each shape a run takes, by what is compiled and the dynamic-shape policy: the CPU
seconds of three training steps, two evals (no grad, half the batch) and two 16-token greedy samples (the prefill,
then one-token steps against the KV cache), and how many graphs were compiled. The first call of each kind pays
the compile; the second shows the compiled speed. CPU seconds (this process and inductor's compile workers)
rather than wall time: they hold still on a busy machine. One configuration per process:
    python bench/compile_policy.py tiny blocks          # tiny | mac_micro; eager | blocks | whole; dynamic None | False
    python bench/compile_policy.py mac_micro whole False
blocks is what train.py, sample.py and bench.py do (devices.compile_blocks); whole compiles GPT.forward.
"""
import os
import resource
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # model.py is one folder up
from devices import compile_blocks  # noqa: E402
from generate import generate  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402

SHAPES = {  # tests/conftest.py's TINY, and config/mac_micro.py's model at its micro batch
    "tiny": (dict(n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=4, experts_per_token=2, intermediate_size=64,
                  sliding_window=16, block_size=64, vocab_size=4097, tie_embeddings=True), 8),
    "mac_micro": (dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=2, head_dim=64, n_expert=8, experts_per_token=2,
                       intermediate_size=768, sliding_window=128, block_size=512, vocab_size=32832, tie_embeddings=True), 4),
}


def cpu_seconds():
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime


def main(shape="tiny", what="blocks", dynamic="None"):
    settings, B = SHAPES[shape]
    cfg = GPTConfig(**settings)
    torch.manual_seed(0)
    model = GPT(cfg)
    if what == "blocks" and dynamic == "None":
        compile_blocks(model)
    elif what == "blocks":
        torch._dynamo.config.recompile_limit = 64  # as compile_blocks sets it
        for block in model.layers:
            block.forward = torch.compile(block.forward, dynamic=False)
    elif what == "whole":
        torch._dynamo.config.recompile_limit = 64
        model.forward = torch.compile(model.forward, dynamic={"None": None, "False": False}[dynamic])
    g = torch.Generator().manual_seed(1)
    xs = [torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=g) for _ in range(4)]
    costs = []

    def timed(name, fn):
        start = cpu_seconds()
        fn()
        costs.append(f"{name} {cpu_seconds() - start:.1f}")

    for i in range(3):
        timed(f"step{i + 1}", lambda: model(xs[i], xs[i], loss_chunk=512)[1].backward())  # train.py's loss_chunk
    model.eval()
    with torch.no_grad():
        for i in range(2):
            timed(f"eval{i + 1}", lambda: model(xs[3][:B // 2], xs[3][:B // 2], loss_chunk=512))
        for i in range(2):
            timed(f"sample{i + 1}", lambda: generate(model, xs[i][:1, :8], 16, temperature=0))
    from torch._dynamo.utils import counters

    print(f"{shape} | {what} | dynamic {dynamic} | CPU s: {' '.join(costs)} | graphs {counters['stats']['unique_graphs']}")


if __name__ == "__main__":
    main(*sys.argv[1:])
