"""Bad input that used to give a traceback: exit 2 with the key or the file named, in a few lines."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from conftest import PRETRAIN  # noqa: E402

from qat.cli import main
from qat.recipe import MAX_MESSAGE, RecipeError, load_recipe

REPO = Path(__file__).resolve().parents[1]


def refused(capsys, *args: str) -> str:
    assert main(["train", PRETRAIN, *args]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3, err
    return err


@pytest.mark.parametrize("name,content,expect", [
    ("binary.txt", bytes(range(256)) * 8, "UnicodeDecodeError"),
    ("fake.txt.gz", b"not gzip at all", "BadGzipFile"),
    ("broken.jsonl", b'{"text": "a"}\n{"text": "b"} trailing\n', "Trailing data"),
])
def test_unreadable_data_files_name_the_key_and_file(name, content, expect, tmp_path, capsys):
    f = tmp_path / name
    f.write_bytes(content)
    err = refused(capsys, f"output_dir={tmp_path / 'out'}", "data.source=files", f"data.files={f}", "data.valid_fraction=0")
    assert "data.files:" in err and str(f) in err and expect in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("override,expect", [
    ("model.config.hiden_size=64", "model.config.hiden_size: unknown key for llama (did you mean hidden_size?)"),
    ("model.config.hidden_size=-4", "model.config.hidden_size: expected a positive integer (got -4)"),
    ("model.config.num_hidden_layers=two", "model.config.num_hidden_layers: expected a positive integer (got 'two')"),
    ("model.config.num_attention_heads=5", "model.config.num_attention_heads: 5 does not divide hidden_size 192"),
    ("model.config.num_key_value_heads=4", "model.config.num_key_value_heads: 4 does not divide num_attention_heads 6"),
])
def test_inline_model_config_is_checked(override, expect, tmp_path, capsys):
    assert expect in refused(capsys, f"output_dir={tmp_path / 'out'}", override)


def test_a_legacy_config_key_transformers_understands_is_accepted():
    from qat.io.models import model_config

    recipe = load_recipe(PRETRAIN, ["model.config.rope_theta=20000.0"], check_files=False)

    class Tok:
        bos_token_id = eos_token_id = pad_token_id = 0

        def __len__(self):
            return 300

    assert model_config(recipe, Tok()).rope_parameters["rope_theta"] == 20000.0


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    levels = ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    for prev, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 10) + "]")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\noutput_dir: x\ntrain: {lr: *i}\n")  # 10^9 values in 1 KB
    with pytest.raises(RecipeError, match="expands to more than"):
        load_recipe(bomb)


def test_error_lines_are_capped(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("output_dir: x\nmodel: {config: {model_type: llama}}\ndata: {source: python-stdlib}\n"
                   "train: {lr: [" + ", ".join(["1"] * 20000) + "]}\n")
    with pytest.raises(RecipeError) as e:
        load_recipe(big, check_files=False)
    assert all(len(line) <= MAX_MESSAGE for line in str(e.value).splitlines())


def test_output_dir_tilde_is_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_recipe(PRETRAIN, ["output_dir=~/runs/x"], check_files=False).output_dir == str(tmp_path / "runs" / "x")


def test_eval_and_export_of_a_corrupt_final(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{ not json")
    (run / "final" / "qat_quant.json").write_text("{ not json either")
    assert main(["export", str(run), "--format", "fake"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "qat_quant.json" in err, err
    assert main(["eval", str(run / "final"), "--seq-len", "8", "--data", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    with gzip.open(tmp_path / "t.txt.gz", "wt") as f:
        f.write("hello world\n" * 50)
    assert main(["eval", str(run / "final"), "--seq-len", "8", "--data", str(tmp_path / "t.txt.gz")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "config.json" in err, err
