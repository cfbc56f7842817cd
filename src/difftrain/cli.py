"""Command line: `difftrain train|check|train-vae|sample|evaluate|show-config|presets|ui`. Thin: parse, validate, call the library."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

EPILOG = "Overrides are dotted keys: train.max_steps=200 data.resolution=32 model.unet.layers_per_block=1"


class _VersionAction(argparse.Action):
    """`--version`: difftrain's and its libraries' versions, read from package metadata when asked (no torch import)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: str = argparse.SUPPRESS, help: Optional[str] = None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from difftrain.versions import format_versions, library_versions

        print(format_versions(library_versions()))
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difftrain", description="Train and sample diffusion image models.")
    parser.add_argument("--debug", action="store_true",
                        help="print the Python traceback of an error (also: DIFFTRAIN_DEBUG=1)")
    parser.add_argument("--version", action=_VersionAction,
                        help="print the versions of difftrain, Python, torch, diffusers, transformers, accelerate, peft ...")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train or resume a run", epilog=EPILOG)
    train.add_argument("config", help="preset name (see `difftrain presets`) or a YAML file")
    train.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, anywhere on the line")
    train.add_argument("--output-dir", help="run directory (overrides output_dir); an existing run resumes")
    train.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="train with N processes on this machine (torchrun; gloo on CPU, NCCL on GPUs); "
                            "for several machines use accelerate launch, see docs/distributed.md")

    check = sub.add_parser("check", help="validate a config, scan its data for bad files, time one training step",
                           epilog=EPILOG)
    check.add_argument("config", help="preset name or YAML file")
    check.add_argument("overrides", nargs="*", metavar="key=value")
    check.add_argument("--output-dir", help="also check that this run directory would resume with the config")
    check.add_argument("--no-step", action="store_true", help="skip the timed training step")
    check.add_argument("--all", action="store_true", help="list every warning (default: 20 of each kind, then a count)")

    vae = sub.add_parser("train-vae", help="train only a from-scratch AutoencoderKL (the `vae` section) on the data",
                         epilog=EPILOG)
    vae.add_argument("config", help="preset name or YAML file (its data and vae sections are used)")
    vae.add_argument("overrides", nargs="*", metavar="key=value")
    vae.add_argument("--output-dir", help="where OUTPUT_DIR/vae and the reconstruction grid go")

    show = sub.add_parser("show-config", help="print the resolved config and exit", epilog=EPILOG)
    show.add_argument("config")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("--output-dir")

    sub.add_parser("presets", help="list the presets shipped with difftrain")

    sample = sub.add_parser("sample", help="generate images from a trained run")
    sample.add_argument("run_dir", help="an exported run directory (a diffusers pipeline folder, or a run's best/)")
    sample.add_argument("--checkpoint", metavar="NAME",
                        help="sample a kept checkpoint of RUN_DIR (step-000200, or latest) instead of its export: "
                             "exported once into RUN_DIR/.difftrain/exports/ (EMA weights when the run keeps them)")
    sample.add_argument("--scheduler", help="ddpm, ddim, dpm++, unipc, euler, euler-a, heun (default: the run's)")
    sample.add_argument("--num-inference-steps", type=int)
    sample.add_argument("--seed", default="0", help="first seed, or an explicit list/range like '0-15' or '3,7'")
    sample.add_argument("--num-images", type=int, help="images per row (per prompt / class label); 1 in a sweep")
    sample.add_argument("--class-label", help="class index or name, or a comma list; default: every class, one row each")
    sample.add_argument("--prompt", action="append", help="prompt of a text model; repeat for one row per prompt")
    sample.add_argument("--negative-prompt", help="unconditional branch of guidance (default: the empty prompt)")
    sample.add_argument("--guidance-scale", help="classifier-free guidance scale (1 = none), or a sweep like 0,5,10,20")
    sample.add_argument("--batch-size", type=int, default=64)
    sample.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    sample.add_argument("--out", default=None, help="PNG grid path (default: RUN_DIR/samples/sample.png; "
                        "sample-step-000200.png for a checkpoint)")
    sample.add_argument("--out-dir", default=None, help="also write each image as its own PNG here")

    ui = sub.add_parser("ui", help="serve the web UI over the runs in a folder (docs/ui.md)")
    ui.add_argument("runs_dir", nargs="?", default=".", help="the folder holding the run folders (default: .)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1); any other needs a token, printed at start")
    ui.add_argument("--port", type=int, default=7860)
    ui.add_argument("--token", help="the access token for a non-loopback --host (default: a new random one)")
    ui.add_argument("--max-running", type=int, default=1, metavar="N",
                    help="trainings the launch queue runs at once (default 1)")

    ev = sub.add_parser("evaluate", help="FID/KID and conditional accuracy of samples from a trained run")
    ev.add_argument("run_dir", help="an exported run directory")
    ev.add_argument("--reference", help="reference data (anything data.path accepts; default: the run's training data)")
    ev.add_argument("--reference-split", help="split of hub/MNIST reference data (default: the run's)")
    ev.add_argument("--num-samples", type=int, default=500)
    ev.add_argument("--num-reference", type=int, default=2000, help="reference images for FID/KID (features cached)")
    ev.add_argument("--scheduler")
    ev.add_argument("--num-inference-steps", type=int)
    ev.add_argument("--guidance-scale", type=float)
    ev.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--device", default=None)
    ev.add_argument("--no-inception", action="store_true", help="skip FID/KID (classifier metrics only)")
    ev.add_argument("--out", help="JSON report path (default: RUN_DIR/evaluation.json)")
    return parser


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("difftrain").setLevel(logging.INFO)


def _load(args: argparse.Namespace):
    from difftrain.config import load_config

    return load_config(args.config, args.overrides, output_dir=args.output_dir)


