"""``vqseg benchmark SUITE``: train and test every method row x labelled count x seed, then tabulate.

A suite is a YAML file (see ``benchmarks/*.yaml``)::

    name: acdc                        # title of results.md
    config: configs/acdc.yaml         # base config; optional (defaults + overrides)
    output_dir: runs/benchmark/acdc   # replaced by ``--output``
    set: [train.iterations=30000]     # overrides for every run
    labeled_cases: [3, 7]             # values of ``cases_key`` to sweep
    cases_key: data.labeled_cases     # optional; e.g. data.phantom_labeled for phantoms
    seeds: [0, 1]
    concurrent: 1                     # runs trained at once
    order: rows                       # rows: a row's runs one after another; seeds: every row's first seed first (fewest labels first)
    device: auto                      # optional; passed to train (train.device) and evaluate
    runs:                             # method rows: label -> overrides, or a mapping
      supervised: [method.name=supervised]
      supervised_all: {set: [method.name=supervised], labeled_cases: [70]}

Relative paths (``config``, ``output_dir``) are resolved against the current working directory, so
suites are run from the repository root. Overrides are applied in the order device, ``set``, the
row's ``set``, then the runner's own ``cases_key``, ``seed`` and ``output_dir``; since changing
``method.name`` resets the method section, a row names its method before the method's parameters.

Each run (``<row>/<cases>cases_seed<seed>``) is ``vqseg train`` then ``vqseg evaluate --split test``,
each in its own subprocess so that a crash or an out-of-memory kill costs one run, not the suite, and
so that ``concurrent`` runs can share one GPU. The suite is resumable: a run with ``eval_test.json`` is
done, a finished training (``summary.json``) is only evaluated, and one with ``last.pt`` continues with
``--resume``. A run folder whose pinned split (``split.json``) differs from the data's split now is
refused before anything runs. Resuming a run folder begun with another config than the suite now asks for is an
error; a finished one is kept with a note. After the runs, ``results.csv``, ``results.md``,
``paired_tests.csv``, ``dice_vs_labeled.png`` and ``val_curves.png`` are written from whatever runs
are done.

One seed is not evidence, so each row reports mean ± std over seeds with a 95 % t interval, and
each pair of rows with the same labelled count gets a Wilcoxon signed-rank test over the test cases
(see :func:`paired_tests`), read from the per-case scores ``vqseg evaluate`` writes
(``eval_test.csv``).
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy import stats

from vqseg.config import ConfigError, load_config, to_dict
from vqseg.data import resolve_data_config, split_lists
from vqseg.data.volumes import DataError
from vqseg.io import replace_atomically
from vqseg.run import SPLIT_NAME, check_pinned_split

SUITE_KEYS = {
    "name", "config", "output_dir", "set", "labeled_cases", "cases_key", "seeds", "concurrent", "device", "runs",
    "order",
}
ROW_KEYS = {"set", "labeled_cases", "seeds"}


class SuiteError(RuntimeError):
    """Some runs of a suite failed; the others were still run and tabulated."""


@dataclass
class Suite:
    name: str
    config: Path | None
    output_dir: Path
    overrides: list[str]
    rows: dict[str, dict[str, Any]]
    cases_key: str = "data.labeled_cases"
    concurrent: int = 1
    device: str | None = None
    order: str = "rows"


@dataclass
class RunSpec:
    row: str
    cases: int
    seed: int
    run_dir: Path
    overrides: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.row}/{self.cases}cases_seed{self.seed}"


def _int_list(value: Any, key: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        raise ConfigError(f"suite key {key}: expected a non-empty list of integers, got {value!r}")
    if len(set(value)) != len(value):  # the same run folder would be planned, trained and counted twice
        raise ConfigError(f"suite key {key}: {value!r} repeats a value")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise ConfigError(f"suite key {key}: expected a list of key=value strings, got {value!r}")
    return value


def load_suite(path: Path, output: str | Path | None = None) -> Suite:
    """Parse and check a suite file; every mistake is reported before anything is trained."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"suite file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"suite file {path} is not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"suite file {path} must hold a mapping at top level")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise ConfigError(f"unknown suite key(s) {', '.join(unknown)}; valid keys: {', '.join(sorted(SUITE_KEYS))}")
    if not isinstance(raw.get("runs"), dict) or not raw["runs"]:
        raise ConfigError(f"suite file {path}: 'runs' must map row labels to overrides")

    default_cases = _int_list(raw["labeled_cases"], "labeled_cases") if raw.get("labeled_cases") is not None else None
    default_seeds = _int_list(raw.get("seeds", [0]), "seeds")
    rows: dict[str, dict[str, Any]] = {}
    for label, spec in raw["runs"].items():
        label = str(label)
        if "/" in label or label.startswith("."):
            raise ConfigError(f"suite row {label!r}: a row label becomes a folder name; no '/' or leading '.'")
        if spec is None or isinstance(spec, list):
            spec = {"set": spec}
        if not isinstance(spec, dict):
            raise ConfigError(f"suite row {label}: expected a list of overrides or a mapping, got {spec!r}")
        bad = sorted(set(spec) - ROW_KEYS)
        if bad:
            valid = ", ".join(sorted(ROW_KEYS))
            raise ConfigError(f"suite row {label}: unknown key(s) {', '.join(bad)}; valid: {valid}")
        cases = spec.get("labeled_cases", default_cases)
        if cases is None:
            raise ConfigError(f"suite row {label}: no labeled_cases, neither in the row nor at top level")
        rows[label] = {
            "set": _str_list(spec.get("set"), f"runs.{label}.set"),
            "labeled_cases": _int_list(cases, f"runs.{label}.labeled_cases"),
            "seeds": _int_list(spec.get("seeds", default_seeds), f"runs.{label}.seeds"),
        }

    concurrent = raw.get("concurrent", 1)
    if not isinstance(concurrent, int) or isinstance(concurrent, bool) or concurrent < 1:
        raise ConfigError(f"suite key concurrent: expected a positive integer, got {concurrent!r}")
    order = raw.get("order", "rows")
    if order not in ("rows", "seeds"):
        raise ConfigError(f"suite key order: expected rows or seeds, got {order!r}")
    output_dir = output if output is not None else raw.get("output_dir", Path("runs/benchmark") / path.stem)
    return Suite(
        name=str(raw.get("name", path.stem)),
        config=Path(raw["config"]) if raw.get("config") else None,
        output_dir=Path(output_dir),
        overrides=_str_list(raw.get("set"), "set"),
        rows=rows,
        cases_key=str(raw.get("cases_key", "data.labeled_cases")),
        concurrent=concurrent,
        order=order,
        device=str(raw["device"]) if raw.get("device") else None,
    )


