"""The per-layer error profile: culprit logic, mapping of functional ops in every format,
rebuilding the lowered graph at verify time, report.md, the stored profile and --layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from torch import nn

import deployplug as dp
from deployplug.capture import Graph, Node, Value
from deployplug.cli import main
from deployplug.errors import ArtifactFormatError
from deployplug.layer_profile import (
    ABOVE,
    FAILED,
    MAX_ROWS,
    MISSING,
    OK,
    SHAPE,
    LayerProfile,
    LayerRow,
)
from deployplug.manifest import describe_files
from deployplug.runtimes.layer_compare import (
    ArtifactValues,
    MappedLayer,
    build_profile,
    decomposition_rule,
)
from deployplug.testing import randomize_batchnorm

FORMATS = ("onnx", "caffe", "msnhnet")


# ----------------------------------------------------------------------------- culprit logic
def _graph(parents: list[list[int]]) -> Graph:
    """Node i reads the nodes in ``parents[i]`` (-1: the graph input)."""
    names = [f"n{i}" for i in range(len(parents))]
    nodes = [Node(name=names[i], op="add", target="aten.add.Tensor", args={},
                  inputs=["x" if p < 0 else names[p] for p in ps], shape=(1, 4),
                  dtype=torch.float32, module_path=f"m{i}", module_type="M")
             for i, ps in enumerate(parents)]
    return Graph([Value("x", (1, 4), torch.float32)], nodes, [names[-1]])


@st.composite
def _dags(draw: st.DrawFn) -> tuple[list[list[int]], list[bool], int]:
    n = draw(st.integers(2, 12))
    parents = [[-1]] + [sorted(set(draw(st.lists(st.integers(-1, i - 1), min_size=1,
                                                  max_size=2))))
                        for i in range(1, n)]
    mapped = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return parents, mapped, draw(st.integers(0, n - 1))


def _descendants(parents: list[list[int]], start: int) -> set[int]:
    out = {start}
    for i in range(start + 1, len(parents)):
        if any(p in out for p in parents[i]):
            out.add(i)
    return out


@settings(max_examples=200, deadline=None)
@given(_dags())
def test_the_culprit_is_the_faulty_node_or_its_first_mapped_descendant(case) -> None:
    parents, mapped, fault = case
    graph = _graph(parents)
    rng = np.random.default_rng(len(parents))
    reference = {n.name: torch.from_numpy(rng.standard_normal((1, 4)).astype(np.float32))
                 for n in graph.nodes}
    wrong = _descendants(parents, fault)
    values = {n.name: reference[n.name].numpy() + (1.0 if i in wrong else 0.0)
              for i, n in enumerate(graph.nodes)}
    rows = [MappedLayer(n.name, n.name, [n.name], ["L"]) for n, m in zip(graph.nodes, mapped)
            if m]
    profile = build_profile("fmt", "verify", graph, rows, reference, ArtifactValues(values),
                            1e-5)
    blamed = [i for i in sorted(wrong) if mapped[i]]
    assert profile.culprit == (f"n{blamed[0]}" if blamed else None)
    for row in profile.rows:
        i = int(row.node[1:])
        assert row.status == (ABOVE if i in wrong else OK)
    row = profile.culprit_row
    if row is not None:  # its inputs agree, and only rows before it are read
        assert all(profile.rows[[r.node for r in profile.rows].index(i)].agrees
                   for i in row.inputs)


def test_a_shape_change_is_blamed_and_the_rest_is_still_compared() -> None:
    graph = _graph([[-1], [0], [1], [2]])
    reference = {n.name: torch.ones(1, 4) for n in graph.nodes}
    values = {"n0": np.ones((1, 4), np.float32), "n1": np.ones((1, 5), np.float32),
              "n2": np.ones((1, 5), np.float32), "n3": np.full((1, 4), 2.0, np.float32)}
    rows = [MappedLayer(n.name, n.name, [n.name], ["L"]) for n in graph.nodes]
    profile = build_profile("fmt", "verify", graph, rows, reference, ArtifactValues(values),
                            1e-5, strict_shapes=True)
    assert [r.status for r in profile.rows] == [OK, SHAPE, SHAPE, ABOVE]
    assert profile.culprit == "n1" and profile.rows[1].artifact_shape == [1, 5]
    assert "shape [1, 5] vs PyTorch [1, 4]" in (profile.describe_culprit() or "")


def test_a_layer_the_runtime_refuses_is_blamed_and_later_ones_are_missing() -> None:
    graph = _graph([[-1], [0], [1], [2]])
    reference = {n.name: torch.ones(1, 4) for n in graph.nodes}
    rows = [MappedLayer(n.name, n.name, [f"{n.name}/a", f"{n.name}/b"], ["P", "Q"])
            for n in graph.nodes]
    got = ArtifactValues({"n0": np.ones((1, 4), np.float32)}, "n1/a", "bad shapes")
    profile = build_profile("fmt", "verify", graph, rows, reference, got, 1e-5)
    assert [r.status for r in profile.rows] == [OK, FAILED, MISSING, MISSING]
    assert profile.culprit == "n1"
    assert "the runtime refused it: bad shapes" in (profile.describe_culprit() or "")
    assert "'n1/a', 'n1/b'" in (profile.describe_culprit() or "")


def test_rules_are_found_from_the_replacement_path() -> None:
    rewrites = [{"op": "instance_norm", "module_path": "norm", "rule": "in_rule",
                 "submodule": "norm.instance_norm_decomposed"},
                {"op": "sub", "module_path": "norm.instance_norm_decomposed", "rule": "sub_rule"},
                {"op": "pad", "module_path": "", "rule": "pad_rule"}]
    assert decomposition_rule("norm.instance_norm_decomposed", rewrites) == "in_rule"
    assert decomposition_rule("norm.instance_norm_decomposed.sub_decomposed.x",
                              rewrites) == "in_rule > sub_rule"
    assert decomposition_rule("pad_decomposed_1", rewrites) == "pad_rule"
    assert decomposition_rule("norm", rewrites) == ""
    assert decomposition_rule("norm.instance_norm_decomposed_other", rewrites) == ""


# ----------------------------------------------------------------------------- stored profiles
def _profile() -> LayerProfile:
    rows = [LayerRow("a", "conv2d", "conv", "conv", ["conv"], ["Convolution"], [1, 2, 3, 3],
                     OK, 1e-7),
            LayerRow("b", "cat", "", "cat", ["cat"], ["Concat"], [1, 4, 3, 3], SHAPE, None,
                     [1, 5, 3, 3], rule="r", inputs=["a"])]
    return LayerProfile("caffe", "export", 1e-5, rows, "b", unmapped=2, note="n")


def test_a_profile_survives_json_and_describes_its_culprit() -> None:
    profile = _profile()
    again = LayerProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert again == profile
    text = again.describe_culprit() or ""
    assert text.startswith("layer 'cat' (cat at '<top-level forward>'; artifact layers 'cat')")
    assert "rule r" in text and "Concat" in text
    assert ">>  1" in again.table() and "**1**" in again.markdown()


@pytest.mark.parametrize("damage", [
    lambda d: d.update(rows="x"),
    lambda d: d.update(rows=[None] * (MAX_ROWS + 1)),
    lambda d: d["rows"][0].update(status="fine"),
    lambda d: d["rows"][0].update(error="0.1"),
    lambda d: d["rows"][0].update(shape=[1, -2]),
    lambda d: d["rows"][0].update(node="x" * 5000),
    lambda d: d["rows"][0].update(layers=[3]),
    lambda d: d.update(culprit="nowhere"),
    lambda d: d.update(unmapped=-1),
])
def test_a_damaged_profile_is_refused(damage) -> None:
    data = _profile().to_dict()
    damage(data)
    with pytest.raises((TypeError, ValueError)):
        LayerProfile.from_dict(data)


# ----------------------------------------------------------------------------- end to end
class Functional(nn.Module):
    """Functional ops only between two modules: split, mul, cat, add, pooling, flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        a, b = torch.split(x, 4, dim=1)
        y = torch.cat([b * 0.5, a], 1) + x
        y = F.max_pool2d(y, 2)
        return self.fc(torch.flatten(y, 1))


