"""
The bridge to Hugging Face transformers, both ways, and the way out to llama.cpp.
    python export_hf.py --ckpt=out/mac_micro --out=hf/mac_micro      # a nanoOSS checkpoint -> an HF GptOss directory
    python export_hf.py --ckpt=out/mac_micro --gguf=micro.gguf       # -> a GGUF file for llama.cpp (export_gguf.py)
    python train.py ... --init_from=path/to/gpt-oss-20b              # train.py and sample.py read HF directories with
    python sample.py --init_from=path/to/gpt-oss-20b                 # the functions below
Our parameter names are HF GptOssForCausalLM's without the "model." prefix, and the layouts are the same
(experts stacked as [n_expert, in, out], gate and up interleaved), so crossing is a rename: a table you can
read in one screen, as nanoGPT's from_pretrained is. Experts stored as MXFP4 (the released gpt-oss-20b/120b)
are dequantized on load. Weights are read tensor by tensor from safetensors into a model built on the meta
device (under FSDP, each rank reads only its own shard), so loading needs about the model's size, not twice it.
"""
import glob
import json
import os
import shutil

import torch

from configurator import BadInput

# the export's settings (--key=value): dtype auto keeps the checkpoint's (fp32 after training), or bfloat16, ...
# dtype: the HF weights as stored (fp32 after training), or bfloat16; gguf_type: the GGUF's matrices
SETTINGS = {"ckpt": "", "out": "", "dtype": "auto", "gguf": "", "gguf_type": "f16"}

# HF config fields that do not change the math of a forward pass, read or ignored as noted
HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype",  # bookkeeping
    "output_router_logits", "router_aux_loss_coef", "use_cache",  # training and generation options
    "quantization_config",  # MXFP4 tensors are recognised by their names (*_blocks, *_scales) and dequantized
    "eos_token_id", "pad_token_id", "bos_token_id",  # the tokenizer's business
    "initializer_range", "attention_dropout", "max_position_embeddings",  # init, dropout 0, a limit not a weight
    "hidden_act", "attention_bias", "initial_context_length", "experts_per_token",  # checked or read below
}
FP4_VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
SHARD_BYTES = 5 * 10**9  # safetensors files under 5 GB, as transformers writes them


class BridgeError(BadInput):
    """A directory or setting that cannot cross; the message is one line naming the file and the fix."""


# ----------------------------------------------------------------------------- configs

def config_from_hf(path):
    """Our GPTConfig settings from an HF GptOss config.json. A field that would change the math and that we
    do not support is refused, never silently dropped."""
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, ValueError) as e:
        raise BridgeError(f"{path}: cannot read ({type(e).__name__}): not an HF model directory?")
    if hf.get("model_type") != "gpt_oss":
        raise BridgeError(f"{path}: model_type {hf.get('model_type')!r} is not gpt_oss: only GptOss weights load here")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("attention_bias", True) is not True or hf.get("attention_dropout", 0.0):
        raise BridgeError(f"{path}: hidden_act, attention_bias or attention_dropout differ from gpt-oss's: not supported")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "yarn") or rope.get("partial_rotary_factor", 1.0) != 1.0 or rope.get("attention_factor") \
            or rope.get("mscale") or rope.get("mscale_all_dim"):
        raise BridgeError(f"{path}: rope settings {rope} are not plain RoPE or gpt-oss's YaRN: not supported")
    types = hf.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(hf["num_hidden_layers"])]
    if set(types) - {"sliding_attention", "full_attention"}:
        raise BridgeError(f"{path}: layer_types {sorted(set(types))} has a kind other than sliding_attention / full_attention")
    out = dict(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_embd=hf["hidden_size"],
               n_head=hf["num_attention_heads"], n_kv_head=hf["num_key_value_heads"],
               head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
               n_expert=hf["num_local_experts"], experts_per_token=hf.get("num_experts_per_tok", hf.get("experts_per_token")),
               intermediate_size=hf["intermediate_size"], sliding_window=hf.get("sliding_window") or 128,
               attn_pattern="".join("S" if t == "sliding_attention" else "F" for t in types), sinks=True,
               swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
               rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 150000.0))),
               tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    if rope_type == "yarn":
        out.update(rope_scaling_factor=float(rope["factor"]), rope_ntk_beta=float(rope.get("beta_fast") or 32.0),
                   rope_ntk_alpha=float(rope.get("beta_slow") or 1.0),
                   initial_context_length=int(rope.get("original_max_position_embeddings", hf.get("initial_context_length", 4096))),
                   rope_truncate=bool(rope.get("truncate", True)))  # HF reads a missing truncate as true
    known = HF_IGNORED | {"vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                          "head_dim", "num_local_experts", "num_experts_per_tok", "intermediate_size", "sliding_window",
                          "layer_types", "swiglu_limit", "swiglu_alpha", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
                          "tie_word_embeddings"}
    unknown = sorted(k for k in hf if k not in known and not k.startswith("_"))
    if unknown:
        raise BridgeError(f"{path}: unknown field(s) {', '.join(unknown)}: they may change the math; not supported")
    return out


