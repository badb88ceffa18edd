"""Data: ``.npz`` files read without pickle, streamed in batches, preprocessed to float64.

Arrays are read straight from the zip member's ``.npy`` stream, a block of rows at a time,
so memory does not grow with the number of samples and object arrays are refused before any
of their bytes are interpreted (``np.load(..., allow_pickle=True)`` is never used).
"""

from __future__ import annotations

import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .errors import MinsharpError


#: What a corrupt zip member can raise while it is opened or read.
CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError,
           RuntimeError)


class _Rows:
    """``rows`` for classes that yield row blocks (``blocks(rows, stop, start)``)."""

    def rows(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start`` to ``stop`` (exclusive) as one array."""
        empty = np.empty((0,) + self.shape[1:], self.dtype)
        return np.concatenate([empty, *self.blocks(max(1, stop - start), stop, start)])


class NpyMember(_Rows):
    """One array of an .npz archive, read in row blocks without loading it whole."""

    def __init__(self, path: Path, archive: zipfile.ZipFile, key: str):
        self.path, self.archive, self.key = path, archive, key
        self.member = f"{key}.npy"
        with self._open() as f:
            self.shape, self.dtype, self.offset = self._header(f)

    @contextmanager
    def _open(self):
        """The member as a file; zip-level corruption becomes a MinsharpError."""
        try:
            with self.archive.open(self.member) as f:
                yield f
        except MinsharpError:
            raise
        except CORRUPT as exc:
            raise MinsharpError(f'{self.path}: key "{self.key}" cannot be read, the file is '
                                f"corrupt ({type(exc).__name__}: {exc})") from None

    def _header(self, f):
        where = f'{self.path}: key "{self.key}"'
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        except Exception:
            raise MinsharpError(f"{where} is not a valid .npy array") from None
        if dtype.hasobject:
            raise MinsharpError(f"{where} holds Python objects (pickled data), which are never loaded")
        if dtype.kind not in "biuf":
            raise MinsharpError(f"{where} has non-numeric dtype {dtype}")
        if fortran and len(shape) > 1:
            raise MinsharpError(f"{where} is stored in Fortran order; save it C-contiguous")
        return tuple(int(s) for s in shape), dtype, f.tell()

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 1

    def blocks(self, rows: int, stop: Optional[int] = None, start: int = 0) -> Iterator[np.ndarray]:
        """Consecutive blocks of at most ``rows`` rows, in order, from row ``start`` up to
        row ``stop``; unreadable rows raise a MinsharpError naming them."""
        n = len(self) if stop is None else min(stop, len(self))
        row_shape = self.shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) * self.dtype.itemsize
        where = f'{self.path}: key "{self.key}"'
        with self._open() as f:
            done = start
            while done < n:
                take = min(rows, n - done)
                try:
                    if done == start:  # skip the header and the rows before ``start``
                        f.seek(self.offset + start * row_bytes)
                    buf = f.read(take * row_bytes)
                except CORRUPT as exc:
                    raise MinsharpError(f"{where} cannot be read at samples {done}..{done + take - 1}, "
                                        f"the file is corrupt ({type(exc).__name__}: {exc})") from None
                if len(buf) != take * row_bytes:
                    raise MinsharpError(f"{where} is truncated: sample {done + len(buf) // row_bytes} "
                                        "is missing")
                yield np.frombuffer(buf, dtype=self.dtype).reshape((take,) + row_shape)
                done += take


class RowBlock(_Rows):
    """Rows ``first`` .. ``first + len(values)`` of an array, held in memory, with the reading
    interface of ``NpyMember`` (row indices refer to the whole array): what a Dask client
    ships to a worker that cannot read the file itself (docs/dask.md)."""

    def __init__(self, member, first: int, stop: int):
        self.path, self.key, self.shape, self.dtype = member.path, member.key, member.shape, member.dtype
        self.first = first
        self.values = member.rows(first, stop)

    def __len__(self) -> int:
        return self.shape[0]

    def blocks(self, rows: int, stop: Optional[int] = None, start: int = 0) -> Iterator[np.ndarray]:
        stop = self.first + len(self.values) if stop is None else stop
        if start < self.first or stop > self.first + len(self.values):
            raise ValueError(f"rows {start}..{stop} are not in this block")
        for i in range(start, stop, rows):
            yield self.values[i - self.first:min(i + rows, stop) - self.first]


@dataclass
class Preprocessing:
    """uint8 → /255, then (x − mean)/std (scalars or per-channel), then the model's shape."""

    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    scale_uint8: bool = True

    def describe(self, dtype: np.dtype) -> list[str]:
        steps = []
        if dtype == np.uint8 and self.scale_uint8:
            steps.append("uint8 scaled by 1/255")
        if self.mean is not None or self.std is not None:
            m = np.atleast_1d(0.0 if self.mean is None else self.mean).tolist()
            s = np.atleast_1d(1.0 if self.std is None else self.std).tolist()
            fmt = lambda v: ",".join(f"{x:g}" for x in v)  # noqa: E731
            steps.append(f"normalised (x - {fmt(m)}) / {fmt(s)}")
        return steps


@dataclass
class Dataset:
    path: Path
    x: NpyMember  # or a RowBlock shipped to a Dask worker
    y: Optional[NpyMember]  # the labels, read on demand by ``labels``
    x_key: str
    y_key: Optional[str]
    limit: Optional[int] = None
    archive: Optional[zipfile.ZipFile] = field(default=None, repr=False)

    @property
    def samples(self) -> int:
        return len(self.x) if self.limit is None else min(self.limit, len(self.x))

    def labels(self, start: int = 0, stop: Optional[int] = None) -> Optional[np.ndarray]:
        """Labels of samples ``start`` .. ``stop`` (default: all): int64 class indices or
        float64 regression targets; None without."""
        if self.y is None:
            return None
        y = self.y.rows(start, self.samples if stop is None else stop)
        return y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float64)

    def rows(self, start: int, stop: int) -> "Dataset":
        """Samples ``start`` .. ``stop`` read into memory: a Dataset that needs no file."""
        return Dataset(self.path, RowBlock(self.x, start, stop),
                       None if self.y is None else RowBlock(self.y, start, stop),
                       self.x_key, self.y_key, self.limit)

    def close(self):
        if self.archive is not None:
            self.archive.close()


