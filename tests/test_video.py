"""Decoding: sampling formula, codecs, seeking vs full decode, rotation, VFR, short clips, broken files."""
from __future__ import annotations

import av
import numpy as np
import pytest

from iv2trt.decode.clips import DecodeError, Windowing, sample_indices, window_ranges
from iv2trt.decode.inputs import InputItem
from iv2trt.decode.pyav import read_clips
from iv2trt.decode.samples import pattern_frames, write_image, write_video


def upstream_middle_indices(vlen: int, num_frames: int) -> list[int]:
    """Upstream's test-time 'middle' sampling, written from its description, in pure Python:
    cut [0, vlen) at the T+1 evenly spaced (floored) points, take the middle of each piece
    ((first + last) // 2), and when the video has fewer frames than T, fill up with the last pick."""
    pieces = min(num_frames, vlen)
    cuts = [int(vlen * i / pieces) for i in range(pieces + 1)]
    picks = [(cuts[i] + cuts[i + 1] - 1) // 2 for i in range(pieces)]
    return picks + [picks[-1]] * (num_frames - pieces)


def full_decode(path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


@pytest.mark.parametrize("n", list(range(1, 40)) + [100, 301, 1000])
@pytest.mark.parametrize("t", [1, 4, 8, 16])
def test_sample_indices_match_upstream(n, t):
    assert sample_indices(n, t) == upstream_middle_indices(n, t)


def _has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


CODECS = [("libx264", ".mp4", None), ("mpeg4", ".avi", None), ("libvpx-vp9", ".webm", None),
          ("mjpeg", ".avi", None), ("ffv1", ".mkv", "yuv444p"), ("libx264", ".mkv", "yuv444p")]


@pytest.mark.parametrize("codec,ext,pix_fmt", CODECS)
@pytest.mark.parametrize("size", [(48, 64), (90, 160), (120, 72)])
def test_codecs_and_sizes_match_full_decode(tmp_path, codec, ext, pix_fmt, size):
    if not _has_encoder(codec):
        pytest.skip(f"no {codec} encoder in this FFmpeg build")
    path = write_video(tmp_path / f"v{ext}", pattern_frames(37, *size), codec=codec, pix_fmt=pix_fmt, gop=6)
    reference = full_decode(path)
    clips = list(read_clips(str(path), Windowing(frames=8)))
    assert len(clips) == 1
    assert clips[0].indices == sample_indices(len(reference), 8)
    np.testing.assert_array_equal(clips[0].frames, np.stack([reference[i] for i in clips[0].indices]))
    assert clips[0].frames.dtype == np.uint8 and clips[0].frames.shape[1:] == (*size, 3)


@pytest.mark.parametrize("name, codec", [("long.mp4", "libx264"), ("long.mkv", "libx264"), ("long.ts", "libx264"),
                                         ("long_hevc.ts", "libx265"), ("long_hevc.mp4", "libx265")])
def test_windows_with_seeking_match_full_decode(tmp_path, name, codec):
    """Long GOP-structured video with B-frames: every windowed clip equals the full decode's frames. In MPEG-TS
    FFmpeg's seek lands on the keyframe after the one asked for; the reader steps back."""
    options = {"x265-params": "log-level=0"} if codec == "libx265" else None
    path = write_video(tmp_path / name, pattern_frames(250, 48, 64), codec, gop=12, fps=25, options=options)
    reference = full_decode(path)
    for w in (Windowing(frames=4, window_seconds=2.0, stride=3.0), Windowing(frames=8, window_frames=50),
              Windowing(frames=3, window_frames=16, stride=40)):
        clips = list(read_clips(str(path), w))
        ranges = window_ranges(np.arange(250) / 25, 10.0, w)
        assert len(clips) == len(ranges)
        for clip, (a, b, t0, t1) in zip(clips, ranges):
            assert clip.indices == [a + i for i in sample_indices(b - a, w.frames)]
            assert (clip.start_s, clip.end_s) == pytest.approx((t0, t1))
            np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))
    assert ranges[-1][1] == 250  # the last window reaches the end


