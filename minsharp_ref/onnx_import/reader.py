"""Reading a model file safely: size limits, protobuf parsing, external data only from inside
the model's directory, the ONNX checker; then conversion."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional

import onnx

from ..errors import MinsharpError, first_line
from .context import MAX_MODEL_BYTES, ImportedModel
from .graph import convert


def _read_model(path: Path) -> tuple[onnx.ModelProto, bytes]:
    if not path.is_file():
        raise MinsharpError(f"{path}: no such model file")
    size = path.stat().st_size
    if size == 0:
        raise MinsharpError(f"{path}: empty file, not an ONNX model")
    if size > MAX_MODEL_BYTES:
        raise MinsharpError(f"{path}: {size} bytes exceeds the limit of {MAX_MODEL_BYTES} bytes")
    data = path.read_bytes()
    try:
        model = onnx.load_model_from_string(data)
    except Exception:
        raise MinsharpError(f"{path}: not an ONNX model (protobuf parse failed)") from None
    if not model.HasField("graph") or not model.graph.node:
        raise MinsharpError(f"{path}: not an ONNX model (no graph)")
    return model, data


def _load_external_data(model: onnx.ModelProto, path: Path) -> None:
    """Read initializers stored outside the model file, only from inside its directory."""
    from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

    base = path.parent.resolve()
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        where = f'{path}: initializer "{tensor.name}" has external data at "{location}"'
        parts = Path(location).parts
        if not location or Path(location).is_absolute() or ".." in parts or location.startswith(("/", "\\")):
            raise MinsharpError(f"{where}: refused, external data must be a relative path "
                                "inside the model's directory")
        target = (base / location).resolve()
        if base not in target.parents:
            raise MinsharpError(f"{where}: refused, it resolves outside the model's directory")
        if not target.is_file():
            raise MinsharpError(f"{where}: no such file")
        try:
            load_external_data_for_tensor(tensor, str(base))
        except Exception as exc:
            raise MinsharpError(f"{where}: cannot read it ({exc})") from None
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]


def import_model(path, input_shape: Optional[tuple[int, ...]] = None) -> ImportedModel:
    """Read, check and convert an ONNX model file; raise MinsharpError on anything refused.
    ``input_shape`` (per sample) fixes dynamic input dimensions and must agree with the
    static ones."""
    path = Path(path)
    model, data = _read_model(path)
    _load_external_data(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as exc:
        raise MinsharpError(f"{path}: fails the ONNX checker: {first_line(exc)}") from None
    try:
        network = convert(model, input_shape)
    except MinsharpError as exc:
        raise MinsharpError(f"{path}: {exc}") from None
    return ImportedModel(path, hashlib.sha256(data).hexdigest(), model, network)
