"""PPO wiring against NumPy loops, sampler/trainer agreement, the stage end to end."""
import functools
import os
import subprocess
import sys
from types import SimpleNamespace

import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import (ROOT, assert_trees_equal, checkpoints_dir, count_checkpoint_reads,
                     init_params, load_config, reward_model_from, run_interrupted)
from rlhf_jax import checkpoint, sampling, stages
from rlhf_jax.metrics import read_metrics
from rlhf_jax.models.transformer import ModelConfig, Transformer
from rlhf_jax.stages import policy_gradient as pg
from rlhf_jax.stages import ppo
from rlhf_jax.stages.instructgpt import override

CFG = ModelConfig(vocab_size=40, hidden=32, layers=1, heads=2, kv_heads=1, intermediate=48,
                  max_len=32)
EOS, PAD = 39, 38


def _params(cfg, seed):
    return init_params(cfg, seed)


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, tokens, attn_mask):
    """The NumPy references' forward pass, compiled once per model and shapes
    (eagerly each call compiles the layer scan again)."""
    return model.apply({"params": params}, tokens, attn_mask=attn_mask)


def _score_rollout(pol, ref, val, rew, prompt, pmask, resp, rmask, finished, kl_coef,
                   scores=None, *, models, hp, rows=None):
    """ppo.score_rollout jitted on the packed rows, as the stage runs it;
    `rows`: the packed rows it must use (the test says how many)."""
    out = SimpleNamespace(tokens=jnp.asarray(resp), mask=jnp.asarray(rmask),
                          finished=jnp.asarray(finished))
    packed, _ = pg.pack(jnp.asarray(pmask), out)
    if rows is not None:
        assert packed.source.shape[0] == rows, packed.source
    return jax.jit(functools.partial(ppo.score_rollout, models=models, hp=hp))(
        pol, ref, val, rew, prompt, out.tokens, out.mask, out.finished, kl_coef, packed, scores)


