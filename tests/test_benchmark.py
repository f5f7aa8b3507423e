"""The benchmark runner: suite expansion, resumability, aggregation, and one real phantom suite."""

from __future__ import annotations

import csv
import importlib.util
import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_overrides
from scipy import stats

from vqseg import benchmark
from vqseg.benchmark import load_suite, plan_runs, run_status, run_suite
from vqseg.cli import main
from vqseg.config import ConfigError, load_config
from vqseg.data.volumes import DataError

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["RV", "Myo", "LV"]


def write_suite(tmp_path: Path, **overrides) -> Path:
    suite = {
        "name": "fake",
        "output_dir": str(tmp_path / "out"),
        "labeled_cases": [3, 7],
        "seeds": [0, 1],
        "set": ["train.iterations=10"],
        "runs": {
            "sup": ["method.name=supervised"],
            "vq": ["method.name=vqseg", "method.pfa=false"],
            "sup_all": {"set": ["method.name=supervised"], "labeled_cases": [70]},
        },
        **overrides,
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


def fake_eval(dice: list[float], hd95: float = 5.0, missed: int = 0) -> dict:
    """An eval_test.json as ``evaluate_run`` writes it, with chosen per-class Dice."""
    def scores(d: float) -> dict:
        return {"dice": d, "jaccard": d / 2, "hd95": hd95, "asd": 1.0, "dice_std": 0.1}

    per_class = {n: scores(d) for n, d in zip(CLASSES, dice)}
    honest = {n: {**v, "missed": 0, "spurious": 0} for n, v in per_class.items()}
    mean = scores(float(np.mean(dice)))
    return {
        "paper": {"per_class": per_class, "mean": mean},
        "honest": {"per_class": honest, "mean": {**mean, "hd95": hd95 + 1, "missed": missed, "spurious": 0}},
        "num_volumes": 40,
        "checkpoint_step": 20,
        "units": "voxels",
    }


def make_done(
    run_dir: Path, dice: list[float], val: list[tuple[int, float]], wall: float = 60.0, summary: dict | None = None, **kw
) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "eval_test.json").write_text(json.dumps(fake_eval(dice, **kw)))
    written = {"wall_time_s": wall, "iterations_per_s": 2.0, "peak_memory_mb": 100.0, "device": "cpu", **(summary or {})}
    (run_dir / "summary.json").write_text(json.dumps(written))
    records = [{"step": s, "loss": 1.0} for s, _ in val] + [{"step": s, "val_dice": v} for s, v in val]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_expansion_names_and_row_overrides(tmp_path: Path) -> None:
    suite = load_suite(write_suite(tmp_path, device="cpu"))
    runs = plan_runs(suite)
    assert [r.name for r in runs] == [
        "sup/3cases_seed0", "sup/3cases_seed1", "sup/7cases_seed0", "sup/7cases_seed1",
        "vq/3cases_seed0", "vq/3cases_seed1", "vq/7cases_seed0", "vq/7cases_seed1",
        "sup_all/70cases_seed0", "sup_all/70cases_seed1",
    ]
    seeds_first = plan_runs(load_suite(write_suite(tmp_path, order="seeds")))
    assert [r.name for r in seeds_first] == [
        "sup/3cases_seed0", "vq/3cases_seed0", "sup/7cases_seed0", "vq/7cases_seed0", "sup_all/70cases_seed0",
        "sup/3cases_seed1", "vq/3cases_seed1", "sup/7cases_seed1", "vq/7cases_seed1", "sup_all/70cases_seed1",
    ]
    with pytest.raises(ConfigError, match="order"):
        load_suite(write_suite(tmp_path, order="random"))
    vq = runs[6]
    assert vq.run_dir == tmp_path / "out" / "vq" / "7cases_seed0"
    assert vq.overrides == [
        "train.device=cpu", "train.iterations=10", "method.name=vqseg", "method.pfa=false",
        "data.labeled_cases=7", "seed=0", f"output_dir={vq.run_dir}",
    ]
    assert load_suite(write_suite(tmp_path), output=tmp_path / "elsewhere").output_dir == tmp_path / "elsewhere"


