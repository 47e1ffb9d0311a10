"""Tests for the procedural moving-shape videos and their captions (ddrl_scale.data.synthetic)."""

import itertools
import json
import math

import numpy as np
import pytest

from ddrl_scale.data.synthetic import (
    BACKGROUNDS,
    COLORS,
    DIRECTIONS,
    SHAPES,
    VideoSpec,
    caption,
    make_sample,
    make_samples,
    parse_caption,
    render,
    sample_spec,
)

NUM_FRAMES, HEIGHT, WIDTH = 8, 16, 16


def _foreground_centroids(video: np.ndarray, background: str) -> np.ndarray:
    """(T, 2) centroid (row, column) of the pixels that differ from the known background."""
    background_rgb = np.round(np.asarray(BACKGROUNDS[background]) * 255)
    differs = np.abs(video.astype(float) - background_rgb).max(axis=-1) > 10  # (T, H, W)
    centroids = []
    for frame in differs:
        rows, cols = np.nonzero(frame)
        centroids.append((rows.mean(), cols.mean()))
    return np.array(centroids)


def _covered_area(video: np.ndarray, spec: VideoSpec) -> np.ndarray:
    """(T,) object area in pixels, from how far each pixel has moved from background to object."""
    background = np.asarray(BACKGROUNDS[spec.background]) * 255
    foreground = np.asarray(COLORS[spec.color]) * 255
    fraction = (video.astype(float) - background) @ (foreground - background)
    fraction /= np.sum((foreground - background) ** 2)
    return fraction.sum(axis=(1, 2))


def test_make_samples_is_deterministic_in_seed():
    first = list(make_samples(4, seed=7))
    again = list(make_samples(4, seed=7))
    other = list(make_samples(4, seed=8))
    for (key_a, video_a, text_a, meta_a), (key_b, video_b, text_b, meta_b) in zip(first, again):
        assert key_a == key_b
        np.testing.assert_array_equal(video_a, video_b)
        assert text_a == text_b and meta_a == meta_b
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(first, other))


def test_sample_does_not_depend_on_how_many_are_drawn():
    short = list(make_samples(2, seed=3))
    long = list(make_samples(5, seed=3))
    for (key_a, video_a, _, _), (key_b, video_b, _, _) in zip(short, long):
        assert key_a == key_b
        np.testing.assert_array_equal(video_a, video_b)


def test_shapes_dtypes_keys_and_meta():
    samples = list(make_samples(3, seed=0))
    assert [key for key, *_ in samples] == ["00000000", "00000001", "00000002"]
    for _, video, text, meta in samples:
        assert video.shape == (NUM_FRAMES, HEIGHT, WIDTH, 3)
        assert video.dtype == np.uint8
        assert isinstance(text, str)
        assert json.loads(json.dumps(meta)) == meta
        assert set(meta) == {
            "shape",
            "color",
            "direction",
            "background",
            "size",
            "start_y",
            "start_x",
            "speed",
        }
        assert caption(VideoSpec(**meta)) == text


def test_make_sample_at_other_resolution():
    video, _, meta = make_sample(np.random.default_rng(0), num_frames=5, height=24, width=40)
    assert video.shape == (5, 24, 40, 3)
    assert meta["size"] == 8


def test_caption_format():
    spec = VideoSpec("square", "red", "left", "grey", 5, 2.0, 9.0, 1.0)
    assert caption(spec) == "a red square moving left on a grey background"


@pytest.mark.parametrize(
    "color, shape, direction, background",
    list(itertools.product(COLORS, SHAPES, DIRECTIONS, BACKGROUNDS)),
)
def test_caption_round_trips_through_parse(color, shape, direction, background):
    spec = VideoSpec(shape, color, direction, background, 5, 1.0, 1.0, 1.0)
    expected = {"color": color, "shape": shape, "direction": direction, "background": background}
    assert parse_caption(caption(spec)) == expected


