"""Eq. 7's terms over a training run: their trajectory for ``train_summary.json`` and two warnings.

The trainer logs, per step, Eq. 7's three terms and its additivity/alignment split (``eq7_*``, nats per element,
:func:`accord.losses.dependence_terms`) and, every ``accord.grad_share_every`` steps, each regularizer's gradient
norm relative to the diffusion loss's (``share_*``). :class:`TermsMonitor` averages them over windows of steps and
warns once each:

- **inert**: DDLoss's gradient share stays below 1 % (three measurements in a row, or every measurement of a run
  that had fewer): at this weight and scale it does not change training;
- **personal term falling**: with DDLoss on in a form that minimises ``|Δ|`` (``paper``, ``anchored``), a window's
  mean ``‖U_j − U_p‖²`` term has fallen below half of the first window's. In the coupling lab that fall is the
  signature of the trigger phrase alone learning the whole caption's scene, coupled concepts included (DESIGN.md,
  "What |Δ| rewards"). The other forms do not reward that move, so the fall says nothing about them.
"""

from __future__ import annotations

import logging
import math

__all__ = ["TermsMonitor", "INERT_SHARE", "FALL_RATIO"]

logger = logging.getLogger("accord.train")

INERT_SHARE = 0.01  # DD's gradient below 1 % of the diffusion loss's: inert
FALL_RATIO = 0.5  # the personal term below half of its first window: falling
_INERT_RUN = 3  # measurements in a row


class TermsMonitor:
    """Feed :meth:`add` each optimizer step's logs; :meth:`close_window` at each window's end; ``trajectory`` holds
    one dict per window: its last step and the window means of every ``eq7_*`` and ``share_*`` value it saw."""

    #: the DDLoss forms whose |Δ| rewards pulling U(c_p) toward the joint caption (the falling warning's mechanism)
    ABS_DELTA_FORMS = ("paper", "anchored")

    def __init__(self, dd_weight: float, dd_scale: str, warn=logger.warning, dd_variant: str = "paper"):
        self.dd_weight, self.dd_scale, self.warn = dd_weight, dd_scale, warn
        self.watch_fall = dd_weight > 0 and dd_variant in self.ABS_DELTA_FORMS
        self.trajectory: list[dict] = []
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self._dd_shares: list[tuple[int, float]] = []
        self._first_personal: float | None = None
        self.warned: set[str] = set()

    _STATE = ("trajectory", "_sums", "_counts", "_dd_shares", "_first_personal", "warned")

    def state_dict(self) -> dict:
        """JSON-ready state, saved in each checkpoint so a resumed run's trajectory and warnings continue."""
        return {k: sorted(v) if isinstance(v, set) else v for k, v in vars(self).items() if k in self._STATE}

    def load_state_dict(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            if key in self._STATE:
                setattr(self, key, set(value) if key == "warned" else
                        [tuple(x) for x in value] if key == "_dd_shares" else value)

    def add(self, step: int, logs: dict) -> None:
        for name, value in logs.items():
            if (name.startswith("eq7_") or name.startswith("share_")) and math.isfinite(value):
                self._sums[name] = self._sums.get(name, 0.0) + value
                self._counts[name] = self._counts.get(name, 0) + 1
        if "share_dd" in logs and math.isfinite(logs["share_dd"]):
            self._dd_shares.append((step, logs["share_dd"]))
            recent = self._dd_shares[-_INERT_RUN:]
            if len(recent) == _INERT_RUN and all(v < INERT_SHARE for _, v in recent):
                self._warn_inert(recent)

    def close_window(self, step: int) -> dict | None:
        if not self._counts:
            return None
        point = {"step": step, **{k: self._sums[k] / self._counts[k] for k in sorted(self._sums)}}
        self._sums, self._counts = {}, {}
        self.trajectory.append(point)
        personal = point.get("eq7_personal")
        if personal is not None and self.watch_fall:
            if self._first_personal is None:
                self._first_personal = personal
            elif personal < FALL_RATIO * self._first_personal and "falling" not in self.warned:
                self.warned.add("falling")
                first = self.trajectory[0]["step"]
                self.warn(
                    "Eq. 7's personal term ||U_j - U_p||^2 fell from %.3g (window to step %d) to %.3g (to step %d) "
                    "while DDLoss is on: the trigger phrase alone is learning the whole caption, coupled concepts "
                    "included (the coupling lab's signature of DDLoss raising leaks); check samples for copied "
                    "context, lower accord.dd_weight, or compare with accord.dd_weight=0",
                    self._first_personal, first, personal, step)
        return point

    def finish(self) -> None:
        """At the run's end: a short run whose every DD share was below 1 % is inert too."""
        if self._dd_shares and all(v < INERT_SHARE for _, v in self._dd_shares):
            self._warn_inert(self._dd_shares)

    def _warn_inert(self, measured: list[tuple[int, float]]) -> None:
        if "inert" in self.warned:
            return
        self.warned.add("inert")
        shown = ", ".join(f"{100 * v:.2g}% at step {s + 1}" for s, v in measured[-_INERT_RUN:])
        hint = "" if self.dd_scale == "reference" else (
            f"; accord.dd_scale={self.dd_scale} is not the scale the paper's weights refer to (reference)")
        self.warn("DDLoss is inert at accord.dd_weight=%g: its gradient is below %d%% of the diffusion loss's (%s)%s",
                  self.dd_weight, round(100 * INERT_SHARE), shown, hint)
