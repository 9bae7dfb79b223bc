"""Preparation for training on a Ray cluster (``deepscan prepare --ray``), on the connection of
``scan.cluster.connect``: ``PrepareActor`` writes each video's cache folder under a unique
temporary name and renames it into the shared cache folder, so a folder appears complete or not
at all, whichever node made it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DeepscanError
from .scan.cluster import TASK_RETRIES, _ray, _remote_args_allowed


class PrepareActor:
    """A Ray actor preparing training videos into the shared cache folder."""

    def __init__(self, cache: str, settings, detector):
        self.cache, self.settings, self.detector = Path(cache), settings, detector.build()

    def __call__(self, batch: dict) -> dict:
        from .data import VideoItem
        from .prepare import is_done, prepare_video

        out = {"key": [], "clips": [], "error": [], "done_before": []}
        for i in range(len(batch["key"])):
            item = VideoItem(str(batch["path"][i]), int(batch["label"][i]), str(batch["split"][i]),
                             str(batch["method"][i]), str(batch["key"][i]))
            if is_done(self.cache, item):  # another node finished it (a retried batch)
                meta = {"clips": -1, "error": None}
            else:
                meta = prepare_video(item, self.cache, self.detector, self.settings)
            out["key"].append(item.key)
            out["clips"].append(int(meta["clips"]))
            out["error"].append(meta["error"] or "")
            out["done_before"].append(meta["clips"] == -1)
        return out


def prepare(items: list, cache: str | os.PathLike, detector, settings, advance=None) -> dict:
    """``prepare.prepare`` on a Ray cluster: the videos not yet in the (shared) cache."""
    from ray.data import ActorPoolStrategy, from_items

    from .prepare import pending

    cache = Path(cache)
    counts, items = pending(items, cache, settings, detector.name, advance)
    todo = [{"path": item.path, "label": item.label, "split": item.split, "method": item.method, "key": item.key}
            for item in items]
    if not todo:
        return counts
    resources = _ray().cluster_resources()
    cpus = float(resources.get("CPU", 1))
    actors = max(1, min(len(todo), int(cpus)))
    with _remote_args_allowed():
        ds = from_items(todo).map_batches(
            PrepareActor, fn_constructor_kwargs=dict(cache=str(cache), settings=settings, detector=detector),
            batch_size=1, compute=ActorPoolStrategy(min_size=1, max_size=actors),
            num_cpus=round(max(0.25, 0.75 * cpus / actors), 2), max_task_retries=TASK_RETRIES, max_restarts=-1,
        )
    try:
        for row in ds.iter_rows():
            if row["done_before"]:
                counts["done_before"] += 1
            else:
                counts["prepared"] += 1
                counts["errors"] += bool(row["error"])
                counts["no_face"] += not row["error"] and row["clips"] == 0
            if advance:
                advance()
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - Ray wraps actor failures in its own types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise DeepscanError(f"the Ray job failed ({type(exc).__name__}: {first})") from None
    return counts
