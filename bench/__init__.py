"""Side-by-side benchmarks of rlhf_jax against its peers; see bench/run.py."""
