"""Measure: how far ONNX Runtime's fp32 logits are from PyTorch, against the bound validation applies.

What it measures
    For each model: the fp32 export (``exporters.onnx.export_onnx``, validation off), then exactly the
    numeric checks of ``exporters.onnx_parity.validate_against`` (prefill, decode step, left-padded batch
    prefill and step; encoders: ``last_hidden_state``), and for the same inputs the model in float64
    (the whole sequence, no cache: the near-exact answer). Per check it prints

    * max |logit|: the largest |PyTorch fp32 logit| over the compared positions (the scale);
    * PyTorch fp32 vs float64: PyTorch's own rounding error, absolute and as a fraction of max |logit|;
    * ONNX Runtime vs PyTorch fp32: what validation bounds, absolute and relative;
    * ONNX Runtime vs float64;
    * the bound (``FP32_RELATIVE_TOLERANCE`` x max(1, max |logit|)) and the margin (bound / difference);

    and then the same checks on a deliberately wrong graph: one normalization weight in the middle
    layer (the last ``*norm*.weight`` initializer of that layer, e.g. ``post_attention_layernorm``)
    scaled by 1 + 1e-3, which validation must reject (skipped where the graph names no norm weight:
    Gemma 3 folds ``1 + w`` into unnamed constants).

How to run
    surgery prune - /tmp/smol-19 --drop 10-20         # the pruned model, if wanted
    python benchmarks/onnx_parity.py - /tmp/smol-19 --workdir /tmp/onnx-parity
    (``-`` is the default model, SmolLM2-135M; any model path or repo id the CLI accepts works.)
"""

from __future__ import annotations

import argparse
import copy
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from exporters import onnx as onnx_export  # noqa: E402
from exporters import onnx_parity  # noqa: E402
from surgery.source import open_source  # noqa: E402

PERTURBATION = 1e-3


class Recorder:
    """Records the PyTorch calls and the numeric checks of one ``validate_against`` run."""

    def __init__(self, model: Any) -> None:
        self.calls: list[dict[str, np.ndarray]] = []
        self.checks: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        self.calls.append({k: v.numpy().copy() for k, v in kwargs.items()
                           if k in ("input_ids", "attention_mask", "position_ids", "token_type_ids") and v is not None})

    def diff_check(self, name: str, got: np.ndarray, want: np.ndarray, keep: np.ndarray | None, dtype: str,
                   what: str = "logit") -> onnx_export.Check:
        self.checks.append((name, got.astype(np.float32), want, keep))
        return ORIGINAL_DIFF_CHECK(name, got, want, keep, dtype, what)


ORIGINAL_DIFF_CHECK = onnx_parity._diff_check


def run_validation(loaded: Any, directory: Path) -> tuple[onnx_export.OnnxValidationReport, Recorder]:
    recorder = Recorder(loaded.model)
    onnx_parity._diff_check = recorder.diff_check  # where validate_against looks it up
    try:
        report = onnx_export.validate_against(loaded, directory)
    finally:
        onnx_parity._diff_check = ORIGINAL_DIFF_CHECK
        recorder.handle.remove()
    return report, recorder


def float64_references(loaded: Any, recorder: Recorder) -> list[np.ndarray]:
    """The float64 answer for each recorded check: prefills as called, steps as the whole sequence."""
    import torch

    model64 = copy.deepcopy(loaded.model).to(torch.float64)
    tensors = [{k: torch.from_numpy(v) for k, v in call.items()} for call in recorder.calls]
    out: list[np.ndarray] = []
    with torch.no_grad():
        if loaded.kind == "encoder":
            return [model64(**tensors[0]).last_hidden_state.numpy()]
        for index in range(len(recorder.checks)):  # prefill, step, batch prefill, batch step
            call = tensors[index]
            if index % 2 == 0:
                out.append(model64(**call, use_cache=False).logits.numpy())
            else:
                before = tensors[index - 1]
                full = {"input_ids": torch.cat([before["input_ids"], call["input_ids"]], 1),
                        "attention_mask": call["attention_mask"],
                        "position_ids": torch.cat([before["position_ids"], call["position_ids"]], 1)}
                out.append(model64(**full, use_cache=False).logits[:, -1:].numpy())
    return out


