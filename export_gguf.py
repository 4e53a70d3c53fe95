"""
The way into llama.cpp (and what else reads GGUF: LM Studio, Ollama): a nanoOSS model as one GGUF file, written
with `gguf`, ggml's own writer. export_hf.py calls it:
    python export_hf.py --ckpt=out/mac_micro --gguf=mac_micro.gguf [--gguf_type=f16|bf16|q8_0|f32] [--out=hf/mac_micro]
Tensor names, layouts and metadata keys are the gpt-oss architecture's as llama.cpp reads them (its
src/models/openai-moe.cpp and llama-model.cpp's load_hparams), and only keys it reads are written. Its gpt-oss
graph has some of gpt-oss's settings built in: a model that it would compute as another function is refused in
one line naming the setting, never written.
Kept in its own file beside export_hf.py so that the HF side stays one screen of names and this one the other.
"""
import os
from dataclasses import replace

import gguf
import numpy as np
import torch

from data_loader import HARMONY_TEMPLATE, end_tokens, is_harmony, vocab_table
from weights import BridgeError

# llama.cpp's pre-tokenizer for each tiktoken encoding (llama-vocab.cpp): the regex that splits text before BPE.
# Its converter finds the name by hashing the ids of a test string, which a cut vocabulary (o200k_base:N) changes;
# the split is the same, so a cut vocabulary keeps its base's name
PRE_TOKENIZER = {"o200k_base": "gpt-4o", "o200k_harmony": "gpt-4o", "cl100k_base": "dbrx",  # dbrx: cl100k's split
                 "gpt2": "gpt-2", "r50k_base": "gpt-2", "p50k_base": "gpt-2", "p50k_edit": "gpt-2"}
