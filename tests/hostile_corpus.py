"""Hostile and damaged variants of a real artifact directory, for ``test_hostile_files.py``.

Every case starts from a copy of one genuine export (ONNX + Caffe + MsnhNet of a tiny conv
net) and damages one thing. Corrupted artifacts come twice: as they are (the manifest's
sha256 no longer matches, so the integrity check must catch them before any reader runs) and
*re-hashed* (the manifest updated to the corrupted file's size and sha256, so the reader
itself must refuse the file within the resource bounds).

Each case records what verification must do with it:

* ``integrity`` -- a failed report whose integrity list contains ``match``;
* ``error``     -- ``verify`` raises a ``DeployError`` whose message contains ``match``;
* ``failed``    -- a failed report where format ``fmt`` could not run, the reason
  containing ``match``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from deployplug.exporters.caffe.writer import read_caffemodel


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[Path], None]
    expect: str  # "integrity" | "error" | "failed"
    match: str
    fmt: str | None = None
    rehash: str | None = None  # re-record this file's size and sha256 after ``build``


# ----------------------------------------------------------------------------- helpers
def manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())


def write_manifest(d: Path, data: dict) -> None:
    (d / "manifest.json").write_text(json.dumps(data, indent=2))


def rehash(d: Path, name: str) -> None:
    """Record ``name``'s current size and sha256 in the manifest (a forger's fix-up)."""
    data = manifest(d)
    blob = (d / name).read_bytes()
    for entry in data["files"]:
        if entry["name"] == name:
            entry["bytes"] = len(blob)
            entry["sha256"] = hashlib.sha256(blob).hexdigest()
    write_manifest(d, data)


def edit_text(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, count))


def truncate(path: Path, keep: float = 0.5) -> None:
    blob = path.read_bytes()
    path.write_bytes(blob[: int(len(blob) * keep)])


def reference_arrays(d: Path) -> dict[str, np.ndarray]:
    with np.load(d / "reference.npz") as data:
        return {k: data[k] for k in data.files}


def save_npz(d: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(d / "reference.npz", "wb") as fh:
        np.savez(fh, **arrays)


# ----------------------------------------------------------------------------- zip bomb
def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _zip(members: list[tuple[str, int, bytes, int, int]]) -> bytes:
    """A zip file from ``(name, method, payload, crc, uncompressed size)`` entries."""
    out, central = bytearray(), bytearray()
    for name, method, payload, crc, size in members:
        raw = name.encode()
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc,
                           len(payload), size, len(raw), 0) + raw + payload
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21,
                               crc, len(payload), size, len(raw), 0, 0, 0, 0, 0,
                               offset) + raw
    start = len(out)
    out += central
    out += struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members),
                       len(central), start, 0)
    return bytes(out)


def deflate_bomb_npz(d: Path, gigabytes: float = 4.0) -> None:
    """Replace ``s0_in0`` with a ~4 GB all-zero float32 array deflated to ~4 MB.

    Repeating one full-flushed deflate block of 1 MiB zeros builds the stream without ever
    holding or compressing 4 GB. The CRC is left 0: a reader that inflated the member would
    fail only after inflating all of it.
    """
    block_len = 1 << 20
    blocks = int(gigabytes * 1e9) // block_len
    header = _npy_header((blocks * block_len // 4,))
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = co.compress(header) + co.flush(zlib.Z_FULL_FLUSH)
    block = co.compress(bytes(block_len)) + co.flush(zlib.Z_FULL_FLUSH)
    stream = head + block * blocks + co.flush()
    members = [("s0_in0.npy", 8, stream, 0, len(header) + blocks * block_len)]
    for key, array in reference_arrays(d).items():
        if key == "s0_in0":
            continue
        buf = io.BytesIO()
        np.lib.format.write_array(buf, array)
        payload = buf.getvalue()
        members.append((f"{key}.npy", 0, payload, zlib.crc32(payload), len(payload)))
    (d / "reference.npz").write_bytes(_zip(members))


# ----------------------------------------------------------------------------- variants
def npz_huge_sample_key(d: Path) -> None:
    arrays = reference_arrays(d)
    arrays["s999999999_in0"] = arrays.pop("s1_in0")
    save_npz(d, arrays)


def npz_pickled_objects(d: Path) -> None:
    arrays = reference_arrays(d)
    arrays["s0_in0"] = np.array([{"payload": "pickled"}, None], dtype=object)
    save_npz(d, arrays)


def npz_wrong_dtype(d: Path) -> None:
    arrays = reference_arrays(d)
    arrays["s0_in0"] = arrays["s0_in0"].astype(np.float64)
    save_npz(d, arrays)


def npz_wrong_shape(d: Path) -> None:
    arrays = reference_arrays(d)
    arrays["s0_out0"] = np.concatenate([arrays["s0_out0"]] * 2)
    save_npz(d, arrays)


def fifo_for(name: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        (d / name).unlink()
        os.mkfifo(d / name)
    return build


def symlink_to_dev_zero(name: str) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        (d / name).unlink()
        (d / name).symlink_to("/dev/zero")
    return build


def manifest_json(text: str | bytes) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        path = d / "manifest.json"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return build


def manifest_edit(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        data = manifest(d)
        fn(data)
        write_manifest(d, data)
    return build


def manifest_over_cap(d: Path) -> None:
    text = (d / "manifest.json").read_text()
    (d / "manifest.json").write_text(text + " " * (16 * 1024 * 1024 + 1))


def manifest_deeply_nested(d: Path) -> None:
    data = manifest(d)
    text = json.dumps(data)[:-1] + ', "extra": {"x": ' + "[" * 200_000 + "]" * 200_000 + "}}"
    (d / "manifest.json").write_text(text)


def text_edit(name: str, old: str, new: str) -> Callable[[Path], None]:
    return lambda d: edit_text(d / name, old, new)


def caffemodel_huge_blob(d: Path) -> None:
    model = read_caffemodel(d / "model.caffemodel")
    blob = model.layer[0].blobs[0]
    del blob.shape.dim[:]
    blob.shape.dim.extend([10**6, 10**6, 3, 3])
    (d / "model.caffemodel").write_bytes(model.SerializeToString())


def _largest_initializer(proto: onnx.ModelProto) -> onnx.TensorProto:
    return max(proto.graph.initializer, key=lambda t: len(t.raw_data))


def onnx_huge_dims(d: Path) -> None:
    proto = onnx.load(str(d / "model.onnx"))
    tensor = _largest_initializer(proto)
    del tensor.dims[:]
    tensor.dims.extend([100_000, 100_000, 100])
    onnx.save(proto, str(d / "model.onnx"))


def onnx_external(location: str, outside: bool) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        proto = onnx.load(str(d / "model.onnx"))
        tensor = _largest_initializer(proto)
        data = tensor.raw_data
        target = (d.parent / f"{d.name}-secret.bin") if outside else d / location
        target.write_bytes(data)
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", location if not outside else f"../{target.name}"),
                           ("offset", "0"), ("length", str(len(data)))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        (d / "model.onnx").write_bytes(proto.SerializeToString())
    return build


def _both(name: str, build: Callable[[Path], None], file: str, match: str,
          fmt: str | None = None, expect: str = "failed") -> list[Case]:
    """The corrupted file as is (integrity catches it) and re-hashed (the reader must)."""
    return [Case(f"{name}/integrity", build, "integrity", file),
            Case(f"{name}/rehashed", build, expect, match, fmt, rehash=file)]


CASES: list[Case] = [
    # reference.npz
    *_both("npz_huge_sample_key", npz_huge_sample_key, "reference.npz", "unexpected member",
           expect="error"),
    *_both("npz_deflate_bomb", deflate_bomb_npz, "reference.npz", "declares", expect="error"),
    *_both("npz_truncated", lambda d: truncate(d / "reference.npz"), "reference.npz",
           "not a readable .npz", expect="error"),
    Case("npz_pickled_objects", npz_pickled_objects, "error", "Python objects",
         rehash="reference.npz"),
    Case("npz_wrong_dtype", npz_wrong_dtype, "error", "float64", rehash="reference.npz"),
    Case("npz_wrong_shape", npz_wrong_shape, "error", "manifest records",
         rehash="reference.npz"),
    # special files
    Case("fifo_for_model", fifo_for("model.onnx"), "integrity", "FIFO"),
    Case("fifo_for_manifest", fifo_for("manifest.json"), "error", "FIFO"),
    Case("symlink_dev_zero_weights", symlink_to_dev_zero("model.msnhbin"), "integrity",
         "symbolic link"),
    Case("symlink_dev_zero_manifest", symlink_to_dev_zero("manifest.json"), "error",
         "symbolic link"),
    # manifest.json
    Case("manifest_list", manifest_json("[1, 2, 3]"), "error",
         "must be a JSON object, got list"),
    Case("manifest_wrong_types", manifest_edit(lambda m: m["files"][0].update(bytes="1297")),
         "error", "field 'files[0].bytes' must be a whole number, got str"),
    Case("manifest_formats_not_object", manifest_edit(lambda m: m.update(formats=["onnx"])),
         "error", "field 'formats' must be an object, got list"),
    Case("manifest_tolerance_string", manifest_edit(lambda m: m.update(tolerance="1e-5")),
         "error", "field 'tolerance' must be a number, got str"),
    Case("manifest_over_cap", manifest_over_cap, "error", "limit for this file"),
    Case("manifest_not_utf8", manifest_json(b'{"formats": "\xff\xfe"}'), "error",
         "not UTF-8"),
    Case("manifest_deeply_nested", manifest_deeply_nested, "error", "nested too deeply"),
    # Caffe
    *_both("prototxt_pad_100000", text_edit("model.prototxt", "pad: 1", "pad: 100000"),
           "model.prototxt", "pad = 100000", "caffe"),
    *_both("prototxt_stride_10000",
           text_edit("model.prototxt", "kernel_size: 3", "kernel_size: 3\n    stride: 10000"),
           "model.prototxt", "shape", "caffe"),
    *_both("prototxt_num_output_1e9",
           text_edit("model.prototxt", "num_output: 4", "num_output: 1000000000"),
           "model.prototxt", "num_output = 1000000000", "caffe"),
    *_both("caffemodel_truncated", lambda d: truncate(d / "model.caffemodel"),
           "model.caffemodel", "not a valid caffemodel", "caffe"),
    *_both("caffemodel_huge_blob_shape", caffemodel_huge_blob, "model.caffemodel",
           "declares 9000000000000 values", "caffe"),
    # MsnhNet
    *_both("msnhnet_padding_100000", text_edit("model.msnhnet", "padding: 1", "padding: 100000"),
           "model.msnhnet", "budget", "msnhnet"),
    Case("msnhnet_huge_channels", text_edit("model.msnhnet", "channels: 3", "channels: 2000000000"),
         "failed", "budget", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_huge_height_width",
         lambda d: (edit_text(d / "model.msnhnet", "height: 8", "height: 1000000"),
                    edit_text(d / "model.msnhnet", "width: 8", "width: 1000000")),
         "failed", "budget", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_huge_filters", text_edit("model.msnhnet", "filters: 4", "filters: 2000000000"),
         "failed", "budget", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_int_overflow", text_edit("model.msnhnet", "filters: 4", "filters: 1e30"),
         "failed", "32-bit", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_inf_padding", text_edit("model.msnhnet", "padding: 1", "padding: inf"),
         "failed", "must be an integer", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_nan_eps", text_edit("model.msnhnet", "useBias: 1", "useBias: 1\n  eps: nan"),
         "failed", "finite float32", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_negative_channels", text_edit("model.msnhnet", "channels: 3", "channels: -3"),
         "failed", ">= 1", "msnhnet", rehash="model.msnhnet"),
    Case("msnhnet_negative_filters", text_edit("model.msnhnet", "filters: 4", "filters: -4"),
         "failed", ">= 1", "msnhnet", rehash="model.msnhnet"),
    *_both("msnhbin_truncated", lambda d: (d / "model.msnhbin").write_bytes(
        (d / "model.msnhbin").read_bytes()[:-100]), "model.msnhbin", "need > given",
        "msnhnet"),
    # ONNX
    *_both("onnx_truncated", lambda d: truncate(d / "model.onnx"), "model.onnx",
           "not a valid ONNX model", "onnx"),
    *_both("onnx_huge_initializer_dims", onnx_huge_dims, "model.onnx", "over the tensor budget",
           "onnx"),
    Case("onnx_external_data_outside", onnx_external("secret.bin", outside=True), "failed",
         "external data location", "onnx", rehash="model.onnx"),
    Case("onnx_external_data_unlisted", onnx_external("weights.bin", outside=False), "failed",
         "not listed in the manifest", "onnx", rehash="model.onnx"),
]


def build_case(base: Path, root: Path, case: Case) -> Path:
    """A damaged copy of ``base`` under ``root`` for ``case``; returns its directory."""
    target = root / case.name.replace("/", "-")
    shutil.copytree(base, target)
    case.build(target)
    if case.rehash:
        rehash(target, case.rehash)
    return target


__all__ = ["CASES", "Case", "build_case", "manifest", "rehash", "write_manifest"]
