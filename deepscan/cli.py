"""The typer command line. Commands are thin: parse, call one library function, render.

``deepscan PATH...`` with no command name means ``deepscan scan PATH...`` (see ``main``).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import __version__
from .errors import NO_ROOM, ConfigError, DeepscanError, WeightsError
from .output import debug_enabled, emit_json, json_line, notice, printable, shown, stdout_console

app = typer.Typer(
    name="deepscan",
    help="Tell whether the faces in a video are deepfakes (spatial-temporal long-distance attention, Lu et al. 2023).",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
weights_app = typer.Typer(help="List, download, verify, create and publish checkpoints.", no_args_is_help=True)
app.add_typer(weights_app, name="weights")

VariantOpt = Annotated[
    str,
    typer.Option("--variant", "-v", help="Model variant: xception, spatial, temporal or spatial-temporal."),
]


def friendly(fn):
    """Turn DeepscanError into one line on stderr and its exit code (traceback under DEEPSCAN_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DeepscanError as exc:
            if debug_enabled():
                raise
            notice(f"deepscan: error: {exc}")
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            import signal

            # everything complete is written by now: a further Ctrl-C must not cut the exit short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            code = exc.code if isinstance(exc, Terminated) else 130
            notice({143: "deepscan: terminated", 129: "deepscan: hung up"}.get(code, "deepscan: interrupted"))
            raise typer.Exit(code) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        print(f"deepscan {__version__}")
        raise typer.Exit(0)


@app.callback()
def root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = None,
) -> None:
    """Scan videos for deepfaked faces. `deepscan VIDEO_OR_FOLDER...` is short for `deepscan scan ...`."""
    from .errors import show_warnings_escaped

    show_warnings_escaped()  # every command: a library's warning is one escaped line


# ---------------------------------------------------------------------------- scan
def writable_folder(path: Path, option: str) -> Path:
    """Create ``path`` if needed and check that files can be written into it: a misuse error
    (exit 2) before any scanning, never a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ConfigError(f"{option} {path}: exists and is not a folder; give a folder path") from None
    except NotADirectoryError:
        raise ConfigError(f"{option} {path}: a part of the path is a file, not a folder; give another path") from None
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create it ({exc.strerror}); give a writable folder") from None
    if not path.is_dir():
        raise ConfigError(f"{option} {path}: not a folder; give a folder path")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: not writable (read-only file system or permissions); "
                          "give a writable folder")
    return path


def writable_file(path: Path, option: str) -> Path:
    """A file the command will write: its folder must exist (or be creatable) and it must not be
    a folder itself. A misuse error (exit 2) before any work, never a traceback."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name")
    writable_folder(path.parent if str(path.parent) else Path("."), option)
    return path


def report_target(path: Path, option: str) -> Path:
    """An HTML file to (over)write: its folder must exist and take files; an existing non-HTML
    file is never overwritten (a typo must not cost a file)."""
    if path.is_dir():
        raise ConfigError(f"{option} {path}: is a folder; give a file name such as report.html")
    if path.exists() and path.suffix.lower() not in (".html", ".htm"):
        raise ConfigError(f"{option} {path}: exists and is not an .html file; give a new name ending in .html")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ConfigError(f"{option} {path}: the folder {folder} does not exist; create it or give another path")
    if not os.access(folder, os.W_OK):
        raise ConfigError(f"{option} {path}: cannot write into {folder}; give a writable path")
    return path


def existing_file(path: Path, option: str, what: str = ".safetensors file") -> Path:
    """A file the command reads: it must exist and be a regular file (not a folder, a FIFO that
    would block, or a device such as /dev/zero that never ends)."""
    import stat

    try:
        st = path.stat()
    except FileNotFoundError:
        raise WeightsError(f"{option} {path}: not found; pass an existing {what}") from None
    except OSError as exc:
        raise WeightsError(f"{option} {path}: cannot be read ({exc.strerror})") from None
    if stat.S_ISDIR(st.st_mode):
        raise WeightsError(f"{option} {path}: is a folder; pass a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{option} {path}: not a regular file (a FIFO or a device); pass a {what}")
    return path


class Terminated(KeyboardInterrupt):
    """SIGTERM: handled like Ctrl-C (stop taking inputs, keep what is complete), exit 143."""

    code = 143


class HungUp(Terminated):
    """SIGHUP (a closed terminal, a dropped ssh): as SIGTERM, exit 129."""

    code = 129


def _sigterm(signum, frame):
    import signal

    raise HungUp() if signum == signal.SIGHUP else Terminated()


# ---------------------------------------------------------------------------- options scan and serve share
ThresholdOpt = Annotated[float, typer.Option(help="Score at or above which a video is called fake.")]
ClipsOpt = Annotated[int, typer.Option("--clips", "--frames", help="Clips sampled per video, spread evenly.")]
DetectorOpt = Annotated[str, typer.Option(help="Face detector: auto, scrfd, dlib or blazeface (MediaPipe BlazeFace, batched; see README).")]
DeviceOpt = Annotated[str, typer.Option(help="auto (every GPU, else CPU), cpu, cuda (every GPU), cuda:N or a list cuda:0,cuda:2.")]
PrecisionOpt = Annotated[str, typer.Option(help="auto, fp32, bf16 or fp16 (CUDA).")]
AggregateOpt = Annotated[str, typer.Option(help="Frame-to-track score: mean (paper), median or max.")]


