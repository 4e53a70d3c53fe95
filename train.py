"""
Train a GPT-OSS-style Mixture-of-Experts model on one device (CUDA, Apple MPS or CPU, picked for you)
or on many under torchrun (FSDP2, one process per GPU):
    python train.py config/mac_micro.py
    python train.py config/mac_micro.py --batch_size=4 --max_iters=200
    torchrun --nproc_per_node=8 train.py config/8b_moe.py
Every setting below can be changed by a config file or --key=value. The run checkpoints to out_dir and
resumes from out_dir/latest by itself. SIGTERM / Ctrl-C: finish the step, save, exit 0.
SIGUSR1: free cached memory now. A heartbeat file in out_dir tells safe_train.py how the run is doing.
"""
import gc
import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import fields

import numpy as np
import torch

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/stdlib_docs"  # meta.json + token shards (prepare_fineweb.py)
# how to build the config's own data_dir when it is missing (prepare_fineweb.py's arguments): the embedded default
# that makes `python train.py config/mac_micro.py` a first command. Never used for a --data_dir you typed.
data_recipe = "--corpus=stdlib --encoding=o200k_base --val_tokens=100000"
out_dir = "out"
resume = True  # continue from out_dir/latest when there is one
allow_new_tokenizer = False  # resume on data made with another tokenizer than the checkpoint's (a deliberate switch)
init_from = ""  # a fresh run starts from these weights alone: an HF GptOss directory (bf16, or MXFP4 experts) or a nanoOSS
# checkpoint (or out_dir). Its model settings replace the config's (block_size stays yours); iteration 0, fresh optimizer.
# A rerun resumes from out_dir as usual: init_from only seeds a run that has no checkpoint yet.
overwrite = False  # with resume=False: start over in an out_dir that holds checkpoints (they are pruned as new ones are saved)
eval_interval = 250
eval_iters = 20  # batches per split for an eval
eval_only = False  # score the checkpoint to resume (or init_from's weights) on both splits, print, exit: trains and writes nothing
log_interval = 10
log_router_stats = True  # per-layer expert load in log.jsonl (every expert's share, per layer)
plot = True  # refresh out_dir/loss.png at each eval (plot.py, in a child process; needs matplotlib)
wandb_log = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
wandb_project = "nanooss"
wandb_run_name = "run"
tensorboard_log = False  # also write TensorBoard event files to out_dir/tensorboard (pip install tensorboard)
save_every = 250
keep_last_n = 3  # checkpoints kept on disk (the newest)
sample_every = 500  # print a text sample every N iterations (0 = never)
sample_tokens = 64
temperature = 0.8
top_k = 200
# data
batch_size = 8  # micro batch per device
block_size = 256
grad_accum_steps = 1  # micro steps per optimizer step, over all ranks (as nanoGPT): each rank does grad_accum_steps / world_size
sync_grads_every_micro_step = False  # FSDP: reduce-scatter after every micro step: sharded gradients (less memory), more traffic
activation_checkpointing = False  # recompute each block in the backward: ~1/3 more compute, activations of one block
loss_chunk = 512  # tokens per piece of the loss, fused with its gradient: [tokens, vocab] logits never exist whole (0 = all at once)
# model (see model.GPTConfig)
vocab_size = 201088
n_layer = 4
n_embd = 256
n_head = 4
n_kv_head = 2
head_dim = 64
n_expert = 4
experts_per_token = 2
intermediate_size = 256
sliding_window = 128
attn_pattern = "SF"
sinks = True
swiglu_limit = 7.0
rope_theta = 150000.0
rope_scaling_factor = 1.0
initial_context_length = 4096
tie_embeddings = False
# fine-tuning with LoRA (needs init_from: the base it adapts, frozen): rank-r adapters; checkpoints hold only them
lora_rank = 0
lora_alpha = 16.0
lora_targets = "q,k,v,o,experts"  # any of q, k, v, o, experts, router
base_dtype = "float32"  # bfloat16: the frozen base's layer matrices sit in bf16, half their memory (one device)
# Mixture-of-Recursions (model.GPTConfig says more; README, "Mixture-of-Recursions"): n_layer applied layers from
# shared blocks run n_recursion times; mor_router expert: each step keeps its top tokens (capacities, gate alpha);
# token: each token's depth is picked as it enters (a balancing loss keeps the depths used)
n_recursion = 1
recursion_sharing = "middle_cycle"  # cycle | middle_cycle | sequence | middle_sequence
mor_router = "none"  # none | expert | token
mor_capacity = ()  # expert: per step, the share of the sequence kept, e.g. (1.0, 0.5); () = (n_recursion - r) / n_recursion
mor_alpha = 0.1  # expert: the gate's scale (token-choice's gate is its softmax probability)
# expert: the routers' BCE toward "was in the top-k", so that eval can decide causally (the paper's 0.001);
# token: the balancing loss over depths (the paper's 0.1). None: the paper's value for the router in use
mor_aux_loss_coef = None
mor_z_loss_coef = 0.001  # token: the router's z-loss
# router losses: the raw aux is 1.0 at perfect balance. HF GptOss pools layers and its balanced value is
# experts_per_token, so HF's router_aux_loss_coef c gives the same push as c * experts_per_token here.
router_aux_loss_coef = 0.01
router_z_loss_coef = 0.001
# optimizer
lr = 3e-4
min_lr = 3e-5
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 = off
warmup_iters = 100
lr_decay_iters = 5000
max_iters = 5000
# system
device = "auto"  # auto | cuda | cuda:N | mps | cpu
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = None  # None = on for CUDA only (on CPU and MPS it compiles for ~30 s and is no faster); a compiler error: eager
compile_backend = "inductor"  # torch.compile's backend: a name it knows (aot_eager: no code generation) or module:function
seed = 1337
# -----------------------------------------------------------------------------


