"""The evaluation protocol's recipe: which runs, seeds and cases enter each benchmark number, how the
paired test is computed (from first principles, not from scipy), which split holds which patients,
and which ACDC patients are labelled for N labelled cases."""

from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TinyACDC, tiny_config
from test_benchmark import CLASSES, make_done, write_suite

from vqseg import benchmark
from vqseg.benchmark import load_suite, plan_runs, run_status, run_suite
from vqseg.config import ConfigError, load_config, save_config
from vqseg.data import load_split, load_training_data
from vqseg.data.volumes import DataError

# ---------------------------------------------------------------------------------------------
# Benchmark: the paired test over the test cases
# ---------------------------------------------------------------------------------------------


def exact_wilcoxon_two_sided(a: list[float], b: list[float]) -> float:
    """Exact two-sided signed-rank p by enumerating every sign pattern (zero differences dropped,
    absolute differences distinct): p = 2 P(T+ <= min(T+, T-)), at most 1."""
    d = np.subtract(a, b)
    d = d[d != 0]
    ranks = np.argsort(np.argsort(np.abs(d))) + 1
    assert len(set(np.abs(d))) == len(d), "the enumeration assumes no tied absolute differences"
    t_plus = ranks[d > 0].sum()
    observed = min(t_plus, ranks.sum() - t_plus)
    at_most = sum(
        sum(r for r, s in zip(ranks, signs) if s) <= observed for signs in itertools.product((0, 1), repeat=len(d))
    )
    return min(1.0, 2 * at_most / 2 ** len(d))


def write_case_means(run_dir: Path, means: dict[str, float]) -> None:
    """eval_test.csv whose per-case class Dice average exactly to the given case Dice (m - 0.1, m, m + 0.1)."""
    lines = ["case,class,dice,jaccard,hd95,asd,missed,units"]
    for case, m in means.items():
        lines += [f"{case},{name},{m + off!r},0.5,1.0,0.5,0,voxels" for name, off in zip(CLASSES, (-0.1, 0.0, 0.1))]
    (run_dir / "eval_test.csv").write_text("\n".join(lines) + "\n")


def test_paired_test_pairs_seed_averaged_cases_by_name_within_a_labelled_count(tmp_path: Path) -> None:
    """Row vq (a): seeds 0 and 1 done, seed 2 not run; row mt (b): seed 0 only; row cps at another labelled count.

    a's seed 1 did not score case ``x`` (so a has no ``x``), b did not score case ``y``; case ``z``
    scores the same in both rows (a zero difference, dropped by the signed-rank test). Files list
    cases in different orders. Expected numbers are computed here by hand and by exact enumeration.
    """
    runs = {
        "vq": {"set": ["method.name=supervised"], "seeds": [0, 1, 2]},
        "mt": {"set": ["method.name=vqseg"], "seeds": [0]},
        "cps": {"set": ["method.name=bcp"], "labeled_cases": [7], "seeds": [0]},
    }
    path = write_suite(tmp_path, labeled_cases=[3], runs=runs)
    out = tmp_path / "out"
    shared = [f"patient{i // 2 + 1:03d}_frame{(1, 12)[i % 2]:02d}" for i in range(8)]  # cases: volumes, not patients
    a0 = {c: 0.30 + 0.07 * i for i, c in enumerate(shared)} | {"x": 0.9, "y": 0.2, "z": 0.55}
    a1 = {c: 0.50 + 0.011 * i * i for i, c in enumerate(shared)} | {"y": 0.4, "z": 0.55}
    b0 = dict(zip(shared, (0.43, 0.41, 0.60, 0.47, 0.70, 0.61, 0.86, 0.84))) | {"x": 0.1, "z": 0.55}
    for run, means in (("vq/3cases_seed0", a0), ("vq/3cases_seed1", a1), ("mt/3cases_seed0", dict(reversed(b0.items()))),
                       ("cps/7cases_seed0", b0)):
        make_done(out / run, [0.5, 0.5, 0.5], [(10, 0.5)])
        write_case_means(out / run, means)
    (out / "vq" / "3cases_seed2").mkdir(parents=True)  # planned, not run: it must not count as a seed
    suite = load_suite(path)
    benchmark.write_results(suite, plan_runs(suite))

    names = sorted([*shared, "z"])  # x: not scored by every seed of a; y: not scored by b
    a = [(a0[n] + a1[n]) / 2 for n in names]
    b = [b0[n] for n in names]
    expected_p = exact_wilcoxon_two_sided(a, b)
    assert 0.0 < expected_p < 1.0
    tests = list(csv.DictReader((out / "paired_tests.csv").open()))
    assert len(tests) == 1, "only rows with the same labelled count are compared"
    (t,) = tests
    assert (t["cases"], t["row_a"], t["row_b"], t["seeds_a"], t["seeds_b"]) == ("3", "vq", "mt", "2", "1")
    assert t["pairs"] == str(len(names))
    assert float(t["mean_diff"]) == pytest.approx(np.mean(a) - np.mean(b), abs=1e-12)
    assert float(t["p_value"]) == pytest.approx(expected_p, rel=1e-9)
    md = (out / "results.md").read_text()
    assert f"| 3 | vq | mt | 2 / 1 | {len(names)} | {100 * (np.mean(a) - np.mean(b)):+.2f} | {expected_p:.3g} |" in md
    table = [line.split("|")[1:4] for line in md.splitlines() if line.startswith(("| vq ", "| mt ", "| cps "))]
    assert [[c.strip() for c in cells] for cells in table] == [["vq", "3", "2"], ["mt", "3", "1"], ["cps", "7", "1"]]
    assert [r["row"] for r in csv.DictReader((out / "results.csv").open())] == ["vq", "vq", "mt", "cps"]  # file order