def test_shipped_suites_expand() -> None:
    acdc = plan_runs(load_suite(REPO / "benchmarks" / "acdc.yaml"))
    assert len(acdc) == 6 * 2 * 2 + 2
    assert {r.cases for r in acdc if r.row == "supervised_all"} == {70}
    assert len(plan_runs(load_suite(REPO / "benchmarks" / "acdc_cpu.yaml"))) == 7
    assert len(plan_runs(load_suite(REPO / "benchmarks" / "phantom_smoke.yaml"))) == 2


@pytest.mark.parametrize("suite", ["acdc.yaml", "acdc_cpu.yaml"])
def test_acdc_suite_rows_resolve_to_the_method_they_are_named_after(suite: str) -> None:
    """Every peer, CPS included, is a row, and a row's overrides build that method's config."""
    loaded = load_suite(REPO / "benchmarks" / suite)
    assert list(loaded.rows) == ["supervised", "mean_teacher", "unimatch", "bcp", "cps", "vqseg", "supervised_all"]
    for run in plan_runs(loaded):
        cfg = load_config(loaded.config, run.overrides)
        assert cfg.method.name == run.row.removesuffix("_all")
        assert (cfg.data.labeled_cases, cfg.seed) == (run.cases, run.seed)


@pytest.mark.parametrize("suite", ["vqseg_ablation.yaml", "vqseg_ablation_cpu.yaml"])
def test_vqseg_ablation_rows_resolve_to_the_switches_they_are_named_after(suite: str) -> None:
    parts = {"base": ("none", False, False), "qpm": ("qpm", False, False), "qpm_db": ("qpm", True, False),
             "qpm_pfa": ("qpm", False, True), "all": ("qpm", True, True)}
    loaded = load_suite(REPO / "benchmarks" / suite)
    for run in plan_runs(loaded):
        method = load_config(loaded.config, run.overrides).method
        if run.row == "supervised":
            assert method.name == "supervised"
            continue
        switches = (method.perturbation, method.dual_branch, method.pfa)
        if run.row.startswith("eps"):
            assert switches == parts["all"] and method.eps == float(run.row[3:])
        elif run.row.startswith("dropout"):
            assert switches == ("dropout", True, True) and method.dropout == float(run.row[7:])
        else:
            assert switches == parts[run.row] and method.eps == 0.7


@pytest.mark.parametrize(
    "bad",
    [{"seedz": [0]}, {"runs": {"a/b": []}}, {"runs": {"a": {"sett": []}}}, {"concurrent": 0}, {"labeled_cases": "3"}],
)
def test_bad_suites_are_rejected(tmp_path: Path, bad: dict) -> None:
    with pytest.raises(ConfigError):
        load_suite(write_suite(tmp_path, **bad))


@pytest.mark.parametrize(
    "bad, key",
    [({"seeds": [0, 0]}, "seeds"), ({"labeled_cases": [3, 7, 3]}, "labeled_cases"),
     ({"runs": {"sup": {"set": ["method.name=supervised"], "seeds": [1, 1]}}}, "runs.sup.seeds")],
)
def test_repeated_seeds_or_counts_are_rejected(tmp_path: Path, bad: dict, key: str) -> None:
    """A repeat would plan one run folder twice: trained by two processes at once, counted twice."""
    with pytest.raises(ConfigError, match=rf"suite key {key}: .* repeats a value"):
        load_suite(write_suite(tmp_path, **bad))