def test_parse_caption_is_robust_to_case_punctuation_and_order():
    parsed = parse_caption("On a GRAY background, one small Blue TRIANGLE moves... down!")
    assert parsed == {
        "color": "blue",
        "shape": "triangle",
        "direction": "down",
        "background": "grey",
    }
    # The object colour is the one right before the shape, not the first colour in the text.
    parsed = parse_caption("not the white one: the orange circle, going right")
    assert parsed["color"] == "orange" and parsed["direction"] == "right"


def test_parse_caption_missing_words_are_none():
    assert parse_caption("a video of something") == {
        "color": None,
        "shape": None,
        "direction": None,
        "background": None,
    }
    assert parse_caption("cyan moving up")["color"] == "cyan"
    assert parse_caption("a square on a purple background")["background"] is None


def test_vocabulary_colours_are_well_separated():
    objects = np.array(list(COLORS.values()))
    backgrounds = np.array(list(BACKGROUNDS.values()))
    between_objects = np.linalg.norm(objects[:, None] - objects[None], axis=-1)
    np.fill_diagonal(between_objects, np.inf)
    assert between_objects.min() > 0.3
    assert np.linalg.norm(objects[:, None] - backgrounds[None], axis=-1).min() > 0.5
    assert not set(COLORS) & set(BACKGROUNDS)


@pytest.mark.parametrize("seed", range(12))
def test_object_moves_in_captioned_direction(seed):
    _, video, text, meta = next(make_samples(1, seed=seed))
    centroids = _foreground_centroids(video, meta["background"])
    step = np.asarray(DIRECTIONS[parse_caption(text)["direction"]])
    moved = centroids[-1] - centroids[0]
    assert moved @ step > 0.4 * (WIDTH - meta["size"])  # clearly, not by a pixel
    across = moved - (moved @ step) * step
    assert np.abs(across).max() < 0.5


@pytest.mark.parametrize("shape, area", [("square", 25.0), ("circle", math.pi * 6.25)])
def test_object_keeps_its_area_and_stays_in_frame(shape, area):
    # Sub-pixel start and speed: the anti-aliased coverage must still add up to the true area.
    spec = VideoSpec(shape, "yellow", "right", "navy", 5, 3.3, 0.6, 1.37)
    video = render(spec, NUM_FRAMES, HEIGHT, WIDTH)
    np.testing.assert_allclose(_covered_area(video, spec), area, rtol=0.05)


def test_sampled_objects_stay_inside_the_frame():
    for seed in range(30):
        spec = sample_spec(np.random.default_rng(seed), HEIGHT, WIDTH, NUM_FRAMES)
        assert spec.size in (5, 6)
        for frame in (0, NUM_FRAMES - 1):
            top, left = spec.top_left(frame)
            assert 0 <= top and top + spec.size <= HEIGHT
            assert 0 <= left and left + spec.size <= WIDTH


def test_render_paints_named_colours():
    spec = VideoSpec("square", "green", "down", "black", 5, 2.0, 4.0, 1.0)
    video = render(spec, NUM_FRAMES, HEIGHT, WIDTH)
    green = np.round(np.asarray(COLORS["green"]) * 255)
    black = np.round(np.asarray(BACKGROUNDS["black"]) * 255)
    # Whole-pixel positions: frame 3 covers rows 5..9 and columns 4..8 exactly.
    np.testing.assert_array_equal(video[3, 5:10, 4:9], np.broadcast_to(green, (5, 5, 3)))
    np.testing.assert_array_equal(video[3, 10:, :], np.broadcast_to(black, (6, WIDTH, 3)))
    np.testing.assert_array_equal(video[3, :, :4], np.broadcast_to(black, (HEIGHT, 4, 3)))


def test_unknown_vocabulary_is_rejected():
    with pytest.raises(ValueError, match="purple"):
        VideoSpec("square", "purple", "left", "grey", 5, 0.0, 0.0, 1.0)