def test_wilcoxon_p_is_the_exact_two_sided_signed_rank_test() -> None:
    a = [0.61, 0.70, 0.52, 0.80, 0.66, 0.59, 0.75, 0.50]
    b = [0.58, 0.745, 0.47, 0.71, 0.66, 0.52, 0.69, 0.46]  # one zero difference, the rest distinct
    expected = exact_wilcoxon_two_sided(a, b)
    assert 0.0 < expected < 0.2
    assert benchmark.wilcoxon_p(a, b) == pytest.approx(expected, rel=1e-9)
    assert benchmark.wilcoxon_p(b, a) == pytest.approx(expected, rel=1e-9)  # two-sided: symmetric


# ---------------------------------------------------------------------------------------------
# Benchmark: which record fields come from which view, resume and config checks
# ---------------------------------------------------------------------------------------------


def distinct_eval() -> dict:
    """eval_test.json with every paper and honest number different, so each field's source shows."""
    per_class = {n: {"dice": d, "jaccard": d / 2, "hd95": 3.0 + i, "asd": 1.0 + i, "dice_std": 0.1}
                 for i, (n, d) in enumerate(zip(CLASSES, (0.5, 0.6, 0.7)))}
    honest_per_class = {n: {**v, "dice": v["dice"] + 0.01, "missed": 0, "spurious": 0} for n, v in per_class.items()}
    return {
        "paper": {"per_class": per_class,
                  "mean": {"dice": 0.61, "jaccard": 0.31, "hd95": 4.5, "asd": 1.5, "dice_std": 0.1}},
        "honest": {"per_class": honest_per_class,
                   "mean": {"dice": 0.62, "jaccard": 0.32, "hd95": 7.5, "asd": 2.5, "dice_std": 0.2, "missed": 3,
                            "spurious": 5}},
        "num_volumes": 40, "checkpoint_step": 20, "units": "mm",
    }


def test_record_and_table_read_paper_scores_and_honest_distances(tmp_path: Path) -> None:
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0], runs={"sup": ["method.name=supervised"]})
    run_dir = tmp_path / "out" / "sup" / "3cases_seed0"
    make_done(run_dir, [0.5, 0.5, 0.5], [(10, 0.5)])
    (run_dir / "eval_test.json").write_text(json.dumps(distinct_eval()))
    suite = load_suite(path)
    (record,) = benchmark.write_results(suite, plan_runs(suite))
    assert {k: record[k] for k in ("dice", "jaccard", "hd95", "asd")} == {"dice": 0.61, "jaccard": 0.31, "hd95": 4.5,
                                                                           "asd": 1.5}
    assert {k: record[k] for k in ("hd95_found", "asd_found", "missed", "spurious")} == {
        "hd95_found": 7.5, "asd_found": 2.5, "missed": 3, "spurious": 5}
    assert [record[f"dice_{c}"] for c in CLASSES] == [0.5, 0.6, 0.7]
    assert record["units"] == "mm" and record["checkpoint_step"] == 20
    md = (tmp_path / "out" / "results.md").read_text()
    cells = [c.strip() for c in next(li for li in md.splitlines() if li.startswith("| sup | 3 |")).strip("|").split("|")]
    assert cells[3:11] == ["61.00 ± —", "—", "31.00 ± —", "4.50 ± —", "1.50 ± —", "7.50 ± —", "2.50 ± —", "3.0 ± —"]


