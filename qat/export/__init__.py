"""Export a run's ``final/`` as a real packed low-bit checkpoint, bit-exact with what was trained.

``final/`` holds the on-grid (dequantized) weights plus ``qat_quant.json`` and
``qat/qparams.safetensors`` (scale and zero-point of every quantized layer, in final/'s dtype).
Export recovers the integer codes from them, checks that they reproduce final/'s weights bit for
bit, and writes one of:

- ``compressed-tensors``: the ``pack-quantized`` format (what vLLM's compressed-tensors path
  serves), written *by the compressed-tensors library* (``apply_quantization_config``, our
  scales / zero-points, ``ModelCompressor.compress_model``, ``save_pretrained``,
  ``update_config``). int4 and int8, symmetric and asymmetric, group and per-channel;
  mixed int4/int8 becomes one config group per scheme. Embeddings, lm_head and norms stay in the
  model dtype.
- ``gptq``: the GPTQ v1 layout (``qweight``, ``qzeros``, ``scales``, ``g_idx``), symmetric only.
- ``fake``: dequantized weights + ``qat_quant.json`` + ``qat/qparams.safetensors`` (any scheme,
  int2/int3 included; what no serving engine packs).

Both packed layouts go through one packing helper, ``pack_rows`` (compressed-tensors'
``pack_to_int32``): compressed-tensors' ``weight_packed`` is ``pack_rows(codes)``, GPTQ's
``qweight`` is its transpose (for int4/int8 symmetric the two are the same bits).

Numerics. Codes are those of ``qat/quant/grid.py``: unsigned ``u`` with ``w = (u - z) * s``,
computed in the scale's dtype (= final/'s dtype); compressed-tensors stores signed codes and
zero-points (``u - 2^(b-1)``, ``z - 2^(b-1)``) and dequantizes ``(q - z) * s`` in the scale's
dtype too, so the loaded weights are identical. Compression runs in float32 on the exact product
``(u - z) * s`` (exact in fp32 for bf16 scales), so compressed-tensors' re-quantization returns
our codes; the packed tensors are checked against ``pack_rows`` before anything is written.

Low-rank terms (``final/adapter/``, a PEFT adapter, e.g. QERA): merging them moves the weights
off the integer grid, so they are copied beside the packed base as ``adapter/``. With
``merge_lora`` the adapter is merged in float32, every quantized layer is re-quantized with its
scheme (``minmax_qparams`` on the merged weight, same group size) and the logit change this
causes is measured on a few validation sequences.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from ..deps import require
from ..io.final import ADAPTER_DIR, has_adapter
from ..io.rundir import DiskError, RunLock, forbidden, fsync_dir, fsync_tree, resolved, stale_temp_dirs, write_failure, write_json_atomic
from ..io.layout import LayoutError, checkpoint_rows
from .formats import FORMATS, WRITERS, _tokenizer_files
from .merge import merge_lora, sample_ids
from .packing import check_compressed_tensors, check_gptq_schemes, seq_as_int, seq_codes_as_int
from .sizes import bf16_bytes, bf16_layer_bytes, dir_bytes, human, layer_bytes, weights_bytes
from .source import ExportError, _scheme_key, describe, load_source, read_layers, resolve_run
from .verify import verify_export

__all__ = ["EXPORT_INFO", "FORMATS", "ExportError", "export"]

EXPORT_INFO = "qat_export.json"


# -- the source: final/ as codes + qparams ----------------------------------------------------


# -- packing (shared by the compressed-tensors check and the GPTQ writer) ----------------------


# -- checks --------------------------------------------------------------------------------


# -- writers -------------------------------------------------------------------------------


# -- LoRA: keep separate, or merge and re-quantize ------------------------------------------


# -- sizes and eval.json ---------------------------------------------------------------------


def record_eval(run_dir: Path, key: str, info: dict) -> None:
    """Merge ``info`` into ``RUN_DIR/eval.json`` under ``"export"`` / ``key``, atomically."""
    path = run_dir / "eval.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data.setdefault("export", {})[key] = info
    try:
        write_json_atomic(path, data)
    except OSError as e:
        raise DiskError(path, e, "the export itself is complete") from None


# -- the whole command ------------------------------------------------------------------------
def export(
    run_dir: str | os.PathLike,
    fmt: str,
    out: str | os.PathLike | None = None,
    merge: bool = False,
    overwrite: bool = False,
    verify: bool = False,
    log=print,
    any_bits: bool = False,
) -> dict:
    """``qat export``: check, read the run, write ``out`` (atomically: a temp dir renamed at the
    end), keep or merge the adapter, verify, record sizes in eval.json. Returns the eval.json entry."""
    run, final, layers, out = check_export(run_dir, fmt, out, merge, overwrite, verify, any_bits)
    t0 = time.perf_counter()
    src = load_source(run or final)
    src.any_bits = any_bits
    try:
        src.expert_rows = {n: checkpoint_rows(src.model, n, tuple(qw.codes.shape)) for n, qw in src.qweights.items() if qw.codes.ndim == 3}
    except LayoutError as e:
        raise ExportError(str(e)) from None
    merge_info = None
    if merge:
        ids, what = sample_ids(src)
        merge_info = {**merge_lora(src, ids), "sequences": what}
    seq = [n for n, i in layers.items() if i.get("seq_bits")]
    for name in seq:  # SEQ layers as the symmetric integer grid holding the same values (packed formats)
        src.qweights[name] = seq_codes_as_int(src.qweights[name], layers[name])
    src.layers = layers
    info = write_export(src, fmt, out, final, layers, merge_info)
    if seq:
        info["seq_as_int"] = (f"{len(seq)} SEQ layers written as {describe(_scheme_key(layers[seq[0]]))} with half their scales: "
                              "the same values, bit for bit")
    info["seconds"] = round(time.perf_counter() - t0, 2)
    log_export(info, final, out, layers, merge_info, log)
    if verify:
        info["verify"] = v = verify_export(out, fmt, final, merged=merge)
        log(f"verify: {v['what']}: max abs difference {v['max_abs_diff']:.3g} ({'identical' if v['identical'] else 'DIFFERENT'})")
        if "loader" in v:
            log(f"verify: {v['loader']}")
        if v.get("load_problems"):
            log(f"verify: transformers' load report: {v['load_problems']}")
    if run is not None:
        record_eval(run, fmt, info)
    if verify and not merge and not v["identical"]:
        raise VerifyError(f"the export in {out} does not reproduce final/ (see above); it was written, but do not ship it")
    return info


class VerifyError(RuntimeError):
    """``--verify`` found an export that does not reproduce ``final/`` (the CLI: exit code 1)."""


def check_export(run_dir, fmt: str, out, merge: bool, overwrite: bool, verify: bool, any_bits: bool) -> tuple[Path | None, Path, dict, Path]:
    """Every check that needs no weights: the format, the run, the schemes, the packages, and an
    output directory qat may write (``--overwrite`` replaces only an earlier qat export, never
    the run itself or a directory above it)."""
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    run, final = resolve_run(run_dir)
    busy = RunLock.holder(run) if run is not None else None
    if busy is not None:
        raise ExportError(f"{run_dir}: the run is still being written (process {busy} holds it); its final/ will be replaced "
                          "when it ends: export it then")
    layers = read_layers(final)
    if fmt in ("compressed-tensors", "gptq"):  # SEQ's levels on the symmetric integer grid that holds them
        layers = {n: seq_as_int(i, any_bits) for n, i in layers.items()}
    if fmt in ("compressed-tensors", "gptq"):  # both pack with compressed-tensors' pack_to_int32
        require("compressed_tensors", f"qat export --format {fmt}")
    if has_adapter(final) and (merge or verify):
        require("peft", "a run with a LoRA adapter (final/adapter)")
    if fmt == "gptq":
        check_gptq_schemes(layers)
    elif fmt == "compressed-tensors":
        check_compressed_tensors(layers, any_bits)
    out = Path(out).expanduser() if out is not None else (run or final.parent) / f"export-{fmt}"
    if out.is_symlink():
        raise ExportError(f"--out {out}: is a symbolic link; give the directory it points to, or another --out")
    o, source = resolved(out), resolved(run or final)
    if o == resolved(final) or resolved(final) in o.parents:
        raise ExportError(f"--out {out}: must not be inside final/")
    if o == source or o in source.parents or forbidden(o):
        raise ExportError(f"--out {out}: is {'the run directory' if o == source else forbidden(o) or 'a directory above the run'}; "
                          "an export needs a directory of its own")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ExportError(f"--out {out}: exists and is not empty; pass --overwrite to replace it")
        if not (out / EXPORT_INFO).is_file():
            raise ExportError(f"--out {out}: is not a qat export (no {EXPORT_INFO}); --overwrite replaces only an earlier "
                              "qat export: remove it yourself or choose another --out")
    return run, final, layers, out


def write_export(src, fmt: str, out: Path, final: Path, layers: dict, merge_info: dict | None) -> dict:
    """Write the export into a temporary directory beside ``out`` and rename it over ``out``;
    returns the sizes and notes that go into eval.json."""
    keys = sorted({_scheme_key(i) for i in layers.values()}, key=str)
    prefix = f".{out.name}.tmp-"
    tmp = out.with_name(f"{prefix}{os.getpid()}")
    if out.parent.is_dir():
        for stale in [tmp, *stale_temp_dirs(out.parent, prefix), *stale_temp_dirs(out.parent, f".{out.name}.old-")]:
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed export (qat's own names)
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        notes = WRITERS[fmt](src, tmp)
        _tokenizer_files(final, tmp)
        if src.adapter_dir is not None and merge_info is None:
            notes["adapter"] = copy_adapter(src.adapter_dir, tmp, out, fmt, notes)
        info = {
            "format": fmt,
            "out": str(out),
            "schemes": [describe(k) for k in keys],
            "quantized_layers": len(layers),
            "frozen_layers": sum(bool(i.get("frozen")) for i in layers.values()),
            "dtype": str(src.dtype).removeprefix("torch."),
            "bytes": None,
            "weights_bytes": weights_bytes(tmp),
            "adapter_bytes": dir_bytes(tmp / ADAPTER_DIR) if (tmp / ADAPTER_DIR).is_dir() else 0,
            "bf16_weights_bytes": bf16_bytes(final),
            "bf16_basis": "2 bytes x parameters stored in final/ (tensor data, no headers)",
            "quantized_layers_bytes": layer_bytes(tmp, src.stored_names(layers)),
            "quantized_layers_bf16_bytes": bf16_layer_bytes(final, src.stored_names(layers)),
            **notes,
        }
        if merge_info:
            info["merge_lora"] = merge_info
        (tmp / EXPORT_INFO).write_text(json.dumps({**info, "source": str(final.resolve()), "layers": layers}, indent=1))
        info["bytes"] = dir_bytes(tmp)
        fsync_tree(tmp)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.exists():  # check_export allowed it: an earlier qat export, moved aside, deleted once replaced
            os.replace(out, old)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    except Exception as e:
        if write_failure(e, out.parent) is None:
            raise
        raise DiskError(out, e, "nothing partial was left" + (f"; the earlier export in {out} is intact" if old.exists() or out.exists() else "")) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and out.exists():
            shutil.rmtree(old, ignore_errors=True)
    info["ratio_vs_bf16"] = info["weights_bytes"] / info["bf16_weights_bytes"]
    return info


def copy_adapter(adapter_dir: Path, tmp: Path, out: Path, fmt: str, notes: dict) -> str:
    """Copy final/adapter beside the packed base (pointing at it); returns the note for eval.json."""
    shutil.copytree(adapter_dir, tmp / ADAPTER_DIR)
    cfg_path = tmp / ADAPTER_DIR / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(out.resolve())
    cfg_path.write_text(json.dumps(cfg, indent=2))
    note = "kept separate (PEFT format): merging low-rank terms moves weights off the integer grid"
    if fmt == "compressed-tensors" and "none" in notes.get("load_hint", ""):
        note += " (mixed precision: run one forward pass on the loaded base before wrapping it with peft)"
    return note


def log_export(info: dict, final: Path, out: Path, layers: dict, merge_info: dict | None, log) -> None:
    log(f"exported {final} -> {out} ({info['format']}; {', '.join(info['schemes'])}; {len(layers)} quantized layers, "
        f"{info['frozen_layers']} frozen; {info['dtype']})")
    log(f"size on disk: weights {human(info['weights_bytes'])} vs bf16 {human(info['bf16_weights_bytes'])} "
        f"({info['ratio_vs_bf16']:.3f}x); quantized layers {human(info['quantized_layers_bytes'])} vs bf16 "
        f"{human(info['quantized_layers_bf16_bytes'])} ({info['quantized_layers_bytes'] / info['quantized_layers_bf16_bytes']:.3f}x); "
        f"whole directory {human(info['bytes'])}"
        + (f", adapter {human(info['adapter_bytes'])}" if info["adapter_bytes"] else ""))
    if "adapter" in info:
        log(f"LoRA adapter {info['adapter']}; it is in {out / ADAPTER_DIR} (load it with peft on top of the packed base, "
            "or pass --merge-lora to merge and re-quantize)")
    if merge_info:
        log(f"--merge-lora: merged the adapter and re-quantized the {merge_info['requantized_layers']} quantized layers it touches "
            f"(minmax qparams of the merged weight, same scheme); logit change vs base + adapter "
            f"on {merge_info['sequences']}: max {merge_info['max_abs_logit_change']:.4g}, mean "
            f"{merge_info['mean_abs_logit_change']:.4g} (the adapter itself moves logits by max "
            f"{merge_info['adapter_effect_max_abs']:.4g}, mean {merge_info['adapter_effect_mean_abs']:.4g})")
