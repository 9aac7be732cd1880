"""GPU decoding: one input -> its clips as uint8 [T, S, S, 3] tensors on the GPU, pixels never in host memory.

Videos go through the GPU's video decoders (NVDEC, driven by PyNvVideoCodec); JPEG images and frame folders
of JPEGs through nvJPEG (torchvision.io.decode_jpeg on CUDA) when torchvision has it. A video is planned
exactly as on the CPU path (pyav.VideoProbe: PyAV's demux pass, run in helper processes by probe_pool.py, gives
the frame timestamps and each clip's frame indices); PyNvVideoCodec's demuxer feeds the decoder. Each packet is
recognised by its byte position in the file (FrameMatcher) and handed to NVDEC labelled with its frame number, so
decoded frames are matched to the plan whatever timestamps the two demuxers compute. Only needed frames are
converted: NV12, P016 or YUV444 -> RGB with the CPU path's own arithmetic for the stream's pixel format, matrix,
range and chroma siting (colorspace.py), rotation, resize (transforms.resize_planar), all on one CUDA stream per
session. H.264 non-reference frames no clip needs are not sent to the decoder at all, and decoding stops after the
last needed frame.

Whether NVDEC takes a video is decided from the container's headers (before any packet is read where the demux
pass runs in the session's thread; after it, before any NVDEC work, where it runs in a helper), by codec (FFmpeg's
codec, not its decoder), bit depth, chroma format and size against what this GPU's NVDEC reports
(GetDecoderCaps, asked once per GPU model in the process; `format_refusal`). Every file the GPU path does not
decode raises NvdecError (NvdecUnsupported when refused before decoding) with a `category`
(fallbacks.py); the job sends it to the CPU path (workers.py), and can count fallbacks by category
(fallbacks.count_fallbacks).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..capture_guard import GUARD
from .clips import DecodeError, Windowing
from .colorspace import pix_fmt_layout
from .fallbacks import NvdecError, NvdecUnsupported, refuse_timestamps
from .inputs import IMAGE_EXTENSIONS
from .probe_pool import ProbePool
from .pyav import list_frame_folder

log = logging.getLogger(__name__)

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
# FFmpeg codec name (AVCodecDescriptor, not the decoder: "av1" whether libdav1d or libaom decodes it on the CPU)
# -> PyNvVideoCodec's cudaVideoCodec member
NVDEC_CODECS = {"h264": "H264", "hevc": "HEVC", "vp9": "VP9", "av1": "AV1", "vp8": "VP8", "mpeg4": "MPEG4",
                "mpeg2video": "MPEG2", "mpeg1video": "MPEG1", "vc1": "VC1"}
# chroma format -> cudaVideoChromaFormat (Monochrome, 420, 422, 444 in cuviddec.h's order)
CHROMA_FORMATS = {"400": 0, "420": 1, "422": 2, "444": 3}
CONVERTED_CHROMA = ("420", "444")  # formats colorspace.py turns into the CPU path's RGB
CONVERTED_DEPTHS = (8, 10, 12)

@functools.cache
def nvdec_unavailable(gpu: int = 0) -> str | None:
    """Why NVDEC cannot be used here (no GPU, no PyNvVideoCodec, no libnvcuvid), or None when it can. Probed
    once per process (the stage's early check, the job's decoder plan and the benchmark ask it again)."""
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed"
    if not torch.cuda.is_available() or torch.cuda.device_count() <= gpu:
        return "no CUDA GPU is visible to PyTorch"
    try:
        import PyNvVideoCodec as nvc
    except ImportError:
        return "PyNvVideoCodec is not installed (pip install -r requirements-gpu.txt)"
    except Exception as exc:  # the module loads libcuda / libnvcuvid
        return f"PyNvVideoCodec cannot load ({type(exc).__name__}: {exc})"
    try:
        caps = nvc.GetDecoderCaps(gpuid=gpu, codec=nvc.cudaVideoCodec.H264, bitdepth=8)
    except Exception as exc:
        return (f"NVDEC cannot be queried ({type(exc).__name__}: {exc}); "
                "is libnvcuvid (the driver's video library) there?")
    if not caps.get("supported", 1):
        return "this GPU's NVDEC does not decode H.264"
    return None


def gpu_jpeg_available() -> bool:
    """torchvision's nvJPEG decoder is importable (the maintained GPU JPEG library we use)."""
    try:
        from torchvision.io import decode_jpeg  # noqa: F401
    except Exception:
        return False
    return True


