"""The training levers at the three seams: the local objective (distillation), the blueprint
policy (full nodes, mixed keeps) and the outer step (server optimizer); and the fine-tune
pipeline built on them (a dense run, then TwIST from it, then the comparison table)."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from twist_fl.core.blocks import coverage_average, held_masks, slice_state
from twist_fl.core.blueprint import Blueprint
from twist_fl.core.config import RunConfig, preset
from twist_fl.core.model import GPT
from twist_fl.core.objective import Distillation, batch_loss, init_teacher
from twist_fl.core.outer import OuterOptimizer
from twist_fl.core.policy import full_node_turns, round_plan

from .helpers import TINY, checkpoint_weights, final_weights, run_local

CFG = preset("tiny", vocab_size=257)


def sent_train(grid, round_):
    return [m for m in grid.sent
            if m.metadata.message_type == "train" and m.content["config"]["server-round"] == round_]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- distillation ---------------------------------------------------------------------------------


def test_distillation_loss_is_the_hand_computed_mix_of_ce_and_kl():
    torch.manual_seed(0)
    student, teacher = GPT(CFG), GPT(CFG).eval()
    x = torch.randint(0, 257, (2, 5))
    y = torch.randint(0, 257, (2, 5))
    w, t = 0.3, 2.0

    loss, ce = batch_loss(student, x, y, distill=Distillation(teacher, w, t))

    s_logits, _ = student(x)
    t_logits, _ = teacher(x)
    p_t = torch.softmax(t_logits / t, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(s_logits / t, -1))).sum(-1).mean()  # per token, then mean
    ce_hand = F.cross_entropy(s_logits.reshape(-1, 257), y.reshape(-1))
    torch.testing.assert_close(ce, ce_hand)
    torch.testing.assert_close(loss, (1 - w) * ce_hand + w * t * t * kl)
    assert kl.item() > 0


def test_distillation_toward_itself_adds_nothing():
    torch.manual_seed(0)
    model = GPT(CFG)
    x, y = torch.randint(0, 257, (2, 5)), torch.randint(0, 257, (2, 5))

    loss, ce = batch_loss(model, x, y, distill=Distillation(model, 0.5, 1.0))

    assert abs(loss.item() - 0.5 * ce.item()) < 1e-6  # KL(p || p) = 0


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A tiny dense model: a 2-round FedAvg run, the starting point of fine-tuning."""
    tmp = tmp_path_factory.mktemp("dense")
    _, _, run_dir = run_local(tmp, "dense", num_nodes=2, strategy="fedavg")
    return run_dir


def test_distill_weight_zero_is_bit_identical_to_plain_twist(tmp_path, dense_run):
    _, _, plain = run_local(tmp_path, "plain", init_from=str(dense_run))
    _, _, zero = run_local(tmp_path, "zero", init_from=str(dense_run), distill_from="init", distill_weight=0.0)

    a, b = final_weights(plain), final_weights(zero)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_the_init_teacher_is_loaded_once_per_process_and_never_sent(tmp_path, dense_run):
    init_teacher.cache_clear()
    _, g_plain, _ = run_local(tmp_path, "plain", init_from=str(dense_run))
    _, g_kd, kd = run_local(tmp_path, "kd", init_from=str(dense_run), distill_from="init", distill_weight=0.5,
                            num_server_rounds=3)

    assert init_teacher.cache_info().misses == 1  # 2 nodes x 3 rounds, one load
    for a, b in zip(sent_train(g_plain, 1), sent_train(g_kd, 1), strict=True):
        assert sorted(a.content["arrays"]) == sorted(b.content["arrays"])  # the same tensors: no teacher
        assert sum(len(v.data) for v in a.content["arrays"].values()) == \
            sum(len(v.data) for v in b.content["arrays"].values())
    conf = json.loads((kd / "config.json").read_text())
    assert conf["teacher"] == {"from": "init", "weight": 0.5, "temperature": 1.0,
                               "model": str((dense_run / "model").resolve())}
    assert conf["init_from"]["strategy"] == "fedavg" and len(conf["init_from"]["weights_sha256"]) == 64
    assert final_weights(kd)["wte.weight"].tobytes() != final_weights(dense_run)["wte.weight"].tobytes()


