"""One case of a cohort, as a Dask task: explain (and measure) it, and publish its folder atomically.

A case folder ``cases/<case_id>/`` holds what ``xaioverlay explain`` writes (``xaioverlay evaluate``
with metrics), ``case.json`` (status, error, the case's table rows) and ``checksums.json`` (SHA-256 of
every other file), written last. The folder is built under a hidden staging name beside it and
renamed into place, so a case folder is either absent or complete; :func:`complete_record` checks the
checksums, which is what ``--resume`` trusts.

A case that fails on its own data (missing, truncated or unreadable file, a mask that does not fit)
is published with ``status: failed`` and its one-line error; the cohort goes on. Any other exception
propagates so that Dask retries the case, and a worker process that dies mid-case has its case
re-run on another worker by the scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import XAIOverlayError
from ..methods import split_specs
from ..models.base import file_digest
from ..outputs import write_json
from .manifest import Case

log = logging.getLogger(__name__)

CASE_RECORD = "case.json"
CHECKSUMS = "checksums.json"
DONE, FAILED = "done", "failed"


@dataclass(frozen=True)
class CaseSettings:
    """What every case of one cohort run is asked (sent to each worker with the task)."""

    model: str
    methods: str | None = None  # None: every method the model allows
    target: str | None = None
    score: str = "logit"
    layer: str | None = None
    device: str = "auto"
    amp: bool = False
    model_options: dict = field(default_factory=dict)  # format-specific load options (nnU-Net folds, ...)
    metrics: object | None = None  # a MetricOptions: measure the maps as `xaioverlay evaluate` does
    similar: int = 5  # similar cases listed per case (0: no feature vectors)
    feature_layer: str | None = None  # layer whose pooled activations compare cases (None: automatic)
    torch_threads: int | None = None
    montage: bool = True  # montage.png per case (without --metrics; evaluate's report always has one)

    def record(self) -> dict:
        """What must be the same for a resumed run to continue this one."""
        import dataclasses

        return {
            "model": str(Path(self.model).resolve()), "methods": self.methods, "target": self.target,
            "score": self.score, "layer": self.layer, "amp": self.amp,
            "model_options": {k: v for k, v in self.model_options.items() if v not in (None, "")},
            "metrics": None if self.metrics is None else dataclasses.asdict(self.metrics),
            "similar": self.similar, "feature_layer": self.feature_layer,
        }


_MODELS = None  # this process's models (one per model path + options), loaded by the first case


def cached_model(settings: CaseSettings, device: str):
    """The model of ``settings`` on ``device``, loaded once per worker process."""
    global _MODELS
    from ..worker import ModelCache

    if _MODELS is None:
        _MODELS = ModelCache(capacity=1)
    model, _ = _MODELS.get(settings.model, device, settings.amp, settings.model_options)
    return model


def worker_device(requested: str) -> str:
    """``auto`` on a worker of a machine with several GPUs → the GPU of the worker's number (``cuda:N``)."""
    import torch

    if requested != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return requested
    try:
        from distributed import get_worker

        number = int(get_worker().name)
    except (ImportError, ValueError, TypeError):
        return requested
    return f"cuda:{number % torch.cuda.device_count()}"


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def output_columns(output: dict) -> dict:
    """The model's output as flat table columns (predicted class and probability, or volumes in mL)."""
    if "predicted" in output:
        probabilities = output.get("probabilities")
        index = output["predicted_index"]
        return {"predicted": output["predicted"], "predicted_index": index,
                "probability": None if probabilities is None else probabilities[index],
                "logit": output["logits"][index]}
    return {f"predicted_volume_ml_{name}": value for name, value in output.get("predicted_volume_ml", {}).items()}


def done_rows(case: Case, explanation, metric_rows: list[dict] | None) -> list[dict]:
    """One table row per method of a finished case."""
    record = explanation.record()
    common = {"case_id": case.case_id, "status": DONE, "error": None, "label": case.label,
              **output_columns(record["output"]), "target_value": record["target"].get("value"),
              "device": record["model"]["device"]}
    rows = []
    for number, result in enumerate(explanation.results):
        row = {**common, "method": result.spec, "runtime_s": round(result.seconds, 4),
               "forward_passes": result.passes.get("forward"), "backward_passes": result.passes.get("backward")}
        if metric_rows is not None:
            row.update({k: v for k, v in metric_rows[number].items() if k not in row})
        rows.append(row)
    return rows


def failed_rows(case: Case, methods: str | None, error: str) -> list[dict]:
    """One row per requested method (one row with an empty method when the model's default set was asked)."""
    return [{"case_id": case.case_id, "method": spec, "status": FAILED, "error": error, "label": case.label}
            for spec in (split_specs(methods) if methods else [""])]


