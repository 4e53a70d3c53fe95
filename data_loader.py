"""
Token shards on disk -> (x, y) batches. A data directory holds meta.json and either
<name>_train_000001.npy ... / <name>_val_000000.npy shards or train.bin / val.bin memmaps. Chat and
instruction data (meta.json's loss_mask) also has a <name>_trainmask_000001.npy per shard: 1 where a token is
trained (the assistant's), 0 elsewhere; those targets become -1, which the loss skips.
Batches are sequential and per rank: rank r of w reads its B*T slice of each global step, so every token
is seen once per epoch and the position (shard, offset) is all a checkpoint needs to resume exactly,
on any number of ranks. Also here: get_tokenizer, since meta.json names the tokenizer.
"""
import glob
import json
import os

import numpy as np

from configurator import BadInput


class DataError(BadInput, ValueError):
    """Bad data on disk; the message is one line that names the file and the fix."""


def load_meta(data_dir):
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isdir(data_dir):
        raise DataError(f"data_dir {data_dir} does not exist: prepare data with prepare_fineweb.py or set --data_dir")
    if not os.path.exists(path):
        raise DataError(f"{path} is missing: every data_dir needs one (prepare_fineweb.py writes it)")
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror}): check its permissions, or prepare the data again")
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON ({e}): rewrite it or prepare the data again")
    for key in ("vocab_size", "dtype"):
        if key not in meta:
            raise DataError(f"{path} has no '{key}': add it or prepare the data again")
    if meta["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{path}: dtype {meta['dtype']!r} is not uint16 or uint32")
    if meta["dtype"] == "uint16" and meta["vocab_size"] > 65536:
        raise DataError(f"{path}: vocab_size {meta['vocab_size']} does not fit dtype uint16: tokens must be uint32")
    return meta


def check_vocab(meta, data_dir, vocab_size):
    if meta["vocab_size"] > vocab_size:
        raise DataError(f"{data_dir}/meta.json: the data's vocab_size {meta['vocab_size']} is larger than the "
                        f"model's vocab_size {vocab_size}: set --vocab_size={meta['vocab_size']} (or more)")


def needs_building(data_dir, recipe, argv):
    """True for a config's own data_dir that is missing and has a data_recipe; a typed --data_dir is never built."""
    return bool(recipe) and not os.path.exists(os.path.join(data_dir, "meta.json")) and not any(
        a.startswith("--data_dir") for a in argv)


def build_data(data_dir, recipe):
    """Make data_dir with prepare_fineweb.py as the config's data_recipe says; DataError with its last line."""
    import shlex
    import subprocess
    import sys

    r = subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "prepare_fineweb.py"),
                        *shlex.split(recipe), f"--out_dir={data_dir}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        raise DataError(f"building {data_dir} failed: {(r.stderr.strip().splitlines() or ['no output'])[-1]}")


def split_files(data_dir, split):
    files = sorted(glob.glob(os.path.join(data_dir, f"*_{split}_*.npy")))
    if not files and os.path.exists(os.path.join(data_dir, f"{split}.bin")):
        files = [os.path.join(data_dir, f"{split}.bin")]
    if not files:
        raise DataError(f"{data_dir} has no {split} split: expected *_{split}_*.npy shards or {split}.bin")
    return files


def open_tokens(path, dtype):
    """A read-only memmap of one shard, checked against meta's dtype."""
    try:
        if path.endswith(".bin"):
            size = os.path.getsize(path)
            if size % np.dtype(dtype).itemsize:
                raise DataError(f"{path} is truncated: {size} bytes is not a whole number of {dtype} tokens")
            if size == 0:
                raise DataError(f"{path} is empty: prepare the data again")
            return np.memmap(path, dtype=dtype, mode="r")
        arr = np.load(path, mmap_mode="r")
    except DataError:
        raise
    except (ValueError, OSError, EOFError) as e:
        raise DataError(f"{path} is truncated or not a .npy file ({e}): delete it and prepare the data again")
    if arr.dtype != np.dtype(dtype):
        raise DataError(f"{path} holds {arr.dtype} tokens but meta.json says {dtype}: prepare the data again")
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{path} is empty or not 1-D: prepare the data again")
    return arr


