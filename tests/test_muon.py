"""Muon as a stage's optimizer: which tensors it takes, its update, and the recipe's fields."""

from __future__ import annotations

import pytest
import torch

from smallcoder import ModelConfig, SmallCoderError, new_model
from smallcoder.train.muon import Muon, MuonAdamW, describe, named_split, orthogonalize
from smallcoder.train.optim import apply_stage, build_optimizer, set_lr
from smallcoder.train.recipe import packaged_recipe, parse_recipe

CFG = ModelConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32)


def _stage(recipe_text_extra: str = "", stage_extra: str = ""):
    import tomllib

    raw = tomllib.loads(f"""
[model]
preset = "tiny"
tokenizer = "bigcode/starcoder"
[defaults]
lr = 1e-3
{recipe_text_extra}
[[stages]]
tokens = 1000
seq_len = 32
global_batch_tokens = 64
micro_batch = 2
{stage_extra}
[[stages.sources]]
source = "builtin:code"
""")
    return parse_recipe(raw, "r.toml").stages[0]


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    model = new_model(CFG, seed=0)
    muon, rest = named_split(model)
    names = [n for n, _ in muon]
    assert len(names) == 2 * 7 and all(".layers." in n and n.endswith("_proj.weight") for n in names)
    assert {n for n, _ in rest} == {n for n, _ in model.named_parameters()} - set(names)
    assert any("embed_tokens" in n for n, _ in rest) and any("lm_head" in n for n, _ in rest)
    line = describe(model)
    assert line.startswith("muon on 14 matrices") and "model.layers.*.mlp.up_proj.weight" in line
    assert "adamw on" in line and "lm_head.weight" in line and "input_layernorm" in line


@pytest.mark.parametrize("shape", [(24, 64), (64, 24), (40, 40)])
def test_orthogonalize_flattens_the_singular_values(shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1)) * torch.logspace(-1, 1, shape[1])
    before, s = torch.linalg.svdvals(g), torch.linalg.svdvals(orthogonalize(g))
    assert orthogonalize(g).shape == g.shape
    # Jordan et al.'s quintic leaves them near U(0.5, 1.5), not exactly 1; the smallest lag behind
    assert s.max() < 1.5 and ((s > 0.5) & (s < 1.5)).float().mean() > 0.75
    assert before.max() / before.median() > 2 * s.max() / s.median()


def test_one_muon_step_has_adamw_like_rms_and_decays():
    """Liu et al.'s scaling: the update's RMS is ~0.2 x lr, whatever the matrix's shape."""
    for shape in ((16, 64), (96, 24)):
        w = torch.nn.Parameter(torch.ones(shape))
        opt = Muon([w], lr=0.1, weight_decay=0.0)
        w.grad = torch.randn(shape, generator=torch.Generator().manual_seed(2))
        opt.step()
        rms = (w.detach() - 1).pow(2).mean().sqrt().item()
        assert 0.1 * 0.1 < rms < 0.3 * 0.1, (shape, rms)
        assert set(opt.state[w]) == {"momentum_buffer"}
    w = torch.nn.Parameter(torch.ones(8, 8))
    opt = Muon([w], lr=0.1, weight_decay=0.5)
    w.grad = torch.zeros(8, 8)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((8, 8), 0.95))  # decoupled decay: 1 - lr * wd
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(4))], lr=0.1, weight_decay=0.0)


def test_build_optimizer_for_a_muon_stage_and_the_schedule_on_both_groups():
    stage = _stage(stage_extra='optimizer = "muon"\nmuon_lr = 0.02\nmuon_weight_decay = 0.05')
    model = new_model(CFG, seed=0)
    opt = build_optimizer(model, stage, fsdp=False)
    assert isinstance(opt, MuonAdamW)
    groups = {g["name"]: g for g in opt.param_groups}
    assert set(groups) == {"muon", "decay", "no_decay"}
    set_lr(opt, 5e-4)  # half the stage's peak: Muon's group follows at its own scale
    assert groups["muon"]["lr"] == pytest.approx(0.01) and groups["decay"]["lr"] == pytest.approx(5e-4)
    apply_stage(opt, stage)
    assert groups["muon"]["weight_decay"] == 0.05 and groups["decay"]["weight_decay"] == 0.1
    ids = torch.randint(0, 96, (2, 16))
    model(ids, labels=ids).backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if "norm" not in n)
    assert all(p.grad is None for p in model.parameters())


