"""prepare_fineweb.py on local files, run as a user runs it, with the real o200k_base encoding loaded offline."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

from conftest import ROOT, run_script, stdlib_docstrings


@pytest.fixture(scope="module")
def docs():
    # real prose plus the awkward cases: non-ASCII, a text that looks like a special token, long whitespace
    return stdlib_docstrings(150_000) + ["Ünïcödé — 日本語のテキスト 🙂", "literally <|endoftext|> in the text", "a" + " " * 300 + "b"]


def write_inputs(folder, docs):
    """The same documents as three files: a .txt (one document), a .jsonl and a .parquet (several row groups)."""
    os.makedirs(folder, exist_ok=True)
    n = len(docs)
    parts = {"a.txt": docs[:1], "b.jsonl": docs[1:n // 2], "c.parquet": docs[n // 2:]}
    with open(os.path.join(folder, "a.txt"), "w", encoding="utf-8") as f:
        f.write(parts["a.txt"][0])
    with open(os.path.join(folder, "b.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(parts["b.jsonl"]))
    pq.write_table(pa.table({"id": list(range(len(parts["c.parquet"]))), "text": parts["c.parquet"]}),
                   os.path.join(folder, "c.parquet"), row_group_size=100)
    return folder


def read_shards(out):
    files = sorted(glob.glob(os.path.join(out, "*_val_*.npy"))) + sorted(glob.glob(os.path.join(out, "*_train_*.npy")))
    return files, np.concatenate([np.load(f) for f in files])


def prepare(*args):
    r = run_script("prepare_fineweb.py", *args)
    assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, docs):
    folder = write_inputs(str(tmp_path_factory.mktemp("inputs")), docs)
    out = str(tmp_path_factory.mktemp("full"))
    prepare(f"--input={folder}", "--encoding=o200k_base", f"--out_dir={out}", "--val_tokens=3000", "--shard_size=7000")
    return folder, out


def test_txt_jsonl_parquet_tokens_match_tiktoken_and_decode_back(prepared, docs):
    _, out = prepared
    enc = tiktoken.get_encoding("o200k_base")
    meta = json.load(open(os.path.join(out, "meta.json")))
    files, toks = read_shards(out)
    assert meta["dtype"] == "uint32" and all(np.load(f).dtype == np.uint32 for f in files)  # 201k ids need 32 bits
    assert meta["vocab_size"] == enc.n_vocab and meta["eot"] == enc.eot_token == 199999
    expected = sum(1 + len(enc.encode_ordinary(d)) for d in docs)
    assert len(toks) == expected == meta["tokens"]["val"] + meta["tokens"]["train"]
    assert meta["tokens"]["val"] == 3000 and sum(meta["documents"].values()) == len(docs)
    assert len(np.load(files[0])) == 3000 and all(len(np.load(f)) == 7000 for f in files[1:-1])
    # the documents come back, in order, each after an EOT, and the in-text "<|endoftext|>" is plain text
    assert toks[0] == enc.eot_token and (toks == enc.eot_token).sum() == len(docs)
    pieces = np.split(toks, np.flatnonzero(toks == enc.eot_token))[1:]
    assert [enc.decode(p[1:].tolist()) for p in pieces] == docs


def test_vocabulary_picks_uint16_or_uint32(tmp_path, prepared, docs):
    folder, _ = prepared
    out = str(tmp_path / "small")
    prepare(f"--input={folder}", "--encoding=o200k_base:4096", f"--out_dir={out}", "--val_tokens=3000")
    meta = json.load(open(os.path.join(out, "meta.json")))
    files, toks = read_shards(out)
    assert meta["dtype"] == "uint16" and all(np.load(f).dtype == np.uint16 for f in files)
    assert meta["eot"] == 4096 and toks.max() == 4096 and len(toks) > 0


def kill_after_shards(cmd, out, shards):
    """Start prepare_fineweb.py, SIGKILL it (and its workers) once `shards` shards are finished."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = os.path.join(out, "prepare_state.json")
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:
        try:
            if json.load(open(state))["shards"] >= shards:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


