"""Faults during `petal embed`: kill -9 ten times, then a full disk. Does the cache stay right?

    python benchmarks/faults.py [--data FOLDER] [--images 1200] [--kills 10]

1. kill -9: `petal embed` is started and killed at a random moment `--kills` times, each run
   going on from what the earlier ones left; then it runs to the end, and `petal cache verify
   --sample 0` recomputes every cached feature (the aim: 0 differences, every image cached).
2. disk full (needs root, for a tmpfs): the cache on a tmpfs too small for it. `petal embed`
   must fail with one clear error line; `petal cache verify` must pass on what was written;
   and after the tmpfs is grown, a second run must resume (embed only what is missing).
Prints the figures as JSON. Works on a copy of `--images` images of `--data`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "flower_photos"


def petal(*args: str, cache: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "PETAL_CACHE_DIR": str(cache), "PETAL_SHARD_ROWS": "32"}
    return subprocess.Popen([sys.executable, "-m", "petal.cli", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(p: subprocess.Popen) -> tuple[int, dict | None, str]:
    out, err = p.communicate()
    last = out.strip().splitlines()[-1] if out.strip() else ""
    return p.returncode, json.loads(last) if last.startswith("{") else None, err


def subset(data: Path, n: int, into: Path) -> Path:
    """`n` images of `data`, class folders kept, copied into `into`."""
    files = sorted(data.rglob("*.jpg"))
    for f in random.Random(0).sample(files, min(n, len(files))):
        (into / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(f, into / f.parent.name / f.name)
    return into


def kills(data: Path, cache: Path, n: int) -> dict:
    rng, killed = random.Random(1), 0
    one = next(data.rglob("*.jpg"))
    warm = data.parent / "one" / one.parent.name
    warm.mkdir(parents=True)
    shutil.copy(one, warm)
    finish(petal("embed", str(warm.parent), "--json", cache=cache))  # the one-off backbone export, unkilled
    for _ in range(n):
        p = petal("embed", str(data), "--json", cache=cache)
        time.sleep(rng.uniform(3, 10))  # past start-up, into the embedding
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            killed += 1
        p.wait()
    code, summary, err = finish(petal("embed", str(data), "--json", cache=cache))
    _, verified, _ = finish(petal("cache", "verify", str(data), "--sample", "0", "--json", cache=cache))
    return {"kills": killed, "final_run": {"exit": code, **(summary or {"stderr": err[-300:]})},
            "verify": {k: verified[k] for k in ("checked", "not_cached", "over_tolerance", "max_rel_diff")}}


def disk_full(data: Path, models: Path, root: Path, size_mb: int) -> dict:
    mount = root / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}M", "tmpfs", str(mount)], check=True)
    try:
        shutil.copytree(models, mount / "models")  # the exported backbone: the shards are what fills it
        code, _, err = finish(petal("embed", str(data), "--json", cache=mount))
        first = {"exit": code, "error": err.strip().splitlines()[-1] if err.strip() else ""}
        _, verified, _ = finish(petal("cache", "verify", str(data), "--sample", "0", "--json", cache=mount))
        subprocess.run(["mount", "-o", f"remount,size={size_mb * 4}M", str(mount)], check=True)
        code, again, err = finish(petal("embed", str(data), "--json", cache=mount))
        return {"tmpfs_mb": size_mb, "full_run": first,
                "verify_after": {k: verified[k] for k in ("checked", "over_tolerance", "max_rel_diff")},
                "rerun_with_space": {"exit": code, **{k: (again or {}).get(k) for k in ("embedded", "cached")}}}
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=FLOWERS)
    ap.add_argument("--images", type=int, default=1200)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--tmpfs-mb", type=int, default=18, help="the full disk: backbone graph (13.5 MB) plus a little")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="petal-faults-") as tmp:
        root = Path(tmp)
        data = subset(args.data, args.images, root / "data")
        report = {"images": sum(1 for _ in data.rglob("*.jpg")), "kill_9": kills(data, root / "cache", args.kills)}
        if os.geteuid() == 0:
            report["disk_full"] = disk_full(data, root / "cache" / "models", root, args.tmpfs_mb)
        else:
            report["disk_full"] = "skipped: mounting a tmpfs needs root"
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
