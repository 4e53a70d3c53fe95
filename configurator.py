"""
Config files and command-line overrides, for train.py, sample.py and friends:
    python train.py config/mac_micro.py --batch_size=4 --compile=False
A config file is plain Python assignments. Every key, from a file or the command line, must already be a
global of the calling script; anything else is one error line naming the closest known key.
Unlike nanoGPT's exec-into-globals, a typo cannot silently create a new setting.
Every setting's range is in RULES below, one table for all the scripts (they share names): configure() checks
them all before a script does any work. Also here: BadInput, the one kind of error that every script turns into
one line on stderr and exit 2 (run()), whichever file raised it.
"""
import ast
import difflib
import math
import os
import re
import stat
import sys
from dataclasses import dataclass

BAD_INPUT = 2  # the exit code of a bad input: running again will not help (README, "When something is wrong")


class BadInput(Exception):
    """A setting, file or folder that no rerun can fix; the message is one line naming it and the fix. ConfigError,
    DataError, CheckpointError, BridgeError, PrepareError and safe_train's Refused are kinds of it."""


class ConfigError(BadInput):
    pass


def run(main, *args):
    """A script's __main__: main(*args), with a BadInput from anywhere under it as one line on stderr and exit 2; and when
    the reader of its output left (`python sample.py ... | head`), a quiet exit 141, as a shell reports `cat` ended by
    SIGPIPE in `cat file | head`, instead of a BrokenPipeError's traceback."""
    try:
        return main(*args)
    except BadInput as e:
        print(f"{os.path.basename(sys.argv[0])}: {' '.join(str(e).splitlines())}", file=sys.stderr, flush=True)
        sys.exit(BAD_INPUT)
    except BrokenPipeError:
        if not stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode):  # not the output's pipe: a crash, shown as one
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's last flush of stdout would fail again
        sys.exit(141)


@dataclass(frozen=True)
class Rule:
    """The values one setting may take: its kind (int, float, str, bool; tuple: a tuple of numbers), bounds (ge >=,
    gt >, le <=, lt <; on each number of a tuple), a multiple (ints), choices or a whole-match pattern (text, with
    `form` saying it in words; a tuple with a pattern: a tuple of such texts), and `off`: which value switches the
    thing off, in words."""
    kind: type
    ge: float = None
    gt: float = None
    le: float = None
    lt: float = None
    multiple: int = 1
    choices: tuple = ()
    pattern: str = None
    form: str = ""
    off: str = ""

    def describe(self):
        bounds = " and ".join(f"{op} {v:g}" for op, v in ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt)) if v is not None)
        if self.choices:
            what = "one of " + ", ".join(self.choices)
        elif self.pattern:
            what = self.form
        elif self.kind is tuple:
            what = f"a tuple of numbers, each {bounds}"
        elif self.multiple > 1:
            what = f"a multiple of {self.multiple}, {bounds}"
        else:
            what = {int: "an int", float: "a number", bool: "True or False", str: "text"}[self.kind] + (f" {bounds}" if bounds else "")
        return what + (f" ({self.off})" if self.off else "")

    def refuses(self, value):
        """True when value is not one this setting may take."""
        if self.kind is tuple and self.pattern is not None:
            return not isinstance(value, tuple) or not all(isinstance(v, str) and re.fullmatch(self.pattern, v) for v in value)
        if self.kind is tuple:
            return not isinstance(value, tuple) or any(map(self.out_of_bounds, value))
        if self.kind is float:
            return self.out_of_bounds(value)
        if self.kind is int:
            return not isinstance(value, int) or self.out_of_bounds(value) or value % self.multiple != 0
        return (not isinstance(value, self.kind) or bool(self.choices) and value not in self.choices
                or self.pattern is not None and not re.fullmatch(self.pattern, value))

    def out_of_bounds(self, v):
        return (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                or (self.ge is not None and v < self.ge) or (self.gt is not None and v <= self.gt)
                or (self.le is not None and v > self.le) or (self.lt is not None and v >= self.lt))


FLAG, TEXT, NAME = Rule(bool), Rule(str), Rule(str, pattern=r".+", form="not empty")
COUNT, POSITIVE = Rule(int, ge=0), Rule(int, ge=1)
NONNEGATIVE, ABOVE_0, PERCENT = Rule(float, ge=0), Rule(float, gt=0), Rule(float, gt=0, le=100)
ALIGNED = Rule(int, ge=8, multiple=8)  # the experts' grouped matmul (torch._grouped_mm) wants 16-byte-aligned rows