def test_global_distillation_moves_the_update_on_masked_nodes(tmp_path, dense_run):
    _, _, plain = run_local(tmp_path, "plain", init_from=str(dense_run), mode="masked")
    _, _, kd = run_local(tmp_path, "kd", init_from=str(dense_run), mode="masked", distill_from="global",
                         distill_weight=0.5)

    a, b = final_weights(plain), final_weights(kd)
    assert any(a[k].tobytes() != b[k].tobytes() for k in a)
    assert all(np.isfinite(v).all() for v in b.values())


@pytest.mark.parametrize("bad, match", [
    ({"distill-weight": 0.5}, "needs a teacher"),
    ({"distill-from": "init", "distill-weight": 0.5}, "init-from is empty"),
    ({"distill-from": "global", "distill-weight": 0.5}, "needs mode='masked'"),
    ({"distill-from": "teacher"}, "distill-from='teacher' is neither one of"),
    ({"distill-weight": 1.5}, r"distill-weight=1.5 must be in \[0, 1\]"),
    ({"distill-temperature": 0}, "distill-temperature=0.0 must be a positive"),
    ({"server-optimizer": "sgd"}, "server-optimizer='sgd' is not allowed"),
    ({"server-momentum": 1.0}, r"server-momentum=1.0 must be in \[0, 1\)"),
    ({"full-nodes": -1}, "full-nodes=-1 must be >= 0"),
    ({"keep-choices": "2,x"}, "keep-choices='2,x' must be a comma list"),
    ({"keep-choices": "2,9"}, "keep-choices entry=9 is out of range"),
    ({"keep": 2, "keep-choices": "1,2"}, "both set"),
    ({"strategy": "fedavg", "full-nodes": 1}, "strategy='fedavg' trains the full model"),
])
def test_bad_lever_values_are_refused_by_name(bad, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_flat({**TINY, **bad})


# --- the blueprint policy: full nodes and mixed keeps ---------------------------------------------------


def test_full_node_turns_are_seeded_and_even():
    eligible = list(range(5))
    turns = [full_node_turns(7, 5, eligible, 2, r) for r in range(1, 11)]

    assert turns == [full_node_turns(7, 5, eligible, 2, r) for r in range(1, 11)]  # seeded
    assert turns != [full_node_turns(8, 5, eligible, 2, r) for r in range(1, 11)]
    counts = np.bincount([i for t in turns for i in t], minlength=5)
    assert counts.tolist() == [4] * 5  # 10 rounds x 2 turns over 5 nodes
    assert all(len(t) == 2 and len(set(t)) == 2 for t in turns)
    assert full_node_turns(7, 5, [1, 3], 3, 1) == [1, 3]  # never more than the eligible


def test_full_nodes_get_full_tensors_and_the_others_still_cover(tmp_path):
    summary, grid, run_dir = run_local(tmp_path, "full", num_nodes=3, keep=2, full_nodes=1, num_server_rounds=3,
                                       node_configs=[{}, {}, {"twist-capacity": 0.5}])

    for rnd in (1, 2, 3):
        msgs = sent_train(grid, rnd)
        bps = [Blueprint.from_config(m.content["config"]) for m in msgs]
        full = [bp.is_full(CFG) for bp in bps]
        assert sum(full) == 1 and not full[2]  # the half-capacity node is never the full one
        i = full.index(True)
        assert msgs[i].content["arrays"]["h.1.mlp.c_fc.weight"].numpy().shape == (4 * 32, 32)
        others = [bp for bp, f in zip(bps, full, strict=True) if not f]
        assert all(len(bp.heads[1]) == 2 for bp in others)
        assert set().union(*(bp.heads[1] for bp in others)) == set(range(4))  # the subnets alone cover layer 1
    r = rows(run_dir)
    assert [sorted(n["keep"] for n in x["nodes"]) for x in r] == [[2, 2, 4]] * 3
    assert {n["partition_id"] for x in r for n in x["nodes"] if n["keep"] == 4} == {0, 1}  # they took turns


def test_mixed_keeps_are_seeded_and_respect_capacity():
    run = RunConfig.from_flat({**TINY, "keep": "1,2,3,4"})
    assert run.keep == 0 and run.keep_choice_list == (1, 2, 3, 4)

    plans = [round_plan(CFG, run, r, [1.0, 0.5, 1.0, 0.25]) for r in range(1, 41)]

    again = [round_plan(CFG, run, r, [1.0, 0.5, 1.0, 0.25]) for r in range(1, 41)]
    assert [p.keeps for p in plans] == [p.keeps for p in again]
    assert all(p.keeps[1] <= 2 and p.keeps[3] == 1 for p in plans)
    assert {p.keeps[0] for p in plans} == {1, 2, 3, 4}  # every choice is drawn
    for p in plans:
        assert [len(bp.heads[1]) for bp in p.blueprints] == p.keeps
        assert [len(bp.ffn[1]) for bp in p.blueprints] == p.keeps


def test_without_levers_the_policy_is_todays_draw():
    from twist_fl.core.blueprint import sample_blueprints

    run = RunConfig.from_flat({**TINY, "keep": 2})
    for r in (1, 2, 3):
        assert round_plan(CFG, run, r, [1.0] * 3).blueprints == sample_blueprints(CFG, 3, [2] * 3, 0, r)


# --- the outer step -------------------------------------------------------------------------------------


def _states(seed=0):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    old = {k: v.numpy() for k, v in GPT(CFG).state_dict().items()}
    bp = Blueprint(heads=((0, 1, 2, 3), (1,), (0, 1, 2, 3)), ffn=((0, 1, 2, 3), (2, 3), (0, 1, 2, 3)))
    sub = {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32)
           for k, v in slice_state(old, CFG, bp).items()}
    return old, bp, sub


