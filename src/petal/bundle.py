"""The model bundle: its format, written and read in this one module.

    RUN/model/
      model.onnx    uint8 (N, S, S, 3) RGB images -> (N, C) probabilities
      labels.txt    one label per line, in id order
      petal.json    `BundleInfo` as JSON, with its format number

    m = petal.load("runs/flowers/model")
    for p in m.predict(["rose.jpg", "tulip.png"]):
        print(p.uri, p.label, p.score)        # p.top: [(label, score), ...]; p.error if unreadable

Format history (`BUNDLE_FORMAT`):
  1  petal 0.1: "backbone" held the whole registry record (pip package names included),
     "head" or "finetune" + "best_epoch" sat at the top level.
  2  "backbone" is the identity only ({name, feature_dim}); "preprocess" is its own
     record; how the model was trained is under "training"; "calibration", "unknown"
     and "quantization" are the places later stages fill in.
The reader takes every format up to its own, ignores keys it does not know, and
refuses a newer format by name. Nothing here imports torch or onnx: serving needs
only onnxruntime, numpy and Pillow.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import os
import platform
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from petal.data import label_problem
from petal.errors import PetalError
from petal.images import DEFAULT_MAX_PIXELS, load_pixels
from petal.loader import batches, iter_items
from petal.predictions import Prediction, Scores, scored_prediction
from petal.preprocess import Preprocess
from petal.storage import atomic_dir, atomic_write_text

BUNDLE_FORMAT = 2
# Bounds on what is read of a bundle (it may come from anyone): petal.json holds a 4-byte key
# per training image (5 MB for a million); protobuf caps an ONNX graph at 2 GiB.
MAX_BYTES = {"petal.json": 64 * 2**20, "labels.txt": 256 * 2**20, "model.onnx": 2 * 2**30}
INPUT = "images"  # the graph's input: uint8 (N, S, S, 3)
OUTPUTS = ("probabilities", "ood_score", "unknown")  # (N, C); (N,) and (N,) bool where unknown detection is in


def versions() -> dict:
    """The library versions that made a bundle (or a run), for the record."""
    out = {"python": platform.python_version()}
    for pkg in ("petal", "onnxruntime", "onnx", "torch", "numpy", "pillow"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


@dataclass
class BundleInfo:
    """What `petal.json` declares. Each field has one meaning in every format."""

    name: str
    backbone: dict  # {"name", "feature_dim"}: which network, never where its weights came from
    preprocess: Preprocess  # image bytes -> the uint8 input of model.onnx
    labels: list[str]  # class names in id order (labels.txt repeats them for other tools)
    training: dict = field(default_factory=dict)  # {"kind": "head"|"finetune", + its settings}
    metrics: dict = field(default_factory=dict)  # eval metrics of the exported model
    # Filled in by later stages, each a dict owned by the stage that writes it; None: not done.
    calibration: dict | None = None  # how the probabilities were calibrated
    unknown: dict | None = None  # how "unknown" is decided (score, threshold)
    quantization: dict | None = None  # reduced precision, and its proved agreement with fp32
    parity: dict | None = None  # what the export proved before writing: images checked, largest differences
    versions: dict = field(default_factory=versions)
    created: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    format: int = BUNDLE_FORMAT

    def to_dict(self) -> dict:
        """The JSON form; "input" and "output" describe the graph for other runtimes."""
        s = self.preprocess.input_size
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(format=self.format, preprocess=self.preprocess.to_dict(),
                 input={"name": INPUT, "dtype": "uint8", "shape": ["batch", s, s, 3],
                        "layout": "NHWC RGB, resized and center-cropped as 'preprocess' says"},
                 output={"name": OUTPUTS[0], "shape": ["batch", len(self.labels)]})
        return {"format": d.pop("format"), **d}

    @classmethod
    def from_dict(cls, d: dict) -> BundleInfo:
        """Any format up to BUNDLE_FORMAT; unknown keys are ignored. Raises KeyError,
        TypeError or ValueError on a damaged document, PetalError on a newer format."""
        if not isinstance(d, dict):
            raise TypeError(f"expected a JSON object, got {type(d).__name__}")
        fmt = d.get("format")
        if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < 1:
            raise ValueError(f"format: expected a number >= 1, got {fmt!r}")
        if fmt > BUNDLE_FORMAT:
            raise PetalError(f"bundle format {fmt} is newer than this petal reads (format {BUNDLE_FORMAT}); "
                             "upgrade petal to load it")
        d = upgrade_v1(d) if fmt == 1 else d
        known = {f.name: d[f.name] for f in fields(cls) if f.name in d}
        try:
            known["preprocess"] = Preprocess.from_dict(d["preprocess"])
        except PetalError as e:  # a rule broken: a damaged document, like any other bad field
            raise ValueError(f"preprocess: {e}") from None
        check_fields(known)
        return cls(**{**known, "format": BUNDLE_FORMAT})


MAX_LABELS, MAX_TEXT = 100_000, 1_000
TRAIN_KEYS = "train_keys"  # in "training": the first 4 bytes of each training image's sha256, sorted, base64


def key_prefixes(keys: Iterable[str]) -> np.ndarray:
    """Content keys (sha256 hex) -> their first 4 bytes as uint32."""
    return np.array([int(k[:8], 16) for k in keys], dtype=np.uint32)


def train_keys_digest(keys: Iterable[str]) -> str:
    """Content keys (sha256 hex) of the training images -> a compact digest for petal.json
    (4 bytes a key: 13 KB for 3,300 images; a false match among 1M keys is 1 in 4,000)."""
    return base64.b64encode(np.unique(key_prefixes(keys)).astype("<u4").tobytes()).decode("ascii")


def in_train_keys(digest: str, keys: Iterable[str]) -> np.ndarray:
    """(N,) bool: which content keys are (almost surely) among the digest's training images."""
    return np.isin(key_prefixes(keys), np.frombuffer(base64.b64decode(digest), dtype="<u4"))


