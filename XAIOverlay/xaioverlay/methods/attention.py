"""What the network itself attends to: attention-gate coefficients and transformer attention rollout.

- **Attention gates** (MONAI ``AttentionUnet``, Oktay et al. 2018): each decoder level's
  ``AttentionBlock`` multiplies its skip connection by coefficients α = σ(ψ(…)) ∈ (0, 1), one per
  voxel of that level. The map is the mean over levels of α, each upsampled trilinearly to the model
  input; ``attention:level=N`` shows one level (0 = the finest, full-resolution gate).
- **Self-attention** (MONAI ``ViT``, ``UNETR``; their ``SABlock``): attention rollout (Abnar & Zuidema
  2020). Each block's attention matrix (what multiplies the values, read at the block's
  ``drop_weights``, the identity in eval mode) is averaged over heads, the identity is added for the
  residual path and rows are renormalised; the product over blocks says how much each input token
  reaches each output token. The map takes the rollout row of the class token when the network has
  one (a classifying ``ViT``: its decision is read from that token), else the mean over all rows
  (``UNETR`` and other token-to-voxel networks: every token feeds the decoder, so "how much each
  input patch reaches the outputs on average"). Each patch's value fills that patch's voxels on the
  model grid; voxels no patch covers (sizes not divisible by the patch) are 0.

- **Shifted-window attention** (MONAI ``SwinUNETR``; its ``WindowAttention``): a per-window rollout.
  Each block attends within windows of its stage's token grid, the windows of every second block
  cyclically shifted. A block's attention (mean over heads) is placed back on the grid through the same
  window partition and shift the block used, giving a sparse token-to-token matrix ``Ā_l`` over the
  stage's tokens (attention to padding tokens dropped); as for ViT, ``normalise(Ā_l + I)`` per block
  and the product over blocks. Between stages the patch merging forms each token from its 2×2×2
  children: the rollout passes a token's share to its children in equal parts. The map is the mean row
  of the product from the deepest stage's tokens (every one feeds the decoder) back to the patch tokens,
  each patch token's value spread over its voxels. It is computed as a row vector carried backwards
  block by block, so the matrices are never formed (memory of one block's attention). The decoder's
  convolutional skip connections are not attention and are not part of the rollout.

The map does not depend on the target (it is the network's own weighting); on sliding-window models
it runs per window like the CAMs, over the windows that touch the target, summed where they overlap.
Squeeze-excitation blocks are refused with the reason (see :meth:`Attention.unavailable`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelError
from ..layers import patch_size
from ..models.base import LoadedModel
from ..progress import NO_PROGRESS, Progress
from ..targets import Target
from .base import NO_CONTEXT, Attribution, Context, Method

SE_REASON = "SE blocks reweight channels, not positions; use gradcam/lrp/occlusion for a spatial map"


def _type_name(module: torch.nn.Module) -> str:
    return type(module).__name__


def gate_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """MONAI ``AttentionBlock``s (attention gates with a ``psi`` branch), in module order."""
    return [m for m in network.modules() if _type_name(m) == "AttentionBlock" and hasattr(m, "psi")]


def self_attention_modules(network: torch.nn.Module) -> list[torch.nn.Module]:
    """MONAI ``SABlock``s (softmax self-attention), in forward order of a ViT's blocks."""
    return [m for m in network.modules() if _type_name(m) == "SABlock"]


def window_attention_stages(network: torch.nn.Module) -> list[torch.nn.Module]:
    """MONAI Swin transformer stages (``BasicLayer``s of ``WindowAttention`` blocks), in forward order."""
    return [m for m in network.modules() if _type_name(m) == "BasicLayer" and hasattr(m, "blocks")]


def has_squeeze_excitation(network: torch.nn.Module) -> bool:
    """MONAI's squeeze-excitation blocks, or EfficientNet's inline SE (``has_se``)."""
    return any(
        type(m).__module__.endswith("squeeze_and_excitation") or getattr(m, "has_se", False) for m in network.modules()
    )


