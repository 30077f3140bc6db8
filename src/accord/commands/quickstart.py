"""``accord quickstart``: the offline main job until the coupling lab lands.

Builds a tiny random SD-like model, draws a small coupled reference set (the subject always comes
with a second object, as in the paper's backpack-and-girl example), trains LoRA with DDLoss for a
few steps printing every loss component, and generates a sample grid from the result.
"""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--output", default="accord-quickstart", help="folder for the tiny model, data and run")
    parser.add_argument("--steps", type=int, default=10, help="training steps")
    parser.add_argument("--dd-weight", type=float, default=0.2, help="DDLoss weight")


def run(args) -> int:
    import shutil

    from ..config import config_from_dict
    from ..generate import generate
    from ..quickstart import draw_coupled_references
    from ..testing.tiny import save_tiny_pipeline
    from ..train import train

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
