"""``report.md``: the export explained for people, written into every artifact directory.

The manifest is the machine record; this is the same facts as Markdown that reads well on a
code-hosting site next to the files: which formats verified and how closely, which rewrites
made the model deployable (fusion and decompositions), validation parity when it was
measured, and the per-layer error profile of every format with the culprit of a failed one.
It is listed in the manifest like any artifact, so integrity covers it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from deployplug.layer_profile import md_escape
from deployplug.manifest import Manifest, describe_files
from deployplug.verify_report import describe_judgement

REPORT_FILE = "report.md"
#: rows of a fusion listing before "... and N more"
_LIST_CAP = 40


def _code(text: Any) -> str:
    text = str(text)
    return md_escape(text) if "`" in text else f"`{text.replace('|', '¦')}`"


def _num(x: Any) -> str:
    return f"{x:.3e}" if isinstance(x, (int, float)) and x == x and abs(x) != float("inf") \
        else "-"


def _formats(manifest: Manifest) -> list[str]:
    report = manifest.verification
    lines = ["## Formats", "",
             "| format | target | verified | max normalized error | files |",
             "|---|---|---|---:|---|"]
    for fmt, record in manifest.formats.items():
        if report is None:
            verdict, err = "not verified", "-"
        else:
            verdict = "PASSED" if report.format_passed(fmt) else "FAILED"
            err = _num(report.max_error(fmt))
        files = ", ".join(_code(f) for f in record.get("files", []))
        lines.append(f"| {fmt} | {md_escape(str(record.get('target', '')))} | {verdict} | "
                     f"{err} | {files} |")
    for fmt, why in manifest.failed_formats.items():
        where = manifest.extra.get("failed_dir")
        lines.append(f"| {fmt} | | FAILED (files in {_code(where) if where else 'no directory'})"
                     f" | - | {md_escape(why)} |")
    if report is not None:
        extra = []
        for fmt, why in report.failures.items():
            extra.append(f"- **{fmt}** could not run: {md_escape(why)}")
        for fmt, where in report.divergence.items():
            extra.append(f"- **{fmt}** culprit: {md_escape(where)}")
        for fmt, judged in report.judgements.items():
            extra.append(f"- **{fmt}**: {md_escape(describe_judgement(judged))}")
        if extra:
            lines += [""] + extra
    return lines


def _fusion(data: Any) -> list[str]:
    lines = ["### Fusion (reparameterization)", ""]
    if not isinstance(data, Mapping):
        return lines + ["Not run (`reparameterize=False`)."]
    counts = data.get("op_counts") or {}
    before, after = counts.get("before") or {}, counts.get("after") or {}
    if isinstance(before, Mapping) and isinstance(after, Mapping) and (before or after):
        ops = list(dict.fromkeys([*before, *after]))
        lines += ["| op | before | after |", "|---|---:|---:|"]
        lines += [f"| {md_escape(str(op))} | {before.get(op, '-')} | {after.get(op, '-')} |"
                  for op in ops]
        lines.append("")
    groups = [(data.get("protocol"), "fused by its own method",
               lambda p: f"{_code(p.get('module') or '<model>')} ({p.get('method')}())"),
              (data.get("collapsed"), "linear region collapsed into one convolution",
               lambda r: f"{_code(r.get('owner') or '<model>')} -> {_code(r.get('conv_path'))}"),
              (data.get("folded"), "conv -> BatchNorm folded",
               lambda f: f"{_code(f.get('batch_norm'))} into {_code(f.get('conv'))}"),
              (data.get("left_alone"), "left alone",
               lambda s: f"{_code(s.get('owner') or '<model>')}: "
                         f"{md_escape(str(s.get('reason')))}")]
    for items, what, show in groups:
        if not isinstance(items, list) or not items:
            continue
        lines.append(f"- {len(items)} {what}:")
        shown = [i for i in items if isinstance(i, Mapping)][:_LIST_CAP]
        lines += [f"  - {show(i)}" for i in shown]
        if len(items) > len(shown):
            lines.append(f"  - ... and {len(items) - len(shown)} more")
    if len(lines) == 2:
        lines.append("Nothing to fuse.")
    return lines


def _decompositions(manifest: Manifest) -> list[str]:
    lines = ["### Decompositions", ""]
    rows = []
    for fmt, record in manifest.formats.items():
        info = record.get("info") or {}
        for r in info.get("decomposed") or []:
            if isinstance(r, Mapping):
                rows.append(f"| {fmt} | {_code(r.get('op'))} | "
                            f"{_code(r.get('module_path') or '<model>')} | "
                            f"{_code(r.get('rule'))} |")
    if not rows:
        return lines + ["No op needed rewriting for its target."
                        if manifest.stages.get("decompose", True)
                        else "Not run (`decompose=False`)."]
    return lines + ["| format | op | module path | rule |", "|---|---|---|---|"] + rows


def _parity(manifest: Manifest) -> list[str]:
    lines = ["## Validation parity", ""]
    parity = manifest.extra.get("parity")
    if isinstance(parity, Mapping) and parity:
        keys = sorted({k for v in parity.values() if isinstance(v, Mapping) for k in v})
        lines += ["| format | " + " | ".join(md_escape(k) for k in keys) + " |",
                  "|---|" + "---:|" * len(keys)]
        for fmt, values in parity.items():
            if isinstance(values, Mapping):
                cells = [f"{values[k]:.4g}" if isinstance(values.get(k), (int, float))
                         else md_escape(str(values.get(k, "-"))) for k in keys]
                lines.append(f"| {md_escape(str(fmt))} | " + " | ".join(cells) + " |")
        return lines
    return lines + ["Not measured with this export. Validation parity runs every format over "
                    "the validation set after the export (`DeployCallback(validation_parity="
                    "True)`, `deployplug export --parity`) and logs "
                    "`deploy/<format>/val_agreement` and `deploy/<format>/val_acc`."]


def _layers(manifest: Manifest) -> list[str]:
    lines = ["## Per-layer error profile", "",
             "Each row is a graph node of the fused, decomposed model the files were written "
             "from, next to the artifact value that holds its output, compared on the example "
             "input (normalized error max|a-b|/max|ref|). The culprit of a failed format is the "
             "first row whose inputs agree and whose output does not.", ""]
    report = manifest.verification
    if report is None or not report.layers:
        return lines + ["No profile: the export was not verified."]
    for fmt in manifest.formats:
        profile = report.layers.get(fmt)
        lines += [f"### {fmt}", ""]
        lines += [profile.markdown(), ""] if profile is not None else ["No profile.", ""]
    return lines


def render(manifest: Manifest) -> str:
    """The whole report as Markdown."""
    result = "PASSED" if manifest.passed else "FAILED"
    shapes = ", ".join(f"{_code(i.get('name'))} {i.get('shape')}" for i in manifest.inputs)
    stages = ", ".join(k for k, v in manifest.stages.items() if v) or "none"
    exported = manifest.extra.get("exported_module")
    lines = ["# deployplug export report", "",
             f"**Result: {result}** · tolerance {manifest.tolerance:g} (normalized) · "
             f"stages: {stages} · input {shapes}"
             + (f" · exported module {_code(exported)}" if exported else ""), "",
             f"Created {md_escape(manifest.created)}.", ""]
    lines += _formats(manifest) + [""]
    lines += ["## Rewrites", ""] + _fusion(manifest.extra.get("reparameterize")) + [""]
    lines += _decompositions(manifest) + [""]
    lines += _parity(manifest) + [""]
    lines += _layers(manifest)
    return "\n".join(lines).rstrip() + "\n"


def write_report(manifest: Manifest) -> None:
    """Write ``report.md`` into ``manifest.dir`` and list it in ``manifest.files``.

    Call it before the manifest is written: the manifest then vouches for the report.
    """
    path = manifest.dir / REPORT_FILE
    path.write_text(render(manifest), encoding="utf-8")
    manifest.files = [f for f in manifest.files if f.get("name") != REPORT_FILE]
    manifest.files += describe_files(manifest.dir, [REPORT_FILE])


__all__ = ["REPORT_FILE", "render", "write_report"]
