"""Smoke tests of benchmarks/overhead.py: it runs in-process at the smallest settings and reports every
variant with finite positive ratios. No absolute times are asserted (the CPUs are shared)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"


@pytest.fixture(scope="module")
def overhead():
    spec = importlib.util.spec_from_file_location("accord_benchmark_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    yield module
    torch.set_num_threads(threads)  # the script sets 1 thread on the CPU
    sys.modules.pop(spec.name, None)


def _check(result, variants, cases):
    rows = result["rows"]
    assert {(r["case"], r["variant"]) for r in rows} == {(c, v) for c in cases for v in variants}
    for r in rows:
        assert math.isfinite(r["ms"]) and r["ms"] > 0
        assert math.isfinite(r["time_ratio"]) and r["time_ratio"] > 0
        assert r["samples"] == 2
    for r in rows:  # each ratio is its row's time over the same case's "off" row, measured in the same run
        off = next(o for o in rows if o["case"] == r["case"] and o["variant"] == "off")
        assert r["time_ratio"] == pytest.approx(r["ms"] / off["ms"])
    for v in variants:
        assert v in " ".join(r["variant"] for r in rows)
    assert "(c) accord DDLoss, mode=fast" in result["table"]


def test_tiny_lora_reports_every_variant(overhead, tmp_path):
    out = tmp_path / "RESULTS.md"
    out.write_text("# header\n")
    result = overhead.main(["--device", "cpu", "--cases", "lora", "--warmup", "1", "--steps", "2", "--rounds", "1",
                            "--quiet", "--append-results", str(out)])
    _check(result, overhead.VARIANTS, ["tiny SD lora"])
    text = out.read_text()
    assert (text.startswith("# header\n") and "CPU:" in text
            and "| tiny SD lora | (d) accord DDLoss, mode=lean |" in text)


def test_cases_flag_names_every_tiny_case(overhead):
    """--cases picks from the tiny registry (the newer methods, FLUX LoRA); only the default pair runs by default."""
    cases = overhead.tiny_cases(list(overhead.TINY_CASES), 2, 32)
    assert {c.method for c in cases} >= {"textual_inversion", "custom_diffusion", "visual_encoder", "ip_adapter"}
    flux = [c for c in cases if c.kind == "tiny-flux"]
    assert len(flux) == 1 and flux[0].method == "lora" and not flux[0].has_plain
    assert [c.trigger for c in cases if c.method == "textual_inversion"] == ["<s*>"]
    assert overhead.DEFAULT_CASES == ("lora", "dreambooth")
    with pytest.raises(SystemExit, match="unknown case"):
        overhead.tiny_cases(["nope"], 2, 32)


def test_real_mode_stand_in_backbone_runs_shrunk(overhead):
    """The --real code path (latent stand-in backbone, SDXL added conditions, LoRA) on a shrunk SDXL config."""
    shrink = dict(block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 1),
                  norm_num_groups=16)
    case = overhead.Case("shrunk SDXL LoRA", "lora", "sdxl", batch=2, size=8, lora_rank=4, unet=shrink)
    result = overhead.main(["--device", "cpu", "--warmup", "1", "--steps", "2", "--rounds", "1", "--quiet",
                            "--variants", "plain", "off", "fast", "lean"], cases=[case])
    _check(result, ("plain", "off", "fast", "lean"), ["shrunk SDXL LoRA"])
