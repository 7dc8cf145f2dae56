import json
import subprocess
import sys
from pathlib import Path

import pytest

from twist_fl.core.config import preset
from twist_fl.tools.bench import bench_bytes, gpt2_cfg, train_flops_ratio

ROOT = Path(__file__).resolve().parents[1]


def test_flop_bound_of_a_training_step_matches_the_hand_count():
    # GPT-2 124M, every layer sliced, 6 of 12: per layer 14.16 MFLOP/token of matmuls -> 7.08,
    # plus attention; the output layer (77.2 MFLOP) is not pruned: ~34% less work
    assert 1 - train_flops_ratio(gpt2_cfg(()), 6, 64) == pytest.approx(0.3445, abs=1e-3)
    assert 1 - train_flops_ratio(gpt2_cfg(), 6, 64) == pytest.approx(0.2871, abs=1e-3)  # layers 0, 11 whole


def test_bytes_are_counted_from_serialized_messages():
    cfg = preset("tiny", vocab_size=257)

    res = bench_bytes(nodes=4, keeps=(1, 2), cfg=cfg)

    rows = res["rows"]
    assert rows["dense float32"]["vs_dense_fp32"] == 1.0
    assert rows["twist k1/4 float32"]["down_total"] < rows["twist k2/4 float32"]["down_total"] \
        < rows["dense float32"]["down_total"]
    assert 0.5 < rows["dense bfloat16"]["vs_dense_fp32"] < 0.6  # half the payload, the same headers
    assert all(r["overhead_over_raw"] > 0 for r in rows.values())  # headers, ids, config: never free


def test_hydra_sweep_and_its_summary(tmp_path):
    sweep_dir = tmp_path / "multirun"
    cmd = [sys.executable, "-m", "twist_fl.tools.sweep", "--multirun", "run.local_steps=1,2", "total_local_steps=4",
           "run.model=tiny", "run.seq_len=32", "run.batch_size=4", "run.eval_tokens=512", "run.eval_draws=1",
           "num_supernodes=2", f"hydra.sweep.dir={sweep_dir}"]

    out = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summ = subprocess.run([sys.executable, "-m", "twist_fl.tools.sweep_summary", str(sweep_dir)], capture_output=True,
                          text=True, timeout=120)

    assert summ.returncode == 0, summ.stderr
    res = json.loads((sweep_dir / "summary.json").read_text())
    assert res["x"] == "run.local_steps" and [r["x"] for r in res["rows"]] == ["1", "2"]
    assert [r["rounds"] for r in res["rows"]] == [4, 2]  # equal total batches
    assert (sweep_dir / "summary.png").is_file() and "| run.local_steps | full |" in summ.stdout


