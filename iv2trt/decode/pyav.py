"""Reading clips with PyAV (FFmpeg) on the CPU.

Frame timestamps come from a demux-only pass over the packets (cheap: nothing is decoded), so frame counts never
rely on container headers. Needed frames are then decoded by seeking to the keyframe before them when that skips
work, and non-reference frames no clip needs are not decoded at all; decoding stops after the last needed frame.
`VideoProbe` (the demux pass) is shared with the GPU decoder (nvdec.py); which frames are needed is clips.py's
plan. Images are one-frame clips; a folder of images is a video (frames in name order)."""
from __future__ import annotations

import bisect
import functools
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .clips import FOLDER_FPS, Clip, ClipAssembler, DecodeError, Windowing, plan_by_count, plan_clips
from .inputs import IMAGE_EXTENSIONS


def _rotate(rgb: np.ndarray, ccw_degrees: float) -> np.ndarray:
    k = int(round(ccw_degrees / 90.0)) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _stream_rotation(stream) -> float:
    """Counter-clockwise rotation from the legacy `rotate` tag (clockwise degrees) when frames carry none."""
    try:
        return -float(stream.metadata.get("rotate", 0))
    except (TypeError, ValueError):
        return 0.0


def _open(path: str):
    import av

    if not os.path.exists(path):
        raise DecodeError("file not found")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise DecodeError("empty file (0 bytes)")
    try:
        container = av.open(path)
    except av.FFmpegError as exc:
        raise DecodeError(f"not a readable video or image ({exc.__class__.__name__}: {exc})") from None
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]  # (read before close empties them)
        container.close()
        raise DecodeError(f"no video stream (has: {', '.join(kinds)})")
    return container


def video_stream(container):
    """The stream FFmpeg judges the file's video (av_find_best_stream: not a cover picture; the one NVDEC's
    demuxer takes too), which need not be the first."""
    return container.streams.best("video") or container.streams.video[0]


@dataclass
class VideoProbe:
    """What a demux-only pass (nothing decoded) learns of a video stream: enough to plan its reads on either
    decoder (PyAV here, NVDEC in nvdec.py), so both read the same frames for the same clips."""

    codec: str                       # the codec's name (FFmpeg's codec id, e.g. "av1"; not the decoder's, "libdav1d")
    container: str                   # the demuxer's name(s), e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    pix_fmt: str | None
    width: int
    height: int
    colorspace: int
    color_range: int
    time_base: float | None
    rate: float | None
    packet_pts: list[int | None]    # every video packet, in decode order
    keyframes: list[int]             # pts of keyframe packets, sorted
    packet_pos: list[int] = field(default_factory=list)         # byte position of each packet (-1: unknown)
    packet_discard: list[bool] = field(default_factory=list)    # packets an edit list cuts: decoders drop their frames
    # the container's timestamps number the packets in decode order (AVI keeps no presentation times) while the
    # codec reorders frames (B-frames): they do not give the frames' order
    decode_order_pts: bool = False

    @property
    def seekable(self) -> bool:
        """Timestamps identify every frame: frames can be found by pts after a seek."""
        pts = self.packet_pts
        return (bool(self.time_base) and len(pts) > 1 and all(p is not None for p in pts)
                and len(set(pts)) == len(pts) and not self.decode_order_pts)

    @functools.cached_property
    def pts(self) -> list[int]:
        """Frame timestamps in presentation order (frame i of the plans has pts[i]); needs `seekable`."""
        return sorted(self.packet_pts)

    @functools.cached_property
    def index_of(self) -> dict[int, int]:
        """The frame index of each timestamp (inverse of `pts`)."""
        return {p: i for i, p in enumerate(self.pts)}

    @functools.cached_property
    def discarded_pts(self) -> set[int]:
        """Timestamps of the packets an edit list discards: decoded, never output."""
        return {p for p, d in zip(self.packet_pts, self.packet_discard) if d}

    @functools.cached_property
    def keyframe_indices(self) -> list[int]:
        """Frame indices of the keyframes, sorted: where a seek can land."""
        return sorted(self.index_of[k] for k in self.keyframes if k in self.index_of)

    def plan(self, w: Windowing) -> list[tuple[list[int], float, float]]:
        """The clips of this video (frame indices in presentation order, window start and end in seconds),
        from the frames' timestamps (variable frame rate works)."""
        pts = self.pts
        times = (np.asarray(pts, np.float64) - pts[0]) * self.time_base
        return plan_clips(times, _duration(times, self.rate), w)

    def plan_by_count(self, w: Windowing) -> list[tuple[list[int], float, float]]:
        """The clips when timestamps cannot be trusted: frame i at i / frame rate."""
        return plan_by_count(len(self.packet_pts), self.rate or FOLDER_FPS, w)


