"""The `edgepipe` command line: validate, build, bench. `main(argv) -> int` is what tests call.

Exit codes: 0 ok, 1 failure, 2 usage or input error, 3 a gate failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgepipe import __version__
from edgepipe.errors import EdgepipeError, RecipeError

log = logging.getLogger("edgepipe")

EXAMPLES = {
    "validate": "example:\n  edgepipe validate src/edgepipe/recipes/default.yaml --set stages.0.max_steps=50",
    "build": (
        "examples:\n"
        "  edgepipe build src/edgepipe/recipes/default.yaml --out runs/demo\n"
        "  edgepipe build my.yaml --set stages.2.calibration.method=entropy --set bench.runs=100\n"
        "  edgepipe build my.yaml --out runs/x --force   # rerun every stage"
    ),
    "bench": "example:\n  edgepipe bench runs/demo   # re-measure every artifact, rewrite report.json/.md",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgepipe",
        description="Turn a trained model into small, fast, verified ONNX artifacts from one YAML recipe.",
        epilog="\n\n".join(EXAMPLES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edgepipe {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXAMPLES[name],
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    overrides = {
        "action": "append",
        "default": [],
        "metavar": "KEY=VALUE",
        "help": "override a recipe value (YAML), e.g. bench.runs=100; repeatable",
    }
    p = command("validate", "Check a recipe without running anything (no torch import).")
    p.add_argument("recipe", type=Path)
    p.add_argument("--set", dest="overrides", **overrides)  # type: ignore[arg-type]

    p = command("build", "Run the recipe's stages, benchmark every artifact and apply the gates.")
    p.add_argument("recipe", type=Path)
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--set", dest="overrides", **overrides)  # type: ignore[arg-type]
    p.add_argument("--force", action="store_true", help="rerun every stage and the benchmark")

    p = command("bench", "Re-measure every artifact of a finished run and rewrite its report.")
    p.add_argument("run_dir", type=Path)
    return parser


def _configure_logging(verbose: bool) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("edgepipe: %(message)s"))
    # onnxruntime.quantization logs generic advice ("consider pre-processing") on the root logger.
    handler.addFilter(lambda record: record.levelno >= logging.ERROR or "onnxruntime" not in record.pathname)
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
    log.setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        import transformers  # noqa: F401  (lazy: only quiet it if it is importable at all)
    except ImportError:  # pragma: no cover
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _validate(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.recipe import load_recipe
    from edgepipe.pipeline.runner import check_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError(problems, str(args.recipe))
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {', '.join(s.kind for s in recipe.stages)})")
    return 0


def _build(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.recipe import load_recipe
    from edgepipe.pipeline.runner import build

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or Path("runs") / recipe.name
    report = build(recipe, out, force=args.force)
    if report is not None:  # None on torchrun ranks other than 0
        print(f"report: {report}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.runner import bench

    print(f"report: {bench(args.run_dir)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exit_.code or 0)
    if args.command != "validate":
        _configure_logging(args.verbose)
    try:
        return {"validate": _validate, "build": _build, "bench": _bench}[args.command](args)
    except EdgepipeError as error:
        log.debug("traceback of the error below", exc_info=True)  # shown with -v
        print(f"edgepipe: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(
            "edgepipe: interrupted; rerun the same command to resume from the last completed stage",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
