"""deepscan: deepfake video detection with spatial-temporal long-distance attention."""

import os as _os

__version__ = "0.1.0"

# onnxruntime (1.29 and later) sends telemetry from Linux too: it writes a persistent device id
# under the cache folder and queues session events for upload unless this, its documented switch,
# is set before it loads. Set here, before anything of deepscan can import it; the preparation
# workers inherit it. OpenVINO's telemetry is kept out in scan.score_openvino.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