def stream_header(container, stream) -> VideoProbe:
    """The stream's format and colour metadata from the container's headers, before any packet is read (the packet
    lists are empty)."""
    cc = stream.codec_context
    rate = stream.average_rate
    codec = getattr(cc.codec, "canonical_name", None) or cc.name
    return VideoProbe(codec=codec, container=container.format.name, pix_fmt=cc.pix_fmt, width=cc.width,
                      height=cc.height, colorspace=int(cc.colorspace or 2), color_range=int(cc.color_range or 0),
                      time_base=float(stream.time_base) if stream.time_base else None,
                      rate=float(rate) if rate else None, packet_pts=[], keyframes=[],
                      decode_order_pts=container.format.name == "avi" and bool(cc.has_b_frames))


def probe_stream(container, stream) -> VideoProbe:
    """Scan the packets of `stream` (demux only) and read its format and colour metadata."""
    probe = stream_header(container, stream)
    keys = []
    for packet in container.demux(stream):
        if packet.size == 0:  # flush packet
            continue
        probe.packet_pts.append(packet.pts)
        probe.packet_pos.append(-1 if packet.pos is None else packet.pos)
        probe.packet_discard.append(bool(getattr(packet, "is_discard", False)))
        if packet.is_keyframe and packet.pts is not None:
            keys.append(packet.pts)
    probe.keyframes = sorted(keys)
    return probe


def probe_video(path: str, accept: Callable[[VideoProbe], Any] | None = None,
                header: Callable[[VideoProbe], Any] | None = None,
                first_frame: Callable[[Any], Any] | None = None) -> tuple[VideoProbe, float]:
    """(probe, counter-clockwise rotation in degrees) of a video file, for a decoder other than PyAV. The
    rotation of the display matrix is only attached to decoded frames, so the first frame is decoded
    (one keyframe, on the CPU). A decoder that cannot take the file may refuse it (raise) early: `header(probe)`
    runs on the container's headers before any packet is read (format, size, codec), `accept(probe)` after the
    demux pass (timestamps) and before anything is decoded. `first_frame(frame)` then sees the decoded first
    frame (after its rotation was read; it may change it). Raises DecodeError."""
    import av

    container = _open(path)
    try:
        stream = video_stream(container)
        try:
            if header is not None:
                header(stream_header(container, stream))
            probe = probe_stream(container, stream)
            if not probe.packet_pts:
                raise DecodeError("no video frames")
            if accept is not None:
                accept(probe)
            if probe.seekable:
                k = 0 if probe.keyframe_indices else -1
                first = next(_decode_from_keyframe(container, stream, probe, k, set(), False), None)
            else:
                container.seek(0, stream=stream, backward=True)
                first = next(container.decode(stream), None)
        except av.FFmpegError as exc:
            raise DecodeError(f"unreadable stream ({exc})") from None
        rotation = (first.rotation if first is not None else 0) or _stream_rotation(stream)
        if first_frame is not None:
            first_frame(first)
        return probe, float(rotation)
    finally:
        container.close()


class _FormatChanged(DecodeError):
    """A frame whose size or pixel format differs from the stream's (a resolution switch mid-stream): its planes do
    not stack with the others'."""


