"""
Text -> token shards + meta.json, the format data_loader.py reads.
    python prepare_fineweb.py                                          # FineWeb-Edu sample-10BT from the hub, o200k_base
    python prepare_fineweb.py --name=sample-100BT --max_tokens=2000000000  # another subset, cut short
    python prepare_fineweb.py --input=my_texts/ --out_dir=data/mine    # local .txt / .jsonl / .parquet files or folders
    python prepare_fineweb.py --corpus=stdlib --encoding=o200k_base:32768 --out_dir=data/mac_micro   # no network at all
Documents are joined with <|endoftext|> before each one. Chat and instruction data (.jsonl records with
"messages": [{"role", "content"}, ...] or "prompt" and "completion") is rendered by data_loader.render_chat
(harmony for o200k_harmony, a plain template otherwise) and gets a loss mask beside each shard
(<name>_trainmask_*.npy): only the assistant's / completion's tokens are trained, and all of a {"text"} record's
(a file may mix both). Input is UTF-8 (--decode_errors=replace for files that are not quite). Shard 0 is
validation (the first val_tokens tokens), then train shards of shard_size tokens; uint16 when the vocabulary
fits, else uint32.

Resumable: each shard is written under a temporary name and renamed, then prepare_state.json records where
the next shard starts (document index and token offset). Rerun the same command after an interruption and
it keeps the finished shards, skips the documents they hold, and writes the rest; the result is
byte-identical to an uninterrupted run. meta.json is written last: a data_dir without one is unfinished.
The state also records each input file's name, size and modification time, so that a changed input is refused.
"""
import ast
import glob
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import sys
import sysconfig
import time
import urllib.parse

import numpy as np

from configurator import BadInput

corpus = "fineweb-edu"  # fineweb-edu (the hub: needs `datasets` and a network) | stdlib (ships with Python) | stdlib_api (fine-tuning)
name = "sample-10BT"  # the FineWeb-Edu subset: sample-10BT, sample-100BT, sample-350BT, CC-MAIN-2024-10, ...
input = ""  # comma-separated .txt / .jsonl / .parquet files or folders; replaces --corpus
encoding = "o200k_base"  # a tiktoken name (o200k_base, o200k_harmony, cl100k_base, gpt2, ...); o200k_base:N = its first N merges
tokenizer_file = ""  # offline: the encoding's .tiktoken file (or .gz, or the bpe-openai wheel); installed into tiktoken's cache
out_dir = "data/fineweb_edu"
shard_size = 100_000_000  # tokens per train shard
val_tokens = 1_000_000  # tokens in the validation shard (shard 0)
max_tokens = 0  # stop after exactly this many tokens (0 = the whole corpus)
workers = 0  # tokenizer processes (0 = all cores)
batch_docs = 64  # documents per task sent to a worker: fewer, larger messages between processes
decode_errors = "strict"  # input bytes that are not UTF-8: strict (refused, naming file and line) | replace (with U+FFFD)


class PrepareError(BadInput):
    """A bad input or setting; the message is one line that names it and the fix."""


def fail(msg):
    raise PrepareError(msg)  # not sys.exit: this may run in the pool's feeder thread, which imap re-raises from


# ----------------------------------------------------------------------------- sources of documents

# the stdlib_api fine-tuning set's validation modules: kept out of the stdlib pretraining corpus, so that a model
# pretrained on it has never read their docstrings and a fine-tune's score on them is honest
API_HOLDOUT = ("json", "textwrap", "difflib", "base64", "heapq", "bisect", "fnmatch", "glob", "shutil", "tempfile", "statistics")


def stdlib_modules():
    """(module name, syntax tree) of every standard-library source file, in a fixed order."""
    stdlib = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in skip)
        for fname in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(root, fname)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            yield os.path.relpath(path, stdlib)[:-3].replace(os.sep, ".").removesuffix(".__init__"), tree


