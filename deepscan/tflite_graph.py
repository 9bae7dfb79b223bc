"""A TensorFlow Lite graph run by torch: the weights and operators of a ``.tflite`` file, batched,
on any device, exportable to ONNX. For BlazeFace (MediaPipe's face detectors), whose only
distributed form is a ``.tflite`` file and whose runtime (TensorFlow, or LiteRT) runs one image
at a time on the CPU.

Why by hand: no maintained library converts a ``.tflite`` graph to torch (tflite2onnx stopped at
TF 2.x and onnx opset 13; onnx2torch starts from ONNX). The ``tflite`` package parses the
flatbuffer; this module maps the dozen operators BlazeFace uses onto torch functions and refuses
any other by name. Tensors run in NCHW; a tensor that leaves the 4-D world (RESHAPE) is turned
back to TFLite's NHWC order first, so reshapes mean what the graph meant.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import WeightsError

_ACTIVATIONS = {0: None, 1: F.relu, 3: F.relu6}  # ActivationFunctionType NONE, RELU, RELU6
_SAME, _VALID = 0, 1  # Padding


def _tf_same_pad(size: int, kernel: int, stride: int, dilation: int = 1) -> tuple[int, int]:
    """TensorFlow's SAME padding (before, after) along one axis: more after than before."""
    eff = (kernel - 1) * dilation + 1
    total = max((math.ceil(size / stride) - 1) * stride + eff - size, 0)
    return total // 2, total - total // 2


