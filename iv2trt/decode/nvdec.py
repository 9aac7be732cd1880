"""GPU decoding: one input -> its clips as uint8 [T, S, S, 3] tensors on the GPU, pixels never in host memory.

Videos go through the GPU's video decoders (NVDEC, driven by PyNvVideoCodec); JPEG images and frame folders
of JPEGs through nvJPEG (torchvision.io.decode_jpeg on CUDA) when torchvision has it. A video is planned
exactly as on the CPU path (pyav.VideoProbe: PyAV's demux pass gives the frame timestamps and each clip's
frame indices); PyNvVideoCodec's demuxer feeds the decoder, and decoded frames are matched to the plan by
their timestamps (NVDEC hands back FFmpeg's pts). Only needed frames are converted: NV12 -> RGB with the CPU
path's own arithmetic and the stream's matrix and range (colorspace.py), rotation, resize (transforms.
resize_planar), all on one CUDA stream per session. H.264 non-reference frames no clip needs are not sent
to the decoder at all, and decoding stops after the last needed frame.

What NVDEC cannot take (codec, bit depth, chroma format, odd sizes, size limits, streams without usable
timestamps) raises `NvdecUnsupported`; anything else that goes wrong raises DecodeError. The job sends both
to the CPU path (workers.py).
"""
from __future__ import annotations

import bisect
import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from .clips import DecodeError, Windowing
from .inputs import IMAGE_EXTENSIONS
from .pyav import list_frame_folder, probe_video

log = logging.getLogger(__name__)

JPEG_EXTENSIONS = frozenset({".jpg", ".jpeg"})
# FFmpeg codec name -> PyNvVideoCodec's cudaVideoCodec member
NVDEC_CODECS = {"h264": "H264", "hevc": "HEVC", "vp9": "VP9", "av1": "AV1", "vp8": "VP8", "mpeg4": "MPEG4",
                "mpeg2video": "MPEG2", "mpeg1video": "MPEG1", "vc1": "VC1"}
NVDEC_PIX_FMTS = frozenset({"yuv420p", "yuvj420p"})  # 8-bit 4:2:0: NV12 out, converted like the CPU path


class NvdecUnsupported(DecodeError):
    """An input the GPU decoders cannot take; the CPU path can."""


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
        return f"NVDEC cannot be queried ({type(exc).__name__}: {exc}); is libnvcuvid (the driver's video library) there?"
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