def combine_gates(gates: list[torch.Tensor], shape: tuple[int, int, int], level: int | None = None) -> torch.Tensor:
    """Gate coefficients of several levels → one map on the model grid.

    Args:
        gates: per level (B, 1, x, y, z), any order.
        shape: the model input's spatial shape.
        level: None → mean over levels; N → only level N, levels counted from the finest (most voxels).
    Returns:
        (B, X, Y, Z).
    """
    ordered = sorted(gates, key=lambda g: -g[0, 0].numel())
    if level is not None:
        if not 0 <= level < len(ordered):
            raise InputError(f"attention:level={level} does not exist; "
                             f"this network has gate levels 0 to {len(ordered) - 1}")
        ordered = [ordered[level]]
    upsampled = [F.interpolate(g.float(), size=tuple(shape), mode="trilinear", align_corners=False) for g in ordered]
    return torch.stack(upsampled).mean(0)[:, 0]


def attention_rollout(matrices: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): Π_l normalise(mean_heads(A_l) + I), last layer leftmost.

    Args:
        matrices: per block, first block first, (B, H, N, N), rows summing to 1.
    Returns:
        (B, N, N): row i = how much each input token reaches output token i.
    """
    rollout = None
    for matrix in matrices:
        mixed = matrix.float().mean(1)
        mixed = mixed + torch.eye(mixed.shape[-1], dtype=mixed.dtype, device=mixed.device)
        mixed = mixed / mixed.sum(-1, keepdim=True)
        rollout = mixed if rollout is None else mixed @ rollout
    return rollout


def token_scores(rollout: torch.Tensor, patches: int) -> torch.Tensor:
    """Each patch token's share: (B, N, N) → (B, patches).

    With one extra token (a class token, first, as MONAI's ViT prepends it): its rollout row.
    Otherwise (N == patches): the mean of all rows.
    """
    extra = rollout.shape[-1] - patches
    if extra == 1:
        return rollout[:, 0, 1:]
    if extra == 0:
        return rollout.mean(1)
    raise ModelError(f"the transformer has {rollout.shape[-1]} tokens for {patches} patches; attention rollout "
                     "knows networks with patch tokens only or one class token first")


def tokens_to_voxels(scores: torch.Tensor, patch: tuple[int, int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Patch scores → voxels: (B, P) with P = Π (shape // patch), C order → (B, X, Y, Z); each patch's score
    over all its voxels, 0 where the shape is not a whole number of patches."""
    grid = [s // p for s, p in zip(shape, patch)]
    values = scores.reshape(scores.shape[0], *grid)
    for axis, size in enumerate(patch):
        values = values.repeat_interleave(size, dim=axis + 1)
    pads = [p for axis in reversed(range(3)) for p in (0, shape[axis] - values.shape[axis + 1])]
    return F.pad(values, pads)


Grid = tuple[int, int, int]


def window_token_index(grid: Grid, window: Grid, shift: Grid) -> torch.Tensor:
    """Which grid token sits at each place of each window of a Swin block, as MONAI's block arranges them
    (pad to whole windows at the end of each axis, roll by −shift, ``window_partition``).

    Args:
        grid: the stage's token grid (d, h, w); window, shift: the block's (after ``get_window_size``).
    Returns:
        (windows, tokens per window) long: flat C-order grid index, −1 for a padding token.
    """
    from monai.networks.nets.swin_unetr import window_partition

    index = torch.arange(grid[0] * grid[1] * grid[2], dtype=torch.float64).reshape(1, *grid, 1)
    pads = [p for axis in reversed(range(3)) for p in (0, (-grid[axis]) % window[axis])]
    index = F.pad(index, [0, 0, *pads], value=-1.0)
    if any(shift):
        index = torch.roll(index, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
    return window_partition(index, window)[..., 0].long()


def carry_through_windows(scores: torch.Tensor, attention: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One block of the rollout, carried backwards: ``scores · normalise(Ā + I)`` for the block's windowed
    attention ``Ā`` (mean over heads), without forming the grid-sized matrix.

    Args:
        scores: (N,) over the stage's grid tokens (sums to 1).
        attention: (windows, H, n, n), rows summing to 1 (columns of padding tokens included).
        index: (windows, n) from :func:`window_token_index`.
    Returns:
        (N,) scores before the block.
    """
    real = (index >= 0).to(scores.dtype)
    mixed = attention.to(scores.dtype).mean(1) * real[:, None, :]
    mixed = mixed + torch.diag_embed(real)
    mixed = mixed / mixed.sum(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
    carried = torch.einsum("wi,wij->wj", scores[index.clamp(min=0)] * real, mixed)
    result = torch.zeros_like(scores)
    return result.index_put_((index[real.bool()],), carried[real.bool()], accumulate=True)


def spread_to_children(scores: torch.Tensor, parent: Grid, child: Grid) -> torch.Tensor:
    """Backwards through a patch merging: each parent token's score shared equally by its 2×2×2 children
    (fewer at an odd edge). (Π parent,) → (Π child,)."""
    ones = F.pad(torch.ones(1, 1, *child, dtype=scores.dtype), [p for s in reversed(child) for p in (0, s % 2)])
    counts = F.avg_pool3d(ones, 2)[0, 0] * 8
    values = (scores.reshape(parent) / counts)
    for axis in range(3):
        values = values.repeat_interleave(2, dim=axis)
    return values[: child[0], : child[1], : child[2]].reshape(-1)


def window_rollout(blocks: list[dict], deepest: Grid) -> torch.Tensor:
    """Per-window rollout of a Swin transformer (see the module docstring): the mean row of
    Π_blocks normalise(Ā_l + I), with the patch mergings between stages, as scores over the first stage's
    tokens.

    Args:
        blocks: in forward order, each ``{"stage", "grid", "window", "shift", "attention"}`` with the
            attention (windows, H, n, n) of one sample.
        deepest: the token grid after the last stage's patch merging.
    Returns:
        (Π grid of the first stage,) scores summing to 1.
    """
    grid = deepest
    scores = torch.full((deepest[0] * deepest[1] * deepest[2],), 1.0 / (deepest[0] * deepest[1] * deepest[2]),
                        dtype=torch.float64)
    stage = None
    for block in reversed(blocks):
        if block["stage"] != stage:  # crossing the patch merging at the end of this stage
            scores = spread_to_children(scores, grid, block["grid"])
            grid, stage = block["grid"], block["stage"]
        index = window_token_index(grid, block["window"], block["shift"])
        scores = carry_through_windows(scores, block["attention"], index)
    return scores


@contextlib.contextmanager
def captured_window_attention(network: torch.nn.Module):
    """Record, for every Swin block during the forward passes run inside, its stage, token grid, window,
    shift and attention matrix (windows, H, n, n) (see :func:`window_rollout`). Flash attention, which
    never forms the matrix, is switched off meanwhile. Hooks removed and settings restored on exit."""
    from monai.networks.nets.swin_unetr import get_window_size

    records: list[dict] = []
    handles = []
    stages = window_attention_stages(network)
    for number, stage in enumerate(stages):
        for block in stage.blocks:
            def before(module, inputs, number=number):
                grid = tuple(int(s) for s in inputs[0].shape[1:4])
                window, shift = get_window_size(grid, module.window_size, module.shift_size)
                records.append({"stage": number, "grid": grid, "window": window, "shift": shift})

            def attention(module, inputs, output):
                records[-1]["attention"] = output.detach()

            handles.append(block.register_forward_pre_hook(before))
            handles.append(block.attn.attn_drop.register_forward_hook(attention))
    try:
        with flash_attention_off([block.attn for stage in stages for block in stage.blocks]):
            yield records
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def captured_attention(blocks: list[torch.nn.Module]):
    """Record each ``SABlock``'s attention matrix (B, H, N, N) during the forward passes run inside.

    The matrix is read where the block multiplies the values with it (the output of ``drop_weights``);
    flash attention, which never forms it, is switched off meanwhile. Restored on exit, also on error.
    """
    matrices: list[torch.Tensor] = []
    handles = [block.drop_weights.register_forward_hook(lambda m, i, out: matrices.append(out.detach()))
               for block in blocks]
    try:
        with flash_attention_off(blocks):
            yield matrices
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def flash_attention_off(blocks: list[torch.nn.Module]):
    """Flash attention (which never forms the attention matrix) switched off in ``blocks`` that have it,
    restored on exit, also on error."""
    blocks = [block for block in blocks if hasattr(block, "use_flash_attention")]
    saved = [block.use_flash_attention for block in blocks]
    try:
        for block in blocks:
            block.use_flash_attention = False
        yield
    finally:
        for block, value in zip(blocks, saved):
            block.use_flash_attention = value


class Attention(Method):
    """Option ``level=N``: one attention-gate level (0 = finest); default the mean over levels."""

    name = "attention"
    label = "Attention"
    signed = False
    needs_internals = True
    summary = ("the network's own attention: gate coefficients (AttentionUnet) or rollout (ViT, UNETR; per window "
               "for SwinUNETR) (option: level=N)")

    def __init__(self, level: int | None = None) -> None:
        self.level = level

    @classmethod
    def from_option(cls, option: str | None, *, layer: str | None = None) -> "Attention":
        if not option:
            return cls()
        key, _, value = option.partition("=")
        if key.strip().lower() != "level" or not value.strip().isdigit():
            raise InputError(f"cannot read attention option {option!r}; "
                             "use attention:level=N (0 = the finest gate level)")
        return cls(int(value))

    @property
    def spec(self) -> str:
        return self.name if self.level is None else f"{self.name}:level={self.level}"

    @classmethod
    def unavailable(cls, model: LoadedModel) -> str | None:
        reason = super().unavailable(model)
        if reason:
            return reason
        network = model.network
        kind = _type_name(network)
        if gate_modules(network) or self_attention_modules(network) or window_attention_stages(network):
            return None
        if has_squeeze_excitation(network):
            return SE_REASON
        return f"{kind} has no attention gates or self-attention blocks; use gradcam/lrp/occlusion for a spatial map"

    def attribute(
        self, model: LoadedModel, x: torch.Tensor, target: Target, progress: Progress = NO_PROGRESS,
        context: Context = NO_CONTEXT,
    ) -> Attribution:
        reason = self.unavailable(model)
        if reason:
            raise ModelError(reason)
        shape = tuple(x.shape[2:])
        gates = gate_modules(model.network)
        if gates:
            values, parameters = self._gates(model, x, gates, shape)
        else:
            if self.level is not None:
                raise InputError("attention:level=N picks an attention-gate level; "
                                 "this network has self-attention, use attention")
            values, parameters = (self._window_rollout if window_attention_stages(model.network)
                                  else self._rollout)(model, x, shape)
        progress(1, 1, unit="passes")
        return Attribution(values[0], signed=False, parameters=parameters)

    def _gates(self, model, x, gates, shape):
        captured: list[torch.Tensor] = []
        handles = [gate.psi.register_forward_hook(lambda m, i, out: captured.append(out.detach())) for gate in gates]
        try:
            with torch.no_grad():
                model.forward(x)
        finally:
            for handle in handles:
                handle.remove()
        values = combine_gates(captured, shape, self.level)
        levels = "mean" if self.level is None else self.level
        return values, {"kind": "attention gates (Oktay et al. 2018)", "levels": len(captured), "level": levels}

    def _rollout(self, model, x, shape):
        blocks = self_attention_modules(model.network)
        patch = patch_size(model.network)
        with captured_attention(blocks) as matrices, torch.no_grad():
            model.forward(x)
        patches = 1
        for s, p in zip(shape, patch):
            patches *= s // p
        rollout = attention_rollout(matrices)
        scores = token_scores(rollout, patches)
        token = "class token row" if rollout.shape[-1] == patches + 1 else "mean over tokens"
        values = tokens_to_voxels(scores, patch, shape)
        parameters = {"kind": "attention rollout (Abnar & Zuidema 2020)", "blocks": len(matrices),
                      "patch_size": list(patch), "tokens": token}
        return values, parameters

    def _window_rollout(self, model, x, shape):
        network = model.network
        embeddings = [m for m in network.modules() if _type_name(m) == "PatchEmbed" and hasattr(m, "proj")]
        if len(embeddings) != 1:
            raise ModelError(f"window attention rollout needs one Swin PatchEmbed; this network has {len(embeddings)}")
        patch = tuple(int(k) for k in embeddings[0].proj.kernel_size)
        with captured_window_attention(network) as blocks, torch.no_grad():
            model.forward(x[:1])  # one sample: the attention then has one row of windows
        last = blocks[-1]["grid"]
        deepest = tuple((s + 1) // 2 for s in last)  # the last stage's patch merging
        scores = window_rollout(blocks, deepest).float()[None]
        values = tokens_to_voxels(scores, patch, shape)
        parameters = {"kind": "per-window attention rollout through shifted windows and patch merging",
                      "blocks": len(blocks), "stages": len({b["stage"] for b in blocks}), "patch_size": list(patch),
                      "tokens": "mean over the deepest stage's tokens"}
        return values, parameters
