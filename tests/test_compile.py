"""torch.compile as a user runs it (README, "torch.compile"): a compiled run gives the eager run's numbers through
its training steps, eval, sample and save, and a compiler that fails, wherever it fails, leaves the run eager with
one line and the same numbers. That compiled code really ran is counted by tests/compile_backends.py's backend
(inductor, counting its graphs and their calls), named with --compile_backend as any backend would be."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, full_only, run_script
from generate import generate

# 3 steps, an eval at another batch shape (3 rows, training's 8: a new shape for the compiled blocks, no grad), a sample
# (its prefill and a one-token step against the cache) and a save; on the CPU, in fp32, on any machine (the GPU check
# compares CUDA's compiled runs)
RUN = [*TINY, "--device=cpu", "--max_iters=3", "--eval_interval=3", "--eval_iters=1", "--eval_batch_size=3", "--log_interval=1",
       "--sample_every=3", "--sample_tokens=2", "--save_every=3", "--lr=3e-3", "--warmup_iters=0"]


def train(data_dir, out, *extra, backend=None, nproc=1):
    """train.py, eager or (backend) compiled; returns (stdout, log records, counts of compiled graphs and calls)."""
    counts = out + ".counts.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1", COMPILE_COUNTS=counts,
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(ROOT, "tests"), os.environ.get("PYTHONPATH")])))
    args = [*RUN, f"--data_dir={data_dir}", f"--out_dir={out}", *extra]
    if backend:
        args += ["--compile=True", f"--compile_backend=compile_backends:{backend}"]
    if nproc == 1:
        r = run_script("train.py", *args, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
    else:  # judged by what it wrote: a two-rank gloo run can abort at exit after all its work (DESIGN.md)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py",
                            *args], cwd=ROOT, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
        assert open(os.path.join(out, "latest")).read() == "ckpt_3", r.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    return r.stdout, log, json.load(open(counts)) if backend else None


def numbers(log):
    """Every loss the run logged, in order: steps, then the eval's train and val losses."""
    return [v for r in log if "compile_off" not in r for v in (r.get("loss"), r.get("train_loss"), r.get("val_loss")) if v is not None]


def assert_same_numbers(a, b):
    assert len(numbers(a)) == len(numbers(b)) == 5
    assert all(math.isclose(x, y, rel_tol=0, abs_tol=1e-5) for x, y in zip(numbers(a), numbers(b))), (numbers(a), numbers(b))


def sample_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("sample 3 |"))


def assert_compiled_throughout(out, stdout, log, counts):
    assert counts["graphs"] > 0 and counts["calls"] > counts["graphs"], counts  # compiled graphs ran, and ran again
    assert "compile off" not in stdout and not any("compile_off" in r for r in log)  # no fall-back
    beat = json.load(open(os.path.join(out, "heartbeat.json")))
    assert beat["phase"] == "done" and beat["compile_off"] is None
    assert open(os.path.join(out, "latest")).read() == "ckpt_3"


@pytest.fixture(scope="module")
def eager(tmp_path_factory, data_dir):
    out = str(tmp_path_factory.mktemp("eager") / "run")
    stdout, log, _ = train(data_dir, out)
    return out, stdout, log


def test_a_compiled_run_trains_evaluates_samples_and_saves_with_the_eager_numbers(tmp_path, data_dir, eager):
    out = str(tmp_path / "compiled")
    stdout, log, counts = train(data_dir, out, backend="counting")
    assert "compile True" in stdout
    assert_compiled_throughout(out, stdout, log, counts)
    assert_same_numbers(log, eager[2])
    assert sample_line(stdout) == sample_line(eager[1])  # the same sampled tokens from the compiled prefill and decode


@pytest.mark.parametrize("backend, where, off_from", [
    ("failing", "step 1", 1),  # at the first call
    ("failing_without_grad", "the eval at iter 3", 4),  # at the recompile for eval, after 3 compiled steps
    pytest.param("failing_backward", "step 1", 1, marks=full_only),  # at the first backward, after a compiled forward ran
])
def test_a_compiler_error_leaves_the_run_eager_with_one_line_and_the_same_numbers(tmp_path, data_dir, eager, backend, where, off_from):
    out = str(tmp_path / backend)
    stdout, log, counts = train(data_dir, out, backend=backend)
    lines = [line for line in stdout.splitlines() if "compile off" in line]
    assert len(lines) == 1 and lines[0].startswith(f"compile off from step {off_from}: {where} failed") and "tests/compile_backends.py" in lines[0], stdout
    assert [r["compile_off"] for r in log if "compile_off" in r] == [off_from]
    assert json.load(open(os.path.join(out, "heartbeat.json")))["compile_off"] == off_from
    assert (counts["calls"] > 0) == (backend != "failing")  # the compiled part that came before the failure ran
    assert_same_numbers(log, eager[2])  # the failed step redone eager: nothing counted twice, nothing lost
    assert sample_line(stdout) == sample_line(eager[1])
    assert open(os.path.join(out, "latest")).read() == "ckpt_3"


def test_an_unknown_compile_backend_is_one_line_and_exit_2(tmp_path, data_dir):
    out = tmp_path / "run"
    r = run_script("train.py", *RUN, f"--data_dir={data_dir}", f"--out_dir={out}", "--compile=True", "--compile_backend=indcutor")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "compile_backend 'indcutor'" in lines[0], r.stderr
    assert not os.path.exists(out / "latest")


