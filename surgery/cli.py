"""The ``surgery`` command line: each verb is a thin adapter over one function of :mod:`surgery.api`.

Errors raised on purpose (:class:`~surgery.errors.SurgeryError`) and OS errors become one line on
stderr and exit code 2; ``--debug`` shows the traceback instead. Everything the CLI prints passes
through :func:`surgery.redact.redact`: no token or URL password is ever shown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from surgery import api
from surgery.engine import SurgeryResult
from surgery.errors import OptionError, SurgeryError
from surgery.modeling_wide import CODE_REVISION
from surgery.redact import redacted_output

if TYPE_CHECKING:  # the measuring modules import torch: only when a measuring verb runs
    from surgery.validate import MeasureOptions

EXIT_USAGE = 2
# A measurement that missed a --max-kl / --min-top1 / --min-cosine bar.
EXIT_GATE = 1
# An error that is a bug in this tool (shown with its traceback), as for an uncaught exception.
EXIT_BUG = 1


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
    parent.add_argument("--force", action="store_true", help="replace OUT if it is empty or an earlier output of this tool")
    parent.add_argument("--dry-run", action="store_true", help="print the layer mapping and output size, write nothing")
    parent.add_argument("--onnx", action="store_true",
                        help="once OUT is complete, export it to ONNX with KV cache into OUT/onnx, validated (see 'surgery export-onnx')")
    hub = parent.add_argument_group("push to the Hugging Face Hub")
    hub.add_argument("--push-to-hub", metavar="REPO_ID", help="once OUT is complete, push it to this Hub repo (see 'surgery push')")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    hub.add_argument("--token", help="with --push-to-hub: Hugging Face token (default: HF_TOKEN, then the stored login)")
    hub.add_argument("--allow-unvalidated", action="store_true",
                     help="with --push-to-hub and no --validate: push although OUT was not measured")
    check = parent.add_argument_group("validate the output (see 'surgery validate')")
    check.add_argument("--validate", action="store_true",
                       help="once OUT is complete, compare it with MODEL: print the report, record it in OUT's card, "
                       "gate the exit code (1) and the push with --max-kl / --min-top1 / --min-cosine "
                       "(with --dry-run: the plan, in memory)")
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
    # The measuring options of --validate: only those given (their defaults are the measuring verbs').
    measure = {key: getattr(args, key) for key in _WRITING_MEASURE if getattr(args, key) is not None}
    return api.Options(
        dtype=args.dtype, max_shard_size=args.max_shard_size, force=args.force, dry_run=args.dry_run,
        quiet=args.quiet, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        push_to_hub=args.push_to_hub, private=args.private, token=args.token, onnx=args.onnx,
        validate=args.validate, data=args.data, max_kl=args.max_kl, min_top1=args.min_top1, min_cosine=args.min_cosine,
        measure=measure,  # type: ignore[typeddict-item]  # the keys of MeasureOptions, checked by the API
        allow_unvalidated=args.allow_unvalidated,
    )


def _report(result: SurgeryResult, args: argparse.Namespace) -> None:
    """Print what a writing verb did (and measured, and pushed); a missed gate of --validate exits 1."""
    _print_result(result, args.json)
    report = result.validation
    if report is not None and not report.passed:
        pushed = f"; nothing pushed to {args.push_to_hub}" if args.push_to_hub and not result.dry_run else ""
        sys.stderr.write("surgery: validation failed: " + "; ".join(report.missed) + pushed + "\n")
        raise SystemExit(EXIT_GATE)


def _print_result(result: SurgeryResult, as_json: bool) -> None:
    if as_json:
        body: dict[str, Any] = {
            "out": str(result.out) if result.out else None,
            "dry_run": result.dry_run,
            "plan": str(result.recipe.plan),
            "layers": [step if isinstance(step, int) else str(step) for step in result.recipe.plan.layers],
            "operations": list(result.recipe.plan.operations),
            "source_layers": result.architecture.num_layers,
            "source_params": result.source_params,
            "output_params": result.output_params,
            "total_bytes": result.total_bytes,
            "shards": [{"file": n, "bytes": b} for n, b in result.shards],
        }
        if result.onnx is not None:
            body["onnx"] = result.onnx.to_dict()
        if result.validation is not None:
            body["validation"] = result.validation.to_dict()
        if result.pushed is not None:
            body["pushed"] = result.pushed.as_dict()
        if result.search is not None:
            body["search"] = result.search.to_dict()
        print(json.dumps(body, indent=2))
    else:
        print(result.summary())
        if result.onnx is not None:
            print(result.onnx.summary())
        if result.validation is not None:
            print()
            print(result.validation.format())


def _cmd_prune(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    if args.to_layers is None:
        given = [flag for flag, value in (("--method", args.method), ("--beam", args.beam), ("--block-by", args.block_by),
                                          ("--screen", args.screen), ("--screen-tokens", args.screen_tokens),
                                          ("--held-out", args.held_out), ("--eval-tokens", args.eval_tokens),
                                          ("--lazy", args.lazy))
                 if value is not None] + (["--allow-parallel"] if args.allow_parallel else [])
        if given:
            raise OptionError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only with --to-layers")
        _report(api.prune(model, out, drop=args.drop, keep=args.keep, **_options(args)), args)
        return
    # --data and the measuring options choose the search's text and windows (and, with --validate, its text too).
    search: dict[str, Any] = {key: getattr(args, key) for key in ("data", "held_out", "eval_tokens", "screen_tokens",
                                                                  "lazy", *_WRITING_MEASURE)
                              if key not in ("prompts", "new_tokens") and getattr(args, key) is not None}
    options = _options(args)
    if not args.validate:
        options.pop("data", None)
        options["measure"] = {}
    # Ctrl-C: the search prints the best plan so far; main() then says nothing was written (exit 130).
    result = api.prune(model, out, to_layers=args.to_layers, method=args.method or "greedy", beam=args.beam or 1,
                       block_by=args.block_by or "measured", allow_parallel=args.allow_parallel, screen=args.screen,
                       search=search, **options)  # type: ignore[arg-type]  # the keys of SearchOptions
    if not args.json:
        print(result.search.format())
        print()
    _report(result, args)


def _cmd_repeat(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    _report(api.repeat(model, out, layers=args.layers, times=args.times, **_options(args)), args)


def _cmd_reorder(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    result = api.reorder(model, out, reverse=args.reverse, shuffle=args.shuffle, seed=args.seed, order=args.order, **_options(args))
    _report(result, args)


def _cmd_apply(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    _report(api.apply(model, out, args.layers, recipe=args.recipe, **_options(args)), args)


def _cmd_update_code(args: argparse.Namespace) -> None:
    update = api.update_code(args.out)
    print(json.dumps({"directory": str(update.directory), "old_revision": update.old_revision,
                      "new_revision": update.new_revision, "rewritten": list(update.rewritten)}, indent=2)
          if args.json else update.summary())


def _cmd_inspect(args: argparse.Namespace) -> None:
    info = api.inspect(args.model, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code)
    if args.json:
        body = {
            "source": info.source, "class_name": info.class_name, "model_type": info.model_type,
            "num_layers": info.num_layers, "layer_prefix": info.layer_prefix, "count_key": info.count_key,
            "total_params": info.total_params, "other_params": info.other_params,
            "layers": [vars(layer) for layer in info.layers],
            "shards": [{"file": n, "bytes": b} for n, b in info.shards],
            "shipped_code": None if info.shipped_code is None else {
                **vars(info.shipped_code), "missing": list(info.shipped_code.missing),
                "this_installation_revision": CODE_REVISION},
        }
        print(json.dumps(body, indent=2))
    else:
        print(info.format())
    warning = info.shipped_code.warning(info.source) if info.shipped_code is not None else None
    if warning:
        sys.stderr.write(f"surgery: warning: {warning}\n")


def _cmd_push(args: argparse.Namespace) -> None:
    from exporters.hub import push

    result = push(
        args.out, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        token=args.token, dry_run=args.dry_run, quiet=args.quiet, allow_unvalidated=args.allow_unvalidated,
    )
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.summary())


def _cmd_parallel(args: argparse.Namespace) -> None:
    model, out = _paths(args)
    result = api.parallel(model, out, groups=args.groups, loop=args.loop, mlp_input=args.mlp_input, **_options(args))
    _report(result, args)


# The measuring options a writing verb passes on to --validate (its --dtype and --seed mean other things).
_WRITING_MEASURE = ("device", "device_map", "batch_size", "max_tokens", "seq_len", "prompts", "new_tokens")


def _measuring(*, writing: bool = False) -> argparse.ArgumentParser:
    """Options of the measuring verbs (validate, analyze, sweep), declared once; ``writing``: the same
    options on the writing verbs, for --validate (defaults left to the API, and no --dtype or --seed,
    which a writing verb uses for the cast and the shuffle)."""

    def default(value: Any) -> Any:
        return None if writing else value

    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("measuring, with --validate" if writing else "measuring")
    group.add_argument("--data", metavar="FILE", help="a .txt file, or .jsonl with a 'text' field (default: Hamlet, shipped offline)")
    group.add_argument("--device", choices=("auto", "cpu", "cuda"), default=default("auto"), help="where to run (default auto: CUDA if available)")
    if not writing:
        group.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto", help="weights dtype (default: as stored)")
    group.add_argument("--device-map", choices=("auto", "balanced", "balanced_low_0", "sequential"),
                       help="spread a model too large for one device over GPUs and CPU with accelerate")
    group.add_argument("--batch-size", type=int, default=default(4), help="windows per forward pass (default 4)")
    group.add_argument("--max-tokens", type=int, default=default(4096), help="token budget drawn from the text (default 4096)")
    group.add_argument("--seq-len", type=int, default=default(256), help="tokens per window (default 256)")
    if not writing:
        group.add_argument("--seed", type=int, default=0, help="which windows are drawn from a longer text (default 0)")
    return parent


def _gates(*, writing: bool = False) -> argparse.ArgumentParser:
    """The gates and the greedy-agreement options of ``validate``, declared once (also on the writing verbs)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("gates, with --validate" if writing else "gates")
    group.add_argument("--max-kl", type=_bar_value, metavar="X", help="fail (exit 1) if mean KL(original || new) is above X")
    group.add_argument("--min-top1", type=_bar_value, metavar="X", help="fail (exit 1) if top-1 agreement is below X (0-1)")
    group.add_argument("--min-cosine", type=_bar_value, metavar="X", help="encoders: fail (exit 1) if embedding cosine is below X")
    group.add_argument("--prompts", type=int, default=None if writing else 8, help="prompts for greedy agreement, 0 to skip (default 8)")
    group.add_argument("--new-tokens", type=int, default=None if writing else 32, help="greedy tokens per prompt (default 32)")
    return parent