def stdlib_docs():
    """Docstrings of the Python standard library: English prose that every Python install carries, so a
    first run needs no download (1.5 MB; enough to watch a small model learn, not to make it good)."""
    for module, tree in stdlib_modules():
        if module.split(".")[0] in API_HOLDOUT:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 80:
                    yield doc


def stdlib_api():
    """An instruction set every Python install carries: prompt = a public function's or method's signature,
    `module.name(args)`, completion = its docstring. The API_HOLDOUT modules come first: they are the
    validation split (main() sizes val_tokens to them)."""
    records = {True: [], False: []}
    for module, tree in stdlib_modules():
        held = module.split(".")[0] in API_HOLDOUT
        for node in tree.body:
            defs = [(node.name, node)] if isinstance(node, ast.FunctionDef) else [
                (f"{node.name}.{m.name}", m) for m in node.body if isinstance(m, ast.FunctionDef)] if isinstance(node, ast.ClassDef) else []
            for name, fn in defs:
                doc = ast.get_docstring(fn)
                if doc and len(doc) > 80 and not any(part.startswith("_") for part in name.split(".")):
                    records[held].append({"prompt": f"{module}.{name}({ast.unparse(fn.args)})\n", "completion": doc})
    return records[True] + records[False], len(records[True])


SUFFIXES = (".txt", ".jsonl", ".parquet")


