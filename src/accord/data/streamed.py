"""An image–caption set streamed from a Hugging Face ``datasets`` dataset (zero-shot IP-Adapter training).

``datasets.load_dataset(name, split=..., streaming=True)`` (a hub id or a local path: a folder of images with
``metadata.jsonl``, parquet files, ...), shuffled with a seeded buffer (``IterableDataset.shuffle(seed,
buffer_size)``; each epoch reshuffles with ``set_epoch``), then sharded per process with
``datasets.distributed.split_dataset_by_node``. Every process reads its own shard in order.

The trainer asks for this process's samples by position (:meth:`StreamedCaptions.stream_samples`: sample
``(step * accumulation + micro) * batch_size + j`` of the shard). Reading in order just takes the next ones; a
position the stream is not at (the first request after ``--resume``) reopens the stream at the right epoch and
``skip``s to it. The order depends only on the seed, the dataset and the number of processes, so a resumed run
sees exactly the samples of an uninterrupted one *with the same number of processes*. Skipping reads (but does
not decode) the skipped rows; the length of each epoch is learned when it ends (or is skipped over).

Samples are center-cropped squares, as :class:`accord.data.captioned.CaptionedImages` gives, with the same
IP-Adapter CFG dropout, drawn per (seed, rank, position).
"""

from __future__ import annotations

import io
import itertools

import torch
from PIL import Image

from ..errors import ConfigError, DataError
from .captioned import cfg_sample
from .references import augmentation_generator

__all__ = ["StreamedCaptions"]


def _to_pil(value, feature=None) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and hasattr(feature, "decode_example"):  # datasets' Image: local, hub or archive paths
        return feature.decode_example(value)
    if isinstance(value, dict) and value.get("bytes"):
        return Image.open(io.BytesIO(value["bytes"]))
    if isinstance(value, dict) and value.get("path"):
        return Image.open(value["path"])
    if isinstance(value, str):
        return Image.open(value)
    raise DataError(f"image column holds {type(value).__name__}; "
                    "expected an image (datasets Image feature, bytes or path)")


class StreamedCaptions:
    """This process's shard of a streamed image–caption dataset, read in order (see the module docstring)."""

    def __init__(self, name: str, resolution: int, *, split: str = "train", image_column: str = "image",
                 caption_column: str = "text", seed: int = 0, buffer_size: int = 1000, rank: int = 0, world: int = 1,
                 image_dropout: float = 0.05, text_dropout: float = 0.05, both_dropout: float = 0.05):
        try:
            import datasets
            from datasets.distributed import split_dataset_by_node
        except ImportError:
            raise ConfigError("method.ip_dataset needs Hugging Face datasets: pip install 'accord[ip]'") from None
        stream = datasets.load_dataset(name, split=split, streaming=True)
        columns = list(stream.features) if stream.features is not None else None
        for key, col in (("ip_image_column", image_column), ("ip_caption_column", caption_column)):
            if columns is not None and col not in columns:
                raise ConfigError(f"method.{key}={col!r} is not a column of {name} (columns: {', '.join(columns)})")
        self._image_feature = stream.features.get(image_column) if stream.features is not None else None
        stream = stream.shuffle(seed=seed, buffer_size=buffer_size) if buffer_size > 1 else stream
        # rows undecoded: skipping to a resumed position reads rows but decodes no image (decoded in _sample)
        self.stream = split_dataset_by_node(stream.decode(False), rank=rank, world_size=world)
        self.name, self.resolution, self.seed, self.rank = name, resolution, seed, rank
        self.image_column, self.caption_column = image_column, caption_column
        self.image_dropout, self.text_dropout, self.both_dropout = image_dropout, text_dropout, both_dropout
        self._lengths: dict[int, int] = {}  # epoch -> samples of this shard (learned when an epoch ends or is skipped)
        self._iter, self._epoch, self._in_epoch, self._pos = None, 0, 0, 0

    # -- reading in order -------------------------------------------------------------------------------
    def _open(self, epoch: int, skip: int) -> int:
        """Iterate ``epoch`` from its sample ``skip`` on; returns how many were skipped (fewer: the epoch ended)."""
        self.stream.set_epoch(epoch)
        self._iter, self._epoch = iter(self.stream), epoch
        # Skipped here, not with IterableDataset.skip: that counts rows of the stream before the per-process split.
        self._in_epoch = sum(1 for _ in itertools.islice(self._iter, skip))
        return self._in_epoch

    def _seek(self, position: int) -> None:
        """Reopen the stream at ``position``: whole epochs are passed over by their length, the rest is skipped."""
        epoch, rest = 0, position
        while True:
            known = self._lengths.get(epoch)
            if known is not None and rest >= known:
                rest, epoch = rest - known, epoch + 1
                continue
            skipped = self._open(epoch, rest)
            if skipped < rest:  # the epoch ended first: now its length is known
                if not skipped:
                    raise DataError(f"{self.name}: this process's shard (rank {self.rank}) is empty")
                self._lengths[epoch] = skipped
                rest, epoch = rest - skipped, epoch + 1
                continue
            break
        self._pos = position

    def _next(self) -> dict:
        if self._iter is None:
            self._open(0, 0)
        for _ in range(2):
            try:
                row = next(self._iter)
            except StopIteration:
                if not self._in_epoch:
                    raise DataError(f"{self.name}: this process's shard (rank {self.rank}) is empty") from None
                self._lengths[self._epoch] = self._in_epoch
                self._open(self._epoch + 1, 0)
                continue
            self._in_epoch += 1
            return row
        raise DataError(f"{self.name}: this process's shard (rank {self.rank}) is empty")

    def stream_samples(self, start: int, count: int) -> list[dict]:
        """Samples ``start .. start + count - 1`` of this process's shard (epochs follow one another)."""
        if start != self._pos:
            self._seek(start)
        out = []
        for _ in range(count):
            out.append(self._sample(self._next(), self._pos))
            self._pos += 1
        return out

    # -- one sample ---------------------------------------------------------------------------------------
    def _sample(self, row: dict, position: int) -> dict:
        with _to_pil(row[self.image_column], self._image_feature) as im:
            img = im.convert("RGB")
        u = float(torch.rand((), generator=augmentation_generator(self.seed, 1_000_003 + self.rank, position)))
        return cfg_sample(img, row[self.caption_column], position, u,
                          (self.image_dropout, self.text_dropout, self.both_dropout), self.resolution)
