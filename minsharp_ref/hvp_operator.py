"""The Hessian (or Gauss-Newton matrix) of the mean loss as a SciPy ``LinearOperator``
(docs/method.md section 14).

Parameters are flattened in the report's tensor order (``engine.tensor_columns``: per
parameterised layer its weight then its bias, each initializer in its stored layout,
C order); ``slices`` maps an initializer name to its coordinates and ``block(name)`` is the
operator of that tensor's diagonal block. Each product streams the data in batches and sums
them in batch order in float64, so the same call gives the same bits. The parameter-only
part of each batch (forward activations, δ, the loss factor) is kept between products while
it fits ``cache_bytes``; beyond that every product re-reads and re-forwards the data, and
memory stays flat in the number of samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from scipy.sparse.linalg import LinearOperator

from .engine import tensor_columns
from .errors import MinsharpError
from .hvp import MATRICES, BatchState, batch_product, prepare
from .ir import Network
from .options import available_cores
from .plan import traversal_plan
from .scoring import in_order

DEFAULT_CACHE_BYTES = 1024 ** 3
DEFAULT_BATCH_SIZE = 256

#: a source of data: a callable returning a fresh iterator of (x, y) batches, x already
#: preprocessed (B, *input_shape) float64, y the labels of those samples or None
BatchSource = Callable[[], Iterator[tuple[np.ndarray, Optional[np.ndarray]]]]


@dataclass(frozen=True)
class Layout:
    """Where each parameter tensor sits in the flat vector."""

    names: tuple[str, ...]
    layers: tuple[int, ...]  # parameterised-layer index of each tensor
    kinds: tuple[str, ...]  # "weight" or "bias"
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]

    @staticmethod
    def of(network: Network) -> "Layout":
        cols = tensor_columns(network)
        params = network.param_layers
        shapes = tuple(tuple(getattr(params[d], which).shape) for d, which, _ in cols)
        sizes = [int(np.prod(s)) for s in shapes]
        return Layout(tuple(n for _, _, n in cols), tuple(d for d, _, _ in cols),
                      tuple(w for _, w, _ in cols), shapes,
                      tuple(int(o) for o in np.concatenate([[0], np.cumsum(sizes)])))

    @property
    def size(self) -> int:
        return self.offsets[-1]

    @property
    def slices(self) -> dict[str, slice]:
        return {n: slice(self.offsets[j], self.offsets[j + 1]) for j, n in enumerate(self.names)}

    def split(self, v: np.ndarray) -> dict[str, np.ndarray]:
        """The flat vector as arrays keyed by initializer name, in the stored shapes."""
        return {n: v[self.offsets[j]:self.offsets[j + 1]].reshape(self.shapes[j])
                for j, n in enumerate(self.names)}


class HessianOperator(LinearOperator):
    """H (``matrix="hessian"``) or the Gauss-Newton matrix G (``"ggn"``) of the mean loss
    over the samples of ``source``, restricted to the tensors ``names`` (default: all),
    as a symmetric float64 LinearOperator. ``hvps`` counts the products (each one pass
    over the data)."""

    def __init__(self, network: Network, source: BatchSource, matrix: str = "hessian",
                 cache_bytes: int = DEFAULT_CACHE_BYTES, names: Optional[Sequence[str]] = None,
                 _shared: Optional["_Shared"] = None, workers: Optional[int] = None):
        if matrix not in MATRICES:
            raise MinsharpError(f"matrix must be hessian or ggn, not {matrix!r}")
        self.network = network
        self.matrix = matrix
        self.layout = Layout.of(network)
        self._shared = _shared or _Shared(network, source, matrix == "hessian", cache_bytes,
                                          workers or available_cores())
        self.names = tuple(self.layout.names if names is None else names)
        unknown = [n for n in self.names if n not in self.layout.names]
        if unknown:
            raise MinsharpError(f"no parameter tensor {unknown[0]!r} (tensors: "
                                f"{', '.join(self.layout.names)})")
        self._index = [self.layout.names.index(n) for n in self.names]
        sizes = [self.layout.offsets[j + 1] - self.layout.offsets[j] for j in self._index]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
        super().__init__(np.float64, (int(self._offsets[-1]),) * 2)

    # ---------------------------------------------------------------- public surface

    @property
    def slices(self) -> dict[str, slice]:
        """Initializer name → its coordinates in this operator's vectors."""
        return {n: slice(int(self._offsets[k]), int(self._offsets[k + 1]))
                for k, n in enumerate(self.names)}

    @property
    def hvps(self) -> int:
        """Products computed so far by this operator and the blocks made from it."""
        return self._shared.hvps

    @property
    def samples(self) -> int:
        return self._shared.samples()

    def block(self, name: str) -> "HessianOperator":
        """The diagonal block of one parameter tensor (products touch only what it needs)."""
        return HessianOperator(self.network, self._shared.source, self.matrix, names=[name],
                               _shared=self._shared)

    def split(self, v: np.ndarray) -> dict[str, np.ndarray]:
        """A vector of this operator as arrays keyed by initializer name (stored shapes)."""
        return {n: v[s].reshape(self.layout.shapes[j])
                for (n, s), j in zip(self.slices.items(), self._index)}

    # ------------------------------------------------------------------- products

    def _matvec(self, v):
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        directions: list = [None] * len(self.network.param_layers)
        for k, j in enumerate(self._index):
            d, which = self.layout.layers[j], self.layout.kinds[j]
            part = v[self._offsets[k]:self._offsets[k + 1]].reshape(self.layout.shapes[j])
            w, b = directions[d] or (np.zeros(self.network.param_layers[d].weight.shape), None)
            directions[d] = (part, b) if which == "weight" else (w, part)
        wanted = {self.layout.layers[j] for j in self._index}
        sums = self._shared.product(directions, wanted, self.matrix == "ggn")
        out = np.empty(self.shape[0])
        for k, j in enumerate(self._index):
            gw, gb = sums[self.layout.layers[j]]
            part = gw if self.layout.kinds[j] == "weight" else gb
            out[self._offsets[k]:self._offsets[k + 1]] = part.reshape(-1)
        return out

    def _rmatvec(self, v):
        return self._matvec(v)

    def _adjoint(self):
        return self


