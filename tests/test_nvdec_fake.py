"""NvdecSession on the CPU: PyNvVideoCodec stood in for by PyAV (its demuxer, a decoder that hands frames back with
the label each packet was sent with, GetDecoderCaps from a table of an H100 or an L4), so the session's own logic runs
without a GPU and is checked frame for frame against the CPU path: which files it refuses and why, matching decoded
frames to the plan across seeks, edit lists, time bases of 1/1,000,000 and 1/90,000, B-frames, variable frame rates,
decoder labels that come back garbled or in decode order, frames a decoder passes over, P016 and 4:4:4 surfaces."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
import torch
from test_colorspace import _has_encoder, decoder_surface, frame_planes  # the tests' own helpers

from iv2trt.capture_guard import GUARD
from iv2trt.decode import fallbacks, nvdec
from iv2trt.decode.clips import Windowing
from iv2trt.decode.inputs import InputItem
from iv2trt.decode.nvdec import NvdecError, NvdecUnsupported, StreamFormat, format_refusal
from iv2trt.decode.pyav import probe_video
from iv2trt.decode.samples import jittered_pts, pattern_frames, scheduling_kept
from iv2trt.decode.source import iter_clips

SIZE = 48

# --- GetDecoderCaps as two GPUs answer it ---------------------------------------------------------------------------
_LIMITS = {"width_min": 48, "height_min": 16, "width_max": 8192, "height_max": 8192, "mb_num_max": 32 * 1024 * 4}


def _table(entries) -> dict:
    return {key: {"supported": 1, **_LIMITS} for key in entries}


_H100 = _table([("h264", 8, "420")]
               + [(c, d, "420") for c in ("hevc", "vp9") for d in (8, 10, 12)]
               + [("hevc", d, "444") for d in (8, 10, 12)]
               + [(c, 8, "420") for c in ("mpeg2video", "mpeg1video", "mpeg4", "vc1", "vp8")])
_L4 = {**_H100, **_table([("av1", d, "420") for d in (8, 10)])}
GPUS = {"NVIDIA H100 80GB HBM3": _H100, "NVIDIA L4": _L4}


def h100_caps(codec: str, depth: int, chroma: str) -> dict:
    """H100/H200 (measured there: AV1 refused with "Codec not supported on this GPU", H.264 4:4:4 not supported)."""
    if codec == "av1":
        return {"supported": 0, "error": "PyNvVCExceptionUnsupported: Codec not supported on this GPU"}
    return _H100.get((codec, depth, chroma), {"supported": 0})


def l4_caps(codec: str, depth: int, chroma: str) -> dict:
    return _L4.get((codec, depth, chroma), {"supported": 0})


# --- PyNvVideoCodec, stood in for ------------------------------------------------------------------------------------
class FakePacket:
    """PyNvVideoCodec's PacketData: Annex B bytes at bsl_data, the stream's pts and byte position."""

    def __init__(self, raw: bytes = b"", data: bytes = b"", pts: int = 0, pos: int = -1, stream=None):
        self.raw, self.stream = raw, stream  # the container's bytes, which the stand-in decoder reads
        self._buffer = ctypes.create_string_buffer(data, len(data)) if data else None
        self.bsl = len(data)
        self.bsl_data = ctypes.addressof(self._buffer) if data else 0
        self.pts, self.pos = pts, pos


class FakeDemuxer:
    """CreateDemuxer(filename=...): packets of the video stream, H.264/HEVC in MP4, Matroska or FLV turned to Annex B
    as PyNvVideoCodec's FFmpegDemuxer does; Seek(frame number) to the keyframe at or before frame / fps."""

    def __init__(self, path: str, nvc: FakeNvc):
        self.nvc = nvc
        self.container = av.open(path)
        self.stream = self.container.streams.video[0]
        annexb = any(f in self.container.format.name for f in ("mp4", "matroska", "flv")) and \
            self.stream.codec_context.name in ("h264", "hevc")  # FFmpegDemuxer's bMp4H264 / bMp4HEVC
        self.bsf = av.bitstream.BitStreamFilterContext(f"{self.stream.codec_context.name}_mp4toannexb",
                                                       self.stream) if annexb else None
        self.packets = self.container.demux(self.stream)
        self.ended = False
        nvc.demuxers_opened += 1

    def __iter__(self):
        return self

    def __next__(self) -> FakePacket:
        for packet in self.packets:
            if packet.size:
                raw, pts, pos = bytes(packet), packet.pts, -1 if self.nvc.no_pos else packet.pos
                data = b"".join(bytes(p) for p in self.bsf.filter(packet)) if self.bsf else raw  # takes the packet
                return FakePacket(raw, data, pts + self.nvc.shift_pts, pos, self.stream)
        if not self.ended:  # as seen on an H200 (2.2.4): an empty packet (pts 0, byte 0) at the end of some files
            self.ended = True
            return FakePacket(pts=0, pos=0)
        raise StopIteration

    def Seek(self, frame: int) -> FakePacket:
        self.nvc.seeks += 1
        seconds = frame / float(self.stream.average_rate)  # TsFromFrameNumber; from the start outside MOV and FLV
        start = 0 if "mp4" in self.container.format.name else self.stream.start_time * self.stream.time_base
        self.container.seek(round((seconds + start) / self.stream.time_base), stream=self.stream, backward=True)
        self.packets = self.container.demux(self.stream)
        self.ended = False
        return next(self)


class FakeFrame:
    """A decoded frame: getPTS() gives back the label its packet was sent with; DLPack gives the surface."""

    def __init__(self, label: int, surface: torch.Tensor):
        self.label, self.surface = label, surface

    def getPTS(self) -> int:
        return self.label

    def __dlpack__(self, stream=None):
        return self.surface.__dlpack__()

    def __dlpack_device__(self):
        return self.surface.__dlpack_device__()


