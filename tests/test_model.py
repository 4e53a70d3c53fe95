"""model.py: the MoE and attention equal plain per-token references; counts and losses mean what they say."""
import copy
import math

import pytest
import torch

from generate import generate
from model import GPT, GPTConfig, MoE, attention, rope_tables, swiglu
from sizing import param_counts


def tiny(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8,
                n_expert=4, experts_per_token=2, intermediate_size=24, sliding_window=8)
    base.update(kw)
    return GPTConfig(**base)


def per_token_moe(moe, x):
    """The MoE written the slow, obvious way: each token, each of its k experts, one at a time."""
    ex = moe.experts
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = moe.router(x[t])
        top, idx = logits.topk(moe.k)
        w = top.softmax(-1)
        for j in range(moe.k):
            e = idx[j]
            h = swiglu(x[t] @ ex.gate_up_proj[e] + ex.gate_up_proj_bias[e], ex.alpha, ex.limit)
            out[t] = out[t] + w[j] * (h @ ex.down_proj[e] + ex.down_proj_bias[e])
    return out


def test_moe_matches_per_token_loop_values_and_gradients():
    torch.manual_seed(0)
    moe = MoE(tiny(swiglu_limit=0.3))  # a low limit so both clamps cut some values
    for p in moe.parameters():  # non-zero biases so every term is exercised; O(1) outputs for fp32
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(37, 32, requires_grad=True)
    h = x @ moe.experts.gate_up_proj[0]
    assert (h[:, ::2] > 0.3).any() and (h[:, 1::2].abs() > 0.3).any()
    y, aux, z, counts = moe(x)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *moe.parameters()], g)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref = per_token_moe(moe, x2)
    grads_ref = torch.autograd.grad(y_ref, [x2, *moe.parameters()], g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # dropless: every token reached exactly k experts
    assert counts.sum().item() == 37 * 2


def test_router_receives_gradients_from_lm_and_aux_loss():
    torch.manual_seed(0)
    moe = MoE(tiny())
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(16, 32)
    y, aux, z, _ = moe(x)
    (gy,) = torch.autograd.grad(y.square().sum(), moe.router.weight, retain_graph=True)
    (ga,) = torch.autograd.grad(aux, moe.router.weight)
    assert gy.abs().sum() > 0 and ga.abs().sum() > 0


def test_aux_loss_is_one_when_balanced_and_n_expert_at_collapse():
    E = 4
    moe = MoE(tiny(n_expert=E, experts_per_token=1))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.bias.zero_()
        moe.router.weight[:E, :E] = torch.eye(E) * 50  # token with one-hot feature e goes to expert e
    x = torch.zeros(8 * E, 32)
    x[torch.arange(8 * E), torch.arange(8 * E) % E] = 1.0  # equal numbers per expert, near one-hot probs
    _, aux, _, counts = moe(x)
    assert counts.tolist() == [8.0] * E
    assert abs(aux.item() - 1.0) < 1e-6
    x = torch.zeros(8 * E, 32)
    x[:, 2] = 1.0  # every token wants expert 2
    _, aux, _, counts = moe(x)
    assert counts.tolist() == [0.0, 0.0, 8.0 * E, 0.0]
    assert abs(aux.item() - E) < 1e-6


def test_z_loss_is_mean_squared_logsumexp():
    torch.manual_seed(0)
    moe = MoE(tiny())
    x = torch.randn(10, 32)
    _, _, z, _ = moe(x)
    ref = torch.logsumexp(moe.router(x), -1).square().mean()
    torch.testing.assert_close(z, ref)


def naive_attention(q, k, v, sinks, window):
    """Masked softmax written out, with the sink as an extra column that is dropped after the softmax."""
    B, H, T, D = q.shape
    s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
    i = torch.arange(T)
    keep = (i[:, None] >= i[None, :])
    if window is not None:
        keep &= (i[:, None] - i[None, :]) < window
    s = s.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)
    p = s.softmax(-1)
    if sinks is not None:
        p = p[..., :-1]
    return p @ v


