"""
train.py under a supervisor that keeps the machine alive and still finishes the run:
    python safe_train.py config/mac_micro.py                      # same arguments as train.py
    python safe_train.py config/mac_micro.py --budget_gb=10       # plus the supervisor's own settings below
    python safe_train.py config/mac_micro.py --check-only         # preflight alone: exit 0 if the setup is good
Preflight first: device, free RAM and swap, disk, data, the memory estimate (sizing.memory_estimate) against
the budget (on CUDA, against the GPU's memory), then one forward/backward at micro batch 1. A micro batch
that does not fit starts smaller, with the same tokens per step (--strict refuses instead); only a model that
does not fit at micro batch 1 is refused, before it is ever built. Then train.py runs as a child process and is sampled every
`interval` seconds: the child tree's memory (PSS on Linux, phys_footprint on macOS), a spike between two
samples (a rise of the peak in train.py's heartbeat, counted once), device memory, swap growth since this
child started, and the system's available memory.
At warn_pct of the budget: a log line. At free_pct: SIGUSR1 (train.py frees its caches). At stop_pct, or
when the growth rate says the next sample would be past it: SIGTERM, train.py finishes its step, saves and
exits; SIGKILL after grace_s. The run then resumes from that checkpoint with half the micro batch and twice
the accumulation (the same tokens per step), at most max_memory_restarts times. A crash is restarted
max_crash_restarts times; a heartbeat older than hang_s is a hang. Bad input and a non-finite loss (train.py's
exit codes 2 and 3) are not retried: the supervisor ends with train.py's line. On macOS the run holds `caffeinate`
and MPS gets a memory cap below the budget. Logs: out_dir/safe_training.log, out_dir/memory_monitoring.jsonl.
The supervisor itself never imports torch (it would hold a few hundred MB for the whole run): preflight's
torch work runs in a child process.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

from configurator import BadInput, ConfigError, check_device, configure, run, script_defaults

budget_gb = 0.0  # memory this run may use; 0 = 90% of what is available at the start
warn_pct = 75.0
free_pct = 85.0
stop_pct = 90.0
min_available_pct = 5.0  # stop also when the whole system has less than this % of its RAM available
interval = 1.0  # seconds between samples
grace_s = 120.0  # after SIGTERM, how long train.py may take to save before SIGKILL
max_memory_restarts = 3  # resumes with half the micro batch after a memory stop
max_crash_restarts = 2  # resumes after train.py exits with an error
hang_s = 600.0  # a heartbeat older than this (after the first one) is a hang
max_hours = 0.0  # stop cleanly (save) after this long; 0 = no limit
min_free_disk_gb = 1.0  # besides keep_last_n + 1 checkpoints
preflight = True
preflight_fit = True  # start at a micro batch whose estimate is under the stop line (False: let the watch decide)
strict = False  # refuse a micro batch over the stop line instead of starting at one that fits
train_script = "train.py"  # the child; tests put a helper here
check_only = False  # preflight alone (also --check-only): exit 0 if the setup is good
SETTINGS = {k: v for k, v in dict(globals()).items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
HERE = os.path.dirname(os.path.abspath(__file__))
GB = 1e9
BAD_INPUT, NON_FINITE = 2, 3  # train.py's exit codes for what no restart can fix


class Refused(BadInput):
    """A setup that cannot run; the message is one line that names it and the fix."""


# ----------------------------------------------------------------------------- preflight (torch runs in a child)

def probe(config):
    """Run in a child process (`safe_train.py --probe JSON`): the checks that need torch. Prints a JSON report."""
    import torch

    from data_loader import DataError, DataLoader
    from devices import pick_device, pick_dtype
    from model import GPT, GPTConfig
    from sizing import memory_estimate, param_counts

    report = {}
    try:
        check_device(config["device"])
    except ConfigError as e:
        return {"error": str(e)}
    dev = pick_device(config["device"])
    dev_type = dev.split(":")[0]
    report["device"] = dev
    report["dtype"] = dt = pick_dtype(config["dtype"], dev_type)
    if dev_type == "mps":
        report["mps_recommended"] = torch.mps.recommended_max_memory()
    line = config["_line"]  # the host's stop line; on CUDA each device's own memory is what must hold the run
    if dev_type == "cuda":
        line = torch.cuda.get_device_properties(dev).total_memory * config["_stop_pct"] / 100
    report["line"] = line  # and what it is: the stop line is a share of the budget (or of the GPU), not the budget itself
    report["line_of"] = f"{config['_stop_pct']:g}% of " + ("GPU memory" if dev_type == "cuda" else f"the {config['_budget'] / GB:.1f} GB budget")
    if config.get("init_from"):  # a fine-tune is the shape of its base
        from weights import BridgeError, adopt_base

        try:
            adopt_base(config)
        except BridgeError as e:
            return {"error": str(e)}
    try:
        for split in ("train", "val"):
            DataLoader(config["data_dir"], split, config["batch_size"], config["block_size"], vocab_size=config["vocab_size"])
    except DataError as e:
        return {"error": f"data: {e}"}
    cfg = GPTConfig.from_dict(config)
    n = param_counts(cfg)
    report["params"] = n["total"]
    report["saved_params"] = n["lora"] if cfg.lora_rank else n["total"]  # a fine-tune's checkpoints hold its adapters

    def estimate(b):
        accum = config["batch_size"] * config["grad_accum_steps"] // b  # the same tokens per step at micro batch b
        return memory_estimate(cfg, b, config["block_size"], dt, 1, dev_type, config.get("activation_checkpointing", False),
                               config.get("loss_chunk", 0), accum, base_dtype=config.get("base_dtype", "float32"))["total"]

    report["estimate"] = est = {b: estimate(b) for b in sorted({config["batch_size"]} | {2 ** i for i in range(12)}) if b <= config["batch_size"]}
    if config["_fit"]:  # before any model is built: a config that cannot fit must not exhaust memory in its own check
        try:
            report["batch"] = fit_micro_batch(est, line, config["batch_size"], config["grad_accum_steps"], config["_strict"], report["line_of"])
        except Refused as e:
            return {"error": str(e)}
    # one forward/backward at micro batch 1 on a short sequence: the model builds, the device runs it, the loss is sane
    torch.manual_seed(0)
    model = GPT(cfg).to(dev)
    x = torch.randint(0, cfg.vocab_size, (1, min(64, cfg.block_size)), device=dev)
    ctx = torch.autocast(dev_type, dtype=getattr(torch, dt), enabled=dt != "float32")
    with ctx:
        _, loss, stats = model(x, x)
    (loss + stats["aux"]).backward()
    report["probe_loss"] = loss.item()
    report["probe_ok"] = bool(torch.isfinite(loss).item()) and all(p.grad is not None for p in model.parameters())
    return report


def fit_micro_batch(est, line, B, A, strict=False, line_of="90% of the budget"):
    """The micro batch to start at: B when its estimate is under the stop line, else the largest that is and
    keeps the B * A tokens per step. Refused when micro batch 1 does not fit, or B does not and strict is set."""
    if est[B] <= line:
        return B
    fits = [b for b in sorted(est, reverse=True) if est[b] <= line and B * A % b == 0]
    if not fits:
        raise Refused(f"memory: even micro batch 1 needs ~{est[1] / GB:.1f} GB by the estimate, over the stop line of "
                      f"{line / GB:.1f} GB ({line_of}): use a smaller model or block_size, or a larger --budget_gb")
    if strict:
        raise Refused(f"memory: micro batch {B} needs ~{est[B] / GB:.1f} GB by the estimate, over the stop line of "
                      f"{line / GB:.1f} GB ({line_of}) (--strict): use --batch_size={fits[0]} --grad_accum_steps={B * A // fits[0]}")
    return fits[0]


def run_preflight(config, budget, log):
    """Everything checked before training starts; raises Refused with one line."""
    out_dir = config["out_dir"]
    vm, sw = psutil.virtual_memory(), psutil.swap_memory()
    log(f"preflight: RAM {vm.total / GB:.1f} GB, available {vm.available / GB:.1f} GB, swap used {sw.used / GB:.1f} of "
        f"{sw.total / GB:.1f} GB, budget {budget / GB:.1f} GB (stop at {stop_pct:.0f}%: {budget * stop_pct / 100 / GB:.1f} GB)")
    want = {**config, "_line": budget * stop_pct / 100, "_stop_pct": stop_pct, "_budget": budget, "_strict": strict, "_fit": preflight_fit}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe", json.dumps(want)], capture_output=True, text=True)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise Refused(f"the forward/backward probe failed: {last}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    if "error" in report:
        raise Refused(report["error"])
    if not report["probe_ok"]:
        raise Refused(f"one forward/backward on {report['device']} gave loss {report['probe_loss']}: the setup is broken")
    log(f"preflight: device {report['device']} ({report['dtype']}), {report['params'] / 1e6:.1f}M parameters, "
        f"probe loss {report['probe_loss']:.2f}, data {config['data_dir']} ok")
    # disk: the keep_last_n kept and the one being written (it is complete before the oldest goes), plus a margin
    ckpt = report["saved_params"] * 12  # fp32 weights and two AdamW moments
    keep = config.get("keep_last_n", 3)
    n_ckpt = keep + 1 if keep > 0 else config.get("max_iters", 0) // max(1, config.get("save_every", 1)) + 1
    probe_dir = out_dir if os.path.isdir(out_dir) else os.path.dirname(os.path.abspath(out_dir)) or "."
    while not os.path.isdir(probe_dir):
        probe_dir = os.path.dirname(probe_dir)
    free = shutil.disk_usage(probe_dir).free
    need = n_ckpt * ckpt + min_free_disk_gb * GB
    if free < need:
        raise Refused(f"disk: {free / GB:.1f} GB free in {probe_dir}, a run needs {need / GB:.1f} GB ({n_ckpt} checkpoints of "
                      f"{ckpt / GB:.2f} GB: keep_last_n {keep} and the one being written, and {min_free_disk_gb} GB spare): "
                      f"free space, lower --keep_last_n or use another --out_dir")
    est = report["estimate"] = {int(b): v for b, v in report["estimate"].items()}  # JSON made the keys strings
    B, A, line = config["batch_size"], config["grad_accum_steps"], report["line"]
    log(f"preflight: memory estimate at micro batch {B}: {est[B] / GB:.2f} GB of the {line / GB:.2f} GB stop line ({report['line_of']})")
    b = report.get("batch", B)
    if b != B:
        log(f"micro batch {B} needs ~{est[B] / GB:.1f} GB by the estimate, over the stop line: starting at micro batch {b} x "
            f"{B * A // b} accumulation steps instead (the same tokens per step; --strict refuses instead)")
    return report


# ----------------------------------------------------------------------------- watching

def tree_footprint(proc):
    """Bytes the process and its children hold: PSS on Linux (shared pages split between them),
    phys_footprint on macOS where psutil reports it (it includes Metal buffers), else RSS."""
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.Error:
        return 0
    for p in procs:
        try:
            info = p.memory_full_info()
            total += getattr(info, "pss", 0) or getattr(info, "phys_footprint", 0) or info.rss
        except psutil.AccessDenied:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        except psutil.Error:
            pass
    return total


def new_watch():
    """What the accounting remembers about one child: its highest heartbeat peak seen, and swap at its start."""
    return {"peak": 0.0, "swap0": psutil.swap_memory().used}


def sample_used(watch, tree, beat, swap_used, device):
    """Bytes the run holds at this sample. The heartbeat's peak_rss_gb is the process's lifetime high-water mark:
    a rise of it since the last sample is a spike between samples and counts in this one sample only (a
    one-off spike, a save or an eval, must not weigh on every later sample). Device memory counts on MPS
    (unified memory). Swap counts as its growth since this child started: swap left by an earlier child,
    stopped for memory, is not this one's."""
    peak = (beat or {}).get("peak_rss_gb", 0) * GB
    spike = peak if peak > watch["peak"] else 0
    watch["peak"] = max(watch["peak"], peak)
    device_mem = (beat or {}).get("device_mem_gb", 0) * GB if device == "mps" else 0
    return max(tree, spike, device_mem) + max(0, swap_used - watch["swap0"])