def setup_distributed(want_device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs and gloo on CPU, and return
    (rank, world_size, device). One process: (0, 1, the device picked as usual)."""
    from devices import pick_device

    world, dev = int(os.environ.get("WORLD_SIZE", "1")), pick_device(want_device)
    if world == 1:
        return 0, 1, dev
    if dev.startswith("cuda"):
        dev = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(dev)
    elif dev == "mps":
        dev = "cpu"  # one MPS device per machine: several processes would share it; use gloo on the CPU
    torch.distributed.init_process_group("nccl" if dev.startswith("cuda") else "gloo")
    return torch.distributed.get_rank(), world, dev


def shard_model(model, dev_type, dt):
    """FSDP2: each block is its own unit (its parameters are gathered just before it runs and freed after),
    then the root (embeddings, final norm, head). Experts are stacked 3-D parameters, sharded on their
    first dimension like any other; nothing here assumes they are replicated, so expert parallelism can
    replace this later. On CUDA the gathered weights are bf16 and gradients are reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    bf16 = dev_type == "cuda" and dt == "bfloat16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def param_groups(model, weight_decay):
    """AdamW groups of the parameters that train: weight decay on weight matrices and stacked experts only, never
    on biases (the experts' are 2-D), norms or sinks. Frozen parameters (a LoRA base) get no optimizer state."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and not n.endswith("bias")]
    rest = [p for n, p in named if p.dim() < 2 or n.endswith("bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def get_lr(it):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then flat."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    if it >= lr_decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, lr_decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def peak_rss_gb():
    """This process's peak resident memory so far (kernel-kept high-water mark: catches spikes between samples)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9  # bytes on macOS, KB on Linux


def memory_gb(dev, now=False):
    """(used, total) in GB: on CUDA the peak allocated (the log line) or, with now, what the allocator holds at
    this moment (the heartbeat: safe_train.py watches the present, not a peak that stays up forever)."""
    import psutil

    if dev.startswith("cuda"):
        used = torch.cuda.memory_reserved(dev) if now else torch.cuda.max_memory_allocated(dev)
        return used / 1e9, torch.cuda.get_device_properties(dev).total_memory / 1e9
    total = psutil.virtual_memory().total / 1e9
    if dev == "mps":
        return torch.mps.driver_allocated_memory() / 1e9, total
    return psutil.Process().memory_info().rss / 1e9, total


# exit codes, for safe_train.py and your scripts: 0 finished or stopped cleanly (and saved); 2 bad input (a
# config, data or out_dir problem: running again will not help); 3 the loss or gradient went non-finite.
# Anything else is a crash.
BAD_INPUT, NON_FINITE = 2, 3


def fail(msg, code=BAD_INPUT):
    print(msg, file=sys.stderr, flush=True)
    sys.exit(code)


TEST_HOOKS = set(os.environ.get("NANOOSS_TEST_HOOKS", "").split(","))


def test_hook(event):
    """True when a test asked for `event` (NANOOSS_TEST_HOOKS=event,...). Tests use it to deliver a signal
    inside the windows that a real signal hits only by chance, and to hide a checkpoint from one rank as
    a node without the shared filesystem would."""
    return event in TEST_HOOKS


def rng_state(dev_type):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if dev_type == "cuda" else None}


def set_rng_state(state, dev_type):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if dev_type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


def saved_part(model_sd):
    """What a checkpoint keeps of the model: all of it, or for a LoRA fine-tune its adapters alone (the base is
    init_from's, named and fingerprinted in config.json)."""
    return {k: v for k, v in model_sd.items() if "lora_" in k} if lora_rank else model_sd


def trim_log(path, iter_num):
    """log.jsonl keeps the history of the run that continues from iter_num: records of steps after it (made
    before a kill, about to be made again) and a half-written last line are dropped."""
    from checkpoint import write_atomic

    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line).get("iter", 0) <= iter_num:
                    keep.append(line.rstrip("\n") + "\n")
            except ValueError:
                pass
    write_atomic(path, "".join(keep))


def duration(seconds):
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


def refresh_plot(previous):
    """Redraw out_dir/loss.png in a child process, so that matplotlib never adds to this process's memory;
    skipped while the last one still draws, and when matplotlib is not installed. The first drawing (and one after
    a failed one) says "wrote out_dir/loss.png" on this run's stdout; the others say nothing: once is enough."""
    import importlib.util

    if (previous and previous.poll() is None) or importlib.util.find_spec("matplotlib") is None:
        return previous
    return subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"), out_dir],
                            stdout=subprocess.DEVNULL if previous and previous.returncode == 0 else None, stderr=subprocess.DEVNULL)


