"""Per-step caption handling: several captions per image, tag shuffling and dropout with keep_tokens, a prefix;
deterministic in (seed, step)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftrain.config import ConfigError, DataConfig, load_config
from difftrain.data.caption_recipe import CHOICE_SEPARATOR, CaptionRecipe, step_captions
from difftrain.data.captions import resolve_captions
from difftrain.data.order import step_generator
from difftrain.data.sources import folder_source

TAGS = "sks dog, red collar, on grass, sunny, close-up, photo"


def _steps(recipe: CaptionRecipe, captions: list[str], seed: int, step: int) -> list[str]:
    return step_captions(recipe, captions, list(range(len(captions))), step_generator(seed, step, 0, 0, "cpu"))


def test_nothing_set_leaves_a_caption_as_it_is():
    recipe = CaptionRecipe()
    assert not recipe.varies([TAGS]) and recipe.fixed(TAGS) == TAGS
    assert recipe.apply(TAGS, random.Random(0)) == TAGS


def test_shuffling_keeps_the_first_keep_tokens_tags_in_place_and_the_prefix_first():
    recipe = CaptionRecipe(prefix="trigger", shuffle_tags=True, keep_tokens=2)
    seen = set()
    for step in range(30):
        (caption,) = _steps(recipe, [TAGS], seed=0, step=step)
        tags = caption.split(", ")
        assert tags[:3] == ["trigger", "sks dog", "red collar"]
        assert sorted(tags[3:]) == sorted(["on grass", "sunny", "close-up", "photo"])
        seen.add(caption)
    assert len(seen) > 5  # the rest is shuffled, differently from step to step


def test_the_same_seed_and_step_give_the_same_captions_and_other_steps_other_ones():
    recipe = CaptionRecipe(shuffle_tags=True, tag_dropout=0.3, keep_tokens=1)
    captions = [TAGS, "a, b, c, d, e", "one tag"]
    assert _steps(recipe, captions, seed=3, step=7) == _steps(recipe, captions, seed=3, step=7)
    assert {tuple(_steps(recipe, captions, 3, step)) for step in range(10)} != {tuple(_steps(recipe, captions, 3, 7))}
    assert _steps(recipe, captions, seed=4, step=7) != _steps(recipe, captions, seed=3, step=7)


def test_tag_dropout_never_drops_kept_tags_or_the_prefix_and_drops_about_its_rate():
    recipe = CaptionRecipe(prefix="pre", tag_dropout=0.5, keep_tokens=1)
    rest = TAGS.split(", ")[1:]
    kept = 0
    for step in range(200):
        tags = _steps(recipe, [TAGS], seed=1, step=step)[0].split(", ")
        assert tags[:2] == ["pre", "sks dog"]
        assert tags[2:] == [t for t in rest if t in tags[2:]]  # no shuffle: order kept
        kept += len(tags) - 2
    assert 0.4 < kept / (200 * len(rest)) < 0.6


def test_one_of_several_captions_is_drawn_per_step():
    recipe = CaptionRecipe(prefix="pre")
    caption = CHOICE_SEPARATOR.join(["first caption", "second caption", "third caption"])
    assert recipe.varies([caption]) and not recipe.varies(["first caption"])
    assert recipe.fixed(caption) == "pre, first caption"
    drawn = {_steps(recipe, [caption], 0, step)[0] for step in range(40)}
    assert drawn == {"pre, first caption", "pre, second caption", "pre, third caption"}
    assert set(recipe.vocabulary_texts([caption])) == {"first caption", "second caption", "third caption", "pre"}


def test_sidecar_lines_are_one_caption_or_several_and_metadata_lists_are_several(tmp_path: Path):
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("a red  dog\n\nsitting on grass\n")
    (tmp_path / "b.txt").write_text("one line\n")
    source = folder_source(tmp_path)
    joined = resolve_captions(source, DataConfig(captions="sidecar"))
    chosen = resolve_captions(source, DataConfig(captions="sidecar", caption_lines="choose"))
    assert joined == ["a red dog sitting on grass", "one line"]
    assert chosen == [f"a red dog{CHOICE_SEPARATOR}sitting on grass", "one line"]
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": ["x  y", "", "z"]}\n'
                                             '{"file_name": "b.png", "text": "w"}\n')
    assert resolve_captions(source, DataConfig(captions="metadata")) == [f"x y{CHOICE_SEPARATOR}z", "w"]


@pytest.mark.parametrize("overrides, message", [
    (["data.keep_tokens=-1", "data.shuffle_tags=true"], "'data.keep_tokens' = -1: must be >= 0"),
    (["data.tag_dropout=1.0"], r"'data.tag_dropout' = 1.0: must be in \[0, 1\)"),
    (["data.keep_tokens=2"], "'data.keep_tokens' = 2 has no effect without 'data.shuffle_tags'"),
    (["data.tag_separator=''"], "'data.tag_separator' = '': must be a non-empty string"),
])
def test_bad_caption_settings_are_refused_naming_the_key(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny/digits-text", overrides, output_dir="unused")


def test_caption_settings_need_a_text_model():
    with pytest.raises(ConfigError, match="'data.shuffle_tags' = True needs 'model.conditioning' = 'text'"):
        load_config("tiny/digits-class", ["data.shuffle_tags=true"], output_dir="unused")
