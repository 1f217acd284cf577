"""What the commands print: rich progress bars and messages on stderr, tables and figures on stdout."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from petal.calibration import ece_line, format_score
from petal.console import SafeConsole, plain_markup
from petal.progress import Reporter, rate

out = SafeConsole()  # labels and paths are shown as text: no markup, no terminal control (petal.console)
err = SafeConsole(stderr=True, soft_wrap=True)  # messages hold paths: never wrap them


class RichReporter(Reporter):
    """Progress as rich bars and messages on stderr; the data summary as a table."""

    def message(self, text: str) -> None:
        err.print(text, style="yellow" if text.startswith("warning") else None, markup=False)

    def dataset(self, ds) -> None:
        print_dataset(ds)

    @contextmanager
    def progress(self, description: str, total: int):
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"),
                   TimeRemainingColumn()]
        with Progress(*columns, console=err) as bar:
            task = bar.add_task(plain_markup(description), total=total, rate="")  # e.g. "listing PATH"

            def advance(n: int) -> None:
                bar.advance(task, n)
                t = bar.tasks[task]  # the rate since the start, as the step's summary reports it
                bar.update(task, rate=f"{rate(t.completed, t.elapsed)}/s" if t.elapsed else "")

            yield advance


def print_dataset(ds, splits: bool = True, rows: int = 30) -> None:
    """Images per class (per split when `splits`; the first `rows` classes), then what was skipped and why."""
    more = f" (the first {rows} of {len(ds.classes)} classes)" if len(ds.classes) > rows else ""
    t = Table(title="data" + more, title_justify="left")
    t.add_column("class")
    names = ["train", "eval"] + [k for k in ("calibration", "test") if ds.split(k)]
    for col in names if splits else ["images"]:
        t.add_column(col, justify="right")
    counts = ds.counts()
    for c in ds.classes[:rows]:
        n = [counts[c][k] for k in names]
        t.add_row(c, *map(str, n if splits else [sum(n)]))
    totals = [len(ds.split(k)) for k in names]
    t.add_row("total", *map(str, totals if splits else [sum(totals)]), style="bold")
    out.print(t)
    for reason, n in ds.skipped_reasons().most_common():
        out.print(f"skipped {n}: {reason}", markup=False)
    for note in ds.notes:
        err.print(note, markup=False, highlight=False)
    for w in ds.warnings:
        err.print(f"warning: {w}", style="yellow", markup=False)


def print_metrics(metrics: dict, rows: int = 20) -> None:
    """The per-class table (worst first, `rows` of them), the most confused pairs, the figures."""
    per_class = list(metrics["per_class"].items())  # worst first
    shown = f" (the worst {rows} of {len(per_class)} classes; all in metrics.json)" if len(per_class) > rows else ""
    t = Table(title="eval" + shown, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for c, m in per_class[:rows]:
        if m["support"] == 0:  # not a failed class: nothing to measure it on
            t.add_row(c, "no eval image", "", "", "0")
            continue
        t.add_row(c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", str(m["support"]))
    out.print(t)
    pairs = metrics.get("most_confused", [])[:5]
    if pairs:
        print_lines(["most confused: " + ", ".join(f"{p['true']} -> {p['predicted']} ({p['count']})"
                                                   for p in pairs)])
    parts = [f"accuracy {metrics['accuracy']:.4f}"]
    if metrics.get("train_accuracy") is not None:  # side by side: overfitting shows
        parts[0] = f"accuracy: eval {metrics['accuracy']:.4f}, train {metrics['train_accuracy']:.4f}"
    if len(metrics["per_class"]) > 5:  # the Inception eval's names beside (petal.metrics)
        parts.append(f"top-5 {metrics['top5_accuracy']:.4f} (precision@1 {metrics['accuracy']:.4f}, "
                     f"recall@5 {metrics['top5_accuracy']:.4f})")
    parts.append(f"eval images {metrics['num_eval']}"
                 + (f", train images {metrics['num_train']}" if "num_train" in metrics else ""))
    print_lines(parts)
    none = [c for c, m in metrics["per_class"].items() if m["support"] == 0]
    few = [c for c, m in metrics["per_class"].items() if 0 < m["support"] < 5]
    if metrics["num_eval"] < 30 or none or few:
        err.print(f"warning: the eval split is small ({metrics['num_eval']} images"
                  + (f"; none of {names(none)}" if none else "") + (f"; fewer than 5 of {names(few)}" if few else "")
                  + "): these figures are rough", style="yellow", markup=False)


def names(classes: list[str], shown: int = 5) -> str:
    """Up to `shown` class names, then how many more."""
    more = f" and {len(classes) - shown} more" if len(classes) > shown else ""
    return ", ".join(classes[:shown]) + more


def print_trust(metrics: dict) -> None:
    """Calibration and unknown-detection figures, where the metrics have them."""
    parts = []
    if metrics.get("ece") is not None:
        parts += ece_line(metrics).split("; ")  # equal-mass bins; equal-width bins: a line each
    u = metrics.get("unknown") or {}
    kept = u.get("kept", u.get("kept_eval"))
    if kept is not None and u.get("accuracy_kept") is not None:
        parts.append(f"kept as known {kept:.1%}, accuracy on those {u['accuracy_kept']:.4f}")
    d = metrics.get("unknown_data")
    if d:
        parts.append(f"unknown images rejected {d['rejected_unknown']:.1%} (AUROC {d['auroc']:.3f})")
    t = metrics.get("test")
    if t:
        parts.append(f"test: accuracy {t['accuracy']:.4f}, top-5 {t['top5_accuracy']:.4f} ({t['num_eval']} images)")
    print_lines(parts)


def print_lines(lines: list[str]) -> None:
    """Figures (or commands) one to a line, each short, so that neither a narrow terminal nor a
    pipe's 80 columns breaks one mid-phrase; a longer line (a long path) is left whole."""
    for line in lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)