@pytest.fixture(scope="module")
def functional(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path]:
    torch.manual_seed(0)
    net = randomize_batchnorm(Functional(), seed=4).eval()
    manifest = dp.export(net, torch.randn(1, 3, 8, 8),
                         tmp_path_factory.mktemp("profile") / "f", formats=FORMATS)
    assert manifest.passed
    return net, manifest.dir


def test_every_format_maps_the_functional_ops(functional) -> None:
    _, directory = functional
    report = dp.verify(directory)
    for fmt in FORMATS:
        profile = report.layers[fmt]
        assert profile.source == "export" and profile.culprit is None
        ops = [r.op for r in profile.rows]
        assert {"getitem", "mul", "cat", "add", "max_pool2d", "view", "linear"} <= set(ops)
        assert all(r.status == OK for r in profile.rows), profile.table()
        # fused: the BatchNorm is gone from the graph the files were written from
        assert "batch_norm" not in ops
    onnx_info = json.loads((directory / "manifest.json").read_text())["formats"]["onnx"]
    assert onnx_info["info"]["layer_values"]["cat"] == "/Concat_output_0"


def test_report_md_is_listed_and_covered_by_integrity(functional, tmp_path) -> None:
    _, source = functional
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    text = (directory / "report.md").read_text()
    for part in ("## Formats", "| onnx | onnx | PASSED", "### Fusion", "conv -> BatchNorm "
                 "folded", "## Validation parity", "## Per-layer error profile", "### msnhnet",
                 "| `cat` |"):
        assert part in text
    listed = json.loads((directory / "manifest.json").read_text())["files"]
    assert "report.md" in [f["name"] for f in listed]
    (directory / "report.md").write_text(text + "tampered\n")
    report = dp.verify(directory)
    assert not report.passed and any("report.md" in p for p in report.integrity)