def _check_output_dir(cfg) -> None:
    """Before importing torch: a folder that is not difftrain's, or one another process trains in, is refused at once."""
    from difftrain.training.run_dir import check_before_claim

    if os.environ.get("RANK", "0") == "0":
        check_before_claim(Path(cfg.output_dir))


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load(args)  # before importing torch/diffusers, so config errors come back at once
    _check_output_dir(cfg)
    if args.num_processes is not None:
        from difftrain.training.distributed import launch_local

        return launch_local(args.num_processes, _without_num_processes(sys.argv[1:] if args.argv is None else args.argv))
    from difftrain.training.loop import train

    # Recorded in the run's status (a YAML path made absolute: the run may be shown from another folder).
    source = str(Path(args.config).resolve()) if Path(args.config).is_file() else args.config
    output_dir = train(cfg, config_source=source, overrides=list(args.overrides))
    if os.environ.get("RANK", "0") != "0":
        return 0  # the main process reports the run
    print(f"done: {output_dir} (samples in {output_dir / 'samples'}, model card {output_dir / 'README.md'})")
    return 0


def _without_num_processes(argv: Sequence[str]) -> list[str]:
    """The command line for each rank: the same one, minus the launch option."""
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--num-processes":
            skip = True
        elif not word.startswith("--num-processes="):
            out.append(word)
    return out


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)  # config errors exit 2 like every command
    from difftrain.training.preflight import run_check

    return run_check(cfg, with_step=not args.no_step, show_all=args.all)


def cmd_train_vae(args: argparse.Namespace) -> int:
    cfg = _load(args)
    _check_output_dir(cfg)
    from difftrain.training.vae_train import train_vae_run

    vae_dir = train_vae_run(cfg)
    print(f"done: {vae_dir} (use it with vae.pretrained={vae_dir.parent})")
    return 0


def cmd_show_config(args: argparse.Namespace) -> int:
    from difftrain.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from difftrain.config import list_presets, presets_dir

    for name in list_presets():
        header = (presets_dir() / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ").strip()
        print(f"{name:16s} {header}")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from difftrain.commands.sample import sample_run

    path = sample_run(
        Path(args.run_dir), checkpoint=args.checkpoint, scheduler=args.scheduler, num_inference_steps=args.num_inference_steps,
        seed=args.seed, num_images=args.num_images, class_label=args.class_label, prompts=args.prompt,
        negative_prompt=args.negative_prompt, guidance_scale=args.guidance_scale, batch_size=args.batch_size, device=args.device,
        out=Path(args.out) if args.out else None, out_dir=Path(args.out_dir) if args.out_dir else None,
    )
    print(f"wrote {path}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from difftrain.ui.serve import serve

    return serve(Path(args.runs_dir), host=args.host, port=args.port, token=args.token, max_running=args.max_running)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from difftrain.commands.evaluate import evaluate_run

    evaluate_run(
        Path(args.run_dir), reference=args.reference, reference_split=args.reference_split,
        num_samples=args.num_samples, num_reference=args.num_reference, scheduler=args.scheduler,
        num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
        batch_size=args.batch_size, device=args.device, use_inception=not args.no_inception,
        out=Path(args.out) if args.out else None,
    )
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "check": cmd_check, "train": cmd_train, "train-vae": cmd_train_vae, "show-config": cmd_show_config, "presets": cmd_presets, "sample": cmd_sample, "ui": cmd_ui}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    # Overrides may come before or after options (`train digits --output-dir d a.b=1`), which plain
    # parse_args rejects, so stray key=value words are collected here.
    args, extra = parser.parse_known_args(argv)
    options = [word for word in extra if word.startswith("-")]
    if options or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
    # A word that is neither an option nor key=value is an override missing its value (argparse would
    # call it an unrecognized argument, or take it as the config); one line names it.
    from difftrain.errors import override_words_problem

    problem = override_words_problem([*getattr(args, "overrides", []), *extra])
    if problem:
        print(f"difftrain {args.command}: error: {problem}", file=sys.stderr)
        return 2
    if extra:
        args.overrides = list(args.overrides) + extra
    args.argv = list(argv) if argv is not None else None
    _setup_logging()
    from difftrain.config import ConfigError
    from difftrain.errors import HubUploadError, StopRequested, describe_error
    from safetensors import SafetensorError  # how safetensors reports a failed write (disk full, ...)

    # Under a launcher each rank prints its own error; the rank says which one failed.
    rank = f" [rank {os.environ['RANK']}]" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ else ""
    debug = args.debug or os.environ.get("DIFFTRAIN_DEBUG", "").strip() not in ("", "0")
    # Exit codes (docs/reliability.md#errors-and-exit-codes): 0 done, 1 error, 2 config or command-line error,
    # 130 Ctrl-C, 143 SIGTERM.
    try:
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        _report(f"difftrain {args.command}{rank}: {exc}", debug)
        return 2
    except (ValueError, OSError, SafetensorError, HubUploadError) as exc:
        # OSError: a read-only folder, a full disk or a missing permission outside difftrain's own checks
        # (which raise difftrain.errors.WriteError, both an OSError and a ValueError, naming the path).
        _report(f"difftrain {args.command}{rank}: error: {describe_error(exc)}", debug)
        return 1
    except StopRequested as exc:
        # SIGTERM / Ctrl-C during training: the loop has already kept what it could (see training/stop.py).
        print(f"difftrain {args.command}{rank}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted; the last complete checkpoint is kept and the same command resumes", file=sys.stderr)
        return 130


def _report(line: str, debug: bool) -> None:
    """One line on stderr; with --debug / DIFFTRAIN_DEBUG=1 the traceback first."""
    if debug:
        traceback.print_exc()
    print(line, file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
