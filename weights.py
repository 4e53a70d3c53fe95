"""
Weights in, from wherever they come: a nanoOSS checkpoint (any number of processes wrote it, a fine-tune's adapters
on top of its base) or a Hugging Face GptOss directory (bf16, or MXFP4 experts dequantized on load), for train.py's
init_from, sample.py and export_hf.py. Our parameter names are HF GptOssForCausalLM's without the "model." prefix,
and the layouts are the same (experts stacked as [n_expert, in, out], gate and up interleaved), so reading HF is a
rename: a table you can read in one screen, as nanoGPT's from_pretrained is. Weights are read tensor by tensor from
safetensors into a model built on the meta device (under FSDP, each rank reads only its own shard), so loading needs
about the model's size, not twice it. Also here: the fingerprint that ties a fine-tune to its base.
"""
import glob
import json
import os

import torch

import checkpoint
from configurator import BadInput
from model import GPT, GPTConfig


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


class BridgeError(BadInput):
    """A directory or setting that cannot cross; the message is one line naming the file and the fix."""


def hf_name(name):
    return name if name.startswith("lm_head") else "model." + name


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
    settings, kind, path = base_settings(config["init_from"])
    settings = {k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()}  # JSON has lists, settings tuples
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


def load_model(path, dev="cpu", dt=torch.float32):
    """(model, settings) from a nanoOSS checkpoint or an HF GptOss directory: built on the meta device, so no
    random weights are ever made, then filled from disk tensor by tensor and cast to dt."""
    settings, kind, path = base_settings(path)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(settings))
    model.to_empty(device=dev)
    model.init_weights()  # only the RoPE tables: every parameter is overwritten next
    load_weights(model, kind, path)  # a fine-tune: its base, then its adapters
    return model.merge_lora().to(dt).eval(), {**settings, "kind": kind}