def check_fields(d: dict) -> None:
    """Range-check what petal.json says before anything relies on it (a bundle may come from
    anyone). Raises ValueError or TypeError naming the field."""
    labels = d.get("labels")
    if not isinstance(labels, list) or not 1 <= len(labels) <= MAX_LABELS:
        raise TypeError(f"labels: expected a list of 1 to {MAX_LABELS:,} names")
    if not all(isinstance(x, str) and 0 < len(x) <= MAX_TEXT and "\n" not in x for x in labels):
        raise ValueError(f"labels: expected names of 1 to {MAX_TEXT} characters on one line")
    if not isinstance(d.get("backbone"), dict) or not isinstance(d.get("name", ""), str):
        raise TypeError("backbone: expected an object; name: expected a string")
    unknown = d.get("unknown")
    if unknown is not None and not (isinstance(unknown, dict) and isinstance(unknown.get("threshold"), int | float)):
        raise TypeError("unknown: expected an object with a numeric threshold")


def upgrade_v1(d: dict) -> dict:
    """A format-1 petal.json, as petal 0.1 wrote it, in format-2 terms."""
    b = d["backbone"]
    if "finetune" in d:
        training = {"kind": "finetune", "finetune": d["finetune"], "best_epoch": d.get("best_epoch")}
    else:
        training = {"kind": "head", "head": d.get("head", {})}
    return {**d, "backbone": {"name": b["name"], "feature_dim": b["feature_dim"]},
            "preprocess": {k: b[k] for k in ("input_size", "crop_pct", "resample", "mean", "std") if k in b},
            "training": training}


