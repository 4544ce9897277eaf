"""Runs you can trust: what a user or a cluster does to a run directory, and what qat promises.

Data loss: two runs racing for one new directory, a user's own ``tokenizer/`` or ``wandb/``,
``--overwrite`` failing half-way, ``--overwrite`` with ``checkpoint.resume`` set. Silent wrong
results: a resume from a checkpoint of another run or other settings, an edited state, stale
newer checkpoints. No traceback: path components too long, read-only and full disks, vocabularies
that do not match, symlinked checkpoints, killed or racing exports. No fixtures needed unless
marked: the from-scratch quickstart recipe, shrunk.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import PRETRAIN, SCRATCH_SMALL, needs_tiny
from safetensors.torch import load_file

import qat.train.loop
from qat.cli import main
from qat.io.checkpoint import read_state
from qat.io.rundir import MARKER

REPLACED = ".qat-replaced"  # where --overwrite keeps the run it replaces until the new one stands in

W4 = "quant={bits: 4, group_size: 32}"
SMALL = [*SCRATCH_SMALL, "train.max_steps=2", "train.log_every=1", "eval.every=0"]
TINY_RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "w4-ovfreeze.yaml")
TINY_SMALL = ["data.max_train_tokens=4096", "data.max_valid_tokens=1024", "train.max_steps=1", "train.micro_batch_size=2",
              "data.seq_len=128", "eval.max_batches=1"]


def train(out: Path, *extra: str) -> int:
    return main(["train", PRETRAIN, f"output_dir={out}", *SMALL, *extra])


def listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".qat-run.lock"}


@pytest.fixture(scope="module")
def ckpt_run(tmp_path_factory) -> Path:
    """A finished W4 run with checkpoints at steps 1 and 2."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out, W4, "checkpoint.every=1", "checkpoint.keep=5") == 0
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- data loss ----------------------------------------------------------------------------
def test_a_run_appearing_while_this_one_prepares_is_never_overwritten(ckpt_run, tmp_path, monkeypatch, capsys):
    """Two `qat train` on one new output_dir: the slower one finds the other's finished run once
    it holds the lock, and stops without writing: final/, recipe.yaml and the checkpoints stay the other's."""
    out = tmp_path / "run"
    real = qat.train.loop.build_run_datasets

    def slower(*a, **k):
        if not out.exists():
            copy_run(ckpt_run, out)  # the other process finished meanwhile
        return real(*a, **k)

    monkeypatch.setattr(qat.train.loop, "build_run_datasets", slower)
    assert train(out, "quant={bits: 4, group_size: 16}") == 2
    assert "received a run from another process" in capsys.readouterr().err
    assert listing(out) == listing(ckpt_run)


@needs_tiny
def test_ptq_checks_the_directory_again_under_its_lock(ckpt_run, tmp_path, monkeypatch, capsys):
    import qat.ptq.run

    out = tmp_path / "ptq"
    real = qat.ptq.run.check_ptq

    def racing(*a, **k):
        got = real(*a, **k)
        copy_run(ckpt_run, out)
        return got

    monkeypatch.setattr(qat.ptq.run, "check_ptq", racing)
    assert main(["ptq", TINY_RECIPE, "--method", "rtn", f"output_dir={out}", *TINY_SMALL]) == 2
    assert "received a run from another process" in capsys.readouterr().err
    assert listing(out) == listing(ckpt_run)


def test_a_users_tokenizer_and_wandb_folders_are_not_adopted(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "tokenizer").mkdir(parents=True)
    (out / "tokenizer" / "vocab.txt").write_text("my own")
    (out / "wandb").mkdir()
    (out / "wandb" / "notes").write_text("my runs")
    before = listing(out)
    assert train(out) == 2
    err = capsys.readouterr().err
    assert "holds tokenizer, wandb, which qat did not create" in err, err
    assert listing(out) == before and not (out / MARKER).exists()
    assert train(out, "--overwrite") == 2  # --overwrite never deletes them either
    assert listing(out) == before


