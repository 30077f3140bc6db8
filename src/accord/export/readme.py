"""``README.md`` in every run folder: the stock lines that load this run, its trigger word and its base model.

The loading code is each method's :meth:`~accord.methods.base.Method.loading_code`, written for this run's
folder and base model, so it can be pasted (and is executed as written by the tests).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["readme_text", "run_folder", "write_readme", "python_blocks"]


def run_folder(output_dir: Path) -> Path:
    """The folder the files will be read from: checkpoints are written to ``.tmp-step-N`` and renamed
    (:func:`accord.checkpoint.save_checkpoint`), so the README names the final name."""
    output_dir = Path(output_dir).resolve()
    return output_dir.with_name(output_dir.name.removeprefix(".tmp-"))


def base_model(config) -> str:
    """``model.pretrained`` as the user gave it, made absolute where it is a local path."""
    source = config.model.pretrained
    return str(Path(source).resolve()) if Path(source).exists() else source


def readme_text(method, output_dir: Path) -> str:
    config = method.config
    run, base = str(run_folder(output_dir)), base_model(config)
    lines = [
        f"# accord run: {config.method.name} on {base}",
        "",
        f"- trigger word: `{config.data.trigger}` (class noun: `{config.data.class_noun}`), e.g. "
        f"`\"a photo of {config.data.trigger} {config.data.class_noun}\"`",
        f"- base model: `{base}` ({method.backbone.pipeline_class.__name__})",
        f"- trained for {config.train.max_steps} steps at {config.data.resolution} px; "
        "the full settings are in `config.yaml`",
        "",
        "## Load it with stock diffusers",
        "",
        "```python",
        method.loading_code(run, base).strip(),
        "```",
        "",
        'Or with accord: `from accord.inference import load_trained; pipe = load_trained("' + run + '")`.',
    ]
    notes = method.readme_notes()
    if notes:
        lines += ["", "## Files", "", *notes]
    return "\n".join(lines) + "\n"


def write_readme(method, output_dir: Path) -> Path:
    path = Path(output_dir) / "README.md"
    path.write_text(readme_text(method, output_dir), encoding="utf-8")
    return path


def python_blocks(text: str) -> list[str]:
    """The fenced ```` ```python ```` blocks of a markdown text."""
    blocks, current = [], None
    for line in text.splitlines():
        if current is None and line.strip() == "```python":
            current = []
        elif current is not None and line.strip() == "```":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks
