"""bench/: the compile counter counts what it must, and the sampler the
benchmark times against transformers' `generate` decodes the same tokens from
the same (TINY, exported) weights."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common as C  # noqa: E402


def test_compile_counter_counts_a_recompilation():
    f = jax.jit(lambda x: jnp.tanh(x) * 3.0 + 1.0)
    a, b, c, d = (np.ones((5,), np.float32), np.zeros((5,), np.float32),
                  np.ones((6,), np.float32), np.ones((7,), np.float32))
    with C.CompileCounter() as cc:
        f(a).block_until_ready()
        first = cc.count
        cc.reset()
        f(b).block_until_ready()                        # same shape: cached
        same = cc.count
        f(c).block_until_ready()                        # new shape: one more compilation
        again = cc.count
    assert first == 1 and same == 0 and again == 1
    assert cc.seconds > 0 and cc.names == ["jit(<lambda>)"]
    f(d).block_until_ready()                            # outside the block: not counted
    assert cc.count == 1


def test_sampler_greedy_matches_transformers_generate_on_tiny(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from rlhf_jax.sampling import sample

    s = C.make_tiny(str(tmp_path))
    # Spread the logits so that greedy choices are far from ties (f32 noise).
    s.params = dict(s.params, lm_head={"kernel": s.params["lm_head"]["kernel"] * 30.0})
    from rlhf_jax.models import save_pretrained
    from rlhf_jax.models.transformer import Transformer
    save_pretrained(Transformer(s.cfg), s.params, s.hf_dir)
    hf = C.hf_causal_lm(s)

    toks, mask = C.prompts(s, seed=3)
    toks, mask = toks[:2, :12], mask[:2, :12]
    n = 10
    ours = sample(Transformer(s.cfg), s.params, jnp.asarray(toks), jnp.asarray(mask),
                  jax.random.PRNGKey(0), max_new_tokens=n, eos_id=s.eos_id, pad_id=s.pad_id,
                  greedy=True, stop_at_eos=False)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.from_numpy(toks).long(),
                          attention_mask=torch.from_numpy(mask).long(), max_new_tokens=n,
                          do_sample=False)[:, toks.shape[1]:].numpy()
    assert ref.shape == (2, n)
    np.testing.assert_array_equal(np.asarray(ours.tokens), ref)
    assert len(set(ref.ravel().tolist())) > 2                # not a degenerate repeat


def _dot_flops(jaxpr) -> float:
    """Matmul FLOPs of a jaxpr: 2 x output size x contracted size per
    dot_general, sub-jaxprs included, a scan's body times its length."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod(
                [lhs[i] for i in lhs_contract])
        times = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (list, tuple)) else (v,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += times * _dot_flops(inner)
    return total


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_roofline_counts_the_models_matmul_flops(head):
    """bench/roofline.py's FLOP counts against the dot_generals of the model's
    own jaxpr: forward (all positions, and the head at the response only) and
    forward + backward (3x)."""
    from bench import roofline
    from rlhf_jax.models.transformer import Transformer
    cfg = C.with_precision(C.TINY, "f32").replace(head=head)
    model = Transformer(cfg)
    b, t, start = 3, 24, 10
    tokens = jnp.ones((b, t), jnp.int32)
    # The jaxprs depend on shapes only: init's, without running it (eagerly
    # it compiles for seconds).
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)["params"]
    out = None if head == "lm" else 1
    full = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params)
    assert _dot_flops(full.jaxpr) == roofline.forward_flops(cfg, b, t, head_out=out)
    part = jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens, start, t - start,
                                                method=model.outputs_at))(params)
    assert _dot_flops(part.jaxpr) == roofline.forward_flops(cfg, b, t, head_positions=t - start,
                                                            head_out=out)
    grad = jax.make_jaxpr(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))(params)
    assert _dot_flops(grad.jaxpr) == pytest.approx(roofline.train_flops(cfg, b, t, head_out=out),
                                                   rel=0.01)


def test_floors_divide_the_work_by_the_peak_and_the_bandwidth():
    """bench/roofline.floors on a results dict of bench/run.py's shape: compute
    floor = FLOPs / peak, a memory floor only where the weights exceed the
    last-level cache, best ratio = the peer's time / the floor."""
    from bench import roofline
    peak = {"f32": {"peak": 2e11}, "bf16": {"peak": 1e11}}
    res = {"sampler": {"TINY": {"f32": {"ours_tokens_per_s": 1000.0, "theirs_tokens_per_s": 500.0}}},
           "ppo": {"TINY": {"bf16/4ep": {"ours": {"median": {"iteration": 2.0}},
                                         "theirs": {"median": {"iteration": 3.0}}}}},
           "rm": {"TINY": {"f32": {"ours": {"pairs_per_s": 40.0}, "theirs": {"pairs_per_s": 80.0}}}}}
    cfgs = {"TINY": C.TINY}
    n = C.BATCH * C.NEW_TOKENS
    weights = roofline.decode_weight_bytes(C.TINY, 4)
    for llc, memory in ((weights + 1, 0.0), (weights - 1, C.NEW_TOKENS * weights / 1e9)):
        fl = roofline.floors(res, cfgs, peak, 1e9, llc)
        s = fl["sampler"]["TINY"]["f32"]
        compute = roofline.decode_flops(C.TINY, C.BATCH, C.PROMPT_LEN, C.NEW_TOKENS) / 2e11
        assert s["compute_floor_s"] == pytest.approx(compute)
        assert s["memory_floor_s"] == pytest.approx(memory)
        assert s["best_possible_ratio"] == pytest.approx((n / 500.0) / max(compute, memory))
        assert s["ours_ratio"] == pytest.approx(2.0)
    p = fl["ppo"]["TINY"]["bf16/4ep"]
    assert p["floor_s"] == pytest.approx(
        roofline.ppo_flops(C.TINY, C.BATCH, C.PROMPT_LEN, C.NEW_TOKENS, 4)["iteration"] / 1e11)
    assert p["best_possible_ratio"] == pytest.approx(3.0 / p["floor_s"])
    r = fl["rm"]["TINY"]["f32"]
    assert r["floor_s"] == pytest.approx(roofline.rm_step_flops(C.TINY, C.RM_PAIRS, C.RM_LEN) / 2e11)
    assert r["ours_ratio"] == pytest.approx(0.5)
    assert "| ppo | TINY | bf16/4ep |" in roofline.table(fl)


def test_tokens_through_eos_counts_each_row_up_to_its_first_eos():
    """The EOS workload's token count (bench/run.py:bench_sampler_eos), against a loop."""
    rng = np.random.RandomState(0)
    responses = rng.randint(0, 6, (32, 9))
    eos = 5
    expected = []
    for row in responses:
        n = len(row)
        for t, token in enumerate(row):
            if token == eos:
                n = t + 1
                break
        expected.append(n)
    assert min(expected) < 9 and max(expected) == 9      # rows with and without EOS
    np.testing.assert_array_equal(C.tokens_through_eos(responses, eos), expected)
