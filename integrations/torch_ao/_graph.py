"""Graph facts shared by the FX and pt2e flows: which node is an attention matmul, whose scope it is,
and how a quantized layer replaces a float one in a GraphModule. No numerics here: quantizers and
quantized layers come from the core (igq.layer_settings, igq.quantized_layer, igq.attention_quantizer).

The attention pattern both flows recognise is the unfused one (timm with ``fused_attn = False``,
Hugging Face "eager" attention):

    S = Q @ K^T  (-> scale / bias / mask) -> softmax -> (dropout) -> P;   O = P @ V

* a matmul whose output reaches a softmax through elementwise ops is "QK": its left operand is the
  Q site (channels on its last axis), its right operand the K site (channels on axis -2: K^T);
* a matmul whose left operand comes from a softmax (through dropout / identity / observers) is
  "PV": its left operand is the softmax site, its right operand the V site (channels last).
Other matmuls are left in float.
"""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import nn

Node = torch.fx.Node

# operand tag -> channel axis of the tensor the matmul sees
OPERAND_AXIS = {"q": -1, "k": -2, "v": -1}
_MATMULS = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", torch.ops.aten.matmul.default,
            torch.ops.aten.bmm.default}
_SOFTMAXES = {torch.softmax, torch.nn.functional.softmax, "softmax", torch.ops.aten.softmax.int,
              torch.ops.aten._softmax.default}
# one-input ops that keep the values (in eval), e.g. HF's softmax(..., dtype=float32).to(q.dtype)
_TRANSPARENT = {torch.ops.aten.dropout.default, torch.nn.functional.dropout, torch.ops.aten.clone.default,
                "contiguous", "clone", "to", "float", "type_as", torch.ops.aten.alias.default,
                torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout}
# one-input ops that only rearrange: a parameter seen through them is still a parameter
_VIEWS = {"transpose", "permute", "t", "view", "reshape", "contiguous", "mT", torch.transpose, torch.permute,
          torch.t, torch.reshape, torch.ops.aten.transpose.int, torch.ops.aten.permute.default,
          torch.ops.aten.t.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten.expand.default, torch.ops.aten.unsqueeze.default}


def is_matmul(node: Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _MATMULS


def _is_softmax(node: Node, gm: torch.fx.GraphModule) -> bool:
    if node.op in ("call_function", "call_method"):
        return node.target in _SOFTMAXES
    return node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.Softmax)


def _transparent(node: Node, gm: torch.fx.GraphModule, is_observer: Callable[[nn.Module], bool]) -> bool:
    """A one-input op that leaves values as they are (in eval): dropout, identity, an observer."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        return isinstance(module, (nn.Dropout, nn.Identity)) or is_observer(module)
    return node.op in ("call_function", "call_method") and node.target in _TRANSPARENT


def source(node: Node, gm: torch.fx.GraphModule, is_observer: Callable[[nn.Module], bool]) -> Node:
    """``node`` with transparent ops (dropout, identity, observers) walked back."""
    while _transparent(node, gm, is_observer) and node.args and isinstance(node.args[0], Node):
        node = node.args[0]
    return node


def _reaches_softmax(node: Node, gm: torch.fx.GraphModule, depth: int = 6) -> bool:
    frontier = [node]
    for _ in range(depth):
        nxt = []
        for n in frontier:
            for user in n.users:
                if _is_softmax(user, gm):
                    return True
                stops = user.op == "output" or (user.op == "call_module" and not _is_leafless(user, gm))
                if stops or is_matmul(user):  # a layer with weights, another matmul: past the attention scores
                    continue
                nxt.append(user)
        frontier = nxt
    return False


def _is_leafless(node: Node, gm: torch.fx.GraphModule) -> bool:
    """A call_module without parameters (dropout, identity, observers) may sit between QK^T and softmax."""
    return node.op == "call_module" and not any(True for _ in gm.get_submodule(node.target).parameters())


def _is_activation(node: Node, gm: torch.fx.GraphModule, is_observer: Callable[[nn.Module], bool]) -> bool:
    """Whether ``node`` is computed from the inputs, not a parameter / constant seen through views."""
    while True:
        node = source(node, gm, is_observer)
        if node.op == "get_attr":
            return False
        if node.op in ("call_function", "call_method") and node.target in _VIEWS and node.args \
                and isinstance(node.args[0], Node):
            node = node.args[0]
            continue
        return True


def attention_role(matmul: Node, gm: torch.fx.GraphModule, is_observer: Callable[[nn.Module], bool]) -> Optional[str]:
    """"qk", "pv" or None (see the module docstring). Both operands of an attention matmul are
    activations: a matmul with a weight (a projection written as ``x @ w``) is not attention."""
    if len(matmul.args) < 2 or not all(isinstance(a, Node) and _is_activation(a, gm, is_observer)
                                       for a in matmul.args[:2]):
        return None
    left = source(matmul.args[0], gm, is_observer)
    if _is_softmax(left, gm):
        return "pv"
    if _reaches_softmax(matmul, gm):
        return "qk"
    return None


def scope(node: Node) -> str:
    """The name of the innermost module a traced node ran in ("" at the top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def operand_sites(gm: torch.fx.GraphModule,
                  is_observer: Callable[[nn.Module], bool]) -> dict[tuple[Node, int], tuple[str, str]]:
    """{(matmul node, argument index): (attention scope, tag)} for every attention matmul operand."""
    found: dict[tuple[Node, int], tuple[str, str]] = {}
    for node in gm.graph.nodes:
        if not is_matmul(node) or len(node.args) < 2:
            continue
        role = attention_role(node, gm, is_observer)
        if role is None:
            continue
        name = scope(node) or node.name
        tags = ("q", "k") if role == "qk" else ("softmax", "v")
        for index, tag in enumerate(tags):
            found[(node, index)] = (name, tag)
    return found


def set_module(gm: torch.fx.GraphModule, name: str, module: nn.Module) -> None:
    """Put ``module`` at dotted path ``name`` of ``gm`` (replacing what is there), creating empty
    parents an exported module does not have (a scope with no parameters of its own)."""
    parent, _, attr = name.rpartition(".")
    owner = gm
    for part in parent.split(".") if parent else ():
        if not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    if isinstance(owner, torch.fx.GraphModule) and owner is not gm:
        raise ValueError(f"cannot place a module inside the nested GraphModule '{parent}'")
    setattr(owner, attr, module)
