"""sample.py as a user runs it: only ids the tokenizer can decode, and a prompt read as prepared text is read."""
import os

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