@pytest.mark.parametrize("source", ["parquet", "stdlib"])
def test_killed_then_rerun_is_byte_identical_to_an_uninterrupted_run(tmp_path, prepared, source):
    src = [f"--input={prepared[0]}/c.parquet"] if source == "parquet" else ["--corpus=stdlib"]
    common = [*src, "--encoding=o200k_base:8192", "--val_tokens=2000", "--shard_size=1500", "--workers=1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    prepare(*common, f"--out_dir={full}")
    cmd = [sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), *common, f"--out_dir={cut}"]
    kill_after_shards(cmd, cut, 4)
    assert not os.path.exists(os.path.join(cut, "meta.json")), "the run finished before the kill: nothing was tested"
    kept = {f: os.path.getmtime(f) for f in glob.glob(os.path.join(cut, "*.npy"))}
    assert len(kept) >= 4
    r = prepare(*common, f"--out_dir={cut}")
    names = sorted(os.listdir(full))
    assert names == sorted(os.listdir(cut)) and len(names) > 8
    for name in names:
        assert open(os.path.join(full, name), "rb").read() == open(os.path.join(cut, name), "rb").read(), name
    state = json.load(open(os.path.join(cut, "prepare_state.json")))
    # the finished shards were kept, not rewritten (all but the last, which a kill may catch mid-rename)
    assert sum(os.path.getmtime(f) == t for f, t in kept.items()) >= len(kept) - 1
    assert state["shards"] == len(names) - 2
    assert "already complete" in prepare(*common, f"--out_dir={cut}").stdout


def test_max_tokens_stops_exactly(tmp_path):
    out = str(tmp_path / "d")
    prepare("--corpus=stdlib", "--encoding=o200k_base:4096", "--val_tokens=1000", "--max_tokens=5000", f"--out_dir={out}")
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["tokens"] == {"val": 1000, "train": 4000}


def test_tokenizer_file_installs_the_bpe_offline(tmp_path):
    """--tokenizer_file with an empty tiktoken cache: the file is checked by its sha256 and installed."""
    cache = tmp_path / "cache"
    from data_loader import cached_bpe, get_tokenizer

    get_tokenizer("o200k_base")  # the file is in the test cache from now on (from the bpe-openai package, offline)
    src = cached_bpe("o200k_base")
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1")
    args = [sys.executable, "prepare_fineweb.py", "--corpus=stdlib", "--encoding=o200k_base", "--max_tokens=3000",
            "--val_tokens=1000", f"--out_dir={tmp_path / 'd'}"]
    bad = tmp_path / "not_o200k.tiktoken"
    bad.write_bytes(b"YQ== 0\n")
    r = subprocess.run(args + [f"--tokenizer_file={bad}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "is not o200k_base's BPE file" in r.stderr
    pattern = src[:-30] + "*"  # a quoted pattern, as the README writes it: the script expands it
    r = subprocess.run(args + [f"--tokenizer_file={pattern}"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert os.path.exists(cache / os.path.basename(src))  # train.py and sample.py find it there from now on


def test_bad_inputs_give_one_line(tmp_path, prepared):
    folder, _ = prepared
    no_text = str(tmp_path / "no_text.parquet")
    pq.write_table(pa.table({"content": ["hello"]}), no_text)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    bad_line = tmp_path / "bad.jsonl"  # found mid-run, while workers are busy: still one line
    bad_line.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(300)) + "{oops\n")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ([f"--input={tmp_path}/missing.txt"], "missing.txt does not exist"),
        ([f"--input={no_text}"], "has no 'text' column (it has content)"),
        ([f"--input={empty}"], "the corpus is empty"),
        ([f"--input={bad_line}", "--val_tokens=100", "--batch_docs=8"], "bad.jsonl:301 is not a JSON object with a 'text' field"),
        ([f"--input={folder}/a.txt", f"--out_dir={a_file}/out"], "cannot write to --out_dir"),
        ([f"--input={folder}/a.txt", "--encoding=o300k"], "unknown tokenizer 'o300k'"),
        ([f"--input={folder}/a.txt", "--shard_sise=5"], "did you mean 'shard_size'"),
    ]
    for args, msg in cases:
        args = [f"--out_dir={tmp_path / 'out'}", *args]
        r = run_script("prepare_fineweb.py", *args)
        assert r.returncode != 0 and msg in r.stderr and r.stderr.count("\n") == 1, (args, r.stderr)
    # a different preparation into a finished out_dir is refused, naming what differs
    r = run_script("prepare_fineweb.py", f"--input={folder}", "--encoding=o200k_base", f"--out_dir={prepared[1]}")
    assert r.returncode != 0 and "val_tokens=3000 there, 1000000 now" in r.stderr and r.stderr.count("\n") == 1
