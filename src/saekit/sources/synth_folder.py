"""Reading a SAELens synthetic-model folder (SyntheticModel.save) into a SynthModel, without sae-lens.

The folder holds `synthetic_model_config.json` (the SyntheticModelConfig as JSON), `synthetic_model.safetensors`
(`feature_vectors` (G, d), `bias` (d,), `firing_probabilities` (G,), and with a correlation
`correlation_factor` (G, r) and `correlation_diag` (G,)) and, with a hierarchy, `hierarchy.json` (a forest of
nodes {feature_index, mutually_exclusive_children, scale_children_by_parent, feature_id, children}).

What SAELens rebuilds at load time rather than storing is rebuilt here the same way: the per-feature mean and
std of the magnitudes come from the config (a number, or a generator: constant, linear, exponential,
folded_normal; folded_normal draws with torch.Generator seeded seed+1 for the std and seed+2 for the mean).
The firing probabilities are the stored ones (SAELens's, after compensation). Only the keys, tensor names
and generator names SAELens writes are accepted; anything else, and any file that is missing, unreadable,
of the wrong shape, non-finite, too large, or whose hierarchy repeats a feature, is refused in one line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from saekit.errors import InputError
from saekit.sources.synth_model import MAX_DEPTH, SynthModel, check_sizes

CONFIG_FILE = "synthetic_model_config.json"
WEIGHTS_FILE = "synthetic_model.safetensors"
HIERARCHY_FILE = "hierarchy.json"
MAX_CONFIG_BYTES = 1 << 20
MAX_HIERARCHY_BYTES = 1 << 29
MAX_RANK = 1 << 16  # a larger correlation rank is refused

_FIRING = {"zipfian": {"exponent", "max_prob", "min_prob"}, "linear": {"max_prob", "min_prob"},
           "random": {"max_prob", "min_prob"}, "constant": {"probability"}}
_MAGNITUDE = {"constant": {"value"}, "linear": {"start", "end"}, "exponential": {"start", "end"},
              "folded_normal": {"mean", "std", "min_value", "max_value"}}
_HIERARCHY_KEYS = {"total_root_nodes", "branching_factor", "max_depth", "mutually_exclusive_portion", "mutually_exclusive_min_depth",
                   "mutually_exclusive_max_depth", "compensate_probabilities", "scale_children_by_parent"}
_CONFIG_KEYS = {"num_features", "hidden_dim", "firing_probability", "hierarchy", "orthogonalization", "correlation",
                "std_firing_magnitudes", "mean_firing_magnitudes", "bias", "dtype", "seed"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
_NODE_KEYS = {"feature_index", "mutually_exclusive_children", "scale_children_by_parent", "feature_id", "children"}
_TENSORS = {"feature_vectors", "bias", "firing_probabilities", "correlation_factor", "correlation_diag"}
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


def _read_json(path: Path, limit: int) -> Any:
    if not path.is_file():
        raise InputError(f"synthetic model folder: missing {path.name} in {path.parent}")
    if path.stat().st_size > limit:
        raise InputError(f"{path}: larger than {limit >> 20} MB")
    try:
        return json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"{path}: not valid JSON ({why})") from None


def _no_constant(name: str) -> None:
    raise InputError(f"JSON holds {name}, which is not a number")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{CONFIG_FILE}: {where} must be a finite number, got {value!r}"[:200])
    return float(value)


def _int(value: Any, where: str, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or value > 2**62:
        raise InputError(f"{CONFIG_FILE}: {where} must be an integer >= {low}, got {value!r}"[:200])
    return value


def _dict(value: Any, where: str, allowed: set[str]) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{CONFIG_FILE}: {where} must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise InputError(f"{CONFIG_FILE}: unknown key {unknown[0]!r} in {where}"[:200])
    return value


def _generator(value: Any, where: str, kinds: dict[str, set[str]]) -> tuple[str, dict]:
    """(generator name, its fields) of a {generator_name: ..., fields...} object; unknown names refused."""
    if not isinstance(value, dict):
        raise InputError(f"{CONFIG_FILE}: {where} must be an object, got {type(value).__name__}")
    name = value.get("generator_name")
    if name not in kinds:
        raise InputError(f"{CONFIG_FILE}: unknown {where} generator {name!r}; known: {', '.join(kinds)}"[:200])
    fields = _dict({k: v for k, v in value.items() if k != "generator_name"}, where, kinds[name])
    return name, fields


def _check_firing(value: Any) -> None:
    name, fields = _generator(value, "firing_probability", _FIRING)
    for key, v in fields.items():
        _number(v, f"firing_probability.{key}")


def _check_sections(cfg: dict) -> None:
    """The config's sections that saekit does not use beyond checking them."""
    _check_firing(cfg["firing_probability"])
    h = cfg.get("hierarchy")
    if h is not None:
        h = _dict(h, "hierarchy", _HIERARCHY_KEYS)
        for key in ("total_root_nodes", "max_depth", "mutually_exclusive_min_depth"):
            if key in h:
                _int(h[key], f"hierarchy.{key}")
    o = cfg.get("orthogonalization")
    if o is not None:
        o = _dict(o, "orthogonalization", {"num_steps", "lr", "chunk_size"})
        for key, v in o.items():
            _number(v, f"orthogonalization.{key}")
    c = cfg.get("correlation")
    if c is not None:
        c = _dict(c, "correlation", {"rank", "correlation_scale", "seed"})
        if "rank" in c:
            _int(c["rank"], "correlation.rank", 1)
    bias = cfg.get("bias", 1.0)
    if not isinstance(bias, bool):
        _number(bias, "bias")
    dtype = cfg.get("dtype", "float32")
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in _DTYPES:
        raise InputError(f"{CONFIG_FILE}: unknown dtype {dtype!r}; known: {', '.join(_DTYPES)}"[:200])


