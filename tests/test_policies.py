"""run-config `subnet-policy`: TwIST's random subnets, the nested prefix of HeteroFL / FjORD
(`ordered`) and FedRolex's rolling window (`rolling`), drawn at the one policy seam; deployment
cuts the kind of subnet a run trained."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from twist_fl.core.blueprint import Blueprint, prefix_blueprint, window_blueprint
from twist_fl.core.config import RunConfig, preset
from twist_fl.core.model import GPT
from twist_fl.core.policy import capacity_keep, deploy_blueprints, round_plan
from twist_fl.evaluation.prune import prune_structured
from twist_fl.tools.cli import main

from .helpers import TINY, run_local

CFG = preset("tiny", vocab_size=257)
N = CFG.n_blocks
CAPS = [1.0, 0.75, 0.5, 0.25]


def plans(policy: str, rounds: int = 12, caps=CAPS, **keys):
    run = RunConfig.from_flat({**TINY, "subnet-policy": policy, **keys})
    return [round_plan(CFG, run, r, caps) for r in range(1, rounds + 1)]


def inner_layers():
    return [i for i in range(CFG.n_layer) if i not in CFG.shared_layer_ids]


def test_ordered_subnets_are_prefixes_of_the_capacity_keep():
    for plan in plans("ordered", keep=N):  # HeteroFL: keep N, each node cut to its capacity, every round
        assert plan.keeps == [capacity_keep(CFG, c) for c in CAPS] == [4, 3, 2, 1]
        for bp, k in zip(plan.blueprints, plan.keeps, strict=True):
            assert bp == prefix_blueprint(CFG, k)
            for layer in inner_layers():
                assert bp.heads[layer] == tuple(range(k)) and bp.ffn[layer] == tuple(range(k))


def test_fjord_keeps_are_drawn_per_node_and_round_seeded_within_capacity():
    a, b = plans("ordered", 30, keep="1,2,3,4"), plans("ordered", 30, keep="1,2,3,4")
    assert [p.keeps for p in a] == [p.keeps for p in b]
    assert len({tuple(p.keeps) for p in a}) > 1  # drawn anew each round
    other_seed = plans("ordered", 30, keep="1,2,3,4", seed=1)
    assert [p.keeps for p in other_seed] != [p.keeps for p in a]
    for p in a:
        assert all(k <= capacity_keep(CFG, c) for k, c in zip(p.keeps, CAPS, strict=True))
        assert all(bp == prefix_blueprint(CFG, k) for bp, k in zip(p.blueprints, p.keeps, strict=True))


def test_rolling_window_advances_one_block_a_round_wraps_and_covers_every_block():
    ps = plans("rolling", 2 * N, keep=2, caps=[1.0, 1.0])
    layer = inner_layers()[0]
    starts = []
    for r, p in enumerate(ps, start=1):
        for bp in p.blueprints:
            assert bp == window_blueprint(CFG, 2, r - 1)
            assert bp.heads[layer] == tuple(sorted({(r - 1) % N, r % N}))  # consecutive, cyclic
        starts.append(min(p.blueprints[0].heads[layer], key=lambda i: (i - (r - 1)) % N))
    assert starts == [(r - 1) % N for r in range(1, 2 * N + 1)]  # one block a round, wrapping after N
    covered = set().union(*(p.blueprints[0].heads[layer] for p in ps[:N - 1]))
    assert covered == set(range(N))  # every block has had its turn within N rounds


@pytest.mark.parametrize("policy", ["random", "ordered", "rolling"])
def test_every_policy_respects_capacities_and_shared_layers(policy):
    for p in plans(policy, keep=3, full_nodes=1):
        for bp, k, c, full in zip(p.blueprints, p.keeps, CAPS, p.full, strict=True):
            assert k <= capacity_keep(CFG, c)
            assert full == bp.is_full(CFG) or (full and c == 1.0)
            for layer in CFG.shared_layer_ids:
                assert bp.heads[layer] == tuple(range(N)) and bp.ffn[layer] == tuple(range(N))
            for layer in inner_layers():
                assert len(bp.heads[layer]) == len(bp.ffn[layer]) == k


def test_the_policies_differ_only_in_their_blueprints():
    """One round loop: the same run under each policy sends the same kind of message, and only
    the blueprints (and so the slices) differ."""
    rand, ordered = plans("random", 3, keep=2), plans("ordered", 3, keep=2)
    assert [p.keeps for p in rand] == [p.keeps for p in ordered]
    assert [p.blueprints for p in rand] != [p.blueprints for p in ordered]


def test_prune_prefix_gives_the_masked_forward_of_the_prefix(tmp_path):
    torch.manual_seed(0)
    model = GPT(CFG).eval()
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    for k in range(1, N + 1):
        bp = prefix_blueprint(CFG, k)
        pruned = prune_structured(model, k, "prefix")
        assert pruned.blueprint == (None if k == N else bp)  # at N, the full model itself
        with torch.no_grad():
            masked, _ = model(x, mask=bp)
            cut, _ = pruned(x)
        torch.testing.assert_close(cut, masked, rtol=1e-5, atol=1e-5)


def test_deployment_follows_the_policy():
    assert deploy_blueprints(CFG, "ordered", 2, seed=0, draws=5) == [prefix_blueprint(CFG, 2)]
    drawn = deploy_blueprints(CFG, "rolling", 2, seed=0, draws=5)
    assert len(drawn) == 5 and len(set(drawn)) > 1  # random subnets, as TwIST's
    assert deploy_blueprints(CFG, "random", 2, seed=0, draws=5) == drawn


@pytest.mark.parametrize("policy", ["ordered", "rolling"])
def test_a_short_run_completes_and_records_its_policy(tmp_path, policy):
    summary, grid, run_dir = run_local(tmp_path, policy, num_nodes=2, keep=2, subnet_policy=policy,
                                       eval_every=1, eval_draws=3)
    conf = json.loads((run_dir / "config.json").read_text())
    assert conf["run"]["subnet-policy"] == policy
    msgs = [m for m in grid.sent if m.metadata.message_type == "train"]
    want = {1: window_blueprint(CFG, 2, 0), 2: window_blueprint(CFG, 2, 1)} if policy == "rolling" else \
        {1: prefix_blueprint(CFG, 2), 2: prefix_blueprint(CFG, 2)}
    for m in msgs:
        assert Blueprint.from_config(m.content["config"]) == want[m.content["config"]["server-round"]]
    valid = summary["final"]["keep-2"]
    assert len(valid["draws"]) == (1 if policy == "ordered" else 3)  # the prefix, or random draws
    # the verbs read the policy: evaluate reports the prefix of an ordered run beside random subnets
    assert main(["evaluate", str(run_dir), "--keeps", "2", "--draws", "2", "--eval-tokens", "512",
                 "--json", str(tmp_path / f"{policy}.json")]) == 0
    res = json.loads((tmp_path / f"{policy}.json").read_text())["keeps"]["2"]
    assert len(res["draws"]) == 2
    assert ("prefix" in res) == (policy == "ordered")
    if policy == "ordered":
        assert np.isfinite(res["prefix"])


@pytest.mark.parametrize("keys,match", [
    ({"subnet-policy": "nested"}, r"subnet-policy='nested' is not allowed; allowed: \['random', 'ordered', "
                                  r"'rolling'\]"),
    ({"subnet-policy": "ordered", "strategy": "fedavg"}, r"subnet-policy='ordered' chooses subnets; "
                                                         r"strategy='fedavg' trains the full model"),
])
def test_bad_policies_are_refused_by_name(keys, match):
    with pytest.raises(ValueError, match=match):
        RunConfig.from_flat({**TINY, **keys})


def test_ddp_refuses_a_policy(capsys):
    assert main(["ddp", "--nproc", "2", "--run-config", "subnet-policy='ordered'"]) == 2
    assert "subnet-policy" in capsys.readouterr().err


# --- FjORD's self-distillation ------------------------------------------------------------------


def test_a_subnet_runs_a_nested_prefix_as_the_full_model_masked_would():
    torch.manual_seed(0)
    full = GPT(CFG).eval()
    sub = prune_structured(full, 3, "prefix").eval()
    x = torch.randint(0, CFG.vocab_size, (2, 16))
    small = prefix_blueprint(CFG, 1)
    with torch.no_grad():
        torch.testing.assert_close(sub(x, mask=small)[0], full(x, mask=small)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="within the subnet's blueprint"):
        sub(x, mask=window_blueprint(CFG, 1, 3))  # block 3 is not in the prefix of 3


def test_self_distillation_is_finite_and_moves_the_small_prefix_toward_the_large_one():
    from twist_fl.core.objective import SelfDistillation, batch_loss, kl_to_teacher
    from twist_fl.core.rng import Stream, generator

    torch.manual_seed(0)
    model = prune_structured(GPT(CFG), 3, "prefix")
    with torch.no_grad():  # weights far from init, so that the small prefix and the subnet disagree
        for p in model.parameters():
            p.normal_(0, 0.3)
    x = torch.randint(0, CFG.vocab_size, (4, 16))
    small = prefix_blueprint(CFG, 1)
    sd = SelfDistillation(1.0, (small,), generator(0, Stream.SELF_DISTILL, 0, 1))

    def gap():
        with torch.no_grad():
            return float(kl_to_teacher(model(x, mask=small)[0], model(x)[0], 1.0))

    before = gap()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(30):
        loss, ce = batch_loss(model, x, x, self_distill=sd)
        assert torch.isfinite(loss) and loss > ce  # the KL term is there, and positive
        opt.zero_grad()
        (loss - ce).backward()  # the distillation term alone
        opt.step()
    assert gap() < 0.5 * before


def test_self_distill_weight_zero_is_plain_ordered_training(tmp_path):
    from .helpers import final_weights

    keys = dict(num_nodes=2, keep="1,2,3,4", subnet_policy="ordered", optimizer_state="reset")
    _, _, plain = run_local(tmp_path, "plain", **keys)
    _, _, zero = run_local(tmp_path, "zero", self_distill_weight=0.0, **keys)
    _, _, on = run_local(tmp_path, "on", self_distill_weight=0.5, **keys)
    a, b, c = final_weights(plain), final_weights(zero), final_weights(on)
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert any(a[k].tobytes() != c[k].tobytes() for k in a)  # the lever does something
    assert all(np.isfinite(v).all() for v in c.values())


def test_self_distillation_needs_the_ordered_policy():
    with pytest.raises(ValueError, match=r"self-distill-weight=0.5 trains smaller nested prefixes \(FjORD\); it "
                                         r"needs subnet-policy='ordered', not 'random'"):
        RunConfig.from_flat({**TINY, "self-distill-weight": 0.5})


def test_a_checkpoint_from_before_a_key_existed_still_resumes(tmp_path):
    """A checkpoint written before `subnet-policy` existed resumes: the key is read as its default."""
    import shutil

    _, _, run_dir = run_local(tmp_path, "old", num_nodes=2, num_server_rounds=2)
    shutil.rmtree(run_dir / "model")
    (run_dir / "summary.json").unlink()
    state_file = run_dir / "checkpoints" / "round-00002" / "state.json"
    state = json.loads(state_file.read_text())
    for key in ("subnet-policy", "self-distill-weight"):
        del state["config"][key]
    state_file.write_text(json.dumps(state))
    summary, _, _ = run_local(tmp_path, "again", num_nodes=2, num_server_rounds=3, resume_from=str(run_dir))
    assert summary["rounds"] == 3
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in \{'subnet-policy': \('random', "
                                         r"'ordered'\)\}"):
        run_local(tmp_path, "again2", num_nodes=2, num_server_rounds=4, resume_from=str(run_dir),
                  subnet_policy="ordered")