def test_momentum_moves_only_the_blocks_that_were_held():
    old, bp, sub = _states()
    avg = coverage_average(old, CFG, [(bp, sub, 1.0)])
    held = held_masks(CFG, [bp])
    opt = OuterOptimizer("momentum", lr=1.0, momentum=0.9)

    first = opt.step(old, avg, held)
    for k in old:  # round 1: m = delta, so momentum is the average itself
        np.testing.assert_allclose(first[k], avg[k], atol=1e-6)
    w = old["h.1.attn.c_attn.weight"]
    second = opt.step(first, first, held)  # nothing new: momentum alone moves the held blocks
    moved = second["h.1.attn.c_attn.weight"] != first["h.1.attn.c_attn.weight"]
    rows_held = np.zeros(w.shape[0], dtype=bool)
    rows_held[[8 * 1 + i + g * 32 for g in range(3) for i in range(8)]] = True  # head 1 of q, k, v
    assert moved[rows_held].all() and not moved[~rows_held].any()
    assert not opt.m["h.1.attn.c_attn.weight"][~rows_held].any()  # never-held blocks have no momentum


@pytest.mark.parametrize("kind", ["momentum", "nesterov", "adam"])
def test_outer_steps_with_no_held_block_change_nothing(kind):
    old, bp, sub = _states()
    opt = OuterOptimizer(kind, lr=0.5)
    opt.step(old, coverage_average(old, CFG, [(bp, sub, 1.0)]), held_masks(CFG, [bp]))
    state = {k: v.copy() for k, v in opt.state_arrays().items()}

    none = {k: np.zeros_like(v) for k, v in held_masks(CFG, [bp]).items()}
    out = opt.step(old, old, none)

    assert all(out[k].tobytes() == old[k].tobytes() for k in old)
    assert all(opt.state_arrays()[k].tobytes() == state[k].tobytes() for k in state)


def test_nesterov_and_adam_follow_their_formulas_on_one_entry():
    old = {"wte.weight": np.zeros((1, 1), np.float32)}
    held = {"wte.weight": np.ones((1, 1), bool)}
    nest = OuterOptimizer("nesterov", lr=0.7, momentum=0.9)
    out = nest.step(old, {"wte.weight": np.full((1, 1), 0.1, np.float32)}, held)
    assert math.isclose(float(out["wte.weight"][0, 0]), 0.7 * (0.9 * 0.1 + 0.1), rel_tol=1e-6)
    adam = OuterOptimizer("adam", lr=0.01, momentum=0.9)
    out = adam.step(old, {"wte.weight": np.full((1, 1), -0.2, np.float32)}, held)
    assert math.isclose(float(out["wte.weight"][0, 0]), -0.01, rel_tol=1e-4)  # the first Adam step is lr * sign


def test_avg_outer_step_is_todays_aggregation_bit_for_bit(tmp_path):
    _, _, a = run_local(tmp_path, "default", keep=2)
    _, _, b = run_local(tmp_path, "avg", keep=2, server_optimizer="avg", server_lr=0.5)
    wa, wb = final_weights(a), final_weights(b)
    assert all(wa[k].tobytes() == wb[k].tobytes() for k in wa)


