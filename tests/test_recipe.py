"""The recipe's levers and baselines: blocks ordered by importance (init-order), a nested core
under random subnets (core-blocks), the recovery baseline (DDP on a pruned model, distilled from
the dense one), paired ratios with t intervals, and resumes that say what they recovered."""

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch

from twist_fl.core.blueprint import prefix_blueprint, sample_blueprints
from twist_fl.core.config import RunConfig, preset
from twist_fl.core.importance import flap_scores, order_blocks, projection_input_moments
from twist_fl.core.model import GPT
from twist_fl.core.policy import deploy_blueprints, round_plan
from twist_fl.evaluation.prune import importance_blueprint, prune_structured
from twist_fl.evaluation.stats import paired_ratio, t975

from .helpers import TINY, final_weights, run_local

CFG8 = preset("cpu-small", vocab_size=257)  # 8 heads and 8 FFN blocks per layer, shared layers 0 and 5


def _calib(n: int = 8, seq: int = 33) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 257, size=(n, seq)).astype(np.int64)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    """A tiny dense model: a 2-round FedAvg run, the starting point of fine-tuning."""
    tmp = tmp_path_factory.mktemp("dense")
    _, _, run_dir = run_local(tmp, "dense", num_nodes=2, strategy="fedavg")
    return run_dir


# --- init-order ---------------------------------------------------------------------------------