def _explain(case: Case, settings: CaseSettings, model, volumes, methods, staging: Path):
    """What `explain` (with metrics: `evaluate`) writes, into ``staging``; returns (explanation, table rows)."""
    if settings.metrics is None:
        from ..explain import explain
        from ..outputs import write_outputs

        explanation = explain(model, volumes, methods, settings.target, score=settings.score, layer=settings.layer)
        write_outputs(explanation, staging, montage=settings.montage)
        return explanation, done_rows(case, explanation, None)
    from ..metrics.evaluate import evaluate
    from ..metrics.report import write_evaluation
    from ..volumes import read_volume

    reference = read_volume(case.reference_mask) if case.reference_mask else None
    if reference is not None and not (reference.array > 0).any():
        reference = None  # a case without the finding (a negative case): no localisation metrics, not a failure
    evaluation = evaluate(model, volumes, methods, settings.target, score=settings.score, layer=settings.layer,
                          reference_mask=reference, options=settings.metrics)
    write_evaluation(evaluation, staging)
    return evaluation.explanation, done_rows(case, evaluation.explanation, evaluation.rows())


def _write_features(settings: CaseSettings, model, x, staging: Path) -> None:
    """The case's feature vector (see :mod:`.similar`) as ``features.npy``."""
    import numpy as np

    from .similar import FEATURES_FILE, feature_layer, pooled_features

    probe = x
    if model.sliding_window is not None and model.sliding_window.needed(x.shape[2:]):
        probe = x.new_zeros((*x.shape[:2], *model.sliding_window.roi_size))  # what the network sees
    layer = settings.feature_layer or feature_layer(model, probe)
    np.save(staging / FEATURES_FILE, pooled_features(model, x, layer), allow_pickle=False)


def reference_dice(segmentation, reference_mask: str) -> float | None:
    """A segmenter's Dice against the case's ``reference_mask``: any predicted foreground class vs the mask's
    non-zero voxels, on the input grid; None when both are empty (a negative case predicted empty)."""
    import math

    from ..errors import InputError
    from ..volumes import read_volume
    from .performance import dice

    reference = read_volume(reference_mask)
    if reference.array.shape != segmentation.array.shape:
        raise InputError(f"reference_mask {reference_mask} has size {list(reference.geometry.size)}, the image "
                         f"{list(segmentation.geometry.size)}; give the mask on the image's grid")
    value = dice(segmentation.array > 0, reference.array > 0)
    return None if math.isnan(value) else round(value, 6)


def _run(case: Case, settings: CaseSettings, staging: Path) -> list[dict]:
    from ..volumes import read_volumes

    model = cached_model(settings, worker_device(settings.device))
    volumes = read_volumes(list(case.images))
    methods = settings.methods
    if methods is None:
        from ..demo import demo_methods

        methods = demo_methods(model)
    explanation, rows = _explain(case, settings, model, volumes, methods, staging)
    if case.reference_mask and explanation.segmentation() is not None:
        overlap = reference_dice(explanation.segmentation(), case.reference_mask)
        rows = [{**row, "dice": overlap} for row in rows]
    if settings.similar and model.internals_available:
        _write_features(settings, model, explanation.model_input.tensor, staging)
    return rows


def publish(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; a folder already there (an earlier attempt) is replaced whole."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folders are private; a published case is not
    if final.exists():
        old = final.with_name(f".replaced-{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def write_case_folder(case: Case, cases_dir: Path, status: str, rows: list[dict], error: str | None,
                      staging: Path | None = None) -> dict:
    """Write ``case.json`` and ``checksums.json`` (last) into ``staging`` and publish it as ``cases/<case_id>``."""
    staging = staging or Path(tempfile.mkdtemp(prefix=f".staging-{case.case_id}-", dir=cases_dir))
    try:
        record = {"case_id": case.case_id, "status": status, "error": error, "label": case.label,
                  "images": list(case.images), "reference_mask": case.reference_mask, "rows": rows}
        write_json(record, staging / CASE_RECORD)
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        write_json({str(p.relative_to(staging).as_posix()): file_digest(p) for p in files}, staging / CHECKSUMS)
        publish(staging, cases_dir / case.case_id)
        return {"case_id": case.case_id, "status": status, "error": error}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def run_case(case: Case, settings: CaseSettings, cases_dir: str) -> dict:
    """The Dask task: run one case and publish its folder. Returns ``{case_id, status, error}``."""
    # as the command line does: MONAI's notes on its future defaults are nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai\.")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.")
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    cases_dir = Path(cases_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{case.case_id}-", dir=cases_dir))
    started = time.perf_counter()
    try:
        try:
            rows, status, error = _run(case, settings, staging), DONE, None
        except XAIOverlayError as failure:  # the case's own data or target: recorded, the cohort goes on
            error = one_line(failure)
            log.info("case %s failed: %s", case.case_id, error)
            for item in staging.iterdir():  # nothing half-made stays beside the record of the failure
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            rows, status = failed_rows(case, settings.methods, error), FAILED
        log.info("case %s %s in %.1f s", case.case_id, status, time.perf_counter() - started)
        return write_case_folder(case, cases_dir, status, rows, error, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def complete_record(folder: Path) -> dict | None:
    """``case.json`` of a case folder whose every file matches ``checksums.json``; None if incomplete."""
    try:
        sums = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))
        if CASE_RECORD not in sums:
            return None
        for name, digest in sums.items():
            if file_digest(folder / name) != digest:
                return None
        return json.loads((folder / CASE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
