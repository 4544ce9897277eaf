"""Malformed recipes and overrides: each one exits 2 with the dotted key and what was expected, no
traceback, and nothing written (the output_dir is not even created).

Most cases are generated from the schema itself (an unknown key in every section, a wrong type and
an out-of-range value for every typed field), the rest are written by hand: problems only the model,
the data or the file system can show (group sizes, patterns, missing projections, empty data,
paths), YAML syntax, bad override paths. They run in-process through ``qat.cli.main``; a handful
run through a real ``python -m qat`` subprocess as well.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import typing
from pathlib import Path

import annotated_types
import pytest
from pydantic import BaseModel

from qat.cli import main
from qat.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "recipes/tiny/w4-ovfreeze.yaml")
from conftest import needs_tiny as needs_fixtures  # noqa: E402


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the recipe's ../shared paths are relative to the repo root


# -- cases generated from the schema -----------------------------------------------------------
def _sections(model: type[BaseModel], prefix: str = "", in_list: str | None = None):
    """(dotted key prefix, section class, list field or None) for every section, nested ones and
    the items of a list of sections (``quant.overrides.0.``) included."""
    yield prefix, model, in_list
    for name, field in model.model_fields.items():
        ann = field.annotation
        if typing.get_origin(ann) is list:
            (item,) = typing.get_args(ann)
            if isinstance(item, type) and issubclass(item, BaseModel):
                yield from _sections(item, f"{prefix}{name}.0.", f"{prefix}{name}")
            continue
        for t in (ann, *typing.get_args(ann)):
            if isinstance(t, type) and issubclass(t, BaseModel):
                yield from _sections(t, f"{prefix}{name}.", in_list)


def _setting(prefix: str, in_list: str | None, name: str, value: str) -> str:
    if in_list is None:
        return f"{prefix}{name}={value}"
    item = {"pattern": "x", name: value}  # the only list of sections: quant.overrides (pattern required)
    return f"{in_list}=[{{{', '.join(f'{k}: {v}' for k, v in item.items())}}}]"


def _base_type(annotation):
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if len(args) == 1 else annotation


def _schema_cases():
    cases = []
    for prefix, section, in_list in _sections(Recipe):
        # an unknown key in every section (and at the top)
        cases.append((f"unknown:{prefix or '<top>'}", [_setting(prefix, in_list, "bogus_key", "1")], f"{prefix}bogus_key", "unknown key"))
        for name, field in section.model_fields.items():
            key, base = f"{prefix}{name}", _base_type(field.annotation)
            bad = []
            # a wrong type for every scalar field
            wrong = {int: ("abc", "valid integer"), float: ("abc", "valid number"), bool: ("maybe", "valid boolean"),
                     str: ("[1, 2]", "valid string")}.get(base)
            if wrong:
                bad.append(("type", *wrong))
            if base in (int, float):
                bad.append(("bool-as-number", "true", "not a boolean"))
            if typing.get_origin(base) is typing.Literal:
                bad.append(("choice", "no_such_choice", "Input should be"))
            # zero / negative sizes: just past every lower bound
            for m in field.metadata:
                if isinstance(m, annotated_types.Gt):
                    bad.append(("range", str(m.gt), f"greater than {m.gt}"))
                elif isinstance(m, annotated_types.Ge):
                    bad.append(("range", str(m.ge - 1), f"greater than or equal to {m.ge}"))
            for kind, value, expect in bad:
                cases.append((f"{kind}:{key}", [_setting(prefix, in_list, name, value)], key, expect))
    return cases


SCHEMA_CASES = _schema_cases()

HAND_CASES = [
    # unsupported bits, values that validate as a type but not as a value
    ("bits-5", ["quant.bits=5"], "quant.bits", "must be one of [2, 3, 4, 8]"),
    ("bits-1", ["quant.bits=1"], "quant.bits", "must be one of"),
    ("bits-16", ["quant.bits=16"], "quant.bits", "must be one of"),
    ("override-bits-5", ["quant.overrides=[{pattern: mlp, bits: 5}]"], "quant.overrides.0.bits", "must be one of"),
    ("override-unknown-key", ["quant.overrides=[{pattern: mlp, bitz: 3}]"], "quant.overrides.0.bitz", "unknown key"),
    ("override-no-pattern", ["quant.overrides=[{bits: 3}]"], "quant.overrides.0.pattern", "required key is missing"),
    ("act-bits-4", ["quant.act_bits=4"], "quant.act_bits", "Input should be 8"),
    ("grid-unknown", ["quant.grid=nf4"], "quant.grid", "'int' or 'seq'"),
    ("grid-seq-symmetric", ["quant.grid=seq", "quant.symmetric=true"], "quant", "symmetric: true does not go with grid: seq"),
    ("override-grid-seq-symmetric", ["quant.overrides=[{pattern: mlp, grid: seq, symmetric: true}]"], "quant.overrides.0", "does not go with grid: seq"),
    ("lr-inf", ["train.lr=.inf"], "train.lr", "finite number"),
    ("lr-nan", ["train.lr=.nan"], "train.lr", "finite number"),
    ("betas-one", ["train.betas=[0.9]"], "train.betas", "required key is missing"),
    ("betas-range", ["train.betas=[0.9, 1.5]"], "train.betas", "each beta must be in [0, 1)"),
    ("steps-fraction", ["train.max_steps=1.5"], "train.max_steps", "fractional part"),
    ("steps-and-epochs", ["train.epochs=1"], "train", "exactly one of train.max_steps or train.epochs"),
    ("no-teacher-no-ce", ["teacher=null"], "distill.ce_weight", "must be > 0 when teacher is null"),
    ("no-loss", ["distill.kd_weight=0"], "distill", "both 0"),
    ("valid-fraction-1", ["data.valid_files=null", "data.valid_fraction=1"], "data.valid_fraction", "less than 1"),
    ("two-valid-sets", ["data.valid_fraction=0.1"], "data", "at most one of"),
    ("custom-freeze-no-patterns", ["freeze.policy=custom"], "freeze", "needs freeze.patterns"),
    ("patterns-without-policy", ["freeze.policy=none", "freeze.patterns=[x]"], "freeze", "policy is 'none'"),
    ("section-as-value", ["quant=5"], "quant", "valid dictionary"),
    ("model-null", ["model=null"], "model", "valid dictionary"),
    ("model-two-sources", ["model.config={model_type: llama}"], "model", "exactly one of model.path"),
    ("model-config-no-type", ["model.path=null", "model.config={hidden_size: 64}"], "model", "needs a model_type"),
    ("output-dir-null", ["output_dir=null"], "output_dir", "valid string"),
    ("hf-without-name", ["data.source=hf", "data.files=null", "data.valid_files=null"], "data", "needs data.name"),
    # bad override paths and values
    ("override-no-equals", ["train"], "override 'train'", "dotted.key=value"),
    ("override-empty-key", ["=5"], "override '=5'", "dotted.key=value"),
    ("override-empty-part", ["train..lr=1"], "override 'train..lr=1'", "dotted.key=value"),
    ("override-leading-dot", [".lr=1"], "override '.lr=1'", "dotted.key=value"),
    ("override-into-value", ["train.lr.x=1"], "train.lr", "is a value, not a section"),
    ("override-into-top-value", ["output_dir.x=1"], "output_dir", "is a value, not a section"),
    ("override-into-list", ["quant.targets=[a]", "quant.targets.0=b"], "quant.targets", "is a value, not a section"),
    ("override-unknown-section", ["nosuch.key=1"], "nosuch", "unknown key"),
    ("override-bad-yaml", ["train.lr=[1,"], "train.lr", "not valid YAML"),
    ("override-python-tag", ["train.lr=!!python/object/apply:os.system ['echo pwned']"], "train.lr", "safe YAML loader"),
    ("override-duplicate-key", ["quant={bits: 4, bits: 3}"], "quant", "duplicate key 'bits'"),
]

# problems only the model, the data or the file system can show: found before any weights load
MODEL_CASES = [
    ("group-48", ["quant.group_size=48"], "quant.group_size", "does not divide in_features 128"),
    ("group-256", ["quant.group_size=256"], "quant.group_size", "does not divide in_features 128"),
    ("override-group", ["quant.overrides=[{pattern: down_proj, group_size: 100}]"], "quant.overrides.0.group_size", "does not divide in_features 384"),
    ("targets-nomatch", ["quant.targets=[nomatch_xyz]"], "quant.targets", "matches no Linear layer"),
    ("ignore-nomatch", ["quant.ignore=[nomatch_xyz]"], "quant.ignore", "matches no Linear layer"),
    ("override-nomatch", ["quant.overrides=[{pattern: nomatch_xyz, bits: 3}]"], "quant.overrides", "matches no Linear layer"),
    ("targets-bad-regex", ["quant.targets=['[unclosed']"], "quant.targets", "invalid regex"),
    ("custom-freeze-nomatch", ["freeze.policy=custom", "freeze.patterns=[nomatch_xyz]"], "freeze.patterns", "matches no Linear layer"),
    ("ov-freeze-wrong-patterns", ["freeze.patterns=['\\.out_proj$']"], "freeze.patterns", "matches no Linear layer"),
    ("seq-len-above-positions", ["data.seq_len=4096"], "data.seq_len", "exceeds the model's max_position_embeddings"),
    ("batch-above-data", ["train.micro_batch_size=100000"], "train.micro_batch_size", "is more than the data's 512 training blocks"),
]
_SCRATCH = ["model.path=null", "tokenizer.path=../shared/tokenizer", "teacher=null", "distill.ce_weight=1.0"]
MODEL_CASES += [
    # ov-freeze on models without o_proj / v_proj (from-scratch configs: no weights needed)
    ("ov-freeze-opt", [*_SCRATCH, "quant.group_size=32", "model.config={model_type: opt, hidden_size: 64, num_hidden_layers: 2, "
                       "num_attention_heads: 4, ffn_dim: 128, word_embed_proj_dim: 64, max_position_embeddings: 256}"],
     "freeze.policy", "'\\\\.o_proj$' matches no Linear layer"),
    ("ov-freeze-neox", [*_SCRATCH, "quant=null", "model.config={model_type: gpt_neox, hidden_size: 64, num_hidden_layers: 2, "
                        "num_attention_heads: 4, intermediate_size: 128, max_position_embeddings: 256}"],
     "freeze.policy", "matches no Linear layer"),
    ("model-type-unknown", [*_SCRATCH, "model.config={model_type: no_such_arch}"], "model.config.model_type", "unknown model type 'no_such_arch'"),
]


def _file_cases(tmp: Path) -> list[tuple[str, list[str], str, str]]:
    tmp.mkdir()
    (tmp / "empty.txt").write_text("")
    (tmp / "blank.txt").write_text("\n   \n\t\n")
    (tmp / "notext.jsonl").write_text('{"body": "hello world"}\n')
    (tmp / "a_dir").mkdir()
    (tmp / "not_a_model").mkdir()
    (tmp / "not_a_checkpoint").mkdir()
    (tmp / "a_file").write_text("x")
    return [
        ("data-empty", [f"data.files={tmp}/empty.txt"], "data.files", "produced no documents"),
        ("data-blank", [f"data.files={tmp}/blank.txt"], "data.files", "produced no documents"),
        ("valid-empty", [f"data.valid_files={tmp}/empty.txt"], "data.valid_files", "produced no documents"),
        ("data-no-text-field", [f"data.files={tmp}/notext.jsonl", "data.valid_files=null"], "data.text_field", "not found"),
        ("data-is-dir", [f"data.files={tmp}/a_dir"], "data.files", "matches only directories"),
        ("data-missing", ["data.files=./no/such/file.txt"], "data.files", "no file matches"),
        ("valid-missing", ["data.valid_files=./no/such/valid.txt"], "data.valid_files", "no file matches"),
        ("model-missing", ["model.path=./no/such/model"], "model.path", "no such model directory"),
        ("model-not-hf", [f"model.path={tmp}/not_a_model"], "model.path", "no config.json"),
        ("teacher-missing", ["teacher.path=./no/such/teacher"], "teacher.path", "no such model directory"),
        ("tokenizer-missing", ["tokenizer.path=./no/such/tok"], "tokenizer.path", "no such model directory"),
        ("tokenizer-not-a-tokenizer", [f"tokenizer.path={tmp}/not_a_model"], "tokenizer.path", "could not load a tokenizer"),
        ("hf-local-missing", ["data.source=hf", "data.files=null", "data.valid_files=null", "data.name=./no/such/ds"], "data.name", "no such local dataset"),
        ("resume-missing", ["checkpoint.resume=./no/such/ckpt"], "checkpoint.resume", "not found"),
        ("resume-not-a-checkpoint", [f"checkpoint.resume={tmp}/not_a_checkpoint"], "checkpoint.resume", "not a complete qat checkpoint"),
    ]


def _check_error(code: int, err: str, key: str, expect: str, out: Path) -> None:
    assert code == 2, err
    assert "qat: recipe error:" in err and "Traceback" not in err, err
    lines = [line.strip() for line in err.splitlines()]
    assert any(line.startswith(key) for line in lines), f"no line starts with {key!r}:\n{err}"
    assert expect in err, f"{expect!r} not in:\n{err}"
    assert not out.exists(), f"{out} was created"


def _run(capsys, *args: str) -> tuple[int, str]:
    code = main(["train", *args])
    return code, capsys.readouterr().err


def test_enough_generated_cases():
    n = len(SCHEMA_CASES) + len(HAND_CASES) + len(MODEL_CASES) + 15 + len(YAML_FILES)
    assert n >= 50, n
    assert len({c[0] for c in SCHEMA_CASES + HAND_CASES + MODEL_CASES}) == len(SCHEMA_CASES) + len(HAND_CASES) + len(MODEL_CASES)


@pytest.mark.parametrize("name, overrides, key, expect", SCHEMA_CASES + HAND_CASES, ids=[c[0] for c in SCHEMA_CASES + HAND_CASES])
def test_schema_errors(name, overrides, key, expect, tmp_path, capsys):
    out = tmp_path / "out"
    code, err = _run(capsys, TINY, f"output_dir={out}", *overrides)
    _check_error(code, err, key, expect, out)


@needs_fixtures
@pytest.mark.parametrize("name, overrides, key, expect", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_model_errors_before_weights_load(name, overrides, key, expect, tmp_path, capsys, monkeypatch):
    import transformers

    def no_weights(*a, **k):  # the checks must all happen on the weightless (meta) model
        raise AssertionError("weights were loaded before the recipe error was found")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    out = tmp_path / "out"
    code, err = _run(capsys, TINY, f"output_dir={out}", *overrides)
    _check_error(code, err, key, expect, out)


@needs_fixtures
def test_file_and_data_errors(tmp_path, capsys):
    for name, overrides, key, expect in _file_cases(tmp_path / "files"):
        out = tmp_path / f"out-{name}"
        code, err = _run(capsys, TINY, f"output_dir={out}", *overrides)
        try:
            _check_error(code, err, key, expect, out)
        except AssertionError as e:
            raise AssertionError(f"case {name}: {e}") from None


def test_output_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    for target in (f, f / "sub"):
        code, err = _run(capsys, TINY, f"output_dir={target}")
        assert code == 2 and err.count("output_dir:") == 1 and "Traceback" not in err, err
        assert f.read_text() == "keep me"


YAML_FILES = {
    "unclosed-bracket": ("output_dir: x\ntrain: {lr: 1\n", "<recipe>", "line 3"),
    "bad-indent": ("model:\n  path: x\n dtype: float32\n", "<recipe>", "line 3"),
    "tab-indent": ("model:\n\tpath: x\n", "<recipe>", "found character '\\t'"),
    "duplicate-key": ("output_dir: a\noutput_dir: b\n", "<recipe>", "duplicate key 'output_dir'"),
    "python-tag": ("output_dir: !!python/object/apply:os.system ['echo pwned > pwned.txt']\n", "<recipe>", "safe YAML loader"),
    "python-name-tag": ("model: !!python/name:os.system\n", "<recipe>", "safe YAML loader"),
    "a-list": ("- model\n- data\n", "<recipe>", "expected a mapping of sections, got list"),
    "a-scalar": ("just words\n", "<recipe>", "expected a mapping of sections, got str"),
    "empty": ("", "model", "required key is missing"),
    "not-utf8": (b"\xff\xfe\x00model: x\n", "<recipe>", "cannot read"),
}


@pytest.mark.parametrize("name", list(YAML_FILES))
def test_yaml_file_errors(name, tmp_path, capsys):
    text, key, expect = YAML_FILES[name]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(text if isinstance(text, bytes) else text.encode())
    out = tmp_path / "out"
    code, err = _run(capsys, str(recipe), f"output_dir={out}")
    _check_error(code, err, key, expect, out)
    assert not (tmp_path / "pwned.txt").exists() and not (REPO / "pwned.txt").exists()


def test_recipe_file_missing(tmp_path, capsys):
    code, err = _run(capsys, str(tmp_path / "nope.yaml"))
    assert code == 2 and "<recipe>: file not found" in err and "Traceback" not in err


# -- an existing run is never overwritten without --overwrite or resume -------------------------
def _fake_run(d: Path) -> dict[str, str]:
    """A run directory as qat train leaves it (its marker included), without the weights."""
    (d / "checkpoints" / "step-2").mkdir(parents=True)
    (d / ".qat-run.json").write_text('{"kind": "train"}')
    (d / "checkpoints" / "step-2" / "qat_state.json").write_text('{"step": 2}')
    (d / "recipe.yaml").write_text("output_dir: old\n")
    (d / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return _digest(d)


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


@needs_fixtures
def test_existing_run_is_kept(tmp_path, capsys):
    old = tmp_path / "old"
    before = _fake_run(old)
    # no --overwrite: refused
    code, err = _run(capsys, TINY, f"output_dir={old}", "train.max_steps=0")
    assert code == 2 and "output_dir:" in err and "--overwrite" in err, err
    # --overwrite, but the recipe is wrong in a way only the model shows: the old run stays
    code, err = _run(capsys, TINY, f"output_dir={old}", "train.max_steps=0", "quant.group_size=48", "--overwrite")
    assert code == 2 and "quant.group_size" in err, err
    # --overwrite with data that turns out empty: the old run stays too
    (tmp_path / "empty.txt").write_text("")
    code, err = _run(capsys, TINY, f"output_dir={old}", f"data.files={tmp_path}/empty.txt", "--overwrite")
    assert code == 2 and "data.files" in err, err
    # a checkpoint of another run, resumed into this run's directory: refused
    other = tmp_path / "other"
    _fake_run(other)
    code, err = _run(capsys, TINY, f"output_dir={old}", f"checkpoint.resume={other}/checkpoints/step-2")
    assert code == 2 and "checkpoint.resume" in err and "--overwrite" in err, err
    assert _digest(old) == before


@needs_fixtures
def test_symlinked_run_file_is_refused(tmp_path, capsys):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    code, err = _run(capsys, TINY, f"output_dir={out}", "checkpoint.resume=auto")
    assert code == 2 and "output_dir:" in err and "symbolic link" in err, err
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in out.iterdir()) == ["checkpoints"]


# -- a handful through the real command line ----------------------------------------------------
@needs_fixtures
def test_subprocess_cases(tmp_path):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("output_dir: x\ntrain: {lr: 1\n")
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text(f"output_dir: !!python/object/apply:os.system ['touch {tmp_path}/pwned']\n")
    (tmp_path / "empty.txt").write_text("")
    cases = [
        ([str(bad_yaml)], "<recipe>", {}),
        ([str(tagged)], "<recipe>", {}),
        ([TINY, "quant.group_size=48"], "quant.group_size", {}),
        ([TINY, f"data.files={tmp_path}/empty.txt"], "data.files", {}),
        ([TINY, "model.path=nosuch-org/nosuch-model", "tokenizer.path=../shared/tokenizer"], "model.path", {"HF_HUB_OFFLINE": "1"}),
    ]
    procs = []
    for i, (args, key, env) in enumerate(cases):
        out = tmp_path / f"out{i}"
        p = subprocess.Popen(
            [sys.executable, "-m", "qat", "train", *args, f"output_dir={out}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        )
        procs.append((p, key, out))
    for p, key, out in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err[-2000:]
        assert key in err and "Traceback" not in err, err[-2000:]
        assert not out.exists()
    assert not (tmp_path / "pwned").exists()


def test_yaml_12_booleans(tmp_path):
    """``no`` / ``yes`` / ``on`` / ``off`` are strings (YAML 1.2), so Accelerate's spelling
    ``mixed_precision: no`` works in a file and as an override; true/false stay booleans."""
    from qat.recipe import load_recipe

    path = tmp_path / "r.yaml"
    text = Path(TINY).read_text().replace("\ntrain:\n", "\ntrain:\n  mixed_precision: no\n  activation_checkpointing: yes\n")
    path.write_text(text)
    r = load_recipe(path, check_files=False)
    assert r.train.mixed_precision == "no" and r.train.activation_checkpointing is True  # a bool field still reads 'yes'
    r = load_recipe(TINY, ["train.mixed_precision=no", "train.activation_checkpointing=true"], check_files=False)
    assert r.train.mixed_precision == "no" and r.train.activation_checkpointing is True
    assert load_recipe(TINY, ["tracking.run_name=off"], check_files=False).tracking.run_name == "off"


_MINIMAL = {"output_dir": "x", "model": {"path": "m"}, "data": {"files": ["d.txt"]}, "train": {"max_steps": 1}}


@pytest.mark.parametrize(
    "bits, grid, symmetric, learnable, freeze",
    [(2, "seq", False, True, "none"), (3, "int", True, False, "none"), (4, "int", True, False, "ov-freeze"), (8, "int", True, False, "ov-freeze")],
)
def test_a_recipe_that_names_only_the_bits_gets_the_tuned_defaults(bits, grid, symmetric, learnable, freeze):
    """The defaults are the best recipe of the llama-small sweep (benchmarks/RESULTS.md): MSE
    scale init, lr 3e-4, forward-KL KD; at 2 bits SEQ's grid with LSQ scales, at 3 and up a
    symmetric integer one with scales recomputed every step; ov-freeze at 4 bits and up."""
    from qat.recipe import validate

    r = validate({**_MINIMAL, "quant": {"bits": bits}})
    q = r.quant
    assert (q.scale_init, q.grid, q.learnable, q.symmetric, q.lsq_grad_scale) == ("mse", grid, learnable, symmetric, False)
    assert r.train.lr == 3e-4 and r.distill.loss == "forward_kl" and r.freeze.policy == freeze
    assert (q.scheme().grid, q.scheme().symmetric, q.scheme().learnable) == (grid, symmetric, learnable)
    explicit = validate({**_MINIMAL, "quant": {"bits": bits, "symmetric": not symmetric, "learnable": not learnable}}).quant
    assert (explicit.grid, explicit.symmetric, explicit.learnable) == ("int", not symmetric, not learnable)  # a set symmetry: the integer grid
    assert validate({**_MINIMAL, "quant": {"bits": bits}, "freeze": {"policy": "none"}}).freeze.policy == "none"
    assert validate({**_MINIMAL, "quant": {"bits": bits}, "peft": {"r": 4}}).freeze.policy == "none"  # LoRA-QAT: no default freeze
    assert validate({**_MINIMAL, "quant": None}).freeze.policy == "none"


def test_an_override_takes_the_defaults_of_its_own_bits_and_recipe_yaml_keeps_them():
    """A 2-bit override on a 4-bit recipe is asymmetric with LSQ scales, as a 2-bit recipe would be,
    unless the recipe names the key; and the saved recipe (to_dict, what recipe.yaml holds)
    resolves to the same layer schemes when it is loaded again (a resume, a `qat eval`)."""
    from qat.recipe import validate

    ov = [{"pattern": "mlp", "bits": 2}, {"pattern": "q_proj", "group_size": 32}, {"pattern": "k_proj", "bits": 2, "symmetric": True}]
    q = validate({**_MINIMAL, "quant": {"bits": 4, "overrides": ov}}).quant
    got = {p: (s.bits, s.symmetric, s.learnable) for p, s in q.layer_schemes()}
    assert got == {"mlp": (2, False, True), "q_proj": (4, True, False), "k_proj": (2, True, True)}
    pinned = validate({**_MINIMAL, "quant": {"bits": 4, "symmetric": True, "learnable": False, "overrides": ov}}).quant
    assert {p: (s.symmetric, s.learnable) for p, s in pinned.layer_schemes()}["mlp"] == (True, False)
    for quant in (q, pinned):
        again = validate({**_MINIMAL, "quant": quant.model_dump()}).quant
        assert again.layer_schemes() == quant.layer_schemes() and again.scheme() == quant.scheme()


def test_quant_grid_seq_resolves_asymmetric_and_recipe_yaml_keeps_it():
    """quant.grid: seq (ParetoQ's SEQ) makes a null quant.symmetric false (its codes are unsigned around
    a fixed half-integer zero-point), in the overrides too; the default grid is the integer one."""
    from qat.recipe import validate

    ov = [{"pattern": "mlp", "bits": 4}, {"pattern": "k_proj", "grid": "int"}, {"pattern": "v_proj", "symmetric": True}]
    q = validate({**_MINIMAL, "quant": {"bits": 2, "grid": "seq", "overrides": ov}}).quant
    assert (q.scheme().grid, q.scheme().symmetric, q.scheme().learnable) == ("seq", False, True)
    got = {p: (s.bits, s.grid, s.symmetric) for p, s in q.layer_schemes()}
    assert got == {"mlp": (4, "seq", False), "k_proj": (2, "int", False), "v_proj": (2, "int", True)}
    # the 2-bit default is SEQ unless the recipe sets the symmetry (then it chose an integer grid)
    on_4 = validate({**_MINIMAL, "quant": {"bits": 4, "overrides": [{"pattern": "mlp", "bits": 2}]}}).quant.layer_schemes()
    pinned = validate({**_MINIMAL, "quant": {"bits": 4, "symmetric": True, "overrides": [{"pattern": "mlp", "bits": 2}]}}).quant.layer_schemes()
    assert (on_4[0][1].grid, pinned[0][1].grid, pinned[0][1].symmetric) == ("seq", "int", True)
    again = validate({**_MINIMAL, "quant": q.model_dump()}).quant
    assert again.layer_schemes() == q.layer_schemes() and again.scheme() == q.scheme()


def test_the_default_ov_freeze_needs_the_layers_and_otherwise_freezes_nothing(capsys):
    """freeze.policy: null is ov-freeze at 4 bits; on a model without o_proj / v_proj (GPT-NeoX: fused
    qkv, `dense`) the weightless check turns it into none, before recipe.yaml is written, and says so;
    an explicit ov-freeze on that model stays an error naming the key."""
    from transformers import AutoConfig, LlamaConfig

    from qat.policy import dry_run_quant
    from qat.recipe import RecipeError, validate

    neox = AutoConfig.for_model("gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, max_position_embeddings=256)
    llama = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, vocab_size=256)
    quant = {"bits": 4, "group_size": 32}
    r = validate({**_MINIMAL, "quant": quant})
    assert r.freeze.policy == "ov-freeze"
    dry_run_quant(r, llama)
    assert r.freeze.policy == "ov-freeze" and capsys.readouterr().out == ""
    dry_run_quant(r, neox)
    assert r.freeze.policy == "none" and "no o_proj / v_proj" in capsys.readouterr().out
    assert r.to_dict()["freeze"]["policy"] == "none"  # what recipe.yaml will hold
    with pytest.raises(RecipeError, match=r"^freeze.policy: .*matches no Linear layer"):
        dry_run_quant(validate({**_MINIMAL, "quant": quant, "freeze": {"policy": "ov-freeze"}}), neox)
