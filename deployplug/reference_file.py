"""``reference.npz`` read as untrusted input: names, counts, dtypes and sizes before data.

The file holds the verification inputs and PyTorch's outputs as ``s{k}_in{i}`` and
``s{k}_out{j}`` arrays. ``numpy.load`` trusts what it reads: a key like ``s999999999_in0``
made the old reader loop a billion times, and a member that inflates to gigabytes was
inflated before anything looked at it. Here, instead:

* the number of inputs and outputs comes from the manifest, and the member names must be
  exactly ``s0..s{K-1}`` x those, where ``K`` follows from the member count (never from a
  number written in a name);
* each member's ``.npy`` header is read from the zip stream first (a few hundred bytes), and
  its dtype, shape and byte size are checked against the manifest's recorded shapes and the
  tensor budget; object (pickled) and structured dtypes are refused;
* the zip directory's declared sizes must agree with the header, and no member may claim a
  compression ratio deflate cannot produce; then exactly the announced bytes are read, so a
  member that lies about its size cannot inflate further.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npy_format

from deployplug.errors import ArtifactFormatError
from deployplug.limits import Limits, current, format_bytes, open_regular

#: more members than any export writes (samples x tensors); bounds the name bookkeeping
MAX_MEMBERS = 4096
#: deflate cannot compress better than about 1032:1; a larger claimed ratio is a lie
MAX_DEFLATE_RATIO = 1100
_MAX_HEADER = 10_000
_NAME = re.compile(r"s(\d{1,6})_(in|out)(\d{1,6})\.npy")
_KINDS = frozenset("biuf")  # bool, signed, unsigned, float: what PyTorch tensors hold here


def _dtype_of(spec: Mapping[str, Any], where: str) -> np.dtype:
    name = str(spec.get("dtype", ""))
    name = name.removeprefix("torch.")
    try:
        dtype = np.dtype(name)
    except TypeError:
        raise ArtifactFormatError(f"manifest.json: {where} has dtype {spec.get('dtype')!r}, "
                                  "which is not a numeric array type") from None
    if dtype.kind not in _KINDS:
        raise ArtifactFormatError(f"manifest.json: {where} has dtype {dtype}, which is not a "
                                  "numeric array type")
    return dtype


def _expected_names(count: int, n_in: int, n_out: int) -> list[str]:
    per = n_in + n_out
    if per == 0:
        raise ArtifactFormatError("manifest.json lists no inputs and no outputs")
    if count == 0 or count % per:
        raise ArtifactFormatError(
            f"reference.npz holds {count} arrays; the manifest's {n_in} input(s) and "
            f"{n_out} output(s) need a whole number of samples of {per} arrays each"
        )
    names = []
    for k in range(count // per):
        names += [f"s{k}_in{i}.npy" for i in range(n_in)]
        names += [f"s{k}_out{j}.npy" for j in range(n_out)]
    return names


def _counts_from_names(names: Sequence[str]) -> tuple[int, int]:
    """Input and output counts when no manifest is at hand (names still fully checked)."""
    n_in = n_out = 0
    for name in names:
        match = _NAME.fullmatch(name)
        if match is None:
            raise ArtifactFormatError(f"reference.npz: unexpected member {name!r}")
        index = int(match.group(3)) + 1
        if match.group(2) == "in":
            n_in = max(n_in, index)
        else:
            n_out = max(n_out, index)
    return n_in, n_out


def _check_member(info: zipfile.ZipInfo, limits: Limits) -> None:
    name = info.filename
    if info.flag_bits & 0x1:
        raise ArtifactFormatError(f"reference.npz: member {name} is encrypted")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise ArtifactFormatError(f"reference.npz: member {name} uses compression method "
                                  f"{info.compress_type}; only stored or deflated members are "
                                  "read")
    if info.file_size > limits.max_tensor_bytes + _MAX_HEADER:
        raise ArtifactFormatError(
            f"reference.npz: member {name} declares {format_bytes(info.file_size)}, over the "
            f"tensor budget of {format_bytes(limits.max_tensor_bytes)}")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise ArtifactFormatError(f"reference.npz: stored member {name} declares "
                                  f"{info.compress_size} bytes packed but {info.file_size} "
                                  "unpacked")
    if info.file_size > MAX_DEFLATE_RATIO * max(info.compress_size, 1):
        raise ArtifactFormatError(
            f"reference.npz: member {name} claims {info.file_size} bytes from "
            f"{info.compress_size} compressed, a ratio deflate cannot produce (a zip bomb or a "
            "damaged file)")


def _read_header(fp: IO[bytes], name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = npy_format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npy_format.read_array_header_1_0(
                fp, max_header_size=_MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = npy_format.read_array_header_2_0(
                fp, max_header_size=_MAX_HEADER)
        else:
            raise ArtifactFormatError(f"reference.npz: member {name} is .npy version "
                                      f"{version}; versions 1.0 and 2.0 are read")
    except (ValueError, EOFError, SyntaxError, TypeError) as exc:
        raise ArtifactFormatError(f"reference.npz: member {name} has no valid .npy header: "
                                  f"{exc}") from None
    if dtype.hasobject:
        raise ArtifactFormatError(f"reference.npz: member {name} holds Python objects "
                                  "(pickled data is never loaded)")
    if dtype.fields is not None or dtype.subdtype is not None or dtype.kind not in _KINDS:
        raise ArtifactFormatError(f"reference.npz: member {name} has dtype {dtype}, not a "
                                  "plain numeric type")
    return tuple(shape), bool(fortran), dtype


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, spec: Mapping[str, Any] | None,
                 where: str, limits: Limits, spent: int) -> tuple[np.ndarray, int]:
    name = info.filename
    _check_member(info, limits)
    with zf.open(info) as fp:
        shape, fortran, dtype = _read_header(fp, name)
        if spec is not None:
            want_shape = tuple(spec["shape"])
            want_dtype = _dtype_of(spec, where)
            if shape != want_shape or dtype.newbyteorder("=") != want_dtype:
                raise ArtifactFormatError(
                    f"reference.npz: member {name} is {dtype} {list(shape)}, but the manifest "
                    f"records {where} as {want_dtype} {list(want_shape)}")
        nbytes = limits.check_tensor(shape, dtype.itemsize, f"reference.npz member {name}")
        limits.check_total(spent + nbytes, "reference.npz")
        header_len = fp.tell()
        if info.file_size != header_len + nbytes:
            raise ArtifactFormatError(
                f"reference.npz: member {name} declares {info.file_size} bytes, but its header "
                f"describes {header_len + nbytes}")
        buffer = bytearray(nbytes)
        view, got = memoryview(buffer), 0
        while got < nbytes:
            n = cast(io.BufferedIOBase, fp).readinto(view[got:])  # a ZipExtFile
            if not n:
                raise ArtifactFormatError(f"reference.npz: member {name} is truncated "
                                          f"({got} of {nbytes} data bytes)")
            got += n
        if fp.read(1):
            raise ArtifactFormatError(f"reference.npz: member {name} is longer than declared")
    array = np.frombuffer(buffer, dtype=dtype)
    array = array.reshape(shape[::-1]).T if fortran else array.reshape(shape)
    return np.ascontiguousarray(array), nbytes


def write_reference(path: Path, samples: Sequence[Sequence[np.ndarray]],
                    outputs: Sequence[Sequence[np.ndarray]]) -> None:
    """Store input samples and PyTorch's outputs as ``s{k}_in{i}`` / ``s{k}_out{j}`` arrays.

    Only plain numeric arrays are written, since only those are read back (pickled objects
    are refused by :func:`read_reference`).
    """
    arrays: dict[str, np.ndarray] = {}
    for k, (ins, outs) in enumerate(zip(samples, outputs, strict=True)):
        arrays.update({f"s{k}_in{i}": np.asarray(a) for i, a in enumerate(ins)})
        arrays.update({f"s{k}_out{j}": np.asarray(a) for j, a in enumerate(outs)})
    for key, array in arrays.items():
        if array.dtype.kind not in _KINDS or array.dtype.fields is not None:
            raise ValueError(f"reference array {key} has dtype {array.dtype}; only numeric "
                             "tensors can be stored")
    np.savez(path, allow_pickle=False, **arrays)


def read_reference(path: Path, inputs: Sequence[Mapping[str, Any]] | None = None,
                   outputs: Sequence[Mapping[str, Any]] | None = None,
                   limits: Limits | None = None
                   ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    """``(samples, outputs)``: per sample, the input arrays and PyTorch's output arrays.

    ``inputs`` / ``outputs`` are the manifest's tensor records (``shape``, ``dtype``); with
    them every array must match its record. Without them (a bare file) the counts are taken
    from the member names, which must still form complete samples.
    """
    limits = limits or current()
    path = Path(path)
    fd = open_regular(path, path.name)
    try:
        size = os.fstat(fd).st_size
        if size > limits.max_file_bytes:
            raise ArtifactFormatError(f"{path.name}: {format_bytes(size)} is over the "
                                      f"{format_bytes(limits.max_file_bytes)} file size limit")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        with fh, zipfile.ZipFile(fh) as zf:
            return _read_archive(zf, inputs, outputs, limits)
    except ArtifactFormatError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError,
            NotImplementedError, RuntimeError, KeyError) as exc:
        raise ArtifactFormatError(f"{path.name}: not a readable .npz archive: "
                                  f"{type(exc).__name__}: {exc}") from None


def _read_archive(zf: zipfile.ZipFile, inputs: Sequence[Mapping[str, Any]] | None,
                  outputs: Sequence[Mapping[str, Any]] | None, limits: Limits
                  ) -> tuple[list[list[np.ndarray]], list[list[np.ndarray]]]:
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise ArtifactFormatError(f"reference.npz holds {len(infos)} members, more than "
                                  f"{MAX_MEMBERS}")
    by_name: dict[str, zipfile.ZipInfo] = {}
    for info in infos:
        if info.filename in by_name:
            raise ArtifactFormatError(f"reference.npz: member {info.filename} appears twice")
        by_name[info.filename] = info
    if inputs is None or outputs is None:
        n_in, n_out = _counts_from_names(list(by_name))
    else:
        n_in, n_out = len(inputs), len(outputs)
    expected = _expected_names(len(infos), n_in, n_out)
    unexpected = sorted(set(by_name) - set(expected))
    if unexpected:
        raise ArtifactFormatError(
            f"reference.npz: unexpected member(s) {unexpected[:3]}; with {len(infos)} arrays "
            f"and {n_in} input(s) + {n_out} output(s) per sample the names are "
            f"s0_in0.npy ... {expected[-1]}")
    per = n_in + n_out
    samples: list[list[np.ndarray]] = []
    references: list[list[np.ndarray]] = []
    spent = 0
    for k in range(len(infos) // per):
        arrays: dict[str, list[np.ndarray]] = {"in": [], "out": []}
        for kind, count, specs, label in (("in", n_in, inputs, "input"),
                                          ("out", n_out, outputs, "output")):
            for i in range(count):
                spec = None if specs is None else specs[i]
                array, nbytes = _read_member(zf, by_name[f"s{k}_{kind}{i}.npy"], spec,
                                             f"{label} {i}", limits, spent)
                spent += nbytes
                arrays[kind].append(array)
        samples.append(arrays["in"])
        references.append(arrays["out"])
    return samples, references


__all__ = ["MAX_DEFLATE_RATIO", "MAX_MEMBERS", "read_reference", "write_reference"]