def test_skips_done_resumes_partial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"sup": ["method.name=supervised"], "vq": ["method.name=vqseg"]}
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0], runs=rows)
    out = tmp_path / "out"
    make_done(out / "sup" / "3cases_seed0", [0.8, 0.7, 0.9], [(5, 0.5), (10, 0.6)])
    partial = out / "vq" / "3cases_seed0"
    partial.mkdir(parents=True)
    (partial / "last.pt").write_bytes(b"")
    assert run_status(out / "sup" / "3cases_seed0") == "done" and run_status(partial) == "partial"

    launched: list[list[str]] = []

    def fake_launch(cmd: list[str], log_path: Path) -> int:
        launched.append(cmd)
        assert log_path == partial / "train.log"
        if cmd[3] == "evaluate":
            make_done(partial, [0.6, 0.6, 0.6], [(10, 0.4)])
        return 0

    monkeypatch.setattr(benchmark, "launch", fake_launch)
    records = run_suite(path)
    assert [c[3] for c in launched] == ["train", "evaluate"]
    train_cmd = launched[0]
    assert "--resume" in train_cmd and f"output_dir={partial}" in train_cmd and "seed=0" in train_cmd
    assert launched[1][4:] == [str(partial), "--split", "test"]
    assert [r["row"] for r in records] == ["sup", "vq"]

    launched.clear()
    run_suite(path)  # a finished suite only re-aggregates
    assert launched == []


def test_failed_run_does_not_stop_the_suite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0, 1], runs={"sup": ["method.name=supervised"]})
    calls: list[str] = []

    def fake_launch(cmd: list[str], log_path: Path) -> int:
        calls.append(log_path.parent.name)
        if log_path.parent.name == "3cases_seed0":
            return 1
        make_done(log_path.parent, [0.5, 0.5, 0.5], [(10, 0.5)])
        return 0

    monkeypatch.setattr(benchmark, "launch", fake_launch)
    with pytest.raises(benchmark.SuiteError, match="sup/3cases_seed0"):
        run_suite(path)
    assert sorted(calls) == ["3cases_seed0", "3cases_seed1", "3cases_seed1"]  # no evaluate after a failed train
    assert len(list(csv.DictReader((tmp_path / "out" / "results.csv").open()))) == 1


def test_concurrent_runs_overlap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = {"sup": ["method.name=supervised"]}
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0, 1, 2], concurrent=3, runs=rows)
    active, peak = [0], [0]

    def fake_launch(cmd: list[str], log_path: Path) -> int:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        active[0] -= 1
        if cmd[3] == "evaluate":
            make_done(log_path.parent, [0.5, 0.5, 0.5], [(10, 0.5)])
        return 0

    monkeypatch.setattr(benchmark, "launch", fake_launch)
    run_suite(path)
    assert peak[0] == 3


