"""
Train a GPT-OSS-style Mixture-of-Experts model on one device (CUDA, Apple MPS or CPU, picked for you)
or on many under torchrun (FSDP2, one process per GPU):
    python train.py config/mac_micro.py
    python train.py config/mac_micro.py --batch_size=4 --max_iters=200
    torchrun --nproc_per_node=8 train.py config/8b_moe.py
Every setting below can be changed by a config file or --key=value. The run checkpoints to out_dir and
resumes from out_dir/latest by itself. SIGTERM / Ctrl-C: finish the step, save, exit 0.
SIGUSR1: free cached memory now. A heartbeat file in out_dir tells safe_train.py how the run is doing.
The story of a run is main(), at the end: it calls the phases in the order they come here, after the settings, the
run's state (RunState) and the collectives.
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
from dataclasses import dataclass, field, fields
from types import SimpleNamespace

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict

import checkpoint
from configurator import ConfigError, check_device, configure
from data_loader import DataError, DataLoader, build_data, decodable, get_tokenizer, needs_building
from devices import compile_blocks, compiler_error, peak_flops, pick_device, pick_dtype, set_tf32, uncompile_blocks
from export_hf import write_peft_adapter
from generate import Stops, generate
from model import GPT, GPTConfig
from sizing import flops_per_token, param_counts
from weights import adopt_base, fingerprint, load_weights

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/stdlib_docs"  # meta.json + token shards (prepare_fineweb.py)
# how to build the config's own data_dir when it is missing (prepare_fineweb.py's arguments): the embedded default
# that makes `python train.py config/mac_micro.py` a first command. Never used for a --data_dir you typed.
data_recipe = "--corpus=stdlib --encoding=o200k_base --val_tokens=100000"
out_dir = "out"  # checkpoints, log.jsonl, heartbeat.json, loss.png, the adapters of a fine-tune
resume = True  # continue from out_dir/latest when there is one
allow_new_tokenizer = False  # resume on data made with another tokenizer than the checkpoint's (a deliberate switch)
init_from = ""  # a fresh run starts from these weights alone: an HF GptOss directory (bf16, or MXFP4 experts) or a nanoOSS
# checkpoint (or out_dir). Its model settings replace the config's (block_size stays yours); iteration 0, fresh optimizer.
# A rerun resumes from out_dir as usual: init_from only seeds a run that has no checkpoint yet.
overwrite = False  # with resume=False: start over in an out_dir that holds checkpoints (they are pruned as new ones are saved)
eval_interval = 250  # iterations between evals, and one at max_iters (0 = no evals)
eval_iters = 20  # batches per split for an eval
eval_only = False  # score the checkpoint to resume (or init_from's weights) on both splits, print, exit: trains and writes nothing
log_interval = 10  # iterations between log lines (and log.jsonl records)
log_router_stats = True  # per-layer expert load in log.jsonl (every expert's share, per layer)
plot = True  # refresh out_dir/loss.png at each eval (plot.py, in a child process; needs matplotlib)
wandb_log = False  # also log to Weights & Biases (pip install wandb; WANDB_MODE=offline works without a network)
wandb_project = "nanooss"  # W&B project
wandb_run_name = "run"  # W&B run name
tensorboard_log = False  # also write TensorBoard event files to out_dir/tensorboard (pip install tensorboard)
save_every = 250  # iterations between checkpoints (and one at the end, or at a stop)
keep_last_n = 3  # checkpoints kept on disk (the newest)
sample_every = 500  # print a text sample every N iterations (0 = never)
sample_tokens = 64  # tokens per periodic sample
temperature = 0.8  # the periodic sample's (0 = greedy)
top_k = 200  # the periodic sample picks among the k likeliest tokens (0 = every token)
top_p = 1.0  # then among the likeliest whose probabilities add up to top_p (1 = every token); sample.py's meanings
min_p = 0.0  # then drops the tokens less likely than min_p times the likeliest (0 = off)
repetition_penalty = 1.0  # ids already in the sample made less likely (1 = off); it ends at end-of-text
# data
batch_size = 8  # micro batch per device
eval_batch_size = 0  # the evals' micro batch, at most batch_size (0 = batch_size): smaller on a device short of memory
block_size = 256  # tokens per sequence: the context trained at
grad_accum_steps = 1  # micro steps per optimizer step, over all ranks (as nanoGPT): each rank does grad_accum_steps / world_size
sync_grads_every_micro_step = False  # FSDP: reduce-scatter after every micro step: sharded gradients (less memory), more traffic
activation_checkpointing = False  # recompute each block in the backward: ~1/3 more compute, activations of one block
loss_chunk = 512  # tokens per piece of the loss, fused with its gradient: [tokens, vocab] logits never exist whole (0 = all at once)
# model (see model.GPTConfig)
vocab_size = 201088  # embedding rows, at least the data's ids (the loader checks meta.json): o200k_harmony padded, as gpt-oss
n_layer = 4  # applied layers (blocks; fewer unique ones under recursion)
n_embd = 256  # model width (a multiple of 8)
n_head = 4  # query heads
n_kv_head = 2  # key/value heads (grouped-query attention: n_head / n_kv_head queries share one)
head_dim = 64  # width of one head (even: RoPE rotates pairs)
n_expert = 4  # experts per MoE layer
experts_per_token = 2  # experts each token goes to (top-k of the router)
intermediate_size = 256  # hidden width of one expert (a multiple of 8)
sliding_window = 128  # tokens a sliding-window layer attends to
attn_pattern = "SF"  # per layer, repeated: S = sliding window, F = full causal
sinks = True  # learned per-head attention sink logits
swiglu_limit = 7.0  # the experts' SwiGLU clamp (gpt-oss's)
rope_theta = 150000.0  # RoPE base
rope_scaling_factor = 1.0  # YaRN factor (1 = plain RoPE)
initial_context_length = 4096  # the context YaRN stretches from
tie_embeddings = False  # the output layer shares the embedding matrix (small models: half the vocabulary parameters)
# fine-tuning with LoRA (needs init_from: the base it adapts, frozen): rank-r adapters; checkpoints hold only them
lora_rank = 0  # adapter rank r (0 = no LoRA: a full run)
lora_alpha = 16.0  # adapter scale: updates are multiplied by lora_alpha / lora_rank
lora_targets = "q,k,v,o,experts"  # any of q, k, v, o, experts, router
base_dtype = "float32"  # bfloat16: the frozen base's layer matrices sit in bf16, half their memory (one device)
# Mixture-of-Recursions (model.GPTConfig says more; README, "Mixture-of-Recursions"): n_layer applied layers from
# shared blocks run n_recursion times; mor_router expert: each step keeps its top tokens (capacities, gate alpha);
# token: each token's depth is picked as it enters (a balancing loss keeps the depths used)
n_recursion = 1  # passes through the shared blocks (1 = no recursion)
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
router_aux_loss_coef = 0.01  # weight of the load-balancing loss
router_z_loss_coef = 0.001  # weight of the router's z-loss (mean logsumexp^2)
# optimizer
lr = 3e-4  # peak learning rate, after warmup
min_lr = 3e-5  # learning rate at lr_decay_iters and after
weight_decay = 0.1  # AdamW decay, on weight matrices and experts only
beta1 = 0.9  # AdamW
beta2 = 0.95  # AdamW
grad_clip = 1.0  # 0 = off
warmup_iters = 100  # linear warmup from ~0 to lr
lr_decay_iters = 5000  # cosine decay from lr down to min_lr ends here
max_iters = 5000  # optimizer steps in the run
# system
device = "auto"  # auto | cuda | cuda:N | mps | cpu
dtype = "auto"  # auto | float32 | bfloat16 | float16
compile = None  # None = on for CUDA only (on CPU and MPS it compiles for ~30 s and is no faster); a compiler error: eager
compile_backend = "inductor"  # torch.compile's backend: a name it knows (aot_eager: no code generation) or module:function
seed = 1337  # the initial weights (the same on any number of ranks) and the periodic sample's generator
# -----------------------------------------------------------------------------


# exit codes, for safe_train.py and your scripts: 0 finished or stopped cleanly (and saved); 2 bad input (a
# config, data or out_dir problem: running again will not help); 3 the loss or gradient went non-finite.
# Anything else is a crash. Upper-case names are constants, not settings: no --BAD_INPUT, not in config.json.
BAD_INPUT, NON_FINITE = 2, 3

# Fault points for tests (NANOOSS_TEST_HOOKS=name,...): a signal delivered inside the windows that a real signal hits
# only by chance, a checkpoint hidden from one rank as a node without the shared filesystem would see it.
FAULTS = frozenset(os.environ.get("NANOOSS_TEST_HOOKS", "").split(",")) - {""}


def fault_point(name):
    """True when a test asked for `name`; a point named sigterm:... then sends this process SIGTERM. Off (no
    NANOOSS_TEST_HOOKS), it is one lookup in an empty set."""
    if name not in FAULTS:
        return False
    if name.startswith("sigterm:"):
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def fail(msg, code=BAD_INPUT):
    print(msg, file=sys.stderr, flush=True)
    sys.exit(code)


def stop_now(signum, frame):
    """SIGINT or SIGTERM when there is no step to finish and save (set-up, eval_only), or a second one (the user means
    it): one line, and the process ends at once, 128 + the signal's number (as a shell reports it). A rerun loses
    nothing: latest names a complete checkpoint, and a save cut short leaves a temporary folder the next start
    removes. Not KeyboardInterrupt: DCP wraps one raised inside a load into an error that blames the checkpoint
    ("cannot read ckpt_N: move it away"), and one inside a save into its own traceback."""
    try:
        sys.stdout.flush()
        print(f"train.py: stopped at once ({signal.Signals(signum).name}): nothing saved since the last checkpoint, which a "
              f"rerun resumes from", file=sys.stderr, flush=True)
    finally:  # also when stderr's reader has gone too (2>&1 | tee)
        os._exit(128 + signum)


class Console:
    """Rank 0's stdout, which outlives its reader: in `python train.py ... | tee run.log` a Ctrl-C ends tee first, and
    the signal's own line would raise BrokenPipeError and end the run unsaved. Once the reader is gone, stdout (this
    process's and its children's) goes to /dev/null and the run goes on as if it were there; log.jsonl has the numbers."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        try:
            return self.stream.write(text)
        except BrokenPipeError:
            self.reader_gone()
            return len(text)

    def flush(self):
        try:
            self.stream.flush()
        except BrokenPipeError:
            self.reader_gone()

    def reader_gone(self):  # the stream's buffered text then drains into /dev/null, at exit too
        os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):  # fileno, isatty, encoding, ...
        return getattr(self.stream, name)


