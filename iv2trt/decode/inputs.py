"""Input discovery: directories (recursive), globs, list files (.txt/.csv/.jsonl) and single files.

Every input gets a stable id: the list file's `id` column, else its path relative to the input
root (the directory scanned, the glob's fixed prefix, the list file's folder or the file's folder).
"""
from __future__ import annotations

import csv
import glob
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from ..errors import PipelineError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({
    ".mp4", ".m4v", ".mov", ".qt", ".mkv", ".webm", ".avi", ".divx", ".wmv", ".asf", ".flv", ".f4v", ".3gp", ".3g2",
    ".ogv", ".gif", ".y4m", ".dv", ".mxf", ".rm", ".rmvb",
    ".mpg", ".mpeg", ".mpe", ".vob", ".m2v", ".mod", ".tod",   # MPEG-PS / elementary MPEG-2, DVD, camcorders
    ".ts", ".mts", ".m2ts", ".m2t",                            # MPEG-TS: broadcast, HLS segments, AVCHD / Blu-ray
    ".h264", ".264", ".h265", ".265", ".hevc", ".ivf", ".mjpeg", ".mjpg"})  # elementary streams
LIST_EXTENSIONS = frozenset({".txt", ".csv", ".jsonl"})
NPY_EXTENSION = ".npy"


@dataclass(frozen=True)
class InputItem:
    path: str   # file or frame folder
    id: str
    kind: str   # video | image | frames | npy


def kind_of(path: str) -> str:
    if os.path.isdir(path):
        return "frames"
    suffix = Path(path).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    return "npy" if suffix == NPY_EXTENSION else "video"


def _is_frame_folder(files: list[str], dirs: list[str]) -> bool:
    return not dirs and len(files) > 1 and all(Path(f).suffix.lower() in IMAGE_EXTENSIONS for f in files)


def _relative_id(path: str, root: str) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def scan_directory(root: str, frame_folders: bool = True) -> list[InputItem]:
    """Videos, images and .npy files below `root`; with `frame_folders`, a folder holding only images
    (and no sub-folders) is one video of frames."""
    items: list[InputItem] = []
    left: Counter = Counter()
    wanted = VIDEO_EXTENSIONS | IMAGE_EXTENSIONS | {NPY_EXTENSION}
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        visible = [f for f in files if not f.startswith(".")]
        if frame_folders and _is_frame_folder(visible, dirs):
            items.append(InputItem(folder, _relative_id(folder, root) if folder != root else Path(root).name, "frames"))
            continue
        for name in sorted(visible):
            suffix = Path(name).suffix.lower()
            if suffix in wanted:
                path = os.path.join(folder, name)
                items.append(InputItem(path, _relative_id(path, root), kind_of(path)))
            else:
                left[suffix or "(no extension)"] += 1
    if left:  # (a video under another extension is named in a list file, or given as a file of its own)
        log.info("%s: left out %d file(s) that are not inputs by their extension (%s); to take a video with another "
                 "extension, name it in a .txt/.csv list file", root, sum(left.values()),
                 ", ".join(f"{n} {ext}" for ext, n in left.most_common(8)))
    return items


def read_list_file(list_path: str) -> list[InputItem]:
    """.txt: one path per line (# comments); .csv/.jsonl: a `path` column and an optional `id` column.
    Relative paths are relative to the list file's folder."""
    base = os.path.dirname(os.path.abspath(list_path))
    suffix = Path(list_path).suffix.lower()
    rows: list[dict] = []
    with open(list_path, newline="") as f:
        if suffix == ".txt":
            rows = [{"path": line.strip()} for line in f if line.strip() and not line.lstrip().startswith("#")]
        elif suffix == ".csv":
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise PipelineError(f"{list_path}: a CSV list needs a 'path' column (and optionally 'id')")
            rows = list(reader)
        else:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise PipelineError(f"{list_path}:{n}: not JSON ({exc})") from None
    items = []
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("path"):
            raise PipelineError(f"{list_path}: entry {n} has no 'path'")
        rel = str(row["path"])
        path = rel if os.path.isabs(rel) else os.path.join(base, rel)
        item_id = str(row["id"]) if row.get("id") not in (None, "") else Path(os.path.normpath(rel)).as_posix()
        items.append(InputItem(path, item_id, kind_of(path)))
    return items


def _glob_root(pattern: str) -> str:
    parts = Path(pattern).parts
    fixed = [p for p in parts[:next(i for i, p in enumerate(parts) if glob.has_magic(p))]]
    return str(Path(*fixed)) if fixed else "."


def discover(inputs: list[str], frame_folders: bool = True) -> list[InputItem]:
    """All inputs named by `inputs`, sorted by id; raises PipelineError on missing inputs, clashing ids, or when
    `inputs` name no input at all."""
    items: list[InputItem] = []
    for spec in inputs:
        if glob.has_magic(spec) and not os.path.exists(spec):
            root = _glob_root(spec)
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise PipelineError(f"glob {spec!r} matches nothing")
            for m in matches:
                if os.path.isdir(m):
                    items.extend(InputItem(i.path, _relative_id(i.path, root), i.kind)
                                 for i in scan_directory(m, frame_folders))
                else:
                    items.append(InputItem(m, _relative_id(m, root), kind_of(m)))
        elif os.path.isdir(spec):
            items.extend(scan_directory(spec, frame_folders))
        elif os.path.isfile(spec) and Path(spec).suffix.lower() in LIST_EXTENSIONS:
            items.extend(read_list_file(spec))
        elif os.path.exists(spec):
            items.append(InputItem(spec, Path(spec).name, kind_of(spec)))
        else:
            raise PipelineError(f"input {spec!r} does not exist (expected a directory, glob, list file or file)")
    if not items:
        raise PipelineError(f"--inputs {' '.join(inputs)}: no inputs found; looked for videos "
                            f"({' '.join(sorted(VIDEO_EXTENSIONS))}), images ({' '.join(sorted(IMAGE_EXTENSIONS))}), "
                            f"{NPY_EXTENSION} arrays and folders of frames, and read list files "
                            f"({' '.join(sorted(LIST_EXTENSIONS))}): point --inputs at those")
    by_id: dict[str, InputItem] = {}
    for item in items:
        if item.id in by_id and by_id[item.id].path != item.path:
            raise PipelineError(f"two inputs share the id {item.id!r}: {by_id[item.id].path} and {item.path}; "
                                "give them ids with a .csv/.jsonl list file (columns path,id)")
        by_id[item.id] = item
    folders = [i for i in by_id.values() if i.kind == "frames"]
    if folders:
        log.info("%d folder(s) holding only images, e.g. %s, are each one video of frames (in name order); "
                 "--no-frame-folders takes each image as an input of its own", len(folders), folders[0].path)
    return [by_id[k] for k in sorted(by_id)]