@app.command()
@friendly
def scan(
    paths: Annotated[list[str], typer.Argument(help="Video files and/or folders (searched recursively).", show_default=False)],
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="A deepscan .safetensors checkpoint (default: the manifest's best published model, for --variant if given; fetched once).")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", "-v", help="Model variant: xception, spatial, temporal or spatial-temporal (default: the checkpoint's).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="JSON Lines on stdout, one object per input, nothing else.")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Append JSON Lines records to this file, one complete line per input, as each finishes.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Skip inputs that already have a record in --output (same path, size and mtime, or same sha256).")] = False,
    shard: Annotated[Optional[str], typer.Option("--shard", help="K/N: scan only part K of N of the inputs (stable across machines and runs).")] = None,
    heatmaps: Annotated[Optional[Path], typer.Option("--heatmaps", help="Write attention heatmap PNGs per video into this folder.")] = None,
    threshold: ThresholdOpt = 0.5,
    clips: ClipsOpt = 32,
    detector: DetectorOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Face clips per model batch, mixed across videos (default: 8 on CPU, 64 on CUDA).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Preparation worker processes (default: all cores but one on CPU, all cores with a GPU; 0 = a thread in this process).")] = None,
    timeout: Annotated[Optional[float], typer.Option("--timeout", help="Abandon an input whose preparation makes no progress for this many seconds (default 600; needs worker processes).")] = None,
    aggregate: AggregateOpt = "mean",
    glob: Annotated[Optional[str], typer.Option("--glob", help="In folders, take files matching this pattern (e.g. '*.mp4') instead of video extensions.")] = None,
    min_face: Annotated[int, typer.Option(help="Ignore faces smaller than this many pixels.")] = 24,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the sha256 of each input file.")] = False,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model first (15-40 s once; pays on long runs).")] = False,
    backend: Annotated[str, typer.Option(help="Model runtime: auto (OpenVINO on CPU when installed, else torch), torch or openvino (CPU).")] = "auto",
    report: Annotated[Optional[Path], typer.Option("--report", help="Write one self-contained HTML page of the results (timelines, thumbnails) when the scan ends.")] = None,
    preparation: Annotated[str, typer.Option("--preparation", help="Who detects and crops: auto (the workers, for now), workers, or device (workers only decode; BlazeFace, tracking and crops run batched on the model's device).")] = "auto",
    decoder: Annotated[str, typer.Option("--decoder", help="With --preparation device on a GPU: auto (NVDEC when it works here, else ffmpeg), ffmpeg, or nvdec (needs deepscan[nvdec]).")] = "auto",
    ray: Annotated[Optional[str], typer.Option("--ray", help="Scan on Ray: local (start one here), auto (the cluster of this environment) or ADDRESS; needs deepscan[ray].")] = None,
    server: Annotated[Optional[str], typer.Option("--server", help="Scan through a running `deepscan serve`: its socket PATH, http://HOST:PORT, or 'default' (env DEEPSCAN_SERVER); scans here, after one notice, when it is gone or runs another model or settings.")] = None,
) -> None:
    """Scan videos for deepfaked faces: a verdict per video (exit 0 none fake, 1 fake found, 2 errors)."""
    import signal

    from .scan.plan import parse_shard

    if weights is not None:  # before loading torch: a typo fails in a blink
        existing_file(weights, "--weights")
    from .scan.run import ScanRequest, run_scan
    from .scan import ScanSettings, default_batch_size, exit_code

    if workers is not None and workers < 0:
        raise ConfigError("--workers must be >= 0 (0: preparation in a thread of this process)")
    if timeout is not None and workers == 0:
        raise ConfigError("--timeout needs preparation worker processes (a thread cannot be stopped): "
                          "drop --workers 0 or drop --timeout")
    if batch_size is None:
        batch_size = default_batch_size(device)
    settings = ScanSettings(clips=clips, threshold=threshold, aggregation=aggregate, batch_size=batch_size,
                            min_face=min_face, hash_files=not no_hash, timeout_s=600.0 if timeout is None else timeout,
                            keep_crops=4 if heatmaps is not None else 0)
    if resume and output is None:
        raise ConfigError("--resume needs --output FILE (the records to resume from)")
    if glob is not None and not glob.strip():
        raise ConfigError("--glob needs a pattern such as '*.mp4' (it was empty)")
    if heatmaps is not None:
        writable_folder(heatmaps, "--heatmaps")
    if report is not None:
        report_target(report, "--report")
        if output is not None and report.resolve() == output.resolve():
            raise ConfigError(f"--report {report}: the same file as --output; give the page another name")
    request = ScanRequest(paths=tuple(paths), weights=weights, variant=variant, settings=settings, device=device,
                          precision=precision, workers=workers, detector=detector, glob=glob,
                          shard=parse_shard(shard) if shard is not None else (1, 1), output=output, resume=resume,
                          heatmaps=heatmaps, compile=compile_model, backend=backend, report=report,
                          json_out=json_out, ray=ray, preparation=preparation, decoder=decoder)
    previous = signal.signal(signal.SIGTERM, _sigterm)
    previous_hup = signal.signal(signal.SIGHUP, _sigterm)  # a closed terminal: the report is still written
    server = server if server is not None else os.environ.get("DEEPSCAN_SERVER") or None
    try:
        outcome = None
        if server is not None:
            from .service.client import scan_via

            outcome = scan_via(server, request, say=notice)  # None: it said why, and the scan runs here
        if outcome is None:
            outcome = run_scan(request, say=notice)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGHUP, previous_hup)
    if not json_out:
        from .report import results_table

        console = stdout_console()
        console.print(results_table(outcome.sink.rows, outcome.info, outcome.detector, threshold, aggregate,
                                    sha256=outcome.sha256, width=console.width))
    if report is not None:
        from .html_report import write_report

        notes = ["the scan was interrupted: the page shows the inputs finished before"] if outcome.interrupted else []
        notice(f"report: {printable(str(write_report(outcome.sink.items, report, notes=notes)))}")
    if outcome.interrupted is not None:
        raise outcome.interrupted
    raise typer.Exit(exit_code(outcome.sink.verdicts))


