"""A small index over an ONNX graph that the passes share: who produces and who consumes each value."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper


@dataclass
class PassResult:
    """What one pass changed: counts by kind (e.g. ``{"folded_into_matmul": 8}``) and warnings."""

    name: str
    changed: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def count(self, key: str, n: int = 1) -> None:
        self.changed[key] = self.changed.get(key, 0) + n

    @property
    def nodes_changed(self) -> int:
        return sum(self.changed.values())


class GraphIndex:
    """Producers, consumers, constants and (when inferable) ranks of a graph's values.

    Passes collect their edits and call :meth:`remove` / :meth:`rewire` /
    :meth:`set_constant`, then :meth:`commit` writes the node list back once.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for node in self.graph.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                self.consumers[inp].append(node)
        self.graph_outputs = {o.name for o in self.graph.output}
        self.removed: set[int] = set()
        self.shapes = self._infer_shapes()
        self.ranks = {name: len(dims) for name, dims in self.shapes.items()}
        self._fresh = 0

    def _infer_shapes(self) -> dict[str, list[int | None]]:
        """Static dims where known (None for symbolic ones)."""
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model, strict_mode=False)
        except Exception:  # shape inference is a help, never a requirement
            return {}
        values = [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
        return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
                for v in values if v.type.tensor_type.HasField("shape")}

    def constant(self, name: str) -> np.ndarray | None:
        """The value of an initializer or Constant node output; None when computed at run time."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        value = attribute(node, "value") if node is not None and node.op_type == "Constant" else None
        return None if value is None else numpy_helper.to_array(value)

    def set_constant(self, name: str, value: np.ndarray) -> None:
        """Overwrite an initializer in place (its consumers keep their input name)."""
        tensor = numpy_helper.from_array(value.astype(numpy_helper.to_array(self.initializers[name]).dtype), name)
        self.initializers[name].CopyFrom(tensor)

    def add_constant(self, value: np.ndarray, hint: str) -> str:
        name = self.fresh_name(hint)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.initializers[name] = self.graph.initializer[-1]
        return name

    def fresh_name(self, hint: str) -> str:
        taken = set(self.producer) | set(self.initializers) | {i.name for i in self.graph.input}
        while True:
            self._fresh += 1
            name = f"{hint}_{self._fresh}"
            if name not in taken:
                return name

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single live consumer of ``name``, if it has exactly one and is not a graph output."""
        users = [n for n in self.consumers.get(name, []) if id(n) not in self.removed]
        return users[0] if len(users) == 1 and name not in self.graph_outputs else None

    def is_private(self, name: str) -> bool:
        """An initializer used by one node only, so editing it changes nothing else."""
        return name in self.initializers and len(self.consumers.get(name, [])) == 1

    def remove(self, node: onnx.NodeProto) -> None:
        self.removed.add(id(node))

    def rewire(self, old: str, new: str) -> None:
        """Every consumer of ``old`` reads ``new`` instead (graph outputs are renamed at the producer)."""
        if old in self.graph_outputs:
            self.producer[new].output[list(self.producer[new].output).index(new)] = old
            for node in self.consumers.get(new, []):
                node.input[:] = [old if i == new else i for i in node.input]
            return
        for node in self.consumers.get(old, []):
            node.input[:] = [new if i == old else i for i in node.input]
        self.consumers[new].extend(self.consumers.pop(old, []))

    def insert_after(self, anchor: onnx.NodeProto, node: onnx.NodeProto) -> None:
        """Add ``node`` right after ``anchor`` in topological order (applied on commit)."""
        self._inserts.setdefault(id(anchor), []).append(node)
        for out in node.output:
            self.producer[out] = node
        for inp in node.input:
            self.consumers[inp].append(node)

    @property
    def _inserts(self) -> dict[int, list[onnx.NodeProto]]:
        if not hasattr(self, "_pending_inserts"):
            self._pending_inserts: dict[int, list[onnx.NodeProto]] = {}
        return self._pending_inserts

    def commit(self) -> None:
        nodes: list[onnx.NodeProto] = []
        for node in self.graph.node:  # copies: the originals die with ClearField
            if id(node) not in self.removed:
                nodes.append(_copy(node))
            nodes.extend(_copy(n) for n in self._inserts.get(id(node), []) if id(n) not in self.removed)
        self.graph.ClearField("node")
        self.graph.node.extend(nodes)


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of ``node``'s attribute ``name`` (a number, a list for ints/floats, a ``TensorProto``), else
    ``default``: the one way the passes read attributes."""
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


@dataclass(frozen=True)
class Step:
    """One step of a path pattern: a node of one of ``ops`` that the path enters through input ``input``
    (``None``: whichever input continues the path), optionally repeated (zero or more times) and only where
    ``when`` holds. Every value along a matched path has that one consumer, so the matched nodes can change —
    except where ``shared``: the value entering this node may feed other nodes of the same pattern (a
    LayerNorm's centred input feeds both its square and its division), which the pass checks itself."""

    ops: tuple[str, ...]
    input: int | None = 0
    repeat: bool = False
    when: Callable[[GraphIndex, onnx.NodeProto], bool] | None = None
    shared: bool = False

    def accepts(self, index: GraphIndex, node: onnx.NodeProto | None) -> bool:
        return node is not None and node.op_type in self.ops and (self.when is None or self.when(index, node))


def match_parent_path(index: GraphIndex, value: str, steps: Sequence[Step]) -> list[onnx.NodeProto] | None:
    """The nodes upstream of ``value`` that follow ``steps`` (nearest first), or None — as ONNX Runtime's
    ``match_parent_path``, with repeatable steps for pass-through ops."""
    matched: list[onnx.NodeProto] = []
    for number, step in enumerate(steps):
        while True:
            node = index.producer.get(value)
            if not step.accepts(index, node) or (not step.shared and index.only_consumer(value) is None):
                if step.repeat:
                    break
                return None
            assert node is not None
            matched.append(node)
            value = _continuing_input(index, node, step, steps[number + 1:])
            if not step.repeat:
                break
    return matched


def _continuing_input(index: GraphIndex, node: onnx.NodeProto, step: Step, rest: Sequence[Step]) -> str:
    if step.input is not None:
        return node.input[step.input]
    following = next((s for s in rest if not s.repeat), None)  # the input produced by the next required step
    return next((i for i in node.input if following is not None and following.accepts(index, index.producer.get(i))),
                node.input[0])


def match_child_path(index: GraphIndex, value: str, steps: Sequence[Step]) -> list[onnx.NodeProto] | None:
    """The nodes downstream of ``value`` that follow ``steps``: each the only consumer of the value before it,
    reading it at input ``step.input``."""
    matched: list[onnx.NodeProto] = []
    for step in steps:
        while True:
            node = index.only_consumer(value)
            entered = node is not None and (step.input is None or node.input[step.input] == value)
            if not (entered and step.accepts(index, node)):
                if step.repeat:
                    break
                return None
            assert node is not None
            matched.append(node)
            value = node.output[0]
            if not step.repeat:
                break
    return matched


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    out = onnx.NodeProto()
    out.CopyFrom(node)
    return out


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
