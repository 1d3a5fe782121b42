import torch

from otlt.data.augment import CIFAR_MEAN, CIFAR_STD, BatchAugment, crop_flip, draw_crop_flip


def reference_one(image, oy, ox, flip, pad):
    """Per-image reference: torchvision-style zero pad, crop, then flip, in plain loops."""
    h, w, c = image.shape
    padded = torch.zeros(h + 2 * pad, w + 2 * pad, c, dtype=image.dtype)
    padded[pad:pad + h, pad:pad + w] = image
    out = padded[oy:oy + h, ox:ox + w]
    return out.flip(1) if flip else out


def test_batched_crop_flip_equals_per_image_reference():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 32, 32, 3), dtype=torch.uint8, generator=g)
    oy, ox, flips = draw_crop_flip(16, 4, g)
    assert flips.any() and (~flips).any()
    batched = crop_flip(images, oy, ox, flips, 4)
    for b in range(16):
        ref = reference_one(images[b], int(oy[b]), int(ox[b]), bool(flips[b]), 4)
        assert torch.equal(batched[b], ref)


def test_augment_normalises_and_is_channels_last():
    g = torch.Generator().manual_seed(0)
    images = torch.full((4, 32, 32, 3), 255, dtype=torch.uint8)
    out = BatchAugment(pad=0)(images, g)
    assert out.shape == (4, 3, 32, 32) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = torch.tensor([(1 - m) / s for m, s in zip(CIFAR_MEAN, CIFAR_STD, strict=True)])
    assert torch.allclose(out[0, :, 5, 5], expected, atol=1e-5)


def test_same_generator_state_same_augmentation():
    images = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    a = BatchAugment()(images, torch.Generator().manual_seed(3))
    b = BatchAugment()(images, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