def open_dataset(path, split: str = "train", x_key: Optional[str] = None,
                 y_key: Optional[str] = None, limit: Optional[int] = None) -> Dataset:
    """Open an .npz with the Keras mnist layout (x_train, y_train, x_test, y_test) or x/y."""
    path = Path(path)
    if not path.is_file():
        raise MinsharpError(f"{path}: no such data file")
    if split not in ("train", "test"):
        raise MinsharpError(f"--split must be train or test, not {split!r}")
    if limit is not None and limit < 1:
        raise MinsharpError(f"--limit must be at least 1, not {limit}")
    try:
        archive = zipfile.ZipFile(path)
    except CORRUPT:
        raise MinsharpError(f"{path}: not an .npz file (not a readable zip archive)") from None
    try:
        keys = [n[:-4] for n in archive.namelist() if n.endswith(".npy")]
        listing = ", ".join(keys) or "none"
        if x_key is None:
            x_key = next((k for k in (f"x_{split}", "x") if k in keys), None)
            if x_key is None:
                raise MinsharpError(f"{path}: no x_{split} or x key (keys: {listing}); use --x-key")
        elif x_key not in keys:
            raise MinsharpError(f'{path}: no key "{x_key}" (keys: {listing})')
        if y_key is None:
            default = {f"x_{split}": f"y_{split}", "x": "y"}.get(x_key)
            y_key = default if default in keys else None
        elif y_key not in keys:
            raise MinsharpError(f'{path}: no key "{y_key}" (keys: {listing})')
        x = NpyMember(path, archive, x_key)
        if len(x.shape) < 2:
            raise MinsharpError(f'{path}: key "{x_key}" has shape {x.shape}; need (samples, ...)')
        if len(x) == 0:
            raise MinsharpError(f'{path}: key "{x_key}" has zero samples')
        y = None
        if y_key is not None:
            ym = NpyMember(path, archive, y_key)
            if len(ym.shape) not in (1, 2) or len(ym) != len(x):
                raise MinsharpError(f'{path}: labels "{y_key}" have shape {ym.shape}; need '
                                    f"({len(x)},) (or ({len(x)}, outputs) regression targets)")
            y = ym
        return Dataset(path, x, y, x_key, y_key, limit, archive)
    except Exception:
        archive.close()
        raise


def _channel_vector(values, name: str, channels: int, ndim: int) -> np.ndarray:
    v = np.atleast_1d(np.asarray(values, dtype=np.float64)).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise MinsharpError(f"--{name} must be finite, got {v.tolist()}")
    if v.size == 1:
        return v.reshape(())
    if v.size != channels:
        raise MinsharpError(f"--{name} has {v.size} values; the model has {channels} input channels")
    return v.reshape((channels,) + (1,) * (ndim - 1))


