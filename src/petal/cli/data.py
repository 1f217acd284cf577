"""`petal embed` and `petal audit`: the data before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from petal.backbones import DEFAULT_BACKBONE
from petal.cli.command import Command
from petal.cli.options import (
    BEAM_ARGS,
    RUNNER_HELP,
    Backbone,
    Cache,
    CropPct,
    Data,
    EvalData,
    EvalPercent,
    Exclude,
    Group,
    ImageSize,
    LabelColumn,
    LabelsFile,
    Mean,
    Precision,
    Rehash,
    Relabel,
    SplitColumn,
    Std,
    UriColumn,
    Workers,
    check_runner,
    data_spec,
)
from petal.cli.render import (
    RichReporter,
    err,
    out,
    print_dataset,
    print_failures,
)
from petal.data import Columns
from petal.errors import PetalError
from petal.storage import absolute, atomic_write_csv, check_output

commands = typer.Typer()  # this module's commands, added to `petal` by petal.cli.app


@commands.command(cls=Command, context_settings=BEAM_ARGS)
def embed(
    ctx: typer.Context,
    data: Annotated[str, typer.Argument(help="Folder of class folders, or a CSV with image and label columns.")],
    *,
    labels: Annotated[Optional[Path], typer.Option(help="dict.txt for a CSV.")] = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    split_column: SplitColumn = None,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    workers: Workers = None,
    errors: Annotated[Optional[Path], typer.Option(help="Write failed images (uri, reason) to this CSV.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on the last line.")] = False,
    runner: Annotated[str, typer.Option(help=RUNNER_HELP)] = "local",
    rehash: Rehash = False,
    precision: Precision = "fp32",
    image_size: ImageSize = None, crop_pct: CropPct = None, mean: Mean = None, std: Std = None,
) -> None:
    """Embed images into the cache (only those not cached yet)."""
    from petal.backbones import with_options
    from petal.data import load_dataset
    from petal.runs.common import embed_dataset

    backbone = with_options(backbone, image_size=image_size, crop_pct=crop_pct, mean=mean, std=std)
    check_runner(runner, ctx.args)
    if errors:
        check_output(errors, "errors")
    ds = load_dataset(data, labels_file=labels, eval_percent=0.0, require_train=False,
                      columns=Columns(uri_column, label_column, split_column),
                      reporter=RichReporter() if not as_json else None)
    if not as_json:
        print_dataset(ds, splits=False)
    if runner == "beam":
        from petal.beam import beam_embed

        if precision != "fp32":
            raise PetalError("--precision: --runner beam embeds in fp32 only")
        result, cache_obj = beam_embed(ds, backbone, cache, ctx.args)
    else:
        result, cache_obj = embed_dataset(ds, backbone=backbone, cache_dir=cache, reporter=RichReporter(),
                                          workers=workers, source=absolute(data), rehash=rehash, precision=precision)
    print_failures(result.failed)
    if errors:
        atomic_write_csv(errors, ["uri", "reason"], ds.skipped + result.failed)
    summary = {**result.summary(), "skipped": len(ds.skipped), "cache": str(cache_obj.dir)}
    if as_json:
        print(json.dumps(summary))
    else:
        out.print(f"{summary['embedded']} embedded, {summary['cached']} cached, {summary['failed']} failed "
                  f"in {summary['seconds']:.1f}s ({summary['images_per_second']} images/s); cache {summary['cache']}")


@commands.command(cls=Command, short_help=(
    "Find likely label errors, duplicates, train/eval leakage, outliers and class imbalance."))
def audit(
    data: Data,
    *,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the findings.")] = Path("petal-audit"),
    labels: LabelsFile = None,
    uri_column: UriColumn = None,
    label_column: LabelColumn = None,
    split_column: SplitColumn = None,
    eval_data: EvalData = None,
    eval_percent: EvalPercent = 10.0,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    workers: Workers = None,
    exclude: Exclude = None,
    relabel: Relabel = None,
    group: Group = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on the last line.")] = False,
    rehash: Rehash = False,
) -> None:
    """Find likely label errors, duplicates, train/eval leakage, outliers and class imbalance
    (suspects.csv, duplicates.csv, report.html in --out). Files are never moved."""
    from petal.runs.audit import audit_data

    data_ = data_spec(data, labels=labels, uri_column=uri_column, label_column=label_column,
                      split_column=split_column, eval_data=eval_data, eval_percent=eval_percent, group=group,
                      exclude=exclude, relabel=relabel)
    found = audit_data(data_, out_dir, backbone=backbone, cache_dir=cache, workers=workers, rehash=rehash,
                       reporter=RichReporter() if not as_json else None)
    if as_json:
        print(json.dumps({**found.summary(), "out": str(out_dir)}))
        return
    out.print(found.line())
    for advice in found.advice:
        err.print(f"advice: {advice}", style="yellow", markup=False)
    out.print(f"findings: {out_dir / 'suspects.csv'}, {out_dir / 'duplicates.csv'}")



@commands.command("backbones", cls=Command)
def backbones_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print the list as JSON.")] = False,
) -> None:
    """The backbones --backbone takes: name, where the weights come from, feature dim, measured img/s."""
    from petal.backbones import listing

    rows = listing()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    for r in rows:
        dim, speed = r["feature_dim"] or "from the graph", f"{r['img_s']:g} img/s" if r["img_s"] else "not measured"
        out.print(f"{r['name']}\n  {r['weights']}; {dim} features; {speed}", markup=False, highlight=False)