@app.command()
@friendly
def serve(
    weights: Annotated[Optional[Path], typer.Option("--weights", "-w", help="The checkpoint to hold loaded (default: the manifest's best published model).")] = None,
    variant: Annotated[Optional[str], typer.Option("--variant", "-v", help="Model variant (default: the checkpoint's).")] = None,
    socket_path: Annotated[Optional[Path], typer.Option("--socket", help="The Unix socket, mode 0600 (default: $XDG_RUNTIME_DIR/deepscan.sock).")] = None,
    http: Annotated[Optional[int], typer.Option("--http", help="Also serve HTTP on this TCP port (127.0.0.1 unless --host; 0: any free port).")] = None,
    host: Annotated[str, typer.Option("--host", help="The address --http binds; other than loopback it needs a token.")] = "127.0.0.1",
    token_file: Annotated[Optional[Path], typer.Option("--token-file", help="A file holding the token HTTP clients must send (Authorization: Bearer TOKEN); or DEEPSCAN_TOKEN.")] = None,
    max_upload: Annotated[int, typer.Option("--max-upload", help="The largest video upload taken, in MB.")] = 4096,
    status: Annotated[bool, typer.Option("--status", help="Say whether a service is ready at --socket (exit 0) or not (exit 1), and stop.")] = False,
    stop: Annotated[bool, typer.Option("--stop", help="Drain and stop the service at --socket, and wait for it to end.")] = False,
    threshold: ThresholdOpt = 0.5,
    clips: ClipsOpt = 32,
    detector: DetectorOpt = "auto",
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    batch_size: Annotated[Optional[int], typer.Option(help="Face clips per model batch, mixed across requests (default: 8 on CPU, 64 on CUDA).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Preparation worker processes (default: as scan picks).")] = None,
    timeout: Annotated[float, typer.Option("--timeout", help="Abandon an input whose preparation makes no progress for this many seconds.")] = 600.0,
    aggregate: AggregateOpt = "mean",
    min_face: Annotated[int, typer.Option(help="Ignore faces smaller than this many pixels.")] = 24,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the sha256 of each input file.")] = False,
    backend: Annotated[str, typer.Option(help="Model runtime: auto, torch or openvino (CPU).")] = "auto",
    preparation: Annotated[str, typer.Option("--preparation", help="auto, workers or device.")] = "auto",
    decoder: Annotated[str, typer.Option("--decoder", help="auto, ffmpeg or nvdec.")] = "auto",
) -> None:
    """Hold the model, detector and workers loaded behind a local socket, for `deepscan scan --server` and HTTP clients (docs/service.md)."""
    from .service.client import Door, default_socket, status as service_status

    door = Door(socket=str(socket_path or default_socket()))
    if status or stop:
        if status and stop:
            raise ConfigError("--status and --stop: give one of them")
        if stop:
            from .service.server import stop as stop_service

            raise typer.Exit(stop_service(door, say=lambda line: stdout_console().print(line, markup=False, highlight=False)))
        ready, line = service_status(door)
        stdout_console().print(line, markup=False, highlight=False)
        raise typer.Exit(0 if ready else 1)
    if weights is not None:
        existing_file(weights, "--weights")
    if workers is not None and workers < 0:
        raise ConfigError("--workers must be >= 0 (0: preparation in a thread of the service)")
    if max_upload < 1:
        raise ConfigError("--max-upload must be at least 1 (MB)")
    token = os.environ.get("DEEPSCAN_TOKEN") or None
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip() or None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--token-file {token_file}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    from .scan import ScanSettings, default_batch_size
    from .scan.run import ScanRequest
    from .service.server import Doors, serve as run_service

    settings = ScanSettings(clips=clips, threshold=threshold, aggregation=aggregate,
                            batch_size=batch_size or default_batch_size(device), min_face=min_face,
                            hash_files=not no_hash, timeout_s=timeout, keep_crops=0)
    request = ScanRequest(paths=(), weights=weights, variant=variant, settings=settings, device=device,
                          precision=precision, workers=workers, detector=detector, backend=backend,
                          preparation=preparation, decoder=decoder, json_out=True)
    doors = Doors(Path(door.socket), http, host, token, max_upload << 20)
    raise typer.Exit(run_service(request, doors, say=notice))


# ---------------------------------------------------------------------------- data: prepare, train, eval
DataOpt = Annotated[Path, typer.Option("--data", help="Data set root: FaceForensics++, Celeb-DF v2, or real/ + fake/ folders.")]
LayoutOpt = Annotated[str, typer.Option(help="auto, ffpp, celebdf or folders.")]
CompressionOpt = Annotated[str, typer.Option(help="FF++ compression: c23, c40 or raw.")]
MethodsOpt = Annotated[str, typer.Option(help="FF++ manipulation methods, comma-separated.")]
SplitsOpt = Annotated[Optional[Path], typer.Option(help="Folder with FF++ train.json/val.json/test.json (default: data root).")]
CacheOpt = Annotated[Optional[Path], typer.Option(help="Face-clip cache folder (default: DATA/.deepscan-cache).")]
ClipsOpt = Annotated[int, typer.Option("--clips", help="Evenly spaced clips per video.")]
DetectorOpt = Annotated[str, typer.Option(help="Face detector: auto, scrfd, dlib or blazeface (MediaPipe BlazeFace, batched; see README).")]


def _dataset(data, layout, compression, methods, splits, seed=0):
    from .data import load_dataset

    return load_dataset(data, layout, compression=compression,
                        methods=[m.strip() for m in methods.split(",") if m.strip()], splits_dir=splits, seed=seed)


def _prepare(items, data: Path, cache, clips, detector, image_size, lda_size, num_frames, quiet=False, ray=None,
             workers: int | None = None, margin: float | None = None, alignment: str = "none"):
    from .faces import resolve_detector
    from .output import progress
    from .prepare import PrepareSettings, check_cache, is_done, prepare, recorded_detector
    from .scan.workers import cpu_count

    cache = writable_folder(cache or data / ".deepscan-cache", "--cache")
    from .config import CROP_MARGIN

    settings = PrepareSettings(image_size=image_size, lda_size=lda_size, clip_len=num_frames, clips=clips,
                               margin=CROP_MARGIN if margin is None else margin, alignment=alignment)
    if workers is not None and workers < 0:
        raise ConfigError(f"--workers {workers}: give 0 (this process only) or more")
    check_cache(cache, settings)  # also when every video is cached already
    todo = [i for i in items if not is_done(cache, i)]
    if todo:
        made_with = recorded_detector(cache)
        if detector == "auto" and made_with:  # a cache goes on with the detector it was begun with
            detector = made_with
        spec = resolve_detector(detector, say=notice)
        with progress(len(items), "preparing face clips", enabled=not quiet) as advance:
            if ray:
                from . import prepare_ray
                from .scan import cluster

                resources = cluster.connect(ray)
                notice(f"ray: {int(resources.get('CPU', 0))} CPU(s) in the cluster prepare {len(todo)} video(s)")
                counts = prepare_ray.prepare(items, cache, spec, settings, advance)
            else:
                # every core by default: nothing else runs while a cache is made
                workers = min(cpu_count() if workers is None else workers, len(todo))
                counts = prepare(items, cache, spec if workers else spec.build(), settings, advance, workers=workers,
                                 say=lambda m: notice(f"warning: {m}"))
        notice(f"prepared {counts['prepared']} video(s) into {printable(str(cache))} ({counts['done_before']} done "
               f"before, {counts['no_face']} without faces, {counts['errors']} failed)")
    return cache


FFPP_DEFAULT_METHODS = "Deepfakes,Face2Face,FaceSwap,NeuralTextures"