# Every setting of every script, by name (train.py's lr is also safe_train.py's and bench.py's): what it may be,
# and which value means off. A new setting needs a line here (tests/test_configurator.py checks that each has one).
RULES = {
    # train.py: I/O
    "data_dir": NAME, "data_recipe": TEXT, "out_dir": NAME, "resume": FLAG, "allow_new_tokenizer": FLAG, "init_from": TEXT,
    "overwrite": FLAG,
    "eval_interval": Rule(int, ge=0, off="0 = no evals"), "eval_iters": POSITIVE, "eval_only": FLAG,
    "log_interval": POSITIVE, "log_router_stats": FLAG, "plot": FLAG, "wandb_log": FLAG, "wandb_project": NAME,
    "wandb_run_name": NAME, "tensorboard_log": FLAG, "save_every": POSITIVE, "keep_last_n": Rule(int, ge=0, off="0 = keep all"),
    "sample_every": Rule(int, ge=0, off="0 = never"), "sample_tokens": POSITIVE,
    "temperature": Rule(float, ge=0, off="0 = greedy"), "top_k": Rule(int, ge=0, off="0 = every token"),
    # sample.py's other controls (transformers' meanings; the same names for train.py's periodic sample)
    "top_p": Rule(float, gt=0, le=1, off="1 = every token"), "min_p": Rule(float, ge=0, lt=1, off="0 = off"),
    "repetition_penalty": Rule(float, gt=0, off="1 = off"), "stop_at_eot": FLAG, "stream": FLAG,
    "stop": Rule(tuple, pattern=r"(?s).+", form="text, or a list of texts, none empty: --stop=END or --stop=\"['\\n\\n', 'END']\""),
    # data
    "batch_size": POSITIVE, "eval_batch_size": Rule(int, ge=0, off="0 = batch_size"), "block_size": POSITIVE, "grad_accum_steps": POSITIVE, "sync_grads_every_micro_step": FLAG,
    "activation_checkpointing": FLAG, "loss_chunk": Rule(int, ge=0, off="0 = all at once"),
    # model (GPTConfig's fields; those train.py leaves at their defaults are bench.py settings)
    "vocab_size": POSITIVE, "n_layer": POSITIVE, "n_embd": ALIGNED, "n_head": POSITIVE, "n_kv_head": POSITIVE,
    "head_dim": Rule(int, ge=2, multiple=2),  # RoPE rotates pairs of dimensions
    "n_expert": POSITIVE, "experts_per_token": POSITIVE, "intermediate_size": ALIGNED, "sliding_window": POSITIVE,
    "attn_pattern": Rule(str, pattern=r"[SF]+", form="letters S (sliding window) and F (full causal), repeated over the layers, e.g. SF"),
    "sinks": FLAG, "swiglu_alpha": ABOVE_0, "swiglu_limit": ABOVE_0, "rope_theta": ABOVE_0,
    "rope_scaling_factor": Rule(float, ge=1, off="1 = plain RoPE, no YaRN"), "rope_ntk_alpha": ABOVE_0, "rope_ntk_beta": ABOVE_0,
    "initial_context_length": POSITIVE, "rope_truncate": FLAG, "tie_embeddings": FLAG, "norm_eps": ABOVE_0, "init_std": ABOVE_0,
    "lora_rank": Rule(int, ge=0, off="0 = no LoRA"), "lora_alpha": ABOVE_0,
    "lora_targets": Rule(str, pattern=r"(q|k|v|o|experts|router)(,(q|k|v|o|experts|router))*",
                         form="a comma-separated list of q, k, v, o, experts, router"),
    "base_dtype": Rule(str, choices=("float32", "bfloat16")),
    "n_recursion": Rule(int, ge=1, off="1 = no recursion"),
    "recursion_sharing": Rule(str, choices=("cycle", "middle_cycle", "sequence", "middle_sequence")),
    "mor_router": Rule(str, choices=("none", "expert", "token")),
    "mor_capacity": Rule(tuple, gt=0, le=1, off="() = (n_recursion - r) / n_recursion"), "mor_alpha": ABOVE_0,
    "mor_aux_loss_coef": Rule(float, ge=0, off="None = the paper's value for the router in use"),
    "mor_z_loss_coef": NONNEGATIVE, "router_aux_loss_coef": NONNEGATIVE, "router_z_loss_coef": NONNEGATIVE,
    # optimizer
    "lr": ABOVE_0, "min_lr": NONNEGATIVE, "weight_decay": NONNEGATIVE, "beta1": Rule(float, ge=0, lt=1),
    "beta2": Rule(float, ge=0, lt=1), "grad_clip": Rule(float, ge=0, off="0 = off"), "warmup_iters": COUNT,
    "lr_decay_iters": COUNT, "max_iters": POSITIVE,
    # system
    "device": Rule(str, pattern=r"auto|cpu|mps|cuda(:\d+)?", form="auto, cpu, mps, cuda or cuda:N"),
    "dtype": Rule(str, choices=("auto", "float32", "bfloat16", "float16")),
    "compile": Rule(bool, off="None = on for CUDA only"), "seed": COUNT,
    "compile_backend": Rule(str, pattern=r"\w+|[\w.]+:\w+", form="a backend torch.compile knows (inductor, aot_eager) or module:function"),
    # sample.py
    "ckpt": TEXT, "tokenizer": TEXT, "start": TEXT, "num_samples": POSITIVE, "max_new_tokens": POSITIVE,
    "use_cache": FLAG, "chat": FLAG,
    # prepare_fineweb.py
    "corpus": Rule(str, choices=("fineweb-edu", "stdlib", "stdlib_api")), "name": NAME, "input": TEXT,
    "encoding": Rule(str, pattern=r"\w+(:\d+)?", form="a tiktoken name, or o200k_base:N (its first N merges)"),
    "tokenizer_file": TEXT, "shard_size": POSITIVE, "val_tokens": POSITIVE,
    "max_tokens": Rule(int, ge=0, off="0 = the whole corpus"), "workers": Rule(int, ge=0, off="0 = all cores"),
    "batch_docs": POSITIVE, "decode_errors": Rule(str, choices=("strict", "replace")),
    # safe_train.py
    "budget_gb": Rule(float, ge=0, off="0 = 90% of the memory available at the start"), "warn_pct": PERCENT,
    "free_pct": PERCENT, "stop_pct": PERCENT, "min_available_pct": Rule(float, ge=0, lt=100), "interval": ABOVE_0,
    "grace_s": NONNEGATIVE, "max_memory_restarts": COUNT, "max_crash_restarts": COUNT, "hang_s": ABOVE_0,
    "max_hours": Rule(float, ge=0, off="0 = no limit"), "min_free_disk_gb": NONNEGATIVE, "preflight": FLAG,
    "preflight_fit": FLAG, "strict": FLAG, "train_script": NAME, "check_only": FLAG,
    # export_hf.py (and its --ckpt, --dtype above)
    "out": TEXT, "gguf": TEXT, "gguf_type": Rule(str, choices=("f32", "f16", "bf16", "q8_0")),
    # bench.py, bench/gpu_check.py, bench/memory.py
    "steps": POSITIVE, "rounds": POSITIVE, "hf": FLAG, "dense": FLAG, "layer_T": Rule(int, ge=0, off="0 = skip"),
    "work_dir": NAME, "minutes": Rule(float, ge=0, off="0 = 6 on CUDA, 30 on CPU"),
    "jobs": Rule(int, ge=0, off="0 = 4 on CUDA, 1 on CPU"), "only": TEXT, "prepare": FLAG, "iters": POSITIVE,
    "lora_base": TEXT, "gpu_check": FLAG, "results": TEXT,
    "decode": FLAG, "prompt_tokens": POSITIVE, "against": TEXT,
}