@dataclass
class RunState:
    """What the phases of one run share: where it runs, its data, model and optimizer, how far it got, and the
    bookkeeping of its logs. set_up makes it; each phase fills in its part. The settings are not here: they are
    `config`, read once by read_settings."""
    rank: int  # this process (0 when alone, or rank 0 under torchrun: it logs and decides)
    world: int  # processes
    dev: str  # cuda:N | mps | cpu
    dev_type: str  # cuda | mps | cpu
    dt: str  # the forward's precision: float32 | bfloat16 | float16
    ctx: object  # autocast to dt (nothing for float32)
    accum: int  # micro steps per step on this rank: grad_accum_steps counts them over all ranks
    use_compile: bool  # the blocks run compiled
    tf32: bool  # TF32 matmuls (devices.set_tf32)
    mor_coef: float  # MoR: the router loss's weight (mor_aux_loss_coef, or the paper's for the router in use)
    train_data: DataLoader = None
    val_data: DataLoader = None
    train_eval: DataLoader = None  # the train split again, for evals: read from its start each time
    meta: dict = None  # data_dir/meta.json
    lock: object = None  # out_dir's writer lock, held until this process ends
    cfg: GPTConfig = None
    model: GPT = None  # its blocks compiled in place when use_compile: the loop, eval and the sample all use them
    optimizer: torch.optim.Optimizer = None
    scaler: torch.amp.GradScaler = None  # float16's loss scaling (off for the other dtypes)
    iter_num: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    compile_off: int = None  # the first step that ran eager after a compiler error (None: compiled throughout, or never)
    flags: dict = field(default_factory=lambda: {"stop": False, "free": False})  # this rank's signals (the handlers)
    stop: bool = False  # agreed by all ranks: save and end after this step
    dropped: bool = False  # agreed by all ranks: the step in progress was dropped for a stop (a resume redoes it)
    sampling: bool = False  # the periodic sample is on (a failed one turns it off)
    tokenizer: object = None  # the periodic sample's, made at its first use
    allowed: torch.Tensor = None  # the ids that tokenizer decodes: the only ones sampled
    log_file: object = None  # out_dir/log.jsonl (rank 0)
    trackers: list = field(default_factory=list)  # W&B, TensorBoard: functions of a log record
    plotter: subprocess.Popen = None  # the child drawing loss.png
    tokens_per_iter: int = 0  # over all ranks
    flops_per_iter: float = 0.0
    peak: float = None  # the device's peak FLOP/s in dt, for MFU (None: unknown)
    t_start: float = 0.0  # the loop's start, and its iteration then: the ETA
    iter_start: int = 0
    t_last: float = 0.0  # the last log line, and tokens trained since: tokens/s
    tokens_since: int = 0
    last_beat: float = 0.0  # the last heartbeat

    @property
    def master(self):
        return self.rank == 0

    @property
    def dist(self):
        return self.world > 1


