"""
nanoOSS checkpoints out to Hugging Face transformers:
    python export_hf.py --ckpt=out/mac_micro --out=hf/mac_micro      # a nanoOSS checkpoint -> an HF GptOss directory
Our parameter names are HF GptOssForCausalLM's without the "model." prefix, and the layouts are the same
(experts stacked as [n_expert, in, out], gate and up interleaved), so crossing is a rename. Reading goes the other
way in weights.py: train.py --init_from and sample.py --init_from read HF directories (bf16 or MXFP4 experts) there.
"""
import json
import os
import shutil

import torch

from weights import BridgeError, base_settings, hf_name, load_weights

# the export's settings (--key=value): dtype auto keeps the checkpoint's (fp32 after training), or bfloat16, ...
SETTINGS = {"ckpt": "", "out": "", "dtype": "auto"}

SHARD_BYTES = 5 * 10**9  # safetensors files under 5 GB, as transformers writes them


# ----------------------------------------------------------------------------- configs

def hf_config(cfg, eot=None):
    """The HF config.json of our model, every setting explicit: transformers never falls back to its defaults
    (which differ: a missing YaRN truncate reads as true, a missing layer_types as a pattern of its own)."""
    if cfg.mor_router != "none":
        raise BridgeError("this model routes tokens through its recursion steps (mor_router "
                          f"{cfg.mor_router}), which GptOss cannot represent: only recursion without routing exports")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling_factor > 1.0:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                "beta_fast": cfg.rope_ntk_beta, "beta_slow": cfg.rope_ntk_alpha, "truncate": cfg.rope_truncate,
                "original_max_position_embeddings": cfg.initial_context_length}
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "num_local_experts": cfg.n_expert,
            "num_experts_per_tok": cfg.experts_per_token, "experts_per_token": cfg.experts_per_token,
            "intermediate_size": cfg.intermediate_size, "sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention" for i in cfg.schedule()[0]],
            "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": rope, "rope_scaling": rope if rope["rope_type"] == "yarn" else None,
            "max_position_embeddings": cfg.rope_reach(), "initial_context_length": cfg.initial_context_length,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": True, "attention_dropout": 0.0,
            "hidden_act": "silu", "initializer_range": cfg.init_std, "use_cache": True, "output_router_logits": False,
            "router_aux_loss_coef": 0.9, "eos_token_id": eot, "pad_token_id": eot, "dtype": "float32"}


# ----------------------------------------------------------------------------- tokenizer files

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


def tokenizer_files(enc):
    """tokenizer.json etc. for a tiktoken Encoding, such that transformers' AutoTokenizer gives tiktoken's ids,
    special tokens included. Merges are every split of a token into two tokens, in the order of the merged
    token's rank: byte-level BPE by merge priority then reproduces tiktoken's lowest-rank-first merging."""
    ranks, table = enc._mergeable_ranks, bytes_to_unicode()
    text = lambda b: "".join(table[x] for x in b)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += [[text(a), text(b)] for a, b in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))]
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    eot = enc._special_tokens.get("<|endoftext|>", specials[0][1] if specials else None)
    eot_text = next((t for t, i in specials if i == eot), None)
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in specials],
           "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                     "vocab": {text(t): r for t, r in ranks.items()}, "merges": merges}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False,
              **({"eos_token": eot_text, "pad_token": eot_text} if eot_text else {})}
    return {"tokenizer.json": tok, "tokenizer_config.json": config}


# ----------------------------------------------------------------------------- adapters