def test_unneeded_non_reference_frames_are_not_decoded(tmp_path):
    """B-frames nothing refers to are skipped unless a clip takes them; the clip's frames are unchanged."""
    from iv2trt.decode import pyav as video

    path = write_video(tmp_path / "b.mp4", pattern_frames(60, 48, 64), gop=60)  # libx264: B-frames
    reference = full_decode(path)
    decoded = {}
    original = video._decode_needed

    def counting(container, stream, needed_pts, skip_unneeded, *rest):
        frames = list(original(container, stream, needed_pts, skip_unneeded, *rest))
        decoded[skip_unneeded] = len(frames)
        return iter(frames)

    video._decode_needed = counting
    try:
        clip = next(read_clips(str(path), Windowing(frames=4)))
    finally:
        video._decode_needed = original
    np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))
    assert decoded == {True: decoded[True]} and decoded[True] < 50  # skipping ran, and skipped frames


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_rotation_metadata_is_applied(tmp_path, rotation):
    frames = pattern_frames(6, 32, 64)
    path = write_video(tmp_path / "rot.mp4", frames, rotation=rotation)
    raw = full_decode(path)
    clip = next(read_clips(str(path), Windowing(frames=2)))
    expected_shape = (32, 64) if rotation == 180 else (64, 32)
    assert clip.frames.shape[1:3] == expected_shape
    np.testing.assert_array_equal(clip.frames[0], np.rot90(raw[clip.indices[0]], rotation // 90))


def test_portrait_video(tmp_path):
    path = write_video(tmp_path / "portrait.mp4", pattern_frames(10, 96, 54))
    assert next(read_clips(str(path), Windowing(frames=4))).frames.shape == (4, 96, 54, 3)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_short_videos_repeat_last_frame(tmp_path, count):
    path = write_video(tmp_path / "short.mp4", pattern_frames(count, 32, 32))
    clip = next(read_clips(str(path), Windowing(frames=8)))
    assert clip.indices == upstream_middle_indices(count, 8)
    assert clip.frames.shape == (8, 32, 32, 3)


def test_variable_frame_rate_windows_use_timestamps(tmp_path):
    # 10 frames 0.1 s apart, then 10 frames 0.5 s apart: t = 0..0.9, then 1.0, 1.5, ..., 5.5
    times = [i * 0.1 for i in range(10)] + [1.0 + i * 0.5 for i in range(10)]
    path = write_video(tmp_path / "vfr.mkv", pattern_frames(20, 32, 48), fps=10, pts=[round(t * 1000) for t in times])
    reference = full_decode(path)
    assert len(reference) == 20
    clips = list(read_clips(str(path), Windowing(frames=2, window_seconds=1.0)))
    assert clips[0].indices == [a for a in sample_indices(10, 2)]  # the first second holds frames 0..9
    assert clips[1].indices == [10 + i for i in sample_indices(2, 2)]  # 1.0 and 1.5
    for clip in clips:
        np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))


def test_images_and_frame_folders(tmp_path):
    frames = pattern_frames(12, 40, 56)
    png = write_image(tmp_path / "one.png", frames[0])
    clip = list(read_clips(str(png), Windowing(frames=8)))
    assert len(clip) == 1 and clip[0].frames.shape == (1, 40, 56, 3)
    np.testing.assert_array_equal(clip[0].frames[0], frames[0])  # PNG is lossless
    assert next(read_clips(str(write_image(tmp_path / "one.jpg", frames[0])), Windowing())).frames.shape[0] == 1
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, rgb in enumerate(frames):
        write_image(folder / f"{i:04d}.png", rgb)
    clip = next(read_clips(str(folder), Windowing(frames=4)))
    assert clip.indices == sample_indices(12, 4)
    np.testing.assert_array_equal(clip.frames, frames[clip.indices])


