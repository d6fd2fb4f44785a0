"""Finding attention in any ONNX graph, and rewriting it into the form each backend runs fast.

Attention is 70-90% of a cross-attention model's work. :func:`find_attention` locates every block
``softmax(scale * Q K^T [+ mask]) V`` whatever style the exporter left it in:

* explicit ``MatMul`` with the scale as ``Mul``/``Div`` on the scores (this toolkit's models,
  segment-anything), or on Q and/or K before the matmul (``F.scaled_dot_product_attention`` exports
  ``sqrt(scale)`` on both);
* K given transposed by a ``Transpose`` or already laid out ``(..., d, Nk)`` by a reshape;
* single-head 3-D ``(B, N, d)`` or multi-head 4-D ``(B, H, N, d)`` tensors;
* ``Einsum`` (kornia's LoFTR, ``einops`` users): :func:`normalise_attention` first writes each two-operand
  product with one contracted and one free index per side as ``Transpose -> MatMul -> Transpose`` (the same
  sums), and removes a ``Transpose`` pair around a Softmax over a non-last axis (LoFTR's ``nlsh``) by moving the
  softmax axis instead; blocks are then found in that form. An einsum it cannot write that way is named, not
  rewritten.

Each :class:`AttentionBlock` says, per target, whether it is in a fusible form and why not.

Rewrites (each returns a new model; callers verify numerically and save through ``save_onnx``):

* :func:`move_scale_to_query`: the 1/sqrt(d) on the scores moved onto Q before the first matmul, the
  form TensorRT's fused multi-head-attention kernel is documented to match;
* :func:`fuse_for_onnxruntime`: each block replaced by ``com.microsoft.MultiHeadAttention`` with 3-D
  ``(B, S, H*d)`` Q/K/V, ``num_heads`` and ``scale``: ONNX Runtime's CPU kernel then takes its tiled
  (flash) path and never materialises the ``N1 x N2`` scores;
* :func:`chunk_queries` and :func:`heads_from_channels_last`: OpenVINO's form, the queries in slices (flat
  memory on its plain matmuls) and the heads taken from the convolutions' channels-last view.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from xattn.nodes import attribute as _attr

#: Ops between the score matmul and the Softmax that keep a block recognisable.
_SCALE_OPS = ("Mul", "Div")
_PASS_THROUGH = ("Cast", "Identity")
#: TensorRT's fused MHA kernel: head sizes it takes (TensorRT developer guide, "Multi-Head Attention Fusion").
TRT_HEAD_DIM_RANGE = (16, 256)
#: Why a masked block stays plain for ONNX Runtime. Measured by ``benchmarks/user_models.py --masks`` (ORT 1.32,
#: 2 threads, 4 runs): CPU MultiHeadAttention with an ``attention_bias`` (which must be expanded to B x 1 x N1 x N2)
#: gave bit-identical outputs to the plain MatMul/Add/Softmax graph (its untiled path) in 0.93-1.11x the time at
#: 4096 x 4096 tokens and 0.66-1.55x at 1024: no faster, holding the same N1 x N2 buffer. No gain to rewrite for.
MASK_KEPT_PLAIN = ("an additive mask on the scores: kept plain (ONNX Runtime's masked MultiHeadAttention measured "
                   "within noise of the plain graph on the CPU, same memory; benchmarks/user_models.py --masks)")


@dataclass
class AttentionBlock:
    """One attention block found in a graph. Tensor names refer to the graph it was found in.

    Attributes:
        softmax: the Softmax node's name.
        score_node / output_node: names of the node computing the scores and the one applying them to V.
        style: ``"matmul"`` or ``"einsum"``.
        query, key_t, value: tensors feeding the score and output nodes (``key_t`` is K laid out
            ``(..., d, Nk)``; ``key`` is K ``(..., Nk, d)`` when a Transpose made ``key_t`` from it).
        scale: the product of every constant factor applied to the scores (1.0 when none).
        scale_position: ``"scores"``, ``"query"``, ``"key"``, ``"query+key"`` or ``"none"``.
        scale_nodes: the Mul/Div nodes carrying the scale.
        mask: a tensor added to the scores (then the block is not rewritten).
        rank: 3 (``B, N, d``) or 4 (``B, H, N, d``); 0 when unknown.
        heads, head_dim: from the inferred shapes when static, else ``None``.
        output: the tensor the block produces (the output node's output).
        issues: why the block is not in the canonical form (empty when it is).
    """

    softmax: str
    score_node: str
    output_node: str
    style: str
    query: str
    key_t: str
    value: str
    output: str
    key: str | None = None
    key_transpose: str | None = None
    scale: float = 1.0
    scale_position: str = "none"
    scale_nodes: list[str] = field(default_factory=list)
    query_scale_nodes: list[str] = field(default_factory=list)
    key_scale_nodes: list[str] = field(default_factory=list)
    score_scale_nodes: list[str] = field(default_factory=list)
    #: the factor applied to the scores after the first matmul alone (part of ``scale``)
    score_scale: float = 1.0
    mask: str | None = None
    rank: int = 0
    heads: int | None = None
    head_dim: int | None = None
    issues: list[str] = field(default_factory=list)
    #: Precision the score matmul runs in, from the graph's types: ``fp32``, ``fp16``, ``bf16``, ``int8``.
    precision: str = "fp32"
    #: heads of K and V (4-D blocks; None when not static): fewer than ``heads`` is multi-query/grouped
    kv_heads: int | None = None
    #: the mask is added before a scale (``(QK^T + M) * s``): moving the scale onto Q would scale M no more
    mask_scaled: bool = False
    #: how the model wrote the block before :func:`normalise_attention` (``"einsum"``), or ``None``
    written_as: str | None = None

    def fusible(self, target: str) -> tuple[bool, str]:
        """Whether ``target`` (``tensorrt``/``onnxruntime``) can run this block fused, and why not."""
        precision = self.precision
        if self.issues:
            return False, "; ".join(self.issues)
        if target == "onnxruntime":
            if self.heads is None or self.head_dim is None:
                return False, "heads/head size are not static"
            if self.mask is not None:
                return False, MASK_KEPT_PLAIN
            if self.rank == 4 and self.kv_heads != self.heads and self.kv_heads != 1:
                return False, (f"K/V have {self.kv_heads if self.kv_heads is not None else 'unknown'} head(s) "
                               f"against {self.heads} query heads: not rewritten")
            if self.rank == 4 and self.kv_heads == 1 and self.heads != 1:
                return True, (f"multi-query (one K/V head broadcast to {self.heads}): K/V expanded to "
                              f"{self.heads} heads, then rewritten to com.microsoft.MultiHeadAttention")
            return True, "rewritable to com.microsoft.MultiHeadAttention"
        if target == "tensorrt":
            if precision == "int8":
                # INT8 fused MHA (developer guide, quoted in NVIDIA/TensorRT#2981, #4167): head 16/32/64, sequence
                # <= 512, and Q/DQ before the first MatMul, after Softmax and after the second; a Q/DQ after the
                # Softmax would hide the block from this finder, so a block found here has none there
                return False, ("INT8 attention: TensorRT's INT8 fused MHA needs Q/DQ after Softmax and after the "
                               "second MatMul (and head size 16/32/64, sequence <= 512); this graph has none there")
            reasons = []
            if self.mask is not None:
                reasons.append("an additive mask on the scores (TensorRT's documented fused pattern has none)")
            low, high = TRT_HEAD_DIM_RANGE
            if self.head_dim is not None and not (low <= self.head_dim <= high and self.head_dim % 8 == 0):
                reasons.append(f"head size {self.head_dim} is outside TensorRT's fused range ({low}..{high}, multiple of 8)")
            if precision not in ("fp16", "bf16"):
                reasons.append(f"attention runs in {precision}; TensorRT fuses it only in FP16/BF16")
            if self.scale_position == "scores":
                reasons.append("the scale sits on the scores after the first matmul; TensorRT's current Fused Attention "
                               "docs ask for it on Q or K (convert --fp16 moves it there)")
            if reasons:
                return False, "; ".join(reasons)
            return True, "MatMul -> Softmax -> MatMul in FP16 with the scale on Q/K"
        raise ValueError(f"unknown target {target!r}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Graph:
    """Producer/consumer lookups and constant values of a graph."""

    def __init__(self, model):
        from onnx import numpy_helper

        self.model = model
        self.graph = model.graph
        self.producer = {out: node for node in self.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in self.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.constants = {init.name: numpy_helper.to_array(init) for init in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
                self.constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        self.shapes, self.types = _inferred_shapes(model, with_types=True)

    def scalar(self, name: str) -> float | None:
        value = self.constants.get(name)
        if value is None or value.size != 1 or not np.issubdtype(value.dtype, np.floating):
            return None
        return float(value.reshape(()))

    def skip_back(self, name: str) -> str:
        node = self.producer.get(name)
        while node is not None and node.op_type in _PASS_THROUGH:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def single_consumer(self, name: str):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 else None


def _inferred_shapes(model, with_types: bool = False):
    """name -> list of dims (int, or a str for symbolic/unknown), for every tensor shape inference reaches
    (and name -> element type, with ``with_types``)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # a graph inference cannot follow: shapes stay unknown, blocks are still found
        inferred = model
    shapes, types = {}, {}
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tensor = info.type.tensor_type
        types[info.name] = tensor.elem_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                 for d in tensor.shape.dim]
    for init in model.graph.initializer:
        types[init.name] = init.data_type
    return (shapes, types) if with_types else shapes