def _hp(**kw):
    base = dict(temperature=0.8, missing_eos_penalty=1.5, gamma=0.9, lam=0.8,
                whiten_advantages=True, clip=0.2, vf_clip=0.2, vf_coef=1.0, ptx_coef=0.0,
                epochs=1, minibatches=1, adaptive_kl=False, kl_target=6.0, kl_horizon=1e4,
                ema_decay=0.0, eos_id=EOS)
    base.update(kw)
    return ml_collections.FrozenConfigDict(base)


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_score_rollout_matches_numpy_loops():
    scalar = CFG.replace(head="scalar")
    models = ppo.Models(policy=Transformer(CFG), value=Transformer(scalar), reward=Transformer(scalar))
    pol, ref = _params(CFG, 0), _params(CFG, 1)
    val, rew = _params(scalar, 2), _params(scalar, 3)
    # Value/reward heads are zero-initialised: make them say something.
    for p in (val, rew):
        p["score_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4), p["score_head"]["kernel"].shape)
    prompt = np.array([[0, 0, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 9, 10]], np.int32)
    pmask = (np.arange(6)[None] >= np.array([2, 0, 4])[:, None]).astype(np.int32)
    resp = np.array([[11, 12, EOS, PAD, PAD], [13, 14, 15, 16, 17], [EOS, PAD, PAD, PAD, PAD]], np.int32)
    rmask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], np.float32)
    finished = np.array([True, False, True])
    beta, hp = 0.1, _hp()
    # Packed: rollouts 1 (6 + 5 tokens and its EOS) and 2 (2 + 1) share a row of 16.
    rollout, stats = _score_rollout(pol, ref, val, rew, prompt, pmask, resp, rmask, finished,
                                    jnp.float32(beta), models=models, hp=hp, rows=2)

    seq = np.concatenate([prompt, resp], 1)
    attn = np.concatenate([pmask, rmask.astype(np.int32)], 1)
    lp = np.asarray(_apply(models.policy, pol, seq, attn))
    lr = np.asarray(_apply(models.policy, ref, seq, attn))
    vv = np.asarray(_apply(models.value, val, seq, attn))
    rr = np.array(_apply(models.reward, rew, seq, attn))
    # The RM reads an unfinished response as its text followed by EOS (row 1,
    # five tokens and no EOS): all its tokens, then EOS, one position later.
    seq_eos = np.concatenate([seq[1:2], [[EOS]]], 1)
    attn_eos = np.concatenate([attn[1:2], [[1]]], 1)
    eos_score = float(np.asarray(_apply(models.reward, rew, seq_eos, attn_eos))[0, 6 + 5])
    B, P, N = 3, 6, 5
    logp, ref_logp, values = np.zeros((B, N)), np.zeros((B, N)), np.zeros((B, N))
    rewards, adv = np.zeros((B, N)), np.zeros((B, N))
    scores = np.zeros(B)
    for b in range(B):
        last = max(t for t in range(N) if rmask[b, t])
        rm_score = rr[b, P + last] if finished[b] else eos_score
        scores[b] = rm_score - (0.0 if finished[b] else hp.missing_eos_penalty)
        for t in range(N):
            if not rmask[b, t]:
                continue
            # logits at P-1+t predict response token t, scaled by the temperature
            logp[b, t] = _log_softmax(lp[b, P - 1 + t] / hp.temperature)[resp[b, t]]
            ref_logp[b, t] = _log_softmax(lr[b, P - 1 + t] / hp.temperature)[resp[b, t]]
            values[b, t] = vv[b, P - 1 + t]
            rewards[b, t] = -beta * (logp[b, t] - ref_logp[b, t]) + (scores[b] if t == last else 0)
        gae, next_v = 0.0, 0.0
        for t in reversed(range(last + 1)):
            delta = rewards[b, t] + hp.gamma * next_v - values[b, t]
            gae = delta + hp.gamma * hp.lam * gae
            adv[b, t] = gae
            next_v = values[b, t]
    returns = adv + values
    real = rmask > 0
    white = np.zeros_like(adv)
    white[real] = (adv[real] - adv[real].mean()) / np.sqrt(adv[real].var(ddof=1) + 1e-8)

    np.testing.assert_allclose(np.asarray(rollout.old_logp) * rmask, logp, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rollout.old_values), values, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rollout.returns) * rmask, returns * rmask, atol=1e-5)
    np.testing.assert_allclose(np.asarray(rollout.advantages), white, atol=1e-4)
    np.testing.assert_allclose(float(stats["score_penalised"]), scores.mean(), atol=1e-5)
    kl_per_response = ((logp - ref_logp) * rmask).sum(1).mean()
    np.testing.assert_allclose(float(stats["kl"]), kl_per_response, atol=1e-5)
    np.testing.assert_allclose(float(stats["eos_rate"]), 2 / 3, atol=1e-6)