def test_changed_config_blocks_resume_but_keeps_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0], runs={"sup": ["method.name=supervised"]})
    run_dir = tmp_path / "out" / "sup" / "3cases_seed0"
    run_dir.mkdir(parents=True)
    from vqseg.config import load_config, save_config

    save_config(load_config(None, ["train.iterations=99"]), run_dir / "config.yaml")
    (run_dir / "last.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match="train.iterations"):
        run_suite(path, dry_run=True)
    make_done(run_dir, [0.5, 0.5, 0.5], [(10, 0.5)])
    run_suite(path, dry_run=True)
    assert "results are kept" in capsys.readouterr().err


def test_aggregation_numbers_tables_and_plots(tmp_path: Path) -> None:
    path = write_suite(tmp_path)
    out = tmp_path / "out"
    make_done(out / "sup" / "3cases_seed0", [0.80, 0.70, 0.90], [(5, 0.5), (10, 0.7), (15, 0.7)], wall=60, missed=1)
    make_done(out / "sup" / "3cases_seed1", [0.70, 0.60, 0.80], [(5, 0.4), (10, 0.6)], wall=180, missed=3)
    # resumed from a checkpoint that predates the recorded training time: its 30 s timed only the last process
    resumed = {"iterations": 20, "trained_steps_this_process": 5}
    make_done(out / "vq" / "7cases_seed0", [0.9, 0.9, 0.9], [(10, 0.8)], wall=30, summary=resumed, hd95=2.0)
    suite = load_suite(path)
    records = benchmark.write_results(suite, plan_runs(suite))  # 3 of 10 runs done: tabulate without training

    assert [(r["row"], r["cases"], r["seed"]) for r in records] == [("sup", 3, 0), ("sup", 3, 1), ("vq", 7, 0)]
    first = records[0]
    assert first["dice"] == pytest.approx(0.8) and first["dice_Myo"] == 0.7
    assert (first["best_val_dice"], first["best_step"]) == (0.7, 10)  # first step reaching the best
    assert first["hd95_found"] == 6.0 and first["missed"] == 1

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 3 and float(rows[1]["dice"]) == pytest.approx(0.7)

    md = (out / "results.md").read_text()
    # sup, 3 cases: Dice 80 % and 70 % -> mean 75.00, sample std sqrt(50) = 7.07; time 1 and 3 min.
    sup = next(line for line in md.splitlines() if line.startswith("| sup | 3 |"))
    cells = [c.strip() for c in sup.strip("|").split("|")]
    assert cells[2] == "2"
    assert cells[3] == f"75.00 ± {np.std([80, 70], ddof=1):.2f}" == "75.00 ± 7.07"
    assert cells[4] == "[11.47, 138.53]"  # 75 ± t(0.975, 1) 7.07 / sqrt(2), t = 12.706
    assert cells[10] == "2.0 ± 1.4"  # missed 1 and 3
    assert cells[11:14] == ["75.00 ± 7.07", "65.00 ± 7.07", "85.00 ± 7.07"]
    assert cells[14] == "2.0 ± 1.4"  # train time: 1 and 3 min
    vq = next(line for line in md.splitlines() if line.startswith("| vq | 7 |"))
    assert "90.00 ± — | — |" in vq and "2.00 ± —" in vq
    assert [c.strip() for c in vq.strip("|").split("|")][14] == "n/a" and records[2]["wall_time_s"] is None
    assert "3 of 10 planned runs" in md and "selected on validation" in md
    for plot in ("dice_vs_labeled.png", "val_curves.png"):
        assert (out / plot).stat().st_size > 1000


def test_report_tabulates_a_stopped_suite_without_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_suite(tmp_path)
    out = tmp_path / "out"
    make_done(out / "sup" / "3cases_seed0", [0.80, 0.70, 0.90], [(5, 0.5), (10, 0.7)])
    (out / "vq" / "3cases_seed0").mkdir(parents=True)
    (out / "vq" / "3cases_seed0" / "last.pt").write_bytes(b"")  # stopped half-way: not resumed here
    monkeypatch.setattr(benchmark, "launch", lambda *a: pytest.fail("--report must not train or evaluate"))
    from vqseg.cli import main

    main(["benchmark", str(path), "--report"])
    table = (out / "results.md").read_text()
    assert "80.00" in table and (out / "results.csv").read_text().count("\n") == 2  # header + the done run


def test_the_schedule_line_names_patches_or_the_resize(tmp_path: Path) -> None:
    """Patch-mode runs trained on patches: their unused train.image_size must not be reported."""
    path = write_suite(tmp_path)
    out = tmp_path / "out"
    for row, train in (("sup", {"image_size": 256, "patch_size": [8, 96, 96]}), ("vq", {"image_size": 128})):
        make_done(out / row / "3cases_seed0", [0.8, 0.7, 0.9], [(10, 0.7)])
        (out / row / "3cases_seed0" / "config.yaml").write_text(yaml.safe_dump({"train": train}))
    suite = load_suite(path)
    benchmark.write_results(suite, plan_runs(suite))
    md = (out / "results.md").read_text()
    assert "input patches 8 x 96 x 96 / slices resized to 128," in md and "256" not in md


def test_t_interval_is_the_t_interval_over_seeds() -> None:
    # mean 0.8, sample std 0.1, n = 3: 0.8 ± t(0.975, 2) 0.1 / sqrt(3) with t = 4.3027 (not 1.96)
    assert benchmark.t_interval([0.7, 0.8, 0.9]) == (pytest.approx(0.551586229), pytest.approx(1.048413771))
    half = 6.313752 * np.std([0.7, 0.9], ddof=1) / np.sqrt(2)  # t(0.95, 1): a 90 % interval, undefined seeds ignored
    assert benchmark.t_interval([0.7, None, 0.9], level=0.9) == (pytest.approx(0.8 - half), pytest.approx(0.8 + half))
    assert benchmark.t_interval([0.5]) is None and benchmark.t_interval([None]) is None


def write_cases(run_dir: Path, dice: dict[str, list[float]]) -> None:
    """An eval_test.csv as ``vqseg evaluate`` writes it: one line per case x class, cases in the given order."""
    lines = ["case,class,dice,jaccard,hd95,asd,missed,units"]
    for case, per_class in dice.items():
        lines += [f"{case},{name},{d},{d / 2},1.0,0.5,0,voxels" for name, d in zip(CLASSES, per_class)]
    (run_dir / "eval_test.csv").write_text("\n".join(lines) + "\n")


CASE_NAMES = [f"patient{i:03d}_frame01" for i in range(1, 9)]


def test_paired_wilcoxon_on_seed_averaged_case_dice(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    rows = {"sup": ["method.name=supervised"], "vq": ["method.name=vqseg"], "old": ["method.name=bcp"]}
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0, 1], runs=rows)
    out = tmp_path / "out"
    dice = {(row, seed): {c: list(rng.uniform(0.3, 0.9, 3)) for c in CASE_NAMES} for row in rows for seed in (0, 1)}
    dice["vq", 1][CASE_NAMES[0]] = [0.99, 0.99, 0.99]
    del dice["vq", 0][CASE_NAMES[-1]]  # a case one seed did not score
    for (row, seed), scores in dice.items():
        make_done(out / row / f"3cases_seed{seed}", [0.5, 0.5, 0.5], [(10, 0.5)])
        if (row, seed) != ("old", 1):  # an older run: evaluated before per-case scores existed
            write_cases(out / row / f"3cases_seed{seed}", dict(reversed(scores.items())) if seed else scores)
    suite = load_suite(path)
    benchmark.write_results(suite, plan_runs(suite))

    def row_mean(row: str, case: str) -> float:
        return float(np.mean([np.mean(dice[row, seed][case]) for seed in (0, 1)]))

    paired = CASE_NAMES[:-1]  # the case vq's seed 0 did not score is left out
    sup, vq = [row_mean("sup", c) for c in paired], [row_mean("vq", c) for c in paired]
    expected_p = stats.wilcoxon(sup, vq).pvalue
    tests = list(csv.DictReader((out / "paired_tests.csv").open()))
    assert [(t["row_a"], t["row_b"]) for t in tests] == [("sup", "vq"), ("sup", "old"), ("vq", "old")]
    first = tests[0]
    assert (first["cases"], first["seeds_a"], first["seeds_b"], first["pairs"]) == ("3", "2", "2", str(len(paired)))
    assert float(first["p_value"]) == pytest.approx(expected_p, rel=1e-12)
    assert float(first["mean_diff"]) == pytest.approx(np.mean(np.subtract(sup, vq)))
    assert all(t["p_value"] == t["pairs"] == t["mean_diff"] == "" for t in tests[1:])

    md = (out / "results.md").read_text()
    line = next(line for line in md.splitlines() if line.startswith("| 3 | sup | vq |"))
    assert line == f"| 3 | sup | vq | 2 / 2 | 7 | {100 * np.mean(np.subtract(sup, vq)):+.2f} | {expected_p:.3g} |"
    assert "| 3 | vq | old | 2 / 2 | n/a | n/a | n/a |" in md
    assert "Wilcoxon signed-rank" in md and "averaged over a row's seeds" in md


