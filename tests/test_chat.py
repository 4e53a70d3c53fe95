"""Chat and instruction data: rendered by a template, stored with a loss mask, and only the answers trained.
Real records (a standard-library function's signature as the prompt, its docstring as the completion), the
real prepare_fineweb.py and o200k tokenizers."""
import inspect
import json
import os

import numpy as np
import pytest
import torch

from conftest import TINY, run_script
from data_loader import DataLoader, get_tokenizer, render_chat


def api_records(modules=("json", "textwrap", "shlex", "difflib", "string", "base64", "heapq", "bisect", "fnmatch")):
    """prompt: `module.function(signature)`, completion: its docstring."""
    out = []
    for name in modules:
        mod = __import__(name)
        for fname, fn in sorted(vars(mod).items()):
            if inspect.isfunction(fn) and fn.__doc__ and not fname.startswith("_"):
                try:
                    sig = str(inspect.signature(fn))
                except (TypeError, ValueError):
                    continue
                out.append({"prompt": f"{name}.{fname}{sig}\n", "completion": inspect.cleandoc(fn.__doc__)})
    return out


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    src = root / "api.jsonl"
    recs = api_records()
    recs[1] = {"messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": recs[1]["prompt"]},
                            {"role": "assistant", "content": recs[1]["completion"]}]}
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = str(root / "data")
    r = run_script("prepare_fineweb.py", f"--input={src}", "--encoding=o200k_base:4096", f"--out_dir={out}",
                   "--val_tokens=1500", "--shard_size=100000")
    assert r.returncode == 0, r.stderr
    return out, recs


def test_the_mask_covers_exactly_the_answers(chat_dir):
    out, recs = chat_dir
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["loss_mask"] is True
    enc = get_tokenizer("o200k_base:4096")
    in_order = sorted((f for f in os.listdir(out) if f.endswith(".npy")), key=lambda f: f[-10:])  # shard 0 (val) first
    tokens = np.concatenate([np.load(os.path.join(out, f)) for f in in_order if "mask_" not in f])
    mask = np.concatenate([np.load(os.path.join(out, f)) for f in in_order if "mask_" in f])
    ids, trained = render_chat(recs[0], enc)
    assert tokens[:len(ids)].tolist() == ids and mask[:len(ids)].astype(bool).tolist() == trained
    answer = enc.decode([t for t, m in zip(ids, trained) if m])
    assert answer == recs[0]["completion"] + "<|endoftext|>"  # the completion and its end, nothing of the prompt
    ids, trained = render_chat(recs[1], enc)
    assert enc.decode([t for t, m in zip(ids, trained) if not m]).startswith("<|endoftext|>System: Answer briefly.\n\nUser: ")


def test_harmony_template_trains_the_final_message_and_its_return():
    enc = get_tokenizer("o200k_harmony")
    ids, trained = render_chat({"prompt": "2+2?", "completion": "4"}, enc)
    assert enc.decode(ids) == "<|start|>user<|message|>2+2?<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>"
    assert enc.decode([t for t, m in zip(ids, trained) if m]) == "4<|return|>"


