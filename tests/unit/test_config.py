"""Config: presets, YAML, dotted overrides, type checks, cross-field validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from difftrain.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    dump_config,
    list_presets,
    load_config,
    parse_overrides,
    presets_dir,
    section_from_dict,
)


def test_every_preset_loads_and_validates():
    names = list_presets()
    assert {"digits", "mnist", "butterflies", "flowers"} <= set(names)
    # Presets that fine-tune need a base model and the user's own photos, given on the command line.
    needs = {"dreambooth-lora": ["model.pretrained=runs/sd", "data.instance_dir=photos"],
             "dreambooth-sdxl-lora": ["model.pretrained=stabilityai/stable-diffusion-xl-base-1.0",
                                      "data.instance_dir=photos"]}
    for name in names:
        cfg = load_config(name, needs.get(name, []))
        assert isinstance(cfg, RunConfig)
    with pytest.raises(ConfigError) as info:
        load_config("dreambooth-lora")
    assert "model.pretrained" in str(info.value) and "data.instance_dir" in str(info.value)


def test_every_preset_has_a_header_saying_what_it_trains():
    for path in sorted(presets_dir().rglob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 40, path


def test_tiny_configs_load():
    assert load_config("tiny/digits-class").model.conditioning == "class"
    assert load_config("tiny/folder-uncond").train.gradient_accumulation_steps == 2


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        "digits",
        ["train.max_steps=200", "data.resolution=32", "train.learning_rate=1e-4", "train.mixed_precision=bf16",
         "data.random_flip=true", "model.unet.layers_per_block=2", "train.checkpoints_total_limit=null"],
    )
    assert cfg.train.max_steps == 200 and isinstance(cfg.train.max_steps, int)
    assert cfg.data.resolution == 32
    assert cfg.train.learning_rate == pytest.approx(1e-4) and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.mixed_precision == "bf16"
    assert cfg.data.random_flip is True
    assert cfg.model.unet == {"layers_per_block": 2}
    assert cfg.train.checkpoints_total_limit is None


def test_output_dir_argument_wins():
    assert load_config("digits", output_dir="x/y").output_dir == "x/y"


def test_unknown_preset_names_the_presets():
    with pytest.raises(ConfigError) as info:
        load_config("digitz")
    message = str(info.value)
    assert "'digitz'" in message and "digits" in message and "Did you mean 'digits'" in message


def test_missing_yaml_file():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config("nope.yaml")


def test_all_problems_are_reported_at_once(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"resolutoin": 32, "channels": 2},
        "train": {"max_steps": "many", "batch_size": 0, "mixed_precision": "fp8"},
        "bogus": 1,
    }))
    with pytest.raises(ConfigError) as info:
        load_config(str(path), ["train.learning_rate=fast"])
    problems = info.value.problems
    text = "\n".join(problems)
    assert "unknown key 'data.resolutoin'; did you mean 'data.resolution'?" in text
    assert "'data.channels' = 2: expected 1 | 3" in text
    assert "'train.max_steps' = 'many': expected int | null" in text
    assert "'train.mixed_precision' = 'fp8'" in text and "'fp16'" in text
    assert "'train.learning_rate' = 'fast': expected float" in text
    assert "unknown key 'bogus'" in text
    assert "'train.batch_size' = 0: must be > 0" in text
    assert len(problems) >= 7


def test_bool_is_not_an_int_and_int_is_a_float():
    with pytest.raises(ConfigError, match="'train.batch_size' = True"):
        load_config("digits", ["train.batch_size=true"])
    assert load_config("digits", ["train.learning_rate=1"]).train.learning_rate == 1.0


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["train.num_epochs=3"], "are both set"),
        (["train.max_steps=null"], "set 'train.max_steps' or 'train.num_epochs'"),
        (["train.sample_every_epochs=2"], "'train.sample_every_steps' and 'train.sample_every_epochs' are both set"),
        (["model.conditioning=none"], "'sample.guidance_scale' = 2.0 needs a conditional model"),
        (["train.condition_dropout=1.5"], "'train.condition_dropout' = 1.5"),
        (["train.push_to_hub=true"], "'train.hub_model_id' is not set"),
        (["diffusion.beta_start=0.5", "diffusion.beta_end=0.1"], "need 0 < beta_start < beta_end < 1"),
        (["model.size=custom"], "'model.size' = 'custom' needs 'model.unet'"),
        (["bad-override"], "expected key=value, got 'bad-override'"),
    ],
)
def test_cross_field_checks(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        load_config("digits", overrides)
    assert fragment in str(info.value)


def test_parse_overrides_reads_yaml_values():
    tree, problems = parse_overrides(["a.b=1", "a.c=[1, 2]", "d=hello", "e=1e-3", "f="])
    assert problems == []
    assert tree == {"a": {"b": 1, "c": [1, 2]}, "d": "hello", "e": 1e-3, "f": None}


def test_saved_config_round_trips(tmp_path: Path):
    cfg = load_config("flowers", ["train.max_steps=7"])
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_config_reference_doc_is_current(repo):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, str(repo / "scripts" / "gen_config_docs.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_unquoted_no_is_the_string_no_for_mixed_precision():
    # YAML 1.1 reads `no` as false; `train.mixed_precision=no` on the command line must still work.
    assert load_config("digits", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config("digits", ["train.mixed_precision='no'"]).train.mixed_precision == "no"


def test_one_section_of_a_saved_config_is_read_by_the_schema_alone():
    # A saved train section without max_steps is fine on its own (that check spans the whole config).
    train = section_from_dict("train", yaml.safe_load("mixed_precision: no\nbatch_size: 4"))
    assert train.mixed_precision == "no" and train.batch_size == 4
    with pytest.raises(ConfigError, match="train.batch_sise"):
        section_from_dict("train", {"batch_sise": 4})
    with pytest.raises(ValueError, match="'trian' is not a config section"):
        section_from_dict("trian", {})


def _float_keys() -> list[str]:
    """Every key of the schema whose type takes a float (float or Optional[float])."""
    import dataclasses
    import typing

    from difftrain.config import RunConfig
    from difftrain.config.loading import _accepts_float

    keys = []
    for section, cls in typing.get_type_hints(RunConfig).items():
        hints = typing.get_type_hints(cls) if dataclasses.is_dataclass(cls) else {}
        keys += [f"{section}.{name}" for name, tp in hints.items() if _accepts_float(tp)]
    return keys


def test_schema_has_the_float_keys_the_next_test_covers():
    keys = _float_keys()
    assert {"train.learning_rate", "train.max_grad_norm", "sample.guidance_scale", "lora.alpha",
            "vae.scaling_factor", "diffusion.snr_gamma"} <= set(keys)
    assert len(keys) >= 20


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("text", ["nan", "inf", "-inf", ".nan", ".inf", "1e999"])
def test_every_float_key_refuses_non_finite_values_on_the_command_line(key: str, text: str):
    with pytest.raises(ConfigError) as info:
        load_config("digits", [f"{key}={text}"])
    assert f"'{key}' = " in str(info.value) and "must be a finite number" in str(info.value)
    assert "expected float" not in str(info.value)


def test_non_finite_values_in_a_yaml_file_name_the_key(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: 2\n  learning_rate: .nan\ndiffusion:\n  snr_gamma: -.inf\n"
                    "model:\n  unet:\n    norm_eps: .nan\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert info.value.problems == [
        "'train.learning_rate' = nan: must be a finite number (not NaN or infinity)",
        "'diffusion.snr_gamma' = -inf: must be a finite number (not NaN or infinity)",
        "'model.unet.norm_eps' = nan: must be a finite number (not NaN or infinity)",
    ]
    # A string key keeps 'nan' as text; a float key still says what it expected for other words.
    assert load_config("digits", ["data.path=nan"]).data.path == "nan"
    with pytest.raises(ConfigError, match="'train.learning_rate' = 'fast': expected float"):
        load_config("digits", ["train.learning_rate=fast"])


def test_a_config_file_that_is_not_utf8_text_or_not_a_mapping_is_named(tmp_path: Path):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    with pytest.raises(ConfigError) as info:
        load_config(str(binary))
    assert info.value.problems == [f"{binary}: not UTF-8 text (byte 0: b'\\x89'); a config is a YAML file"]
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  caption_template: 'caf\xe9 {label}'\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{latin1}: not UTF-8 text"):
        load_config(str(latin1))
    for text, kind in (("- a\n- b\n", "list"), ("just words\n", "str"), ("3\n", "int")):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_config(str(path))
        assert info.value.problems == [
            f"{path}: top level must be a mapping of sections (data:, model:, train: ...), got a {kind}"]