class TfliteGraph(nn.Module):
    """``forward(x)``: x is (B, H, W, C) float in the graph's input range; returns the graph's
    outputs, each with the batch dimension first (as TFLite lays them out)."""

    SUPPORTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "RELU", "ADD", "PAD", "MAX_POOL_2D", "RESHAPE",
                 "CONCATENATION", "RESIZE_BILINEAR", "DEQUANTIZE")

    def __init__(self, data: bytes, name: str = "model"):
        super().__init__()
        try:
            import tflite
        except ImportError:  # pragma: no cover - a dependency
            raise WeightsError("reading a .tflite file needs the 'tflite' package: pip install tflite") from None
        try:
            model = tflite.Model.GetRootAsModel(data, 0)
            graph = model.Subgraphs(0)
        except Exception as exc:  # noqa: BLE001 - flatbuffers raises assorted errors on garbage
            raise WeightsError(f"{name}: not a TensorFlow Lite model ({type(exc).__name__})") from None
        names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
        self._tflite = tflite
        self.input = graph.Inputs(0)
        self.outputs = [graph.Outputs(i) for i in range(graph.OutputsLength())]
        self.input_shape = tuple(int(v) for v in graph.Tensors(self.input).ShapeAsNumpy())  # (1, H, W, C)
        consts: dict[int, np.ndarray] = {}
        for t in range(graph.TensorsLength()):
            tensor = graph.Tensors(t)
            buf = model.Buffers(tensor.Buffer())
            if buf is not None and buf.DataLength():
                dtype = {0: np.float32, 1: np.float16, 2: np.int32, 4: np.int64}.get(tensor.Type())
                if dtype is None:
                    raise WeightsError(f"{name}: tensor type {tensor.Type()} is not supported")
                consts[t] = np.frombuffer(buf.DataAsNumpy().tobytes(), dtype).reshape(tensor.ShapeAsNumpy())
        self.ops: list[tuple] = []
        self.params = nn.ParameterList()
        for i in range(graph.OperatorsLength()):
            op = graph.Operators(i)
            code = model.OperatorCodes(op.OpcodeIndex())
            kind = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
            ins = [int(v) for v in op.InputsAsNumpy()]
            outs = [int(v) for v in op.OutputsAsNumpy()]
            if kind not in self.SUPPORTED:
                raise WeightsError(f"{name}: operator {kind} is not supported by deepscan's TFLite reader")
            if kind == "DEQUANTIZE":  # fp16 weights stored once, used as fp32
                consts[outs[0]] = consts[ins[0]].astype(np.float32)
                continue
            options = self._options(op, kind)
            if "padding" in options:  # the input's height and width, fixed by the graph: padding is static
                options["in_hw"] = tuple(int(v) for v in graph.Tensors(ins[0]).ShapeAsNumpy()[1:3])
            if kind == "RESHAPE":  # the graph's static result shape (no -1 left to infer)
                options["out_shape"] = [int(v) for v in graph.Tensors(outs[0]).ShapeAsNumpy()]
            self.ops.append((kind, ins, outs, options, self._weights(kind, ins, consts)))
        self.consts = consts  # shapes and paddings read by the operators (and any constant operand)

    def _options(self, op, kind: str) -> dict:
        tfl = self._tflite
        table = op.BuiltinOptions()
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            o = (tfl.Conv2DOptions if kind == "CONV_2D" else tfl.DepthwiseConv2DOptions)()
            o.Init(table.Bytes, table.Pos)
            out = {"stride": (o.StrideH(), o.StrideW()), "padding": o.Padding(),
                   "dilation": (o.DilationHFactor(), o.DilationWFactor()), "act": o.FusedActivationFunction()}
            if kind == "DEPTHWISE_CONV_2D":
                out["multiplier"] = max(1, o.DepthMultiplier())
            return out
        if kind == "MAX_POOL_2D":
            o = tfl.Pool2DOptions()
            o.Init(table.Bytes, table.Pos)
            return {"stride": (o.StrideH(), o.StrideW()), "kernel": (o.FilterHeight(), o.FilterWidth()),
                    "padding": o.Padding(), "act": o.FusedActivationFunction()}
        if kind == "ADD":
            o = tfl.AddOptions()
            o.Init(table.Bytes, table.Pos)
            return {"act": o.FusedActivationFunction()}
        if kind == "CONCATENATION":
            o = tfl.ConcatenationOptions()
            o.Init(table.Bytes, table.Pos)
            return {"axis": o.Axis(), "act": o.FusedActivationFunction()}
        if kind == "RESHAPE" and table is not None:
            o = tfl.ReshapeOptions()
            o.Init(table.Bytes, table.Pos)
            return {"shape": [int(v) for v in o.NewShapeAsNumpy()]} if o.NewShapeLength() else {}
        if kind == "RESIZE_BILINEAR":
            o = tfl.ResizeBilinearOptions()
            o.Init(table.Bytes, table.Pos)
            return {"align_corners": o.AlignCorners(), "half_pixel": o.HalfPixelCenters()}
        return {}

    def _weights(self, kind: str, ins: list[int], consts: dict) -> tuple:
        """Convolution weights as torch parameters (index into ``self.params``)."""
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            return ()
        w = torch.from_numpy(np.ascontiguousarray(consts[ins[1]], np.float32))
        if kind == "CONV_2D":
            w = w.permute(0, 3, 1, 2)  # (out, kh, kw, in) -> (out, in, kh, kw)
        else:
            w = w.permute(3, 0, 1, 2)  # (1, kh, kw, out) -> (out, 1, kh, kw)
        b = torch.from_numpy(np.ascontiguousarray(consts[ins[2]], np.float32)) if len(ins) > 2 and ins[2] >= 0 else None
        self.params.append(nn.Parameter(w.contiguous(), requires_grad=False))
        k = len(self.params) - 1
        if b is not None:
            self.params.append(nn.Parameter(b, requires_grad=False))
        return (k, k + 1 if b is not None else None)

    @staticmethod
    def _same(in_hw, kernel, stride, dilation=(1, 1)) -> tuple[int, int, int, int]:
        """SAME padding (left, right, top, bottom) for the op's input size, computed from the
        graph's static shapes (plain ints: an ONNX export holds constants, not shape arithmetic)."""
        top, bottom = _tf_same_pad(in_hw[0], kernel[0], stride[0], dilation[0])
        left, right = _tf_same_pad(in_hw[1], kernel[1], stride[1], dilation[1])
        return left, right, top, bottom

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.jit.is_tracing() and tuple(x.shape[1:3]) != self.input_shape[1:3]:
            raise ValueError(f"input of {tuple(x.shape[1:3])} px; this graph takes {self.input_shape[1:3]}")
        values: dict[int, torch.Tensor] = {self.input: x.permute(0, 3, 1, 2)}  # NHWC in, NCHW inside
        nchw = {self.input}  # 4-D tensors held in NCHW (the others are in TFLite's own layout)

        def get(t: int) -> torch.Tensor:
            if t in values:
                return values[t]
            return torch.from_numpy(self.consts[t]).to(x.device)

        for kind, ins, outs, o, w in self.ops:
            act = _ACTIVATIONS.get(o.get("act", 0), False)
            if act is False:
                raise WeightsError(f"fused activation {o.get('act')} is not supported")
            a = get(ins[0])
            if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
                weight = self.params[w[0]]
                bias = self.params[w[1]] if w[1] is not None else None
                pad = (self._same(o["in_hw"], tuple(weight.shape[2:]), o["stride"], o["dilation"])
                       if o["padding"] == _SAME else (0, 0, 0, 0))
                inside = (0, 0)
                if pad[0] == pad[1] and pad[2] == pad[3]:  # symmetric: the convolution pads by itself
                    inside, pad = (pad[2], pad[0]), (0, 0, 0, 0)
                if any(pad):
                    a = F.pad(a, pad)
                y = F.conv2d(a, weight, bias, stride=o["stride"], padding=inside, dilation=o["dilation"],
                             groups=1 if kind == "CONV_2D" else weight.shape[0] // o["multiplier"])
            elif kind == "MAX_POOL_2D":
                if o["padding"] == _SAME and any(pad := self._same(o["in_hw"], o["kernel"], o["stride"])):
                    a = F.pad(a, pad, value=float("-inf"))
                y = F.max_pool2d(a, o["kernel"], o["stride"])
            elif kind == "RELU":
                y = F.relu(a)
            elif kind == "ADD":
                b = get(ins[1])
                y = a + b
            elif kind == "PAD":
                p = [int(v) for v in self.consts[ins[1]].reshape(-1)]  # NHWC pairs: N, H, W, C
                y = F.pad(a, (p[4], p[5], p[2], p[3], p[6], p[7]))
            elif kind == "RESIZE_BILINEAR":
                size = [int(v) for v in self.consts[ins[1]].reshape(-1)]
                if o["align_corners"]:
                    y = F.interpolate(a, size=size, mode="bilinear", align_corners=True)
                elif o["half_pixel"]:
                    y = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
                else:
                    raise WeightsError("RESIZE_BILINEAR without half-pixel centres is not supported")
            elif kind == "RESHAPE":
                if ins[0] in nchw:
                    a = a.permute(0, 2, 3, 1)  # back to NHWC: the new shape is in its terms
                y = a.reshape(-1, *o["out_shape"][1:])  # the batch stays first, whatever the graph was made with
            elif kind == "CONCATENATION":
                parts = [get(t) for t in ins]
                axis = o["axis"]
                if all(t in nchw for t in ins):
                    axis = {0: 0, 1: 2, 2: 3, 3: 1, -1: 1}[axis]
                y = torch.cat(parts, dim=axis)
            else:  # pragma: no cover - refused in __init__
                raise WeightsError(f"operator {kind} is not supported")
            if act is not None:
                y = act(y)
            values[outs[0]] = y
            if kind == "CONCATENATION":
                layout_nchw = all(t in nchw for t in ins)
            else:
                layout_nchw = kind != "RESHAPE" and y.dim() == 4
            if layout_nchw:
                nchw.add(outs[0])
        out = []
        for t in self.outputs:
            y = values[t]
            out.append(y.permute(0, 2, 3, 1) if t in nchw else y)
        return out