def test_packed_update_losses_equal_the_padded_computation():
    """A minibatch's PPO losses and their gradients on packed rows equal
    those of the padded [B, P+N] rows (the computation before packing)."""
    from rlhf_jax import inference, packed_rollouts, rl
    scalar = CFG.replace(head="scalar")
    models = ppo.Models(policy=Transformer(CFG), value=Transformer(scalar))
    pol, val = _params(CFG, 0), _params(scalar, 2)
    val["score_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4),
                                                    val["score_head"]["kernel"].shape)
    rng = np.random.default_rng(7)
    B, P, N = 8, 6, 5
    plen, rlen = rng.integers(1, P + 1, B), rng.integers(1, N + 1, B)
    pmask = (np.arange(P)[None] >= P - plen[:, None]).astype(np.int32)
    rmask = (np.arange(N)[None] < rlen[:, None]).astype(np.float32)
    tokens = (rng.integers(0, 30, (B, P + N)) * np.concatenate([pmask, rmask], 1)).astype(np.int32)
    hp = _hp()
    rollout = ppo.Rollout(tokens=jnp.asarray(tokens), mask=jnp.asarray(rmask),
                          old_logp=jnp.asarray(rng.normal(-2, 0.3, (B, N)), jnp.float32),
                          old_values=jnp.asarray(rng.normal(size=(B, N)), jnp.float32),
                          advantages=jnp.asarray(rng.normal(size=(B, N)), jnp.float32),
                          returns=jnp.asarray(rng.normal(size=(B, N)), jnp.float32))
    idx = np.array([[5, 0, 3, 6]])
    # Responses of all N tokens were cut at the limit (rollout 3 among them).
    out = SimpleNamespace(tokens=jnp.asarray(tokens[:, P:]), mask=jnp.asarray(rmask),
                          finished=jnp.asarray(rlen < N))
    scoring, packed = pg.pack(jnp.asarray(pmask), out, idx)
    assert packed.source.shape[1] < 4                    # the 4 rollouts share rows
    # Scoring packs an EOS after each unfinished response (the RM reads its
    # score there); the update reads no score and packs none.
    assert int((scoring.segments > 0).sum()) == int((plen + rlen + (rlen == N)).sum())
    assert int((packed.segments > 0).sum()) == int((plen + rlen)[idx[0]].sum())
    mb = jax.tree_util.tree_map(lambda x: x[idx[0]], rollout)

    def packed_loss(pp, vp):
        flat = packed_rollouts.flat_tokens(rollout.tokens, EOS)
        return ppo.ppo_losses(pp, vp, mb, flat, jax.tree_util.tree_map(lambda x: x[0], packed),
                              models=models, hp=hp)

    def padded_loss(pp, vp):
        attn = jnp.concatenate([jnp.asarray(pmask), jnp.asarray(rmask, jnp.int32)], 1)[idx[0]]
        logits = inference.response_outputs(models.policy, pp, mb.tokens, attn, P, N)
        logp = rl.logprobs_from_logits(logits, mb.tokens[:, P:], hp.temperature)
        pg_loss, _ = rl.ppo_policy_loss(logp, mb.old_logp, mb.advantages, mb.mask, hp.clip)
        values = inference.response_outputs(models.value, vp, mb.tokens, attn, P, N)
        vf_loss, _ = rl.value_loss(values, mb.old_values, mb.returns, mb.mask, hp.vf_clip)
        return pg_loss + hp.vf_coef * vf_loss, {"pg_loss": pg_loss, "vf_loss": vf_loss}

    grad = functools.partial(jax.value_and_grad, argnums=(0, 1), has_aux=True)
    (got, got_stats), got_grads = jax.jit(grad(packed_loss))(pol, val)
    (want, want_stats), want_grads = jax.jit(grad(padded_loss))(pol, val)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5, atol=1e-6)
    for key in ("pg_loss", "vf_loss"):
        np.testing.assert_allclose(float(got_stats[key]), float(want_stats[key]), rtol=1e-5,
                                   atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(got_grads), jax.tree_util.tree_leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_recomputed_logprobs_equal_sampler_logprobs():
    """The training forward pass over prompt + response reproduces the
    sampler's (temperature-scaled) log-probs; with policy == reference the KL is 0."""
    scalar = CFG.replace(head="scalar")
    models = ppo.Models(policy=Transformer(CFG), value=Transformer(scalar), reward=Transformer(scalar))
    pol, val = _params(CFG, 0), _params(scalar, 2)
    prompt = jax.random.randint(jax.random.PRNGKey(5), (4, 6), 0, 30)
    pmask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1], [0, 1, 1, 1, 1, 1]])
    hp = _hp(temperature=0.7)
    out = sampling.sample(models.policy, pol, prompt, pmask, jax.random.PRNGKey(6),
                          max_new_tokens=10, eos_id=EOS, pad_id=PAD, temperature=0.7)
    rollout, stats = _score_rollout(pol, pol, val, val, prompt, pmask, out.tokens, out.mask,
                                    out.finished, jnp.float32(0.05), models=models, hp=hp)
    np.testing.assert_allclose(rollout.old_logp * out.mask, out.logprobs * out.mask, atol=2e-5)
    assert abs(float(stats["kl"])) < 1e-6


# ---------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sft_workdir(micro_sft):
    # 8 SFT steps of the micro model on 128 world demonstrations (conftest.py:
    # made once a session, test_launch.py's PPO runs start from it too).
    return micro_sft["sft"]


@pytest.fixture(scope="module")
def rm_workdir(micro_sft):
    # A zero-initialised scalar head on the SFT backbone, beside it.
    assert micro_sft["rm"] == os.path.join(os.path.dirname(micro_sft["sft"]), "rm")
    return micro_sft["rm"]


def _ppo_config(sft, rm=None, **kw):
    cfg = load_config("ppo", "tiny")
    cfg.init_from = sft
    cfg.reward_from = rm or os.path.join(os.path.dirname(sft), "rm")
    cfg.train.update(dict(steps=4, batch_size=8, lr=1e-3, checkpoint_every=2))
    cfg.algo.ptx_coef = 0.5
    cfg.data.ptx_batch_size = 4
    cfg.sampling.max_new_tokens = 8
    return override(cfg, **kw)