def save_safetensors(tensors, path):
    """safetensors' save_file, then the file made readable as the umask allows (save_file leaves it 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_peft_adapter(state, cfg, base_path, out):
    """A fine-tune's adapters in peft's format (adapter_model.safetensors + adapter_config.json), the one that
    transformers (PeftModel.from_pretrained) and llama.cpp's convert_lora_to_gguf.py read. Attention adapters use
    peft's names; the experts' per-expert adapters keep ours (lora_A [E, in, r], lora_B [E, r, out])."""
    tensors = {}
    for name, t in state.items():
        if "lora_" not in name:
            continue
        if name.endswith(("_proj.lora_A", "_proj.lora_B", "router.lora_A", "router.lora_B")):  # nn.Linear adapters
            key = f"base_model.model.{hf_name(name)}.weight"
        else:
            key = f"base_model.model.{hf_name(name)}"
        tensors[key] = t.detach().to("cpu", torch.float32).contiguous()
    os.makedirs(out + ".tmp", exist_ok=True)
    save_safetensors(tensors, os.path.join(out + ".tmp", "adapter_model.safetensors"))
    targets = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "router": "router"}
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": [targets[t] for t in cfg.lora_targets.split(",") if t in targets],
              "target_parameters": [f"mlp.experts.{p}" for p in ("gate_up_proj", "down_proj")] if cfg.lora_on("experts") else []}
    with open(os.path.join(out + ".tmp", "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(out + ".tmp", out)


# ----------------------------------------------------------------------------- export

def export(ckpt, out, dtype="auto"):
    """A nanoOSS checkpoint (any world size wrote it) -> an HF GptOss directory at out, written under a temporary
    name and renamed when whole: a killed export never leaves a directory that looks finished."""
    import checkpoint
    from data_loader import get_tokenizer
    from model import GPT, GPTConfig

    settings, kind, path = base_settings(ckpt)
    if kind != "nanooss":
        raise BridgeError(f"{ckpt} is already an HF directory")
    if os.path.exists(out) and os.listdir(out):
        raise BridgeError(f"{out} exists and is not empty: choose a new --out (nothing is written over)")
    unwritable = checkpoint.unwritable(os.path.dirname(os.path.abspath(out)))  # where the export is written, then renamed
    if unwritable:
        raise BridgeError(f"--out {out}: {unwritable}: choose an --out you can write to")
    cfg = GPTConfig.from_dict(settings)
    cfg.lora_rank = 0  # a fine-tune is exported merged: its adapters folded into the base's weights
    enc = get_tokenizer(settings["tokenizer"]) if settings.get("tokenizer") else None
    if enc is not None and enc.n_vocab > cfg.vocab_size:
        raise BridgeError(f"tokenizer {settings['tokenizer']} has ids up to {enc.n_vocab - 1}, beyond the model's vocab_size "
                          f"{cfg.vocab_size}: the checkpoint's config.json names the wrong tokenizer")
    config = hf_config(cfg, enc.eot_token if enc else None)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(settings))
    model.to_empty(device="cpu")
    load_weights(model, "nanooss", path)
    model.merge_lora()
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers: ours to remove
    os.makedirs(tmp)
    want = getattr(torch, dtype) if dtype not in ("", "auto") else None
    tensors = {}
    for n, p in model.named_parameters():  # a shared block is written once per use: an unrolled GptOss, exactly equal
        t = (p.detach().to(want) if want else p.detach()).contiguous()
        if n.startswith("layers."):
            block, rest = n.split(".", 2)[1:]
            tensors.update({hf_name(f"layers.{j}.{rest}"): t.clone() for j, b in enumerate(model.plan) if b == int(block)})
        else:
            tensors[hf_name(n)] = t
    config["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_safetensors(shard, os.path.join(tmp, fname))
        weight_map.update({k: fname for k in shard})
    files = {"config.json": config, "generation_config.json": {"eos_token_id": config["eos_token_id"],
                                                               "pad_token_id": config["pad_token_id"], "do_sample": True}}
    if len(shards) > 1:
        files["model.safetensors.index.json"] = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                                                 "weight_map": weight_map}
    if enc is not None:
        files.update(tokenizer_files(enc))
    for fname, obj in files.items():
        with open(os.path.join(tmp, fname), "w") as f:
            json.dump(obj, f, ensure_ascii=False)
    if os.path.exists(out):
        os.rmdir(out)  # empty, checked above
    os.rename(tmp, out)
    return out


def main():
    from configurator import configure

    settings = configure(dict(SETTINGS))
    if not settings["ckpt"] or not settings["out"]:
        raise BridgeError("usage: python export_hf.py --ckpt=OUT_DIR_OR_CKPT --out=HF_DIR [--dtype=bfloat16]")
    out = export(settings["ckpt"], settings["out"], settings["dtype"])
    print(f"wrote {out}: load it with transformers' AutoModelForCausalLM.from_pretrained({out!r})")


if __name__ == "__main__":
    from configurator import run

    run(main)
