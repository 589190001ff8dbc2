"""rlhf_jax against its peers, side by side in one process (issue 8).

    python bench/run.py                         # everything, TINY and SMOL, f32 and bf16
    python bench/run.py --only sampler,rm       # some sections
    python bench/run.py --quick                 # fewer repetitions (a smoke run)
    python bench/run.py --configs TINY --precisions bf16 --out /tmp/bench.json
    python bench/run.py --threads 1             # one thread each side (a loaded machine)

Sections (workload W and the configs of BENCH.md; medians after warm-up):
  sampler  rollout tokens/s: rlhf_jax.sampling.sample vs transformers `generate`
           (KV cache on), 16 prompts x 32 tokens, 32 new tokens, temperature 1,
           EOS never stops; TINY and SMOL.
  sampler_eos  the same with EOS stopping each row and the batch (as PPO
           samples): SMOL answering 16 instructions in its chat format, at
           most 64 new tokens, temperature 1; SMOL only (TINY's random
           weights rarely sample EOS).
  ppo      PPO iteration time (rollout + scoring + update, 1 and 4 epochs) with
           its rollout / update split: rlhf_jax.stages.ppo (sampler,
           score_rollout, ppo_update) vs TRL 1.12's `trl.experimental.ppo.PPOTrainer`
           driven whole by `train()`, its phases timed by wrapping its own
           module functions (see ppo_trl).
  rm       RM train step pairs/s: rlhf_jax.stages.rm.train_step vs TRL's
           RewardTrainer, 16 pairs x 64 tokens a step, TINY.
  flops    LM training step (rlhf_jax.stages.sft.train_step) FLOP/s on SMOL at
           sequence length 512, as a fraction of this machine's matmul peak
           measured in the same run (bf16 inputs with f32 accumulation; f32 too).
  compile  compile time of the first PPO iteration and the number of XLA
           compilations over 50 PPO iterations whose prompts vary in length
           (left-padded to one bucket), counted with jax.monitoring and
           jax_log_compiles.

After the sections, the floors (bench/roofline.py): each benchmark's matmul
FLOPs at the matmul peak measured in this run (and decoding's weight reads at
the measured memory bandwidth), the least time any implementation needs here,
and so the best ratio reachable against the peer's measured time.

Precision: "f32" is f32 on both sides; "bf16" is each side's fast path: ours
the model config's dtype policy (bf16 matmul inputs, f32 accumulation, f32
params and activations), theirs torch bf16 autocast (f32 weights). torch gets
as many threads as XLA uses (all cores, or --threads N: the process is pinned to
N cores, which XLA's pool follows). Results: a table on stdout and a JSON file
(default bench/results.json).
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _threads_from_argv(argv) -> int:
    """--threads N, read before JAX starts: XLA sizes its thread pool from the
    CPU affinity, so N < all cores pins this process to N cores (both sides)."""
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if a.startswith("--threads="):
            return int(a.split("=", 1)[1])
    return os.cpu_count()


if __name__ == "__main__" and "--hugepage-malloc" in sys.argv[1:]:
    # Both sides run in this process, so both get huge-page malloc
    # (rlhf_jax/hostenv.py; rlhf_jax.main uses it). Off by default: measured
    # here it made our SMOL PPO iteration faster and TRL's slower, so one
    # process with it would not run each side at its fastest (BENCHMARKS.md).
    from rlhf_jax import hostenv
    hostenv.reexec_with_hugepage_malloc()

THREADS = _threads_from_argv(sys.argv[1:]) if __name__ == "__main__" else os.cpu_count()
if THREADS < os.cpu_count():
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:THREADS])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from bench import common as C  # noqa: E402
from bench import roofline  # noqa: E402
from rlhf_jax import sampling  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax import train_state  # noqa: E402
from rlhf_jax.stages import sft, ppo, rm  # noqa: E402
from rlhf_jax.stages import policy_gradient as pg  # noqa: E402

SECTIONS = ("sampler", "sampler_eos", "ppo", "rm", "flops", "compile")
perf = time.perf_counter


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _torch_threads():
    import torch
    torch.set_num_threads(THREADS)
    return torch.get_num_threads()


# ---------------------------------------------------------------------------
# 1. Sampler vs generate
# ---------------------------------------------------------------------------

def bench_sampler(s: C.Setup, precisions, warm, reps):
    import torch
    toks, mask = C.prompts(s)
    jt, jm = jnp.asarray(toks), jnp.asarray(mask)
    tt, tm = torch.from_numpy(toks).long(), torch.from_numpy(mask).long()
    hf = C.hf_causal_lm(s)
    n_tokens = C.BATCH * C.NEW_TOKENS
    out = {}
    for prec in precisions:
        model = Transformer(C.with_precision(s.cfg, prec))
        seeds = iter(range(1 << 30))

        def ours():
            o = sampling.sample(model, s.params, jt, jm, jax.random.PRNGKey(next(seeds)),
                                max_new_tokens=C.NEW_TOKENS, eos_id=s.eos_id, pad_id=s.pad_id,
                                temperature=1.0, stop_at_eos=False)
            jax.block_until_ready(o.tokens)
            return o

        made = int(np.asarray(ours().mask).sum())
        assert made == n_tokens, made
        t_ours = C.time_calls(ours, warm, reps)

        def theirs():
            with torch.no_grad(), C.torch_precision(prec):
                o = hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=C.NEW_TOKENS,
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                use_cache=True)
            assert o.shape == (C.BATCH, C.PROMPT_LEN + C.NEW_TOKENS), o.shape
            return o

        t_theirs = C.time_calls(theirs, warm, reps)
        r = {"ours_tokens_per_s": n_tokens / C.median(t_ours),
             "theirs_tokens_per_s": n_tokens / C.median(t_theirs),
             "ours_s": t_ours, "theirs_s": t_theirs}
        r["ratio"] = r["ours_tokens_per_s"] / r["theirs_tokens_per_s"]
        log(f"sampler {s.name} {prec}: ours {r['ours_tokens_per_s']:.0f} tok/s, generate "
            f"{r['theirs_tokens_per_s']:.0f} tok/s, ratio {r['ratio']:.2f}")
        out[prec] = r
    del hf
    C.free()
    return out


def bench_sampler_eos(s: C.Setup, precisions, warm, reps):
    """The sampler with EOS stopping: SMOL's answers to C.INSTRUCTIONS at
    temperature 1, at most C.EOS_NEW_TOKENS, each side stopping when every row
    has sampled its EOS. The two sides draw different samples, so each call's
    length differs: tokens/s is every timed call's tokens (through each row's
    EOS) over their time, and the steps decoded are reported beside it."""
    import torch
    toks, mask = C.instruction_prompts(s)
    width = toks.shape[1]
    jt, jm = jnp.asarray(toks), jnp.asarray(mask)
    tt, tm = torch.from_numpy(toks).long(), torch.from_numpy(mask).long()
    hf = C.hf_causal_lm(s)
    hf.generation_config.eos_token_id = s.eos_id
    out = {}
    for prec in precisions:
        model = Transformer(C.with_precision(s.cfg, prec))
        seeds = iter(range(1 << 30))
        made = {"ours": [], "theirs": []}       # (tokens, steps) of each call

        def ours():
            o = sampling.sample(model, s.params, jt, jm, jax.random.PRNGKey(next(seeds)),
                                max_new_tokens=C.EOS_NEW_TOKENS, eos_id=s.eos_id, pad_id=s.pad_id,
                                temperature=1.0, stop_at_eos=True)
            n = C.tokens_through_eos(np.asarray(o.tokens), s.eos_id)
            assert (n == np.asarray(o.mask).sum(1)).all()
            made["ours"].append((int(n.sum()), int(o.steps)))

        def theirs():
            torch.manual_seed(next(seeds))
            with torch.no_grad(), C.torch_precision(prec):
                o = hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=C.EOS_NEW_TOKENS,
                                do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                use_cache=True, eos_token_id=s.eos_id, pad_token_id=s.pad_id)
            resp = o[:, width:].numpy()
            made["theirs"].append((int(C.tokens_through_eos(resp, s.eos_id).sum()),
                                   resp.shape[1]))

        t_ours = C.time_calls(ours, warm, reps)
        t_theirs = C.time_calls(theirs, warm, reps)
        r = {"ours_s": t_ours, "theirs_s": t_theirs, "new_tokens": C.EOS_NEW_TOKENS}
        for side, times in (("ours", t_ours), ("theirs", t_theirs)):
            timed = made[side][warm:]
            r[f"{side}_tokens_per_s"] = sum(n for n, _ in timed) / sum(times)
            r[f"{side}_tokens_per_call"] = sum(n for n, _ in timed) / len(timed)
            r[f"{side}_steps_per_call"] = sum(k for _, k in timed) / len(timed)
        r["ratio"] = r["ours_tokens_per_s"] / r["theirs_tokens_per_s"]
        log(f"sampler (EOS stops) {s.name} {prec}: ours {r['ours_tokens_per_s']:.0f} tok/s "
            f"({r['ours_steps_per_call']:.1f} steps a call), generate "
            f"{r['theirs_tokens_per_s']:.0f} tok/s ({r['theirs_steps_per_call']:.1f} steps), "
            f"ratio {r['ratio']:.2f}")
        out[prec] = r
    del hf
    C.free()
    return out


# ---------------------------------------------------------------------------
# 2. PPO iteration: ours
# ---------------------------------------------------------------------------

def ppo_hparams(epochs: int, eos_id: int) -> ml_collections.FrozenConfigDict:
    """Workload W's PPO (BENCH.md); vf_coef 0.1 as TRL's default."""
    return ml_collections.FrozenConfigDict(dict(
        temperature=1.0, missing_eos_penalty=1.0, gamma=1.0, lam=0.95, whiten_advantages=True,
        clip=0.2, vf_clip=0.2, vf_coef=0.1, ptx_coef=0.0, epochs=epochs, minibatches=1,
        adaptive_kl=False, kl_target=6.0, kl_horizon=10000.0, ema_decay=0.0, eos_id=eos_id))


def adamw(lr=3e-6, weight_decay=0.01, grad_clip=0.0):
    return train_state.make_optimizer(ml_collections.ConfigDict(dict(
        steps=100000, warmup_steps=0, lr=lr, end_lr_ratio=1.0, grad_clip=grad_clip, b1=0.9,
        b2=0.999, weight_decay=weight_decay)))


def _train_state(params, opt, seed):
    return train_state.TrainState(step=jnp.int32(0), params=params,
                                  opt_state=jax.jit(opt.init)(params),
                                  rng=jax.random.PRNGKey(seed), nonfinite=jnp.int32(0))


class OurPPO:
    """One PPO iteration exactly as rlhf_jax.stages.ppo.iteration_fn runs it (the
    sampler, the jitted score_rollout, the jitted, donated ppo_update),
    without checkpoints and metrics files. EOS never stops (workload W)."""

    def __init__(self, s: C.Setup, precision: str, epochs: int):
        cfg = C.with_precision(s.cfg, precision)
        self.s = s
        self.models = ppo.Models(policy=Transformer(cfg), value=Transformer(cfg.replace(head="scalar")),
                                 reward=Transformer(cfg.replace(head="scalar")))
        self.hp = ppo_hparams(epochs, s.eos_id)
        opt = adamw()
        self.ref_params = s.params
        self.reward_params = s.scalar_params()
        policy = _train_state(jax.tree_util.tree_map(jnp.copy, s.params), opt, 1)
        value = _train_state(s.scalar_params(), opt, 2)
        self.state = ppo.PPOState(step=jnp.int32(0), policy=policy, value=value,
                                  kl_coef=jnp.float32(0.05), ema_params=None,
                                  ema_updates=jnp.int32(0))
        self.score_fn = jax.jit(functools.partial(ppo.score_rollout, models=self.models, hp=self.hp))
        self.update_fn = jax.jit(functools.partial(ppo.ppo_update, models=self.models, policy_opt=opt,
                                                   value_opt=opt, hp=self.hp),
                                 donate_argnums=0)
        self.base_rng = jax.random.PRNGKey(17)
        self.it = 0

    def iteration(self, toks, mask) -> dict:
        s, hp = self.s, self.hp
        rng = jax.random.fold_in(self.base_rng, self.it)
        self.it += 1
        t0 = perf()
        out = sampling.sample(self.models.policy, self.state.policy.params, toks, mask,
                              jax.random.fold_in(rng, 0), max_new_tokens=C.NEW_TOKENS,
                              eos_id=s.eos_id, pad_id=s.pad_id, temperature=hp.temperature,
                              stop_at_eos=False)
        jax.block_until_ready(out.tokens)
        t_gen = perf()
        idx = np.asarray(pg.minibatch_indices(jax.random.fold_in(rng, 1), toks.shape[0],
                                              hp.epochs, hp.minibatches))
        packed, packed_mbs = pg.pack(mask, out, idx)
        rollout, stats = self.score_fn(self.state.policy.params, self.ref_params,
                                       self.state.value.params, self.reward_params, toks,
                                       out.tokens, out.mask, out.finished, self.state.kl_coef,
                                       packed)
        jax.block_until_ready(rollout)
        t1 = perf()
        self.state, upd = self.update_fn(self.state, rollout, idx, packed_mbs, None, stats["kl"])
        jax.block_until_ready(self.state.step)
        jax.device_get((stats, upd))           # the loop logs them
        t2 = perf()
        return {"iteration": t2 - t0, "rollout": t1 - t0, "generate": t_gen - t0,
                "score": t1 - t_gen, "update": t2 - t1}


def _summary(iters: list[dict]) -> dict:
    keys = iters[0].keys() if iters else ()
    return {k: C.median([x[k] for x in iters]) for k in keys}


def ppo_ours(s: C.Setup, precision: str, epochs: int, warm: int, reps: int) -> dict:
    toks, mask = (jnp.asarray(x) for x in C.prompts(s))
    runner = OurPPO(s, precision, epochs)
    with C.CompileCounter() as cc:
        t0 = perf()
        first = runner.iteration(toks, mask)
        first_wall = perf() - t0
        first_compiles, first_compile_s = cc.count, cc.seconds
        cc.reset()
        for _ in range(max(warm - 1, 0)):
            runner.iteration(toks, mask)
        iters = [runner.iteration(toks, mask) for _ in range(reps)]
        later = cc.count
    out = {"median": _summary(iters), "iterations": iters, "first_iteration_s": first_wall,
           "first_iteration": first, "first_compiles": first_compiles,
           "first_compile_s": first_compile_s, "compiles_after_first": later}
    del runner
    C.free()
    return out


# ---------------------------------------------------------------------------
# 2. PPO iteration: TRL
# ---------------------------------------------------------------------------

def ppo_trl(s: C.Setup, precision: str, epochs: int, warm: int, reps: int) -> dict:
    """TRL's PPOTrainer.train() for warm + reps iterations (PPOConfig of workload W).

    Phases, from TRL's own calls (its module functions wrapped in place):
      iteration i = between on_step_end callbacks i-1 and i (the first starts
                    at train()); it includes TRL's end-of-iteration gc.collect;
      generate    = trl.experimental.ppo.ppo_trainer.batch_generation;
      rollout     = iteration start -> return of masked_whiten (the advantage
                    whitening, the last step of TRL's scoring phase; called once
                    an iteration since whiten_rewards is off): generation, the
                    ref / value / reward forwards, rewards and GAE;
      update      = the rest: the PPO epochs (forward, backward, AdamW) and TRL's
                    per-iteration metrics.
    bf16: TRL's PPOTrainer builds its own Accelerator without the TrainingArguments'
    mixed precision, so `bf16=True` alone changes nothing; train() runs under
    torch.autocast(cpu, bf16), which covers generation, scoring and the update.
    """
    import datasets
    import transformers
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as tp

    toks, _ = C.prompts(s)
    n_iter = warm + reps
    ds = datasets.Dataset.from_dict({"input_ids": toks.tolist()})
    tmp = tempfile.mkdtemp(prefix="bench_trl_ppo_")
    args = PPOConfig(
        output_dir=tmp, per_device_train_batch_size=C.BATCH, gradient_accumulation_steps=1,
        num_mini_batches=1, local_rollout_forward_batch_size=C.BATCH, num_ppo_epochs=epochs,
        response_length=C.NEW_TOKENS, temperature=1.0, total_episodes=C.BATCH * n_iter,
        learning_rate=3e-6, weight_decay=0.01, lr_scheduler_type="constant", kl_coef=0.05,
        kl_estimator="k1", cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
        whiten_rewards=False, missing_eos_penalty=1.0, stop_token=None, num_sample_generations=0,
        report_to="none", save_strategy="no", use_cpu=True, bf16=precision == "bf16",
        gradient_checkpointing=False, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    value_params = s.scalar_params()
    policy, ref = C.hf_causal_lm(s), C.hf_causal_lm(s)
    value, reward_model = C.hf_scalar(s, value_params), C.hf_scalar(s, value_params)
    marks = {"gen": [], "whiten": [], "end": [], "shapes": []}

    orig_bg, orig_w = tp.batch_generation, tp.masked_whiten

    def batch_generation(*a, **k):
        t = perf()
        r = orig_bg(*a, **k)
        marks["gen"].append(perf() - t)
        marks["shapes"].append(tuple(r[0].shape))
        return r

    def masked_whiten(*a, **k):
        r = orig_w(*a, **k)
        marks["whiten"].append(perf())
        return r

    class Marks(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks["end"].append(perf())

    tp.batch_generation, tp.masked_whiten = batch_generation, masked_whiten
    try:
        trainer = PPOTrainer(args=args, processing_class=C.hf_tokenizer(s), model=policy,
                             ref_model=ref, reward_model=reward_model, train_dataset=ds, value_model=value,
                             eval_dataset=ds, callbacks=[Marks()])
        for cb in (transformers.PrinterCallback, transformers.trainer_callback.ProgressCallback):
            trainer.remove_callback(cb)
        start = perf()
        with C.torch_precision(precision):
            trainer.train()
    finally:
        tp.batch_generation, tp.masked_whiten = orig_bg, orig_w
    assert len(marks["end"]) == n_iter == len(marks["whiten"]), marks
    assert all(sh == (C.BATCH, C.PROMPT_LEN + C.NEW_TOKENS) for sh in marks["shapes"]), marks["shapes"]
    starts = [start] + marks["end"][:-1]
    iters = [{"iteration": e - b, "rollout": w - b, "generate": g, "score": w - b - g,
              "update": e - w}
             for b, w, e, g in zip(starts, marks["whiten"], marks["end"], marks["gen"])]
    out = {"median": _summary(iters[warm:]), "iterations": iters[warm:],
           "first_iteration_s": iters[0]["iteration"]}
    del trainer, policy, ref, value, reward_model
    C.free()
    return out


def bench_ppo(s: C.Setup, precisions, epochs_list, warm, reps, trl_warm, trl_reps):
    out = {}
    for prec in precisions:
        for epochs in epochs_list:
            key = f"{prec}/{epochs}ep"
            ours = ppo_ours(s, prec, epochs, warm, reps)
            theirs = ppo_trl(s, prec, epochs, trl_warm, trl_reps)
            r = {"ours": ours, "theirs": theirs,
                 "ratio": theirs["median"]["iteration"] / ours["median"]["iteration"]}
            mo, mt = ours["median"], theirs["median"]
            log(f"ppo {s.name} {key}: ours {mo['iteration']:.3f} s (rollout {mo['rollout']:.3f}, "
                f"update {mo['update']:.3f}); TRL {mt['iteration']:.3f} s (rollout "
                f"{mt['rollout']:.3f}, update {mt['update']:.3f}); speed ratio {r['ratio']:.2f}")
            out[key] = r
    return out


# ---------------------------------------------------------------------------
# 3. Reward model train step
# ---------------------------------------------------------------------------

def rm_batch(s: C.Setup, seed=0):
    rng = np.random.RandomState(seed)
    lo = max(s.pad_id, s.eos_id) + 1
    toks = rng.randint(lo, s.cfg.vocab_size, (C.RM_PAIRS, 2, C.RM_LEN)).astype(np.int32)
    toks[:, :, -1] = s.eos_id                # prompt + response + EOS
    return toks


def rm_ours(s: C.Setup, precision: str, warm: int, reps: int) -> dict:
    cfg = C.with_precision(s.cfg, precision).replace(head="scalar")
    model = Transformer(cfg, deterministic=False)   # as compile_supervised builds it
    opt = adamw(lr=1e-5, weight_decay=0.01, grad_clip=1.0)
    state = _train_state(s.scalar_params(), opt, 0)
    toks = rm_batch(s)
    batch = rm.pack({"tokens": toks, "attn_mask": np.ones(toks.shape, np.int32),
                     "last_index": np.full((C.RM_PAIRS, 2), C.RM_LEN - 1, np.int32),
                     "ranks": np.tile([[0, 1]], (C.RM_PAIRS, 1)).astype(np.int32),
                     "valid": np.ones((C.RM_PAIRS, 2), bool)})
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    step = jax.jit(functools.partial(rm.train_step, model=model, optimizer=opt),
                   donate_argnums=0)
    holder = [state]

    def one():
        holder[0], m = step(holder[0], batch)
        jax.device_get(m)
    times = C.time_calls(one, warm, reps)
    del holder
    C.free()
    return {"step_s": times, "pairs_per_s": C.RM_PAIRS / C.median(times)}


def rm_trl(s: C.Setup, precision: str, warm: int, reps: int) -> dict:
    """TRL's RewardTrainer.train() for warm + reps steps; a step is timed from
    on_step_begin to on_step_end (forward, backward, clipping, AdamW)."""
    import datasets
    import transformers
    from trl import RewardConfig, RewardTrainer
    n = warm + reps
    toks = rm_batch(s)
    rows = {"chosen_ids": [], "rejected_ids": []}
    for _ in range(n):
        rows["chosen_ids"] += toks[:, 0].tolist()
        rows["rejected_ids"] += toks[:, 1].tolist()
    ds = datasets.Dataset.from_dict(rows)
    args = RewardConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_rm_"), per_device_train_batch_size=C.RM_PAIRS,
        max_steps=n, learning_rate=1e-5, weight_decay=0.01, lr_scheduler_type="constant",
        max_grad_norm=1.0, report_to="none", save_strategy="no", logging_strategy="no",
        use_cpu=True, bf16=precision == "bf16", gradient_checkpointing=False, seed=0,
        disable_tqdm=True, dataloader_num_workers=0, max_length=None)
    model = C.hf_scalar(s, s.scalar_params())
    begins, ends = [], []

    class Marks(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            begins.append(perf())

        def on_step_end(self, args, state, control, **kw):
            ends.append(perf())

    trainer = RewardTrainer(model=model, args=args, train_dataset=ds,
                            processing_class=C.hf_tokenizer(s), callbacks=[Marks()])
    for cb in (transformers.PrinterCallback, transformers.trainer_callback.ProgressCallback):
        trainer.remove_callback(cb)
    with C.torch_precision(precision):
        trainer.train()
    assert len(ends) == n == len(begins), (len(begins), len(ends))
    times = [e - b for b, e in zip(begins, ends)][warm:]
    between = [b - a for a, b in zip(ends, ends[1:])][warm:]
    del trainer, model
    C.free()
    return {"step_s": times, "pairs_per_s": C.RM_PAIRS / C.median(times),
            "end_to_end_step_s": between,
            "pairs_per_s_end_to_end": C.RM_PAIRS / C.median(between)}


def bench_rm(s: C.Setup, precisions, warm, reps):
    out = {}
    for prec in precisions:
        ours, theirs = rm_ours(s, prec, warm, reps), rm_trl(s, prec, warm, reps)
        r = {"ours": ours, "theirs": theirs, "ratio": ours["pairs_per_s"] / theirs["pairs_per_s"]}
        log(f"rm {s.name} {prec}: ours {ours['pairs_per_s']:.0f} pairs/s, TRL "
            f"{theirs['pairs_per_s']:.0f} pairs/s (end to end {theirs['pairs_per_s_end_to_end']:.0f}),"
            f" ratio {r['ratio']:.2f}")
        out[prec] = r
    return out


# ---------------------------------------------------------------------------
# 4. Training FLOP/s against the measured matmul peak
# ---------------------------------------------------------------------------

def matmul_peak(reps: int) -> dict:
    """Best FLOP/s of one jitted matmul over a few shapes (M, K, N), per precision."""
    shapes = [(2048, 2048, 2048), (4096, 4096, 4096), (2048, 576, 1536), (2048, 1536, 576)]
    out = {}
    for prec in ("f32", "bf16"):
        best = {}
        for m, k, n in shapes:
            a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
            b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
            if prec == "bf16":
                a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
                f = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
            else:
                f = jax.jit(lambda x, y: jnp.dot(x, y))
            t = C.median(C.time_calls(lambda: f(a, b).block_until_ready(), 2, reps))
            best[f"{m}x{k}x{n}"] = 2 * m * k * n / t
        out[prec] = {"by_shape": best, "peak": max(best.values())}
        log(f"matmul peak {prec}: {out[prec]['peak'] / 1e9:.0f} GFLOP/s "
            + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in best.items()))
    C.free()
    return out


def bench_flops(s: C.Setup, precisions, batch, seq, warm, reps, peak) -> dict:
    out = {"batch": batch, "seq": seq}
    toks = np.random.RandomState(0).randint(3, s.cfg.vocab_size, (batch, seq)).astype(np.int32)
    data = {"tokens": jnp.asarray(toks), "attn_mask": jnp.ones((batch, seq), jnp.int32),
            "loss_mask": jnp.ones((batch, seq), jnp.float32)}
    flops = roofline.train_flops(s.cfg, batch, seq)
    for prec in precisions:
        model = Transformer(C.with_precision(s.cfg, prec), deterministic=False)
        opt = adamw(lr=1e-5)
        state = _train_state(jax.tree_util.tree_map(jnp.copy, s.params), opt, 0)
        step = jax.jit(functools.partial(sft.train_step, model=model, optimizer=opt),
                       donate_argnums=0).lower(state, data).compile()
        try:
            cost = step.cost_analysis()
            cost = cost[0] if isinstance(cost, (list, tuple)) else cost
            xla_flops = float(cost.get("flops", float("nan")))
        except Exception as e:  # cost analysis is best effort
            log(f"cost_analysis failed: {e}")
            xla_flops = float("nan")
        holder = [state]

        def one():
            holder[0], m = step(holder[0], data)
            jax.device_get(m)
        times = C.time_calls(one, warm, reps)
        t = C.median(times)
        p = peak[prec]["peak"]
        r = {"step_s": times, "model_flops": flops, "xla_flops": xla_flops,
             "flops_per_s": flops / t, "peak": p, "fraction_of_peak": flops / t / p,
             "fraction_of_bf16_peak": flops / t / peak["bf16"]["peak"],
             "tokens_per_s": batch * seq / t}
        log(f"flops {s.name} {prec}: {t:.2f} s/step, {flops / t / 1e9:.0f} GFLOP/s = "
            f"{100 * r['fraction_of_peak']:.0f}% of the {prec} peak "
            f"({100 * r['fraction_of_bf16_peak']:.0f}% of bf16 peak); XLA counts "
            f"{xla_flops / 1e12:.2f} TFLOP vs model {flops / 1e12:.2f}")
        out[prec] = r
        del holder, state
        C.free()
    return out


# ---------------------------------------------------------------------------
# 5. Compilations
# ---------------------------------------------------------------------------

class _LogCounter(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record):
        if "Finished XLA compilation" in record.getMessage():
            self.count += 1


def bench_compile(s: C.Setup, precision: str, iterations: int) -> dict:
    """`iterations` PPO iterations (1 epoch) whose prompts have random lengths
    (4..32 tokens), left-padded to one 32-token bucket as the prompt loader
    does; compilations counted after the first iteration (the warm-up)."""
    rng = np.random.RandomState(1)
    handler = _LogCounter()
    jax_logger = logging.getLogger("jax")
    jax_logger.addHandler(handler)
    prev = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        runner = OurPPO(s, precision, 1)
        handler.count = 0
        lengths_seen = set()
        with C.CompileCounter() as cc:
            t0 = perf()
            toks, mask = C.prompts(s, seed=0, lengths=rng.randint(4, C.PROMPT_LEN + 1, C.BATCH))
            first = runner.iteration(jnp.asarray(toks), jnp.asarray(mask))
            first_wall = perf() - t0
            first_count, first_s, first_logged = cc.count, cc.seconds, handler.count
            cc.reset()
            handler.count = 0
            times = []
            for i in range(1, iterations):
                lengths = rng.randint(4, C.PROMPT_LEN + 1, C.BATCH)
                lengths_seen.update(lengths.tolist())
                toks, mask = C.prompts(s, seed=i, lengths=lengths)
                times.append(runner.iteration(jnp.asarray(toks), jnp.asarray(mask))["iteration"])
            after, after_logged, after_names = cc.count, handler.count, list(cc.names)
    finally:
        jax.config.update("jax_log_compiles", prev)
        jax_logger.removeHandler(handler)
    out = {"precision": precision, "iterations": iterations, "first_iteration_s": first_wall,
           "first_iteration": first, "first_compiles": first_count,
           "first_compile_s": first_s, "first_compiles_logged": first_logged,
           "compiles_after_warmup": after, "compiles_after_warmup_logged": after_logged,
           "recompiled": after_names, "distinct_prompt_lengths": len(lengths_seen),
           "median_iteration_s": C.median(times)}
    log(f"compile {s.name} {precision}: first iteration {first_wall:.1f} s "
        f"({first_count} compilations, {first_s:.1f} s compiling); after warm-up "
        f"{after} compilations (logged: {after_logged}) over {iterations - 1} iterations, "
        f"{len(lengths_seen)} distinct prompt lengths")
    del runner
    C.free()
    return out


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

def table(res: dict) -> str:
    rows = ["| benchmark | config | precision | ours | theirs | ratio ours/theirs |",
            "|---|---|---|---|---|---|"]
    for name, by_prec in res.get("sampler", {}).items():
        for prec, r in by_prec.items():
            rows.append(f"| sampler tokens/s | {name} | {prec} | {r['ours_tokens_per_s']:.0f} | "
                        f"{r['theirs_tokens_per_s']:.0f} (generate) | {r['ratio']:.2f} |")
    for name, by_prec in res.get("sampler_eos", {}).items():
        for prec, r in by_prec.items():
            rows.append(f"| sampler tokens/s, EOS stops (steps a call) | {name} | {prec} | "
                        f"{r['ours_tokens_per_s']:.0f} ({r['ours_steps_per_call']:.1f}) | "
                        f"{r['theirs_tokens_per_s']:.0f} ({r['theirs_steps_per_call']:.1f}) "
                        f"(generate) | {r['ratio']:.2f} |")
    for name, by_key in res.get("ppo", {}).items():
        for key, r in by_key.items():
            prec, ep = key.split("/")
            mo, mt = r["ours"]["median"], r["theirs"]["median"]
            rows.append(
                f"| PPO s/iteration, {ep} (rollout + update) | {name} | {prec} | "
                f"{mo['iteration']:.3f} ({mo['rollout']:.3f} + {mo['update']:.3f}) | "
                f"{mt['iteration']:.3f} ({mt['rollout']:.3f} + {mt['update']:.3f}) (TRL) | "
                f"{r['ratio']:.2f} (speed) |")
    for name, by_prec in res.get("rm", {}).items():
        for prec, r in by_prec.items():
            rows.append(f"| RM pairs/s (16 x 64) | {name} | {prec} | {r['ours']['pairs_per_s']:.0f} | "
                        f"{r['theirs']['pairs_per_s']:.0f} (TRL) | {r['ratio']:.2f} |")
    fl = res.get("flops", {})
    for name, r in fl.items():
        if name in ("peak",):
            continue
        for prec in ("f32", "bf16"):
            if prec in r:
                x = r[prec]
                rows.append(f"| LM train step GFLOP/s (B={r['batch']}, T={r['seq']}) | {name} | {prec} | "
                            f"{x['flops_per_s'] / 1e9:.0f} | peak {x['peak'] / 1e9:.0f} | "
                            f"{100 * x['fraction_of_peak']:.0f}% of {prec} peak, "
                            f"{100 * x['fraction_of_bf16_peak']:.0f}% of bf16 peak |")
    for name, r in res.get("compile", {}).items():
        rows.append(f"| PPO compiles after warm-up / {r['iterations'] - 1} iterations | {name} | "
                    f"{r['precision']} | {r['compiles_after_warmup']} | - | first iteration "
                    f"{r['first_iteration_s']:.1f} s, {r['first_compiles']} compiles |")
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS))
    ap.add_argument("--configs", default="TINY,SMOL")
    ap.add_argument("--precisions", default="f32,bf16")
    ap.add_argument("--epochs", default="1,4", help="PPO epochs to run")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions (smoke run)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="threads for both sides (default: all cores; fewer pins the process)")
    ap.add_argument("--compile-iterations", type=int, default=50)
    ap.add_argument("--hugepage-malloc", action="store_true",
                    help="restart with glibc.malloc.hugetlb=1 for both sides (rlhf_jax/hostenv.py)")
    ap.add_argument("--flops-batch", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results.json"))
    a = ap.parse_args(argv)
    only = [x for x in a.only.split(",") if x]
    bad = set(only) - set(SECTIONS)
    if bad:
        ap.error(f"unknown sections {sorted(bad)}")
    configs = [x.upper() for x in a.configs.split(",") if x]
    precisions = [x for x in a.precisions.split(",") if x]
    epochs_list = [int(x) for x in a.epochs.split(",") if x]
    q = a.quick

    res = {"command": " ".join([os.path.basename(sys.executable), "bench/run.py"] + sys.argv[1:]),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "load_average_start": C.load_average(), "machine": C.machine()}
    res["threads"] = THREADS
    res["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    if any(x in only for x in ("sampler", "sampler_eos", "ppo", "rm")):
        res["torch_threads"] = _torch_threads()
    log(f"machine {res['machine']['cpu']}, {res['machine']['cores']} cores; torch threads "
        f"{res.get('torch_threads')}; load {res['load_average_start']}")
    work = tempfile.mkdtemp(prefix="bench_")
    tempfile.tempdir = work      # TRL's output dirs too; all removed at the end
    setups = {}

    def setup(name):
        if name not in setups:
            t0 = perf()
            setups[name] = C.make_tiny(work) if name == "TINY" else C.make_smol(work)
            log(f"{name}: {setups[name].n_params / 1e6:.2f} M params, exported in {perf() - t0:.1f} s")
        return setups[name]

    def save():
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=float)

    t_all = perf()
    for name in configs:
        small = name == "TINY"
        if "sampler" in only:
            res.setdefault("sampler", {})[name] = bench_sampler(
                setup(name), precisions, warm=2 if small else 1,
                reps=(3 if q else 10) if small else (2 if q else 3))
            save()
        if "sampler_eos" in only and not small:
            res.setdefault("sampler_eos", {})[name] = bench_sampler_eos(
                setup(name), precisions, warm=1, reps=2 if q else 5)
            save()
        if "ppo" in only:
            res.setdefault("ppo", {})[name] = bench_ppo(
                setup(name), precisions, epochs_list, warm=2 if small else 1,
                reps=(3 if q else 10) if small else (2 if q else 3),
                trl_warm=2 if small else 1, trl_reps=(3 if q else 10) if small else 2)
            save()
        if "rm" in only and small:
            res.setdefault("rm", {})[name] = bench_rm(setup(name), precisions, warm=3,
                                                      reps=5 if q else 20)
            save()
        if "compile" in only and small:
            res.setdefault("compile", {})[name] = bench_compile(
                setup(name), precisions[-1], 10 if q else a.compile_iterations)
            save()
    peak = None
    if "flops" in only:
        peak = matmul_peak(3 if q else 5)
        res["flops"] = {"peak": peak}
        res["flops"]["SMOL"] = bench_flops(setup("SMOL"), precisions, a.flops_batch, 512,
                                           warm=1, reps=2 if q else 3, peak=peak)
        save()
    if any(x in only for x in ("sampler", "ppo", "rm")):
        # The floors: this work's FLOPs (and decoding's weight bytes) at the
        # matmul peak and memory bandwidth measured now, in this process.
        if peak is None:
            peak = matmul_peak(3 if q else 5)
        bandwidth, llc = roofline.memory_bandwidth(3 if q else 5), roofline.last_level_cache_bytes()
        log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s (sum over 512 MiB); last-level cache "
            f"{llc / (1 << 20):.0f} MiB")
        res["roofline"] = {"peak": peak, "bandwidth": bandwidth, "llc_bytes": llc,
                           **roofline.floors(res, {k: v.cfg for k, v in setups.items()}, peak,
                                             bandwidth, llc)}
        save()
    shutil.rmtree(work, ignore_errors=True)
    res["load_average_end"] = C.load_average()
    res["wall_s"] = perf() - t_all
    save()
    print("\n" + table(res) + "\n", flush=True)
    if "roofline" in res:
        print("Floors at this machine's measured peak (best possible ratio = theirs / floor):\n"
              + roofline.table({k: v for k, v in res["roofline"].items()
                                if k in ("sampler", "ppo", "rm")}) + "\n", flush=True)
    log(f"results in {a.out}; load average start {res['load_average_start']}, end "
        f"{res['load_average_end']}; {res['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