def test_wilcoxon_p_matches_scipy_with_ties_and_is_one_without_differences() -> None:
    a = [0.8, 0.7, 0.9, 0.6, 0.75, 0.5]
    b = [0.7, 0.7, 0.8, 0.65, 0.70, 0.6]  # one zero difference, tied absolute differences
    assert benchmark.wilcoxon_p(a, b) == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy >= 1.13 warns and returns 1; older versions raise
        assert benchmark.wilcoxon_p(a, a) == 1.0


@pytest.mark.parametrize(
    "text, message",
    [("case,class\np1,RV\n", "no column.s. dice"), ("case,class,dice\np1,RV,high\n", "line 2: dice 'high'"),
     ("case,class,dice\np1,RV,nan\n", "line 2: dice 'nan'")],
)
def test_bad_case_file_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "eval_test.csv").write_text(text)
    with pytest.raises(DataError, match=f"eval_test.csv.*{message}"):
        benchmark.case_dice(tmp_path)
    assert benchmark.case_dice(tmp_path / "absent") is None


def test_bad_case_file_ends_the_benchmark_with_one_line_and_no_tables(tmp_path: Path, capsys) -> None:
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0], runs={"sup": ["method.name=supervised"]})
    run_dir = tmp_path / "out" / "sup" / "3cases_seed0"
    make_done(run_dir, [0.5, 0.5, 0.5], [(10, 0.5)])
    (run_dir / "eval_test.csv").write_text("case,class\np1,RV\n")
    assert main(["benchmark", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vqseg benchmark: error: ") and str(run_dir / "eval_test.csv") in err[0]
    assert not (tmp_path / "out" / "results.md").exists() and not (tmp_path / "out" / "results.csv").exists()


def test_mean_std_uses_sample_std() -> None:
    assert benchmark.mean_std([1.0, 2.0, 4.0]) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)), 3)
    assert benchmark.mean_std([0.5]) == (0.5, None, 1)
    assert benchmark.mean_std([None, 2.0]) == (2.0, None, 1)