def test_ppo_stage_metrics_and_exact_resume(sft_workdir, rm_workdir, tmp_path, monkeypatch):
    """Resume covers the whole PPO state: both optimizers, KL controller, EMA."""
    cfg = _ppo_config(sft_workdir, **{"algo.ema_decay": 0.9, "algo.adaptive_kl": True})
    reads = count_checkpoint_reads(monkeypatch)
    stages.run(cfg, str(tmp_path / "full"))
    # Each checkpoint read once (stages/roles.py): SFT's meta and params for
    # the policy and the reference, the RM's for the value and reward models.
    for workdir in (sft_workdir, rm_workdir):
        assert reads["meta", checkpoints_dir(workdir)] == 1, reads
        assert reads["params", checkpoints_dir(workdir)] == 1, reads
    monkeypatch.undo()
    rows = read_metrics(str(tmp_path / "full"), "ppo")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("score", "kl", "kl_k3", "entropy", "pg_loss", "vf_loss", "clipfrac",
                "vf_clipfrac", "approx_kl", "ptx_loss", "response_length", "eos_rate",
                "tokens_per_s", "iteration_s", "kl_coef", "gold_score",
                "pg_grad_norm", "ptx_grad_norm"):
        assert all(np.isfinite(r[f"ppo/{key}"]) for r in rows), key
    assert abs(rows[0]["ppo/kl"]) < 1e-5          # the policy starts as the reference
    # The adaptive controller lowers beta while the KL is below its target;
    # each row logs the beta that shaped its iteration's rewards, so the
    # first is the configured one.
    assert rows[0]["ppo/kl_coef"] == pytest.approx(cfg.algo.kl_coef)
    assert rows[-1]["ppo/kl_coef"] < rows[0]["ppo/kl_coef"]

    run_interrupted(monkeypatch, cfg, str(tmp_path / "resumed"), step=3,
                    only=lambda loader: loader.batch_size == cfg.train.batch_size)
    stages.run(cfg, str(tmp_path / "resumed"))
    assert_trees_equal(checkpoint.load_saved_params(str(tmp_path / "full")),
                       checkpoint.load_saved_params(str(tmp_path / "resumed")))


def test_ppo_raises_eos_rate_under_missing_eos_penalty(sft_workdir, rm_workdir, tmp_path,
                                                       monkeypatch, capsys):
    """With a zero reward model, the only signal is the penalty for responses
    without EOS: PPO must learn to end its responses. Over its 30 iterations
    the packed rows take a few shapes: scoring and the update are traced
    (so compiled) at most four times each; `ppo/packed_shapes` and the
    console's closing line say how many times."""
    traces = {"score": 0, "update": 0}

    def counted(name, fn):
        def traced(*args, **kwargs):
            traces[name] += 1          # runs when jax.jit traces, not on each call
            return fn(*args, **kwargs)
        return traced
    monkeypatch.setattr(ppo, "score_rollout", counted("score", ppo.score_rollout))
    monkeypatch.setattr(ppo, "ppo_update", counted("update", ppo.ppo_update))
    cfg = _ppo_config(sft_workdir, **{"train.steps": 30, "train.checkpoint_every": 30,
                                      "algo.ptx_coef": 0.0, "sampling.max_new_tokens": 6,
                                      "algo.missing_eos_penalty": 2.0, "algo.kl_coef": 0.0,
                                      "train.gold_eval": False, "algo.value_lr": 1e-2,
                                      "train.lr": 3e-3, "train.batch_size": 16})
    stages.run(cfg, str(tmp_path / "ppo"))
    rows = read_metrics(str(tmp_path / "ppo"), "ppo")
    eos = [r["ppo/eos_rate"] for r in rows]
    assert np.mean(eos[-5:]) > np.mean(eos[:5]) + 0.2, eos
    assert 1 <= traces["score"] <= 4 and 1 <= traces["update"] <= 4, traces
    assert rows[-1]["ppo/packed_shapes"] == traces["score"] + traces["update"]
    line = [x for x in capsys.readouterr().out.splitlines() if "packed rows compiled" in x]
    assert line and line[0].startswith(f"[ppo] packed rows compiled: scoring {traces['score']} ")
    assert f"update {traces['update']} " in line[0]


