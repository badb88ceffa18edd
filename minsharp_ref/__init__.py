"""minsharp-ref: the reference implementation of minimum sharpness (Ibayashi et al. 2021).

Exact per-layer Hessian traces of the cross-entropy loss of ReLU networks imported from
ONNX, and their α-scale-invariant minimum. See docs/method.md.
"""

__version__ = "0.1.0"

from .api import ScoreResult, score, score_arrays  # noqa: E402
from .errors import MinsharpError  # noqa: E402
from .spectrum import hessian_operator  # noqa: E402

__all__ = ["score", "score_arrays", "ScoreResult", "MinsharpError", "hessian_operator", "__version__"]