def open_trackers(config):
    """Optional loggers (W&B, TensorBoard) as functions of a log record; a missing package is one line, not a crash."""
    trackers = []
    if wandb_log:
        try:
            import wandb

            run = wandb.init(project=wandb_project, name=wandb_run_name, config=config)
            trackers.append(lambda r: run.log({k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "iter"}, step=r["iter"]))
        except Exception as e:  # ImportError, or wandb refusing to start (no login, no network): training goes on
            print(f"wandb_log: off ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'pip install wandb'})", flush=True)
    if tensorboard_log:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

            def tb(r):
                for k, v in r.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "time"):
                        writer.add_scalar(k, v, r["iter"])
                writer.flush()
            trackers.append(tb)
        except ImportError:
            print("tensorboard_log: off (pip install tensorboard)", flush=True)
    return trackers


def choose_checkpoint(config, model_keys, meta, damaged=None):
    """Rank 0, before anything in out_dir is written: the checkpoint to resume from, or None for a fresh
    start. damaged: checkpoints that failed to load, passed over (checkpoint.find). Raises CheckpointError (one
    line) for an out_dir this run must not touch, or data made with another tokenizer than the checkpoint's."""
    import checkpoint

    if not resume:
        existing = checkpoint.names(out_dir)
        if existing and not overwrite:
            raise checkpoint.CheckpointError(
                f"{out_dir} already holds checkpoints ({', '.join(sorted(existing, key=lambda n: int(n[5:]))[-3:])}) and "
                f"--resume=False: pass --resume=True to continue that run, --overwrite=True to start over in it, or use a new --out_dir")
        return None
    ckpt = checkpoint.find(out_dir, damaged=damaged)
    if ckpt:
        with open(os.path.join(ckpt, "config.json")) as f:
            saved = json.load(f)
        diff = [k for k in model_keys if saved.get(k) != json.loads(json.dumps(config[k]))]  # as JSON keeps it: () is []
        if diff:
            raise checkpoint.CheckpointError(
                f"config error: {ckpt} holds a different model ({', '.join(f'{k} {saved.get(k)} vs {config[k]}' for k in diff)}): "
                f"use its settings or a new --out_dir")
        if lora_rank and saved.get("base", {}).get("fingerprint") != config["base"]["fingerprint"]:
            raise checkpoint.CheckpointError(
                f"config error: the base {config['base']['path']} differs from the one the adapters in {ckpt} were trained on "
                f"({saved.get('base', {}).get('path')}): use that base, or a new --out_dir to start over")
        # the same ids would mean other text: the vocabulary sizes can agree while the tokenizers do not
        if saved.get("tokenizer") and (saved["tokenizer"], saved.get("eot")) != (meta.get("tokenizer"), meta.get("eot")) \
                and not allow_new_tokenizer:
            raise checkpoint.CheckpointError(
                f"data error: {data_dir}/meta.json says tokenizer {meta.get('tokenizer')} (eot {meta.get('eot')}), but {ckpt} "
                f"was trained on {saved['tokenizer']} (eot {saved.get('eot')}): use data made with that tokenizer, a new "
                f"--out_dir, or --allow_new_tokenizer=True to switch on purpose")
    return ckpt