def plan_runs(suite: Suite) -> list[RunSpec]:
    """Rows x labelled counts x seeds, in file order; each run gets its full override list.

    ``order: seeds`` runs every row's first seed before any row's second, fewest labelled cases
    first (a stable sort by the seed's position in its row, then the count), so a suite stopped
    half-way already compares every row, in the low-label regime first.
    """
    runs = []
    for row, spec in suite.rows.items():
        for cases in spec["labeled_cases"]:
            for seed in spec["seeds"]:
                run = RunSpec(row, cases, seed, suite.output_dir / row / f"{cases}cases_seed{seed}")
                run.overrides = [
                    *([f"train.device={suite.device}"] if suite.device else []),
                    *suite.overrides,
                    *spec["set"],
                    f"{suite.cases_key}={cases}",
                    f"seed={seed}",
                    f"output_dir={run.run_dir}",
                ]
                runs.append(run)
    if suite.order == "seeds":
        runs.sort(key=lambda run: (suite.rows[run.row]["seeds"].index(run.seed), run.cases))
    return runs


def run_status(run_dir: Path) -> str:
    """done: tested; trained: needs only the test; partial: resumable from last.pt; todo: from scratch."""
    if (run_dir / "eval_test.json").is_file():
        return "done"
    if (run_dir / "summary.json").is_file() and (run_dir / "best.pt").is_file():
        return "trained"
    if (run_dir / "last.pt").is_file():
        return "partial"
    return "todo"


