"""`petal cache info` and `petal cache verify`."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from petal.backbones import DEFAULT_BACKBONE
from petal.cli.command import Command, PetalGroup
from petal.cli.options import (
    Backbone,
    Cache,
    Data,
)
from petal.cli.render import (
    RichReporter,
    out,
)
from petal.errors import PetalError

cache_app = typer.Typer(  # `petal cache ...`, added to `petal` by petal.cli.app
    cls=PetalGroup, no_args_is_help=True, help=(
    "What the embedding cache holds, and whether it agrees with this machine."))


@cache_app.command("info", cls=Command)
def cache_info_command(
    cache: Cache = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the embeddings folders as JSON.")] = False,
) -> None:
    """Each embeddings folder: who produced its features (graph, decoder, runtime), shards, rows,
    size; then the exported models and the hash memo, and how to free space."""
    from petal.cache_check import cache_info, cache_parts
    from petal.storage import cache_folder

    root = cache_folder(cache)
    folders, parts = cache_info(root), cache_parts(root)
    if as_json:
        print(json.dumps(folders, indent=1))
        return
    for f in folders:
        p = f["provenance"]
        who = (f"graph {p['graph_sha256'][:12]}, Pillow {p['pillow']}, libjpeg {p['libjpeg']}, "
               f"onnxruntime {p['onnxruntime']}" if p else "made before provenance was recorded: not read")
        out.print(f"{f['folder']}: {f['rows']:,} features in {f['shards']} shards, {f['bytes'] / 2**20:.1f} MB"
                  f"{' (this machine)' if f['current'] else ''}\n  backbone {f['backbone']}; {who}",
                  markup=False, highlight=False)
    for part in parts:
        out.print(f"{part['folder']}: {part['files']:,} files, {part['bytes'] / 2**20:.1f} MB: {part['what']}",
                  markup=False, highlight=False, soft_wrap=True)
    total = sum(part["bytes"] for part in parts)
    out.print(f"total {total / 2**20:.1f} MB in {root}; to free space, delete it or a folder above (nothing "
              "there is lost: each is made again when needed)", markup=False, highlight=False, soft_wrap=True)


@cache_app.command("verify", cls=Command)
def cache_verify_command(
    data: Data,
    *,
    sample: Annotated[int, typer.Option(min=0, help="Images to recompute, drawn at random; 0: all.")] = 200,
    backbone: Backbone = DEFAULT_BACKBONE,
    cache: Cache = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON on the last line.")] = False,
) -> None:
    """Recompute a sample of DATA's cached features and compare: the largest difference per shard."""
    from petal.backbones import get_backbone
    from petal.cache_check import verify
    from petal.storage import cache_folder

    r = verify(data, get_backbone(backbone), cache_folder(cache), sample or None,
               reporter=None if as_json else RichReporter())
    if as_json:
        print(json.dumps(r))
    else:
        for name, s in sorted(r["shards"].items()):
            out.print(f"{name}: {s['checked']} checked, largest difference {s['max_rel_diff']:.2e}", markup=False)
        out.print(f"{r['checked']} features checked ({r['not_cached']} images not cached, {r['unreadable']} "
                  f"unreadable): {r['over_tolerance']} differ by more than {r['tolerance']:.0e}; largest "
                  f"{r['max_rel_diff']:.2e}", markup=False)
    if r["over_tolerance"]:
        raise PetalError(f"cache verify: {r['over_tolerance']} cached features differ from this machine's "
                         f"(see the shards above); delete {r['cache']} to embed again")