def main():
    import checkpoint
    from configurator import ConfigError, check_device, configure
    from data_loader import DataError, DataLoader, build_data, decodable, get_tokenizer, needs_building
    from devices import compile_blocks, compiler_error, peak_flops, pick_dtype, set_tf32, uncompile_blocks
    from generate import generate
    from model import GPT, GPTConfig
    from sizing import flops_per_token, param_counts
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    # ---- set-up: settings, processes, device and precision, data; nothing in out_dir is touched until all are good.
    # A bad input anywhere is a BadInput (ConfigError, DataError, ...): one line and exit 2 (configurator.run)
    config = configure(globals())
    check_device(device)  # one line now, not an assertion once out_dir is locked
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process is intended
    model_keys = [f.name for f in fields(GPTConfig) if f.name in config]
    base = None
    if init_from:  # the model is the one those weights belong to: its settings, not the config's
        from weights import adopt_base

        changed, kind, path = base = adopt_base(config)
        globals().update(changed)
        if lora_rank:  # the adapters' checkpoints name their base, and refuse a base that changed under them
            from weights import fingerprint

            config["base"] = {"path": os.path.abspath(path), "kind": kind, "fingerprint": fingerprint(kind, path)}
    rank, world, dev = setup_distributed(device)
    master = rank == 0  # logs, samples to the console, decides about out_dir, writes files other than checkpoint shards
    dist = world > 1
    unwritable = None if eval_only else checkpoint.unwritable(out_dir)  # eval_only writes nothing
    if unwritable:
        fail(f"out_dir error: {unwritable}: use another --out_dir") if master else sys.exit(BAD_INPUT)
    if grad_accum_steps % world:
        raise ConfigError(f"grad_accum_steps {grad_accum_steps} is not a multiple of the {world} processes: "
                          f"it counts micro steps over all ranks; use {max(world, grad_accum_steps // world * world)}")
    accum = grad_accum_steps // world  # micro steps on this rank
    dev_type = "cuda" if dev.startswith("cuda") else "mps" if dev == "mps" else "cpu"
    dt = pick_dtype(dtype, dev_type)
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dt]
    if dist and base_dtype != "float32":  # FSDP gathers a layer as one buffer: one dtype per layer
        raise ConfigError("base_dtype bfloat16 is for one device; under torchrun use dtype=bfloat16, whose gathers are bf16")
    if dist and dt == "float16":
        raise ConfigError("dtype float16 needs a gradient scaler that FSDP does not share; use bfloat16 or float32")
    try:
        GPTConfig.from_dict(config).check_recursion()
    except ValueError as e:  # model.py raises plain ValueErrors: it imports nothing of ours
        raise ConfigError(str(e))
    mor_coef = {"expert": 0.001, "token": 0.1}.get(mor_router, 0.0) if mor_aux_loss_coef is None else mor_aux_loss_coef
    if not master:
        sys.stdout = open(os.devnull, "w")  # one voice: rank 0 prints; errors (stderr) still come from every rank

    def barrier():
        if dist:
            torch.distributed.barrier()

    def all_sum(t):
        if dist:
            torch.distributed.all_reduce(t)
        return t

    def all_mean(t):
        return all_sum(t) / world

    def any_rank(flag):
        """True on every rank when it is True on any: control flow only ever follows values all ranks agreed on."""
        if not dist:
            return bool(flag)
        t = torch.tensor([float(flag)], device=dev)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item() > 0

    def from_rank0(obj):
        if dist:
            box = [obj]
            torch.distributed.broadcast_object_list(box, src=0)
            obj = box[0]
        return obj

    ctx = nullcontext() if dt == "float32" else torch.autocast(device_type=dev_type, dtype=ptdtype)
    use_compile = (dev_type == "cuda") if compile is None else compile
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    tf32 = set_tf32(dev_type)
    if needs_building(data_dir, data_recipe, sys.argv[1:]):
        if master:
            print(f"{data_dir} is missing: building it with prepare_fineweb.py {data_recipe} (the config's data_recipe)", flush=True)
            build_data(data_dir, data_recipe)
        barrier()
    train_data, val_data, train_eval = (DataLoader(data_dir, split, batch_size, block_size, rank, world, config["vocab_size"])
                                        for split in ("train", "val", "train"))
    meta = train_data.meta

    # ---- out_dir: rank 0 decides what to resume (every node may see its own files: only one decides), takes
    # the writer lock and clears what a killed save left; then every rank checks it can see the choice
    def agree(choose):
        """Rank 0's choice (choose() runs there alone; it may raise CheckpointError), made every rank's."""
        verdict = None
        if master:
            try:
                verdict = {"ckpt": choose()}
            except checkpoint.CheckpointError as e:
                verdict = {"error": str(e)}
        verdict = from_rank0(verdict)
        if "error" in verdict:
            fail(verdict["error"]) if master else sys.exit(BAD_INPUT)
        chosen = verdict["ckpt"]
        if chosen:
            unseen = not os.path.exists(os.path.join(chosen, ".metadata")) or test_hook(f"hide_checkpoint:{rank}")
            if any_rank(unseen):
                fail(f"rank {rank} cannot see {chosen}, the checkpoint rank 0 chose: out_dir must be one filesystem that "
                     f"every node shares (README, 'Resuming')") if unseen else sys.exit(BAD_INPUT)
        return chosen

    lock = None  # out_dir's writer lock, held until this process ends

    def first_choice():
        nonlocal lock
        chosen = choose_checkpoint(config, model_keys, meta)
        if not eval_only:  # eval_only reads, and writes nothing
            os.makedirs(out_dir, exist_ok=True)
            lock = checkpoint.lock(out_dir)
            checkpoint.remove_leftovers(out_dir)
        return chosen

    ckpt = agree(first_choice)

    # ---- model and optimizer
    cfg = GPTConfig.from_dict(config)
    with torch.device("meta"):  # no memory until the weights are placed (and, under torchrun, sharded)
        model = GPT(cfg)
    if dist:
        shard_model(model, dev_type, dt)
    model.to_empty(device=dev)
    torch.manual_seed(seed)
    model.init_weights()  # the same values on any number of ranks
    model.activation_checkpointing = activation_checkpointing
    if base and (not ckpt or lora_rank):  # a fine-tune's checkpoints hold its adapters: the base always comes from init_from
        from weights import load_weights

        load_weights(model, kind, path)
        print(f"{'base' if lora_rank else 'initialised'} from {path} ({'HF GptOss' if kind == 'hf' else 'nanoOSS'} weights"
              + (f"; frozen, {param_counts(cfg)['lora'] / 1e6:.2f}M adapter parameters train)" if lora_rank else "; iteration 0, fresh optimizer)")
              + (f"; its model settings replace the config's: {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else ""))
    if lora_rank:  # only the adapters learn: no gradients and no optimizer state for the base
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        for name, p in model.layers.named_parameters():  # cast on use, never copied whole (model.FrozenMatmul)
            if base_dtype == "bfloat16" and p.dim() >= 2 and not p.requires_grad and not name.endswith("bias"):
                p.data = p.data.to(torch.bfloat16)
    # fused: one kernel for all parameters, on CPU and MPS too (2.8x foreach's speed on this project's CPU)
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2), fused=True)
    scaler = torch.amp.GradScaler(dev_type, enabled=dt == "float16")
    iter_num, best_val_loss = 0, float("inf")

    # ---- resume. A checkpoint complete by its sizes may still not read (zeros where a power loss left them), which
    # shows only here: rank 0 names the file and picks the one before it, and every rank loads that instead
    damaged = {}
    while ckpt:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": saved_part(model_sd), "optim": optim_sd, "trainer": b""}
        try:
            checkpoint.load(state, ckpt, diagnose=master)
            error = None
        except checkpoint.CheckpointError as e:
            error = e
        if not any_rank(error is not None):
            break

        def fallback(failed=ckpt):
            if not isinstance(error, checkpoint.Damaged):  # the files read: something else is wrong, which an older one shares
                raise checkpoint.CheckpointError(f"checkpoint error: {error or f'another rank cannot read {failed}'}: "
                                                 f"move it away to resume from the one before")
            damaged[os.path.basename(failed)] = str(error)
            return choose_checkpoint(config, model_keys, meta, damaged)
        ckpt = agree(fallback)
    if ckpt:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not lora_rank))
        trainer = pickle.loads(state["trainer"])
        iter_num, best_val_loss = trainer["iter_num"], trainer["best_val_loss"]
        try:
            train_data.load_state_dict(trainer["data"])
        except DataError as e:
            fail(f"data error: {e}")
        set_rng_state(trainer["rng"], dev_type)
        print(f"resumed from {ckpt} at iter {iter_num}")

    log_path = os.path.join(out_dir, "log.jsonl")
    if master and not eval_only:
        trim_log(log_path, iter_num)

    def save():
        """A checkpoint of this moment, then pruning (checkpoint.py says what is promised)."""
        heartbeat("save", force=True)
        trainer = {"iter_num": iter_num, "best_val_loss": best_val_loss, "data": train_data.state_dict(), "rng": rng_state(dev_type)}
        model_sd, optim_sd = get_state_dict(model, optimizer)
        try:
            path = checkpoint.save(out_dir, iter_num, {"model": saved_part(model_sd), "optim": optim_sd, "trainer": pickle.dumps(trainer)},
                                   {**config, "tokenizer": meta.get("tokenizer"), "eot": meta.get("eot"), "world_size": world},
                                   master, barrier)
        except checkpoint.DiskFull as e:  # bad input to the run (its out_dir): a restart cannot help, exit 2
            fail(f"checkpoint error: {e}: free space there, lower --keep_last_n (now {keep_last_n}), or use another --out_dir")
        except checkpoint.CheckpointError as e:
            fail(f"checkpoint error: {e}", 1)
        if master:
            checkpoint.prune(out_dir, keep_last_n)
        print(f"saved {path}")

    raw_model = model
    compile_off = None  # the first step that runs eager after a compiler error (None: compiled throughout, or never)
    if use_compile:
        try:
            compile_blocks(model, compile_backend)  # in place: model, generate and eval all use the compiled blocks
        except Exception as e:  # an unknown backend name, a module:function that does not import
            fail(f"config error: compile_backend {compile_backend!r}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]} "
                 f"(use inductor, aot_eager, or module:function)")

    def eager_from_here(why, where):
        """A compiler error (`why`, one line) at `where`: the rest of the run is eager (the same numbers, slower); one
        line says so, the log and the heartbeat say from which step."""
        nonlocal compile_off
        uncompile_blocks(raw_model)
        compile_off = iter_num + 1
        print(f"compile off from step {compile_off}: {where} failed under torch.compile ({why}); eager from here", flush=True)
        if not eval_only:
            log({"iter": iter_num, "compile_off": compile_off, "compile_error": why})
            heartbeat("compile off", force=True)

    def compiled_or_eager(fn, where):
        """fn(), and after a compiler error inside it, fn() again eager (eval and the sample change no state). Under
        torchrun every rank meets the same graphs at the same call, so all fail there and fall back together."""
        try:
            return fn()
        except Exception as e:
            why = use_compile and compile_off is None and compiler_error(e)
            if not why:
                raise
            eager_from_here(why, where)
            return fn()

    @torch.no_grad()
    def estimate_loss():
        """Mean loss over the first eval_iters batches of each split: the same batches every time, so
        evals are comparable and resuming does not change them. Ranks split the batches (each reads its
        slice of a global step), so with eval_iters a multiple of the world size the number is the same
        on any number of processes."""
        model.eval()
        # the loss loss_chunk tokens at a time (a row if 0): with no graph to keep, eval then needs less memory
        # than a training step of the same micro batch, never more (an eval OOM hours into a run is the worst kind)
        chunk = loss_chunk or block_size
        out = {}
        runs = [("train", train_eval), ("val", val_data)]
        if mor_router == "expert":  # and with training's top-k over each sequence: the gap is what top-k reads of the future
            runs.append(("val_topk", val_data))
        for split, loader in runs:
            loader.reset()
            losses = torch.zeros(max(1, eval_iters // world), device=dev)
            hits = torch.zeros(2, device=dev)  # tokens the top guess got right, tokens scored (masked ones are not)
            for i in range(len(losses)):
                x, y = loader.next_batch()
                with ctx:
                    loss, stats = model(x.to(dev), y.to(dev), loss_chunk=chunk, mor_topk=True if split == "val_topk" else None)[1:]
                losses[i] = loss
                hits += torch.stack([stats["correct"], stats["scored"]]).float()
            out[split] = all_mean(losses.mean()).item()
            correct, scored = all_sum(hits).tolist()
            out[split + "_acc"] = correct / max(scored, 1)
        model.train()
        return out

    def report_eval(losses):
        print(f"eval {iter_num} | train {losses['train']:.3f} | val {losses['val']:.3f} | val ppl {math.exp(losses['val']):.1f} | "
              f"val acc {losses['val_acc']:.1%}" + (" (assistant tokens only)" if meta.get("loss_mask") else "")
              + (f" | val with top-k routing {losses['val_topk']:.3f} (causal: the first)" if "val_topk" in losses else ""), flush=True)

    if eval_only:  # score what would be resumed (or init_from's weights) and leave
        report_eval(compiled_or_eager(estimate_loss, "the eval"))
        if dist:
            torch.distributed.destroy_process_group()
        return

    tokenizer = allowed = None
    sampling = sample_every > 0

    def sample_text():
        """Under FSDP every rank must run the forward (each holds a shard of the weights), so all ranks
        sample in lockstep with the same generator, and rank 0 prints. Only ids the tokenizer can decode."""
        nonlocal tokenizer, allowed
        if tokenizer is None:
            tokenizer = get_tokenizer(meta["tokenizer"])
            allowed = torch.from_numpy(decodable(tokenizer, cfg.vocab_size)).to(dev)
        g = torch.Generator(device=dev).manual_seed(seed + iter_num)  # its own RNG: sampling never shifts training
        start = torch.tensor([[meta.get("eot", 0)]], device=dev)
        raw_model.eval()
        try:
            with ctx:
                out = generate(raw_model, start, sample_tokens, temperature=temperature, top_k=top_k, generator=g, allowed=allowed)
        finally:
            raw_model.train()
        return tokenizer.decode(out[0, 1:].tolist())

    # ---- signals and heartbeat. A handler only raises this rank's flag; the loop folds it into an agreement
    # of all ranks at the next micro step or step, and acts on the agreed value alone, so a signal is never
    # lost (nothing lowers the flag) and ranks never part ways (one saving while another runs a forward).
    flags = {"stop": False, "free": False}

    def on_stop(signum, frame):
        if flags["stop"]:  # second Ctrl-C: the user means it
            raise KeyboardInterrupt
        flags["stop"] = True
        print(f"signal {signal.Signals(signum).name}: stopping at the next micro step, then saving", flush=True)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda s, f: flags.update(free=True))
    heartbeat_path = os.path.join(out_dir, "heartbeat.json")
    last_beat = 0.0

    def out_of_space(e, path):
        """A write to out_dir that failed on a full disk ends the run in one line, exit 2: a restart cannot help
        until space is freed, and latest still names the last good checkpoint. Any other error goes on as raised."""
        full = checkpoint.no_space(e, path)
        if full is None:
            raise e
        fail(f"{full}: free space there or use another --out_dir; latest still names {checkpoint.read_latest(out_dir) or 'none'}")

    def heartbeat(phase, force=False):
        nonlocal last_beat
        now = time.time()
        if master and (force or now - last_beat >= 1.0):
            used, total = memory_gb(dev, now=True)
            reserved = torch.cuda.max_memory_reserved(dev) / 1e9 if dev_type == "cuda" else None  # the peak, for bench/memory.py
            try:
                checkpoint.write_atomic(heartbeat_path, json.dumps({"time": now, "pid": os.getpid(), "iter": iter_num, "phase": phase,
                                                                    "device_mem_gb": used, "device_total_gb": total, "peak_rss_gb": peak_rss_gb(),
                                                                    "max_memory_reserved_gb": reserved, "eta_s": eta_s(),
                                                                    "compile_off": compile_off}), sync=False)
            except OSError as e:
                out_of_space(e, heartbeat_path)
            last_beat = now

    # ---- the loop
    n = param_counts(cfg)
    tokens_per_iter = batch_size * block_size * grad_accum_steps
    flops_per_iter = flops_per_token(cfg, block_size) * tokens_per_iter
    peak = peak_flops(dev, dt)
    print(f"{f'{world} processes (FSDP) | ' if dist else ''}device {dev} | dtype {dt} | compile {use_compile} | tf32 {'on' if tf32 else 'off'} | "
          f"params {n['total'] / 1e6:.2f}M total, {n['active'] / 1e6:.2f}M active | {tokens_per_iter} tokens/iter")
    log_file = open(log_path, "a") if master else None
    trackers = open_trackers(config) if master else []

    def log(record):
        if master:
            try:
                log_file.write(json.dumps(record) + "\n")
                log_file.flush()
            except OSError as e:
                out_of_space(e, log_path)
            for track in trackers:
                track(record)

    t_start, iter_start = time.time(), iter_num

    def eta_s():
        """Seconds to max_iters at this process's pace so far (evals and saves included)."""
        done = iter_num - iter_start
        return (time.time() - t_start) / done * (max_iters - iter_num) if done else None

    heartbeat("start", force=True)
    t_last, tokens_since, plotter = time.time(), 0, None
    stop = dropped = False  # agreed by all ranks

    def rewind(step_start):
        """Back to a step's start (dropped, or its compiled forward or backward failed): no gradients, and the data
        position and RNG of its first micro step, so that redoing it gives what it would have given."""
        optimizer.zero_grad(set_to_none=True)
        train_data.load_state_dict(step_start[0])
        set_rng_state(step_start[1], dev_type)

    while iter_num < max_iters and not stop:
        step_start = train_data.state_dict(), rng_state(dev_type)  # a stop mid-step, or a compiler error, goes back here
        failed = None  # a compiler error (one line) in this step's forward or backward
        cur_lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group["lr"] = cur_lr
        loss_sum = torch.zeros((), device=dev)
        aux_sum = torch.zeros((), device=dev)
        z_sum, mor_sum = torch.zeros((), device=dev), torch.zeros(2, device=dev)  # MoR: router loss, z-loss (token)
        mor_share = torch.zeros(n_recursion, device=dev)  # share of tokens through each recursion step (this rank's)
        load = torch.zeros(cfg.n_layer, cfg.n_expert, device=dev)  # per applied layer
        for micro in range(accum):
            if test_hook(f"sigterm:micro:{iter_num + 1}.{micro}:{rank}"):
                os.kill(os.getpid(), signal.SIGTERM)
            # a long step (8b_moe: 32 micro steps) outlasts torchrun's 30 s between a signal and SIGKILL: check
            # between micro steps, and drop the unfinished step rather than finish it
            if micro and any_rank(flags["stop"]):
                stop = dropped = True
                break
            if dist:  # reduce-scatter the gradients only after the last micro step, unless memory asks for every one
                raw_model.set_requires_gradient_sync(sync_grads_every_micro_step or micro == accum - 1)
            x, y = train_data.next_batch()
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            try:
                with ctx:
                    loss, stats = model(x, y, loss_chunk=loss_chunk)[1:]  # not `_, loss, stats`: that would keep the logits alive through backward
                    total = loss + router_aux_loss_coef * stats["aux"] + router_z_loss_coef * stats["z"]
                    if "mor_aux" in stats:
                        mor_z = stats.get("mor_z", torch.zeros((), device=dev))
                        total = total + mor_coef * stats["mor_aux"] + mor_z_loss_coef * mor_z
                        mor_sum += torch.stack([stats["mor_aux"], mor_z]).detach()
                        mor_share += stats["mor_share"] / accum
                scaler.scale(total / accum).backward()  # FSDP then averages over ranks: the mean over all micro batches
            except Exception as e:
                failed = use_compile and compile_off is None and compiler_error(e)
                if not failed:
                    raise
                break
            loss_sum += loss.detach()
            aux_sum += stats["aux"].detach()
            z_sum += stats["z"].detach()
            load += stats["load"]
        if use_compile and compile_off is None and any_rank(failed is not None):  # all ranks go eager together
            eager_from_here(failed or "a compiler error on another rank", f"step {iter_num + 1}")
            rewind(step_start)
            continue  # the same step again, eager
        if dropped:  # the checkpoint then holds the data position and RNG of this step's start: resuming redoes it exactly
            rewind(step_start)
            print(f"stopping: step {iter_num + 1} dropped after {micro} of {accum} micro steps (it is redone on resume)", flush=True)
            break
        scaler.unscale_(optimizer)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        if hasattr(gnorm, "full_tensor"):  # FSDP: the norm over all shards, the same on every rank
            gnorm = gnorm.full_tensor()
        # one host sync per step: a non-finite loss must stop the run before the optimizer touches weights,
        # and every rank must agree on stopping (a signal may reach them at different steps)
        step = all_sum(torch.stack([loss_sum / accum / world, torch.tensor(float(flags["stop"]), device=dev)]))
        if test_hook(f"sigterm:sync:{iter_num + 1}:{rank}"):
            os.kill(os.getpid(), signal.SIGTERM)
        lossf, stop_votes, gnormf = torch.cat([step, gnorm.float().reshape(1)]).tolist()
        stop = stop_votes > 0  # a signal that came after the vote stays raised for the next one
        if not math.isfinite(lossf) or (not math.isfinite(gnormf) and dt != "float16"):
            last = checkpoint.read_latest(out_dir)
            fail(f"stopping: {'loss' if not math.isfinite(lossf) else 'gradient norm'} is not finite at iter "
                 f"{iter_num + 1}; weights not updated, last good checkpoint: {last or 'none'} "
                 f"(try a lower --lr or --grad_clip)", NON_FINITE)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        tokens_since += tokens_per_iter
        heartbeat("train")

        if iter_num % log_interval == 0 or iter_num == max_iters:
            now = time.time()
            tok_s = tokens_since / max(now - t_last, 1e-9)
            t_last, tokens_since = now, 0
            mfu = flops_per_iter / tokens_per_iter * tok_s / (peak * world) if peak else None
            used, total_mem = memory_gb(dev)
            auxf, zf, morf, morzf = (all_sum(torch.cat([torch.stack([aux_sum, z_sum]), mor_sum])) / grad_accum_steps).tolist()
            all_sum(load)
            # MoR: the router's loss and the share of tokens through each recursion step
            mor = f" | mor {morf:.3f} ({'/'.join(f'{v:.2f}' for v in mor_share.tolist())})" if mor_router != "none" else ""
            print(f"iter {iter_num} | loss {lossf:.3f} | aux {auxf:.2f} | z {zf:.2f}{mor} | lr {cur_lr:.1e} | gnorm {gnormf:.2f} | "
                  f"{tok_s / 1e3:.1f}k tok/s | mfu {f'{mfu:.0%}' if mfu is not None else '-'} | mem {used:.1f}/{total_mem:.1f} GB | "
                  f"eta {duration(eta_s())}", flush=True)
            record = {"iter": iter_num, "tokens": iter_num * tokens_per_iter, "loss": lossf, "aux": auxf, "z": zf, "lr": cur_lr, "gnorm": gnormf,
                      "tok_per_s": tok_s, "mfu": mfu, "mem_gb": used, "time": now, "batch_size": batch_size,
                      "grad_accum_steps": grad_accum_steps, "tokens_per_iter": tokens_per_iter}
            if mor_router != "none":
                record["mor_aux"], record["mor_share"] = morf, [round(s, 4) for s in mor_share.tolist()]
            if mor_router == "token":
                record["mor_z"] = morzf
            if log_router_stats:
                share = load / load.sum(dim=1, keepdim=True)
                record["load"] = share.tolist()  # [layer][expert]: each expert's share of the assignments
                record["load_min"] = share.min(dim=1).values.tolist()
                record["load_max"] = share.max(dim=1).values.tolist()
            log(record)

        if eval_interval > 0 and (iter_num % eval_interval == 0 or iter_num == max_iters):
            heartbeat("eval", force=True)
            if test_hook(f"sigterm:eval:{iter_num}:{rank}"):
                os.kill(os.getpid(), signal.SIGTERM)
            losses = compiled_or_eager(estimate_loss, f"the eval at iter {iter_num}")
            best_val_loss = min(best_val_loss, losses["val"])
            report_eval(losses)
            log({"iter": iter_num, "eval": True, "train_loss": losses["train"], "val_loss": losses["val"], "val_acc": losses["val_acc"],
                 **({"val_loss_topk": losses["val_topk"]} if "val_topk" in losses else {}),
                 "val_ppl": math.exp(losses["val"]), "time": time.time(), "tokens": iter_num * tokens_per_iter})
            if master and plot:
                plotter = refresh_plot(plotter)

        if sampling and iter_num % sample_every == 0:
            try:
                print(f"sample {iter_num} | {compiled_or_eager(sample_text, f'the sample at iter {iter_num}')!r}", flush=True)
            except Exception as e:  # no tokenizer offline, a meta.json that names none, ...: a sample never ends a run
                print(f"sampling off: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", flush=True)
                sampling = False

        if flags["free"]:
            gc.collect()
            if dev_type == "cuda":
                torch.cuda.empty_cache()
            elif dev_type == "mps":
                torch.mps.empty_cache()
            flags["free"] = False
            print("freed cached memory (SIGUSR1)", flush=True)

        if iter_num % save_every == 0 or iter_num == max_iters or stop:
            save()
    if dropped and checkpoint.read_latest(out_dir) != f"ckpt_{iter_num}":  # (when it names it, that one is this state)
        save()
    if lora_rank and iter_num == max_iters:  # the finished adapters, in the format people load (peft's)
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        from export_hf import write_peft_adapter

        full = get_model_state_dict(raw_model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # all ranks
        if master:
            write_peft_adapter(full, cfg, config["base"]["path"], os.path.join(out_dir, "adapter"))
            size = os.path.getsize(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))
            print(f"adapters: {os.path.join(out_dir, 'adapter')} ({size / 1e6:.1f} MB, peft's format); "
                  f"a plain model: python export_hf.py --ckpt={out_dir} --out=DIR (merged)", flush=True)

    heartbeat("done", force=True)
    if master:
        log_file.close()
        if plotter:
            plotter.wait()  # the last loss.png is whole before the run says it is done
    if dist:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    from configurator import run

    run(main)
