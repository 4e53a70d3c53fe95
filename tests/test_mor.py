"""Mixture-of-Recursions (model.GPTConfig's n_recursion, recursion_sharing, mor_router): shared blocks equal an
unrolled model with tied weights; expert-choice routing keeps exact capacities, selects hierarchically and leaves
unselected tokens alone; eval decides causally; the KV cache stays exact; train.py trains, stops and resumes it."""

import pytest
import torch

from conftest import TINY, full_only, run_script
from generate import generate
from model import GPT, GPTConfig
from sizing import flops_per_token, layer_shares, param_counts
from test_model import recorded_steps, rerun_logits


def cfg(**kw):
    base = dict(vocab_size=97, block_size=64, n_layer=6, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, n_expert=4,
                experts_per_token=2, intermediate_size=24, sliding_window=8, n_recursion=2, recursion_sharing="middle_cycle")
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("sharing,plan", [("cycle", [0, 1, 2, 0, 1, 2]), ("sequence", [0, 0, 1, 1, 2, 2]),
                                          ("middle_cycle", [0, 1, 2, 1, 2, 3]), ("middle_sequence", [0, 1, 1, 2, 2, 3])])
def test_sharing_plans_and_counts(sharing, plan):
    c = cfg(recursion_sharing=sharing)
    assert c.schedule()[0] == plan
    m = GPT(c)
    assert len(m.layers) == max(plan) + 1 and sum(p.numel() for p in m.parameters()) == param_counts(c)["total"]


def test_a_shared_model_equals_the_unrolled_model_with_tied_weights():
    """Logits and gradients within 1e-6: the shared block's gradient is the sum of its uses' gradients."""
    torch.manual_seed(0)
    shared = GPT(cfg(mor_router="none"))
    plan = shared.plan
    pattern = "".join("S" if shared.cfg.layer_is_sliding(i) else "F" for i in plan)  # each use keeps its block's kind
    unrolled = GPT(cfg(n_recursion=1, attn_pattern=pattern))
    with torch.no_grad():
        for b in shared.layers:
            b.self_attn.sinks.normal_()
    state = {k: v for k, v in shared.state_dict().items() if not k.startswith("layers.")}  # embedding, norm, head
    for j, i in enumerate(plan):
        state.update({f"layers.{j}.{k}": v for k, v in shared.layers[i].state_dict().items()})
    unrolled.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 40))
    ls, loss_s, _ = shared(idx, idx)
    lu, loss_u, _ = unrolled(idx, idx)
    torch.testing.assert_close(ls, lu, atol=1e-6, rtol=1e-6)
    loss_s.backward()
    loss_u.backward()
    for i in range(len(shared.layers)):
        uses = [j for j, b in enumerate(plan) if b == i]
        for name, p in shared.layers[i].named_parameters():
            total = sum(dict(unrolled.layers[j].named_parameters())[name].grad for j in uses)
            torch.testing.assert_close(p.grad, total, atol=1e-6, rtol=1e-5, msg=name)


def test_expert_choice_keeps_exact_capacities_hierarchically_and_leaves_unselected_tokens_alone():
    """expert_recursions() with the shared layers replaced by f(h) = 1: a selected token gains exactly its gate, an
    unselected one nothing; step r keeps int(cap_r * T) tokens, all among step r-1's."""
    torch.manual_seed(0)
    m = GPT(cfg(n_layer=5, n_recursion=3, mor_router="expert")).train()  # plan [0, 1, 1, 1, 2]: capacities 1, 2/3, 1/3
    with torch.no_grad():
        m.mor_router.weight.normal_(0, 1.0)
    B, T, d = 3, 30, 32
    x = torch.randn(B, T, d)
    calls = []

    def run_layers(layers, h, cos, sin, cache=None, where=None, active=None):
        calls.append((list(layers), h.shape[1], where))
        return torch.ones_like(h), []

    m.run_layers = run_layers
    cos, sin = m.rope_cos[:T], m.rope_sin[:T]
    out, _, stats = m.expert_recursions(x, cos, sin, None, topk=True)
    assert [c[0] for c in calls] == [[1], [2], [3]] and [c[1] for c in calls] == [30, 20, 10]  # exact: int(cap * T)
    for r in (1, 2):  # each row's picks at step r are among its picks at r - 1
        for b in range(B):
            assert set(calls[r][2][b].tolist()) <= set(calls[r - 1][2][b].tolist())
    # replay: only selected rows change, each by its gate at that step
    ref = x.clone()
    for r, (_, _, where) in enumerate(calls):
        for b in range(B):
            rows = where[b]
            g = 0.1 * torch.sigmoid(ref[b, rows] @ m.mor_router.weight[r])
            ref[b, rows] = ref[b, rows] + g[:, None]
    torch.testing.assert_close(out, ref)
    never = [t for t in range(T) if t not in calls[1][2][0].tolist()]
    torch.testing.assert_close(out[0, never], x[0, never] + 0.1 * torch.sigmoid(x[0, never] @ m.mor_router.weight[0])[:, None])
    assert stats["mor_share"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3])


