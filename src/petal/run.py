"""The run folder: every file of a training run, written and read in this one module.

    RUN/
      settings.json   what was asked: the run's spec (data, split, backbone, training settings), its classes
      split.csv       uri, label, split, key: every image the run used
      errors.csv      uri, reason: every image skipped or failed
      head.npz        the head's weights and calibration temperature (kind "head")
      unknown.npz     the unknown detector: training-embedding bank, statistics, threshold
      calibration.json  the fine-tuned model's temperature (kind "finetune"; a head keeps it in head.npz)
      checkpoints/    last.pt, best.pt (kind "finetune"; --resume goes on from last.pt)
      history.csv     one row per epoch (kind "finetune")
      metrics.json    + confusion_matrix.png, misclassified.csv (petal.metrics), reliability.png, coverage.png
      suspects.csv    the data audit (petal.audit): likely label errors and outliers; duplicates.csv, audit.json
      report.html     everything above in one offline page (petal.report)
      tensorboard/    training curves
      model/          the exported bundle (petal.bundle)

`petal train` (petal.runs.head) and `petal finetune` (petal.runs.finetune.train) both write
through a `Run`, and `petal export RUN` reads through one. Every file but the
TensorBoard logs is written atomically.

Format history (`RUN_FORMAT`, the "format" of settings.json):
  1  petal 0.1: no "format" or "kind"; "backbone" held the whole registry record.
  2  "format" and "kind" ("head" or "finetune", whose settings sit under that key);
     "backbone" is the identity {name, feature_dim}.
  3  "spec": the whole RunSpec (petal.spec), the data's group, exclude, relabel and CSV columns
     included, so that `petal finetune --resume RUN` and `petal retrain RUN` need nothing else.
"""

from __future__ import annotations

import fnmatch
import json
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from petal.data import EVAL, TRAIN, Dataset, Example
from petal.errors import NothingUsableError, PetalError
from petal.head import HeadClassifier
from petal.metrics import compute_metrics, write_report
from petal.precision import FP32
from petal.progress import Reporter
from petal.spec import FINETUNE, HEAD, DataSpec, RunSpec, trainer_of
from petal.storage import atomic_path, atomic_write_csv, atomic_write_text, check_output, read_csv
from petal.unknown import DEFAULT_KEEP

if TYPE_CHECKING:
    from petal.unknown import KnnUnknown

RUN_FORMAT = 3
PARITY_LIMIT = 2000  # images checked at export: the eval split, up to this many
PARITY_FALLBACK = 256  # train images checked instead when there is no eval split