def hf_config(cfg, eos=None, pad=None):
    """The HF config.json of our model, every setting explicit: transformers never falls back to its defaults
    (which differ: a missing YaRN truncate reads as true, a missing layer_types as a pattern of its own)."""
    if cfg.mor_router != "none":
        raise BridgeError("this model routes tokens through its recursion steps (mor_router "
                          f"{cfg.mor_router}), which GptOss cannot represent: only recursion without routing exports")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    reach = cfg.block_size
    if cfg.rope_scaling_factor > 1.0:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_scaling_factor,
                "beta_fast": cfg.rope_ntk_beta, "beta_slow": cfg.rope_ntk_alpha, "truncate": cfg.rope_truncate,
                "original_max_position_embeddings": cfg.initial_context_length}
        reach = int(cfg.initial_context_length * cfg.rope_scaling_factor)
    return {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
            "num_key_value_heads": cfg.n_kv_head, "head_dim": cfg.head_dim, "num_local_experts": cfg.n_expert,
            "num_experts_per_tok": cfg.experts_per_token, "experts_per_token": cfg.experts_per_token,
            "intermediate_size": cfg.intermediate_size, "sliding_window": cfg.sliding_window,
            "layer_types": ["sliding_attention" if cfg.layer_is_sliding(i) else "full_attention" for i in cfg.schedule()[0]],
            "swiglu_limit": cfg.swiglu_limit, "swiglu_alpha": cfg.swiglu_alpha, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "rope_parameters": rope, "rope_scaling": rope if rope["rope_type"] == "yarn" else None,
            "max_position_embeddings": reach, "initial_context_length": cfg.initial_context_length,
            "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": True, "attention_dropout": 0.0,
            "hidden_act": "silu", "initializer_range": cfg.init_std, "use_cache": True, "output_router_logits": False,
            "router_aux_loss_coef": 0.9, "eos_token_id": eos, "pad_token_id": pad, "dtype": "float32"}


# ----------------------------------------------------------------------------- weights

def hf_name(name):
    return name if name.startswith("lm_head") else "model." + name


def mxfp4_dequantize(blocks, scales, dtype=torch.float32):
    """MXFP4 experts ([E, out, in/32, 16] uint8 blocks, two 4-bit e2m1 values a byte, low nibble first; [E, out,
    in/32] uint8 scales, powers of two biased by 127) -> [E, in, out] in dtype: our (and HF's) layout."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack([lut[(blocks & 0x0F).long()], lut[(blocks >> 4).long()]], dim=-1).flatten(-2)  # [..., G, 32]
    vals = torch.ldexp(vals, scales.to(torch.int32).unsqueeze(-1) - 127)
    return vals.flatten(-2).transpose(1, 2).to(dtype)


def weight_index(hf_dir):
    """{tensor name: safetensors file} of an HF directory (one model.safetensors or shards with an index)."""
    index = os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = {k: os.path.join(hf_dir, v) for k, v in json.load(f)["weight_map"].items()}
    elif os.path.exists(os.path.join(hf_dir, "model.safetensors")):
        from safetensors import safe_open

        with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
            files = {k: os.path.join(hf_dir, "model.safetensors") for k in f.keys()}
    else:
        raise BridgeError(f"{hf_dir} has no model.safetensors nor model.safetensors.index.json")
    for path in sorted(set(files.values())):
        if not os.path.exists(path):
            raise BridgeError(f"{path} is missing (named in {index}): download it again")
    return files


def local_slice(p):
    """The index into the full tensor that this process holds of parameter p (all of it, or its FSDP shard)."""
    if not hasattr(p, "device_mesh"):
        return tuple(slice(0, n) for n in p.shape)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + n) for o, n in zip(offset, shape))


@torch.no_grad()
def load_hf_weights(model, hf_dir):
    """Every parameter of model (built on meta, then to_empty) from the safetensors of hf_dir, one tensor at a
    time, only this process's part of it."""
    from safetensors import safe_open

    files = weight_index(hf_dir)
    handles = {}

    def read(name, index):
        path = files[name]
        if path not in handles:
            handles[path] = safe_open(path, "pt")
        return handles[path].get_slice(name)[index]

    for name, p in model.named_parameters():
        if "lora_" in name:  # adapters are not the base's: they start fresh (or come from a fine-tune's checkpoint)
            continue
        key, index = hf_name(name), local_slice(p)
        if key in files:
            t = read(key, index)
        elif key + "_blocks" in files:  # MXFP4 experts: [E, out, in/32, 16]; our shard splits experts (dim 0) only
            t = mxfp4_dequantize(read(key + "_blocks", index[:1]), read(key + "_scales", index[:1]))[index]
        else:
            raise BridgeError(f"{hf_dir} has no tensor {key} (nor {key}_blocks): not this model's weights, or a shard is missing")
        dest = p.to_local() if hasattr(p, "to_local") else p
        if tuple(t.shape) != tuple(dest.shape):
            raise BridgeError(f"{files.get(key, files.get(key + '_blocks'))}: {key} has shape {tuple(t.shape)}, the model wants {tuple(dest.shape)}")
        dest.copy_(t.to(dest.dtype))


