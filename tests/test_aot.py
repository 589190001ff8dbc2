"""rlhf_jax.aot: topologies, the report, optimizer-state shardings, and (where
libtpu is installed) a real compile for a small TPU slice."""
import jax
import pytest

from configs import ppo as ppo_config
from configs import sft as sft_config
from rlhf_jax import aot, aot_report, tpu_topology
from rlhf_jax.models import presets
from rlhf_jax.models.transformer import Transformer
from rlhf_jax import sharding, train_state
from rlhf_jax.errors import ConfigError
from rlhf_jax.models import resolve

GiB = aot.GiB


def test_topology_names_follow_cloud_tpu():
    t = tpu_topology.topology("v5p-128")          # TensorCores: 64 chips, a full 4x4x4 torus
    assert (t.topology_name, t.chips, t.chip_config_name, t.wrap, t.hbm_gib) == \
        ("v5:4x4x4", 64, "megacore", (True, True, True), 95.0)
    t = tpu_topology.topology("v5e-256")          # chips
    assert (t.topology_name, t.chips, t.wrap, t.hbm_gib) == \
        ("v5e:16x16", 256, (True, True, False), 16.0)
    assert tpu_topology.topology("v4-8").topology_name == "v4:2x2x1"
    for bad in ("v5p-6", "v9-8", "v5e"):
        with pytest.raises(ValueError, match="topology"):
            tpu_topology.topology(bad)


def _record(step, peak_gib, hbm=16.0, **kw):
    r = dict(topology="v5e-16", chips=16, device_kind="TPU v5 lite", hbm_gib=hbm, stage="ppo",
             model="llama3_8b", layers=32, params=8_030_261_248, batch_size=64,
             mesh={"data": 1, "fsdp": 16, "tensor": 1}, matmul="bf16", activations="bfloat16",
             remat=True, jax="0.10.2", libtpu="0.0.42.1", step=step, args=GiB, outputs=GiB,
             aliased=GiB, temp=GiB, code=0, total=peak_gib * GiB, other=0,
             peak=peak_gib * GiB, flops=1.6e15, compile_s=1.0)
    r.update(kw)
    r["fits"] = r["peak"] <= hbm * GiB
    return r


def test_table_reports_the_worst_step_and_does_not_fit():
    records = [_record("sample", 9.0), _record("score", 12.5), _record("update", 17.25)]
    table = aot_report.markdown_table(records)
    row = table.splitlines()[2]
    assert "| llama3_8b | ppo | v5e-16 (16) | 1 x 16 x 1 | 64 |" in row
    assert "17.2 (update)" in row and row.endswith("| 16 | **no** |")
    report = aot_report.format_report(records)
    assert "GiB per chip" in report and "NO" in report.splitlines()[-1]
    assert "1600.0" in report and "100.00" in report     # TFLOP per step; per chip (16)


def test_table_extrapolates_fewer_layers_to_the_presets_depth():
    # 2 and 4 layers compiled: +0.25 GiB a layer -> 32 layers at 10.5 GiB.
    records = [_record("train_step", 3.0, layers=2, stage="sft"),
               _record("train_step", 3.5, layers=4, stage="sft")]
    row = aot_report.markdown_table(records).splitlines()[2]
    assert "10.5 (train_step, at least: from 2 and 4 layers)" in row and row.endswith("| 16 | yes |")
    records[1]["peak"] = 4.0 * GiB                  # +0.5 a layer: 18 GiB, over 16
    assert aot_report.markdown_table(records).endswith("| 16 | **no** |")


def test_presets_have_the_published_sizes():
    sizes = {}
    for name in ("llama3_8b", "llama3_70b"):
        cfg = presets.preset_config(name)
        abstract = jax.eval_shape(
            lambda r: Transformer(cfg).init(r, jax.numpy.zeros((1, 8), "int32"))["params"],
            jax.random.PRNGKey(0))
        sizes[name] = sum(x.value.size for x in jax.tree_util.tree_leaves(
            abstract, is_leaf=lambda x: hasattr(x, "value")))
    assert sizes == {"llama3_8b": 8_030_261_248, "llama3_70b": 70_553_706_496}
    c = sft_config.get_config("tiny")
    c.model.preset = "llama3_8b"
    assert resolve.model_config_from(c.model).intermediate == 14336
    c.model.preset = "llama3_9b"
    with pytest.raises(ConfigError, match="llama3_70b, llama3_8b"):
        resolve.model_config_from(c.model)