# Every name petal writes in a run folder (what is ever removed, and what is not the user's):
# files at the top, and the folders with the names (fnmatch patterns) petal writes in each.
REPORT_FILES = ("metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "misclassified.csv")
RUN_FILES = frozenset({
    "settings.json", "split.csv", "errors.csv", "head.npz", "unknown.npz", "calibration.json", "history.csv",
    "reliability.png", "coverage.png", "report.html", "suspects.csv", "duplicates.csv", "audit.json",
    "learning_curve.png", *REPORT_FILES})
RUN_FOLDERS = {
    "test": REPORT_FILES,  # a test split's report
    "model": ("model.onnx", "labels.txt", "petal.json"), "model-int8": ("model.onnx", "labels.txt", "petal.json"),
    "tensorboard": ("events.out.tfevents.*",), "checkpoints": ("last.pt", "best.pt"), "pixels": ("*.u8", "*.json"),
}
# what --overwrite removes for the next run (settings, split and errors are written again; model/ is
# replaced whole at export)
DERIVED_FILES = RUN_FILES - {"settings.json", "split.csv", "errors.csv"}
DERIVED_FOLDERS = ("test", "tensorboard")  # a second event file beside the old would mix two runs
REPLACED_FOLDERS = ("model", "model-int8")  # bundles: written whole by storage.atomic_dir


@dataclass
class RunSettings:
    """settings.json: the run's whole spec (enough to export, resume or repeat it), and what the
    data turned out to be."""

    spec: RunSpec
    backbone: dict  # {"name", "feature_dim"}
    classes: list[str]
    extra: dict = field(default_factory=dict)  # e.g. {"world_size": 2}

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def params(self) -> dict:
        """The head's parameters, or the fine-tuning config, as settings.json holds them."""
        return self.spec.to_dict()[self.kind]

    @property
    def cache_dir(self) -> str:
        return self.spec.cache_dir

    def to_dict(self) -> dict:
        return {"format": RUN_FORMAT, "kind": self.kind, "spec": self.spec.to_dict(), "backbone": self.backbone,
                **self.extra, "classes": self.classes}

    @classmethod
    def from_dict(cls, d: dict, out: str | Path | None = None) -> RunSettings:
        """Any format up to RUN_FORMAT; keys this petal does not know are ignored. `out`: the run
        folder as it is now (it may have moved since), which the spec's `out` becomes."""
        fmt = d.get("format", 1)
        if not isinstance(fmt, int) or fmt > RUN_FORMAT:
            raise PetalError(f"run format {fmt!r} is newer than this petal reads (format {RUN_FORMAT}); "
                             "upgrade petal")
        if fmt >= 3:
            spec = RunSpec.from_dict({**d["spec"], "out": str(out or d["spec"]["out"])})
        else:
            spec = spec_of_format_2(d, str(out or "."))
        return cls(spec, {k: v for k, v in d["backbone"].items() if k in ("name", "feature_dim")},
                   list(d["classes"]), {k: d[k] for k in ("world_size",) if k in d})


def spec_of_format_2(d: dict, out: str) -> RunSpec:
    """The spec of a run that petal 0.1 wrote (formats 1 and 2). They kept less: the data's group,
    exclude, relabel and CSV columns were not recorded, so they are the defaults here."""
    kind = d.get("kind") or (FINETUNE if FINETUNE in d else HEAD)
    params = d[kind]
    keep = (params if kind == FINETUNE else d).get("keep", DEFAULT_KEEP)
    trainer = trainer_of(kind, params)
    data = DataSpec(d["data"], labels_file=d.get("labels_file"), eval_source=d.get("eval_data"),
                    eval_percent=d["eval_percent"])
    return RunSpec(data, out, backbone=d["backbone"]["name"], precision=d.get("precision", FP32),
                   cache_dir=d["cache_dir"], keep=keep, trainer=trainer)


class Run:
    """One run folder. Paths are attributes; each file has one writer and one reader here."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.settings_path = self.path / "settings.json"
        self.split_path = self.path / "split.csv"
        self.errors_path = self.path / "errors.csv"
        self.head_path = self.path / "head.npz"
        self.unknown_path = self.path / "unknown.npz"
        self.calibration_path = self.path / "calibration.json"
        self.reliability_path = self.path / "reliability.png"
        self.coverage_path = self.path / "coverage.png"
        self.report_path = self.path / "report.html"
        self.metrics_path = self.path / "metrics.json"
        self.history_path = self.path / "history.csv"
        self.checkpoints = self.path / "checkpoints"
        self.tensorboard_dir = self.path / "tensorboard"
        self.pixels_dir = self.path / "pixels"  # fine-tuning's decoded images, removed at the end
        self.model_dir = self.path / "model"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def is_run(self) -> bool:
        """Only a run's own settings.json marks a folder as a run (a model/ or test/ folder may be
        the user's)."""
        if not self.settings_path.is_file():  # a FIFO would block the read
            return False
        try:
            RunSettings.from_dict(json.loads(self.settings_path.read_text("utf-8")))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return True

    @property
    def finished(self) -> bool:
        return self.is_run and (self.metrics_path.exists() or self.model_dir.exists())

    @classmethod
    def create(cls, out: str | Path, *, data: str | Path, overwrite: bool) -> Run:
        """A run to write at `out`. Refuses to replace a finished run without `overwrite`,
        and a folder inside the data. Nothing is created yet: see `make()`."""
        run = cls(check_output(out, "out", folder=True))
        if not overwrite and run.finished:
            raise PetalError(f"out: {run.path} already holds a finished run; pass --overwrite to replace it, "
                             "or choose another --out")
        data_dir = Path(data).resolve()
        if data_dir.is_dir() and run.path.resolve().is_relative_to(data_dir):
            raise PetalError(f"out: {run.path} is inside the data folder {data}; its files would be read as data")
        others = run.foreign_files()
        if others and not run.is_run:
            raise PetalError(f"out: {run.path} holds files of its own ({', '.join(others[:3])}) and no petal run; "
                             "a run would mix its files with them: choose an empty or new folder")
        if inside := [n for n in others if n.split("/")[0] in REPLACED_FOLDERS]:
            raise PetalError(f"out: {run.path} holds files petal did not write ({', '.join(inside[:3])}) in a "
                             "folder the export replaces whole; move them out first")
        return run

    def foreign_files(self) -> list[str]:
        """The names in the folder (relative) that petal does not write (e.g. your notes, or your own
        model/ folder's files); hidden names are left out."""
        names = foreign_names(self.path, RUN_FILES, RUN_FOLDERS)
        if self.settings_path.exists() and not self.is_run:
            names = sorted([self.settings_path.name, *names])  # e.g. another program's settings.json
        return names

    def make(self, clear: bool = False) -> Run:
        """Create the folder; with `clear`, remove what an earlier run here derived."""
        self.path.mkdir(parents=True, exist_ok=True)
        if clear:
            self.clear()
        return self

    def clear(self) -> None:
        """Remove what an earlier run here derived (metrics, reports, detectors, test/'s report, TensorBoard
        logs), so that nothing of it mixes into a new one (--overwrite): only files petal names in
        DERIVED_FILES and DERIVED_FOLDERS, never a file of the user's. model/ is replaced at export."""
        for name in DERIVED_FILES:
            (self.path / name).unlink(missing_ok=True)
        for folder in DERIVED_FOLDERS:
            path = self.path / folder
            if not path.is_dir() or path.is_symlink():
                continue
            for p in path.iterdir():
                if not p.is_dir() and any(fnmatch.fnmatchcase(p.name, pat) for pat in RUN_FOLDERS[folder]):
                    p.unlink()
            if not any(path.iterdir()):
                path.rmdir()

    # ------------------------------------------------------------------ writing

    def write_settings(self, settings: RunSettings) -> None:
        atomic_write_text(self.settings_path, json.dumps(settings.to_dict(), indent=2) + "\n")

    def write_split(self, ds: Dataset, keys: dict[str, str], failed: list[tuple[str, str]]) -> None:
        """errors.csv (skipped rows and failed images) and split.csv (every image used)."""
        atomic_write_csv(self.errors_path, ["uri", "reason"], ds.skipped + failed)
        atomic_write_csv(self.split_path, ["uri", "label", "split", "key"],
                         [(e.uri, e.label, e.split, keys[e.uri]) for e in ds.examples if e.uri in keys])

    def write_head(self, head: HeadClassifier) -> None:
        with atomic_path(self.head_path) as tmp, open(tmp, "wb") as f:  # a file object: savez adds no suffix
            np.savez(f, **head.state())

    def write_unknown(self, unknown: KnnUnknown) -> None:
        with atomic_path(self.unknown_path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **unknown.state())

    def write_calibration(self, temperature: float) -> None:
        atomic_write_text(self.calibration_path, json.dumps({"temperature": temperature}, indent=2) + "\n")

    def write_history(self, history: list[dict]) -> None:
        atomic_write_csv(self.history_path, list(history[-1]), [list(h.values()) for h in history])

    def write_metrics(self, classes: list[str], *, eval_uris: list[str], y_eval: np.ndarray,
                      predict_proba: Callable[[], np.ndarray], extra: dict, reporter: Reporter,
                      no_eval_note: str = "") -> dict:
        """Evaluate on the eval split and write metrics.json and its report; with no eval
        images, metrics.json says so (accuracy None) and nothing is predicted."""
        if len(y_eval):
            probs = predict_proba()  # (N, C)
            metrics = {**compute_metrics(y_eval, probs, classes), **extra}
            write_report(self.path, metrics, classes, eval_uris, y_eval, probs)
        else:
            reporter.message("warning: no eval images; metrics are not computed" + no_eval_note)
            metrics = {"accuracy": None, "top5_accuracy": None, "num_eval": 0, **extra}
            atomic_write_text(self.metrics_path, json.dumps(metrics, indent=2) + "\n")
        return metrics

    @contextmanager
    def tensorboard(self) -> Iterator[Callable[[str, float, int], None]]:
        """yield log(tag, value, step); TensorBoard event files in RUN/tensorboard (append-only)."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(self.tensorboard_dir))
        try:
            yield lambda tag, value, step: writer.add_scalar(tag, value, step)
        finally:
            writer.close()

    # ------------------------------------------------------------------ reading

    @classmethod
    def open(cls, path: str | Path) -> Run:
        """A finished run folder to read; refuses anything else by name."""
        run = cls(path)
        if not run.path.is_dir():
            raise PetalError(f"run: {run.path} is not a folder (expected a finished `petal train` run)")
        if not run.settings_path.is_file():
            parent = run.path.parent  # RUN/model given for RUN
            hint = f"; did you mean {parent}, the run folder?" if (parent / "settings.json").is_file() else ""
            raise PetalError(f"run: {run.path} is not a petal run folder: {run.settings_path} is missing{hint}")
        return run

    def read(self, what: Callable[[], Any]) -> Any:
        """what() with a missing or damaged file reported as the run's problem, by name."""
        try:
            return what()
        except FileNotFoundError as e:
            raise PetalError(f"run: {self.path} is not a finished petal run folder: {e.filename} is missing"
                             ) from None
        except (ValueError, KeyError, TypeError, OSError) as e:  # damaged JSON, npz or CSV
            raise PetalError(f"run: {self.path} is damaged ({type(e).__name__}: {e}); train it again") from None

    def settings(self) -> RunSettings:
        return self.read(lambda: RunSettings.from_dict(json.loads(self.settings_path.read_text("utf-8")), self.path))

    def split_rows(self) -> list[dict[str, str]]:
        return self.read(lambda: read_csv(self.split_path))

    def metrics(self) -> dict:
        return self.read(lambda: json.loads(self.metrics_path.read_text("utf-8"))) if self.metrics_path.exists() else {}

    def head(self, settings: RunSettings) -> HeadClassifier:
        return self.read(lambda: HeadClassifier.from_state(settings.params, dict(np.load(self.head_path))))

    def unknown(self) -> KnnUnknown | None:
        """The unknown detector, or None for a run made before petal had one."""
        from petal.unknown import KnnUnknown

        if not self.unknown_path.exists():
            return None
        return self.read(lambda: KnnUnknown.from_state(dict(np.load(self.unknown_path))))

    def temperature(self) -> float:
        """The fine-tuned model's temperature; 1.0 when it was not calibrated."""
        if not self.calibration_path.exists():
            return 1.0
        return self.read(lambda: float(json.loads(self.calibration_path.read_text("utf-8"))["temperature"]))

    def train_keys(self) -> list[str]:
        """Content keys of the images the model was trained on (split.csv's train rows)."""
        return [r["key"] for r in self.split_rows() if r["split"] == TRAIN]

    def parity_uris(self) -> list[str]:
        """The images the export's parity check runs on, from split.csv."""
        rows = self.split_rows()
        return parity_uris(eval_uris=[r["uri"] for r in rows if r["split"] == EVAL],
                           train_uris=[r["uri"] for r in rows])


def foreign_names(folder: Path, files: frozenset[str] | tuple[str, ...],
                  folders: dict[str, tuple[str, ...]] | None = None) -> list[str]:
    """The names in `folder` (relative, sorted) that are neither one of `files` nor, inside one of
    `folders`, one of its patterns; hidden names (temp files, .DS_Store) are left out. [] if no folder."""
    folders = folders or {}
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue
        if p.name in folders and p.is_dir() and not p.is_symlink():
            found += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if not q.name.startswith(".")
                      and not any(fnmatch.fnmatchcase(q.name, pat) for pat in folders[p.name])]
        elif p.name not in files or p.is_dir():
            found.append(p.name)
    return found