def parse_config(cfg: Any) -> dict:
    """The fields saekit reads, checked: num_features, hidden_dim, seed (or None), dtype, the magnitude specs,
    and whether a hierarchy and a correlation are configured."""
    cfg = _dict(cfg, "the config", _CONFIG_KEYS)
    for key in ("num_features", "hidden_dim", "firing_probability"):
        if key not in cfg:
            raise InputError(f"{CONFIG_FILE}: missing key {key!r}")
    G, d = _int(cfg["num_features"], "num_features", 1), _int(cfg["hidden_dim"], "hidden_dim", 1)
    check_sizes(G, d)
    _check_sections(cfg)
    seed = cfg.get("seed")
    if seed is not None:
        seed = _int(seed, "seed")
    h = cfg.get("hierarchy")
    return {
        "G": G, "d": d, "seed": seed, "dtype": _DTYPES[cfg.get("dtype", "float32").removeprefix("torch.")],
        "mean": cfg.get("mean_firing_magnitudes", 1.0), "std": cfg.get("std_firing_magnitudes", 0.0),
        "hierarchy": h is not None and h.get("total_root_nodes", 100) != 0, "correlation": cfg.get("correlation") is not None,
    }


def magnitude_values(spec: Any, G: int, seed: int | None, where: str) -> torch.Tensor:
    """(G,) float32 per-feature values of a magnitude spec, as SAELens's generate_magnitudes makes them."""
    if not isinstance(spec, dict):
        return torch.full((G,), _number(spec, where), dtype=torch.float32)
    name, f = _generator(spec, where, _MAGNITUDE)
    num = {k: (None if v is None and k in ("min_value", "max_value") else _number(v, f"{where}.{k}")) for k, v in f.items()}
    if name == "constant":
        return torch.full((G,), num.get("value", 1.0), dtype=torch.float32)
    if name in ("linear", "exponential"):
        if "start" not in num or "end" not in num or num["start"] <= 0 or num["end"] <= 0:
            raise InputError(f"{CONFIG_FILE}: {where} needs positive start and end")
        if G == 1:
            return torch.tensor([num["start"]], dtype=torch.float32)
        if name == "linear":
            return torch.linspace(num["start"], num["end"], G)
        return num["start"] * (num["end"] / num["start"]) ** torch.linspace(0, 1, G)
    return _folded_normal(num, G, seed, where)