def test_optimizer_state_is_sharded_like_the_params():
    # jax.jit(optimizer.init) alone replicated Adam's moments on every device.
    c = sft_config.get_config("tiny")
    c.mesh.data, c.mesh.fsdp = 1, -1
    runtime = sharding.Runtime(c)
    model = Transformer(resolve.model_config_from(c.model))
    with runtime.activations():
        state, shardings = train_state.create_train_state(runtime, model,
                                                     train_state.make_optimizer(c.train), 0)
    mu = state.opt_state[1][0].mu
    for p, m in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(mu)):
        assert m.sharding.spec == p.sharding.spec
    kernel = state.params["layers"]["mlp"]["up"]["kernel"]
    assert "fsdp" in kernel.sharding.spec          # really sharded, not only equal


needs_libtpu = pytest.mark.skipif(
    tpu_topology.libtpu_version() is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); it compiles for TPU topologies")


@needs_libtpu
def test_compile_for_a_v5e_slice():
    topo = tpu_topology.topology("v5e-4")
    devices = tpu_topology.topology_devices(topo)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    peaks = {}
    for batch in (32, 64):
        c = sft_config.get_config("tiny")
        c.mesh.data, c.mesh.fsdp = 2, 2
        c.train.batch_size = batch
        [r] = aot.run(c, topo, devices)
        assert r["step"] == "train_step" and r["chips"] == 4 and r["fits"]
        assert r["args"] > 0 and r["outputs"] > 0 and r["aliased"] > 0   # donated state
        assert r["flops"] == pytest.approx(aot.train_flops(
            resolve.model_config_from(c.model), batch, c.data.max_len))
        peaks[batch] = r["peak"]
    assert peaks[64] > peaks[32]      # activations grow with the batch


@needs_libtpu
def test_compile_ppo_steps_for_a_v4_slice():
    c = ppo_config.get_config("tiny")
    c.mesh.data, c.mesh.fsdp = 2, 2
    c.model.update(dict(hidden=64, layers=2, heads=2, kv_heads=1, intermediate=128))
    records = aot.run(c, tpu_topology.topology("v4-8"))
    assert [r["step"] for r in records] == ["sample", "score", "update"]
    for r in records:   # the other models stay resident while each step runs
        assert r["other"] > 0 and r["peak"] == r["total"] + r["other"]


@needs_libtpu
def test_console_is_the_verdicts_and_the_table(tmp_path):
    """`python -m rlhf_jax.aot` prints one verdict a step and the table, on
    stdout and stderr together: none of libtpu's start-up lines, absl's INFO
    lines (optax's schedule) or warnings."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "aot.jsonl"
    r = subprocess.run(
        [sys.executable, "-m", "rlhf_jax.aot", "--config", "configs/ppo.py:tiny",
         "--topology", "v4-8", "--config.mesh.data=2", "--config.mesh.fsdp=2",
         "--config.model.hidden=64", "--config.model.layers=2", "--config.model.heads=2",
         "--config.model.kv_heads=1", "--config.model.intermediate=128", "--json", str(out)],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"})
    assert r.returncode == 0, r.stdout
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["step"] for x in records] == ["sample", "score", "update"]
    expected = [aot_report.verdict(x) for x in records] + \
        aot_report.format_report(records).splitlines()
    assert r.stdout.splitlines() == expected, r.stdout
    assert expected[0].startswith("sample: fits, peak ")
    assert expected[-1].startswith("resident per chip, MiB: policy ")


def test_table_names_an_extrapolated_step_that_is_not_the_worst():
    # update compiled at full depth; sample from 8 and 16 layers (80: 10 GiB).
    records = [_record("sample", 2.0, layers=8), _record("sample", 3.0, layers=16),
               _record("update", 12.0)]
    for r in records:
        r.update(model="llama3_70b", prompt_len=512, response_len=512)
    row = aot_report.markdown_table(records).splitlines()[2]
    assert "| 64 x (512 + 512) |" in row
    assert "| 12.0 (update); sample at least 11.0, from 8 and 16 layers |" in row, row
