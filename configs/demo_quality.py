"""When RLHF pays: the main job at several demonstrator flaw rates f.

    python -m rlhf_jax.main --config configs/demo_quality.py --workdir workdirs/demo_quality
    python -m rlhf_jax.main --config configs/demo_quality.py:tiny --workdir /tmp/dq   # minutes

InstructGPT's case for RLHF is that demonstrations are costly and imperfect
while ranking is cheap. The world's demonstrators write the correct answer
behind a chatty opener with probability f (WORLD.md, "The demonstrators").
For each f in `flaw_rates`, the main job's SFT, collect, RM, PPO-ptx and
evaluation run in `<workdir>/f<f>/` from one shared base model; `report.md`
plots the gold score (greedy and temperature 1) of the pretrained base, SFT
and PPO-ptx against f, with 95% intervals over prompts, and says from which
f PPO-ptx's gain over SFT is beyond its paired interval.
"""
import ml_collections

from configs import instructgpt, sft

POLICIES = ("pretrained", "sft", "ppo_ptx")


def get_config(arg: str = ""):
    if arg not in ("", "tiny"):
        raise ValueError(f"unknown variant {arg!r} of configs/demo_quality.py (expected '' or 'tiny')")
    c = instructgpt.get_config(arg)
    c.stage = "demo_quality"
    c.flaw_rates = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8)
    # The demonstrations at f = 0; each f reads `<this>_f<f>` (its own build).
    c.demonstrations = sft.world_demonstrations(0.0, tiny=arg == "tiny")
    c.methods = ("ppo_ptx",)
    c.evaluate.policies = ml_collections.ConfigDict({name: "" for name in POLICIES})
    c.evaluate.policy_order = POLICIES
    c.evaluate.fewshot_policy = ""
    c.evaluate.ppo_workdirs = ml_collections.ConfigDict(dict(ppo_ptx=""))
    if arg == "tiny":
        c.flaw_rates = (0.0, instructgpt.FLAW_RATE)   # the main job's f, and f = 0
    return c
