"""``accord probe CONFIG``: what ACCORD's Eq. 7 sees on your references, before any training.

For each reference caption and a grid of timesteps, one noisy ``x_t`` of the reference goes through the base model
(with the method's trainable parts at their initial values) under the joint caption, ``c_p``, ``c_g`` and the empty
prompt, exactly as the trainer's step builds them (:func:`accord.step.run_step`). Reported, in nats per
element (:func:`accord.losses.dependence_terms`):

- Eq. 7's three terms ``‖U_j−U_p‖²``, ``‖U_j−U_g‖²``, ``‖U_j−U_∅‖²`` (each over 2σ_t²) and Δ;
- Δ split as ``additivity − alignment``: ``‖j−p−g‖²/(2σ_t²)`` against ``⟨p,g⟩/σ_t²``, displacements from U_∅;
- each active regularizer's gradient norm at its configured weight relative to the diffusion loss's, on the
  trained parameters (``share_dd``: below ~1 % DDLoss is inert at that weight).

Output: a table per caption and timestep band on the console, ``probe.json`` and ``probe.html`` (bars per caption,
the terms over t). No weights change. The command's flags are in :mod:`accord.commands.probe`.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import json
from pathlib import Path

import torch

from .errors import AccordError
from .figure import saved_figure

__all__ = ["probe", "probe_batch", "format_table", "reading", "write", "BANDS", "TERMS"]

#: Timestep bands on a 0–1000 scale (fraction of the training grid × 1000).
BANDS = (("t<300", 0, 300), ("300-700", 300, 700), ("t>700", 700, 1001))
TERMS = ("eq7_personal", "eq7_general", "eq7_null", "eq7_shift", "eq7_additivity", "eq7_alignment")
_SHORT = {"eq7_personal": "|Uj-Up|2", "eq7_general": "|Uj-Ug|2", "eq7_null": "|Uj-U0|2", "eq7_shift": "Delta",
          "eq7_additivity": "additivity", "eq7_alignment": "alignment"}


def probe(config, num_timesteps: int = 9, max_captions: int | None = None, generator_seed: int | None = None) -> dict:
    """Run the probe; returns the ``probe.json`` mapping (see the module docstring)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from .data.references import collate_references
    from .step import LatentCache, TextCache
    from .train import _build_data, build_model

    # The trainer's step as it is configured, with its fast schedule (the same terms, no backward inside) and no
    # class images (the probe reads the references only).
    config = dataclasses.replace(config, accord=dataclasses.replace(config.accord, mode="fast"),
                                 data=dataclasses.replace(config.data, with_prior_preservation=False))
    AcceleratorState._reset_state()
    no_device = not (torch.cuda.is_available() or torch.backends.mps.is_available())
    accelerator = Accelerator(cpu=no_device, mixed_precision=config.train.mixed_precision)
    backbone, method = build_model(config, accelerator)
    _, dataset, _ = _build_data(config, accelerator, backbone, method)
    if hasattr(dataset, "stream_samples"):
        raise AccordError("accord probe reads a folder of references (data.instance_dir); method.ip_dataset streams "
                          "a dataset: unset it to probe a folder")
    text = TextCache(backbone, enabled=not method.trains_text)
    latents = LatentCache(backbone, enabled=False)
    fractions = (torch.arange(num_timesteps, dtype=torch.float64) + 0.5) / num_timesteps
    grid = backbone.timesteps_at(fractions)
    num = backbone.noise_scheduler.config.num_train_timesteps
    seed = config.train.seed if generator_seed is None else generator_seed
    captions = []
    count = len(dataset) if max_captions is None else min(max_captions, len(dataset))
    for i in range(count):
        sample = dataset[i]
        points = []
        for t, fraction in zip(grid, fractions):
            generator = torch.Generator().manual_seed(seed * 1_000_003 + i)  # one x_0 draw and noise per caption
            parts = probe_batch(config, backbone, method, text, collate_references([sample]), generator, accelerator,
                                latents, timesteps=t.reshape(1))
            points.append({"t": float(t), "t1000": round(1000 * float(fraction), 1), **parts})
        captions.append({"caption": sample["caption"], "personal": sample["personal"], "general": sample["general"],
                         "points": points, "bands": _bands(points)})
    losses = config.accord
    return {"model": config.model.pretrained, "method": config.method.name, "dd_weight": losses.dd_weight,
            "dd_scale": losses.dd_scale, "dd_variant": losses.dd_variant, "pd_weight": losses.pd_weight,
            "sude_weight": config.regularizers.sude_weight,
            "num_train_timesteps": num, "timesteps": [float(t) for t in grid], "units": "nats per element",
            "captions": captions, "bands": _bands([p for c in captions for p in c["points"]])}