# ---- collectives. Under torchrun every rank calls each at the same point of the run; alone they do nothing.
def distributed():
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def barrier():
    if distributed():
        torch.distributed.barrier()


def all_sum(t):
    """t summed over all ranks, in place."""
    if distributed():
        torch.distributed.all_reduce(t)
    return t


def all_mean(t):
    return all_sum(t) / (torch.distributed.get_world_size() if distributed() else 1)


def any_rank(flag, dev):
    """True on every rank when it is True on any: control flow only ever follows values all ranks agreed on."""
    if not distributed():
        return bool(flag)
    t = torch.tensor([float(flag)], device=dev)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item() > 0


def from_rank0(obj):
    """Rank 0's obj (anything picklable), on every rank."""
    if distributed():
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def agree(run, choose):
    """Rank 0's choice of a checkpoint (choose() runs there alone; it may raise CheckpointError), made every rank's:
    an error is one line from rank 0 and exit 2 on all; a rank that cannot see the choice stops them all."""
    verdict = None
    if run.master:
        try:
            verdict = {"ckpt": choose()}
        except checkpoint.CheckpointError as e:
            verdict = {"error": str(e)}
    verdict = from_rank0(verdict)
    if "error" in verdict:
        fail(verdict["error"]) if run.master else sys.exit(BAD_INPUT)
    chosen = verdict["ckpt"]
    if chosen:
        unseen = not os.path.exists(os.path.join(chosen, ".metadata")) or fault_point(f"hide_checkpoint:{run.rank}")
        if any_rank(unseen, run.dev):
            fail(f"rank {run.rank} cannot see {chosen}, the checkpoint rank 0 chose: out_dir must be one filesystem that "
                 f"every node shares (README, 'Resuming')") if unseen else sys.exit(BAD_INPUT)
    return chosen


# ---- the phases of a run, in the order main() calls them
def read_settings():
    """The settings of this run as one object (config.lr, ...): the defaults above, then a config file and --key=value
    (configurator.configure checks them all), then for init_from the base's model settings. Returns (config, base):
    base is (the settings init_from changed, its kind, its path), or None. A bad setting is a ConfigError."""
    config = configure(dict(globals()))  # on a copy: the globals stay the defaults a reader sees above
    check_device(config["device"])  # one line now, not an assertion once out_dir is locked
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # DCP in one process is intended
    base = None
    if config["init_from"]:  # the model is the one those weights belong to: its settings, not the config's
        changed, kind, path = base = adopt_base(config)
        if config["lora_rank"]:  # the adapters' checkpoints name their base, and refuse a base that changed under them
            config["base"] = {"path": os.path.abspath(path), "kind": kind, "fingerprint": fingerprint(kind, path)}
    return SimpleNamespace(**config), base


def set_up(config):
    """Processes, device, precision and seeds, with the checks that need them, all before anything in out_dir is
    touched. Returns the run's state. A bad input is one line and exit 2 (a ConfigError, through configurator.run)."""
    rank, world, dev = setup_distributed(config.device)
    master = rank == 0  # logs, samples to the console, decides about out_dir, writes files other than checkpoint shards
    unwritable = None if config.eval_only else checkpoint.unwritable(config.out_dir)  # eval_only writes nothing
    if unwritable:
        fail(f"out_dir error: {unwritable}: use another --out_dir") if master else sys.exit(BAD_INPUT)
    if config.grad_accum_steps % world:
        raise ConfigError(f"grad_accum_steps {config.grad_accum_steps} is not a multiple of the {world} processes: it counts "
                          f"micro steps over all ranks; use {max(world, config.grad_accum_steps // world * world)}")
    dev_type = "cuda" if dev.startswith("cuda") else "mps" if dev == "mps" else "cpu"
    dt = pick_dtype(config.dtype, dev_type)
    if world > 1 and config.base_dtype != "float32":  # FSDP gathers a layer as one buffer: one dtype per layer
        raise ConfigError("base_dtype bfloat16 is for one device; under torchrun use dtype=bfloat16, whose gathers are bf16")
    if world > 1 and dt == "float16":
        raise ConfigError("dtype float16 needs a gradient scaler that FSDP does not share; use bfloat16 or float32")
    try:
        GPTConfig.from_dict(vars(config)).check_recursion()
    except ValueError as e:  # model.py raises plain ValueErrors: it imports nothing of ours
        raise ConfigError(str(e))
    # one voice: rank 0 prints (to a console that may go away); errors (stderr) still come from every rank
    sys.stdout = Console(sys.stdout) if master else open(os.devnull, "w")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dt]
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    mor_coef = {"expert": 0.001, "token": 0.1}.get(config.mor_router, 0.0) if config.mor_aux_loss_coef is None else config.mor_aux_loss_coef
    return RunState(rank=rank, world=world, dev=dev, dev_type=dev_type, dt=dt, accum=config.grad_accum_steps // world,
                    ctx=nullcontext() if dt == "float32" else torch.autocast(device_type=dev_type, dtype=ptdtype),
                    use_compile=(dev_type == "cuda") if config.compile is None else config.compile,
                    tf32=set_tf32(dev_type), mor_coef=mor_coef)


def setup_distributed(want_device):
    """Under torchrun (WORLD_SIZE > 1): join the process group, NCCL on GPUs and gloo on CPU, and return
    (rank, world_size, device). One process: (0, 1, the device picked as usual)."""
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


def open_data(config, run):
    """The loaders: train, val, and the train split again for evals; the config's own data_dir is built first when it
    is missing (data_recipe). Data that does not fit the model is a DataError: one line, exit 2."""
    if needs_building(config.data_dir, config.data_recipe, sys.argv[1:]):
        if run.master:
            print(f"{config.data_dir} is missing: building it with prepare_fineweb.py {config.data_recipe} (the config's data_recipe)",
                  flush=True)
            build_data(config.data_dir, config.data_recipe)
        barrier()
    # an eval's micro batch is never above training's, so an eval never needs more memory than a step (safe_train.py
    # halves batch_size after an out-of-memory stop, and the evals with it)
    evals = min(config.eval_batch_size or config.batch_size, config.batch_size)
    run.train_data, run.val_data, run.train_eval = (
        DataLoader(config.data_dir, split, size, config.block_size, run.rank, run.world, config.vocab_size)
        for split, size in (("train", config.batch_size), ("val", evals), ("train", evals)))
    run.meta = run.train_data.meta