def perturb(directory: Path, target: Path) -> str | None:
    """A copy of the export with one mid-layer norm weight scaled by 1 + PERTURBATION; returns its name.

    The weight: the last ``*norm*weight`` initializer of the middle layer (None when the graph names none).
    """
    import onnx
    from onnx import numpy_helper

    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(directory, target)
    model = onnx.load(str(target / onnx_export.ONNX_FILENAME))
    layers = sorted({int(m.group(1)) for i in model.graph.initializer if (m := re.search(r"layers?\.(\d+)\.", i.name))})
    if not layers:  # the exporter folded the norm weights into unnamed constants (Gemma's 1 + w)
        return None
    middle = layers[len(layers) // 2]
    names = [i.name for i in model.graph.initializer
             if re.search(rf"layers?\.{middle}\.", i.name) and "norm" in i.name.lower() and i.name.endswith("weight")]
    chosen = next(i for i in model.graph.initializer if i.name == names[-1])
    chosen.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(chosen) * np.float32(1 + PERTURBATION), chosen.name))
    external = (target / onnx_export.EXTERNAL_DATA_FILENAME).exists()
    onnx.save(model, str(target / onnx_export.ONNX_FILENAME), save_as_external_data=external,
              location=onnx_export.EXTERNAL_DATA_FILENAME if external else None)
    return chosen.name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model paths or repo ids; '-' is the default model")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/onnx-parity"))
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args()
    rtol = onnx_export.FP32_RELATIVE_TOLERANCE
    print(f"rule: max |ONNX Runtime - PyTorch fp32| <= {rtol:g} x max(1, max |logit|)\n")
    for spec in args.models:
        source = open_source(None if spec == "-" else spec, quiet=True)
        source.fetch(source.pending_files)
        directory = args.workdir / f"{source.path.name}-fp32"
        if not (directory / onnx_export.ONNX_FILENAME).exists():
            onnx_export.export_onnx(source.path, directory, validate=False, force=True, quiet=True,
                                    trust_remote_code=args.trust_remote_code)
        loaded = onnx_export._load(source.path, args.trust_remote_code)
        report, recorder = run_validation(loaded, directory)
        exact = float64_references(loaded, recorder)
        print(f"== {source.name} ({loaded.kind}, {len(loaded.cache) or onnx_export._hidden_layers(loaded)} layers): "
              f"validation {'passed' if report.passed else 'FAILED'}")
        print(f"  {'check':52} {'max|logit|':>10} {'torch-f64':>9} {'(rel)':>7} {'ORT-torch':>9} {'(rel)':>7} "
              f"{'ORT-f64':>9} {'bound':>9} {'margin':>7}")
        for (name, got, want, keep), ref in zip(recorder.checks, exact, strict=True):
            if keep is not None:
                got, want, ref = got[keep], want[keep], ref[keep]
            scale = float(np.abs(want).max())
            torch_err = float(np.abs(want - ref).max())
            ort_torch = float(np.abs(got - want).max())
            ort_exact = float(np.abs(got - ref).max())
            bound = rtol * max(scale, 1.0)
            print(f"  {name[:52]:52} {scale:10.3g} {torch_err:9.3g} {torch_err / max(scale, 1):7.2g} {ort_torch:9.3g} "
                  f"{ort_torch / max(scale, 1):7.2g} {ort_exact:9.3g} {bound:9.3g} {bound / max(ort_torch, 1e-30):6.1f}x")
        wrong = args.workdir / f"{source.path.name}-fp32-wrong"
        perturbed = perturb(directory, wrong)
        if perturbed is None:
            print("  wrong graph: skipped (no named norm weight in the graph)\n")
            continue
        bad = onnx_export.validate_against(loaded, wrong)
        print(f"  wrong graph ({perturbed} x {1 + PERTURBATION:g}): validation {'passed' if bad.passed else 'FAILED'}")
        for check in bad.checks:
            if check.max_abs_diff is not None and check.tolerance is not None:
                print(f"    {check.name[:52]:52} ORT-torch {check.max_abs_diff:9.3g} bound {check.tolerance:9.3g} "
                      f"({check.max_abs_diff / check.tolerance:.1f}x the bound)")
        print()


if __name__ == "__main__":
    main()
