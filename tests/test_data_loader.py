"""data_loader.py: sequential per-rank batches that resume exactly, and one-line refusals of bad data."""
import json
import os

import numpy as np
import pytest

from data_loader import DataError, DataLoader, get_tokenizer


def make_dir(path, n_train=10_000, n_val=2_000, dtype="uint16", vocab=1000, fmt="npy"):
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        toks = rng.integers(0, vocab, n).astype(dtype)
        if fmt == "npy":
            np.save(os.path.join(path, f"x_{split}_000000.npy"), toks[: n // 2])
            np.save(os.path.join(path, f"x_{split}_000001.npy"), toks[n // 2:])
        else:
            toks.tofile(os.path.join(path, f"{split}.bin"))
    json.dump({"tokenizer": "o200k_base", "vocab_size": vocab, "dtype": dtype}, open(os.path.join(path, "meta.json"), "w"))
    return path


def stream(path, dtype, split="train"):
    if os.path.exists(os.path.join(path, f"{split}.bin")):
        return np.fromfile(os.path.join(path, f"{split}.bin"), dtype=dtype)
    return np.concatenate([np.load(os.path.join(path, f"x_{split}_00000{i}.npy")) for i in (0, 1)])


@pytest.mark.parametrize("fmt, dtype", [("npy", "uint16"), ("npy", "uint32"), ("bin", "uint16"), ("bin", "uint32")])
def test_batches_are_sequential_shifted_by_one(tmp_path, fmt, dtype):
    d = make_dir(str(tmp_path), dtype=dtype, fmt=fmt, vocab=70_000 if dtype == "uint32" else 1000)
    dl = DataLoader(d, "train", 4, 16)
    toks = stream(d, dtype)
    x, y = dl.next_batch()
    assert (x.flatten().numpy() == toks[:64]).all() and (y.flatten().numpy() == toks[1:65]).all()
    x, _ = dl.next_batch()
    assert (x.flatten().numpy() == toks[64:128]).all()


def test_ranks_read_disjoint_slices_of_the_same_global_batch(tmp_path):
    d = make_dir(str(tmp_path))
    r0, r1 = DataLoader(d, "train", 2, 8, rank=0, world_size=2), DataLoader(d, "train", 2, 8, rank=1, world_size=2)
    one = DataLoader(d, "train", 4, 8)
    for _ in range(3):
        (a, _), (b, _), (c, _) = r0.next_batch(), r1.next_batch(), one.next_batch()
        assert (np.concatenate([a.numpy(), b.numpy()]) == c.numpy()).all()


def test_state_dict_resumes_exactly_across_shards_and_epochs(tmp_path):
    d = make_dir(str(tmp_path))
    a = DataLoader(d, "train", 4, 32)
    for _ in range(100):  # 78 steps an epoch: past both shards and into epoch 1
        a.next_batch()
    b = DataLoader(d, "train", 4, 32)
    b.load_state_dict(a.state_dict())
    assert a.state_dict()["epoch"] >= 1
    for _ in range(10):
        assert (a.next_batch()[0] == b.next_batch()[0]).all()


def test_refusals_are_one_line(tmp_path):
    d = make_dir(str(tmp_path / "ok"))
    with pytest.raises(DataError, match="vocab_size 1000 is larger than the model's vocab_size 500: set --vocab_size=1000"):
        DataLoader(d, "train", 4, 16, vocab_size=500)
    with pytest.raises(DataError, match="fewer than one step needs"):
        DataLoader(d, "val", 64, 64)
    with pytest.raises(DataError, match="has no test split"):
        DataLoader(d, "test", 4, 16)
    with pytest.raises(DataError, match="does not exist"):
        DataLoader(str(tmp_path / "nowhere"), "train", 4, 16)
    b = make_dir(str(tmp_path / "bin"), fmt="bin")
    with open(os.path.join(b, "train.bin"), "ab") as f:
        f.write(b"\0")  # half a token
    with pytest.raises(DataError, match="train.bin is truncated"):
        DataLoader(b, "train", 4, 16)
    u = str(tmp_path / "unreadable")
    os.makedirs(os.path.join(u, "meta.json"))  # read as root, a folder is what fails to open (a 0000 file would not)
    with pytest.raises(DataError, match="meta.json cannot be read .Is a directory.: check its permissions"):
        DataLoader(u, "train", 4, 16)


def test_truncated_o200k_is_a_consistent_small_bpe():
    full, small = get_tokenizer("o200k_base"), get_tokenizer("o200k_base:4096")
    assert full.encode("hello world") == [24912, 2375]  # the real o200k_base, loaded offline
    assert small.n_vocab == 4097 and small.eot_token == 4096
    text = "Tokenizers split text into pieces: naïve café, 東京, emoji 🙂, code x += 1."
    ids = small.encode_ordinary(text)
    assert small.decode(ids) == text and max(ids) < 4096
    assert len(ids) >= len(full.encode_ordinary(text))  # fewer merges, never shorter
    assert small.encode_ordinary("the") == full.encode_ordinary("the")  # common words keep o200k's ids


def test_unknown_tokenizer_is_one_line():
    with pytest.raises(DataError, match="unknown tokenizer 'o300k'"):
        get_tokenizer("o300k")
