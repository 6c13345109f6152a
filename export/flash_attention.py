"""The fp32 graph with ONNX Runtime's CPU flash attention: long texts in bounded memory.

The exported graph computes attention as MatMul -> Div -> Add(mask) -> Softmax -> MatMul, which
materialises every layer's [batch, heads, S, S] float32 scores: 4.3 GB per layer at 8192 tokens. ONNX
Runtime's CPU `com.microsoft.MultiHeadAttention` kernel has a flash-attention path (MLAS, tiled to
the L2 cache, online softmax) that never holds more than a tile of scores, but only when it is given
no key padding mask and no attention bias.

So the padding mask goes into the dot products instead: each head's query gets one more component,
1, and each head's key one more, 0 for a real token and -10000/scale for padding. The kernel's
`scale * q'.k'` is then `scale * q.k` for real keys and `scale * q.k - 10000` for padding, whose
softmax weight underflows to exactly 0 in float32, as the exported graph's additive mask does
(padding positions' own outputs are never read: heads mask them). Values keep their 64 components.

The graph also outputs the encoder's last hidden states (`last_hidden_state`), which the document
level's MCLS strategy pools (`m3rt.long_document`). The rewritten graph reads the same weights: at
full size it refers to `model.onnx.data` and adds no weight file of its own.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from m3rt.errors import ExportError

FILE_NAME = "model.flash.onnx"
# The encoder's last hidden states [batch, sequence, hidden], before any head: what MCLS pools.
HIDDEN_OUTPUT = "last_hidden_state"
GRAPH_KEY = "fp32-flash"
MS_DOMAIN = "com.microsoft"
# Added to a padding key's scaled score: exp(-10000 + s - max) is 0 in float32 for any real score.
PADDING_SCORE = -10000.0


class PatternError(ExportError, ValueError):
    """The graph's attention is not the exported MatMul/Div/Add/Softmax/MatMul pattern."""


def _constant_value(graph: onnx.GraphProto, name: str, producers: dict[str, onnx.NodeProto]) -> float:
    for init in graph.initializer:
        if init.name == name:
            return float(numpy_helper.to_array(init).reshape(-1)[0])
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        return float(numpy_helper.to_array(node.attribute[0].t).reshape(-1)[0])
    raise PatternError(f"{name} is not a constant")


def _perm(node: onnx.NodeProto) -> list[int]:
    return [int(x) for x in helper.get_attribute_value(next(a for a in node.attribute if a.name == "perm"))]


def rewrite_attention(model: onnx.ModelProto, num_heads: int) -> int:
    """Replace every attention block by MultiHeadAttention with the mask folded into Q and K (in
    place); returns how many were replaced. Raises PatternError when a block does not match."""
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)

    def produced(name: str, op: str) -> onnx.NodeProto:
        node = producers.get(name)
        if node is None or node.op_type != op:
            raise PatternError(f"{name}: expected the output of {op}, found {node.op_type if node else 'an input'}")
        return node

    def only_consumer(name: str, op: str) -> onnx.NodeProto:
        found = consumers.get(name, [])
        if len(found) != 1 or found[0].op_type != op:
            raise PatternError(f"{name}: expected one {op} consumer, found {[n.op_type for n in found]}")
        return found[0]

    new_nodes: list[onnx.NodeProto] = []
    new_inits = [
        numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), "flash/shape_bsd"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "flash/zero"),
        numpy_helper.from_array(np.array([3], dtype=np.int64), "flash/three"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "flash/one_i"),
        numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "flash/axes_23"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), "flash/one_f"),
    ]
    # Per token: 0 for real, 1 for padding (the scale is applied per layer below).
    new_nodes += [
        helper.make_node("Cast", ["attention_mask"], ["flash/mask_f"], to=TensorProto.FLOAT),
        helper.make_node("Sub", ["flash/one_f", "flash/mask_f"], ["flash/is_pad"]),
        helper.make_node("Unsqueeze", ["flash/is_pad", "flash/axes_23"], ["flash/is_pad4"]),  # [B, S, 1, 1]
    ]
    dead: list[onnx.NodeProto] = []
    count = 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = produced(softmax.input[0], "Add")
        # transformers 4 divides the scores by sqrt(head size); transformers 5 multiplies them by its inverse.
        scaled = next(
            (producers[x] for x in add.input if x in producers and producers[x].op_type in ("Div", "Mul")), None
        )
        if scaled is None:
            raise PatternError(f"{add.name}: scores are not scaled by 1 / sqrt(head size)")
        scores_in, factor_in = scaled.input
        if scaled.op_type == "Mul" and getattr(producers.get(factor_in), "op_type", None) == "MatMul":
            scores_in, factor_in = factor_in, scores_in
        scores = produced(scores_in, "MatMul")
        q_t, k_t = produced(scores.input[0], "Transpose"), produced(scores.input[1], "Transpose")
        context = only_consumer(softmax.output[0], "MatMul")
        v_t = produced(context.input[1], "Transpose")
        out_t = only_consumer(context.output[0], "Transpose")
        heads_first, keys_transposed = [0, 2, 1, 3], [0, 2, 3, 1]
        perms = (_perm(q_t), _perm(k_t), _perm(v_t), _perm(out_t))
        if perms != (heads_first, keys_transposed, heads_first, heads_first):
            raise PatternError(f"{softmax.name}: unexpected head transposes")
        factor = _constant_value(graph, factor_in, producers)
        scale = 1.0 / factor if scaled.op_type == "Div" else factor
        head_size = int(round(1.0 / scale**2))
        q4, k4, v4, out = q_t.input[0], k_t.input[0], v_t.input[0], out_t.output[0]
        p = f"flash/{count}/"
        pad_bias = numpy_helper.from_array(np.array(PADDING_SCORE / scale, dtype=np.float32), p + "pad_bias")
        head_shape = numpy_helper.from_array(np.array([0, 0, num_heads, head_size], dtype=np.int64), p + "bsnh")
        new_inits += [pad_bias, head_shape]
        new_nodes += [
            # [B, S, N, 1] of ones, shaped from the query.
            helper.make_node("Shape", [q4], [p + "q_shape"]),
            helper.make_node("Slice", [p + "q_shape", "flash/zero", "flash/three"], [p + "bsn"]),
            helper.make_node("Concat", [p + "bsn", "flash/one_i"], [p + "bsn1"], axis=0),
            helper.make_node(
                "ConstantOfShape",
                [p + "bsn1"],
                [p + "ones"],
                value=numpy_helper.from_array(np.array([1.0], dtype=np.float32)),
            ),
            helper.make_node("Concat", [q4, p + "ones"], [p + "q_aug"], axis=3),
            helper.make_node("Reshape", [p + "q_aug", "flash/shape_bsd"], [p + "q"]),
            helper.make_node("Mul", ["flash/is_pad4", pad_bias.name], [p + "key_bias"]),  # [B, S, 1, 1]
            helper.make_node("Mul", [p + "ones", p + "key_bias"], [p + "key_col"]),  # [B, S, N, 1]
            helper.make_node("Concat", [k4, p + "key_col"], [p + "k_aug"], axis=3),
            helper.make_node("Reshape", [p + "k_aug", "flash/shape_bsd"], [p + "k"]),
            helper.make_node("Reshape", [v4, "flash/shape_bsd"], [p + "v"]),
            helper.make_node(
                "MultiHeadAttention",
                [p + "q", p + "k", p + "v"],
                [p + "context"],
                domain=MS_DOMAIN,
                num_heads=num_heads,
                scale=scale,
                name=p + "MultiHeadAttention",
            ),
            helper.make_node("Reshape", [p + "context", head_shape.name], [out]),
        ]
        dead.append(out_t)
        count += 1
    if count == 0:
        raise PatternError("no attention block (Softmax) found")
    for node in dead:
        graph.node.remove(node)
    graph.node.extend(new_nodes)
    graph.initializer.extend(new_inits)
    _topological_sort(graph)
    _remove_unused(graph)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return count