@pytest.mark.parametrize(
    "summary, expected",
    [
        ({"wall_time_s": 60.0, "iterations": 20, "trained_steps_this_process": 20}, 60.0),  # one process
        ({"wall_time_s": 60.0}, 60.0),  # no step counts at all: nothing says it was resumed
        ({"wall_time_s": 60.0, "iterations": 20, "trained_steps_this_process": 5, "wall_time_this_process_s": 10.0},
         60.0),  # resumed, time carried over from the checkpoint
        ({"wall_time_s": 30.0, "iterations": 20, "trained_steps_this_process": 5}, None),  # resumed, old summary
    ],
)
def test_train_time_is_kept_unless_it_timed_only_the_last_process(summary: dict, expected) -> None:
    assert benchmark._train_time(summary) == expected


@pytest.mark.parametrize(
    "files, status",
    [
        ((), "todo"),
        (("summary.json",), "todo"),  # summary without best.pt: no checkpoint to test
        (("best.pt",), "todo"),
        (("summary.json", "best.pt"), "trained"),
        (("summary.json", "last.pt"), "partial"),
        (("summary.json", "best.pt", "last.pt"), "trained"),
        (("last.pt",), "partial"),
        (("eval_test.json",), "done"),
        (("eval_test.json", "last.pt"), "done"),
    ],
)
def test_run_status(tmp_path: Path, files: tuple[str, ...], status: str) -> None:
    for name in files:
        (tmp_path / name).write_text("{}")
    assert run_status(tmp_path) == status


def test_config_check_ignores_output_dir_and_only_blocks_resuming(tmp_path: Path, capsys) -> None:
    """A partial run moved to another --output resumes; a trained run with another config is only noted."""
    path = write_suite(tmp_path, labeled_cases=[3], seeds=[0, 1], runs={"sup": ["method.name=supervised"]})
    suite = load_suite(path)
    moved, trained = plan_runs(suite)
    moved.run_dir.mkdir(parents=True)
    elsewhere = [o for o in moved.overrides if not o.startswith("output_dir=")] + ["output_dir=/old/place"]
    save_config(load_config(None, elsewhere), moved.run_dir / "config.yaml")
    (moved.run_dir / "last.pt").write_bytes(b"")
    trained.run_dir.mkdir(parents=True)
    save_config(load_config(None, [*trained.overrides, "train.iterations=99"]), trained.run_dir / "config.yaml")
    for name in ("summary.json", "best.pt"):
        (trained.run_dir / name).write_text("{}")
    run_suite(path, dry_run=True)
    err = capsys.readouterr().err
    assert "output_dir" not in err
    assert f"{trained.run_dir} was trained with another config" in err and "train.iterations" in err
    assert "results are kept" in err
    (moved.run_dir / "config.yaml").write_text((trained.run_dir / "config.yaml").read_text())
    with pytest.raises(ConfigError, match="train.iterations"):
        run_suite(path, dry_run=True)