def claim_out_dir(config, run):
    """out_dir, on rank 0 alone (every node may see its own files: only one decides; agree() hands the choice to all):
    the checkpoint to resume, or None; then the writer lock, and what a killed save left is cleared."""
    chosen = choose_checkpoint(config, run.meta)
    if not config.eval_only:  # eval_only reads, and writes nothing
        os.makedirs(config.out_dir, exist_ok=True)
        run.lock = checkpoint.lock(config.out_dir)
        checkpoint.remove_leftovers(config.out_dir)
    return chosen


def choose_checkpoint(config, meta, damaged=None):
    """Rank 0, before anything in out_dir is written: the checkpoint to resume from, or None for a fresh
    start. damaged: checkpoints that failed to load, passed over (checkpoint.find). Raises CheckpointError (one
    line) for an out_dir this run must not touch, or data made with another tokenizer than the checkpoint's."""
    out_dir = config.out_dir
    if not config.resume:
        existing = checkpoint.names(out_dir)
        if existing and not config.overwrite:
            raise checkpoint.CheckpointError(
                f"{out_dir} already holds checkpoints ({', '.join(sorted(existing, key=lambda n: int(n[5:]))[-3:])}) and "
                f"--resume=False: pass --resume=True to continue that run, --overwrite=True to start over in it, or use a new --out_dir")
        return None
    ckpt = checkpoint.find(out_dir, damaged=damaged)
    if ckpt:
        with open(os.path.join(ckpt, "config.json")) as f:
            saved = json.load(f)
        mine = {f.name: getattr(config, f.name) for f in fields(GPTConfig) if hasattr(config, f.name)}
        diff = [k for k, v in mine.items() if saved.get(k) != json.loads(json.dumps(v))]  # as JSON keeps it: () is []
        if diff:
            raise checkpoint.CheckpointError(
                f"config error: {ckpt} holds a different model ({', '.join(f'{k} {saved.get(k)} vs {mine[k]}' for k in diff)}): "
                f"use its settings or a new --out_dir")
        if config.lora_rank and saved.get("base", {}).get("fingerprint") != config.base["fingerprint"]:
            raise checkpoint.CheckpointError(
                f"config error: the base {config.base['path']} differs from the one the adapters in {ckpt} were trained on "
                f"({saved.get('base', {}).get('path')}): use that base, or a new --out_dir to start over")
        # the same ids would mean other text: the vocabulary sizes can agree while the tokenizers do not
        if saved.get("tokenizer") and (saved["tokenizer"], saved.get("eot")) != (meta.get("tokenizer"), meta.get("eot")) \
                and not config.allow_new_tokenizer:
            raise checkpoint.CheckpointError(
                f"data error: {config.data_dir}/meta.json says tokenizer {meta.get('tokenizer')} (eot {meta.get('eot')}), but {ckpt} "
                f"was trained on {saved['tokenizer']} (eot {saved.get('eot')}): use data made with that tokenizer, a new "
                f"--out_dir, or --allow_new_tokenizer=True to switch on purpose")
    return ckpt


def build_model(config, run, base, ckpt):
    """The model, built on the meta device, sharded under torchrun, then placed and initialised (the same values on
    any number of ranks); init_from's weights unless the checkpoint to resume replaces them; for LoRA the base
    frozen; then AdamW over what trains, and float16's gradient scaler."""
    run.cfg = GPTConfig.from_dict(vars(config))
    with torch.device("meta"):  # no memory until the weights are placed (and, under torchrun, sharded)
        model = run.model = GPT(run.cfg)
    if run.dist:
        shard_model(model, run.dev_type, run.dt)
    model.to_empty(device=run.dev)
    torch.manual_seed(config.seed)
    model.init_weights()  # the same values on any number of ranks
    model.activation_checkpointing = config.activation_checkpointing
    if base and (not ckpt or config.lora_rank):  # a fine-tune's checkpoints hold its adapters: the base always comes from init_from
        changed, kind, path = base
        load_weights(model, kind, path)
        print(f"{'base' if config.lora_rank else 'initialised'} from {path} ({'HF GptOss' if kind == 'hf' else 'nanoOSS'} weights"
              + (f"; frozen, {param_counts(run.cfg)['lora'] / 1e6:.2f}M adapter parameters train)" if config.lora_rank
                 else "; iteration 0, fresh optimizer)")
              + (f"; its model settings replace the config's: {', '.join(f'{k}={v}' for k, v in changed.items())}" if changed else ""))
    if config.lora_rank:  # only the adapters learn: no gradients and no optimizer state for the base
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
        for name, p in model.layers.named_parameters():  # cast on use, never copied whole (model.FrozenMatmul)
            if config.base_dtype == "bfloat16" and p.dim() >= 2 and not p.requires_grad and not name.endswith("bias"):
                p.data = p.data.to(torch.bfloat16)
    # fused: one kernel for all parameters, on CPU and MPS too (2.8x foreach's speed on this project's CPU)
    run.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=(config.beta1, config.beta2), fused=True)
    run.scaler = torch.amp.GradScaler(run.dev_type, enabled=run.dt == "float16")


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


def resume_from(config, run, ckpt):
    """Model, optimizer, iteration, best val loss, data position and RNG from ckpt (rank 0's choice), then log.jsonl
    trimmed to this history. A checkpoint complete by its sizes may still not read (zeros where a power loss left
    them), which shows only here: rank 0 names the file and picks the one before it, and every rank loads that."""
    damaged = {}
    while ckpt:
        model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
        state = {"model": saved_part(model_sd, config), "optim": optim_sd, "trainer": b""}
        try:
            checkpoint.load(state, ckpt, diagnose=run.master)
            error = None
        except checkpoint.CheckpointError as e:
            error = e
        if not any_rank(error is not None, run.dev):
            break

        def fallback(failed=ckpt):
            if not isinstance(error, checkpoint.Damaged):  # the files read: something else is wrong, which an older one shares
                raise checkpoint.CheckpointError(f"checkpoint error: {error or f'another rank cannot read {failed}'}: "
                                                 f"move it away to resume from the one before")
            damaged[os.path.basename(failed)] = str(error)
            return choose_checkpoint(config, run.meta, damaged)
        ckpt = agree(run, fallback)
    if ckpt:
        set_state_dict(run.model, run.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=StateDictOptions(strict=not config.lora_rank))
        trainer = pickle.loads(state["trainer"])
        run.iter_num, run.best_val_loss = trainer["iter_num"], trainer["best_val_loss"]
        try:
            run.train_data.load_state_dict(trainer["data"])
        except DataError as e:
            fail(f"data error: {e}")
        set_rng_state(trainer["rng"], run.dev_type)
        print(f"resumed from {ckpt} at iter {run.iter_num}")
    if run.master and not config.eval_only:
        trim_log(os.path.join(config.out_dir, "log.jsonl"), run.iter_num)


