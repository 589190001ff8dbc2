"""GRPO / RLOO: the group formulas against NumPy loops, the update's
direction, and the stage end to end (RM reward, the world's verifiable
reward, a Python reward function), with exact resume."""
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (assert_trees_equal, checkpoints_dir, count_checkpoint_reads, init_params,
                     load_config, run_interrupted)
from rlhf_jax import checkpoint, inference, rl, sampling, stages
from rlhf_jax.errors import ConfigError
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import grpo
from rlhf_jax.stages import policy_gradient as pg
from rlhf_jax.stages.instructgpt import override

CFG = ModelConfig(vocab_size=40, hidden=16, layers=1, heads=2, kv_heads=1, intermediate=32,
                  max_len=32)
EOS, PAD = 39, 38


# ---------------------------------------------------------------------------
# The formulas, against loops
# ---------------------------------------------------------------------------

def _rewards():
    r = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    r[2] = 0.5                                    # a group of equal rewards
    return r


def test_grpo_advantages_match_a_loop():
    r = _rewards()
    got = np.asarray(rl.group_advantages(r, "grpo", scale_by_std=True, eps=1e-4))
    got_dr = np.asarray(rl.group_advantages(r, "grpo", scale_by_std=False))
    for b in range(r.shape[0]):
        g = r.shape[1]
        mean = sum(r[b]) / g
        std = (sum((x - mean) ** 2 for x in r[b]) / (g - 1)) ** 0.5
        for i in range(g):
            assert got[b, i] == pytest.approx((r[b, i] - mean) / (std + 1e-4), abs=1e-5)
            assert got_dr[b, i] == pytest.approx(r[b, i] - mean, abs=1e-6)
    np.testing.assert_array_equal(got[2], 0.0)


def test_rloo_advantages_are_leave_one_out():
    r = _rewards()
    got = np.asarray(rl.group_advantages(r, "rloo"))
    for b in range(r.shape[0]):
        for i in range(r.shape[1]):
            others = [r[b, j] for j in range(r.shape[1]) if j != i]
            assert got[b, i] == pytest.approx(r[b, i] - sum(others) / len(others), abs=1e-5)


def test_group_of_one_and_unknown_kind_refused():
    with pytest.raises(ValueError, match="at least 2"):
        rl.group_advantages(np.zeros((3, 1)))
    with pytest.raises(ValueError, match="advantage kind"):
        rl.group_advantages(np.zeros((3, 2)), "ppo")


def _logps(seed=1, b=4, t=5):
    rng = np.random.default_rng(seed)
    logp = -rng.uniform(0.1, 3, (b, t)).astype(np.float32)
    old = logp + rng.normal(0, 0.3, (b, t)).astype(np.float32)
    ref = logp + rng.normal(0, 0.5, (b, t)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]],
                    np.float32)[:b]
    logp[mask == 0] = np.nan                      # garbage after EOS must not leak
    return logp, old, ref, mask


def test_kl_penalised_scores_match_a_loop():
    logp, _, ref, mask = _logps()
    score = np.array([1.0, -0.5, 0.25, 2.0], np.float32)
    got = np.asarray(rl.kl_penalised_scores(score, logp, ref, mask, 0.1))
    for b in range(4):
        kl = sum(logp[b, t] - ref[b, t] for t in range(5) if mask[b, t])
        assert got[b] == pytest.approx(score[b] - 0.1 * kl, abs=1e-5)


def test_grpo_policy_loss_matches_a_loop():
    logp, old, ref, mask = _logps()
    adv = np.array([1.5, -0.7, 0.2, -2.0], np.float32)
    clip, beta = 0.2, 0.04
    loss, stats = rl.grpo_policy_loss(logp, old, ref, adv, mask, clip, beta)
    terms, k3s = [], []
    for b in range(4):
        for t in range(5):
            if not mask[b, t]:
                continue
            ratio = np.exp(float(logp[b, t]) - float(old[b, t]))
            terms.append(max(-adv[b] * ratio, -adv[b] * min(max(ratio, 1 - clip), 1 + clip)))
            d = float(ref[b, t]) - float(logp[b, t])
            k3s.append(np.exp(d) - 1 - d)
    assert float(loss) == pytest.approx(np.mean(terms) + beta * np.mean(k3s), rel=1e-5)
    assert float(stats["kl_k3_loss"]) == pytest.approx(np.mean(k3s), rel=1e-5)
    # Its gradient is finite where the masked positions hold NaN.
    g = jax.grad(lambda lp: rl.grpo_policy_loss(lp, old, ref, adv, mask, clip, beta)[0])(
        jnp.asarray(logp))
    assert np.all(np.isfinite(np.asarray(g))) and np.all(np.asarray(g)[mask == 0] == 0)


# ---------------------------------------------------------------------------
# Scoring and the update on a micro model
# ---------------------------------------------------------------------------

