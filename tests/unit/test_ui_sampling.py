"""The web UI's SampleRequest: each field checked with a one-line error naming it, and the `difftrain sample` line of a
request, read back by the CLI's own parser."""

from __future__ import annotations

import shlex

import pytest

from difftrain.cli import _parser
from difftrain.ui.sampling import SampleRequest, command_line


def test_a_request_reads_its_fields_and_nulls_mean_the_runs_defaults():
    request = SampleRequest.from_json({"run": "flowers/a", "source": "checkpoint:step-000200", "class_labels": [0, "daisy"],
                                       "prompts": [], "negative_prompt": None, "scheduler": "dpm++",
                                       "num_inference_steps": 20, "guidance_scale": 3, "seed": 7, "num_images": 4})
    assert request == SampleRequest(run="flowers/a", source="checkpoint:step-000200", class_labels="0,daisy",
                                    scheduler="dpm++", num_inference_steps=20, guidance_scale="3", seed="7",
                                    num_images=4)
    assert request.checkpoint == "step-000200"
    plain = SampleRequest.from_json({"run": ".", "source": None, "class_labels": "", "guidance_scale": "1,3,5",
                                     "seed": "0-3,9", "prompts": "one prompt"})
    assert (plain.source, plain.checkpoint, plain.class_labels, plain.guidance_scale, plain.seed, plain.prompts) == \
        ("export", None, None, "1,3,5", "0-3,9", ("one prompt",))


@pytest.mark.parametrize("fields, start", [
    ({"run": ""}, "run '': expected a run id"),
    ({"run": 3}, "run 3: expected a run id"),
    ({"source": "latest"}, "source 'latest': expected 'export', 'best' or 'checkpoint:NAME'"),
    ({"source": "checkpoint:"}, "source 'checkpoint:': expected"),
    ({"class_labels": {"a": 1}}, "class_labels {'a': 1}: expected class indices or names"),
    ({"class_labels": [True]}, "class_labels [True]: expected"),
    ({"prompts": ["ok", " "]}, "prompts ['ok', ' ']: expected a list of non-empty strings"),
    ({"prompts": [f"p{i}" for i in range(17)]}, "prompts: 17 given; at most 16"),
    ({"negative_prompt": 3}, "negative_prompt 3: expected a string or null"),
    ({"scheduler": "fast"}, "scheduler 'fast': expected one of ddpm, ddim, dpm++, unipc, euler, euler-a, heun"),
    ({"num_inference_steps": 0}, "num_inference_steps 0: expected an integer from 1 to 1000"),
    ({"num_inference_steps": 1001}, "num_inference_steps 1001: expected an integer from 1 to 1000"),
    ({"num_inference_steps": "20"}, "num_inference_steps '20': expected an integer"),
    ({"num_inference_steps": True}, "num_inference_steps True: expected an integer"),
    ({"num_images": 65}, "num_images 65: expected an integer from 1 to 64"),
    ({"guidance_scale": "nan"}, "guidance_scale 'nan': expected a number >= 0"),
    ({"guidance_scale": -1}, "guidance_scale '-1': expected a number >= 0"),
    ({"guidance_scale": "1,x"}, "guidance_scale '1,x': expected"),
    ({"guidance_scale": [1, 2]}, "guidance_scale [1, 2]: expected"),
    ({"seed": "-1"}, "seed '-1': expected a seed >= 0, or one per image like '0-15' or '3,7'"),
    ({"seed": "x"}, "seed 'x': expected a seed >= 0"),
    ({"seed": "5-2"}, "seed '5-2': expected a seed >= 0, or one per image like '0-15' or '3,7' (at most 256 seeds"),
    ({"seed": "0-999999999"}, "seed '0-999999999': expected a seed >= 0, or one per image like '0-15' or '3,7' (at most"),
    ({"seed": 1.5}, "seed 1.5: expected"),
    ({"steps": 20}, "unknown field(s) 'steps'; a sample request has run, source, class_labels, prompts"),
])
def test_a_bad_field_is_named_with_what_it_allows(fields: dict, start: str):
    with pytest.raises(ValueError) as info:
        SampleRequest.from_json({"run": "r", **fields})
    assert str(info.value).startswith(start) and "\n" not in str(info.value)


def test_a_request_is_a_json_object():
    with pytest.raises(ValueError, match=r"^a sample request is a JSON object, got list$"):
        SampleRequest.from_json([{"run": "r"}])


def _parsed(line: str):
    """The line as the CLI reads it (`difftrain` dropped)."""
    words = shlex.split(line)
    assert words[:2] == ["difftrain", "sample"]
    return _parser().parse_args(words[1:])


def test_the_command_line_gives_the_cli_every_value_of_the_request():
    request = SampleRequest.from_json({
        "run": "my runs/a b", "source": "checkpoint:latest", "prompts": ["a 'quoted' cat", "-starts with a dash"],
        "negative_prompt": "-blurry; $(rm -rf x)", "scheduler": "euler", "num_inference_steps": 7,
        "guidance_scale": "1,3", "seed": "4-5", "num_images": 1})
    args = _parsed(command_line("my runs/a b", request))
    assert (args.run_dir, args.checkpoint, args.prompt, args.negative_prompt, args.scheduler) == \
        ("my runs/a b", "latest", ["a 'quoted' cat", "-starts with a dash"], "-blurry; $(rm -rf x)", "euler")
    assert (args.num_inference_steps, args.guidance_scale, args.seed, args.num_images, args.class_label) == \
        (7, "1,3", "4-5", 1, None)
    assert (args.out, args.out_dir, args.device, args.batch_size) == (None, None, None, 64)  # the CLI's defaults


def test_nulls_are_left_to_the_run_and_best_is_the_runs_best_folder():
    assert command_line("flowers/a", SampleRequest(run="flowers/a")) == "difftrain sample flowers/a"
    assert command_line("flowers/a", SampleRequest(run="flowers/a", source="best", class_labels="0,3")) == \
        "difftrain sample flowers/a/best --class-label 0,3"
    assert command_line(".", SampleRequest(run=".", source="best")) == "difftrain sample best"
    args = _parsed(command_line(".", SampleRequest(run=".", source="checkpoint:step-000200")))
    assert (args.run_dir, args.checkpoint, args.seed, args.guidance_scale) == (".", "step-000200", "0", None)