def train_command(suite: Suite, run: RunSpec, resume: bool) -> list[str]:
    cmd = [sys.executable, "-m", "vqseg.cli", "train"]
    if suite.config is not None:
        cmd.append(str(suite.config))
    for override in run.overrides:
        cmd += ["--set", override]
    return cmd + (["--resume"] if resume else ["--overwrite"])  # no last.pt: debris of a start that died early


def evaluate_command(suite: Suite, run: RunSpec) -> list[str]:
    cmd = [sys.executable, "-m", "vqseg.cli", "evaluate", str(run.run_dir), "--split", "test"]
    return cmd + (["--device", suite.device] if suite.device else [])


def launch(cmd: list[str], log_path: Path) -> int:
    """Run one subprocess with its output appended to the run's log; the exit status is returned."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        shown = ["python" if part == sys.executable else part for part in cmd]  # no machine paths in logs
        log.write(f"\n$ {' '.join(shown)}\n")
        log.flush()
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode


def _check_configs(suite: Suite, runs: list[RunSpec]) -> None:
    """Build every run's config in-process, so a typo fails now, and compare it with existing run folders.

    Resuming a run under another config would mix two experiments in one checkpoint, so that is an
    error; a run already trained keeps its results (evaluation uses its own saved config) with a note.
    Keys only one side has are ignored, so that a field added to the code does not orphan old runs.
    """
    for run in runs:
        cfg = load_config(suite.config, run.overrides)
        planned = to_dict(cfg)
        saved_path = run.run_dir / "config.yaml"
        status = run_status(run.run_dir)
        if status == "todo" or not saved_path.is_file():
            continue
        if (run.run_dir / SPLIT_NAME).is_file():  # runs from before splits were pinned have nothing to check
            resolve_data_config(cfg)
            check_pinned_split(run.run_dir, split_lists(cfg), "benchmark")
        saved = yaml.safe_load(saved_path.read_text()) or {}
        changed = sorted(_diff(planned, saved) - {"output_dir"})
        if not changed:
            continue
        message = f"{run.run_dir} was trained with another config than the suite asks for now"
        message += f" (differs in {', '.join(changed)})"
        if status == "partial":
            raise ConfigError(f"{message}; delete the folder or choose another --output")
        print(f"note: {message}; its results are kept", file=sys.stderr)


def _diff(planned: Any, saved: Any, prefix: str = "") -> set[str]:
    """Dotted keys whose values differ, among the keys both configs have."""
    if isinstance(planned, dict) and isinstance(saved, dict):
        return {k for key in set(planned) & set(saved) for k in _diff(planned[key], saved[key], f"{prefix}{key}.")}
    return set() if planned == saved else {prefix.rstrip(".")}


def _execute(suite: Suite, run: RunSpec) -> bool:
    """Train (or resume) unless training finished, then test; False as soon as a step fails."""
    status = run_status(run.run_dir)
    log = run.run_dir / "train.log"
    if status in ("todo", "partial") and launch(train_command(suite, run, resume=status == "partial"), log):
        return False
    return launch(evaluate_command(suite, run), log) == 0


def run_suite(
    suite_path: Path, output: str | Path | None = None, dry_run: bool = False, report_only: bool = False
) -> list[dict[str, Any]]:
    """Train and test what is not done yet, then write the tables and plots; returns the per-run records.

    ``report_only``: write the tables and plots from the runs done so far (a suite stopped half-way,
    to be resumed later) and train nothing."""
    suite = load_suite(suite_path, output)
    runs = plan_runs(suite)
    if report_only:
        return write_results(suite, runs)
    _check_configs(suite, runs)
    statuses = {run.name: run_status(run.run_dir) for run in runs}
    if dry_run:
        for run in runs:
            print(f"{statuses[run.name]:8s} {run.name}  ->  {run.run_dir}")
        counts = {s: list(statuses.values()).count(s) for s in ("done", "trained", "partial", "todo")}
        print(f"{len(runs)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return []

    pending = [run for run in runs if statuses[run.name] != "done"]
    print(f"suite {suite.name}: {len(runs)} runs, {len(runs) - len(pending)} done, {len(pending)} to run, "
          f"{suite.concurrent} at a time, output {suite.output_dir}", flush=True)
    lock = threading.Lock()
    failed: list[str] = []

    def job(run: RunSpec) -> None:
        began = time.time()
        with lock:
            print(f"start {run.name} ({statuses[run.name]})", flush=True)
        ok = _execute(suite, run)
        with lock:
            if not ok:
                failed.append(run.name)
            outcome = "done" if ok else f"FAILED, see {run.run_dir / 'train.log'}"
            print(f"{outcome}: {run.name} ({time.time() - began:.0f} s)", flush=True)

    with ThreadPoolExecutor(max_workers=suite.concurrent) as pool:
        try:
            list(pool.map(job, pending))
        except KeyboardInterrupt:  # Ctrl-C also stops the running subprocesses; start no new ones
            pool.shutdown(wait=False, cancel_futures=True)
            raise

    records = write_results(suite, runs)
    if failed:
        raise SuiteError(f"{len(failed)} run(s) failed: {', '.join(sorted(failed))}; the others are tabulated")
    return records


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def val_curve(run_dir: Path) -> list[tuple[int, float]]:
    """(step, validation Dice) pairs from a run's metrics.jsonl; empty before the first validation."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["step"], r["val_dice"]) for r in records if "val_dice" in r]


