"""What calibration and unknown detection cost at prediction time.

    python benchmarks/trust_cost.py RUN [--repeat 300]

RUN is a finished `petal train` run folder (e.g. of tf_flowers). Side by side, in one
process, on the same pre-decoded image, batch 1 (what `petal predict` and `petal serve`
run per image):
- the run's bundle (probabilities + ood_score + unknown);
- the same head without the unknown detector (probabilities only);
- the bundle with the bank grown to BANK_CAP rows (the size any training set of
  BANK_CAP images or more is capped at, e.g. 1M images), for the projection.
Prints p50 latency per image and each model.onnx's size, and the p50 of the unknown
nodes alone (features -> ood_score), which the whole-graph difference measures noisily.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from petal.backbones import get_backbone
from petal.bundle import load, read_info, write_bundle
from petal.onnx_graphs import OPSET, backbone_onnx_path, bundle_graph, unknown_nodes
from petal.run import Run
from petal.runtime import make_session
from petal.unknown import BANK_CAP, KnnUnknown


def p50_ms(model, pixels: np.ndarray, repeat: int) -> float:
    model.scores(pixels)  # warm up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        model.scores(pixels)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def nodes_alone_ms(u: KnnUnknown, folder: Path, repeat: int) -> float:
    """p50 of features (1, D) and probabilities (1, C) -> ood_score through the unknown nodes only."""
    import onnx
    from onnx import TensorProto, helper

    nodes, inits = unknown_nodes(u)
    d = u.bank.shape[1]
    g = helper.make_graph(nodes, "unknown", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["b", d]),
                                             helper.make_tensor_value_info("probabilities", TensorProto.FLOAT,
                                                                           ["b", None])],
                          [helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["b"])], initializer=inits)
    path = folder / f"unknown-{len(u.bank)}.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10), str(path))
    session = make_session(path)
    feed = {"features": np.random.default_rng(1).random((1, d), np.float32),
            "probabilities": np.full((1, 5), 0.2, np.float32)}
    times = []
    for _ in range(repeat + 20):
        t0 = time.perf_counter()
        session.run(["ood_score"], feed)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times[20:]))


def variant(run: Run, folder: Path, unknown: KnnUnknown | None) -> Path:
    settings = run.settings()
    cfg = get_backbone(settings.backbone["name"])
    graph = bundle_graph(backbone_onnx_path(cfg, Path(settings.cache_dir)), run.head(settings).to_onnx(), unknown)
    info = read_info(run.model_dir)
    info.unknown = unknown.to_dict() if unknown else None
    return write_bundle(folder, graph.SerializeToString(), info)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeat", type=int, default=300)
    args = ap.parse_args()
    run = Run.open(args.run)
    u = run.unknown()
    rng = np.random.default_rng(0)
    big = KnnUnknown(np.resize(u.bank, (BANK_CAP, u.bank.shape[1])) + rng.normal(0, 1e-3, (BANK_CAP, u.bank.shape[1]))
                     .astype(np.float32), u.threshold, u.knn_stats, u.msp_stats, u.msp_weight, u.k, u.keep)
    pixels = rng.integers(0, 256, (1, 224, 224, 3), dtype=np.uint8)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        bundles = {"without unknown detection": variant(run, Path(tmp) / "plain", None),
                   f"with unknown detection ({len(u.bank)} bank rows)": run.model_dir,
                   f"bank at the cap ({BANK_CAP} rows)": variant(run, Path(tmp) / "big", big)}
        models = {name: load(path) for name, path in bundles.items()}
        for _ in range(2):  # interleaved rounds: a noisy machine hits every variant alike
            for name, model in models.items():
                report.setdefault(name, {"p50_ms": [], "model_onnx_mb": round(
                    (Path(bundles[name]) / "model.onnx").stat().st_size / 2**20, 2)})
                report[name]["p50_ms"].append(round(p50_ms(model, pixels, args.repeat // 2), 3))
        for bank in (u, big):
            report[f"unknown nodes alone ({len(bank.bank)} bank rows)"] = {
                "p50_ms": round(nodes_alone_ms(bank, Path(tmp), args.repeat), 3)}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