def _measure_options(args: argparse.Namespace) -> MeasureOptions:
    options: MeasureOptions = {
        "device": args.device, "dtype": args.dtype, "device_map": args.device_map, "batch_size": args.batch_size,
        "max_tokens": args.max_tokens, "seq_len": args.seq_len, "seed": args.seed, "quiet": args.quiet,
        "allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code,
    }
    if hasattr(args, "prompts"):  # the verbs that generate (validate, sweep)
        options["prompts"] = args.prompts
        options["new_tokens"] = args.new_tokens
    return options


def _bar_value(text: str) -> float:
    """A gate such as --max-kl 0.5: a finite number, else a one-line usage error."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _cmd_validate(args: argparse.Namespace) -> None:
    paths: list[str] = args.models
    planned = args.plan is not None or args.recipe is not None
    if len(paths) > (1 if planned else 2) or (not planned and len(paths) != 2):
        raise OptionError("expected ORIGINAL NEW, or [ORIGINAL] with --plan or --recipe")
    original = paths[0] if paths else None
    new = paths[1] if len(paths) == 2 else None
    report = api.validate(
        original, new, plan=args.plan, recipe=args.recipe, data=args.data, max_kl=args.max_kl,
        min_top1=args.min_top1, min_cosine=args.min_cosine, card=not args.no_card, **_measure_options(args),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if not report.passed:
        sys.stderr.write("surgery: validation failed: " + "; ".join(report.missed) + "\n")
        raise SystemExit(EXIT_GATE)


def _cmd_analyze(args: argparse.Namespace) -> None:
    from surgery.analyze import analyze

    report = analyze(
        args.model, drop_count=args.drop_count, data=args.data, plots=None if args.no_plots else args.plots,
        top=args.top, **_measure_options(args),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())


def _cmd_sweep(args: argparse.Namespace) -> None:
    from surgery.errors import RangeSyntaxError
    from surgery.plan import parse_ranges
    from surgery.sweep import sweep

    try:
        seeds = parse_ranges(args.seeds)
    except RangeSyntaxError:
        raise OptionError(f"--seeds {args.seeds!r} is not a list of whole numbers such as 0-2 or 0,5,7") from None
    report = sweep(
        args.model, drop_window=args.drop_window, painters=args.painters, painters_n=args.painters_n,
        seeds=seeds, painters_loop=args.painters_loop, plans=args.plan or (), data=args.data, out=args.out, **_measure_options(args),
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())


def _cmd_heal(args: argparse.Namespace) -> None:
    paths: list[str] = args.models
    planned = args.plan is not None or args.recipe is not None
    if len(paths) != (2 if planned else 3):
        raise OptionError("expected ORIGINAL NEW OUT, or ORIGINAL OUT with --plan or --recipe")
    original, new, out = (paths[0], None, paths[1]) if planned else (paths[0], paths[1], paths[2])
    report = api.heal(
        None if original == "default" else original, new, out, plan=args.plan, recipe=args.recipe, data=args.data,
        force=args.force, dry_run=args.dry_run, steps=args.steps,
        max_minutes=None if args.max_minutes == 0 else args.max_minutes, rank=args.rank, alpha=args.alpha, lr=args.lr,
        layers=args.layers, full_layers=args.full_layers, init=args.init, select=not args.no_select, batch_size=args.batch_size, seq_len=args.seq_len,
        held_out=args.held_out, eval_tokens=args.eval_tokens, top_k=args.top_k, seed=args.seed, device=args.device,
        quiet=args.quiet, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        validate=args.validate, max_kl=args.max_kl, min_top1=args.min_top1, prompts=args.prompts, new_tokens=args.new_tokens,
    )
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    if report.validation is not None and not report.validation.passed:
        sys.stderr.write("surgery: validation failed: " + "; ".join(report.validation.missed) + "\n")
        raise SystemExit(EXIT_GATE)


def _cmd_export_onnx(args: argparse.Namespace) -> None:
    from exporters.onnx import export_onnx
    from exporters.onnx_quantize import DEFAULT_BLOCK_SIZE

    if args.quantize is None and (args.block_size is not None or args.asymmetric or args.keep_lm_head):
        raise OptionError("--block-size, --asymmetric and --keep-lm-head apply to a quantized export",
                          hint="add --quantize int4")
    if args.graph != "surgery":  # onnxruntime-genai's model builder, or auto's choice (exporters/onnx_builder.py)
        import functools

        from exporters.onnx_builder import export_onnx_graph

        export_onnx = functools.partial(export_onnx_graph, graph=args.graph)
    result = export_onnx(
        args.model, args.out, dtype=args.dtype, opset=args.opset, validate=not args.no_validate, device=args.device,
        force=args.force, quiet=args.quiet, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code,
        share_buffer=args.share_buffer, quantize=args.quantize,
        block_size=DEFAULT_BLOCK_SIZE if args.block_size is None else args.block_size,
        symmetric=not args.asymmetric, quantize_lm_head=not args.keep_lm_head, max_kl=args.max_kl,
        fuse=not args.no_fuse,
    )
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())


def _cmd_generate(args: argparse.Namespace) -> None:
    from exporters.onnx_runtime import generate

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    result = generate(
        args.model, args.prompt, max_new_tokens=args.max_new_tokens, device=args.device, chat=args.chat,
        on_text=None if args.json else show, threads=args.threads, quiet=args.quiet, allow_pickle=args.allow_pickle,
        trust_remote_code=args.trust_remote_code,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        sys.stdout.write("\n")
        if not args.quiet:
            sys.stderr.write(result.stats() + "\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``surgery`` argument parser (exposed for documentation and tests)."""
    common, writing = _common(), _writing()
    # The writing verbs also take --validate's measuring options and gates (declared once, below).
    writing_verb = (writing, _measuring(writing=True), _gates(writing=True))
    parser = _Parser(prog="surgery", description="Rewrite transformer checkpoints: drop, repeat and reorder layers.")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    def verb(name: str, handler: Callable[[argparse.Namespace], None], help_text: str, *parents: argparse.ArgumentParser) -> argparse.ArgumentParser:
        shared = [common, *parents]
        sub = verbs.add_parser(name, parents=shared, help=help_text, description=help_text)  # type: ignore[arg-type]  # argparse stubs want _Parser parents
        sub.set_defaults(handler=handler)
        return sub

    prune = verb("prune", _cmd_prune, "drop layers (--drop 10-20), keep some (--keep 0-9,21-29), or search for the "
                 "layers to drop to reach a depth (--to-layers 26)", *writing_verb)
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--drop", help="layers to remove, e.g. 10-20 or 3,7,10-12 (0-based, inclusive)")
    which.add_argument("--keep", help="layers to keep, e.g. 0-9,21-29")
    which.add_argument("--to-layers", type=int, metavar="N",
                       help="search for the layers to drop to reach N layers (scored in memory on calibration text "
                            "by KL against the original), then write that plan; --data, --max-tokens (calibration "
                            "budget, default 4096), --seq-len, --batch-size and --device apply to the search")
    found = prune.add_argument_group("search, with --to-layers")
    found.add_argument("--method", choices=("greedy", "block", "score"),
                       help="greedy (default): one layer at a time, lowest measured KL; block: the best contiguous "
                            "block; score: the lowest Block Influence, one pass")
    found.add_argument("--beam", type=int, metavar="K", help="with greedy: plans kept per step (default 1)")
    found.add_argument("--block-by", choices=("measured", "angular"),
                       help="with block: rank blocks by measured KL (default) or angular distance (one pass)")
    found.add_argument("--allow-parallel", action="store_true",
                       help="the search may also merge consecutive layers into a parallel group (written as a "
                            "wide-block checkpoint when it wins)")
    found.add_argument("--screen", type=int, metavar="K",
                       help="with greedy or measured block: score every candidate on --screen-tokens of the "
                            "calibration text first, then the K best of each step on all of it (default 4; 0: every "
                            "candidate on all of it)")
    found.add_argument("--screen-tokens", type=int, metavar="T",
                       help="calibration tokens of the screening, spread over the budget (default 1024)")
    found.add_argument("--lazy", action="store_true", default=None,
                       help="with greedy: from the second step on, screen only the candidates whose cost one step "
                            "earlier does not rule them out (lazy greedy: much faster with --allow-parallel; a change "
                            "whose cost shrinks can be missed)")
    found.add_argument("--held-out", type=float, metavar="SHARE",
                       help="share of the text, from its end, kept for measuring the chosen plan (default 0.1)")
    found.add_argument("--eval-tokens", type=int, help="most held-out tokens measured (default 4096)")

    rep = verb("repeat", _cmd_repeat, "repeat a contiguous block of layers in place", *writing_verb)
    rep.add_argument("--layers", required=True, help="the block, e.g. 8-15")
    rep.add_argument("--times", type=int, default=2, help="how many times the block appears (default 2)")

    reo = verb("reorder", _cmd_reorder, "reverse or shuffle a block, or give an explicit order", *writing_verb)
    how = reo.add_mutually_exclusive_group(required=True)
    how.add_argument("--reverse", help="block to reverse, e.g. 4-25")
    how.add_argument("--shuffle", help="block to shuffle, e.g. 4-25 (with --seed)")
    how.add_argument("--order", help="every layer once, e.g. 0,1,3,2,4-29")
    reo.add_argument("--seed", type=int, default=0, help="shuffle seed (default 0)")

    app = verb("apply", _cmd_apply, "apply an explicit layer plan or a recipe file", *writing_verb)
    what = app.add_mutually_exclusive_group(required=True)
    what.add_argument("--layers", help="the new layer sequence, e.g. 0-9,21-29,21-29")
    what.add_argument("--recipe", help="a recipe file, or an output directory of this tool")

    ins = verb("inspect", _cmd_inspect, "show architecture, layers, per-layer config, sizes and shards")
    ins.add_argument("model", nargs="?", metavar="MODEL", help="default: the embedded SmolLM2-135M")

    upd = verb("update-code", _cmd_update_code,
               "re-ship the current modelling code into a wide-block output (weights untouched)")
    upd.add_argument("out", metavar="OUT", help="an output directory written by surgery parallel")

    pus = verb("push", _cmd_push, "upload an output directory, with its model card, to the Hugging Face Hub (one commit)")
    pus.add_argument("out", metavar="OUT", help="an output directory written by surgery")
    pus.add_argument("repo_id", metavar="REPO_ID", help="NAME or NAMESPACE/NAME; created when missing")
    pus.add_argument("--private", action="store_true", help="create the repo private (an existing public repo is refused)")
    pus.add_argument("--revision", metavar="BRANCH", help="push to this existing branch (default main)")
    pus.add_argument("--commit-message", metavar="TEXT", help="commit title (default: the operations and the plan)")
    pus.add_argument("--token", help="Hugging Face token (default: HF_TOKEN, then the stored login)")
    pus.add_argument("--dry-run", action="store_true", help="list the files that would be uploaded, with sizes; send nothing")
    pus.add_argument("--allow-unvalidated", action="store_true",
                     help="publish although OUT's card records no validation, a missed gate, or other weights or recipe")

    par = verb("parallel", _cmd_parallel, "merge groups of layers into wide blocks run in parallel (--groups 10-13,14-17)", *writing_verb)
    par.add_argument("--groups", required=True, help="consecutive layers per group, e.g. 10-13,14-17 (0-based, inclusive)")
    par.add_argument("--loop", type=int, default=1, help="apply each merged group this many times in a row (default 1)")
    par.add_argument(
        "--mlp-input", choices=("exact", "shared"), default="exact",
        help="exact: each branch's MLP sees its own residual (default); shared: all see h + mean attention (approximation)",
    )
    measuring = _measuring()
    val = verb("validate", _cmd_validate, "compare a new model with its original: perplexity, KL, top-1, greedy agreement",
               measuring, _gates())
    val.add_argument("models", nargs="*", metavar="ORIGINAL [NEW]",
                     help="the original (default: the embedded SmolLM2-135M) and a checkpoint written from it")
    how_new = val.add_mutually_exclusive_group()
    how_new.add_argument("--plan", help="instead of NEW: run this layer plan in memory, e.g. 0-9,21-29 (writes nothing)")
    how_new.add_argument("--recipe", help="instead of NEW: run the plan of a recipe file or output directory in memory")
    val.add_argument("--no-card", action="store_true",
                     help="do not record the report in NEW's model card (recorded by default when NEW is an output of this tool)")

    ana = verb("analyze", _cmd_analyze, "layer similarity, Block Influence and angular distance; ranked drop candidates", measuring)
    ana.add_argument("model", nargs="?", metavar="MODEL", help="default: the embedded SmolLM2-135M")
    ana.add_argument("--drop-count", type=int, help="size of the block of layers to drop (default: a quarter of the layers)")
    ana.add_argument("--top", type=int, default=5, help="how many candidate blocks to list (default 5)")
    ana.add_argument("--plots", default="surgery-analysis", metavar="DIR",
                     help="where to write similarity.png and block-influence.png (default surgery-analysis)")
    ana.add_argument("--no-plots", action="store_true", help="write no images")

    swp = verb("sweep", _cmd_sweep, "measure a family of plans against the original with one load of the weights", measuring)
    swp.add_argument("model", nargs="?", metavar="MODEL", help="default: the embedded SmolLM2-135M")
    swp.add_argument("--drop-window", type=int, metavar="N", help="every contiguous window of N layers dropped")
    swp.add_argument(
        "--painters", action="store_true",
        help="skip / middle repeat / reverse / random order / parallel / looped parallel of the middle layers",
    )
    swp.add_argument("--painters-n", metavar="RANGES", help="the N values (first N+1 and last N layers kept), e.g. 0-13 (default all)")
    swp.add_argument("--seeds", default="0-2", metavar="RANGES", help="random-order seeds, averaged in the plot (default 0-2)")
    swp.add_argument(
        "--painters-loop", type=int, default=3, metavar="R",
        help="times the looped-parallel variant applies the parallel middle (default 3; 1 leaves it out)",
    )
    swp.add_argument("--plan", action="append", metavar="LAYERS", help="an extra plan to measure (repeatable)")
    swp.add_argument("--out", default="surgery-sweep", metavar="DIR", help="where to write sweep.csv, sweep.json, sweep.png")
    swp.add_argument("--prompts", type=int, default=8, help="prompts for greedy agreement, 0 to skip (default 8)")
    swp.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    hea = verb("heal", _cmd_heal, "recover what surgery cost: distil NEW towards ORIGINAL (LoRA, merged) into OUT")
    hea.add_argument("models", nargs="+", metavar="ORIGINAL [NEW] OUT",
                     help="the original ('default': the embedded SmolLM2-135M), an output of this tool made from it, "
                          "and the directory to write")
    heal_new = hea.add_mutually_exclusive_group()
    heal_new.add_argument("--plan", help="instead of NEW: apply this layer plan of ORIGINAL first, e.g. 0-12,17-29")
    heal_new.add_argument("--recipe", help="instead of NEW: apply the plan of a recipe file or output directory first")
    hea.add_argument("--data", metavar="FILE", help="a .txt file, or .jsonl with a 'text' field (default: Hamlet, shipped offline)")
    hea.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to train (default auto)")
    hea.add_argument("--steps", type=int, default=1000, help="most optimiser steps (default 1000)")
    hea.add_argument("--max-minutes", type=float, default=15.0, help="training time budget, 0 for none (default 15)")
    hea.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    hea.add_argument("--alpha", type=int, default=32, help="LoRA alpha; adapters scale by alpha/rank (default 32)")
    hea.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (default 5e-4; warm-up, cosine decay)")
    hea.add_argument("--layers", help="NEW's blocks with LoRA adapters, e.g. 10-15 ('' for none; default: 3 on each side of each cut)")
    hea.add_argument("--full-layers", help="NEW's blocks trained in full (every parameter), e.g. 12-13")
    hea.add_argument("--init", choices=("linear", "none"), default="linear",
                     help="before training, bridge each cut with a least-squares map folded into the block before it "
                          "(linear, the default), or start from NEW as it is (none)")
    hea.add_argument("--no-select", action="store_true",
                     help="write the trained weights even when they measure worse than the starting ones on the "
                          "validation windows (the training text's last 5%%, not trained on)")
    hea.add_argument("--batch-size", type=int, default=2, help="windows per step (default 2)")
    hea.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    hea.add_argument("--held-out", type=float, default=0.1, help="share of the text, from its end, kept for measuring (default 0.1)")
    hea.add_argument("--eval-tokens", type=int, default=8192, help="most held-out tokens measured (default 8192)")
    hea.add_argument("--top-k", type=int, default=64, help="teacher probabilities kept per position (default 64)")
    hea.add_argument("--seed", type=int, default=0, help="batch order and adapter initialisation (default 0)")
    hea.add_argument("--force", action="store_true", help="replace OUT if it is empty or an earlier output of this tool")
    hea.add_argument("--dry-run", action="store_true", help="train and measure, write nothing")
    heal_check = hea.add_argument_group("validate OUT (see 'surgery validate')")
    heal_check.add_argument("--validate", action="store_true",
                            help="once OUT is written, validate it against ORIGINAL on the held-out text (never trained "
                                 "on): print the report, record it in OUT's card, exit 1 on a missed --max-kl / --min-top1")
    heal_check.add_argument("--max-kl", type=_bar_value, metavar="X", help="with --validate: fail (exit 1) if KL is above X")
    heal_check.add_argument("--min-top1", type=_bar_value, metavar="X",
                            help="with --validate: fail (exit 1) if top-1 agreement is below X (0-1)")
    heal_check.add_argument("--prompts", type=int, help="with --validate: prompts for greedy agreement, 0 to skip (default 8)")
    heal_check.add_argument("--new-tokens", type=int, help="with --validate: greedy tokens per prompt (default 32)")

    onx = verb("export-onnx", _cmd_export_onnx, "export to ONNX with KV cache, validated against PyTorch in ONNX Runtime")
    onx.add_argument("model", metavar="MODEL", help="a checkpoint of this tool (standard or wide-block) or any supported model")
    onx.add_argument("out", metavar="OUT", help="the ONNX directory to create")
    onx.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations (default fp32)")
    onx.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 or newer (default 18)")
    onx.add_argument("--no-validate", action="store_true", help="skip the comparison with PyTorch")
    onx.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where validation runs (default cpu)")
    onx.add_argument("--graph", choices=("auto", "builder", "surgery"), default="surgery",
                     help="surgery's own graph (default), onnxruntime-genai's model builder (fused, fp32, standard "
                     "architectures), or auto: the builder when it takes the model, else surgery's (docs/onnx.md)")
    onx.add_argument("--share-buffer", action="store_true",
                     help="let the cache fill onnxruntime-genai's static past/present buffer (past_present_share_buffer "
                     "true in genai_config.json)")
    onx.add_argument("--no-fuse", action="store_true",
                     help="surgery's graph as traced, without ONNX Runtime's fused operators (RMSNorm, rotary, "
                     "GroupQueryAttention); slower, for debugging a fusion (docs/onnx.md)")
    quant = onx.add_argument_group("weight-only quantization (docs/onnx.md, 'int4')")
    quant.add_argument("--quantize", choices=("int4",),
                       help="after the float graph is validated, rewrite its weight MatMuls to ONNX Runtime's MatMulNBits "
                            "with int4 weights (round-to-nearest) and measure KL / top-1 / greedy agreement against PyTorch")
    quant.add_argument("--block-size", type=int, metavar="N",
                       help="with --quantize: weight rows per scale, 16, 32, 64, 128 or 256 (default 32)")
    quant.add_argument("--asymmetric", action="store_true",
                       help="with --quantize: uint4 with a zero point per block (default: symmetric int4, scale only)")
    quant.add_argument("--keep-lm-head", action="store_true",
                       help="with --quantize: leave the projection to the vocabulary in float (default: quantized too)")
    quant.add_argument("--max-kl", type=_bar_value, metavar="X",
                       help="with --quantize: fail, writing nothing, if KL(PyTorch fp32 || int4) is above X nats/token")
    onx.add_argument("--force", action="store_true", help="replace OUT if it is empty or an earlier output of this tool")

    gen = verb("generate", _cmd_generate, "generate with ONNX Runtime and the KV cache, streaming tokens")
    gen.add_argument("model", metavar="MODEL_OR_ONNX_DIR",
                     help="an ONNX directory, a checkpoint with OUT/onnx, or any model (exported once into the cache)")
    gen.add_argument("--prompt", required=True, help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens (default 64)")
    gen.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="ONNX Runtime provider (default cpu)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    gen.add_argument("--threads", type=int, help="CPU threads (default: one per physical core)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input, 1 a bug in this tool, shown with its
    traceback; ``--debug`` shows the traceback of bad input too, still exit 2). A measuring verb whose
    result missed a bar (--max-kl, --min-top1, --min-cosine) raises SystemExit(1) after printing it.
    Nothing printed holds a token or URL password (:func:`surgery.redact.redact`)."""
    # Everything printed (usage errors, results, errors, tracebacks, warnings, progress, logs) is
    # redacted: no token or URL password reaches the terminal (surgery.redact).
    with redacted_output(_token_values(sys.argv[1:] if argv is None else argv)):
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help (0) or a usage error already printed as one line (2)
            return exc.code if isinstance(exc.code, int) else EXIT_USAGE
        return _run(args)


def _token_values(argv: Sequence[str]) -> list[str]:
    """The values given to ``--token`` (known before parsing, so a usage error cannot show them either)."""
    values = [value for option, value in zip(argv, argv[1:], strict=False) if option == "--token"]
    return values + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--token=")]


def _run(args: argparse.Namespace) -> int:
    try:
        handler: Callable[[argparse.Namespace], Any] = args.handler
        handler(args)
    except (SurgeryError, OSError) as exc:
        if args.debug:
            sys.stderr.write(traceback.format_exc())
            return EXIT_USAGE
        text = exc.one_line() if isinstance(exc, SurgeryError) else " ".join(str(exc).split())
        sys.stderr.write(f"surgery: error: {text}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("surgery: interrupted; nothing was written\n")
        return 130
    except Exception:  # a bug in this tool: its traceback, as Python would print it, but redacted
        sys.stderr.write(traceback.format_exc())
        return EXIT_BUG
    return 0


def entry_point() -> NoReturn:
    """The console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
