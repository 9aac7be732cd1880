"""Makes the VP9 10- and 12-bit test files (tests/data/vp9_yuv420p1{0,2}le.webm) that tests/test_nvdec_gpu.py decodes
where PyAV's libvpx cannot write them (PyPI's wheels are built 8-bit only). Needs an `ffmpeg` whose libvpx has high
bit depth (Debian's does): python tests/data/make_vp9_high_depth.py
Content: 2 s of tests/test_nvdec_gpu.natural_frames at 320x180, 30 fps, BT.709 limited range, CRF 40."""
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]

from test_nvdec_gpu import natural_frames

frames = natural_frames(60, 180, 320, seed=30)
for pix_fmt in ("yuv420p10le", "yuv420p12le"):
    out = HERE / f"vp9_{pix_fmt}.webm"
    subprocess.run(["ffmpeg", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
                    "-s", "320x180", "-r", "30", "-i", "-", "-c:v", "libvpx-vp9", "-pix_fmt", pix_fmt, "-b:v", "0",
                    "-crf", "40", "-deadline", "good", "-cpu-used", "4", "-colorspace", "bt709", "-color_primaries",
                    "bt709", "-color_trc", "bt709", "-color_range", "tv", "-vf", "scale=out_color_matrix=bt709",
                    str(out)], input=frames.tobytes(), check=True)
    print(out, out.stat().st_size)