def is_hf_dir(path):
    return os.path.isdir(path) and os.path.exists(os.path.join(path, "config.json")) and (
        glob.glob(os.path.join(path, "*.safetensors")) or os.path.exists(os.path.join(path, "model.safetensors.index.json")))


def base_settings(init_from):
    """(our model settings, where they came from) for an init_from path: an HF directory, a nanoOSS checkpoint
    directory, or an out_dir whose latest names one."""
    import checkpoint

    if is_hf_dir(init_from):
        settings = config_from_hf(os.path.join(init_from, "config.json"))
        weight_index(init_from)  # every shard is there: checked before anything is built or written
        return settings, "hf", init_from
    path = init_from
    if not os.path.exists(os.path.join(path, ".metadata")) and checkpoint.read_latest(path):
        path = os.path.join(path, checkpoint.read_latest(path))
    problem = checkpoint.verify(path)
    if problem:
        raise BridgeError(f"init_from {init_from}: not an HF GptOss directory nor a complete nanoOSS checkpoint ({problem})")
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f), "nanooss", path


def adopt_base(config):
    """A run with init_from is the model its weights belong to: the base's model settings replace the config's
    (not block_size, the context trained at, nor lora_*, the adapters). Updates config; returns (the settings
    that changed, kind, path). train.py and safe_train.py's estimate both see the model this way."""
    from model import GPTConfig

    settings, kind, path = base_settings(config["init_from"])
    changed = {k: settings[k] for k in GPTConfig.__dataclass_fields__ if k in settings and settings[k] != config.get(k)
               and k != "block_size" and not k.startswith("lora_")}
    config.update(changed)
    return changed, kind, path


def fingerprint(kind, path):
    """A cheap identity of base weights, so that a fine-tune refuses a base that changed under it: the file
    names and sizes, the safetensors headers (or DCP's metadata and the save time), and the first MB of every
    file's data. Not a hash of the tensors: reading 40 GB to check a base would take minutes."""
    import hashlib

    h = hashlib.sha256()
    files = sorted(set(weight_index(path).values())) if kind == "hf" else sorted(
        glob.glob(os.path.join(path, "*.distcp")) + [os.path.join(path, ".metadata"), os.path.join(path, "config.json")])
    for name in files:
        h.update(f"{os.path.basename(name)}:{os.path.getsize(name)}".encode())
        with open(name, "rb") as f:
            h.update(f.read(2**20 + (int.from_bytes(f.read(8), "little") if kind == "hf" else 0)))
    return h.hexdigest()[:16]


@torch.no_grad()
def load_weights(model, kind, path):
    """Weights only, into a model whose parameters exist (on a device, possibly FSDP-sharded)."""
    if kind == "hf":
        return load_hf_weights(model, path)
    import checkpoint
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    with open(os.path.join(path, "config.json")) as f:
        saved = json.load(f)
    adapters = bool(saved.get("lora_rank") and saved.get("base"))
    if adapters:  # a fine-tune's checkpoint holds its adapters only: the base it names comes first
        load_weights(model, saved["base"]["kind"], saved["base"]["path"])
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if ("lora_" in k) == adapters}}
    try:
        checkpoint.load(state, path)
    except checkpoint.CheckpointError as e:  # a damaged file, named: an older checkpoint is the way out
        raise BridgeError(f"{e}: use an older checkpoint (another ckpt_<iter> folder)")
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))


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