class DataLoader:
    def __init__(self, data_dir, split, batch_size, block_size, rank=0, world_size=1, vocab_size=None):
        self.meta = load_meta(data_dir)
        if vocab_size is not None:
            check_vocab(self.meta, data_dir, vocab_size)
        self.B, self.T, self.rank, self.world = batch_size, block_size, rank, world_size
        self.files = split_files(data_dir, split)
        self.shards = [open_tokens(f, self.meta["dtype"]) for f in self.files]
        self.masks = None
        if self.meta.get("loss_mask"):
            self.masks = [open_tokens(f.replace(f"_{split}_", f"_{split}mask_"), "uint8") for f in self.files]
            for f, s, m in zip(self.files, self.shards, self.masks):
                if len(m) != len(s):
                    raise DataError(f"{f}: its loss mask has {len(m)} entries for {len(s)} tokens: prepare the data again")
        need = batch_size * block_size * world_size + 1
        for f, s in zip(self.files, self.shards):
            if len(s) < need:
                raise DataError(f"{f} has {len(s)} tokens, fewer than one step needs ({need} = batch_size x "
                                f"block_size x ranks + 1): lower --batch_size or --block_size")
        self.reset()

    def reset(self):
        self.shard, self.pos, self.epoch = 0, 0, 0

    def next_batch(self):
        step = self.B * self.T * self.world
        if self.pos + step + 1 > len(self.shards[self.shard]):  # the rest of the shard is too short
            self.shard, self.pos = self.shard + 1, 0
            if self.shard == len(self.shards):
                self.shard, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * self.B * self.T
        import torch  # here, not at the top: prepare_fineweb and safe_train import this file without needing torch

        buf = torch.from_numpy(self.shards[self.shard][start:start + self.B * self.T + 1].astype(np.int64))
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        if self.masks is not None:  # prompt tokens are read, never trained on: target -1
            trained = torch.from_numpy(self.masks[self.shard][start + 1:start + self.B * self.T + 1].astype(bool))
            y = y.masked_fill(~trained.view(self.B, self.T), -1)
        self.pos += step
        return x, y

    def state_dict(self):
        return {"shard": self.shard, "pos": self.pos, "epoch": self.epoch, "files": [os.path.basename(f) for f in self.files]}

    def load_state_dict(self, state):
        if state["files"] != [os.path.basename(f) for f in self.files]:
            raise DataError("the data_dir's shards differ from the ones this checkpoint was reading: "
                            "use the same data_dir, or a new out_dir to start over")
        self.shard, self.pos, self.epoch = state["shard"], state["pos"], state["epoch"]


# tiktoken caches its BPE files in $TIKTOKEN_CACHE_DIR (default: a temp folder the OS may wipe); ours
# defaults to the repo's .cache/tiktoken so a file installed once (see install_tokenizer_file) stays put
CACHE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache", "tiktoken")
if "TIKTOKEN_CACHE_DIR" not in os.environ and "DATA_GYM_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = CACHE_DIR
BPE_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
BPE_FILE = {"o200k_base": "o200k_base", "o200k_harmony": "o200k_base", "cl100k_base": "cl100k_base",
            "p50k_base": "p50k_base", "p50k_edit": "p50k_base", "r50k_base": "r50k_base"}
OFFLINE_HELP = ("offline, `pip install bpe-openai==0.1.4` (requirements.txt; it carries o200k_base and cl100k_base), "
                "pass --tokenizer_file=FILE (a .tiktoken file or its .gz) or put the file in $TIKTOKEN_CACHE_DIR "
                "(README, 'Offline tokenizers')")


def cached_bpe(base):
    """Where tiktoken looks for an encoding's BPE file: its cache, under the sha1 of the file's URL."""
    import hashlib

    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or CACHE_DIR
    return os.path.join(cache, hashlib.sha1(BPE_URL.format(BPE_FILE.get(base, base)).encode()).hexdigest())


def packaged_bpe(base):
    """The BPE file of o200k_base / o200k_harmony / cl100k_base inside the installed bpe-openai wheel
    (requirements.txt), or None. Found without importing the package (it loads a 74 MB library)."""
    import importlib.util

    if BPE_FILE.get(base) not in ("o200k_base", "cl100k_base"):
        return None
    spec = importlib.util.find_spec("bpe_openai")
    path = spec and spec.origin and os.path.join(os.path.dirname(spec.origin), "data", BPE_FILE[base] + ".tiktoken.gz")
    return path if path and os.path.exists(path) else None


def get_tokenizer(name):
    """A tiktoken encoding by name. Its BPE file comes from the bpe-openai package when installed (tiktoken's own
    download has no timeout and hangs on a blocked network), else from tiktoken's cache or download.
    'o200k_base:N' is o200k_base cut to its first N merges plus
    <|endoftext|> as token N: a real byte-level BPE (o200k's first 256 ranks are the 256 bytes and every
    later token is a merge of earlier ones) with a vocabulary small enough for tiny models, whose ids are
    o200k's own."""
    import tiktoken

    base, _, cut = name.partition(":")
    packaged = packaged_bpe(base)
    if packaged and not os.path.exists(cached_bpe(base)):  # first use: from the installed package, no network
        install_tokenizer_file(packaged, base)
    try:
        enc = tiktoken.get_encoding(base)
    except ValueError as e:
        if "Unknown encoding" not in str(e):
            raise DataError(f"cannot load tokenizer {base!r} ({e}); {OFFLINE_HELP}")
        raise DataError(f"unknown tokenizer {base!r}: use one of {', '.join(tiktoken.list_encoding_names())}")
    except Exception as e:
        raise DataError(f"cannot load tokenizer {base!r} ({type(e).__name__}, no network?); {OFFLINE_HELP}")
    if not cut:
        return enc
    n = int(cut)
    ranks = {tok: r for tok, r in enc._mergeable_ranks.items() if r < n}
    if n < 256 or len(ranks) != n:  # the 256 bytes come first: fewer could not encode every text
        raise DataError(f"tokenizer {name}: {base}:N takes N from 256 to {len(enc._mergeable_ranks)}")
    return tiktoken.Encoding(name=name, pat_str=enc._pat_str, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": n})


def install_tokenizer_file(path, name):
    """Copy a BPE file into tiktoken's cache under the name tiktoken looks for (the sha1 of its URL), so
    every script loads `name` offline from then on. The file is first loaded from a scratch cache, where
    tiktoken checks its sha256, so that a wrong file never replaces a good one."""
    import gzip
    import tempfile
    import zipfile

    import tiktoken_ext.openai_public as registry

    from checkpoint import write_atomic

    base = name.partition(":")[0]
    if base not in BPE_FILE:
        raise DataError(f"--tokenizer_file works for {', '.join(BPE_FILE)}; for {base!r} put its files in $TIKTOKEN_CACHE_DIR")
    want = BPE_FILE[base] + ".tiktoken"
    if not os.path.exists(path) and glob.glob(path):  # a pattern, as in the README: --tokenizer_file=.cache/bpe_openai-*.whl
        path = sorted(glob.glob(path))[-1]  # (the shell leaves it alone: the whole word, --tokenizer_file=..., matches no file)
    try:
        if zipfile.is_zipfile(path):  # a wheel such as bpe-openai's: find the file inside
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.namelist() if m.endswith((want, want + ".gz"))]
                if not members:
                    raise DataError(f"--tokenizer_file {path} holds no {want}[.gz]")
                data = z.read(members[0])
        else:
            with open(path, "rb") as f:
                data = f.read()
    except OSError as e:
        raise DataError(f"--tokenizer_file {path}: {e.strerror}")
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    cache, key = os.path.split(cached_bpe(base))
    with tempfile.TemporaryDirectory() as scratch:
        with open(os.path.join(scratch, key), "wb") as f:
            f.write(data)
        os.environ["TIKTOKEN_CACHE_DIR"] = scratch
        try:
            registry.ENCODING_CONSTRUCTORS[base]()  # loads the file and checks its sha256
            ok = os.path.exists(os.path.join(scratch, key))
        except Exception:
            ok = False
        finally:
            os.environ["TIKTOKEN_CACHE_DIR"] = cache
        if not ok:
            raise DataError(f"--tokenizer_file {path} is not {base}'s BPE file (its sha256 does not match)")
        os.makedirs(cache, exist_ok=True)
        write_atomic(os.path.join(cache, key), data)  # the bytes just checked
    return get_tokenizer(name)


