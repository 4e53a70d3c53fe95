"""
nanoOSS checkpoints out to Hugging Face transformers and to llama.cpp:
    python export_hf.py --ckpt=out/mac_micro --out=hf/mac_micro      # a nanoOSS checkpoint -> an HF GptOss directory
    python export_hf.py --ckpt=out/mac_micro --gguf=micro.gguf       # -> a GGUF file for llama.cpp (export_gguf.py)
Our parameter names are HF GptOssForCausalLM's without the "model." prefix, and the layouts are the same
(experts stacked as [n_expert, in, out], gate and up interleaved), so crossing is a rename. Reading goes the other
way in weights.py: train.py --init_from and sample.py --init_from read HF directories (bf16 or MXFP4 experts) there.
"""
import json
import os
import shutil

import torch

from data_loader import HARMONY_TEMPLATE, end_tokens, is_harmony, vocab_table
from weights import BridgeError, base_settings, hf_name, load_weights

# the export's settings (--key=value): dtype auto keeps the checkpoint's (fp32 after training), or bfloat16, ...
# dtype: the HF weights as stored (fp32 after training), or bfloat16; gguf_type: the GGUF's matrices
SETTINGS = {"ckpt": "", "out": "", "dtype": "auto", "gguf": "", "gguf_type": "f16"}

SHARD_BYTES = 5 * 10**9  # safetensors files under 5 GB, as transformers writes them


# ----------------------------------------------------------------------------- configs

def hf_config(cfg, eos=None, pad=None):
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
            "router_aux_loss_coef": 0.9, "eos_token_id": eos, "pad_token_id": pad, "dtype": "float32"}


# ----------------------------------------------------------------------------- tokenizer files

def tokenizer_files(enc, vocab_size):
    """tokenizer.json etc. for a tiktoken Encoding, such that transformers' AutoTokenizer gives tiktoken's ids,
    special tokens included, with one name for each id below vocab_size and none above (vocab_table). A harmony
    tokenizer also carries the chat template its fine-tunes were trained with."""
    names, kinds, merges = vocab_table(enc, vocab_size)
    eos, _ = end_tokens(enc)
    tok = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": n, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, (n, k) in enumerate(zip(names, kinds)) if k == "special"],
           "normalizer": None,
           "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
               {"type": "Split", "pattern": {"Regex": enc._pat_str}, "behavior": "Isolated", "invert": False},
               {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                     "vocab": {n: i for i, n in enumerate(names)},  # specials too: tokenizers would renumber them
                     "merges": [list(m) for m in merges]}}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1_000_000, "clean_up_tokenization_spaces": False}
    if eos is not None:
        config.update(eos_token=names[eos], pad_token=names[enc._special_tokens.get("<|endoftext|>", eos)])
    files = {"tokenizer.json": tok, "tokenizer_config.json": config}
    if is_harmony(enc):
        files["chat_template.jinja"] = HARMONY_TEMPLATE
    return files


# ----------------------------------------------------------------------------- adapters

