"""Sanity checks (Adebayo et al. 2018; Sixt et al. 2020): does the map depend on what the model learnt?

*Cascading model-parameter randomisation.* The network's parameterised blocks are re-initialised one
after another from the output side down (top-down); after each step the method explains the same
input and target again, and the Spearman rank correlation of |map| with the original |map| is recorded
(the curve). A map that explains the model should decorrelate as the model is destroyed.

Verdict: **pass** when the correlation after the deepest step run is below
:data:`RANDOMISATION_THRESHOLD` (0.5): less than half of the original rank order survives with the
randomised blocks. The threshold is a convention (Adebayo et al. judge by eye; Quantus reports the
curve only); it is an option.

*Random-logit check* (classifiers): the map for a randomly chosen other class, compared with the map
for the target class (Spearman, signed values). A map that barely changes with the class (high
correlation) does not explain the class decision.

The user's model is never touched: every step runs on a deep copy of the network, and the global
random state is restored, whether the check finishes or fails.

Blocks: the network's module tree is split, largest block first, until there are at least
``min_blocks`` blocks (or nothing more to split); a block is a submodule holding parameters, e.g. a
ResNet stage, a DenseNet dense block or a UNet level. They are ordered by when they run in a forward
pass; top-down is the reverse.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ModelError
from ..layers import observed_forward
from ..models.base import CLASSIFICATION, LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from .agreement import spearman

log = logging.getLogger(__name__)

RANDOMISATION_THRESHOLD = 0.5

#: (model, target) → (X, Y, Z) map: how a check asks the method for a map.
Explainer = Callable[[LoadedModel, Target], torch.Tensor]


@dataclass(frozen=True)
class Block:
    """A named submodule whose parameters are randomised together."""

    name: str
    parameters: int


def _owns_parameters(module: torch.nn.Module) -> bool:
    return any(True for _ in module.parameters(recurse=False))


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def execution_order(model: LoadedModel, x: torch.Tensor) -> list[str]:
    """Names of the modules that own parameters, in the order they first run on ``x`` (one forward pass).

    Falls back to registration order for TorchScript models, which take no hooks.
    """
    modules = [(name, m) for name, m in model.network.named_modules() if _owns_parameters(m)]
    if not model.internals_available:
        return [name for name, _ in modules]
    seen: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, inputs, name=name: seen.append(name) if name not in seen else None)
        for name, module in modules
    ]
    observed_forward(model, x, handles)
    unseen = [name for name, _ in modules if name not in seen]  # parameters never used in the pass
    return seen + unseen


def parameter_blocks(network: torch.nn.Module, order: list[str], min_blocks: int = 6) -> list[Block]:
    """The network's blocks, top-down (output side first).

    Args:
        network: the model's module tree.
        order: names of parameter-owning modules in forward order (:func:`execution_order`).
        min_blocks: split the largest splittable block until there are at least this many.
    """
    modules = dict(network.named_modules())

    def children(name: str) -> list[str]:
        prefix = f"{name}." if name else ""
        return [f"{prefix}{child}" for child, m in modules[name].named_children() if _parameter_count(m) > 0]

    def splittable(name: str) -> bool:
        return not _owns_parameters(modules[name]) and len(children(name)) > 0

    blocks = [""]
    while True:
        candidates = [name for name in blocks if splittable(name)]
        if len(blocks) >= min_blocks or not candidates:
            break
        largest = max(candidates, key=lambda name: _parameter_count(modules[name]))
        blocks = [c for name in blocks for c in (children(largest) if name == largest else [name])]

    position = {name: index for index, name in enumerate(order)}

    def last_run(block: str) -> int:
        prefix = f"{block}." if block else ""
        return max((i for name, i in position.items() if name == block or name.startswith(prefix)), default=-1)

    ranked = sorted(blocks, key=last_run, reverse=True)
    return [Block(name or "(whole network)", _parameter_count(modules[name])) for name in ranked]


def randomise_block(network: torch.nn.Module, name: str) -> None:
    """Re-initialise every parameter (and normalisation statistics) inside block ``name`` in place.

    Modules with ``reset_parameters`` use PyTorch's own initialisation; other parameters are drawn
    from N(0, σ²) with σ their current standard deviation (1 if they have none).
    """
    block = network if name == "(whole network)" else dict(network.named_modules())[name]
    with torch.no_grad():
        for module in block.modules():
            if not _owns_parameters(module):
                continue
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
                continue
            for parameter in module.parameters(recurse=False):
                scale = float(parameter.std()) if parameter.numel() > 1 else 1.0
                parameter.normal_(0.0, scale if scale > 0 else 1.0)


@dataclass
class RandomisationResult:
    """The cascading randomisation curve of one method."""

    blocks: list[str]  # randomised cumulatively, in this order
    correlations: list[float]  # Spearman(|map after step i|, |original map|)
    threshold: float
    seconds: float
    passes: dict

    @property
    def final(self) -> float:
        return self.correlations[-1] if self.correlations else float("nan")

    @property
    def passed(self) -> bool | None:
        return None if not self.correlations else bool(self.final < self.threshold)

    def record(self) -> dict:
        return {
            "blocks": self.blocks, "spearman": [round(c, 6) for c in self.correlations],
            "final_spearman": self.final, "threshold": self.threshold,
            "verdict": None if self.passed is None else ("pass" if self.passed else "fail"),
            "runtime_s": round(self.seconds, 4), "passes": self.passes,
        }


@contextlib.contextmanager
def _randomisation_context(model: LoadedModel):
    """Seeding and drawing inside leave the caller's random state as it was.

    Denormal floats are flushed to zero inside: activations of randomised networks shrink into the
    denormal range, where CPUs compute several times slower. (PyTorch offers no way to read the
    setting, so it is switched off again on exit, its default.)
    """
    with torch.random.fork_rng(devices=[model.device] if model.device.type == "cuda" else []):
        torch.set_flush_denormal(True)
        try:
            yield
        finally:
            torch.set_flush_denormal(False)


def cascading_randomisation(
    model: LoadedModel,
    x: torch.Tensor,
    target: Target,
    original: torch.Tensor,
    explain: Explainer,
    *,
    depth: int | None = None,
    min_blocks: int = 6,
    threshold: float = RANDOMISATION_THRESHOLD,
    mask: torch.Tensor | None = None,
    seed: int = 0,
    progress: Progress = NO_PROGRESS,
) -> RandomisationResult:
    """Randomise the top ``depth`` blocks one by one (None: all), re-explain after each step.

    Args:
        x: (1, C, X, Y, Z) model input (to find the blocks' order).
        original: (X, Y, Z) the method's map for the intact model.
        explain: (model, target) → (X, Y, Z) map, the method under test.
        mask: optional (X, Y, Z) region to compare inside (body/brain).
    Returns:
        a :class:`RandomisationResult`; ``model`` is left exactly as it was.
    """
    started = time.perf_counter()
    before = model.passes.as_dict()
    probe = x
    if model.sliding_window is not None and model.sliding_window.needed(x.shape[2:]):
        probe = x.new_zeros((*x.shape[:2], *model.sliding_window.roi_size))
    blocks = parameter_blocks(model.network, execution_order(model, probe), min_blocks)
    chosen = blocks if depth is None else blocks[: max(0, depth)]
    correlations: list[float] = []
    if chosen:
        work = dataclasses.replace(model, network=copy.deepcopy(model.network))
        reference = original.abs()[None]
        with _randomisation_context(model):
            torch.manual_seed(seed)
            for step, block in enumerate(chosen, start=1):
                randomise_block(work.network, block.name)
                randomised = explain(work, target)
                correlations.append(float(spearman(randomised.abs()[None].to(reference.device), reference, mask)[0]))
                progress(step, len(chosen), unit="blocks")
        del work
    after = model.passes.as_dict()
    passes = {key: after[key] - before[key] for key in after}
    return RandomisationResult([b.name for b in chosen], correlations, threshold, time.perf_counter() - started, passes)


@dataclass
class RandomLogitResult:
    other_index: int
    other_name: str
    spearman: float

    def record(self) -> dict:
        return {"other_class_index": self.other_index, "other_class": self.other_name, "spearman": round(self.spearman, 6)}


def random_logit(
    model: LoadedModel, target: Target, original: torch.Tensor, explain: Explainer, *, mask: torch.Tensor | None = None, seed: int = 0
) -> RandomLogitResult:
    """Explain a random other class and compare with the target class's map (classifiers only)."""
    if model.task != CLASSIFICATION:
        raise ModelError("the random-logit check needs a classifier; a segmenter's channels explain regions, not decisions")
    others = [i for i in range(len(model.class_names)) if i != target.index]
    if not others:
        raise ModelError("the random-logit check needs a classifier with at least two classes")
    generator = torch.Generator().manual_seed(seed)
    other = others[int(torch.randint(len(others), (1,), generator=generator))]
    other_target = dataclasses.replace(target, index=other, name=model.class_names[other])
    other_map = explain(model, other_target)
    value = float(spearman(other_map[None].to(original.device), original[None], mask)[0])
    return RandomLogitResult(other, model.class_names[other], value)