def write_bundle(out: str | Path, graph: bytes, info: BundleInfo,
                 check: Callable[[Model], object] | None = None) -> Path:
    """Write the bundle folder `out`: model.onnx (the serialized graph), labels.txt and
    petal.json. It appears whole or not at all; `check(model)` runs on the finished files,
    loaded as a user would load them, before it appears (the export's parity proof)."""
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_bytes(graph)
        (tmp / "labels.txt").write_text("".join(c + "\n" for c in info.labels), encoding="utf-8")
        (tmp / "petal.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
        if check is not None and isinstance(proof := check(Model(tmp)), dict):
            info = dataclasses.replace(info, parity=proof)  # the proof goes into petal.json
            (tmp / "petal.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n", encoding="utf-8")
    return Path(out)


def rename(path: Path, name: str) -> BundleInfo:
    """Give the bundle at `path` another name: petal.json's "name", which `petal serve` takes as
    the model's name (REST and KServe v2) and the web page as its title. Only petal.json is
    rewritten (atomically); the graph and its parity proof stay as they are."""
    problem = label_problem(name) if name.strip() else "empty name"
    if problem or len(name) > MAX_TEXT:
        raise PetalError(f"name: expected a name of 1 to {MAX_TEXT} characters on one line, got {name!r}"
                         + (f" ({problem})" if problem else ""))
    info = dataclasses.replace(read_info(path), name=name)
    atomic_write_text(path / "petal.json", json.dumps(info.to_dict(), indent=2) + "\n")
    return info


def read_info(path: Path) -> BundleInfo:
    """petal.json of the bundle at `path`, any readable format. Raises PetalError saying
    what is wrong: no bundle there, a damaged one, or a newer format."""
    meta_path = path / "petal.json"
    if not path.exists():
        raise PetalError(f"model: {path} does not exist")
    if not meta_path.is_file():
        hint = f"; did you mean {path / 'model'}?" if (path / "model" / "petal.json").is_file() else ""
        raise PetalError(f"model: {path} is not a petal model bundle (no petal.json){hint}")
    try:
        return BundleInfo.from_dict(json.loads(read_bundle_file(path, "petal.json").decode("utf-8")))
    except PetalError as e:
        raise PetalError(f"model: {path}: {e}") from None
    except Exception as e:  # noqa: BLE001 - JSON, OS, key and type errors alike
        raise damaged(path, e) from e


def check_bundle_file(path: Path, name: str) -> Path:
    """path/name, which must be a regular file (never a link, FIFO or device: /dev/zero never
    ends, a FIFO blocks) of at most MAX_BYTES[name], from lstat, before it is opened."""
    file = path / name
    try:
        st = os.lstat(file)
    except OSError as e:
        raise PetalError(f"model: {path} is a damaged bundle: cannot read {name} ({e.strerror or e})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
        raise PetalError(f"model: {path} is refused: {name} is {kind}; a bundle holds its own files")
    if st.st_size > MAX_BYTES[name]:
        raise PetalError(f"model: {path} is refused: {name} holds {st.st_size:,} bytes, over the "
                         f"{MAX_BYTES[name]:,} a bundle's {name} may")
    return file


def read_bundle_file(path: Path, name: str) -> bytes:
    """The bytes of path/name, checked as `check_bundle_file` says; never more than its bound,
    even if the file grows in between."""
    with open(check_bundle_file(path, name), "rb") as f:
        data = f.read(MAX_BYTES[name] + 1)
    if len(data) > MAX_BYTES[name]:
        raise PetalError(f"model: {path} is refused: {name} grew past {MAX_BYTES[name]:,} bytes while read")
    return data


def read_labels(path: Path, info: BundleInfo) -> list[str]:
    """labels.txt, which must list petal.json's labels (other tools read it; the two must agree)."""
    labels = read_bundle_file(path, "labels.txt").decode("utf-8").splitlines()
    if labels != info.labels:
        at = next((i for i, (a, b) in enumerate(zip(labels, info.labels)) if a != b), min(len(labels),
                                                                                         len(info.labels)))
        raise PetalError(f"model: {path} is a damaged bundle: labels.txt disagrees with petal.json from line "
                         f"{at + 1} ({len(labels)} labels, petal.json {len(info.labels)}); export it again")
    return labels


def check_graph_input(path: Path, session: Any, input_size: int) -> None:
    """model.onnx must take what petal.json's preprocessing makes: uint8 (N, S, S, 3)."""
    inputs = session.get_inputs()
    got = [(i.name, list(i.shape)) for i in inputs]
    shape = list(inputs[0].shape) if len(inputs) == 1 else []
    fits = len(shape) == 4 and [d if isinstance(d, int) else None for d in shape[1:]] in (
        [input_size, input_size, 3], [None, None, None])
    if len(inputs) != 1 or inputs[0].name != INPUT or not fits:
        raise PetalError(f"model: {path} is a damaged bundle: petal.json says model.onnx takes {INPUT!r} "
                         f"[N, {input_size}, {input_size}, 3], the graph takes {got}; export it again")


def damaged(path: Path, e: Exception) -> PetalError:
    reason = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    return PetalError(f"model: {path} is a damaged bundle ({reason}); export it again")


class Model:
    """An exported bundle, ready to predict. `reject_unknown=False` never calls an image
    unknown (its ood_score is still reported). `precision`: None runs the bundle as it is
    (fp32, or int8 if it was quantized); "bf16" runs an fp32 bundle on OpenVINO in bf16."""

    def __init__(self, path: str | Path, threads: int | None = None, spin: bool = True,
                 reject_unknown: bool = True, precision: str | None = None) -> None:
        from petal.precision import bundle_precision, session_for

        self.path = Path(path)
        self.reject_unknown = reject_unknown
        self.info = read_info(self.path)
        self.precision = bundle_precision(self.path, self.info.quantization, precision)
        try:
            self.labels: list[str] = read_labels(self.path, self.info)
            graph = check_bundle_file(self.path, "model.onnx")
            self.session = session_for(graph, self.precision, threads, spin)
        except PetalError:  # refused, with its reason
            raise
        except Exception as e:  # noqa: BLE001 - OS and ONNX Runtime errors alike
            raise damaged(self.path, e) from e
        check_graph_input(self.path, self.session, self.info.preprocess.input_size)
        names = {o.name for o in self.session.get_outputs()}
        self.outputs = [n for n in OUTPUTS if n in names]  # bundles before format 2 have probabilities only
        outputs = self.session.get_outputs()[0].shape[-1]
        if isinstance(outputs, int) and outputs != len(self.labels):
            raise PetalError(f"model: {self.path} is a damaged bundle: labels.txt has {len(self.labels)} "
                             f"labels, model.onnx gives {outputs} scores")

    @property
    def name(self) -> str:
        return self.info.name or self.path.parent.name

    @property
    def preprocess(self) -> Preprocess:
        return self.info.preprocess

    def scores(self, pixels: np.ndarray, batch_size: int = 32) -> Scores:
        """(N, S, S, 3) uint8 -> Scores: probabilities, and ood_score/unknown if the bundle has them."""
        parts = [Scores(*self.session.run(self.outputs, {INPUT: pixels[i:i + batch_size]}))
                 for i in range(0, len(pixels), batch_size)]
        return Scores.concat(parts, len(self.labels))

    def predict_pixels(self, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """(N, S, S, 3) uint8 -> (N, C) probabilities."""
        return self.scores(pixels, batch_size).probabilities

    def pixels_from_bytes(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        return load_pixels(data, self.preprocess, max_pixels)

    def prediction(self, uri: str, scores: Scores, top_k: int = 5) -> Prediction:
        """One image's Scores (`scores(...)[i]`) -> its Prediction."""
        return scored_prediction(self.labels, uri, scores, top_k, self.reject_unknown)

    def iter_predict(self, uris: Iterable[str], top_k: int = 5, batch_size: int = 32,
                     workers: int | None = None) -> Iterator[Prediction]:
        """Predictions in input order; unreadable images come back with `.error` set."""
        for batch in batches(iter_items(uris, self.preprocess, workers=workers), batch_size):
            good = [it for it in batch if it.error is None]
            scores = self.scores(np.stack([it.pixels for it in good])) if good else None
            row = {id(it): i for i, it in enumerate(good)}
            for it in batch:
                if it.error is not None:
                    yield Prediction(it.uri, error=it.error)
                else:
                    p = self.prediction(it.uri, scores[row[id(it)]], top_k)
                    p.key = it.key
                    yield p

    def predict(self, uris: Iterable[str], top_k: int = 5, **kw: Any) -> list[Prediction]:
        if isinstance(uris, str | Path):
            uris = [str(uris)]
        return list(self.iter_predict([str(u) for u in uris], top_k, **kw))


def load(path: str | Path, reject_unknown: bool = True, precision: str | None = None) -> Model:
    """Load an exported bundle folder (e.g. `runs/flowers/model`); `precision` as in Model."""
    return Model(path, reject_unknown=reject_unknown, precision=precision)
