"""A missing optional package is one line naming what needed it and the extra that installs it.

``sys.modules[name] = None`` is how Python spells "not installed" for both ``import`` and
``importlib.util.find_spec``, so each case runs the real code path with the package hidden.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from conftest import PRETRAIN  # noqa: E402

from qat.cli import main
from qat.deps import OPTIONAL, MissingDependency, available, require

REPO = Path(__file__).resolve().parents[1]


def hide(monkeypatch, *modules: str) -> None:
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


def one_line(err: str, extra: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"(or the qat-llm[{extra}] extra)" in lines[0] and "pip install '" in lines[0] and "Traceback" not in err, err
    return lines[0]


def test_every_optional_package_names_a_real_extra():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (package, extra) in OPTIONAL.items():
        assert any(req.startswith(package) for req in extras[extra]), (module, extra)
        assert extra in extras["dev"][-1], f"[dev] does not pull {extra}: the tests of {module} would skip"


def test_require_hidden_and_present(monkeypatch):
    assert require("peft", "x").__name__ == "peft"
    hide(monkeypatch, "peft")
    assert not available("peft")
    with pytest.raises(MissingDependency, match=r"^LoRA needs peft, which is not installed: pip install 'peft>=0.17' \(or the qat-llm\[peft\] extra\)$"):
        require("peft", "LoRA")


@pytest.mark.parametrize("overrides,module,extra", [
    (["train.optimizer=adamw_8bit"], "bitsandbytes", "bnb"),
    (["peft={r: 4}", "quant={bits: 4, group_size: 64}"], "peft", "peft"),
], ids=["bnb-optimizer", "peft"])
def test_train_checks_optional_packages_before_anything_loads(monkeypatch, tmp_path, capsys, overrides, module, extra):
    hide(monkeypatch, module)
    out = tmp_path / "run"
    assert main(["train", PRETRAIN, f"output_dir={out}", *overrides]) == 2
    one_line(capsys.readouterr().err, extra)
    assert not out.exists()  # refused before the run directory was made


def test_export_without_compressed_tensors(monkeypatch, tmp_path, capsys):
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")
    (final / "qat_quant.json").write_text(json.dumps({"layers": {"model.layers.0.mlp.up_proj": {
        "bits": 4, "group_size": 64, "symmetric": True, "frozen": False, "act_bits": None}}}))
    hide(monkeypatch, "compressed_tensors")
    for fmt in ("compressed-tensors", "gptq"):
        assert main(["export", str(tmp_path / "run"), "--format", fmt]) == 2
        assert f"qat export --format {fmt} needs compressed-tensors" in one_line(capsys.readouterr().err, "export")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["final"]  # nothing written


def test_eval_tasks_without_lm_eval_before_any_weights(monkeypatch, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # no weights: the check must come first
    (tmp_path / "t.txt").write_text("hello\n")
    hide(monkeypatch, "lm_eval")
    assert main(["eval", str(model), "--seq-len", "8", "--data", str(tmp_path / "t.txt"), "--tasks", "hellaswag"]) == 2
    assert "--tasks needs lm-eval" in capsys.readouterr().err


def test_wandb_missing_is_one_line_and_the_run_goes_on(monkeypatch, tmp_path, capsys):
    from qat.recipe import load_recipe
    from qat.train.tracking import make_accelerator

    hide(monkeypatch, "wandb")
    recipe = load_recipe(PRETRAIN, [f"output_dir={tmp_path}", "tracking.wandb_project=p", "tracking.mode=offline"])
    acc = make_accelerator(recipe, tmp_path)
    assert not acc.log_with
    assert "logging to metrics.jsonl only" in one_line(capsys.readouterr().err, "wandb")


def test_plots_and_nf4_without_their_packages(monkeypatch, tmp_path):
    from qat.analyze.sensitivity import heatmap_png
    from qat.compare import report_png
    from qat.ptq.nf4 import nf4_roundtrip

    hide(monkeypatch, "matplotlib", "bitsandbytes", "bitsandbytes.functional")
    with pytest.raises(MissingDependency, match=r"pip install 'matplotlib>=3.8' \(or the qat-llm\[plot\] extra\)"):
        report_png({"rows": []}, tmp_path / "r.png")
    assert heatmap_png({"layers": []}, tmp_path / "h.png", "t") is False
    with pytest.raises(MissingDependency, match=r"qat ptq --method nf4 needs bitsandbytes.*qat-llm\[bnb\]"):
        nf4_roundtrip(torch.randn(4, 64))


def test_qat_env_names_the_versions_a_bug_report_needs(capsys):
    import torch
    import transformers

    assert main(["env"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.strip().splitlines())
    assert lines["torch"] == torch.__version__.split("+")[0] or lines["torch"] == torch.__version__
    assert lines["transformers"] == transformers.__version__
    assert {"qat-llm", "accelerate", "compressed-tensors", "CUDA (torch built with)", "GPUs"} <= set(lines)


def test_install_hints_name_the_package_with_its_bound():
    from qat.deps import hint

    line = hint("compressed_tensors", "qat export --format compressed-tensors")
    assert "pip install 'compressed-tensors>=0.12' (or the qat-llm[export] extra)" in line, line
