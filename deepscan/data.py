"""Data sets: find the labelled videos of FaceForensics++, Celeb-DF v2 or plain folders.

Layouts (SPEC §3), autodetected or forced with ``--layout``:
- ``ffpp``: ``original_sequences/youtube/<comp>/videos/*.mp4`` (real) and
  ``manipulated_sequences/<Method>/<comp>/videos/*.mp4`` (fake), official splits
  ``train.json`` / ``val.json`` / ``test.json`` (lists of id pairs) in the root or ``--splits``.
- ``celebdf``: ``Celeb-real/``, ``YouTube-real/``, ``Celeb-synthesis/`` and
  ``List_of_testing_videos.txt`` (lines ``<label> <relative path>``, label 1 = real).
- ``folders``: ``real/`` and ``fake/`` (optionally under ``train/``, ``val/``, ``test/``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError
from .video import VIDEO_EXTENSIONS

FFPP_METHODS = ("Deepfakes", "Face2Face", "FaceSwap", "NeuralTextures")
LAYOUTS = ("auto", "ffpp", "celebdf", "folders")
SPLITS = ("train", "val", "test")
_VIDEO_EXT = VIDEO_EXTENSIONS  # the same files as a folder scan


@dataclass(frozen=True)
class VideoItem:
    path: str
    label: int  # 1 = fake, 0 = real (P(fake) is the model's class 1)
    split: str
    method: str  # "real", an FF++ method, "Celeb-synthesis", "fake", ...
    key: str  # unique id across the data set: FF++ reuses file names across method folders


def detect_layout(root: Path) -> str:
    if (root / "original_sequences").is_dir() or (root / "manipulated_sequences").is_dir():
        return "ffpp"
    if (root / "Celeb-synthesis").is_dir() or (root / "List_of_testing_videos.txt").is_file():
        return "celebdf"
    if any((root / d / "real").is_dir() or (root / d / "fake").is_dir() for d in ("", *SPLITS)):
        return "folders"
    raise ConfigError(
        f"{root}: not a known data set layout (FaceForensics++, Celeb-DF v2, or real/ and fake/ folders); "
        "see README 'Training', or pass --layout"
    )


def _videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _VIDEO_EXT and not p.name.startswith("._")
                  and p.is_file()) if folder.is_dir() else []


def _split_pairs(f: Path) -> list[tuple[str, str]]:
    """The id pairs of an official FF++ split file: a JSON list of two-element lists."""
    hint = "it should be the official FaceForensics++ split file: a JSON list of [id, id] pairs"
    try:
        data = json.loads(f.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{f}: not valid JSON ({str(exc).splitlines()[0][:80]}); {hint}") from None
    except OSError as exc:
        raise ConfigError(f"{f}: cannot be read ({exc.strerror})") from None
    if not isinstance(data, list) or not all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, (str, int)) for x in p) for p in data):
        raise ConfigError(f"{f}: unexpected content; {hint}")
    return [(str(a), str(b)) for a, b in data]


def load_ffpp(root: Path, compression: str = "c23", methods=FFPP_METHODS, splits_dir: Path | None = None) -> list[VideoItem]:
    split_of: dict[str, str] = {}
    sdir = splits_dir or root
    for split in SPLITS:
        f = sdir / f"{split}.json"
        if not f.is_file():
            raise ConfigError(
                f"{f}: missing FaceForensics++ split file; the official train/val/test.json come with the "
                "FaceForensics++ repository (dataset/splits/); put them in the data root or pass --splits DIR"
            )
        for a, b in _split_pairs(f):
            split_of[a] = split_of[b] = split
            split_of[f"{a}_{b}"] = split_of[f"{b}_{a}"] = split
    items = []
    real_dir = root / "original_sequences" / "youtube" / compression / "videos"
    for p in _videos(real_dir):
        if p.stem in split_of:
            items.append(VideoItem(str(p), 0, split_of[p.stem], "real", f"real/{p.stem}"))
    for m in methods:
        for p in _videos(root / "manipulated_sequences" / m / compression / "videos"):
            if p.stem in split_of:
                items.append(VideoItem(str(p), 1, split_of[p.stem], m, f"{m}/{p.stem}"))
    if not items:
        raise ConfigError(f"{root}: no FaceForensics++ videos found for compression {compression!r} and methods {', '.join(methods)}")
    return items


def load_celebdf(root: Path, val_fraction: float = 0.1, seed: int = 0) -> list[VideoItem]:
    listing = root / "List_of_testing_videos.txt"
    test = {}
    if listing.is_file():
        try:
            text = listing.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{listing}: not UTF-8 text (byte {exc.start}); it should list '<label> <relative "
                              "path>' lines as Celeb-DF v2 ships it") from None
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                parts = line.split(maxsplit=1)
                if len(parts) != 2 or parts[0] not in ("0", "1"):
                    raise ConfigError(f"{listing}: line {n} is not '<0 or 1> <relative path>'; fix or remove it")
                test[parts[1].strip()] = 0 if parts[0] == "1" else 1  # Celeb-DF: 1 = real
    items = []
    others = []
    for folder, label in (("Celeb-real", 0), ("YouTube-real", 0), ("Celeb-synthesis", 1)):
        for p in _videos(root / folder):
            rel = p.relative_to(root).as_posix()
            if rel in test:
                items.append(VideoItem(str(p), test[rel], "test", folder, rel))
            else:
                others.append(VideoItem(str(p), label, "train", folder, rel))
    random.Random(seed).shuffle(others)
    n_val = int(round(len(others) * val_fraction))
    items += [VideoItem(v.path, v.label, "val", v.method, v.key) for v in others[:n_val]] + others[n_val:]
    if not items:
        raise ConfigError(f"{root}: no Celeb-DF videos found under Celeb-real/, YouTube-real/, Celeb-synthesis/")
    return sorted(items, key=lambda v: v.key)


def load_folders(root: Path, val_fraction: float = 0.2, seed: int = 0) -> list[VideoItem]:
    items = []
    if any((root / s).is_dir() for s in SPLITS):
        for split in SPLITS:
            for label, name in ((0, "real"), (1, "fake")):
                for p in _videos(root / split / name):
                    items.append(VideoItem(str(p), label, split, name, p.relative_to(root).as_posix()))
    else:
        rng = random.Random(seed)
        for label, name in ((0, "real"), (1, "fake")):
            vids = _videos(root / name)
            rng.shuffle(vids)
            n_val = max(1, int(round(len(vids) * val_fraction))) if len(vids) > 1 else 0
            for i, p in enumerate(vids):
                items.append(VideoItem(str(p), label, "val" if i < n_val else "train", name,
                                       p.relative_to(root).as_posix()))
    if not items:
        raise ConfigError(f"{root}: no videos in real/ or fake/")
    return sorted(items, key=lambda v: v.key)


def load_dataset(root: str | Path, layout: str = "auto", *, compression: str = "c23", methods=FFPP_METHODS,
                 splits_dir: str | Path | None = None, seed: int = 0) -> tuple[str, list[VideoItem]]:
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: data folder not found")
    if layout not in LAYOUTS:
        raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}")
    layout = detect_layout(root) if layout == "auto" else layout
    if layout == "ffpp":
        bad = set(methods) - set(FFPP_METHODS) - {"DeepFakeDetection", "FaceShifter"}
        if bad:
            raise ConfigError(f"unknown FF++ method(s): {', '.join(sorted(bad))}")
        return layout, load_ffpp(root, compression, tuple(methods), Path(splits_dir) if splits_dir else None)
    if layout == "celebdf":
        return layout, load_celebdf(root, seed=seed)
    return layout, load_folders(root, seed=seed)