def _hp(**kw):
    import ml_collections
    from configs.grpo import algo_config
    return ml_collections.FrozenConfigDict(dict(algo_config(**kw).to_dict(), temperature=1.0,
                                                eos_id=EOS))


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_score_rollout_log_probs_and_group_advantages(kl_in):
    model = Transformer(CFG)
    pol, ref = init_params(CFG, 0), init_params(CFG, 1)
    hp = _hp(group_size=2, kl_in=kl_in, kl_coef=0.1)
    prompt = jnp.asarray(np.random.default_rng(2).integers(0, 30, (4, 5)), jnp.int32)
    pmask = jnp.ones((4, 5), jnp.int32)
    out = sampling.sample(model, pol, prompt, pmask, jax.random.PRNGKey(3), max_new_tokens=6,
                          eos_id=EOS, pad_id=PAD, temperature=1.0)
    scores = jnp.asarray([1.0, 0.0, 2.0, 2.0])
    fn = jax.jit(functools.partial(grpo.score_rollout, model=model, hp=hp))
    packed, _ = pg.pack(pmask, out)           # the stage's packed rows
    rollout, stats = fn(pol, ref, prompt, out.tokens, out.mask, scores, packed)
    m = np.asarray(out.mask, np.float32)
    np.testing.assert_allclose(np.asarray(rollout.old_logp) * m, np.asarray(out.logprobs) * m,
                               atol=2e-5)
    # The reference's log-probs from a full forward pass, by hand.
    seq = np.concatenate([np.asarray(prompt), np.asarray(out.tokens)], 1)
    attn = np.concatenate([np.asarray(pmask), m.astype(np.int32)], 1)
    logits = np.asarray(jax.jit(lambda p, s, a: model.apply({"params": p}, s, attn_mask=a))(
        ref, seq, attn), np.float64)
    lsm = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ref_lp = np.array([[lsm[b, 5 + t - 1, seq[b, 5 + t]] for t in range(6)] for b in range(4)])
    np.testing.assert_allclose(np.asarray(rollout.ref_logp) * m, ref_lp * m, atol=2e-5)
    rewards = np.asarray(scores, np.float64)
    if kl_in == "reward":
        rewards = rewards - 0.1 * ((np.asarray(out.logprobs) - ref_lp) * m).sum(-1)
    for g in range(2):
        a, b = rewards[2 * g], rewards[2 * g + 1]
        mean, std = (a + b) / 2, abs(a - b) / 2 ** 0.5
        expect = [(a - mean) / (std + 1e-4), (b - mean) / (std + 1e-4)]
        np.testing.assert_allclose(np.asarray(rollout.advantages)[2 * g: 2 * g + 2], expect,
                                   atol=1e-3)
    assert float(stats["zero_std_groups"]) == 0.5           # the second group's scores tie


def test_update_raises_the_better_responses_log_prob():
    """One minibatch update: the response with the positive advantage gains
    log-prob, the one with the negative loses it (the reward's sign steers)."""
    import optax
    from rlhf_jax import train_state
    model = Transformer(CFG)
    params = init_params(CFG, 0)
    opt = optax.adam(3e-3)
    state = grpo.GRPOState(step=jnp.int32(0), policy=train_state.TrainState(
        step=jnp.int32(0), params=params, opt_state=opt.init(params), rng=jax.random.PRNGKey(0),
        nonfinite=jnp.int32(0)))
    rng = np.random.default_rng(4)
    P, N = 4, 5
    tokens = jnp.asarray(rng.integers(0, 30, (2, P + N)), jnp.int32)
    attn = jnp.ones((2, P + N), jnp.int32)
    mask = jnp.ones((2, N), jnp.float32)

    def logp(p):
        logits = inference.response_outputs(model, p, tokens, attn, P, N)
        return rl.logprobs_from_logits(logits, tokens[:, P:]).sum(-1)

    old = jax.jit(logp)(params)
    per_token = jax.jit(lambda p: rl.logprobs_from_logits(
        inference.response_outputs(model, p, tokens, attn, P, N), tokens[:, P:]))(params)
    rollout = grpo.Rollout(tokens, mask, per_token, per_token, jnp.asarray([1.0, -1.0]))
    hp = _hp(group_size=2, minibatches=1, kl_coef=0.0)
    idx = np.asarray(pg.minibatch_indices(jax.random.PRNGKey(0), 2, hp.epochs, 1))
    out = SimpleNamespace(tokens=tokens[:, P:], mask=mask, finished=jnp.ones((2,), bool))
    _, packed = pg.pack(attn[:, :P], out, idx)
    new, stats = jax.jit(functools.partial(grpo.grpo_update, model=model, optimizer=opt, hp=hp))(
        state, rollout, idx, packed)
    after = jax.jit(logp)(new.policy.params)
    assert float(after[0]) > float(old[0]) and float(after[1]) < float(old[1]), (old, after)
    assert float(stats["clipfrac"]) == 0.0 and int(new.step) == 1


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

