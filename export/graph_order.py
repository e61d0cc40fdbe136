"""Graph order with subgraphs: what an If branch reads from the graph around it counts as its node's input.

ONNX's checker wants every value made before a node reads it, an If node's branches included; tools that sort
by explicit inputs only (ONNX Runtime's quantizer, the fp16 converter's appended casts) can place the node
that makes such a value after the If that reads it. The in-place decoder's attention is such an If
(export/inplace.py)."""

from __future__ import annotations

import heapq

import onnx


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The graphs a node's attributes hold (an If's branches, a Loop's body)."""
    return [g for a in node.attribute for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs)]


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """The names `node` reads from its graph: its inputs, and what its subgraphs read without making it."""
    names = set(node.input)
    for sub in subgraphs(node):
        made = {i.name for i in sub.input} | {t.name for t in sub.initializer} | {o for n in sub.node for o in n.output}
        names |= {name for n in sub.node for name in outer_reads(n)} - made
    return names


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Order `graph`'s nodes topologically, counting `outer_reads`; among the nodes free to go, the earliest
    first, so an ordered graph stays as it is (Kahn's algorithm on a heap of positions)."""
    nodes = list(graph.node)
    maker = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{maker[x] for x in outer_reads(n) if x in maker and maker[x] != i} for i, n in enumerate(nodes)]
    readers: list[list[int]] = [[] for _ in nodes]
    for i, deps in enumerate(needs):
        for d in deps:
            readers[d].append(i)
    left = [len(d) for d in needs]
    free = [i for i, k in enumerate(left) if k == 0]
    heapq.heapify(free)
    order = []
    while free:
        i = heapq.heappop(free)
        order.append(i)
        for r in readers[i]:
            left[r] -= 1
            if left[r] == 0:
                heapq.heappush(free, r)
    order += [i for i in range(len(nodes)) if left[i] > 0]  # a cycle: left as it was, for the checker to name
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
