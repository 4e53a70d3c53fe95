"""The bridge to Hugging Face, with real transformers models (test-only dependency; skipped without it): HF
GptOss weights load into ours with the same logits, MXFP4 experts dequantize as transformers does, the
published gpt-oss-20b config maps onto ours, and bad directories are one line."""
import json
import os
import shutil

import pytest
import torch

from conftest import ROOT, TINY, run_script

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from model import GPT, GPTConfig  # noqa: E402
from sizing import param_counts  # noqa: E402
from weights import FP4_VALUES, config_from_hf, load_model, mxfp4_dequantize  # noqa: E402

FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def tiny_hf_config(**kw):
    base = dict(vocab_size=4097, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=16,
                layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256, tie_word_embeddings=False,
                rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "original_max_position_embeddings": 64, "truncate": False}, swiglu_limit=7.0)
    base.update(kw)
    return transformers.GptOssConfig(**base)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny GptOss made and saved by transformers, every weight random (biases and sinks too), fp32."""
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(tiny_hf_config())
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = str(tmp_path_factory.mktemp("hf") / "tiny")
    model.save_pretrained(path)
    return path


def hf_logits(path, idx):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx, idx)[0]


def test_hf_gpt_oss_loads_with_the_same_logits(hf_dir):
    idx = torch.randint(0, 4097, (2, 100))  # longer than the window of 16, within block_size
    ours, settings = load_model(hf_dir)
    assert settings["attn_pattern"] == "SF" and settings["rope_scaling_factor"] == 4.0 and settings["initial_context_length"] == 64
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(hf_dir, idx), atol=1e-5, rtol=1e-5)


def test_train_py_starts_from_hf_weights_then_resumes_its_own_run(tmp_path, hf_dir, data_dir):
    out = str(tmp_path / "ft")
    args = [*TINY, f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={hf_dir}", "--eval_interval=0",
            "--log_interval=1", "--save_every=2", "--lr=1e-4"]
    r = run_script("train.py", *args, "--max_iters=2")
    assert r.returncode == 0, r.stderr
    assert f"initialised from {hf_dir} (HF GptOss weights; iteration 0, fresh optimizer)" in r.stdout
    assert "tie_embeddings=False" in r.stdout  # the HF model's settings replace TINY's
    first = json.loads(open(os.path.join(out, "log.jsonl")).readline())["loss"]
    assert first == pytest.approx(first_loss(hf_dir, data_dir, 8, 1), rel=1e-5)  # the HF weights, not a fresh init
    r = run_script("train.py", *args, "--max_iters=4")
    assert r.returncode == 0 and f"resumed from {os.path.join(out, 'ckpt_2')} at iter 2" in r.stdout, r.stderr


def first_loss(path, data_dir, batch_size, micro_steps):
    """The loss of the first training step, computed here from the weights at path (train.py's first batches)."""
    from data_loader import DataLoader

    model, _ = load_model(path)
    loader = DataLoader(data_dir, "train", batch_size, 64)
    with torch.no_grad():
        return sum(model(*loader.next_batch())[1].item() for _ in range(micro_steps)) / micro_steps


def pack_mxfp4(values):
    """[E, out, in] values that FP4 x 2^k represents exactly -> (blocks, scales) in OpenAI's MXFP4 layout."""
    E, rows, cols = values.shape
    groups = values.reshape(E, rows, cols // 32, 32)
    scale = groups.abs().amax(-1).clamp(min=1e-30).log2().floor() - 2  # so that |value| / 2^scale <= 6
    nib = (groups / torch.exp2(scale)[..., None]).unsqueeze(-1) == torch.tensor(FP4_VALUES)
    idx = nib.float().argmax(-1).to(torch.uint8)  # each value's 4-bit code (+0.0 rather than -0.0)
    blocks = idx[..., 0::2] | (idx[..., 1::2] << 4)
    return blocks, (scale + 127).to(torch.uint8)


def known_fp4_weights(E, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (E, rows, cols // 32, 32), generator=g)
    per_group = torch.randint(-6, 0, (E, rows, cols // 32, 1), generator=g).float()
    vals = torch.tensor(FP4_VALUES)[codes] * torch.exp2(per_group)
    vals[..., 0] = 6.0 * torch.exp2(per_group[..., 0])  # every group holds its largest code: the scale is exact
    return vals.reshape(E, rows, cols)


def test_mxfp4_dequantizes_as_transformers_does_and_such_a_checkpoint_loads(tmp_path, hf_dir):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    known = known_fp4_weights(4, 128, 64, 0)  # [E, out 2I, in H]: OpenAI's orientation
    blocks, scales = pack_mxfp4(known)
    ours = mxfp4_dequantize(blocks.view(4, 128, 2, 16), scales)
    theirs = convert_moe_packed_tensors(blocks.view(4, 128, 2, 16), scales, dtype=torch.float32)
    assert torch.equal(ours, theirs) and torch.equal(ours, known.transpose(1, 2))
    # a checkpoint whose experts are MXFP4, end to end: the same model as with the plain weights
    mx = str(tmp_path / "mxfp4")
    shutil.copytree(hf_dir, mx)
    state = load_file(os.path.join(mx, "model.safetensors"))
    for i in range(2):
        for name, (rows, cols) in (("gate_up_proj", (128, 64)), ("down_proj", (64, 64))):
            key = f"model.layers.{i}.mlp.experts.{name}"
            w = known_fp4_weights(4, rows, cols, 10 * i + rows)
            state[key] = w.transpose(1, 2).contiguous()  # plain, in HF's [E, in, out]
            b, s = pack_mxfp4(w)
            state[key + "_blocks"], state[key + "_scales"] = b.view(4, rows, cols // 32, 16), s
    plain = {k: v for k, v in state.items() if not k.endswith(("_blocks", "_scales"))}
    packed = {k: v for k, v in state.items() if not k.endswith(("gate_up_proj", "down_proj"))}
    save_file(packed, os.path.join(mx, "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, os.path.join(hf_dir + "_plain.safetensors"), metadata={"format": "pt"})
    ref_dir = str(tmp_path / "plain")
    shutil.copytree(hf_dir, ref_dir)
    shutil.move(hf_dir + "_plain.safetensors", os.path.join(ref_dir, "model.safetensors"))
    idx = torch.randint(0, 4097, (1, 40))
    torch.testing.assert_close(our_logits(load_model(mx)[0], idx), our_logits(load_model(ref_dir)[0], idx), atol=0, rtol=0)


def test_gpt_oss_20b_config_maps_to_ours_and_builds_with_20_9b_parameters():
    settings = config_from_hf(os.path.join(FIXTURES, "gpt-oss-20b.config.json"))
    cfg = GPTConfig.from_dict(settings)
    assert (cfg.n_layer, cfg.n_embd, cfg.n_expert, cfg.experts_per_token, cfg.n_head, cfg.n_kv_head) == (24, 2880, 32, 4, 64, 8)
    assert cfg.attn_pattern == "SF" * 12 and cfg.rope_scaling_factor == 32.0 and cfg.rope_truncate is False
    with torch.device("meta"):
        total = sum(p.numel() for p in GPT(cfg).parameters())
    assert total == param_counts(cfg)["total"] and round(total / 1e9, 1) == 20.9


def test_bad_hf_directories_are_one_line(tmp_path, hf_dir, data_dir):
    other = tmp_path / "llama"
    shutil.copytree(hf_dir, other)
    cfg = json.load(open(other / "config.json"))
    json.dump({**cfg, "model_type": "llama"}, open(other / "config.json", "w"))
    sharded = tmp_path / "sharded"
    shutil.copytree(hf_dir, sharded)
    state = load_file(str(sharded / "model.safetensors"))
    os.remove(sharded / "model.safetensors")
    names = sorted(state)
    for i, part in enumerate((names[:10], names[10:])):
        save_file({k: state[k] for k in part}, str(sharded / f"model-0000{i + 1}-of-00002.safetensors"))
    json.dump({"metadata": {}, "weight_map": {k: f"model-0000{1 + (k in names[10:])}-of-00002.safetensors" for k in names}},
              open(sharded / "model.safetensors.index.json", "w"))
    idx = torch.randint(0, 4097, (1, 20))
    torch.testing.assert_close(our_logits(load_model(str(sharded))[0], idx), our_logits(load_model(hf_dir)[0], idx))
    os.remove(sharded / "model-00002-of-00002.safetensors")
    for path, msg in ((other, "model_type 'llama' is not gpt_oss"), (sharded, "model-00002-of-00002.safetensors is missing")):
        for script, args in (("train.py", [*TINY, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}"]), ("sample.py", [])):
            r = run_script(script, *args, f"--init_from={path}")
            lines = r.stderr.strip().splitlines()
            assert r.returncode != 0 and len(lines) == 1 and msg in lines[0], (script, path, r.stderr)
    assert not os.path.exists(tmp_path / "o")  # nothing written


def test_hf_to_nanooss_to_hf_is_bit_identical(tmp_path, hf_dir):
    import checkpoint
    from export_hf import export

    model, settings = load_model(hf_dir)
    ckpt_out = str(tmp_path / "run")
    os.makedirs(ckpt_out)
    checkpoint.save(ckpt_out, 0, {"model": model.state_dict()}, {**settings, "tokenizer": "o200k_base:4096"}, True, lambda: None)
    out = export(ckpt_out, str(tmp_path / "back"))
    before, after = load_file(os.path.join(hf_dir, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["rope_parameters"]["truncate"] is False and cfg["layer_types"] == ["sliding_attention", "full_attention"]
    assert cfg["max_position_embeddings"] == 256  # 64 x YaRN factor 4: what the RoPE settings reach


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, hf_dir, data_dir):
    """A LoRA fine-tune of the HF base, adapters on every target (the router too), trained 3 steps."""
    out = str(tmp_path_factory.mktemp("lora") / "ft")
    r = run_script("train.py", *TINY, f"--data_dir={data_dir}", f"--out_dir={out}", f"--init_from={hf_dir}", "--lora_rank=8",
                   "--lora_targets=q,k,v,o,experts,router", "--max_iters=3", "--eval_interval=0", "--lr=1e-2", "--warmup_iters=0")
    assert r.returncode == 0, r.stderr
    return out


def test_a_lora_finetune_of_an_hf_base_merges_exports_and_loads_in_transformers(tmp_path, hf_dir, lora_run):
    from export_hf import export

    out = lora_run
    adapter = os.path.join(out, "adapter")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and "q_proj" in cfg["target_modules"]
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert all("lora_" in k for k in tensors)
    merged, _ = load_model(out)  # base from the HF dir, then the adapters, folded in
    hf_out = export(out, str(tmp_path / "hf_merged"))
    idx = torch.randint(0, 4097, (1, 50))
    theirs = hf_logits(hf_out, idx)
    torch.testing.assert_close(our_logits(merged, idx), theirs, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(theirs, hf_logits(hf_dir, idx), atol=1e-3)  # the fine-tune moved it


@pytest.mark.parametrize("name,vocab_size,specials", [
    ("o200k_base:4096", 4160, ""), ("o200k_base", 201088, "<|endofprompt|>"), ("cl100k_base", 100352, "<|fim_prefix|>x<|fim_suffix|>"),
    ("o200k_harmony", 201088, "<|start|>user<|message|>hi<|end|><|endofprompt|><|reserved_201087|>")])
def test_exported_tokenizers_have_one_name_per_id_and_give_tiktokens_ids(tmp_path, name, vocab_size, specials):
    from data_loader import get_tokenizer, render_chat
    from export_hf import tokenizer_files

    enc = get_tokenizer(name)
    for fname, obj in tokenizer_files(enc, vocab_size).items():
        with open(tmp_path / fname, "w") as f:
            f.write(obj) if isinstance(obj, str) else json.dump(obj, f)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok.get_vocab()  # every name, added (special) tokens included
    assert len(ids) == vocab_size and sorted(ids.values()) == list(range(vocab_size))  # one name per id, none past the model
    text = f"Return a new list, naïve café 東京 🙂\n\n    indented = 1<|endoftext|>{specials}  trailing  \t\n"
    assert tok.encode(text) == enc.encode(text, allowed_special="all")
    assert tok.convert_ids_to_tokens(vocab_size - 1) == (f"[PAD{vocab_size - 1}]" if vocab_size > enc.n_vocab else "<|reserved_201087|>")
    if name == "o200k_harmony":  # gpt-oss's name for 200018, and a fine-tune's chat in its own template
        assert tok.convert_ids_to_tokens(200018) == "<|endofprompt|>" and tok.eos_token == "<|return|>"
        chat = {"messages": [{"role": "System", "content": "Be brief."}, {"role": "developer", "content": "Answer in French."},
                             {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Let me look."},
                             {"role": "tool", "name": "get_weather", "content": "{\"sunny\": true}"},
                             {"role": "assistant", "content": "Il fait beau."}]}
        assert tok.apply_chat_template(chat["messages"], tokenize=True, return_dict=False) == render_chat(chat, enc)[0]
        prompt = tok.apply_chat_template(chat["messages"][:3], add_generation_prompt=True, tokenize=True, return_dict=False)
        assert enc.decode(prompt).endswith("<|end|><|start|>assistant<|channel|>final<|message|>")


def test_peft_loads_a_finetunes_adapter_onto_the_hf_base_as_our_merged_model(hf_dir, lora_run):
    peft = pytest.importorskip("peft")
    adapter = os.path.join(lora_run, "adapter")
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    tuned = peft.PeftModel.from_pretrained(base, adapter)
    loaded = peft.get_peft_model_state_dict(tuned)  # what peft holds: a key it dropped would be missing here, or at init
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert any(".mlp.experts.base_layer.lora_A" in k for k in saved) and any(".mlp.router.lora_B" in k for k in saved)
    idx = torch.randint(0, 4097, (1, 50))
    merged, _ = load_model(lora_run)
    with torch.no_grad():
        torch.testing.assert_close(tuned(idx).logits, our_logits(merged, idx), atol=1e-5, rtol=1e-5)
