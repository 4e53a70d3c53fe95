"""sample.py as a user runs it: only ids the tokenizer can decode, a prompt read as prepared text is read, the sampling
controls as transformers means them, samples that end at end-of-text or a stop string, and text streamed as it comes."""
import os

import pytest

from conftest import TOKENIZER, padded_checkpoint, run_script
from generate import generate


def test_a_model_whose_padded_ids_have_the_largest_logits_samples_only_decodable_ids(tmp_path):
    """Issue 21's first crash (KeyError: 'Invalid token for decoding'), made certain: every padded id (4,097 to
    4,159) outscores every real one by 32 nats, so one unmasked step is enough to emit one."""
    out = padded_checkpoint(str(tmp_path / "run"))
    r = run_script("sample.py", f"--out_dir={out}", "--max_new_tokens=20", "--start=The function", "--seed=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The function") and len(r.stdout.split("---------------")[0]) > len("The function\n")
    # the mask in the model's own terms, with every sampling setting: top_k 0 (off), a hot temperature, greedy
    import torch

    from data_loader import decodable, get_tokenizer
    from weights import load_model

    model, _ = load_model(os.path.join(out, "ckpt_0"))
    allowed = torch.from_numpy(decodable(get_tokenizer(TOKENIZER), model.cfg.vocab_size))
    prompt = torch.zeros(2, 3, dtype=torch.long)
    assert (generate(model, prompt, 30, temperature=1.0, top_k=0)[:, 3:] >= 4097).all()  # unmasked: padding, always
    for temperature, top_k in ((2.0, 0), (0.8, 200), (0, None)):
        out_ids = generate(model, prompt, 30, temperature=temperature, top_k=top_k, allowed=allowed)[:, 3:]
        assert allowed[out_ids].all(), (temperature, top_k)


def test_the_decodable_ids_are_the_tokenizers_own_less_its_holes():
    from data_loader import decodable, get_tokenizer

    enc = get_tokenizer("o200k_base")  # 200,019 ids, of which 199998 and 200000-200017 are holes
    mask = decodable(enc, 201088)
    assert mask.sum() == 200_000 and not mask[199998] and not mask[200000:200018].any() and not mask[200019:].any()
    assert mask[199999] and mask[200018]  # <|endoftext|>, <|endofprompt|>: specials it can decode
    cut = get_tokenizer("o200k_base:32768")  # mac_micro: 32,769 ids in 32,832 outputs
    assert decodable(cut, 32832).sum() == 32769 and decodable(cut, 32832)[32768]


def test_a_typed_endoftext_is_plain_text_in_a_prompt_as_in_prepared_data():
    """prepare_fineweb.py reads '<|endoftext|>' inside a document as 13 characters; a prompt must read it alike.
    With --chat the template's own markers stay special, and the user's text inside them is still plain."""
    import prepare_fineweb
    from data_loader import get_tokenizer
    from sample import prompt_ids

    text = "first <|endoftext|> second"
    prepare_fineweb._init_worker(TOKENIZER)
    prepared, _ = prepare_fineweb._tokenize(("docs", [text]))
    enc = get_tokenizer(TOKENIZER)
    ids, stops = prompt_ids(text, enc)
    assert ids == [t % prepare_fineweb.TRAINED for t in prepared.tolist()][1:]  # prepare puts EOT before each document
    assert enc.eot_token not in ids and not stops
    harmony = get_tokenizer("o200k_harmony")
    ids, stops = prompt_ids(text, harmony, chat=True)
    special = lambda s: harmony.encode(s, allowed_special="all")
    assert ids[:2] == special("<|start|>user") and special("<|message|>")[0] in ids and special("<|end|>")[0] in stops
    assert harmony.eot_token not in ids and harmony.encode_ordinary(text) == ids[3:3 + len(harmony.encode_ordinary(text))]


# ----------------------------------------------------------------------------- the sampling controls (issue 23 item 4)

