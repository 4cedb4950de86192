"""The `edgepipe` command line: validate, build, bench, compare, search. `main(argv) -> int` is what tests call.

Exit codes: 0 ok, 1 failure, 2 usage or input error, 3 a gate failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from edgepipe import __version__
from edgepipe.benchmarks.compare import AB_LATENCY_FLOOR, Tolerance, check_schema, compare, mismatches, render
from edgepipe.errors import EdgepipeError, GateFailedError, InputError, RecipeError
from edgepipe.files import read_json

log = logging.getLogger("edgepipe")

EXAMPLES = {
    "validate": "example:\n  edgepipe validate src/edgepipe/recipes/default.yaml --set stages.0.max_steps=50",
    "build": (
        "examples:\n"
        "  edgepipe build src/edgepipe/recipes/default.yaml --out runs/demo\n"
        "  edgepipe build my.yaml --set stages.2.calibration.method=entropy --set bench.runs=100\n"
        "  edgepipe build my.yaml --out runs/x --force   # rerun every stage"
    ),
    "bench": (
        "examples:\n"
        "  edgepipe bench runs/demo   # re-measure every artifact, rewrite report.json/.md\n"
        "  edgepipe bench runs/demo --baseline baseline.json   # and gate against a stored report (exit 3)\n"
        "  edgepipe bench runs/new --baseline runs/main   # A/B: both runs measured interleaved, then gated"
    ),
    "compare": ("example:\n  edgepipe compare baseline.json runs/demo/report.json --latency-floor 0.10"),
    "search": (
        "example:\n  edgepipe search src/edgepipe/recipes/default.yaml --latency-budget-ms 4 "
        "--set 'search.student_layers=[1, 2, 3]' --out runs/search"
    ),
    "engines": "example:\n  edgepipe engines   # every backend, its version, and why it cannot run here",
    "recommend": (
        "example:\n  edgepipe recommend runs/demo   # per target: the fastest artifact x engine within the gate"
    ),
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

    def gate_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--allow-mismatch", action="store_true", help="compare across machines or versions")
        p.add_argument(
            "--latency-floor",
            type=float,
            default=None,
            help=f"smallest relative slowdown that counts (default {Tolerance.latency_floor} between stored "
            f"reports, {AB_LATENCY_FLOOR} for an interleaved A/B run)",
        )
        p.add_argument(
            "--max-accuracy-drop",
            type=float,
            default=Tolerance.max_accuracy_drop,
            help="largest allowed accuracy drop, 0.005 = half a point (default %(default)s)",
        )

    p = command("bench", "Re-measure every artifact of a finished run and rewrite its report.")
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--baseline",
        type=Path,
        help="gate against a report.json, or a run folder measured interleaved with this one (exit 3)",
    )
    p.add_argument(
        "--no-gates",
        action="store_true",
        help="write the report (gate lines included) without failing on the recipe's gates",
    )
    gate_options(p)

    p = command("compare", "Gate a benchmark report against a baseline report: exit 3 on a regression.")
    p.add_argument("baseline", type=Path)
    p.add_argument("current", type=Path)
    gate_options(p)

    p = command("search", "Find the most accurate artifact whose p90 latency fits a budget (resumable).")
    p.add_argument("recipe", type=Path)
    p.add_argument("--latency-budget-ms", type=float, required=True, help="p90 budget at search.batch_size/seq_len")
    p.add_argument("--target", default="cpu", help="where latency is measured (cpu)")
    p.add_argument("--out", type=Path, default=None, help="search folder (default: runs/<recipe name>-search)")
    p.add_argument("--set", dest="overrides", **overrides)  # type: ignore[arg-type]

    command("engines", "List the backends (engines) bench.engines can name, with what each needs here.")
    p = command("recommend", "Per target and shape, the fastest artifact x engine within the accuracy gate.")
    p.add_argument("run_dir", type=Path)
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="largest accuracy drop against the reference, 0.01 = one point (default: the recipe's gate, else 0.01)",
    )
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
    from edgepipe.pipeline.checks import check_inputs
    from edgepipe.pipeline.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    try:
        data = check_inputs(recipe)
    except RecipeError as error:
        raise RecipeError(error.problems, str(args.recipe)) from None
    sizes = ", ".join(f"{n} {name}" for name, n in data.sizes().items())
    left_out = "".join(f", {n} rows left out ({reason})" for reason, n in data.dropped.items())
    stages = ", ".join(s.kind for s in recipe.stages)
    print(f"{args.recipe}: ok ({len(recipe.stages)} stages: {stages}; data: {sizes}{left_out})")
    return 0


def _build(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.recipe import load_recipe
    from edgepipe.pipeline.runner import build

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or Path("runs") / recipe.name
    report = build(recipe, out, force=args.force)
    if report is not None:  # None on torchrun ranks other than 0
        from edgepipe.benchmarks.report import render_summary

        summary = render_summary(read_json(report.with_name("report.json"), "report", "rerun the build"))
        print(f"{summary}\n\nreport: {report}" if summary else f"report: {report}")
    return 0


def _read_report(path: Path) -> dict:
    if not path.is_file():
        raise InputError(f"report not found: {path}; pass a report.json written by `edgepipe bench`")
    report = read_json(path, "report", "pass a report.json written by `edgepipe bench`")
    check_schema(report, str(path))
    return report


def _gate(args: argparse.Namespace, base: dict, cur: dict, baseline: Path) -> int:
    differences = mismatches(base, cur)
    if differences and not args.allow_mismatch:
        raise InputError(
            "the reports come from different machines or library versions:\n  "
            + "\n  ".join(differences)
            + "\npass --allow-mismatch to compare them anyway"
        )
    floor = Tolerance.latency_floor if args.latency_floor is None else args.latency_floor
    tolerance = Tolerance(latency_floor=floor, max_accuracy_drop=args.max_accuracy_drop)
    rows = compare(base, cur, tolerance)
    print(render(rows))
    regressed = [r for r in rows if r.regressed]
    if regressed:
        names = ", ".join(f"{r.artifact} b{r.batch} s{r.seq_len} ({r.verdict})" for r in regressed)
        raise GateFailedError(f"{len(regressed)} regression(s) against {baseline}: {names}")
    print(f"no regression against {baseline} ({len(rows)} comparisons)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.runner import bench, bench_against

    if args.baseline is not None and args.baseline.is_dir():  # a run folder: interleaved A/B measurement
        if args.latency_floor is None:
            args.latency_floor = AB_LATENCY_FLOOR
        ab_base, ab_cur = bench_against(args.run_dir, args.baseline)
        print(f"report: {args.run_dir / 'report.md'}")
        return _gate(args, ab_base, ab_cur, args.baseline)
    stored = _read_report(args.baseline) if args.baseline is not None else None  # fail before measuring
    report = bench(args.run_dir, gates=not args.no_gates)
    print(f"report: {report}")
    if stored is None:
        return 0
    return _gate(args, stored, _read_report(report.with_suffix(".json")), args.baseline)


def _search(args: argparse.Namespace) -> int:
    from edgepipe.pipeline.recipe import load_recipe
    from edgepipe.pipeline.search import search

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or Path("runs") / f"{recipe.name}-search"
    print(f"report: {search(recipe, args.latency_budget_ms, out, args.target)}")
    return 0


def _engines(args: argparse.Namespace) -> int:
    from edgepipe.runtime.backends import BACKENDS, DEFAULT_BACKENDS, engine_version

    defaults = set(DEFAULT_BACKENDS.values())
    print(f"{'engine':<18}{'target':<8}{'runs':<7}{'version':<16}status")
    for name, backend in BACKENDS.items():
        reason = backend.available()
        status = "available" + (" (default)" if name in defaults else "") if reason is None else f"no: {reason}"
        version = engine_version(backend.engine) or "-"
        print(f"{name:<18}{backend.target:<8}{backend.model_format:<7}{version:<16}{status}")
    return 0


def _recommend(args: argparse.Namespace) -> int:
    from edgepipe.benchmarks.recommend import recommend, render
    from edgepipe.pipeline.measure import run_folders

    report = _read_report(args.run_dir / "report.json")
    gates, folders = run_folders(args.run_dir)
    max_drop = args.max_accuracy_drop
    if max_drop is None:
        max_drop = gates.max_accuracy_drop if gates.max_accuracy_drop is not None else 0.01
    print("\n".join(render(recommend(report, max_drop), max_drop, folders)))
    return 0


def _compare(args: argparse.Namespace) -> int:
    return _gate(args, _read_report(args.baseline), _read_report(args.current), args.baseline)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: 0 for --help/--version, 2 for usage errors
        return int(exit_.code or 0)
    if args.command not in ("validate", "compare"):
        _configure_logging(args.verbose)
    try:
        commands = {
            "validate": _validate,
            "build": _build,
            "bench": _bench,
            "compare": _compare,
            "search": _search,
            "engines": _engines,
            "recommend": _recommend,
        }
        return commands[args.command](args)
    except EdgepipeError as error:
        log.debug("traceback of the error below", exc_info=True)  # shown with -v
        print(f"edgepipe: error: {_printable(str(error))}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(
            "edgepipe: interrupted; rerun the same command to resume from the last completed stage",
            file=sys.stderr,
        )
        return 130
    except Exception as error:  # a bug, not bad input: one line on the terminal, the traceback in a log file
        log_file = _write_traceback(args)
        print(
            f"edgepipe: internal error: {type(error).__name__}: {error}; the traceback is in {log_file} "
            "(please attach it to a bug report)",
            file=sys.stderr,
        )
        return 1


def _printable(message: str) -> str:
    """`message` with control characters escaped (a value from a recipe can hold one: "\x1e" breaks a line)."""
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in message)


def _write_traceback(args: argparse.Namespace) -> Path:
    """The traceback of the exception being handled, in the run folder when there is one, else the temp folder."""
    import tempfile
    import traceback

    folder = getattr(args, "out", None) or getattr(args, "run_dir", None)
    if folder is None or not Path(folder).is_dir():
        folder = Path(tempfile.gettempdir())
    fd, name = tempfile.mkstemp(prefix="edgepipe-error-", suffix=".log", dir=folder)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(f"edgepipe {__version__}: {' '.join(sys.argv)}\n{traceback.format_exc()}")
    return Path(name)


if __name__ == "__main__":
    code = main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun rank, its process group already left (`World.close`): skip the interpreter's teardown,
        # where gloo's threads still aborted a rank now and then ("terminate called without an active
        # exception", 2 of 4 CI runs on a busy 2-core host)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
