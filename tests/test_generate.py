"""`generate`'s length budget: derived from the prompts and the checkpoint's
context where the config leaves it 0, kept where set, and a one-line error
naming the keys where the values set cannot fit."""
import pytest

from rlhf_jax.errors import ConfigError
from rlhf_jax.stages.generate import prompt_limit, sampling_budget


def test_derived_budget_fits_the_longest_prompt_and_the_rest_of_the_context():
    assert sampling_budget([5, 17, 9], 128, 0, 0) == (17, 111)
    # README's example: sft.py:tiny's 128-token model under generate's defaults.
    assert sampling_budget([20], 128, 0, 0) == (20, 108)


def test_values_set_are_kept():
    assert sampling_budget([5, 17], 128, 88, 0) == (88, 40)
    assert sampling_budget([5, 17], 128, 0, 48) == (17, 48)
    assert sampling_budget([5, 17], 128, 40, 8) == (40, 8)


def test_settings_that_cannot_fit_name_both_keys():
    with pytest.raises(ConfigError, match=r"data\.max_prompt_len \+ sampling\.max_new_tokens = "
                                          r"88 \+ 48 exceeds the model's context 128"):
        prompt_limit(128, 88, 48)
    with pytest.raises(ConfigError, match=r"--config\.data\.max_prompt_len \(0 derives"):
        sampling_budget([3], 128, 128, 0)
    with pytest.raises(ConfigError, match=r"--config\.sampling\.max_new_tokens \(0 takes"):
        sampling_budget([3], 64, 0, 64)


def test_a_prompt_over_the_limit_names_what_set_the_limit():
    with pytest.raises(ConfigError, match=r"longest prompt is 100 tokens, more than 88 "
                                          r"\(data\.max_prompt_len=88\).*--config\.data\."
                                          r"max_prompt_len"):
        sampling_budget([10, 100], 128, 88, 0)
    with pytest.raises(ConfigError, match=r"more than 80 \(the model's context 128 less "
                                          r"sampling\.max_new_tokens=48\).*--config\.sampling"
                                          r"\.max_new_tokens"):
        sampling_budget([81], 128, 0, 48)
    # Nothing set: only the prompt itself can change; one new token must fit.
    assert prompt_limit(128, 0, 0)[0] == 127
    with pytest.raises(ConfigError, match=r"more than 127 .*shorten or drop"):
        sampling_budget([128], 128, 0, 0)