def test_overwrite_keeps_the_old_run_until_the_new_one_can_replace_it(ckpt_run, tmp_path, monkeypatch, capsys):
    out = copy_run(ckpt_run, tmp_path / "run")
    before = listing(out)

    def fails(run, init):  # found only at run time, after the run directory was taken
        raise RuntimeError("a failure only the model load finds")

    monkeypatch.setattr(qat.train.loop, "build_models", fails)
    with pytest.raises(RuntimeError):
        train(out, W4, "--overwrite")
    assert "is back in place" in capsys.readouterr().err
    assert listing(out) == before and not (out / REPLACED).exists()
    monkeypatch.undo()
    # the new run replaces the old one once it has written something to stand in for it
    assert train(out, W4, "--overwrite", "train.max_steps=1") == 0  # no checkpoints: final/ stands in for the old run
    assert not (out / "checkpoints").exists() and not (out / REPLACED).exists()
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_overwrite_starts_over_even_with_resume_auto(ckpt_run, tmp_path, capsys):
    """--overwrite (and so compare --rerun) with checkpoint.resume=auto replaces the run: the new
    run starts at step 0 and none of the old weights survive."""
    out = copy_run(ckpt_run, tmp_path / "run")
    assert train(out, W4, "--overwrite", "checkpoint.resume=auto", "checkpoint.every=0", "train.lr=0.01") == 0
    captured = capsys.readouterr()
    assert "resumed from" not in captured.out and "not resuming, --overwrite replaces the run" in captured.out
    assert not (out / "checkpoints").exists()
    steps = [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    old, new = (load_file(str(d / "final" / "model.safetensors")) for d in (ckpt_run, out))
    assert any(not torch.equal(old[k], new[k]) for k in old)
    # an explicit checkpoint of the run --overwrite replaces: one line, nothing changed
    again = copy_run(ckpt_run, tmp_path / "again")
    assert train(again, W4, "--overwrite", f"checkpoint.resume={again / 'checkpoints' / 'step-1'}") == 2
    assert "is a checkpoint of the run that --overwrite replaces" in capsys.readouterr().err
    assert listing(again) == listing(ckpt_run)


@needs_tiny
def test_overwrite_checks_what_it_can_before_touching_the_old_run(tmp_path, capsys):
    """A teacher with another vocabulary, a truncated model.safetensors, a tokenizer larger than the
    embedding: refused before the run directory is touched, with the key, not found at step 1 as an
    IndexError or a size mismatch."""
    from conftest import LLAMA_TINY
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path / "run"
    assert main(["train", TINY_RECIPE, f"output_dir={out}", *TINY_SMALL]) == 0
    before = listing(out)
    other = tmp_path / "other-vocab"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=500)).save_pretrained(other)
    assert main(["train", TINY_RECIPE, f"output_dir={out}", *TINY_SMALL, f"teacher.path={other}", "--overwrite"]) == 2
    assert "teacher.path: the teacher's vocabulary has 500 ids and the student's 8192" in capsys.readouterr().err
    truncated = tmp_path / "truncated"
    shutil.copytree(LLAMA_TINY, truncated)
    w = truncated / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    assert main(["train", TINY_RECIPE, f"output_dir={out}", *TINY_SMALL, f"model.path={truncated}", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "model.path:" in err and "model.safetensors is truncated" in err and "Traceback" not in err, err
    assert main(["train", TINY_RECIPE, f"output_dir={out}", *TINY_SMALL, f"model.path={other}", f"tokenizer.path={LLAMA_TINY}",
                 "teacher=null", "distill.ce_weight=1", "--overwrite"]) == 2
    assert "the tokenizer has 8192 ids but the model's embedding has 500 rows" in capsys.readouterr().err
    assert listing(out) == before


# -- a resume is the same run ---------------------------------------------------------------
def test_a_resume_with_other_settings_is_refused_naming_the_keys(ckpt_run, tmp_path, capsys):
    out = copy_run(ckpt_run, tmp_path / "run")
    (out / "final").rename(out / "final-old")  # so that a resume has steps left: max_steps grows below
    recipe_before = (out / "recipe.yaml").read_text()
    for change, shown in (("quant={bits: 8, group_size: 32}", "quant.bits 4 -> 8"), ("data.seq_len=64", "data.seq_len"),
                          ("train.micro_batch_size=2", "train.micro_batch_size 4 -> 2")):
        assert train(out, change, "checkpoint.resume=auto", "train.max_steps=3") == 2
        err = capsys.readouterr().err
        assert "belongs to a run with other settings" in err and shown in err, err
        assert (out / "recipe.yaml").read_text() == recipe_before  # a failed resume rewrites nothing
    # an allowed change: more steps and another learning rate, printed and recorded
    assert train(out, W4, "checkpoint.resume=auto", "train.max_steps=3", "train.lr=0.002", "checkpoint.every=1") == 0
    printed = capsys.readouterr().out
    assert "continuing with train.lr changed from 0.003 to 0.002" in printed, printed
    ev = json.loads((out / "eval.json").read_text())
    assert {c["key"] for c in ev["resume_changes"]} == {"train.max_steps", "train.lr"}
    assert ev["train_tokens"] == 3 * 4 * 128  # 3 steps x micro_batch 4 x seq_len 128, across the resume
    assert {c["key"] for c in read_state(out / "checkpoints" / "step-3")["changes"]} == {"train.max_steps", "train.lr"}


def test_another_runs_checkpoint_is_not_resumed(ckpt_run, tmp_path, capsys):
    mine = tmp_path / "mine"
    assert train(mine, W4, "checkpoint.every=1", "train.max_steps=1") == 0
    shutil.copytree(ckpt_run / "checkpoints" / "step-2", mine / "checkpoints" / "step-2")  # the same settings, another run
    assert train(mine, W4, "checkpoint.resume=auto", "train.max_steps=3") == 2
    err = capsys.readouterr().err
    assert "was written by another run (run id" in err, err


def test_an_edited_state_is_not_trusted(ckpt_run, tmp_path, capsys):
    out = copy_run(ckpt_run, tmp_path / "run")
    state_path = out / "checkpoints" / "step-2" / "qat_state.json"
    state = json.loads(state_path.read_text())
    state["step"] = 1  # skip back (or ahead): the file's own checksum no longer matches
    state_path.write_text(json.dumps(state))
    shutil.rmtree(out / "final")
    assert train(out, W4, "checkpoint.resume=auto", "checkpoint.every=1") == 0
    printed = capsys.readouterr().out
    assert "passed over step-2: qat_state.json does not match its checksum" in printed, printed
    assert "resumed from" in printed and "step-1 at step 1" in printed
    from qat.io.checkpoint import state_digest

    assert state_digest(read_state(out / "checkpoints" / "step-2")) == read_state(out / "checkpoints" / "step-2")["sha256"]


def test_newer_checkpoints_are_set_aside_not_ranked_above_the_runs_own(ckpt_run, tmp_path, capsys):
    """Resumed from step 1 of a run that also holds steps 2..: those are no part of this
    continuation; they are renamed stale-step-N (kept), and pruning keeps the new ones."""
    out = copy_run(ckpt_run, tmp_path / "run")
    shutil.rmtree(out / "final")
    assert train(out, W4, f"checkpoint.resume={out / 'checkpoints' / 'step-1'}", "checkpoint.every=1", "checkpoint.keep=1",
                 "train.max_steps=2") == 0
    assert "set aside step-2 as stale-step-2" in capsys.readouterr().out
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["stale-step-2", "step-2"], names


# -- final/ and precision -------------------------------------------------------------------
def test_final_holds_no_side_file_a_loader_would_take_for_weights(ckpt_run):
    """vLLM's default loader reads every *.safetensors of a folder without an index: in final/
    those are the model's weights only, every one of them a key of the model."""
    from transformers import AutoModelForCausalLM

    final = ckpt_run / "final"
    keys = {}
    for f in final.glob("*.safetensors"):  # what such a loader reads
        keys.update(load_file(str(f)))
    model = AutoModelForCausalLM.from_pretrained(final)
    assert set(keys) == set(model.state_dict())
    assert (final / "qat" / "qparams.safetensors").is_file()


@pytest.mark.parametrize("bits", [4, 8])
def test_learnable_scales_in_bf16_train_and_export_as_the_forward(bits):
    """A bf16 model's learnable scales: float32 masters above an absolute floor, all of them
    trained (a floor at bf16's epsilon, 0.0078, would hold most W4 scales with no gradient), and the on-grid
    weight final/ is written with equal to the trained forward's, bit for bit."""
    from qat.quant import QuantScheme
    from qat.quant.linear import QATLinear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 64, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    lin = lin.to(torch.bfloat16)
    layer = QATLinear.from_linear(lin, QuantScheme(bits=bits, group_size=64, symmetric=True, learnable=True))
    assert layer.weight_scale.dtype == torch.float32
    scale, _ = layer.qparams()
    assert scale.dtype == torch.bfloat16 and (scale > 1e-6).all()
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    layer(x).float().pow(2).sum().backward()
    assert (layer.weight_scale.grad != 0).float().mean() > 0.95  # every group's scale learns
    w_forward = layer.fake_quantized_weight().detach()
    assert torch.equal(layer.on_grid_weight(torch.bfloat16), w_forward)


def test_fsdp2_bf16_forward_is_what_final_writes(tmp_path):
    """Under FSDP2 with bf16 mixed precision the forward sees the parameters cast to bf16;
    final/ (from the float32 masters) quantizes them as cast, so its weight is the trained
    forward's bit for bit; quantizing the float32 masters directly would not be."""
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qat.quant import QuantScheme
    from qat.quant.linear import QATLinear

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1, init_method=f"file://{tmp_path / 'pg'}")
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(256, 64, bias=False)
        torch.nn.init.normal_(lin.weight, std=0.02)
        layer = QATLinear.from_linear(lin, QuantScheme(bits=4, group_size=64, symmetric=False, learnable=True))
        layer.weight_scale.data *= 1.0 + 1e-3 * torch.randn_like(layer.weight_scale)  # trained masters, not bf16 values
        model = torch.nn.Sequential(layer)
        fully_shard(model, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
        seen = {}
        layer.register_forward_hook(lambda m, a, o: seen.setdefault("w", m.fake_quantized_weight().detach().clone()))
        model(torch.randn(4, 256))
        assert seen["w"].dtype == torch.bfloat16
        full = {k: v.full_tensor() for k, v in model.state_dict().items()}
    finally:
        dist.destroy_process_group()
    master = QATLinear.from_linear(torch.nn.Linear(256, 64, bias=False), QuantScheme(bits=4, group_size=64, symmetric=False, learnable=True))
    master.load_state_dict({k.removeprefix("0."): v for k, v in full.items()})
    written = master.quantized_weight(torch.bfloat16, param_dtype=torch.bfloat16).dequantize(torch.bfloat16)
    assert torch.equal(written, seen["w"])
    naive = master.quantized_weight(torch.bfloat16).dequantize(torch.bfloat16)
    assert not torch.equal(naive, seen["w"])


def test_fp16_a_skipped_step_leaves_the_grad_scaler_usable(tmp_path, monkeypatch):
    """fp16 with a GradScaler: a non-finite loss is skipped, the scaler closes that step (its scale
    falls) and the next steps train; otherwise the next unscale_ raises."""
    from test_reliability import poison_kd_loss

    real = qat.train.loop.make_accelerator
    scalers = []

    from accelerate.state import AcceleratorState

    def with_scaler(recipe, out):
        AcceleratorState._reset_state(reset_partial_state=True)  # this process's earlier runs were not fp16
        acc = real(recipe, out)
        acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0**8), True  # what a GPU fp16 run has
        scalers.append(acc.scaler)
        return acc

    monkeypatch.setattr(qat.train.loop, "make_accelerator", with_scaler)
    poison_kd_loss(monkeypatch, {2})
    out = tmp_path / "run"
    try:
        assert train(out, W4, "train.mixed_precision=fp16", "train.max_steps=4") == 0
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped") for r in rows if r["step"] == 2] == ["non-finite loss"]
    assert [r["step"] for r in rows if "loss" in r] == [1, 3, 4]
    assert scalers[0].get_scale() < 2.0**8


def test_fsdp_clipping_takes_the_models_whole_parameter_list():
    """Accelerate's FSDP ``clip_grad_norm_`` knows the model only by its whole parameter list;
    with frozen parameters left out it unscaled fp16 gradients a second time."""
    from types import SimpleNamespace

    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[0].requires_grad_(False)  # ov-freeze, a SEQ zero-point
    unscaled = []
    acc = SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True, _models=[model],
                          unscale_gradients=lambda: unscaled.append(1), _clip_grad_norm_dtensor_aware=lambda p, n, norm_type=2: 0.0)
    run = SimpleNamespace(accelerator=acc, student=model, trainable=[p for p in model.parameters() if p.requires_grad])
    Accelerator.clip_grad_norm_(acc, qat.train.loop.clip_parameters(run), 1.0)
    assert unscaled == [1]
    Accelerator.clip_grad_norm_(acc, run.trainable, 1.0)  # the trainable ones alone: Accelerate unscales twice
    assert unscaled == [1, 1, 1]


