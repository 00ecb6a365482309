"""The ``surgery`` command line: each verb is a thin adapter over one function of :mod:`surgery.api`.

Errors raised on purpose (:class:`~surgery.errors.SurgeryError`) and OS errors become one line on
stderr and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from surgery import api
from surgery.engine import SurgeryResult
from surgery.errors import OptionError, SurgeryError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage plus message."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"surgery: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def _common() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parent.add_argument("--quiet", "-q", action="store_true", help="no progress bars (for pipelines)")
    parent.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parent.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (loaded with weights_only=True)")
    parent.add_argument("--trust-remote-code", action="store_true", help="allow a model whose code ships in its repository")
    return parent


def _writing() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "paths", nargs="*", metavar="[MODEL] OUT",
        help="source model (directory, .gguf file or Hub repo id; default: the embedded SmolLM2-135M) "
        "and output directory",
    )
    parent.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="cast floating-point weights")
    parent.add_argument("--max-shard-size", help="largest output shard, e.g. 2GB (default 5GB)")
    parent.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parent.add_argument("--dry-run", action="store_true", help="print the layer mapping and output size, write nothing")
    return parent


def _paths(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """``[MODEL] OUT``: one path is OUT on the default model; none only with --dry-run."""
    paths: list[str] = args.paths
    if len(paths) > 2:
        raise OptionError(f"expected [MODEL] OUT, got {len(paths)} paths")
    if not paths:
        if not args.dry_run:
            raise OptionError("missing OUT, the output directory")
        return None, None
    if len(paths) == 1:
        return None, paths[0]
    return paths[0], paths[1]


def _options(args: argparse.Namespace) -> api.Options:
    return api.Options(
        dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force, dry_run=args.dry_run,
        quiet=args.quiet, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
    )


def _report(result: SurgeryResult, as_json: bool) -> None:
    if as_json:
        body = {
            "out": str(result.out) if result.out else None,
            "dry_run": result.dry_run,
            "plan": str(result.recipe.plan),
            "layers": list(result.recipe.plan.layers),
            "operations": list(result.recipe.plan.operations),
            "source_layers": result.architecture.num_layers,
            "source_params": result.source_params,
            "output_params": result.output_params,
            "total_bytes": result.total_bytes,
            "shards": [{"file": n, "bytes": b} for n, b in result.shards],
        }
        print(json.dumps(body, indent=2))
    else:
        print(result.summary())


def _cmd_prune(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    _report(api.prune(model, out, drop=args.drop, keep=args.keep, **_options(args)), args.json)


def _cmd_repeat(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    _report(api.repeat(model, out, layers=args.layers, times=args.times, **_options(args)), args.json)


def _cmd_reorder(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    result = api.reorder(model, out, reverse=args.reverse, shuffle=args.shuffle, seed=args.seed, order=args.order, **_options(args))
    _report(result, args.json)


def _cmd_apply(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    _report(api.apply(model, out, args.layers, recipe=args.recipe, **_options(args)), args.json)


def _cmd_inspect(args: argparse.Namespace) -> None:
    info = api.inspect(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.json:
        body = {
            "source": info.source, "class_name": info.class_name, "model_type": info.model_type,
            "num_layers": info.num_layers, "layer_prefix": info.layer_prefix, "count_key": info.count_key,
            "total_params": info.total_params, "other_params": info.other_params,
            "layers": [vars(layer) for layer in info.layers],
            "shards": [{"file": n, "bytes": b} for n, b in info.shards],
        }
        print(json.dumps(body, indent=2))
    else:
        print(info.format())


def build_parser() -> argparse.ArgumentParser:
    """The ``surgery`` argument parser (exposed for documentation and tests)."""
    common, writing = _common(), _writing()
    parser = _Parser(prog="surgery", description="Rewrite transformer checkpoints: drop, repeat and reorder layers.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    def verb(name: str, handler: Callable[[argparse.Namespace], None], help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, parents=[common, *parents], help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        return sub

    prune = verb("prune", _cmd_prune, "drop layers (--drop 10-20) or keep some (--keep 0-9,21-29)", writing)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--drop", help="layers to remove, e.g. 10-20 or 3,7,10-12 (0-based, inclusive)")
    which.add_argument("--keep", help="layers to keep, e.g. 0-9,21-29")

    rep = verb("repeat", _cmd_repeat, "repeat a contiguous block of layers in place", writing)
    rep.add_argument("--layers", required=True, help="the block, e.g. 8-15")
    rep.add_argument("--times", type=int, default=2, help="how many times the block appears (default 2)")

    reo = verb("reorder", _cmd_reorder, "reverse or shuffle a block, or give an explicit order", writing)
    how = reo.add_mutually_exclusive_group(required=True)
    how.add_argument("--reverse", help="block to reverse, e.g. 4-25")
    how.add_argument("--shuffle", help="block to shuffle, e.g. 4-25 (with --seed)")
    how.add_argument("--order", help="every layer once, e.g. 0,1,3,2,4-29")
    reo.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")

    app = verb("apply", _cmd_apply, "apply an explicit layer plan or a recipe file", writing)
    what = app.add_mutually_exclusive_group(required=True)
    what.add_argument("--layers", help="the new layer sequence, e.g. 0-9,21-29,21-29")
    what.add_argument("--recipe", help="a recipe file, or an output directory of this tool")

    ins = verb("inspect", _cmd_inspect, "show architecture, layers, per-layer config, sizes and shards")
    ins.add_argument("model", nargs="?", metavar="MODEL", help="default: the embedded SmolLM2-135M")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error already printed as one line (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        handler: Callable[[argparse.Namespace], Any] = args.handler
        handler(args)
    except (SurgeryError, OSError) as exc:
        if args.debug:
            raise
        text = exc.one_line() if isinstance(exc, SurgeryError) else " ".join(str(exc).split())
        sys.stderr.write(f"surgery: error: {text}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("surgery: interrupted; nothing was written\n")
        return 130
    return 0


def entry_point() -> NoReturn:
    """The console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
