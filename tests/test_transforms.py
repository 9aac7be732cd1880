"""Preprocessing against an independent numpy computation of antialiased bicubic resampling."""
import numpy as np
import pytest
import torch

from iv2trt.transforms import IMAGENET_MEAN, IMAGENET_STD, preprocess_frames


def _cubic(x, a=-0.5):
    x = np.abs(x)
    return np.where(x <= 1, (a + 2) * x**3 - (a + 3) * x**2 + 1,
                    np.where(x < 2, a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a, 0.0))


def _resample_matrix(n_in, n_out):
    """Rows of weights of separable antialiased bicubic resampling (PIL / torch antialias semantics)."""
    scale = n_in / n_out
    support = 2.0 * max(scale, 1.0)
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        js = np.arange(lo, hi)
        w = _cubic((js + 0.5 - center) / max(scale, 1.0))
        m[i, lo:hi] = w / w.sum()
    return m


def reference(frames, size=224):
    x = frames.astype(np.float64)
    rows, cols = _resample_matrix(x.shape[1], size), _resample_matrix(x.shape[2], size)
    x = np.einsum("oh,thwc->towc", rows, x, optimize=True)
    x = np.einsum("towc,pw->topc", x, cols, optimize=True)
    x = np.clip(np.round(x), 0, 255) / 255.0
    x = (x - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    return x.transpose(0, 3, 1, 2)


@pytest.mark.parametrize("shape", [(2, 360, 640), (1, 480, 270), (3, 100, 150), (1, 224, 224), (2, 240, 320)])
def test_matches_independent_resample(shape):
    rng = np.random.default_rng(sum(shape))
    frames = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    ours = preprocess_frames(frames).numpy()
    ref = reference(frames)
    assert ours.shape == (shape[0], 3, 224, 224) and ours.dtype == np.float32
    # rounding to uint8 levels may flip by one level where the float lands at .5
    diff = np.abs(ours - ref) * np.array(IMAGENET_STD)[None, :, None, None] * 255
    assert np.mean(diff < 1e-3) > 0.999 and diff.max() <= 1.0 + 1e-3


def test_no_resize_is_exact_normalisation():
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    out = preprocess_frames(frames)
    expected = (torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
        / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(out, expected)


def test_rejects_wrong_layout():
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        preprocess_frames(np.zeros((3, 224, 224), np.uint8))