class NvdecSession:
    """One NVDEC session (used by one thread at a time) and its CUDA stream; decoders are kept per codec and
    reused from input to input. `clips(item)` yields (clip info, uint8 [T, S, S, 3] CUDA tensor, CUDA event
    recorded after the tensor was written)."""

    HEADER_BYTES = 4096   # enough of an access unit to reach its first slice header past SEI/SPS/PPS
    SEEK_MIN_FRAMES = 32  # seek only over this many frames or more (a seek drains the decoder)
    MAX_DECODERS = 4      # decoders kept per session (one per stream format)

    def __init__(self, gpu: int, windowing: Windowing, img_size: int):
        import PyNvVideoCodec as nvc
        import torch

        self.nvc, self.torch = nvc, torch
        self.gpu, self.w, self.size = gpu, windowing, img_size
        self.device = torch.device("cuda", gpu)
        self.stream = torch.cuda.Stream(self.device)
        self._decoders: dict[Any, Any] = {}
        self._caps: dict[tuple, dict] = {}
        self.frames_decoded = 0   # frames that came out of NVDEC (stats)
        self.frames_dropped = 0   # non-reference access units never decoded

    # --- videos ----------------------------------------------------------------------------------------------
    def _codec(self, probe) -> Any:
        """PyNvVideoCodec codec id for a probed stream; NvdecUnsupported when NVDEC cannot decode it."""
        name = NVDEC_CODECS.get(probe.codec)
        if name is None:
            raise NvdecUnsupported(f"NVDEC does not decode {probe.codec}")
        if probe.pix_fmt not in NVDEC_PIX_FMTS:
            raise NvdecUnsupported(f"pixel format {probe.pix_fmt} (the GPU path takes 8-bit 4:2:0)")
        if probe.width % 2 or probe.height % 2:
            raise NvdecUnsupported(f"odd frame size {probe.width}x{probe.height}")
        if not probe.seekable:
            raise NvdecUnsupported("frame timestamps missing or repeated")
        codec = getattr(self.nvc.cudaVideoCodec, name)
        key = (name, 8)
        if key not in self._caps:
            try:
                self._caps[key] = self.nvc.GetDecoderCaps(gpuid=self.gpu, codec=codec, bitdepth=8)
            except Exception as exc:
                raise NvdecUnsupported(f"NVDEC capabilities for {probe.codec} unknown ({exc})") from None
        caps = self._caps[key]
        if not caps.get("supported", 1):
            raise NvdecUnsupported(f"this GPU's NVDEC does not decode 8-bit {probe.codec}")
        lo_w, lo_h = caps.get("width_min", 0), caps.get("height_min", 0)
        hi_w, hi_h = caps.get("width_max", 1 << 30), caps.get("height_max", 1 << 30)
        if not (lo_w <= probe.width <= hi_w and lo_h <= probe.height <= hi_h):
            raise NvdecUnsupported(f"{probe.width}x{probe.height} is outside NVDEC's {lo_w}x{lo_h} to {hi_w}x{hi_h} "
                                   f"for {probe.codec}")
        if probe.codec == "mpeg4" and "avi" in probe.container:
            raise NvdecUnsupported("MPEG-4 Part 2 in AVI (packed B-frames, which NVDEC's parser does not unpack)")
        return codec

    def _decoder(self, key: tuple):
        """This session's decoder for (codec, width, height): one per stream format, kept for the next input of
        that format (reconfiguring a decoder to another size gave frames of the old size), the least recently
        used dropped beyond MAX_DECODERS."""
        decoder = self._decoders.pop(key, None)
        if decoder is None:
            decoder = self.nvc.CreateDecoder(gpuid=self.gpu, codec=key[0], cudacontext=0,
                                             cudastream=self.stream.cuda_stream, usedevicememory=True)
            while len(self._decoders) >= self.MAX_DECODERS:
                self._decoders.pop(next(iter(self._decoders)))
        self._decoders[key] = decoder  # most recently used last
        return decoder

    def _flush(self, key: tuple) -> None:
        """End of an input: drain the decoder (an empty packet) so the next input starts clean; a decoder that
        fails to drain is dropped and made anew."""
        decoder = self._decoders.get(key)
        if decoder is None:
            return
        try:
            decoder.Decode(self.nvc.PacketData())
        except Exception as exc:  # noqa: BLE001 - a fresh decoder next time
            log.debug("NVDEC decoder dropped after a failed flush: %s", exc)
            del self._decoders[key]

    def video_clips(self, path: str) -> Iterator[tuple[dict, Any, Any]]:
        from ..transforms import resize_planar
        from .clips import ClipAssembler
        from .colorspace import nv12_to_rgb_planar, split_nv12, stream_yuv_to_rgb

        torch = self.torch
        probe, rotation = probe_video(path, accept=self._codec)  # refused before any frame is decoded
        codec = self._codec(probe)
        try:
            colour = stream_yuv_to_rgb(probe.colorspace, probe.color_range, probe.pix_fmt)
        except ValueError as exc:
            raise NvdecUnsupported(str(exc)) from None
        pts, index_of, keyframes = probe.pts, probe.index_of, probe.keyframe_indices
        asm = ClipAssembler(probe.plan(self.w), stack=torch.stack)
        needed = asm.needed()
        needed_pts = {pts[i] for i in needed}
        turns = int(round(rotation / 90.0)) % 4
        drop = probe.codec == "h264"
        try:
            demuxer = self.nvc.CreateDemuxer(filename=path)
        except Exception as exc:
            raise DecodeError(f"NVDEC demuxer cannot open it ({_one_line(exc)})") from None
        key = (codec, probe.width, probe.height)
        decoder = self._decoder(key)

        def take(frames, got: set[int]) -> Iterator[tuple[dict, Any, Any]]:
            """Keep a copy of the needed frames among `frames` (their indices into `got`); once a clip's frames
            are all there, convert and resize them together (a few kernels per clip, not per frame: the launches
            hold the GIL that the other sessions' threads need) and yield the clip."""
            for frame in frames:
                self.frames_decoded += 1
                index = index_of.get(frame.getPTS())
                if index is None or pts[index] not in needed_pts or index in got:
                    continue
                got.add(index)
                for clip in asm.add(index, torch.from_dlpack(frame).clone()):  # the decoder reuses its buffers
                    luma, chroma = split_nv12(clip.frames, probe.height, probe.width)
                    rgb = nv12_to_rgb_planar(luma, chroma, colour).float()
                    if turns:
                        rgb = torch.rot90(rgb, turns, dims=(-2, -1))
                    done = torch.cuda.Event()
                    resized = resize_planar(rgb, self.size)
                    done.record(self.stream)
                    yield {"start_s": clip.start_s, "end_s": clip.end_s, "indices": clip.indices}, resized, done

        got: set[int] = set()
        fed, seeked_to, next_needed, seeking = -1, None, 0, True  # fed: latest frame (presentation index) sent
        try:
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
                        yield from take(decoder.Decode(self.nvc.PacketData()), got)  # what is in flight
                        try:  # PyNvVideoCodec's demuxer seeks to the keyframe at or before a frame number
                            packet = demuxer.Seek(keyframe)
                            landed = index_of.get(packet.pts, target + 1)
                        except Exception as exc:  # noqa: BLE001 - decode in order instead
                            log.debug("NVDEC seek failed in %s: %s", path, _one_line(exc))
                            packet, landed = None, -1
                        if not fed < landed <= target:  # no seek, or a wrong one: decode in order instead
                            log.debug("NVDEC seek missed in %s; decoding it from the start", path)
                            seeking, fed = False, -1
                            demuxer = self.nvc.CreateDemuxer(filename=path)
                            packets = iter(demuxer)
                            continue
                    else:
                        packet = next(packets, None)
                        if packet is None:  # end of the stream: what the decoder still holds
                            yield from take(decoder.Decode(self.nvc.PacketData()), got)
                            break
                    fed = max(fed, index_of.get(packet.pts, fed))
                    if drop and packet.bsl and packet.pts not in needed_pts and h264_droppable(
                            ctypes.string_at(packet.bsl_data, min(packet.bsl, self.HEADER_BYTES))):
                        self.frames_dropped += 1
                        continue
                    yield from take(decoder.Decode(packet), got)
        except DecodeError:
            self._decoders.pop(key, None)
            raise
        except Exception as exc:  # a corrupt stream: the decoder is dropped, the input goes to the CPU path
            self._decoders.pop(key, None)
            raise DecodeError(f"NVDEC failed ({_one_line(exc)})") from None
        finally:
            self._flush(key)
        if not asm.done:
            raise DecodeError(f"NVDEC returned {len(got)} of the {len(needed)} needed frames "
                              "(truncated or corrupt stream)")

    # --- JPEG images and folders ------------------------------------------------------------------------------
    def jpeg_clips(self, path: str, kind: str) -> Iterator[tuple[dict, Any, Any]]:
        from torchvision.io import ImageReadMode, decode_jpeg

        from ..transforms import resize_planar
        from .clips import FOLDER_FPS, plan_by_count

        torch = self.torch
        files = [path] if kind == "image" else list_frame_folder(path)
        if not files:
            raise DecodeError("folder has no image frames")
        if any(Path(f).suffix.lower() not in JPEG_EXTENSIONS for f in files):
            raise NvdecUnsupported("not all frames are JPEG")
        plan = [([0], 0.0, 0.0)] if kind == "image" else plan_by_count(len(files), FOLDER_FPS, self.w)
        with torch.cuda.stream(self.stream):
            for idx, t0, t1 in plan:
                unique = sorted(set(idx))
                try:
                    data = [torch.frombuffer(bytearray(Path(files[i]).read_bytes()), dtype=torch.uint8) for i in unique]
                    images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
                except Exception as exc:
                    raise DecodeError(f"nvJPEG cannot decode it ({_one_line(exc)})") from None
                if len({tuple(im.shape) for im in images}) > 1:
                    raise DecodeError("frames of different sizes in one folder")
                small = dict(zip(unique, resize_planar(torch.stack(images).float(), self.size)))
                done = torch.cuda.Event()
                done.record(self.stream)
                yield {"start_s": t0, "end_s": t1, "indices": idx}, torch.stack([small[i] for i in idx]), done

    def clips(self, kind: str, path: str) -> Iterator[tuple[dict, Any, Any]]:
        if not os.path.exists(path):
            raise DecodeError("file not found")
        if kind == "video":
            return self.video_clips(path)
        return self.jpeg_clips(path, kind)


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"