@full_only
@pytest.mark.parametrize("mode", ["lora", "mor_expert", "activation_checkpointing"])
def test_compiled_lora_mor_and_activation_checkpointing_runs_give_the_eager_numbers(tmp_path, data_dir, eager, mode):
    extra = {"lora": [f"--init_from={eager[0]}", "--lora_rank=8", "--base_dtype=bfloat16"],  # FrozenMatmul's bf16 base
             "mor_expert": ["--n_layer=4", "--n_recursion=2", "--mor_router=expert"],
             "activation_checkpointing": ["--activation_checkpointing=True"]}[mode]
    _, ref, _ = train(data_dir, str(tmp_path / "eager"), *extra)
    out = str(tmp_path / "compiled")
    stdout, log, counts = train(data_dir, out, *extra, backend="counting")
    assert_compiled_throughout(out, stdout, log, counts)
    assert_same_numbers(log, ref)


@full_only
def test_a_compiled_two_process_fsdp_run_gives_the_eager_numbers(tmp_path, data_dir):
    extra = ["--batch_size=4", "--grad_accum_steps=2"]
    _, ref, _ = train(data_dir, str(tmp_path / "eager"), *extra, nproc=2)
    out = str(tmp_path / "compiled")
    stdout, log, counts = train(data_dir, out, *extra, backend="counting", nproc=2)
    assert "2 processes (FSDP)" in stdout
    assert_compiled_throughout(out, stdout, log, counts)
    assert_same_numbers(log, ref)


@full_only
def test_mor_token_choice_compiles_once_not_at_every_step(tmp_path, data_dir):
    """Its routed rows change length every step: marked dynamic (model.GPT.forward), the blocks compile for the
    first step's shapes and never again, however many steps follow."""
    mor = ["--n_layer=4", "--n_recursion=2", "--mor_router=token", "--eval_interval=0", "--sample_every=0"]
    graphs = {}
    for steps in (2, 8):
        out = str(tmp_path / f"steps{steps}")
        _, log, counts = train(data_dir, out, *mor, f"--max_iters={steps}", backend="counting")
        assert len(log) == steps and counts["calls"] > 0
        graphs[steps] = counts["graphs"]
    assert graphs[8] == graphs[2], graphs


@full_only
def test_compiled_greedy_generation_gives_the_eager_tokens(eager, tmp_path):
    """The prefill and the one-token steps against the KV cache, past the sliding window: in process with the counting
    backend, and through sample.py --compile=True as a user runs it."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import compile_backends
    from devices import compile_blocks
    from weights import load_model

    model, _ = load_model(eager[0])
    prompt = torch.arange(20)[None] + 100  # longer than TINY's window of 16
    with torch.no_grad():
        want = generate(model, prompt, 24, temperature=0)
        calls = compile_backends.counts["calls"]
        try:
            got = generate(compile_blocks(model, compile_backends.counting), prompt, 24, temperature=0)
        finally:
            torch._dynamo.reset()
    assert compile_backends.counts["calls"] > calls
    assert torch.equal(got, want)
    runs = [run_script("sample.py", f"--out_dir={eager[0]}", "--start=The function", "--max_new_tokens=24", "--temperature=0", flag)
            for flag in ("--compile=False", "--compile=True")]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr[-3000:]
    assert "compile off" not in runs[1].stderr and "compile on" in runs[1].stderr
    assert runs[1].stdout == runs[0].stdout


def test_one_token_steps_compiled_with_dynamic_false_run_every_token_on_the_first_steps_graphs():
    """generate.compile_decode (sample.py --compile=True): the static cache gives every one-token step the same shapes
    and reads the position on the device, so what dynamo compiled for the first step serves every later token. With
    recompiles made errors, 12 more tokens (past the window of 16: the sliding layers' rings wrap) compile nothing new
    and give the eager step's logits. On the CPU the experts run eagerly between graphs (model.Experts); on CUDA in
    bf16 the step is one graph."""
    from torch._dynamo.utils import counters

    from generate import compile_decode, decode_step, new_cache, prefill
    from model import GPT, GPTConfig

    torch.manual_seed(0)  # TINY's shape
    model = GPT(GPTConfig(vocab_size=4097, block_size=64, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, head_dim=16, n_expert=4,
                          experts_per_token=2, intermediate_size=64, sliding_window=16, tie_embeddings=True)).eval()
    prompt = torch.randint(0, 4097, (2, 20))
    compiled, eager = new_cache(model, 2, 40), new_cache(model, 2, 40)
    torch._dynamo.reset()
    counters.clear()
    step = compile_decode(model).decode_step
    try:
        with torch.no_grad():
            ids = prefill(model, prompt, compiled)[:, -1].argmax(-1, keepdim=True)
            prefill(model, prompt, eager)
            logits = step(model, ids, compiled)
            graphs = counters["stats"]["unique_graphs"]
            assert graphs > 0
            with torch._dynamo.config.patch(error_on_recompile=True, suppress_errors=False):
                for _ in range(12):
                    torch.testing.assert_close(logits, decode_step(model, ids, eager), atol=1e-5, rtol=1e-5)
                    ids = logits[:, -1].argmax(-1, keepdim=True)
                    logits = step(model, ids, compiled)
        assert counters["stats"]["unique_graphs"] == graphs
        assert compiled[0].pos.item() == eager[0].pos.item() + 1 == 33
    finally:
        compile_decode(model, False)
        torch._dynamo.reset()
