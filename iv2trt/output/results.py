"""Reading a stage-3 output directory back: the features, the manifest rows that say what each one is,
and the directory's totals. Needs numpy and pyarrow only (no pandas, no torch).

    from iv2trt import load_features
    features, rows = load_features("outputs/features")   # features[i] is described by rows[i]

Layout (written by writer.py): shards/shard-NNNNN-<digest>.npy holds features [n, D] (L2-normalised, float16
or float32) and shards/shard-NNNNN-<digest>.parquet one manifest row per feature; with --per-video-npy the features
are in videos/<id>.npy and the manifests still list them. A manifest is committed after its features,
so whatever a manifest names is complete.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np

SHARD_DIR = "shards"


def shard_name(index: int, ids: Sequence[str]) -> str:
    """A shard's name (no suffix, relative to the output directory), the same for both executors:
    `shards/shard-<index>-<digest of the ids it holds>`. The local job numbers its shards in order; the Ray
    executor uses the partition's index and the ids it was run for, so a rerun partition overwrites its own
    files. Either resumes the other's output: names from the two never collide."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:12]
    return f"{SHARD_DIR}/shard-{index:05d}-{digest}"


def shard_index(path: str | Path) -> int:
    """The index in a shard's file name (shard-<index>-<digest>.*)."""
    return int(Path(path).name.split("-")[1].split(".")[0])


def manifest_paths(out_dir: str | Path) -> list[Path]:
    """The committed manifests of an output directory, in shard order."""
    return sorted((Path(out_dir) / SHARD_DIR).glob("shard-*.parquet"))


def read_manifest(out_dir: str | Path, columns: list[str] | None = None):
    """All committed manifest rows (a pyarrow Table, shards in order); an empty Table when none."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(p, columns=columns) for p in manifest_paths(out_dir)]
    return pa.concat_tables(tables) if tables else pa.table({"id": pa.array([], pa.string())})


def finished_ids(out_dir: str | Path) -> set[str]:
    """Ids of the inputs whose features are committed."""
    return set(read_manifest(out_dir, ["id"]).column("id").to_pylist())


def load_features(out_dir: str | Path) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Every committed feature of an output directory and the manifest row describing it.

    Returns (features, rows): features [N, D] (float16 or float32 as extracted, L2-normalised; [0, 0] when
    there are none) and rows[i], a dict about features[i]:
      row             i (the global index; manifests number their rows across shards)
      video, id       the input's path and its id (path relative to the input folder, or from a list file)
      kind            video | image | frames | npy
      clip, num_clips this clip's index within its video, and the video's clip count
      window_start_s, window_end_s   the clip's window in seconds (NaN for .npy inputs)
      frame_indices   the sampled frame numbers
      file, file_row  where the feature is stored
    Without pandas: rows are plain dicts; with it, pandas.DataFrame(rows) is the manifest as a table.
    An output directory of a job that has committed nothing yet gives no rows; a path that is not an output
    directory at all (missing, or without shards/) raises FileNotFoundError.
    """
    out_dir = Path(out_dir)
    if not (out_dir / SHARD_DIR).is_dir():
        what = "does not exist" if not out_dir.exists() else f"has no {SHARD_DIR}/ folder"
        raise FileNotFoundError(f"{out_dir} {what}: it is not an output directory; pass the --output of "
                                "trt_inference.py")
    rows = read_manifest(out_dir).to_pylist()
    files: dict[str, np.ndarray] = {}
    features = []
    for index, row in enumerate(rows):
        row["row"] = index
        if row["file"] not in files:
            files[row["file"]] = np.load(out_dir / row["file"], mmap_mode="r")
        features.append(np.asarray(files[row["file"]][row["file_row"]]))
    return (np.stack(features) if features else np.zeros((0, 0), np.float32)), rows


def output_totals(out_dir: str | Path) -> dict[str, int]:
    """What an output directory holds now, over every run into it: inputs done, feature rows, shards."""
    ids = read_manifest(out_dir, ["id"]).column("id").to_pylist()
    return {"inputs": len(set(ids)), "clips": len(ids), "shards": len(manifest_paths(out_dir))}


def manifest_stamps(out_dir: str | Path) -> dict[str, int]:
    """Each committed manifest's name and modification time (ns); taken before a run, `committed_since` tells what
    the run committed."""
    return {p.name: p.stat().st_mtime_ns for p in manifest_paths(out_dir)}


def committed_since(out_dir: str | Path, stamps: dict[str, int]) -> set[str]:
    """Ids of the inputs in the manifests committed (written or replaced) since `stamps` were taken."""
    import pyarrow.parquet as pq

    changed = [p for p in manifest_paths(out_dir) if stamps.get(p.name) != p.stat().st_mtime_ns]
    return {i for p in changed for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()}
