"""Input discovery: directories, frame folders, globs, list files, ids."""
from __future__ import annotations

import json

import pytest

from iv2trt.decode.inputs import discover
from iv2trt.errors import PipelineError


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "data"
    for rel in ("a.mp4", "sub/b.MKV", "sub/deeper/c.webm", "img.jpg", "pre.npy", "readme.txt", ".hidden.mp4",
                "frames/0001.png", "frames/0002.png", "frames/0003.png"):
        _touch(root / rel)
    return root


def test_directory_is_scanned_recursively_with_relative_ids(tree):
    items = discover([str(tree)])
    assert [(i.id, i.kind) for i in items] == [
        ("a.mp4", "video"), ("frames", "frames"), ("img.jpg", "image"), ("pre.npy", "npy"),
        ("sub/b.MKV", "video"), ("sub/deeper/c.webm", "video")]
    assert [i.id for i in discover([str(tree)], frame_folders=False)].count("frames/0002.png") == 1


def test_frame_folders_are_said_once_with_the_flag_that_takes_images_one_by_one(tree, caplog):
    with caplog.at_level("INFO", logger="iv2trt.decode.inputs"):
        discover([str(tree)])
    said = [r.getMessage() for r in caplog.records if "holding only images" in r.getMessage()]
    assert len(said) == 1 and "1 folder(s) holding only images" in said[0] and "--no-frame-folders" in said[0]
    caplog.clear()
    with caplog.at_level("INFO", logger="iv2trt.decode.inputs"):
        discover([str(tree)], frame_folders=False)
    assert not [r for r in caplog.records if "holding only images" in r.getMessage()]


def test_glob_ids_are_relative_to_its_fixed_prefix(tree):
    items = discover([str(tree / "sub" / "**" / "*.*")])
    assert [i.id for i in items] == ["b.MKV", "deeper/c.webm"]
    with pytest.raises(PipelineError, match="matches nothing"):
        discover([str(tree / "*.avi")])


def test_list_files(tree, tmp_path):
    (tree / "list.txt").write_text("# comment\na.mp4\n\nsub/b.MKV\n")
    assert [(i.id, i.path) for i in discover([str(tree / "list.txt")])] == [
        ("a.mp4", str(tree / "a.mp4")), ("sub/b.MKV", str(tree / "sub/b.MKV"))]
    (tmp_path / "l.csv").write_text(f"path,id\n{tree / 'a.mp4'},clip-1\ndata/img.jpg,\n")
    assert [(i.id, i.kind) for i in discover([str(tmp_path / "l.csv")])] == [("clip-1", "video"),
                                                                             ("data/img.jpg", "image")]
    (tmp_path / "l.jsonl").write_text(json.dumps({"path": "data/frames", "id": "f"}) + "\n")
    assert [(i.id, i.kind) for i in discover([str(tmp_path / "l.jsonl")])] == [("f", "frames")]
    (tmp_path / "bad.csv").write_text("file\nx.mp4\n")
    with pytest.raises(PipelineError, match="'path' column"):
        discover([str(tmp_path / "bad.csv")])


def test_single_files_missing_inputs_and_clashing_ids(tree, tmp_path):
    assert [i.id for i in discover([str(tree / "sub" / "b.MKV")])] == ["b.MKV"]
    with pytest.raises(PipelineError, match="does not exist"):
        discover([str(tmp_path / "nope")])
    _touch(tmp_path / "other" / "a.mp4")
    with pytest.raises(PipelineError, match="share the id 'a.mp4'"):
        discover([str(tree), str(tmp_path / "other")])


def test_camcorder_broadcast_and_elementary_stream_files_are_videos(tmp_path, caplog):
    """A folder scan takes AVCHD/Blu-ray .m2ts, DVD .vob, MXF, raw .h264/.hevc/.ivf streams and the like, and says how
    many other files it left out, by extension (a video under another one goes through a list file)."""
    import logging

    import av
    import numpy as np

    from iv2trt.decode.clips import Windowing
    from iv2trt.decode.pyav import read_clips
    from iv2trt.decode.samples import pattern_frames

    made = {"clip.m2ts": ("mpegts", "libx264"), "stream.h264": ("h264", "libx264"), "stream.ivf": ("ivf", "libvpx-vp9"),
            "dvd.vob": ("vob", "mpeg2video"), "camera.MTS": ("mpegts", "libx264"), "raw.m2v": ("mpeg2video", "mpeg2video")}
    for name, (fmt, codec) in made.items():
        with av.open(str(tmp_path / name), "w", format=fmt) as out:
            stream = out.add_stream(codec, rate=25)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for image in pattern_frames(30, 48, 64, seed=len(name)):
                out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            out.mux(stream.encode())
    for sidecar in ("clip.srt", "notes.txt", "meta.json", "THUMBS"):
        (tmp_path / sidecar).write_text("x")
    with caplog.at_level(logging.INFO, logger="iv2trt.decode.inputs"):
        items = discover([str(tmp_path)])
    assert sorted(i.id for i in items) == sorted(made) and {i.kind for i in items} == {"video"}
    assert "left out 4 file(s) that are not inputs by their extension" in caplog.text
    assert ".srt" in caplog.text and "(no extension)" in caplog.text
    for item in items:  # and each decodes: 30 frames
        clips = list(read_clips(item.path, Windowing(frames=4, window_frames=10)))
        assert len(clips) == 3 and all(np.asarray(c.frames).shape == (4, 48, 64, 3) for c in clips), item.id
