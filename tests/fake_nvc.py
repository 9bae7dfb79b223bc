"""A stand-in for PyNvVideoCodec with its decoding API (SimpleDecoder, reconfigure_decoder,
get_batch_frames_by_index, frames that torch takes through DLPack), decoding with ffmpeg on the
CPU: it runs nvdec.NvdecPool's plumbing here; the real decoder is tested on a GPU (test_cuda)."""

import threading

import torch

from deepscan.video import probe, read_clips

opened: list = []  # paths opened or reconfigured to, in order (any thread)
_lock = threading.Lock()
release = threading.Event()  # a decoder stuck on a "hang" file waits for this (at most 60 s)


class OutputColorType:
    NATIVE, RGB, RGBP = "native", "rgb", "rgbp"


class SimpleDecoder:
    def __init__(self, path, gpu_id=0, use_device_memory=True, output_color_type=OutputColorType.NATIVE, **_):
        assert output_color_type == OutputColorType.RGB and use_device_memory
        self.reconfigure_decoder(path)

    def reconfigure_decoder(self, path):
        with _lock:
            opened.append(str(path))
        if "poison" in str(path):
            raise RuntimeError("CUVID_ERROR: a stand-in for a decoder that cannot open the file")
        self.info = probe(path)

    def __len__(self):
        return self.info.num_frames

    def get_batch_frames_by_index(self, indices):
        if "hang" in self.info.path:
            release.wait(60)  # a decoder that hangs on a file
        frames = [c.frames[0] for c in read_clips(self.info, sorted(indices), 1, "select")]
        by_index = dict(zip(sorted(indices), frames))
        return [torch.from_numpy(by_index[i].reshape(-1).copy()) for i in indices]  # flat, as NVDEC's may be