def test_ordering_blocks_by_importance_keeps_the_function_and_puts_flaps_choice_first():
    torch.manual_seed(0)
    model = GPT(CFG8).eval()
    calib = _calib()
    x = torch.from_numpy(calib[:, :-1])

    ordered, order = order_blocks(model, "flap", calib)

    with torch.no_grad():
        torch.testing.assert_close(ordered.eval()(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    scores = flap_scores(model, projection_input_moments(model, calib))
    for keep in (2, 4, 6):
        flap = importance_blueprint(model, keep, "flap", scores=scores)  # FLAP's choice on the original ids
        prefix = prefix_blueprint(CFG8, keep)
        for layer in range(CFG8.n_layer):
            if layer in CFG8.shared_layer_ids:
                assert order["heads"][layer] == list(range(8))  # shared layers are never reordered
                continue
            assert sorted(order["heads"][layer][:keep]) == list(flap.heads[layer])
            assert sorted(order["ffn"][layer][:keep]) == list(flap.ffn[layer])
        # the ordered model's prefix is FLAP's subnet (without its bias compensation)
        a = prune_structured(ordered, keep, "prefix")
        b = prune_structured(model, keep, "flap", 0, calib)
        with torch.no_grad():
            assert a.blueprint == prefix and b.blueprint == flap
            assert a(x)[0].shape == b(x)[0].shape


def test_init_order_needs_a_trained_model_and_is_recorded(tmp_path, dense_run):
    with pytest.raises(ValueError, match="init-order='flap' orders the blocks of a trained model"):
        RunConfig.from_flat({**TINY, "init-order": "flap"})
    with pytest.raises(ValueError, match="init-order='magnitude' is not allowed"):
        RunConfig.from_flat({**TINY, "init-order": "magnitude", "init-from": str(dense_run)})

    _, _, run = run_local(tmp_path, "ordered", init_from=str(dense_run), init_order="flap", num_server_rounds=1)

    conf = json.loads((run / "config.json").read_text())
    assert conf["init_order"]["method"] == "flap"
    assert all(sorted(o) == list(range(4)) for o in conf["init_order"]["order"]["heads"])


# --- core-blocks --------------------------------------------------------------------------------


def test_every_subnet_keeps_the_core_and_the_rest_is_covered():
    for rnd in range(20):
        bps = sample_blueprints(CFG8, 4, 4, seed=3, round=rnd, core=2)
        for layer in range(CFG8.n_layer):
            for kind in ("heads", "ffn"):
                held = [set(bp.ids(kind, layer)) for bp in bps]
                assert all(len(h) == (8 if layer in CFG8.shared_layer_ids else 4) for h in held)
                assert all({0, 1} <= h for h in held)  # the core, in every subnet
                assert set().union(*held) == set(range(8))  # every block beyond it, by some subnet
    assert sample_blueprints(CFG8, 4, 4, seed=3, round=1, core=0) == sample_blueprints(CFG8, 4, 4, seed=3, round=1)
    with pytest.raises(ValueError, match="6 of them beyond the core of 2"):
        sample_blueprints(CFG8, 2, 4, seed=0, round=1, core=2)


def test_core_blocks_reach_the_round_plan_and_deployment():
    run = RunConfig.from_flat({"core-blocks": 2})
    plan = round_plan(CFG8, run, 1, [1.0] * 4)
    assert all(set(bp.heads[2]) >= {0, 1} and len(bp.heads[2]) == 4 for bp in plan.blueprints)
    draws = deploy_blueprints(CFG8, "random", 3, seed=0, draws=5, core=2)
    assert all(set(bp.ffn[1]) >= {0, 1} for bp in draws) and len({bp.ffn[1] for bp in draws}) > 1
    for bad, match in (({"core-blocks": 5}, r"core-blocks=5 must fit in the subnets: allowed 0..4"),
                       ({"core-blocks": 7, "keep-choices": "2,4,6"}, r"core-blocks=7 must fit in the subnets: "
                                                                     r"allowed 0..6"),
                       ({"core-blocks": 1, "subnet-policy": "ordered"}, "needs strategy='twist' and "
                                                                       "subnet-policy='random'"),
                       ({"core-blocks": -1}, "core-blocks=-1 must be >= 0")):
        with pytest.raises(ValueError, match=match):
            RunConfig.from_flat(bad)


def test_a_core_of_half_the_blocks_under_fjords_sizes_is_fjord_up_to_the_core():
    """`twist-core-half-mixed`: core-blocks N/2 with keeps drawn from the quarters. A subnet no larger
    than the core is the nested prefix of its keep (FjORD's); a larger one holds the core and random
    blocks beyond it; the full model's blocks are all trained."""
    from twist_fl.tools.tune import method_overrides

    keys = method_overrides("twist-core-half-mixed", CFG8.n_blocks)
    assert keys["core-blocks"] == 4 and keys["keep-choices"] == "2,4,6,8"
    run = RunConfig.from_flat({k: v for k, v in keys.items() if k != "strategy"})
    beyond: set[int] = set()
    seen: set[int] = set()
    for rnd in range(1, 30):
        plan = round_plan(CFG8, run, rnd, [1.0, 0.75, 0.5, 0.25])
        for bp, keep in zip(plan.blueprints, plan.keeps, strict=True):
            seen.add(keep)
            if keep <= 4:
                assert bp == prefix_blueprint(CFG8, keep)
            elif keep < 8:
                held = set(bp.heads[2])
                assert len(held) == keep and set(range(4)) <= held
                beyond |= held - set(range(4))
    assert seen == {2, 4, 6, 8} and beyond == {4, 5, 6, 7}  # every block past the core, not only FjORD's 4, 5


def test_the_scratch_recipe_is_tunes_half_core_at_fjords_sizes_and_the_run_records_its_core(tmp_path):
    """recipe='scratch' in one key: keep-choices "quarters" and, once the model is known, core-blocks
    N/2: the round plans of `tune run --methods twist-core-half-mixed`, recorded as such."""
    from twist_fl.tools.tune import method_of, method_overrides

    keys = method_overrides("twist-core-half-mixed", CFG8.n_blocks)
    tuned = RunConfig.from_flat({k: v for k, v in keys.items() if k != "strategy"})
    recipe = RunConfig.from_flat({"recipe": "scratch"})
    assert recipe.core_blocks == 0 and recipe.keep_choices == "quarters"  # the core needs the model
    trained = recipe.as_trained(CFG8)
    assert trained.core_blocks == 4 and trained.choices_for(CFG8) == (2, 4, 6, 8)
    for rnd in (1, 2, 7):
        assert round_plan(CFG8, trained, rnd, [1.0, 0.75, 0.5, 0.25]) == \
            round_plan(CFG8, tuned, rnd, [1.0, 0.75, 0.5, 0.25])
    assert RunConfig.from_flat({"recipe": "scratch", "core-blocks": 2}).as_trained(CFG8).core_blocks == 2  # yours
    with pytest.raises(ValueError, match="recipe='scratch' draws TwIST's random subnets around a nested core; it "
                                         "needs strategy='twist' and subnet-policy='random'"):
        RunConfig.from_flat({"recipe": "scratch", "subnet-policy": "ordered"})
    with pytest.raises(ValueError, match=r"core-blocks=4 \(recipe='scratch' sets it to half the blocks\) must fit "
                                         r"in the subnets: allowed 0..2"):
        RunConfig.from_flat({"recipe": "scratch", "keep-choices": "1,2"}).as_trained(CFG8)

    summary, _, run_dir = run_local(tmp_path, "scratch", recipe="scratch")
    recorded = json.loads((run_dir / "config.json").read_text())["run"]
    n = RunConfig.from_flat(TINY).model_config().n_blocks
    assert recorded["recipe"] == "scratch" and recorded["core-blocks"] == max(1, n // 2)
    assert method_of(recorded, n) == "twist-core-half-mixed" and summary["rounds"] == TINY["num-server-rounds"]


# --- the recovery baseline: DDP on a pruned model, distilled from a model folder -------------------


@pytest.mark.slow
def test_ddp_fine_tunes_a_pruned_model_with_distillation_from_the_dense_one(tmp_path, dense_run):
    from twist_fl.baselines.ddp import ddp_run_config, run_ddp
    from twist_fl.evaluation.compare import test_ppl

    dense = GPT.load(dense_run / "model")
    pruned = prune_structured(dense, 2, "flap", 0, _calib(seq=33))
    pruned.save(tmp_path / "pruned")
    run = ddp_run_config({**TINY, "init-from": str(tmp_path / "pruned"), "distill-from": str(dense_run),
                          "distill-weight": 0.8, "distill-temperature": 2.0, "out-dir": str(tmp_path),
                          "run-name": "recovery", "eval-every": 1})

    summary = run_ddp(run, 2)

    assert summary["keep"] == 2 and summary["blueprint"] == pruned.blueprint.to_dict()
    assert set(summary["final"]) == {"full"}  # the pruned model itself; it has no subnets to cut
    trained = GPT.load(tmp_path / "recovery" / "model")
    assert trained.blueprint == pruned.blueprint
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), pruned.state_dict().values(),
                                                         strict=True))
    conf = json.loads((tmp_path / "recovery" / "config.json").read_text())
    assert conf["teacher"]["model"] == str(dense_run.resolve()) and conf["teacher"]["weight"] == 0.8
    assert set(test_ppl(str(tmp_path / "recovery"), [1, 2], 1, 256)) == {"full"}
    with pytest.raises(ValueError, match="is a pruned subnet made with alpha=0.5"):
        run_ddp(ddp_run_config({**TINY, "init-from": str(tmp_path / "pruned"), "alpha": 0.0,
                                "out-dir": str(tmp_path), "run-name": "other"}), 2)