def _train_time(summary: dict[str, Any]) -> float | None:
    """Training time over every step the run kept; None where it is not known.

    Summaries written before the checkpoint carried the elapsed time (no ``wall_time_this_process_s``)
    timed only the last process, so a resumed run's figure would undercount.
    """
    resumed = summary.get("trained_steps_this_process", summary.get("iterations")) != summary.get("iterations")
    if resumed and "wall_time_this_process_s" not in summary:
        return None
    return summary.get("wall_time_s")


def run_record(run: RunSpec) -> dict[str, Any]:
    """One results.csv row: test scores (paper-compatible and honest), selection and cost of a run."""
    ev = _read_json(run.run_dir / "eval_test.json")
    summary = _read_json(run.run_dir / "summary.json")
    cfg = yaml.safe_load((run.run_dir / "config.yaml").read_text()) if (run.run_dir / "config.yaml").is_file() else {}
    paper, honest = ev["paper"]["mean"], ev["honest"]["mean"]
    curve = val_curve(run.run_dir)
    if curve:
        best_step, best_val = max(curve, key=lambda c: (c[1], -c[0]))  # the trainer keeps the first best
    else:
        best_step, best_val = summary.get("best_step"), summary.get("best_val_dice")
    train = cfg.get("train", {})
    record: dict[str, Any] = {
        "row": run.row,
        "cases": run.cases,
        "seed": run.seed,
        "dice": paper["dice"],
        "jaccard": paper["jaccard"],
        "hd95": paper["hd95"],
        "asd": paper["asd"],
        "hd95_found": honest["hd95"],
        "asd_found": honest["asd"],
        "missed": honest["missed"],
        "spurious": honest.get("spurious"),
    }
    record.update({f"dice_{name}": scores["dice"] for name, scores in ev["paper"]["per_class"].items()})
    record.update(
        best_val_dice=best_val,
        best_step=best_step,
        checkpoint_step=ev.get("checkpoint_step"),
        wall_time_s=_train_time(summary),
        iterations_per_s=summary.get("iterations_per_s"),
        peak_memory_mb=summary.get("peak_memory_mb"),
        device=summary.get("device"),
        iterations=train.get("iterations"),
        input=_input_size(train),
        batch=f"{train.get('batch_size')}+{train.get('unlabeled_batch_size')}" if train else None,
        units=ev.get("units"),
    )
    return record


