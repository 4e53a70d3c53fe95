"""configurator.py: config files and --key=value overrides, with every key checked and every setting in its range;
and the one error path of every script (a bad input: one line on stderr, exit 2)."""
import functools
import importlib.util
import os
import subprocess
import sys

import pytest

from conftest import ROOT, run_script
from configurator import RULES, ConfigError, check, configure, parse, settings

DEFAULTS = {"batch_size": 8, "lr": 3e-4, "compile": None, "device": "auto", "tie_embeddings": False, "max_iters": 100}


def test_file_then_command_line_overrides(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("import math\nbatch_size = 4\nlr = 1e-3 * math.sqrt(4)\n")
    out = parse([str(f), "--batch_size=2", "--device", "cpu"], DEFAULTS)
    assert out == {"batch_size": 2, "lr": 2e-3, "device": "cpu"}


def test_int_for_float_none_defaults_and_bools():
    out = parse(["--lr=1", "--compile=False", "--tie_embeddings=true"], DEFAULTS)
    assert out == {"lr": 1.0, "compile": False, "tie_embeddings": True}
    assert isinstance(out["lr"], float)


@pytest.mark.parametrize("argv, msg", [
    (["--batch_sise=4"], "unknown config key 'batch_sise' in the command line (did you mean 'batch_size'?)"),
    (["--batch_size=4.5"], "config key 'batch_size' in --batch_size wants a int, got 4.5"),
    (["--tie_embeddings=1"], "wants a bool"),
    (["--max_iters"], "--max_iters needs a value"),
    (["missing_config.py"], "cannot read config file missing_config.py"),
])
def test_bad_input_is_one_clear_message(argv, msg):
    with pytest.raises(ConfigError) as e:
        parse(argv, DEFAULTS)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_a_bare_flag_is_true_and_another_scripts_arguments_pass_on_in_order(tmp_path):
    """One parser for every script (issue 22): safe_train.py takes its own settings out of a command line and passes
    the rest, config files included, on to train.py, which parses them the same way."""
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = 4\n")
    mine = {"strict": False, "check_only": False, "budget_gb": 0.0}
    rest = []
    argv = [str(f), "--strict", "--batch_size", "2", "--check-only", "--budget_gb", "3", "--device=cpu", "--preflight", "False"]
    out = parse(argv, {**mine, "preflight": True}, rest)
    assert out == {"strict": True, "check_only": True, "budget_gb": 3.0, "preflight": False}
    assert rest == [str(f), "--batch_size", "2", "--device=cpu"]
    assert parse(rest, DEFAULTS) == {"batch_size": 2, "device": "cpu"}


def test_unknown_key_in_a_file_names_the_file_and_the_closest_key(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("max_iter = 10\n")
    with pytest.raises(ConfigError, match=rf"unknown config key 'max_iter' in {f} \(did you mean 'max_iters'\?\)"):
        parse([str(f)], DEFAULTS)


def test_a_broken_config_file_names_its_line(tmp_path):
    f = tmp_path / "cfg.py"
    f.write_text("batch_size = 4\nlr = undefined_name\n")
    with pytest.raises(ConfigError, match=rf"{f}:2: NameError"):
        parse([str(f)], DEFAULTS)


@functools.lru_cache(maxsize=None)
def script_settings():
    """{script: {setting: default}} for every script with settings, as configure() sees them."""
    import bench
    import export_hf
    import prepare_fineweb
    import safe_train
    import sample
    import train

    modules = [train, sample, prepare_fineweb, bench]
    for name in ("gpu_check", "memory"):  # bench/'s own scripts, loaded as python runs them
        spec = importlib.util.spec_from_file_location(f"bench/{name}", os.path.join(ROOT, "bench", f"{name}.py"))
        modules.append(importlib.util.module_from_spec(spec))
        spec.loader.exec_module(modules[-1])
    out = {m.__name__.removesuffix(".py") + ".py": {k: vars(m)[k] for k in settings(vars(m))} for m in modules}
    return {**out, "safe_train.py": dict(safe_train.SETTINGS), "export_hf.py": dict(export_hf.SETTINGS)}


def out_of_range(rule):
    """Values a setting with this rule must refuse: zero or a negative where the range starts above them, past each
    bound, off its multiple, an unknown choice, empty text where text is required, and a value of another type."""
    if rule.kind is bool:
        return ["yes", 1]
    if rule.kind is tuple and rule.pattern:  # texts (--stop)
        return [("",), ("ok", 5), "seven"]
    if rule.kind is str:
        return [5] + (["nonsense"] if rule.choices else []) + ([""] if rule.pattern else [])
    step = 1 if rule.kind is int else 0.5
    bad = [b for b in (rule.ge is not None and rule.ge - step, rule.gt, rule.le is not None and rule.le + step, rule.lt) if b is not False and b is not None]
    bad += [v for v in (0, -1) if (rule.ge is not None and v < rule.ge) or (rule.gt is not None and v <= rule.gt)]
    bad += [rule.ge + 1] if rule.multiple > 1 else []
    bad += [2.5] if rule.kind is int else []
    return [(b,) for b in bad] + [("seven",)] if rule.kind is tuple else bad + ["seven"]


def test_every_setting_of_every_script_has_a_rule_and_refuses_each_value_out_of_its_range():
    """Issue 21's sweep, in-process: a new setting without a line in configurator.RULES fails here."""
    for script, defaults in script_settings().items():
        missing = [k for k in defaults if k not in RULES]
        assert not missing, f"{script}: settings with no rule in configurator.RULES: {missing}"
        check(defaults)  # the defaults themselves are in range
        for key in defaults:
            bad = out_of_range(RULES[key])
            assert bad, key
            for value in bad:
                with pytest.raises(ConfigError) as e:
                    check({**defaults, key: value})
                assert str(e.value).startswith(f"{key}={value!r}: {key} must be "), (script, key, value, str(e.value))


def test_every_config_file_is_in_range_for_train_py_and_bench_py():
    import glob

    for script in ("train.py", "bench.py"):
        defaults = script_settings()[script]
        for path in sorted(glob.glob(os.path.join(ROOT, "config", "*.py"))):
            check({**defaults, **parse([path], defaults)})


def test_the_values_that_mean_off_are_accepted_and_each_rule_says_which():
    off = {"train.py": {"sample_every": 0, "grad_clip": 0.0, "loss_chunk": 0, "lora_rank": 0, "temperature": 0.0, "top_k": 0,
                        "keep_last_n": 0, "eval_interval": 0, "mor_aux_loss_coef": None, "compile": None, "n_recursion": 1},
           "prepare_fineweb.py": {"max_tokens": 0, "workers": 0}, "safe_train.py": {"budget_gb": 0.0, "max_hours": 0.0},
           "bench.py": {"layer_T": 0}}
    for script, values in off.items():
        check({**script_settings()[script], **values})
        for key in values:
            assert " = " in RULES[key].off, key  # e.g. "0 = never": the rule's line in the error says it


@pytest.mark.parametrize("argv, msg", [  # issue 21 item 10: what failed at 6087689, and how
    (["--top_k=0"], None),  # off: sample from every token (a traceback at 6087689)
    (["--top_k=-1"], "top_k=-1: top_k must be an int >= 0 (0 = every token)"),
    (["--temperature=-1"], "temperature=-1.0: temperature must be a number >= 0 (0 = greedy)"),  # sampled the least likely
    (["--grad_accum_steps=0"], "grad_accum_steps=0: grad_accum_steps must be an int >= 1"),  # "loss is not finite"
    (["--grad_accum_steps=-1"], "grad_accum_steps=-1: grad_accum_steps must be an int >= 1"),  # trained nothing, exit 0
    (["--batch_size=0"], "batch_size=0: batch_size must be an int >= 1"),  # reshape traceback
    (["--block_size=0"], "block_size=0: block_size must be an int >= 1"),
    (["--n_recursion=0"], "n_recursion=0: n_recursion must be an int >= 1 (1 = no recursion)"),  # ZeroDivisionError
    (["--n_head=3", "--n_kv_head=2"], "n_head 3 is not a multiple of n_kv_head 2"),  # AssertionError, exit 1
    (["--experts_per_token=8"], "experts_per_token 8 is more than n_expert 4"),
    (["--head_dim=33"], "head_dim=33: head_dim must be a multiple of 2, >= 2"),
    (["--attn_pattern=SX"], "attn_pattern='SX': attn_pattern must be letters S (sliding window) and F (full causal)"),  # no sliding layers
    (["--lora_rank=8"], "lora_rank needs --init_from"),
    (["--base_dtype=bfloat16"], "base_dtype bfloat16 is for the frozen base of a LoRA run"),
])
def test_out_of_range_settings_of_issue_21_are_refused_before_any_work(argv, msg):
    scope = dict(script_settings()["train.py"])
    if msg is None:
        configure(scope, argv)
        return
    with pytest.raises(ConfigError) as e:
        configure(scope, argv)
    assert str(e.value).startswith(msg) and scope == script_settings()["train.py"]  # nothing was changed


def test_none_is_a_value_only_where_the_default_is_none():
    defaults = script_settings()["train.py"]
    assert parse(["--compile=None", "--mor_aux_loss_coef=None"], defaults) == {"compile": None, "mor_aux_loss_coef": None}
    for key in ("top_k", "temperature", "sinks"):
        with pytest.raises(ConfigError, match=f"config key '{key}' in --{key} wants a .*, got None"):
            parse([f"--{key}=None"], defaults)
    assert parse(["--device=None", "--start=5"], {"device": "auto", "start": "x"}) == {"device": "None", "start": "5"}  # text as typed


def test_a_bad_setting_stops_each_script_in_one_line_naming_it_and_nothing_is_created(tmp_path):
    new = tmp_path / "new"
    cases = [
        ("sample.py", [f"--out_dir={new}", "--temperature=-1"], "temperature=-1.0: temperature must be a number >= 0"),
        ("prepare_fineweb.py", [f"--out_dir={new}", "--shard_size=0"], "shard_size=0: shard_size must be an int >= 1"),
        ("prepare_fineweb.py", [f"--out_dir={new}", "--corpus=web"], "corpus='web': corpus must be one of fineweb-edu, stdlib"),
        ("export_hf.py", [f"--ckpt={tmp_path}", f"--out={new}", "--dtype=int8"], "dtype='int8': dtype must be one of auto,"),
    ]  # train.py's and safe_train.py's: tests/test_train.py and tests/test_safe_train.py, against a run's out_dir
    for script, args, msg in cases:
        r = run_script(script, *args)
        assert r.returncode == 2 and r.stderr.startswith(f"{script}: {msg}") and r.stderr.count("\n") == 1, (script, r.stderr)
        assert not new.exists(), script


def test_every_script_turns_a_bad_input_into_one_line_and_exit_2(tmp_path):
    """One error path (issue 21 item 13): at 6087689 these exited 1 (sample.py, export_hf.py, prepare_fineweb.py,
    safe_train.py, plot.py) or with an AssertionError (model.py's command line, now sizing.py's; under python -O it went on
    with the bad shape)."""
    none = tmp_path / "none"
    cases = [
        (["sample.py", f"--out_dir={none}"], f"sample.py: no checkpoint in {none}"),
        (["export_hf.py", f"--ckpt={none}", f"--out={tmp_path / 'hf'}"], f"export_hf.py: init_from {none}: not an HF GptOss"),
        (["prepare_fineweb.py", f"--input={none}.txt", f"--out_dir={tmp_path / 'data'}"], "prepare_fineweb.py: "),
        (["plot.py", str(none)], "plot.py: "),
        (["-O", "sizing.py", "--n_head=3", "--n_kv_head=2"], "sizing.py: n_head 3 is not a multiple of n_kv_head 2"),
    ]
    for argv, start in cases:
        r = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith(start) and r.stderr.count("\n") == 1, (argv, r.returncode, r.stderr)
    assert os.listdir(tmp_path) == []  # nothing written
