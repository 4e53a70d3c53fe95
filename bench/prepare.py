"""
Preparation speed: prepare_fineweb.py against a reference written the way build-nanogpt's fineweb.py works
(a process pool mapping encode_ordinary over single documents, chunksize 16, copying into fixed-size
shards), on the same local parquet file, the same encoding and the same number of processes.
    python bench/prepare.py                          # builds a >= 60 MB parquet of Python docstrings once, 3 rounds
    python bench/prepare.py --parquet=my.parquet     # or bring your own (a FineWeb-Edu file, say)
Runs alternate (ours, reference, ours, ...) since a shared machine is noisy; medians are reported.
Each run is a fresh process, timed from start to exit, writing its shards to a temporary folder.
"""
import ast
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # configurator.py and data_loader.py live one folder up

parquet = ""  # default: .cache/bench_prepare_docstrings.parquet, built on first use
mb = 60  # size of the built corpus, MB of text
encoding = "o200k_base"
rounds = 3
workers = 0  # 0 = all cores, for both
shard_size = 10_000_000
reference = ""  # internal: run the reference on this parquet file
out_dir = ""  # internal: where the reference writes


def build_corpus(path, size_mb):
    """One document per .py file of the stdlib and site-packages: its docstrings, joined. English prose
    with some code, a few KB per document (FineWeb-Edu's documents average about 3 KB). Passes over the
    files repeat until size_mb is reached; BPE has no cache, so a repeated document costs what a new one does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = []
    for top in dict.fromkeys([sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"]]):
        for root, dirs, files in os.walk(top):
            dirs.sort()
            for fname in sorted(f for f in files if f.endswith(".py")):
                try:
                    with open(os.path.join(root, fname), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
                    continue
                parts = [ast.get_docstring(n) for n in ast.walk(tree)
                         if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
                text = "\n\n".join(p for p in parts if p)
                if len(text) > 500:
                    docs.append(text)
    size, out = 0, []
    while size < size_mb * 1e6:
        for d in docs:
            out.append(d)
            size += len(d)
            if size >= size_mb * 1e6:
                break
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pq.write_table(pa.table({"text": out}), path + ".tmp", row_group_size=1024)  # 6 MB of text per row group
    os.replace(path + ".tmp", path)
    return len(out), size


# ----------------------------------------------------------------------------- the reference (build-nanogpt style)

def _ref_init(name):
    global _enc
    import tiktoken

    _enc = tiktoken.get_encoding(name)


def _ref_tokenize(doc):
    tokens = [_enc.eot_token]
    tokens.extend(_enc.encode_ordinary(doc))
    return np.array(tokens).astype(np.uint32)


def run_reference(path, out):
    import pyarrow.parquet as pq

    def docs():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024, columns=["text"]):
            yield from batch.column(0).to_pylist()

    with mp.Pool(workers or os.cpu_count(), initializer=_ref_init, initargs=(encoding,)) as pool:
        shard_index, buf, count = 0, np.empty((shard_size,), dtype=np.uint32), 0
        for tokens in pool.imap(_ref_tokenize, docs(), chunksize=16):
            if count + len(tokens) < shard_size:
                buf[count:count + len(tokens)] = tokens
                count += len(tokens)
            else:
                split = "val" if shard_index == 0 else "train"
                rest = shard_size - count
                buf[count:count + rest] = tokens[:rest]
                np.save(os.path.join(out, f"ref_{split}_{shard_index:06d}"), buf)
                shard_index += 1
                buf[0:len(tokens) - rest] = tokens[rest:]
                count = len(tokens) - rest
        if count:
            np.save(os.path.join(out, f"ref_train_{shard_index:06d}"), buf[:count])


def timed(cmd):
    out = tempfile.mkdtemp(prefix="bench_prepare_")
    try:
        t = time.perf_counter()
        subprocess.run(cmd + [f"--out_dir={out}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dt = time.perf_counter() - t
        tokens = sum(len(np.load(os.path.join(out, f), mmap_mode="r")) for f in os.listdir(out) if f.endswith(".npy"))
        return dt, tokens
    finally:
        shutil.rmtree(out)


def main():
    from configurator import configure

    configure(globals())
    here = ROOT
    if reference:
        return run_reference(reference, out_dir)
    path = parquet or os.path.join(here, ".cache", "bench_prepare_docstrings.parquet")
    if not os.path.exists(path):
        print(f"building {path} ...", flush=True)
        n, size = build_corpus(path, mb)
        print(f"  {n:,} documents, {size / 1e6:.1f} MB of text", flush=True)
    ours = [sys.executable, os.path.join(here, "prepare_fineweb.py"), f"--input={path}", f"--encoding={encoding}",
            f"--shard_size={shard_size}", f"--val_tokens={shard_size}", f"--workers={workers}"]
    ref = [sys.executable, os.path.abspath(__file__), f"--reference={path}", f"--encoding={encoding}",
           f"--shard_size={shard_size}", f"--workers={workers}"]
    times = {"prepare_fineweb.py": [], "reference": []}
    for r in range(rounds):
        for label, cmd in (("prepare_fineweb.py", ours), ("reference", ref)):
            dt, tokens = timed(cmd)
            times[label].append(dt)
            print(f"round {r + 1} {label:18s} {dt:6.2f} s  {tokens / dt:12,.0f} tok/s  ({tokens:,} tokens)", flush=True)
    text_mb = os.path.getsize(path) / 1e6
    print(f"\n{path} ({text_mb:.0f} MB on disk), {encoding}, {workers or os.cpu_count()} processes, "
          f"median of {rounds}:")
    print("| | seconds | tokens/s |\n| --- | --- | --- |")
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"| {k} | {v:.2f} | {tokens / v:,.0f} |")
    print(f"speed-up: {med['reference'] / med['prepare_fineweb.py']:.2f}x")


if __name__ == "__main__":
    main()
