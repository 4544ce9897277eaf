"""`qat eval` (windows, stride, determinism, KL), `qat ptq` / `qat compare` end to end on the
llama-tiny fixture, the local-vs-global report, and the optional lm-eval adapter."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import needs_tiny, require_tiny  # noqa: E402

from qat.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = needs_tiny  # every test here runs on llama-tiny; a mark skips before module fixtures set up
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
FAST = [
    "data.max_train_tokens=8192",
    "data.max_valid_tokens=1024",
    "train.micro_batch_size=4",
    "eval.batch_size=8",
    "ptq.batch_size=8",
    "ptq.diag_tokens=1024",
    "ptq.qera.rank=8",
]


@pytest.fixture(autouse=True)
def _needs_fixture(monkeypatch):
    require_tiny()
    monkeypatch.chdir(REPO)  # the recipe's ../shared paths are relative to the repo root


# -- windows and perplexity -----------------------------------------------------------------
@pytest.fixture(scope="module")
def lm():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = REPO.parent / "shared" / "models" / "llama-tiny"
    require_tiny()
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(str(path))


def _valid_docs(n_docs: int = 3):
    from qat.data import load_documents
    from qat.recipe import load_recipe

    r = load_recipe(TINY)
    return load_documents(r.data, "valid")[:n_docs], r


def test_windows_equal_the_validation_blocks(lm):
    from qat.data import build_datasets
    from qat.evaluate.perplexity import make_windows, token_stream

    _, tok = lm
    docs, r = _valid_docs(50)
    _, valid = build_datasets(r.data.model_copy(update={"max_train_tokens": 128, "max_valid_tokens": 4096}), tok)
    w = make_windows(token_stream(docs, tok, 4096), 128, None, 4096)
    assert torch.equal(w.input_ids, valid.input_ids)
    assert w.n_scored == len(w) * 127


def test_perplexity_deterministic_batch_invariant_strided(lm):
    from qat.evaluate.perplexity import make_windows, perplexity, token_stream

    model, tok = lm
    docs, _ = _valid_docs(3)
    stream = token_stream(docs, tok, 3000)
    plain = make_windows(stream, 128, None, 1024)
    a = perplexity(model, plain, batch_size=4)
    b = perplexity(model, plain, batch_size=4)
    c = perplexity(model, plain, batch_size=3)
    assert a == b  # bit-identical on a rerun
    assert a["tokens"] == c["tokens"] == 8 * 127
    assert c["nll"] == pytest.approx(a["nll"], rel=1e-6)
    same = perplexity(model, make_windows(stream, 128, 128, 1024), batch_size=4)
    assert same == a  # stride = seq_len is the non-overlapping protocol
    strided = make_windows(stream, 128, 32, 1024)
    s = perplexity(model, strided, batch_size=8)
    # every token after the first window is scored once: 127 + 32 per further window
    assert s["tokens"] == 127 + 32 * (len(strided) - 1) == strided.n_scored
    assert s["tokens"] == 1024 - 128 + 127
    assert s["ppl"] < a["ppl"]  # more context per predicted token
    t = perplexity(model, plain, batch_size=4, teacher=model)
    assert t["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert t["teacher_ppl"] == pytest.approx(a["ppl"], rel=1e-9)


def test_eval_cli_on_a_model_dir_with_data(lm, tmp_path, capsys):
    path = REPO.parent / "shared" / "models" / "llama-tiny"
    data = tmp_path / "doc.txt"
    data.write_text(" ".join(["The old man looked at me with a smile."] * 200))
    out = tmp_path / "eval.json"
    args = ["eval", str(path), "--data", str(data), "--seq-len", "64", "--stride", "32", "--teacher", str(path), "--out", str(out)]
    assert main(args) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] > 0 and r["stride"] == 32 and r["kl_to_teacher"] == pytest.approx(0, abs=1e-6)
    assert "perplexity" in capsys.readouterr().out
    assert main(["eval", str(path), "--seq-len", "64"]) == 2  # no data for a bare model


# -- ptq / compare end to end ---------------------------------------------------------------
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """`qat compare` on the tiny recipe: rtn, gptq, qera-exact and a 3-step QAT run."""
    runs = tmp_path_factory.mktemp("cmp")
    import os

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        args = ["compare", TINY, f"output_dir={runs}/tiny", *FAST, "train.max_steps=3", "ptq.methods=[rtn,gptq,qera-exact]"]
        assert main(args) == 0
    finally:
        os.chdir(cwd)
    return runs


def test_compare_writes_consistent_report(compared):
    out = compared / "tiny-compare"
    report = json.loads((out / "report.json").read_text())
    md = (out / "report.md").read_text()
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["fp (teacher)", "rtn", "gptq", "qera-exact", "qat"]
    fp = rows["fp (teacher)"]["ppl"]
    for method, row in rows.items():
        if method.startswith("fp"):
            continue
        run = Path(row["run_dir"])
        ev = json.loads((run / "eval.json").read_text())
        assert row["ppl"] == ev["student"]["ppl"]
        assert row["kl_to_teacher"] == ev["student"]["kl_to_teacher"]
        assert row["wall_time_s"] == ev["wall_time_s"] and row["wall_time_s"] > 0
        assert row["ppl_ratio"] == pytest.approx(row["ppl"] / fp, rel=1e-12)
        assert ev["teacher"]["ppl"] == pytest.approx(fp, rel=1e-9)  # one FP, the same blocks for all
        errors = report["recipes"][0]["layer_errors"][method]
        assert len(errors) == 28 and row["mean_layer_error"] == pytest.approx(sum(errors.values()) / 28)
        if method != "qat":
            assert row["mean_layer_error"] == pytest.approx(ev["mean_layer_error"])
        line = next(line for line in md.splitlines() if line.startswith(f"| W4g64 | {method} |"))
        assert f"{row['ppl']:.3f}" in line and f"{row['ppl_ratio']:.4f}" in line and f"{row['mean_layer_error']:.4f}" in line
        assert f"{row['wall_time_s']:.1f}" in line
    # same data budget: PTQ calibrates on exactly the tokens QAT trains on (3 steps x 4 x 128)
    assert rows["gptq"]["data_tokens"] == rows["qat"]["data_tokens"] == 3 * 4 * 128
    assert rows["rtn"]["data_tokens"] == 0
    assert rows["gptq"]["mean_layer_error"] < rows["rtn"]["mean_layer_error"]
    assert rows["qera-exact"]["mean_layer_error"] < rows["gptq"]["mean_layer_error"]
    assert "## Local vs global" in md and "## Per-layer relative output error" in md


def test_ptq_run_dir_layout_and_adapter(compared):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qat.data import build_datasets
    from qat.evaluate.perplexity import perplexity
    from qat.io.final import load_quant_layers
    from qat.recipe import load_recipe

    run = compared / "tiny-ptq-qera-exact"
    for f in ("recipe.yaml", "eval.json", "final/config.json", "final/qat_quant.json", "final/qat/qparams.safetensors", "final/adapter/adapter_config.json"):
        assert (run / f).exists(), f
    ev = json.loads((run / "eval.json").read_text())
    assert ev["method"] == "qera-exact" and ev["calib_tokens"] == 3 * 4 * 128 and ev["lora_rank"] == 8
    assert len(load_quant_layers(run / "final")) == 28
    r = load_recipe(run / "recipe.yaml")
    assert r.output_dir == str(run)
    base = AutoModelForCausalLM.from_pretrained(str(run / "final"), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(run / "final" / "adapter")).eval()
    from transformers import AutoTokenizer

    _, valid = build_datasets(r.data.model_copy(update={"max_train_tokens": 128}), AutoTokenizer.from_pretrained(str(run / "final")))
    assert perplexity(model, valid, 8)["ppl"] == pytest.approx(ev["student"]["ppl"], rel=1e-5)


def test_eval_cli_reproduces_the_run_eval(compared, capsys):
    run = compared / "tiny-ptq-qera-exact"
    out = compared / "qera-eval.json"
    assert main(["eval", str(run), "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    ev = json.loads((run / "eval.json").read_text())
    assert r["tokens"] == ev["student"]["tokens"]
    assert r["ppl"] == pytest.approx(ev["student"]["ppl"], rel=1e-5)
    assert r["kl_to_teacher"] == pytest.approx(ev["student"]["kl_to_teacher"], rel=1e-4, abs=1e-6)


def test_compare_reuses_complete_runs(compared, capsys):
    before = {p: p.stat().st_mtime for p in compared.glob("*/eval.json")}
    args = ["compare", TINY, f"output_dir={compared}/tiny", *FAST, "train.max_steps=3", "ptq.methods=[rtn,gptq,qera-exact]"]
    assert main(args) == 0
    report = json.loads((compared / "tiny-compare" / "report.json").read_text())
    assert all(r["reused"] for r in report["rows"])
    assert before == {p: p.stat().st_mtime for p in compared.glob("*/eval.json")}
    # a QAT run of another recipe in the same place is not silently replaced
    other = ["compare", TINY, f"output_dir={compared}/tiny", *FAST, "train.max_steps=2", "ptq.methods=[]"]
    assert main(other) == 2
    assert "--rerun" in capsys.readouterr().err


def test_ptq_errors_exit_2(tmp_path, capsys):
    assert main(["ptq", TINY, "--method", "gptq", f"output_dir={tmp_path}/x", "ptq.gptq.dampening=0.1"]) == 2
    assert "ptq.gptq.dampening: unknown key" in capsys.readouterr().err
    assert main(["ptq", TINY, "--method", "gptq", f"output_dir={tmp_path}/x", "ptq.calib_tokens=0", *FAST]) == 2
    assert "ptq.calib_tokens" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["ptq", TINY, "--method", "smoothquant"])


def test_ptq_default_output_dir_and_overwrite(compared, capsys):
    from qat.ptq import default_run_dir
    from qat.recipe import load_recipe

    r = load_recipe(TINY, [f"output_dir={compared}/tiny"])
    assert default_run_dir(r, "gptq") == compared / "tiny-ptq-gptq"
    # the existing run is not overwritten without --overwrite
    assert main(["ptq", TINY, "--method", "rtn", f"output_dir={compared}/tiny-ptq-rtn", *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err


# -- local vs global ------------------------------------------------------------------------
def test_local_vs_global_inversions():
    from qat.evaluate.diagnostic import local_vs_global_inversions

    rows = [
        {"method": "a", "mean_layer_error": 0.05, "kl_to_teacher": 0.09, "ppl": 10},
        {"method": "b", "mean_layer_error": 0.08, "kl_to_teacher": 0.04, "ppl": 9},
        {"method": "c", "mean_layer_error": 0.10, "kl_to_teacher": 0.10, "ppl": 11},
    ]
    assert local_vs_global_inversions(rows) == [("a", "b")]


# -- lm-eval (optional extra) ---------------------------------------------------------------
def test_lm_eval_local_jsonl_tasks(lm, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval not installed (the eval extra)")
    from qat.evaluate.harness import run_lm_eval

    model, tok = lm
    ppl = tmp_path / "books.jsonl"
    ppl.write_text("".join(json.dumps({"text": d[:600]}) + "\n" for d in _valid_docs(2)[0]))
    mc = tmp_path / "mc.jsonl"
    mc.write_text(
        json.dumps({"query": "The old man looked at me with a", "choices": [" smile.", " banana."], "gold": 0}) + "\n"
        + json.dumps({"query": "She opened the", "choices": [" door.", " of."], "gold": 0}) + "\n"
    )
    res = run_lm_eval(model, tok, [str(ppl), str(mc)], batch_size=2, max_length=256)
    assert math.isfinite(res["qat_local_books"]["word_perplexity,none"])
    assert res["qat_local_mc"]["acc,none"] in (0.0, 0.5, 1.0)


def test_compare_logs_the_table_to_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    import warnings

    from qat.compare import log_wandb
    from qat.recipe import load_recipe

    monkeypatch.setenv("WANDB_SILENT", "true")
    r = load_recipe(TINY, ["tracking.wandb_project=qat-tests", "tracking.mode=offline"])
    row = {"recipe": "W4g64", "method": "rtn", "bits": 4, "group_size": 64, "bits_per_weight": 4.25, "ppl": 43.0,
           "ppl_ratio": 1.05, "kl_to_teacher": 0.07, "mean_layer_error": 0.08, "data_tokens": 0, "wall_time_s": 10.0}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a failed log would warn
        log_wandb(r, {"recipe_files": [TINY], "rows": [row]}, tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*")), "no offline wandb run written"


def test_a_ptq_run_is_reused_across_qat_only_settings():
    """PTQ results do not depend on how QAT trains: a change of lr, LSQ, KD or freezing reuses
    them; a change of the grid, the data or the calibration budget does not."""
    from qat.compare import _comparable
    from qat.recipe import load_recipe

    base = load_recipe(TINY, ["output_dir=x"]).to_dict()
    same = load_recipe(TINY, ["output_dir=y", "train.lr=1e-3", "quant.learnable=true", "distill.loss=jsd", "freeze.policy=none"]).to_dict()
    assert _comparable(base, "ptq") == _comparable(same, "ptq")
    assert _comparable(base, "qat") != _comparable(same, "qat")
    for change in ("quant.scale_init=mse", "quant.bits=3", "train.max_steps=31", "train.seed=1", "data.seq_len=64"):
        other = load_recipe(TINY, ["output_dir=x", change]).to_dict()
        assert _comparable(base, "ptq") != _comparable(other, "ptq"), change
    # another method's options leave a run alone; its own do not
    for change, method in (("ptq.block_ap.lr=1e-4", "gptq"), ("ptq.awq.grid=4", "block-ap"), ("ptq.gptq.damp=0.1", "rtn")):
        other = load_recipe(TINY, ["output_dir=x", change]).to_dict()
        assert _comparable(base, "ptq", method) == _comparable(other, "ptq", method), change
    for change, method in (("ptq.block_ap.lr=1e-4", "block-ap"), ("ptq.gptq.damp=0.1", "qera-exact"), ("ptq.qera.rank=4", "qera-approx")):
        other = load_recipe(TINY, ["output_dir=x", change]).to_dict()
        assert _comparable(base, "ptq", method) != _comparable(other, "ptq", method), change