@pytest.mark.parametrize("T,window", [(23, None), (23, 5), (1000, 128), (1000, None), (300, 128)])
@pytest.mark.parametrize("with_sinks", [True, False])
@pytest.mark.parametrize("kv_heads", [4, 2])
def test_attention_matches_naive_reference(T, window, with_sinks, kv_heads):
    """Values and gradients at 1e-5: full and sliding layers (block-local, T a multiple of the window or not),
    sinks on and off, GQA (2 kv heads for 4 query heads, never repeated in memory) and plain."""
    torch.manual_seed(0)
    B, H, D = 2, 4, 12  # D not a multiple of 8
    q = torch.randn(B, H, T, D, requires_grad=True)
    k, v = (torch.randn(B, kv_heads, T, D, requires_grad=True) for _ in range(2))
    sinks = torch.randn(H, requires_grad=True) if with_sinks else None
    g = torch.randn(B, H, T, D)
    leaves = [q, k, v] + ([sinks] if with_sinks else [])
    y = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sinks, window).transpose(1, 2)  # [B, T, heads, D]
    group = H // kv_heads
    y_ref = naive_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), sinks, window)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # its eager kernel, on purpose
@pytest.mark.parametrize("window", [128, None])
@pytest.mark.parametrize("with_sinks", [True, False])
def test_flex_path_with_sinks_through_the_lse_matches_naive_reference_on_cpu_with_flex_backward_check_lifted(
        window, with_sinks, monkeypatch):
    """The function attention() runs on CUDA when compiled (FlexAttention with a block mask, the sinks folded in as
    softmax(s) * sigmoid(lse - sink)), here on FlexAttention's eager kernel on the CPU: values and gradients (q, k, v,
    sinks) at 1e-5 against the [scores, sink] softmax in fp64; sliding (300 tokens: blocks of 128, the first beyond
    the last one's window) and full causal, GQA 4:2. torch refuses flex's backward on the CPU by a device check alone
    (its eager autograd is device-agnostic math): the check is lifted, as no GPU is here (the GPU check runs CUDA's)."""
    import torch.nn.attention.flex_attention as fa

    import model

    monkeypatch.setattr(fa, "_validate_device", lambda *a: None)
    torch.manual_seed(0)
    B, H, Hk, T, D = 2, 4, 2, 300, 16
    q = torch.randn(B, T, H, D, requires_grad=True)
    k, v = (torch.randn(B, T, Hk, D, requires_grad=True) for _ in range(2))
    sinks = torch.randn(H, requires_grad=True) if with_sinks else None
    leaves = [q, k, v] + ([sinks] if with_sinks else [])
    y = model.flex_attention_sinks(q, k, v, sinks, window, 1 / math.sqrt(D), True)
    q64, k64, v64 = (x.double().transpose(1, 2) for x in (q, k, v))  # naive_attention's [B, heads, T, D]
    y_ref = naive_attention(q64, k64.repeat_interleave(2, 1), v64.repeat_interleave(2, 1),
                            sinks.double() if with_sinks else None, window).transpose(1, 2)
    torch.testing.assert_close(y, y_ref.float(), atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g.double())):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_block_mask_is_built_once_per_shape_when_compiled_with_no_graph_break():
    """Compiled, the first call of a shape builds its block mask in the graph and keeps it; every later call reads
    that same mask (one recompile to do so), never builds one per layer or step, and nothing breaks the graph (a break
    would split every compiled block). On the CPU, forward only (flex has no CPU backward), dynamo's eager backend."""
    from torch._dynamo.utils import counters

    import model

    graphs = []
    f = torch.compile(model.flex_attention_sinks, backend=lambda gm, ex: graphs.append(gm) or gm.forward)
    torch._dynamo.reset()
    counters.clear()
    model._flex_masks.clear()
    q, k, v = torch.randn(1, 200, 4, 16), torch.randn(1, 200, 2, 16), torch.randn(1, 200, 2, 16)
    sinks = torch.randn(4)
    with torch.no_grad():
        y = f(q, k, v, sinks, 64, 0.25, True)
        mask = model._flex_masks[(200, 64, "cpu")]
        for _ in range(3):
            assert torch.equal(f(q, k, v, sinks, 64, 0.25, True), y)
    assert list(model._flex_masks) == [(200, 64, "cpu")] and model._flex_masks[(200, 64, "cpu")] is mask
    assert len(graphs) == 2 and not counters["graph_break"], (len(graphs), dict(counters["graph_break"]))