def short_reward(prompt, response, finished):
    """A `reward_fn` for the tests (test_ppo:short_reward): shorter is better."""
    return -0.25 * len(response) - (0.0 if finished else 2.0)


def test_python_reward_drives_ppo(sft_workdir, tmp_path):
    """With `reward_fn` instead of an RM, the function's score is the reward
    (no EOS penalty added: the function judges an unfinished response
    itself), and PPO follows it: here, towards shorter responses."""
    cfg = _ppo_config(sft_workdir, **{"reward_from": "", "reward_fn": "test_ppo:short_reward",
                                      "train.steps": 24, "train.checkpoint_every": 24,
                                      "algo.ptx_coef": 0.0, "sampling.max_new_tokens": 8,
                                      "algo.kl_coef": 0.0, "algo.value_lr": 1e-2,
                                      "train.lr": 3e-3, "train.batch_size": 16})
    stages.run(cfg, str(tmp_path / "ppo"))
    rows = read_metrics(str(tmp_path / "ppo"), "ppo")
    score = [r["ppo/score"] for r in rows]
    assert all(r["ppo/score_penalised"] == r["ppo/score"] for r in rows)
    assert np.mean(score[-5:]) > np.mean(score[:5]) + 0.5, score
    meta = checkpoint.read_meta(str(tmp_path / "ppo"))
    assert meta["reward_fn"] == "test_ppo:short_reward" and meta["reward_from"] == ""
    # The world's gold labeler as the reward: the rollouts' gold score is the score.
    cfg = _ppo_config(sft_workdir, **{"reward_from": "", "reward_fn": "world",
                                      "train.steps": 1, "algo.ptx_coef": 0.0,
                                      "train.batch_size": 16})     # the sampler compiled above
    stages.run(cfg, str(tmp_path / "gold"))
    (row,) = read_metrics(str(tmp_path / "gold"), "ppo")
    assert row["ppo/gold_score"] == pytest.approx(row["ppo/score"])


def test_score_rollout_takes_a_python_rewards_scores_as_they_are():
    scalar = CFG.replace(head="scalar")
    models = ppo.Models(policy=Transformer(CFG), value=Transformer(scalar))
    pol, val = _params(CFG, 0), _params(scalar, 2)
    prompt = jnp.asarray(np.random.default_rng(1).integers(0, 30, (2, 4)), jnp.int32)
    resp = jnp.asarray([[11, 12, EOS, PAD], [13, 14, 15, 16]], jnp.int32)
    rmask = jnp.asarray([[1, 1, 1, 0], [1, 1, 1, 1]], jnp.float32)
    scores = jnp.asarray([0.5, -1.0])
    rollout, stats = _score_rollout(pol, pol, val, None, prompt, jnp.ones((2, 4), jnp.int32), resp,
                                    rmask, jnp.asarray([True, False]), jnp.float32(0.1), scores,
                                    models=models, hp=_hp(whiten_advantages=False, gamma=1.0,
                                                          lam=1.0))
    # Policy = reference: no KL, so each token's return is the response's score.
    np.testing.assert_allclose(np.asarray(rollout.returns) * rmask,
                               np.asarray(scores)[:, None] * rmask, atol=1e-6)
    assert float(stats["score_penalised"]) == float(stats["score"]) == -0.25


@pytest.mark.parametrize("kw, match", [
    ({"reward_fn": "world"}, "exactly one reward"),
    ({"reward_from": "", "reward_fn": "no_such_module_xyz:f"}, "cannot load"),
])
def test_bad_reward_configs_say_what_is_wrong(sft_workdir, rm_workdir, tmp_path, kw, match):
    from rlhf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match=match):
        stages.run(_ppo_config(sft_workdir, **kw), str(tmp_path / "w"))


