import numpy as np
import pytest
import torch

from segreward.data import transforms as T
from segreward.errors import SegrewardError


def _pair(h=24, w=40, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 8, (h, w)).astype(np.uint8)
    image = np.stack([label * 30, rng.integers(0, 256, (h, w)), np.full((h, w), 7)], -1).astype(np.uint8)
    return image, label


def test_flip_is_joint():
    image, label = _pair()
    im2, lb2 = T.RandomFlip(p=1.0)(image, label)
    np.testing.assert_array_equal(im2, image[:, ::-1])
    np.testing.assert_array_equal(lb2, label[:, ::-1])
    im3, lb3 = T.RandomFlip(p=0.0)(image, label)
    assert im3 is image and lb3 is label


def test_scale_uses_nearest_for_labels():
    image, label = _pair()
    im2, lb2 = T.RandomScale((2.0, 2.0))(image, label)
    assert im2.shape == (48, 80, 3) and lb2.dtype == label.dtype
    np.testing.assert_array_equal(lb2, np.repeat(np.repeat(label, 2, 0), 2, 1))
    _, lb3 = T.Resize((12, 20))(image, label)
    np.testing.assert_array_equal(lb3, label[1::2, 1::2])  # pixel-centre sampling
    with pytest.raises(SegrewardError):
        T.RandomScale((2.0, 1.0))


def test_crop_keeps_image_and_label_aligned_and_pads_with_ignore():
    image, label = _pair()
    torch.manual_seed(0)
    for _ in range(5):
        im2, lb2 = T.RandomCrop((10, 16))(image, label)
        assert im2.shape == (10, 16, 3) and lb2.shape == (10, 16)
        np.testing.assert_array_equal(im2[..., 0], lb2 * 30)  # channel 0 encodes the label
    im3, lb3 = T.RandomCrop((30, 50), ignore_index=255)(image, label)
    assert im3.shape == (30, 50, 3)
    assert (lb3 == 255).sum() == 30 * 50 - 24 * 40 and (im3[lb3 == 255] == 0).all()
    np.testing.assert_array_equal(im3[lb3 != 255][:, 0], lb3[lb3 != 255] * 30)


def test_photometric_changes_image_only():
    image, label = _pair()
    torch.manual_seed(1)
    im2, lb2 = T.PhotometricJitter(p=1.0)(image, label)
    assert im2.dtype == np.uint8 and lb2 is label
    assert not np.array_equal(im2, image)
    im3, _ = T.PhotometricJitter(p=0.0)(image, label)
    np.testing.assert_array_equal(im3, image)


def test_pipeline_is_repeatable_with_the_torch_seed():
    image, label = _pair()
    t = T.train_transform(crop_size=(16, 16), scale=(0.75, 1.5))
    torch.manual_seed(5)
    a = t(image, label)
    torch.manual_seed(5)
    b = t(image, label)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (16, 16, 3) and a[1].shape == (16, 16)


def test_to_tensor_matches_numpy_reference():
    image, label = _pair()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x, y = T.to_tensor(image, label, mean, std)
    ref = ((image / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-5)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    np.testing.assert_array_equal(y.numpy(), label)
    # mmseg-style 0-255 mean/std give the same tensor
    x255, _ = T.to_tensor(image, label, [m * 255 for m in mean], [s * 255 for s in std])
    torch.testing.assert_close(x255, x)
    x2, _ = T.to_tensor(image[:, ::-1], label[:, ::-1])  # negative strides are fine
    assert x2.shape == (3, 24, 40)


def test_shape_mismatch_is_an_error():
    image, label = _pair()
    with pytest.raises(SegrewardError, match="does not match"):
        T.RandomCrop((8, 8))(image, label[:10])
