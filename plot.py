"""
Pictures of training runs, from the log.jsonl that train.py writes:
    python plot.py out/mac_micro                        # -> out/mac_micro/loss.png
    python plot.py out/run_a out/run_b --out=ab.png     # several runs overlaid, for a comparison
One PNG: train and val loss against tokens, the router's raw aux loss (1.0 = balanced), tokens/s, and for the
first run a heatmap of each layer's busiest expert over time. train.py redraws out_dir/loss.png at each eval
(and says where, the first time).
Needs matplotlib (pip install matplotlib).
"""
import json
import os
import sys

from checkpoint import write_atomic
from configurator import BadInput


class PlotError(BadInput):
    """A bad out_dir; the message is one line."""


def read_runs(dirs):
    runs = {}
    for d in dirs:
        path = os.path.join(d, "log.jsonl")
        if not os.path.exists(path):
            raise PlotError(f"{path} does not exist: pass the out_dir of a run that has logged at least once")
        records = []
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:
                    pass  # a line cut short by a kill
        steps = [r for r in records if "loss" in r]
        if not steps:
            raise PlotError(f"{path} has no training steps yet: plot it after the first log_interval")
        runs[os.path.basename(os.path.normpath(d)) or d] = {"steps": steps, "evals": [r for r in records if r.get("eval")]}
    return runs


def tokens(r, run):
    """Tokens seen by this record: logged since tokens_per_iter came in; before that, from iter x tokens per step."""
    return r.get("tokens", r["iter"] * run["steps"][0].get("tokens_per_iter", 1))


def figure(runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax_loss, ax_aux), (ax_speed, ax_load) = axes
    for name, run in runs.items():
        steps, evals = run["steps"], run["evals"]
        dot = {"marker": "o", "ms": 4} if len(steps) == 1 else {}  # one logged point: a line through it draws nothing
        line, = ax_loss.plot([tokens(r, run) for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, label=f"{name} train", **dot)
        if evals:
            ax_loss.plot([tokens(r, run) for r in evals], [r["val_loss"] for r in evals], "o-", color=line.get_color(),
                         lw=2, ms=4, label=f"{name} val")
        ax_aux.plot([tokens(r, run) for r in steps], [r["aux"] for r in steps], lw=1, color=line.get_color(), label=name, **dot)
        ax_speed.plot([tokens(r, run) for r in steps], [r["tok_per_s"] for r in steps], lw=1, color=line.get_color(), label=name, **dot)
    ax_loss.set(title="loss", xlabel="tokens", ylabel="cross-entropy (nats)")
    ax_aux.axhline(1.0, color="gray", ls="--", lw=1)
    ax_aux.set(title="router load-balancing loss, raw (1.0 = balanced, n_expert = collapsed)", xlabel="tokens", ylabel="aux")
    ax_speed.set(title="throughput", xlabel="tokens", ylabel="tokens / s")
    for ax in (ax_loss, ax_aux, ax_speed, ax_load):
        ax.xaxis.set_major_formatter(EngFormatter())  # 80k, 1.2M, 3G tokens
    for ax in (ax_loss, ax_aux, ax_speed):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    name, run = next(iter(runs.items()))
    loaded = [r for r in run["steps"] if "load" in r]
    if loaded:  # each layer's busiest expert, relative to a perfectly even share
        n_expert = len(loaded[0]["load"][0])
        grid = [[max(layer) * n_expert for layer in r["load"]] for r in loaded]
        x0, x1 = tokens(loaded[0], run), tokens(loaded[-1], run)
        im = ax_load.imshow(list(map(list, zip(*grid))), aspect="auto", origin="lower", cmap="magma", vmin=1.0,
                            extent=[x0, x1 if x1 > x0 else x0 + 1, -0.5, len(grid[0]) - 0.5], interpolation="nearest")
        fig.colorbar(im, ax=ax_load, label="busiest expert's share x n_expert (1 = even)")
        ax_load.set(title=f"expert load per layer ({name})", xlabel="tokens", ylabel="layer")
        ax_load.set_yticks(range(len(grid[0])))
    else:
        ax_load.text(0.5, 0.5, "no per-layer expert load in this log\n(log_router_stats=True writes it)", ha="center", va="center")
        ax_load.set_axis_off()
    fig.suptitle(" vs ".join(runs), fontsize=11)
    fig.tight_layout()
    return fig


def main(argv):
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--out=")), "")
    dirs = [a for a in argv if not a.startswith("--")]
    if not dirs:
        raise PlotError("usage: python plot.py OUT_DIR [OUT_DIR ...] [--out=FILE.png]")
    runs = read_runs(dirs)
    try:
        fig = figure(runs)
    except ImportError:
        raise PlotError("plot.py needs matplotlib: pip install matplotlib")
    out = out or (os.path.join(dirs[0], "loss.png") if len(dirs) == 1 else "runs.png")
    # train.py redraws it while people look at it: never a half-written file
    write_atomic(out, lambda f: fig.savefig(f, format="png", dpi=100))
    print(f"wrote {out}")


if __name__ == "__main__":
    from configurator import run

    run(main, sys.argv[1:])