def test_cli_ppo_without_checkpoints_says_what_it_needs(tmp_path):
    env = dict(os.environ, RLHF_JAX_NO_PROGRESS="1", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-m", "rlhf_jax.main", "--config", "configs/ppo.py",
                        "--workdir", str(tmp_path / "w")], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0
    assert "init_from" in r.stderr and "reward_from" in r.stderr and "SFT" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# The update: the pretraining mix, the EMA
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _update_fixture(hp, seed=0):
    """A one-minibatch update's inputs on the micro model: state, rollout, ptx,
    and the update, jitted (as the stage runs it; eagerly its scans compile on
    every call) and kept for the module: the two ptx cases share the
    ptx_coef=1.0 update."""
    import optax
    from rlhf_jax import train_state
    scalar = CFG.replace(head="scalar")
    models = ppo.Models(policy=Transformer(CFG), value=Transformer(scalar), reward=Transformer(scalar))
    opt = optax.adam(1e-3)

    def fresh_state(params):
        return train_state.TrainState(step=jnp.int32(0), params=params, opt_state=opt.init(params),
                                      rng=jax.random.PRNGKey(0), nonfinite=jnp.int32(0))

    pol = _params(CFG, seed)
    ema = jax.tree_util.tree_map(jnp.zeros_like, pol) if hp.ema_decay > 0 else None
    state = ppo.PPOState(step=jnp.int32(0), policy=fresh_state(pol),
                         value=fresh_state(_params(scalar, 2)), kl_coef=jnp.float32(0.02),
                         ema_params=ema, ema_updates=jnp.int32(0))
    rng = np.random.default_rng(seed)
    B, P, N = 8, 4, 6
    tokens = rng.integers(0, 30, (B, P + N)).astype(np.int32)
    mask = np.ones((B, N), np.float32)
    rollout = ppo.Rollout(tokens=jnp.asarray(tokens), mask=jnp.asarray(mask), old_logp=jnp.full((B, N), -3.0),
                          old_values=jnp.zeros((B, N)), advantages=jnp.asarray(rng.normal(size=(B, N)),
                                                                              jnp.float32),
                          returns=jnp.zeros((B, N)))
    ptx = {"tokens": jnp.asarray(rng.integers(0, 30, (1, 4, 12)), jnp.int32),
           "attn_mask": jnp.ones((1, 4, 12), jnp.int32), "loss_mask": jnp.ones((1, 4, 12))}
    jitted = jax.jit(functools.partial(ppo.ppo_update, models=models, policy_opt=opt,
                                       value_opt=opt, hp=hp))

    def update(state, rollout, ptx, observed_kl, rng):
        """As the stage calls it: each minibatch's rows drawn from `rng`, packed."""
        b, n = rollout.mask.shape
        idx = np.asarray(pg.minibatch_indices(rng, b, hp.epochs, hp.minibatches))
        out = SimpleNamespace(tokens=rollout.tokens[:, -n:], mask=rollout.mask,
                              finished=jnp.ones((b,), bool))
        _, packed = pg.pack(jnp.ones((b, rollout.tokens.shape[1] - n), jnp.int32), out, idx)
        return jitted(state, rollout, idx, packed, ptx, observed_kl)
    return state, rollout, ptx, update


def _policy_step(update, state, rollout, ptx):
    new, stats = update(state, rollout, ptx, jnp.float32(0.0), jax.random.PRNGKey(1))
    delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a - b), new.policy.params,
                                   state.policy.params)
    return np.concatenate([d.ravel() for d in jax.tree_util.tree_leaves(delta)]), stats


@pytest.mark.parametrize("ptx_coef, reward_moves_update", [
    (float(load_config("ppo", "").algo.ptx_coef), True),    # the default leaves the reward its share
    (27.8, False),                                          # the paper's gamma on a per-token mean
])
def test_with_ptx_on_the_reward_still_changes_the_update(ptx_coef, reward_moves_update):
    """The same update with the advantages flipped: Adam's first step moves
    each weight by about lr x sign(gradient), so the fraction of weights whose
    step changes sign is the reward's say in the update."""
    state, rollout, ptx, update = _update_fixture(_hp(ptx_coef=ptx_coef))
    up, stats = _policy_step(update, state, rollout, ptx)
    down, _ = _policy_step(update, state, rollout._replace(advantages=-rollout.advantages), ptx)
    flipped = float(np.mean(np.sign(up) != np.sign(down)))
    ratio = float(stats["ptx_grad_norm"] / stats["pg_grad_norm"])
    if reward_moves_update:
        assert flipped > 0.15, (flipped, ratio)
    else:
        assert flipped < 0.03 and ratio > 25, (flipped, ratio)
    # The LM term's gradient is logged apart, times its coefficient.
    state0, _, _, update0 = _update_fixture(_hp(ptx_coef=1.0))
    _, stats1 = _policy_step(update0, state0, rollout, ptx)
    np.testing.assert_allclose(float(stats["ptx_grad_norm"]), ptx_coef * float(stats1["ptx_grad_norm"]),
                               rtol=1e-4)


