"""The instruction world: InstructGPT's data, labelers and judge, from code.

See WORLD.md. `gold_score` is the ground-truth judge; the generators make the
pretraining corpus, demonstrations and prompts; labelers.py simulates the
human rankers (its calibrated NOISE_SCALE is computed on first use).
"""
from rlhf_jax.world.datasets import (DEMONSTRATION_CATEGORIES, DEMONSTRATOR_OPENER,
                                     DOCUMENT_SEPARATOR, N_COMPARISONS, N_CORPUS,
                                     N_DEMONSTRATIONS, N_EVAL_PER_CATEGORY, N_PPO_PROMPTS,
                                     comparison_prompts, conversation, corpus_response,
                                     demonstrations, eval_prompts, ppo_prompts,
                                     pretraining_corpus)
from rlhf_jax.world.gold import category_of, gold_score, parse_prompt, score_task
from rlhf_jax.world.labelers import (calibrate_noise_scale, inter_labeler_agreement,
                                     pairwise_agreement, rank)
from rlhf_jax.world.tasks import (BENIGN_CATEGORIES, CATEGORIES, REFUSAL, SPLITS, Task,
                                  correct_response, make_task, sample_task)

__all__ = [
    "gold_score", "score_task", "parse_prompt", "category_of",
    "REFUSAL", "CATEGORIES", "BENIGN_CATEGORIES", "DEMONSTRATION_CATEGORIES", "SPLITS",
    "Task", "make_task", "sample_task", "correct_response",
    "pretraining_corpus", "demonstrations", "ppo_prompts", "comparison_prompts", "eval_prompts",
    "corpus_response", "conversation", "DOCUMENT_SEPARATOR", "DEMONSTRATOR_OPENER",
    "rank", "pairwise_agreement", "inter_labeler_agreement", "calibrate_noise_scale",
    "N_DEMONSTRATIONS", "N_COMPARISONS", "N_PPO_PROMPTS", "N_CORPUS", "N_EVAL_PER_CATEGORY",
]
