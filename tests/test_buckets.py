"""sdlora.data.buckets: each photo gets a training size that keeps its shape at about the
training area, with sides the models can take and no extreme ratio."""

from __future__ import annotations

import math

import pytest

from sdlora.data.buckets import bucket_size, bucket_sizes, cover_crop


@pytest.mark.parametrize(
    "resolution, photo, bucket",
    [
        (512, (4032, 3024), (576, 448)),  # a 4:3 phone photo
        (512, (3024, 4032), (448, 576)),  # the same held upright
        (512, (3000, 3000), (512, 512)),
        (256, (4000, 3000), (320, 192)),
        (256, (3000, 4000), (192, 320)),
        (256, (900, 900), (256, 256)),
        (1024, (4032, 3024), (1152, 896)),  # SDXL's 4:3 bucket
        (1024, (3024, 4032), (896, 1152)),
    ],
)
def test_phone_photos_get_their_bucket(resolution, photo, bucket):
    assert bucket_size(*photo, resolution) == bucket


@pytest.mark.parametrize("resolution", [256, 512, 768, 1024])
def test_every_bucket_fits_the_models_and_the_area(resolution):
    sizes = bucket_sizes(resolution)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % 64 == 0 and h % 64 == 0, (w, h)
        assert w * h <= resolution * resolution, (w, h)
        assert 0.5 <= w / h <= 2.0, (w, h)
    assert sizes == tuple(sorted(sizes, key=lambda wh: wh[0] / wh[1]))  # tallest to widest


@pytest.mark.parametrize("resolution", [256, 512, 1024])
def test_portrait_and_landscape_are_mirror_images(resolution):
    sizes = set(bucket_sizes(resolution))
    assert sizes == {(h, w) for w, h in sizes}
    for w, h in [(4000, 3000), (1920, 1080), (3000, 2000), (1100, 1000), (5000, 1000)]:
        bw, bh = bucket_size(w, h, resolution)
        assert bucket_size(h, w, resolution) == (bh, bw)


def test_extreme_panoramas_go_to_the_widest_bucket_never_beyond_2_to_1():
    # At 1024 the widest bucket is exactly 2:1; at 512 no 2:1 size of 64-multiples fills the
    # area, so the widest is 640x384 (5:3).
    assert bucket_size(12000, 1000, 1024) == (1408, 704)
    assert bucket_size(1000, 12000, 1024) == (704, 1408)
    assert bucket_size(12000, 1000, 512) == max(bucket_sizes(512), key=lambda wh: wh[0] / wh[1]) == (640, 384)
    assert bucket_size(1000, 12000, 512) == (384, 640)


def test_each_photo_goes_to_the_closest_ratio():
    for w, h in [(4032, 3024), (1920, 1080), (1000, 1000), (1000, 1500), (2400, 1000)]:
        bw, bh = bucket_size(w, h, 512)
        gap = abs(math.log(bw / bh) - math.log(w / h))
        assert all(abs(math.log(x / y) - math.log(w / h)) >= gap - 1e-9 for x, y in bucket_sizes(512))


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="positive"):
        bucket_size(0, 100, 512)


@pytest.mark.parametrize(
    "photo, target",
    [
        ((4032, 3024), (576, 448)),
        ((3024, 4032), (448, 576)),
        ((1000, 1000), (576, 448)),
        ((300, 200), (576, 448)),  # upscaled: still covers
        ((576, 448), (576, 448)),
    ],
)
def test_cover_crop_covers_the_target_and_centres_the_crop(photo, target):
    (rw, rh), (top, left) = cover_crop(*photo, target)
    tw, th = target
    assert rw >= tw and rh >= th
    assert rw == tw or rh == th  # scaled just enough: one side fits exactly
    assert abs(rw / rh - photo[0] / photo[1]) < 0.01  # the shape is kept
    assert (top, left) == ((rh - th) // 2, (rw - tw) // 2)