def test_a_distillation_teacher_may_be_a_model_folder_but_not_anything_else(tmp_path, dense_run):
    run = RunConfig.from_flat({**TINY, "distill-from": str(dense_run), "distill-weight": 0.5})
    assert run.distill_from == str(dense_run)
    with pytest.raises(ValueError, match="distill-from='nowhere' is neither one of"):
        RunConfig.from_flat({**TINY, "distill-from": "nowhere", "distill-weight": 0.5})
    with pytest.raises(ValueError, match="distill-from='global' distils subnets from the round's full model"):
        RunConfig.from_flat({**TINY, "strategy": "fedavg", "distill-from": "global", "distill-weight": 0.5,
                             "mode": "masked"})


# --- paired ratios ------------------------------------------------------------------------------


def test_a_paired_ratio_is_its_hand_computed_mean_sd_and_t_interval():
    r = paired_ratio({0: 2.0, 1: 3.0, 2: 4.0, 7: 1.0}, {0: 2.0, 1: 2.0, 2: 2.0})  # seed 7 has no partner

    # ratios 1, 1.5, 2: mean 1.5, sample sd 0.5, t(0.975, 2) = 4.303, half width 4.303 * 0.5 / sqrt(3)
    assert r.seeds == (0, 1, 2) and r.mean == pytest.approx(1.5) and r.sd == pytest.approx(0.5)
    assert (r.lo, r.hi) == pytest.approx((1.5 - 1.2422, 1.5 + 1.2422), abs=1e-4)
    assert r.crosses(1.0) and not r.crosses(3.0)
    assert r.text() == "1.500 ± 0.500 [0.258, 2.742]"
    one = paired_ratio({0: 3.0}, {0: 2.0})
    assert one.text() == "1.500 (1 seed)" and one.crosses(1.0)
    assert paired_ratio({0: 1.0}, {1: 1.0}) is None
    assert t975(4) == 2.776 and t975(60) == pytest.approx(2.000, abs=1e-3)  # the table, and the expansion