def test_the_sliding_masks_kept_for_reuse_are_at_most_eight():
    """block_mask keeps its masks for the shapes a run meets (building one costs about a sliding layer's attention),
    but no more than 8: generation or an eval at ever new shapes must not grow memory without end."""
    import model

    model._masks.clear()
    for B in range(1, 21):
        m = model.block_mask(B, 3, 4, True, "cpu")
        assert m.shape == (3 * B, 1, 4, 9)
    assert len(model._masks) == 8
    fresh = model.block_mask(1, 3, 4, True, "cpu")  # built again after it was dropped: the same mask
    assert torch.equal(fresh, model.block_mask(20, 3, 4, True, "cpu")[:3])


def test_sink_takes_probability_mass():
    # a huge sink soaks up all attention: the output goes to zero
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))  # [B, T, H, D]
    y = attention(q, k, v, torch.full((2,), 30.0), None)
    assert y.abs().max() < 1e-6


def test_layers_alternate_sliding_and_full():
    m = GPT(tiny(n_layer=4))
    assert [b.self_attn.window for b in m.layers] == [8, None, 8, None]


def test_yarn_keeps_high_frequencies_and_stretches_low_ones():
    plain = tiny(head_dim=64, rope_theta=150000.0)
    yarn = tiny(head_dim=64, rope_theta=150000.0, rope_scaling_factor=32.0, initial_context_length=4096)
    cos_p, _ = rope_tables(plain, 1000)
    cos_y, _ = rope_tables(yarn, 1000)
    conc = 0.1 * math.log(32.0) + 1.0
    torch.testing.assert_close(cos_y[:, 0], cos_p[:, 0] * conc)  # highest frequency: unchanged angle
    # lowest frequency: angle divided by the factor
    theta = torch.arange(1000.0) * (1.0 / 150000.0 ** (31 / 32)) / 32.0
    torch.testing.assert_close(cos_y[:, -1], theta.cos() * conc, atol=1e-5, rtol=1e-5)


def test_state_dict_names_map_onto_hf_gpt_oss():
    m = GPT(tiny())
    sd = m.state_dict()
    expected = {
        "embed_tokens.weight": (97, 32), "norm.weight": (32,), "lm_head.weight": (97, 32),  # untied
        "layers.0.input_layernorm.weight": (32,), "layers.0.post_attention_layernorm.weight": (32,),
        "layers.0.self_attn.q_proj.weight": (32, 32), "layers.0.self_attn.q_proj.bias": (32,),
        "layers.0.self_attn.k_proj.weight": (16, 32), "layers.0.self_attn.v_proj.bias": (16,),
        "layers.0.self_attn.o_proj.weight": (32, 32), "layers.0.self_attn.sinks": (4,),
        "layers.0.mlp.router.weight": (4, 32), "layers.0.mlp.router.bias": (4,),
        "layers.0.mlp.experts.gate_up_proj": (4, 32, 48), "layers.0.mlp.experts.gate_up_proj_bias": (4, 48),
        "layers.0.mlp.experts.down_proj": (4, 24, 32), "layers.0.mlp.experts.down_proj_bias": (4, 32),
    }
    for name, shape in expected.items():
        assert tuple(sd[name].shape) == shape, name


def test_tied_embeddings_are_one_parameter_even_after_to_empty():
    with torch.device("meta"):  # train.py builds on meta, then to_empty(): that used to untie shared tensors
        m = GPT(tiny(tie_embeddings=True))
    m.to_empty(device="cpu")
    m.init_weights()
    assert len(list(m.parameters())) == len(list(GPT(tiny()).parameters())) - 1
    assert "lm_head.weight" not in m.state_dict()
    idx = torch.randint(0, 10, (2, 16))  # only tokens 0..9 are looked up ...
    m(idx, idx)[1].backward()
    assert m.embed_tokens.weight.grad[10:].abs().sum() > 0  # ... yet every row gets a gradient: it is the head too


