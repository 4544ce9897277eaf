"""``qat analyze``: the CVXQ solver against closed forms and brute force, the sensitivity measurements
on a tiny random Llama (zero when nothing is quantized, larger at 2 bits than at 4), the snippets
as valid recipe sections, and on the llama-tiny fixture the commands end to end: a mixed-precision
allocation through ``qat ptq`` and a 2-step ``qat train`` exports to a packed size equal, byte for
byte, to the size computed from the allocation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_llama
from torch import nn

from qat.analyze.bitalloc import allocate, choose_bits, distortion, export_bytes, fill_budget, knapsack_bits, solve_continuous, used_bits
from qat.analyze.setup import Setup, exact_pattern, layer_depth, layer_type, quantized, squared_grads
from qat.data import TokenBlocks
from qat.quant import QATLinear, QuantScheme, quantize_model
from qat.recipe import validate

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "recipes/tiny/w4-ovfreeze.yaml"
from conftest import needs_tiny as needs_fixtures  # noqa: E402

CHOICES = (2, 3, 4, 8)


def brute_force(d, n, budget, choices=CHOICES):
    best = None
    for combo in itertools.product(choices, repeat=len(d)):
        b = np.array(combo)
        if used_bits(b, n) <= budget + 1e-9:
            v = distortion(d, n, b)
            if best is None or v < best[0]:
                best = (v, b)
    return best


# -- the solver ---------------------------------------------------------------------------------
def test_continuous_matches_closed_form():
    rng = np.random.default_rng(0)
    d = np.exp(rng.normal(0, 1, 6))
    n = rng.integers(1, 5, 6).astype(float)
    b = solve_continuous(d, n, 3.0, lo=-100, hi=100)
    # unclipped optimum: B_i = avg + 1/2 log2(d_i / geometric mean of d weighted by n)
    log_geo = np.dot(n, np.log2(d)) / n.sum()
    assert np.allclose(b, 3.0 + 0.5 * (np.log2(d) - log_geo), atol=1e-9)
    assert abs(np.dot(b, n) - 3.0 * n.sum()) < 1e-6


def test_lagrangian_points_are_optimal_for_their_budget_and_monotone_in_lambda():
    rng = np.random.default_rng(1)
    for _ in range(5):
        d = np.exp(rng.normal(0, 3, 5))
        n = rng.choice([1.0, 2.0, 3.0, 8.0], 5)
        prev = math.inf
        for lam in np.geomspace(d.min() * 1e-6, d.max() * 10, 40):
            b = choose_bits(d, lam)
            used = used_bits(b, n)
            assert used <= prev + 1e-9  # bits used never increase with lambda
            prev = used
            best, _ = brute_force(d, n, used)
            assert distortion(d, n, b) <= best * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(12))
def test_allocation_is_the_brute_force_optimum_and_meets_the_budget(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 7))
    d = np.exp(rng.normal(0, 3, k))
    n = rng.choice([1.0, 2.0, 3.0, 8.0], k)
    avg = float(rng.choice([2.2, 2.5, 3.0, 3.5]))
    a = allocate(d, n, avg)
    assert a.rounding == "knapsack"
    assert used_bits(a.bits, n) <= avg * n.sum() + 1e-9
    assert set(a.bits.tolist()) <= set(CHOICES)
    best, _ = brute_force(d, n, avg * n.sum())
    assert a.distortion == pytest.approx(best, rel=1e-12)
    # the Lagrangian point before rounding is feasible and never better than the rounded optimum
    assert used_bits(a.lagrangian_bits, n) <= avg * n.sum() + 1e-9
    assert distortion(d, n, a.lagrangian_bits) >= a.distortion * (1 - 1e-12)


def test_budget_is_met_exactly_when_reachable_and_uniform_when_layers_are_alike():
    n = np.array([4.0, 4.0, 12.0, 12.0])
    a = allocate(np.ones(4), n, 3.0)
    assert a.bits.tolist() == [3, 3, 3, 3] and a.avg_bits == 3.0
    a = allocate(np.array([1.0, 100.0, 1.0, 100.0]), n, 2.5)
    assert a.avg_bits == 2.5  # 2.5 x 32 = 80 code bits, reachable: used exactly
    assert a.bits[1] > a.bits[0] and a.bits[3] > a.bits[2]  # the layers with the larger G^2 S^2 get more bits


def test_greedy_fallback_meets_budget_and_is_maximal():
    rng = np.random.default_rng(3)
    d = np.exp(rng.normal(0, 2, 30))
    n = rng.choice([1.0, 2.0, 3.0, 8.0], 30)
    budget = 2.7 * n.sum()
    b = fill_budget(np.full(30, 2), d, n, budget)
    left = budget - used_bits(b, n)
    assert left >= -1e-9
    nxt = {2: 3, 3: 4, 4: 8}
    assert all(b[i] == 8 or n[i] * (nxt[b[i]] - b[i]) > left for i in range(30))  # no further step fits
    assert knapsack_bits(d, np.full(30, 0.5), budget) is None  # non-integral sizes: no exact table


def test_allocate_refuses_impossible_budgets():
    with pytest.raises(ValueError, match="below the smallest"):
        allocate(np.ones(3), np.ones(3), 1.5)


def test_export_bytes_formula():
    # int3 g64 [384, 128]: 384 rows x ceil(128*3/32)=12 words x 4 B + 384 x 2 scales x 2 B + 16 B shape
    assert export_bytes((384, 128), 3, 64, True, 2) == 384 * 12 * 4 + 384 * 2 * 2 + 16
    assert export_bytes((8, 64), 4, None, False, 4) == 8 * 8 * 4 + 8 * 4 + 16 + 1 * 1 * 4


# -- sensitivity on a tiny random Llama ----------------------------------------------------------
def tiny_setup(bits: int, group: int = 32, seed: int = 0) -> Setup:
    model = make_tiny_llama(seed)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]
    plan = {n: QuantScheme(bits=bits, group_size=group) for n in names}
    g = torch.Generator().manual_seed(seed)
    calib = TokenBlocks(torch.randint(0, 256, (4, 32), generator=g))
    valid = TokenBlocks(torch.randint(0, 256, (4, 32), generator=g))
    return Setup(model, plan, calib, valid, "random tokens", torch.device("cpu"), "float32")


def test_layer_names_types_and_depths():
    assert layer_type("model.layers.11.self_attn.v_proj") == "v_proj"
    assert layer_depth("model.layers.11.self_attn.v_proj") == 11
    assert layer_depth("lm_head") == -1
    assert exact_pattern("model.layers.1.mlp.up_proj") == r"^model\.layers\.1\.mlp\.up_proj$"


def test_quantized_context_swaps_only_the_named_layers_and_restores_them():
    s = tiny_setup(4)
    name = "model.layers.0.self_attn.v_proj"
    orig = s.model.get_submodule(name)
    w0 = orig.weight.detach().clone()
    with quantized(s.model, s.plan, [name]):
        assert isinstance(s.model.get_submodule(name), QATLinear)
        assert sum(isinstance(m, QATLinear) for m in s.model.modules()) == 1
    assert s.model.get_submodule(name) is orig and torch.equal(orig.weight, w0)
    assert not any(isinstance(m, QATLinear) for m in s.model.modules())


def test_nothing_quantized_gives_zero_errors():
    from qat.analyze.sensitivity import gradient_effects, loss_effects
    from qat.evaluate.diagnostic import layer_output_errors

    s = tiny_setup(2)
    names = list(s.plan)
    eff = gradient_effects(s.model, s.plan, {"none": []}, s.calib, 2)
    assert eff["layers"] == {} and eff["calib_loss"]["only"]["none"] == pytest.approx(eff["calib_loss"]["fp"], abs=0)
    _, d = loss_effects(s.model, s.plan, {"none": []}, s.valid, 2)
    assert d["none"] == 0.0
    # the FP weights themselves as the "quantized" variant: zero output error everywhere
    same = {n: s.model.get_submodule(n).weight.detach().clone() for n in names}
    errs = layer_output_errors(s.model, {"fp": same}, s.valid, 2, desc=None)["fp"]
    assert set(errs) == set(names) and all(e == 0.0 for e in errs.values())
    # the gradient error grows as the bits shrink (at 8 bits it is ~0.1, not 0: with absmax / 127.5
    # scales the positive extreme of each group lands past qmax and the STE gives it no gradient)
    err = []
    for bits in (8, 4, 2):
        s = tiny_setup(bits)
        name = "model.layers.0.self_attn.v_proj"
        err.append(gradient_effects(s.model, s.plan, {"v": [name]}, s.calib, 2)["layers"][name]["grad_error_only"])
    assert 0 < err[0] < err[1] < err[2]


def test_squared_grads_is_the_mean_of_per_batch_squares():
    s = tiny_setup(4)
    name = "model.layers.1.mlp.down_proj"
    r = squared_grads(s.model, [name], s.calib, 2, keep_grads=True)
    w = s.model.get_submodule(name).weight
    per = []
    for i in (0, 2):
        s.model.zero_grad()
        w.requires_grad_(True)
        ids = s.calib.input_ids[i : i + 2]
        s.model(input_ids=ids, labels=ids).loss.backward()
        per.append(w.grad.detach().clone())
    assert r["batches"] == 2
    assert r["sq"][name] == pytest.approx(float(sum(p.square().mean() for p in per) / 2), rel=1e-5)
    assert torch.allclose(r["grads"][name], (per[0] + per[1]) / 2, atol=1e-7)


def test_analyze_outputs_shapes_monotone_in_bits_and_a_valid_freeze_snippet(tmp_path):
    from qat.analyze.sensitivity import analyze, depth_grid, freeze_snippet, heatmap_png, table_md

    res = {}
    for bits in (4, 2):
        res[bits] = analyze(tiny_setup(bits), 2, per_depth=True, progress=lambda *_: None)
    r = res[2]
    types = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert list(r["types"]) == types and sorted(r["ranking"]) == sorted(types)
    assert len(r["layers"]) == 14 and {x["depth"] for x in r["layers"]} == {0, 1}
    tnames, depths, grid = depth_grid(r, "output_error")
    assert tnames == types and depths == [0, 1] and all(v == v for row in grid for v in row)
    for key in ("output_error", "grad_error_only"):
        for a, b in zip(res[2]["layers"], res[4]["layers"]):
            assert a[key] > b[key] > 0, (key, a["name"])
    assert r["all_quantized_delta_nll"] > res[4]["all_quantized_delta_nll"]
    ranked = [r["types"][t]["grad_ratio_all_mean"] for t in r["ranking"]]
    assert ranked == sorted(ranked, reverse=True)

    snippet = freeze_snippet(r, 2)
    section = yaml.safe_load(snippet)
    assert section == {"freeze": {"policy": "custom", "patterns": [rf"\.{t}$" for t in r["ranking"][:2]]}}
    recipe = validate({**yaml.safe_load(TINY_RECIPE.read_text()), **section})
    assert recipe.freeze.policy == "custom"
    from qat.quant import apply_freeze

    frozen = apply_freeze(tiny_setup(4).model, recipe.freeze.policy, recipe.freeze.patterns)
    assert len(frozen) == 4 and all(layer_type(n) in r["ranking"][:2] for n in frozen)
    md = table_md(r, "t")
    assert all(f"| {t} |" in md for t in types) and "by depth" in md
    if heatmap_png(r, tmp_path / "s.png", "t"):
        assert (tmp_path / "s.png").stat().st_size > 1000


def test_cut_margin_is_a_paired_difference_over_depths():
    from qat.analyze.sensitivity import cut_margin, freeze_snippet

    def result(a_vals, b_vals):
        layers = [{"type": "o_proj", "depth": d, "grad_ratio_all": v} for d, v in enumerate(a_vals)]
        layers += [{"type": "v_proj", "depth": d, "grad_ratio_all": v} for d, v in enumerate(b_vals)]
        types = {t: {"grad_ratio_all_mean": 1.0, "delta_nll": 0.0} for t in ("o_proj", "v_proj")}
        return {"ranking": ["o_proj", "v_proj"], "rank_by": "grad_ratio_all", "layers": layers, "types": types}

    # 1.001 vs 0.991 on average, but depth by depth the order flips: not settled
    noisy = result([1.05, 0.95, 1.06, 0.944], [0.94, 1.04, 0.95, 1.034])
    m = cut_margin(noisy, 1)
    assert m["diff"] == pytest.approx(0.01) and m["depths"] == 4 and not m["settled"]
    assert "WITHIN NOISE" in freeze_snippet(noisy, 1)
    # a consistent gap at every depth: settled
    clear = result([1.10, 1.12, 1.11, 1.13], [1.00, 1.01, 1.02, 1.00])
    m = cut_margin(clear, 1)
    assert m["settled"] and m["diff"] == pytest.approx(0.1075)
    assert "a clear margin" in freeze_snippet(clear, 1)
    assert cut_margin(clear, 2) is None  # no type after the cut


def test_allocation_recipe_overrides_validate_and_apply():
    from qat.analyze.report import allocation_recipe

    s = tiny_setup(4, group=64)  # the recipe's group size: only the bit widths need overrides
    names = list(s.plan)
    bits = {n: (2 if "q_proj" in n else 8 if "v_proj" in n else 3) for n in names}
    data = yaml.safe_load(TINY_RECIPE.read_text())
    recipe, snippet = allocation_recipe(validate(data), bits, s.plan, 3.0)
    assert snippet["bits"] == 3 and recipe.output_dir.endswith("-cvxq3")
    assert {o["pattern"] for o in snippet["overrides"]} == {exact_pattern(n) for n in names if "q_proj" in n or "v_proj" in n}
    q = recipe.quant
    report = quantize_model(make_tiny_llama(), q.scheme(), q.targets, q.ignore, q.layer_schemes())
    assert {n: sc.bits for n, sc in report.layers.items()} == bits


# -- the commands on the llama-tiny fixture -------------------------------------------------------
SMALL = ["data.seq_len=64", "data.max_train_tokens=8192", "data.max_valid_tokens=1024", "eval.batch_size=8", "ptq.diag_tokens=512"]


@pytest.fixture
def at_repo(monkeypatch):
    monkeypatch.chdir(REPO)


def _export_and_check(run_dir: Path, alloc: dict) -> None:
    from qat.cli import main
    from qat.export.sizes import layer_bytes

    out = run_dir / "ct"
    assert main(["export", str(run_dir), "--format", "compressed-tensors", "--any-bits", "--out", str(out)]) == 0
    layers = json.loads((run_dir / "final" / "qat_quant.json").read_text())["layers"]
    assert {n: i["bits"] for n, i in layers.items()} == {r["name"]: r["bits"] for r in alloc["layers"]}
    assert layer_bytes(out, layers) == alloc["export_bytes_expected"]  # exactly the allocation's size
    packed = sum(r["shape"][0] * math.ceil(r["shape"][1] * r["bits"] / 32) * 4 for r in alloc["layers"])
    assert packed * 8 == alloc["used_code_bits"] <= alloc["budget_code_bits"]


@needs_fixtures
def test_analyze_bits_then_ptq_and_short_qat_export_to_the_budget(tmp_path, at_repo, capsys):
    from qat.cli import main

    out = tmp_path / "bits"
    assert main(["analyze", "bits", str(TINY_RECIPE), *SMALL, "--avg-bits", "2.5", "--batches", "2", "--batch-size", "2", "--out", str(out)]) == 0
    alloc = json.loads((out / "allocation.json").read_text())
    assert alloc["avg_bits"] <= 2.5 and alloc["rounding"] == "knapsack" and len(alloc["layers"]) == 28
    assert len({r["bits"] for r in alloc["layers"]}) > 1  # really mixed
    assert alloc["distortion"] <= min(v for b, v in alloc["distortion_uniform"].items() if int(b) <= 2.5)
    assert all(r["g2"] > 0 and r["s2"] > 0 for r in alloc["layers"])
    snippet = yaml.safe_load((out / "overrides.yaml").read_text())
    assert snippet["quant"] == alloc["quant"]

    ptq = tmp_path / "ptq"
    assert main(["ptq", str(out / "recipe.yaml"), "--method", "rtn", f"output_dir={ptq}"]) == 0
    _export_and_check(ptq, alloc)

    run = tmp_path / "qat"
    assert main(["train", str(out / "recipe.yaml"), f"output_dir={run}", "train.max_steps=2", "train.micro_batch_size=2", "train.warmup_steps=0"]) == 0
    _export_and_check(run, alloc)


@needs_fixtures
def test_analyze_sensitivity_command_on_llama_tiny(tmp_path, at_repo, capsys):
    from qat.cli import main
    from qat.recipe import load_recipe

    out = tmp_path / "sens"
    argv = ["analyze", "sensitivity", str(TINY_RECIPE), *SMALL, "--batches", "1", "--batch-size", "2", "--valid-tokens", "512"]
    assert main([*argv, "--no-per-depth", "--out", str(out)]) == 0
    res = json.loads((out / "sensitivity.json").read_text())
    assert len(res["layers"]) == 28 and len(res["types"]) == 7 and res["valid_tokens"] == 512
    assert all(t["delta_nll"] > -0.01 for t in res["types"].values())
    assert (out / "sensitivity.md").read_text().count("| ") > 7
    freeze = yaml.safe_load((out / "freeze.yaml").read_text())
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(yaml.safe_dump({**yaml.safe_load(TINY_RECIPE.read_text()), **freeze}))
    recipe = load_recipe(recipe_file)
    assert recipe.freeze.patterns == [rf"\.{t}$" for t in res["ranking"][:2]]
    # a bad flag is a recipe-style error (exit 2), before anything loads
    assert main([*argv, "--freeze-top", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


@needs_fixtures
def test_sensitivity_on_llama_tiny_is_larger_at_2_bits(at_repo):
    from qat.analyze.sensitivity import analyze
    from qat.analyze.setup import load_setup
    from qat.recipe import load_recipe

    res = {}
    for bits, g in ((4, 64), (2, 64)):
        recipe = load_recipe(TINY_RECIPE, [*SMALL, f"quant.bits={bits}", f"quant.group_size={g}"])
        res[bits] = analyze(load_setup(recipe, 2, 512), 2, per_depth=False, progress=lambda *_: None)
    for t in res[2]["types"]:
        assert res[2]["types"][t]["delta_nll"] > res[4]["types"][t]["delta_nll"], t
        assert res[2]["types"][t]["output_error_mean"] > res[4]["types"][t]["output_error_mean"], t