def _broken_inputs(tmp_path):
    good = write_video(tmp_path / "good.mp4", pattern_frames(30, 48, 64))
    data = good.read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not a video\n" * 20)
    with av.open(str(tmp_path / "audio.m4a"), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for p in list(s.encode(frame)) + list(s.encode()):
            c.mux(p)
    return {"truncated.mp4": "", "garbage.mp4": "", "empty.mp4": "empty", "notes.txt": "",
            "audio.m4a": "no video stream (has: audio)", "missing.mp4": "not found"}


def test_broken_files_raise_decode_error(tmp_path):
    for name, expected in _broken_inputs(tmp_path).items():
        with pytest.raises(DecodeError) as info:
            list(read_clips(str(tmp_path / name), Windowing()))
        assert expected in info.value.reason, (name, info.value.reason)


def test_probe_video_refuses_through_accept_before_decoding(tmp_path, monkeypatch):
    """A decoder that cannot take the codec refuses the file before its first keyframe is decoded."""
    from iv2trt.decode import pyav as video

    path = tmp_path / "v.mp4"
    write_video(path, pattern_frames(6, 32, 48, seed=0))
    decoded = []
    real_open = video._open

    def counting_open(p):  # decoding the first frame starts with a seek back from the demux pass's end
        container = real_open(p)
        real_seek = container.seek
        container_seek = lambda *a, **k: (decoded.append(1), real_seek(*a, **k))[1]  # noqa: E731
        return type("Counting", (), {"__getattr__": lambda self, name: getattr(container, name),
                                     "seek": staticmethod(container_seek)})()

    monkeypatch.setattr(video, "_open", counting_open)
    probe, rotation = video.probe_video(str(path))
    assert probe.codec == "h264" and rotation == 0.0 and decoded == [1]

    def refuse(probe):
        raise DecodeError(f"this decoder does not take {probe.codec}")

    decoded.clear()
    with pytest.raises(DecodeError, match="does not take h264"):
        video.probe_video(str(path), accept=refuse)
    assert decoded == []


def test_decode_threads_are_set_and_give_the_same_frames(tmp_path, monkeypatch):
    import iv2trt.decode.pyav as pyav

    path = write_video(tmp_path / "t.mp4", pattern_frames(48, 96, 128, seed=7), gop=12)
    w = Windowing(frames=4, window_frames=16)
    counts = []
    real = pyav._threads
    monkeypatch.setattr(pyav, "_threads", lambda stream, n: (real(stream, n), counts.append(stream.thread_count)))
    by_threads = {n: [c.frames for c in read_clips(str(path), w, threads=n)] for n in (0, 1, 3)}
    assert counts == [0, 1, 3]  # (0: FFmpeg's choice, as PyAV reports it before opening)
    for n in (1, 3):
        assert len(by_threads[n]) == len(by_threads[0]) == 3
        for a, b in zip(by_threads[n], by_threads[0]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [{"window_seconds": 0}, {"window_seconds": -2.0}, {"window_frames": 0},
                                    {"window_frames": 4, "stride": 0}])
def test_windows_of_no_length_are_refused(kwargs):
    """A zero-length window (once a division by zero in every video's plan) is refused where it is made."""
    with pytest.raises(ValueError, match="must be positive"):
        Windowing(8, **kwargs)


def test_the_video_stream_is_ffmpegs_choice_not_the_first(tmp_path):
    """A file whose first video stream is a one-frame picture (cover art) before the real video: clips come from
    the video, the stream NVDEC's demuxer also takes."""
    import av

    path, frames = tmp_path / "cover_first.mkv", pattern_frames(40, 48, 64, seed=3)
    with av.open(str(path), "w") as container:
        cover = container.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 32, "yuvj420p"
        video = container.add_stream("libx264", rate=25)
        video.width, video.height, video.pix_fmt = 64, 48, "yuv420p"
        for stream, images in ((cover, [np.zeros((32, 32, 3), np.uint8)]), (video, frames)):
            for rgb in images:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
            container.mux(stream.encode())
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.name == "mjpeg"
        reference = [f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[1])]
    clips = list(read_clips(str(path), Windowing(frames=4, window_frames=20)))
    assert len(clips) == 2 and clips[1].indices[-1] >= 20
    for clip in clips:
        np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))


def test_avi_with_b_frames_is_read_in_output_order(tmp_path):
    """AVI keeps no presentation times: its timestamps number packets in decode order, which B-frames reorder. Such
    a file is read in the decoder's output order (frame i = the i-th frame out), not by its timestamps."""
    import av

    path = write_video(tmp_path / "b.avi", pattern_frames(60, 48, 64, seed=9), gop=30)
    with av.open(str(path)) as container:
        out = [(f.pts, f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    assert [p for p, _ in out] != sorted(p for p, _ in out)  # the timestamps do not follow the frames' order
    w = Windowing(frames=4, window_frames=20)
    clips = list(read_clips(str(path), w))
    assert len(clips) == 3
    for clip in clips:
        np.testing.assert_array_equal(clip.frames, np.stack([out[i][1] for i in clip.indices]))


def test_a_resolution_switch_mid_stream_goes_on_as_rgb_where_planes_were_asked_for(tmp_path):
    """Two MPEG-TS segments of different sizes back to back (a recorded live stream switching quality): frames of
    the second size are scaled to the stream's (so a clip across the switch stacks); a worker beside a GPU hands
    planes until the switch, then RGB clips, the same as the CPU path's from there on."""
    import av

    from iv2trt.decode.gpu_frames import YuvClip
    from iv2trt.decode.source import iter_clips

    parts = [write_video(tmp_path / f"part{i}.ts", pattern_frames(30, h, w, seed=i), "mpeg2video")
             for i, (h, w) in enumerate([(48, 64), (32, 48)])]  # the switch at frame 30, inside the second window
    path = tmp_path / "switch.ts"
    path.write_bytes(b"".join(p.read_bytes() for p in parts))
    item = InputItem(str(path), path.name, "video")
    w = Windowing(frames=4, window_seconds=1.0)
    rgb = list(iter_clips(item, w, 32))
    mixed = list(iter_clips(item, w, 32, planes=True))
    assert [info for info, _ in mixed] == [info for info, _ in rgb] and len(rgb) == 3
    clips = list(read_clips(str(path), w))
    assert {c.frames.shape for c in clips} == {(4, 48, 64, 3)}
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert (frames[-1].height, frames[-1].width) == (32, 48)
    last = frames[clips[-1].indices[-1]].reformat(64, 48, format="rgb24", interpolation="BICUBIC").to_ndarray()
    np.testing.assert_array_equal(clips[-1].frames[-1], last)
    kinds = [isinstance(clip, YuvClip) for _, clip in mixed]
    assert kinds[0] and not kinds[-1] and kinds == sorted(kinds, reverse=True)
    for (_, got), (_, want) in zip(mixed, rgb):
        if not isinstance(got, YuvClip):
            np.testing.assert_array_equal(got, want)


@pytest.mark.skipif(not _has_encoder("libx265"), reason="this FFmpeg build has no libx265")
@pytest.mark.parametrize("container", ["mp4", "mpegts"])
@pytest.mark.parametrize("layers", [1, 3])
def test_hevc_skips_non_reference_pictures_only_with_one_temporal_sub_layer(tmp_path, container, layers):
    """FFmpeg's skip_frame=NONREF drops HEVC's sub-layer non-reference (_N) pictures, which a higher sub-layer may
    refer to: with several sub-layers the reader decodes every picture. The count comes from the hvcC box (MP4) or
    the SPS (MPEG-TS's Annex B headers); windowed clips equal a full decode either way."""
    from iv2trt.decode.pyav import _skips_per_packet, hevc_temporal_layers

    path = tmp_path / f"v.{'ts' if container == 'mpegts' else 'mp4'}"
    frames = pattern_frames(90, 64, 96, seed=4)
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx265", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"x265-params": f"log-level=0:keyint=30:bframes=4:temporal-layers={layers}"}
        for image in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        assert hevc_temporal_layers(bytes(stream.codec_context.extradata)) == layers
        assert _skips_per_packet(stream) == (layers == 1)
    reference = full_decode(path)
    w = Windowing(frames=3, window_frames=15, stride=20)
    clips = list(read_clips(str(path), w))
    assert len(clips) == 5
    for clip in clips:
        np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))