# Settings that must fit together, checked when a script has them all (and none is None): the keys, the test, the line.
TOGETHER = [
    (("n_head", "n_kv_head"), lambda h, kv: h % kv == 0,
     "n_head {n_head} is not a multiple of n_kv_head {n_kv_head}: each key/value head serves n_head / n_kv_head query heads"),
    (("experts_per_token", "n_expert"), lambda k, e: k <= e, "experts_per_token {experts_per_token} is more than n_expert {n_expert}"),
    (("lora_rank", "init_from"), lambda r, base: not r or base, "lora_rank needs --init_from: the base weights the adapters adapt"),
    (("base_dtype", "lora_rank"), lambda dt, r: dt == "float32" or r > 0,
     "base_dtype bfloat16 is for the frozen base of a LoRA run (lora_rank > 0); a full run trains in float32"),
    (("warn_pct", "free_pct", "stop_pct"), lambda w, f, s: w <= f <= s,
     "warn_pct {warn_pct}, free_pct {free_pct}, stop_pct {stop_pct}: each must be at most the next"),
]


def check(config):
    """ConfigError, one line naming the setting and what it may be, for the first setting of config out of its
    range (RULES) or that does not fit with others (TOGETHER). None is 'not set': parse allows it only where
    the default is None."""
    for key, value in config.items():
        rule = RULES.get(key)
        if rule is not None and value is not None and rule.refuses(value):
            raise ConfigError(f"{key}={value!r}: {key} must be {rule.describe()}")
    for keys, fits, msg in TOGETHER:
        if all(config.get(k) is not None for k in keys) and not fits(*(config[k] for k in keys)):
            raise ConfigError(msg.format(**config))


