"""The coupling lab: a synthetic world with exact labels, miniature pretrained models, and a
personalization task that couples two concepts as the paper's Fig. 1 does.

* :mod:`accord.lab.world`    — the scene renderer and captions
* :mod:`accord.lab.models`   — architectures; :mod:`accord.lab.pretrain` — their seeded recipe
* :mod:`accord.lab.task`     — coupling tasks as YAML files (``tasks/*.yaml``, docs/lab.md) and their protocol
* :mod:`accord.lab.judge`    — detector- and mini-CLIP-based metrics
* :mod:`accord.lab.runner`   — one (method, regularizer, seed) run; :mod:`accord.lab.report` — tables and figures
"""