def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample std (ddof=1) over seeds, ignoring undefined values; std is None for one value."""
    found = [float(v) for v in values if v is not None]
    if not found:
        return None, None, 0
    return float(np.mean(found)), float(np.std(found, ddof=1)) if len(found) > 1 else None, len(found)


def t_interval(values: list[float | None], level: float = 0.95) -> tuple[float, float] | None:
    """Two-sided t interval for the mean over seeds, mean ± t_{(1+level)/2, n-1} s / sqrt(n); None below two seeds.

    Seeds are few, so the normal quantile (1.96) would claim far too much: with two seeds t is 12.7.
    """
    mean, std, n = mean_std(values)
    if mean is None or std is None:
        return None
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * std / math.sqrt(n)
    return mean - half, mean + half


def _ci_cell(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    interval = t_interval(values)
    return "—" if interval is None else f"[{interval[0] * scale:.{digits}f}, {interval[1] * scale:.{digits}f}]"


def case_dice(run_dir: Path, split: str = "test") -> dict[str, float] | None:
    """Per-case Dice, averaged over the foreground classes, from ``eval_<split>.csv``; None if there is none.

    Runs evaluated before ``vqseg evaluate`` wrote per-case scores have no such file.
    """
    path = run_dir / f"eval_{split}.csv"
    if not path.is_file():
        return None
    scores: dict[str, list[float]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = sorted({"case", "class", "dice"} - set(reader.fieldnames or []))
        if missing:
            raise DataError(f"{path}: no column(s) {', '.join(missing)} in the header")
        for line in reader:
            try:
                dice = float(line["dice"])
            except (TypeError, ValueError):
                dice = math.nan
            if not math.isfinite(dice):
                raise DataError(f"{path} line {reader.line_num}: dice {line['dice']!r} is not a finite number")
            scores.setdefault(line["case"], []).append(dice)
    return {case: float(np.mean(values)) for case, values in scores.items()}


def wilcoxon_p(a: list[float], b: list[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired scores (scipy's defaults: zero differences dropped).

    When every difference is zero there is nothing to rank (older scipy raises): p = 1, no evidence
    of a difference.
    """
    if not np.any(np.asarray(a) - np.asarray(b)):
        return 1.0
    return float(stats.wilcoxon(a, b).pvalue)


def paired_tests(runs: list[RunSpec], split: str = "test") -> list[dict[str, Any]]:
    """Wilcoxon signed-rank test for each pair of rows with the same labelled count, over the test cases.

    A row's per-case Dice is averaged over its seeds (cases every seed scored), then cases are paired
    by name across the two rows. Cases are the units: the test asks whether these trained models
    differ on this test set; seed-to-seed variation is what the t interval shows. A row with a run
    lacking per-case scores gives ``pairs``, ``mean_diff`` and ``p_value`` None (n/a).
    """
    by_row: dict[tuple[str, int], list[dict[str, float] | None]] = {}
    for run in runs:
        by_row.setdefault((run.row, run.cases), []).append(case_dice(run.run_dir, split))
    averaged: dict[tuple[str, int], dict[str, float] | None] = {}
    for key, per_seed in by_row.items():
        if any(scores is None for scores in per_seed):
            averaged[key] = None
            continue
        common = set.intersection(*(set(scores) for scores in per_seed))
        averaged[key] = {case: float(np.mean([scores[case] for scores in per_seed])) for case in common}
    tests = []
    for (row_a, cases), (row_b, cases_b) in itertools.combinations(averaged, 2):
        if cases != cases_b:
            continue
        test: dict[str, Any] = {
            "cases": cases, "row_a": row_a, "row_b": row_b, "seeds_a": len(by_row[row_a, cases]),
            "seeds_b": len(by_row[row_b, cases]), "pairs": None, "mean_diff": None, "p_value": None,
        }
        a_scores, b_scores = averaged[row_a, cases], averaged[row_b, cases]
        if a_scores is not None and b_scores is not None:
            names = sorted(set(a_scores) & set(b_scores))
            a, b = [a_scores[n] for n in names], [b_scores[n] for n in names]
            test["pairs"] = len(names)
            if names:
                test.update(mean_diff=float(np.mean(np.subtract(a, b))), p_value=wilcoxon_p(a, b))
        tests.append(test)
    return tests