def hf_scores(logits, context, temperature, top_k, top_p, min_p, repetition_penalty):
    """transformers' processors for these settings, chosen and ordered as its generate() chooses them when sampling."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                        TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
    chain = LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        chain.append(TemperatureLogitsWarper(temperature))
    if top_k:
        chain.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        chain.append(TopPLogitsWarper(top_p))
    chain.append(MinPLogitsWarper(min_p))
    return chain(context, logits.clone())


CONTROLS = [  # temperature, top_k, top_p, min_p, repetition_penalty
    (1.0, 0, 1.0, 0.0, 1.3), (0.7, 10, 1.0, 0.0, 1.0), (1.0, 0, 0.9, 0.0, 1.0), (1.0, 0, 1.0, 0.1, 1.0),
    (0.6, 40, 0.8, 0.05, 1.2), (1.7, 0, 0.5, 0.2, 0.8), (0.3, 5, 0.95, 0.0, 2.0), (2.5, 0, 0.3, 0.02, 1.1),
]


@pytest.mark.parametrize("controls", CONTROLS)
def test_the_sampling_controls_equal_transformers_logits_processors(controls):
    """Fixed logits (ties, a banned id, negative and positive logits of ids in the context), several settings: the
    scores ours samples from are transformers', and so is the draw from them with the same generator."""
    import torch

    from generate import next_token, process_logits

    torch.manual_seed(0)
    logits = torch.randn(3, 300) * 3
    logits[1, 10:20] = logits[1, 10]  # ties, at the top-k edge too
    logits[2, 7] = -float("inf")
    context = torch.randint(0, 300, (3, 40))
    context[:, :5] = torch.tensor([10, 11, 12, 7, 7])  # the prompt's ids are penalised as well
    settings = dict(zip(("temperature", "top_k", "top_p", "min_p", "repetition_penalty"), controls))
    ours = process_logits(logits, context, **settings)
    want = hf_scores(logits, context, *controls)
    assert torch.equal(ours, want)
    assert (ours == -float("inf")).sum() > 1 or controls[1:4] == (0, 1.0, 0.0)  # something was cut
    draw = next_token(logits, context, generator=torch.Generator().manual_seed(5), **settings)
    assert torch.equal(draw, torch.multinomial(want.softmax(dim=-1), 1, generator=torch.Generator().manual_seed(5)))


def test_greedy_takes_the_penalised_likeliest_and_the_allowed_mask_still_holds():
    """transformers penalises repeats when it decodes greedily too; no control ever picks an id allowed leaves out."""
    import torch

    from generate import next_token
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    logits = torch.tensor([[5.0, 4.9, 1.0, -2.0, 9.0]])
    context = torch.tensor([[0, 0, 3]])
    allowed = torch.tensor([True, True, True, True, False])  # 4 is the likeliest, and not decodable
    assert next_token(logits, context, allowed, temperature=0).item() == 0
    assert next_token(logits, context, allowed, temperature=0, repetition_penalty=1.1).item() == 1  # 5 / 1.1 < 4.9
    want = RepetitionPenaltyLogitsProcessor(1.1)(context, logits.masked_fill(~allowed, -float("inf")))
    assert want.argmax().item() == 1
    for top_p, min_p in ((0.01, 0.0), (1.0, 0.95)):  # cuts that keep only the likeliest allowed id: p(1) / p(0) = 0.905
        g = torch.Generator().manual_seed(0)
        assert {next_token(logits, context, allowed, g, top_p=top_p, min_p=min_p).item() for _ in range(20)} == {0}
    g = torch.Generator().manual_seed(0)  # scores that overflow to inf: the limit, the likeliest of them (no NaN)
    assert next_token(logits, context, allowed, g, temperature=1e-45).item() == 0  # 0, 1 and 2 overflow
    assert next_token(logits, torch.tensor([[1, 2]]), allowed, g, repetition_penalty=1e-45).item() == 1  # 1 and 2 do


def test_sampling_controls_out_of_range_are_refused_in_one_line(tmp_path):
    """sample.py as a user runs it: one line naming the setting and its range, exit 2, before any checkpoint is
    read (there is none here); the other bounds through the same configure() in process."""
    import sample
    from configurator import ConfigError, configure, settings

    none = tmp_path / "none"
    r = run_script("sample.py", f"--out_dir={none}", "--top_p=0")
    assert r.returncode == 2 and r.stderr == "sample.py: top_p=0.0: top_p must be a number > 0 and <= 1 (1 = every token)\n"
    assert not none.exists()
    for arg, msg in (("--top_p=1.5", "top_p=1.5: top_p must be a number > 0 and <= 1"),
                     ("--min_p=1", "min_p=1.0: min_p must be a number >= 0 and < 1 (0 = off)"),
                     ("--repetition_penalty=0", "repetition_penalty=0.0: repetition_penalty must be a number > 0 (1 = off)"),
                     ("--stop=['']", "stop=('',): stop must be text, or a list of texts, none empty")):
        with pytest.raises(ConfigError) as e:
            configure({k: vars(sample)[k] for k in settings(vars(sample))}, [arg])
        assert str(e.value).startswith(msg)


# ----------------------------------------------------------------------------- stopping and streaming

def spans_tokens(enc, s, ids):
    """True when no one of ids decodes to text holding all of s: s can only appear across tokens."""
    return not any(s in enc.decode_single_token_bytes(t).decode("utf-8", "ignore") for t in ids)


