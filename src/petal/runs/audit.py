"""`petal audit`: embed (from the cache where it can), audit the data, write the findings. A
training run audits its own data at its end (petal.runs.common.finish)."""

from __future__ import annotations

from pathlib import Path

from petal.audit import AUDIT_OUTPUT, Audit, write_audit
from petal.backbones import DEFAULT_BACKBONE
from petal.features import load_features
from petal.progress import Reporter
from petal.report import write_html_report
from petal.runs.common import audit_features, embed_dataset
from petal.spec import DataSpec
from petal.storage import check_output


def audit_data(data: DataSpec, out: str | Path, *, backbone: str = DEFAULT_BACKBONE,
               cache_dir: str | Path | None = None, workers: int | None = None, rehash: bool = False,
               reporter: Reporter | None = None) -> Audit:
    """Audit `data` (loaded, reviewed and shown as a run would) into the folder `out`:
    suspects.csv, duplicates.csv, audit.json, report.html."""
    reporter = reporter or Reporter()
    out = check_output(out, "out", folder=True, owned=AUDIT_OUTPUT)  # not over the user's own files
    ds = data.load(reporter)
    result, cache = embed_dataset(ds, backbone=backbone, cache_dir=cache_dir, reporter=reporter, workers=workers,
                                  source=data.source, rehash=rehash)
    findings = audit_features(ds.classes, load_features(ds, result.keys, cache, reporter))
    write_audit(out, findings)
    write_html_report(out / "report.html", f"petal audit of {data.source}", audit=findings)
    return findings