def test_forward_returns_loss_and_router_stats_and_generate_extends():
    torch.manual_seed(0)
    cfg = tiny()
    m = GPT(cfg)
    idx = torch.randint(0, 97, (2, 40))
    logits, loss, stats = m(idx, idx)
    assert logits.shape == (2, 40, 97)
    assert abs(loss.item() - math.log(97)) < 0.5  # near uniform at init
    assert stats["load"].shape == (2, 4) and stats["load"].sum().item() == 2 * 80 * 2
    assert 1.0 <= stats["aux"].item() <= 4.0
    out = generate(m, idx[:1, :5], 7, temperature=1.0, top_k=10)
    assert out.shape == (1, 12)


def test_activation_checkpointing_and_chunked_loss_change_memory_not_numbers():
    torch.manual_seed(0)
    m = GPT(tiny())
    idx = torch.randint(0, 97, (2, 64))
    grads = []
    for ac, chunk in ((False, 0), (True, 0), (False, 37), (True, 50)):  # chunks that do not divide 128 tokens
        m.activation_checkpointing = ac
        m.zero_grad()
        logits, loss, stats = m(idx, idx, loss_chunk=chunk)
        (loss + 0.01 * stats["aux"]).backward()
        assert (logits is None) == (chunk > 0)
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-6, atol=1e-6)
        for n in g:
            torch.testing.assert_close(g[n], grads[0][1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_biases_norms_and_sinks_start_at_zero_or_one_and_are_not_weight_decayed():
    import train

    torch.manual_seed(0)
    m = GPT(tiny())
    for name, p in m.named_parameters():
        if name.endswith("bias") or name.endswith("sinks"):
            assert torch.all(p == 0), name  # the experts' biases are 2-D [n_expert, width]: still biases
        elif name.endswith("norm.weight"):
            assert torch.all(p == 1), name
    decayed, rest = train.param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert {names[id(p)] for p in decayed["params"]} == {n for n, p in m.named_parameters()
                                                         if p.dim() >= 2 and not n.endswith("bias")}
    assert "layers.0.mlp.experts.gate_up_proj_bias" in {names[id(p)] for p in rest["params"]} and rest["weight_decay"] == 0


@pytest.mark.parametrize("ctx", [64, 150, 4096])
def test_yarn_matches_hf_even_from_a_short_initial_context(ctx):
    """Below ~201 tokens of initial context the correction range starts below dimension 0: HF clamps it."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = tiny(head_dim=64, rope_theta=150000.0, rope_scaling_factor=32.0, initial_context_length=ctx)
    hc = transformers.GptOssConfig(head_dim=64, hidden_size=64, num_attention_heads=1, max_position_embeddings=32 * ctx,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                                                    "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                                                    "original_max_position_embeddings": ctx})
    inv_freq, scale = ROPE_INIT_FUNCTIONS["yarn"](hc, "cpu")
    angles = torch.outer(torch.arange(300.0), inv_freq)
    cos, sin = rope_tables(cfg, 300)
    torch.testing.assert_close(cos, angles.cos() * scale, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sin, angles.sin() * scale, atol=1e-6, rtol=1e-6)


def test_expert_loop_matches_grouped_mm_with_one_host_sync_per_layer(monkeypatch):
    """MPS and fp32 CUDA run the experts in a loop that needs the group sizes on the host: one sync, not two."""
    import model

    torch.manual_seed(0)
    moe = MoE(tiny())
    for p in moe.parameters():
        torch.nn.init.normal_(p, 0, 0.1)
    x = torch.randn(37, 32)
    kernel = moe(x)[0]
    monkeypatch.setattr(model, "use_grouped_mm", lambda x: False)
    calls, tolist = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or tolist(t))
    loop = moe(x)[0]
    torch.testing.assert_close(loop, kernel, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1


def recorded_steps(monkeypatch):
    """generate.py's prefill and one-token step, wrapped: [(kind, its cache, the logits [B, vocab] of the token it
    gives)] for every token that generate picks, in order."""
    import generate as gen

    seen = []
    for name in ("prefill", "decode_step"):
        def wrapped(model, ids, cache, fn=getattr(gen, name), name=name):
            logits = fn(model, ids, cache)
            seen.append((name if name == "decode_step" else ids.shape[1], cache, logits[:, -1].float().clone()))
            return logits
        monkeypatch.setattr(gen, name, wrapped)
    return seen


def rerun_logits(model, tokens, n, start=lambda length: 0):
    """The logits [B, vocab] behind the last n of tokens [B, T], each from a forward over its context alone (no
    cache), the context starting at start(its length)."""
    with torch.no_grad():
        return [model(tokens[:, start(t):t])[0][:, -1] for t in range(tokens.shape[1] - n, tokens.shape[1])]


@pytest.mark.parametrize("sinks", [True, False])
def test_static_kv_cache_generates_the_tokens_and_logits_of_rerunning_the_context(monkeypatch, sinks):
    """A prompt longer than the sliding window, sinks non-zero (or none): greedy decoding with the static cache equals
    rerunning the whole context each step, token for token, and each step's logits agree within 1e-5. The cache is
    allocated once: the full layers' buffers hold the whole text, the sliding layers' only their window (a ring)."""
    torch.manual_seed(0)
    m = GPT(tiny(block_size=128, sliding_window=8, n_layer=4, sinks=sinks)).eval()
    with torch.no_grad():
        for b in m.layers:
            if sinks:
                b.self_attn.sinks.normal_(0, 1.0)
    prompt = torch.randint(0, 97, (2, 30))
    steps = recorded_steps(monkeypatch)
    cached = generate(m, prompt, 40, temperature=0)
    assert torch.equal(cached, generate(m, prompt, 40, temperature=0, use_cache=False))
    assert [kind for kind, _, _ in steps] == [30] + ["decode_step"] * 39
    for (_, _, got), want in zip(steps, rerun_logits(m, cached, 40)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    cache = steps[0][1]
    assert all(c is cache for _, c, _ in steps)
    assert [c.keys.shape[2] for c in cache] == [8 if m.cfg.layer_is_sliding(i) else 70 for i in range(4)]  # slots


def test_yarn_model_generates_past_its_block_size_with_the_cache(monkeypatch):
    """Past block_size (32) and within the YaRN reach (128): the reference for each token is one prefill over the whole
    sequence with the cache on (an uncached forward stops at block_size)."""
    from generate import new_cache, prefill

    torch.manual_seed(0)
    m = GPT(tiny(block_size=32, rope_scaling_factor=4.0, initial_context_length=32)).eval()
    steps = recorded_steps(monkeypatch)
    out = generate(m, torch.randint(0, 97, (1, 20)), 60, temperature=0)
    assert out.shape == (1, 80)  # 80 positions: past block_size 32, within the YaRN reach of 128
    with torch.no_grad():
        for t, (_, _, got) in zip(range(20, 80), steps):
            want = prefill(m, out[:, :t], new_cache(m, 1, t))[:, -1]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert out[0, t] == want.argmax()


def test_past_the_rope_reach_the_static_cache_cuts_the_context_to_its_last_half_and_prefills_again(monkeypatch):
    """Plain RoPE reaches block_size (32): when the text fills it, the last 16 tokens are prefilled again at positions
    0..15, and the tokens that follow are those of rerunning that cut context."""
    torch.manual_seed(0)
    m = GPT(tiny(block_size=32)).eval()
    steps = recorded_steps(monkeypatch)
    out = generate(m, torch.randint(0, 97, (1, 20)), 40, temperature=0)
    assert [kind for kind, _, _ in steps if kind != "decode_step"] == [20, 16, 16]  # at 33 and 50 tokens

    def start(length):  # where generation's context begins when it picks token number `length`
        s = 0
        for t in range(20, length + 1):
            s = t - 16 if t - s > 32 else s
        return s
    for t, (_, _, got), want in zip(range(20, 60), steps, rerun_logits(m, out, 40, start)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert out[0, t] == want.argmax()


def lora_pair(**kw):
    """A base model and the same model with adapters on every target (rank 8), sharing the base weights."""
    torch.manual_seed(0)
    base = GPT(tiny(swiglu_limit=0.5))
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.2)
    lora = GPT(tiny(swiglu_limit=0.5, lora_rank=8, lora_targets="q,k,v,o,experts,router", **kw))
    missing, unexpected = lora.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all("lora_" in k for k in missing)
    return base, lora


def test_fresh_lora_adapters_leave_the_logits_of_the_base_exactly():
    base, lora = lora_pair()
    idx = torch.randint(0, 97, (2, 40))
    assert torch.equal(lora(idx, idx)[0], base(idx, idx)[0])
    n = param_counts(lora.cfg)
    assert sum(p.numel() for p in lora.parameters()) == n["total"] and n["lora"] == sum(
        p.numel() for name, p in lora.named_parameters() if "lora_" in name)


def test_merged_adapters_give_the_adapter_model_logits_and_only_adapters_get_gradients():
    base, lora = lora_pair()
    lora.requires_grad_(False)
    adapters = [p for name, p in lora.named_parameters() if "lora_" in name]
    for p in adapters:
        p.requires_grad_(True)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    idx = torch.randint(0, 97, (2, 40))
    logits, loss, _ = lora(idx, idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters)
    assert all(p.grad is None for name, p in lora.named_parameters() if "lora_" not in name)
    with torch.no_grad():
        merged = lora.merge_lora()(idx, idx)[0]
    torch.testing.assert_close(merged, logits.detach(), atol=1e-5, rtol=1e-5)
    assert lora.cfg.lora_rank == 0 and not any("lora_" in k for k in lora.state_dict())  # a plain model's names


def test_a_bf16_base_gives_the_gradients_of_its_rounded_weights_and_keeps_no_fp32_copy_for_the_backward():
    """train.py's base_dtype=bfloat16: the frozen layers' matrices sit in bf16 and fp32 compute casts them on
    use (model.FrozenMatmul); the adapters must learn exactly as on an fp32 base holding the same rounded
    values, and the backward must not keep fp32 copies of the weights (that would undo the saving)."""
    _, half = lora_pair()
    with torch.no_grad():
        for name, p in half.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    full = copy.deepcopy(half)
    for m in (half, full):
        for name, p in m.named_parameters():
            p.requires_grad_("lora_" in name)
    cast = 0
    for (name, p), q in zip(half.layers.named_parameters(), full.layers.parameters()):
        if p.dim() >= 2 and not p.requires_grad and not name.endswith("bias"):
            p.data = p.data.to(torch.bfloat16)
            q.data = p.data.float()
            cast += 1
    assert cast == 2 * (4 + 1 + 2)  # per layer: q, k, v, o, the router, the experts' two stacks

    def saved_bytes(model):
        params = {p.data_ptr() for p in model.parameters()}
        total = 0

        def pack(t):
            nonlocal total
            total += 0 if t.data_ptr() in params else t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            _, loss, _ = model(idx, idx)
        loss.backward()
        return loss, total

    idx = torch.randint(0, 97, (2, 40))
    (loss_h, saved_h), (loss_f, saved_f) = saved_bytes(half), saved_bytes(full)
    assert torch.equal(loss_h, loss_f)
    for (name, p), q in zip(half.named_parameters(), full.parameters()):
        if "lora_" in name:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
    assert saved_h <= saved_f


def test_rope_gradient_is_the_rotation_back():
    """model.Rope computes its own backward (the inverse rotation): checked against finite differences."""
    from model import apply_rope

    cos, sin = rope_tables(tiny(head_dim=8), 5)
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    c, s = cos.double().unsqueeze(1), sin.double().unsqueeze(1)
    assert torch.autograd.gradcheck(lambda t: apply_rope(t, c, s), (x,))
