"""Weight sources, kept apart from the architecture.

Layouts understood (each bare or nested under `module` / `model` / `state_dict`):
  * full InternVideo2_CLIP_small state dicts: `vision_encoder.*`, `vision_align.*`
    (`text_encoder.*`, `temp*` ignored);
  * distilled backbone files (upstream's `vision_ckpt_path`): bare backbone keys, with
    `clip_decoder.*`, `mae_decoder.*`, `final_clip_decoder.*`, `clip_pos_embed`, `mae_pos_embed`
    dropped; the `vision_align.*` head then comes from a second file (`align_checkpoint`),
    which, as upstream's extra checkpoint, overrides any key it holds.
A `pos_embed` trained for another frame count is resampled in time (linear), as upstream's
`interpolate_pos_embed` does. Anything else missing or unexpected is an error that names it.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch

from .pos_embed import interpolate_checkpoint_pos_embed

log = logging.getLogger(__name__)

NESTING_KEYS = ("module", "model", "state_dict")
BACKBONE_DROPPED_PREFIXES = ("clip_decoder.", "mae_decoder.", "final_clip_decoder.")
BACKBONE_DROPPED_KEYS = ("clip_pos_embed", "mae_pos_embed")
# keys of a full CLIP checkpoint that are not part of the vision tower
FULL_IGNORED_PREFIXES = ("text_encoder.", "temp", "vision_encoder.clip_decoder.", "vision_encoder.mae_decoder.",
                         "vision_encoder.final_clip_decoder.", "vision_encoder.clip_pos_embed",
                         "vision_encoder.clip_img_pos_embed", "vision_encoder.img_pos_embed",
                         "vision_encoder.mae_pos_embed")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded into the model; the message says what and how to fix it."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors`, `.pt`, `.pth` or `.bin` file, unwrapped from module/model/state_dict."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: check the path or pass --random-init")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise CheckpointError(
                f"{path} could not be read as a PyTorch checkpoint of tensors ({str(exc).splitlines()[0]}); "
                "is the file complete? Re-download it, or convert it to .safetensors") from exc
    for _ in range(3):
        nested = next((k for k in NESTING_KEYS if isinstance(state.get(k), dict)), None)
        if nested is None:
            break
        state = state[nested]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _from_backbone_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if key.startswith(BACKBONE_DROPPED_PREFIXES) or key in BACKBONE_DROPPED_KEYS:
            continue
        out[f"vision_encoder.{key}"] = value
    return out


def _from_full_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(FULL_IGNORED_PREFIXES)}


def to_vision_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint of either upstream layout onto our `vision_encoder.* / vision_align.*` keys."""
    if any(k.startswith(("vision_encoder.", "vision_align.")) for k in state):
        return _from_full_layout(state)
    return _from_backbone_layout(state)


def _fit_pos_embed(state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    key = "vision_encoder.pos_embed"
    if key not in state:
        return
    cfg = model.cfg
    pos = state[key]
    if pos.ndim == 2:
        pos = pos[None]
    tokens, per_frame = pos.shape[1] - 1, cfg.patches_per_frame
    if pos.shape[-1] != cfg.embed_dim or tokens % per_frame:
        raise CheckpointError(
            f"{key} has shape {tuple(pos.shape)}, which does not fit {cfg.name} "
            f"(1 + frames x {per_frame} tokens of width {cfg.embed_dim}): wrong --variant?")
    frames = tokens // per_frame
    if frames != cfg.num_frames:
        log.info("checkpoint pos_embed was trained for %d frames; interpolating in time to %d", frames, cfg.num_frames)
        pos = interpolate_checkpoint_pos_embed(pos, cfg.num_frames, per_frame)
    state[key] = pos


def load_vision_checkpoint(model: torch.nn.Module, checkpoint: str | Path,
                           align_checkpoint: str | Path | None = None) -> None:
    """Load upstream weights into an InternVideo2CLIPVision, strictly; raise CheckpointError otherwise."""
    state = to_vision_state_dict(read_state_dict(checkpoint))
    if align_checkpoint is not None:
        raw = read_state_dict(align_checkpoint)
        if not any(k.startswith(("vision_align.", "vision_encoder.")) for k in raw):
            raise CheckpointError(f"{align_checkpoint} holds no vision_align.* (or vision_encoder.*) keys: pass the "
                                  "file with the CLIP align head as --align-checkpoint")
        extra = to_vision_state_dict(raw)
        log.info("align checkpoint %s provides %d tensors", align_checkpoint, len(extra))
        state.update(extra)
    _fit_pos_embed(state, model)

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    problems = []
    if missing:
        hint = (" (the vision_align head is not in a backbone-only file: pass --align-checkpoint)"
                if all(k.startswith("vision_align.") for k in missing) else "")
        problems.append(f"missing keys {_short(missing)}{hint}")
    if unexpected:
        problems.append(f"unexpected keys {_short(unexpected)}")
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape]
    if shapes:
        problems.append(f"shape mismatches {_short(shapes)}")
    if problems:
        raise CheckpointError(f"{checkpoint} does not match {model.cfg.name}: " + "; ".join(problems)
                              + ". Is --variant right, and is this an InternVideo2-CLIP vision checkpoint?")
    model.load_state_dict(state, strict=True)
    log.info("loaded %d tensors from %s%s", len(state), checkpoint,
             f" + {align_checkpoint}" if align_checkpoint else "")


def _short(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... {len(items) - limit} more' if len(items) > limit else ''}]"