class FakeDecoder:
    """CreateDecoder(...): decodes with FFmpeg (frames in presentation order, as NVDEC outputs them), hands each frame
    back with its packet's label and the NVDEC surface of its planes. Unlike FFmpeg it keeps frames an edit list
    cuts (NVDEC knows nothing of edit lists). An empty packet drains it and makes it ready for a new stream."""

    def __init__(self, nvc: FakeNvc):
        self.nvc, self.ctx = nvc, None
        self.sent: collections.deque[int] = collections.deque()

    def Decode(self, packet: FakePacket) -> list[FakeFrame]:
        nvc = self.nvc
        assert GUARD.calls > 0, "NVDEC called outside capture_guard: a CUDA graph capture could run meanwhile"
        if packet.bsl == 0:
            frames = list(self.ctx.decode(None)) if self.ctx is not None else []
            self.ctx = None
        else:
            if packet.pts in nvc.explode:
                raise RuntimeError("CUDA_ERROR_INVALID_VALUE: cuvidDecodePicture failed")
            if self.ctx is None:
                self.ctx = av.CodecContext.create(packet.stream.codec_context.codec.name, "r")
                self.ctx.extradata = packet.stream.codec_context.extradata
            copy = av.Packet(packet.raw)  # not flagged discard: NVDEC decodes and outputs every frame
            copy.pts = packet.pts
            self.sent.append(packet.pts)
            frames = list(self.ctx.decode(copy))
        out = []
        for frame in frames:
            label = self.sent.popleft() if nvc.decode_order_labels else frame.pts
            if not nvc.decode_order_labels:
                self.sent.remove(label)
            if label in nvc.lose:
                continue
            depth = frame.format.components[0].bits
            surface = decoder_surface(frame_planes(frame), depth)
            out.append(FakeFrame(10 ** 9 + label if label in nvc.garble else label, surface))
        nvc.frames_out += len(out)
        return out


class FakeNvc:
    """The PyNvVideoCodec module as NvdecSession uses it. Knobs: `caps` (a GPU's capability table), `garble` and
    `lose` (labels NVDEC garbles or never outputs), `decode_order_labels` (labels handed back in the order packets
    were sent, not with their frames), `shift_pts` and `no_pos` (a demuxer whose timestamps differ from PyAV's, or
    which has no byte positions), `explode` (labels on which the decoder raises)."""

    cudaVideoCodec = SimpleNamespace(**{name: name for name in nvdec.NVDEC_CODECS.values()})
    cudaVideoChromaFormat = SimpleNamespace(__members__={"Monochrome": 0, "420": 1, "422": 2, "444": 3})

    def __init__(self, caps=h100_caps, **knobs):
        self.caps = caps
        self.garble, self.lose, self.explode = (set(knobs.pop(k, ())) for k in ("garble", "lose", "explode"))
        self.decode_order_labels = knobs.pop("decode_order_labels", False)
        self.shift_pts, self.no_pos = knobs.pop("shift_pts", 0), knobs.pop("no_pos", False)
        assert not knobs, knobs
        self.queries: list[tuple] = []
        self.demuxers_opened = self.decoders_created = self.frames_out = self.seeks = 0

    @staticmethod
    def PacketData() -> FakePacket:
        return FakePacket()

    def GetDecoderCaps(self, gpuid: int = 0, codec: str = "H264", chromaformat: int = 1, bitdepth: int = 8) -> dict:
        chroma = {0: "400", 1: "420", 2: "422", 3: "444"}[chromaformat]
        name = {v: k for k, v in nvdec.NVDEC_CODECS.items()}[codec]
        self.queries.append((name, bitdepth, chroma))
        answer = self.caps(name, bitdepth, chroma)
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def CreateDemuxer(self, filename: str) -> FakeDemuxer:
        return FakeDemuxer(filename, self)

    def CreateDecoder(self, gpuid, codec, cudacontext, cudastream, usedevicememory) -> FakeDecoder:
        assert GUARD.calls > 0, "decoder made outside capture_guard"
        self.decoders_created += 1
        return FakeDecoder(self)


class _Event:
    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


@pytest.fixture
def fake_gpu(monkeypatch):
    """A CPU that passes for a GPU: torch.cuda's streams and events do nothing, PyNvVideoCodec is a FakeNvc.
    Returns make(caps=..., gpu_name=..., **knobs) -> (FakeNvc, NvdecSession factory)."""
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: SimpleNamespace(cuda_stream=0))
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(nvdec, "_CAPS", {})

    def make(caps=h100_caps, gpu_name="NVIDIA H100 80GB HBM3", **knobs):
        fake = FakeNvc(caps, **knobs)
        monkeypatch.setitem(sys.modules, "PyNvVideoCodec", fake)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda gpu=0: gpu_name)
        return fake, lambda w: nvdec.NvdecSession(0, w, SIZE)

    return make