def test_suite_defaults_row_settings_and_commands(tmp_path: Path) -> None:
    """No seeds key: seed 0 only; a row's own seeds and labelled counts replace the suite's; the
    device reaches both train (as an override) and evaluate (as --device)."""
    rows = {"sup": ["method.name=supervised"], "mt": {"set": ["method.name=mean_teacher"], "seeds": [5, 3]},
            "all": {"set": ["method.name=supervised"], "labeled_cases": [70], "seeds": [1]}}
    raw = yaml.safe_load(write_suite(tmp_path, runs=rows, device="cpu").read_text())
    del raw["seeds"]
    (tmp_path / "suite.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    suite = load_suite(tmp_path / "suite.yaml")
    runs = plan_runs(suite)
    assert [r.name for r in runs] == ["sup/3cases_seed0", "sup/7cases_seed0", "mt/3cases_seed5", "mt/3cases_seed3",
                                      "mt/7cases_seed5", "mt/7cases_seed3", "all/70cases_seed1"]
    run = runs[3]
    train = benchmark.train_command(suite, run, resume=False)
    assert train[-1] == "--overwrite" and benchmark.train_command(suite, run, resume=True)[-1] == "--resume"
    assert [train[i + 1] for i, part in enumerate(train) if part == "--set"] == run.overrides
    assert run.overrides[0] == "train.device=cpu" and run.overrides[-3:] == [
        "data.labeled_cases=3", "seed=3", f"output_dir={run.run_dir}"]
    assert benchmark.evaluate_command(suite, run)[3:] == ["evaluate", str(run.run_dir), "--split", "test", "--device",
                                                         "cpu"]


# ---------------------------------------------------------------------------------------------
# Splits: disjoint train / val / test, integer ids, and which patients each part of the data holds
# ---------------------------------------------------------------------------------------------


def acdc_cfg(root: Path, **overrides):
    return tiny_config(**{"data.dataset": "acdc", "data.root": str(root), "train.image_size": 16, **overrides})


def patients_of(names) -> set[int]:
    return {int(name[len("patient"):len("patient") + 3]) for name in names}


@pytest.mark.parametrize(
    "changes, shared",
    [({"val": [7, 8, 2]}, [2]), ({"test": [9, 10, 3]}, [3]), ({"test": [9, 10, 8]}, [8]),
     ({"val": [7, 8, 9], "test": [9, 10]}, [9])],
    ids=["train-val", "train-test", "val-test", "val-test-2"],
)
def test_a_patient_in_two_splits_is_rejected(tiny_acdc: TinyACDC, changes: dict, shared: list[int]) -> None:
    tiny_acdc.write_splits(**changes)
    with pytest.raises(DataError, match=re.escape(f"splits.json: patients {shared} appear in more than one split")):
        load_training_data(acdc_cfg(tiny_acdc.root))
    with pytest.raises(DataError, match="more than one split"):
        load_split(acdc_cfg(tiny_acdc.root), "test")


@pytest.mark.parametrize(
    "changes, message",
    [({"train": [1, 2, 3, 4, 5, 6, False]}, "'train' must be a list of integer patient ids"),
     ({"val": [7, 8.0]}, "'val' must be a list of integer"), ({"test": ["9", 10]}, "'test' must be a list of integer"),
     ({"train": [1, 2, 3, 4, 5, 5]}, "'train' lists a patient twice"),
     ({"labeled_order": [4, 2, 4]}, "'labeled_order' lists a patient twice"),
     ({"labeled_order": [4, 2, False]}, "'labeled_order' must be a list of integer")],
    ids=["bool", "float", "str", "dup", "order-dup", "order-bool"],
)
def test_split_ids_must_be_distinct_integers(tiny_acdc: TinyACDC, changes: dict, message: str) -> None:
    tiny_acdc.write_splits(**changes)
    with pytest.raises(DataError, match=f"splits.json: {message}"):
        load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 1}))


