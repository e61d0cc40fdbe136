"""`vtprune` command line: one parser, each command handled by the stage that owns it.

Command modules are imported only when their command runs, so `vtprune plan` never imports torch.
A handler returns a dict (printed as one JSON object with --json) or None. Errors a user can fix are
`UserError`s: one line on stderr, exit code 2, no traceback unless --debug.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from vtprune import __version__
from vtprune.benchmarks.hardware import PRESETS as HARDWARE_PRESETS  # torch-free tables, cheap to import
from vtprune.benchmarks.memory import WEIGHT_BITS
from vtprune.errors import UserError
from vtprune.models.shapes import PRESETS as SHAPE_PRESETS
from vtprune.models.config import POLICIES, PruneConfig  # torch-free
from vtprune.quant import INT4_BLOCK

# command -> "module:function"; the function takes the parsed args and returns a dict or None.
HANDLERS = {
    "demo": "vtprune.demo:main",
    "run": "vtprune.cli_run:main",
    "chat": "vtprune.cli_chat:main",
    "serve": "vtprune.serve:main",
    "triton": "vtprune.cli_triton:main",
    "train": "vtprune.models.embedded.train:main",
    "eval": "vtprune.benchmarks.evaluate:main",
    "export": "vtprune.export.bundle:main",
    "quantize": "vtprune.quant.quantize:main",
    "bench": "vtprune.benchmarks.bench:main",
    "roofline": "vtprune.benchmarks.roofline_cli:main",
    "plan": "vtprune.benchmarks.plan:main",
}


def _add_prune_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning (the paper's, but for Stage 2's budget and policy: see --policy)")
    g.add_argument("--no-prune", action="store_true", help="turn both stages off (the unpruned LLaVA)")
    g.add_argument("--no-visual-prune", action="store_true", help="turn Stage 1 (inside the ViT) off")
    g.add_argument("--no-text-prune", action="store_true", help="turn Stage 2 (prefill cut + decode eviction) off")
    g.add_argument("--prune-layer", type=int, default=3, help="CLIP layer whose CLS attention Stage 1 reads (default 3)")
    g.add_argument("--alpha", type=float, default=0.075, help="the paper's smoothing coefficient α (default 0.075)")
    g.add_argument("--k-min", type=int, default=1, help="fewest visual tokens Stage 1 keeps (default 1)")
    g.add_argument("--heavy-ratio", type=float, default=PruneConfig.heavy_ratio,
                   help=f"Stage 2 heavy-hitter budget, share of the prompt (default {PruneConfig.heavy_ratio}; the paper's 0.5)")
    g.add_argument("--recent-ratio", type=float, default=PruneConfig.recent_ratio,
                   help=f"Stage 2 recent-window budget, share of the prompt (default {PruneConfig.recent_ratio}; the paper's 0.5)")
    g.add_argument("--heavy-budget", type=int, default=None, help="absolute heavy budget (overrides the ratio)")
    g.add_argument("--recent-budget", type=int, default=None, help="absolute recent budget (overrides the ratio)")
    g.add_argument("--policy", choices=POLICIES, default=None,
                   help="what Stage 2's eviction ranks by (default: the model card's; h2o is the paper's); a bundle's is fixed at export")
    g.add_argument("--snap-window", type=int, default=None, help="snapkv: observation window, prompt tokens")
    g.add_argument("--visual-floor", type=float, default=None, help="vfloor: share of the cache budget kept for image tokens")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=64, help="longest answer, tokens (default 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1: off)")
    g.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse, but a usage error is one line (design.md: `vtprune: error: <option>: <what>`)."""

    def error(self, message):
        print(f"vtprune: error: {_option_first(message)}", file=sys.stderr)
        raise SystemExit(2)