@pytest.mark.parametrize("kind", ["nesterov", "adam"])
def test_resume_with_outer_state_is_bit_exact(tmp_path, kind):
    keys = dict(keep=2, server_optimizer=kind, server_lr=0.5, num_server_rounds=4, optimizer_state="reset")
    _, _, whole = run_local(tmp_path, "whole", **keys)
    _, _, part = run_local(tmp_path, "part", **{**keys, "num_server_rounds": 2})
    assert (part / "checkpoints" / "round-00002" / "extra.safetensors").is_file()
    import shutil

    shutil.rmtree(part / "model")
    (part / "summary.json").unlink()
    run_local(tmp_path, "resumed", **{**keys, "resume_from": str(part)})

    a, b = final_weights(whole), final_weights(part)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    plain = checkpoint_weights(whole, 4)
    assert any(plain[k].tobytes() != checkpoint_weights(whole, 3)[k].tobytes() for k in plain)


# --- the pipeline: a dense run, TwIST fine-tuned from it, the comparison ----------------------------------


@pytest.mark.slow
def test_finetune_pipeline_runs_and_builds_its_table(tmp_path, capsys, monkeypatch):
    from twist_fl.tools.tune import main

    out = tmp_path / "ft"
    rc = ("model='tiny' seq-len=32 batch-size=4 local-steps=2 eval-tokens=512 eval-draws=1 "
          "lr-schedule='constant'")
    argv = ["finetune", "--out", str(out), "--seeds", "2", "--nodes", "2", "--dense-steps", "4", "--ft-steps", "8",
            "--ft-ablation", "4", "--twist-lrs", "1e-3", "--ddp-lrs", "1e-3,2e-3",
            "--variants", "kd:distill-from=init distill-weight=0.5;ls1:local-steps=1;"
                          "ord:init-order=flap subnet-policy=ordered keep-choices=1,2,3,4;"
                          "ord-lr2:init-order=flap subnet-policy=ordered keep-choices=1,2,3,4 lr=2e-3",
            "--ablation-levers", "ls1", "--eqb-levers", "ls1", "--recovery-lrs", "1e-3,2e-3", "--recovery-keeps", "2",
            "--lr-seeds", "2e-3", "--stages", "dense,grid,pairs,levers,eqc,ablation,recovery,eqb,lr-seeds",
            "--run-config", rc]
    assert main(argv) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_lr"]
    rec = json.loads((out / "recovery.json").read_text())

    names = sorted(p.name for p in out.iterdir() if (p / "run" / "summary.json").is_file())
    recovery = [f"recovery{kd}-lr{rec['lr']:g}-k2-F8-s{s}" for kd in ("", "-kd") for s in (0, 1)]
    other_rec = [f"recovery-lr{lr:g}-k2-F8-s0" for lr in (1e-3, 2e-3) if lr != rec["lr"]]
    assert set(names) == set(["dense-s0", "dense-s1", "twist-lr0.001-F8-s0", "twist-lr0.001-F8-s1", "ddp-lr0.001-F8-s0",
                            "ddp-lr0.002-F8-s0", f"ddp-lr{best['ddp']:g}-F8-s1", "lever-kd-s0", "lever-kd-s1",
                            "lever-ls1-s0", "lever-ls1-s1", "lever-ord-s0", "lever-ord-s1", "lever-ord-lr2-s0",
                            "lever-ord-lr2-s1", "lever-ls1-F4-s0",
                            "lever-ls1-F4-s1", "twist-lr0.001-F4-s0", "twist-lr0.001-F4-s1",
                            f"ddp-lr{best['ddp']:g}-F4-s0", f"ddp-lr{best['ddp']:g}-F4-s1", "twist-eqc-F8-s0",
                            "twist-eqc-F8-s1", "ddp-eqb-base-s0", "ddp-eqb-base-s1", "ddp-eqb-ls1-s0",
                            "ddp-eqb-ls1-s1", *recovery, *other_rec,
                            # the lr-seeds stage: 2e-3 on both seeds, both sides
                            "twist-lr0.002-F8-s0", "twist-lr0.002-F8-s1", "ddp-lr0.002-F8-s1"])
    for seed in (0, 1):  # each fine-tune starts from its seed's dense model, and says so
        conf = json.loads((out / f"lever-kd-s{seed}" / "run" / "config.json").read_text())
        assert conf["init_from"]["path"] == str((out / f"dense-s{seed}" / "run" / "model").resolve())
        assert conf["init_from"]["strategy"] == "ddp" and conf["teacher"]["from"] == "init"
        summ = json.loads((out / f"twist-eqc-F8-s{seed}" / "run" / "summary.json").read_text())
        assert summ["rounds"] > 4  # equal compute: more TwIST steps than the dense side's 8
        ls1 = json.loads((out / f"lever-ls1-s{seed}" / "run" / "summary.json").read_text())
        assert (ls1["rounds"], ls1["run"]["local-steps"]) == (8, 1)  # the same 8 steps, a sync after each
        conf = json.loads((out / f"lever-ord-s{seed}" / "run" / "config.json").read_text())
        assert conf["init_order"]["method"] == "flap"
        # the recovery baseline: the FLAP-pruned dense model at keep 2, fine-tuned by DDP, distilled from the dense
        kd = json.loads((out / recovery[2 + seed] / "run" / "summary.json").read_text())
        assert kd["strategy"] == "ddp" and kd["keep"] == 2 and kd["blueprint"]
        assert kd["run"]["distill-from"] == str((out / f"dense-s{seed}" / "run").resolve())
        pruned = json.loads((out / recovery[2 + seed] / "run" / "config.json").read_text())["init_from"]["path"]
        assert pruned == str((out / f"flap-a{rec['alpha']:g}-k2-s{seed}" / "model").resolve())
    eqb = json.loads((out / "ddp-eqb-base-s0" / "run" / "summary.json").read_text())
    assert 1 <= eqb["rounds"] < 8  # DDP at TwIST's bytes: fewer steps than F

    assert main(["finetune-table", str(out), "--out", str(tmp_path / "t"), "--test-tokens", "256", "--draws", "1",
                 "--keeps", "2"]) == 0
    res = json.loads((tmp_path / "t" / "finetune.json").read_text())
    md = (tmp_path / "t" / "FINETUNE.md").read_text()
    assert res["seeds"] == [0, 1] and res["F"] == 8 and res["best_lrs"] == best
    assert set(res["test"]) == {"TwIST (as today)", "TwIST + kd", "TwIST + ls1", "TwIST + ord", "TwIST + ord-lr2",
                                "TwIST at equal compute"}
    assert res["recipe"] in res["test"] and "FLAP a0" in res["baselines"]["0"]["structured"]
    assert (tmp_path / "t" / "finetune.png").read_bytes()[:4] == b"\x89PNG" and "](finetune.png)" in md
    lr2 = res["lr_over_seeds"]["twist"]["0.002"]
    assert set(lr2["valid"]) == {"0", "1"} and lr2["vs_chosen"]["seeds"] == [0, 1]
    assert set(res["length"]) == {"4", "8"} and set(res["equal_bytes"]) == {"TwIST (as today)", "TwIST + ls1"}
    r = res["ratios"]["TwIST + ls1"]["vs_today"]
    assert r["seeds"] == [0, 1] and r["ci95"][0] < r["mean"] < r["ci95"][1]
    for label in ("keep 2/4: TwIST", "/ best structured (", "TwIST / recovery (", "| FLAP + recovery fine-tune",
                  "## Local steps between syncs", "**Equal bytes.**", "## Fine-tune length F",
                  "## The pruning baselines at alpha 0 and 0.5", "## The learning rate over seeds",
                  "| TwIST | 0.001 (chosen) |", "twist-fl tune finetune --out"):
        assert label in md, label
    assert main(["finetune-table", str(out), "--out", str(tmp_path / "t"), "--test-tokens", "256"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    # a second build reads every evaluation back from the cache: nothing is evaluated again
    import twist_fl.evaluation.compare as compare

    def no(*a, **k):
        raise AssertionError("evaluated again")

    monkeypatch.setattr(compare, "test_ppl", no)
    monkeypatch.setattr(compare, "prune_baselines", no)
    assert main(["finetune-table", str(out), "--out", str(tmp_path / "t2"), "--test-tokens", "256", "--draws", "1",
                 "--keeps", "2", "--recipe", "ord"]) == 0
    res2 = json.loads((tmp_path / "t2" / "finetune.json").read_text())
    assert res2["ratios"] == res["ratios"] and res2["recipe"] == "TwIST + ord"
    # the recipe's own rate: the lever with its keys but lr 2e-3, paired by seed against it, by hand
    rates = res2["recipe_lr"]
    assert rates["0.001"]["chosen"] and rates["0.002"]["lever"] == "TwIST + ord-lr2"

    def final(name, s):
        return json.loads((out / f"{name}-s{s}" / "run" / "summary.json").read_text())["final"]["keep-2"]["mean"]

    by_hand = [final("lever-ord-lr2", s) / final("lever-ord", s) for s in (0, 1)]
    mean = sum(by_hand) / 2
    sd = abs(by_hand[0] - by_hand[1]) / 2 ** 0.5
    got = rates["0.002"]["valid_vs_recipe"]
    assert got["mean"] == pytest.approx(mean) and got["sd"] == pytest.approx(sd)
    assert got["ci95"] == pytest.approx([mean - 12.7062 * sd / 2 ** 0.5, mean + 12.7062 * sd / 2 ** 0.5], rel=1e-4)
    for size, key in (("2/4", "deployed-2"), ("full", "full")):
        tests = [res["test"]["TwIST + ord-lr2"][str(s)][key] / res["test"]["TwIST + ord"][str(s)][key] for s in (0, 1)]
        assert rates["0.002"]["test_vs_recipe"][size]["mean"] == pytest.approx(sum(tests) / 2)
    md2 = (tmp_path / "t2" / "FINETUNE.md").read_text()
    assert "## The recipe's learning rate over seeds" in md2 and "| ord | 0.001 (the recipe) | 2 |" in md2
    assert "| test full vs the recipe | test 2/4 vs the recipe |" in md2

    # --lr-choice seeds: each side at its best mean validation over both seeds, and the table built on those runs
    monkeypatch.undo()

    def valid(side, lr, s):
        f = json.loads((out / f"{side}-lr{lr:g}-F8-s{s}" / "run" / "summary.json").read_text())["final"]
        return f["keep-2"]["mean"] if side == "twist" else f["full"]["ppl"]

    def on_both(side, lr):
        return all((out / f"{side}-lr{lr:g}-F8-s{s}" / "run" / "summary.json").is_file() for s in (0, 1))

    by_hand = {side: min((lr for lr in (1e-3, 2e-3) if on_both(side, lr)),
                         key=lambda lr, side=side: valid(side, lr, 0) + valid(side, lr, 1))
               for side in ("twist", "ddp")}
    assert main(["finetune-table", str(out), "--out", str(tmp_path / "t3"), "--test-tokens", "256", "--draws", "1",
                 "--keeps", "2", "--lr-choice", "seeds"]) == 0
    res3 = json.loads((tmp_path / "t3" / "finetune.json").read_text())
    assert res3["lr_choice"] == "seeds" and res3["best_lrs"] == by_hand
    want = compare.test_ppl(str(out / f"twist-lr{by_hand['twist']:g}-F8-s1" / "run"), [2], 1, 256)
    assert res3["test"]["TwIST (as today)"]["1"] == pytest.approx(want)
    want = compare.test_ppl(str(out / f"ddp-lr{by_hand['ddp']:g}-F8-s0" / "run"), [2], 1, 256)["full"]
    assert res3["baselines"]["0"]["full"] == pytest.approx(want)
    assert "among the rates run on every seed (`--lr-choice seeds`" in (tmp_path / "t3" / "FINETUNE.md").read_text()

    # a folder where no lever ran: TwIST as it ships, once, and no recipe section
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("lever-*", "*eqb-ls1*"))
    assert main(["finetune-table", str(bare), "--out", str(tmp_path / "t4"), "--test-tokens", "256", "--draws", "1",
                 "--keeps", "2"]) == 0
    md4 = (tmp_path / "t4" / "FINETUNE.md").read_text()
    assert "## TwIST as it ships" in md4 and "No lever was run into this folder" in md4
    assert "## The recipe" not in md4 and "for reference" not in md4 and md4.count("- keep 2/4: TwIST (as today)") == 1


def test_lr_choice_seeds_takes_the_best_mean_over_the_seeds_every_rate_ran(caplog):
    from twist_fl.tools.finetune_table import rate_over_seeds

    scores = {1e-3: {0: 5.0, 1: 5.4, 2: 5.0}, 2e-3: {0: 5.1, 1: 5.0, 2: 5.1}, 3e-3: {0: 4.9}}
    with caplog.at_level("WARNING"):
        # 2e-3's mean (5.067) beats 1e-3's (5.133) though 1e-3 wins on seed 0; 3e-3 ran on seed 0 only
        assert rate_over_seeds("ddp", scores, [0, 1, 2]) == 2e-3
    assert "ddp at lr 0.003 (seeds [0]) does better than the chosen 0.002 on each seed it ran" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert rate_over_seeds("ddp", {k: scores[k] for k in (1e-3, 2e-3)}, [0, 1, 2]) == 2e-3
    assert "ddp lr 0.002 is at the edge of the rates run (0.001, 0.002): widen them" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert rate_over_seeds("twist", {**scores, 3e-3: {0: 5.3}}, [0, 1, 2]) == 2e-3
    assert caplog.text == ""  # inside the rates run, and the one-seed rate does worse
    with pytest.raises(ValueError, match=r"no twist rate was run on every seed \[0, 1, 2\] \(rates and seeds run: "
                                         r"\{'0.003': \[0\]\}\)"):
        rate_over_seeds("twist", {3e-3: {0: 4.9}}, [0, 1, 2])


def test_a_finetune_folder_refuses_a_command_of_another_setting(tmp_path):
    from twist_fl.core.io import write_json
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    write_json(tmp_path / "plan.json", {"F": 300, "dense_steps": 900, "dense_lr": 1.5e-3, "nodes": 4,
                                        "twist_lrs": [1e-3], "ddp_lrs": [1e-3], "run_config": {}, "best_lrs": {}})
    ft = Finetune(FinetuneOptions(out=str(tmp_path), twist_lrs=[1e-3], ddp_lrs=[1e-3],
                                  run_config={"lr-min-ratio": 0.5}))
    with pytest.raises(ValueError, match=r"holds the jobs of another setting: \{'run_config'"):
        ft.check_plan()
    Finetune(FinetuneOptions(out=str(tmp_path), twist_lrs=[1e-3], ddp_lrs=[1e-3])).check_plan()  # the same: fine
    Finetune(FinetuneOptions(out=str(tmp_path), twist_lrs=[5e-4, 1e-3], ddp_lrs=[1e-3, 2e-3])).check_plan()  # widened
    with pytest.raises(ValueError, match=r"another setting: \{'twist_lrs': \(\[0.001\], \[0.0005\]\)\}"):
        Finetune(FinetuneOptions(out=str(tmp_path), twist_lrs=[5e-4], ddp_lrs=[1e-3])).check_plan()  # a rate dropped


def test_a_lever_with_its_own_local_steps_trains_the_same_tokens(tmp_path):
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    ft = Finetune(FinetuneOptions(out=str(tmp_path), variants="ls1:local-steps=1;ls5:local-steps=5"))
    for name, ls in (("ls1", 1), ("ls5", 5)):
        flat = ft.ft("twist", 1e-3, 300, 0, ft.variants[name])
        assert (flat["local-steps"], flat["num-server-rounds"], flat["eval-every"]) == (ls, 300 // ls, 300 // ls)
    assert ft.ft("twist", 1e-3, 300, 0)["num-server-rounds"] == 20  # local-steps 15
    with pytest.raises(ValueError, match="must be a positive multiple of local-steps=7"):
        Finetune(FinetuneOptions(out=str(tmp_path), variants="ls7:local-steps=7"))


def test_scratch_levers_cannot_distil(tmp_path):
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    with pytest.raises(ValueError, match=r"--scratch-variants entry 'kd' distils, but from scratch there is no "
                                         r"teacher"):
        Finetune(FinetuneOptions(out=str(tmp_path), scratch_variants="kd:distill-from=init"))


def test_a_recipe_lever_trains_the_same_steps(tmp_path):
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    ft = Finetune(FinetuneOptions(out=str(tmp_path), variants="recipe:recipe=finetune"))
    flat = ft.ft("twist", 1e-3, 300, 0, ft.variants["recipe"])
    assert (flat["local-steps"], flat["num-server-rounds"]) == (1, 300)  # the recipe's one step per round


def test_recovery_distill_none_runs_the_plain_recovery_only(tmp_path, capsys):
    from twist_fl.tools.tune import main

    out = tmp_path / "ft"
    rc = "model='tiny' seq-len=32 batch-size=4 local-steps=2 eval-tokens=512 eval-draws=1 lr-schedule='constant'"
    argv = ["finetune", "--out", str(out), "--seeds", "1", "--nodes", "2", "--dense-steps", "4", "--ft-steps", "4",
            "--twist-lrs", "1e-3", "--ddp-lrs", "1e-3", "--recovery-lrs", "1e-3", "--recovery-keeps", "2",
            "--recovery-distill", "none", "--stages", "recovery", "--run-config", rc]
    assert main(argv) == 0
    done = sorted(p.name for p in out.iterdir() if (p / "run" / "summary.json").is_file())
    assert done == ["ddp-lr0.001-F4-s0", "dense-s0", "recovery-lr0.001-k2-F4-s0", "twist-lr0.001-F4-s0"]
    run = json.loads((out / "recovery-lr0.001-k2-F4-s0" / "run" / "summary.json").read_text())
    assert run["keep"] == 2 and not run["run"].get("distill-from")
    # a one-seed folder's table says so in the singular, and names the recovery row
    assert main(["finetune-table", str(out), "--out", str(tmp_path / "t"), "--test-tokens", "256", "--draws", "1",
                 "--keeps", "2", "--lr-choice", "seeds"]) == 0
    md = (tmp_path / "t" / "FINETUNE.md").read_text()
    assert md.startswith("# Fine-tuning a dense model with TwIST: the recipe against every baseline (1 seed, paired)")
    assert "over the 1 seed among the rates run on every seed" in md and "1 seeds" not in md
    assert "| FLAP + recovery fine-tune (one run per size) |" in md
    assert "| FLAP + recovery fine-tune, 1 size | | | | | | | " in md and " (its size) |" in md
    # a --recovery-lrs naming a rate the kept grid lacks widens it: the new rate runs, the old one is
    # read back (not run again), the alpha stays, and the choice is made over both
    first = json.loads((out / "recovery.json").read_text())
    mtime = (out / "recovery-lr0.001-k2-F4-s0" / "run" / "summary.json").stat().st_mtime_ns
    wide = [a if a != "1e-3" or argv[i - 1] != "--recovery-lrs" else "1e-3,3e-2" for i, a in enumerate(argv)]
    assert main(wide) == 0
    rec = json.loads((out / "recovery.json").read_text())
    assert set(rec["valid_by_lr"]) == {"0.001", "0.03"} and rec["alpha"] == first["alpha"]
    assert rec["lr"] == float(min(rec["valid_by_lr"], key=rec["valid_by_lr"].get))
    assert rec["valid_by_lr"]["0.001"] == first["valid_by_lr"]["0.001"]
    assert (out / "recovery-lr0.001-k2-F4-s0" / "run" / "summary.json").stat().st_mtime_ns == mtime
    assert (out / "recovery-lr0.03-k2-F4-s0" / "run" / "summary.json").is_file()
    assert main(argv) == 0 and json.loads((out / "recovery.json").read_text()) == rec  # a subset: kept as is
    capsys.readouterr()
    for value, said in (("nothing", "--recovery-distill entry 'nothing' is not key=value"),
                        ("distill-weight=0", "--recovery-distill='distill-weight=0' must set distill-weight in (0, 1]"),
                        ("lr=1", "may set distill-temperature, nothing else; or be 'none'")):
        assert main([a if a != "none" else value for a in argv]) == 2
        assert said in capsys.readouterr().err
    # a --variants entry's bad text is named by its flag and name, not as --run-config
    assert main([*argv, "--variants", "kd:oops"]) == 2
    assert "--variants 'kd': entry 'oops' is not key=value" in capsys.readouterr().err


def test_the_rate_section_shows_a_one_seed_grid_and_skips_a_side_with_one_rate():
    """A folder run on seed 0 only still shows the rates its grid compared (what its choice rests
    on), each against the chosen one; a side with a single rate has no choice to show."""
    from types import SimpleNamespace

    from twist_fl.tools.finetune_table import _lr_section

    scores = {"twist": {3e-3: {0: 4.913}, 4e-3: {0: 4.882}, 5e-3: {0: 4.978}}, "ddp": {3e-3: {0: 4.366}}}
    t = SimpleNamespace(rate_scores=scores.get, best={"twist": 4e-3, "ddp": 3e-3}, half=4, n=8, F=2400,
                        lr_choice="seeds", dense=SimpleNamespace(folders={0: None}),
                        plan={"best_lrs": {"twist": 3e-3, "ddp": 3e-3}})
    result = {}
    md = "\n".join(_lr_section(t, result))
    assert "## The learning rate over seeds (F = 2400, validation)" in md and "over the 1 seed among" in md
    assert "| TwIST | 0.004 (chosen) | random 4/8 subnets | 1 | 4.882 |  |" in md
    assert "| TwIST | 0.005 | random 4/8 subnets | 1 | 4.978 |" in md and "| DDP |" not in md
    assert set(result["lr_over_seeds"]) == {"twist"} and result["lr_over_seeds"]["twist"]["0.005"]["valid"] == {
        "0": 4.978}
