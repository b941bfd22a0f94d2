"""Logical-axis sharding: rules as data, device meshes, and directly-sharded model creation.

Every ``nnx.Param`` of a mojax model names its dimensions with logical axes (``PARAM_AXIS_NAMES``)
through ``nnx.with_partitioning``; activations name theirs with ``ACTIVATION_AXIS_NAMES`` ("batch",
"cache_length"). A *rule set* maps each logical axis to a tuple of mesh axes (``MESH_AXES``); the
empty tuple means "replicated along this dimension". Presets live in ``RULES``; a custom rule set
is any mapping, e.g. ``{**RULES["fsdp_tp"], "kv_heads": ()}``.

This module owns the whole vocabulary (logical names, mesh axis names and the map between them);
the model code only ever names logical axes, and constrains its activations with :func:`constrain`,
which resolves them under the rules set by :func:`activation_rules` (by default the batch split
``"batch" -> ("data", "fsdp")`` shared by every preset) on the mesh set by ``jax.set_mesh``.

Divisibility is never fixed up silently: if the mesh axes assigned to a dimension do not divide
its size, ``state_shardings`` raises a ``ValueError`` naming the variable, the dimension and the
mesh axes, and the caller overrides that logical axis in the rules (usually with ``()``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
"""Mesh axis names: data parallel, fully sharded data parallel, tensor parallel."""

PARAM_AXIS_NAMES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm")
"""The logical axis names used on Params."""

ACTIVATION_AXIS_NAMES = ("batch", "cache_length")
"""The logical axis names used only on activations (and the KV cache)."""

AXIS_NAMES = PARAM_AXIS_NAMES + ACTIVATION_AXIS_NAMES

Rules = Mapping[str, tuple[str, ...]]


def _preset(**sharded: tuple[str, ...]) -> Rules:
    """A read-only rule set: the batch over (data, fsdp), the given axes sharded, every other one replicated."""
    sharded = {"batch": ("data", "fsdp"), **sharded}
    return MappingProxyType({name: tuple(sharded.get(name, ())) for name in AXIS_NAMES})


RULES: Mapping[str, Rules] = MappingProxyType(
    {
        "dp": _preset(),
        "fsdp": _preset(embed=("fsdp",)),
        "fsdp_tp": _preset(
            embed=("fsdp",), vocab=("tensor",), heads=("tensor",), kv_heads=("tensor",), mlp=("tensor",)
        ),
    }
)


def resolve_rules(rules: str | Rules) -> Rules:
    """A validated rule set from a preset name or a mapping {logical axis: tuple of mesh axes}."""
    if isinstance(rules, str):
        if rules not in RULES:
            raise ValueError(f"unknown sharding preset {rules!r}; expected one of {sorted(RULES)}")
        return RULES[rules]
    if not isinstance(rules, Mapping):
        raise ValueError(f"rules must be a preset name or a mapping, got {type(rules).__name__}")
    resolved = {}
    for logical, mesh_axes in rules.items():
        if logical not in AXIS_NAMES:
            raise ValueError(f"unknown logical axis {logical!r} in rules; expected one of {AXIS_NAMES}")
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        unknown = [a for a in mesh_axes if a not in MESH_AXES]
        if unknown:
            raise ValueError(f"rule {logical!r} -> {mesh_axes} uses unknown mesh axes {unknown}; expected {MESH_AXES}")
        resolved[logical] = mesh_axes
    return MappingProxyType(resolved)


def make_mesh(data: int = 1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over ``devices`` (default: all devices)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor}
    bad = {name: size for name, size in sizes.items() if not isinstance(size, int) or size < 1}
    if bad:
        raise ValueError(f"mesh axis sizes must be positive integers, got {bad}")
    if math.prod(sizes.values()) != len(devices):
        raise ValueError(
            f"mesh data*fsdp*tensor = {data}*{fsdp}*{tensor} = {math.prod(sizes.values())} "
            f"must equal the number of devices, {len(devices)}"
        )
    return jax.make_mesh((data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(names: Sequence[str | None] | None, rules: str | Rules) -> PartitionSpec:
    """The PartitionSpec for a tuple of logical axis names (None entries stay replicated)."""
    rules = resolve_rules(rules)
    if not names:
        return PartitionSpec()
    used: dict[str, str | None] = {}
    entries = []
    for logical in names:
        if logical is None:
            entries.append(None)
            continue
        if logical not in rules:
            raise ValueError(f"logical axis {logical!r} has no rule; rules cover {sorted(rules)}")
        mesh_axes = rules[logical]
        for axis in mesh_axes:
            if axis in used:
                raise ValueError(
                    f"mesh axis {axis!r} is assigned to both {used[axis]!r} and {logical!r} in {tuple(names)}; "
                    "a mesh axis may shard at most one dimension"
                )
            used[axis] = logical
        entries.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*entries)


def _spec_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry, as a tuple."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _check_divisible(
    where: str, names: Sequence[str | None], shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh
) -> None:
    """Raise unless every sharded dimension of ``shape`` is divisible by its mesh axes' total size."""
    for dim, (logical, size, entry) in enumerate(zip(names, shape, spec, strict=False)):
        axes = _spec_axes(entry)
        shards = math.prod(mesh.shape[a] for a in axes)
        if size % shards:
            raise ValueError(
                f"{where}: dimension {dim} ({logical!r}) of size {size} cannot be split over mesh axes {axes} "
                f"({shards} shards); expected a multiple of {shards}, or a rule mapping {logical!r} to ()"
            )