def saved_part(model_sd, config):
    """What a checkpoint keeps of the model: all of it, or for a LoRA fine-tune its adapters alone (the base is
    init_from's, named and fingerprinted in config.json)."""
    return {k: v for k, v in model_sd.items() if "lora_" in k} if config.lora_rank else model_sd


def rng_state(dev_type):
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if dev_type == "cuda" else None}


def set_rng_state(state, dev_type):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if dev_type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"])


def trim_log(path, iter_num):
    """log.jsonl keeps the history of the run that continues from iter_num: records of steps after it (made
    before a kill, about to be made again) and a half-written last line are dropped."""
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
    checkpoint.write_atomic(path, "".join(keep))


def compile_model(config, run):
    """The blocks compiled in place, when use_compile. A backend that does not load is one line and exit 2; a
    compiler error later leaves the run eager (eager_from_here)."""
    if not run.use_compile:
        return
    try:
        compile_blocks(run.model, config.compile_backend)  # in place: the loop, generate and eval all use the compiled blocks
    except Exception as e:  # an unknown backend name, a module:function that does not import
        fail(f"config error: compile_backend {config.compile_backend!r}: {type(e).__name__}: "
             f"{(str(e).strip().splitlines() or [''])[0][:200]} (use inductor, aot_eager, or module:function)")


def eager_from_here(config, run, why, where):
    """A compiler error (`why`, one line) at `where`: the rest of the run is eager (the same numbers, slower); one
    line says so, the log and the heartbeat say from which step."""
    uncompile_blocks(run.model)
    run.compile_off = run.iter_num + 1
    print(f"compile off from step {run.compile_off}: {where} failed under torch.compile ({why}); eager from here", flush=True)
    if not config.eval_only:
        log(config, run, {"iter": run.iter_num, "compile_off": run.compile_off, "compile_error": why})
        heartbeat(config, run, "compile off", force=True)


def compiled_or_eager(fn, config, run, where):
    """fn(config, run), and after a compiler error inside it, again eager (eval and the sample change no state). Under
    torchrun every rank meets the same graphs at the same call, so all fail there and fall back together."""
    try:
        return fn(config, run)
    except Exception as e:
        why = run.use_compile and run.compile_off is None and compiler_error(e)
        if not why:
            raise
        eager_from_here(config, run, why, where)
        return fn(config, run)


def start_training(config, run):
    """What the loop runs inside: signal handlers, the start line, log.jsonl and the trackers, the clocks for
    tokens/s and the ETA, and the first heartbeat."""
    catch_signals(run)
    run.sampling = config.sample_every > 0
    n = param_counts(run.cfg)
    run.tokens_per_iter = config.batch_size * config.block_size * config.grad_accum_steps
    run.flops_per_iter = flops_per_token(run.cfg, config.block_size) * run.tokens_per_iter
    run.peak = peak_flops(run.dev, run.dt)
    print(f"{f'{run.world} processes (FSDP) | ' if run.dist else ''}device {run.dev} | dtype {run.dt} | compile {run.use_compile} | "
          f"tf32 {'on' if run.tf32 else 'off'} | params {n['total'] / 1e6:.2f}M total, {n['active'] / 1e6:.2f}M active | "
          f"{run.tokens_per_iter} tokens/iter")
    run.log_file = open(os.path.join(config.out_dir, "log.jsonl"), "a") if run.master else None
    run.trackers = open_trackers(config) if run.master else []
    run.t_start = run.t_last = time.time()
    run.iter_start = run.iter_num
    heartbeat(config, run, "start", force=True)


def catch_signals(run):
    """SIGTERM and SIGINT: stop (a second Ctrl-C: now); SIGUSR1: free cached memory. A handler only raises this rank's
    flag; the loop folds it into an agreement of all ranks at the next micro step or step, and acts on the agreed
    value alone, so a signal is never lost (nothing lowers the flag) and ranks never part ways (one saving while
    another runs a forward)."""
    def on_stop(signum, frame):
        if run.flags["stop"]:  # second Ctrl-C: the user means it
            stop_now(signum, frame)
        run.flags["stop"] = True
        print(f"signal {signal.Signals(signum).name}: stopping at the next micro step, then saving", flush=True)

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1, lambda s, f: run.flags.update(free=True))


def open_trackers(config):
    """Optional loggers (W&B, TensorBoard) as functions of a log record; a missing package is one line, not a crash."""
    trackers = []
    if config.wandb_log:
        try:
            import wandb

            wb = wandb.init(project=config.wandb_project, name=config.wandb_run_name, config=vars(config))
            trackers.append(lambda r: wb.log({k: v for k, v in r.items() if isinstance(v, (int, float)) and k != "iter"}, step=r["iter"]))
        except Exception as e:  # ImportError, or wandb refusing to start (no login, no network): training goes on
            print(f"wandb_log: off ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'pip install wandb'})", flush=True)
    if config.tensorboard_log:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(config.out_dir, "tensorboard"))

            def tb(r):
                for k, v in r.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("iter", "time"):
                        writer.add_scalar(k, v, r["iter"])
                writer.flush()
            trackers.append(tb)
        except ImportError:
            print("tensorboard_log: off (pip install tensorboard)", flush=True)
    return trackers


def get_lr(it, config):
    """Linear warmup, cosine decay to min_lr at lr_decay_iters, then flat."""
    if it < config.warmup_iters:
        return config.lr * (it + 1) / (config.warmup_iters + 1)
    if it >= config.lr_decay_iters:
        return config.min_lr
    ratio = (it - config.warmup_iters) / max(1, config.lr_decay_iters - config.warmup_iters)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (config.lr - config.min_lr)