Q, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
# --gguf_type (the names of llama.cpp's converter's --outtype) -> (the matrices' type, the file's type); gguf
# quantizes q8_0 in Python
GGUF_TYPES = {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
              "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}
# our (HF) names within a layer -> llama.cpp's, from gguf's own table (the experts are split and transposed below)
T = gguf.MODEL_TENSOR
LAYER_NAMES = {"input_layernorm.weight": (T.ATTN_NORM, "weight"),
               "post_attention_layernorm.weight": (T.ATTN_POST_NORM, "weight"),
               **{f"self_attn.{p}_proj.{w}": (kind, w) for p, kind in zip("qkvo", (T.ATTN_Q, T.ATTN_K, T.ATTN_V, T.ATTN_OUT))
                  for w in ("weight", "bias")},
               "self_attn.sinks": (T.ATTN_SINKS, "weight"), "mlp.router.weight": (T.FFN_GATE_INP, "weight"),
               "mlp.router.bias": (T.FFN_GATE_INP, "bias")}


def tensor_name(kind, suffix, layer=None):
    """llama.cpp's name for a tensor: blk.0.attn_q.weight, token_embd.weight, ..."""
    return f"{gguf.TENSOR_NAMES[kind].format(bid=layer)}.{suffix}"


def gguf_refusal(cfg, tokenizer):
    """Why llama.cpp would compute something other than our model, in one line naming the setting; None if it would
    not. llama.cpp's gpt-oss graph has SwiGLU's constants built in, always adds attention sinks, reads no YaRN beta
    (it uses 32 and 1) and always rounds YaRN's correction range to whole dimensions (our rope_truncate=True)."""
    from model import rope_tables

    if cfg.mor_router != "none":
        return (f"mor_router={cfg.mor_router}: llama.cpp runs every token through every layer, this model routes "
                "tokens through its recursion steps; only recursion without routing exports")
    if not cfg.sinks:
        return "sinks=False: llama.cpp's gpt-oss graph always adds attention sinks; GGUF cannot say there are none"
    if (cfg.swiglu_alpha, cfg.swiglu_limit) != (1.702, 7.0):
        return (f"swiglu_alpha={cfg.swiglu_alpha}, swiglu_limit={cfg.swiglu_limit}: llama.cpp's gpt-oss SwiGLU has "
                "alpha 1.702 and limit 7.0 built in")
    if cfg.rope_scaling_factor > 1.0:
        if (cfg.rope_ntk_beta, cfg.rope_ntk_alpha) != (32.0, 1.0):
            return (f"rope_ntk_beta={cfg.rope_ntk_beta}, rope_ntk_alpha={cfg.rope_ntk_alpha}: llama.cpp reads no YaRN "
                    "beta for gpt-oss and uses 32 and 1")
        rounded = replace(cfg, rope_truncate=True)
        if not torch.equal(rope_tables(cfg, 2)[1], rope_tables(rounded, 2)[1]):  # position 1's angles: the frequencies
            return ("rope_truncate=False: llama.cpp always rounds YaRN's correction range to whole dimensions, "
                    "which changes this model's frequencies")
    if not tokenizer:
        return "the checkpoint's config.json names no tokenizer, and a GGUF carries its tokenizer"
    if tokenizer.partition(":")[0] not in PRE_TOKENIZER:
        return (f"tokenizer {tokenizer!r}: a GGUF carries its tokenizer and llama.cpp splits text as one of "
                f"{', '.join(PRE_TOKENIZER)}")
    return None


def gguf_tensors(tensors, n_layer):
    """(name, fp32 tensor) in llama.cpp's gpt-oss names and layouts from our unrolled (HF) tensors, lm_head.weight
    included (a tied model's too). Experts: our gate_up_proj [E, d, 2I] (gate and up interleaved) -> ffn_gate_exps
    and ffn_up_exps [E, I, d]; down_proj [E, I, d] -> ffn_down_exps [E, d, I]. Shapes in torch's order, the
    reverse of ggml's."""
    t = lambda name: tensors[name].detach().to(torch.float32)
    yield tensor_name(T.TOKEN_EMBD, "weight"), t("model.embed_tokens.weight")
    yield tensor_name(T.OUTPUT_NORM, "weight"), t("model.norm.weight")
    yield tensor_name(T.OUTPUT, "weight"), t("lm_head.weight")
    for i in range(n_layer):
        p = f"model.layers.{i}."
        for ours, (kind, suffix) in LAYER_NAMES.items():
            yield tensor_name(kind, suffix, i), t(p + ours)
        gate_up, bias = t(p + "mlp.experts.gate_up_proj"), t(p + "mlp.experts.gate_up_proj_bias")
        yield tensor_name(T.FFN_GATE_EXP, "weight", i), gate_up[..., ::2].transpose(1, 2)
        yield tensor_name(T.FFN_UP_EXP, "weight", i), gate_up[..., 1::2].transpose(1, 2)
        yield tensor_name(T.FFN_DOWN_EXP, "weight", i), t(p + "mlp.experts.down_proj").transpose(1, 2)
        yield tensor_name(T.FFN_GATE_EXP, "bias", i), bias[:, ::2]
        yield tensor_name(T.FFN_UP_EXP, "bias", i), bias[:, 1::2]
        yield tensor_name(T.FFN_DOWN_EXP, "bias", i), t(p + "mlp.experts.down_proj_bias")


def write_gguf(tensors, cfg, enc, tokenizer, path, gguf_type="f16"):
    """Our unrolled (HF-named) tensors of a plain model, its config and tiktoken Encoding -> a GGUF at path, written
    under a temporary name and renamed when whole. gguf_type: f32, f16, bf16 or q8_0 for the matrices; norms,
    biases, sinks and the router stay f32, as llama.cpp's converter keeps them. Returns the file's size in bytes."""
    qtype, ftype = GGUF_TYPES[gguf_type]
    plan = cfg.schedule()[0]
    w = gguf.GGUFWriter(path + ".tmp", "gpt-oss")
    w.add_name("nanoOSS")
    w.add_file_type(ftype)
    yarn = cfg.rope_scaling_factor > 1.0
    w.add_context_length(int(cfg.initial_context_length * cfg.rope_scaling_factor) if yarn else cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(len(plan))
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_expert)
    w.add_expert_used_count(cfg.experts_per_token)
    w.add_expert_feed_forward_length(cfg.intermediate_size)
    w.add_sliding_window(cfg.sliding_window)
    w.add_sliding_window_pattern([cfg.layer_is_sliding(b) for b in plan])  # per layer, so any attn_pattern holds
    w.add_rope_freq_base(cfg.rope_theta)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(cfg.rope_scaling_factor)
        w.add_rope_scaling_orig_ctx_len(cfg.initial_context_length)
    names, kinds, merges = vocab_table(enc, cfg.vocab_size)
    kind = {"normal": gguf.TokenType.NORMAL, "special": gguf.TokenType.CONTROL, "unused": gguf.TokenType.UNUSED}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER[tokenizer.partition(":")[0]])
    w.add_token_list(names)
    w.add_token_types([kind[k] for k in kinds])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    eos, _ = end_tokens(enc)  # llama.cpp finds the other ends of a generation by their text (<|end|>, <|call|>, ...)
    w.add_bos_token_id(enc._special_tokens.get("<|startoftext|>", eos))
    w.add_eos_token_id(eos)
    w.add_pad_token_id(enc._special_tokens.get("<|endoftext|>", eos))
    w.add_add_bos_token(False)  # prompts are text as tiktoken encodes it, as in sample.py
    w.add_add_eos_token(False)
    if is_harmony(enc):
        w.add_chat_template(HARMONY_TEMPLATE)
    routers = {tensor_name(T.FFN_GATE_INP, "weight", i) for i in range(len(plan))}
    for name, t in gguf_tensors(tensors, len(plan)):
        want = qtype if name.endswith(".weight") and t.dim() >= 2 and name not in routers else Q.F32
        if want == Q.Q8_0 and t.shape[-1] % 32:
            want = Q.F16  # Q8_0 packs rows in blocks of 32; the converter falls back the same way
        w.add_tensor(name, gguf.quants.quantize(np.ascontiguousarray(t.numpy()), want), raw_dtype=want)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(path + ".tmp", path)
    except BaseException:
        w.close()
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise
    return os.path.getsize(path)


def check_gguf_target(path, gguf_type):
    """One line for a --gguf or --gguf_type that cannot be written, before anything is read or built."""
    if gguf_type not in GGUF_TYPES:
        raise BridgeError(f"--gguf_type={gguf_type}: use one of {', '.join(GGUF_TYPES)}")
    if os.path.exists(path):
        raise BridgeError(f"{path} exists: choose a new --gguf (nothing is written over)")
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise BridgeError(f"--gguf={path}: its folder does not exist")
