"""The start-up bench's import breakdown (deepscan bench --startup), on the fast --help path."""

import os

from deepscan.startup import deepscan_cmd, import_breakdown


def test_import_breakdown_reads_importtime_and_help_loads_no_model_runtime():
    out = import_breakdown([*deepscan_cmd(), "--help"], dict(os.environ))
    assert out["total_import_s"] > 0
    assert "typer" in out["by_package_s"] and "deepscan.cli" in out["by_package_s"]
    assert {"torch", "timm", "torchvision", "starlette", "uvicorn"} <= set(out["not_imported"])
    assert "openvino" not in out["by_package_s"]