def test_the_tuning_tables_paired_section_is_the_hand_computed_ratio_per_seed():
    from twist_fl.tools.tune import paired_rows

    a = {"method": "twist", "seeds": [0, 1, 2], "test": {"full": [2.0, 3.0, 4.0], "keep-4": [1.0, 1.0, 1.0],
                                                        "random-keep-4": [1.0, 1.0, 1.0]}}
    b = {"method": "fjord", "seeds": [0, 1, 2], "test": {"full": [2.0, 2.0, 2.0], "keep-4": [2.0, 2.0, 2.0],
                                                        "random-keep-4": [4.0, 2.0, 1.0]}}
    c = {"method": "lonely", "seeds": [5], "test": {"full": [1.0], "keep-4": [1.0], "random-keep-4": [1.0]}}
    rows, md = paired_rows([a, b, c], ["keep-4"], 8)

    assert [(r["a"], r["b"]) for r in rows] == [("twist", "fjord")]  # no seed in common with 'lonely'
    assert rows[0]["full"]["mean"] == pytest.approx(1.5) and rows[0]["full"]["sd"] == pytest.approx(0.5)
    assert rows[0]["full"]["ci95"] == pytest.approx([1.5 - 1.2422, 1.5 + 1.2422], abs=1e-4)
    assert rows[0]["keep-4"]["sd"] == 0 and rows[0]["keep-4"]["mean"] == 0.5
    assert rows[0]["random-keep-4"]["mean"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert "| twist / fjord | 1.500 ± 0.500 [0.258, 2.742] | 0.500 ± 0.000 [0.500, 0.500] |" in md
    assert paired_rows([a], ["keep-4"], 8) == ([], "")

# --- resumes that say what they recovered ---------------------------------------------------------


class Crash(BaseException):
    pass


def crash_after_round_2(monkeypatch, job) -> None:
    """Run `job()` with the server dying right after it saves round 2's checkpoint (as a killed
    process would), then put the real checkpoint writer back."""
    import twist_fl.federated.server as server

    real = server.save_checkpoint

    def dies_after_round_2(run_dir, round_, *a, **k):
        out = real(run_dir, round_, *a, **k)
        if round_ == 2:
            raise Crash()
        return out

    monkeypatch.setattr(server, "save_checkpoint", dies_after_round_2)
    with pytest.raises(Crash):
        job()
    monkeypatch.setattr(server, "save_checkpoint", real)


def _crash_in(round_):
    def hook(sent, reply, node):
        if sent.metadata.message_type == "train" and sent.content["config"]["server-round"] == round_:
            raise Crash()
        return reply
    return hook


def test_a_resume_falls_back_to_the_checkpoint_its_records_reach_and_says_so(tmp_path, caplog):
    overrides = dict(num_nodes=2, num_server_rounds=4, optimizer_state="reset")
    _, _, straight = run_local(tmp_path, "straight", **overrides)
    with pytest.raises(Crash):
        run_local(tmp_path, "cut", reply_hook=_crash_in(4), **overrides)
    metrics = tmp_path / "cut" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])  # round 3's line cut: its checkpoint is newest

    summary, _, _ = run_local(tmp_path, "renamed", resume_from=str(tmp_path / "cut"), **overrides)

    assert "resumes from round 2, its newest checkpoint that verifies and that metrics.jsonl records" in caplog.text
    assert summary["rounds"] == 4 and [json.loads(x)["round"] for x in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert summary["run"]["run-name"] == "cut" and not (tmp_path / "renamed").exists()  # it keeps its own name
    a, b = final_weights(straight), final_weights(tmp_path / "cut")
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_resume_without_its_records_or_config_is_refused_and_changes_nothing(tmp_path):
    overrides = dict(num_nodes=2, num_server_rounds=3, optimizer_state="reset")
    with pytest.raises(Crash):
        run_local(tmp_path, "run", reply_hook=_crash_in(3), **overrides)
    run = tmp_path / "run"
    (run / "metrics.jsonl").unlink()
    with pytest.raises(ValueError, match=r"has no complete checkpoint: round-00002 \(metrics.jsonl records rounds "
                                         r"1..0 only, not round 2\)"):
        run_local(tmp_path, "x", resume_from=str(run), **overrides)
    (run / "metrics.jsonl").write_text("")
    (run / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json cannot be read .*the run's record is damaged"):
        run_local(tmp_path, "x", resume_from=str(run), **overrides)
    assert (run / "config.json").read_text() == "{not json" and not (run / "summary.json").exists()


@pytest.mark.slow
def test_an_interrupted_finetune_job_resumes_to_the_uninterrupted_weights(tmp_path, dense_run, monkeypatch, caplog):
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    caplog.set_level(logging.INFO, logger="twist_fl")
    rc = {k: v for k, v in TINY.items() if k not in ("num-server-rounds", "eval-every")}
    for name in ("straight", "cut"):
        (tmp_path / name / "dense-s0").mkdir(parents=True)
        (tmp_path / name / "dense-s0" / "run").symlink_to(dense_run)
    straight = Finetune(FinetuneOptions(out=str(tmp_path / "straight"), nodes=2, run_config=rc))
    flat = straight.ft("twist", 1e-3, 8, 0)  # 4 rounds of 2 local steps, node moments kept (the default)
    straight.job("job", flat)

    cut = Finetune(FinetuneOptions(out=str(tmp_path / "cut"), nodes=2, run_config=rc))
    crash_after_round_2(monkeypatch, lambda: cut.job("job", cut.ft("twist", 1e-3, 8, 0)))
    run = tmp_path / "cut" / "job" / "run"
    before = {f: f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}
    with pytest.raises(ValueError, match=r"holds job 'job' trained with other keys: \{'lr': \(0.001, 0.002\)\}"):
        cut.job("job", cut.ft("twist", 2e-3, 8, 0))  # another job under that name: not resumed as this one
    assert {f: f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()} == before
    summary = cut.job("job", cut.ft("twist", 1e-3, 8, 0))

    assert "job was interrupted after round 2 of 4; resuming it" in caplog.text
    assert summary["rounds"] == 4
    a, b = final_weights(tmp_path / "straight" / "job" / "run"), final_weights(tmp_path / "cut" / "job" / "run")
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the nodes' moments came back from node-state/
    assert not (tmp_path / "cut" / "job" / "node-state").exists()
    assert math.isfinite(summary["final"]["full"]["ppl"])


def test_a_finished_finetune_job_is_reused_only_for_the_keys_it_was_trained_with(tmp_path):
    """A folder's finished job is returned as it is when asked for with the keys it recorded (a
    recipe's resolved keys and a path to where it ran do not count), and refused when a lever of
    that name now means other keys."""
    from twist_fl.core.io import write_json
    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    ft = Finetune(FinetuneOptions(out=str(tmp_path), variants="r:recipe=finetune lr=0.002"))
    flat = ft.ft("twist", 1e-3, 300, 0, ft.variants["r"])
    resolved = {**flat, "recipe": "finetune", "keep-choices": "quarters", "subnet-policy": "ordered",
                "init-order": "flap", "out-dir": str(tmp_path / "lever-r-s0"), "run-name": "run"}
    (tmp_path / "lever-r-s0" / "run").mkdir(parents=True)
    write_json(tmp_path / "lever-r-s0" / "run" / "summary.json", {"run": resolved, "rounds": 300})
    assert ft.job("lever-r-s0", flat)["rounds"] == 300  # the same job: not trained again

    other = Finetune(FinetuneOptions(out=str(tmp_path), variants="r:recipe=finetune lr=0.003"))
    with pytest.raises(ValueError, match=r"lever-r-s0/run holds job 'lever-r-s0' trained with other keys: "
                                         r"\{'lr': \(0.002, 0.003\)\} \(key: \(recorded, now\)\); name the "
                                         r"lever otherwise, or use another --out"):
        other.job("lever-r-s0", other.ft("twist", 1e-3, 300, 0, other.variants["r"]))
    kd = Finetune(FinetuneOptions(out=str(tmp_path), variants="r:recipe=finetune lr=0.002 full-nodes=1"))
    with pytest.raises(ValueError, match=r"\{'full-nodes': \(0, 1\)\}"):
        kd.job("lever-r-s0", kd.ft("twist", 1e-3, 300, 0, kd.variants["r"]))


def test_a_finetune_job_another_process_is_training_is_waited_for_not_resumed(tmp_path, dense_run, monkeypatch,
                                                                              caplog):
    """A second `tune finetune` (`--reverse`) that reaches a job the first one is training sees the
    lock, even through a relative --out, says once whom it waits for, and touches nothing; once the
    holder is gone (here: killed) the job resumes from its newest checkpoint."""
    import signal
    import subprocess
    import sys
    import time

    from twist_fl.tools.finetune import Finetune, FinetuneOptions

    caplog.set_level(logging.INFO, logger="twist_fl")
    rc = {k: v for k, v in TINY.items() if k not in ("num-server-rounds", "eval-every")}
    (tmp_path / "ft" / "dense-s0").mkdir(parents=True)
    (tmp_path / "ft" / "dense-s0" / "run").symlink_to(dense_run)
    monkeypatch.chdir(tmp_path)
    ft = Finetune(FinetuneOptions(out="ft", nodes=2, run_config=rc))  # relative, as the docs' commands are
    crash_after_round_2(monkeypatch, lambda: ft.job("job", ft.ft("twist", 1e-3, 8, 0)))

    run = (tmp_path / "ft" / "job" / "run").resolve()
    hold = ("import sys, time; from twist_fl.core.runs import RunFolder; f = RunFolder.existing(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", hold, str(run)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    before = {f: f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()}
    waits = []

    def sleep(seconds):  # the waiter's pause: look at the folder, then let the holder end at the third
        if p.poll() is None:
            waits.append({f: f.read_bytes() for f in sorted(run.rglob("*")) if f.is_file()} == before)
            if len(waits) == 3:
                p.send_signal(signal.SIGKILL)
                p.wait()

    try:
        monkeypatch.setattr(time, "sleep", sleep)
        summary = ft.job("job", ft.ft("twist", 1e-3, 8, 0))
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()

    assert waits == [True, True, True]  # nothing cleared, resumed or written while it was held
    assert caplog.text.count(f"job is being trained by another process (PID {p.pid} ") == 1
    assert caplog.text.count("job was interrupted after round 2 of 4; resuming it") == 1
    assert caplog.text.index("being trained by another process") < caplog.text.index("was interrupted after")
    assert summary["rounds"] == 4


def test_reverse_takes_the_recovery_stages_jobs_in_reverse_order(tmp_path, dense_run, monkeypatch):
    """Two lanes on one folder (`--reverse` for the second) start at opposite ends of the recovery
    stage (its sizes, and the plain and distilled variant of each), as in every other stage."""
    from twist_fl.tools.finetune import Finetune, FinetuneOptions, n_blocks_of

    (tmp_path / "dense-s0").mkdir()
    (tmp_path / "dense-s0" / "run").symlink_to(dense_run)
    order = {}
    for reverse in (False, True):
        ft = Finetune(FinetuneOptions(out=str(tmp_path), seeds=1, stages="recovery", reverse=reverse,
                                      twist_lrs=[1e-3], ddp_lrs=[1e-3]))
        names = order[reverse] = []
        monkeypatch.setattr(ft, "job", lambda name, flat, names=names: names.append(name) or {})
        monkeypatch.setattr(ft, "best_lrs", lambda: {"twist": 1e-3, "ddp": 1e-3})
        monkeypatch.setattr(ft, "recovery_plan", lambda: {"alpha": 0.5, "lr": 1e-3})
        monkeypatch.setattr(ft, "record_plan", lambda best: None)
        ft.run()
    n = n_blocks_of(dense_run)
    keeps = sorted({max(1, round(n * f)) for f in (.25, .5, .75)} - {n})
    forward = [f"recovery{kd}-lr0.001-k{k}-F300-s0" for k in keeps for kd in ("", "-kd")]
    assert order[False] == ["dense-s0", *forward]
    assert order[True] == ["dense-s0", *reversed(forward)]


# --- the recipe in one key ----------------------------------------------------------------------


def test_the_recipe_sets_its_keys_and_yields_to_explicit_ones(dense_run):
    from twist_fl.core.config import RECIPES

    run = RunConfig.from_flat({**TINY, "recipe": "finetune", "init-from": str(dense_run)})
    for key, value in RECIPES["finetune"].items():
        if key not in TINY:  # TINY sets local-steps=2, which the recipe leaves alone
            assert run.to_flat()[key] == value, key
    assert run.local_steps == 2 and run.to_flat()["recipe"] == "finetune"
    assert RunConfig.from_flat({"recipe": "finetune", "init-from": str(dense_run)}).local_steps == 1
    with pytest.raises(ValueError, match="recipe='finetune' makes a trained dense model prunable: set init-from"):
        RunConfig.from_flat({"recipe": "finetune"})
    with pytest.raises(ValueError, match="recipe='best' is not allowed"):
        RunConfig.from_flat({"recipe": "best"})


def test_keep_choices_quarters_follow_the_model():
    run = RunConfig.from_flat({"keep-choices": "quarters"})
    assert run.choices_for(preset("cpu-small", vocab_size=257)) == (2, 4, 6, 8)
    assert run.choices_for(preset("gpt2")) == (3, 6, 9, 12)
    assert run.choices_for(preset("tiny", vocab_size=257)) == (1, 2, 3, 4)
    assert run.keep_for(preset("gpt2")) == 12
    plan = round_plan(CFG8, run, 3, [1.0] * 4)
    assert set(plan.keeps) <= {2, 4, 6, 8}


def test_a_quarter_and_half_the_blocks_are_one_rule_for_the_run_config_and_tune():
    """quarters_of (rounded down, at least 1) is what the default keep, keep-choices "quarters", the
    scratch recipe's core and tune's "quarter" / "half" / "quarters" keys resolve to, at any N."""
    from twist_fl.core.config import quarters_of
    from twist_fl.tools.tune import method_overrides

    assert [quarters_of(n, 2) for n in (1, 2, 3, 5, 8, 12)] == [1, 1, 1, 2, 4, 6]
    assert [quarters_of(n, 1) for n in (1, 3, 5, 8)] == [1, 1, 1, 2]
    assert [quarters_of(7, q) for q in (1, 2, 3, 4)] == [1, 3, 5, 7]
    for n in (2, 3, 5, 7, 8, 12):
        cfg = dataclasses.replace(CFG8, n_ffn_blocks=n, n_head=n)
        assert cfg.n_blocks == n
        half, quarter = quarters_of(n, 2), quarters_of(n, 1)
        assert RunConfig.from_flat({}).keep_for(cfg) == half
        assert RunConfig.from_flat({"recipe": "scratch"}).as_trained(cfg).core_blocks == half
        quarters = RunConfig.from_flat({"keep-choices": "quarters"}).choices_for(cfg)
        assert quarters == tuple(sorted({quarters_of(n, q) for q in (1, 2, 3, 4)}))
        assert method_overrides("fjord", n)["keep-choices"] == ",".join(str(quarters_of(n, q)) for q in (1, 2, 3, 4))
        assert method_overrides("twist-core-half-mixed", n)["core-blocks"] == half
        assert method_overrides("twist-core-mixed", n)["core-blocks"] == quarter


def test_a_machine_line_names_amx_or_its_absence_on_an_avx512_cpu():
    from twist_fl.core.precision import vector_text

    assert vector_text({"vector": "AVX-512"}) == "AVX-512, no AMX"
    assert vector_text({"vector": "AVX-512, AMX"}) == "AVX-512, AMX"
    assert vector_text({"vector": "AVX2"}) == "AVX2"