def _folded_normal(num: dict, G: int, seed: int | None, where: str) -> torch.Tensor:
    mean, std = num.get("mean", 0.0), num.get("std", 0.1)
    low, high = num.get("min_value"), num.get("max_value")
    ordered = low is None or high is None or low <= high
    if std <= 0 or (low is not None and low < 0) or (high is not None and high <= 0) or not ordered:
        raise InputError(f"{CONFIG_FILE}: {where} needs std > 0 and 0 <= min_value <= max_value")
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    values = (mean + torch.randn(G, generator=generator) * std).abs()
    return values.clamp(min=low, max=high) if low is not None or high is not None else values


def read_weights(path: Path, G: int, d: int) -> dict[str, torch.Tensor]:
    """The tensors of `synthetic_model.safetensors`, shapes and dtypes checked before they are read."""
    from safetensors import safe_open

    if not path.is_file():
        raise InputError(f"synthetic model folder: missing {path.name} in {path.parent}")
    expected = {"feature_vectors": (G, d), "bias": (d,), "firing_probabilities": (G,), "correlation_diag": (G,)}
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            unknown, missing = sorted(names - _TENSORS), sorted({"feature_vectors", "bias", "firing_probabilities"} - names)
            if unknown or missing:
                raise InputError(f"{path}: {'unknown tensor ' + repr(unknown[0]) if unknown else 'missing tensor ' + repr(missing[0])}")
            if ("correlation_factor" in names) != ("correlation_diag" in names):
                raise InputError(f"{path}: correlation_factor and correlation_diag come together")
            for name in sorted(names):
                piece = f.get_slice(name)
                shape, dtype = tuple(piece.get_shape()), piece.get_dtype()
                want = expected.get(name, (G, shape[1] if len(shape) == 2 and 0 < shape[1] <= MAX_RANK else -1))
                if shape != want or dtype not in _FLOAT_DTYPES:
                    raise InputError(f"{path}: tensor {name!r} is {dtype} of shape {shape}, expected a float tensor of shape {want}")
            return {name: f.get_tensor(name) for name in names}
    except InputError:
        raise
    except Exception as err:  # a corrupt file: safetensors raises several kinds
        why = str(err).splitlines()[0] if str(err) else "corrupt"
        raise InputError(f"{path}: cannot read safetensors ({type(err).__name__}: {why})"[:300]) from None