def batches(dataset: Dataset, input_shape: tuple[int, ...], prep: Preprocessing,
            batch_size: int, start: int = 0, stop: Optional[int] = None) -> Iterator[np.ndarray]:
    """Preprocessed float64 batches of shape (B, *input_shape), of samples ``start`` ..
    ``stop`` (default: all)."""
    row_shape = dataset.x.shape[1:]
    if int(np.prod(row_shape)) != int(np.prod(input_shape)):
        raise MinsharpError(
            f'{dataset.path}: samples of "{dataset.x_key}" have shape {row_shape} '
            f"({int(np.prod(row_shape))} values) but the model expects {input_shape} "
            f"({int(np.prod(input_shape))} values)")
    mean = std = None
    if prep.mean is not None:
        mean = _channel_vector(prep.mean, "mean", input_shape[0], len(input_shape))
    if prep.std is not None:
        std = _channel_vector(prep.std, "std", input_shape[0], len(input_shape))
        if np.any(std <= 0):
            raise MinsharpError("--std must be positive")
    scale = dataset.x.dtype == np.uint8 and prep.scale_uint8
    for block in dataset.x.blocks(batch_size, dataset.samples if stop is None else stop, start):
        x = block.astype(np.float64).reshape((len(block),) + tuple(input_shape))
        if scale:
            x /= 255.0
        if mean is not None:
            x -= mean
        if std is not None:
            x /= std
        yield x


def check_finite(dataset: Dataset, start: int = 0, stop: Optional[int] = None,
                 block_rows: int = 4096) -> None:
    """Refuse NaN/Inf in samples ``start`` .. ``stop`` (default: all), saying how many and
    where the first one is."""
    if dataset.x.dtype.kind != "f":
        return
    stop = dataset.samples if stop is None else stop
    bad, first, at = 0, None, start
    for block in dataset.x.blocks(block_rows, stop, start):
        mask = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
        if mask.any():
            if first is None:
                first = at + int(np.argmax(mask))
            bad += int(np.count_nonzero(~np.isfinite(block)))
        at += len(block)
    if bad:
        where = "" if (start, stop) == (0, dataset.samples) else f" in samples {start}..{stop - 1}"
        raise MinsharpError(f'{dataset.path}: key "{dataset.x_key}" contains {bad} NaN/Inf '
                            f"values{where} (first in sample {first})")


def check_labels(dataset: Dataset, outputs: int, loss: str, y: Optional[np.ndarray],
                 start: int = 0) -> None:
    """Labels that fit the loss: class indices 0..K−1 (cross-entropy), 0/1 (binary), or
    float targets of shape (N,) for one output or (N, K) (mse). ``y`` holds the labels of
    the samples from ``start`` on."""
    if y is None:
        return
    where = f'{dataset.path}: labels "{dataset.y_key}"'
    if loss == "mse":
        if y.ndim == 1 and outputs != 1 or y.ndim == 2 and y.shape[1] != outputs:
            raise MinsharpError(f"{where} have shape {y.shape}; the regressor (--loss mse) has "
                                f"{outputs} outputs")
        if not np.all(np.isfinite(y)):
            raise MinsharpError(f"{where} contain NaN/Inf")
        return
    if y.ndim != 1 or y.dtype.kind == "f":
        raise MinsharpError(f"{where} are {'floats' if y.dtype.kind == 'f' else 'not 1-D'}, not "
                            f"class indices, but the loss is {loss}; pass --loss mse for "
                            "regression targets")
    top = 1 if loss == "binary" else outputs - 1
    bad = np.flatnonzero((y < 0) | (y > top))
    if bad.size:
        hint = " (pick 0/1 labels with --y-key)" if loss == "binary" else ""
        raise MinsharpError(f"{where} out of range 0..{top} for the {loss} loss: {bad.size} values, "
                            f"first {int(y[bad[0]])} at sample {start + int(bad[0])}{hint}")


def check_labels_against_loss(path, split: str, x_key: Optional[str], y_key: Optional[str],
                              limit: Optional[int], outputs: int, loss: str) -> Optional[str]:
    """For commands that score without labels (``invariance``): refuse the labels that
    ``score`` would refuse with the same options (``check_labels``: the key found as
    ``open_dataset`` finds it, or ``y_key``). Returns the labels' key, None without."""
    dataset = open_dataset(path, split, x_key, y_key, limit)
    try:
        check_labels(dataset, outputs, loss, dataset.labels())
        return dataset.y_key
    finally:
        dataset.close()


def load_batches(path, input_shape: tuple[int, ...], prep: Preprocessing, batch_size: int,
                 split: str = "train", x_key: Optional[str] = None,
                 limit: Optional[int] = None) -> tuple[list[np.ndarray], dict]:
    """Checked, preprocessed batches held in memory (for commands that reuse them), and a
    description of the data: path, key, sample count and preprocessing."""
    dataset = open_dataset(path, split, x_key, None, limit)
    try:
        check_finite(dataset)
        xs = list(batches(dataset, input_shape, prep, batch_size))
        info = {"path": str(dataset.path), "x_key": dataset.x_key, "samples": dataset.samples,
                "preprocessing": prep.describe(dataset.x.dtype)}
    finally:
        dataset.close()
    return xs, info