@pytest.mark.slow
def test_phantom_smoke_suite_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # suites resolve relative paths against the repository root
    records = run_suite(Path("benchmarks/phantom_smoke.yaml"), tmp_path)
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["row"] for r in rows] == ["supervised", "vqseg"] and len(records) == 2
    assert all(0.0 <= float(r["dice"]) <= 1.0 for r in rows)
    assert (tmp_path / "supervised" / "4cases_seed0" / "train.log").read_text().count("$ ") == 2
    assert (tmp_path / "results.md").is_file() and (tmp_path / "val_curves.png").is_file()
    (test,) = list(csv.DictReader((tmp_path / "paired_tests.csv").open()))  # from evaluate's real eval_test.csv
    assert (test["row_a"], test["row_b"], test["pairs"]) == ("supervised", "vqseg", "1")  # one test volume
    assert 0.0 <= float(test["p_value"]) <= 1.0


def _benchmark_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_speed_worker_takes_real_training_steps() -> None:
    """benchmarks/train_speed.py times the trainer's own step function; this keeps the two in sync."""
    train_speed = _benchmark_script("train_speed")
    result = train_speed.measure("vqseg:method.pfa=false,method.codebook_size=64", tiny_overrides(), warmup=1, steps=2)
    assert result["median_s"] > 0 and result["params_m"] > 0


def test_pseudo_label_bias_counts_each_true_pixel_once() -> None:
    """The README's drift diagnosis rests on these four rates; a network with known outputs pins them.

    One 1 x 4 slice, true classes [0, 1, 1, 1]; predictions: background (sure), class 1 (sure),
    background (sure), class 1 (unsure). Class 1: area 2/3, right 1/3, as background 1/3, ignored 1/3.
    """
    bias = _benchmark_script("pseudo_label_bias")
    sure, unsure = 10.0, 0.1
    logits = torch.tensor([[sure, 0.0], [0.0, sure], [sure, 0.0], [0.0, unsure]]).T.reshape(1, 2, 1, 4)
    network = lambda x: logits.expand(x.shape[0], -1, -1, -1)  # noqa: E731
    images, labels = torch.zeros(2, 1, 1, 4), torch.tensor([[[0, 1, 1, 1]]]).expand(2, -1, -1)
    rates = bias.class_rates(network, images, labels, threshold=0.95, num_classes=2, batch=1)
    assert rates[1] == pytest.approx({"area": 2 / 3, "right": 1 / 3, "bg": 1 / 3, "ignored": 1 / 3})
    assert rates[0] == pytest.approx({"area": 2.0, "right": 1.0, "bg": 1.0, "ignored": 0.0})
