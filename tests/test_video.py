import numpy as np
import pytest

from deepscan.errors import MediaError
from deepscan.video import DecodeReport, check_readable, choose_strategy, plan_clips, probe, read_clips


def test_plan_clips_arithmetic():
    assert plan_clips(120, 32, 3) == sorted(set(plan_clips(120, 32, 3)))
    starts = plan_clips(120, 32, 3)
    assert len(starts) == 32 and starts[0] == 0 and starts[-1] == 117
    assert plan_clips(10, 32, 3) == list(range(8))  # short: one clip per possible start
    assert plan_clips(3, 32, 3) == [0]
    assert plan_clips(2, 32, 3) == []  # shorter than a clip
    assert plan_clips(1, 32, 1) == [0]
    assert plan_clips(100, 1, 3) == [48]  # a single clip sits in the middle
    gaps = np.diff(plan_clips(10_000, 32, 3))
    assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_probe_real_talking_head(media_dir):
    info = probe(media_dir / "carphone.mp4")
    assert (info.native_width, info.native_height) == (176, 144) and abs(info.sar - 128 / 117) < 1e-6
    assert (info.width, info.height) == (192, 144)  # its pixels are not square: displayed, it is wider
    assert info.num_frames == 120 and info.frames_exact and abs(info.fps - 29.97) < 0.01 and info.codec == "h264"


def test_select_and_seek_decode_the_same_frames(media_dir):
    info = probe(media_dir / "astronaut.mp4")
    starts = plan_clips(info.num_frames, 4, 3)
    a = list(read_clips(info, starts, 3, "select"))
    b = list(read_clips(info, starts, 3, "seek"))  # one chunk of 4 clips in one ffmpeg process
    assert [c.frame_indices for c in a] == [c.frame_indices for c in b]
    for x, y in zip(a, b):
        assert x.frames.shape == (3, 360, 640, 3)
        assert np.abs(x.frames.astype(int) - y.frames.astype(int)).mean() < 1.0


def test_long_videos_choose_seeking():
    from deepscan.video import VideoInfo

    short = VideoInfo("x", 1280, 720, 25, 10, 250, 0, "h264", 1280, 720)
    long = VideoInfo("x", 1280, 720, 25, 3600, 90_000, 0, "h264", 1280, 720)
    assert choose_strategy(short, 32) == "select" and choose_strategy(long, 32) == "seek"


@pytest.mark.parametrize("strategy", ["select", "seek"])
def test_rotation_metadata_is_applied(media_dir, strategy):
    info = probe(media_dir / "rotated.mp4")
    assert info.rotation in (90, 270) and (info.width, info.height) == (640, 360)
    clips = list(read_clips(info, [0, 4], 3, strategy))
    assert len(clips) == 2 and clips[1].frames.shape == (3, 360, 640, 3)
    left, right = clips[0].frames[0][:, :320].mean(), clips[0].frames[0][:, 320:].mean()
    assert abs(left - right) > 5  # the face sits left of centre once upright, not above it


@pytest.mark.parametrize("strategy", ["select", "seek"])
def test_large_frames_are_scaled_down(media_dir, strategy):
    info = probe(media_dir / "astronaut.mp4", max_side=320)
    assert (info.width, info.height) == (320, 180)
    clips = list(read_clips(info, [0, 10], 3, strategy))
    assert [c.frames.shape for c in clips] == [(3, 180, 320, 3)] * 2


def test_vfr_video_decodes_planned_clips(media_dir):
    info = probe(media_dir / "vfr.mp4")
    report = DecodeReport()
    clips = list(read_clips(info, plan_clips(info.num_frames, 8, 3), 3, report=report))
    assert len(clips) >= 6 and all(c.frames.shape[0] == 3 for c in clips)


@pytest.mark.parametrize("strategy", ["select", "seek"])
def test_truncated_file_uses_what_decodes(media_dir, strategy):
    info = probe(media_dir / "truncated.mp4")
    report = DecodeReport()
    clips = list(read_clips(info, plan_clips(max(info.num_frames, 30), 10, 3), 3, strategy, report=report))
    assert 0 < len(clips) < 10 and "truncated" in report.warning


@pytest.mark.parametrize("name,match", [("audio.m4a", "no video stream"), ("missing.mp4", None),
                                        ("no_index.mp4", "not a readable video")])
def test_unreadable_inputs(media_dir, name, match):
    with pytest.raises(MediaError, match=match or "not a readable video"):
        probe(media_dir / name)