def train_step(config, run):
    """One optimizer step: run.accum micro steps on this rank, the agreement of all ranks (loss, stop), clipping, the
    update. Returns the step's numbers for log_step, or None when no step was taken: dropped for a stop, or to be redone
    eager after a compiler error (both rewound to the step's start). A non-finite loss or gradient ends the run, exit 3."""
    step_start = run.train_data.state_dict(), rng_state(run.dev_type)  # a stop mid-step, or a compiler error, goes back here
    lr_now = get_lr(run.iter_num, config)
    for group in run.optimizer.param_groups:
        group["lr"] = lr_now
    sums, failed, micro = micro_steps(config, run)
    if run.use_compile and run.compile_off is None and any_rank(failed is not None, run.dev):  # all ranks go eager together
        eager_from_here(config, run, failed or "a compiler error on another rank", f"step {run.iter_num + 1}")
        rewind(run, step_start)
        return None  # the same step again, eager
    if run.dropped:  # the checkpoint then holds the data position and RNG of this step's start: resuming redoes it exactly
        rewind(run, step_start)
        print(f"stopping: step {run.iter_num + 1} dropped after {micro} of {run.accum} micro steps (it is redone on resume)", flush=True)
        return None
    run.scaler.unscale_(run.optimizer)
    gnorm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), config.grad_clip if config.grad_clip > 0 else float("inf"))
    if hasattr(gnorm, "full_tensor"):  # FSDP: the norm over all shards, the same on every rank
        gnorm = gnorm.full_tensor()
    # one host sync per step: a non-finite loss must stop the run before the optimizer touches weights,
    # and every rank must agree on stopping (a signal may reach them at different steps)
    step = all_sum(torch.stack([sums["loss"] / run.accum / run.world, torch.tensor(float(run.flags["stop"]), device=run.dev)]))
    fault_point(f"sigterm:sync:{run.iter_num + 1}:{run.rank}")
    lossf, stop_votes, gnormf = torch.cat([step, gnorm.float().reshape(1)]).tolist()
    run.stop = stop_votes > 0  # a signal that came after the vote stays raised for the next one
    if not math.isfinite(lossf) or (not math.isfinite(gnormf) and run.dt != "float16"):
        fail(f"stopping: {'loss' if not math.isfinite(lossf) else 'gradient norm'} is not finite at iter "
             f"{run.iter_num + 1}; weights not updated, last good checkpoint: {checkpoint.read_latest(config.out_dir) or 'none'} "
             f"(try a lower --lr or --grad_clip)", NON_FINITE)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.iter_num += 1
    run.tokens_since += run.tokens_per_iter
    heartbeat(config, run, "train")
    return {**sums, "lossf": lossf, "gnormf": gnormf, "lr": lr_now}


def micro_steps(config, run):
    """The forwards and backwards of one step on this rank, gradients summed in the parameters. Returns (this rank's
    sums of losses and router stats, a compiler error's line or None, micro steps done); a stop agreed between
    micro steps sets run.stop and run.dropped."""
    dev = run.dev
    sums = {"loss": torch.zeros((), device=dev), "aux": torch.zeros((), device=dev), "z": torch.zeros((), device=dev),
            "mor": torch.zeros(2, device=dev),  # MoR: router loss, z-loss (token)
            "mor_share": torch.zeros(config.n_recursion, device=dev),  # share of tokens through each recursion step (this rank's)
            "load": torch.zeros(run.cfg.n_layer, run.cfg.n_expert, device=dev)}  # per applied layer
    for micro in range(run.accum):
        fault_point(f"sigterm:micro:{run.iter_num + 1}.{micro}:{run.rank}")
        # a long step (8b_moe: 32 micro steps) outlasts torchrun's 30 s between a signal and SIGKILL: check
        # between micro steps, and drop the unfinished step rather than finish it
        if micro and any_rank(run.flags["stop"], dev):
            run.stop = run.dropped = True
            return sums, None, micro
        if run.dist:  # reduce-scatter the gradients only after the last micro step, unless memory asks for every one
            run.model.set_requires_gradient_sync(config.sync_grads_every_micro_step or micro == run.accum - 1)
        x, y = run.train_data.next_batch()
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        try:
            with run.ctx:
                loss, stats = run.model(x, y, loss_chunk=config.loss_chunk)[1:]  # not `_, loss, stats`: that would keep the logits alive through backward
                total = loss + config.router_aux_loss_coef * stats["aux"] + config.router_z_loss_coef * stats["z"]
                if "mor_aux" in stats:
                    mor_z = stats.get("mor_z", torch.zeros((), device=dev))
                    total = total + run.mor_coef * stats["mor_aux"] + config.mor_z_loss_coef * mor_z
                    sums["mor"] += torch.stack([stats["mor_aux"], mor_z]).detach()
                    sums["mor_share"] += stats["mor_share"] / run.accum
            run.scaler.scale(total / run.accum).backward()  # FSDP then averages over ranks: the mean over all micro batches
        except Exception as e:
            failed = run.use_compile and run.compile_off is None and compiler_error(e)
            if not failed:
                raise
            return sums, failed, micro
        sums["loss"] += loss.detach()
        sums["aux"] += stats["aux"].detach()
        sums["z"] += stats["z"].detach()
        sums["load"] += stats["load"]
    return sums, None, run.accum


def rewind(run, step_start):
    """Back to a step's start (dropped, or its compiled forward or backward failed): no gradients, and the data
    position and RNG of its first micro step, so that redoing it gives what it would have given."""
    run.optimizer.zero_grad(set_to_none=True)
    run.train_data.load_state_dict(step_start[0])
    set_rng_state(step_start[1], run.dev_type)


def log_step(config, run, step):
    """The log line of a step and its log.jsonl record: loss, router losses (raw: aux is 1.0 at perfect balance), lr,
    gradient norm, tokens/s, MFU, memory, and each expert's share of each layer's assignments."""
    now = time.time()
    tok_s = run.tokens_since / max(now - run.t_last, 1e-9)
    run.t_last, run.tokens_since = now, 0
    mfu = run.flops_per_iter / run.tokens_per_iter * tok_s / (run.peak * run.world) if run.peak else None
    used, total_mem = memory_gb(run.dev)
    auxf, zf, morf, morzf = (all_sum(torch.cat([torch.stack([step["aux"], step["z"]]), step["mor"]])) / config.grad_accum_steps).tolist()
    load = all_sum(step["load"])
    mor_share = step["mor_share"].tolist()
    # MoR: the router's loss and the share of tokens through each recursion step
    mor = f" | mor {morf:.3f} ({'/'.join(f'{v:.2f}' for v in mor_share)})" if config.mor_router != "none" else ""
    print(f"iter {run.iter_num} | loss {step['lossf']:.3f} | aux {auxf:.2f} | z {zf:.2f}{mor} | lr {step['lr']:.1e} | "
          f"gnorm {step['gnormf']:.2f} | {tok_s / 1e3:.1f}k tok/s | mfu {f'{mfu:.0%}' if mfu is not None else '-'} | "
          f"mem {used:.1f}/{total_mem:.1f} GB | eta {duration(eta_s(config, run))}", flush=True)
    record = {"iter": run.iter_num, "tokens": run.iter_num * run.tokens_per_iter, "loss": step["lossf"], "aux": auxf, "z": zf,
              "lr": step["lr"], "gnorm": step["gnormf"], "tok_per_s": tok_s, "mfu": mfu, "mem_gb": used, "time": now,
              "batch_size": config.batch_size, "grad_accum_steps": config.grad_accum_steps, "tokens_per_iter": run.tokens_per_iter}
    if config.mor_router != "none":
        record["mor_aux"], record["mor_share"] = morf, [round(s, 4) for s in mor_share]
    if config.mor_router == "token":
        record["mor_z"] = morzf
    if config.log_router_stats:
        share = load / load.sum(dim=1, keepdim=True)
        record["load"] = share.tolist()  # [layer][expert]: each expert's share of the assignments
        record["load_min"] = share.min(dim=1).values.tolist()
        record["load_max"] = share.max(dim=1).values.tolist()
    log(config, run, record)


