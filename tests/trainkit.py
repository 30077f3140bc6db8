"""Helpers shared by trainer tests: a captioned reference folder and a tiny-run config."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from accord.config import Config, config_from_dict

DREAMBENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "dreambench"

CAPTIONS = ["1 sks backpack, girl, park", "1 sks backpack, girl, street", "1 sks backpack, table, kitchen",
            "1 sks backpack"]


def photo(subject: str, i: int) -> Path:
    """DreamBench's photo ``i`` of ``subject`` where the sample data sits beside the clone (../shared); on a clean
    clone without it, a generated 512 px JPEG of the same size and mode (a seeded gradient with a shape), so the
    trainer tests need nothing outside the repository."""
    real = DREAMBENCH / subject / f"{i:02d}.jpg"
    if real.is_file():
        return real
    path = Path(tempfile.gettempdir()) / "accord-test-photos" / subject / f"{i:02d}.jpg"
    if not path.is_file():
        import numpy as np
        from PIL import Image, ImageDraw

        rng = np.random.default_rng([i, len(subject)])
        ramp = np.linspace(0, 1, 512, dtype=np.float32)
        base = rng.uniform(40, 215, 3).astype(np.float32)
        pixels = base + 40 * ramp[None, :, None] - 40 * ramp[:, None, None] + rng.normal(0, 8, (512, 512, 3))
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        x, y = rng.integers(96, 320, 2)
        ImageDraw.Draw(image).ellipse((x, y, x + 160, y + 192), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{rng.integers(1 << 30)}.tmp")  # another test process may write the same file
        image.save(tmp, format="JPEG", quality=90)
        tmp.replace(path)
    return path


def make_refs(folder: Path, subject: str = "backpack", captions=CAPTIONS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, caption in enumerate(captions):
        shutil.copy(photo(subject, i), folder / f"{i:02d}.jpg")
        (folder / f"{i:02d}.txt").write_text(caption + "\n")
    return folder


def tiny_config(model: Path, refs: Path, out: Path, **sections) -> Config:
    data = {
        "model": {"pretrained": str(model)},
        "data": {"instance_dir": str(refs), "class_noun": "backpack", "resolution": 32},
        "method": {"name": "lora", "lora_rank": 4},
        "accord": {"dd_weight": 0.2},
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 2, "checkpoint_every": 0, "report_to": "none",
                  "log_every": 1000, "learning_rate": 1e-3},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    if data["method"]["name"] not in ("lora", "break_a_scene"):  # the others have no lora_rank
        data["method"].pop("lora_rank")
    return config_from_dict(data).validate()


def run_readme(out: Path) -> dict:
    """Execute the python blocks of a run folder's README.md as written; return their namespace (``pipe`` …)."""
    from accord.export.readme import python_blocks

    blocks = python_blocks((Path(out) / "README.md").read_text())
    assert blocks, f"{out}/README.md has no python block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(Path(out) / "README.md"), "exec"), namespace)
    return namespace


def header(path: Path) -> dict[str, str]:
    """The safetensors metadata of ``path``, read as users read it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}
