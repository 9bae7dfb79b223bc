"""Training and evaluation with the paper's protocol (section V-A), resumable and distributed.

Defaults (paper V-A): SGD momentum 0.9, lr 3e-4 halved every 5 epochs, 20 epochs, batch 32,
backbone from random init, LDA patch/position embeddings from a pretrained ViT-B/16.
Not in the paper, and documented here:
- class balance: each epoch draws clips with probabilities inverse to their class's share
  (FF++ has four fakes per real), with replacement, one epoch = as many clips as the split has;
- augmentations (train only, the same draw for the image and all n frames): horizontal flip
  (p=0.5) and a brightness/contrast jitter (+-10 %, p=0.5); nothing else;
- ``--self-blend``: real clips become self-blended pseudo-fakes with probability 0.5 (selfblend.py);
- validation each epoch on the val split, frame and video ACC/AUC; ``best.safetensors`` keeps the
  epoch with the best video AUC (frame AUC when the split has one video per class or fewer).
Checkpoints (``last.safetensors`` every epoch, atomically) carry the model, the momentum buffers,
the RNG state, the epoch and the train config, so ``--resume`` continues exactly from the last
finished epoch. Distributed: ``torchrun --nproc-per-node N -m deepscan train ...`` (DDP; nccl on
GPU, gloo on CPU); every rank draws the same epoch order and takes its own share.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint, load_tensors, save_checkpoint
from .config import config_for_variant
from .errors import ConfigError, OutputError, io_reason
from .metrics import by_video, frame_and_video
from .output import json_line
from .model import LDADetector, fold_batchnorm, input_normaliser, load_vit_embeddings
from .prepare import CachedVideo, open_arrays
from .selfblend import self_blend

VIT_DEFAULT = "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k"


@dataclass(frozen=True)
class TrainConfig:
    out: str
    variant: str = "spatial-temporal"
    epochs: int = 20  # paper V-A
    batch_size: int = 32  # paper V-A
    lr: float = 3e-4  # paper V-A
    momentum: float = 0.9  # paper V-A
    lr_step: int = 5  # epochs between halvings (paper V-A)
    lr_gamma: float = 0.5
    weight_decay: float = 0.0  # the paper names none
    seed: int = 0
    workers: int = 2
    balance: bool = True
    augment: bool = True
    self_blend: float = 0.0  # probability that a real clip becomes a pseudo-fake
    vit_init: str = "imagenet"  # imagenet | random | PATH to a timm ViT-B/16 .safetensors
    # random (paper V-A) | a published model of the manifest (xception-ffpp-c23) | PATH to a deepscan
    # checkpoint: the backbone (and its 2-class head) starts from that model's weights
    backbone_init: str = "random"
    image_size: int = 398
    lda_size: int = 224
    num_maps: int = 4
    num_frames: int = 3
    recalibration: str = "multiply"  # paper's f * a; "residual" = f * (1 + a) (SPEC §1)
    max_steps_per_epoch: int = 0  # 0 = a full epoch; small values for smoke tests
    device: str = "auto"
    data: dict = field(default_factory=dict)  # where the clips came from (provenance only)

    def __post_init__(self):
        def need(ok: bool, option: str, what: str, value) -> None:
            if not ok:
                raise ConfigError(f"{option} must be {what}, not {value}")

        need(self.epochs >= 1, "--epochs", "at least 1", self.epochs)
        need(self.batch_size >= 2, "--batch-size", "at least 2 (batch norm needs two clips)", self.batch_size)
        need(math.isfinite(self.lr) and self.lr > 0, "--lr", "a number > 0", self.lr)
        need(self.lr_step >= 1, "--lr-step", "at least 1 epoch", self.lr_step)
        need(math.isfinite(self.momentum) and 0 <= self.momentum < 1, "--momentum", "in [0, 1)", self.momentum)
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "--weight-decay", "a number >= 0",
             self.weight_decay)
        need(self.workers >= 0, "--workers", ">= 0", self.workers)
        need(math.isfinite(self.self_blend) and 0 <= self.self_blend <= 1, "--self-blend", "in [0, 1]",
             self.self_blend)
        need(self.max_steps_per_epoch >= 0, "--max-steps", ">= 0", self.max_steps_per_epoch)
        need(self.num_maps >= 1 and self.num_frames >= 1, "--maps and --frames-per-clip", "at least 1",
             (self.num_maps, self.num_frames))


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Step schedule of paper V-A: lr x gamma^(epoch // step)."""
    return cfg.lr * cfg.lr_gamma ** (epoch // cfg.lr_step)


# ---------------------------------------------------------------------------- data
class ClipDataset(torch.utils.data.Dataset):
    """Every cached face clip of the given videos; arrays are memory-mapped lazily per worker."""

    def __init__(self, videos: list[CachedVideo], clip_len: int, train: bool, augment: bool = True,
                 self_blend_p: float = 0.0, seed: int = 0):
        self.videos, self.clip_len, self.train = videos, clip_len, train
        self.augment, self.self_blend_p, self.seed = augment and train, self_blend_p if train else 0.0, seed
        self.index = [(v, c) for v in range(len(videos)) for c in range(videos[v].clips)]
        self.labels = np.array([videos[v].label for v, _ in self.index])
        self._arrays: dict[int, tuple] = {}
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.index)

    def _arr(self, v: int):
        if v not in self._arrays:
            self._arrays[v] = open_arrays(self.videos[v])
        return self._arrays[v]

    def __getitem__(self, i):
        # (epoch, index) from EpochSampler: persistent loader workers keep their own copy of the
        # data set, so the epoch travels with each index rather than as an attribute set here
        epoch, i = i if isinstance(i, tuple) else (self.epoch, i)
        v, c = self.index[i]
        images, frames = self._arr(v)
        image = np.array(images[c])
        clip = np.array(frames[c][: self.clip_len])
        label = self.videos[v].label
        if self.train:
            # a per-(epoch, item) generator: the same draws whatever the worker or rank
            rng = np.random.default_rng([self.seed, epoch, i])
            if self.self_blend_p and label == 0 and rng.random() < self.self_blend_p:
                image, clip = self_blend(image, clip, rng)
                label = 1
            if self.augment:
                if rng.random() < 0.5:
                    image, clip = image[:, ::-1], clip[:, :, ::-1]
                if rng.random() < 0.5:
                    gain, bias = rng.uniform(0.9, 1.1), rng.uniform(-25, 25)
                    image = np.clip(image * gain + bias, 0, 255).astype(np.uint8)
                    clip = np.clip(clip * gain + bias, 0, 255).astype(np.uint8)
        return torch.from_numpy(np.ascontiguousarray(image)), torch.from_numpy(np.ascontiguousarray(clip)), label, v