def test_act_bits_runs_are_evaluated_with_their_activation_quantization(tmp_path):
    """final/ of a quant.act_bits run, as its closing evaluation, qat eval and PTQ rows load it:
    the quantized layers' inputs are fake-quantized as in training."""
    from transformers import AutoModelForCausalLM

    from qat.io.models import load_model_dir
    from qat.quant.grid import fake_quantize_activation

    out = tmp_path / "run"
    assert train(out, "quant={bits: 4, group_size: 32, act_bits: 8}", "train.max_steps=1") == 0
    layers = json.loads((out / "final" / "qat_quant.json").read_text())["layers"]
    assert layers and all(info["act_bits"] == 8 for info in layers.values())
    model, _ = load_model_dir(out / "final")
    plain = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert not torch.equal(model(ids).logits, plain(ids).logits)
        for n in layers:
            plain.get_submodule(n).register_forward_pre_hook(lambda m, a: (fake_quantize_activation(a[0], 8), *a[1:]))
        assert torch.equal(model(ids).logits, plain(ids).logits)


# -- no traceback ----------------------------------------------------------------------------
def test_a_path_component_over_255_bytes_is_one_line(tmp_path, capsys):
    assert train(tmp_path / ("x" * 300)) == 2
    err = capsys.readouterr().err
    assert "file systems take at most 255" in err and "Traceback" not in err


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 4 MiB mounted for the test (root with mount rights, as CI and this machine)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with mount rights) to fill a real disk")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(where: Path, keep: int = 0) -> None:
    """Fill the file system of ``where``, leaving about ``keep`` bytes free (a small file still
    fits, a weight file does not: the write fails inside safetensors or torch's zip writer)."""
    with open(where / "filler", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    if keep:
        with open(where / "filler", "r+b") as f:
            f.truncate(max(0, (where / "filler").stat().st_size - keep))


def test_a_read_only_file_system_is_one_line(small_fs, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    assert train(small_fs / "run") == 1
    err = capsys.readouterr().err
    assert "the file system is read-only" in err and "Traceback" not in err, err


@pytest.mark.parametrize("where", ["final", "checkpoint", "eval.json"])
def test_a_full_disk_says_no_space_left(small_fs, where, monkeypatch, capsys):
    """A real full disk at each write: one line naming it (safetensors' SafetensorError and torch's
    zip writer included), the earlier state intact."""
    target = {"final": "write_final", "checkpoint": "checkpoint", "eval.json": "evaluate_final"}[where]
    real = getattr(qat.train.loop, target)

    def full_then(run, *a):
        fill(small_fs, keep=0 if where == "eval.json" else 8192)  # config.json fits, the weights do not
        return real(run, *a)

    monkeypatch.setattr(qat.train.loop, target, full_then)
    out = small_fs / "run"
    assert train(out, W4, "checkpoint.every=2") == 1
    err = capsys.readouterr().err
    assert f"no space left on {out}" in err and "Traceback" not in err, err
    assert not list(out.glob(".final.tmp-*")) and not list(out.glob("checkpoints/.tmp-*"))  # nothing partial left


def test_an_export_on_a_full_disk_is_one_line_and_keeps_the_earlier_one(ckpt_run, small_fs, capsys):
    out = small_fs / "export"
    assert main(["export", str(ckpt_run), "--format", "fake", "--out", str(out)]) == 0
    before = listing(out)
    fill(small_fs)
    assert main(["export", str(ckpt_run), "--format", "fake", "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "Traceback" not in err, err
    assert listing(out) == before and not list(small_fs.glob(".export.tmp-*"))


def test_qat_eval_refuses_bad_numbers_and_another_vocabulary(ckpt_run, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    assert main(["eval", str(ckpt_run), "--batch-size", "0"]) == 2
    assert "--batch-size: expected a positive integer, got 0" in capsys.readouterr().err
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 intermediate_size=64, vocab_size=500)).save_pretrained(other)
    assert main(["eval", str(ckpt_run), "--teacher", str(other)]) == 2
    err = capsys.readouterr().err
    assert "--teacher:" in err and "vocabulary of 500 ids" in err and "Traceback" not in err, err


def test_a_symlinked_checkpoint_never_stops_later_saves(ckpt_run, tmp_path):
    """A checkpoint directory that is a link to elsewhere: never taken as the run's, never pruned
    through (a link renamed but not deletable would stop every later save), and later saves go on."""
    out = copy_run(ckpt_run, tmp_path / "run")
    shutil.rmtree(out / "final")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(str(out / "checkpoints" / "step-1"), elsewhere)
    (out / "checkpoints" / "step-1").symlink_to(elsewhere)
    assert train(out, W4, "checkpoint.resume=auto", "checkpoint.every=1", "checkpoint.keep=1", "train.max_steps=4") == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-4"]
    assert (out / "checkpoints" / "step-1").is_symlink() and (elsewhere / "qat_state.json").is_file()


def test_a_killed_exports_temp_folder_is_removed_and_a_running_run_is_not_exported(ckpt_run, tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "export"
    stale = tmp_path / f".export.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    assert main(["export", str(ckpt_run), "--format", "fake", "--out", str(out)]) == 0
    assert not stale.exists()
    # a run still being written (its lock held by a live process): refused, not exported stale
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
                               "time.sleep(60)",
                               str(ckpt_run / ".qat-run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["export", str(ckpt_run), "--format", "fake", "--out", str(tmp_path / "e2")]) == 2
        assert f"the run is still being written (process {holder.pid} holds it)" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()


def test_files_are_on_disk_before_they_are_renamed_into_place(tmp_path, monkeypatch):
    """Every file of a checkpoint and of final/ is fsynced before the rename that makes it the
    current one, which comes before any older one is deleted."""
    synced, events = set(), []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.add(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        src = Path(src)
        if src.is_dir() and (src.name.startswith(".tmp-step-") or src.name.startswith(".final.tmp-")):
            events.append([str(f) for f in src.rglob("*") if f.is_file() and str(f) not in synced])
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert train(tmp_path / "run", W4, "checkpoint.every=1") == 0
    assert len(events) == 3 and all(not unsynced for unsynced in events), events


def test_a_long_line_is_tokenized_up_to_the_budget(tmp_path, monkeypatch):
    """A document far longer than the token cap (a file without newlines) is tokenized a piece at
    a time up to the budget, with the tokens a whole-document tokenization gives."""
    import qat.data.corpus as corpus
    from qat.recipe import DataSection

    words = "alpha beta gamma delta quick brown fox jumps over the lazy dog".split()
    text = " ".join(words[(i * 7) % len(words)] for i in range(60_000))  # ~330 K characters, one line
    f = tmp_path / "one-line.txt"
    f.write_text(text)
    tok = corpus.train_tokenizer([text[:20000]], 300)
    monkeypatch.setattr(corpus, "PIECE_CHARS", 20_000)
    seen = []
    real_call = type(tok).__call__

    def counting(self, texts, *a, **k):
        seen.append(sum(map(len, texts)) if isinstance(texts, list) else len(texts))
        return real_call(self, texts, *a, **k)

    monkeypatch.setattr(type(tok), "__call__", counting)
    data = DataSection(source="files", files=[str(f)], seq_len=64, max_train_tokens=4096, valid_fraction=0)
    train_set, _ = corpus.build_datasets(data, tok)
    assert sum(seen) < 60_000  # a few pieces, not the whole 330 K characters
    whole = real_call(tok, text, add_special_tokens=False)["input_ids"]
    n = train_set.input_ids.numel()
    assert train_set.input_ids.flatten().tolist() == ([tok.eos_token_id] + whole)[:n]  # packing: eos before each document


# -- derived recipes and reuse resolve the defaults of their own bit width ---------------------
def recipe_data(out: Path, model: Path, **sections) -> dict:
    return {"output_dir": str(out), "model": {"path": str(model)}, "data": {"source": "python-stdlib"}, "train": {"max_steps": 2},
            **sections}


def test_a_bit_allocation_recipe_takes_the_defaults_of_its_own_width(tmp_path):
    """`qat analyze bits` moving a W4 recipe to 2 bits: the grid keys and the freeze policy the
    recipe left null are null again, so they resolve to the 2-bit defaults (SEQ, LSQ scales, no
    freeze), not to the symmetric integer grid and ov-freeze of 4 bits."""
    from conftest import make_tiny_llama
    from transformers import AutoConfig

    from qat.analyze.report import allocation_recipe
    from qat.policy import quant_plan
    from qat.recipe import validate

    model_dir = tmp_path / "llama"
    make_tiny_llama().save_pretrained(model_dir)
    recipe = validate(recipe_data(tmp_path / "run", model_dir, quant={"bits": 4, "group_size": 32}))
    assert (recipe.quant.grid, recipe.quant.symmetric, recipe.quant.learnable, recipe.freeze.policy) == ("int", True, False, "ov-freeze")
    plan = quant_plan(recipe, AutoConfig.from_pretrained(model_dir))
    new, _ = allocation_recipe(recipe, {n: 2 for n in plan}, plan, 2.0)
    assert (new.quant.bits, new.quant.grid, new.quant.symmetric, new.quant.learnable, new.freeze.policy) == (2, "seq", False, True, "none")
    # what the recipe chose itself is kept
    pinned = validate(recipe_data(tmp_path / "run", model_dir, quant={"bits": 4, "group_size": 32, "symmetric": True},
                                  freeze={"policy": "ov-freeze"}))
    new, _ = allocation_recipe(pinned, {n: 2 for n in plan}, plan, 2.0)
    assert (new.quant.grid, new.quant.symmetric, new.freeze.policy) == ("int", True, "ov-freeze")


def test_an_overrides_own_grid_beats_an_inherited_symmetry(tmp_path):
    from qat.recipe import validate

    r = validate(recipe_data(tmp_path, tmp_path, quant={"bits": 4, "symmetric": True, "overrides": [{"pattern": "mlp", "bits": 2, "grid": "seq"}]}))
    o = r.quant.overrides[0]
    assert (o.grid, o.symmetric) == ("seq", False)
    assert (r.quant.grid, r.quant.symmetric) == ("int", True)


def test_compare_reuses_a_run_whose_default_freeze_resolved_on_the_model(tmp_path):
    """A W4 recipe on a model without o_proj / v_proj: the run wrote freeze.policy none (its null
    default, resolved on the model); qat compare resolves it the same way and reuses the run."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from qat.compare import reusable
    from qat.recipe import validate

    model_dir = tmp_path / "neox"
    GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=128)).save_pretrained(model_dir)
    run = tmp_path / "run"
    data = recipe_data(run, model_dir, quant={"bits": 4, "group_size": 32})
    recipe = validate(data)
    assert recipe.freeze.policy == "ov-freeze" and recipe.freeze._by_default
    run.mkdir()
    written = validate(data)
    written.freeze.policy = "none"  # as the run resolved it before writing recipe.yaml
    (run / "recipe.yaml").write_text(written.to_yaml())
    (run / "eval.json").write_text(json.dumps({"steps": 2, "student": {"ppl": 9.0}}))
    (run / "final").mkdir()
    assert reusable(run, recipe, "qat") is not None
    other = validate({**data, "quant": {"bits": 4, "group_size": 16}})
    assert reusable(run, other, "qat") is None


def test_compare_rerun_replaces_a_run_that_sets_resume_auto(ckpt_run, tmp_path):
    from qat.compare import run_or_reuse_qat
    from qat.recipe import load_recipe

    out = copy_run(ckpt_run, tmp_path / "run")
    recipe = load_recipe(PRETRAIN, [f"output_dir={out}", *SMALL, W4, "checkpoint.resume=auto", "checkpoint.every=0"])
    run_or_reuse_qat(recipe, rerun=True)
    assert [json.loads(r)["step"] for r in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "checkpoints").exists()
