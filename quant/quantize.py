"""`vtprune quantize`: read a bundle's fp32 graphs, write quantized variants beside them, register them.

Over 400 lines on purpose: the quantizers share what stays float (score path, activation MatMuls) and one write path.

Variants (ONNX Runtime's own quantizers, no hand-written ones):
  int8          dynamic: int8 per-channel weights, uint8 activations quantized at run time (MatMulInteger,
                the U8S8 kernel the CPU runs fastest); the graph `quantize_dynamic` writes, made one weight at a
                time with ORT's own `quantize_data` (quant/int8_stream.py), so a 7B graph quantizes in a few GB;
  int8-static   `quantize_static`, QDQ: int8 per-channel weights, uint8 activations with ranges calibrated on
                real inputs (embedded training-split images and prompts, fed through the fp32 pipeline),
                float outputs (the CPU runs DQ -> MatMul as MatMulIntegerToFloat);
  int4          MatMulNBits: weight-only, symmetric, block 128 (`--block-size 32`: `int4-b32`; block 128 decodes
                1.3x faster on this CPU at the same accuracy on the embedded test split, and bundles from before
                this default name their block-32 int4 `int4`, which their recipe says), the LM head's Gemm too,
                accuracy_level 4 (int8 activations inside MatMulNBits on the CPU); made one weight at a time
                with ORT's own block quantizer (quant/nbits.py), so a 7B graph quantizes in a few GB;
  trt-fp16/int8 TensorRT through ONNX Runtime's TensorRT provider (quant/tensorrt.py; NVIDIA GPUs only).
Only MatMul/Gemm with constant weights are quantized. What stays float, on purpose:
  - the model-local functions `ai.vtprune::LongTailSplit`, `PrefillSelect`, `KVEvict` (the quantizers skip
    nodes of a domain they do not know; the functions are carried over unchanged);
  - activation x activation MatMuls (QK^T, probs x V; `activation_matmuls`): the H2O scores are sums of
    those probabilities;
  - Stage 1's score path: the CLS query, the key projection and the attention that produce `cls_scores`
    (`score_path_nodes`), so quantization moves the split point only through the layers before it.
Each variant is `<graph>.<precision>.onnx`, checked, checksummed and recorded in `manifest["graphs"]`;
files are staged in a hidden folder inside the bundle and renamed in, then the manifest is rewritten whole.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from vtprune.errors import UserError
from vtprune.export.bundle import graph_entry, save_onnx, write_manifest
from vtprune.export.graph_order import sort_nodes
from vtprune.export.staging import bundle_lock, clean_stale, stage_dir
from vtprune.quant import INT4_BLOCK
from vtprune.runtime.bundle import Bundle

GRAPHS = ("vision", "decoder")
PRECISIONS = ("int8", "int8-static", "int4", "trt-fp16", "trt-int8")
QUANT_OPS = ["MatMul", "Gemm"]
EXTERNAL_DATA_THRESHOLD = 2000 * 1024 * 1024  # the protobuf limit is 2 GB; as `vtprune export` defaults
CALIBRATION_NEW_TOKENS = 8  # decode steps recorded per calibration prompt (plus its prefill)
# Ops a score path may pass through between a weight MatMul and the attention that makes the scores.
_PASSTHROUGH = {"Add", "Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Mul", "Div", "Cast"}


# ----------------------------------------------------------------------------------------- names


def variant_name(precision: str, block_size: int = INT4_BLOCK) -> str:
    """The manifest key (and file infix) of a variant: int4 at block 32 is `int4-b32`."""
    if precision not in PRECISIONS:
        raise UserError("--precision", f"expected one of {', '.join(PRECISIONS)} (int4 with --block-size 32 "
                                       f"makes int4-b32), got {precision!r}")
    if precision == "int4" and block_size != INT4_BLOCK:
        return f"int4-b{block_size}"
    return precision


def default_graphs(precision: str) -> str:
    """int4 leaves the vision graph at fp32: on 200 embedded test images INT4 vision kept fp32's k on 81.5%
    (int8: 94.5%), since Stage 1's split is a knife edge; the vision tower is 5% of a 7B model's weights."""
    return "decoder" if precision == "int4" else "vision,decoder"


def parse_graphs(text: str) -> list[str]:
    graphs = [g.strip() for g in text.split(",") if g.strip()]
    bad = [g for g in graphs if g not in GRAPHS]
    if not graphs or bad:
        raise UserError("--graphs", f"expected a comma-separated subset of {','.join(GRAPHS)}, got {text!r}")
    return list(dict.fromkeys(graphs))


# ----------------------------------------------------------------------------------------- what stays float


def score_path_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that compute Stage 1's CLS scores from the score layer's input: they stay float.

    The nodes that feed `LongTailSplit`'s scores and nothing else (CLS query, QK^T, softmax, head mean),
    plus the weight MatMuls that feed those through shape and bias ops (the query and key projections,
    the key one shared with the layer's own attention). Empty for a graph without Stage 1.
    """
    nodes = list(model.graph.node)
    split = next((i for i, n in enumerate(nodes) if n.op_type == "LongTailSplit"), None)
    if split is None:
        return []
    producer = {out: i for i, n in enumerate(nodes) for out in n.output}
    weights = {init.name for init in model.graph.initializer}

    def ancestors(tensors) -> set[int]:  # stops at the split: what feeds it is the question, not the answer
        seen: set[int] = set()
        stack = [producer[t] for t in tensors if t in producer]
        while stack:
            i = stack.pop()
            if i not in seen and i != split:
                seen.add(i)
                stack += [producer[t] for t in nodes[i].input if t in producer]
        return seen

    scores_name = nodes[split].input[0]
    scores = ancestors([scores_name])
    others = [t for i, n in enumerate(nodes) if i not in scores and i != split for t in n.input]
    elsewhere = ancestors(others + [o.name for o in model.graph.output if o.name != scores_name])
    keep = scores - elsewhere
    stack = [producer[t] for i in keep for t in nodes[i].input if t in producer]
    while stack:  # up through bias/shape ops to the projections that feed the score attention
        i = stack.pop()
        node = nodes[i]
        if i in keep:
            continue
        if node.op_type in ("MatMul", "Gemm") and any(t in weights for t in node.input[1:]):
            keep.add(i)
        elif node.op_type in _PASSTHROUGH:
            stack += [producer[t] for t in node.input if t in producer]
    return [nodes[i].name for i in sorted(keep)]


