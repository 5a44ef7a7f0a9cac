"""load_cost_model: a cost-model JSON file -> a CostModel, dispatching on its "kind". No torch.

Kinds register a loader (dict -> CostModel): "fitted" here; a module providing another kind
calls register_kind when imported. Kinds whose module is not imported yet are found through
KIND_MODULES ("roofline" -> csps.costmodel.roofline), imported on first use.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from csps.costmodel.base import CostModel
from csps.costmodel.fitted import FittedCostModel

Loader = Callable[[dict], CostModel]

_LOADERS: dict[str, Loader] = {"fitted": FittedCostModel.from_dict}
# kind -> the module that implements it (imported lazily, the first time the kind is loaded)
KIND_MODULES = {"roofline": "csps.costmodel.roofline"}
# kind -> the class in KIND_MODULES whose from_dict loads it, if the module does not register
_KIND_CLASSES = {"roofline": "RooflineCostModel"}

PROFILES_DIR = Path(__file__).parent / "profiles"  # measured profiles shipped with csps


def register_kind(kind: str, loader: Loader) -> None:
    """Make load_cost_model read files of this kind with loader(dict) -> CostModel."""
    if not kind or not callable(loader):
        raise ValueError(f"need a kind name and a callable loader, got {kind!r}, {loader!r}")
    _LOADERS[kind] = loader


def known_kinds() -> list[str]:
    return sorted(set(_LOADERS) | set(KIND_MODULES))


def cost_model_from_dict(data: dict) -> CostModel:
    kind = data.get("kind")
    if kind not in _LOADERS and kind in KIND_MODULES:
        module = importlib.import_module(KIND_MODULES[kind])
        if kind not in _LOADERS:  # the module did not register itself
            register_kind(kind, getattr(module, _KIND_CLASSES[kind]).from_dict)
    if kind not in _LOADERS:
        raise ValueError(f"unknown cost model kind {kind!r}; known: {known_kinds()}")
    return _LOADERS[kind](data)


def load_cost_model(path: str | Path) -> CostModel:
    """Read a cost-model JSON file. A bare name (no such file) looks in csps/costmodel/profiles/,
    e.g. "cpu-smollm2-135m-sp2". Raises ValueError on an unknown kind or a malformed file."""
    path = Path(path)
    if not path.exists() and (PROFILES_DIR / f"{path.name}.json").exists():
        path = PROFILES_DIR / f"{path.name}.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: want a JSON object with a 'kind'")
    return cost_model_from_dict(data)