def test_hevc_temporal_layers_read_from_headers_that_do_not_say():
    from iv2trt.decode.pyav import hevc_temporal_layers

    assert hevc_temporal_layers(b"") is None and hevc_temporal_layers(b"\x00\x00\x01") is None
    assert hevc_temporal_layers(bytes([1] + [0] * 22)) is None  # hvcC with numTemporalLayers 0: unknown
    assert hevc_temporal_layers(b"\x00\x00\x00\x01\x40\x01\x0c") is None  # a VPS and no SPS


def test_packets_before_the_keyframe_a_seek_aimed_at_are_read_not_decoded():
    """After a seek, packets up to the keyframe asked for cannot decode (MPEG-TS lands a little after the keyframe
    before: a GOP less one of them); a later keyframe first means the seek landed past it."""
    from types import SimpleNamespace

    from iv2trt.decode.pyav import from_keyframe

    def packets(*spec):
        return [SimpleNamespace(pts=pts, is_keyframe=key) for pts, key in spec]

    landed_early = packets((96, False), (99, False), (93, True), (90, False), (102, False), (180, True))
    assert [p.pts for p in from_keyframe(landed_early, 93)] == [93, 90, 102, 180]
    assert list(from_keyframe(packets((96, False), (180, True), (183, False)), 93)) == []  # landed past it
    assert [p.pts for p in from_keyframe(packets((93, True), (96, False)), 93)] == [93, 96]  # landed on it
    assert list(from_keyframe(packets((None, True), (96, False)), 93)) == []  # no keyframe with that time


def test_mpegts_windows_decode_each_frame_about_once(tmp_path):
    """MPEG-TS: each seek lands a GOP late, so the reader aims a keyframe earlier and reads (does not decode) the
    packets up to the one it wants; the clips equal a full decode, and the packets the decoder gets are about as
    many as the frames (before: about three times as many)."""
    from iv2trt.decode import pyav as video

    path = tmp_path / "v.ts"
    with av.open(str(path), "w", format="mpegts") as out:
        stream = out.add_stream("libx264", rate=30)
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.options = {"g": "30", "bf": "2"}
        for image in pattern_frames(300, 64, 96, seed=5):
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    reference = full_decode(path)
    sent = []
    original = video.from_keyframe

    def counting(packets, key_pts):
        for packet in original(packets, key_pts):
            sent.append(packet.pts)
            yield packet

    video.from_keyframe = counting
    try:
        clips = list(read_clips(str(path), Windowing(frames=8, window_seconds=2)))
    finally:
        video.from_keyframe = original
    assert len(clips) == 5
    for clip in clips:
        np.testing.assert_array_equal(clip.frames, np.stack([reference[i] for i in clip.indices]))
    assert len(sent) < 1.3 * len(reference), (len(sent), len(reference))