def test_verify_layers_prints_the_recorded_profile(functional, capsys) -> None:
    _, directory = functional
    assert main(["verify", str(directory), "--layers"]) == 0
    out = capsys.readouterr().out
    for fmt in FORMATS:
        assert f"{fmt}: per-layer normalized error (example input, at export" in out
    assert "/Concat_output_0" in out and "#" in out


def _tamper_onnx(directory: Path, node_name: str, factor: float) -> None:
    path = directory / "model.onnx"
    proto = onnx.load(str(path))
    node = next(n for n in proto.graph.node if n.name == node_name)
    weight = next(t for t in proto.graph.initializer if t.name == node.input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor,
                                            weight.name))
    onnx.save(proto, str(path))
    _rehash(directory, path.name)


def _rehash(directory: Path, name: str) -> None:
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["files"] = [describe_files(directory, [name])[0] if e["name"] == name else e
                     for e in data["files"]]
    path.write_text(json.dumps(data))


def test_a_different_model_is_reported_not_blamed(functional, tmp_path) -> None:
    _, source = functional
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    _tamper_onnx(directory, "/conv/Conv", 1.5)
    other = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
                          nn.Linear(128, 3)).eval()
    report = dp.verify(directory, model=other)
    assert not report.format_passed("onnx")
    assert report.divergence["onnx"].startswith("no layer is blamed: the model given is not "
                                                "the one these files were written from")
    assert not report.layers["onnx"].rows


def test_the_folded_batchnorm_is_blamed_without_fusion(tmp_path) -> None:
    torch.manual_seed(1)
    net = randomize_batchnorm(Functional(), seed=5).eval()
    manifest = dp.export(net, torch.randn(1, 3, 8, 8), tmp_path / "u", reparameterize=False)
    rows = manifest.verification.layers["onnx"].rows
    by_op = {r.op: r for r in rows}
    # the exporter folds the BatchNorm into the conv: its output is the BatchNorm's value
    assert by_op["batch_norm"].layers == ["/conv/Conv"] and "conv2d" not in by_op
    assert all(r.status == OK for r in rows)
    _tamper_onnx(manifest.dir, "/conv/Conv", 1.1)
    report = dp.verify(manifest.dir, model=net)
    assert report.layers["onnx"].culprit_row.op == "batch_norm"
    assert "'/conv/Conv'" in report.divergence["onnx"]


