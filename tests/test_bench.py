"""bench.py runs and reports (how fast is BENCH.md's business, not a test's)."""
import re
import subprocess
import sys

from conftest import ROOT, full_only

SMALL = ["--n_layer=1", "--n_embd=64", "--n_head=2", "--n_kv_head=1", "--head_dim=32", "--n_expert=4",
         "--intermediate_size=64", "--vocab_size=1000", "--block_size=64", "--batch_size=2", "--rounds=1"]


def test_bench_runs_and_prints_the_side_by_side_table():
    r = subprocess.run([sys.executable, "bench.py", *SMALL], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    assert "| nanoOSS |" in out and "| nanoOSS dense, equal FLOPs |" in out and "MoE overhead: " in out
    # transformers is optional: either the HF row is there or one line says why not
    assert "| HF GptOssForCausalLM |" in out or "transformers is not installed" in out
    assert "matmul probe" in out and "peak memory of this process" in out
    tok_s = float(out.split("| nanoOSS |")[1].split("|")[1].replace(",", ""))
    assert tok_s > 0


def test_bench_decode_reports_tokens_per_second_with_and_without_the_cache_at_batch_1_and_8():
    r = subprocess.run([sys.executable, "bench.py", *SMALL, "--decode=True", "--prompt_tokens=16", "--max_new_tokens=8"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| (KV cache|no cache), batch (\d) \| (\d+) \| ([\d,.]+) \|$", r.stdout, re.M)
    assert sorted((how, b, n) for how, b, n, _ in rows) == [("KV cache", "1", "8"), ("KV cache", "8", "8"), ("no cache", "1", "1"),
                                                             ("no cache", "8", "1")], r.stdout
    assert all(float(tok_s.replace(",", "")) > 0 for *_, tok_s in rows)


@full_only
def test_bench_runs_compiled():
    """--compile=True used to crash as train.py did (issue 20); the blocks compile as train.py compiles them."""
    r = subprocess.run([sys.executable, "bench.py", *SMALL, "--compile=True", "--hf=False", "--layer_T=0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "compile True" in r.stdout and "| nanoOSS |" in r.stdout and "MoE overhead: " in r.stdout
