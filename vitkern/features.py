"""The feature-backbone side of timm's API, for `ViT.forward_intermediates` and
`vitkern.create_model(..., features_only=True)`.

- `take_indices`: which blocks an `indices` argument selects (timm's `feature_take_indices` rule:
  an int n is the last n blocks, a sequence lists blocks, negative ones counted from the end).
- `FeatureInfo`: what each feature map is (module name, channels, reduction), with the query
  methods timm's tooling calls (`channels()`, `reduction()`, `module_name()`, `get_dicts()`).
- `FeatureBackbone`: a ViT pruned to the blocks it needs, returning their outputs as feature maps
  [batch, embed_dim, grid_h, grid_w]; the equivalent of timm's `features_only=True` ViT (its
  `FeatureGetterNet`): same default (the last 3 blocks), same `model.` state-dict prefix.

Nothing here imports `vitkern.model`: the model passed in is used through its timm-style methods.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch import Tensor, nn

Indices = Optional[Union[int, Sequence[int]]]

__all__ = ["take_indices", "FeatureInfo", "FeatureBackbone"]


def take_indices(num_blocks: int, indices: Indices = None) -> Tuple[List[int], int]:
    """(the selected block indices in [0, num_blocks), the largest of them).

    indices: None for every block, an int n for the last n blocks, or a sequence of block indices
    (negative ones count from the end, as Python indexing does). Raises ValueError naming
    `indices` when one falls outside the model's `num_blocks` blocks.
    """
    if indices is None:
        indices = num_blocks
    if isinstance(indices, bool):
        raise TypeError(f"indices must be None, an int or a sequence of ints, got bool {indices!r}")
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"indices={indices} asks for the last {indices} blocks, but the model has {num_blocks}")
        taken = list(range(num_blocks - indices, num_blocks))
    else:
        try:
            items = list(indices)
        except TypeError:
            raise TypeError(f"indices must be None, an int or a sequence of ints, got {type(indices).__name__}") from None
        if not items:
            raise ValueError("indices must name at least one block, got an empty sequence")
        taken = []
        for i in items:
            if isinstance(i, bool) or not isinstance(i, int):
                raise TypeError(f"indices must hold ints, got {i!r} in {indices!r}")
            idx = num_blocks + i if i < 0 else i
            if not 0 <= idx < num_blocks:
                raise ValueError(f"indices holds block {i}, outside the model's {num_blocks} blocks "
                                 f"(0..{num_blocks - 1}, or -{num_blocks}..-1 from the end)")
            taken.append(idx)
    return taken, max(taken)


class FeatureInfo:
    """The feature maps a backbone returns: one dict per map (`module`, `num_chs`, `reduction`)
    and the accessors of timm's `FeatureInfo`, each taking an optional index (or indices) into the
    *returned* maps."""

    def __init__(self, info: List[Dict[str, Any]], out_indices: Sequence[int]) -> None:
        self.info = [dict(d) for d in info]
        self.out_indices = tuple(out_indices)

    def _pick(self, idx: Optional[Union[int, Sequence[int]]]) -> List[Dict[str, Any]]:
        chosen = [self.info[i] for i in self.out_indices]
        if idx is None:
            return chosen
        if isinstance(idx, int):
            return [chosen[idx]]
        return [chosen[i] for i in idx]

    def get(self, key: str, idx: Optional[Union[int, Sequence[int]]] = None) -> Union[Any, List[Any]]:
        values = [d[key] for d in self._pick(idx)]
        return values[0] if isinstance(idx, int) else values

    def get_dicts(self, keys: Optional[Sequence[str]] = None, idx: Optional[Union[int, Sequence[int]]] = None):
        picked = [dict(d) if keys is None else {k: d[k] for k in keys} for d in self._pick(idx)]
        return picked[0] if isinstance(idx, int) else picked

    def channels(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("num_chs", idx)

    def reduction(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("reduction", idx)

    def module_name(self, idx: Optional[Union[int, Sequence[int]]] = None):
        return self.get("module", idx)

    def __getitem__(self, item: int) -> Dict[str, Any]:
        return self.info[item]

    def __len__(self) -> int:
        return len(self.info)

    def __repr__(self) -> str:
        return f"FeatureInfo(out_indices={self.out_indices}, info={self._pick(None)})"


class FeatureBackbone(nn.Module):
    """A ViT as a feature-map backbone: images [batch, in_chans, H, W] -> a list of maps
    [batch, embed_dim, grid_h, grid_w] (or [batch, tokens, embed_dim] with output_fmt="NLC"), one
    per selected block, in block order; the prefix (class) token is dropped, as in timm.

    model: a `vitkern.ViT`; it is pruned in place to the blocks it needs, and its head and (unless
    `norm`) its final norm are removed, as timm's `features_only=True` does. out_indices: which
    blocks (`take_indices` rule; default the last 3, timm's default for ViTs). norm: apply the
    final norm to every map.
    """

    def __init__(self, model: nn.Module, out_indices: Indices = 3, *, output_fmt: str = "NCHW",
                 norm: bool = False) -> None:
        super().__init__()
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        for method in ("prune_intermediate_layers", "forward_intermediates", "feature_info"):
            if not hasattr(model, method):
                raise TypeError(f"model must be a vitkern.ViT (it has no {method}), got {type(model).__name__}")
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices, prune_norm=not norm))
        self.feature_info = FeatureInfo(model.feature_info, self.out_indices)
        self.model = model
        self.output_fmt = output_fmt
        self.norm = norm
        self.in_chans = model.in_chans
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        for key in ("num_classes", "classifier", "global_pool"):  # a head's fields: no head here
            cfg.pop(key, None)
        self.pretrained_cfg = cfg

    @property
    def default_cfg(self) -> Dict[str, Any]:
        """timm's older name of `pretrained_cfg`."""
        return self.pretrained_cfg

    def forward(self, x: Tensor) -> List[Tensor]:
        return self.model.forward_intermediates(x, indices=list(self.out_indices), norm=self.norm,
                                                output_fmt=self.output_fmt, intermediates_only=True)