def probe_batch(config, backbone, method, text, batch, generator, accelerator, latent_cache=None,
                timesteps: torch.Tensor | None = None) -> dict[str, float]:
    """One trainer step's Eq. 7 terms and gradient shares on ``batch`` (no backward into ``.grad``): the numbers
    the trainer logs for the same ``x_t`` and ``t``."""
    from .step import run_step

    with accelerator.autocast():
        losses = run_step(config, backbone, method, text, batch, None, generator, config.data.class_noun, None,
                          latent_cache, measure_share=True, timesteps=timesteps, force_terms=True)
    return {k: float(v) for k, v in losses.parts.items() if k.startswith(("eq7_", "share_", "diffusion"))}


def _bands(points: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for name, lo, hi in BANDS:
        inside = [p for p in points if lo <= p["t1000"] < hi]
        keys = sorted({k for p in inside for k in p if k.startswith(("eq7_", "share_"))})
        if inside:
            out[name] = {k: sum(p[k] for p in inside if k in p) / sum(1 for p in inside if k in p) for k in keys}
    return out


def _columns(result: dict) -> list[str]:
    shares = sorted({k for c in result["captions"] for p in c["points"] for k in p if k.startswith("share_")})
    return [*TERMS, *shares]


def format_table(result: dict) -> str:
    cols = _columns(result)
    head = ["caption", "band", *[_SHORT.get(c, c) for c in cols]]
    rows = []
    empty = [c["caption"] for c in result["captions"] if not any("eq7_shift" in v for v in c["bands"].values())]
    for c in result["captions"] + [{"caption": "(all captions)", "bands": result["bands"]}]:
        if c["caption"] in empty:
            continue
        for band, values in c["bands"].items():
            cells = [f"{values[k]:.3g}" if k in values else "-" for k in cols]
            rows.append([c["caption"][:40], band, *cells])
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    lines = [f"accord probe: {result['model']} ({result['method']}), DD weight {result['dd_weight']:g} on the "
             f"{result['dd_scale']} scale; Eq. 7 in {result['units']}; share_* = regularizer gradient / diffusion's",
             "  ".join(h.ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if empty:
        lines.append(f"no other concept (c_g), so no Eq. 7 terms: {'; '.join(empty)}")
    return "\n".join(lines)


def reading(result: dict) -> list[str]:
    """Plain-language lines from the numbers (DESIGN.md, "What |Δ| rewards")."""
    pooled = result["bands"]
    values = [p for c in result["captions"] for p in c["points"]]
    shifts = [p["eq7_shift"] for p in values if "eq7_shift" in p]
    lines = []
    if not shifts:
        return ["no caption has another concept (c_g): DDLoss has nothing to decouple on these references"]
    mean = sum(shifts) / len(shifts)
    lines.append(f"mean Delta {mean:.3g} nats/element ({sum(s > 0 for s in shifts)}/{len(shifts)} points > 0)" +
                 ("; with Delta > 0 and gradient through c_p, DDLoss descends by pulling U(c_p) toward the joint "
                  "caption: the trigger alone learns the scene" if mean > 0 else ""))
    shares = [p["share_dd"] for p in values if "share_dd" in p]
    if result["dd_weight"] > 0 and shares:
        median = sorted(shares)[len(shares) // 2]
        verdict = "inert at this weight (below 1%)" if median < 0.01 else "active"
        lines.append(f"DDLoss gradient share at weight {result['dd_weight']:g}: median {100 * median:.3g}% of the "
                     f"diffusion loss's ({verdict})")
    elif result["dd_weight"] == 0:
        lines.append("accord.dd_weight is 0: the terms are shown, and no DD gradient is applied")
    for band, v in pooled.items():
        if "eq7_additivity" in v:
            lines.append(f"{band}: additivity {v['eq7_additivity']:.3g}, alignment {v['eq7_alignment']:.3g}")
    return lines


def write(result: dict, out: Path) -> list[Path]:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe.json").write_text(json.dumps(result, indent=1))
        (out / "probe.html").write_text(_html(result))
    except OSError as exc:
        raise AccordError(f"cannot write the probe's report to {out}: {exc.strerror or exc}; "
                          "choose another --out") from None
    return [out / "probe.json", out / "probe.html"]


def _figure(draw, ncols: int = 1) -> str:
    """``draw(axes)`` on a 9 × 3.6 in figure of ``ncols`` panels, as a base64 PNG to inline in the HTML."""
    buffer = io.BytesIO()
    with saved_figure(buffer, figsize=(9, 3.6), ncols=ncols) as (_, axes):
        draw(axes)
    return base64.b64encode(buffer.getvalue()).decode()


def _html(result: dict) -> str:
    captions = [c for c in result["captions"] if any("eq7_shift" in p for p in c["points"])]

    def bars(ax):
        names = TERMS[:4]
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            ys = [sum(p[name] for p in c["points"]) / len(c["points"]) for c in captions]
            ax.bar([i + j * width for i in range(len(captions))], ys, width, label=_SHORT[name])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(captions))])
        ax.set_xticklabels([c["caption"][:28] for c in captions], rotation=15, fontsize=7)
        ax.set_ylabel("nats / element (mean over t)")
        ax.axhline(0, color="k", lw=0.5)
        ax.legend(fontsize=7)

    def over_t(axes):
        ax, ax2 = axes
        ts = [p["t1000"] for p in captions[0]["points"]]
        smallest = []
        for name in ("eq7_shift", "eq7_additivity", "eq7_alignment", "eq7_personal"):
            ys = [sum(c["points"][k][name] for c in captions) / len(captions) for k in range(len(ts))]
            ax.plot(ts, ys, marker="o", label=_SHORT[name])
            smallest += [abs(y) for y in ys if y]
        ax.set_xlabel("t (of 1000)")
        ax.set_ylabel("nats / element")
        ax.set_yscale("symlog", linthresh=min(smallest, default=1e-6))  # signed terms over decades
        ax.legend(fontsize=7)
        for name in sorted({k for c in captions for p in c["points"] for k in p if k.startswith("share_")}):
            ys = [sum(c["points"][k].get(name, 0.0) for c in captions) / len(captions) for k in range(len(ts))]
            ax2.plot(ts, [100 * y for y in ys], marker="o", label=name)
        ax2.axhline(1, color="r", lw=0.6, ls="--")
        ax2.set_xlabel("t (of 1000)")
        ax2.set_ylabel("% of the diffusion loss's gradient")
        ax2.set_yscale("log")
        ax2.legend(fontsize=7)

    figures = [_figure(bars), _figure(over_t, ncols=2)] if captions else []
    cols = _columns(result)
    table = ["<tr><th>caption</th><th>band</th>" + "".join(f"<th>{html.escape(_SHORT.get(c, c))}</th>" for c in cols)
             + "</tr>"]
    for c in result["captions"] + [{"caption": "(all captions)", "bands": result["bands"]}]:
        for band, values in c["bands"].items():
            table.append(f"<tr><td>{html.escape(c['caption'])}</td><td>{band}</td>" + "".join(
                f"<td>{values[k]:.3g}</td>" if k in values else "<td>-</td>" for k in cols) + "</tr>")
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in reading(result))
    images = "".join(f'<img src="data:image/png;base64,{f}" style="max-width:100%">' for f in figures)
    return (f"<!doctype html><meta charset='utf-8'><title>accord probe</title>"
            f"<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}"
            f"td:first-child{{text-align:left}}</style><h1>accord probe</h1>"
            f"<p>{html.escape(result['model'])} · {html.escape(result['method'])} · DD weight {result['dd_weight']:g} "
            f"({html.escape(result['dd_scale'])} scale) · Eq. 7 in {result['units']}</p><ul>{notes}</ul>{images}"
            f"<table>{''.join(table)}</table>")
