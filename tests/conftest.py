"""Shared fixtures: a real English corpus that ships with Python (the standard library's docstrings),
the real o200k tokenizer loaded offline, and helpers to run the scripts as a user would."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# .ci/run puts o200k_base's BPE file here; a user's own TIKTOKEN_CACHE_DIR wins
os.environ.setdefault("TIKTOKEN_CACHE_DIR", os.path.join(ROOT, ".cache", "tiktoken"))
TOKENIZER = "o200k_base:4096"  # o200k's first 4096 merges: a real BPE with a vocabulary tests can afford


def stdlib_docstrings(max_chars):
    """The first max_chars of prepare_fineweb.py's default corpus: the standard library's docstrings."""
    from prepare_fineweb import stdlib_docs

    parts, size = [], 0
    for doc in stdlib_docs():
        parts.append(doc)
        size += len(doc)
        if size >= max_chars:
            break
    return parts


def write_data_dir(path, docs, tokenizer=TOKENIZER, val_tokens=2000):
    """docs -> a .jsonl file -> prepare_fineweb.py, as a user would make a data_dir from their own text."""
    os.makedirs(path, exist_ok=True)
    src = os.path.join(path + "_src.jsonl")
    with open(src, "w") as f:
        f.writelines(json.dumps({"text": d}) + "\n" for d in docs)
    r = run_script("prepare_fineweb.py", f"--input={src}", f"--encoding={tokenizer}", f"--out_dir={path}",
                   f"--val_tokens={val_tokens}", "--shard_size=10000000")
    assert r.returncode == 0, r.stderr
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def corpus():
    return stdlib_docstrings(600_000)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory, corpus):
    path = str(tmp_path_factory.mktemp("data"))
    write_data_dir(path, corpus)
    return path


def run_script(script, *args, timeout=600, env=None, **kw):
    """Run one of the repo's scripts in a fresh Python process, as a user would."""
    env = dict(env or os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


# End-to-end runs of a minute or more each (several processes, a run stopped and resumed, an export loaded in
# transformers) beyond the quick suite's own: NANOOSS_FULL_TESTS=1 (as .ci/run sets) runs them too, so that the
# quick suite stays within minutes on a slow day.
full_only = pytest.mark.skipif(not os.environ.get("NANOOSS_FULL_TESTS"),
                               reason="an end-to-end run of a minute or more: NANOOSS_FULL_TESTS=1 (as .ci/run sets)")

# a model small enough to train in seconds on 2 cores, with every GPT-OSS part switched on
TINY = ["--n_layer=2", "--n_embd=64", "--n_head=4", "--n_kv_head=2", "--head_dim=16", "--n_expert=4",
        "--experts_per_token=2", "--intermediate_size=64", "--sliding_window=16", "--block_size=64",
        "--vocab_size=4097", "--tie_embeddings=True", "--batch_size=8", "--sample_every=0", "--compile=False"]


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and skips without one (python bench/gpu_check.py runs them on a GPU)")


def padded_checkpoint(out_dir, tokenizer=TOKENIZER, vocab_size=4160, loudest=None):
    """A real checkpoint (checkpoint.save) of a model whose vocabulary is padded past the tokenizer's ids (4,097 for
    o200k_base:4096, in 4,160 outputs) and whose largest logits are always the padded ones (or the ids in loudest):
    attention and experts add nothing, every token embeds alike, and only those rows of the head are non-zero.
    Returns out_dir."""
    import warnings

    import checkpoint
    import torch
    from data_loader import get_tokenizer
    from model import GPT, GPTConfig

    enc = get_tokenizer(tokenizer)
    cfg = GPTConfig(vocab_size=vocab_size, block_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                    n_expert=2, experts_per_token=1, intermediate_size=32, sliding_window=16)
    torch.manual_seed(0)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:
                p.zero_()
        model.embed_tokens.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        loud = slice(enc.n_vocab, None) if loudest is None else list(loudest)
        model.lm_head.weight[loud] = 1.0  # logit 32 for every padded id (or loudest), 0 for the others
    os.makedirs(out_dir, exist_ok=True)
    settings = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    with warnings.catch_warnings():  # DCP's note that it saves without a process group: intended
        warnings.simplefilter("ignore", UserWarning)
        checkpoint.save(out_dir, 0, {"model": model.state_dict()}, {**settings, "tokenizer": tokenizer, "eot": enc.eot_token},
                        True, lambda: None)
    return out_dir