def decodable(enc, vocab_size):
    """A bool mask over a model's vocab_size outputs, True for the ids enc can decode: what generation may pick. The
    rest are the padding past the tokenizer (vocabularies are padded to a multiple of 64: o200k_base:32768 has 32,769
    ids in 32,832 outputs) and the holes inside it (o200k_base has no token 199998 nor 200000-200017)."""
    mask = np.zeros(vocab_size, dtype=bool)
    for i in range(min(enc.n_vocab, vocab_size)):
        try:
            enc.decode_single_token_bytes(i)
            mask[i] = True
        except KeyError:
            pass
    return mask


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")  # harmony's roles; a record's roles in any case


def render_chat(record, enc):
    """A chat or instruction record -> (ids, trained): the tokens a model reads and, for each, whether it learns
    it (the assistant's / completion's tokens and the marker that ends them; never the prompt, the instructions
    or a tool's output). Records are {"messages": [{"role", "content"}, ...]} (roles: CHAT_ROLES, in any case; a
    tool turn may name its function, {"role": "tool", "name": "get_weather", ...}) or {"prompt", "completion"}.
    With o200k_harmony, the harmony format as openai-harmony renders it: <|start|>role<|message|>...<|end|>, the
    developer's text under "# Instructions", a tool's output from its function (functions.NAME) to the assistant on
    the commentary channel, the answer on the final channel ending in <|return|>. Otherwise a plain template, each
    record after <|endoftext|> as every document is:
        System: ...\\n\\nDeveloper: ...\\n\\nUser: ...\\n\\nTool: ...\\n\\nAssistant: ...<|endoftext|>"""
    if "messages" in record:
        messages = record["messages"]
    else:
        messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["completion"]}]
    harmony = enc.name.startswith("o200k_harmony")
    special = lambda s: enc.encode(s, allowed_special="all")
    ids, trained = ([], []) if harmony else ([enc.eot_token], [False])

    def add(tokens, learn):
        ids.extend(tokens)
        trained.extend([learn] * len(tokens))

    for i, m in enumerate(messages):
        role, content = m["role"].lower(), m["content"]
        last = i == len(messages) - 1
        if harmony and role == "assistant":
            add(special("<|start|>assistant<|channel|>final<|message|>"), False)
            add(enc.encode_ordinary(content) + special("<|return|>" if last else "<|end|>"), True)
        elif harmony and role == "tool":
            name = m["name"] if "." in m["name"] else f"functions.{m['name']}"  # browser.search stays as named
            add(special(f"<|start|>{name} to=assistant<|channel|>commentary<|message|>") + enc.encode_ordinary(content)
                + special("<|end|>"), False)
        elif harmony:
            text = f"# Instructions\n\n{content}" if role == "developer" else content
            add(special(f"<|start|>{role}<|message|>") + enc.encode_ordinary(text) + special("<|end|>"), False)
        elif role == "assistant":
            add(enc.encode_ordinary("Assistant: "), False)
            add(enc.encode_ordinary(content) + [enc.eot_token], True)
        else:
            add(enc.encode_ordinary(f"{role.capitalize()}: {content}\n\n"), False)
    return ids, trained