class Wrapper(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def test_an_exported_submodule_is_rebuilt_from_the_whole_model(functional, tmp_path) -> None:
    net, _ = functional
    manifest = dp.export(net, torch.randn(1, 3, 8, 8), tmp_path / "sub",
                         metadata={"exported_module": "net"})
    _tamper_onnx(manifest.dir, "/fc/Gemm", 0.9)
    report = dp.verify(manifest.dir, model=Wrapper(net))
    assert report.layers["onnx"].culprit_row.op == "linear"


class NeedsRewrite(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.InstanceNorm2d(4, affine=True)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


def test_the_culprit_names_the_decomposition_rule(tmp_path) -> None:
    from deployplug.exporters.caffe.writer import read_caffemodel

    torch.manual_seed(2)
    net = NeedsRewrite().eval()
    manifest = dp.export(net, torch.randn(1, 3, 8, 8), tmp_path / "r", formats=("caffe",))
    rows = manifest.verification.layers["caffe"].rows
    assert any(r.rule.startswith("instance_norm") for r in rows)
    path = manifest.dir / "model.caffemodel"
    weights = read_caffemodel(path)
    layer = next(lay for lay in weights.layer
                 if lay.name.startswith("norm.instance_norm_decomposed") and lay.blobs
                 and lay.name.split(".")[-1].startswith("add"))
    blob = layer.blobs[-1]
    data = np.array(blob.data, np.float32) + 1.0
    del blob.data[:]
    blob.data.extend(data.tolist())
    path.write_bytes(weights.SerializeToString())
    _rehash(manifest.dir, path.name)
    report = dp.verify(manifest.dir, model=net)
    assert f"'{layer.name}'" in report.divergence["caffe"]
    assert "produced by rule instance_norm" in report.divergence["caffe"]


def test_a_manifest_with_a_damaged_profile_is_refused(functional, tmp_path) -> None:
    _, source = functional
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    data["verification"]["layers"]["caffe"]["rows"][0]["shape"] = "big"
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactFormatError, match="verification.layers.caffe.rows"):
        dp.verify(directory)


def test_long_texts_are_clipped_so_a_stored_profile_reads_back() -> None:
    profile = _profile()
    profile.note = "x" * 10_000
    profile.rows[1].layers = [f"layer{i}" for i in range(5000)]
    profile.rows[1].node = profile.culprit = "n" * 5000
    again = LayerProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert len(again.note) <= 4096 and len(again.rows[1].layers) == 4096
    assert again.culprit is not None and again.culprit_row is again.rows[1]


@pytest.mark.parametrize("value", ["['', 'a', 'conv2d']", "[" * 5000, "__import__('os')",
                                   "x" * 70_000, "[1, 2]"])
def test_onnx_scope_metadata_is_read_as_data(value: str) -> None:
    from deployplug.runtimes.onnx_layers import node_scope

    node = onnx.helper.make_node("Relu", ["a"], ["b"], name="n")
    node.metadata_props.add(key="pkg.torch.onnx.name_scopes", value=value)
    assert node_scope(node) == ("a" if value.startswith("['',") else None)


class Branchy(nn.Module):
    """Data-dependent control flow: TorchScript traces it, torch.export refuses it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.abs().sum() > 0 else x - 1


def test_an_onnx_export_torch_export_cannot_capture_still_lands(tmp_path) -> None:
    manifest = dp.export(Branchy(), torch.randn(1, 3, 4, 4), tmp_path / "b")
    assert manifest.passed
    profile = manifest.verification.layers["onnx"]
    assert not profile.rows and "could not be captured" in profile.note
    assert "could not be captured" in (manifest.dir / "report.md").read_text()


def test_verify_layers_on_a_failing_directory_says_where_to_look(functional, tmp_path,
                                                                  capsys) -> None:
    _, source = functional
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    _tamper_onnx(directory, "/conv/Conv", 1.5)
    assert main(["verify", str(directory), "--layers"]) == 1
    out = capsys.readouterr().out
    assert "onnx: per-layer normalized error" in out
    assert "recorded at export, when the files passed" in out


def test_the_msnhnet_profile_reuses_the_verification_run_only_for_the_same_files(
        functional, tmp_path, monkeypatch) -> None:
    """The runtime computes every layer anyway: the run that verified the example hands its
    layer outputs to the profile, but only for the same files and the same input."""
    from deployplug.deploy_graph import rebuild_graphs
    from deployplug.exporters.base import FormatRecord
    from deployplug.manifest import load_manifest
    from deployplug.runtimes import get_runner

    net, source = functional
    directory = tmp_path / "copy"
    shutil.copytree(source, directory)
    manifest = load_manifest(directory)
    record = FormatRecord.from_dict(manifest.formats["msnhnet"])
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    rebuilt = rebuild_graphs(net, [record], manifest.stages, manifest.extra,
                             (torch.from_numpy(x),), 1e-5)
    graph = rebuilt.graphs["msnhnet"]
    runner = get_runner("msnhnet")
    fresh = runner.layer_profile(directory, record, graph, [x], 1e-5)
    from deployplug.runtimes import msnhnet_layers

    runner.run_samples(directory, record, [[x]])
    with monkeypatch.context() as patch:
        patch.setattr(msnhnet_layers, "evaluate", lambda *a: pytest.fail("ran the net again"))
        reused = runner.layer_profile(directory, record, graph, [x], 1e-5)
    assert [(r.node, r.error) for r in reused.rows] == [(r.node, r.error) for r in fresh.rows]
    # another input, or files touched since the run: the network runs again
    runner.run_samples(directory, record, [[x + 1]])
    assert runner.layer_profile(directory, record, graph, [x], 1e-5).rows == fresh.rows
    runner.run_samples(directory, record, [[x]])
    weights = directory / "model.msnhbin"
    weights.write_bytes(weights.read_bytes())  # same content, new mtime
    calls = []
    real = msnhnet_layers.evaluate
    monkeypatch.setattr(msnhnet_layers, "evaluate", lambda *a: calls.append(1) or real(*a))
    runner.layer_profile(directory, record, graph, [x], 1e-5)
    assert calls == [1]