def _variable_sharding(path: tuple, variable: nnx.Variable, mesh: Mesh, rules: Rules) -> nnx.Variable:
    """The Variable with its value replaced by its NamedSharding under ``rules``."""
    where = jax.tree_util.keystr(path)
    value = variable.get_value()
    names = variable.get_metadata().get("out_sharding")
    shape = tuple(getattr(value, "shape", ()))
    if names and len(names) != len(shape):
        raise ValueError(f"{where}: {len(names)} logical axis names {tuple(names)} for a value of shape {shape}")
    try:
        spec = logical_to_spec(names, rules)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    _check_divisible(where, names or (), shape, spec, mesh)
    return variable.replace(NamedSharding(mesh, spec))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: str | Rules) -> Any:
    """The NamedSharding tree (same structure as ``abstract_state``) from each Variable's logical names."""
    rules = resolve_rules(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: (
            _variable_sharding(path, leaf, mesh, rules)
            if isinstance(leaf, nnx.Variable)
            else NamedSharding(mesh, PartitionSpec())
        ),
        abstract_state,
        is_leaf=lambda leaf: isinstance(leaf, nnx.Variable),
    )


def abstract_sharded(factory: Callable[[], Any], mesh: Mesh, rules: str | Rules) -> tuple[nnx.GraphDef, Any]:
    """(graphdef, state of ShapeDtypeStructs carrying their target NamedSharding), without allocating."""
    with nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(factory))
    shardings = state_shardings(abstract_state, mesh, rules)
    return graphdef, jax.tree.map(
        lambda value, sharding: jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding),
        abstract_state,
        shardings,
    )


def sharded_init(factory: Callable[[], Any], mesh: Mesh, rules: str | Rules) -> tuple[nnx.GraphDef, Callable[[], Any]]:
    """(graphdef, jitted init returning the state of ``factory()`` with each device computing only its shards)."""
    graphdef, abstract_state = abstract_sharded(factory, mesh, rules)

    def init_state():
        with nnx.use_eager_sharding(False):
            return nnx.state(factory())

    shardings = jax.tree.map(lambda value: value.sharding, abstract_state)
    return graphdef, jax.jit(init_state, out_shardings=shardings)


def create_sharded(factory: Callable[[], Any], mesh: Mesh, rules: str | Rules) -> Any:
    """Build ``factory()`` (an NNX object) with every array created directly in its sharded layout."""
    graphdef, init = sharded_init(factory, mesh, rules)
    return nnx.merge(graphdef, init())


def batch_sharding(mesh: Mesh, rules: str | Rules = "dp") -> NamedSharding:
    """Sharding for [B, ...] inputs: the batch split by the "batch" rule (every preset: over data and fsdp)."""
    return NamedSharding(mesh, logical_to_spec(("batch",), rules))


_ACTIVATION_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("activation_rules", default=RULES["dp"])


@contextlib.contextmanager
def activation_rules(rules: str | Rules) -> Iterator[Rules]:
    """Within the block, :func:`constrain` resolves activation axes with ``rules`` (default: any preset's)."""
    token = _ACTIVATION_RULES.set(resolve_rules(rules))
    try:
        yield _ACTIVATION_RULES.get()
    finally:
        _ACTIVATION_RULES.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """``x`` constrained to the layout of its logical axis ``names`` on the mesh set by ``jax.set_mesh``.

    Only the Auto axes of that mesh are used (Explicit axes carry their sharding in the type, so a
    hint is neither needed nor allowed), and a dimension that its mesh axes do not divide is left
    unconstrained. No-op without a mesh. The model calls it on the residual stream with
    ``("batch", None, None)``: without it XLA propagates the FSDP weight layout (split along embed)
    into the activations and every device computes the whole global batch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True) if kind == AxisType.Auto}
    entries = []
    for size, entry in zip(x.shape, logical_to_spec(names, _ACTIVATION_RULES.get()), strict=False):
        axes = tuple(axis for axis in _spec_axes(entry) if axis in auto)
        shards = math.prod(mesh.shape[axis] for axis in axes)
        entries.append(axes if shards > 1 and size % shards == 0 else None)
    if all(entry is None for entry in entries):
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*entries))