def _cell(values: list[float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, std, _ = mean_std(values)
    if mean is None:
        return "n/a"
    return f"{mean * scale:.{digits}f} ± " + ("—" if std is None else f"{std * scale:.{digits}f}")


def _groups(records: list[dict[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault((record["row"], record["cases"]), []).append(record)
    return groups


def _column(group: list[dict[str, Any]], key: str) -> list[Any]:
    return [r.get(key) for r in group]


def _input_size(train: dict[str, Any]) -> str | None:
    """What a run trained on: its patch (patch mode, 2D or 3D) or the side every slice was resized to."""
    if train.get("patch_size"):
        return "patches " + " x ".join(str(s) for s in train["patch_size"])
    return None if train.get("image_size") is None else f"slices resized to {train['image_size']}"


def _distinct(records: list[dict[str, Any]], key: str) -> str:
    values = sorted({str(r[key]) for r in records if r.get(key) is not None})
    return " / ".join(values) if values else "unknown"


def _paired_markdown(tests: list[dict[str, Any]]) -> list[str]:
    """The paired-test table and how to read it."""
    if not tests:
        return []
    lines = [
        "", "## Paired tests over the test cases", "",
        "| Labelled | A | B | Seeds A / B | Cases paired | Mean Dice A − B (%) | Wilcoxon p |", "|" + "---|" * 7,
    ]
    for t in tests:
        pairs = "n/a" if t["pairs"] is None else str(t["pairs"])
        diff = "n/a" if t["mean_diff"] is None else f"{100 * t['mean_diff']:+.2f}"
        p_value = "n/a" if t["p_value"] is None else f"{t['p_value']:.3g}"
        lines.append(
            f"| {t['cases']} | {t['row_a']} | {t['row_b']} | {t['seeds_a']} / {t['seeds_b']} | {pairs} | {diff} | "
            f"{p_value} |"
        )
    lines += [
        "",
        "Each case's Dice (mean over foreground classes, from the run's `eval_test.csv`) is averaged over a row's "
        "seeds, then cases are paired by name across the two rows: two-sided Wilcoxon signed-rank test "
        "(`scipy.stats.wilcoxon`, zero differences dropped; p = 1 when every difference is zero). Cases are the "
        "units, so p says whether these trained models differ on this test set; the spread over seeds is what the "
        "95 % CI shows. p-values are not corrected for the number of pairs compared. n/a: a run of the row was "
        "evaluated before per-case scores were written (re-run `vqseg evaluate RUN_DIR --split test`).",
    ]
    return lines


def results_markdown(suite: Suite, records: list[dict[str, Any]], planned: int, tests: list[dict[str, Any]]) -> str:
    classes = [k[len("dice_"):] for k in records[0] if k.startswith("dice_")] if records else []
    header = (
        ["Method", "Labelled", "Seeds", "Dice (%)", "Dice 95 % CI", "Jaccard (%)", "HD95", "ASD"]
        + ["HD95 (found)", "ASD (found)", "Missed"]
        + [f"{c} Dice (%)" for c in classes]
        + ["Train time (min)", "it/s", "Peak mem (MB)"]
    )
    lines = [f"# Benchmark: {suite.name}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (row, cases), group in _groups(records).items():
        col = partial(_column, group)
        cells = [
            row, str(cases), str(len(group)),
            _cell(col("dice"), 100), _ci_cell(col("dice"), 100),
            _cell(col("jaccard"), 100), _cell(col("hd95")), _cell(col("asd")),
            _cell(col("hd95_found")), _cell(col("asd_found")), _cell(col("missed"), digits=1),
            *[_cell(col(f"dice_{c}"), 100) for c in classes],
            _cell([None if t is None else t / 60 for t in col("wall_time_s")], digits=1),
            _cell(col("iterations_per_s")), _cell(col("peak_memory_mb"), digits=0),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Schedule: {_distinct(records, 'iterations')} iterations, batch {_distinct(records, 'batch')} "
        f"(labelled+unlabelled), input {_distinct(records, 'input')}, device {_distinct(records, 'device')}. "
        f"{len(records)} of {planned} planned runs tested.",
        "",
        "Checkpoints are selected on validation Dice (best.pt) and scored once on the test split. "
        "Cells are mean ± std over seeds (sample std, ddof=1; — for a single seed); the 95 % CI of Dice is the "
        "t interval over seeds, mean ± t(0.975, n−1)·std/√n (— for a single seed). Dice, Jaccard, HD95 and ASD "
        "follow the SSL4MIS convention (a missed structure scores HD95 = ASD = 0), in "
        f"{_distinct(records, 'units')}; (found) columns average distances only where the structure was found, "
        "and Missed counts structures absent from the prediction, summed over classes and test volumes. "
        "Train time adds up every process of a resumed run; a run resumed from a checkpoint older than that record "
        "is left out of its row's time (n/a when none is left).",
        *_paired_markdown(tests),
    ]
    return "\n".join(lines) + "\n"


def _plot(suite: Suite, runs: list[RunSpec], records: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = _groups(records)
    for row in dict.fromkeys(r["row"] for r in records):
        points = sorted((cases, mean_std([r["dice"] for r in g])) for (name, cases), g in groups.items() if name == row)
        ax.errorbar(
            [p[0] for p in points], [100 * p[1][0] for p in points], yerr=[100 * (p[1][1] or 0.0) for p in points],
            marker="o", capsize=3, label=row,
        )
    ax.set(xscale="log", xlabel=f"labelled ({suite.cases_key})", ylabel="test Dice (%)")
    ax.set_title(f"{suite.name}: test Dice")
    ticks = sorted({r["cases"] for r in records})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(suite.output_dir / "dice_vs_labeled.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {row: f"C{i % 10}" for i, row in enumerate(dict.fromkeys(run.row for run in runs))}
    styles = ["-", "--", ":", "-."]
    all_cases = sorted({run.cases for run in runs})
    for run in runs:
        curve = val_curve(run.run_dir)
        if curve:
            ax.plot(
                [c[0] for c in curve], [c[1] for c in curve], color=colors[run.row],
                linestyle=styles[all_cases.index(run.cases) % len(styles)], marker=".", alpha=0.8, label=run.name,
            )
    ax.set(xlabel="iteration", ylabel="validation Dice", title=f"{suite.name}: validation Dice")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(suite.output_dir / "val_curves.png", dpi=120)
    plt.close(fig)


def _write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    replace_atomically(path, write)


def write_results(suite: Suite, runs: list[RunSpec]) -> list[dict[str, Any]]:
    """results.csv, paired_tests.csv, results.md and the two plots from every tested run of the plan."""
    done = [run for run in runs if run_status(run.run_dir) == "done"]
    records = [run_record(run) for run in done]
    tests = paired_tests(done)
    suite.output_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(suite.output_dir / "results.csv", records, list(dict.fromkeys(k for r in records for k in r)))
    test_fields = ["cases", "row_a", "row_b", "seeds_a", "seeds_b", "pairs", "mean_diff", "p_value"]
    _write_csv(suite.output_dir / "paired_tests.csv", tests, test_fields)
    markdown = results_markdown(suite, records, len(runs), tests)
    replace_atomically(suite.output_dir / "results.md", lambda tmp: tmp.write_text(markdown))
    _plot(suite, runs, records)
    print(f"results: {suite.output_dir / 'results.md'}, results.csv, paired_tests.csv, dice_vs_labeled.png, "
          "val_curves.png")
    return records