def activation_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul/Gemm nodes whose second input is not a weight (QK^T, probs x V, PrefillSelect's E E^T).

    ONNX Runtime's QDQ quantizer ignores `MatMulConstBOnly` (only its QOperator path reads it) and would
    quantize the attention probabilities the H2O scores are summed from; naming them keeps them float.
    """
    weights = {init.name for init in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in QUANT_OPS and n.input[1] not in weights]


def keep_float_inputs(model: onnx.ModelProto, source: onnx.ModelProto, names: list[str]) -> int:
    """Point the named nodes back at their float inputs; returns how many inputs were restored.

    QDQ quantization rewires every consumer of a quantized tensor to its dequantized copy, the excluded
    nodes included (the score path shares its key projection's input and its query weight with the
    layer's attention). The float tensors are still in the graph (activations) or in the source graph
    (weights, added back as initializers).
    """
    src_nodes = {n.name: n for n in source.graph.node}
    src_inits = {i.name: i for i in source.graph.initializer}
    available = ({o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
                 | {i.name for i in model.graph.initializer})
    restored = 0
    for node in model.graph.node:
        original = src_nodes.get(node.name)
        if node.name not in names or original is None:
            continue
        for k, name in enumerate(original.input):
            if node.input[k] == name:
                continue
            if name not in available:
                model.graph.initializer.append(src_inits[name])
                available.add(name)
            node.input[k] = name
            restored += 1
    return restored


# ----------------------------------------------------------------------------------------- quantizers


@contextlib.contextmanager
def quiet_quantizer_logs():
    """ORT's quantizers log every node at INFO and advise a pre-processing step we skip on purpose
    (its graph optimizations would inline the ai.vtprune functions); keep the user's terminal readable."""
    import onnxruntime as ort

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    ort.set_default_logger_severity(3)  # the quantizers' own sessions on their augmented graphs
    try:
        yield
    finally:
        root.setLevel(level)
        ort.set_default_logger_severity(2)


def quantize_int8_static(src: Path, dst: Path, feeds: list[dict], exclude: list[str], external: bool) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from vtprune.quant.int8_stream import REDUCE_RANGE  # 7-bit weights: right on CPUs without VNNI too

    with quiet_quantizer_logs():
        quantize_static(
            src, dst, FeedReader(feeds), quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANT_OPS,
            per_channel=True, reduce_range=REDUCE_RANGE, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude, use_external_data_format=external, calibrate_method=CalibrationMethod.MinMax,
            # Outputs stay float, so ORT fuses DQ -> MatMul into MatMulIntegerToFloat (U8S8; S8S8 QDQ was left
            # half-fused and ran 3x slower than fp32 on this CPU). Not CalibMaxIntermediateOutputs: ORT 1.32
            # drops the batches it flushes without merging their ranges (PR #20226 was never merged); MinMax
            # keeps two scalars per tensor and run anyway.
            extra_options={"MatMulConstBOnly": True, "OpTypesToExcludeOutputQuantization": QUANT_OPS},
        )


class FeedReader:
    """A `CalibrationDataReader` over recorded feeds (ORT only calls `get_next` until it returns None)."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self) -> dict | None:
        return next(self._feeds, None)


# ----------------------------------------------------------------------------------------- calibration


class _RecordingSession:
    """Stands in for the fp32 decoder session and keeps a copy of the feeds of chosen calls."""

    def __init__(self, session, keep_calls: int):
        self.session = session
        self.keep_calls = keep_calls
        self.calls = 0
        self.feeds: list[dict] = []

    def run(self, names, feed):
        if self.calls < self.keep_calls:
            self.feeds.append({k: np.asarray(v) for k, v in feed.items()})
        self.calls += 1
        return self.session.run(names, feed)

    def __getattr__(self, name):  # get_outputs, get_providers, ...
        return getattr(self.session, name)


def calibration_feeds(bundle: Bundle, graphs: list[str], n: int) -> dict[str, list[dict]]:
    """Real inputs for each graph from `n` training-split samples of the embedded question set.

    vision: the preprocessed images; decoder: the prefill and the first decode steps of the fp32
    pipeline answering each sample's question (so the cache, the budgets and the positions are real).
    """
    from tqdm import tqdm

    from vtprune.models.embedded.data import make_sample
    from vtprune.runtime.generate import Pipeline
    from vtprune.models.preprocess import preprocess

    pipe = Pipeline(bundle, "fp32", "cpu", threads=1)
    feeds: dict[str, list[dict]] = {g: [] for g in graphs}
    for i in tqdm(range(n), desc="calibration", unit="sample", disable=None):
        sample = make_sample("train", seed=0, index=i)
        pixels = preprocess(sample.image, pipe.preprocess)  # [1, 3, H, W]
        if "vision" in feeds:
            feeds["vision"].append({"pixel_values": pixels, "k_min": np.array(pipe.prune.k_min, np.int64)})
        if "decoder" in feeds:
            recorder = _RecordingSession(pipe.decoder, keep_calls=1 + CALIBRATION_NEW_TOKENS)
            pipe.decoder = recorder
            try:
                pipe.generate(pipe.tokenizer.build(sample.question, pipe.template), pixels,
                              max_new_tokens=CALIBRATION_NEW_TOKENS + 1, stop_at_eos=False)
            finally:
                pipe.decoder = recorder.session
            feeds["decoder"] += recorder.feeds
    return feeds


# ----------------------------------------------------------------------------------------- the bundle


def write_variant(bundle: Bundle, graph: str, precision: str, build, recipe: dict, register: bool = True) -> dict:
    """Build `<graph>.<precision>.onnx` in a stage folder inside the bundle (`build(stage)` returns the graph,
    its large weights possibly already streamed into the stage), save and check it, move it in, record it
    (`register=False`: the caller registers several variants in one manifest write, `register_variants`)."""
    root = bundle.root
    stage = stage_dir(root, f"{graph}.{precision}")
    try:
        proto = build(stage)
        files = save_onnx(proto, stage / f"{graph}.{precision}.onnx", EXTERNAL_DATA_THRESHOLD)
        del proto
        entry = graph_entry(stage, files, precision)
        entry["quantization"] = recipe
        for name in files:
            os.replace(stage / name, root / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if register:
        register_variants(bundle, {graph: entry}, precision)
    return entry


def register_variants(bundle: Bundle, entries: dict[str, dict], precision: str) -> None:
    """Record variants in manifest.json: read from disk, modified, renamed over (under `bundle_lock`, so another
    quantize's variants, registered meanwhile, are kept); `bundle.manifest` follows."""
    root = bundle.root
    manifest = Bundle.open(root).manifest  # what is on disk now, validated
    old = {graph: manifest["graphs"][graph].get(precision) for graph in entries}
    for graph, entry in entries.items():
        manifest["graphs"][graph][precision] = entry
    write_manifest(root, manifest)
    bundle.manifest.clear()
    bundle.manifest.update(manifest)
    for graph, entry in entries.items():  # a replaced variant may have had an external-data file the new one does not
        for name in set((old[graph] or {}).get("sha256", {})) - set(entry["sha256"]):
            if name not in _files_in_use(manifest):
                (root / name).unlink(missing_ok=True)


def _files_in_use(manifest: dict) -> set[str]:
    return {name for variants in manifest["graphs"].values() for e in variants.values() for name in e.get("sha256", {})}


def quantize_graph(bundle: Bundle, graph: str, precision: str, block_size: int, feeds: list[dict] | None,
                   register: bool = True) -> dict:
    """One fp32 graph -> one variant, written and registered. Returns its manifest entry."""
    src = bundle.graph(graph, "fp32")  # checksums verified
    external = bundle.manifest["graphs"][graph]["fp32"].get("external_data") is not None
    structure = onnx.load(src, load_external_data=False)
    exclude = list(dict.fromkeys(score_path_nodes(structure) + activation_matmuls(structure)))
    name = f"{graph}.{variant_name(precision, block_size)}.onnx"
    if precision in ("int4", "int8"):  # streamed, one weight at a time
        from tqdm import tqdm

        from vtprune.quant.int8_stream import quantize_int8
        from vtprune.quant.nbits import quantize_int4

        def build(stage):
            with tqdm(desc=f"{graph} {precision}", unit="weight", disable=None, leave=False) as bar:
                if precision == "int8":
                    return quantize_int8(src, stage, name, exclude, progress=bar)
                return quantize_int4(src, stage, name, block_size, exclude, progress=bar)

        if precision == "int8":
            recipe = {"tool": "vtprune.quant.int8_stream (onnxruntime quant_utils.quantize_data per channel; the graph "
                              "quantize_dynamic writes)", "weights": "int8 per-channel, 7-bit range (reduce_range)", "activations": "uint8, dynamic",
                      "op_types": QUANT_OPS}
        else:
            recipe = {"tool": "vtprune.quant.nbits (onnxruntime DefaultWeightOnlyQuantizer.qbits_block_quant per weight)",
                      "weights": "int4 symmetric", "block_size": block_size, "accuracy_level": 4, "op_types": QUANT_OPS}
        recipe.update(float_nodes=exclude)
        return write_variant(bundle, graph, variant_name(precision, block_size), build, recipe, register)
    else:
        scratch = stage_dir(bundle.root, graph, kind="quantize")
        try:
            src = _copied_into(scratch, bundle, graph)  # ORT writes its `<src>-inferred.onnx` beside the source
            raw = scratch / f"{graph}.q.onnx"
            quantize_int8_static(src, raw, feeds, exclude, external)
            recipe = {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                      "weights": "int8 per-channel, 7-bit range (reduce_range)", "activations": "uint8, MinMax-calibrated", "outputs": "float",
                      "calibration": f"{len(feeds)} feeds from vtprune.models.embedded.data's train split (seed 0)"}
            proto = onnx.load(raw)
            sort_nodes(proto.graph)  # ORT's quantizer orders nodes by their explicit inputs only (export/graph_order.py)
            if exclude:
                keep_float_inputs(proto, onnx.load(src), exclude)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    recipe.update(op_types=QUANT_OPS, float_nodes=exclude)
    return write_variant(bundle, graph, variant_name(precision, block_size), lambda stage: proto, recipe, register)


def _copied_into(scratch: Path, bundle: Bundle, graph: str) -> Path:
    """The fp32 graph (and its external data) copied into the scratch folder, so every file ONNX Runtime's
    quantizers write beside their input lands there and goes with it. Copied, not hard-linked: onnx's checker
    refuses external data with more than one link (a hard-link attack, to it)."""
    entry = bundle.manifest["graphs"][graph]["fp32"]
    for name in entry["sha256"]:
        target = scratch / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle.root / name, target)
    return scratch / entry["file"]


def graph_bytes(bundle: Bundle, entry: dict) -> int:
    return sum((bundle.root / name).stat().st_size for name in entry["sha256"])


def main(args) -> dict:
    root = Path(args.bundle)
    if not root.is_dir():
        Bundle.open(root)  # the one error for a missing folder
    with bundle_lock(root):  # one writer at a time: the manifest is read, extended and renamed under it
        clean_stale(root)  # staging folders of quantize runs that were killed
        return _main(args)


def _main(args) -> dict:
    bundle = Bundle.open(args.bundle)
    if args.precision is None and not args.report:
        raise UserError("--precision", f"expected one of {', '.join(PRECISIONS)} (or --report)")
    result: dict = {"bundle": str(bundle.root)}
    if args.precision is not None:
        precision = variant_name(args.precision, args.block_size)
        if args.block_size != INT4_BLOCK and args.precision != "int4":
            raise UserError("--block-size", f"applies to int4 only (got --precision {args.precision})")
        graphs = parse_graphs(args.graphs or default_graphs(args.precision))
        if args.calibration_samples < 1:
            raise UserError("--calibration-samples", f"expected an integer >= 1, got {args.calibration_samples}")
        for g in graphs:  # every source graph whole before anything is written: no half-quantized bundle
            bundle.graph(g, "fp32")
        try:
            if precision.startswith("trt-"):
                from vtprune.quant.tensorrt import build_trt_variant

                entries = {g: build_trt_variant(bundle, g, precision) for g in graphs}
            else:
                feeds = calibration_feeds(bundle, graphs, args.calibration_samples) if precision == "int8-static" else {}
                entries = {g: quantize_graph(bundle, g, args.precision, args.block_size, feeds.get(g), register=False)
                           for g in graphs}
                register_variants(bundle, entries, precision)  # every graph's variant in one manifest write
        except OSError as e:  # a read-only bundle, a full disk: each variant is staged and renamed, so none is half-written
            raise UserError(str(bundle.root), f"cannot write the {precision} variant: {e.strerror or e}") from None
        except DecodeError as e:  # ORT's scratch copy of the graph cut short (a full disk while it wrote it)
            raise UserError(str(bundle.root), f"cannot write the {precision} variant: a scratch graph was cut short "
                                              f"(disk full?): {e}") from None
        result["precision"] = precision
        result["variants"] = {
            g: {"file": e["file"], "bytes": graph_bytes(bundle, e),
                "fp32_bytes": graph_bytes(bundle, bundle.manifest["graphs"][g]["fp32"])}
            for g, e in entries.items()
        }
        if not args.json:
            for g, v in result["variants"].items():
                print(f"wrote {v['file']}: {v['bytes'] / 1e6:.2f} MB (fp32 {v['fp32_bytes'] / 1e6:.2f} MB)")
    if args.report:
        from vtprune.quant.report import quantization_report

        out = Path(args.out) if args.out else bundle.root / "report"
        result["report"] = quantization_report(bundle, out, limit=args.limit, seed=args.seed,
                                               provider=args.provider, threads=args.threads)
        if not args.json:
            from vtprune.quant.report import print_report

            print_report(result["report"])
    return result