def test_check_readable(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.touch()
    with pytest.raises(MediaError, match="empty file"):
        check_readable(empty)
    link = tmp_path / "dangling.mp4"
    link.symlink_to(tmp_path / "nowhere.mp4")
    with pytest.raises(MediaError, match="broken symbolic link"):
        check_readable(link)
    loop = tmp_path / "loop.mp4"
    loop.symlink_to(loop)
    with pytest.raises(MediaError, match="symbolic link loop"):
        check_readable(loop)
    with pytest.raises(MediaError, match="no such file"):
        check_readable(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match="not a regular file"):
        check_readable(tmp_path)


@pytest.mark.parametrize("codec,ext", [("libx265", "mp4"), ("libvpx-vp9", "webm"), ("libsvtav1", "mkv")])
def test_modern_codecs_decode(tmp_path, codec, ext):
    from . import media

    frames = media.moving(media.astronaut()[:300, 100:400], 6)
    path = media.write_video(tmp_path / f"v.{ext}", frames, codec=["-c:v", codec, "-pix_fmt", "yuv420p"])
    info = probe(path)
    clip = next(read_clips(info, [0], 3))
    assert clip.frames.shape == (3, 360, 640, 3)
    assert np.abs(clip.frames[0].astype(int) - frames[0].astype(int)).mean() < 12


# ---------------------------------------------------------------------------- hostile media (issue: wrong answers)
from deepscan.faces import DlibDetector  # noqa: E402
from deepscan.video import VideoInfo, count_frames, sample_clips  # noqa: E402

from . import media  # noqa: E402


def test_the_chosen_stream_is_the_one_decoded(media_dir, tmp_path):
    path = media.two_streams(media_dir / "astronaut.mp4", tmp_path / "two.mp4")
    info = probe(path)
    assert info.video_streams == 2 and info.stream == 1 and (info.width, info.height) == (1280, 720)
    for strategy in ("select", "seek"):
        clip = next(read_clips(info, [5], 3, strategy))
        assert clip.frames.shape == (3, 720, 1280, 3)
        assert DlibDetector()(clip.frames[0])  # a real picture, not bytes of the other stream


def test_no_duration_in_the_header_counts_the_frames(media_dir, tmp_path):
    path = media.piped_webm(media_dir / "astronaut.mp4", tmp_path / "rec.webm")
    info = probe(path)
    assert info.duration > 0 and info.num_frames == 30 and info.frames_exact
    report = DecodeReport()
    clips = list(sample_clips(info, 8, 3, report=report))
    assert len(clips) == 8 and report.warning is None and not report.warnings


@pytest.mark.parametrize("count", [None, False])  # counted by the probe, or after the last planned clip fails
def test_a_container_longer_than_its_video_loses_no_clip(media_dir, tmp_path, count):
    path = media.long_audio(media_dir / "astronaut.mp4", tmp_path / "long.mp4", 200)
    info = probe(path, count=count)
    assert info.duration >= 199 if count is False else info.num_frames == 30
    report = DecodeReport()
    clips = list(sample_clips(info, 8, 3, report=report))
    assert len(clips) == 8 and report.decoded == 8 and report.warning is None, report
    assert report.frames == 30 and max(c.frame_indices[-1] for c in clips) == 29


def test_fewer_clips_than_asked_is_a_warning(media_dir):
    report = DecodeReport()
    clips = list(sample_clips(probe(media_dir / "astronaut.mp4"), 40, 3, report=report))
    assert len(clips) == 28 and report.warnings == ["only 28 of the 40 clips asked for: the video has 30 frame(s)"]


def test_non_square_pixels_are_decoded_as_displayed(media_dir, tmp_path):
    path = media.non_square_pixels(media_dir / "astronaut.mp4", tmp_path / "sar.mp4")
    info = probe(path)
    assert abs(info.sar - 64 / 45) < 1e-6 and (info.native_width, info.width, info.height) == (450, 640, 360)
    for strategy in ("select", "seek"):
        clip = next(read_clips(info, [2], 3, strategy))
        assert clip.frames.shape == (3, 360, 640, 3)
        (face,) = DlibDetector()(clip.frames[0])  # unsqueezed, it is a face again
        assert 0.8 < (face.box[2] - face.box[0]) / (face.box[3] - face.box[1]) < 1.25


def test_protocol_like_and_dash_names_are_plain_files(media_dir, tmp_path):
    import shutil

    shutil.copy(media_dir / "carphone.mp4", tmp_path / "normal.mp4")
    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "concat:normal.mp4")
    shutil.copy(media_dir / "astronaut.mp4", tmp_path / "-")
    for name in ("concat:normal.mp4", "-"):
        info = probe(tmp_path / name)
        assert (info.width, info.height) == (640, 360), name  # the astronaut, not carphone or stdin
        assert next(read_clips(info, [0], 3, "seek")).frames.shape == (3, 360, 640, 3)


def test_thousands_of_clips_in_one_pass(tmp_path):
    path = media.tiny_long(tmp_path / "ten_minutes.mp4")
    info = probe(path)
    starts = plan_clips(info.num_frames, 5000, 3)
    assert len(starts) == 5000
    count = sum(1 for _ in read_clips(info, starts, 3, "select"))  # an expression far beyond argv's limit
    assert count == 5000


def test_short_high_resolution_videos_decode_in_one_pass():
    def info(w, h, seconds, fps=30):
        return VideoInfo("x", w, h, fps, seconds, int(seconds * fps), 0, "h264", w, h, native_width=w, native_height=h)

    assert choose_strategy(info(7680, 4320, 2.4), 32) == "select"  # 8K, 72 frames: seeking decodes it ~32 times
    assert choose_strategy(info(3840, 2160, 8), 32) == "select"
    assert choose_strategy(info(1280, 720, 600), 32) == "seek"
    assert choose_strategy(info(1920, 1080, 3600), 32) == "seek"


def test_frames_are_counted_from_packets(media_dir):
    assert count_frames(probe(media_dir / "vfr.mp4", count=False)) == 30