class EpochSampler(torch.utils.data.Sampler):
    """Class-balanced (or plain shuffled) order per epoch, identical on every rank, then sharded."""

    def __init__(self, labels: np.ndarray, balance: bool, seed: int, rank: int = 0, world: int = 1):
        self.labels, self.balance, self.seed, self.rank, self.world = labels, balance, seed, rank, world
        self.epoch = 0

    def order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        n = len(self.labels)
        if not self.balance or len(np.unique(self.labels)) < 2:
            return rng.permutation(n)
        counts = np.bincount(self.labels, minlength=2).astype(float)
        weights = 1.0 / counts[self.labels]
        return rng.choice(n, size=n, replace=True, p=weights / weights.sum())

    def __iter__(self):
        return iter((self.epoch, i) for i in self.order()[self.rank:: self.world].tolist())

    def __len__(self) -> int:
        return len(range(self.rank, len(self.labels), self.world))


# ---------------------------------------------------------------------------- model I/O
def vit_state(spec: str) -> tuple[dict, str]:
    """ViT-B/16 weights for the LDA embeddings: a local file, or timm's pretrained tag via the Hub."""
    if spec != "imagenet":
        from .weights import read_vit_state, sha256_file

        return read_vit_state(spec), f"{Path(spec).name} sha256 {sha256_file(spec)}"
    from .weights import endpoint, hub_unavailable

    why = hub_unavailable()
    if why:
        raise ConfigError(
            f"--vit-init imagenet needs {VIT_DEFAULT} from the Hub, but {why}; "
            "pass --vit-init PATH (a timm ViT-B/16 .safetensors) or --vit-init random"
        )
    from huggingface_hub import hf_hub_download
    from safetensors.torch import load_file

    from .weights import sha256_file

    path = hf_hub_download(VIT_DEFAULT, "model.safetensors", endpoint=endpoint())
    return load_file(path), f"{VIT_DEFAULT} sha256 {sha256_file(path)}"