def gpu_takes(kind: str, path: str, jpeg: bool) -> bool:
    """Whether an input of this kind goes to the GPU decoders at all (videos; JPEGs when `jpeg`)."""
    if kind == "video":
        return Path(path).suffix.lower() not in IMAGE_EXTENSIONS
    if kind == "image":
        return jpeg and Path(path).suffix.lower() in JPEG_EXTENSIONS
    if kind == "frames":
        return jpeg
    return False


def h264_droppable(data: bytes) -> bool:
    """An H.264 access unit (Annex B) whose slices have nal_ref_idc 0: no other frame refers to it."""
    i = 0
    while True:
        j = data.find(b"\x00\x00\x01", i)
        if j < 0 or j + 3 >= len(data):
            return False
        header = data[j + 3]
        if header & 0x1F in (1, 5):  # coded slice (non-IDR, IDR)
            return (header >> 5) & 3 == 0
        i = j + 3


# --- what this GPU's NVDEC takes ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StreamFormat:
    """What decides whether NVDEC takes a video, from the container's headers: codec, bit depth and chroma format of
    the pixel format FFmpeg decodes it to (None when unknown), size."""

    codec: str
    bit_depth: int | None
    chroma: str | None
    width: int
    height: int
    container: str = ""

    @classmethod
    def of(cls, probe) -> StreamFormat:
        depth, chroma = pix_fmt_layout(probe.pix_fmt) or (None, None)
        return cls(probe.codec, depth, chroma, probe.width, probe.height, probe.container)


# (codec, bit depth, chroma format) -> GetDecoderCaps' answer: {"supported": 0/1, "width_max", "height_max",
# "mb_num_max", "width_min", "height_min", ...}; {"supported": 0, "error": text} where the query raised
CapsLookup = Callable[[str, int, str], dict]


