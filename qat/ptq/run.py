"""``qat ptq``: a recipe's model quantized by a layerwise PTQ method, written as a run directory.

The run directory has the layout of ``qat train`` (``recipe.yaml``, ``final/``, ``eval.json``), so
``qat eval``, ``qat compare`` and export read both the same way:

- ``final/``: the HF model with on-grid weights, ``qat_quant.json``, ``qat/qparams.safetensors``
  (written by ``final.save_final``, unchanged); QERA adds ``final/adapter/``, a PEFT LoRA
  adapter holding the low-rank correction (``PeftModel.from_pretrained(base, final/adapter)``);
- ``eval.json``: method, perplexity of ``final/`` as loaded from disk (with its adapter) and of
  the teacher on the recipe's validation split (the same blocks, batch size and
  ``eval.max_batches`` as ``qat train``'s final evaluation), KL to the
  teacher, per-layer relative output error on held-out tokens, calibration tokens and sequences,
  quantization and total wall time.

Memory: the model is processed one decoder block at a time (``calibrate.py``); on a GPU a model
that does not fit stays on the CPU and only the block being calibrated is moved over
(``ptq.offload``); the calibration hidden states (a block's inputs and outputs) live on the GPU
when they fit, else in CPU memory, and a budget too large for either is refused with a message
naming ``ptq.calib_tokens``.

Calibration data: blocks of the recipe's training data, in the order the QAT run would visit
them (the first blocks of its epoch-0 permutation), as many tokens as the QAT run trains on
unless ``ptq.calib_tokens`` says otherwise ("same data constraint", arXiv 2410.14570).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from ..data.plans import calibration_blocks, calibration_budget, heldout_blocks
from ..data.setup import load_plan_and_data
from ..deps import hint
from ..evaluate.diagnostic import bits_per_weight, layer_output_errors, mean_error
from ..evaluate.perplexity import perplexity
from ..io.final import ADAPTER_DIR, LATENT_FILE, effective_weights, final_dtype, save_final, save_side_file, write_scales, writing_final
from ..io.models import DTYPES, load_model_dir, load_models
from ..io.rundir import DiskError, RunLock, check_run_dir, create_run_dir, write_failure, write_json_atomic, write_text_atomic
from ..quant.scheme import QuantScheme
from ..recipe import PTQ_METHODS, Recipe, RecipeError
from .awq import awq_block
from .block_ap import block_ap_block
from .calibrate import module_bytes, quantize_layerwise
from .experts import fused_names, per_expert_plan
from .gptq import gptq_block
from .nf4 import BLOCKSIZE, annotate_final, quantize_nf4
from .qera import qera_block
from .rtn import quantize_rtn

METHODS = PTQ_METHODS


def default_run_dir(recipe: Recipe, method: str) -> Path:
    """``<output_dir>-ptq-<method>``: beside the QAT run of the same recipe."""
    return Path(f"{str(recipe.output_dir).rstrip('/')}-ptq-{method}")


def pick_devices(opts, model: nn.Module, n_hidden_bytes: int) -> tuple[torch.device, torch.device, bool]:
    """(compute device, where calibration hidden states live, whether blocks are offloaded)."""

    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        device_store, offload = device, False
    else:
        free, _ = torch.cuda.mem_get_info(device)
        need = module_bytes(model)
        offload = opts.offload == "always" or (opts.offload == "auto" and need > 0.6 * free)
        fits = n_hidden_bytes < 0.25 * (free - (0 if offload else need))
        device_store = device if fits else torch.device("cpu")
    if device_store.type == "cpu":
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # pragma: no cover - non-Linux
            avail = None
        if avail is not None and n_hidden_bytes > 0.6 * avail:
            raise RecipeError(
                f"ptq.calib_tokens: the calibration hidden states ({n_hidden_bytes / 2**30:.1f} GiB, kept for the "
                f"block being calibrated and its outputs) do not fit in the {avail / 2**30:.1f} GiB of free memory; "
                "set a smaller ptq.calib_tokens (GPTQ/AWQ commonly use 128 x 2048 = 262,144 tokens)"
            )
    return device, device_store, offload


def quantize_ptq(
    model: nn.Module,
    plan: dict[str, QuantScheme],
    method: str,
    calib,
    opts,
    device,
    store_device,
) -> tuple[dict, dict]:
    """Quantize ``model`` in place with ``method``. Returns ``(lora, info, folds)``: the low-rank
    factors ``{layer: (A, B)}`` (QERA), per-method details, and the per-channel factors folded
    into layers ``{layer: {"input_scale"|"output_scale": s}}`` (AWQ)."""

    model.eval()
    fused = fused_names(model, plan)
    if fused and method in ("nf4", "qera-exact", "qera-approx"):
        raise RecipeError(
            f"ptq method {method}: this model's fused MoE experts ({len(fused)} tensors, e.g. {fused[0]}) have no "
            f"{'bitsandbytes layer' if method == 'nf4' else 'PEFT adapter layout for low-rank terms'}; use rtn, gptq, awq or "
            "block-ap, or add the experts to quant.ignore"
        )
    if method == "nf4":  # bitsandbytes NF4, not on the integer grid (ptq/nf4.py)

        return {}, {"nf4_layers": quantize_nf4(model, plan, device), "blocksize": BLOCKSIZE}, {}
    if method in ("rtn", "rtn-mse"):
        clip = "mse" if method == "rtn-mse" else next(iter(plan.values())).scale_init
        quantize_rtn(model, plan, clip=clip, device=device)
        return {}, {"clip": clip}, {}
    lora, info, folds = {}, {}, {}
    expert_tokens: dict[str, list[int]] = {}
    plan = per_expert_plan(model, plan)
    if method == "gptq":

        def fn(runner, names):
            info.update(gptq_block(runner, names, plan, opts.gptq))
    elif method == "awq":

        def fn(runner, names):
            info[runner.name], f = awq_block(runner, names, plan, opts.awq)
            folds.update(f)
    elif method == "block-ap":

        def fn(runner, names):
            info.update(block_ap_block(runner, names, plan, opts.block_ap))
    elif method in ("qera-exact", "qera-approx"):

        def fn(runner, names):
            lora.update(qera_block(runner, names, plan, opts.qera, method == "qera-exact", opts.gptq))
    else:
        raise RecipeError(f"ptq method: expected one of {METHODS}, got {method!r}")
    with torch.no_grad():
        outside = quantize_layerwise(model, plan, calib, fn, opts.batch_size, device, store_device, desc=method,
                                     expert_min_tokens=opts.expert_min_tokens, expert_tokens=expert_tokens)
    if expert_tokens:
        info["expert_tokens"] = expert_tokens
        print(expert_token_summary(method, expert_tokens, opts.expert_min_tokens))
    if outside:
        print(f"{method}: {len(outside)} planned layers are outside the decoder blocks; quantized with RTN: {outside[:4]}")
        quantize_rtn(model, plan, names=outside)
    return lora, info, folds


def expert_token_summary(method: str, expert_tokens: dict[str, list[int]], min_tokens: int) -> str:
    """One line: how many calibration tokens the experts saw, and how many fell back to RTN."""
    per_module = {n.rpartition(".")[0]: c for n, c in expert_tokens.items()}  # gate_up and down see the same tokens
    counts = sorted(c for cs in per_module.values() for c in cs)
    few = sum(c < min_tokens for c in counts)
    return (f"{method}: {len(counts)} experts calibrated on the tokens routed to them: min {counts[0]}, median "
            f"{counts[len(counts) // 2]}, max {counts[-1]} tokens; {few} under ptq.expert_min_tokens={min_tokens} "
            f"quantized with RTN instead")


def save_adapter(model: nn.Module, lora: dict, path: Path):
    """Wrap ``model`` with PEFT LoRA layers holding ``lora`` (scaling 1) and save the adapter;
    returns the ``PeftModel`` (what ``PeftModel.from_pretrained(base, path)`` rebuilds)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RecipeError(hint("peft", "ptq: QERA (it writes its correction as a PEFT adapter)")) from None

    ranks = {n: a.shape[0] for n, (a, _) in lora.items()}
    r = max(ranks.values())
    odd = {n: k for n, k in ranks.items() if k != r}
    cfg = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules=sorted(lora),
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
        rank_pattern={n.replace(".", r"\."): k for n, k in odd.items()},
        alpha_pattern={n.replace(".", r"\."): k for n, k in odd.items()},
    )
    peft_model = get_peft_model(model, cfg)
    base = peft_model.base_model.model
    with torch.no_grad():
        for n, (a, b) in lora.items():
            mod = base.get_submodule(n)
            mod.lora_A["default"].weight.copy_(a)
            mod.lora_B["default"].weight.copy_(b)
    peft_model.save_pretrained(str(path))
    return peft_model.eval()