@app.command()
@friendly
def prepare(
    data: DataOpt,
    layout: LayoutOpt = "auto",
    compression: CompressionOpt = "c23",
    methods: MethodsOpt = FFPP_DEFAULT_METHODS,
    splits: SplitsOpt = None,
    cache: CacheOpt = None,
    clips: ClipsOpt = 32,
    detector: DetectorOpt = "auto",
    image_size: Annotated[int, typer.Option(help="Backbone crop size.")] = 398,
    lda_size: Annotated[int, typer.Option(help="LDA crop size.")] = 224,
    num_frames: Annotated[int, typer.Option("--frames-per-clip", help="n consecutive frames per clip.")] = 3,
    ray: Annotated[Optional[str], typer.Option("--ray", help="Prepare on Ray: local, auto or ADDRESS (the cache must be on storage every node sees); needs deepscan[ray].")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Processes preparing videos side by side (default: every core; 0 = this process only).")] = None,
) -> None:
    """Extract face clips of every video once into a cache (resumable; train and eval do it too)."""
    kind, items = _dataset(data, layout, compression, methods, splits)
    notice(f"{kind}: {len(items)} videos")
    _prepare(items, data, cache, clips, detector, image_size, lda_size, num_frames, ray=ray, workers=workers)


@app.command()
@friendly
def train(
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints and metrics.jsonl.")] = Path("runs/deepscan"),
    variant: VariantOpt = "spatial-temporal",
    layout: LayoutOpt = "auto",
    compression: CompressionOpt = "c23",
    methods: MethodsOpt = FFPP_DEFAULT_METHODS,
    splits: SplitsOpt = None,
    cache: CacheOpt = None,
    clips: ClipsOpt = 32,
    detector: DetectorOpt = "auto",
    epochs: Annotated[int, typer.Option(help="Epochs (paper: 20).")] = 20,
    batch_size: Annotated[int, typer.Option(help="Batch size (paper: 32).")] = 32,
    lr: Annotated[float, typer.Option(help="Initial learning rate (paper: 3e-4).")] = 3e-4,
    lr_step: Annotated[int, typer.Option(help="Halve the learning rate every this many epochs (paper: 5).")] = 5,
    momentum: Annotated[float, typer.Option(help="SGD momentum (paper: 0.9).")] = 0.9,
    weight_decay: Annotated[float, typer.Option(help="SGD weight decay (paper: none).")] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes.")] = 2,
    no_balance: Annotated[bool, typer.Option("--no-balance", help="Do not rebalance real and fake clips.")] = False,
    no_augment: Annotated[bool, typer.Option("--no-augment", help="No flips or colour jitter.")] = False,
    self_blend: Annotated[float, typer.Option(help="Probability that a real clip becomes a self-blended pseudo-fake (0 = off; --self-blend 0.5 as in SBI).")] = 0.0,
    vit_init: Annotated[str, typer.Option(help="LDA embeddings: imagenet (timm ViT-B/16 from the Hub), random, or a .safetensors path.")] = "imagenet",
    backbone_init: Annotated[str, typer.Option(help="Backbone: random (the paper's), a published model such as xception-ffpp-c23 (FF++-trained Xception), or a deepscan .safetensors checkpoint.")] = "random",
    num_maps: Annotated[int, typer.Option("--maps", help="m attention maps (Table IX).")] = 4,
    num_frames: Annotated[int, typer.Option("--frames-per-clip", help="n consecutive frames (Table X).")] = 3,
    recalibration: Annotated[str, typer.Option(help="multiply (paper: f*a) or residual (f*(1+a)).")] = "multiply",
    image_size: Annotated[int, typer.Option(help="Backbone input size.")] = 398,
    lda_size: Annotated[int, typer.Option(help="LDA input size.")] = 224,
    max_steps: Annotated[int, typer.Option(help="Stop each epoch after this many steps (0 = full epochs; for smoke tests).")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last finished epoch.")] = False,
) -> None:
    """Train a detector with the paper's protocol (section V-A); run under torchrun for several GPUs."""
    import dataclasses

    from .prepare import load_cache
    from .train import TrainConfig, train as run_train

    # the options are checked before any video is prepared
    cfg = TrainConfig(out=str(out), variant=variant, epochs=epochs, batch_size=batch_size, lr=lr, lr_step=lr_step,
                      momentum=momentum, weight_decay=weight_decay, seed=seed, workers=workers, balance=not no_balance,
                      augment=not no_augment, self_blend=self_blend, vit_init=vit_init, backbone_init=backbone_init,
                      num_maps=num_maps,
                      num_frames=num_frames, recalibration=recalibration, image_size=image_size, lda_size=lda_size,
                      max_steps_per_epoch=max_steps, device=device,
                      data={"root": str(data), "compression": compression, "methods": methods})
    writable_folder(out, "--out")
    if backbone_init != "random":
        from .weights import load_manifest

        if backbone_init not in {e.name for e in load_manifest().models()}:
            existing_file(Path(backbone_init), "--backbone-init", "published model name (see `deepscan weights list`), "
                                                               "random, or .safetensors checkpoint")
    rank = int(os.environ.get("RANK", "0"))
    kind, items = _dataset(data, layout, compression, methods, splits, seed)
    if rank == 0:
        notice(f"{kind}: {len(items)} videos")
        cache = _prepare([i for i in items if i.split in ("train", "val")], data, cache, clips, detector,
                         image_size, lda_size, num_frames)
    else:
        cache = cache or data / ".deepscan-cache"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from .train import _dist

        _dist()
        import torch.distributed

        torch.distributed.barrier()  # the other ranks wait for rank 0's prepare
    train_v = load_cache(cache, [i for i in items if i.split == "train"])
    val_v = load_cache(cache, [i for i in items if i.split == "val"])
    cfg = dataclasses.replace(cfg, data={**cfg.data, "layout": kind})
    result = run_train(cfg, train_v, val_v, resume=resume,
                       log=lambda r: notice(json_line(r)) if rank == 0 else None)
    if rank == 0:
        emit_json({"out": result["out"], "best": result["best"], "epochs": len(result["epochs"])})


@app.command("eval")
@friendly
def evaluate(
    data: DataOpt,
    weights: Annotated[Path, typer.Option("--weights", "-w", help="The checkpoint to evaluate.")],
    split: Annotated[str, typer.Option(help="train, val or test.")] = "test",
    layout: LayoutOpt = "auto",
    compression: CompressionOpt = "c23",
    methods: MethodsOpt = FFPP_DEFAULT_METHODS,
    splits: SplitsOpt = None,
    cache: CacheOpt = None,
    clips: ClipsOpt = 32,
    detector: DetectorOpt = "auto",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda.")] = "auto",
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False,
    scores: Annotated[Optional[Path], typer.Option("--scores", help="Write one JSON line per video (label, score, frame scores) to this file.")] = None,
    plots: Annotated[Optional[Path], typer.Option("--plots", help="Write ROC curves and score histograms (PNG) into this folder.")] = None,
) -> None:
    """Frame- and video-level ACC/AUC/AP/EER of a checkpoint on a data set split, beside the paper."""
    from .checkpoint import read_info
    from .prepare import load_cache
    from .train import evaluate as run_eval

    existing_file(weights, "--weights")
    if plots is not None:
        writable_folder(plots, "--plots")
    if scores is not None:
        writable_file(scores, "--scores")
    info = read_info(weights)
    kind, items = _dataset(data, layout, compression, methods, splits)
    items = [i for i in items if i.split == split]
    if not items:
        raise ConfigError(f"{data}: no videos in the {split!r} split")
    pre = info.preprocessing
    cache = _prepare(items, data, cache, clips, detector, pre["image_size"], pre["lda_size"],
                     max(pre["clip_len"], info.config.num_frames), quiet=json_out, margin=info.crop_margin,
                     alignment=info.alignment)  # the checkpoint's own crops (the published Xception: aligned)
    videos = load_cache(cache, items)
    if not videos:
        raise ConfigError(f"{data}: none of the {len(items)} video(s) of the {split!r} split has a usable face clip "
                          "(see the prepare summary above); nothing to evaluate")
    result = run_eval(str(weights), videos, device)
    result.update({"data": str(data), "layout": kind, "split": split, "compression": compression})
    per_video = result.pop("scores")
    # the metrics first: a --scores or --plots place that fails (a full disk) must not take them along
    if json_out:
        emit_json(result)
    else:
        from .output import warn_untrained
        from .report import eval_table

        stdout_console().print(eval_table(result))
        if info.untrained:
            warn_untrained(str(weights))
    if scores is not None:
        from .output import write_lines

        write_lines(scores, per_video)
        notice(f"wrote {len(per_video)} video score(s) to {printable(str(scores))}")
    if plots is not None:
        from .plots import write_plots

        title = f"{info.variant} on {kind} {split}" + (" (UNTRAINED)" if info.untrained else "")
        written = write_plots(per_video, plots, title)
        notice(f"wrote {len(written)} plot(s) to {printable(str(plots))}")


# ---------------------------------------------------------------------------- bench
def _bench_startup(json_out: bool, workdir: Optional[Path], repeats: int, clients: int, clips: int,
                   extra: list[str]) -> None:
    import tempfile

    from .startup import startup_bench

    work = Path(workdir or tempfile.mkdtemp(prefix="deepscan-startup-"))
    r = startup_bench(work, repeats=repeats, clients=clients, clips=clips, say=notice, extra=extra)
    if json_out:
        emit_json({"startup": r})
        return
    from rich.table import Table

    console = stdout_console()
    t = Table(title=f"One {r['video']['size']} {r['video']['seconds']} s video, {clips} clips, "
                    f"backend {r['backend']} (medians of {repeats})")
    for col in ("how", "wall s", "timings.total_s", "wall / total", "target"):
        t.add_column(col, justify="left" if col == "how" else "right")
    f, c, s = r["first_run"], r["cold_cli"], r["service"]
    t.add_row("first cold scan (converts)", f"{f['wall_s']:.2f}", f"{f['total_s']:.2f}", f"{f['wall_over_total']:.2f}", "")
    t.add_row("cold scan, cached model", f"{c['median_wall_s']:.2f}", f"{c['median_total_s']:.2f}",
              f"{c['median_wall_over_total']:.2f}", "<= 1.50 " + ("met" if r["targets"]["cold_cli_met"] else "NOT MET"))
    t.add_row("scan --server (warm)", f"{s['median_wall_s']:.2f}", f"{c['median_total_s']:.2f} (local)",
              f"{s['median_wall_over_local_total']:.2f}",
              f"<= {s['target_s']:.2f} s " + ("met" if r["targets"]["service_met"] else "NOT MET"))
    console.print(t)
    imp = r["imports"]
    console.print(f"Imports of a cold scan: {imp['total_import_s']:.2f} s; "
                  + ", ".join(f"{k} {v:.2f}" for k, v in list(imp["by_package_s"].items())[:8])
                  + f"; never imported: {', '.join(imp['not_imported']) or '-'}", highlight=False)
    cc, fl, fs = r["concurrent_clients"], r["folder_local"], r["folder_via_service"]
    console.print(f"{cc['clients']} clients at once through the service: {cc['clips_per_s']:.1f} clips/s "
                  f"({cc['over_folder_local']:.2f}x one local folder scan of the same videos, {fl['clips_per_s']:.1f}); "
                  f"that folder by one client through the service: {fs['clips_per_s']:.1f} clips/s; records equal "
                  f"to a local scan's: {'yes' if s['records_identical_to_local'] else 'NO'}", highlight=False)


@app.command()
@friendly
def bench(
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of tables.")] = False,
    image_size: Annotated[int, typer.Option(help="Backbone input size.")] = 398,
    lda_size: Annotated[int, typer.Option(help="LDA input size.")] = 224,
    throughput: Annotated[bool, typer.Option("--throughput", help="Also measure clips/s, end-to-end scan time and peak memory (minutes).")] = False,
    device: Annotated[str, typer.Option(help="Throughput device: auto, cpu, cuda.")] = "auto",
    variants: Annotated[str, typer.Option(help="Throughput variants, comma-separated.")] = "xception,spatial,temporal,spatial-temporal",
    batch_size: Annotated[int, typer.Option(help="Throughput batch size (default: 8 on CPU, 128 on CUDA).")] = 0,
    clips: Annotated[int, typer.Option(help="Clips sampled per video in the end-to-end runs.")] = 32,
    workdir: Annotated[Optional[Path], typer.Option(help="Where to keep the generated benchmark videos.")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="Also measure the spatial-temporal fast path under torch.compile.")] = False,
    workers: Annotated[Optional[int], typer.Option("--workers", help="Preparation workers for the end-to-end runs (default: as a scan picks).")] = None,
    backend: Annotated[str, typer.Option(help="Model runtime of the end-to-end runs: auto, torch or openvino (torch and OpenVINO are measured side by side either way).")] = "auto",
    startup: Annotated[bool, typer.Option("--startup", help="Measure start-up instead: a cold one-video scan's wall time beside its timings.total_s, its imports, the same through a warm `deepscan serve`, and concurrent clients beside a folder scan (minutes).")] = False,
    repeats: Annotated[int, typer.Option(help="--startup: cold and service scans of the one video.")] = 5,
    clients: Annotated[int, typer.Option(help="--startup: clients scanning at once through the service.")] = 4,
) -> None:
    """Parameters and GMACs of every variant beside the paper's Table VII; with --throughput, speed and memory."""
    if batch_size < 0 or clips < 1 or (workers is not None and workers < 0) or repeats < 1 or clients < 1:
        raise ConfigError("bench: --batch-size must be >= 0 (0: the default), --clips, --repeats and --clients >= 1 "
                          "and --workers >= 0")
    if workdir is not None:
        writable_folder(workdir, "--workdir")
    if startup:
        return _bench_startup(json_out, workdir, repeats, clients, clips,
                              ([] if backend == "auto" else ["--backend", backend])
                              + ([] if workers is None else ["--workers", str(workers)]))
    from .costs import PAPER_COSTS, measure_all

    costs = measure_all(image_size=image_size, lda_size=lda_size)
    perf = None
    if throughput:
        from .perf import run_all
        from .scan import pick_device

        dev = pick_device(device)
        precisions = ["fp32-nchw", "auto"] + (["fp16"] if dev.type == "cuda" else [])
        perf = run_all(dev, [v.strip() for v in variants.split(",") if v.strip()], precisions,
                       batch_size or (128 if dev.type == "cuda" else 8), clips, workdir, say=notice,
                       use_compile=compile_model, workers=workers, backend=backend)
    if json_out:
        emit_json({"costs": [c.to_json() for c in costs], **({"throughput": perf} if perf else {})})
        return
    from rich.table import Table

    table = Table(title=f"Model cost at {image_size}x{image_size} (LDA {lda_size}), paper Table VII beside")
    for col in ("variant", "params (M)", "paper (M)", "diff", "GMACs", "paper", "diff"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for c in costs:
        pg, pp = PAPER_COSTS[c.variant]
        table.add_row(c.variant, f"{c.params_m:.2f}", f"{pp:.2f}", f"{c.params_m - pp:+.2f}",
                      f"{c.gmacs:.2f}", f"{pg:.2f}", f"{c.gmacs - pg:+.2f}")
    console = stdout_console()
    console.print(table)
    base = costs[0]
    parts = Table(title="What each variant adds over the backbone")
    for col in ("variant", "patch proj.", "pos. emb.", "U, t", "1x1 conv", "total (M)", "paper (M)", "GMACs", "paper"):
        parts.add_column(col, justify="left" if col == "variant" else "right")
    for c in costs[1:]:
        pg, pp = PAPER_COSTS[c.variant]
        p = c.parts
        parts.add_row(
            c.variant, f"{p['patch_projections']:,}", f"{p['position_embeddings']:,}", f"{p['latent_spaces_U_t']:,}",
            f"{p['combine_1x1']:,}", f"{c.params_m - base.params_m:+.3f}", f"{pp - PAPER_COSTS['xception'][1]:+.2f}",
            f"{c.gmacs - base.gmacs:+.3f}", f"{pg - PAPER_COSTS['xception'][0]:+.2f}",
        )
    console.print(parts)
    console.print(
        "Backbone: timm legacy_xception with a 2-class head (20.81 M). The paper's 22.38 M equals it plus "
        "1.57 M, exactly a 2048x768 linear layer; see README 'Model cost'.",
        highlight=False,
    )
    if perf:
        speed = Table(title=f"Throughput on {perf.get('gpu', perf['device'])} ({perf['threads']} threads)")
        for col in ("variant", "precision", "batch", "clips/s", "x fp32 NCHW"):
            speed.add_column(col, justify="left" if col in ("variant", "precision") else "right")
        for m in perf["model"]:
            x = perf["speedup_over_fp32_nchw"].get(f"{m['variant']}/{m['precision']}")
            speed.add_row(m["variant"], m["precision"], str(m["batch"]), f"{m['clips_per_s']:.1f}", f"{x:.2f}" if x else "1.00")
        console.print(speed)
        if perf.get("backends"):
            lanes = Table(title="Model alone through the scan's CPU lanes: torch and OpenVINO, interleaved")
            for col in ("backend", "precision", "batch", "lanes", "clips/s", "start s (cold / warm)"):
                lanes.add_column(col, justify="left" if col in ("backend", "precision") else "right")
            for m in perf["backends"]:
                start = f"{m['cold_start_s']:.1f} / {m['warm_start_s']:.1f}" if "cold_start_s" in m else "-"
                lanes.add_row(m["backend"], m["precision"], str(m["batch"]), str(m["lanes"]), f"{m['clips_per_s']:.2f}",
                              start)
            console.print(lanes)
        e2e = Table(title=f"End to end, spatial-temporal, {perf['detector']} faces, {clips} clips per video")
        for col in ("video", "strategy", "face clips", "end to end s", "model only s", "ratio", "decode s", "detect+crop s"):
            e2e.add_column(col, justify="left" if col in ("video", "strategy") else "right")
        for r in perf["end_to_end"]:
            b = r["breakdown_s"]
            e2e.add_row(r["video"], str(r["strategy"]), str(r["face_clips"]), f"{r['end_to_end_s']:.2f}",
                        f"{r['model_only_s']:.2f}", f"{r['ratio']:.2f}", f"{b.get('decode_s', 0):.2f}",
                        f"{b.get('detect_crop_s', 0):.2f}")
        console.print(e2e)
        for d in perf["detectors"]:
            if d["available"]:
                console.print(f"detector {d['detector']}, batch {d.get('batch', 1)}: {d['frames_per_s']} frames/s on "
                              f"{d['frame_size']}, one thread (faces found in {d['frames_with_face']})", highlight=False)
            else:
                console.print(f"detector {d['detector']}: not available ({d['reason']})", highlight=False, markup=False)
        mem = perf["memory"]
        console.print(f"10 min / 10 s end-to-end time: {perf['long_over_short']:.2f}x; peak RSS scanning a 1-hour "
                      f"1080p video: {mem['peak_rss_mb']:.0f} MB ({mem['seconds']:.1f} s)", highlight=False)
        prep = Table(title=f"Preparation alone (model off), 16 x 720p videos, {perf['cores']} cores")
        for col in ("detector", "workers", "clips/s", f"x 1 {perf['detector']} worker"):
            prep.add_column(col, justify="left" if col == "detector" else "right")
        for row in perf["preparation"]:
            prep.add_row(row.get("detector", perf["detector"]), str(row["workers"]), f"{row['clips_per_s']:.1f}",
                         f"{row['x_one_worker']:.2f}")
        console.print(prep)
        f = perf["folder"]
        console.print(f"folder of {f['videos']} videos end to end ({f.get('backend', 'torch')}, {f['workers']} worker(s), "
                      f"batch {f['batch']}): "
                      f"{f['end_to_end_clips_per_s']:.2f} clips/s, model alone {f['model_only_clips_per_s']:.2f} "
                      f"({f['ratio_to_model_only']:.2f}x); peak RSS {f['peak_rss_mb']:.0f} MB", highlight=False)
        if perf.get("folder_device"):
            d = perf["folder_device"]
            console.print(f"the same folder prepared on {perf['device']} (workers decode): "
                          f"{d['end_to_end_clips_per_s']:.2f} clips/s end to end ({d['device_over_workers']:.2f}x the "
                          "workers' preparation)", highlight=False)
        if perf.get("folder_torch"):
            t = perf["folder_torch"]
            console.print(f"the same folder with torch: {t['end_to_end_clips_per_s']:.2f} clips/s end to end "
                          f"(OpenVINO {t['openvino_over_torch']:.2f}x)", highlight=False)


@app.command("report")
@friendly
def report_cmd(
    records: Annotated[list[Path], typer.Argument(help="JSON Lines files written by `deepscan scan --output` (several: a sharded or cluster run).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The HTML page to write.")],
    thumbs: Annotated[int, typer.Option("--thumbs", help="Cut thumbnails from the N highest-scoring face videos that can be read (0: none).")] = 200,
) -> None:
    """One self-contained HTML page from scan records, without the model: verdicts, a score
    timeline per face, thumbnails cut from the videos where they can be read."""
    from .html_report import read_records, write_report

    if thumbs < 0:
        raise ConfigError("--thumbs must be >= 0")
    for f in records:
        if not f.is_file():
            raise ConfigError(f"{f}: not a file; give the JSON Lines files `deepscan scan --output` wrote")
    report_target(out, "--out")
    for f in records:
        if out.exists() and os.path.samefile(f, out):
            raise ConfigError(f"--out {out}: is one of the records files; give the page another name")
    notes: list[str] = []
    items = read_records(records, say=notice, notes=notes)
    if not items:
        why = f" ({'; '.join(notes)})" if notes else ""
        raise ConfigError(f"{', '.join(map(str, records))}: no deepscan records in them{why}; give the files "
                          "`deepscan scan --output` wrote")
    notice(f"report: {printable(str(write_report(items, out, thumbs_for=thumbs, notes=notes, say=notice)))} "
           f"({len(items)} input(s))")


# ---------------------------------------------------------------------------- weights
@weights_app.command("init")
@friendly
def weights_init(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the .safetensors checkpoint.")],
    variant: VariantOpt = "spatial-temporal",
    seed: Annotated[int, typer.Option(help="Random seed for the initial weights.")] = 0,
    image_size: Annotated[int, typer.Option(help="Backbone input size.")] = 398,
    num_maps: Annotated[int, typer.Option("--maps", help="m, attention maps per component (Table IX).")] = 4,
    num_frames: Annotated[int, typer.Option("--frames-per-clip", help="n, consecutive frames (Table X).")] = 3,
    vit_init: Annotated[Optional[Path], typer.Option(help="A timm ViT-B/16 .safetensors file to initialise the LDA embeddings from.")] = None,
) -> None:
    """Write a randomly initialised checkpoint, marked untrained (for install checks and smoke tests)."""
    from .weights import init_checkpoint

    path = init_checkpoint(out, variant=variant, seed=seed, image_size=image_size,
                           num_maps=num_maps, num_frames=num_frames, vit_file=vit_init)
    notice(f"wrote {path} ({variant}, UNTRAINED: random weights, for smoke tests only)")



@weights_app.command("list")
@friendly
def weights_list(json_out: Annotated[bool, typer.Option("--json", help="Print JSON on stdout.")] = False) -> None:
    """The checkpoints and detector files in the manifest, and whether each is cached."""
    from .weights import cached, load_manifest

    manifest = load_manifest()
    rows = [{**e.to_json(), "cached": cached(e) is not None} for e in manifest.entries]
    if json_out:
        emit_json({"manifest": manifest.source, "entries": rows})
        return
    from rich.table import Table
    from rich.text import Text

    table = Table(title=Text(f"Weights manifest ({shown(manifest.source)})"), title_justify="left")
    for col in ("name", "kind", "variant", "cached", "size", "license", "metrics"):
        table.add_column(col, overflow="fold")
    for r, e in zip(rows, manifest.entries):
        metrics = _metrics_text(e.metrics)
        table.add_row(*(Text(shown(str(x))) for x in (r["name"], r["kind"], r["variant"] or "-", "yes" if r["cached"] else "no",
                                               e.size_text, r["license"], metrics)))
    stdout_console().print(table)
    if not manifest.models():
        notice("No trained checkpoint is published yet: train one (`deepscan train`) or pass --weights.")
    else:
        best = manifest.models()[0]
        notice(f"scans without --weights use {best.name} ({best.variant}; licence: {best.license})")


def _metrics_text(metrics: dict | None) -> str:
    """The figures of a metrics entry as 'key value' pairs, nested ones flattened ('frame_auc
    FF++ c23 0.9637'); its text (source, level) is in `weights list --json`."""
    parts = []
    for k, v in (metrics or {}).items():
        if isinstance(v, dict):
            parts += [f"{k} {k2} {v2}" for k2, v2 in v.items() if isinstance(v2, (int, float))]
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            parts.append(f"{k} {v}")
    if parts and isinstance((metrics or {}).get("source"), str):
        parts.append("reported (--json: source)")
    return ", ".join(parts) or "-"


@weights_app.command("import")
@friendly
def weights_import(
    source: Annotated[Path, typer.Argument(help="A checkpoint file of another project (a .pth pickle).", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="The deepscan .safetensors checkpoint to write.")],
    from_: Annotated[str, typer.Option("--from", help="The file's layout: deepfakebench (its Xception, e.g. xception_best.pth).")] = "deepfakebench",
) -> None:
    """Convert a checkpoint you already have into a deepscan checkpoint. The pickle is read with
    torch's tensors-only loader: anything but tensors is refused, and nothing in it runs."""
    from .weights import import_checkpoint, load_manifest

    existing_file(source, "FILE", ".pth file")
    writable_file(out, "--out")
    path, entry = import_checkpoint(source, out, fmt=from_, manifest=load_manifest())
    if entry is not None:
        notice(f"wrote {path}: {entry.name}, the published file (sha256 matches the manifest); licence: {entry.license}")
    else:
        notice(f"wrote {path} (xception, {from_} layout; not a file the manifest pins: its origin and licence are "
               "yours to know)")


@weights_app.command("download")
@friendly
def weights_download(
    names: Annotated[Optional[list[str]], typer.Argument(help="Entry names (see `weights list`).", show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Download every entry.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Fetch again even if cached (replaces a corrupt file).")] = False,
) -> None:
    """Download (and verify) manifest entries into the Hugging Face cache. A model published in
    another project's format is converted too: the path printed is the deepscan checkpoint (for
    --weights, eval, train --backbone-init)."""
    from .weights import converted, fetch, load_manifest

    manifest = load_manifest()
    if not names and not all_:
        raise typer.BadParameter("name one or more entries, or pass --all")
    entries = manifest.entries if all_ else [manifest.get(n) for n in names]
    for e in entries:
        path = fetch(e, force=force, say=notice)
        if e.format:
            path = converted(e, say=notice)[0]
        print(shown(str(path)))


@weights_app.command("verify")
@friendly
def weights_verify() -> None:
    """Check the sha256 of every cached manifest file (exit 2 if any is corrupt)."""
    from .errors import WeightsError
    from .weights import cached, load_manifest, verify

    bad = 0
    for e in load_manifest().entries:
        path = cached(e)
        if path is None:
            print(shown(f"{e.name}: not cached"))
            continue
        try:
            verify(path, e, fresh=False)
            print(shown(f"{e.name}: ok ({path})"))
        except WeightsError as exc:
            bad += 1
            print(shown(f"{e.name}: CORRUPT - {exc}"))
    if bad:
        raise typer.Exit(2)


@weights_app.command("publish")
@friendly
def weights_publish(
    checkpoint: Annotated[Path, typer.Argument(help="A trained deepscan .safetensors checkpoint.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub repository id, e.g. you/deepscan-ffpp.")],
    name: Annotated[Optional[str], typer.Option(help="Manifest entry name.")] = None,
    private: Annotated[bool, typer.Option(help="Create the repository private.")] = False,
) -> None:
    """Upload a checkpoint to the Hub and print the manifest entry that pins it (add it to weights_manifest.json)."""
    from .weights import publish

    emit_json(publish(checkpoint, repo, name=name, private=private))


COMMANDS = {"scan", "serve", "bench", "weights", "train", "eval", "prepare", "report"}
KNOWN_COMMANDS = COMMANDS | {"--help", "-h", "--version", "--install-completion", "--show-completion"}


def main(argv: list[str] | None = None) -> None:
    """Entry point: route `deepscan PATH...` to `deepscan scan PATH...`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS and os.path.exists(argv[0]):
        notice(f"note: {argv[0]!r} is a deepscan command; to scan the file or folder {argv[0]}, "
               f"run `deepscan scan {argv[0]}`")
    if argv and argv[0] not in KNOWN_COMMANDS and not argv[0].startswith("-"):
        argv.insert(0, "scan")
    elif argv and argv[0].startswith("-") and argv[0] not in KNOWN_COMMANDS:
        argv.insert(0, "scan")  # e.g. `deepscan --json video.mp4`
    _check_address_space()
    try:
        app(args=argv, prog_name="deepscan")
    except SystemExit as exc:
        if exc.code in (129, 130, 143):
            _exit_now(exc.code)
        raise
    except OSError as exc:
        # a write that failed outside a command (--help, --version into a full disk or /dev/full)
        if exc.errno not in (*NO_ROOM, errno.EIO) or debug_enabled():
            raise
        from .output import silence_stdout

        printed = {"--help", "-h", "--version", "--show-completion"} & set(argv)  # click writes these to stdout
        where = f"{exc.filename}: " if exc.filename else "standard output: " if printed else ""
        silence_stdout()  # Python's final flush would fail again
        notice(f"deepscan: error: {where}writing failed ({exc.strerror})")
        raise SystemExit(2) from None
    except KeyboardInterrupt as exc:  # a second Ctrl-C while the first one was being handled
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        code = 143 if isinstance(exc, Terminated) else 130
        notice("deepscan: terminated" if code == 143 else "deepscan: interrupted")
        _exit_now(code)
        raise SystemExit(code) from None


MIN_ADDRESS_SPACE = 6 << 30  # torch's CUDA build reserves ~4.5 GB of virtual memory as it loads


def _check_address_space() -> None:
    """Under a low ``ulimit -v`` torch dies while loading, in C++ (``std::bad_alloc``, an abort
    with no Python error): say so in one line before importing it."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < MIN_ADDRESS_SPACE:
        notice(f"deepscan: error: the address-space limit (ulimit -v) is {soft / 2**30:.1f} GB; deepscan needs "
               f"{MIN_ADDRESS_SPACE / 2**30:.0f} GB of virtual memory (torch reserves it as it loads, most of it "
               "never used); raise it with `ulimit -v unlimited` or `ulimit -v 8000000`")
        raise SystemExit(2)


def _exit_now(code: int) -> None:
    """After Ctrl-C or SIGTERM, leave without running C++ destructors under threads that may still
    be inside a native call (a model batch, a decoder): they would abort with "terminate called
    without an active exception". Everything complete has been written and flushed by now."""
    import threading

    ray = sys.modules.get("ray")
    if ray is not None:
        try:
            if ray.is_initialized():
                ray.shutdown()  # a `--ray local` runtime must not outlive us
        except Exception:  # noqa: BLE001 - leaving anyway
            pass
    if threading.active_count() > 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
