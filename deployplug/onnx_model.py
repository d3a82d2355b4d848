"""ONNX files read as untrusted input, checked before onnxruntime allocates anything.

``onnx.load`` follows external-data references wherever they point and onnxruntime allocates
every initializer at the size its ``dims`` declare. So the file is read once, under the size
cap and never through a symlink, parsed from those bytes, and then:

* every tensor stored in the model (initializers, sparse initializers, tensor attributes of
  nodes in every graph, subgraph and local function) must have non-negative dims whose bytes
  fit the tensor budget (counted together), and data that matches its dims;
* every value declared with a static shape (graph inputs, outputs, ``value_info``) must fit
  the budget too;
* external data must name a plain file inside the model's directory (no separators, no
  ``..``, not absolute), that file must be a regular file holding the referenced range, and
  during a verification the name must be one the manifest vouched for.

A model passing these checks is handed to onnxruntime from the very bytes that were checked
(or, with external data, from its path), so nothing can be swapped in between.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
from google.protobuf.message import DecodeError

from deployplug.errors import ArtifactFormatError
from deployplug.integrity import plain_name_problem, vouched_names
from deployplug.limits import Limits, current, file_kind, format_bytes, read_bounded

#: protobuf cannot serialize a message over 2 GiB, so no single-file model is larger
MAX_PROTO_BYTES = (2 << 30) - 1
MAX_GRAPH_DEPTH = 32
MAX_NODES = 1_000_000
_SUB_BYTE_BITS = {21: 4, 22: 4, 23: 4, 25: 2, 26: 2, 27: 6, 28: 6}
_STRING = onnx.TensorProto.STRING
_EXTERNAL = onnx.TensorProto.EXTERNAL


def _itemsize(data_type: int, where: str) -> int:
    if data_type == _STRING:
        return 1  # strings are counted by their stored length instead
    try:
        return int(onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize)
    except Exception:
        raise ArtifactFormatError(f"{where}: unknown tensor data type {data_type}") from None


@dataclass
class _Budget:
    """Running totals for one model."""

    limits: Limits
    directory: Path | None
    source: str
    spent: int = 0
    nodes: int = 0
    external: list[str] = field(default_factory=list)

    def charge(self, nbytes: int, what: str) -> None:
        self.spent += nbytes
        self.limits.check_total(self.spent, f"{self.source}: tensors up to {what}")


def _typed_count(tensor: onnx.TensorProto) -> int:
    return (len(tensor.float_data) + len(tensor.int32_data) + len(tensor.int64_data)
            + len(tensor.double_data) + len(tensor.uint64_data) + len(tensor.string_data))


def _check_tensor(tensor: onnx.TensorProto, what: str, budget: _Budget) -> None:
    where = f"{budget.source}: {what} '{tensor.name}'"
    dims = list(tensor.dims)
    if any(d < 0 for d in dims):
        raise ArtifactFormatError(f"{where}: negative dimension in {dims}")
    count = math.prod(dims)
    itemsize = _itemsize(tensor.data_type, where)
    if tensor.data_type == _STRING:
        nbytes = sum(len(s) for s in tensor.string_data) + 8 * count
    else:
        nbytes = count * itemsize
    if nbytes > budget.limits.max_tensor_bytes:
        raise ArtifactFormatError(
            f"{where}: dims {dims} declare {format_bytes(nbytes)}, over the tensor budget of "
            f"{format_bytes(budget.limits.max_tensor_bytes)}")
    budget.charge(nbytes, what)
    if tensor.data_location == _EXTERNAL:
        _check_external(tensor, where, nbytes, budget)
        return
    if tensor.HasField("raw_data"):
        bits = _SUB_BYTE_BITS.get(tensor.data_type)
        want = (count * bits + 7) // 8 if bits else nbytes
        if tensor.data_type != _STRING and len(tensor.raw_data) != want:
            raise ArtifactFormatError(f"{where}: dims {dims} need {want} bytes, the file holds "
                                      f"{len(tensor.raw_data)}")
        return
    held = _typed_count(tensor)
    if count and not held:
        raise ArtifactFormatError(f"{where}: dims {dims} declare {count} values but the "
                                  "tensor holds none")
    if held and not (count <= 2 * held + 1 and held <= 2 * count + 1):
        raise ArtifactFormatError(f"{where}: dims {dims} declare {count} values but the "
                                  f"tensor holds {held}")


def _check_external(tensor: onnx.TensorProto, where: str, nbytes: int, budget: _Budget) -> None:
    info = {entry.key: entry.value for entry in tensor.external_data}
    name = info.get("location", "")
    why = plain_name_problem(name)
    if why is not None:
        raise ArtifactFormatError(f"{where}: external data location {name!r} {why}; only a "
                                  "plain file name inside the model's directory is read")
    if budget.directory is None:
        raise ArtifactFormatError(f"{where}: refers to external data ({name}) but the model "
                                  "has no directory to resolve it in")
    vouched = vouched_names()
    if vouched is not None and name not in vouched:
        raise ArtifactFormatError(f"{where}: external data file {name!r} is not listed in the "
                                  "manifest, so nothing vouches for it")
    try:
        offset = int(info.get("offset", "0"))
        length = int(info["length"]) if "length" in info else None
    except ValueError:
        raise ArtifactFormatError(f"{where}: external data offset/length are not "
                                  "integers") from None
    path = budget.directory / name
    try:
        mode = os.lstat(path)
    except OSError:
        raise ArtifactFormatError(f"{where}: external data file {name!r} is missing") from None
    if not stat.S_ISREG(mode.st_mode):
        raise ArtifactFormatError(f"{where}: external data {name!r} is "
                                  f"{file_kind(mode.st_mode)}, not a regular file")
    size = mode.st_size
    length = size - offset if length is None else length
    if offset < 0 or length < 0 or offset + length > size:
        raise ArtifactFormatError(f"{where}: external data range {offset}+{length} lies "
                                  f"outside {name!r} ({size} bytes)")
    if tensor.data_type != _STRING and length != nbytes:
        raise ArtifactFormatError(f"{where}: external data holds {length} bytes, the dims "
                                  f"need {nbytes}")
    budget.external.append(name)


def _check_value_shapes(values: Any, what: str, budget: _Budget) -> None:
    for value in values:
        if not value.type.HasField("tensor_type"):
            continue
        tensor_type = value.type.tensor_type
        dims = [d.dim_value for d in tensor_type.shape.dim if d.HasField("dim_value")]
        if any(d < 0 for d in dims):
            raise ArtifactFormatError(f"{budget.source}: {what} '{value.name}' declares the "
                                      f"negative dims {dims}")
        if not dims or tensor_type.elem_type == 0:
            continue
        itemsize = _itemsize(tensor_type.elem_type, f"{budget.source}: {what} '{value.name}'")
        budget.limits.check_tensor(dims, itemsize, f"{budget.source}: {what} '{value.name}'")


def _attribute_tensors(node: onnx.NodeProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    for attr in node.attribute:
        where = f"attribute '{attr.name}' of node '{node.name or node.op_type}'"
        if attr.HasField("t"):
            yield attr.t, where
        for tensor in attr.tensors:
            yield tensor, where
        for sparse in ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(
                attr.sparse_tensors):
            yield sparse.values, where
            yield sparse.indices, where


def _check_nodes(nodes: Any, budget: _Budget, depth: int) -> None:
    for node in nodes:
        budget.nodes += 1
        if budget.nodes > MAX_NODES:
            raise ArtifactFormatError(f"{budget.source}: more than {MAX_NODES} nodes")
        for tensor, where in _attribute_tensors(node):
            _check_tensor(tensor, where, budget)
        for attr in node.attribute:
            for graph in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                _check_graph(graph, budget, depth + 1)


def _check_graph(graph: onnx.GraphProto, budget: _Budget, depth: int = 0) -> None:
    if depth > MAX_GRAPH_DEPTH:
        raise ArtifactFormatError(f"{budget.source}: subgraphs nested more than "
                                  f"{MAX_GRAPH_DEPTH} deep")
    for tensor in graph.initializer:
        _check_tensor(tensor, "initializer", budget)
    for sparse in graph.sparse_initializer:
        dense = list(sparse.dims)
        budget.limits.check_tensor(dense, _itemsize(sparse.values.data_type, budget.source),
                                   f"{budget.source}: sparse initializer "
                                   f"'{sparse.values.name}'")
        _check_tensor(sparse.values, "sparse initializer values", budget)
        _check_tensor(sparse.indices, "sparse initializer indices", budget)
    for values, what in ((graph.input, "input"), (graph.output, "output"),
                         (graph.value_info, "value")):
        _check_value_shapes(values, what, budget)
    _check_nodes(graph.node, budget, depth)


def check_model(proto: onnx.ModelProto, directory: Path | None, source: str = "model.onnx",
                limits: Limits | None = None) -> list[str]:
    """Refuse a model whose declared sizes or external data are not safe to hand on.

    Returns the external data file names it refers to (all checked).
    """
    budget = _Budget(limits or current(), None if directory is None else Path(directory),
                     source)
    _check_graph(proto.graph, budget)
    for function in proto.functions:
        _check_nodes(function.node, budget, 1)
    return budget.external


def parse_model(data: bytes, source: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RecursionError) as exc:
        raise ArtifactFormatError(f"{source}: not a valid ONNX model (truncated or damaged): "
                                  f"{exc}") from None
    if not proto.HasField("graph"):
        raise ArtifactFormatError(f"{source}: not an ONNX model (no graph)")
    return proto


def load_checked(path: Path) -> tuple[onnx.ModelProto, bytes, list[str]]:
    """``(model, the bytes it was parsed from, external data names)`` for one ``.onnx``."""
    path = Path(path)
    cap = min(current().max_file_bytes, MAX_PROTO_BYTES)
    data = read_bounded(path, path.name, cap)
    proto = parse_model(data, path.name)
    external = check_model(proto, path.parent, path.name)
    return proto, data, external


__all__ = ["MAX_PROTO_BYTES", "check_model", "load_checked", "parse_model"]
