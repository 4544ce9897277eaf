"""``qat export RUN_DIR [--format compressed-tensors|gptq|fake] [--out DIR] [--merge-lora] [--verify]``."""

from __future__ import annotations

import sys

from ..deps import MissingDependency


def run(args) -> int:
    from ..export import ExportError, VerifyError, export
    from ..io.rundir import DiskError

    try:
        export(args.run_dir, args.format, args.out, merge=args.merge_lora, overwrite=args.overwrite, verify=args.verify,
               any_bits=args.any_bits)
    except (ExportError, MissingDependency) as e:
        print(f"qat export: error: {e}", file=sys.stderr)
        return 2
    except VerifyError as e:
        print(f"qat export: verify failed: {e}", file=sys.stderr)
        return 1
    except DiskError as e:
        print(f"qat export: {e}", file=sys.stderr)
        return 1
    return 0


def add_parser(sub) -> None:
    from ..export import FORMATS

    e = sub.add_parser(
        "export",
        help="write a run's final/ as a packed low-bit checkpoint (compressed-tensors, GPTQ) that reproduces it bit for bit",
        description=(
            "Export RUN_DIR/final as a packed checkpoint whose dequantized weights equal final/'s bit for bit. "
            "compressed-tensors: pack-quantized int4/int8, sym/asym, group/channel (vLLM). gptq: GPTQ v1, symmetric "
            "int4/int8. fake: dequantized weights + qat_quant.json (any scheme, int2/int3 included). "
            "The on-disk size vs bf16 is printed and recorded in RUN_DIR/eval.json under 'export'."
        ),
    )
    e.add_argument("run_dir", metavar="RUN_DIR", help="a qat run directory (holding final/), or its final/")
    e.add_argument("--format", default="compressed-tensors", choices=FORMATS, help="default: compressed-tensors")
    e.add_argument("--out", default=None, help="output directory (default: RUN_DIR/export-FORMAT)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out")
    e.add_argument(
        "--merge-lora",
        action="store_true",
        help="merge final/adapter (LoRA / QERA terms) into the base and re-quantize it; reports the logit change "
        "(default: keep the adapter separate beside the packed base)",
    )
    e.add_argument("--verify", action="store_true", help="load the export back and compare with final/")
    e.add_argument(
        "--any-bits",
        action="store_true",
        help="compressed-tensors: pack int2/int3 layers too (e.g. a CVXQ mixed-precision allocation); transformers "
        "loads them back, vLLM's kernels do not take them",
    )
    e.set_defaults(func=run)
