"""
Mixture-of-Recursions at equal training FLOPs, on this CPU: a vanilla model of L layers, the same depth from
shared blocks (middle-cycle, N_r = 2, no routing), expert-choice MoR with N_r = 2 and 3, and token-choice MoR
with N_r = 3 (its depths' even split costs what expert-choice's capacities do), and a control: expert-choice's
gates with capacities (1, 1), every token through every step. Every run gets the
FLOPs of `iters` steps of the vanilla model (sizing.flops_per_token counts the capacities), so MoR runs take more
steps of fewer FLOPs. Reported: val loss with the causal threshold (what generation does) and with training's
top-k (the gap is top-k reading the future), unique parameters, tokens/s, peak resident memory.
    python bench/mor_study.py                 # ~20 minutes on 2 cores; writes bench/mor_study.md and .png
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's files live one folder up

data_dir = "data/stdlib_4k"
iters = 200  # the vanilla model's steps; the others get its FLOPs
out = "bench/mor_study"  # .md and .png

SHAPE = dict(n_layer=8, n_embd=192, n_head=6, n_kv_head=2, head_dim=32, n_expert=4, experts_per_token=2, intermediate_size=384,
             vocab_size=4160, tie_embeddings=True, sliding_window=64, block_size=256, batch_size=8)
RUNS = {
    "vanilla, 8 layers": {},
    "recursive, middle-cycle, N_r=2": dict(n_recursion=2, recursion_sharing="middle_cycle"),
    "MoR expert-choice, N_r=2": dict(n_recursion=2, recursion_sharing="middle_cycle", mor_router="expert"),
    "MoR expert-choice, N_r=3": dict(n_recursion=3, recursion_sharing="middle_cycle", mor_router="expert"),
    "MoR token-choice, N_r=3": dict(n_recursion=3, recursion_sharing="middle_cycle", mor_router="token"),
    # the control: expert-choice's gates with every token kept at every step, i.e. H + g * f(H) without routing
    "gated recursion, no routing, N_r=2": dict(n_recursion=2, recursion_sharing="middle_cycle", mor_router="expert",
                                               mor_capacity=(1.0, 1.0)),
}


def train(settings, steps, out_dir):
    args = [f"--{k}={v}" for k, v in settings.items()]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--data_dir={data_dir}", f"--out_dir={out_dir}",
           f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--warmup_iters=20", "--lr=3e-3", "--min_lr=3e-4",
           f"--eval_interval={steps}", "--eval_iters=20", "--log_interval=10", "--sample_every=0", "--compile=False",
           "--save_every=1000000", "--device=cpu", "--plot=False"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"bench/mor_study.py: train.py failed: {p.stderr.read()[-2000:]}")
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return log, usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main():
    from configurator import configure
    from model import GPTConfig
    from sizing import flops_per_token, param_counts

    configure(globals())
    if not os.path.exists(os.path.join(data_dir, "meta.json")):
        print(f"building {data_dir} (the standard library's docstrings, o200k_base's first 4,096 merges)", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), "--corpus=stdlib", "--encoding=o200k_base:4096",
                        f"--out_dir={data_dir}", "--val_tokens=100000"], check=True, stdout=subprocess.DEVNULL)
    T = SHAPE["block_size"]
    budget = flops_per_token(GPTConfig.from_dict(SHAPE), T) * iters
    rows, curves = [], {}
    for name, extra in RUNS.items():
        s = {**SHAPE, **extra}
        cfg = GPTConfig.from_dict(s)
        steps = round(budget / flops_per_token(cfg, T))
        with tempfile.TemporaryDirectory() as d:
            log, peak = train(s, steps, d)
        ev = [r for r in log if r.get("eval")][-1]
        speeds = [r["tok_per_s"] for r in log if "loss" in r][1:]  # the first interval holds the warm-up
        fpt = flops_per_token(cfg, T)
        curves[name] = [(r["tokens"] * fpt, r["loss"]) for r in log if "loss" in r]
        share = [r for r in log if "loss" in r][-1].get("mor_share")  # token-choice: what the router really sent
        rows.append((name, param_counts(cfg)["total"], steps, ev["val_loss"], ev.get("val_loss_topk"), sum(speeds) / len(speeds), peak,
                     "/".join(f"{v:.2f}" for v in share) if share else "-"))
        print(f"{name}: {steps} steps, val {ev['val_loss']:.3f}", flush=True)
    table = ["| model | unique parameters | steps (equal FLOPs) | val loss, causal | val loss, top-k | tokens/s | peak memory (GB) | "
             "tokens through each step, last step |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, n, steps, val, topk, tps, peak, share in rows:
        table.append(f"| {name} | {n / 1e6:.2f}M | {steps} | {val:.3f} | {f'{topk:.3f}' if topk else '-'} | {tps:,.0f} | {peak / 1e9:.2f} | {share} |")
    text = "\n".join(table)
    print(text)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        ax.plot([p[0] / 1e12 for p in pts], [p[1] for p in pts], label=name)
    ax.set_xlabel("training FLOPs (TFLOP, sizing.flops_per_token)")
    ax.set_ylabel("train loss")
    ax.set_title(f"Mixture-of-Recursions at equal FLOPs ({SHAPE['n_layer']} layers, width {SHAPE['n_embd']})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out + ".png", dpi=110)
    print(f"wrote {out}.md and {out}.png")


if __name__ == "__main__":
    main()