def list_inputs(paths):
    """Files named by --input (folders are walked), checked up front so that a bad one fails before any work."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            found = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith(SUFFIXES))
            if not found:
                fail(f"input folder {p} has no .txt, .jsonl or .parquet files")
            files += found
        elif not os.path.exists(p):
            fail(f"input {p} does not exist: check the path given to --input")
        elif not p.endswith(SUFFIXES):
            fail(f"input {p} is not .txt, .jsonl or .parquet")
        else:
            files.append(p)
    for path in files:
        if path.endswith(".parquet"):
            columns = parquet_file(path).schema_arrow.names
            if "text" not in columns:
                fail(f"{path} has no 'text' column (it has {', '.join(columns) or 'none'}): rename the column or convert the file")
    return files


def parquet_file(path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        fail("parquet input needs pyarrow: pip install pyarrow (it comes with `datasets`)")
    try:
        return pq.ParquetFile(path)
    except Exception as e:
        fail(f"{path} is not a readable parquet file ({type(e).__name__}: {e})")


def decode(raw, path, line, offset):
    """Bytes of an input file -> str. Bytes that are not UTF-8 are refused, naming the file, line and byte
    offset, or replaced with U+FFFD under --decode_errors=replace. `line` and `offset` are where raw starts."""
    try:
        return raw.decode("utf-8", errors=decode_errors)
    except UnicodeDecodeError as e:
        line += raw.count(b"\n", 0, e.start)
        fail(f"{path}:{line}: byte {offset + e.start} (0x{raw[e.start]:02x}) is not UTF-8: "
             f"convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass --decode_errors=replace to replace such bytes")


def jsonl_lines(path):
    """(raw line, line number, byte offset) of each non-blank line of a .jsonl file."""
    with open(path, "rb") as f:
        offset = 0
        for i, raw in enumerate(f, 1):
            start = 3 if i == 1 and raw.startswith(b"\xef\xbb\xbf") else 0  # the byte order mark some editors write
            if raw.strip():
                yield raw[start:], i, offset + start
            offset += len(raw)


def read_record(raw, path, line, offset):
    """One .jsonl line -> its text (a {"text"} record, trained whole) or the record itself (a chat record, trained
    on its answers). Decided per record: a file may mix both."""
    try:
        record = json.loads(decode(raw, path, line, offset))
        text = record["text"] if "text" in record or not is_chat(record) else record
    except (json.JSONDecodeError, KeyError, TypeError):
        fail(f"{path}:{line} is not a JSON object with a 'text' field, nor 'messages' or 'prompt' and 'completion'")
    if isinstance(text, dict):
        check_chat(text, f"{path}:{line}")
    elif not isinstance(text, str):
        fail(f"{path}:{line}: 'text' is a {type(text).__name__}, not a string")
    return text


def text_docs(path):
    """Documents of a .txt (the whole file) or .jsonl ({"text"}, or chat records, which stay dicts)."""
    if path.endswith(".jsonl"):
        for raw, i, offset in jsonl_lines(path):
            yield read_record(raw, path, i, offset)
    else:
        with open(path, "rb") as f:
            yield decode(f.read(), path, 1, 0).removeprefix("\ufeff")


def scan_inputs(files):
    """(documents, chat) of the input files, read once before any work so that a bad line fails before the first
    shard: the documents for the progress bar's ETA (parquet keeps the count in its footer), and chat when any
    record is a chat record (every shard then gets a loss mask)."""
    n, chat = 0, False
    for path in files:
        if path.endswith(".parquet"):
            n += parquet_file(path).metadata.num_rows
            continue
        for doc in text_docs(path):
            chat |= isinstance(doc, dict)
            n += 1
    return n, chat


def fingerprint(files):
    """[path, size, modification time] of each input file: what the resume state checks a rerun against."""
    return [[path, os.stat(path).st_size, os.stat(path).st_mtime_ns] for path in files]


def is_chat(record):
    return isinstance(record, dict) and ("messages" in record or "prompt" in record)


def check_chat(record, where):
    from data_loader import CHAT_ROLES

    if "messages" in record:
        messages = record["messages"]
        if not (isinstance(messages, list) and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages)):
            fail(f"{where}: 'messages' must be a list of {{'role', 'content'}} strings with at least one assistant turn")
        roles = [m["role"].lower() for m in messages]  # "Assistant" is the assistant, and trained as one
        for m in messages:
            if m["role"].lower() not in CHAT_ROLES:
                fail(f"{where}: role {m['role']!r} is not one of {', '.join(CHAT_ROLES)} (in any case): rename it")
        if "assistant" not in roles:
            fail(f"{where}: 'messages' has no assistant turn, so nothing of it would be trained")
        if encoding.startswith("o200k_harmony") and any(r == "tool" and not isinstance(m.get("name"), str) for m, r in zip(messages, roles)):
            fail(f"{where}: a tool turn needs a 'name' in the harmony template (the function it answers, e.g. get_weather)")
    elif not (isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str)):
        fail(f"{where}: 'prompt' and 'completion' must both be strings")


def open_hub():
    """FineWeb-Edu streamed from the hub, opened here in the main process so that no network fails fast,
    with one line, before any worker starts (the hub client would otherwise retry for half a minute)."""
    offline_help = (f"offline, download FineWeb-Edu's parquet files elsewhere (huggingface.co/datasets/"
                    f"HuggingFaceFW/fineweb-edu, folder sample/{name.removeprefix('sample-')}/) and pass --input=FOLDER, or use --corpus=stdlib")
    try:
        from datasets import load_dataset
        from datasets.utils.logging import set_verbosity_error
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:
        fail("the hub path needs `pip install datasets`; " + offline_help)
    if not os.environ.get("HF_HUB_OFFLINE"):  # cached datasets work with HF_HUB_OFFLINE=1
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        try:
            socket.create_connection((host, 443), timeout=10).close()
        except OSError as e:
            fail(f"cannot reach {host} ({e.strerror or type(e).__name__}); {offline_help}")
    set_verbosity_error()
    hub_logging.set_verbosity_error()
    try:
        ds = load_dataset("HuggingFaceFW/fineweb-edu", name=name, split="train", streaming=True)
    except Exception as e:
        fail(f"cannot open FineWeb-Edu {name!r} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); {offline_help}")
    return (row["text"] for row in ds)


# ----------------------------------------------------------------------------- tokenizing in worker processes

_enc = None
TRAINED = 1 << 31  # chat data: the loss-mask bit, carried on each token (ids are below 2^31) until the shard is written


def _init_worker(name):
    # passed explicitly: macOS spawns workers, which re-import this file and would see the default encoding
    global _enc
    from data_loader import get_tokenizer

    _enc = get_tokenizer(name)


def _tokenize(task):
    """A task -> one array of its documents' tokens, EOT before each, and each document's length (0 for an
    empty one). A task is a list of documents, or a parquet row group that the worker reads itself: the
    main process then only collects tokens, instead of decoding and pickling every document."""
    if task[0] == "parquet":
        _, path, group, start = task
        docs = parquet_file(path).read_row_group(group, columns=["text"]).column(0).to_pylist()[start:]
    else:
        docs = task[1]
    eot, arrays = [_enc.eot_token], []
    for doc in docs:
        if isinstance(doc, dict):  # chat: the template's tokens, the trained ones flagged
            from data_loader import render_chat

            ids, trained = render_chat(doc, _enc)
            arrays.append(np.array(ids, dtype=np.uint32) | np.where(trained, TRAINED, 0).astype(np.uint32))
        else:  # text is trained whole, also among chat records
            arrays.append(np.array(eot + _enc.encode_ordinary(doc) if doc else [], dtype=np.uint32) | TRAINED)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    return (np.concatenate(arrays) if arrays else np.zeros(0, np.uint32)), lengths


def make_tasks(sources, skip):
    """Tasks in document order, leaving out the first `skip` documents (already in finished shards) without
    tokenizing them. A source is a parquet path, or an iterator of documents."""
    seen, batch = 0, []
    for src in sources:
        if isinstance(src, str):  # parquet: one task per row group; the footer says how many rows each has
            if batch:
                yield ("docs", batch)
                batch = []
            meta = parquet_file(src).metadata
            for g in range(meta.num_row_groups):
                rows = meta.row_group(g).num_rows
                if seen + rows > skip:
                    yield ("parquet", src, g, max(0, skip - seen))
                seen += rows
            continue
        for doc in src:
            if seen >= skip:
                batch.append(doc)
                if len(batch) == batch_docs:
                    yield ("docs", batch)
                    batch = []
            seen += 1
    if batch:
        yield ("docs", batch)


# ----------------------------------------------------------------------------- shards and the resume state

def write_whole(path, data):
    """path written whole or not at all (checkpoint.write_atomic). A full disk is one line, and the part written is
    removed: the shards before it stay, and the same command continues from them once there is space."""
    from checkpoint import no_space, write_atomic

    try:
        write_atomic(path, data)
    except OSError as e:
        full = no_space(e, path)
        if full is None:
            raise
        fail(f"{full}: free space there (or lower --max_tokens, or use another --out_dir), then run the same command "
             f"again: it continues from the shards written")


def save_state(state):
    write_whole(os.path.join(out_dir, "prepare_state.json"), json.dumps(state, indent=1))


def load_state(args, inputs):
    """The resume point of an earlier run of the same command on the same inputs in out_dir, or a fresh start."""
    path = os.path.join(out_dir, "prepare_state.json")
    fresh = {"args": args, "inputs": inputs, "shards": 0, "next_doc": 0, "skip_tokens": 0, "tokens": {"val": 0, "train": 0},
             "documents": {"val": 0, "train": 0}}
    if not os.path.exists(path):
        if glob.glob(os.path.join(out_dir, "*_train_*.npy")) + glob.glob(os.path.join(out_dir, "*_val_*.npy")):
            fail(f"{out_dir} already holds shards with no prepare_state.json to resume from: use an empty --out_dir")
        return fresh
    with open(path) as f:
        state = json.load(f)
    if state["args"] != args:
        diff = ", ".join(f"{k}={state['args'].get(k)!r} there, {v!r} now" for k, v in args.items() if state["args"].get(k) != v)
        fail(f"{out_dir} holds a different preparation ({diff}): use a new --out_dir, or delete it to start over")
    if "inputs" in state:  # (a state written before inputs were recorded has none)
        was, now = ({p: (size, mtime) for p, size, mtime in fp or []} for fp in (state["inputs"], inputs))
        changes = [f"{p} is new" for p in now if p not in was] + [f"{p} is gone" for p in was if p not in now] + [
            f"{p} was modified" for p in now if p in was and now[p] != was[p]]
        if changes:
            more = f" (and {len(changes) - 1} more)" if len(changes) > 1 else ""
            fail(f"the inputs changed since {out_dir} was prepared from them: {changes[0]}{more}; put them back as they "
                 f"were, or use a new --out_dir (or delete this one) to start over")
    return state


def main():
    from configurator import configure
    from data_loader import get_tokenizer, install_tokenizer_file

    configure(globals())  # every setting in its range (configurator.RULES)
    global val_tokens  # corpus stdlib_api sets its own
    files = list_inputs(input.split(",")) if input else None
    n_docs, chat = scan_inputs(files) if files else (None, False)
    enc = install_tokenizer_file(tokenizer_file, encoding) if tokenizer_file else get_tokenizer(encoding)
    try:
        os.makedirs(out_dir, exist_ok=True)
        probe = os.path.join(out_dir, ".write_test")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        fail(f"cannot write to --out_dir {out_dir} ({e.strerror}): pick a folder you can write to")

    if files:
        sources = [p if p.endswith(".parquet") else text_docs(p) for p in files]
        dataset, prefix = input, "text"
    elif corpus == "stdlib_api":  # signatures -> docstrings; validation: the held-out modules' records, exactly
        from data_loader import render_chat

        records, n_val = stdlib_api()
        chat, val_tokens = True, sum(len(render_chat(r, enc)[0]) for r in records[:n_val])
        sources, dataset, prefix, n_docs = [iter(records)], "python-stdlib-api", "stdlib_api", len(records)
    elif corpus == "stdlib":
        sources, dataset, prefix = [stdlib_docs()], "python-stdlib-docstrings", "stdlib"
    elif corpus == "fineweb-edu":
        sources, dataset, prefix = [open_hub()], f"HuggingFaceFW/fineweb-edu/{name}", "edufineweb"
        m = re.fullmatch(r"sample-(\d+)BT", name)  # ETA only: the sample's size in GPT-2 tokens, close for o200k
        est_tokens = int(m.group(1)) * 10**9 if m else None
    else:
        fail(f"--corpus={corpus!r}: use fineweb-edu, stdlib, or --input=FILES")
    dtype = np.uint16 if enc.n_vocab <= 2**16 else np.uint32
    args = {"dataset": dataset, "encoding": encoding, "shard_size": shard_size, "val_tokens": val_tokens, "max_tokens": max_tokens}
    state = load_state(args, files and fingerprint(files))
    for tmp in glob.glob(os.path.join(out_dir, "*.tmp")):  # left by an interrupted write
        os.remove(tmp)
    meta_path = os.path.join(out_dir, "meta.json")
    if os.path.exists(meta_path):
        print(f"{out_dir} is already complete ({state['shards']} shards); delete it to prepare again")
        return

    from tqdm import tqdm

    total = state["tokens"]["val"] + state["tokens"]["train"]
    # a live bar on a terminal; in a log file, one line per shard instead
    bar = tqdm(initial=total, unit="tok", unit_scale=True, smoothing=0.05, dynamic_ncols=True,
               desc=f"tokenizing {dataset}", disable=not sys.stderr.isatty())
    if max_tokens:
        bar.total = max_tokens
    elif corpus == "fineweb-edu" and not files:
        bar.total = est_tokens
    buf, n = [], 0  # tokens waiting for the current shard
    doc_i, skip = state["next_doc"], state["skip_tokens"]  # the document the next shard starts in, and its tokens already written

    def write(arr, next_doc, skip_tokens):
        split = "val" if state["shards"] == 0 else "train"
        path = os.path.join(out_dir, f"{prefix}_{split}_{state['shards']:06d}.npy")
        if chat:  # the mask first: a shard is complete only once its tokens are written
            write_whole(path.replace(f"_{split}_", f"_{split}mask_"), lambda f: np.save(f, (arr >> 31).astype(np.uint8)))
        arr = arr & (TRAINED - 1)  # the flag never reaches the ids
        write_whole(path, lambda f: np.save(f, arr.astype(dtype, copy=False)))
        state["tokens"][split] += len(arr)
        state["shards"] += 1
        state["next_doc"], state["skip_tokens"] = next_doc, skip_tokens
        save_state(state)  # after the shard: a crash between the two rewrites the same shard
        if bar.disable:
            rate = (total - total0) / max(time.time() - t0, 1e-9)
            print(f"{os.path.basename(path)}: {len(arr):,} tokens ({total:,} so far, {rate:,.0f} tok/s)", flush=True)

    done, t0, total0 = False, time.time(), total
    # the workers ignore Ctrl-C (they inherit SIG_IGN, also when spawned): only this process stops, with one line
    sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    pool = mp.Pool(workers or os.cpu_count(), initializer=_init_worker, initargs=(encoding,))
    signal.signal(signal.SIGINT, sigint)
    with pool:
        for toks, lengths in pool.imap(_tokenize, make_tasks(sources, doc_i), chunksize=1):
            before = total
            starts = np.concatenate([[0], np.cumsum(lengths)])
            for j in range(len(lengths)):
                doc = toks[starts[j]:starts[j + 1]]
                if not len(doc):  # an empty document: no EOT, not counted, but it keeps its index
                    doc_i += 1
                    continue
                offset = skip  # tokens of this document already in finished shards
                if skip:  # the document the last finished shard cut through: it already counted
                    doc, skip = doc[skip:], 0
                else:
                    state["documents"]["val" if state["shards"] == 0 else "train"] += 1  # counts where it starts
                if max_tokens and total + len(doc) >= max_tokens:
                    doc, done = doc[:max_tokens - total], True
                buf.append(doc)
                n += len(doc)
                total += len(doc)
                limit = val_tokens if state["shards"] == 0 else shard_size
                while n >= limit:  # a shard is full: write it, carry the rest of this document over
                    flat = np.concatenate(buf)
                    buf, n = [flat[limit:]], len(flat) - limit
                    write(flat[:limit], doc_i, offset + len(doc) - n)
                    limit = shard_size
                doc_i += 1
                if done:
                    break
            bar.update(total - before)
            if n_docs:
                bar.total = int(total * n_docs / max(doc_i, 1))
            if done:
                break
    if n:
        write(np.concatenate(buf), doc_i, 0)
    bar.close()
    if total == 0:
        fail("the corpus is empty: no document had any text")
    if state["shards"] < 2:
        fail(f"only {total} tokens, all of them validation: lower --val_tokens (now {val_tokens})")
    meta = {"tokenizer": encoding, "vocab_size": enc.n_vocab, "dtype": np.dtype(dtype).name, "eot": enc.eot_token,
            "dataset": dataset, "tokens": state["tokens"], "documents": state["documents"], "loss_mask": chat}
    write_whole(meta_path, json.dumps(meta, indent=1))
    print(f"wrote {state['shards']} shards to {out_dir}: {meta['tokens']['val']:,} val + {meta['tokens']['train']:,} "
          f"train tokens from {sum(meta['documents'].values()):,} documents")


if __name__ == "__main__":
    from configurator import run

    try:
        run(main)
    except KeyboardInterrupt:  # Ctrl-C: the finished shards and prepare_state.json are whole, nothing is lost
        print("\n" * sys.stderr.isatty() + f"prepare_fineweb.py: stopped; rerun the same command to continue from the "
              f"last finished shard in {out_dir}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as shells report it