def format_refusal(fmt: StreamFormat, caps: CapsLookup) -> NvdecUnsupported | None:
    """Why NVDEC does not take a stream of this format on the GPU `caps` describes, or None when it does. The
    category says what: the codec (this GPU decodes none of it at 8-bit 4:2:0), its bit depth (not at 4:2:0 in
    this depth), its chroma format (not at this depth in this format, or no RGB conversion here), its size."""
    name = f"{fmt.codec} {fmt.bit_depth or '?'}-bit {fmt.chroma or '?'}"
    if fmt.codec not in NVDEC_CODECS:
        return NvdecUnsupported(f"NVDEC does not decode {fmt.codec}", "codec")
    if fmt.codec == "mpeg4" and "avi" in fmt.container:
        return NvdecUnsupported("MPEG-4 Part 2 in AVI (packed B-frames, which NVDEC's parser does not unpack)", "codec")
    if fmt.chroma not in CONVERTED_CHROMA:
        return NvdecUnsupported(f"{name} (the GPU path converts 4:2:0 and 4:4:4)", "chroma")
    if fmt.bit_depth not in CONVERTED_DEPTHS:
        return NvdecUnsupported(f"{name} (the GPU path converts 8, 10 and 12 bits)", "bit_depth")
    if fmt.width % 2 or fmt.height % 2:
        return NvdecUnsupported(f"odd frame size {fmt.width}x{fmt.height}", "size")

    for depth, chroma, category in ((8, "420", "codec"), (fmt.bit_depth, "420", "bit_depth"),
                                    (fmt.bit_depth, fmt.chroma, "chroma")):
        answer = caps(fmt.codec, depth, chroma)
        if not answer.get("supported", 0):
            what = (f"{fmt.codec} at all (its capability query says no even for 8-bit 4:2:0)" if category == "codec"
                    else f"{fmt.codec} {depth}-bit {chroma}")
            return NvdecUnsupported(f"this GPU's NVDEC does not decode {what}" + (
                f" ({answer['error']})" if answer.get("error") else ""), category)
    answer = caps(fmt.codec, fmt.bit_depth, fmt.chroma)
    lo_w, lo_h = answer.get("width_min", 0), answer.get("height_min", 0)
    hi_w, hi_h = answer.get("width_max", 1 << 30), answer.get("height_max", 1 << 30)
    if not (lo_w <= fmt.width <= hi_w and lo_h <= fmt.height <= hi_h):
        return NvdecUnsupported(f"{fmt.width}x{fmt.height} is outside NVDEC's {lo_w}x{lo_h} to {hi_w}x{hi_h} for "
                                f"{name}", "size")
    blocks = ((fmt.width + 15) // 16) * ((fmt.height + 15) // 16)
    if blocks > answer.get("mb_num_max", 1 << 30):
        return NvdecUnsupported(f"{fmt.width}x{fmt.height} has {blocks} macroblocks, over NVDEC's "
                                f"{answer['mb_num_max']} for {name}", "size")
    return None


_CAPS: dict[tuple[str, str, int, str], dict] = {}  # (GPU model, codec, bit depth, chroma) -> answer, per process
_CAPS_LOCK = threading.Lock()  # one query at a time: each creates a CUDA context holding the GIL (sampled on an H200,
                               # 8 sessions asking at a job's start held 15% of their threads' GIL time)


def gpu_caps(nvc, gpu: int, model: str | None = None) -> CapsLookup:
    """NVDEC's capabilities on GPU `gpu` as PyNvVideoCodec reports them, each question asked once per GPU model (its
    name) in the process. PyNvVideoCodec 2.x binds `GetDecoderCaps(gpuid=0, codec=cudaVideoCodec.H264,
    chromaformat=cudaVideoChromaFormat.420, bitdepth=8)` and returns cuvidGetDecoderCaps' fields as a dict
    ("supported", "width_max", "height_max", "mb_num_max", "width_min", "height_min", "num_decoder_engines", ...);
    it raises where the driver refuses the query (AV1 on an H100: "Codec not supported on this GPU"), which counts
    as not supported. Its source creates the query's context on device 0 whatever gpuid says, so on a machine of
    mixed GPUs the answer is device 0's."""
    if model is None:
        import torch

        model = torch.cuda.get_device_name(gpu)

    def lookup(codec: str, depth: int, chroma: str) -> dict:
        key = (model, codec, depth, chroma)
        if key in _CAPS:
            return _CAPS[key]
        with _CAPS_LOCK:
            if key in _CAPS:  # another session asked meanwhile
                return _CAPS[key]
            nv_codec = getattr(nvc.cudaVideoCodec, NVDEC_CODECS[codec])
            try:
                with GUARD.shared():
                    try:
                        answer = dict(nvc.GetDecoderCaps(gpuid=gpu, codec=nv_codec, bitdepth=depth,
                                                         chromaformat=_chroma_format(nvc, chroma)))
                    except TypeError:  # a build whose query takes no chroma format: 4:2:0's answer; decoder checks
                        answer = dict(nvc.GetDecoderCaps(gpuid=gpu, codec=nv_codec, bitdepth=depth))
                        answer["chroma_unchecked"] = chroma != "420"
                _CAPS[key] = answer
            except Exception as exc:  # noqa: BLE001 - the driver refuses the question: not supported
                _CAPS[key] = {"supported": 0, "error": _one_line(exc)}
        return _CAPS[key]

    return lookup


def _chroma_format(nvc, chroma: str):
    """PyNvVideoCodec's cudaVideoChromaFormat member for "400"/"420"/"422"/"444" (its pybind11 enum names them after
    cuviddec.h: Monochrome, 420, 422, 444; built from the value where a build names them otherwise)."""
    enum = nvc.cudaVideoChromaFormat
    members = getattr(enum, "__members__", {})
    for name in (chroma, f"YUV{chroma}", f"_{chroma}", "Monochrome" if chroma == "400" else ""):
        if name in members:
            return members[name]
    return enum(CHROMA_FORMATS[chroma])


# --- which frame of the plan a decoded frame is -----------------------------------------------------------------
class FrameMatcher:
    """Frame numbers (presentation-order positions of the demux pass, as the CPU path counts them) for the packets
    PyNvVideoCodec's demuxer reads and the frames NVDEC gives back.

    A packet is recognised by its byte position in the file, else by its timestamp (two FFmpeg builds may compute
    different timestamps for the same sample: edit lists, time bases of 1/1,000,000); it goes to NVDEC labelled
    with its frame number, which NVDEC hands back with the decoded frame. A label NVDEC garbles (no frame sent in
    this run has it) is repaired from the order NVDEC outputs frames in: presentation order, so it is the lowest
    frame still in flight. Frames out of order stop the file (timestamps): nothing can be trusted then.
    Where the CPU path's decoder gives no frame (frames an edit list cuts, which FFmpeg drops; frames the decoder
    passes over), the next decoded frame stands in, as it does there."""

    def __init__(self, probe, needed: Iterable[int]):
        self.index_of = probe.index_of
        pts, pos = probe.packet_pts, probe.packet_pos
        usable = len(pos) == len(pts) and min(pos, default=-1) >= 0 and len(set(pos)) == len(pos)
        self.by_pos = {p: self.index_of[t] for p, t in zip(pos, pts)} if usable else {}
        self.discard = {self.index_of[t] for t, cut in zip(pts, probe.packet_discard) if cut}
        self.needed = set(needed)
        self.repaired = 0                   # frames whose label NVDEC garbled
        self.start = self.index_of[pts[0]]  # the file's first packet in decode order
        self.restart()

    def identify(self, packet) -> int:
        """The frame number of a packet from PyNvVideoCodec's demuxer; NvdecError (timestamps) for a packet the demux
        pass did not see."""
        pos = getattr(packet, "pos", -1)
        index = self.by_pos.get(pos) if self.by_pos else None
        if index is None:
            index = self.index_of.get(packet.pts)
        if index is None:
            raise NvdecError(f"NVDEC's demuxer read a packet the demux pass did not see (byte {pos}, pts "
                             f"{packet.pts})", "timestamps")
        return index

    def restart(self, first: int | None = None) -> None:
        """A new run of the decoder from the keyframe with frame number `first` (a seek), or from the file's start."""
        self.first, self.last = self.start if first is None else first, -1
        self.sent: set[int] = set()
        self.in_flight: list[int] = []      # sent in this run, not decoded yet; sorted
        self.owed: list[int] = []           # needed frames passed over: the next decoded frame stands in

    def send(self, index: int) -> None:
        self.sent.add(index)
        bisect.insort(self.in_flight, index)

    def decoded(self, label: int) -> list[int]:
        """The needed frame numbers a decoded frame serves: its own, after those of needed frames the decoder passed
        over (none for a frame no clip needs, or one no clip of this run may take)."""
        if label in self.sent:
            index = label
        elif self.in_flight:
            index = self.in_flight[0]
            self.repaired += 1
        else:
            self.repaired += 1
            return []
        if index < self.first:  # a leading picture of the keyframe this run started at: decoded from elsewhere
            if index in self.in_flight:
                self.in_flight.remove(index)
            return []
        if index <= self.last:
            raise NvdecError(f"NVDEC's frames came out of order (frame {index} after frame {self.last})",
                             "timestamps")
        cut = bisect.bisect_left(self.in_flight, index)
        passed = self.in_flight[:cut]
        self.in_flight = [i for i in self.in_flight[cut:] if i != index]
        self.owed += [i for i in passed if i >= self.first and i in self.needed]
        self.last = index
        if index in self.discard:  # cut by an edit list: FFmpeg drops it, the next frame stands in
            if index in self.needed:
                self.owed.append(index)
            return []
        served, self.owed = self.owed + [index] * (index in self.needed), []
        return served


class NvdecSession:
    """One NVDEC session (used by one thread at a time) and its CUDA stream; decoders are kept per stream format and
    reused from input to input. `clips(item)` yields (clip info, uint8 [T, S, S, 3] CUDA tensor, CUDA event
    recorded after the tensor was written)."""

    HEADER_BYTES = 4096   # enough of an access unit to reach its first slice header past SEI/SPS/PPS
    SEEK_MIN_FRAMES = 32  # seek only over this many frames or more (a seek drains the decoder)
    MAX_DECODERS = 4      # decoders kept per session (one per stream format)

    def __init__(self, gpu: int, windowing: Windowing, img_size: int, probes: ProbePool | None = None):
        import PyNvVideoCodec as nvc
        import torch

        self.nvc, self.torch = nvc, torch
        self.gpu, self.w, self.size = gpu, windowing, img_size
        self.probes = probes or ProbePool(0)  # where the demux pass runs (default: this thread)
        self.device = torch.device("cuda", gpu)
        self.stream = torch.cuda.Stream(self.device)
        self.caps = gpu_caps(nvc, gpu)
        self._decoders: dict[Any, Any] = {}
        self.frames_decoded = 0      # frames that came out of NVDEC (stats)
        self.frames_dropped = 0      # non-reference access units never decoded
        self.labels_repaired = 0     # frames NVDEC gave back with a label no frame in flight had

    # --- videos ----------------------------------------------------------------------------------------------
    def _refuse_format(self, header) -> None:
        """The demux pass's check of the container's headers (before any packet is read, where it runs here)."""
        refusal = format_refusal(StreamFormat.of(header), self.caps)
        if refusal is not None:
            raise refusal

    def _decoder(self, key: tuple):
        """This session's decoder for (codec, width, height, bit depth, chroma): one per stream format, kept for the
        next input of that format (reconfiguring a decoder to another size gave frames of the old size, and
        PyNvVideoCodec refuses to reconfigure bit depth or chroma), the least recently used dropped beyond
        MAX_DECODERS."""
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            with GUARD.shared():  # creating and releasing decoders synchronises the context, as decoding does
                decoder = self.nvc.CreateDecoder(gpuid=self.gpu, codec=key[0], cudacontext=0,
                                                 cudastream=self.stream.cuda_stream, usedevicememory=True)
                while len(self._decoders) >= self.MAX_DECODERS:
                    self._decoders.pop(next(iter(self._decoders)))
        self._decoders[key] = decoder  # most recently used last
        return decoder

    def _decode(self, decoder, packet=None) -> list:
        """The frames NVDEC gives for `packet` (None: drain it), with no CUDA graph capture running meanwhile."""
        with GUARD.shared():
            return decoder.Decode(self.nvc.PacketData() if packet is None else packet)

    def _drop(self, key: tuple) -> None:
        """Release the decoder of `key` (a failed one: a fresh one next time)."""
        with GUARD.shared():
            self._decoders.pop(key, None)

    def _flush(self, key: tuple) -> None:
        """End of an input: drain the decoder (an empty packet) so the next input starts clean; a decoder that
        fails to drain is dropped and made anew."""
        decoder = self._decoders.get(key)
        if decoder is None:
            return
        try:
            self._decode(decoder)
        except Exception as exc:  # noqa: BLE001 - a fresh decoder next time
            log.debug("NVDEC decoder dropped after a failed flush: %s", exc)
            decoder = None
            self._drop(key)

    def _converter(self, probe, sitings: list):
        """The stream's surface -> RGB conversion; NvdecUnsupported where the CPU path's is not reproduced."""
        from .colorspace import surface_converter

        siting = sitings[0] if sitings else (-513, -513)
        if siting is None:
            raise NvdecUnsupported(f"swscale filters the chroma of this {probe.pix_fmt} stream in a way not reproduced "
                                   "here", "chroma")
        try:
            conv = surface_converter(probe.colorspace, probe.color_range, probe.pix_fmt, siting)
        except ValueError as exc:
            raise NvdecUnsupported(str(exc), "chroma") from None
        if conv.layout == "p016" and not sitings:
            raise NvdecUnsupported("the first frame did not decode on the CPU (its chroma siting is unknown)",
                                   "stream_error")
        return conv

    def video_clips(self, path: str) -> Iterator[tuple[dict, Any, Any]]:
        from .clips import ClipAssembler
        from .colorspace import dense_surface
        from .gpu_frames import model_frames

        torch = self.torch
        # refused before anything is decoded on the GPU: format from the headers, then timestamps, then colour
        try:
            probed = self.probes.probe(path, header=self._refuse_format, accept=refuse_timestamps)
        except NvdecError:
            raise
        except DecodeError as exc:  # the demux pass's own (unreadable file, no video stream)
            raise NvdecUnsupported(exc.reason, "stream_error") from None
        probe, rotation = probed.probe, probed.rotation
        fmt = StreamFormat.of(probe)
        conv = self._converter(probe, probed.sitings)
        codec = getattr(self.nvc.cudaVideoCodec, NVDEC_CODECS[fmt.codec])
        keyframes = probe.keyframe_indices
        asm = ClipAssembler(probe.plan(self.w), stack=torch.stack)
        needed = asm.needed()
        needed_set = set(needed)
        matcher = FrameMatcher(probe, needed)
        turns = int(round(rotation / 90.0)) % 4
        drop = fmt.codec == "h264"
        surface_dtype = torch.uint8 if fmt.bit_depth == 8 else torch.uint16
        key = (codec, fmt.width, fmt.height, fmt.bit_depth, fmt.chroma)

        def surface_of(frame):
            surface = dense_surface(torch.from_dlpack(frame))
            if surface.dtype != surface_dtype or surface.shape[-2] != conv.rows(fmt.height) or \
                    surface.shape[-1] < fmt.width:
                raise NvdecError(f"NVDEC gave a {tuple(surface.shape)} {surface.dtype} surface for "
                                 f"{fmt.width}x{fmt.height} {probe.pix_fmt}", "chroma")
            return surface.clone()  # the decoder reuses its buffers

        def take(frames, got: set[int]) -> Iterator[tuple[dict, Any, Any]]:
            """Keep a copy of the needed frames among `frames` (their frame numbers into `got`); once a clip's
            frames are all there, convert and resize them together (a few kernels per clip, not per frame: the
            launches hold the GIL that the other sessions' threads need) and yield the clip."""
            for frame in frames:
                self.frames_decoded += 1
                served = [i for i in matcher.decoded(frame.getPTS()) if i not in got]
                if not served:
                    continue
                surface = surface_of(frame)
                for index in served:
                    got.add(index)
                    for clip in asm.add(index, surface):
                        done = torch.cuda.Event()
                        resized = model_frames(clip.frames, conv, fmt.height, fmt.width, turns, self.size)
                        done.record(self.stream)
                        yield {"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices}, resized, done

        try:
            demuxer = self.nvc.CreateDemuxer(filename=path)
        except Exception as exc:
            raise NvdecError(f"NVDEC demuxer cannot open it ({_one_line(exc)})") from None
        got: set[int] = set()
        fed, seeked_to, next_needed, seeking = -1, None, 0, True  # fed: latest frame (frame number) sent
        try:
            decoder = self._decoder(key)
            with torch.cuda.stream(self.stream):
                packets = iter(demuxer)
                while not asm.done:
                    while needed[next_needed] in got:
                        next_needed += 1
                    target = needed[next_needed]
                    keyframe = keyframes[bisect.bisect_right(keyframes, target) - 1] if keyframes else 0
                    if seeking and keyframe - fed > self.SEEK_MIN_FRAMES and keyframe != seeked_to:
                        # a keyframe lies well ahead: seeking skips decoding work
                        seeked_to = keyframe
                        yield from take(self._decode(decoder), got)  # what is in flight
                        try:  # PyNvVideoCodec's demuxer seeks to the keyframe at or before a frame number
                            packet = demuxer.Seek(seek_number(probe, keyframe))
                            landed = matcher.identify(packet)
                        except Exception as exc:  # noqa: BLE001 - decode in order instead
                            log.debug("NVDEC seek failed in %s: %s", path, _one_line(exc))
                            packet, landed = None, -1
                        if not fed < landed <= target:  # no seek, or a wrong one: decode in order instead
                            log.debug("NVDEC seek missed in %s; decoding it from the start", path)
                            seeking, fed = False, -1
                            demuxer = self.nvc.CreateDemuxer(filename=path)
                            packets = iter(demuxer)
                            matcher.restart()
                            continue
                        matcher.restart(landed)
                    else:
                        packet = next(packets, None)
                        # end of the stream (PyNvVideoCodec 2.2.4's demuxer hands some files an empty packet there,
                        # pts 0 at byte 0, before it stops): what the decoder still holds
                        if packet is None or not packet.bsl:
                            yield from take(self._decode(decoder), got)
                            break
                    index = matcher.identify(packet)
                    fed = max(fed, index)
                    # the frame after a needed one is kept too: it stands in if the needed one never comes out
                    if drop and packet.bsl and index not in needed_set and index - 1 not in needed_set and \
                            h264_droppable(ctypes.string_at(packet.bsl_data, min(packet.bsl, self.HEADER_BYTES))):
                        self.frames_dropped += 1
                        continue
                    packet.pts = index  # NVDEC hands the label back with the decoded frame
                    matcher.send(index)
                    yield from take(self._decode(decoder, packet), got)
        except DecodeError:
            decoder = None
            self._drop(key)
            raise
        except Exception as exc:  # a corrupt stream: the decoder is dropped, the input goes to the CPU path
            decoder = None
            self._drop(key)
            raise NvdecError(f"NVDEC failed ({_one_line(exc)})", _driver_category(exc)) from None
        finally:
            self._flush(key)
            self.labels_repaired += matcher.repaired
        if not asm.done:
            raise NvdecError(f"NVDEC returned {len(got)} of the {len(needed)} needed frames (truncated or corrupt "
                             "stream)", "frames_missing")

    # --- JPEG images and folders ------------------------------------------------------------------------------
    def jpeg_clips(self, path: str, kind: str) -> Iterator[tuple[dict, Any, Any]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        from ..transforms import resize_planar
        from .clips import FOLDER_FPS, plan_by_count

        torch = self.torch
        files = [path] if kind == "image" else list_frame_folder(path)
        if not files:
            raise NvdecError("folder has no image frames")
        if any(Path(f).suffix.lower() not in JPEG_EXTENSIONS for f in files):
            raise NvdecUnsupported("not all frames are JPEG")
        plan = [([0], 0.0, 0.0)] if kind == "image" else plan_by_count(len(files), FOLDER_FPS, self.w)
        with torch.cuda.stream(self.stream):
            for idx, t0, t1 in plan:
                unique = sorted(set(idx))
                try:
                    data = [torch.frombuffer(bytearray(Path(files[i]).read_bytes()), dtype=torch.uint8) for i in unique]
                    with GUARD.shared():  # nvJPEG synchronises too
                        images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                except Exception as exc:
                    raise NvdecError(f"nvJPEG cannot decode it ({_one_line(exc)})") from None
                if len({tuple(im.shape) for im in images}) > 1:
                    raise NvdecError("frames of different sizes in one folder", "size")
                small = dict(zip(unique, resize_planar(torch.stack(images).float(), self.size)))
                done = torch.cuda.Event()
                done.record(self.stream)
                yield {"start_s": t0, "end_s": t1, "indices": idx}, torch.stack([small[i] for i in idx]), done

    def clips(self, kind: str, path: str) -> Iterator[tuple[dict, Any, Any]]:
        if not os.path.exists(path):
            raise NvdecError("file not found")
        if kind == "video":
            return self.video_clips(path)
        return self.jpeg_clips(path, kind)


def seek_number(probe, index: int) -> int:
    """The frame number to ask PyNvVideoCodec's demuxer for to land on the keyframe with frame number `index`: its
    FFmpegDemuxer turns a frame number into a time as frame / average frame rate (TsFromFrameNumber), counted from
    the stream's start except in MOV/MP4 and FLV, where timestamps count from 0 (as its dts_to_frame_number
    does). From the keyframe's own time, so variable frame rates and a first timestamp other than 0 land there."""
    pts = probe.pts
    origin = 0 if any(name in probe.container for name in ("mov", "mp4", "flv")) else pts[0]
    seconds = (pts[index] - origin) * probe.time_base
    return max(0, math.ceil(seconds * (probe.rate or 1.0) - 1e-6))


def _driver_category(exc: Exception) -> str:
    """The category of an error PyNvVideoCodec raised while decoding, from its text (NvDecoder's messages: "Codec
    not supported on this GPU", "Resolution not supported on this GPU", "MBCount not supported on this GPU",
    "Reconfigure Not supported for bit depth change", ... for chroma format change)."""
    text = str(exc).lower()
    if "not supported" not in text:
        return "stream_error"
    if "resolution" in text or "mbcount" in text:
        return "size"
    return "bit_depth" if "bit depth" in text else "chroma" if "chroma" in text else "codec"


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"