def expose_hidden_states(model: onnx.ModelProto) -> None:
    """Add the encoder's output (the last LayerNormalization, whose token 0 the dense head takes) as
    graph output `last_hidden_state`; computing it costs nothing more, and it is copied out only when
    asked for."""
    graph = model.graph
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    if not norms:
        raise PatternError("no LayerNormalization: not the exported encoder")
    last = norms[-1].output[0]
    if not any(n.op_type == "Gather" and n.input[0] == last for n in graph.node):
        raise PatternError(f"{last} is not read by the dense head's Gather")
    graph.node.append(helper.make_node("Identity", [last], [HIDDEN_OUTPUT], name="expose_last_hidden_state"))
    graph.output.append(helper.make_tensor_value_info(HIDDEN_OUTPUT, TensorProto.FLOAT, ["batch", "sequence", None]))


def _remove_unused(graph: onnx.GraphProto) -> None:
    """Drop nodes and initializers nothing reads any more (the replaced attention ops)."""
    needed = {o.name for o in graph.output}
    keep: list[onnx.NodeProto] = []
    for node in reversed(list(graph.node)):
        if any(out in needed for out in node.output):
            keep.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(keep))
    unused = [init for init in graph.initializer if init.name not in needed]
    for init in unused:
        graph.initializer.remove(init)


def _topological_sort(graph: onnx.GraphProto) -> None:
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(x in available for x in n.input)]
        if not ready:
            missing = sorted({x for n in pending for x in n.input if x not in available})[:5]
            raise PatternError(f"the rewritten graph has a cycle or missing inputs ({missing})")
        ready_ids = {id(n) for n in ready}
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if id(n) not in ready_ids]
    del graph.node[:]
    graph.node.extend(ordered)


def flash_file_name(graph_file: str) -> str:
    """`model.onnx` -> `model.flash.onnx`, `model.int8.onnx` -> `model.int8.flash.onnx`."""
    stem = graph_file.removesuffix(".onnx")
    return f"{stem}.flash.onnx"


def write_flash_graph(source: Path, target: Path, num_heads: int) -> list[Path]:
    """`source` (the fp32 export) rewritten into `target`, in the same directory. Weights kept in an
    external data file stay there: the new graph refers to the same file instead of copying it."""
    source, target = Path(source), Path(target)
    if source.parent.resolve() != target.parent.resolve():
        raise ValueError("the flash graph must sit beside the graph whose weight file it shares")
    model = onnx.load(str(source), load_external_data=False)
    rewrite_attention(model, num_heads)
    expose_hidden_states(model)
    external = sorted(
        {entry.value for init in model.graph.initializer for entry in init.external_data if entry.key == "location"}
    )
    target.unlink(missing_ok=True)
    onnx.save_model(model, str(target))
    return [target, *(target.parent / name for name in external)]