def test_loader_masks_prompt_targets_and_the_loss_never_reads_them(chat_dir):
    """Prompt positions get target -1 from the loader; the fused training loss then gives them zero gradient and
    equals the plain cross-entropy over the answer positions alone, so what their targets were changes nothing."""
    from model import chunked_cross_entropy

    out, _ = chat_dir
    x, y = DataLoader(out, "train", 4, 64).next_batch()
    masked = y == -1
    assert masked.any() and (~masked).any()
    torch.manual_seed(0)
    h = torch.randn(4 * 64, 32, requires_grad=True)
    head = torch.randn(4097, 32, requires_grad=True)
    loss = chunked_cross_entropy(h, head, y, 50)  # the fused loss-and-gradient path that training takes
    loss.backward()
    assert torch.equal(h.grad[masked.view(-1)], torch.zeros_like(h.grad[masked.view(-1)]))  # no signal from the prompt
    keep = ~masked.view(-1)
    ref = torch.nn.functional.cross_entropy(h[keep] @ head.t(), y.view(-1)[keep])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    (g_h, g_head) = torch.autograd.grad(ref, [h, head])
    torch.testing.assert_close(h.grad, g_h, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(head.grad, g_head, atol=1e-6, rtol=1e-5)


def test_loader_resumes_masked_batches_exactly(chat_dir):
    out, _ = chat_dir
    a = DataLoader(out, "train", 2, 32)
    for _ in range(7):
        a.next_batch()
    b = DataLoader(out, "train", 2, 32)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_reports_masked_token_accuracy_and_eval_only_writes_nothing(tmp_path, chat_dir):
    out_data, _ = chat_dir
    out = str(tmp_path / "run")
    args = [*TINY, f"--data_dir={out_data}", f"--out_dir={out}", "--batch_size=4", "--eval_iters=2", "--log_interval=1"]
    r = run_script("train.py", *args, "--max_iters=4", "--eval_interval=4")
    assert r.returncode == 0, r.stderr
    assert "(assistant tokens only)" in r.stdout and "val acc " in r.stdout
    evals = [json.loads(line) for line in open(os.path.join(out, "log.jsonl")) if '"eval"' in line]
    assert 0 <= evals[-1]["val_acc"] <= 1
    from test_train import tree_digest

    before = tree_digest(out)
    r = run_script("train.py", *args, "--eval_only=True")
    assert r.returncode == 0 and "eval 4 | train" in r.stdout, r.stderr
    assert f"val {evals[-1]['val_loss']:.3f}" in r.stdout  # the same numbers as the run's own eval
    assert tree_digest(out) == before


def test_stdlib_api_set_holds_out_whole_modules_that_pretraining_never_reads(tmp_path):
    from prepare_fineweb import API_HOLDOUT, stdlib_api, stdlib_docs

    records, n_val = stdlib_api()
    held = {r["prompt"].split(".")[0] for r in records[:n_val]}
    assert held <= set(API_HOLDOUT) and n_val >= 50
    assert not any(r["prompt"].split(".")[0] in API_HOLDOUT for r in records[n_val:])
    docs = set(stdlib_docs())
    assert not any(r["completion"] in docs for r in records[:n_val])  # the base never saw the answers it is scored on
    out = str(tmp_path / "api")
    r = run_script("prepare_fineweb.py", "--corpus=stdlib_api", "--encoding=o200k_base:4096", f"--out_dir={out}")
    assert r.returncode == 0, r.stderr
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["loss_mask"] and meta["documents"]["val"] == n_val  # the validation shard is exactly the held-out records


def turns(*pairs):
    return {"messages": [{"role": role, "content": content} for role, content in pairs]}


@pytest.mark.parametrize("encoding", ["o200k_base", "o200k_base:4096"])  # uint32 ids, and uint16
def test_a_file_mixing_text_and_chat_records_trains_text_whole_and_chat_on_its_answers(tmp_path, encoding):
    """The first record is {"text"}, later ones are chat: every shard gets a mask, each token is exactly its record's
    rendering (no flag bit left in an id), a text record is trained whole, a chat record on its answers."""
    recs = api_records(("json", "textwrap"))
    records = [{"text": "Plain prose comes first. " * 20}, recs[0], turns(("user", recs[1]["prompt"]), ("assistant", recs[1]["completion"])),
               {"text": "More prose between the chats. " * 20}, *recs[2:8]]
    src = tmp_path / "mixed.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = str(tmp_path / "data")
    r = run_script("prepare_fineweb.py", f"--input={src}", f"--encoding={encoding}", f"--out_dir={out}",
                   "--val_tokens=400", "--shard_size=700")
    assert r.returncode == 0, r.stderr
    assert json.load(open(os.path.join(out, "meta.json")))["loss_mask"] is True
    shards = sorted((f for f in os.listdir(out) if f.endswith(".npy") and "mask_" not in f), key=lambda f: f[-10:])
    masks = [f.replace("_val_", "_valmask_").replace("_train_", "_trainmask_") for f in shards]
    assert len(shards) >= 3 and all(os.path.exists(os.path.join(out, f)) for f in masks)
    tokens = np.concatenate([np.load(os.path.join(out, f)) for f in shards])
    mask = np.concatenate([np.load(os.path.join(out, f)) for f in masks])
    enc = get_tokenizer(encoding)
    ids, trained = [], []
    for rec in records:
        if "text" in rec:
            rec_ids = [enc.eot_token] + enc.encode_ordinary(rec["text"])
            rec_trained = [True] * len(rec_ids)
        else:
            rec_ids, rec_trained = render_chat(rec, enc)
        ids += rec_ids
        trained += rec_trained
    assert tokens.max() < enc.n_vocab and tokens.tolist() == ids and mask.astype(bool).tolist() == trained
    answer = [t for t, m in zip(*render_chat(records[2], enc)) if m]
    assert enc.decode(answer) == recs[1]["completion"] + "<|endoftext|>"


def test_harmony_renders_developer_and_tool_turns_as_openai_harmony_does_and_trains_only_the_answer():
    """Roles in any case; developer and tool turns are rendered, never trained. The expected harmony text is what
    openai-harmony 0.0.8's render_conversation_for_training gives for the same conversation (system; developer with
    DeveloperContent instructions; user; a tool message from functions.get_weather to the assistant on the
    commentary channel; the assistant's final answer), token for token."""
    record = turns(("System", "Be brief."), ("developer", "Answer in French."), ("USER", "Weather in Paris?"),
                   ("tool", '{"sunny": true}'), ("Assistant", "Il fait beau."))
    record["messages"][3]["name"] = "get_weather"
    enc = get_tokenizer("o200k_harmony")
    ids, trained = render_chat(record, enc)
    assert enc.decode(ids) == (
        "<|start|>system<|message|>Be brief.<|end|>"
        "<|start|>developer<|message|># Instructions\n\nAnswer in French.<|end|>"
        "<|start|>user<|message|>Weather in Paris?<|end|>"
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>'
        "<|start|>assistant<|channel|>final<|message|>Il fait beau.<|return|>")
    assert enc.decode([t for t, m in zip(ids, trained) if m]) == "Il fait beau.<|return|>"
    plain = get_tokenizer("o200k_base:4096")
    ids, trained = render_chat(record, plain)
    assert plain.decode(ids) == ("<|endoftext|>System: Be brief.\n\nDeveloper: Answer in French.\n\nUser: Weather in Paris?\n\n"
                                 'Tool: {"sunny": true}\n\nAssistant: Il fait beau.<|endoftext|>')
    assert plain.decode([t for t, m in zip(ids, trained) if m]) == "Il fait beau.<|endoftext|>"


def test_a_role_no_template_has_is_refused_in_one_line_with_file_and_line(tmp_path):
    src = tmp_path / "roles.jsonl"
    cases = [(turns(("user", "hi"), ("bot", "hello"), ("assistant", "hey")), "o200k_base:4096",
              "role 'bot' is not one of system, developer, user, assistant, tool"),
             (turns(("user", "hi"), ("tool", "42"), ("assistant", "42")), "o200k_harmony",
              "a tool turn needs a 'name' in the harmony template")]
    for record, encoding, msg in cases:
        src.write_text(json.dumps(turns(("user", "hi"), ("assistant", "hello"))) + "\n" + json.dumps(record) + "\n")
        r = run_script("prepare_fineweb.py", f"--input={src}", f"--encoding={encoding}", f"--out_dir={tmp_path / 'out'}")
        assert r.returncode != 0 and r.stderr.count("\n") == 1 and f"{src}:2: {msg}" in r.stderr, r.stderr