class _FrameArrays:
    """What a clip holds of each decoded frame: RGB (rotated), as the CPU path hands the resize; or, with
    `planes` and a 4:2:0 stream of gpu_frames.PLANAR_FORMATS and even size, its raw Y/U/V planes
    (gpu_frames.yuv420_planes) for the GPU to convert, rotate and resize, the clips' `extra["yuv"]` saying how.
    A 10/12-bit stream's chroma siting is read off its first frame; where no conversion here reproduces
    swscale's, the stream comes as RGB from its first frame on. A frame of another size than the first (a
    resolution switch mid-stream) is scaled to the first's size in RGB (swscale, bicubic), so that a clip's
    frames stack; as planes it raises _FormatChanged."""

    def __init__(self, stream, probe: VideoProbe, planes: bool):
        from .colorspace import pix_fmt_layout, surface_converter
        from .gpu_frames import PLANAR_FORMATS

        self.rotation = _stream_rotation(stream)
        self.planes = planes and probe.pix_fmt in PLANAR_FORMATS and not probe.width % 2 and not probe.height % 2
        try:
            surface_converter(probe.colorspace, probe.color_range, probe.pix_fmt)
        except ValueError:  # a matrix the GPU conversion does not take: RGB from swscale, as ever
            self.planes = False
        self.size = None  # the first RGB frame's (width, height): later ones of another size are scaled to it
        self.high_depth = (pix_fmt_layout(probe.pix_fmt) or (8,))[0] > 8
        self.yuv = {"colorspace": probe.colorspace, "color_range": probe.color_range, "pix_fmt": probe.pix_fmt,
                    "height": probe.height, "width": probe.width, "rotation": 0.0}

    def __call__(self, frame) -> np.ndarray:
        if self.planes:
            from .gpu_frames import yuv420_planes

            planes = yuv420_planes(frame)
            if planes is None or planes.shape != (self.yuv["height"] * 3 // 2, self.yuv["width"]):
                raise _FormatChanged(f"frame format {frame.format.name} {frame.width}x{frame.height} differs from the "
                                     "stream's")
            if self.high_depth and "siting" not in self.yuv:
                rgb = self._rgb(frame)  # (the siting probe overwrites the frame)
                from .colorspace import swscale_chroma_siting

                self.yuv["siting"] = swscale_chroma_siting(frame)
                if self.yuv["siting"] is None:  # swscale filters this chroma in a way not reproduced here
                    self.planes = False
                    return rgb
            self.yuv["rotation"] = float(frame.rotation or self.rotation)
            return planes
        return self._rgb(frame)

    def _rgb(self, frame) -> np.ndarray:
        self.size = self.size or (frame.width, frame.height)
        if (frame.width, frame.height) == self.size:
            rgb = frame.to_ndarray(format="rgb24")
        else:
            rgb = frame.reformat(*self.size, format="rgb24", interpolation="BICUBIC").to_ndarray()
        return _rotate(rgb, frame.rotation or self.rotation)

    def mark(self, clip: Clip) -> Clip:
        if self.planes:
            clip.extra["yuv"] = dict(self.yuv)
        return clip


def read_video_clips(path: str, w: Windowing, planes: bool = False, threads: int = 0) -> Iterator[Clip]:
    """Yield the clips of one video or image file in window order (with `planes`, 4:2:0 video as raw
    planes: _FrameArrays; `threads`: FFmpeg's decoding threads, 0 for its own choice). Raises DecodeError."""
    import av

    container = _open(path)
    try:
        stream = video_stream(container)
        _threads(stream, threads)
        try:
            probe = probe_stream(container, stream)
        except av.FFmpegError as exc:
            raise DecodeError(f"unreadable stream ({exc})") from None
        if not probe.packet_pts:
            raise DecodeError("no video frames")
        arrays = _FrameArrays(stream, probe, planes)
        if probe.seekable:
            yielded = 0
            try:
                for clip in _clips_by_pts(container, stream, probe, w, arrays, _skips_per_packet(stream)):
                    yielded += 1
                    yield arrays.mark(clip)
                return
            except _FormatChanged:
                raise
            except DecodeError:
                if yielded:
                    raise
            # seeking failed before any clip came out: decode the file from its start instead
        container.close()
        container = _open(path)
        stream = video_stream(container)
        _threads(stream, threads)
        for clip in _clips_sequential(container, stream, probe, w, arrays):
            yield arrays.mark(clip)
    except av.FFmpegError as exc:
        raise DecodeError(f"decoding failed ({exc.__class__.__name__}: {exc})") from None
    finally:
        container.close()


def _skips_per_packet(stream) -> bool:
    """Whether unneeded non-reference frames may be skipped: FFmpeg's own decoders apply skip_frame to the packet it
    is set for. External libraries are not asked to (PyAV's libdav1d applies it to frames decoded later, and a
    needed frame came out as its neighbour). HEVC only with one temporal sub-layer: FFmpeg's NONREF drops every
    sub-layer non-reference (`_N`) picture, which pictures of a higher sub-layer may still refer to (H.265 3.132);
    with several sub-layers (phones' high-frame-rate recordings have them), or where the headers do not say, every
    picture is decoded."""
    cc = stream.codec_context
    if cc.name.startswith("lib"):
        return False
    if cc.name == "hevc":
        return hevc_temporal_layers(bytes(cc.extradata or b"")) == 1
    return True


def hevc_temporal_layers(extradata: bytes) -> int | None:
    """Temporal sub-layers of an HEVC stream from its extradata: an hvcC box's numTemporalLayers (MP4, MKV), or
    sps_max_sub_layers_minus1 + 1 of the first SPS in Annex B parameter sets (MPEG-TS); None when it does not say."""
    if len(extradata) >= 23 and extradata[0] == 1:  # HEVCDecoderConfigurationRecord
        return (extradata[21] >> 3) & 0x7 or None
    at = 0
    while True:  # Annex B: start codes 00 00 01, each NAL unit's 2-byte header, SPS = type 33
        at = extradata.find(b"\x00\x00\x01", at)
        if at < 0 or at + 5 >= len(extradata):
            return None
        if (extradata[at + 3] >> 1) & 0x3F == 33:
            return ((extradata[at + 5] >> 1) & 0x7) + 1
        at += 3


def _threads(stream, threads: int) -> None:
    """Frame and slice threads, `threads` of them (0: FFmpeg's choice, about one per core)."""
    stream.thread_type = "AUTO"
    if threads > 0:
        stream.thread_count = threads


def _duration(times: np.ndarray, rate_fps: float | None) -> float:
    step = float(np.median(np.diff(times))) if len(times) > 1 else (1.0 / rate_fps if rate_fps else 0.0)
    return float(times[-1] + step)


def _decode_needed(container, stream, needed_pts: set[int], skip_unneeded: bool, key_pts: int | None = None):
    """Frames from the current position on. With `skip_unneeded`, non-reference frames no clip needs are not
    decoded at all (FFmpeg's skip_frame=NONREF, set per packet): nothing refers to them, so every other frame
    decodes the same. With `key_pts`, packets before that keyframe's are not decoded (`from_keyframe`)."""
    cc = stream.codec_context
    cc.skip_frame = "DEFAULT"
    packets = container.demux(stream)
    for packet in packets if key_pts is None else from_keyframe(packets, key_pts):
        if skip_unneeded and packet.pts is not None:
            cc.skip_frame = "DEFAULT" if packet.pts in needed_pts else "NONREF"
        yield from cc.decode(packet)


def from_keyframe(packets, key_pts: int):
    """`packets` from the keyframe whose timestamp is `key_pts` on; none if a later keyframe comes first (the seek
    landed past it). What a seek lands on before that keyframe (MPEG-TS lands a little after the keyframe before,
    so a GOP's packets less one) cannot be decoded without what came before it: it is read, not decoded."""
    packets = iter(packets)
    for packet in packets:
        if packet.is_keyframe and packet.pts is not None and packet.pts >= key_pts:
            if packet.pts > key_pts:
                return
            yield packet
            yield from packets
            return


def _before_start(probe: VideoProbe) -> int:
    """A timestamp before the stream's first frame: a seek there lands at its start."""
    return min(0, probe.pts[0] - 1)  # (pts is sorted)


def _decode_from_keyframe(container, stream, probe: VideoProbe, k: int, needed_pts: set[int], skip_unneeded: bool,
                          seeks: dict | None = None):
    """Frames decoded from the k-th keyframe (k < 0: the stream's start) on, packets before it read but not decoded.
    A seek may land after the keyframe asked for (MPEG-TS: FFmpeg's seek by timestamp finds the next keyframe):
    then it seeks to the keyframe before, and so on to the stream's start. The first frame with a known timestamp is
    peeked at to know; frames an edit list discards (never output) in between do not count as missed. `seeks`: what
    this read has learnt (where seeks land late, the next seek aims a keyframe earlier at once)."""
    pts, index_of, key_index = probe.pts, probe.index_of, probe.keyframe_indices
    want = key_index[k] if k >= 0 else 0
    early = 1 if seeks is not None and seeks.get("late") else 0
    for j in range(k - early if k > 0 else k, -2, -1):
        container.seek(pts[key_index[j]] if j >= 0 else _before_start(probe), stream=stream, backward=True)
        # (from the stream's start every packet is decoded, whatever its flags say)
        frames = _decode_needed(container, stream, needed_pts, skip_unneeded, pts[want] if j >= 0 else None)
        head = []
        for frame in frames:
            head.append(frame)
            if frame.pts in index_of:
                break
        landed = index_of.get(head[-1].pts) if head else None
        missed = landed is not None and any(pts[i] not in probe.discarded_pts for i in range(want, landed))
        if head and not missed or j < 0:  # (from the stream's start, what comes is all there is)
            return itertools.chain(head, frames)
        if seeks is not None and j == k:
            seeks["late"] = True
    raise AssertionError("unreachable")


def _clips_by_pts(container, stream, probe: VideoProbe, w: Windowing, arrays, skip_unneeded: bool = True):
    pts, index_of, key_index = probe.pts, probe.index_of, probe.keyframe_indices
    asm = ClipAssembler(probe.plan(w))
    needed = asm.needed()
    needed_pts = {pts[i] for i in needed}
    frames_iter, cur_i, cur_frame = None, -1, None
    seeks: dict = {}
    for target in needed:
        while True:
            k = bisect.bisect_right(key_index, target) - 1
            keyframe = key_index[k] if k >= 0 else 0
            if frames_iter is None or keyframe > cur_i:  # a keyframe lies ahead: seeking skips decoding work
                frames_iter = _decode_from_keyframe(container, stream, probe, k, needed_pts, skip_unneeded, seeks)
                cur_i, cur_frame = -1, None
            while cur_i < target:
                frame = next(frames_iter, None)
                if frame is None:
                    raise DecodeError(f"truncated: frame {target} of {len(pts)} could not be decoded")
                if frame.pts in index_of:
                    cur_i, cur_frame = index_of[frame.pts], frame
            if cur_i > target and skip_unneeded:  # a needed frame did not come out: decode again, skipping nothing
                skip_unneeded, frames_iter = False, None
                continue
            break
        # cur_i > target only when the decoder never output `target`: the next frame stands in
        yield from asm.add(target, arrays(cur_frame))


def _clips_sequential(container, stream, probe: VideoProbe, w: Windowing, arrays):
    """Streams whose packets lack timestamps: decode everything once, frame numbers by order."""
    asm = ClipAssembler(probe.plan_by_count(w))
    needed = set(asm.needed())
    last = None
    count = 0
    for i, frame in enumerate(container.decode(stream)):
        count = i + 1
        if i in needed:
            last = arrays(frame)
            yield from asm.add(i, last)
    if count == 0:
        raise DecodeError("no decodable video frames")
    for i in sorted(needed):  # fewer decoded frames than packets: repeat the last decoded one
        if i >= count and last is not None:
            yield from asm.add(i, last)


def list_frame_folder(folder: str) -> list[str]:
    return sorted(str(p) for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def read_folder_clips(folder: str, w: Windowing) -> Iterator[Clip]:
    """A folder of images as a video at FOLDER_FPS; only the sampled images are decoded."""
    files = list_frame_folder(folder)
    if not files:
        raise DecodeError("folder has no image frames")
    for idx, t0, t1 in plan_by_count(len(files), FOLDER_FPS, w):
        cache = {i: read_image(files[i]) for i in sorted(set(idx))}
        shapes = {f.shape for f in cache.values()}
        if len(shapes) > 1:
            raise DecodeError(f"frames of different sizes in one folder: {sorted(shapes)}")
        yield Clip(np.stack([cache[i] for i in idx]), idx, t0, t1)


def read_image(path: str) -> np.ndarray:
    """One image file -> uint8 RGB [H, W, 3] (PyAV's image demuxers; EXIF orientation is not applied)."""
    clips = list(read_video_clips(path, Windowing(frames=1)))
    return clips[0].frames[0]


def read_clips(path: str, w: Windowing, planes: bool = False, threads: int = 0) -> Iterator[Clip]:
    """Clips of a video file, an image (one clip of one frame) or a folder of frames; with `planes`, 4:2:0
    video clips hold raw planes, and `threads` decode a video (read_video_clips)."""
    if os.path.isdir(path):
        yield from read_folder_clips(path, w)
    elif Path(path).suffix.lower() in IMAGE_EXTENSIONS:
        rgb = read_image(path)
        yield Clip(rgb[None], [0], 0.0, 0.0)
    elif planes:
        yielded = 0
        try:
            for clip in read_video_clips(path, w, True, threads):
                yielded += 1
                yield clip
        except _FormatChanged:  # the frames' size changed mid-stream: the clips from there on as RGB
            yield from itertools.islice(read_video_clips(path, w, False, threads), yielded, None)
    else:
        yield from read_video_clips(path, w, False, threads)