def _option_first(message: str) -> str:
    """argparse's messages reworded to start with the option they are about: `--alpha: invalid float value: 'x'`."""
    if message.startswith("argument "):  # "argument --alpha: invalid float value: 'x'"
        option, _, what = message[len("argument ") :].partition(": ")
        return f"{option.split('/')[0]}: {what}"
    for prefix, what in (("the following arguments are required: ", "required"), ("unrecognized arguments: ", "unrecognized")):
        if message.startswith(prefix):  # "unrecognized arguments: --foo 3"
            names = message[len(prefix) :]
            return f"{names.split(', ')[0].split(' ')[0]}: {what} ({message})"
    return message


# Packages outside the core install (pyproject.toml) -> the extra that brings them.
EXTRA_OF = {name: "export" for name in ("torch", "transformers", "onnx", "onnxscript", "safetensors", "matplotlib",
                                        "huggingface_hub")}
EXTRA_OF.update(fastapi="serve", uvicorn="serve", tritonclient="triton", bitsandbytes="bnb", tensorrt="tensorrt")


# Choices listed in --help; each table is the one its command reads (tests/test_cli_options.py checks they agree).
HARDWARE = [*HARDWARE_PRESETS, "cpu"]
MODEL_PRESETS = list(SHAPE_PRESETS)
WEIGHT_PRECISIONS = list(WEIGHT_BITS)
QUANT_PRECISIONS = ["int8", "int8-static", "int4", "trt-fp16", "trt-int8"]  # quant/quantize.py PRECISIONS (imports onnx)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="vtprune", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_OneLineErrors)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        return p

    p = command("demo", "the embedded model's bundle answers a question about a sample image (ONNX Runtime, no torch), "
                        "with its figures; --compare runs the PyTorch reference beside it")
    p.add_argument("--out", default="vtprune-demo", help="folder for the sample and the PNGs (default: ./vtprune-demo)")
    p.add_argument("--bundle", default=None, help="ONNX bundle folder (default: the embedded model's, shipped in the package)")
    p.add_argument("--precision", default="fp32", help="bundle variant: fp32 or int8 (the shipped bundle has both)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None, help="ONNX Runtime provider (default: the best available)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime (and, with --compare, torch) threads (default 0: all cores)")
    p.add_argument("--compare", action="store_true", help="also run the PyTorch reference (needs the [export] extra): same answer, speed-up")
    p.add_argument("--decode-steps", type=int, default=32, help="decode steps timed for ms/token (default 32)")
    p.add_argument("--model", default=None, help="llava-hf folder of the reference for --compare (default: the embedded checkpoint)")
    _add_generation_args(p)

    p = command("run", "answer a prompt about an image (torch reference or an ONNX bundle)")
    p.add_argument("--model", default=None, help="llava-hf checkpoint folder (default: the embedded model)")
    p.add_argument("--bundle", default=None, help="ONNX bundle folder (runs with ONNX Runtime)")
    p.add_argument("--backend", choices=["torch", "onnx"], default=None, help="default: onnx with --bundle, else torch")
    p.add_argument("--precision", default=None, help="bundle variant: fp32, int8, int8-static, int4, ... (default fp32; needs --bundle)")
    p.add_argument("--prefill-precision", default=None, metavar="VARIANT",
                   help="run the prompt on another decoder variant (e.g. int8 with --precision int4: int8 prefills faster on a "
                        "CPU, int4 decodes faster; both variants' weights are then in memory; needs --bundle)")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None, help="ONNX Runtime provider (--bundle; default: the best available)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime or torch threads (default 0: all cores)")
    p.add_argument("--bnb", choices=["int8", "nf4"], default=None, help="bitsandbytes weights (torch backend)")
    p.add_argument("--image", required=False, default=None, help="the image file (default, with no --prompt either: the sample)")
    p.add_argument("--prompt", required=False, default=None, help="the question; the image token is added if absent")
    p.add_argument("--no-stream", action="store_true", help="print the answer once complete, not token by token")
    _add_prune_args(p)
    _add_generation_args(p)

    for name, help in (("chat", "talk about an image on a bundle: the image encoded once, each turn reuses the KV cache"),
                       ("serve", "an OpenAI-compatible chat-completions server on a bundle (127.0.0.1 by default)")):
        p = command(name, help)
        p.add_argument("--bundle", required=True, help="ONNX bundle folder (written by `vtprune export`)")
        p.add_argument("--precision", default="fp32", help="bundle variant: fp32, int8, int8-static, int4, ...")
        p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None, help="ONNX Runtime provider (default: the best available)")
        p.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (default 0: all cores)")
        if name == "chat":
            p.add_argument("--image", default=None, help="the image to talk about (default: the bundle's sample)")
            p.add_argument("--turns", choices=["conversation", "independent"], default="conversation",
                           help="conversation: each turn sees the turns before (LLaVA-1.5's template); independent: each "
                                "question sees only the image, whose cache is shared (as the embedded model was trained)")
        else:
            p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
            p.add_argument("--port", type=int, default=8080, help="TCP port (default 8080)")
            p.add_argument("--queue-size", type=int, default=16, help="requests waiting beyond this answer 503")
            p.add_argument("--model-name", default=None, help="the model id /v1/models lists (default: the bundle folder's name)")
        _add_prune_args(p)
        _add_generation_args(p)

    p = command("triton", "write a Triton Inference Server model repository (ONNX Runtime backend) from a bundle")
    p.add_argument("--bundle", required=True, help="ONNX bundle folder (written by `vtprune export`)")
    p.add_argument("--out", required=True, help="new folder for the model repository")
    p.add_argument("--precision", default="fp32", help="bundle variant: fp32, int8, int4, ...")
    p.add_argument("--kind", choices=["KIND_GPU", "KIND_CPU"], default="KIND_GPU", help="instance kind of the graphs")
    p.add_argument("--instances", type=int, default=1, help="instances of each model (requests run in parallel across them)")

    p = command("train", "train the embedded model (reproduces the shipped checkpoint)")
    p.add_argument("--out", required=True, help="new folder for the trained checkpoint (never the shipped one)")
    p.add_argument("--minutes", type=float, default=None, help="wall-clock budget (default 120; 15 with --finetune-pruned)")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (default 0)")
    p.add_argument("--finetune-pruned", action="store_true", help="pruning-aware fine-tuning (soft keep-mask, α)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: leave a core to others)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default 8)")
    p.add_argument("--turns", type=int, default=8, help="question/answer turns per image")
    p.add_argument("--vision-share", type=float, default=0.2, help="share of the time for stage A (vision only)")
    p.add_argument("--eval-n", type=int, default=100, help="validation items per periodic evaluation")
    p.add_argument("--eval-every", type=float, default=10.0, help="minutes between validation evaluations")
    p.add_argument("--log", default=None, help="append JSON lines of the training history here")
    p.add_argument("--init", default=None, help="start from this checkpoint (stage A then runs --vision-share more)")
    p.add_argument("--freeze-vision", action="store_true", help="stage B: no more vision training at all")
    p.add_argument("--pooled-share", type=float, default=0.4, help="share of stage B on pooled visual tokens")
    p.add_argument("--no-grounding", action="store_true", help="no attention supervision on the asked objects")
    p.add_argument("--drop-share", type=float, default=0.7,
                   help="share of the steps on all 576 tokens that keep only the objects and some background")
    p.add_argument("--alpha", type=float, default=0.075, help="--finetune-pruned: temperature of the soft keep-mask")

    p = command("eval", "accuracy on the embedded question set")
    p.add_argument("--model", default=None, help="llava-hf checkpoint folder (default: the embedded model)")
    p.add_argument("--bundle", default=None, help="ONNX bundle folder (methods full and vtprune)")
    p.add_argument("--precision", default="fp32", help="bundle variant: fp32, int8, int8-static, int4, ...")
    p.add_argument("--bnb", choices=["int8", "nf4"], default=None, help="bitsandbytes weights (PyTorch reference)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="data split (default test)")
    p.add_argument("--seed", type=int, default=None, help="split seed (default 0)")
    p.add_argument("--limit", type=int, default=None, help="first N items of the split (default 250: 50 per kind)")
    p.add_argument("--method", choices=["full", "vtprune", "topk", "prumerge", "visionzip"], default="vtprune",
                   help="full: all 576 tokens; vtprune: both stages; topk, visionzip (need --tokens), prumerge: Stage-1 baselines")
    p.add_argument("--tokens", type=int, default=None, help="visual tokens for the fixed-count baselines (PruMerge without it: its IQR rule)")
    p.add_argument("--sweep", action="store_true", help="run every method; the baselines at vtprune's mean token count; vtprune also without Stage 2")
    p.add_argument("--out", default=None, help="write JSON + PNG (accuracy vs visual tokens, every eval-*.json in the folder) here")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                   help="ONNX Runtime provider (--bundle; default: the best available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads, or ONNX Runtime's with --bundle (default: torch's; all cores for ONNX Runtime)")
    _add_prune_args(p)

    p = command("export", "export a llava-hf checkpoint to an ONNX bundle")
    p.add_argument("--model", default=None, help="llava-hf checkpoint folder or ORG/NAME (default: the embedded model)")
    p.add_argument("--out", required=True, help="new folder for the bundle")
    p.add_argument("--opset", type=int, default=24, help="ONNX opset (default 24; the fused decoder form needs >= 24, "
                                                         "the ai.vtprune functions >= 18)")
    p.add_argument("--fp16", action="store_true", help="also write fp16 variants of both graphs (precision fp16)")
    p.add_argument("--decoder-form", choices=["fused", "portable", "ort", "inplace"], default="fused",
                   help="fused (default): ONNX opset 24's Attention, RotaryEmbedding, RMSNormalization and Swish; portable: "
                        "the same layer in older standard ops (runtimes before opset 24); ort: ONNX Runtime's GroupQueryAttention, "
                        "RotaryEmbedding and SkipSimplifiedLayerNormalization (ONNX Runtime only); inplace: standard ops, the "
                        "KV cache as fixed buffers each step writes in place (IO binding; not with --policy vfloor)")
    p.add_argument("--external-data-threshold-mb", type=float, default=256, metavar="MB",
                   help="graphs whose weights exceed this many MB stream them into ONNX external data (default 256; the protobuf limit is 2048)")
    _add_prune_args(p)

    p = command("quantize", "add INT8 / INT4 / TensorRT variants to a bundle")
    p.add_argument("--bundle", required=True, help="ONNX bundle folder (written by `vtprune export`)")
    p.add_argument("--precision", default=None, choices=QUANT_PRECISIONS,
                   help="variant to add: int8 (dynamic), int8-static (calibrated), int4 (MatMulNBits), trt-fp16, trt-int8 (TensorRT)")
    p.add_argument("--block-size", type=int, choices=[32, 128], default=INT4_BLOCK,
                   help="int4 quantization block (default 128; 32 makes the variant int4-b32)")
    p.add_argument("--graphs", default=None, metavar="vision,decoder",
                   help="graphs to quantize (default: both; int4 only the decoder: INT4 vision moves Stage 1's split, "
                        "benchmarks/results/*vision-k*.json)")
    p.add_argument("--calibration-samples", type=int, default=32, help="int8-static: training-split samples to calibrate on (default 32)")
    p.add_argument("--report", action="store_true", help="size, accuracy, visual tokens and decode speed of every variant")
    p.add_argument("--limit", type=int, default=None, help="test-split samples per variant in the report (default 50)")
    p.add_argument("--seed", type=int, default=0, help="test-split seed for the report")
    p.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default=None,
                   help="--report: ONNX Runtime provider of every variant it runs (default: the best available for "
                        "accuracy, cpu for the decode speed)")
    p.add_argument("--threads", type=int, default=None,
                   help="--report: ONNX Runtime threads (default: all cores for accuracy, 1 for the decode speed)")
    p.add_argument("--out", default=None, help="report folder (default: <bundle>/report; required for the shipped bundle)")

    p = command("bench", "measured latency beside the roofline and the peers")
    p.add_argument("--quick", action="store_true", help="one sample, one run, 8 new tokens, no peer")
    p.add_argument("--preset", default="embedded", help="embedded | llava-cpu-1b | llava-1.5-7b")
    p.add_argument("--out", default="vtprune-results/bench", help="folder for the JSON and PNGs (default: ./vtprune-results/bench)")
    p.add_argument("--repeats", type=int, default=3, help="runs per sample after the warm-up (medians)")
    p.add_argument("--samples", type=int, default=2, help="images + questions of the embedded test split")
    p.add_argument("--new-tokens", default=None,
                   help="comma-separated answer lengths decode speed is read at, the longest generated (default 32,256; "
                        "32 for llava-1.5-7b); 32,2048 shows the long answers eviction is for")
    p.add_argument("--threads", type=int, default=None, help="threads for every system (default: all cores)")
    p.add_argument("--setup-peer", action="store_true",
                   help="make the peers' own venvs and exit: onnxruntime-genai at $VTPRUNE_GENAI_VENV or ~/.cache/vtprune/genai-venv, "
                        "optimum-onnx at $VTPRUNE_OPTIMUM_VENV or ~/.cache/vtprune/optimum-venv")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)  # a llava-hf folder instead of --preset
    p.add_argument("--bundle", default=None, help=argparse.SUPPRESS)  # an existing bundle of that model

    p = command("roofline", "roofline predictions (the paper's Table 6, or a deployment)")
    p.add_argument("--table6", action="store_true", help="the paper's Table 6, cell by cell, predicted beside the paper")
    p.add_argument("--preset", default="llava-1.5-7b", choices=MODEL_PRESETS, help="model shape (default llava-1.5-7b)")
    p.add_argument("--hardware", default="rtx4090", type=str.lower, choices=HARDWARE,
                   help="hardware (default rtx4090; cpu: this machine, measured once and cached)")
    p.add_argument("--precision", default="fp16", choices=WEIGHT_PRECISIONS, help="weights as deployed (default fp16)")
    p.add_argument("--visual-tokens", type=int, default=576, help="visual tokens after Stage 1 (default 576: none pruned)")
    p.add_argument("--text-tokens", type=int, default=60, help="prompt text tokens (default 60)")
    p.add_argument("--new-tokens", type=int, default=256, help="answer tokens decoded (default 256)")
    p.add_argument("--png", default=None, help="also draw the roofline into this PNG")
    p.add_argument("--model", default=None, help="llava-hf checkpoint folder: its config.json instead of --preset")
    p.add_argument("--heavy-ratio", type=float, default=0.5, help="Stage 2 eviction budget (decode)")
    p.add_argument("--recent-ratio", type=float, default=0.5, help="Stage 2 eviction budget (decode)")

    p = command("plan", "does it fit: memory for a model, GPU, precision and context")
    p.add_argument("--model", default=None, help="llava-hf checkpoint folder or ORG/NAME: its config.json")
    p.add_argument("--preset", default=None, choices=MODEL_PRESETS, help="model shape (default llava-1.5-7b)")
    p.add_argument("--gpu", default="rtx4090", type=str.lower, choices=HARDWARE, help="device (default rtx4090; cpu: this machine)")
    p.add_argument("--memory-gb", type=float, default=None, help="memory to fit in (default: the device's)")
    p.add_argument("--precision", default="fp16", choices=WEIGHT_PRECISIONS, help="weights as deployed (default fp16)")
    p.add_argument("--context", type=int, default=4096, help="tokens of context the KV cache must hold (default 4096)")
    p.add_argument("--visual-tokens", type=int, default=576, help="visual tokens after Stage 1 (default 576)")
    p.add_argument("--text-tokens", type=int, default=60, help="prompt text tokens (the eviction budget is a ratio of the prompt)")
    p.add_argument("--heavy-ratio", type=float, default=0.5, help="Stage 2 heavy-hitter budget, share of the prompt")
    p.add_argument("--recent-ratio", type=float, default=0.5, help="Stage 2 recent-window budget, share of the prompt")
    for p in sub.choices.values():  # every --model also takes a Hugging Face id (ORG/NAME) from the local cache
        if "--model" in p._option_string_actions:
            p.add_argument("--download", action="store_true", help="let --model ORG/NAME download into the Hugging Face cache")
    return parser



