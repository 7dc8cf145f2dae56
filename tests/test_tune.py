"""`twist-fl tune`: the LR grid, seeds at each best, and the table over seeds."""

import json

from twist_fl.tools.tune import METHODS, main, method_of, method_overrides, pick_lr

RC = ("model='tiny' seq-len=32 batch-size=4 num-server-rounds=2 local-steps=2 eval-every=2 eval-tokens=512 "
      "eval-draws=1")


def test_grid_then_seeds_then_table(tmp_path, capsys):
    out = tmp_path / "tune"
    assert main(["run", "--out", str(out), "--strategies", "twist,ddp", "--lrs", "0.001,0.01", "--seeds", "2",
                 "--nodes", "2", "--run-config", RC]) == 0
    best = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_lr"]

    jobs = sorted(p.name for p in out.iterdir() if (p / "run" / "summary.json").is_file())
    assert jobs == sorted(["twist-lr0.001-s0", "twist-lr0.01-s0", "ddp-lr0.001-s0", "ddp-lr0.01-s0",
                           f"twist-lr{best['twist']:g}-s1", f"ddp-lr{best['ddp']:g}-s1"])
    for s in ("twist", "ddp"):
        ppl = {lr: json.loads((out / f"{s}-lr{lr:g}-s0" / "run" / "summary.json").read_text())["final"]["full"]["ppl"]
               for lr in (0.001, 0.01)}
        assert best[s] == min(ppl, key=ppl.get)
    mtimes = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    assert main(["run", "--out", str(out), "--strategies", "twist,ddp", "--lrs", "0.001,0.01", "--seeds", "2",
                 "--nodes", "2", "--run-config", RC]) == 0  # finished jobs are not run again
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == mtimes

    assert main(["table", str(out), "--out", str(tmp_path / "t"), "--test-tokens", "512", "--draws", "1"]) == 0
    res = json.loads((tmp_path / "t" / "tuning.json").read_text())
    tuned = {r["strategy"]: r for r in res["tuned"]}
    assert set(tuned) == {"twist", "ddp"}
    for s, r in tuned.items():
        assert r["lr"] == best[s] and sorted(r["seeds"]) == [0, 1]
        assert len(r["valid"]["full"]) == len(r["test"]["full"]) == 2 and set(r["test"]) == {
            "full", "keep-1", "keep-2", "keep-3", "random-keep-1", "random-keep-2", "random-keep-3"}
    md = (tmp_path / "t" / "TUNING.md").read_text()
    assert f"| ddp | {best['ddp']:g} | 2 | test |" in md


def test_bad_grid_is_refused(tmp_path, capsys):
    root = tmp_path / "root"
    root.mkdir()
    assert main(["run", "--out", str(root), "--strategies", "twist,sgd"]) == 2
    assert "--methods entry 'sgd' is not allowed" in capsys.readouterr().err
    assert main(["run", "--out", str(root), "--lrs", "0.1,x"]) == 2
    assert main(["table", str(root), "--out", str(tmp_path / "t")]) == 2
    assert "no finished run folder" in capsys.readouterr().err
    assert main(["table", str(root), "--out", str(root / "t")]) == 2  # an output inside its input
    assert "is, is inside, or contains the input" in capsys.readouterr().err
    assert not list(root.iterdir())


def test_the_learning_rate_is_chosen_on_its_mean_over_seeds():
    # TwIST's case: the best seed-0 learning rate diverged at other seeds
    assert pick_lr({2e-3: [7.3, 7.1, 7.4, 7.3, 7.2], 3e-3: [6.9, 9.0, 9.5, 9.1]}) == 2e-3
    # a learning rate with 3 seeds beats one with 5 on the mean; one seed alone does not count
    assert pick_lr({1.5e-3: [6.0, 6.0, 6.1], 2e-3: [6.0, 5.8, 5.9, 7.2, 7.3], 1e-3: [5.0]}) == 1.5e-3
    # no learning rate with 3 seeds: the most seeds, then the lowest mean
    assert pick_lr({1e-3: [7.0, 7.2], 2e-3: [6.5], 3e-3: [6.9, 7.0]}) == 3e-3