def print_predictions(preds) -> tuple[bool, list[tuple[str, str]]]:
    """A table of predictions; returns (any predicted, [(uri, reason) failed])."""
    t = Table()
    t.add_column("image", overflow="fold")  # a path is never cut short
    t.add_column("label")
    t.add_column("score", justify="right")
    t.add_column("runners-up")
    ok, failed = False, []
    for p in preds:
        if p.error:
            failed.append((p.uri, p.error))
            t.add_row(p.uri, "error", "", p.error, style="red")
            continue
        ok = True
        label = f"unknown (nearest: {p.nearest} {p.nearest_score:.2f})" if p.unknown else p.label
        t.add_row(p.uri, label, format_score(p.score), ", ".join(f"{k} {v:.2f}" for k, v in p.top[1:]),
                  style="yellow" if p.unknown else None)
    out.print(t)
    return ok, failed


def print_quantized(path: Path) -> None:
    """The int8 bundle's gate figures, size and speed, beside fp32's."""
    from petal.bundle import read_info

    g = read_info(path).quantization["gate"]
    size, fp32 = (path / "model.onnx").stat().st_size, path.parent / "model" / "model.onnx"
    ratio = f" ({size / fp32.stat().st_size:.2f} of fp32)" if fp32.is_file() else ""
    unknown = f", same 'unknown' answer {g['unknown_agreement']:.2%}" if g.get("unknown_agreement") is not None else ""
    out.print(f"int8 vs fp32 on {g['images']} eval images: top-1 agreement {g['agreement']:.2%}, accuracy "
              f"{g['accuracy']:.2%} vs {g['accuracy_fp32']:.2%}{unknown}; {g['images_per_second']:.0f} vs "
              f"{g['images_per_second_fp32']:.0f} img/s; model.onnx {size / 1e6:.1f} MB{ratio}"
              + ("; FAILED the gate, written with --force" if g["forced"] else ""), markup=False)


def print_failures(failed: list[tuple[str, str]], limit: int = 20) -> None:
    for uri, reason in failed[:limit]:
        err.print(f"skipped {uri}: {reason}", style="yellow", markup=False)
    if len(failed) > limit:
        err.print(f"... and {len(failed) - limit} more", style="yellow")


def print_train_result(r) -> None:
    """The end of `petal train`: what was embedded, the figures, the files."""
    e = r.embed
    print_lines([f"images: {e['embedded']} embedded, {e['cached']} cached, {e['failed']} failed"
                 + (f" (see {r.run_dir / 'errors.csv'})" if e["failed"] or e["skipped"] else "")])
    if r.metrics.get("accuracy") is not None:
        print_metrics(r.metrics)
        print_trust(r.metrics)
    print_run_end(r.run_dir, r.model_dir)


def print_finetune_result(r) -> None:
    """The end of `petal finetune`; nothing for None (a worker process other than the first)."""
    if r is None:
        return
    if r.metrics.get("accuracy") is not None:
        best = next((h for h in r.history if h.get("epoch") == r.best_epoch), {})
        # the best epoch's accuracy on the (augmented) training batches, beside eval's
        print_metrics({**r.metrics, "train_accuracy": best.get("train_accuracy")})
        print_trust(r.metrics)
    out.print(f"epochs {r.epochs_done}, best {r.best_epoch}, {r.seconds:.0f}s")
    print_run_end(r.run_dir, r.model_dir)


def print_run_end(run_dir: Path, model_dir: Path | None) -> None:
    """The end of `petal train` and `petal finetune`: the report, the model, the next commands."""
    lines = [f"report: {run_dir / 'report.html'}"] if (run_dir / "report.html").exists() else []
    if model_dir:  # one command a line: a pipe's 80 columns never break one in two
        lines += [f"model: {model_dir}", f"next: petal predict {model_dir} IMAGE...",
                  f"      petal evaluate {model_dir} DATA", f"      petal serve {model_dir}"]
    print_lines(lines)


def print_comparison(run_dir: Path) -> None:
    """Old vs new metrics of a retrained run (RUN/retrain.json), as a table."""
    from petal.reviewing.retrain import comparison_rows

    rows = comparison_rows(run_dir)
    if not rows:
        return
    table = Table("", "old", "new", "change", title="retrained: old vs new", title_justify="left")

    def cell(v: float | None) -> str:
        return "" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))

    for what, a, b in rows:
        change = f"{b - a:+.4f}" if isinstance(a, float) and isinstance(b, float) else ""
        table.add_row(Text(what), cell(a), cell(b), change)  # Text: a class name is never markup
    out.print(table)


def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    err.print(f"warning: {message}", style="yellow", markup=False, highlight=False)