def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed its one-line usage error
        return int(e.code or 0)
    module_name, func_name = HANDLERS[args.command].split(":")
    try:
        from vtprune.cli_run import check_values  # every command's numeric ranges, the prompt's UTF-8, --out

        check_values(args)
        check_combinations(args)
        check_outputs(args)
        if getattr(args, "model", None):
            from vtprune.models.loading import resolve_model

            args.model = str(resolve_model(args.model, download=args.download))
        handler = getattr(importlib.import_module(module_name), func_name)
        result = handler(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"vtprune: error: {e.where}: {e.what}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:  # the core install is the runtime: the rest comes with an extra
        extra = EXTRA_OF.get((e.name or "").split(".")[0])
        if extra is None or args.debug:
            raise
        print(f"vtprune: error: {args.command}: needs {e.name}, which the core install leaves out; "
              f"install it with `pip install 'vtprune[{extra}]'` (see the README for torch's CPU build)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("vtprune: interrupted", file=sys.stderr)
        return 130
    if args.json and result is not None:
        print(json.dumps(result, default=_json_default))
    return 0


PACKAGE_ROOT = Path(__file__).resolve().parent
# What ships inside the package and must never be written by a command (the embedded model and its bundle).
SHIPPED = ("models/embedded/checkpoint", "models/embedded/bundle")


def check_output(where: str, path: str | Path) -> None:
    """Refuse an output inside the installed package: an installed package is replaced by the next install, and
    its shipped model and bundle are what `vtprune demo` and the defaults run. In a source checkout (pyproject.toml
    beside this file) only the shipped folders are protected, so `--out benchmarks/results` still works there."""
    target = Path(path).expanduser().resolve()
    source_checkout = (PACKAGE_ROOT / "pyproject.toml").is_file()
    for root in [PACKAGE_ROOT / s for s in SHIPPED] if source_checkout else [PACKAGE_ROOT]:
        if target == root or root in target.parents:
            raise UserError(where, f"{path} is inside the installed vtprune package ({root}); expected a folder of your own")


def check_combinations(args) -> None:
    """Options that only make sense together, checked before any module of the command is imported; an ONNX Runtime
    provider that is not available here is refused now, not after the models and data have loaded."""
    if args.command == "eval" and args.provider is not None and args.bundle is None:
        raise UserError("--provider", "applies to an ONNX bundle (--bundle B); the PyTorch reference runs on torch's CPU")
    if args.command == "quantize" and not args.report:
        for option in ("provider", "threads"):
            if getattr(args, option) is not None:
                raise UserError(f"--{option}", "applies to --report (the variants it runs); quantizing runs on the CPU")
    if args.command in ("eval", "quantize") and args.provider is not None:
        from vtprune.runtime.session import providers_for  # imports onnxruntime: only when a provider is asked for

        providers_for(args.provider)
    if (args.command == "eval" and args.method in ("topk", "visionzip") and args.tokens is None and not args.sweep
            and args.bundle is None):  # on a bundle, eval's own check says the baselines need the reference
        raise UserError("--tokens", f"--method {args.method} keeps a fixed number of visual tokens: give --tokens K "
                                    "(e.g. vtprune's mean, about 42 on the embedded model), or --sweep")


def check_outputs(args) -> None:
    """No command writes inside the installed package (check_output): every output option, and a quantize
    that would add variants to (or a report inside) a bundle the package ships."""
    for option in ("out", "png", "log"):
        if getattr(args, option, None):
            check_output(f"--{option}", getattr(args, option))
    if args.command == "quantize" and (args.precision is not None or (args.report and args.out is None)):
        check_output("--bundle", args.bundle)  # variants and the default report go into the bundle


def _json_default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
