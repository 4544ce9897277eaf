"""What a run costs as the model grows: host memory and wall time of each part of ``qat train``
on 2 CPU processes, measured on a random-weight Llama, then derived for larger models.

A Llama of ``--hidden`` x ``--layers`` (default hidden 2048, 12 layers, intermediate 8192, 8 KV
heads, the llama-tiny tokenizer's 8192 ids: 0.79B parameters; DDP, whose processes each hold a
replica, hidden 1024 x 16 layers: 0.29B) is built from its config and saved in bf16, as hub
checkpoints are. 16 layers (1.04B) do not fit 2 processes in 24 GiB: the training state alone is
17.4 GiB. The same model's plain ``save_pretrained`` (bf16, what
``final/`` is written in) and ``from_pretrained`` (fp32, the student's dtype) are timed as the
reference. Then, for each ``--modes`` launch config (``launch/cpu-2proc-fsdp2.yaml``,
``launch/cpu-2proc.yaml``), two runs of W4g128 QAT with KD from the bf16 teacher:

1. ``--steps`` steps with a checkpoint at the last one, then final/ and the closing evaluation;
2. the same run resumed from that checkpoint for one more step.

Every process records, per part of the run, its wall time and its peak resident set (VmHWM of
/proc/self/status, reset with ``5 > /proc/self/clear_refs`` when the part starts): start-up
(data, loading the student and teacher, quantizers, wrapping), the training steps (checkpoints
excluded), the checkpoint, the resume (loading the checkpoint), the final write and the final
evaluation. The same processes on a tiny model give the idle footprint (Python, torch, the
libraries). A launch that drives the machine's free memory under 1 GiB is stopped and recorded
as not fitting.

    python benchmarks/scale.py                       # FSDP2 at 0.79B, DDP at 0.29B: ~20 min on 2 cores
    python benchmarks/scale.py --modes fsdp2 --layers 16     # ~1B, on a machine with more than 24 GiB
    python benchmarks/scale.py --modes ddp --ddp-hidden 1536 --ddp-layers 12

Needs the llama-tiny fixture's tokenizer (``../shared``); the data is the Python standard
library's source (no download).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT.parent / "shared" / "models" / "llama-tiny"
CONFIGS = {"fsdp2": "launch/cpu-2proc-fsdp2.yaml", "ddp": "launch/cpu-2proc.yaml"}
PHASES = ("start-up", "steps", "checkpoint", "resume", "final write", "final eval")
GIB = 1024**3


# -- inside each launched process ------------------------------------------------------------
class PhaseTrace:
    """Wall time and peak RSS of named, possibly nested, parts of a process's life. A nested
    part's time is taken out of its parent's; each part's peak is its own."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.stack: list[list] = []  # [name, start, time spent in children]

    @staticmethod
    def hwm() -> int:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    @staticmethod
    def reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def _fold(self, name: str) -> None:
        row = self.rows.setdefault(name, {"s": 0.0, "peak": 0, "calls": 0})
        row["peak"] = max(row["peak"], self.hwm())

    def wrap(self, name: str, fn):
        def inner(*args, **kwargs):
            if self.stack:
                self._fold(self.stack[-1][0])
            self.reset()
            self.stack.append([name, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                _, start, children = self.stack.pop()
                spent = time.perf_counter() - start
                self._fold(name)
                self.rows[name]["s"] += spent - children
                self.rows[name]["calls"] += 1
                if self.stack:
                    self.stack[-1][2] += spent
                    self.reset()

        return inner


def worker(recipe: str, trace_dir: str) -> None:
    """``qat train RECIPE`` with its parts traced; this process's trace to ``trace_dir``."""
    import qat.train.loop as loop
    from qat.recipe import load_recipe

    trace = PhaseTrace()
    idle = trace.hwm()
    resuming = "resume" in Path(recipe).stem
    loop.prepare_data = trace.wrap("start-up", loop.prepare_data)
    loop.build_models = trace.wrap("start-up", loop.build_models)
    loop.resume = trace.wrap("resume" if resuming else "start-up", loop.resume)
    loop.train_steps = trace.wrap("steps", loop.train_steps)
    loop.checkpoint = trace.wrap("checkpoint", loop.checkpoint)
    loop.write_final = trace.wrap("final write", loop.write_final)
    loop.evaluate_final = trace.wrap("final eval", loop.evaluate_final)
    loop.train(load_recipe(recipe), overwrite=not resuming)
    rank = int(os.environ.get("RANK", "0"))
    Path(trace_dir, f"rank{rank}.json").write_text(json.dumps({"idle_import": idle, "rows": trace.rows}))


# -- the driver ------------------------------------------------------------------------------
def build_model(path: Path, hidden: int, layers: int, intermediate: int, kv_heads: int) -> dict:
    """Save a random-weight Llama (bf16) with the fixture's tokenizer; time plain
    ``save_pretrained`` (bf16, median of 3) and ``from_pretrained`` (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=hidden // 128,
                      num_key_value_heads=min(kv_heads, hidden // 128), head_dim=128, vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.to_empty(device="cpu")
    with torch.no_grad():  # random weights, quickly: N(0, 0.02), norms at 1
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn_like(p) * 0.02)
    model.model.rotary_emb.__init__(cfg)  # its buffers, lost by to_empty
    n = sum(p.numel() for p in model.parameters())
    times = []
    for _ in range(3):  # the median of 3: one write is at the mercy of the page cache
        shutil.rmtree(path, ignore_errors=True)
        t = time.perf_counter()
        model.save_pretrained(path)
        times.append(time.perf_counter() - t)
    save_s = statistics.median(times)
    tok.save_pretrained(path)
    del model
    t = time.perf_counter()
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - t
    del loaded
    return {"params": n, "save_pretrained_s": save_s, "from_pretrained_s": load_s, "hidden": hidden, "layers": layers}


RECIPE = """output_dir: {out}
model:
  path: {model}
  dtype: float32
teacher:
  dtype: bfloat16
quant:
  bits: 4
  group_size: 128
  symmetric: true
distill:
  loss: forward_kl
  kd_weight: 1.0
  ce_weight: 0.0
data:
  source: python-stdlib
  seq_len: {seq}
  max_train_tokens: 65536
  valid_fraction: 0.05
  max_valid_tokens: {valid}
train:
  lr: 1.0e-5
  max_steps: {steps}
  micro_batch_size: 1
  seed: 0
  log_every: 1
eval:
  batch_size: 1
  max_batches: 2
checkpoint:
  every: {every}
  keep: 1
  resume: {resume}
"""


def launch(mode: str, recipe: Path, trace_dir: Path, log: Path) -> tuple[bool, float, int]:
    """Launch 2 processes on ``recipe``; (finished, seconds, peak of the machine's used memory)."""
    import psutil

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / CONFIGS[mode]), __file__,
           "--worker", str(recipe), "--trace-dir", str(trace_dir)]
    trace_dir.mkdir(parents=True, exist_ok=True)
    t, peak_used = time.perf_counter(), 0
    base_used = psutil.virtual_memory().used
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        while proc.poll() is None:
            vm = psutil.virtual_memory()
            peak_used = max(peak_used, vm.used - base_used)
            if vm.available < GIB:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return False, time.perf_counter() - t, peak_used
            time.sleep(0.2)
    return proc.returncode == 0, time.perf_counter() - t, peak_used


def run_mode(mode: str, model: Path, work: Path, steps: int, seq: int) -> dict:
    """Both runs (fresh, then resumed) of ``mode`` on ``model``; the traces of every process."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / f"run-{mode}"
    res: dict = {"mode": mode}
    for kind, max_steps, resume in (("fresh", steps, "null"), ("resume", steps + 1, "auto")):
        recipe = work / f"{mode}-{kind}.yaml"
        recipe.write_text(RECIPE.format(out=out, model=model, seq=seq, valid=4 * seq, steps=max_steps, every=steps, resume=resume))
        traces = work / f"trace-{mode}-{kind}"
        shutil.rmtree(traces, ignore_errors=True)
        ok, secs, used = launch(mode, recipe, traces, work / f"{mode}-{kind}.log")
        res[kind] = {"ok": ok, "s": secs, "machine_used": used,
                     "ranks": [json.loads(p.read_text()) for p in sorted(traces.glob("rank*.json"))]}
        if not ok:
            tail = (work / f"{mode}-{kind}.log").read_text().splitlines()[-5:]
            res[kind]["log_tail"] = tail
            break
        if kind == "fresh":
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            times = [r["step_time_s"] for r in rows if "step_time_s" in r]
            res["step_s"] = statistics.median(times[1:] or times)  # the first step compiles and warms up
    return res


def phase_table(res: dict) -> dict[str, dict]:
    """``{phase: {"s", "peaks": [per rank]}}`` from a mode's two runs (resume from the second)."""
    table: dict[str, dict] = {}
    for kind in ("fresh", "resume"):
        run = res.get(kind)
        if not run or not run["ok"]:
            continue
        for rank, tr in enumerate(run["ranks"]):
            for phase, row in tr["rows"].items():
                if kind == "resume" and phase != "resume":
                    continue
                entry = table.setdefault(phase, {"s": 0.0, "peaks": []})
                entry["s"] = max(entry["s"], row["s"])
                entry["peaks"].append(row["peak"])
    return table


def report(ref: dict, idle: dict, results: list[dict]) -> str:
    n = ref["params"]
    state = 16 * n + 2 * n  # fp32 params + grads + AdamW moments; the bf16 teacher
    lines = [f"Llama hidden {ref['hidden']}, {ref['layers']} layers: {n / 1e9:.2f}B parameters; W4g128 + KD (bf16 teacher), "
             f"2 CPU processes (gloo), 1 thread each",
             f"plain save_pretrained (bf16) {ref['save_pretrained_s']:.1f} s, from_pretrained (fp32) {ref['from_pretrained_s']:.1f} s; "
             f"training state (16 B/param + teacher) {state / GIB:.1f} GiB", ""]
    idle_sum = sum(idle.get("peaks", [0, 0]))
    lines.append(f"idle footprint (the same 2 processes on a tiny model): {idle_sum / GIB:.2f} GiB in all")
    lines += ["", "| launch | part | wall s | peak RSS rank 0 GiB | rank 1 GiB | sum GiB |", "|---|---|---|---|---|---|"]
    for res in results:
        table = phase_table(res)
        for phase in PHASES:
            if phase in table:
                e = table[phase]
                peaks = e["peaks"] + [0] * (2 - len(e["peaks"]))
                s = f"{e['s']:.1f}" if phase != "steps" else f"{e['s']:.1f} (median step {res.get('step_s', float('nan')):.1f})"
                lines.append(f"| {res['mode']} | {phase} | {s} | {peaks[0] / GIB:.2f} | {peaks[1] / GIB:.2f} | {sum(peaks) / GIB:.2f} |")
        for kind in ("fresh", "resume"):
            run = res.get(kind)
            if run and not run["ok"]:
                lines.append(f"| {res['mode']} | {kind} run did not finish | {run['s']:.0f} | | | machine memory used +{run['machine_used'] / GIB:.1f} GiB |")
    lines.append("")
    for res in results:
        table = phase_table(res)
        if not table:
            continue
        peak = max(sum(e["peaks"]) for e in table.values())
        copies = 1 if res["mode"] == "fsdp2" else 2  # DDP: one replica of the training state per process
        lines.append(f"{res['mode']}: peak RSS summed over processes less idle {(peak - idle_sum) / GIB:.1f} GiB = "
                     f"{(peak - idle_sum) / (copies * state):.2f} x {'the training state' if copies == 1 else 'its 2 replicas'}"
                     + (" (target <= 1.5)" if copies == 1 else ""))
        if "final write" in table:
            lines.append(f"{res['mode']}: final write {table['final write']['s']:.1f} s = "
                         f"{table['final write']['s'] / ref['save_pretrained_s']:.2f} x plain save_pretrained (target <= 1.5)")
    return "\n".join(lines)


# -- derived: what a run costs at sizes this machine cannot hold ----------------------------
TARGETS = {  # total parameters, layers, hidden, vocabulary (the models' configs)
    "Llama-3-8B": (8.03e9, 32, 4096, 128256),
    "Llama-3-70B": (70.6e9, 80, 8192, 128256),
    "Qwen3-30B-A3B": (30.5e9, 48, 2048, 151936),
}


def derive(ref: dict, idle: dict, fsdp: dict, gpus: int = 8, seq: int = 2048) -> str:
    """Per-parameter costs measured on the FSDP2 run, scaled to ``TARGETS`` on ``gpus`` x 80 GB
    (bf16 mixed precision, fp32 masters, bf16 teacher, micro-batch 1 x ``seq`` tokens with
    activation checkpointing, as the shipped 8-GPU recipes run).

    - training state per device: (16 B/param + 2 B/param teacher) / gpus, times the ratio of the
      measured steps-phase peak (summed over processes, less idle) to 18 B/param (in brackets:
      exactly 18 B/param); "fits" leaves 10 % of the 80 GB free;
    - host RAM per node at start-up: the main process's extra over the other's per byte it
      reads (fp32 student + bf16 teacher), times the model's bytes, plus one idle footprint per
      process (in brackets: the whole model pair resident, the bound); at the final write: the
      gathered fp32 state, all of it in host memory (Accelerate gathers it to the CPU; on this
      machine's measurement the freed optimizer state was reused for it, so it shows less);
    - activations: the standard estimate (Korthikanti et al. 2022) with attention kernels that
      keep no score matrix: 34 x T x hidden bytes for the block being recomputed, 2 x T x hidden
      per checkpointed block input, and the bf16 logits of student and teacher with the student's
      gradient (6 x T x vocab); not measured here;
    - DDP: every process loads the fp32 student and the bf16 teacher (6 B/param each)."""
    table = phase_table(fsdp)
    n = ref["params"]
    idle_each = sum(idle["peaks"]) / len(idle["peaks"])
    state_ratio = (sum(table["steps"]["peaks"]) - sum(idle["peaks"])) / (18 * n)
    start_extra = (table["start-up"]["peaks"][0] - table["start-up"]["peaks"][1]) / (6 * n)
    final_extra = (table["final write"]["peaks"][0] - table["final write"]["peaks"][1]) / (4 * n)
    lines = [f"measured at {n / 1e9:.2f}B: training state {state_ratio:.2f} x (16 + 2) B/param; the main process's extra host memory "
             f"{start_extra:.2f} x the bytes it reads at start-up, {final_extra:.2f} x the state it gathers at the final write; "
             f"idle {idle_each / GIB:.2f} GiB per process", "",
             f"| model | FSDP2 host RAM per node, start-up / final write | GPU per device: student + grads + AdamW | teacher | "
             f"activations (1 x {seq}) | GPU total (18 B/param exactly) | on {gpus} x 80 GB | DDP host RAM per node at start-up |",
             "|---|---|---|---|---|---|---|---|"]
    for name, (p, layers, hidden, vocab) in TARGETS.items():
        host_start = start_extra * 6 * p + gpus * idle_each
        host_bound = 6 * p + gpus * idle_each
        host_final = 4 * p + gpus * idle_each
        state = state_ratio * 16 * p / gpus
        teacher = state_ratio * 2 * p / gpus
        act = 34 * seq * hidden + 2 * seq * hidden * layers + 6 * seq * vocab
        total = state + teacher + act
        exact = 18 * p / gpus + act
        fits = "fits" if total < 80e9 * 0.9 else "fits only without the overhead" if exact < 80e9 * 0.9 else "does not fit"
        lines.append(f"| {name} | {host_start / 1e9:.0f} ({host_bound / 1e9:.0f}) / {host_final / 1e9:.0f} GB | {state / 1e9:.1f} GB | {teacher / 1e9:.1f} GB | "
                     f"{act / 1e9:.1f} GB | {total / 1e9:.1f} GB ({exact / 1e9:.1f} GB) | {fits} | "
                     f"{(gpus * 6 * p + gpus * idle_each) / 1e9:.0f} GB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--trace-dir", help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--intermediate", type=int, default=None, help="default 4 x hidden")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--modes", default="fsdp2,ddp", help="comma-separated: fsdp2, ddp")
    ap.add_argument("--ddp-hidden", type=int, default=1024, help="a smaller model for DDP (its replicas: 2 full training states)")
    ap.add_argument("--ddp-layers", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--work", default=None, help="where models and runs go (default: a fresh directory under /tmp)")
    ap.add_argument("--json", default=None, help="also write the measurements here")
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.trace_dir)
    if not (TOKENIZER / "tokenizer.json").is_file():
        sys.exit(f"skipped: needs the llama-tiny fixture's tokenizer at {TOKENIZER} (../shared)")
    work = Path(args.work or f"/tmp/qat-scale-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    tiny_ref = build_model(work / "tiny", 256, 2, 512, 2)
    idle_res = run_mode("fsdp2", work / "tiny", work / "tiny-runs", 1, 32)
    idle_tab = phase_table(idle_res)
    idle = {"peaks": [max(e["peaks"][r] for e in idle_tab.values()) for r in range(2)]} if idle_tab else {}
    sizes = {"fsdp2": (args.hidden, args.layers), "ddp": (args.ddp_hidden, args.ddp_layers)}
    all_results = []
    for size in dict.fromkeys(sizes[m] for m in args.modes.split(",")):
        hidden, layers = size
        ref = build_model(work / f"model-{hidden}x{layers}", hidden, layers, args.intermediate or 4 * hidden, args.kv_heads)
        results = [run_mode(m, work / f"model-{hidden}x{layers}", work / f"{m}-{hidden}x{layers}", args.steps, args.seq)
                   for m in args.modes.split(",") if sizes[m] == size]
        print(report(ref, idle, results), flush=True)
        print()
        fsdp = next((r for r in results if r["mode"] == "fsdp2" and r.get("fresh", {}).get("ok")), None)
        if fsdp is not None and idle:
            print("derived (FSDP2, bf16 mixed precision, 8 x 80 GB):")
            print(derive(ref, idle, fsdp), flush=True)
            print()
        all_results.append({"ref": ref, "results": results})
        shutil.rmtree(work / f"model-{hidden}x{layers}", ignore_errors=True)  # GBs at 1B
    if args.json:
        Path(args.json).write_text(json.dumps({"idle": idle, "tiny": tiny_ref, "sizes": all_results}, indent=1))
    if all(r[k]["ok"] for s in all_results for r in s["results"] for k in ("fresh", "resume") if k in r):
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs of the runs that did not finish: {work}")


if __name__ == "__main__":
    main()
