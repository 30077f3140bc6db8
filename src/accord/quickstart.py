"""``accord quickstart``: the offline main job until the coupling lab lands.

Builds a tiny random SD-like model, draws a small coupled reference set (the subject always comes
with a second object, as in the paper's backpack-and-girl example), trains LoRA with DDLoss for a
few steps printing every loss component, and generates a sample grid from the result.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_arguments", "run", "draw_coupled_references"]

_SCENES = [("park", (90, 170, 90)), ("street", (150, 150, 150)), ("beach", (230, 210, 150)),
           ("kitchen", (200, 180, 160))]


def draw_coupled_references(folder: Path, size: int = 64) -> Path:
    """Four images of a red 'sks backpack' that is always next to a 'girl' (a face-coloured disc)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, (scene, color) in enumerate(_SCENES):
        img = Image.new("RGB", (size, size), color)
        draw = ImageDraw.Draw(img)
        x = 6 + 4 * i
        draw.rounded_rectangle([x, 20, x + 22, 52], radius=5, fill=(200, 30, 40), outline=(90, 10, 10))
        draw.ellipse([x + 28, 14, x + 44, 30], fill=(240, 200, 170))
        draw.rectangle([x + 31, 30, x + 41, 56], fill=(60, 80, 200))
        img.save(folder / f"{i:02d}.png")
        (folder / f"{i:02d}.txt").write_text(f"1 sks backpack, girl, {scene}\n")
    return folder


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="accord-quickstart", help="folder for the tiny model, data and run")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--dd-weight", type=float, default=0.2, help="DDLoss weight")


def run(args) -> int:
    import shutil

    from .config import config_from_dict
    from .generate import generate
    from .testing.tiny import save_tiny_pipeline
    from .train import train

    root = Path(args.output)
    model = root / "tiny-sd"
    if not (model / "model_index.json").is_file():
        save_tiny_pipeline("sd", model)
    refs = draw_coupled_references(root / "references")
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    config = config_from_dict({
        "model": {"pretrained": str(model)},
        "data": {"instance_dir": str(refs), "class_noun": "backpack", "resolution": 32},
        "method": {"name": "lora", "lora_rank": 4},
        "accord": {"dd_weight": args.dd_weight},
        "train": {"output_dir": str(run_dir), "max_steps": args.steps, "batch_size": 2, "learning_rate": 1e-3,
                  "log_every": 1, "checkpoint_every": 0, "report_to": "none"},
    }).validate()
    print("training LoRA + DDLoss on a tiny random model (loss components per step):")
    train(config)
    images = generate(str(run_dir), ["a sks backpack on the beach", "a sks backpack"], root / "samples", num_images=2,
                      steps=10, height=32, width=32, device="cpu")
    print(f"LoRA weights: {run_dir / 'pytorch_lora_weights.safetensors'}; samples: {images[0].parent / 'grid.png'}")
    print("(a random tiny model draws noise; point model.pretrained at a real model for real pictures, see README)")
    return 0
