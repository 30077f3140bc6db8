"""Shared fixtures: tiny random model families, built once per test session, fully offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"


@pytest.fixture(scope="session")
def clip_tokenizer():
    from accord.testing.tiny import clip_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_sd():
    from accord.testing.tiny import build_pipeline

    return build_pipeline("sd")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from accord.testing.tiny import build_pipeline

    return build_pipeline("sdxl")


@pytest.fixture(scope="session")
def tiny_flux():
    from accord.testing.tiny import build_pipeline

    return build_pipeline("flux")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Return a function kind -> local diffusers folder of that tiny model (written once per kind)."""
    from accord.testing.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = save_tiny_pipeline(kind, root / kind)
        return made[kind]

    return get


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    """The tiny SD model the trainer tests train (a module may define its own)."""
    return tiny_model_dir("sd")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """A captioned reference folder of DreamBench's backpack (trainkit.CAPTIONS)."""
    from trainkit import make_refs

    return make_refs(tmp_path_factory.mktemp("refs"))


@pytest.fixture(scope="session")
def dreambench() -> Path:
    if not DREAMBENCH.is_dir():
        pytest.skip(f"DreamBench sample data not found at {DREAMBENCH}")
    return DREAMBENCH