def log(config, run, record):
    """One record to log.jsonl and the trackers (rank 0)."""
    if not run.master:
        return
    try:
        run.log_file.write(json.dumps(record) + "\n")
        run.log_file.flush()
    except OSError as e:
        out_of_space(config, e, run.log_file.name)
    for track in run.trackers:
        track(record)


def heartbeat(config, run, phase, force=False):
    """out_dir/heartbeat.json, rank 0, at most once a second unless forced: what safe_train.py watches (the iteration,
    phase, device memory now and its peak, the ETA, compile_off)."""
    now = time.time()
    if not run.master or (not force and now - run.last_beat < 1.0):
        return
    path = os.path.join(config.out_dir, "heartbeat.json")
    used, total = memory_gb(run.dev, now=True)
    reserved = torch.cuda.max_memory_reserved(run.dev) / 1e9 if run.dev_type == "cuda" else None  # the peak, for bench/memory.py
    try:
        checkpoint.write_atomic(path, json.dumps({"time": now, "pid": os.getpid(), "iter": run.iter_num, "phase": phase,
                                                  "device_mem_gb": used, "device_total_gb": total, "peak_rss_gb": peak_rss_gb(),
                                                  "max_memory_reserved_gb": reserved, "eta_s": eta_s(config, run),
                                                  "compile_off": run.compile_off}), sync=False)
    except OSError as e:
        out_of_space(config, e, path)
    run.last_beat = now


def out_of_space(config, e, path):
    """A write to out_dir that failed on a full disk ends the run in one line, exit 2: a restart cannot help
    until space is freed, and latest still names the last good checkpoint. Any other error goes on as raised."""
    full = checkpoint.no_space(e, path)
    if full is None:
        raise e
    fail(f"{full}: free space there or use another --out_dir; latest still names {checkpoint.read_latest(config.out_dir) or 'none'}")


def eta_s(config, run):
    """Seconds to max_iters at this process's pace so far (evals and saves included)."""
    done = run.iter_num - run.iter_start
    return (time.time() - run.t_start) / done * (config.max_iters - run.iter_num) if done else None


def duration(seconds):
    if seconds is None:
        return "-"
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}h{m % 60:02d}m" if m >= 60 else f"{m}m{s:02d}s"


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


def evaluate(config, run):
    """An eval at this iteration: its line, its log.jsonl record, the best val loss, and loss.png redrawn."""
    heartbeat(config, run, "eval", force=True)
    fault_point(f"sigterm:eval:{run.iter_num}:{run.rank}")
    losses = compiled_or_eager(estimate_loss, config, run, f"the eval at iter {run.iter_num}")
    run.best_val_loss = min(run.best_val_loss, losses["val"])
    report_eval(run, losses)
    log(config, run, {"iter": run.iter_num, "eval": True, "train_loss": losses["train"], "val_loss": losses["val"],
                      "val_acc": losses["val_acc"], **({"val_loss_topk": losses["val_topk"]} if "val_topk" in losses else {}),
                      "val_ppl": math.exp(losses["val"]), "time": time.time(), "tokens": run.iter_num * run.tokens_per_iter})
    if run.master and config.plot:
        run.plotter = refresh_plot(run.plotter, config.out_dir)