class _Shared:
    """The data side of an operator and its blocks: the batch source, the per-batch states
    while they fit the cache, and the product count."""

    def __init__(self, network: Network, source: BatchSource, with_deltas: bool, cache_bytes: int,
                 workers: int = 1):
        if workers < 1:
            raise MinsharpError(f"--workers must be at least 1, not {workers}")
        self.network, self.source, self.workers = network, source, workers
        self.plan = traversal_plan(network)
        self.with_deltas = with_deltas
        self.cache_bytes = cache_bytes
        self.cache: Optional[list[BatchState]] = None
        self.streaming = False
        self.hvps = 0
        self._samples: Optional[int] = None

    def states(self) -> Iterable[BatchState]:
        if self.cache is not None:
            yield from self.cache
            return
        kept: Optional[list] = None if self.streaming else []
        held, n = 0, 0
        for x, y in self.source():
            if self.with_deltas and y is None:
                raise MinsharpError("the Hessian needs labels (the data has none); the "
                                    "Gauss-Newton matrix (matrix='ggn') does not")
            state = prepare(self.network, self.plan, x, y, self.with_deltas)
            n += state.n
            if kept is not None:
                held += state.nbytes
                if held > self.cache_bytes:
                    kept = None
                else:
                    kept.append(state)
            yield state
        self._samples = n
        if kept is None:
            self.streaming = True
        else:
            self.cache = kept

    def samples(self) -> int:
        if self._samples is None:
            self._samples = sum(len(x) for x, _ in self.source())
        return self._samples

    def product(self, directions: list, wanted: set, ggn: bool) -> dict:
        """Mean over samples of the per-layer products: ``workers`` batches at a time, each
        on one thread with single-threaded BLAS, their sums added in batch order (the bits
        do not depend on the number of workers)."""
        from concurrent.futures import ThreadPoolExecutor

        from threadpoolctl import threadpool_limits

        def job(state: BatchState):
            return state.n, batch_product(self.network, self.plan, state, directions, wanted, ggn)

        total: dict = {}
        n = 0
        with threadpool_limits(1, user_api="blas"), ThreadPoolExecutor(self.workers) as pool:
            for count, part in in_order(pool, job, self.states(), self.workers):
                n += count
                for d, (gw, gb) in part.items():
                    if d in total:
                        tw, tb = total[d]
                        total[d] = (tw + gw, None if gb is None else tb + gb)
                    else:
                        total[d] = (gw, gb)
        if n == 0:
            raise MinsharpError("no samples")
        self.hvps += 1
        return {d: (gw / n, None if gb is None else gb / n) for d, (gw, gb) in total.items()}


def array_source(x: np.ndarray, y: Optional[np.ndarray], batch_size: int) -> BatchSource:
    """Batches of in-memory, already preprocessed arrays."""
    x = np.asarray(x, dtype=np.float64)

    def source():
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], None if y is None else y[i:i + batch_size]
    return source