def save_safetensors(tensors, path):
    """safetensors' save_file, then the file made readable as the umask allows (save_file leaves it 0600)."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_peft_adapter(state, cfg, base_path, out):
    """A fine-tune's adapters in peft's format (adapter_model.safetensors + adapter_config.json), such that
    PeftModel.from_pretrained on the HF export of the base computes our merged fine-tune. Attention adapters are
    peft's nn.Linear ones (target_modules). The router and the stacked experts are parameters to peft
    (target_parameters: HF's router is no nn.Linear), in peft 0.21's lora.ParamWrapper layout: a wrapper per
    parameter, down_proj's wrapping gate_up_proj's (so gate_up_proj's keys hold a base_layer.); per stack
    lora_A [E * r, in] (expert-major) and lora_B [out, r * E] (the experts inside each rank), whose product for
    expert e is ours, A[e] @ B[e]. A block shared by recursion is written for each layer that runs it, as the
    HF export unrolls it."""
    plan, tensors = cfg.schedule()[0], {}
    for name, t in state.items():
        if "lora_" not in name:
            continue
        t = t.detach().to("cpu", torch.float32)
        module, param = name.rsplit(".", 1)  # e.g. layers.0.self_attn.q_proj, lora_A / layers.0.mlp.experts, down_lora_B
        if module.endswith(".experts"):
            stack, ab = param.split("_lora_")
            module += "" if stack == "down" else ".base_layer"
            param = f"lora_{ab}"
            t = t.transpose(1, 2).reshape(-1, t.shape[1]) if ab == "A" else t.permute(2, 1, 0).reshape(t.shape[2], -1)
        _, block, rest = module.split(".", 2)
        for j in (j for j, b in enumerate(plan) if b == int(block)):
            tensors[f"base_model.model.{hf_name(f'layers.{j}.{rest}')}.{param}.weight"] = t.contiguous()
    os.makedirs(out + ".tmp", exist_ok=True)
    save_safetensors(tensors, os.path.join(out + ".tmp", "adapter_model.safetensors"))
    targets = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    params = (["mlp.router.weight"] if cfg.lora_on("router") else []) + (
        ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if cfg.lora_on("experts") else [])
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_path, "r": cfg.lora_rank,
              "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": [targets[t] for t in cfg.lora_targets.split(",") if t in targets], "target_parameters": params}
    with open(os.path.join(out + ".tmp", "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    shutil.rmtree(out, ignore_errors=True)
    os.rename(out + ".tmp", out)


# ----------------------------------------------------------------------------- export

def export(ckpt, out="", dtype="auto", gguf="", gguf_type="f16"):
    """A nanoOSS checkpoint (any world size wrote it) -> an HF GptOss directory at out and/or a GGUF file for
    llama.cpp at gguf (export_gguf.py), each written under a temporary name and renamed when whole: a killed export
    never leaves a directory or a file that looks finished. Returns out, or gguf when there is no out."""
    import checkpoint
    from data_loader import get_tokenizer
    from model import GPT, GPTConfig

    settings, kind, path = base_settings(ckpt)
    if kind != "nanooss":
        raise BridgeError(f"{ckpt} is already an HF directory")
    if out and os.path.exists(out) and os.listdir(out):
        raise BridgeError(f"{out} exists and is not empty: choose a new --out (nothing is written over)")
    for flag, target in (("--out", out), ("--gguf", gguf)):
        unwritable = target and checkpoint.unwritable(os.path.dirname(os.path.abspath(target)))  # written there, then renamed
        if unwritable:
            raise BridgeError(f"{flag} {target}: {unwritable}: choose a place you can write to")
    if gguf:
        from export_gguf import check_gguf_target, gguf_refusal, write_gguf

        check_gguf_target(gguf, gguf_type)
    cfg = GPTConfig.from_dict(settings)
    cfg.lora_rank = 0  # a fine-tune is exported merged: its adapters folded into the base's weights
    enc = get_tokenizer(settings["tokenizer"]) if settings.get("tokenizer") else None
    if enc is not None and enc.n_vocab > cfg.vocab_size:
        raise BridgeError(f"tokenizer {settings['tokenizer']} has ids up to {enc.n_vocab - 1}, beyond the model's vocab_size "
                          f"{cfg.vocab_size}: the checkpoint's config.json names the wrong tokenizer")
    problem = gguf and gguf_refusal(cfg, settings.get("tokenizer"))
    if problem:
        raise BridgeError(f"cannot write {gguf}: {problem}")
    eos, stops = end_tokens(enc) if enc else (None, [])
    config = hf_config(cfg, eos, enc._special_tokens.get("<|endoftext|>", eos) if enc else None) if out else None
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(settings))
    model.to_empty(device="cpu")
    load_weights(model, "nanooss", path)
    model.merge_lora()
    tensors = {}
    for n, p in model.named_parameters():  # a shared block is written once per use: an unrolled GptOss, exactly equal
        t = p.detach().contiguous()
        if n.startswith("layers."):
            block, rest = n.split(".", 2)[1:]
            tensors.update({hf_name(f"layers.{j}.{rest}"): t.clone() for j, b in enumerate(model.plan) if b == int(block)})
        else:
            tensors[hf_name(n)] = t
    if "lm_head.weight" not in tensors:  # tied: the output matrix is written anyway, as llama.cpp's gpt-oss requires it
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    if out:
        files = {"config.json": config, "generation_config.json": {"eos_token_id": stops or eos, "pad_token_id": config["pad_token_id"],
                                                                   "do_sample": True}}
        if enc is not None:
            files.update(tokenizer_files(enc, cfg.vocab_size))
        want = getattr(torch, dtype) if dtype not in ("", "auto") else None
        write_hf_dir(out, {k: t.to(want) if want else t for k, t in tensors.items()}, files)
    if gguf:
        write_gguf(tensors, cfg, enc, settings["tokenizer"], gguf, gguf_type)
    return out or gguf


def write_hf_dir(out, tensors, files):
    """tensors in safetensors shards under SHARD_BYTES (and their index), and files (name: JSON object, or text),
    into a temporary directory renamed to out when whole."""
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(os.path.abspath(out))}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers: ours to remove
    os.makedirs(tmp)
    files["config.json"]["dtype"] = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
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
    if len(shards) > 1:
        files["model.safetensors.index.json"] = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                                                 "weight_map": weight_map}
    for fname, obj in files.items():
        with open(os.path.join(tmp, fname), "w") as f:
            if isinstance(obj, str):  # chat_template.jinja
                f.write(obj)
            else:
                json.dump(obj, f, ensure_ascii=False)
    if os.path.exists(out):
        os.rmdir(out)  # empty, checked in export
    os.rename(tmp, out)


def main():
    from configurator import configure

    settings = configure(dict(SETTINGS))
    if not settings["ckpt"] or not (settings["out"] or settings["gguf"]):
        raise BridgeError("usage: python export_hf.py --ckpt=OUT_DIR_OR_CKPT --out=HF_DIR [--dtype=bfloat16] "
                          "and/or --gguf=FILE.gguf [--gguf_type=f16|bf16|q8_0|f32]")
    export(settings["ckpt"], settings["out"], settings["dtype"], settings["gguf"], settings["gguf_type"])
    if settings["out"]:
        print(f"wrote {settings['out']}: load it with transformers' AutoModelForCausalLM.from_pretrained({settings['out']!r})")
    if settings["gguf"]:
        size = os.path.getsize(settings["gguf"])
        print(f"wrote {settings['gguf']} ({size / 1e6:.1f} MB, {settings['gguf_type']}): run it with llama.cpp, e.g. "
              f"llama-completion -m {settings['gguf']} -no-cnv -p \"Once upon a time\"")


if __name__ == "__main__":
    from configurator import run

    run(main)