def test_sweep_refuses_a_bad_key_before_running(tmp_path):
    out = subprocess.run([sys.executable, "-m", "twist_fl.tools.sweep", "run.keep=99", f"hydra.run.dir={tmp_path}/x"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "keep=99 is out of range" in out.stderr


def test_inference_flop_bound_of_gpt2_at_half_width_is_about_one_and_a_half():
    from twist_fl.tools.bench_inference import forward_flops

    cfg = gpt2_cfg(())
    assert forward_flops(cfg, 12, 12, 300) / forward_flops(cfg, 6, 6, 300) == pytest.approx(1.54, abs=0.01)


def test_inference_benchmark_writes_its_measurements(tmp_path):
    from twist_fl.tools.bench_inference import main

    out = tmp_path / "inf.json"
    assert main(["--preset", "tiny", "--keep", "2", "--prompt", "8", "--decode", "3", "--repeats", "2",
                 "--json", str(out)]) == 0

    res = json.loads(out.read_text())
    assert res["params_pruned"] < res["params_full"]
    for name in ("full", "pruned"):
        assert len(res[name]["runs"]) == 2 and res[name]["decode_tok_s"] > 0
    full, pruned = (res[name]["runs"][0]["decode_s_per_token"] for name in ("full", "pruned"))
    assert res["decode"]["speedup_min"] <= full / pruned <= res["decode"]["speedup_max"]  # repeat 1 is paired
    for phase in ("prefill", "decode"):
        r = res[phase]
        assert r["flop_bound"] > 1
        assert r["speedup_min"] <= r["speedup"] <= r["speedup_max"]
        assert r["of_bound"] == pytest.approx(r["speedup"] / r["flop_bound"])


@pytest.mark.slow
def test_runtime_overhead_benchmark_splits_a_real_flwr_run():
    from twist_fl.tools.bench import bench_overhead

    res = bench_overhead(rounds=3, nodes=2, config={"model": "tiny", "local-steps": 2, "eval-tokens": 1024,
                                                     "eval-draws": 1})

    assert len(res["plain_round_s"]) == 3 and len(res["flwr_round_s"]) == 2
    assert res["ratio"] == pytest.approx(res["flwr_run_s"] / res["plain_s"])
    assert res["per_round_ratio_min"] <= res["per_round_ratio"] <= res["per_round_ratio_max"]
    assert res["flwr_run_s"] == pytest.approx(res["fixed_s"] + sum(res["flwr_round_s"]) + res["plain_round_s"][0])
    assert res["fixed_s"] > 1.0  # a SuperLink, Ray and the app start: never free
    assert res["eval_s"] > 0  # the final evaluation ran, and was timed and taken out
    assert len(res["flwr_train_s"]) == 2 and len(res["plain_train_s"]) == 3
    assert all(a > 0 for a in res["flwr_train_s"])  # the nodes' train-s, summed per round (actors may overlap)
    assert all(0 < a < r for a, r in zip(res["plain_train_s"], res["plain_round_s"], strict=True))
    assert res["train_ratio_min"] <= res["train_ratio"] <= res["train_ratio_max"]


_MALLOC_CHILD = r"""
import ctypes, sys, torch
from twist_fl.tools.bench import set_malloc
from twist_fl.core.train import freed_memory_reused, reuse_freed_memory


class MallInfo2(ctypes.Structure):  # glibc >= 2.33 <malloc.h>
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
reuse = sys.argv[1] == "reuse"
if reuse:
    assert reuse_freed_memory() and reuse_freed_memory()  # applies, and again is a no-op
set_malloc(reuse)
MiB = 2**20
for _ in range(3):  # a training loop's first steps
    before = libc.mallinfo2()
    t = torch.ones(64 * MiB)  # 256 MiB, over glibc's 32 MiB ceiling for serving from the heap
    live = libc.mallinfo2()
    del t
    freed = libc.mallinfo2()
print(freed_memory_reused(), (live.hblkhd - before.hblkhd) // MiB, freed.fordblks // MiB)
try:
    set_malloc(False)
    print("set_malloc(False) accepted")
except RuntimeError as e:
    print(e)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_reused_freed_memory_keeps_a_large_buffer_in_the_heap_for_the_next_one():
    # glibc's own accounting (mallinfo2), not the kernel's page-fault counters: how the kernel
    # backs the kept memory (huge pages, reclaim) is the machine's business, and the benchmark's.
    def child(mode):
        out = subprocess.run([sys.executable, "-c", _MALLOC_CHILD, mode], capture_output=True, text=True, check=True)
        first, second = out.stdout.strip().splitlines()
        reused, mmapped_mib, free_in_heap_mib = first.split()
        return reused == "True", int(mmapped_mib), int(free_in_heap_mib), second

    reused, mmapped, kept, refusal = child("reuse")
    assert reused
    assert mmapped == 0  # the 256 MiB buffer came from the heap: no fresh mmap
    assert kept >= 256  # and once freed it stays there, for the next step's buffer
    assert "cannot be undone" in refusal  # a benchmark of glibc's default cannot run in this process
    reused, mmapped, kept, accepted = child("return")
    assert not reused and accepted == "set_malloc(False) accepted"
    assert mmapped >= 256 and kept < 256  # glibc's default: mapped anew, unmapped when freed


def test_sweep_summary_averages_over_seeds(tmp_path):
    from twist_fl.tools.sweep_summary import summarize

    def job(i, steps, seed, full, keep2):
        d = tmp_path / f"{i}-job"
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(f"- run.local_steps={steps}\n- run.seed={seed}\n")
        (d / "run").mkdir()
        (d / "run" / "summary.json").write_text(json.dumps({
            "strategy": "twist", "rounds": 300 // steps,
            "final": {"full": {"ppl": full}, "keep-2": {"mean": keep2, "std": 0.5, "draws": [keep2]}}}))

    job(0, 5, 0, 10.0, 11.0)
    job(1, 5, 1, 12.0, 13.0)
    job(2, 15, 0, 9.0, 9.5)
    job(3, 15, 1, 9.0, 10.5)

    out = summarize(tmp_path)

    assert out["x"] == "run.local_steps" and [r["x"] for r in out["rows"]] == ["5", "15"]
    r5, r15 = out["rows"]
    assert (r5["full"], r5["full_std"], r5["seeds"]) == (11.0, 1.0, 2)
    assert r5["keep-2"] == (12.0, 1.0) and r15["keep-2"] == (10.0, 0.5) and r15["full_std"] == 0.0
    assert "mean ± std over 2 seeds" in out["table"]
    assert "| 5 | 11.000 ± 1.000 | 12.000 ± 1.000 | 60 | 2 |" in out["table"]


@pytest.mark.slow
def test_node_count_benchmark_samples_nodes_of_a_real_flwr_run():
    from twist_fl.tools.bench import bench_nodes

    res = bench_nodes((3,), rounds=2, per_round=2, config={"model": "tiny", "local-steps": 2, "eval-tokens": 1024,
                                                           "eval-draws": 1})

    r = res["runs"]["3"]
    assert r["nodes_per_round"] == [2, 2]  # 2 of the 3 SuperNodes sampled each round
    assert len(r["round_s"]) == 1 and r["round_s_median"] > 0
    assert r["peak_rss_mib"] > 100  # a SuperLink, the simulation and its Ray processes were watched
