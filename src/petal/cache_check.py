"""What the embedding cache holds, and whether it still agrees with this machine.

    cache_info(cache_dir)                    -> one record a cache folder: producer, shards, rows, bytes
    verify(data, cfg, cache_dir, sample=200) -> recomputes a sample of DATA's cached features and
                                                reports the largest difference, shard by shard

The cache keys features by the images' bytes, so checking a feature needs its image:
`verify` takes the data the cache was filled from.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from petal.backbones import BackboneConfig, registered
from petal.cache import FEATURE_RTOL, PROVENANCE_KEY, EmbeddingCache, relative_diff
from petal.data import load_dataset
from petal.embed import feature_cache
from petal.loader import batches, iter_items
from petal.onnx_graphs import GRAPH_VERSION
from petal.progress import Reporter


def cache_info(cache_dir: Path) -> list[dict]:
    """Each folder of `cache_dir/embeddings`: its producer (provenance), shards, rows and bytes,
    and whether this machine's backbone graphs still produce it (`current`)."""
    import pyarrow.parquet as pq

    current = {feature_cache(cfg, cache_dir).dir.name for cfg in registered()  # fp32's, of graphs made here
               if cfg.graph_file(cache_dir, GRAPH_VERSION).is_file()}
    slugs = sorted(((c.slug, c.name) for c in registered()), key=lambda s: -len(s[0]))
    folders = []
    for folder in sorted(p for p in (Path(cache_dir) / "embeddings").glob("*") if p.is_dir()):
        shards = sorted(folder.glob("shard-*.parquet"))
        rows, producer = 0, None
        for shard in shards:
            meta = pq.ParquetFile(shard).metadata
            rows += meta.num_rows
            if producer is None and (m := pq.read_schema(shard).metadata) and PROVENANCE_KEY in m:
                producer = json.loads(m[PROVENANCE_KEY])
        folders.append({"folder": str(folder), "shards": len(shards), "rows": rows,
                        "bytes": sum(s.stat().st_size for s in shards), "provenance": producer,
                        "current": folder.name in current, "backbone": backbone_of(folder.name, producer, slugs)})
    return folders


# the cache's other folders: what each holds, and what deleting it costs
CACHE_PARTS = {"models": "exported backbone graphs: exported again (seconds) when needed",
               "hashes": "the hash memo (file size, mtime, inode -> content hash): images read again once",
               "onnxruntime-web": "the npm package `petal export --web` vendors: npm install it again"}


def cache_parts(cache_dir: Path) -> list[dict]:
    """The cache's folders besides the embeddings (models/, hashes/, ...): files, bytes, and what
    deleting each costs; the embeddings' total as the first row."""
    cache_dir = Path(cache_dir)
    parts = []
    for folder in sorted(p for p in cache_dir.glob("*") if p.is_dir()):
        files = [f for f in folder.rglob("*") if f.is_file()]
        what = ("features: embedded again on the next run" if folder.name == "embeddings"
                else CACHE_PARTS.get(folder.name, "not petal's"))
        parts.append({"folder": str(folder), "files": len(files), "bytes": sum(f.stat().st_size for f in files),
                      "what": what})
    return sorted(parts, key=lambda p: Path(p["folder"]).name != "embeddings")


def backbone_of(folder: str, producer: dict | None, slugs: list[tuple[str, str]]) -> str:
    """Which backbone made a cache folder: its weights' location (hf:, onnx:), else the
    registered name whose slug starts the folder's name."""
    weights = (producer or {}).get("weights")
    if weights:
        return f"{'onnx' if weights['kind'] == 'onnx' else 'hf'}:{weights['location']}"
    return next((name for slug, name in slugs if folder.startswith(slug + "-")), "?")


def verify(data: str, cfg: BackboneConfig, cache_dir: Path, sample: int | None = 200, seed: int = 0,
           reporter: Reporter | None = None) -> dict:
    """Recompute the features of `sample` of DATA's images (None: all) that are in this machine's
    cache folder, and compare: the largest relative difference per shard, and how many are
    beyond FEATURE_RTOL."""
    from petal.runtime import make_session

    reporter = reporter or Reporter()
    uris = [e.uri for e in load_dataset(data, eval_percent=0.0, require_train=False).examples]
    if sample is not None and sample < len(uris):
        uris = random.Random(seed).sample(uris, sample)
    cache = feature_cache(cfg, cache_dir, reporter.message)
    stored = cache.index()
    session = make_session(cfg.graph_file(cache_dir, GRAPH_VERSION))
    shards: dict[str, dict] = {}
    counts = {"checked": 0, "not_cached": 0, "unreadable": 0, "over_tolerance": 0}
    with reporter.progress("verifying", len(uris)) as advance:
        for batch in batches(iter_items(uris, cfg.preprocess), 32):
            _compare(batch, cache, stored, session, shards, counts)
            advance(len(batch))
    worst = max((s["max_rel_diff"] for s in shards.values()), default=0.0)
    return {"cache": str(cache.dir), **counts, "max_rel_diff": worst, "tolerance": FEATURE_RTOL, "shards": shards}


def _compare(batch: list, cache: EmbeddingCache, stored: dict, session, shards: dict, counts: dict) -> None:
    """One batch of read images: their features now against the cached ones, per shard."""
    counts["unreadable"] += sum(it.error is not None for it in batch)
    items = [it for it in batch if it.error is None and it.key in stored]
    counts["not_cached"] += sum(it.error is None and it.key not in stored for it in batch)
    if not items:
        return
    now = session.run(["features"], {"images": np.stack([it.pixels for it in items])})[0]  # (B, D)
    diff = relative_diff(now, cache.get([it.key for it in items]))
    counts["checked"] += len(items)
    counts["over_tolerance"] += int((diff > FEATURE_RTOL).sum())
    for it, d in zip(items, diff, strict=True):
        s = shards.setdefault(cache.shard_of(it.key), {"checked": 0, "max_rel_diff": 0.0})
        s["checked"] += 1
        s["max_rel_diff"] = max(s["max_rel_diff"], float(d))
