"""
Text -> token shards + meta.json, the format data_loader.py reads.
    python prepare_fineweb.py --corpus=stdlib --encoding=o200k_base:32768 --out_dir=data/mac_micro   # no network
    python prepare_fineweb.py --input=my_texts/ --out_dir=data/mine                                  # .txt / .jsonl
    python prepare_fineweb.py --out_dir=data/fineweb_edu                                             # FineWeb-Edu
Documents are separated by <|endoftext|>. Shard 0 is validation (the first val_tokens tokens), then train
shards of shard_size tokens; uint16 when the vocabulary fits, else uint32. Each shard is written under a
temporary name and renamed when complete.
"""
import ast
import json
import multiprocessing as mp
import os
import sys
import sysconfig

import numpy as np

corpus = "fineweb-edu"  # fineweb-edu (the hub, needs `datasets` and a network) | stdlib (ships with Python)
name = "sample-10BT"  # the FineWeb-Edu subset
input = ""  # comma-separated .txt / .jsonl files or folders; replaces --corpus
encoding = "o200k_base"  # a tiktoken name; o200k_base:N keeps its first N merges (see data_loader.get_tokenizer)
out_dir = "data/fineweb_edu"
shard_size = 100_000_000  # tokens per train shard
val_tokens = 1_000_000
max_tokens = 0  # stop after this many tokens (0 = all)
workers = 0  # tokenizer processes (0 = all cores)


def stdlib_docs():
    """Docstrings of the Python standard library: English prose that every Python install carries, so a
    first run needs no download (a few MB; enough to watch a small model learn, not to make it good)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for fname in sorted(f for f in files if f.endswith(".py")):
            try:
                with open(os.path.join(root, fname), encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 80:
                        yield doc


def file_docs(paths):
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith((".txt", ".jsonl")))
        elif os.path.exists(p):
            files.append(p)
        else:
            sys.exit(f"prepare_fineweb.py: input {p} does not exist")
    for path in files:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".jsonl"):
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            yield json.loads(line)["text"]
                        except (json.JSONDecodeError, KeyError):
                            sys.exit(f"prepare_fineweb.py: {path}:{i} is not a JSON object with a 'text' field")
            else:
                yield f.read()


def hub_docs():
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("prepare_fineweb.py: the hub path needs `pip install datasets`; offline, use --corpus=stdlib or --input")
    try:
        ds = load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
        for row in ds:
            yield row["text"]
    except Exception as e:
        sys.exit(f"prepare_fineweb.py: cannot stream FineWeb-Edu ({type(e).__name__}); offline, download its parquet "
                 f"files elsewhere and pass --input, or use --corpus=stdlib")


_enc = None


def _init_worker(name):
    # passed explicitly: macOS spawns workers, which re-import this file and would see the default encoding
    global _enc
    from data_loader import get_tokenizer

    _enc = get_tokenizer(name)


def _tokenize(doc):
    return np.array([_enc.eot_token] + _enc.encode_ordinary(doc), dtype=np.uint32)


def main():
    from configurator import configure
    from data_loader import DataError, get_tokenizer

    configure(globals())
    try:
        enc = get_tokenizer(encoding)
    except DataError as e:
        sys.exit(f"prepare_fineweb.py: {e}")
    dtype = np.uint16 if enc.n_vocab <= 65536 else np.uint32
    docs = file_docs(input.split(",")) if input else stdlib_docs() if corpus == "stdlib" else hub_docs()
    dataset = input or (corpus if corpus == "stdlib" else f"fineweb-edu/{name}")
    prefix = "stdlib" if corpus == "stdlib" and not input else "text" if input else "edufineweb"
    os.makedirs(out_dir, exist_ok=True)

    shard, total, n, buf = 0, 0, 0, []
    tokens, documents = {"val": 0, "train": 0}, {"val": 0, "train": 0}

    def write(arr):
        nonlocal shard
        split = "val" if shard == 0 else "train"
        path = os.path.join(out_dir, f"{prefix}_{split}_{shard:06d}.npy")
        with open(path + ".tmp", "wb") as f:
            np.save(f, arr.astype(dtype))
        os.replace(path + ".tmp", path)
        tokens[split] += len(arr)
        shard += 1

    with mp.Pool(workers or os.cpu_count(), initializer=_init_worker, initargs=(encoding,)) as pool:
        for toks in pool.imap(_tokenize, docs, chunksize=16):
            documents["val" if shard == 0 else "train"] += 1  # a document counts where it starts
            buf.append(toks)
            n += len(toks)
            total += len(toks)
            limit = val_tokens if shard == 0 else shard_size
            while n >= limit:  # a shard is full: write it, carry the rest over
                flat = np.concatenate(buf)
                write(flat[:limit])
                buf, n = [flat[limit:]], len(flat) - limit
                limit = shard_size
            if max_tokens and total >= max_tokens:
                break
    if n:
        write(np.concatenate(buf))
    if total == 0:
        sys.exit("prepare_fineweb.py: the corpus is empty")
    if shard < 2:
        sys.exit(f"prepare_fineweb.py: only {total} tokens, all of them validation: lower --val_tokens (now {val_tokens})")
    meta = {"tokenizer": encoding, "vocab_size": enc.n_vocab, "dtype": np.dtype(dtype).name, "eot": enc.eot_token,
            "dataset": dataset, "tokens": tokens, "documents": documents}
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"wrote {shard} shards to {out_dir}: {meta['tokens']['val']} val + {meta['tokens']['train']} train tokens")


if __name__ == "__main__":
    main()