def test_partial_model_methods_with_capacities_in_parallel(tmp_path, capsys):
    """HeteroFL, FjORD with its distillation and FedRolex from the one tool: two jobs at once, nodes of
    mixed capacity; each run is its method, holds what its capacity allows, and the table deploys the
    ordered ones as their prefix beside random subnets."""
    out = tmp_path / "peers"
    args = ["run", "--out", str(out), "--methods", "heterofl,fjord-sd,fedrolex", "--lrs", "0.002", "--seeds", "1",
            "--nodes", "4", "--capacities", "1,0.5", "--parallel", "2", "--run-config", RC]
    assert main(args) == 0
    assert set(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_lr"]) == {"heterofl", "fjord-sd",
                                                                                             "fedrolex"}
    plan = json.loads((out / "plan.json").read_text())["runs"][0]
    assert plan["capacities"] == [1.0, 0.5] and plan["command"].startswith("twist-fl tune run --out")
    for m in ("heterofl", "fjord-sd", "fedrolex"):
        run = tmp_path / "peers" / f"{m}-lr0.002-s0" / "run"
        cfg = json.loads((run / "config.json").read_text())
        assert method_of(cfg["run"]) == m
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"bytes_down_total"' in x]
        n = json.loads((run / "summary.json").read_text())["n_blocks"]
        for row in rows:
            keeps = {node["partition_id"]: node["keep"] for node in row["nodes"]}
            assert keeps[1] <= n // 2 and keeps[3] <= n // 2  # capacity 0.5
            if m != "fjord-sd":
                assert keeps[0] == n and keeps[1] == n // 2  # every block the capacity allows
    assert main(["table", str(out), "--out", str(tmp_path / "t"), "--test-tokens", "512", "--draws", "1"]) == 0
    res = json.loads((tmp_path / "t" / "tuning.json").read_text())
    rows = {r["method"]: r for r in res["tuned"]}
    assert set(rows) == {"heterofl", "fjord-sd", "fedrolex"}
    assert rows["heterofl"]["test"]["keep-1"] != rows["heterofl"]["test"]["random-keep-1"]  # the prefix, deployed
    assert rows["fedrolex"]["test"]["keep-1"] == rows["fedrolex"]["test"]["random-keep-1"]
    assert all(r["mb_per_node_round"][0] > 0 for r in rows.values())
    md = (tmp_path / "t" / "TUNING.md").read_text()
    assert "| heterofl | 0.002 | 1 | test |" in md and "random 1/" in md and plan["command"] in md


def test_method_names_map_to_run_config_and_back():
    for m in METHODS:
        keys = method_overrides(m, 8)
        assert method_of(keys, 8) == m
    assert method_overrides("fjord", 8)["keep-choices"] == "2,4,6,8"
    assert method_overrides("heterofl", 8)["keep"] == 8


def test_learning_rates_from_another_table(tmp_path, capsys):
    tuned = tmp_path / "tuning.json"
    tuned.write_text(json.dumps({"tuned": [{"method": "fedrolex", "lr": 0.003}, {"strategy": "twist", "lr": 0.002}]}))
    out = tmp_path / "char"
    assert main(["run", "--out", str(out), "--methods", "fedrolex,heterofl", "--lrs-from", str(tuned)]) == 2
    assert "has no learning rate for ['heterofl']" in capsys.readouterr().err and not out.exists()
    assert main(["run", "--out", str(out), "--methods", "fedrolex,twist", "--lrs-from", str(tuned), "--seeds", "2",
                 "--nodes", "4", "--run-config", RC + " partitioning='character' num-nodes=2"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["best_lr"] == {"fedrolex": 0.003,
                                                                                       "twist": 0.002}
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "fedrolex-lr0.003-s0", "fedrolex-lr0.003-s1", "twist-lr0.002-s0", "twist-lr0.002-s1"]
    assert json.loads((out / "plan.json").read_text())["runs"][0]["lrs"] == {"fedrolex": 0.003, "twist": 0.002}