def run_ptq(recipe: Recipe, method: str, out_dir: str | Path | None = None, overwrite: bool = False, processes: int = 1) -> Path:
    """Quantize the recipe's model with ``method`` and write the run directory (see module doc):
    check -> run directory -> data and calibration blocks -> quantize -> final/ -> eval.json."""
    out = check_ptq(recipe, method, out_dir, overwrite)
    t_start = time.perf_counter()
    torch.manual_seed(recipe.train.seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
    except OSError as e:
        raise DiskError(out, e, "nothing was written") from None
    try:
        replaced = create_run_dir(out, "ptq", clear=overwrite)
        try:
            ptq_steps(recipe, method, out, processes, t_start, replaced)
        except BaseException:
            if replaced is not None and replaced.active:  # nothing yet to stand in for the old run
                replaced.restore()
                print(f"qat: the run --overwrite was to replace is back in place in {out}", file=sys.stderr)
            raise
    finally:
        lock.release()
    return out


def ptq_steps(recipe: Recipe, method: str, out: Path, processes: int, t_start: float, replaced) -> dict:
    """The PTQ run itself, in its locked directory: recipe, data, quantize, final/, eval.json."""
    recipe = recipe.model_copy(update={"output_dir": str(out)})
    write_text_atomic(out / "recipe.yaml", recipe.to_yaml())
    tokenizer, config, plan, train_set, valid_set = load_plan_and_data(recipe, out)
    calib, why = calibration_set(recipe, method, train_set, processes)
    save_dtype = DTYPES[final_dtype(recipe, config)]  # from the source config, before loading changes it
    student, teacher = load_models(recipe, config)
    student.eval().requires_grad_(False)
    device, store, offload = place(recipe, student, config, calib)
    timings = {"setup_s": time.perf_counter() - t_start}
    t_q = time.perf_counter()
    lora, info, folds = quantize_ptq(student, plan, method, calib, recipe.ptq, device, store)
    timings["quantize_s"] = time.perf_counter() - t_q
    t_phase = time.perf_counter()
    try:
        write_ptq_final(out / "final", student, tokenizer, save_dtype, method, info, folds, lora)
    except Exception as e:  # OSError, or what safetensors / torch raise for a failed write
        if write_failure(e, out) is None:
            raise
        raise DiskError(out / "final", e, "nothing partial was left") from None
    if replaced is not None:
        replaced.commit()
    del student
    timings["save_s"] = time.perf_counter() - t_phase
    result = {
        "method": method,
        "bits": sorted({s.bits for s in plan.values()}),
        "group_size": sorted({s.group_size or 0 for s in plan.values()}),
        "quantized_layers": len(plan),
        "bits_per_weight": 4 + 32 / 64 if method == "nf4" else bits_per_weight(out / "final"),  # nf4: fp32 absmax per 64
        "calib_tokens": calib.n_tokens if calib is not None else 0,
        "calib_sequences": len(calib) if calib is not None else 0,
        "calib_budget": why,
        "qat_processes": processes,
        "device": str(device),
        "offload": offload,
        "quant_time_s": timings["quantize_s"],
        "wall_time_s": None,
        "details": info if method in ("gptq", "awq", "block-ap") else {"note": "bitsandbytes NF4 blocksize 64, not on qat's integer grid"} if method == "nf4" else None,
        "lora_rank": recipe.ptq.qera.rank if lora else None,
        "timings": timings,
    }
    if valid_set is not None:
        evaluate_ptq(recipe, method, out / "final", valid_set, teacher, device, result)
    result["wall_time_s"] = time.perf_counter() - t_start
    try:
        write_json_atomic(out / "eval.json", result)
    except OSError as e:
        raise DiskError(out / "eval.json", e, f"final/ is complete in {out / 'final'}") from None
    return result


def check_ptq(recipe: Recipe, method: str, out_dir: str | Path | None, overwrite: bool) -> Path:
    """The PTQ run's directory, after every check that needs no weights."""
    if method not in METHODS:
        raise RecipeError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if recipe.quant is None:
        raise RecipeError("quant: PTQ needs a quant section (the scheme to quantize to)")
    if recipe.model.path is None:
        raise RecipeError("model.path: PTQ quantizes a pretrained model; this recipe builds one from scratch")
    out = Path(out_dir) if out_dir is not None else default_run_dir(recipe, method)
    if check_run_dir(out, "ptq", overwrite) and not overwrite:
        raise RecipeError(f"output_dir: {out} already holds a run; pass --overwrite to replace it")
    return out


def calibration_set(recipe: Recipe, method: str, train_set, processes: int = 1):
    """(calibration blocks or None for a data-free method, where their number comes from)."""
    if method in ("rtn", "rtn-mse", "nf4"):
        return None, "data-free"
    budget, why = calibration_budget(recipe, train_set.n_tokens, processes)
    if budget == 0:
        raise RecipeError(f"ptq.calib_tokens: {method} needs calibration data but the budget is 0 ({why})")
    calib = calibration_blocks(train_set, budget, recipe.train.seed)
    print(f"{method}: calibrating on {calib.n_tokens} tokens in {len(calib)} sequences ({why})")
    return calib, why


def place(recipe: Recipe, student: nn.Module, config, calib) -> tuple[torch.device, torch.device, bool]:
    """Where the layers are calibrated and where the hidden states live (``pick_devices``)."""
    elem = torch.finfo(DTYPES[recipe.model.dtype]).bits // 8
    hidden = 2 * getattr(config, "hidden_size", 0) * (len(calib) * calib.seq_len if calib is not None else 0) * elem  # a block's inputs and outputs
    device, store, offload = pick_devices(recipe.ptq, student, hidden)
    if not offload:
        student.to(device)
    return device, store, offload


def write_ptq_final(final_dir: Path, student: nn.Module, tokenizer, dtype: torch.dtype, method: str, info: dict, folds: dict, lora: dict) -> None:
    """final/ as ``qat train`` writes it, plus what the method adds: NF4 annotations, AWQ's folded
    scales (``qat/scales.safetensors``), QERA's low-rank terms (``adapter/``)."""
    # GPTQ's pre-rounding weights (where quant.init_from starts QAT), read before save_final
    # turns the QATLinear layers into plain ones; not for QERA, whose start has a low-rank term
    latent = {f"{n}.weight": m.ptq_latent.float().contiguous() for n, m in student.named_modules() if getattr(m, "ptq_latent", None) is not None}
    with writing_final(final_dir) as tmp:  # atomic: a failed write leaves no partial final/
        save_final(student, tokenizer, tmp, dtype)
        if latent and not lora:
            save_side_file(latent, tmp, LATENT_FILE)
        if method == "nf4":
            annotate_final(tmp, info["nf4_layers"])
        if folds:
            write_scales(tmp, folds)
        if lora:
            save_adapter(student, lora, tmp / ADAPTER_DIR)


def evaluate_ptq(recipe: Recipe, method: str, final_dir: Path, valid_set, teacher, device, result: dict) -> None:
    """final/ as loaded from disk (with its adapter), as ``qat train`` evaluates it: perplexity,
    KL to the teacher, and the per-layer output errors on held-out blocks. Fills ``result``."""
    ev, timings = recipe.eval, result["timings"]
    model, _ = load_model_dir(final_dir, "float32", str(device), recipe.model.trust_remote_code)  # exact weights, fp32 arithmetic
    if teacher is not None:
        teacher.to(device)
    t_phase = time.perf_counter()
    s = perplexity(model, valid_set, ev.batch_size, ev.max_batches, teacher=teacher, desc=f"eval {method}")
    result["student"] = {k: v for k, v in s.items() if not k.startswith("teacher_")}
    line = f"{method}: perplexity {s['ppl']:.3f} over {s['tokens']} tokens"
    if teacher is not None:
        result["teacher"] = {"ppl": s["teacher_ppl"], "nll": s["teacher_nll"], "tokens": s["tokens"]}
        timings["eval_s"] = time.perf_counter() - t_phase
        t_phase = time.perf_counter()
        held = heldout_blocks(valid_set, recipe.ptq.diag_tokens)
        errs = layer_output_errors(teacher, {method: effective_weights(final_dir)}, held, ev.batch_size)[method]
        result.update(layer_errors=errs, mean_layer_error=mean_error(errs), diag_tokens=held.n_tokens)
        timings["layer_errors_s"] = time.perf_counter() - t_phase
        line += f", teacher {s['teacher_ppl']:.3f}, KL {s['kl_to_teacher']:.4f}, mean layer output error {result['mean_layer_error']:.4f}"
    print(line)
