"""Run under torchrun by test_distributed.py: gradient accumulation with FSDP2, syncing only after the last
micro step (as train.py does) versus syncing after every micro step. Both must give the same gradients.
Writes the comparison to the JSON file named by argv[1] (rank 0)."""
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from model import GPT, GPTConfig  # noqa: E402
from train import shard_model  # noqa: E402  (the function train.py uses, not a copy)


def grads_after(model, batches, sync_every_step):
    model.zero_grad(set_to_none=True)
    for i, (x, y) in enumerate(batches):
        model.set_requires_gradient_sync(sync_every_step or i == len(batches) - 1)
        _, loss, stats = model(x, y)
        ((loss + 0.01 * stats["aux"]) / len(batches)).backward()
    return {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    cfg = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8,
                    n_expert=4, experts_per_token=2, intermediate_size=24, sliding_window=8)
    with torch.device("meta"):
        model = GPT(cfg)
    shard_model(model, "cpu", "float32")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    g = torch.Generator().manual_seed(100 + rank)  # each rank its own data, as in training
    batches = [(torch.randint(0, 97, (2, 32), generator=g), torch.randint(0, 97, (2, 32), generator=g)) for _ in range(3)]
    no_sync = grads_after(model, batches, sync_every_step=False)
    synced = grads_after(model, batches, sync_every_step=True)
    diff = max((no_sync[n] - synced[n]).abs().max().item() for n in synced)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"params": len(synced), "max_abs_diff": diff,
                       "max_abs_grad": max(t.abs().max().item() for t in synced.values()),
                       "grad_norm": torch.sqrt(sum((t.float() ** 2).sum() for t in synced.values())).item()}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
