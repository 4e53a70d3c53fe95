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
from data_loader import get_tokenizer


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
    bad_line = tmp_path / "bad.jsonl"  # on line 301: found by the scan before any work, still one line
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


def test_input_that_is_not_utf8_is_one_line_naming_file_and_line_or_is_replaced(tmp_path):
    """Latin-1 text (`caf\\xe9`) in a .txt and on one .jsonl line: refused before any work with the file, line and
    byte offset; --decode_errors=replace prepares it with U+FFFD in place of the byte."""
    txt, jsonl = tmp_path / "latin1.txt", tmp_path / "mixed.jsonl"
    good = "Crème brûlée\nun caf".encode()  # UTF-8, then Latin-1 from here on
    txt.write_bytes(good + b"\xe9 cr\xe8me\n")
    lines = [json.dumps({"text": f"record {i}"}).encode() + b"\n" for i in range(3)]
    jsonl.write_bytes(b"".join(lines) + b'{"text": "caf\xe9"}\n')
    out = tmp_path / "out"
    for path, where in ((txt, f"{txt}:2: byte {len(good)} (0xe9)"), (jsonl, f"{jsonl}:4: byte {sum(map(len, lines)) + 13} (0xe9)")):
        r = run_script("prepare_fineweb.py", f"--input={path}", "--encoding=o200k_base:4096", f"--out_dir={out}", "--val_tokens=5")
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith(f"prepare_fineweb.py: {where} is not UTF-8") and "--decode_errors=replace" in r.stderr
        assert not out.exists()  # refused before any work
    prepare(f"--input={jsonl},{txt}", "--encoding=o200k_base:4096", f"--out_dir={out}", "--val_tokens=5", "--decode_errors=replace")
    text = get_tokenizer("o200k_base:4096").decode(read_shards(str(out))[1].tolist())
    assert text.endswith("<|endoftext|>caf\ufffd<|endoftext|>Crème brûlée\nun caf\ufffd cr\ufffdme\n")


def child_of_a_terminal():
    """A command typed at a terminal starts with Ctrl-C at its default (a test before may have left this process
    ignoring SIGINT, which a child inherits: it then ran to the end), and here at nice 19, so that on a loaded machine
    the loop below sees the first shard before the child has finished them all."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.nice(19)


def interrupt_after_first_shard(cmd, out):
    """Start prepare_fineweb.py in its own process group and press Ctrl-C, as a terminal does (SIGINT to the whole
    group: the main process and its workers), once its first shard is finished. -> (exit code, stderr)"""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         preexec_fn=child_of_a_terminal)
    state, deadline = os.path.join(out, "prepare_state.json"), time.time() + 120
    while p.poll() is None and not os.path.exists(state) and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(p.pid, signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    assert not os.path.exists(os.path.join(out, "meta.json")), "it finished before the Ctrl-C: nothing was tested"
    return p.returncode, err


def test_ctrl_c_is_one_line_saying_how_to_continue_and_the_rerun_finishes_the_same_data(tmp_path, prepared):
    common = [f"--input={prepared[0]}/b.jsonl", "--encoding=o200k_base:8192", "--val_tokens=2000", "--shard_size=300",
              "--workers=1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    rc, err = interrupt_after_first_shard([sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), *common, f"--out_dir={cut}"], cut)
    # one line, not a traceback from each process
    assert rc == 130 and err == f"prepare_fineweb.py: stopped; rerun the same command to continue from the last finished shard in {cut}\n", err
    prepare(*common, f"--out_dir={cut}")
    prepare(*common, f"--out_dir={full}")
    names = sorted(os.listdir(full))
    assert names == sorted(os.listdir(cut))
    for name in names:
        assert open(os.path.join(full, name), "rb").read() == open(os.path.join(cut, name), "rb").read(), name


def test_inputs_changed_after_an_interruption_are_refused_in_one_line(tmp_path, docs):
    """Three .jsonl files, Ctrl-C after the first shard, then a fourth file that sorts first (or an edited file):
    the rerun refuses, naming the file, instead of skipping the wrong documents. Put back, it finishes."""
    folder = tmp_path / "in"
    folder.mkdir()
    thirds = [docs[:len(docs) // 3], docs[len(docs) // 3:2 * len(docs) // 3], docs[2 * len(docs) // 3:]]
    for name, part in zip(("a.jsonl", "b.jsonl", "c.jsonl"), thirds):
        (folder / name).write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    out = str(tmp_path / "out")
    cmd = [f"--input={folder}", "--encoding=o200k_base:8192", "--val_tokens=2000", "--shard_size=300", "--workers=1", f"--out_dir={out}"]
    interrupt_after_first_shard([sys.executable, os.path.join(ROOT, "prepare_fineweb.py"), *cmd], out)
    new = folder / "0_new.jsonl"
    new.write_text(json.dumps({"text": "a document added after the interruption"}) + "\n")

    def refused(change):
        r = run_script("prepare_fineweb.py", *cmd)
        assert r.returncode != 0 and r.stderr.count("\n") == 1, r.stderr
        assert f"the inputs changed since {out} was prepared from them: {change};" in r.stderr, r.stderr

    refused(f"{new} is new")
    new.unlink()
    b = folder / "b.jsonl"
    b_stat, b_text = b.stat(), b.read_text()
    b.write_text(b_text + json.dumps({"text": "one more"}) + "\n")
    refused(f"{b} was modified")
    b.write_text(b_text)
    os.utime(b, ns=(b_stat.st_atime_ns, b_stat.st_mtime_ns))  # as it was: the same name, size and modification time
    prepare(*cmd)
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert sum(meta["documents"].values()) == len(docs)  # every document once
    enc = get_tokenizer("o200k_base:8192")
    assert read_shards(out)[1].tolist() == [t for d in docs for t in [enc.eot_token] + enc.encode_ordinary(d)]
