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