@torch.no_grad()
def estimate_loss(config, run):
    """Mean loss over the first eval_iters batches of each split: the same batches every time, so
    evals are comparable and resuming does not change them. Ranks split the batches (each reads its
    slice of a global step), so with eval_iters a multiple of the world size the number is the same
    on any number of processes."""
    run.model.eval()
    # the loss loss_chunk tokens at a time (a row if 0): with no graph to keep, eval then needs less memory
    # than a training step of the same micro batch, never more (an eval OOM hours into a run is the worst kind)
    chunk = config.loss_chunk or config.block_size
    out = {}
    runs = [("train", run.train_eval), ("val", run.val_data)]
    if config.mor_router == "expert":  # and with training's top-k over each sequence: the gap is what top-k reads of the future
        runs.append(("val_topk", run.val_data))
    for split, loader in runs:
        loader.reset()
        losses = torch.zeros(max(1, config.eval_iters // run.world), device=run.dev)
        hits = torch.zeros(2, device=run.dev)  # tokens the top guess got right, tokens scored (masked ones are not)
        for i in range(len(losses)):
            x, y = loader.next_batch()
            with run.ctx:
                loss, stats = run.model(x.to(run.dev), y.to(run.dev), loss_chunk=chunk, mor_topk=True if split == "val_topk" else None)[1:]
            losses[i] = loss
            hits += torch.stack([stats["correct"], stats["scored"]]).float()
        out[split] = all_mean(losses.mean()).item()
        correct, scored = all_sum(hits).tolist()
        out[split + "_acc"] = correct / max(scored, 1)
    run.model.train()
    return out


def report_eval(run, losses):
    print(f"eval {run.iter_num} | train {losses['train']:.3f} | val {losses['val']:.3f} | val ppl {math.exp(losses['val']):.1f} | "
          f"val acc {losses['val_acc']:.1%}" + (" (assistant tokens only)" if run.meta.get("loss_mask") else "")
          + (f" | val with top-k routing {losses['val_topk']:.3f} (causal: the first)" if "val_topk" in losses else ""), flush=True)


def refresh_plot(previous, out_dir):
    """Redraw out_dir/loss.png in a child process, so that matplotlib never adds to this process's memory;
    skipped while the last one still draws, and when matplotlib is not installed. The first drawing (and one after
    a failed one) says "wrote out_dir/loss.png" on this run's stdout; the others say nothing: once is enough."""
    import importlib.util

    if (previous and previous.poll() is None) or importlib.util.find_spec("matplotlib") is None:
        return previous
    return subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py"), out_dir],
                            stdout=subprocess.DEVNULL if previous and previous.returncode == 0 else None, stderr=subprocess.DEVNULL)


def show_sample(config, run):
    """The periodic sample's line; one that fails (no tokenizer offline, a meta.json that names none, ...) turns
    sampling off for the rest of the run: a sample never ends a run."""
    try:
        print(f"sample {run.iter_num} | {compiled_or_eager(sample_text, config, run, f'the sample at iter {run.iter_num}')!r}", flush=True)
    except Exception as e:
        print(f"sampling off: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", flush=True)
        run.sampling = False


def sample_text(config, run):
    """sample_tokens of text from the end-of-text token. Under FSDP every rank must run the forward (each holds a
    shard of the weights), so all ranks sample in lockstep with the same generator, and rank 0 prints. Only ids the
    tokenizer can decode."""
    if run.tokenizer is None:
        run.tokenizer = get_tokenizer(run.meta["tokenizer"])
        run.allowed = torch.from_numpy(decodable(run.tokenizer, run.cfg.vocab_size)).to(run.dev)
    g = torch.Generator(device=run.dev).manual_seed(config.seed + run.iter_num)  # its own RNG: sampling never shifts training
    eot = run.meta.get("eot", 0)
    ends = Stops(run.tokenizer, 1, {eot})  # a sample starts a document and ends with it, at the next end-of-text
    run.model.eval()
    try:
        with run.ctx:
            generate(run.model, torch.tensor([[eot]], device=run.dev), config.sample_tokens, temperature=config.temperature,
                     top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
                     generator=g, allowed=run.allowed, on_token=ends.push)
    finally:
        run.model.train()
    ends.close()
    return ends.text[0]


def free_caches(run):
    """SIGUSR1 (safe_train.py, memory running short): the allocator's cached memory back to the system, now."""
    gc.collect()
    if run.dev_type == "cuda":
        torch.cuda.empty_cache()
    elif run.dev_type == "mps":
        torch.mps.empty_cache()
    run.flags["free"] = False
    print("freed cached memory (SIGUSR1)", flush=True)


def save(config, run):
    """A checkpoint of this moment, then pruning (checkpoint.py says what is promised). A full disk is exit 2 (a
    restart cannot help), any other failed save exit 1; latest still names the last good checkpoint."""
    heartbeat(config, run, "save", force=True)
    trainer = {"iter_num": run.iter_num, "best_val_loss": run.best_val_loss, "data": run.train_data.state_dict(),
               "rng": rng_state(run.dev_type)}
    model_sd, optim_sd = get_state_dict(run.model, run.optimizer)
    try:
        path = checkpoint.save(config.out_dir, run.iter_num,
                               {"model": saved_part(model_sd, config), "optim": optim_sd, "trainer": pickle.dumps(trainer)},
                               {**vars(config), "tokenizer": run.meta.get("tokenizer"), "eot": run.meta.get("eot"), "world_size": run.world},
                               run.master, barrier)
    except checkpoint.DiskFull as e:  # bad input to the run (its out_dir): a restart cannot help, exit 2
        fail(f"checkpoint error: {e}: free space there, lower --keep_last_n (now {config.keep_last_n}), or use another --out_dir")
    except checkpoint.CheckpointError as e:
        fail(f"checkpoint error: {e}", 1)
    if run.master:
        checkpoint.prune(config.out_dir, config.keep_last_n)
    print(f"saved {path}")


def export_adapters(config, run):
    """A finished LoRA run's adapters in the format people load (peft's): out_dir/adapter."""
    full = get_model_state_dict(run.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))  # all ranks
    if run.master:
        where = os.path.join(config.out_dir, "adapter")
        write_peft_adapter(full, run.cfg, config.base["path"], where)
        size = os.path.getsize(os.path.join(where, "adapter_model.safetensors"))
        print(f"adapters: {where} ({size / 1e6:.1f} MB, peft's format); "
              f"a plain model: python export_hf.py --ckpt={config.out_dir} --out=DIR (merged)", flush=True)


def finish(config, run):
    """The last heartbeat, log.jsonl closed, the last loss.png whole before the run says it is done, and the
    process group left. (eval_only wrote nothing, and writes nothing here.)"""
    if not config.eval_only:
        heartbeat(config, run, "done", force=True)
        if run.master:
            run.log_file.close()
            if run.plotter:
                run.plotter.wait()
    if run.dist:
        torch.distributed.destroy_process_group()


def main():
    # ---- set-up: nothing in out_dir is touched until settings, processes, device and data are good. A bad input
    # anywhere is a BadInput (ConfigError, DataError, ...): one line and exit 2 (configurator.run). A signal before the
    # loop's own handlers (catch_signals) finds nothing to save: it ends the process at once
    signal.signal(signal.SIGINT, stop_now)
    signal.signal(signal.SIGTERM, stop_now)
    config, base = read_settings()
    run = set_up(config)
    open_data(config, run)
    ckpt = agree(run, lambda: claim_out_dir(config, run))  # rank 0 decides what to resume; every rank checks it sees it
    build_model(config, run, base, ckpt)
    resume_from(config, run, ckpt)
    compile_model(config, run)
    if config.eval_only:  # score what would be resumed (or init_from's weights) and leave
        report_eval(run, compiled_or_eager(estimate_loss, config, run, "the eval"))
        finish(config, run)
        return

    # ---- the loop
    start_training(config, run)
    while run.iter_num < config.max_iters and not run.stop:
        step = train_step(config, run)
        if step is None:  # dropped for a stop, or to be redone eager after a compiler error
            continue
        if run.iter_num % config.log_interval == 0 or run.iter_num == config.max_iters:
            log_step(config, run, step)
        if config.eval_interval > 0 and (run.iter_num % config.eval_interval == 0 or run.iter_num == config.max_iters):
            evaluate(config, run)
        if run.sampling and run.iter_num % config.sample_every == 0:
            show_sample(config, run)
        if run.flags["free"]:
            free_caches(run)
        if run.iter_num % config.save_every == 0 or run.iter_num == config.max_iters or run.stop:
            save(config, run)
    if run.dropped and checkpoint.read_latest(config.out_dir) != f"ckpt_{run.iter_num}":  # (when it names it, that one is this state)
        save(config, run)
    if config.lora_rank and run.iter_num == config.max_iters:
        export_adapters(config, run)
    finish(config, run)


if __name__ == "__main__":
    import configurator

    configurator.run(main)  # a BadInput from anywhere under main(): one line on stderr, exit 2