def test_a_stop_string_spanning_tokens_ends_its_row_and_each_row_of_a_batch_ends_on_its_own():
    """Real o200k tokens, pushed one step at a time as generate() does: each row ends at its own stop (a string over
    several tokens, or end-of-text), later tokens of an ended row are ignored, and the batch ends with its last row.
    What is shown along the way is always the start of the final text: never a stop string's beginning."""
    import torch

    from data_loader import get_tokenizer
    from generate import Stops

    enc = get_tokenizer(TOKENIZER)
    texts = ["def main():\n    return 1\n\nclass Foo:\n    pass", "Not the end yet, the end is here. THE END and more", "no stop"]
    stops = ["\n\nclass", "THE END"]
    rows = [enc.encode_ordinary(t) + [enc.eot_token] for t in texts]
    assert spans_tokens(enc, stops[0], rows[0]) and spans_tokens(enc, stops[1], rows[1])
    width = max(map(len, rows)) + 3
    ids = torch.tensor([r + [enc.eot_token] * (width - len(r)) for r in rows])
    ids[0, -2] = enc.encode_ordinary("x")[0]  # after its stop: never seen
    want = [texts[0][:texts[0].index(stops[0])], texts[1][:texts[1].index(stops[1])], texts[2]]
    ends = Stops(enc, 3, {enc.eot_token}, stops)
    ended_at, held = [None] * 3, False
    for step in range(width):
        all_ended = ends.push(ids[:, step:step + 1])
        for r in range(3):
            ended_at[r] = step if ended_at[r] is None and ends.done[r] else ended_at[r]
            shown = ends.shown(r)
            assert want[r].startswith(shown), (step, r, shown)
            held |= shown != ends.text[r]
        assert all_ended == (None not in ended_at)
    assert ends.text == want and held  # something was held back, then dropped (a stop) or shown (row 2's "no stop")
    completes = [next(i for i in range(len(row)) if stop in enc.decode(row[:i + 1])) for row, stop in zip(rows, stops)]
    assert ended_at == [*completes, len(rows[2]) - 1]  # at the token that completed a stop string; row 2's end-of-text
    assert ended_at[2] < ended_at[0] < ended_at[1]  # each on its own


def test_streamed_text_never_holds_half_a_character_and_ends_as_tiktoken_decodes():
    """o200k_base:4096 splits é, €, 😀 and 漢 over byte tokens: tiktoken's decode of a prefix can end in a replacement
    character; what is shown never does, and the final text is tiktoken's decode of the whole (a lone byte too)."""
    import torch

    from data_loader import get_tokenizer
    from generate import Stops

    enc = get_tokenizer(TOKENIZER)
    ids = enc.encode_ordinary("café costs 5€ 😀 漢字 done")
    assert any("\ufffd" in enc.decode(ids[:i]) for i in range(len(ids)))  # the trap is there
    cut = ids + [enc.encode_single_token(b"\xe2")]  # half of a character at the very end
    ends, shown = Stops(enc, 1, {enc.eot_token}, ["STOP"]), ""
    for t in cut:
        ends.push(torch.tensor([[t]]))
        assert ends.shown(0).startswith(shown) and "\ufffd" not in ends.shown(0)
        shown = ends.shown(0)
    assert shown == "café costs 5€ 😀 漢字 done"
    ends.close()
    assert ends.text[0] == enc.decode(cut) == shown + "\ufffd"


def test_generation_ends_when_every_row_of_the_batch_has_ended_each_at_its_own_token():
    """A real model and tokenizer: rows end at different steps; the batch's tokens are those of an unstopped run up
    to the step where the last row ended, and a row's text ends before its stop."""
    import torch

    from data_loader import decodable, get_tokenizer
    from generate import Stops, generate
    from model import GPT, GPTConfig

    enc = get_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=4160, block_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, head_dim=16,
                          n_expert=2, experts_per_token=1, intermediate_size=32, sliding_window=16)).eval()
    allowed = torch.from_numpy(decodable(enc, 4160))
    prompt = torch.tensor([enc.encode_ordinary("The function")] * 2)
    run = lambda on_token=None: generate(model, prompt, 20, top_k=0, generator=torch.Generator().manual_seed(1),
                                         allowed=allowed, on_token=on_token)
    n = prompt.shape[1]
    free = run()[:, n:].tolist()
    a, b = free[0][3], free[1][9]  # row 0 ends at its 4th token, row 1 at its 10th
    assert a not in free[0][:3] + free[1][:10] and b not in free[1][:9] + free[0][:3]  # the draws allow it
    ends = Stops(enc, 2, {a, b})
    out = run(ends.push)
    assert out[:, n:].tolist() == [free[0][:10], free[1][:10]]
    assert ends.text == [enc.decode(free[0][:3]), enc.decode(free[1][:9])]