class _Forest:
    """hierarchy.json walked without recursion into per-feature tables (see SynthModel)."""

    def __init__(self, G: int) -> None:
        self.G = G
        self.parent = torch.full((G,), -1, dtype=torch.long)
        self.rescale = torch.zeros(G, dtype=torch.bool)
        self.group = torch.full((G,), -1, dtype=torch.long)
        self.exclusive = torch.zeros(G, dtype=torch.bool)
        self.seen = torch.zeros(G, dtype=torch.bool)
        self.n_groups = 0

    def read(self, data: Any, path: Path) -> None:
        if not isinstance(data, dict) or set(data) != {"roots"} or not isinstance(data["roots"], list):
            raise InputError(f"{path}: expected an object with one key 'roots' holding a list of nodes")
        stack = [(node, -1, False, 0) for node in reversed(data["roots"])]
        budget = 4 * self.G + 1024  # nodes without a feature count too
        while stack:
            node, parent, scaled, depth = stack.pop()
            budget -= 1
            if budget < 0 or depth > MAX_DEPTH:
                raise InputError(f"{path}: hierarchy too large (more than 4*G nodes or deeper than {MAX_DEPTH})")
            feature, children, exclusive, scales = self._node(node, path)
            if feature is not None:
                if self.seen[feature]:
                    raise InputError(f"{path}: feature {feature} appears twice in the hierarchy (a cycle or two parents)")
                self.seen[feature] = True
                self.parent[feature] = parent
                self.rescale[feature] = scaled and parent >= 0
            if exclusive:
                self._group(children, feature)
            below = feature if feature is not None else parent
            stack.extend((child, below, scales, depth + 1) for child in reversed(children))

    def _node(self, node: Any, path: Path) -> tuple[int | None, list, bool, bool]:
        if not isinstance(node, dict) or set(node) - _NODE_KEYS:
            raise InputError(f"{path}: a hierarchy node must be an object with keys among {sorted(_NODE_KEYS)}")
        feature, children = node.get("feature_index"), node.get("children", [])
        exclusive, scales = node.get("mutually_exclusive_children", False), node.get("scale_children_by_parent", False)
        if feature is not None and (isinstance(feature, bool) or not isinstance(feature, int) or not 0 <= feature < self.G):
            raise InputError(f"{path}: feature_index {feature!r} is not an integer in [0, {self.G})"[:200])
        if not isinstance(children, list) or not isinstance(exclusive, bool) or not isinstance(scales, bool):
            raise InputError(f"{path}: a node's children must be a list and its flags true or false")
        if not isinstance(node.get("feature_id"), (str, type(None))):
            raise InputError(f"{path}: feature_id must be a string or null")
        if exclusive and len(children) < 2:
            raise InputError(f"{path}: a node with mutually exclusive children needs at least 2 children")
        return feature, children, exclusive, scales

    def _group(self, children: list, feature: int | None) -> None:
        members = [c.get("feature_index") for c in children if isinstance(c, dict) and c.get("feature_index") is not None]
        if len(members) < 2:
            return
        for m in members:
            if isinstance(m, int) and not isinstance(m, bool) and 0 <= m < self.G:
                self.group[m] = self.n_groups
        self.n_groups += 1
        if feature is not None:
            self.exclusive[feature] = True


def read_saelens_folder(path: str | Path, fallback_seed: int = 0) -> SynthModel:
    """The SynthModel a SAELens SyntheticModel.save folder holds. `fallback_seed` seeds folded-normal magnitudes
    when the config's seed is null (SAELens then draws them afresh at every load)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"synthetic model folder not found: {folder}")
    data = _read_json(folder / CONFIG_FILE, MAX_CONFIG_BYTES)
    try:
        cfg = parse_config(data)
    except InputError as err:
        raise InputError(f"{folder}: {err}") from None
    G, d, seed = cfg["G"], cfg["d"], cfg["seed"]
    tensors = read_weights(folder / WEIGHTS_FILE, G, d)
    if cfg["correlation"] and "correlation_factor" not in tensors:
        raise InputError(f"{folder / WEIGHTS_FILE}: the config has a correlation but the file holds no correlation_factor")
    forest = _Forest(G)
    if (folder / HIERARCHY_FILE).exists():
        forest.read(_read_json(folder / HIERARCHY_FILE, MAX_HIERARCHY_BYTES), folder / HIERARCHY_FILE)
    elif cfg["hierarchy"]:
        raise InputError(f"synthetic model folder: missing {HIERARCHY_FILE} in {folder} (the config has a hierarchy)")
    base = seed if seed is not None else fallback_seed
    # a negative std draws the same magnitudes as its absolute value
    std = magnitude_values(cfg["std"], G, base + 1, "std_firing_magnitudes").to(cfg["dtype"]).float().abs()
    mean = magnitude_values(cfg["mean"], G, base + 2, "mean_firing_magnitudes").to(cfg["dtype"]).float()
    factor = tensors.get("correlation_factor")
    diag = tensors.get("correlation_diag")
    try:
        return SynthModel(
            vectors=tensors["feature_vectors"].float(),
            bias=tensors["bias"].float(),
            sampling_probs=tensors["firing_probabilities"].double(),
            mean=mean, std=std, parent=forest.parent, rescale=forest.rescale, group=forest.group, exclusive=forest.exclusive,
            factor=None if factor is None else factor.float(), diag=None if diag is None else diag.float(),
        )
    except InputError as err:
        raise InputError(f"{folder}: {err}") from None