@pytest.mark.parametrize("labeled", [1, 3, 6, [6], [3, 1, 5]])
def test_each_training_patient_is_labelled_or_unlabelled_and_never_scored(tiny_acdc: TinyACDC, labeled) -> None:
    """labelled = the first N of labeled_order (or the listed ones, in that order), unlabelled = the rest
    of train in train order, validation = the val split, test = the test split only; every slice of
    every phase is used."""
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": labeled}))
    expected = tiny_acdc.splits["labeled_order"][:labeled] if isinstance(labeled, int) else labeled
    unlabelled = [p for p in tiny_acdc.splits["train"] if p not in expected]

    def slices(patients: list[int]) -> list[str]:
        return [f"{stem}_slice{i}" for p in patients for stem in tiny_acdc.files[p] for i in range(tiny_acdc.depths[stem])]

    assert data.labeled.names == slices(expected) and len(data.labeled) == len(data.labeled.names)
    assert data.unlabeled.names == slices(unlabelled) and len(data.unlabeled) == len(data.unlabeled.names)
    assert [v.name for v in data.val] == [s for p in tiny_acdc.splits["val"] for s in tiny_acdc.files[p]]
    test = load_split(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": labeled}), "test")
    assert [v.name for v in test] == [s for p in tiny_acdc.splits["test"] for s in tiny_acdc.files[p]]


def test_labels_are_resized_by_nearest_neighbour_image_by_bilinear(tiny_acdc: TinyACDC) -> None:
    """Output pixel i takes source pixel floor(i * in / out) (PyTorch's nearest); intensities are
    bilinear with half-pixel centres: on a linear ramp that is the ramp sampled at (i + 0.5) * in / out - 0.5."""
    import h5py

    h, w = 24, 20
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    label = ((rows * 7 + cols * 3) % 4).astype(np.uint8)[None].repeat(2, 0)
    image = (0.01 * rows + 0.002 * cols).astype(np.float32)[None].repeat(2, 0)
    stem = tiny_acdc.files[4][0]
    tiny_acdc.volume_path(stem).unlink()
    with h5py.File(tiny_acdc.volume_path(stem), "w") as f:
        f["image"], f["label"] = image, label
    data = load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": 1, "train.image_size": 16}))
    i = data.labeled.names.index(f"{stem}_slice1")
    src_r, src_c = np.floor(np.arange(16) * h / 16).astype(int), np.floor(np.arange(16) * w / 16).astype(int)
    np.testing.assert_array_equal(data.labeled.labels[i].numpy(), label[1][np.ix_(src_r, src_c)])
    centre_r = np.clip((np.arange(16) + 0.5) * h / 16 - 0.5, 0, h - 1)
    centre_c = np.clip((np.arange(16) + 0.5) * w / 16 - 0.5, 0, w - 1)
    expected = 0.01 * centre_r[:, None] + 0.002 * centre_c[None, :]
    np.testing.assert_allclose(data.labeled.images[i, 0].numpy(), expected, atol=1e-6)


def test_training_data_needs_labelled_slices_and_validation_cases(tiny_acdc: TinyACDC, monkeypatch) -> None:
    from vqseg.registry import DATASETS

    reader = DATASETS["acdc"]
    real = reader.load(acdc_cfg(tiny_acdc.root))

    def loading(data):
        monkeypatch.setitem(DATASETS._entries, "acdc", replace(reader, load=lambda cfg: data))

    loading(replace(real, labeled=real.unlabeled.__class__(real.labeled.images[:0], real.labeled.labels[:0], [])))
    with pytest.raises(DataError, match="labelled training set is empty"):
        load_training_data(acdc_cfg(tiny_acdc.root))
    loading(replace(real, val=[]))
    with pytest.raises(DataError, match="validation split is empty"):
        load_training_data(acdc_cfg(tiny_acdc.root))


# ---------------------------------------------------------------------------------------------
# Real ACDC: the SSL4MIS protocol (skipped without the data; reads file names, not pixels)
# ---------------------------------------------------------------------------------------------


def phases(names) -> list[int]:
    """The patient of each volume name, sorted (each patient once per phase)."""
    return sorted(int(n[len("patient"):len("patient") + 3]) for n in names)


def test_real_acdc_follows_the_ssl4mis_lists(acdc_root: Path, monkeypatch) -> None:
    """METHODS.md section 3: 70 / 10 / 20 patients; "3 cases" = 99, 38, 50; "7 cases" adds 100, 58, 21, 49;
    every volume of SSL4MIS's val.list / test.list is scored, both phases of each patient (the lists and
    the files may number the frames differently)."""
    from vqseg.data import acdc
    from vqseg.data.volumes import Volume

    monkeypatch.setattr(acdc, "read_h5_volume", lambda path, num_classes=4: Volume(
        path.stem, np.zeros((1, 1, 4, 4), np.float32), np.zeros((1, 4, 4), np.uint8)))
    lists = {name: (acdc_root / "ssl4mis-lists" / f"{name}.list").read_text().split() for name in ("train", "val", "test")}
    cfg3 = tiny_config(**{"data.dataset": "acdc", "data.root": str(acdc_root), "data.labeled_cases": 3})
    cfg7 = tiny_config(**{"data.dataset": "acdc", "data.root": str(acdc_root), "data.labeled_cases": 7})
    three, seven = load_training_data(cfg3), load_training_data(cfg7)
    assert patients_of(three.labeled.names) == {99, 38, 50}
    assert patients_of(seven.labeled.names) == {99, 38, 50, 100, 58, 21, 49}
    for data in (three, seven):
        assert len(data.labeled.names) + len(data.unlabeled.names) == 140  # one slice per stub volume
        assert phases(data.labeled.names + data.unlabeled.names) == phases(lists["train"])
        assert phases(v.name for v in data.val) == phases(lists["val"])
    assert phases(v.name for v in load_split(cfg3, "test")) == phases(lists["test"])
    assert phases(v.name for v in load_split(cfg3, "val")) == phases(lists["val"])
    assert len(patients_of(lists["train"])) == 70 and len(lists["val"]) == 20 and len(lists["test"]) == 40


def test_a_labelled_list_naming_a_patient_twice_is_rejected(tiny_acdc: TinyACDC) -> None:
    with pytest.raises(DataError, match=re.escape("data.labeled_cases lists a patient twice: [4, 2, 4]")):
        load_training_data(acdc_cfg(tiny_acdc.root, **{"data.labeled_cases": [4, 2, 4]}))