def child_stderr(child, keep):
    """Pass the child's stderr through as it comes, and keep its last line (train.py's one-line error)."""
    for line in child.stderr:
        sys.stderr.write(line)
        sys.stderr.flush()
        if line.strip():
            keep["last"] = line.strip()


def read_heartbeat(out_dir):
    try:
        with open(os.path.join(out_dir, "heartbeat.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def caffeinate_cmd(pid):
    """macOS: keep the machine awake (-i idle, -m disk, -s system on AC) for as long as pid lives (-w)."""
    return ["caffeinate", "-i", "-m", "-s", "-w", str(pid)]


def mps_env(budget, recommended):
    """macOS: cap MPS below the budget. PyTorch's ratios are fractions of Metal's recommended working set;
    its default hard cap (1.7x, about 18 GB on a 16 GB Mac) is above physical RAM, so the system swaps
    before MPS raises. Capped at the stop line, MPS raises a clean out-of-memory error first."""
    high = budget * stop_pct / 100 / recommended
    return {"PYTORCH_MPS_HIGH_WATERMARK_RATIO": f"{high:.3f}",
            "PYTORCH_MPS_LOW_WATERMARK_RATIO": f"{high * free_pct / stop_pct:.3f}"}


def main(argv):
    global budget_gb
    import threading

    import checkpoint

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ:
        raise Refused("safe_train.py watches one training process on one machine and does not supervise torchrun: "
                      "run `torchrun ... train.py` directly (README, 'Multi-GPU')")
    # every setting, the supervisor's and train.py's, in its range before anything is written (no log yet); the
    # arguments that are not the supervisor's are train.py's
    train_args = []
    globals().update(configure(dict(SETTINGS), argv, rest=train_args))
    if train_script == "train.py":
        config = configure(script_defaults(os.path.join(HERE, train_script)), train_args)
    else:  # a test helper: it takes --out_dir only
        config = {"out_dir": next((a.split("=", 1)[1] for a in train_args if a.startswith("--out_dir=")), "out")}
    out_dir = config["out_dir"]
    pid = checkpoint.holder(out_dir)
    if pid:
        raise Refused(checkpoint.in_use(out_dir, pid))
    unwritable = checkpoint.unwritable(out_dir)
    if unwritable:
        raise Refused(f"out_dir error: {unwritable}: use another --out_dir")
    os.makedirs(out_dir, exist_ok=True)
    log_path, samples_path = os.path.join(out_dir, "safe_training.log"), os.path.join(out_dir, "memory_monitoring.jsonl")
    unwritten = set()

    def append(path, line):
        """The supervisor's own files are a record, not the run: one that cannot be written (a full disk, which
        train.py reports in its own line) is said once on the console, never a crash of the supervisor."""
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as e:
            if path not in unwritten:
                unwritten.add(path)
                print(f"safe_train: cannot write {path} ({e.strerror}): going on without it", flush=True)

    def log(msg):
        print(f"safe_train: {msg}", flush=True)
        append(log_path, f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {msg}")

    from data_loader import build_data, needs_building

    if needs_building(config.get("data_dir", ""), config.get("data_recipe"), train_args):  # as train.py would, once
        log(f"{config['data_dir']} is missing: building it with prepare_fineweb.py {config['data_recipe']} (the config's data_recipe)")
        build_data(config["data_dir"], config["data_recipe"])
    budget = budget_gb * GB or 0.9 * psutil.virtual_memory().available
    report = run_preflight(config, budget, log) if preflight else {"device": "cpu"}
    expected = report.get("estimate", {})
    if check_only:
        log("preflight passed (--check-only): not starting training")
        return 0

    shape = {"batch_size": config.get("batch_size"), "grad_accum_steps": config.get("grad_accum_steps")}
    if report.get("batch", shape["batch_size"]) != shape["batch_size"]:
        b = report["batch"]
        shape = {"batch_size": b, "grad_accum_steps": shape["batch_size"] * shape["grad_accum_steps"] // b}
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if sys.platform == "darwin" and report["device"] == "mps":
        env.update(mps_env(budget, report["mps_recommended"]))
    counts = {"memory": 0, "crash": 0}
    peak, start = 0, time.time()
    user_stop = {"sig": None}

    def on_signal(signum, frame):
        user_stop["sig"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    lines = {"warn": budget * warn_pct / 100, "free": budget * free_pct / 100, "stop": budget * stop_pct / 100}
    outcome = None
    while outcome is None:
        extra = [f"--{k}={v}" for k, v in shape.items() if v is not None and v != config.get(k)]
        cmd = [sys.executable, os.path.join(HERE, train_script), *train_args, *extra]
        log(f"starting {' '.join(os.path.basename(c) if i < 2 else c for i, c in enumerate(cmd))}")
        child = subprocess.Popen(cmd, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True)  # own session: a Ctrl-C reaches us, we decide
        err = {"last": ""}
        reader = threading.Thread(target=child_stderr, args=(child, err), daemon=True)
        reader.start()
        proc = psutil.Process(child.pid)
        watch = new_watch()
        caffeinate = subprocess.Popen(caffeinate_cmd(child.pid)) if sys.platform == "darwin" else None
        reason, sent_term, sent_free, warned, prev = None, None, False, False, None
        while child.poll() is None:
            time.sleep(interval)
            now = time.time()
            vm = psutil.virtual_memory()
            beat = read_heartbeat(out_dir)
            beat = beat if beat and beat.get("pid") == child.pid else None
            tree = tree_footprint(proc)
            used = sample_used(watch, tree, beat, psutil.swap_memory().used, report["device"])
            rate = max(0.0, (used - prev[1]) / (now - prev[0])) if prev else 0.0
            prev = (now, used)
            # where memory will be by the time a stop could take effect. Every training step climbs to its
            # peak and falls back, so for train.py the climb is expected to level off at the estimate for
            # this shape (within its 15%): there only crossing the line counts. Past that, or for a child
            # with no estimate, growth is a leak or a runaway and is extrapolated.
            ahead = used + rate * 2 * interval  # to the next sample, and as long again for the child to react
            plateau = expected.get(shape["batch_size"]) if expected else None
            if plateau and used < 1.15 * plateau:
                ahead = min(ahead, max(used, plateau))
            peak = max(peak, used)
            append(samples_path, json.dumps({"time": now, "pid": child.pid, "used_gb": used / GB, "tree_gb": tree / GB,
                                             "rate_gb_s": rate / GB, "available_gb": vm.available / GB, "budget_gb": budget / GB,
                                             "iter": (beat or {}).get("iter"), "phase": (beat or {}).get("phase"),
                                             "device_mem_gb": (beat or {}).get("device_mem_gb")}))
            if sent_term:
                if now - sent_term > grace_s:
                    log(f"no exit {grace_s:.0f} s after SIGTERM: SIGKILL")
                    os.killpg(child.pid, signal.SIGKILL)
                continue
            if user_stop["sig"]:
                reason = "user"
            elif ahead >= lines["stop"]:
                reason = "memory"
                log(f"stop: {used / GB:.2f} GB used, rising {rate / GB:.2f} GB/s, stop line {lines['stop'] / GB:.2f} GB "
                    f"({stop_pct:.0f}% of {budget / GB:.1f} GB): SIGTERM, train.py saves and exits")
            elif vm.available < vm.total * min_available_pct / 100:
                reason = "memory"
                log(f"stop: the system has {vm.available / GB:.2f} GB available, under {min_available_pct:.0f}%: SIGTERM")
            elif (beat and beat.get("device_total_gb") and report["device"].startswith("cuda")
                  and beat["device_mem_gb"] >= beat["device_total_gb"] * stop_pct / 100):
                reason = "memory"
                log(f"stop: GPU memory {beat['device_mem_gb']:.1f} of {beat['device_total_gb']:.1f} GB: SIGTERM")
            elif max_hours and now - start > max_hours * 3600:
                reason = "time"
                log(f"time limit of {max_hours} h reached: SIGTERM, train.py saves and exits")
            elif beat and beat.get("phase") != "done" and now - beat["time"] > hang_s:
                reason = "hang"
                log(f"hang: no heartbeat for {now - beat['time']:.0f} s (hang_s {hang_s:.0f}): SIGTERM")
            if reason:
                sent_term = now
                child.send_signal(signal.SIGTERM)
                continue
            if used >= lines["free"] and not sent_free:
                log(f"free: {used / GB:.2f} GB used, over {free_pct:.0f}% of the budget: SIGUSR1, train.py frees its caches")
                child.send_signal(signal.SIGUSR1)
                sent_free = True
            elif used >= lines["warn"] and not warned:
                log(f"warn: {used / GB:.2f} GB used, over {warn_pct:.0f}% of the budget ({budget / GB:.1f} GB)")
                warned = True
        if caffeinate:
            caffeinate.terminate()
        reader.join(timeout=5)
        rc = child.returncode
        beat = read_heartbeat(out_dir) or {}
        if reason is None and rc == -signal.SIGKILL:
            reason = "memory"  # killed from outside: on Linux, the kernel's out-of-memory killer
            log("train.py was killed (SIGKILL) by something else, most likely the system's out-of-memory killer")
        at = f" at iter {beat['iter']}" if beat.get("pid") == child.pid else ""
        log(f"{os.path.basename(train_script)} exited with code {rc}{at}" + (f" ({reason} stop)" if reason else ""))
        if rc in (BAD_INPUT, NON_FINITE) and reason is None:  # deterministic: a restart would fail the same way
            log(f"not restarting: {err['last']}")
            return rc  # train.py's exit code: bad input stays 2, a non-finite loss 3
        if reason == "memory":
            counts["memory"] += 1
            if counts["memory"] > max_memory_restarts:
                outcome = ("gave up", f"{max_memory_restarts} memory restarts used up")
            elif not shape["batch_size"] or shape["batch_size"] < 2:
                outcome = ("gave up", "out of memory at micro batch 1: use a smaller model or a larger budget")
            else:
                shape = {"batch_size": shape["batch_size"] // 2, "grad_accum_steps": shape["grad_accum_steps"] * 2}
                log(f"resuming with micro batch {shape['batch_size']} x {shape['grad_accum_steps']} accumulation steps "
                    f"(the same tokens per step)")
        elif reason in ("user", "time"):
            outcome = ("stopped", "by a signal" if reason == "user" else f"time limit of {max_hours} h")
        elif rc == 0 and reason is None:
            outcome = ("finished", "train.py completed")
        else:
            counts["crash"] += 1
            what = "hang" if reason == "hang" else f"exit code {rc}"
            if counts["crash"] > max_crash_restarts:
                outcome = ("gave up", f"{what}, and {max_crash_restarts} crash restarts used up")
            else:
                log(f"restarting after {what} ({counts['crash']} of {max_crash_restarts})")
    state, why = outcome
    beat = read_heartbeat(out_dir) or {}
    restarts = {k: min(counts[k], limit) for k, limit in (("memory", max_memory_restarts), ("crash", max_crash_restarts))}
    log(f"summary: {state} ({why}) | restarts: {restarts['memory']} after {counts['memory']} memory stops, "
        f"{restarts['crash']} after {counts['crash']} crashes | peak "
        f"{peak / GB:.2f} GB of a {budget / GB:.1f} GB budget | iterations done: {beat.get('iter')} | "
        f"micro batch {shape['batch_size']} x {shape['grad_accum_steps']} | {(time.time() - start) / 60:.1f} min")
    return 0 if state in ("finished", "stopped") else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        print(json.dumps(probe(json.loads(sys.argv[2]))))
        sys.exit(0)
    sys.exit(run(main, sys.argv[1:]))