def test_plain_sampling_ends_at_end_of_text_unless_told_to_go_on(tmp_path):
    """A model that always says end-of-text: one token and nothing printed past the prompt; --stop_at_eot=False
    prints the special token as text, as before."""
    from data_loader import get_tokenizer

    out = padded_checkpoint(str(tmp_path / "run"), loudest=[get_tokenizer(TOKENIZER).eot_token])
    r = run_script("sample.py", f"--out_dir={out}", "--start=The function")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The function\n---------------\n" and "1 x 1 tokens" in r.stderr
    r = run_script("sample.py", f"--out_dir={out}", "--start=The function", "--stop_at_eot=False", "--max_new_tokens=3")
    assert r.stdout == "The function" + "<|endoftext|>" * 3 + "\n---------------\n" and "1 x 3 tokens" in r.stderr
    r = run_script("sample.py", f"--out_dir={out}", "--start=", "--stop_at_eot=False", "--max_new_tokens=1", "--stream=False")
    assert r.stdout == "<|endoftext|>\n---------------\n", r.stdout  # an empty prompt is end-of-text, not shown as text


def test_sample_py_stops_at_a_stop_string_and_streams_the_text_it_prints_at_the_end(tmp_path):
    """A first run's text, printed at the end, gives a stop string that only appears across tokens; with it the text
    streamed (the default for one sample) is that text up to the stop string: a streamed beginning of the stop string
    would stay on the screen, and show here."""
    import re

    from data_loader import get_tokenizer

    enc = get_tokenizer(TOKENIZER)
    out = padded_checkpoint(str(tmp_path / "run"))
    args = [f"--out_dir={out}", "--start=The function", "--seed=3", "--max_new_tokens=40", "--stop_at_eot=False"]
    r = run_script("sample.py", *args, "--stream=False")
    assert r.returncode == 0, r.stderr
    text = r.stdout.removeprefix("The function").removesuffix("\n---------------\n")
    stop = next(w for w in (text[i:i + 5] for i in range(4, len(text))) if re.fullmatch("[a-z ]{5}", w)
                and spans_tokens(enc, w, range(enc.n_vocab)))
    want = "The function" + text[:text.index(stop)] + "\n---------------\n"
    r = run_script("sample.py", *args, f"--stop={stop}")
    assert r.stdout == want and "1 x 40 tokens" not in r.stderr, (stop, r.stderr)


def test_a_stop_typed_as_plain_text_is_that_text_with_python_escapes(tmp_path):
    r"""--stop='\n' (a backslash and an n, as a shell passes it) is a newline, as it is inside --stop="['\n']": it was
    the two characters, which the text never holds, so the sample ran on. --stop=123 is the text 123 (it was refused:
    "wants a tuple")."""
    import sample
    from configurator import configure, settings
    from data_loader import get_tokenizer

    enc = get_tokenizer(TOKENIZER)
    out = padded_checkpoint(str(tmp_path / "run"), loudest=[enc.encode_ordinary("\n")[0]])  # says "\n" and nothing else
    r = run_script("sample.py", f"--out_dir={out}", "--start=The function", "--temperature=0", "--max_new_tokens=20", r"--stop=\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "The function\n---------------\n" and "1 x 1 tokens" in r.stderr, (r.stdout, r.stderr)
    scope = {k: vars(sample)[k] for k in settings(vars(sample))}
    assert [configure(dict(scope), [arg])["stop"] for arg in ("--stop=123", r"--stop=a\\n", "--stop='END'")] == [
        ("123",), ("a\\n",), ("END",)]


def test_a_reader_that_leaves_ends_sample_py_quietly(tmp_path):
    """`python sample.py ... | head -c 50`: the streamed text's next print met a pipe with no reader, and a
    BrokenPipeError's traceback followed. Now the script ends there, silent, with the code a shell gives `cat` in
    `cat file | head`: 141."""
    import subprocess
    import sys

    from conftest import ROOT

    out = padded_checkpoint(str(tmp_path / "run"))
    p = subprocess.Popen([sys.executable, "sample.py", f"--out_dir={out}", "--max_new_tokens=2000", "--stop_at_eot=False"],
                         cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert len(p.stdout.read(50)) == 50
    p.stdout.close()
    stderr = p.stderr.read()
    assert p.wait(timeout=120) == 141 and stderr == b"", stderr.decode()