def _config(micro_sft, tmp_path, **kw):
    cfg = load_config("grpo", "tiny")
    cfg.init_from = micro_sft["sft"]
    cfg.sampling.max_new_tokens = 8
    cfg.train.update(dict(steps=4, batch_size=8, lr=1e-3, checkpoint_every=2))
    return override(cfg, **kw)


def constant_reward(prompt, response, finished):
    """A `reward_fn` for the tests (tests.test_grpo:constant_reward)."""
    return 1.0


def test_gold_reward_metrics_and_exact_resume(micro_sft, tmp_path, monkeypatch):
    cfg = _config(micro_sft, tmp_path, reward_fn="world")
    stages.run(cfg, str(tmp_path / "full"))
    rows = read_metrics(str(tmp_path / "full"), "grpo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("score", "kl", "kl_k3", "entropy", "loss", "clipfrac", "kl_k3_loss",
                "response_length", "eos_rate", "zero_std_groups", "group_score_std",
                "tokens_per_s", "iteration_s", "gold_score", "grad_norm"):
        assert all(np.isfinite(r[f"grpo/{key}"]) for r in rows), key
    assert abs(rows[0]["grpo/kl"]) < 1e-5                  # the policy starts as the reference
    # The world's reward is the gold score: the two metrics are one.
    assert all(r["grpo/gold_score"] == pytest.approx(r["grpo/score"]) for r in rows)
    # The checkpoint is a policy later stages load.
    from rlhf_jax import sharding
    model, params, _ = inference.load_policy(cfg, str(tmp_path / "full"), sharding.Runtime(cfg))
    assert model.cfg.head == "lm"

    run_interrupted(monkeypatch, cfg, str(tmp_path / "resumed"), step=3)
    stages.run(cfg, str(tmp_path / "resumed"))
    assert_trees_equal(checkpoint.load_saved_params(str(tmp_path / "full")),
                       checkpoint.load_saved_params(str(tmp_path / "resumed")))


def test_a_reward_that_never_differs_teaches_nothing(micro_sft, tmp_path, monkeypatch):
    """Every group's rewards tie (the zero-head RM scores 0; a constant Python
    reward): all advantages are 0, and without the KL term the policy stays
    the SFT policy exactly. Each checkpoint is read once (stages/roles.py)."""
    for name, kw in (("rm", dict(reward_from=micro_sft["rm"], **{"algo.missing_eos_penalty": 0.0})),
                     ("fn", dict(reward_fn="test_grpo:constant_reward"))):
        cfg = _config(micro_sft, tmp_path, **{"train.steps": 2, "algo.kl_coef": 0.0, **kw})
        reads = count_checkpoint_reads(monkeypatch)
        stages.run(cfg, str(tmp_path / name))
        monkeypatch.undo()
        sources = [micro_sft["sft"]] + ([micro_sft["rm"]] if name == "rm" else [])
        for workdir in sources:
            assert reads["meta", checkpoints_dir(workdir)] == 1, reads
            assert reads["params", checkpoints_dir(workdir)] == 1, reads
        assert reads["meta", checkpoints_dir(micro_sft["rm"])] == (name == "rm")
        rows = read_metrics(str(tmp_path / name), "grpo")
        assert all(r["grpo/zero_std_groups"] == 1.0 for r in rows), name
        assert_trees_equal(checkpoint.load_saved_params(str(tmp_path / name)),
                           checkpoint.load_saved_params(micro_sft["sft"]))


@pytest.mark.parametrize("kw, match", [
    ({}, "exactly one reward"),
    ({"reward_fn": "world", "reward_from": "x"}, "exactly one reward"),
    ({"reward_fn": "nomodule"}, "package.module:function"),
    ({"reward_fn": "no_such_module_xyz:f"}, "cannot load"),
    ({"reward_fn": "world", "algo.group_size": 1}, "group_size=1: must be an integer >= 2"),
    ({"reward_fn": "world", "algo.kl_in": "both"}, "kl_in"),
    ({"reward_fn": "world", "sampling.top_k": 5}, "full softmax"),
    ({"reward_fn": "world", "algo.minibatches": 3}, "divisible"),
])
def test_bad_configs_say_what_is_wrong(micro_sft, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        stages.run(_config(micro_sft, tmp_path, **kw), str(tmp_path / "w"))


def test_reward_from_must_be_a_reward_model(micro_sft, tmp_path):
    with pytest.raises(ConfigError, match="not a reward model"):
        stages.run(_config(micro_sft, tmp_path, reward_from=micro_sft["sft"]), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match="reward model checkpoint"):
        stages.run(override(_config(micro_sft, tmp_path, reward_fn="world"),
                            init_from=micro_sft["rm"]), str(tmp_path / "b"))
