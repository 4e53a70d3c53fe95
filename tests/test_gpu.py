"""What a CUDA GPU must agree with: fp32 logits equal the CPU's, KV-cache decoding gives the tokens of rerunning the
context, a compiled model gives the eager model's loss and gradients, decoding compiled into CUDA graphs the eager
logits. They skip without CUDA; on a GPU,
`python bench/gpu_check.py` runs them (`python -m pytest -q -m cuda tests`)."""
import pytest
import torch

from generate import generate
from model import GPT, GPTConfig

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.py)")]

# 4 layers: sliding and full attention both, at 300 tokens past the window of 64
SHAPE = dict(vocab_size=4096, block_size=512, n_layer=4, n_embd=256, n_head=4, n_kv_head=2, head_dim=64, n_expert=8,
             experts_per_token=2, intermediate_size=256, sliding_window=64, tie_embeddings=False)


@pytest.fixture(autouse=True)
def no_tf32():
    """fp32 matmuls in full fp32: TF32 keeps 10 bits of mantissa (~1e-3), which would hide any real difference.
    set_float32_matmul_precision is the one switch that works beside both the old and the new TF32 flags."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(before)


def random_model(**changes):
    """Biases and sinks random too (they start at 0), so that every part of the network moves the logits."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**SHAPE, **changes}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "sinks" in name:
                p.normal_(0.0, 0.5 if "sinks" in name else 0.02)
    return model


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_fp32_logits_on_cuda_equal_the_cpus():
    model = random_model().eval()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 300))
    with torch.no_grad():
        want, want_loss, _ = model(x, x)
        got, got_loss, _ = model.cuda()(x.cuda(), x.cuda())
    assert rel(got.cpu(), want) < 1e-5
    assert abs(got_loss.item() - want_loss.item()) < 1e-5 * want_loss.item()


def test_kv_cache_greedy_tokens_on_cuda_equal_rerunning_the_context():
    model = random_model().cuda().eval()
    prompt = torch.randint(0, SHAPE["vocab_size"], (2, 100), device="cuda")
    with torch.no_grad():  # 100 new tokens: past the sliding window, so the cache drops keys as it goes
        cached = generate(model, prompt, 100, temperature=0, use_cache=True)
        rerun = generate(model, prompt, 100, temperature=0, use_cache=False)
    assert torch.equal(cached, rerun)


def test_compiled_model_on_cuda_gives_the_eager_loss_and_gradients_in_fp32():
    from torch._dynamo.utils import counters

    model = random_model(n_layer=2).cuda()
    x = torch.randint(0, SHAPE["vocab_size"], (2, 256), device="cuda")

    def step(forward):
        model.zero_grad(set_to_none=True)
        _, loss, stats = forward(x, x, loss_chunk=512)  # as train.py: the loss fused with its gradient (LinearCrossEntropy)
        (loss + 0.01 * stats["aux"] + 0.001 * stats["z"]).backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    eager_loss, eager_grads = step(model)
    torch._dynamo.reset()
    counters.clear()
    # one shape, so dynamic=False: what is compared is inductor's arithmetic, whichever policy train.py picks
    loss, grads = step(torch.compile(model, dynamic=False))
    assert counters["stats"]["unique_graphs"] > 0  # compiled graphs ran (dynamo raises its errors: none suppressed)
    assert abs(loss - eager_loss) <= 1e-5 * abs(eager_loss)
    assert grads.keys() == eager_grads.keys()
    assert rel(torch.cat([g.flatten() for g in grads.values()]), torch.cat([g.flatten() for g in eager_grads.values()])) < 1e-4


@pytest.mark.parametrize("window", [128, None])
def test_compiled_attention_on_cuda_runs_flex_and_equals_the_naive_reference_with_and_without_sinks(window):
    """attention() compiled on CUDA takes FlexAttention (flex_attention_sinks: its block mask kept for the shape; the
    sinks folded in through the lse): values and gradients (q, k, v, sinks) equal the [scores, sink] softmax in fp64,
    sinks on and off, sliding and full, GQA 4:2, 1,000 tokens (8 blocks of 128, the last partial)."""
    import model
    from test_model import naive_attention

    torch._dynamo.reset()
    model._flex_masks.clear()
    op = torch.compile(model.attention, dynamic=False)
    B, H, Hk, T, D = 2, 4, 2, 1000, 64
    torch.manual_seed(0)
    for with_sinks in (True, False):  # the first call builds the mask in its graph, the second reads the kept one
        q = torch.randn(B, T, H, D, device="cuda", requires_grad=True)
        k, v = (torch.randn(B, T, Hk, D, device="cuda", requires_grad=True) for _ in range(2))
        sinks = torch.randn(H, device="cuda", requires_grad=True) if with_sinks else None
        leaves = [q, k, v] + ([sinks] if with_sinks else [])
        y = op(q, k, v, sinks, window)
        assert list(model._flex_masks) == [(T, window, "cuda:0")]  # the flex path ran, on one mask
        q64, k64, v64 = (x.double().cpu().transpose(1, 2) for x in (q, k, v))  # the reference on the CPU, in fp64
        y_ref = naive_attention(q64, k64.repeat_interleave(2, 1), v64.repeat_interleave(2, 1),
                                sinks.double().cpu() if with_sinks else None, window).transpose(1, 2).cuda()
        assert rel(y, y_ref) < 1e-5, (with_sinks, rel(y, y_ref))
        g = torch.randn_like(y)
        for name, a, b in zip("q k v sinks".split(), torch.autograd.grad(y, leaves, g), torch.autograd.grad(y_ref, leaves, g.double())):
            assert rel(a, b) < 1e-4, (with_sinks, name, rel(a, b))


def test_decoding_compiled_into_cuda_graphs_gives_the_eager_logits_in_bf16_and_compiles_once():
    """sample.py --compile=True on a GPU: generate.compile_decode, mode reduce-overhead, over the static cache. In bf16
    (the experts' grouped matmul inside the graph), 60 one-token steps past the sliding window of 64, fed the same
    tokens as the eager steps, give their logits, and the steps after the first compile nothing new."""
    from torch._dynamo.utils import counters

    from generate import compile_decode, decode_step, new_cache, prefill

    model = random_model(n_layer=2).cuda().to(torch.bfloat16).eval()
    tokens = torch.randint(0, SHAPE["vocab_size"], (2, 160), device="cuda")
    eager, graphed = new_cache(model, 2, 160), new_cache(model, 2, 160)
    torch._dynamo.reset()
    counters.clear()
    step = compile_decode(model).decode_step
    try:
        with torch.no_grad():
            prefill(model, tokens[:, :100], eager)
            prefill(model, tokens[:, :100], graphed)
            for t in range(100, 160):
                want = decode_step(model, tokens[:, t:t + 1], eager)
                torch.compiler.cudagraph_mark_step_begin()
                got = step(model, tokens[:, t:t + 1], graphed)
                assert rel(got.float(), want.float()) < 2e-2, t
                if t == 100:
                    graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0 and counters["stats"]["unique_graphs"] == graphs
    finally:
        compile_decode(model, False)
        torch._dynamo.reset()
