"""What a run is, in one record: the data it learns from and how it trains.

    data = DataSpec("flower_photos", eval_percent=10, exclude="audit/dropped.csv")
    spec = RunSpec(data, "runs/flowers", trainer=HeadClassifier(hidden=0))
    petal.runs.head.train(spec)            # or, with a FinetuneConfig, petal.runs.finetune.finetune(spec)

The CLI builds one from its options (petal.cli.options), a run folder keeps one in
settings.json (petal.run), and `petal finetune --resume RUN` and `petal retrain RUN`
read it back from there. Local paths are made absolute and the cache folder is resolved
here, once, so that a stored spec means the same thing from any folder. No torch here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from petal.backbones import DEFAULT_BACKBONE
from petal.data import Columns, Dataset, load_dataset, set_aside
from petal.errors import PetalError
from petal.head import HeadClassifier
from petal.params import Bool, Instance, OneOf, Real, Rule, Validated
from petal.precision import FP32, PRECISIONS
from petal.progress import Reporter
from petal.review import apply_review
from petal.reviewing.log import add_labeled
from petal.runs.finetune.config import FinetuneConfig
from petal.storage import absolute, default_cache_dir
from petal.unknown import DEFAULT_KEEP

HEAD, FINETUNE = "head", "finetune"  # the kinds of run, by their trainer
TEXT = Instance(str)
TEXT_OR_NONE = Instance(str, none_ok=True)
KEEP = Real(0.5, 1, high_open=True, what="a share in [0.5, 1)")


def trainer_of(kind: str, params: dict) -> HeadClassifier | FinetuneConfig:
    """The trainer a run of `kind` was made with, from its parameters as settings.json keeps them."""
    if kind not in (HEAD, FINETUNE):
        raise PetalError(f"kind: expected {HEAD!r} or {FINETUNE!r}, got {kind!r}")
    return HeadClassifier(**params) if kind == HEAD else FinetuneConfig.from_dict(params)


def _path(value: Any) -> Any:
    """A path or URI as a spec keeps it: a string, local paths absolute; anything else as given
    (the parameter's rule then names it)."""
    return absolute(value) if isinstance(value, (str, Path)) else value


@dataclass(frozen=True)
class DataSpec(Validated):
    """The labeled data of a run: where it is, how it splits, what review took out or relabelled."""

    PARAMS: ClassVar[dict[str, Rule]] = {
        "source": TEXT, "labels_file": TEXT_OR_NONE, "columns": Instance(Columns), "eval_source": TEXT_OR_NONE,
        "eval_percent": Real(0, 100, high_open=True), "group": TEXT_OR_NONE, "exclude": TEXT_OR_NONE,
        "relabel": TEXT_OR_NONE, "review": TEXT_OR_NONE, "labeled": TEXT_OR_NONE,
    }
    PATHS: ClassVar[tuple[str, ...]] = ("source", "labels_file", "eval_source", "exclude", "relabel", "review",
                                        "labeled")

    source: str  # a folder of class folders, or a CSV
    labels_file: str | None = None  # dict.txt: one label per line, in id order
    columns: Columns = Columns()  # a CSV's image, label and split columns, where the user names them
    eval_source: str | None = None  # eval images instead of a share of `source`
    eval_percent: float = 10.0
    group: str | None = None  # a regex: names sharing its capture stay on one side of the split
    exclude: str | None = None  # a CSV of images left out (petal.review)
    relabel: str | None = None  # a CSV of images given another label (petal.review)
    review: str | None = None  # a review.csv of `petal review`: relabels and exclusions, after the two above
    labeled: str | None = None  # a CSV of uri,label: new photos added as training images (petal.reviewing.log)

    def __post_init__(self) -> None:
        for name in self.PATHS:
            object.__setattr__(self, name, _path(getattr(self, name)))
        super().__post_init__()

    def load(self, reporter: Reporter | None = None, *, calibration_percent: float = 0.0) -> Dataset:
        """The labeled data, split (with `calibration_percent`% of the training images set aside
        for calibration), reviewed findings applied; shown to the reporter."""
        reporter = reporter or Reporter()
        ds = load_dataset(self.source, labels_file=self.labels_file, eval_source=self.eval_source,
                          eval_percent=self.eval_percent, group=self.group, columns=self.columns, reporter=reporter)
        ds = apply_review(ds, self.exclude, self.relabel, reporter)
        if self.review:
            ds = apply_review(ds, self.review, self.review, reporter)
        ds = add_labeled(ds, self.labeled, reporter)
        if calibration_percent:
            ds = set_aside(ds, calibration_percent)
        reporter.dataset(ds)
        return ds

    def to_dict(self) -> dict:
        return {**asdict(self), "columns": {"uri": self.columns.uri, "label": self.columns.label,
                                            "split": self.columns.split}}

    @classmethod
    def from_dict(cls, d: dict) -> DataSpec:
        """As `to_dict` wrote it; keys this petal does not know are ignored."""
        known = {f.name for f in fields(cls)} - {"columns"}
        columns = d.get("columns") or {}
        return cls(**{k: v for k, v in d.items() if k in known},
                   columns=Columns(columns.get("uri"), columns.get("label"), columns.get("split")))


@dataclass(frozen=True)
class RunSpec(Validated):
    """A whole run: its data, its folder, the backbone and precision, where features are cached,
    and the trainer's own settings (a HeadClassifier for `petal train`, a FinetuneConfig for
    `petal finetune`)."""

    PARAMS: ClassVar[dict[str, Rule]] = {
        "data": Instance(DataSpec), "out": TEXT, "backbone": TEXT, "precision": OneOf(*PRECISIONS),
        "cache_dir": TEXT, "overwrite": Bool(), "keep": KEEP,
    }

    data: DataSpec
    out: str  # the run folder
    backbone: str = DEFAULT_BACKBONE
    precision: str = FP32  # the backbone's; int8 features make an int8 bundle (head runs only)
    cache_dir: str | None = None  # None: $PETAL_CACHE_DIR or the user cache dir, resolved when built
    overwrite: bool = False  # replace a finished run in `out`
    keep: float = DEFAULT_KEEP  # the share of known images the "unknown" threshold keeps
    trainer: HeadClassifier | FinetuneConfig = field(default_factory=HeadClassifier)

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", _path(self.out))
        object.__setattr__(self, "cache_dir", _path(self.cache_dir or default_cache_dir()))
        super().__post_init__()

    def check_together(self) -> None:
        if not isinstance(self.trainer, (HeadClassifier, FinetuneConfig)):
            raise PetalError(f"trainer: expected a HeadClassifier or a FinetuneConfig, got {self.trainer!r}")
        if self.kind == FINETUNE and self.precision != FP32:
            raise PetalError(f"precision: fine-tuning trains in fp32; expected 'fp32', got {self.precision!r}")

    @property
    def kind(self) -> str:
        return HEAD if isinstance(self.trainer, HeadClassifier) else FINETUNE

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir)

    def to_dict(self) -> dict:
        params = self.trainer.get_params() if self.kind == HEAD else self.trainer.to_dict()
        return {"data": self.data.to_dict(), "out": self.out, "backbone": self.backbone, "precision": self.precision,
                "cache_dir": self.cache_dir, "overwrite": self.overwrite, "keep": self.keep, "kind": self.kind,
                self.kind: params}

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        """As `to_dict` wrote it; keys this petal does not know are ignored."""
        kind = d.get("kind", HEAD)
        trainer = trainer_of(kind, d[kind])
        return cls(DataSpec.from_dict(d["data"]), d["out"], backbone=d["backbone"], precision=d["precision"],
                   cache_dir=d["cache_dir"], overwrite=d["overwrite"], keep=d["keep"], trainer=trainer)