#: ONNX element type -> the precision name used in reports.
_PRECISION_OF_TYPE = {1: "fp32", 10: "fp16", 16: "bf16", 3: "int8", 2: "int8", 11: "fp64"}


def _precision_of(g: "_Graph", tensor: str) -> str:
    """Precision a matmul input is computed in: its element type, or int8 when it comes out of a DequantizeLinear."""
    source = g.producer.get(g.skip_back(tensor))
    while source is not None and source.op_type in ("Reshape", "Transpose", "Mul", "Div"):
        source = g.producer.get(source.input[0])
    if source is not None and source.op_type == "DequantizeLinear":
        return "int8"
    return _PRECISION_OF_TYPE.get(g.types.get(tensor, 1), "fp32")


def _scale_chain(g: _Graph, name: str) -> tuple[str, float, list[str]]:
    """Walk back from ``name`` through Mul/Div by a scalar constant; return the source, the factor, the nodes."""
    factor, nodes = 1.0, []
    while True:
        name = g.skip_back(name)
        node = g.producer.get(name)
        if node is None or node.op_type not in _SCALE_OPS:
            return name, factor, nodes
        a, b = node.input[0], node.input[1]
        if g.scalar(b) is not None:
            value, source = g.scalar(b), a
            factor *= value if node.op_type == "Mul" else 1.0 / value
        elif node.op_type == "Mul" and g.scalar(a) is not None:
            factor *= g.scalar(a)
            source = b
        else:
            return name, factor, nodes
        nodes.append(node.name)
        name = source


def past_nan_guard(consumers: Mapping[str, list], probs: str) -> str:
    """SDPA with a boolean mask exports ``Where(IsNaN(p), 0, p)`` after the Softmax (a fully masked row gives
    NaN): the weights the output matmul reads are that Where's output (``probs`` itself when there is no guard).
    ``consumers``: tensor name -> the nodes reading it."""
    users = consumers.get(probs, [])
    if len(users) != 2 or sorted(u.op_type for u in users) != ["IsNaN", "Where"]:
        return probs
    isnan = next(u for u in users if u.op_type == "IsNaN")
    where = next(u for u in users if u.op_type == "Where")
    if where.input[0] == isnan.output[0] and where.input[2] == probs:
        return where.output[0]
    return probs


def find_attention(model) -> list[AttentionBlock]:
    """Every attention block in ``model`` (see the module docstring), in graph order.

    Blocks are found in :func:`normalise_attention`'s form of the graph: Softmax names and the block's output
    tensor are the model's own; Q/K/V names of a block written as einsum refer to the normalised graph (the
    rewrites normalise their copy first, so they match)."""
    normal, from_einsum = normalise_attention(model)
    g = _Graph(normal)
    blocks = []
    for softmax in g.graph.node:
        if softmax.op_type != "Softmax":
            continue
        block = _block_at(g, softmax)
        if block is not None:
            if block.score_node in from_einsum:
                block.written_as = "einsum"
            blocks.append(block)
    return blocks


# -- normalising einsum attention --------------------------------------------------------------------

def _einsum_as_matmul(equation: str) -> tuple[list[int], list[int], list[int]] | None:
    """For a two-operand einsum that is a batched matrix product (every index kept or contracted on both
    sides, one contracted index, one free index per operand, no ellipsis or repeated index): the permutations
    that lay A out ``(batch..., i, k)`` and B ``(batch..., k, j)``, and the one that takes the MatMul's
    ``(batch..., i, j)`` to the einsum's output. ``None`` for anything else."""
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    inputs, out = eq.split("->")
    operands = inputs.split(",")
    if len(operands) != 2:
        return None
    a, b = operands
    if any(len(set(term)) != len(term) for term in (a, b, out)) or set(out) - set(a) - set(b):
        return None
    batch = [c for c in out if c in a and c in b]
    contracted = [c for c in a if c in b and c not in out]
    left, right = [c for c in a if c not in b], [c for c in b if c not in a]
    if set(left) - set(out) or set(right) - set(out) or (len(contracted), len(left), len(right)) != (1, 1, 1):
        return None
    (k,), (i,), (j,) = contracted, left, right
    product = batch + [i, j]
    return ([a.index(c) for c in batch + [i, k]], [b.index(c) for c in batch + [k, j]],
            [product.index(c) for c in out])