def chat_prompt(text, enc):
    """(ids, stop ids) of a user turn followed by the assistant's header: what sample.py --chat generates from."""
    ids, _ = render_chat({"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": ""}]}, enc)
    harmony = enc.name.startswith("o200k_harmony")
    end = enc.encode("<|return|>", allowed_special="all") if harmony else [enc.eot_token]
    return ids[:len(ids) - len(end)], set(end) | ({enc.encode("<|end|>", allowed_special="all")[0]} if harmony else set())


# ----------------------------------------------------------------------------- the vocabulary as HF and llama.cpp store it

def bytes_to_unicode():
    """GPT-2's byte -> printable character table, which HF's byte-level BPE stores its vocabulary in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


PLACEHOLDER = "[PAD{}]"  # an id that tiktoken leaves empty, named as llama.cpp's converter names it


def vocab_table(enc, vocab_size):
    """Every id below vocab_size as tokenizer.json and GGUF store it: (names, kinds, merges).
    names[i]: a mergeable token's bytes in GPT-2's byte -> character table, a special token's text, or
    "[PAD<i>]" for an id tiktoken leaves empty (holes between its ranges, and the padding up to vocab_size): a
    placeholder that no text produces. kinds[i]: "normal", "special" or "unused" (a placeholder). A special id
    with two names keeps the first in tiktoken's table, the base encoding's: o200k_harmony's 200018 is
    <|endofprompt|> (o200k_base's, which gpt-oss's published tokenizer keeps), not <|reserved_200018|>.
    merges: every split of a token into two tokens, in the order of the merged token's rank, so that byte-level
    BPE by merge priority reproduces tiktoken's lowest-rank-first merging (two pairs that make the same token
    overlap only if they split it alike, so ties go leftmost in both)."""
    ranks, table = enc._mergeable_ranks, bytes_to_unicode()
    text = {t: "".join(table[b] for b in t) for t in ranks}
    names, kinds = [None] * vocab_size, ["unused"] * vocab_size
    for t, i in ranks.items():
        names[i], kinds[i] = text[t], "normal"
    for t, i in enc._special_tokens.items():
        if kinds[i] == "unused":
            names[i], kinds[i] = t, "special"
    names = [PLACEHOLDER.format(i) if n is None else n for i, n in enumerate(names)]
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [(text[a], text[b]) for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))]
    return names, kinds, merges


def is_harmony(enc):
    """Whether enc has harmony's chat tokens (o200k_harmony; not a cut of it, which keeps <|endoftext|> alone)."""
    return all(t in enc._special_tokens for t in ("<|start|>", "<|message|>", "<|return|>", "<|end|>", "<|call|>"))


def end_tokens(enc):
    """(the end-of-sequence id, every id that ends a generation): <|endoftext|>, or for harmony the end of an
    answer (<|return|>), of a turn (<|end|>) and of a tool call (<|call|>)."""
    if is_harmony(enc):
        ids = [enc._special_tokens[t] for t in ("<|return|>", "<|end|>", "<|call|>")]
        return ids[0], ids
    eot = enc._special_tokens.get("<|endoftext|>", min(enc._special_tokens.values(), default=None))
    return eot, [] if eot is None else [eot]


# data_loader.render_chat's harmony format, for transformers' apply_chat_template and llama.cpp's --jinja: the same
# ids for the same messages (tests/test_hf.py checks it); generation starts the assistant's final-channel answer
HARMONY_TEMPLATE = (
    "{%- for m in messages -%}{%- set role = m['role'] | lower -%}"
    "{%- if role == 'assistant' -%}<|start|>assistant<|channel|>final<|message|>{{ m['content'] }}"
    "{{ '<|return|>' if loop.last else '<|end|>' }}"
    "{%- elif role == 'tool' -%}<|start|>{{ m['name'] if '.' in m['name'] else 'functions.' ~ m['name'] }} "
    "to=assistant<|channel|>commentary<|message|>{{ m['content'] }}<|end|>"
    "{%- elif role == 'developer' -%}<|start|>developer<|message|># Instructions\n\n{{ m['content'] }}<|end|>"
    "{%- else -%}<|start|>{{ role }}<|message|>{{ m['content'] }}<|end|>{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start|>assistant<|channel|>final<|message|>{%- endif -%}")