# --- test files with the properties real files have ------------------------------------------------------------
def encode(path: Path, count: int, codec: str = "libx264", time_base: Fraction = Fraction(1, 1000), pts=None,
           pix_fmt: str = "yuv420p", options=None, gop: int = 24, h: int = 64, w: int = 96, seed: int = 0,
           frames: np.ndarray | None = None) -> Path:
    """`count` frames (`frames`, or a test pattern of h x w) at timestamps `pts` (in `time_base`; default 30 fps)."""
    pts = list(range(0, count * 33, 33)) if pts is None else [int(p) for p in pts]
    if frames is not None:
        h, w = frames.shape[1:3]
    with scheduling_kept(), av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=30, options=options or {})
        stream.height, stream.width, stream.pix_fmt = h, w, pix_fmt
        stream.codec_context.time_base = stream.time_base = time_base
        stream.codec_context.gop_size = gop
        for p, rgb in zip(pts, pattern_frames(count, h, w, seed=seed) if frames is None else frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = p, time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


US, TB90K = Fraction(1, 1_000_000), Fraction(1, 90_000)
X265 = {"x265-params": "log-level=0"}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nvdec_fake")
    out = {
        # a phone's H.264 High: 1/1,000,000, durations of 32-34 ms, B-frames, frames before 0 that an edit list cuts
        "phone_editlist": encode(root / "phone.mp4", 150, time_base=US, pts=jittered_pts(150, 33_333, 1_000, -100_000),
                                 options={"bf": "2"}),
        # 1/90,000, B-frames reordered (pyramid), a first pts of 5 s
        "tb90k_bframes": encode(root / "tb90k.mp4", 120, time_base=TB90K, pts=jittered_pts(120, 3003, 300, 450_000, 1),
                                options={"bf": "3", "b_strategy": "0"}, seed=1),
        # MPEG-TS (1/90,000), no B-frames
        "ts_no_bframes": encode(root / "v.ts", 100, time_base=TB90K, pts=jittered_pts(100, 3000, 0, 90_000),
                                options={"bf": "0"}, seed=2),
        # a screen recording: variable frame rate with pauses of up to 2 s, 1/1000
        "screen_vfr": encode(root / "screen.mkv", 90, pts=np.cumsum(np.random.default_rng(3).choice(
            [16, 17, 33, 250, 2000], 90, p=[.4, .3, .2, .07, .03])), options={"bf": "0"}, gop=40, seed=3),
        "vp9": encode(root / "v.webm", 60, "libvpx-vp9", seed=4) if _has_encoder("libvpx-vp9", "yuv420p") else None,
    }
    if _has_encoder("libx265", "yuv420p10le"):
        out["hevc_10bit"] = encode(root / "hevc10.mp4", 70, "libx265", pix_fmt="yuv420p10le", options=X265, seed=5)
        out["hevc_444_10bit"] = encode(root / "hevc444.mp4", 40, "libx265", pix_fmt="yuv444p10le", options=X265, seed=6)
    if _has_encoder("libsvtav1", "yuv420p10le"):
        out["av1_10bit"] = encode(root / "av1.mkv", 40, "libsvtav1", pix_fmt="yuv420p10le", seed=7)
    return out


def need(files, name: str) -> Path:
    if files.get(name) is None:
        pytest.skip(f"this FFmpeg build cannot write {name}")
    return files[name]


def gpu_clips(make_session, path: Path, w: Windowing):
    session = make_session(w)
    return [(info, frames.numpy()) for info, frames, _ in session.clips("video", str(path))], session


def cpu_clips(path: Path, w: Windowing):
    return list(iter_clips(InputItem(str(path), path.name, "video"), w, SIZE))


def reference_clips(path: Path, w: Windowing, size: int = SIZE):
    """The plan's frames from a full decode with nothing skipped, resized as the job does: what the CPU path gives
    (for libdav1d too: the CPU path asks only FFmpeg's own decoders to skip frames)."""
    from iv2trt.transforms import resize_frames

    probe = probe_video(str(path))[0]
    with av.open(str(path)) as container:
        frames = {f.pts: f.to_ndarray(format="rgb24") for f in container.decode(video=0)}
    return [({"indices": idx, "start_s": t0, "end_s": t1},
             resize_frames(np.stack([frames[probe.pts[i]] for i in idx]), size)) for idx, t0, t1 in probe.plan(w)]


def assert_same_clips(gpu, cpu) -> None:
    assert [i["indices"] for i, _ in gpu] == [i["indices"] for i, _ in cpu]
    assert [(i["start_s"], i["end_s"]) for i, _ in gpu] == [(i["start_s"], i["end_s"]) for i, _ in cpu]
    for (_, a), (_, b) in zip(gpu, cpu):
        np.testing.assert_array_equal(a, b)


WINDOWINGS = {"whole": Windowing(frames=8), "sparse-1s": Windowing(frames=4, window_seconds=1.0, stride=2.5),
              "frames": Windowing(frames=6, window_frames=20, stride=13)}
MATCHED = ["phone_editlist", "tb90k_bframes", "ts_no_bframes", "screen_vfr", "vp9", "hevc_10bit", "hevc_444_10bit"]


def test_the_files_have_the_properties_they_stand_for(files):
    probe = probe_video(str(files["phone_editlist"]))[0]
    assert probe.time_base == 1e-6 and sum(probe.packet_discard) > 0 and min(probe.packet_pts) < 0
    gaps = np.diff(probe.pts)
    assert gaps.min() >= 32_000 and gaps.max() <= 34_500 and len(set(gaps.tolist())) > 10
    probe = probe_video(str(files["tb90k_bframes"]))[0]
    assert abs(probe.time_base - 1 / 90_000) < 1e-12 and probe.pts[0] > 0 and probe.packet_pts != probe.pts
    probe = probe_video(str(files["ts_no_bframes"]))[0]
    assert probe.container == "mpegts" and probe.packet_pts == probe.pts
    assert np.diff(probe_video(str(files["screen_vfr"]))[0].pts).max() >= 1000


@pytest.mark.parametrize("w", WINDOWINGS.values(), ids=WINDOWINGS.keys())
@pytest.mark.parametrize("name", MATCHED)
def test_session_gives_the_cpu_paths_clips(files, fake_gpu, name, w):
    """Every file decoded by the session (no fallback) gives exactly the CPU path's clips: same frames by number,
    same windows, same pixels; the sparse windows make the session seek."""
    path = need(files, name)
    _, make_session = fake_gpu()
    gpu, session = gpu_clips(make_session, path, w)
    assert_same_clips(gpu, cpu_clips(path, w))
    assert session.labels_repaired == 0


def test_av1_is_refused_on_an_h100_before_any_decoder_and_decoded_on_an_l4(files, fake_gpu):
    """The codec is AV1 whichever CPU decoder (libdav1d) reads it; the H100 refuses it (category codec) from the
    headers alone: no demuxer, no decoder; the L4 decodes it like the CPU path."""
    path = need(files, "av1_10bit")
    assert probe_video(str(path))[0].codec == "av1"
    fake, make_session = fake_gpu(h100_caps)
    with pytest.raises(NvdecUnsupported) as info:
        gpu_clips(make_session, path, Windowing(frames=4))
    assert info.value.category == "codec" and "Codec not supported" in info.value.reason
    assert fake.demuxers_opened == fake.decoders_created == 0
    fake, make_session = fake_gpu(l4_caps, "NVIDIA L4")
    for w in (Windowing(frames=8), Windowing(frames=2, window_frames=6)):
        assert_same_clips(gpu_clips(make_session, path, w)[0], reference_clips(path, w))


def test_the_cpu_paths_sparse_av1_clips_hold_the_frames_the_plan_names(files):
    """With libdav1d, a per-packet skip_frame=NONREF reached frames decoded later, and a needed non-reference frame
    came out as its neighbour; the CPU path no longer asks external decoders to skip (pyav._skips_per_packet)."""
    path = need(files, "av1_10bit")
    w = Windowing(frames=2, window_frames=6)
    assert_same_clips(cpu_clips(path, w), reference_clips(path, w))


def test_frames_an_edit_list_cuts_are_stood_in_for_as_on_the_cpu(files, fake_gpu):
    """The plan counts the frames before the edit list's start (the demux pass sees their packets); FFmpeg's decoder
    drops them and the CPU path takes the next frame instead. NVDEC outputs them; the session does as the CPU."""
    path = files["phone_editlist"]
    probe = probe_video(str(path))[0]
    cut = {probe.index_of[p] for p, d in zip(probe.packet_pts, probe.packet_discard) if d}
    w = Windowing(frames=6, window_frames=20, stride=13)
    cpu = cpu_clips(path, w)
    assert cut & set(cpu[0][0]["indices"])
    _, make_session = fake_gpu()
    gpu, _ = gpu_clips(make_session, path, w)
    assert_same_clips(gpu, cpu)
    first = cpu[0][0]["indices"]
    stand_in = first.index(min(i for i in first if i not in cut))
    for k, index in enumerate(first):
        if index in cut:
            np.testing.assert_array_equal(gpu[0][1][k], gpu[0][1][stand_in])


def test_sparse_windows_seek_and_skip_work(files, fake_gpu):
    """One 4-frame clip every 2.5 s of a 4 s file starting at 5 s, GOPs of 0.8 s: the session seeks past whole GOPs
    (landing there, though the first timestamp is not 0) and never sends unneeded non-reference frames; the clips
    still equal the CPU path's."""
    path = files["tb90k_bframes"]
    fake, make_session = fake_gpu()
    w = Windowing(frames=4, window_seconds=0.5, stride=2.5)
    gpu, session = gpu_clips(make_session, path, w)
    assert_same_clips(gpu, cpu_clips(path, w))
    assert fake.seeks >= 1 and fake.demuxers_opened == 1  # a seek that landed where it should
    assert session.frames_dropped > 0 and session.frames_decoded < 80, (session.frames_dropped,
                                                                        session.frames_decoded)


@pytest.mark.parametrize("name", ["phone_editlist", "tb90k_bframes", "hevc_10bit"])
def test_labels_nvdec_garbles_are_repaired_from_the_output_order(files, fake_gpu, name):
    """NVDEC has been seen to hand back nonsense timestamps for a few frames: each such frame is the lowest frame
    still in flight (NVDEC outputs in presentation order), and the clips stay the CPU path's."""
    path = need(files, name)
    w = Windowing(frames=6, window_frames=20, stride=13)
    cpu = cpu_clips(path, w)
    needed = sorted({i for info, _ in cpu for i in info["indices"]})
    _, make_session = fake_gpu(garble=needed[1::3] + [needed[-1] + 1])
    gpu, session = gpu_clips(make_session, path, w)
    assert_same_clips(gpu, cpu)
    assert session.labels_repaired >= len(needed[1::3])


def test_labels_in_decode_order_stop_a_reordered_stream_and_pass_an_ordered_one(files, fake_gpu):
    """A decoder that gave labels back in the order packets went in (not with their frames) would scramble B-frames:
    the frames then come out of order, and the file goes to the CPU path (timestamps) rather than with wrong frames.
    Without B-frames the two orders agree and nothing changes."""
    w = Windowing(frames=8)
    _, make_session = fake_gpu(decode_order_labels=True)
    with pytest.raises(NvdecError) as info:
        gpu_clips(make_session, files["tb90k_bframes"], w)
    assert info.value.category == "timestamps" and "out of order" in info.value.reason
    path = files["ts_no_bframes"]
    session = make_session(w)
    with pytest.raises(NvdecError):
        list(session.clips("video", str(files["tb90k_bframes"])))
    assert session._decoders == {}  # a decoder whose stream stopped midway is not kept
    assert_same_clips(gpu_clips(make_session, path, w)[0], cpu_clips(path, w))


@pytest.mark.parametrize("name", ["phone_editlist", "ts_no_bframes", "screen_vfr"])
def test_packets_are_found_by_position_when_the_demuxers_timestamps_differ(files, fake_gpu, name):
    """PyNvVideoCodec's FFmpeg may compute other timestamps than PyAV's (edit lists, 1/1,000,000): packets are
    recognised by their byte position, so nothing changes. Without positions either, the file goes to the CPU
    path (timestamps) before anything is decoded wrongly."""
    path = files[name]
    w = Windowing(frames=4, window_seconds=1.0, stride=2.5)
    _, make_session = fake_gpu(shift_pts=7)
    gpu, session = gpu_clips(make_session, path, w)
    assert_same_clips(gpu, cpu_clips(path, w))
    assert session.labels_repaired == 0
    fake, make_session = fake_gpu(shift_pts=7, no_pos=True)
    with pytest.raises(NvdecError) as info:
        gpu_clips(make_session, path, w)
    assert info.value.category == "timestamps" and "did not see" in info.value.reason
    assert fake.frames_out == 0


@pytest.mark.parametrize("name", ["ts_no_bframes", "phone_editlist"])
def test_a_frame_the_decoder_passes_over_is_stood_in_for_by_the_next(files, fake_gpu, name):
    """A needed frame NVDEC never outputs (a frame FFmpeg would not output either): the next frame stands in, as on
    the CPU path, which decodes it even when it is a non-reference frame no clip needs. When the last frames never
    come, the file goes to the CPU path (frames_missing)."""
    path = files[name]
    w = Windowing(frames=8)
    cpu = cpu_clips(path, w)
    indices = cpu[0][0]["indices"]
    _, make_session = fake_gpu(lose=[indices[3]])
    gpu, _ = gpu_clips(make_session, path, w)
    expected = cpu[0][1].copy()
    expected[3] = cpu_clips(path, Windowing(frames=1, window_frames=1, stride=indices[3] + 1))[1][1][0]
    np.testing.assert_array_equal(gpu[0][1], expected)
    _, make_session = fake_gpu(lose=range(indices[-1], 10 ** 6))
    with pytest.raises(NvdecError) as info:
        gpu_clips(make_session, path, w)
    assert info.value.category == "frames_missing"


def test_a_decoder_that_fails_is_dropped_and_the_next_input_gets_a_new_one(files, fake_gpu):
    path = files["ts_no_bframes"]
    w = Windowing(frames=8)
    fake, make_session = fake_gpu(explode=[40])
    session = make_session(w)
    with pytest.raises(NvdecError) as info:
        list(session.clips("video", str(path)))
    assert info.value.category == "stream_error" and "cuvidDecodePicture" in info.value.reason
    assert session._decoders == {} and fake.decoders_created == 1
    fake.explode.clear()
    other = files["screen_vfr"]
    got = [(i, f.numpy()) for i, f, _ in session.clips("video", str(other))]
    assert_same_clips(got, cpu_clips(other, w))
    assert fake.decoders_created == 2 and len(session._decoders) == 1


@pytest.mark.parametrize("pix_fmt,codec,options,category", [
    ("yuv420p10le", "libx264", {}, "bit_depth"),          # H.264 High 10: NVDEC decodes 8-bit H.264 only
    ("yuv444p", "libx264", {}, "chroma"),                 # H.264 4:4:4: not on an H100
    ("yuv422p10le", "libx265", X265, "chroma"),           # 4:2:2: no conversion of NVDEC's NV16/P216 here
    ("gray", "libx265", X265, "chroma"),                  # monochrome: NVDEC fills chroma with 0, not neutral
])
def test_formats_are_refused_from_the_headers_with_their_category(tmp_path, fake_gpu, pix_fmt, codec, options,
                                                                   category):
    if not _has_encoder(codec, pix_fmt):
        pytest.skip(f"no {codec} for {pix_fmt}")
    path = encode(tmp_path / "v.mkv", 4, codec, pix_fmt=pix_fmt, options=options)
    fake, make_session = fake_gpu()
    with pytest.raises(NvdecUnsupported) as info:
        gpu_clips(make_session, path, Windowing(frames=2))
    assert info.value.category == category, info.value.reason
    assert fake.demuxers_opened == fake.decoders_created == 0


def test_the_decision_follows_what_each_gpu_reports():
    """format_refusal against an H100's and an L4's answers: codec, bit depth, chroma format and size, each refusal
    with its category."""
    cases = [  # (codec, bit depth, chroma, width, height) -> category on the H100, on the L4 (None: decoded)
        (("h264", 8, "420", 1920, 1080), None, None),
        (("h264", 10, "420", 1920, 1080), "bit_depth", "bit_depth"),
        (("h264", 8, "444", 640, 480), "chroma", "chroma"),
        (("hevc", 10, "420", 3840, 2160), None, None),
        (("hevc", 12, "444", 640, 480), None, None),
        (("hevc", 10, "422", 640, 480), "chroma", "chroma"),
        (("vp9", 12, "420", 640, 480), None, None),
        (("av1", 8, "420", 640, 480), "codec", None),
        (("av1", 10, "420", 640, 480), "codec", None),
        (("av1", 12, "420", 640, 480), "codec", "bit_depth"),
        (("mpeg2video", 8, "420", 720, 576), None, None),
        (("vc1", 8, "420", 720, 480), None, None),
        (("prores", 10, "422", 640, 480), "codec", "codec"),
        (("h264", 8, "420", 641, 480), "size", "size"),
        (("h264", 8, "420", 32, 32), "size", "size"),             # under width_min
        (("hevc", 8, "420", 8192, 8192), "size", "size"),         # over the macroblock count
        (("h264", 16, "420", 640, 480), "bit_depth", "bit_depth"),
    ]
    for fields, h100, l4 in cases:
        for caps, expected in ((h100_caps, h100), (l4_caps, l4)):
            refusal = format_refusal(StreamFormat(*fields), caps)
            assert (refusal and refusal.category) == expected, (fields, caps.__name__, refusal and refusal.reason)


def test_capabilities_are_asked_once_per_gpu_model(fake_gpu):
    fake, _ = fake_gpu()
    first = nvdec.gpu_caps(fake, 0, "NVIDIA H100 80GB HBM3")
    again = nvdec.gpu_caps(fake, 1, "NVIDIA H100 80GB HBM3")
    for lookup in (first, again, first):
        assert lookup("hevc", 10, "444")["supported"] and not lookup("av1", 8, "420")["supported"]
    assert fake.queries == [("hevc", 10, "444"), ("av1", 8, "420")]
    assert "Codec not supported" in first("av1", 8, "420")["error"]
    nvdec.gpu_caps(FakeNvc(l4_caps), 0, "NVIDIA L4")("av1", 8, "420")
    assert nvdec.gpu_caps(fake, 0, "NVIDIA L4")("av1", 8, "420")["supported"]  # the L4's answer, cached


def test_sessions_asking_at_once_make_one_query(fake_gpu, monkeypatch):
    """Eight sessions start together: one asks the driver (a query creates a CUDA context under the GIL), the others
    wait for its answer."""
    import threading
    import time

    fake, _ = fake_gpu()
    ask = fake.GetDecoderCaps
    monkeypatch.setattr(fake, "GetDecoderCaps", lambda **kw: (time.sleep(0.05), ask(**kw))[1])
    lookup = nvdec.gpu_caps(fake, 0, "NVIDIA H100 80GB HBM3")
    start = threading.Barrier(8)
    answers = []
    threads = [threading.Thread(target=lambda: (start.wait(), answers.append(lookup("h264", 8, "420"))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(answers) == 8 and all(a["supported"] for a in answers)
    assert fake.queries == [("h264", 8, "420")]


def test_a_query_without_chroma_format_is_asked_for_4_2_0(fake_gpu):
    """A PyNvVideoCodec whose GetDecoderCaps takes no chroma format: its answer (4:2:0's) stands for every format,
    and the decoder's own check refuses what the GPU does not decode."""
    fake, _ = fake_gpu()

    def old_query(gpuid=0, codec="H264", bitdepth=8):
        return FakeNvc.GetDecoderCaps(fake, gpuid, codec, 1, bitdepth)

    fake.GetDecoderCaps = old_query
    lookup = nvdec.gpu_caps(fake, 0, "NVIDIA H100 80GB HBM3")
    assert lookup("h264", 8, "444")["supported"] and lookup("h264", 8, "444")["chroma_unchecked"]
    assert format_refusal(StreamFormat("hevc", 10, "444", 640, 480), lookup) is None
    assert format_refusal(StreamFormat("h264", 10, "420", 640, 480), lookup).category == "bit_depth"


def test_fallbacks_are_counted_by_category():
    causes = [NvdecUnsupported("AV1"), NvdecUnsupported("10-bit H.264", "bit_depth"), NvdecError("broken"),
              NvdecError("short", "frames_missing"), RuntimeError("CUDA"), "timestamps"]
    counts = fallbacks.count_fallbacks(causes)
    assert counts == {"codec": 1, "bit_depth": 1, "chroma": 0, "size": 0, "timestamps": 1, "stream_error": 2,
                      "frames_missing": 1}
    assert list(counts) == list(fallbacks.FALLBACK_CATEGORIES)
    assert NvdecUnsupported("x").reason == "x" and isinstance(NvdecUnsupported("x"), nvdec.DecodeError)
    with pytest.raises(ValueError, match="unknown fallback category"):
        NvdecError("x", "colour")
    assert nvdec._driver_category(RuntimeError("Codec not supported on this GPU")) == "codec"
    assert nvdec._driver_category(RuntimeError("MBCount not supported on this GPU\nMBCount : 40000")) == "size"
    assert nvdec._driver_category(RuntimeError("cuvidDecodePicture failed")) == "stream_error"


def _probe(packet_pts, packet_pos=None, discard=()):
    """The parts of a VideoProbe FrameMatcher reads, for packets with these timestamps (decode order)."""
    pts = sorted(packet_pts)
    return SimpleNamespace(packet_pts=list(packet_pts), pts=pts, index_of={p: i for i, p in enumerate(pts)},
                           packet_pos=list(packet_pos) if packet_pos is not None else [-1] * len(packet_pts),
                           packet_discard=[p in discard for p in packet_pts])


def test_frame_matcher_rules():
    # packets in decode order: I0 P3 B1 B2 | I4 P7 B5 B6 (timestamps x100), byte positions 1000 + 10 * i
    probe = _probe([0, 300, 100, 200, 400, 700, 500, 600], [1000 + 10 * i for i in range(8)])
    m = nvdec.FrameMatcher(probe, needed=[1, 3, 5, 6])
    packet = SimpleNamespace(pts=12345, pos=1020)  # the B1 packet, whatever its timestamp says
    assert m.identify(packet) == 1
    assert m.identify(SimpleNamespace(pts=300, pos=-1)) == 3  # no position: by timestamp
    with pytest.raises(NvdecError, match="did not see"):
        m.identify(SimpleNamespace(pts=999, pos=5))
    for i in (0, 3, 1, 2):
        m.send(i)
    assert m.decoded(0) == [] and m.decoded(1) == [1]  # frame 0: no clip needs it
    assert m.decoded(10 ** 9) == [] and m.repaired == 1  # a garbled label: the lowest frame in flight, 2
    with pytest.raises(NvdecError, match="out of order"):
        m.decoded(2)
    # a seek to the keyframe 4; a leading picture (a frame before it, decoded without its references) serves no
    # clip of this run, though frame 3 is needed: it comes from a run that starts earlier
    m.restart(4)
    for i in (4, 3, 7, 5, 6):
        m.send(i)
    assert m.decoded(3) == [] and m.decoded(4) == []
    assert m.decoded(6) == [5, 6]  # frame 5 never came out: frame 6 stands in for it, as on the CPU path
    assert m.owed == [] and m.decoded(7) == []


def test_frame_matcher_stands_in_for_frames_an_edit_list_cuts():
    probe = _probe([-200, -100, 0, 100], discard=(-200, -100))
    m = nvdec.FrameMatcher(probe, needed=[0, 1, 3])
    for i in range(4):
        m.send(i)
    assert [m.decoded(i) for i in range(4)] == [[], [], [0, 1], [3]]  # frame 2 stands in for the cut ones before it


def test_parity_tool_reports_refused_and_failed_files_and_goes_on(files, fake_gpu, tmp_path, monkeypatch,
                                                                  tiny_model, capsys):
    """tools/decode_parity.py on a folder where NVDEC decodes one file, refuses three (AV1 on an H100, 10-bit H.264,
    a file that is no video) and breaks on one: every file is a row of the table and of the JSON, with its fallback
    category and reason, and the summary counts them."""
    import importlib.util
    import shutil

    from iv2trt.runners.torch_runner import TorchRunner

    spec = importlib.util.spec_from_file_location("decode_parity", Path(__file__).parent.parent / "tools" /
                                                  "decode_parity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    root = tmp_path / "videos"
    root.mkdir()
    shutil.copy(files["ts_no_bframes"], root / "a_decoded.ts")             # 100 frames
    shutil.copy(files["phone_editlist"], root / "b_breaks.mp4")            # 150 frames: NVDEC fails at frame 120
    shutil.copy(need(files, "av1_10bit"), root / "c_av1.mkv")
    if _has_encoder("libx264", "yuv420p10le"):
        encode(root / "d_h264_10bit.mp4", 4, pix_fmt="yuv420p10le")
    (root / "e_garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    monkeypatch.setattr(nvdec, "nvdec_unavailable", lambda gpu=0: None)
    monkeypatch.setattr("iv2trt.models.create_model", lambda *a, **k: tiny_model)
    monkeypatch.setattr("iv2trt.runners.torch_runner.TorchRunner",
                        lambda model, device=None, precision=None: TorchRunner(model, device="cpu", precision="fp32"))
    fake_gpu(explode=[120])
    out = tmp_path / "parity.json"
    assert tool.main(["--videos", str(root), "--frames", "4", "--window-seconds", "0", "--output", str(out)]) == 0
    report = __import__("json").loads(out.read_text())
    rows = {r["file"]: r for r in report["rows"]}
    assert rows["a_decoded.ts"]["status"] == "ok" and rows["a_decoded.ts"]["mean_abs_diff"] == 0
    assert rows["a_decoded.ts"]["min_cosine"] > 0.99999
    assert (rows["b_breaks.mp4"]["status"], rows["b_breaks.mp4"]["category"]) == ("failed", "stream_error")
    assert (rows["c_av1.mkv"]["status"], rows["c_av1.mkv"]["category"]) == ("refused", "codec")
    assert "Codec not supported" in rows["c_av1.mkv"]["reason"]
    assert (rows["e_garbage.mp4"]["status"], rows["e_garbage.mp4"]["category"]) == ("refused", "stream_error")
    bit_depth = int("d_h264_10bit.mp4" in rows)
    if bit_depth:
        assert (rows["d_h264_10bit.mp4"]["status"], rows["d_h264_10bit.mp4"]["category"]) == ("refused", "bit_depth")
    assert report["decoded_by_nvdec"] == 1 and report["videos"] == 4 + bit_depth
    assert report["fallbacks"] == {**dict.fromkeys(fallbacks.FALLBACK_CATEGORIES, 0), "codec": 1,
                                   "bit_depth": bit_depth, "stream_error": 2}
    table = capsys.readouterr().out
    assert "| c_av1.mkv | libdav1d yuv420p10le" in table and "| refused (codec) | " in table
    assert "| b_breaks.mp4 |" in table and "failed (stream_error)" in table


# --- the demux pass in helper processes (probe_pool.py) -------------------------------------------------------------
@pytest.fixture
def probes():
    from iv2trt.decode.probe_pool import ProbePool

    pool = ProbePool(1)
    yield pool
    pool.close()


@pytest.mark.parametrize("name", ["phone_editlist", "tb90k_bframes", "hevc_10bit"])
def test_the_demux_pass_in_a_helper_process_gives_the_cpu_paths_clips(files, fake_gpu, probes, name, monkeypatch):
    """With the demux pass (and the 10-bit chroma siting) in a helper process, the session still gives exactly the
    CPU path's clips, across seeks, an edit list and B-frames."""
    path = need(files, name)
    _, _ = fake_gpu()
    w = WINDOWINGS["sparse-1s"]
    session = nvdec.NvdecSession(0, w, SIZE, probes)
    monkeypatch.setattr("iv2trt.decode.probe_pool.probe_for_nvdec", None)  # not in this thread: in the helper
    gpu = [(info, frames.numpy()) for info, frames, _ in session.clips("video", str(path))]
    assert_same_clips(gpu, cpu_clips(path, w))


def test_refusals_from_a_helper_process_keep_their_category(files, fake_gpu, probes, tmp_path):
    """What the helper finds (no readable stream, no timestamps) and what the session decides from its answer (AV1
    on an H100, 10-bit H.264) are refusals with their categories; no NVDEC demuxer or decoder is made for them."""
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, np.uint8).tobytes())
    cases = [(garbage, "stream_error"), (encode(tmp_path / "raw.h264", 10), "timestamps"),
             (need(files, "av1_10bit"), "codec")]
    if _has_encoder("libx264", "yuv420p10le"):
        cases.append((encode(tmp_path / "h264_10bit.mp4", 4, pix_fmt="yuv420p10le"), "bit_depth"))
    fake, _ = fake_gpu()
    session = nvdec.NvdecSession(0, Windowing(frames=2), SIZE, probes)
    for path, category in cases:
        with pytest.raises(NvdecUnsupported) as info:
            list(session.clips("video", str(path)))
        assert info.value.category == category, (path.name, info.value.reason)
    assert fake.demuxers_opened == fake.decoders_created == 0


def test_a_helper_that_dies_fails_its_file_for_the_gpu_and_the_pool_starts_anew(files, probes):
    path = str(files["ts_no_bframes"])
    first = probes.probe(path).probe
    for helper in list(probes._helpers):
        helper.process.kill()
    with pytest.raises(NvdecUnsupported) as info:
        probes.probe(path)
    assert info.value.category == "stream_error" and "died" in info.value.reason
    assert probes.probe(path).probe.packet_pts == first.packet_pts


def test_the_pool_registers_nothing_with_multiprocessing_s_resource_tracker(files, monkeypatch):
    """Before: a ProcessPoolExecutor, its queues' five named semaphores registered with the resource tracker. A Ray
    actor's end kills the tracker while the actor closes (seen on CPU with Ray 2.60: alive as the actor's __del__
    began, gone 10 ms later), so each semaphore released after that printed a KeyError traceback, five per actor.
    The helpers now talk through pipes: nothing is registered."""
    from multiprocessing import resource_tracker

    from iv2trt.decode.probe_pool import ProbePool

    registered: list[str] = []
    monkeypatch.setattr(resource_tracker, "register", lambda name, rtype: registered.append(rtype))
    pool = ProbePool(2)
    try:
        assert pool.probe(str(files["ts_no_bframes"])).probe.packet_pts
    finally:
        pool.close()
    assert registered == []


def test_a_helper_that_hangs_on_a_file_is_killed_at_close(files, tmp_path, caplog):
    """A helper stuck on a file (here a FIFO nobody writes: a read that never returns) does not hold the pipeline's
    close: close() waits its timeout, kills it and says so; the session waiting on it gets a stream_error."""
    import os
    import threading
    import time

    from iv2trt.decode.probe_pool import ProbePool

    fifo = tmp_path / "hangs.mp4"
    os.mkfifo(fifo)
    pool = ProbePool(1).start()
    pool.wait_started(60)
    outcome: list = []

    def probe() -> None:
        try:
            pool.probe(str(fifo))
        except NvdecUnsupported as exc:
            outcome.append(exc.category)

    waiting = threading.Thread(target=probe)
    waiting.start()
    time.sleep(1.0)  # the helper is inside the open
    started = time.perf_counter()
    with caplog.at_level("WARNING", "iv2trt.decode.probe_pool"):
        pool.close(timeout=1.0)
    assert time.perf_counter() - started < 5
    assert "did not stop within 1 s; killed" in caplog.text
    waiting.join(10)
    assert outcome == ["stream_error"] and not waiting.is_alive()


def test_a_helper_s_pipe_is_closed_once_and_never_under_a_reading_thread():
    """close() kills a hung helper while a session's thread waits in ask(): the pipe stays open until that read
    returns and is closed by that thread, once; the session's own clean-up (end again) closes nothing twice.
    (Before, both threads closed it: the second close raised EBADF out of the session's thread.)"""
    import errno
    import threading

    from iv2trt.decode.probe_pool import _Helper

    class Conn:
        def __init__(self):
            self.closes, self.reading, self.release = 0, threading.Event(), threading.Event()

        @property
        def closed(self):
            return self.closes > 0

        def send(self, obj):
            if self.closed:
                raise OSError(errno.EBADF, "handle is closed")

        def recv(self):
            if self.closed:
                raise OSError(errno.EBADF, "read of a closed descriptor")
            self.reading.set()
            self.release.wait(10)
            raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")  # the helper was killed

        def close(self):
            if self.closed:
                raise OSError(errno.EBADF, "Bad file descriptor")
            self.closes += 1

    class Process:
        def __init__(self, **kwargs):
            pass

        def start(self):
            pass

        def join(self, timeout=None):
            pass

        def is_alive(self):
            return False

    parent = Conn()
    context = type("Context", (), {"Pipe": lambda self: (parent, Conn()), "Process": lambda self, **kw: Process()})()
    helper = _Helper(context)
    errors: list = []

    def session() -> None:
        try:
            helper.ask("hung.mp4")
        except (EOFError, OSError) as exc:  # what ProbePool.probe turns into stream_error
            errors.append(exc)
            try:
                helper.end(0)  # ProbePool._replace
            except OSError as again:
                errors.append(again)

    thread = threading.Thread(target=session)
    thread.start()
    assert parent.reading.wait(10)
    assert helper.end(0) and parent.closes == 0  # ProbePool.close: the reading thread still has the pipe
    parent.release.set()
    thread.join(10)
    assert [type(e) for e in errors] == [ConnectionResetError] and parent.closes == 1
    with pytest.raises(EOFError, match="stopped"):
        helper.ask("next.mp4")  # an ended helper takes nothing more


def test_a_pool_whose_helpers_cannot_start_probes_in_the_calling_thread(files, caplog):
    """Helpers that die as they start (a broken environment) leave the demux pass to the sessions' threads, as with
    no helper processes, instead of a wait that never ends."""
    import multiprocessing as mp

    from iv2trt.decode.probe_pool import ProbePool

    class Dying:  # a context whose processes exit at once
        Pipe = staticmethod(mp.get_context("spawn").Pipe)

        @staticmethod
        def Process(target, args, name, daemon):
            return mp.get_context("spawn").Process(target=os._exit, args=(3,), name=name, daemon=daemon)

    import os

    pool = ProbePool(2, Dying())
    with caplog.at_level("WARNING", "iv2trt.decode.probe_pool"):
        probed = pool.probe(str(files["ts_no_bframes"]))
        pool.close()
    assert probed.probe.packet_pts and "died as it started (exit code 3)" in caplog.text