# --------------------------------------------------------------------------- what every run checks

def parity_uris(*, eval_uris: list[str], train_uris: list[str]) -> list[str]:
    """The images the export's parity check runs on: the eval split, else some train images."""
    return (eval_uris or train_uris[:PARITY_FALLBACK])[:PARITY_LIMIT]


def require_training_images(classes: list[str], train_labels: Iterable[str]) -> None:
    """Every class still has a training image once unreadable ones are gone."""
    missing = sorted(set(classes) - set(train_labels))
    if missing:
        raise NothingUsableError("after skipping unreadable images, these classes have no training "
                                 "image: " + ", ".join(map(repr, missing)))


def duplicate_warnings(examples: list[Example], keys: dict[str, str]) -> list[str]:
    """The same bytes under two labels, or in both train and eval."""
    by_key = defaultdict(list)
    for e in examples:
        if e.uri in keys:
            by_key[keys[e.uri]].append(e)
    out = []
    for group in by_key.values():
        if len({e.label for e in group}) > 1:
            out.append("same image in classes " + ", ".join(f"{e.label!r} ({e.uri})" for e in group))
        elif len({e.split for e in group}) > 1:
            out.append("same image in both train and eval: " + ", ".join(e.uri for e in group))
    return out


def data_warnings(ds: Dataset, keys: dict[str, str], reporter: Reporter) -> list[str]:
    """The data's own warnings (already shown with the data) plus duplicates, reported now."""
    found = duplicate_warnings(ds.examples, keys)
    for w in found:
        reporter.message(f"warning: {w}")
    return list(ds.warnings) + found


def epoch_tag(key: str) -> str:
    """history key -> TensorBoard tag: train_loss -> loss/train, lr_head -> lr/head."""
    if "_" not in key:
        return f"epoch/{key}"
    first, rest = key.split("_", 1)
    return f"{rest}/{first}" if first in ("train", "eval") else f"{first}/{rest}"
