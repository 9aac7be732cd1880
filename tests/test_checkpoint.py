"""Checkpoint layouts users actually have, made by the tests; broken ones refused clearly."""
import dataclasses
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, TINY, randomize
from safetensors.torch import save_file

from iv2trt.models import CheckpointError, InternVideo2CLIPVision, create_model
from iv2trt.models.pos_embed import interpolate_checkpoint_pos_embed


@pytest.fixture(scope="module")
def source():
    return randomize(InternVideo2CLIPVision(TINY), seed=11).eval()


def full_state(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["text_encoder.layers.0.weight"] = torch.randn(4, 4)
    sd["temp"] = torch.tensor(0.01)
    return sd


def backbone_state(model):
    sd = {k[len("vision_encoder."):]: v.clone() for k, v in model.state_dict().items()
          if k.startswith("vision_encoder.")}
    sd["clip_decoder.0.head.weight"] = torch.randn(3, 3)
    sd["mae_decoder.0.weight"] = torch.randn(3)
    sd["final_clip_decoder.head.weight"] = torch.randn(2, 2)
    sd["clip_pos_embed"] = torch.randn(1, 5, 8)
    sd["mae_pos_embed"] = torch.randn(1, 5, 8)
    return sd


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


# safetensors files are flat by format, so they come bare only
@pytest.mark.parametrize("wrapper, suffix", [(w, s) for w in (None, "module", "model", "state_dict")
                                             for s in (".pth", ".pt")] + [(None, ".safetensors")])
def test_full_clip_checkpoint(tmp_path, source, wrapper, suffix):
    sd = full_state(source)
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save({wrapper: sd} if wrapper else sd, path)
    assert_same_weights(create_model(TINY, checkpoint=path), source)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_backbone_plus_align_checkpoint(tmp_path, source, suffix):
    backbone, align = tmp_path / f"backbone{suffix}", tmp_path / f"align{suffix}"
    align_sd = {k: v for k, v in source.state_dict().items() if k.startswith("vision_align.")}
    if suffix == ".safetensors":
        save_file(backbone_state(source), str(backbone))
        save_file(align_sd, str(align))
    else:
        torch.save({"module": backbone_state(source)}, backbone)
        torch.save(align_sd, align)
    assert_same_weights(create_model(TINY, checkpoint=backbone, align_checkpoint=align), source)


def test_backbone_without_align_names_the_fix(tmp_path, source):
    path = tmp_path / "backbone.pth"
    torch.save(backbone_state(source), path)
    with pytest.raises(CheckpointError, match=r"missing keys \[vision_align.*--align-checkpoint"):
        create_model(TINY, checkpoint=path)


def test_pos_embed_of_other_frame_count_is_interpolated(tmp_path, source):
    sd = full_state(source)
    pos = sd["vision_encoder.pos_embed"]
    # a checkpoint trained for 2 frames: the model (4 frames) must see it resampled as upstream does
    sd["vision_encoder.pos_embed"] = pos[:, : 1 + 2 * TINY.patches_per_frame].clone()
    torch.save(sd, tmp_path / "t2.pth")
    model = create_model(TINY, checkpoint=tmp_path / "t2.pth")
    expected = interpolate_checkpoint_pos_embed(sd["vision_encoder.pos_embed"], 4, TINY.patches_per_frame)
    torch.testing.assert_close(model.state_dict()["vision_encoder.pos_embed"], expected)
    tok = sd["vision_encoder.pos_embed"][0, 1:].view(2, TINY.patches_per_frame, -1)
    got = model.state_dict()["vision_encoder.pos_embed"][0, 1:].view(4, TINY.patches_per_frame, -1)
    # linear, align_corners=False, 2 -> 4: positions 0, 0.25, 0.75, 1
    torch.testing.assert_close(got[1], 0.75 * tok[0] + 0.25 * tok[1])


@pytest.mark.parametrize("damage, message", [
    (lambda sd: sd.pop("vision_encoder.blocks.1.mlp.fc2.weight"), r"missing keys \[vision_encoder.blocks.1.mlp.fc2"),
    (lambda sd: sd.__setitem__("vision_encoder.extra.weight", torch.zeros(1)), r"unexpected keys \[vision_encoder.extra"),
    (lambda sd: sd.__setitem__("vision_align.1.weight", torch.zeros(5, 48)), r"shape mismatches \[vision_align.1.weight"),
    (lambda sd: sd.__setitem__("vision_encoder.pos_embed", torch.zeros(1, 10, 64)), "pos_embed has shape"),
])
def test_broken_checkpoints_are_refused_by_name(tmp_path, source, damage, message):
    sd = full_state(source)
    damage(sd)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=message):
        create_model(TINY, checkpoint=tmp_path / "bad.pth")


def test_unreadable_files(tmp_path):
    (tmp_path / "trunc.pth").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match="could not be read"):
        create_model(TINY, checkpoint=tmp_path / "trunc.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model(TINY, checkpoint=tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="--random-init"):
        create_model(TINY)


def test_export_cli_refuses_broken_checkpoint_and_writes_nothing(tmp_path, source):
    sd = full_state(source)
    sd.pop("vision_encoder.cls_token")
    torch.save(sd, tmp_path / "bad.pth")
    out = tmp_path / "out.onnx"
    variant = tmp_path / "tiny.yaml"
    variant.write_text(yaml.safe_dump(dataclasses.asdict(TINY)))
    proc = subprocess.run([sys.executable, str(ROOT / "export_onnx.py"), "--checkpoint", str(tmp_path / "bad.pth"),
                           "--variant", str(variant), "--output", str(out)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing keys [vision_encoder.cls_token]" in proc.stderr
    assert not out.exists() and not list(tmp_path.glob("*.onnx*"))


def test_align_file_without_align_keys_is_refused(tmp_path, source):
    torch.save(backbone_state(source), tmp_path / "backbone.pth")
    torch.save({"text_encoder.w": torch.zeros(2)}, tmp_path / "text.pth")
    with pytest.raises(CheckpointError, match="holds no vision_align"):
        create_model(TINY, checkpoint=tmp_path / "backbone.pth", align_checkpoint=tmp_path / "text.pth")