def check_device(want):
    """ConfigError unless this torch can run on device `want` (auto and cpu always can): the scripts that run torch
    call it next to configure(), so that a device picked by hand that is not there is one line before any work."""
    kind, _, index = want.partition(":")
    if kind not in ("cuda", "mps"):
        return
    import torch

    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={want!r}: torch {torch.__version__} has no MPS here (Apple GPUs, macOS 12.3+): "
                          f"use --device=auto or --device=cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={want!r}: torch {torch.__version__} sees no CUDA GPU"
                          f"{' (a CPU-only build)' if torch.version.cuda is None else ''}: use --device=auto or --device=cpu, "
                          f"or install a CUDA build of torch")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"device={want!r}: there are {torch.cuda.device_count()} CUDA GPUs here, numbered from 0")


def _known(key, defaults, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown config key '{key}' in {where}{hint}")


def _coerce(key, value, default, where):
    """Accept value for key if it fits the default's type: int for float; a list or one text for a tuple (--stop=END);
    None, and anything, where the default is None."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    elif isinstance(default, tuple) and isinstance(value, (list, str)):
        return tuple(value) if isinstance(value, list) else (value,)
    raise ConfigError(f"config key '{key}' in {where} wants a {type(default).__name__}, got {value!r}")


def _parse_value(text):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as --device=cuda


def _parse_texts(key, text):
    r"""A setting of texts (--stop) from the command line: a Python list, tuple or quoted text, or else one text as typed,
    read as the inside of a Python string: --stop='\n' is a newline, as in --stop="['\n']" (a backslash is \\), and
    --stop=123 is the text 123."""
    value = _parse_value(text)
    if isinstance(value, (list, tuple)) or isinstance(value, str) and value != text:
        return value
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise ConfigError(f"--{key}={text}: {e.reason}: write a backslash as \\\\")


def _read_file(path):
    try:
        with open(path) as f:
            source = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}")
    scope = {}
    try:
        exec(compile(source, path, "exec"), scope)
    except Exception as e:
        line = getattr(e, "lineno", None) or _lineno(e, path)
        raise ConfigError(f"{path}:{line}: {type(e).__name__}: {e}")
    # plain values only: modules or helper functions imported by the file are not settings
    return {k: v for k, v in scope.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}


def _lineno(exc, path):
    tb = exc.__traceback__
    line = "?"
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == path:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def parse(argv, defaults, rest=None):
    """Returns {key: value} for every setting argv changes: config files, then --key=value, --key value, or a bare
    --flag (a bool setting: True). rest: a list that takes, in order, the arguments that are not for these settings
    (config files and other keys: another script's, as safe_train.py passes train.py's on); without it they are
    errors. Raises ConfigError with a one-line message."""
    out = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")
        if rest is not None and not (arg.startswith("--") and key in defaults):
            rest.append(arg)
        elif not arg.startswith("--"):
            for key, value in _read_file(arg).items():
                _known(key, defaults, arg)
                out[key] = _coerce(key, value, defaults[key], arg)
        else:
            _known(key, defaults, "the command line")
            following = argv[i + 1].lower() if i + 1 < len(argv) else ""
            if not eq and isinstance(defaults[key], bool) and following not in ("true", "false"):
                text = "True"  # a bare flag: --strict
            elif not eq:  # --key value
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
                i += 1
                text = argv[i]
            texts = isinstance(defaults[key], tuple) and getattr(RULES.get(key), "pattern", None)  # --stop
            value = text if isinstance(defaults[key], str) else _parse_texts(key, text) if texts else _parse_value(text)
            out[key] = _coerce(key, value, defaults[key], f"--{key}")
        i += 1
    return out


def script_defaults(path):
    """A script's settings (its top-level assignments of plain values), read from its source without running it:
    what another script checks a config against (safe_train.py, sizing.py: configure(script_defaults(train.py)))."""
    with open(path) as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def settings(scope):
    """The names that count as a script's settings: its plain-valued globals, less _private names and CONSTANTS."""
    return [k for k, v in scope.items() if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, tuple, type(None)))]


def configure(scope, argv=None, keys=None, rest=None):
    """Every script's way in: apply argv (default: sys.argv[1:]) to the dict `scope` (a script's globals(), or another
    script's settings from script_defaults) once every setting is in range (check); returns {setting: value}. Raises
    ConfigError, and then changes nothing. keys: the names that count as settings (default: settings(scope)). rest:
    see parse."""
    argv = sys.argv[1:] if argv is None else argv
    keys = keys or settings(scope)
    changes = parse(argv, {k: scope[k] for k in keys}, rest)
    config = {k: changes.get(k, scope[k]) for k in keys}
    check(config)
    scope.update(changes)
    return config