def test_muon_adamw_state_holds_both_parts_and_round_trips(tmp_path):
    """What a checkpoint saves of a MuonAdamW: Muon's momentum for the matrices and AdamW's moments
    for the rest; loaded into a fresh optimizer, the next steps are bit-identical."""
    from safetensors.torch import save_file

    from smallcoder.train.runstate import OPTIM_FILE, load_optimizer, optimizer_tensors

    stage = _stage(stage_extra='optimizer = "muon"')
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model, opt):
        model(ids, labels=ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    a = new_model(CFG, seed=0)
    opt_a = build_optimizer(a, stage, fsdp=False)
    step(a, opt_a)
    saved = optimizer_tensors(a, opt_a, fsdp=False)
    matrices, rest = named_split(a)
    assert {f"{n}.momentum_buffer" for n, _ in matrices} <= set(saved)
    assert {f"{n}.{k}" for n, _ in rest for k in ("step", "exp_avg", "exp_avg_sq")} <= set(saved)
    save_file(saved, str(tmp_path / OPTIM_FILE))
    b = new_model(CFG, seed=0)
    b.load_state_dict(a.state_dict())
    opt_b = build_optimizer(b, stage, fsdp=False)
    load_optimizer(b, opt_b, tmp_path, fsdp=False)
    for _ in range(2):
        step(a, opt_a)
        step(b, opt_b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = new_model(CFG, seed=0)
    with pytest.raises(SmallCoderError, match="another optimizer's state"):
        load_optimizer(c, build_optimizer(c, _stage(), fsdp=False), tmp_path, fsdp=False)


def test_muon_settings_default_to_the_stages():
    stage = _stage(stage_extra='optimizer = "muon"\nlr = 3e-3\nweight_decay = 0.2')
    assert stage.muon_settings == (3e-3, 0.2, 0.95)


@pytest.mark.parametrize("extra, field, words", [
    ('optimizer = "sgd"', "stages[0].optimizer", "adamw"),
    ("muon_lr = 0.02", "stages[0].muon_lr", "optimizer = \"muon\""),
    ("muon_momentum = 0.9", "stages[0].muon_momentum", "optimizer = 'adamw'"),
    ('optimizer = "muon"\nmuon_momentum = 1.0', "stages[0].muon_momentum", "1"),
    ('optimizer = "muon"\nmuon_lr = -1', "stages[0].muon_lr", "-1"),
])
def test_bad_optimizer_fields_name_the_field(extra, field, words):
    with pytest.raises(SmallCoderError) as e:
        _stage(stage_extra=extra)
    msg = str(e.value)
    assert msg.startswith("r.toml: ") and field in msg and words in msg and "\n" not in msg


def test_a_muon_field_in_defaults_reaches_the_muon_stages_only():
    assert _stage(recipe_text_extra="muon_lr = 0.01").muon_lr is None  # an AdamW stage: not its field
    assert _stage(recipe_text_extra='optimizer = "muon"\nmuon_lr = 0.01').muon_lr == 0.01


def test_shipped_recipes_still_parse():
    from smallcoder.train.recipe import load_recipe

    for name in ("tiny", "smallcoder-303m"):
        recipe = load_recipe(packaged_recipe(name))
        assert all(s.optimizer in ("adamw", "muon") for s in recipe.stages)


def test_defaults_muon_fields_reach_only_the_muon_stages(tmp_path):
    """One [defaults] for Muon pre-training and an AdamW SFT stage (the 303M recipe's shape); a
    Muon field in an AdamW stage's own table is still an error naming it."""
    from smallcoder.train.recipe import load_recipe, packaged_recipe

    r = load_recipe(packaged_recipe("smallcoder-303m"))
    assert [(s.optimizer, s.muon_lr) for s in r.stages] == [("muon", 2.5e-3)] * 3 + [("adamw", None)]
    r = load_recipe(packaged_recipe("tiny"), ["defaults.optimizer=adamw"])  # switch a Muon recipe whole
    assert {(s.optimizer, s.muon_lr) for s in r.stages} == {("adamw", None)}
    with pytest.raises(SmallCoderError, match=r"stages\[3\]\.muon_lr: 0\.1 on a stage with optimizer = 'adamw'"):
        load_recipe(packaged_recipe("tiny"), ["stages.3.optimizer=adamw", "stages.3.muon_lr=0.1"])