def _first_minibatch_twin(rollout, d):
    """The policy after the first minibatch update of a 2-minibatch iteration
    (PRNGKey(1)), computed on its own: a 1-minibatch update on those rows."""
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.PRNGKey(1), 0), 8))
    state1, _, _, update1 = _update_fixture(_hp(ema_decay=d, minibatches=1, ptx_coef=0.0))
    first = jax.tree_util.tree_map(lambda x: x[perm[:4]], rollout)
    s1, _ = update1(state1, first, None, jnp.float32(0.0), jax.random.PRNGKey(1))
    return s1, perm


def test_ema_follows_every_optimizer_update_bias_corrected():
    """One iteration of two minibatch updates: the saved policy is the EMA of
    the policies after each, debiased, (d(1-d) th1 + (1-d) th2) / (1 - d^2),
    with th1 computed apart (a once-per-iteration EMA would give th2)."""
    d = 0.9
    state, rollout, _, update = _update_fixture(_hp(ema_decay=d, minibatches=2, ptx_coef=0.0))
    s1, _ = _first_minibatch_twin(rollout, d)
    new, _ = update(state, rollout, None, jnp.float32(0.0), jax.random.PRNGKey(1))
    assert int(new.ema_updates) == 2 and int(s1.ema_updates) == 1
    # With one update the debiased EMA is exactly the policy after it.
    for a, b in zip(jax.tree_util.tree_leaves(ppo.saved_params(s1, d)),
                    jax.tree_util.tree_leaves(s1.policy.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    th1 = jax.tree_util.tree_leaves(s1.policy.params)
    th2 = jax.tree_util.tree_leaves(new.policy.params)
    saved = jax.tree_util.tree_leaves(ppo.saved_params(new, d))
    for t1, t2, got in zip(th1, th2, saved):
        t1, t2 = np.asarray(t1, np.float64), np.asarray(t2, np.float64)
        np.testing.assert_allclose(np.asarray(got), (d * (1 - d) * t1 + (1 - d) * t2) / (1 - d ** 2),
                                   rtol=1e-4, atol=1e-6)


def test_a_skipped_update_moves_neither_the_ema_nor_its_count(monkeypatch):
    """The second minibatch's advantages are NaN: its policy update is
    skipped, and so is its EMA update; the value model, whose loss is
    finite, still updates when only the ptx loss is not."""
    d = 0.9
    state, rollout, ptx, update = _update_fixture(_hp(ema_decay=d, minibatches=2, ptx_coef=0.0))
    s1, perm = _first_minibatch_twin(rollout, d)
    bad = np.asarray(rollout.advantages).copy()
    bad[perm[4:]] = np.nan
    new, stats = update(state, rollout._replace(advantages=jnp.asarray(bad)), None,
                        jnp.float32(0.0), jax.random.PRNGKey(1))
    assert float(stats["skipped"]) == 0.5 and int(new.ema_updates) == 1
    for a, b in zip(jax.tree_util.tree_leaves(ppo.saved_params(new, d)),
                    jax.tree_util.tree_leaves(s1.policy.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)

    # A non-finite pretraining batch: the policy's update is skipped, the
    # value's is not (its loss has no ptx term).
    monkeypatch.setattr(ppo, "ptx_loss", lambda params, ptx, *, models: jnp.nan * sum(
        jnp.sum(x) for x in jax.tree_util.tree_leaves(params)))
    state, rollout, ptx, update = _update_fixture(_hp(ptx_coef=0.5, minibatches=1))
    rollout = rollout._replace(returns=jnp.ones_like(rollout.returns))   # a value loss > 0
    new, stats = update(state, rollout, ptx, jnp.float32(0.0), jax.random.PRNGKey(1))
    assert float(stats["skipped"]) == 1.0
    assert_trees_equal(new.policy.params, state.policy.params)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(new.value.params), jax.tree_util.tree_leaves(state.value.params))]
    assert max(moved) > 0


def test_an_unfinished_response_is_scored_on_the_layout_the_rm_was_trained_on():
    """Cut at the length limit, a response reaches the RM as all its tokens
    then EOS, as `collect` writes it and the RM reads text + EOS; no sampled
    token is replaced. Both rollouts share a packed row."""
    from rlhf_jax import packed_rollouts
    scalar = CFG.replace(head="scalar")
    rm = Transformer(scalar)
    params = _params(scalar, 3)
    params["score_head"]["kernel"] = jax.random.normal(jax.random.PRNGKey(4),
                                                       params["score_head"]["kernel"].shape)
    prompt = np.array([[0, 5, 6], [1, 2, 3]], np.int32)
    pmask = np.array([[0, 1, 1], [1, 1, 1]], np.int32)
    out = SimpleNamespace(tokens=jnp.asarray([[11, 12, 13, 15, 16, 17], [14, EOS] + [PAD] * 4],
                                             jnp.int32),
                          mask=jnp.asarray([[1] * 6, [1, 1, 0, 0, 0, 0]], jnp.float32),
                          finished=jnp.asarray([False, True]))
    packed, _ = pg.pack(jnp.asarray(pmask), out)
    assert packed.source.shape == (1, 16)          # 2 + 6 + EOS, and 3 + 2, in one row

    def scores(params, prompt, packed):
        flat = packed_rollouts.flat_tokens(jnp.concatenate([prompt, out.tokens], 1), EOS)
        return pg.rm_scores(rm, params, flat, packed, out.finished, _hp())
    got, penalised = jax.jit(scores)(params, prompt, packed)
    cut = np.asarray(_apply(rm, params, np.array([[0, 5, 6, 11, 12, 13, 15, 16, 17, EOS]]),
                            np.array([[0] + [1] * 9])))[0, 9]
    done = np.asarray(_apply(rm, params, np.array([[1, 2, 3, 14, EOS, PAD]]),
                             np.array([[1, 1, 1, 1, 1, 0]])))[0, 4]
    np.testing.assert_allclose(np.asarray(got), [cut, done], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(penalised), [cut - 1.5, done], rtol=1e-5, atol=1e-6)


def test_reward_from_must_be_a_reward_model_with_the_policys_tokenizer(sft_workdir, tmp_path):
    from rlhf_jax.errors import ConfigError
    # An SFT checkpoint's scalar head would be fresh: every reward 0.
    with pytest.raises(ConfigError, match="not a reward model"):
        stages.run(_ppo_config(sft_workdir, rm=sft_workdir), str(tmp_path / "a"))
    # An RM whose tokenizer is another one reads the policy's ids as other text.
    from tokenizers import Tokenizer, models as tok_models
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>")).save(
        str(tok_dir / "tokenizer.json"))
    other = reward_model_from(sft_workdir, str(tmp_path / "rm_other"), tokenizer=str(tok_dir))
    with pytest.raises(ConfigError, match="another tokenizer"):
        stages.run(_ppo_config(sft_workdir, rm=other), str(tmp_path / "b"))


@pytest.mark.parametrize("key, value", [("sampling.top_k", 5), ("sampling.top_p", 0.9),
                                        ("sampling.greedy", True)])
def test_filtered_sampling_is_refused(sft_workdir, rm_workdir, tmp_path, key, value):
    from rlhf_jax.errors import ConfigError
    with pytest.raises(ConfigError, match="full softmax"):
        stages.run(_ppo_config(sft_workdir, **{key: value}), str(tmp_path / "p"))


def test_adaptive_kl_horizon_moves_beta_within_the_main_jobs_run():
    """At full error, the default horizon lets the controller move beta by a
    factor of at least 2 over the main job's PPO run (it moved 5% at most
    with Ziegler et al.'s 10,000 episodes)."""
    from rlhf_jax import rl
    c = load_config("instructgpt", "")
    h, t = c.ppo.algo, c.ppo.train
    coef = 1.0
    for _ in range(int(t.steps)):
        coef = float(rl.adaptive_kl_coef(coef, 10 * h.kl_target, h.kl_target, h.kl_horizon,
                                         int(t.batch_size)))
    assert coef > 2.0, coef