def backbone_state(spec: str, say=None) -> tuple[dict, str]:
    """The backbone tensors (timm legacy_xception names, head included) of a published model of
    the manifest (fetched and converted as a scan does) or of a deepscan checkpoint file, and a
    line saying where they came from."""
    from .checkpoint import load_tensors, read_info
    from .weights import converted, fetch, load_manifest, sha256_file

    manifest = load_manifest()
    entry = next((e for e in manifest.models() if e.name == spec), None)
    if entry is not None:
        path, sha = converted(entry, say=say) if entry.format else (fetch(entry, say=say), entry.sha256)
    elif Path(spec).suffix.lower() == ".safetensors":
        path, sha = Path(spec), None
    else:
        names = ", ".join(e.name for e in manifest.models()) or "none published"
        raise ConfigError(f"--backbone-init {spec!r}: neither a published model ({names}) nor a .safetensors "
                          "checkpoint; or use --backbone-init random (the paper's)")
    info = read_info(path)
    state = load_tensors(path, "model.backbone.")
    where = f"{info.name} ({path.name} sha256 {sha or sha256_file(path)}"
    if info.license:
        where += f"; licence: {info.license}"
    return state, where + ")"


def build(cfg: TrainConfig, say=None) -> tuple[LDADetector, str]:
    mcfg = config_for_variant(cfg.variant, image_size=cfg.image_size, lda_size=cfg.lda_size,
                              num_maps=cfg.num_maps, num_frames=cfg.num_frames, recalibration=cfg.recalibration)
    torch.manual_seed(cfg.seed)
    model = LDADetector(mcfg)
    init = "random"
    if cfg.backbone_init != "random":
        state, where = backbone_state(cfg.backbone_init, say=say)
        try:  # convolutions do not depend on the input size: a 256 px model starts a 398 px one
            model.backbone.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"--backbone-init {cfg.backbone_init}: its backbone does not fit "
                              f"({str(exc).splitlines()[0]})") from None
        init = f"backbone from {where}"
    if cfg.vit_init != "random" and mcfg.variant != "xception":
        state, vit = vit_state(cfg.vit_init)
        load_vit_embeddings(model, state)
        init = vit if init == "random" else f"{init}; LDA embeddings from {vit}"
    return model, init


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def predict(model: LDADetector, videos: list[CachedVideo], device, batch_size: int = 32, dtype=None):
    """(video key, label, P(fake)) for every cached clip of ``videos``; eval mode, restored after."""
    was_training = model.training
    model.eval()
    cfg = model.config
    ds = ClipDataset(videos, cfg.clip_len, train=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)
    to_input = input_normaliser(cfg, device)
    out = []
    autocast = dtype is not None and dtype != torch.float32
    for image, frames, labels, vidx in loader:
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=autocast):
            logits = model(to_input(image), to_input(frames) if cfg.variant != "xception" else None)
        probs = torch.softmax(logits.float(), 1)[:, 1].cpu().numpy()
        out += [(videos[int(v)].key, int(y), float(p)) for v, y, p in zip(vidx, labels, probs)]
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------- training
def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def _optimizer_tensors(opt: torch.optim.Optimizer, params: list) -> dict:
    out = {}
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{i}"] = buf
    return out


def _remove_leftovers(out: Path, log) -> None:
    """Checkpoints are written to a temporary file and renamed (checkpoint.save_checkpoint): a run
    killed while saving leaves that file (~190 MB with the optimizer state). The next run in the
    same folder removes them."""
    leftovers = [p for p in out.glob("*.safetensors.*.tmp") if p.is_file()]
    for p in leftovers:
        p.unlink(missing_ok=True)
    if leftovers:
        log({"removed": [p.name for p in leftovers], "why": "half-written checkpoints of a killed run"})