def normalise_attention(model) -> tuple[Any, set[str]]:
    """A copy of ``model`` with einsum attention written as MatMul, and Softmax over a non-last axis between
    two inverse Transposes turned into a Softmax over the last axis of the untransposed scores. Both are the
    same arithmetic (only the summation order of an einsum may differ). Returns the copy and the names of
    the MatMul nodes that were einsums (they keep the einsum's node name)."""
    from onnx import helper

    out = _copy(model)
    graph = out.graph
    converted: set[str] = set()
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # the einsums next to a Softmax: the one that makes its scores (back through scale, cast and mask ops) and
    # the one that reads its probabilities
    between = _SCALE_OPS + _PASS_THROUGH + ("Add",)
    einsums = set()
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        node = producer.get(softmax.input[0])
        while node is not None and node.op_type in between:
            node = next((producer[i] for i in node.input if i in producer
                         and producer[i].op_type in between + ("Einsum",)), None)
        if node is not None and node.op_type == "Einsum":
            einsums.add(node.name)
        users = consumers.get(softmax.output[0], [])
        while len(users) == 1 and users[0].op_type in _PASS_THROUGH:
            users = consumers.get(users[0].output[0], [])
        einsums.update(u.name for u in users if u.op_type == "Einsum")
    for node in [n for n in graph.node if n.op_type == "Einsum" and n.name in einsums and len(n.input) == 2]:
        perms = _einsum_as_matmul(_attr(node, "equation", b"").decode())
        if perms is None:
            continue
        perm_a, perm_b, perm_out = perms
        new_nodes, inputs = [], []
        for name, perm, side in ((node.input[0], perm_a, "a"), (node.input[1], perm_b, "b")):
            if perm != sorted(perm):
                laid = _unique(graph, f"{node.name}_{side}")
                new_nodes.append(helper.make_node("Transpose", [name], [laid], name=laid, perm=perm))
                graph.node.append(new_nodes[-1])   # reserve the name
                name = laid
            inputs.append(name)
        if perm_out != sorted(perm_out):
            product = _unique(graph, f"{node.name}_product")
            new_nodes.append(helper.make_node("MatMul", inputs, [product], name=node.name))
            new_nodes.append(helper.make_node("Transpose", [product], [node.output[0]],
                                              name=_unique(graph, f"{node.name}_out"), perm=perm_out))
        else:
            new_nodes.append(helper.make_node("MatMul", inputs, [node.output[0]], name=node.name))
        _replace_node(graph, node, new_nodes)
        converted.add(node.name)
    _sink_softmax_transposes(out)
    return out, converted


