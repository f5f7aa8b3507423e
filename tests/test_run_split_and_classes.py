"""What a run is scored on: the split pinned at its start (``split.json``), another dataset's classes
matched by name, distances in the stored files' axis order. Each of these once gave a wrong number
without a word: a test set overlapping the training data after ``prepare --force``, two classes
swapped across datasets, spacing applied to the wrong axes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import TinyACDC, _Threads, tiny_config
from own_data_builders import own_config, write_image_folder, write_nnunet

from vqseg.benchmark import run_suite
from vqseg.cli import main
from vqseg.data.prepare import SPLIT_FILE, open_prepared, prepare
from vqseg.engine.trainer import train
from vqseg.run import SPLIT_NAME

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture
def folder_run(tmp_path: Path) -> tuple[Path, Path]:
    """A prepared image folder and a 2-step run on it (validation at step 2: last.pt and best.pt)."""
    root = write_image_folder(tmp_path / "data", count=10, unlabeled=2, shape=(20, 18))
    prepare(root, labeled="2", val="2", test="2", seed=0)
    run = train(own_config(root, tmp_path / "run", **{"method.name": "supervised"}))
    return root, run


# ---------------------------------------------------------------------------------------------
# The split a run was trained with is pinned in its folder
# ---------------------------------------------------------------------------------------------


def test_a_run_pins_its_split_at_the_start(folder_run):
    root, run = folder_run
    pinned = json.loads((run / SPLIT_NAME).read_text())
    prepared = open_prepared(root).splits
    assert pinned["dataset"] == "prepared" and len(pinned["sha256"]) == 64
    for key in ("labeled", "unlabeled", "val", "test"):
        assert pinned[key] == prepared[key]


@pytest.mark.parametrize("change", ["prepared again with another seed", "one case added"])
def test_evaluate_and_resume_refuse_a_changed_split(folder_run, capsys, change):
    root, run = folder_run
    before = (run / "eval_test.csv").exists()
    if change == "one case added":
        extra = sorted((root / "images").iterdir())[0]
        (root / "images" / "zz-new.png").write_bytes(extra.read_bytes())
        (root / "masks" / "zz-new.png").write_bytes((root / "masks" / extra.name).read_bytes())
        prepare(root, labeled="2", val="2", test="2", seed=0, force=True)
    else:
        prepare(root, labeled="2", val="2", test="2", seed=5, force=True)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert str(run / SPLIT_NAME) in line and "changed" in line
    assert any(f"'{key}'" in line for key in ("labeled", "unlabeled", "val", "test"))
    assert (run / "eval_test.csv").exists() == before  # nothing written
    args = ["train", str(run / "config.yaml"), "--resume"]
    assert main(args) == 2
    assert "split" in one_error_line(capsys)


def test_a_run_without_a_pinned_split_still_evaluates_with_a_note(folder_run, capsys):
    _, run = folder_run
    (run / SPLIT_NAME).unlink()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0
    assert "has no split.json" in capsys.readouterr().err


def test_overwrite_pins_the_new_split(folder_run):
    root, run = folder_run
    prepare(root, labeled="2", val="2", test="2", seed=5, force=True)
    train(own_config(root, run, **{"method.name": "supervised"}), overwrite=True)
    assert json.loads((run / SPLIT_NAME).read_text())["test"] == open_prepared(root).splits["test"]


def test_a_bundled_datasets_split_is_pinned_too(tiny_acdc: TinyACDC, tmp_path, capsys):
    cfg = tiny_config(**{"data.dataset": "acdc", "data.root": str(tiny_acdc.root), "output_dir": str(tmp_path / "r")})
    with _Threads():
        run = train(cfg)
    assert json.loads((run / SPLIT_NAME).read_text())["test"] == ["patient009", "patient010"]
    tiny_acdc.write_splits(val=[7, 9], test=[8, 10])
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu"]) == 2
    line = one_error_line(capsys)
    assert "'val'" in line and "'test'" in line


def test_the_benchmark_refuses_a_run_whose_split_changed(folder_run, tmp_path, capsys):
    root, run = folder_run
    suite = {
        "name": "pinned",
        "config": str(Path(__file__).resolve().parents[1] / "configs" / "own.yaml"),
        "output_dir": str(tmp_path / "suite"),
        "cases_key": "seed",
        "labeled_cases": [0],
        "seeds": [0],
        "set": [f"{k}={json.dumps(v)}" for k, v in yaml.safe_load(yaml.safe_dump({
            "data.dataset": "prepared", "data.root": str(root), "model.channels": [4, 8, 16, 32, 64],
            "train.image_size": 32, "train.iterations": 2, "train.val_every": 2, "train.batch_size": 2,
            "train.device": "cpu", "method.name": "supervised"})).items()],
        "runs": {"sup": []},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    folder = tmp_path / "suite" / "sup" / "0cases_seed0"
    folder.parent.mkdir(parents=True)
    run.rename(folder)
    prepare(root, labeled="2", val="2", test="2", seed=5, force=True)
    with pytest.raises(Exception, match="split.json"):
        run_suite(path, dry_run=True)


# ---------------------------------------------------------------------------------------------
# Another dataset's classes are matched by name, its distances come from its own headers
# ---------------------------------------------------------------------------------------------


def _relabelled_copy(source: Path, target: Path, labels: dict[str, int], permutation: list[int] | None) -> Path:
    """The same nnU-Net cases with another dataset.json label table, label voxels renumbered by
    ``permutation`` (old value -> new value) when given."""
    import shutil

    shutil.copytree(source, target)
    (target / SPLIT_FILE).unlink(missing_ok=True)
    spec = json.loads((target / "dataset.json").read_text())
    spec["labels"] = labels
    (target / "dataset.json").write_text(json.dumps(spec))
    if permutation is not None:
        for path in (target / "labelsTr").iterdir():
            img = nib.load(path)
            data = np.asarray(img.dataobj)
            nib.save(nib.Nifti1Image(np.asarray(permutation, np.uint8)[data], img.affine), path)
    prepare(target, labeled="2", val="2", test="2", seed=0)
    return target


@pytest.fixture
def volume_run(tmp_path: Path) -> tuple[Path, Path]:
    root = write_nnunet(tmp_path / "own", count=8, unlabeled=0, shape=(20, 18, 4))
    prepare(root, labeled="2", val="2", test="2", seed=0)
    run = train(own_config(root, tmp_path / "run", **{"method.name": "supervised", "train.iterations": 6,
                                                      "train.val_every": 6}))
    assert main(["evaluate", str(run), "--device", "cpu"]) == 0  # mm from each case's header
    return root, run


def test_evaluate_on_the_runs_own_dataset_through_data_reproduces_its_scores(volume_run, tmp_path):
    root, run = volume_run
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["eval"]["spacing"] = [9.0, 9.0, 9.0]  # describes the run's own data, not another dataset
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["evaluate", str(run), "--device", "cpu", "--data", str(root)]) == 0
    assert (run / "eval_test_own.csv").read_text() == (run / "eval_test.csv").read_text()


def test_swapped_class_indices_are_matched_by_name(volume_run, tmp_path):
    root, run = volume_run
    other = _relabelled_copy(root, tmp_path / "swapped", {"background": 0, "inner": 1, "outer": 2}, [0, 2, 1])
    assert main(["evaluate", str(run), "--device", "cpu", "--data", str(other)]) == 0
    assert (run / "eval_test_swapped.csv").read_text() == (run / "eval_test.csv").read_text()


def test_other_class_names_are_refused_or_mapped(volume_run, tmp_path, capsys):
    root, run = volume_run
    other = _relabelled_copy(root, tmp_path / "renamed", {"background": 0, "Ring": 1, "Core": 2}, None)
    capsys.readouterr()
    assert main(["evaluate", str(run), "--device", "cpu", "--data", str(other)]) == 2
    line = one_error_line(capsys)
    assert "Ring, Core" in line and "outer, inner" in line and "--class-map" in line
    assert not (run / "eval_test_renamed.csv").exists()
    assert main(["evaluate", str(run), "--device", "cpu", "--data", str(other), "--class-map", "ring=OUTER,core=inner"]) == 0
    assert (run / "eval_test_renamed.csv").read_text() == (run / "eval_test.csv").read_text()
    assert main(["evaluate", str(run), "--device", "cpu", "--data", str(other), "--class-map", "ring=outer,core=outer"]) == 2
    assert "--class-map" in one_error_line(capsys)


def test_spacing_is_given_in_the_files_axis_order(volume_run, tmp_path):
    root, run = volume_run
    header = rows(run / "eval_test.csv")
    zooms = [repr(float(z)) for z in nib.load(next((root / "imagesTr").iterdir())).header.get_zooms()]
    assert main(["evaluate", str(run), "--device", "cpu", "--spacing", *zooms]) == 0  # 1.4 1.5 6, file order
    assert rows(run / "eval_test.csv") == header
    assert main(["evaluate", str(run), "--device", "cpu", "--spacing", zooms[2], zooms[0], zooms[1]]) == 0
    reordered = rows(run / "eval_test.csv")
    assert [r["dice"] for r in reordered] == [r["dice"] for r in header]
    found = [(a["hd95"], b["hd95"]) for a, b in zip(header, reordered) if a["hd95"] and float(a["hd95"]) > 0]
    assert found and any(a != b for a, b in found)  # the distances move with the axes they are given for