def train(cfg: TrainConfig, train_videos: list[CachedVideo], val_videos: list[CachedVideo], *,
          resume: bool = False, log=print) -> dict:
    rank, world = _dist()
    from .scan import pick_device

    device = pick_device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    last = out / "last.safetensors"
    start_epoch, best, init = 0, -1.0, "random"
    best_by = best_epoch = None  # what chose best.safetensors (val video AUC, ..., val loss), and when
    if resume:
        if not last.is_file():
            raise ConfigError(f"{last}: nothing to resume; start without --resume")
        model, info = load_checkpoint(last)
        state = info.provenance["train_state"]
        saved = TrainConfig(**{**state["config"], "out": cfg.out})
        changed = {k for k in ("variant", "image_size", "lda_size", "num_maps", "num_frames", "recalibration")
                   if getattr(saved, k) != getattr(cfg, k)}
        if changed:
            raise ConfigError(f"--resume with a different model ({', '.join(sorted(changed))}); use another --out")
        cfg = dataclasses.replace(saved, epochs=cfg.epochs, workers=cfg.workers, device=cfg.device)
        start_epoch, best, init = state["epoch"] + 1, state["best"], state["init"]
        best_by, best_epoch = state.get("best_by", "resumed run's measure"), state.get("best_epoch")
    else:
        model, init = build(cfg, say=(lambda m: log({"note": m})) if log else None)
    model = model.to(device).to(memory_format=torch.channels_last)
    params = [p for p in model.parameters()]
    opt = torch.optim.SGD(params, lr=lr_at(start_epoch, cfg), momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if resume:
        extra = load_tensors(last, "extra.")
        for i, p in enumerate(params):
            if f"momentum.{i}" in extra:
                opt.state[p]["momentum_buffer"] = extra[f"momentum.{i}"].to(device)
        torch.set_rng_state(extra["rng.torch"])
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    mcfg = model.config
    ds = ClipDataset(train_videos, mcfg.clip_len, train=True, augment=cfg.augment, self_blend_p=cfg.self_blend, seed=cfg.seed)
    if len(ds) == 0:
        raise ConfigError("no training clips: prepare found no faces in the train split")
    sampler = EpochSampler(ds.labels, cfg.balance, cfg.seed, rank, world)
    # forkserver, not fork: this process has native thread pools by now (onnxruntime's from the
    # preparation, OpenVINO's or CUDA's), which a forked child inherits half-copied (a test process
    # that had run OpenVINO crashed with SIGSEGV on forking loader workers)
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                                         pin_memory=device.type == "cuda", drop_last=False,
                                         persistent_workers=cfg.workers > 0,
                                         multiprocessing_context="forkserver" if cfg.workers > 0 else None)
    to_input = input_normaliser(mcfg, device)
    amp = device.type == "cuda"
    dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        _remove_leftovers(out, log)
    metrics_log = out / "metrics.jsonl"
    history = []
    one_class = bool(val_videos) and len({v.label for v in val_videos}) < 2
    if rank == 0 and one_class:
        log({"note": "the validation split holds only one class: AUC is undefined there, so best.safetensors is "
                     "chosen by validation loss"})
    for epoch in range(start_epoch, cfg.epochs):
        ds.epoch = sampler.epoch = epoch
        for group in opt.param_groups:
            group["lr"] = lr_at(epoch, cfg)
        net.train()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        for step, (image, frames, labels, _) in enumerate(loader):
            if cfg.max_steps_per_epoch and step >= cfg.max_steps_per_epoch:
                break
            labels = labels.to(device)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                logits = net(to_input(image), to_input(frames) if mcfg.variant != "xception" else None)
                loss = F.cross_entropy(logits.float(), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            seen += len(labels)
            loss_sum += float(loss.detach()) * len(labels)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        record = {"epoch": epoch, "lr": lr_at(epoch, cfg), "train_loss": loss_sum / max(seen, 1),
                  "train_clips": seen, "seconds": round(seconds, 2),
                  "clips_per_s": round(seen * world / seconds, 1) if seconds else None}
        if device.type == "cuda":  # this process's peak over the epoch's training steps
            record["cuda_peak_memory_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        if rank == 0:
            if val_videos:
                preds = predict(model, val_videos, device)
                m = frame_and_video(preds)
                record["val"] = m
                record["val_loss"] = val_loss(preds)
                if m["video"]["n"] > 2 and not math.isnan(m["video"]["auc"]):
                    by, score = "val video AUC", m["video"]["auc"]
                elif not math.isnan(m["frame"]["auc"]):
                    by, score = "val frame AUC", m["frame"]["auc"]
                else:  # one class: no AUC; the loss still says which epoch fits the held-out clips best
                    by, score = "val loss", -record["val_loss"]
            else:
                by, score = "train loss", -record["train_loss"]
            improved = score > best or best_by is None
            if improved:
                best, best_by, best_epoch = score, by, epoch
            prov = {"data": cfg.data, "epochs": epoch + 1, "metrics": record.get("val"), "init": init,
                    "train_state": {"epoch": epoch, "best": best, "best_by": best_by, "best_epoch": best_epoch,
                                    "init": init, "config": dataclasses.asdict(cfg)}}
            extra = {**_optimizer_tensors(opt, params), "rng.torch": torch.get_rng_state()}
            save_checkpoint(model, last, untrained=False, provenance=prov, extra_tensors=extra)
            if improved:
                save_checkpoint(model, out / "best.safetensors", untrained=False, provenance=prov)
            try:
                with open(metrics_log, "a") as f:
                    f.write(json_line(record) + "\n")
            except OSError as exc:
                raise OutputError(f"{metrics_log}: writing failed ({io_reason(exc, out)}); free some space, then "
                                  "continue with --resume (this epoch's checkpoint is written)") from None
            log(record)
        history.append(record)
        if world > 1:
            torch.distributed.barrier()
    if best_by is None:
        return {"epochs": history, "best": None, "out": str(out)}
    value = -best if best_by.endswith("loss") else best
    return {"epochs": history, "best": {"by": best_by, "value": round(value, 6), "epoch": best_epoch},
            "out": str(out)}


def val_loss(preds) -> float:
    """Mean cross-entropy of the validation clips' P(fake) (what training minimises)."""
    p = np.clip(np.array([r[2] for r in preds], float), 1e-7, 1 - 1e-7)
    y = np.array([r[1] for r in preds])
    return float(np.mean(-np.log(np.where(y == 1, p, 1 - p)))) if len(p) else float("nan")


def evaluate(checkpoint: str, videos: list[CachedVideo], device: str = "auto", by_method: bool = True) -> dict:
    """Frame- and video-level metrics of a checkpoint, overall and per manipulation method (each
    method's fakes against all reals). ``result["scores"]`` holds one record per video (see
    ``video_scores``); the CLI writes them with ``--scores`` and leaves them out of ``--json``."""
    from .scan import pick_device

    from .hashing import sha256_file

    dev = pick_device(device)
    model, info = load_checkpoint(checkpoint, dev)
    records = predict(fold_batchnorm(model), videos, dev)
    result = {"checkpoint": checkpoint, "model": info.name, "license": info.license, "variant": info.variant,
              "sha256": sha256_file(checkpoint), "untrained": info.untrained,
              "metrics": "scikit-learn: roc_auc_score, average_precision_score; EER at the ROC crossing",
              "overall": frame_and_video(records)}
    if by_method:
        method = {v.key: v.method for v in videos}
        fakes = sorted({v.method for v in videos if v.label == 1})
        if len(fakes) > 1:
            result["methods"] = {
                m: frame_and_video([r for r in records if method[r[0]] in (m,) or r[1] == 0]) for m in fakes
            }
    result["scores"] = video_scores(records, videos)
    return result


def video_scores(records, videos: list[CachedVideo]) -> list[dict]:
    """One record per evaluated video: ``{"video", "method", "label", "score", "frame_scores"}``;
    the score is the mean of the frame scores (paper), the method the FF++ manipulation of a fake
    (null for reals and other data sets)."""
    from .data import FFPP_METHODS

    keys, labels, frames = by_video(records)
    method = {v.key: v.method for v in videos}
    known = set(FFPP_METHODS) | {"DeepFakeDetection", "FaceShifter"}
    return [{"video": k, "method": method.get(k) if method.get(k) in known else None, "label": labels[k],
             "score": float(np.mean(frames[k])), "frame_scores": [float(x) for x in frames[k]]} for k in keys]
