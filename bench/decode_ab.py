"""
Decoding speed of this tree against another commit's, interleaved (issue 23: the CPU decodes at least as fast as
commit 6087689 did). Each round runs one fresh process per tree, in alternating order, on the same weights and prompt:
    git worktree add --detach /tmp/nanooss_6087689 6087689
    python bench/decode_ab.py --against=/tmp/nanooss_6087689 --rounds=6
Greedy, with the KV cache, at batch 1 and 8, mac_micro's shape with random weights (seed 0; the same state dict
loaded in both trees), a prompt of --prompt_tokens random ids and --max_new_tokens new ones. Prints each run, then
the medians, and whether both trees picked the same tokens. Threads as torch sets them (OMP_NUM_THREADS=1 steadies a
shared machine).
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

against = ""  # the other tree: a git worktree of the commit to compare with
rounds = 6
prompt_tokens = 400
max_new_tokens = 200

# run in each tree's own folder, with that tree first on sys.path: generation there is model.generate (before
# generate.py) or generate.generate
CHILD = """
import hashlib, json, sys, time, torch
from model import GPT, GPTConfig
cfg, weights, prompt, n = json.loads(sys.argv[1]), sys.argv[2], torch.load(sys.argv[3]), int(sys.argv[4])
model = GPT(GPTConfig(**cfg)).eval()
model.load_state_dict(torch.load(weights))
try:
    from generate import generate
except ImportError:
    generate = type(model).generate
out = {}
for b in (1, 8):
    x = prompt.expand(b, -1)
    generate(model, x, 4, temperature=0)  # warm-up: allocations
    t = time.perf_counter()
    y = generate(model, x, n, temperature=0)
    out[b] = [b * n / (time.perf_counter() - t), hashlib.sha1(y.numpy().tobytes()).hexdigest()[:8]]
print(json.dumps(out))
"""


def main():
    import runpy

    import torch

    from configurator import ConfigError, configure
    from model import GPT, GPTConfig

    configure(globals(), keys=["against", "rounds", "prompt_tokens", "max_new_tokens"])
    if not os.path.exists(os.path.join(against, "model.py")):
        raise ConfigError(f"--against={against!r}: not a nanoOSS tree (no model.py there); make one with git worktree add")
    shape = runpy.run_path(os.path.join(ROOT, "config", "mac_micro.py"))
    cfg = {k: shape[k] for k in ("vocab_size", "block_size", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "n_expert",
                                 "experts_per_token", "intermediate_size", "sliding_window", "tie_embeddings")}
    trees = {"this tree": ROOT, os.path.basename(os.path.abspath(against)): os.path.abspath(against)}
    runs, tokens = {name: {1: [], 8: []} for name in trees}, {}
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        weights, prompt = os.path.join(tmp, "weights.pt"), os.path.join(tmp, "prompt.pt")
        torch.save(GPT(GPTConfig(**cfg)).state_dict(), weights)
        torch.save(torch.randint(0, cfg["vocab_size"], (1, prompt_tokens)), prompt)
        for r in range(rounds):
            for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), weights, prompt, str(max_new_tokens)],
                                   cwd=trees[name], capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=trees[name]))
                if p.returncode:
                    raise SystemExit(f"{name}: {p.stderr.strip().splitlines()[-1]}")
                for b, (tok_s, digest) in json.loads(p.stdout.splitlines()[-1]).items():
                    runs[name][int(b)].append(tok_s)
                    tokens.setdefault(b, set()).add(digest)
                print(f"round {r + 1} {name:24s} " + "  ".join(f"batch {b}: {runs[name][b][-1]:6.1f} tok/s" for b in (1, 8)),
                      flush=True)
    print(f"\n| tree | batch 1 tok/s | batch 8 tok/s |  (medians of {rounds}; {prompt_tokens}-token prompt, "
          f"{max_new_tokens} new)\n| --- | --- | --- |")
    for name in trees:
        print(f"| {name} | {statistics.median(runs[name][1]):.1f} | {statistics.median(runs[name][8]):.1f} |")
    print("the same tokens in both trees: " + ", ".join(f"batch {b} {'yes' if len(d) == 1 else 'no'}" for b, d in tokens.items()))


if __name__ == "__main__":
    from configurator import run

    run(main)
