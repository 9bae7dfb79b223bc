import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from deepscan.data import load_dataset
from deepscan.errors import ConfigError
from deepscan.faces import DlibDetector
from deepscan.metrics import auc, average_precision, eer, frame_and_video
from deepscan.prepare import PrepareSettings, load_cache, prepare
from deepscan.selfblend import self_blend
from deepscan.train import EpochSampler, TrainConfig, lr_at

from . import media

TINY_ARGS = ["--image-size", "62", "--lda-size", "32", "--clips", "2", "--detector", "dlib", "--vit-init", "random",
             "--workers", "0", "--batch-size", "4"]


def deepscan(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "deepscan", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("datasets")
    return {layout: media.make_dataset(root / layout, layout, per_split=1) for layout in ("ffpp", "celebdf", "folders")}


def test_layouts_are_detected_and_split(datasets):
    kind, items = load_dataset(datasets["ffpp"])
    assert kind == "ffpp"
    assert {i.split for i in items} == {"train", "val", "test"}
    assert {i.method for i in items} == {"real", "Deepfakes", "FaceSwap"}
    assert len({i.key for i in items}) == len(items)  # names repeat across method folders, keys do not
    pair = [i for i in items if i.method == "Deepfakes" and i.split == "test"]
    assert all(i.label == 1 for i in pair)
    kind, items = load_dataset(datasets["celebdf"])
    test = [i for i in items if i.split == "test"]
    assert kind == "celebdf" and {(i.method, i.label) for i in test} == {
        ("Celeb-real", 0), ("YouTube-real", 0), ("Celeb-synthesis", 1)}  # label 1 in the list = real
    kind, items = load_dataset(datasets["folders"])
    assert kind == "folders" and {i.split for i in items} == {"train", "val"}
    _, only = load_dataset(datasets["ffpp"], methods=["FaceSwap"])
    assert {i.method for i in only} == {"real", "FaceSwap"}


def test_missing_splits_say_where_they_come_from(tmp_path, datasets):
    (tmp_path / "original_sequences").mkdir()
    with pytest.raises(ConfigError, match="train.json.*--splits"):
        load_dataset(tmp_path)
    with pytest.raises(ConfigError, match="not a known data set layout"):
        load_dataset(tmp_path / "original_sequences")


def test_prepare_caches_and_skips_finished_videos(tmp_path, datasets):
    _, items = load_dataset(datasets["folders"])
    settings = PrepareSettings(image_size=62, lda_size=32, clips=2)
    counts = prepare(items, tmp_path / "cache", DlibDetector(), settings)
    assert counts["prepared"] == len(items)
    again = prepare(items, tmp_path / "cache", DlibDetector(), settings)
    assert again == {"done_before": len(items), "prepared": 0, "no_face": 0, "errors": 0}
    videos = load_cache(tmp_path / "cache", items)
    assert len(videos) == len(items) and all(v.clips == 2 for v in videos)
    images = np.load(Path(videos[0].folder) / "image.npy", mmap_mode="r")
    frames = np.load(Path(videos[0].folder) / "frames.npy", mmap_mode="r")
    assert images.shape == (2, 62, 62, 3) and frames.shape == (2, 3, 32, 32, 3)
    with pytest.raises(ConfigError, match="other settings"):
        prepare(items, tmp_path / "cache", DlibDetector(), PrepareSettings(image_size=398))


def test_prepare_in_processes_gives_the_same_cache_and_isolates_a_crash(tmp_path, datasets):
    from deepscan.data import VideoItem
    from deepscan.faces import DetectorSpec

    from .detectors import POISON_SIZE, PoisonSpec

    _, items = load_dataset(datasets["folders"])
    h, w = POISON_SIZE
    rng = np.random.default_rng(1)
    poison = media.write_video(tmp_path / "poison.mp4", [rng.integers(0, 255, (h, w, 3), np.uint8) for _ in range(10)])
    items = items[:2] + [VideoItem(str(poison), 1, "train", "fake", "poison")] + items[2:]
    settings = PrepareSettings(image_size=62, lda_size=32, clips=2)
    said = []
    counts = prepare(items, tmp_path / "two", PoisonSpec("kill"), settings, workers=2, say=said.append)
    assert counts == {"done_before": 0, "prepared": len(items), "no_face": 0, "errors": 1}
    assert len(said) == 1 and said[0].startswith(str(poison)) and "died" in said[0]
    assert not (tmp_path / "two" / "poison").exists()  # not cached: the next run tries it again
    one = prepare(items[:2] + items[3:], tmp_path / "one", DlibDetector(), settings)
    assert one["prepared"] == len(items) - 1
    a, b = load_cache(tmp_path / "two", items), load_cache(tmp_path / "one", items)
    assert [v.key for v in a] == [v.key for v in b] and len(a) == len(items) - 1
    for x, y in zip(a, b):
        for name in ("image.npy", "frames.npy"):
            assert np.array_equal(np.load(Path(x.folder) / name), np.load(Path(y.folder) / name))
    again = prepare(items, tmp_path / "two", DetectorSpec("dlib"), settings, workers=2)
    assert again == {"done_before": len(items) - 1, "prepared": 1, "no_face": 1, "errors": 0}


def test_prepare_killed_midway_resumes_without_corrupt_entries(tmp_path, datasets):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-m", "deepscan", "prepare", "--data", datasets["ffpp"], "--cache", cache,
                             "--image-size", "62", "--lda-size", "32", "--clips", "2", "--detector", "dlib"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list(cache.glob("*/meta.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)  # its preparation processes notice within 0.2 s and stop (see prepare._exit_with_run)
    done_at_kill = len(list(cache.glob("*/meta.json")))
    assert 2 <= done_at_kill
    for meta in cache.glob("*/meta.json"):  # whatever exists is complete
        m = json.loads(meta.read_text())
        if m["clips"]:
            assert np.load(meta.parent / "frames.npy").shape[0] == m["clips"]
    result = deepscan("prepare", "--data", datasets["ffpp"], "--cache", cache, "--image-size", "62",
                      "--lda-size", "32", "--clips", "2", "--detector", "dlib")
    assert result.returncode == 0, result.stderr
    assert f"{done_at_kill} done before" in result.stderr or done_at_kill == 18
    assert len(list(cache.glob("*/meta.json"))) == 18 and not list(cache.glob(".*tmp*"))


def test_train_checkpoints_resumes_exactly_and_evaluates(tmp_path, datasets):
    data, cache = datasets["ffpp"], tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ["--data", data, "--cache", cache, "--max-steps", "2", "--variant", "spatial-temporal", *TINY_ARGS]
    r = deepscan("train", *common, "--out", straight, "--epochs", "2")
    assert r.returncode == 0, r.stderr
    assert (straight / "best.safetensors").is_file()
    lines = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and "auc" in lines[0]["val"]["frame"]
    assert deepscan("train", *common, "--out", split, "--epochs", "1").returncode == 0
    (split / "last.safetensors.k1ll3d.tmp").write_bytes(b"\0" * 1000)  # a run killed while saving left it
    r = deepscan("train", *common, "--out", split, "--epochs", "2", "--resume")
    assert r.returncode == 0, r.stderr
    assert not list(split.glob("*.tmp")) and "last.safetensors.k1ll3d.tmp" in r.stderr

    def weights(p):
        with safe_open(str(p / "last.safetensors"), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}

    a, b = weights(straight), weights(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    scores, plots = tmp_path / "scores.jsonl", tmp_path / "plots"
    r = deepscan("eval", "--data", data, "--cache", cache, "--weights", straight / "best.safetensors", "--json",
                 "--clips", "2", "--detector", "dlib", "--scores", scores, "--plots", plots)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["split"] == "test" and res["overall"]["frame"]["n"] > 0
    assert set(res["methods"]) == {"Deepfakes", "FaceSwap"}
    # the metrics are scikit-learn's on the scores written out
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = [json.loads(line) for line in scores.read_text().splitlines()]
    assert {r["method"] for r in rows} == {None, "Deepfakes", "FaceSwap"} and {r["label"] for r in rows} == {0, 1}
    for r in rows:
        assert r["score"] == pytest.approx(np.mean(r["frame_scores"]))
    y, s = [r["label"] for r in rows], [r["score"] for r in rows]
    assert res["overall"]["video"]["auc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert res["overall"]["video"]["ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    fy = [r["label"] for r in rows for _ in r["frame_scores"]]
    fs = [x for r in rows for x in r["frame_scores"]]
    assert res["overall"]["frame"]["auc"] == pytest.approx(roc_auc_score(fy, fs), abs=1e-12)
    for name in ("roc_frame", "roc_video", "hist_frame", "hist_video"):
        from PIL import Image

        assert Image.open(plots / f"{name}.png").size[0] > 300
    table = deepscan("eval", "--data", data, "--cache", cache, "--weights", straight / "best.safetensors",
                     "--clips", "2", "--detector", "dlib", env={"COLUMNS": "200"})
    assert "paper ACC" in table.stdout and "Deepfakes" in table.stdout


def test_distributed_training_with_two_cpu_processes(tmp_path, datasets):
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29731",
                        "-m", "deepscan", "train", "--data", datasets["folders"], "--cache", tmp_path / "cache",
                        "--out", out, "--epochs", "1", "--max-steps", "2", "--variant", "spatial", *TINY_ARGS],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "last.safetensors").is_file()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1  # rank 0 alone writes


def test_self_blended_training_from_real_videos_only(tmp_path, datasets):
    r = deepscan("train", "--data", datasets["celebdf"], "--cache", tmp_path / "cache", "--out", tmp_path / "sbi",
                 "--epochs", "1", "--max-steps", "2", "--self-blend", "0.5", "--variant", "temporal", *TINY_ARGS)
    assert r.returncode == 0, r.stderr


def test_self_blend_changes_the_face_not_the_corners():
    rng = np.random.default_rng(0)
    img = media.astronaut()[:300, 100:400]
    from PIL import Image

    image = np.asarray(Image.fromarray(img).resize((96, 96)))
    frames = np.stack([np.asarray(Image.fromarray(img).resize((48, 48)))] * 3)
    bi, bf = self_blend(image, frames, rng)
    assert bi.shape == image.shape and bf.shape == frames.shape
    diff = np.abs(bi.astype(int) - image.astype(int)).mean(-1)
    assert diff[40:56, 40:56].mean() > 2 * max(diff[:6, :6].mean(), 0.1)
    assert np.array_equal(bf[0], bf[1]) or np.abs(bf[0].astype(int) - bf[1].astype(int)).max() == 0  # same draw


def test_metrics_known_values():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.5, 0.5]) == 0.5  # ties count half
    assert np.isnan(auc([1, 1], [0.2, 0.3])) and np.isnan(eer([0, 0], [0.1, 0.2]))
    assert average_precision([1, 0, 1], [0.9, 0.8, 0.7]) == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision([1, 0, 1, 0], [0.5] * 4) == 0.5  # four ties: one threshold, whatever the order
    assert average_precision([0, 1, 0, 1], [0.5] * 4) == 0.5
    assert eer([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 0.0
    m = frame_and_video([("a", 0, 0.2), ("a", 0, 0.4), ("b", 1, 0.9), ("b", 1, 0.3)])
    assert m["frame"]["n"] == 4 and m["video"]["n"] == 2 and m["video"]["auc"] == 1.0
    assert m["frame"]["acc"] == 0.75


@pytest.mark.parametrize("seed", range(5))
def test_metrics_equal_scikit_learn_with_ties(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 40)
    s = np.round(rng.random(40), 1)  # coarse scores: many ties, as bf16/fp16 give
    assert auc(y, s) == roc_auc_score(y, s)
    assert average_precision(y, s) == average_precision_score(y, s)
    assert average_precision(y[::-1], s[::-1]) == average_precision(y, s)  # order of ties is irrelevant
    fpr, tpr, _ = roc_curve(y, s)
    assert eer(y, s) == fpr[np.nanargmin(np.abs(1 - tpr - fpr))]  # DeepfakeBench's ROC-crossing EER


def test_lr_schedule_and_balanced_sampler():
    cfg = TrainConfig(out="x")
    assert [lr_at(e, cfg) for e in (0, 4, 5, 10, 19)] == [3e-4, 3e-4, 1.5e-4, 7.5e-5, 3e-4 / 8]
    labels = np.array([0] * 20 + [1] * 80)
    s = EpochSampler(labels, balance=True, seed=0)
    drawn = labels[s.order()]
    assert 0.35 < drawn.mean() < 0.65  # four fakes per real, rebalanced
    shards = [[i for _, i in EpochSampler(labels, True, 0, rank=r, world=2)] for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(s.order().tolist()) and len(shards[0]) == 50


def test_persistent_loader_workers_draw_each_epochs_augmentation(tmp_path):
    from deepscan.prepare import CachedVideo
    from deepscan.train import ClipDataset

    rng = np.random.default_rng(0)
    videos = []
    for v in range(2):
        folder = tmp_path / f"v{v}"
        folder.mkdir()
        np.save(folder / "image.npy", rng.integers(0, 255, (4, 8, 8, 3), np.uint8))
        np.save(folder / "frames.npy", rng.integers(0, 255, (4, 3, 6, 6, 3), np.uint8))
        videos.append(CachedVideo(f"v{v}", v, "train", "real", 4, str(folder)))
    ds = ClipDataset(videos, clip_len=3, train=True, augment=True)
    sampler = EpochSampler(ds.labels, True, seed=0)

    def two_epochs(workers):
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, num_workers=workers,
                                             persistent_workers=workers > 0,
                                             multiprocessing_context="forkserver" if workers else None)  # as train()
        out = []
        for epoch in (0, 1):
            # as train() does; persistent workers keep the data set as it was when they started,
            # so only what the sampler hands them can tell them the epoch
            ds.epoch = sampler.epoch = epoch
            out.append(torch.cat([b[0].flatten(1) for b in loader]))
        return out

    inline, workers = two_epochs(0), two_epochs(2)
    assert all(torch.equal(a, b) for a, b in zip(inline, workers))


def test_vit_init_offline_fails_fast_and_local_file_loads(tmp_path):
    from safetensors.torch import save_file

    from deepscan.checkpoint import load_checkpoint
    from deepscan.train import vit_state

    t = time.monotonic()
    with pytest.raises(ConfigError, match="--vit-init PATH"):
        vit_state("imagenet")  # HF_ENDPOINT points at a closed port in tests
    assert time.monotonic() - t < 5
    vit = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_file({"patch_embed.proj.weight": torch.randn(768, 3, 16, 16), "patch_embed.proj.bias": torch.randn(768),
               "pos_embed": torch.randn(1, 197, 768), "cls_token": torch.zeros(1, 1, 768)}, str(vit))
    out = tmp_path / "init.safetensors"
    r = deepscan("weights", "init", "--variant", "temporal", "--vit-init", vit, "--out", out)
    assert r.returncode == 0, r.stderr
    model, info = load_checkpoint(out)
    assert "vit.safetensors" in info.provenance["init"]
    from safetensors.torch import load_file

    ref = load_file(str(vit))
    assert torch.equal(model.temporal.patch_embed[1].weight, ref["patch_embed.proj.weight"])
    assert torch.equal(model.temporal.pos_embed[0, 196:392], ref["pos_embed"][0, 1:])