def _sink_softmax_transposes(model) -> None:
    """``Transpose(p) -> [Mul/Div by a scalar] -> Softmax(axis a) -> Transpose(q)`` with ``q`` undoing ``p``
    is ``[Mul/Div] -> Softmax(axis p[a])`` on the untransposed tensor (a scalar factor commutes with any
    layout). Done in place where each tensor on the way has one reader."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    constants = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}

    def is_scalar_const(name):
        init = next((i for i in graph.initializer if i.name == name), None)
        if init is not None:
            return int(np.prod(init.dims, dtype=np.int64)) == 1
        node = producer.get(name)
        return node is not None and node.op_type == "Constant" and int(np.prod(_attr(node, "value").dims, dtype=np.int64)) == 1

    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        reader, name = softmax, softmax.input[0]
        node = producer.get(name)
        while (node is not None and node.op_type in _SCALE_OPS and len(consumers.get(name, [])) == 1
               and node.input[1] in constants and is_scalar_const(node.input[1])):
            reader, name = node, node.input[0]
            node = producer.get(name)
        if node is None or node.op_type != "Transpose" or len(consumers.get(name, [])) != 1:
            continue
        users = consumers.get(softmax.output[0], [])
        if len(users) != 1 or users[0].op_type != "Transpose":
            continue
        p, q = list(_attr(node, "perm", [])), list(_attr(users[0], "perm", []))
        if not p or len(p) != len(q) or any(p[q[j]] != j for j in range(len(p))):
            continue
        back = users[0]
        if back.output[0] in {o.name for o in graph.output}:   # a graph output keeps its name and layout
            continue
        axis = _attr(softmax, "axis", -1) % len(p)
        reader.input[list(reader.input).index(name)] = node.input[0]
        for attribute in softmax.attribute:
            if attribute.name == "axis":
                attribute.i = p[axis]
        if not any(a.name == "axis" for a in softmax.attribute):
            from onnx import helper

            softmax.attribute.append(helper.make_attribute("axis", p[axis]))
        for other in consumers.get(back.output[0], []):
            for i, input_name in enumerate(other.input):
                if input_name == back.output[0]:
                    other.input[i] = softmax.output[0]
        graph.node.remove(node)
        graph.node.remove(back)


def _block_at(g: _Graph, softmax) -> AttentionBlock | None:
    issues = []
    # Scores side: Softmax <- [Add mask] <- [Mul/Div scale] <- MatMul/Einsum
    scores, score_factor, score_scale_nodes = _scale_chain(g, softmax.input[0])
    mask, mask_scaled = None, False
    node = g.producer.get(scores)
    if node is not None and node.op_type == "Add":
        # the scores side is the input whose scale chain starts at a MatMul/Einsum; the other is the mask
        # (which may itself be scaled: SDPA's float bias, -0.1 * |x| in the corpus)
        def from_product(name):
            source = g.producer.get(_scale_chain(g, name)[0])
            return source is not None and source.op_type in ("MatMul", "Einsum")

        score_inputs = [i for i in node.input if from_product(i)]
        if len(score_inputs) == 1 and len(node.input) == 2:
            other = score_inputs[0]
            mask, mask_scaled = (node.input[1] if node.input[0] == other else node.input[0]), bool(score_scale_nodes)
            scores, more, nodes = _scale_chain(g, other)
            score_factor *= more
            score_scale_nodes += nodes
            node = g.producer.get(scores)
    if node is None or node.op_type not in ("MatMul", "Einsum"):
        return None
    score_node = node
    # Output side: Softmax -> [Cast] -> MatMul/Einsum
    probs = past_nan_guard(g.consumers, softmax.output[0])
    user = g.single_consumer(probs)
    while user is not None and user.op_type in _PASS_THROUGH:
        probs = user.output[0]
        user = g.single_consumer(probs)
    if user is None or user.op_type != score_node.op_type:
        return None
    output_node = user
    rank = len(g.shapes.get(softmax.output[0], [])) or 0
    axis = next((a.i for a in softmax.attribute if a.name == "axis"), -1)
    if rank and axis not in (-1, rank - 1):
        issues.append(f"softmax over axis {axis}, not the last")
    if score_node.op_type == "Einsum":
        equation = next((a.s.decode() for a in score_node.attribute if a.name == "equation"), "?")
        issues.append(f"Einsum {equation!r} is not one contracted and one free index per side: "
                      "not written as MatMul, not rewritten")
        return AttentionBlock(softmax.name, score_node.name, output_node.name, "einsum",
                              query=score_node.input[0], key_t=score_node.input[1],
                              value=output_node.input[1], output=output_node.output[0],
                              scale=score_factor, score_scale=score_factor,
                              scale_position="scores" if score_scale_nodes else "none",
                              scale_nodes=score_scale_nodes, score_scale_nodes=score_scale_nodes,
                              mask=mask, rank=rank, issues=issues)
    if output_node.input[0] != probs:
        # bmm(value, attention): the seed snippet's transposed product, not softmax(QK^T) V
        issues.append("the weights are applied as V @ P (a transposed product), not P @ V")
        value = output_node.input[0]
    else:
        value = output_node.input[1]
    query, q_factor, q_nodes = _scale_chain(g, score_node.input[0])
    key_t, k_factor, k_nodes = _scale_chain(g, score_node.input[1])
    key = key_transpose = None
    transpose = g.producer.get(key_t)
    if transpose is not None and transpose.op_type == "Transpose":
        perm = list(next((a.ints for a in transpose.attribute if a.name == "perm"), []))
        if len(perm) >= 2 and perm[-2:] == [len(perm) - 1, len(perm) - 2] and perm[:-2] == list(range(len(perm) - 2)):
            key, key_transpose = transpose.input[0], transpose.name
    positions = [name for name, nodes in (("query", q_nodes), ("key", k_nodes), ("scores", score_scale_nodes)) if nodes]
    position = "+".join(positions) if positions else "none"
    q_shape = g.shapes.get(query) or g.shapes.get(score_node.input[0]) or []
    heads = head_dim = None
    if len(q_shape) == 4:
        heads = q_shape[1] if isinstance(q_shape[1], int) else None
        head_dim = q_shape[3] if isinstance(q_shape[3], int) else None
    elif len(q_shape) == 3:
        heads = 1
        head_dim = q_shape[2] if isinstance(q_shape[2], int) else None
    elif q_shape:
        issues.append(f"rank-{len(q_shape)} Q; expected 3 (B, N, d) or 4 (B, H, N, d)")
    kv_heads = None
    if len(q_shape) == 4:
        k_shape = g.shapes.get(key_t) or g.shapes.get(score_node.input[1]) or []
        v_shape = g.shapes.get(value) or []
        k_heads = k_shape[1] if len(k_shape) == 4 and isinstance(k_shape[1], int) else None
        v_heads = v_shape[1] if len(v_shape) == 4 and isinstance(v_shape[1], int) else None
        kv_heads = k_heads if k_heads == v_heads else None
    return AttentionBlock(
        softmax.name, score_node.name, output_node.name, "matmul", query=query, key_t=key_t, value=value,
        output=output_node.output[0], key=key, key_transpose=key_transpose,
        scale=score_factor * q_factor * k_factor, score_scale=score_factor, scale_position=position,
        scale_nodes=q_nodes + k_nodes + score_scale_nodes, query_scale_nodes=q_nodes, key_scale_nodes=k_nodes,
        score_scale_nodes=score_scale_nodes, mask=mask, rank=len(q_shape), heads=heads, head_dim=head_dim,
        issues=issues, precision=_precision_of(g, score_node.input[0]), kv_heads=kv_heads, mask_scaled=mask_scaled)


def find_linear_attention(model) -> list[dict[str, Any]]:
    """Linear attention (kornia LoFTR's ``elu(x) + 1`` feature maps, no softmax): O(N) already, nothing to
    fuse, but worth naming. ``Elu -> Add 1`` feature maps are paired in graph order (Q's, then K's), one entry
    per pair; the pairs are not traced to the product that joins them, so the count is a reading, not proof."""
    g = _Graph(model)
    maps = []
    for node in g.graph.node:
        if node.op_type != "Elu":
            continue
        for user in g.consumers.get(node.output[0], []):
            other = [i for i in user.input if i != node.output[0]]
            if user.op_type == "Add" and len(other) == 1 and g.scalar(other[0]) == 1.0:
                maps.append((node.name, user.output[0]))
    blocks = []
    for first, second in zip(maps[0::2], maps[1::2]):
        blocks.append({"feature_maps": [first[0], second[0]], "style": "linear (elu + 1)",
                       "why": "linear attention: O(N) in the positions already, no N1 x N2 scores to fuse"})
    return blocks


# -- memory ------------------------------------------------------------------------------------------

def naive_attention_bytes(block_positions: list[tuple[int, int, int]], bytes_per_element: int = 4) -> int:
    """Bytes of the score tensors a MatMul -> Softmax -> MatMul graph materialises:
    ``sum(B x H x N1 x N2) x bytes`` over ``(batch*heads, N1, N2)`` triples (one live score tensor per block)."""
    return sum(b * n1 * n2 for b, n1, n2 in block_positions) * bytes_per_element


def naive_memory_at(model, blocks: list[AttentionBlock], shapes: dict[str, tuple[int, ...]],
                    bytes_per_element: int = 4) -> int | None:
    """Score-tensor bytes of every block at concrete input ``shapes`` (None when shapes cannot be followed)."""
    import onnx

    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    for graph_input in concrete.graph.input:
        if graph_input.name in shapes:
            dims = graph_input.type.tensor_type.shape.dim
            for dim, value in zip(dims, shapes[graph_input.name]):
                dim.Clear()
                dim.dim_value = int(value)
    del concrete.graph.value_info[:]
    found = _inferred_shapes(concrete)
    total = 0
    for block in blocks:
        dims = found.get(block.softmax) or found.get(_softmax_output(model, block.softmax))
        if not dims or not all(isinstance(d, int) for d in dims):
            return None
        total += int(np.prod(dims, dtype=np.int64))
    return total * bytes_per_element


def _softmax_output(model, name: str) -> str:
    return next(n.output[0] for n in model.graph.node if n.name == name)


# -- rewrites ----------------------------------------------------------------------------------------

def _copy(model):
    import onnx

    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _unique(graph, base: str) -> str:
    taken = {n.name for n in graph.node} | {o for n in graph.node for o in n.output} | \
        {i.name for i in graph.initializer} | {i.name for i in graph.input}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


class _NodeAdder:
    """Adds int64 constants and nodes to ``graph`` under unique names (``prefix`` + a base). Each node is appended
    at once, which reserves its names; ``added`` keeps them in order so a caller can move them into place."""

    def __init__(self, graph, prefix: str = ""):
        self.graph, self.prefix, self.added = graph, prefix, []

    def const(self, base: str, values) -> str:
        from onnx import numpy_helper

        name = _unique(self.graph, self.prefix + base)
        self.graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), name))
        return name

    def node(self, op: str, inputs: list[str], base: str, output: str | None = None, **attrs) -> str:
        """Add ``op`` and return its output: ``output`` when given, else a fresh name (also the node's)."""
        from onnx import helper

        output = output or _unique(self.graph, self.prefix + base)
        self.append(helper.make_node(op, inputs, [output], name=_unique(self.graph, self.prefix + base), **attrs))
        return output

    def append(self, node) -> None:
        self.added.append(node)
        self.graph.node.append(node)


def _replace_node(graph, old, new_nodes) -> None:
    """Put ``new_nodes`` where ``old`` stands (graph order kept) and remove ``old``. New nodes appended to the
    graph meanwhile (to reserve their names for :func:`_unique`) are taken out of the end first."""
    for node in new_nodes:
        if node in graph.node:
            graph.node.remove(node)
    at = list(graph.node).index(old)
    graph.node.remove(old)
    for offset, node in enumerate(new_nodes):
        graph.node.insert(at + offset, node)


def _bypass(graph, node) -> None:
    """Remove a unary-through node (Mul/Div by a constant): its consumers read its data input instead."""
    data = node.input[0] if _is_const(graph, node.input[1]) else node.input[1]
    for other in graph.node:
        for i, name in enumerate(other.input):
            if name == node.output[0]:
                other.input[i] = data
    graph.node.remove(node)


def _is_const(graph, name: str) -> bool:
    return any(i.name == name for i in graph.initializer) or any(
        n.op_type == "Constant" and name in n.output for n in graph.node)


def prune_unused(model) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses (repeatedly)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def move_scale_to_query(model) -> tuple[Any, list[str]]:
    """Move each block's score scale onto Q before the first matmul (exact in real arithmetic).

    ``softmax((Q K^T) * s) = softmax((Q * s) K^T)``: TensorRT's fused attention is documented to expect
    the scale on Q or K. Blocks already scaled there, masked, or not in the canonical form are left as
    they are. Returns the new model and the softmax names of the blocks changed.
    """
    from onnx import helper, numpy_helper

    out, _ = normalise_attention(model)
    changed = []
    for block in find_attention(out):
        if block.style != "matmul" or block.issues or not block.score_scale_nodes or block.mask_scaled:
            continue
        graph = out.graph
        score = next(n for n in graph.node if n.name == block.score_node)
        nodes = {n.name: n for n in graph.node}
        for name in block.score_scale_nodes:   # the finder already multiplied their factors into score_scale
            _bypass(graph, nodes[name])
        const = _unique(graph, f"{block.softmax}_query_scale")
        graph.initializer.append(numpy_helper.from_array(np.array(block.score_scale, dtype=np.float32), const))
        scaled = _unique(graph, f"{score.input[0]}_scaled")
        mul = helper.make_node("Mul", [score.input[0], const], [scaled], name=_unique(graph, f"{block.softmax}_scale_q"))
        graph.node.insert(list(graph.node).index(score), mul)
        score.input[0] = scaled
        changed.append(block.softmax)
    prune_unused(out)
    return out, changed


MS_DOMAIN = "com.microsoft"


def fuse_for_onnxruntime(model) -> tuple[Any, list[str], list[tuple[str, str]]]:
    """Replace each fusible block by ``com.microsoft.MultiHeadAttention`` (3-D Q/K/V, no mask or bias).

    Returns the new model, the softmax names of the blocks fused, and ``(softmax, reason)`` for those left.
    """
    from onnx import helper, numpy_helper

    out, _ = normalise_attention(model)
    fused, left = [], []
    for block in find_attention(out):
        ok, why = block.fusible("onnxruntime")
        if not ok or block.rank not in (3, 4):
            left.append((block.softmax, why if not ok else f"rank-{block.rank} tensors"))
            continue
        graph = out.graph
        heads, head_dim = block.heads, block.head_dim
        hidden = heads * head_dim
        prefix = block.softmax

        def const(name, values):
            real = _unique(graph, f"{prefix}_{name}")
            graph.initializer.append(numpy_helper.from_array(np.array(values, dtype=np.int64), real))
            return real

        new_nodes = []

        def node(op, inputs, name, **attrs):
            output = _unique(graph, f"{prefix}_{name}")
            new_nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
            graph.node.append(new_nodes[-1])   # reserve the name; re-inserted in order below
            return output

        flat = const("flat", [0, 0, hidden])
        if block.rank == 4:
            key, key_t, value = block.key, block.key_t, block.value
            if block.kv_heads == 1 and heads != 1:
                # multi-query: the MatMuls broadcast one K/V head; MultiHeadAttention wants them per head
                per_head = const("kv_heads", [1, heads, 1, 1])
                if key is not None:
                    key = node("Expand", [key, per_head], "k_heads")
                else:
                    key_t = node("Expand", [key_t, per_head], "kt_heads")
                value = node("Expand", [value, per_head], "v_heads")
            q3 = node("Reshape", [node("Transpose", [block.query], "q_bshd", perm=[0, 2, 1, 3]), flat], "q3")
            if key is not None:
                k_bshd = node("Transpose", [key], "k_bshd", perm=[0, 2, 1, 3])
            else:   # K^T laid out (B, H, d, Nk)
                k_bshd = node("Transpose", [key_t], "k_bshd", perm=[0, 3, 1, 2])
            k3 = node("Reshape", [k_bshd, flat], "k3")
            v3 = node("Reshape", [node("Transpose", [value], "v_bshd", perm=[0, 2, 1, 3]), flat], "v3")
        else:
            q3 = block.query
            k3 = block.key if block.key is not None else node("Transpose", [block.key_t], "k3", perm=[0, 2, 1])
            v3 = block.value
        attention = node("MultiHeadAttention", [q3, k3, v3], "mha", domain=MS_DOMAIN,
                         num_heads=heads, scale=float(block.scale))
        # Back to what the output matmul produced, so the rest of the graph is unchanged.
        if block.rank == 4:
            split = node("Reshape", [attention, const("split", [0, 0, heads, head_dim])], "o_bshd")
            final = helper.make_node("Transpose", [split], [block.output], name=_unique(graph, f"{prefix}_o_bhsd"),
                                     perm=[0, 2, 1, 3])
        else:
            final = helper.make_node("Identity", [attention], [block.output], name=_unique(graph, f"{prefix}_o"))
        _replace_node(graph, next(n for n in graph.node if n.name == block.output_node), new_nodes + [final])
        fused.append(block.softmax)
    if fused:
        prune_unused(out)
        if not any(o.domain == MS_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return out, fused, left


def describe_blocks(blocks: list[AttentionBlock]) -> list[dict[str, Any]]:
    """Rows for ``xattn inspect``: each block's form and, per target, whether it fuses and why not."""
    rows = []
    for block in blocks:
        row = {"softmax": block.softmax, "style": block.style, "written_as": block.written_as,
               "heads": block.heads, "head_dim": block.head_dim, "kv_heads": block.kv_heads,
               "scale": block.scale, "scale_position": block.scale_position, "mask": block.mask is not None,
               "precision": block.precision,
               "expected_scale": (1.0 / math.sqrt(block.head_dim)) if block.head_dim else None, "targets": {}}
        for target in ("tensorrt", "onnxruntime"):
            ok, why = block.fusible(target)
            row["targets"][target] = {"fusible": ok, "why": why}
        rows.append(row)
    return rows


#: The opset that introduced ONNX's own ``Attention`` op (parsed by TensorRT >= 10.14 and 11.x).
ONNX_ATTENTION_OPSET = 23
ATTENTION_OPS = ("matmul", "onnx")


def to_onnx_attention(model) -> tuple[Any, list[str], list[tuple[str, str]]]:
    """Replace each canonical block by ONNX's ``Attention`` (opset 23): 4-D ``(B, H, N, d)`` Q/K/V and
    ``scale``, softmax computed in FP32 (``softmax_precision``), as TensorRT's attention layer takes it.

    The model is first converted to opset 23 (``onnx.version_converter``; the caller verifies the result
    numerically). Returns the new model, the softmax names replaced and ``(softmax, reason)`` for the rest.
    """
    from onnx import helper, numpy_helper, version_converter

    out, _ = normalise_attention(version_converter.convert_version(model, ONNX_ATTENTION_OPSET))
    replaced, left = [], []
    for block in find_attention(out):
        if block.style != "matmul" or block.issues or block.rank not in (3, 4) or block.mask is not None:
            left.append((block.softmax, "; ".join(block.issues) or (
                "an additive mask on the scores (not carried into ONNX Attention by this rewrite)"
                if block.mask is not None else f"rank-{block.rank} tensors")))
            continue
        graph = out.graph
        new_nodes = []
        if block.key is not None:
            key = block.key
        else:
            key = _unique(graph, f"{block.softmax}_k")
            perm = [0, 1, 3, 2] if block.rank == 4 else [0, 2, 1]
            new_nodes.append(helper.make_node("Transpose", [block.key_t], [key], name=key, perm=perm))
            graph.node.append(new_nodes[-1])   # reserve the name
        attrs = {"scale": float(block.scale), "softmax_precision": 1}   # 1 = FLOAT
        q, v, out_name = block.query, block.value, block.output
        if block.rank == 3:
            # onnx-tensorrt takes 4-D Q/K/V only: (B, N, d) -> (B, 1, N, d) and back
            axis = _unique(graph, f"{block.softmax}_head_axis")
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axis))
            four = []
            for name in (q, key, v):
                unsqueezed = _unique(graph, f"{name}_4d")
                new_nodes.append(helper.make_node("Unsqueeze", [name, axis], [unsqueezed], name=unsqueezed))
                graph.node.append(new_nodes[-1])   # reserve the name
                four.append(unsqueezed)
            q, key, v = four
            out_name = _unique(graph, f"{block.output}_4d")
        new_nodes.append(helper.make_node("Attention", [q, key, v], [out_name],
                                          name=_unique(graph, f"{block.softmax}_attention"), **attrs))
        if block.rank == 3:
            new_nodes.append(helper.make_node("Squeeze", [out_name, axis], [block.output],
                                              name=_unique(graph, f"{block.softmax}_squeeze")))
        _replace_node(graph, next(n for n in graph.node if n.name == block.output_node), new_nodes)
        replaced.append(block.softmax)
    prune_unused(out)
    return out, replaced, left


def heads_from_channels_last(model) -> tuple[Any, list[str]]:
    """Split a convolution's output into heads (and join the heads back for the next convolution) through the
    channels-last view of the feature map. Returns the rewritten copy and the tensors it now makes that way.

    A convolutional block reads its queries as ``Transpose(Reshape(conv -> (B, h, d, H*W)), 0,1,3,2)`` and hands
    its output on as ``Reshape(Transpose(O, 0,1,3,2) -> (B, C, H, W))`` into a convolution. OpenVINO's CPU plugin
    keeps convolution data channels-last (NHWC), so each of the two becomes a layout reorder plus a transpose
    (measured: about 2 of 34 ms at 64x64 on the default model, bf16). Written as
    ``Transpose(conv, 0,2,3,1) -> Reshape(B, H*W, h, d) -> Transpose(0,2,1,3)``, and mirrored on the way out, the
    same values land in the same places while the NHWC transposes next to a convolution meet the plugin's own
    reorders and cancel (measured, int8 Q/K^T on OpenVINO bf16, interleaved with ORT fused: 2.16x instead of 2.04x
    at 64x64, 2.10x instead of 1.97x at 128x128, 2.05-2.10x instead of 2.01-2.04x at 192x192). Exact: only index
    arithmetic moves.

    Only blocks fed by and feeding convolutions change, and only where shape inference proves the reshape splits
    the channels into (h, d) with the batch kept. V is left alone on purpose: with V as ``(B, h, N2, d)`` too the
    plugin makes its MHA snippet of every slice, which ran 0.92x ORT fused at 128x128 where the slices ran 2.15x.
    """
    out, _ = normalise_attention(model)
    g = _Graph(out)
    opset = next((o.version for o in out.opset_import if o.domain in ("", "ai.onnx")), 0)
    add = _NodeAdder(out.graph)   # nodes are appended; the graph is sorted at the end
    relaid = []
    for block in find_attention(out):
        if block.style != "matmul" or block.rank != 4:
            continue
        score = next(n for n in out.graph.node if n.name == block.score_node)
        relaid += [name for name in (_query_heads_from_nhwc(g, add, score.input[0]),
                                     _output_heads_into_nhwc(g, add, block.output, opset)) if name]
    if relaid:
        from xattn.onnxfile import topological_sort

        topological_sort(out.graph)
        prune_unused(out)
    return out, relaid


def _flip_of(node) -> bool:
    """Whether ``node`` is a Transpose swapping the last two of four axes."""
    return node is not None and node.op_type == "Transpose" and list(_attr(node, "perm", [])) == [0, 1, 3, 2]


def _known_same(a, b) -> bool:
    """Two inferred dims proven equal (the same number, or the same symbol)."""
    return a not in (None, "?") and a == b


def _query_heads_from_nhwc(g: _Graph, add: "_NodeAdder", query: str) -> str | None:
    """``query = Transpose(Reshape(conv (B, C, H, W) -> (B, h, d, H*W)), 0,1,3,2)`` made as
    ``Transpose(Reshape(Transpose(conv, 0,2,3,1) -> (B, H*W, h, d)), 0,2,1,3)``; returns ``query`` when rewritten."""
    flip = g.producer.get(query)
    split = g.producer.get(flip.input[0]) if _flip_of(flip) else None
    if split is None or split.op_type != "Reshape" or getattr(g.producer.get(split.input[0]), "op_type", "") != "Conv":
        return None
    image, by_head = g.shapes.get(split.input[0]), g.shapes.get(split.output[0])
    if not (image and by_head and len(image) == len(by_head) == 4 and isinstance(image[1], int)
            and isinstance(by_head[1], int) and isinstance(by_head[2], int)
            and by_head[1] * by_head[2] == image[1] and _known_same(image[0], by_head[0])):
        return None   # not proven to split the channels into (h, d) with the batch kept
    nhwc = add.node("Transpose", [split.input[0]], f"{query}_nhwc", perm=[0, 2, 3, 1])
    tokens = add.node("Reshape", [nhwc, add.const(f"{query}_tokens_shape", [0, -1, by_head[1], by_head[2]])],
                      f"{query}_tokens")
    add.graph.node.remove(flip)   # its output now comes from the channels-last path
    add.node("Transpose", [tokens], f"{query}_heads", output=query, perm=[0, 2, 1, 3])
    return query


def _output_heads_into_nhwc(g: _Graph, add: "_NodeAdder", result: str, opset: int) -> str | None:
    """``Reshape(Transpose(result (B, h, N1, d), 0,1,3,2) -> (B, C, H, W))`` read by convolutions only, made as
    ``Transpose(Reshape(Transpose(result, 0,2,1,3) -> (B, H, W, C)), 0,3,1,2)``; returns the image's name when
    rewritten."""
    flip = g.single_consumer(result)
    join = g.single_consumer(flip.output[0]) if _flip_of(flip) else None
    if join is None or join.op_type != "Reshape" or opset < 14:   # opset 14 brought Reshape's allowzero
        return None
    readers = g.consumers.get(join.output[0], [])
    by_head, image = g.shapes.get(result), g.shapes.get(join.output[0])
    if not (readers and all(r.op_type == "Conv" for r in readers) and by_head and image
            and len(by_head) == len(image) == 4 and isinstance(by_head[1], int) and isinstance(by_head[3], int)
            and image[1] == by_head[1] * by_head[3] and _known_same(by_head[0], image[0])):
        return None
    # (H, W) as the original Reshape reads its shape tensor: a 0 copies the transposed input's dim (unless
    # allowzero), one -1 takes what is left; resolved in the graph, so any shape tensor works
    wanted = join.input[1]
    flipped_dims = add.node("Gather", [add.node("Shape", [result], f"{result}_dims"),
                                       add.const(f"{result}_flip_order", [0, 1, 3, 2])], f"{result}_flip_dims", axis=0)
    zero, minus_one, one = (add.const(f"{result}_{n}", v) for n, v in (("zero", 0), ("minus_one", -1), ("one", 1)))
    if not _attr(join, "allowzero", 0):
        copies = add.node("Equal", [wanted, zero], f"{result}_copies")
        wanted = add.node("Where", [copies, flipped_dims, wanted], f"{result}_copied")
    is_rest = add.node("Equal", [wanted, minus_one], f"{result}_is_rest")
    known_count = add.node("ReduceProd", [add.node("Where", [is_rest, one, wanted], f"{result}_known")],
                           f"{result}_known_count", keepdims=0)
    # at least 1: ONNX Runtime fails an integer division by zero, and an empty tensor has a 0 dim
    divisor = add.node("Max", [known_count, one], f"{result}_divisor")
    rest = add.node("Div", [add.node("ReduceProd", [flipped_dims], f"{result}_count", keepdims=0), divisor],
                    f"{result}_rest")
    image_dims = add.node("Where", [is_rest, rest, wanted], f"{result}_image_dims")
    nhwc_dims = add.node("Gather", [image_dims, add.const(f"{result}_nhwc_order", [0, 2, 3, 1])],
                         f"{result}_nhwc_dims", axis=0)
    tokens = add.node("Transpose", [result], f"{result}_tokens", perm=[0, 2, 1, 3])
    nhwc = add.node("Reshape", [tokens, nhwc_dims], f"{result}_nhwc", allowzero=1)
    add.graph.node.remove(flip)
    add.graph.node.remove(join)
    add.node("Transpose", [nhwc], f"{result}_nchw", output=join.output[0], perm=[0, 3, 1, 2])
    return join.output[0]

#: Query rows one slice of :func:`chunk_queries` takes where the slice count allows, and the fewest it takes.
#: Chosen by measurement (OpenVINO bf16, default model, 2-core Zen 4, int8 Q/K, interleaved against ORT fused
#: through runtime/bench.py; a shared machine moves single runs by 10-20%): at 128x128 slices of 512 rows ran
#: 2.06-2.22x where 1024 rows ran 1.77-1.89x (two runs, an earlier round) and 256 rows 1.84-1.90x (three runs);
#: at 192x192 72 slices of 512 rows ran 2.01x / 2.12x where 32 slices of 1152 rows ran 1.93x / 2.05x (two runs),
#: and in a later round 2.10x / 2.11x where 96 slices of 384 rows ran 2.06x / 2.10x and 144 of 256 rows 1.97x /
#: 1.69x (two runs, the three files side by side); at 64x64 the length mattered little (an earlier round: 512 rows
#: as fast as 256 or faster in most paired runs; another round 256 rows 0.4% and 6% faster in two runs), while
#: 1024-row slices (1.80-1.92x) and one unsliced block (1.72-1.80x) were slower than 512 rows (1.89-2.04x). Why is
#: not known: that longer slices lose because one slice's scores leave this CPU's 32 MiB L3 was a guess, and the
#: shorter slices at 192x192 (18 MiB of bf16 scores at 256 x 36864, against 36 MiB at 512 rows) did not win.
MIN_CHUNK_ROWS = 512
#: The fewest slices per block, and the count where the query length at the largest shapes is not known: it bounds
#: the scores held at once to 1/32 of ``N1 x N2`` at any shape (peak RSS of model.ov.onnx at 192x192, bf16,
#: compiled static: 2.8 GiB unsliced, 447 MiB in 16 slices, 372 MiB in 32; benchmarks/cpu_backends.py). Trailing
#: empty slices cost nothing measurable (64x64: 24 or 64 empty slices of 32 or 72, same speed within noise).
QUERY_CHUNKS = 32
#: The most slices per block (each is a handful of nodes); beyond ``MAX_QUERY_CHUNKS * MIN_CHUNK_ROWS`` queries at
#: the largest shapes the slices grow instead.
MAX_QUERY_CHUNKS = 256


def query_chunks(rows_at_max: int | None) -> int:
    """Slices for a block whose queries number ``rows_at_max`` at the largest shapes (``None``: not known): enough
    for slices of :data:`MIN_CHUNK_ROWS` rows there, between :data:`QUERY_CHUNKS` and :data:`MAX_QUERY_CHUNKS`."""
    if not rows_at_max:
        return QUERY_CHUNKS
    return min(MAX_QUERY_CHUNKS, max(QUERY_CHUNKS, math.ceil(rows_at_max / MIN_CHUNK_ROWS)))


def _symbolic_shapes(model):
    """``model`` with its tensors' shapes filled in by ONNX Runtime's symbolic shape inference, or ``None`` where it
    cannot follow the graph. It computes the arithmetic exporters write on ``Shape`` outputs (``Gather``, ``Mul``,
    ``Concat`` into a ``Reshape``), where ONNX's own data propagation stops (measured on tests/attention_styles.py:
    it reads the token count ``(H / 4) * (W / 4)`` of every style but grouped-query SDPA, where it fails on the
    exporter's scalar ``Unsqueeze`` axes; ONNX's inference read none of them)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception:  # an op or a form it does not know: ONNX's inference is the fallback
        return None


def plan_query_chunks(model, max_shapes: Mapping[str, Sequence[int]] | None) -> dict[str, int]:
    """Slices per attention block (by its Softmax's name) for :func:`chunk_queries`, from the query length at
    ``max_shapes`` (the export's recorded ``--max-shapes``), read by shape inference with the inputs fixed there
    (ONNX Runtime's symbolic inference, else ONNX's). A block whose length inference cannot reach, or a file
    without max shapes, gets :data:`QUERY_CHUNKS`."""
    from onnx import ModelProto

    out, _ = normalise_attention(model)
    blocks = find_attention(out)
    rows: dict[str, int] = {}
    inputs = {i.name: i for i in out.graph.input}
    if max_shapes and set(max_shapes) <= set(inputs) and all(
            len(inputs[name].type.tensor_type.shape.dim) == len(dims) for name, dims in max_shapes.items()):
        fixed = ModelProto()
        fixed.CopyFrom(out)
        # shapes recorded in the file (the exporter's symbolic ones) would stand over what inference finds
        del fixed.graph.value_info[:]
        for graph_output in fixed.graph.output:
            graph_output.type.tensor_type.ClearField("shape")
        for graph_input in fixed.graph.input:
            for dim, value in zip(graph_input.type.tensor_type.shape.dim, max_shapes.get(graph_input.name, ())):
                dim.Clear()
                dim.dim_value = int(value)
        shapes = _inferred_shapes(_symbolic_shapes(fixed) or fixed)
        scores = {n.name: n for n in fixed.graph.node}
        for block in blocks:
            query = shapes.get(scores[block.score_node].input[0]) if block.score_node in scores else None
            if query and len(query) >= 2 and isinstance(query[-2], int) and query[-2] > 0:
                rows[block.softmax] = query[-2]
    return {block.softmax: query_chunks(rows.get(block.softmax)) for block in blocks}


def _block_chain(graph, block: AttentionBlock) -> list | None:
    """The nodes from the score matmul to the output matmul (both included) in graph order, or ``None`` when a
    tensor between them is read outside the block (then rows cannot be computed apart)."""
    nodes = {n.name: n for n in graph.node}
    score, output = nodes[block.score_node], nodes[block.output_node]
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    downstream, todo = {score.name}, [score]
    while todo:   # everything fed by the scores, up to the output matmul
        node = todo.pop()
        if node is output:
            continue
        for name in node.output:
            for user in consumers.get(name, []):
                if user.name not in downstream:
                    downstream.add(user.name)
                    todo.append(user)
    chain = [n for n in graph.node if n.name in downstream]
    inside = {n.name for n in chain}
    graph_outputs = {o.name for o in graph.output}
    for node in chain:
        if node is output:
            continue
        for name in node.output:
            if name in graph_outputs or any(u.name not in inside for u in consumers.get(name, [])):
                return None
    return chain if output in chain else None


def chunk_queries(model, chunks: int | Mapping[str, int] = QUERY_CHUNKS,
                  min_rows: int = MIN_CHUNK_ROWS) -> tuple[Any, list[str], list[tuple[str, str]]]:
    """Compute each block's rows in ``chunks`` slices of the queries: ``softmax(Q_i K^T) V`` per slice, concatenated.

    Exact: a softmax row depends on its own query only, so each slice runs the block's own nodes (scale, mask,
    casts, NaN guard), copied, on ``Q[..., start:end, :]``. A runtime that tiles no attention itself (OpenVINO's
    CPU plugin runs the plain MatMul -> Softmax -> MatMul at full bf16 speed but holds the whole ``N1 x N2``
    scores) then holds one slice's scores at a time. The slice length is ``max(ceil(N1 / chunks), min_rows)``,
    computed in the graph, so any N1 works (trailing slices are empty when N1 is small). ``chunks`` is one count
    for every block or a count per block by Softmax name (:func:`plan_query_chunks`; a block it does not name gets
    :data:`QUERY_CHUNKS`). A mask with a query axis is sliced with the queries; one whose query axis is not known is
    a reason to leave the block.

    Returns the new model, the softmax names of the blocks chunked and ``(softmax, reason)`` for the rest.
    """
    from onnx import helper

    out, _ = normalise_attention(model)
    done, left = [], []
    shapes = _inferred_shapes(out)
    for block in find_attention(out):
        graph = out.graph
        if block.style != "matmul" or block.issues or block.rank not in (3, 4):
            left.append((block.softmax, "; ".join(block.issues) or f"rank-{block.rank} tensors"))
            continue
        chain = _block_chain(graph, block)
        if chain is None:
            left.append((block.softmax, "a tensor inside the block is read outside it"))
            continue
        slice_mask = False
        if block.mask is not None:
            # a mask broadcast over the queries (1 there, or no such axis) is shared by every slice; one with the
            # queries' own length there is sliced with them; anything else (unknown) leaves the block as it is
            mask_shape, scores_shape = shapes.get(block.mask), shapes.get(chain[0].output[0])
            rows_of = lambda shape: shape[-2] if shape and len(shape) >= 2 else None   # noqa: E731
            if mask_shape is not None and (len(mask_shape) < 2 or mask_shape[-2] == 1):
                slice_mask = False
            elif rows_of(mask_shape) not in (None, "?") and rows_of(mask_shape) == rows_of(scores_shape):
                slice_mask = True
            else:
                left.append((block.softmax, "the mask's query axis is not known to be 1 or the queries' length, "
                                            "so it cannot be sliced with them"))
                continue
        query = chain[0].input[0]
        count = chunks.get(block.softmax, QUERY_CHUNKS) if isinstance(chunks, Mapping) else chunks
        add = _NodeAdder(graph, prefix=f"{block.softmax}_")   # re-inserted in order below
        const, node = add.const, add.node
        rows = node("Gather", [node("Shape", [query], "q_shape"), const("query_axis", [-2])], "rows", axis=0)
        step = node("Max", [node("Div", [node("Add", [rows, const("round_up", [count - 1])], "rows_up"),
                                         const("chunks", [count])], "ceil"), const("min_rows", [min_rows])], "step")
        axes = const("axes", [-2])
        pieces = []
        for i in range(count):
            start = const("start0", [0]) if i == 0 else node("Mul", [step, const(f"k{i}", [i])], f"start{i}")
            end = node("Mul", [step, const(f"k{i + 1}", [i + 1])], f"end{i}")
            # the slice replaces Q in the score product only: the same tensor may be V too (attention without
            # projections, softmax(x x^T) x), which every slice reads whole
            sliced_query = node("Slice", [query, start, end, axes], f"q{i}")
            renamed = {}
            if slice_mask:
                renamed[block.mask] = node("Slice", [block.mask, start, end, axes], f"mask{i}")
            for original in chain:
                inputs = [renamed.get(n, n) for n in original.input]
                if original is chain[0]:
                    inputs[0] = sliced_query
                copy = helper.make_node(original.op_type, inputs,
                                        [_unique(graph, f"{o}_c{i}") if o else "" for o in original.output],
                                        name=_unique(graph, f"{original.name}_c{i}"), domain=original.domain)
                copy.attribute.extend(original.attribute)
                renamed.update(zip(original.output, copy.output))
                add.append(copy)
            pieces.append(renamed[block.output])
        concat = helper.make_node("Concat", pieces, [block.output], name=_unique(graph, f"{block.softmax}_concat"),
                                  axis=-2)
        output_node = next(n for n in graph.node if n.name == block.output_node)
        output_node.output[0] = _unique(graph, f"{block.output}_unchunked")   # the original chain becomes dead
        _replace_node(graph, output_node, add.added + [concat])
        done.append(block.softmax)
    if done:
        prune_unused(out)
    return out, done, left