def routed(seed=0):
    torch.manual_seed(seed)
    m = GPT(cfg(n_layer=5, n_recursion=3, mor_router="expert", block_size=128)).eval()
    with torch.no_grad():
        m.mor_router.weight.normal_(0, 1.0)  # logits of both signs: some tokens stop early
        for b in m.layers:
            b.self_attn.sinks.normal_()
    return m


def test_eval_decides_causally_and_top_k_reads_the_future():
    m = routed()
    a = torch.randint(0, 97, (2, 40))
    b = a.clone()
    b[:, 25:] = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        la, _, st = m(a, a)
        lb = m(b, b)[0]
        assert 0 < st["mor_share"][-1] < 1  # the threshold split the tokens
        torch.testing.assert_close(la[:, :25], lb[:, :25], atol=0, rtol=0)
        # training's rule at eval: the top third of the sequence depends on its end
        assert not torch.equal(m(a, a, mor_topk=True)[0][:, :25], m(b, b, mor_topk=True)[0][:, :25])


def assert_cached_generation_equals_rerunning_the_context(m, monkeypatch):
    """Greedy tokens and each step's logits (within 1e-5) of the static cache, recursion-wise (a shared block keeps
    each use's keys, flagged active or not at that depth), equal rerunning the context; past the window of 8."""
    prompt = torch.randint(0, 97, (2, 20))
    steps = recorded_steps(monkeypatch)
    out = generate(m, prompt, 25, temperature=0)
    assert torch.equal(out, generate(m, prompt, 25, temperature=0, use_cache=False))
    for (_, _, got), want in zip(steps, rerun_logits(m, out, 25)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(steps) == 25 and len(steps[0][1]) == len(m.plan) and all(c.active is not None for c in steps[0][1])


def test_kv_cache_generation_of_a_routed_model_equals_rerunning_the_context(monkeypatch):
    assert_cached_generation_equals_rerunning_the_context(routed(1), monkeypatch)


def token_routed(seed=0):
    torch.manual_seed(seed)
    m = GPT(cfg(n_layer=5, n_recursion=3, mor_router="token", block_size=128))
    with torch.no_grad():
        m.mor_router.weight.normal_(0, 1.0)  # every depth chosen by some tokens
        for b in m.layers:
            b.self_attn.sinks.normal_()
    return m


def test_token_choice_runs_each_token_its_own_depth_in_training_and_eval():
    """token_recursions() with the shared layer replaced by f(h) = h + 1: a token of depth d leaves as x + p (x + d), in
    training (gathered, padded) and in eval (masked) alike; step r computes the tokens of depth >= r only."""
    m = token_routed()
    B, T = 3, 30
    x = torch.randn(B, T, 32)
    probs = (x @ m.mor_router.weight.T).softmax(-1)
    p, depth = probs.max(-1)
    assert set(depth.flatten().tolist()) == {0, 1, 2}
    for training in (True, False):
        m.train(training)
        calls = []

        def run_layers(layers, h, cos, sin, cache=None, where=None, active=None):
            calls.append((list(layers), where, active))
            return h + 1, []

        m.run_layers = run_layers
        out, _, stats = m.token_recursions(x, m.rope_cos[:T], m.rope_sin[:T], None)
        torch.testing.assert_close(out, x + p[..., None] * (x + depth[..., None] + 1))
        assert [c[0] for c in calls] == [[1], [2], [3]]
        for r, (_, where, active) in enumerate(calls[1:], 1):
            going = depth >= r
            if training:  # the tokens going on, in order, then pads at position T
                for b in range(B):
                    n = int(going[b].sum())
                    assert where[b, :n].tolist() == going[b].nonzero().flatten().tolist() and (where[b, n:] == T).all()
                assert where.shape[1] == going.sum(1).max()
            else:
                assert torch.equal(active, going)
        assert stats["mor_share"].tolist() == pytest.approx([1.0, *[(depth >= r).float().mean().item() for r in (1, 2)]])
        frac = torch.stack([(depth == i).float().mean() for i in range(3)])
        torch.testing.assert_close(stats["mor_aux"], 3 * (frac * probs.mean(dim=(0, 1))).sum())


def test_token_choice_is_causal_and_training_equals_eval():
    """The depth is each token's own choice: no leak, and the gathered, padded training path gives the masked
    eval path's logits (pads never seen by real tokens, positions kept for RoPE and the window)."""
    m = token_routed(2)
    a = torch.randint(0, 97, (2, 40))
    b = a.clone()
    b[:, 25:] = torch.randint(0, 97, (2, 15))
    with torch.no_grad():
        m.eval()
        la, _, st = m(a, a)
        assert 0 < st["mor_share"][-1] < st["mor_share"][1] < 1
        torch.testing.assert_close(la[:, :25], m(b, b)[0][:, :25], atol=0, rtol=0)
        m.train()
        lt, _, st_train = m(a, a)
        torch.testing.assert_close(lt, la, atol=1e-5, rtol=1e-5)
        # the MoE counts the same tokens both ways: the pads of training and the stopped tokens of eval left out
        assert torch.equal(st_train["load"], st["load"]) and st["load"][3].sum() < st["load"][2].sum() < st["load"][1].sum()
        torch.testing.assert_close(st_train["aux"], st["aux"])
        torch.testing.assert_close(m(b, b)[0][:, :25], lt[:, :25], atol=1e-5, rtol=1e-5)
    m.train()
    loss, stats = m(a, a)[1:]
    (loss + 0.1 * stats["mor_aux"] + 1e-3 * stats["mor_z"]).backward()
    assert m.mor_router.weight.grad.abs().sum() > 0 and all(p.grad is not None for p in m.layers.parameters() if p.requires_grad)


def test_kv_cache_generation_of_a_token_routed_model_equals_rerunning_the_context(monkeypatch):
    assert_cached_generation_equals_rerunning_the_context(token_routed(3).eval(), monkeypatch)


def test_flops_and_memory_count_the_capacities():
    plain, rec, mor = cfg(mor_router="none", n_recursion=1), cfg(mor_router="none"), cfg(mor_router="expert")
    assert layer_shares(mor) == [1.0, 1.0, 1.0, 0.5, 0.5, 1.0]
    assert flops_per_token(rec, 64) == flops_per_token(plain, 64)  # the same layers applied, fewer unique
    assert flops_per_token(mor, 64) < flops_per_token(rec, 64)
    assert param_counts(rec)["total"] < param_counts(plain)["total"]


@full_only
@pytest.mark.parametrize("router", ["expert", "token"])
def test_train_resumes_a_routed_run_bit_identically_after_sigterm(tmp_path, data_dir, router):
    from test_train import read_log, start

    args = [*TINY, "--n_layer=4", "--n_recursion=2", f"--mor_router={router}", f"--data_dir={data_dir}", "--max_iters=10",
            "--eval_interval=10", "--eval_iters=2", "--log_interval=1", "--save_every=5", "--lr=3e-3", "--warmup_iters=2"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    r = run_script("train.py", *args, f"--out_dir={ref}")
    assert r.returncode == 0, r.stderr
    assert ("val with top-k routing" in r.stdout) == (router == "expert")  # token-choice has no top-k to compare
    steps = [x for x in read_log(ref) if "loss" in x]
    assert steps[-1]["loss"] < steps[0]["loss"] and all(x["mor_aux"] > 0 and len(x["mor_share"]) == 2 for x in steps)
    assert all(x.get("mor_z", 0) > 0 for x in steps) == (router == "token") and " | mor " in r.stdout
    p = start([*args, f"--out_dir={cut}"], hooks="sigterm:sync:4:0")
    p.communicate(timeout=120)
    assert p.returncode == 0
    r = run_script("train.py", *args, f"--out_dir={cut}")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert [x.get("loss") for x in read_log(ref)] == [x.get("loss") for x in read_log(cut)]


def test_bad_recursion_settings_are_one_line(tmp_path, data_dir):
    for bad, says in ((["--n_layer=5", "--n_recursion=2"], "multiple of n_recursion"),
                      (["--n_layer=4", "--n_recursion=2", "--mor_router=expert", "--mor_capacity=0.5,1"], "none larger"),
                      (["--n_layer=4", "--n_recursion=2", "--mor_router=tokens"], "must be one of none, expert, token"),
                      (["--n_layer=4", "--n_recursion=2", "--mor_router=token", "--mor_capacity=1,0.5"], "mor_capacity is for"),
                      (["--n_layer=4", "--n_recursion=2", "--mor_router=expert", "--mor_aux_loss_coef=high"], "must be a number")):
        r = run_script("train.py", *TINY, *bad, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'x'}", "--max_iters=1")
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and says in r.stderr, r.stderr


@full_only
def test_a_recursive_model_exports_unrolled_to_transformers_and_a_routed_one_is_refused(tmp_path, data_dir):
    transformers = pytest.importorskip("transformers")
    from weights import load_model

    common = [*TINY, "--n_layer=4", "--n_recursion=2", f"--data_dir={data_dir}", "--max_iters=3", "--eval_interval=0"]
    rec, routed_run = str(tmp_path / "rec"), str(tmp_path / "routed")
    assert run_script("train.py", *common, f"--out_dir={rec}").returncode == 0
    r = run_script("export_hf.py", f"--ckpt={rec}", f"--out={tmp_path / 'hf'}")
    assert r.returncode == 0, r.stderr
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32,
                                                                 attn_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and hf.config.num_hidden_layers == 4
    ours, _ = load_model(rec)
    idx = torch.randint(0, 4097, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx, idx)[0], atol=1e-5, rtol=1e-5)
    assert run_script("train.py", *common, "--mor_router=expert", f"--out_dir={routed_run}").returncode == 0
    r = run_script("export_hf.py", f"--ckpt={routed_run}", f"--out={tmp_path / 'hf2'}")
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "routes tokens" in r.stderr, r.stderr
    assert not (tmp_path / "hf2").exists()
