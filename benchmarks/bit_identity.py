"""Does a change of the code change any number? Short runs of every method and backbone, compared
between two source trees on one machine (results are bit-exact per machine, not across machines).

``run`` trains and evaluates a fixed set of tiny runs (phantom data, 6 iterations, one thread) with
the source tree on ``PYTHONPATH``; ``compare`` checks two such folders line by line: every logged
loss of every step (``metrics.jsonl``) and every per-case test score (``eval_test.csv``).

    git worktree add ../before <commit>
    PYTHONPATH=../before/src python benchmarks/bit_identity.py run ../out_before
    PYTHONPATH=src python benchmarks/bit_identity.py run ../out_after
    python benchmarks/bit_identity.py compare ../out_before ../out_after [--rename vq3_=vq4_]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BASE = ["data.dataset=phantom", "data.phantom_labeled=6", "data.phantom_unlabeled=12", "data.phantom_val=6",
        "data.phantom_test=6", "train.image_size=32", "train.batch_size=2", "train.unlabeled_batch_size=2",
        "train.iterations=6", "train.val_every=3", "train.log_every=1", "train.device=cpu", "train.num_threads=1",
        "eval.batch_size=4"]
UNET = ["model.channels=[4, 8, 16, 32, 64]"]
METHODS = {"supervised": [], "mean_teacher": [], "unimatch": [], "bcp": ["method.pretrain_iterations=3"], "cps": [],
           "vqseg": ["method.foundation=none", "method.codebook_size=64"]}


def tiny(name: str, mode: str = "frozen") -> list[str]:
    return [f"model.name={name}", "model.tiny=true", f"model.encoder_mode={mode}", "model.decoder_features=16",
            "model.stem_channels=4"]


def runs() -> dict[str, list[str]]:
    out = {}
    for method, extra in METHODS.items():
        out[f"unet_{method}"] = UNET + [f"method.name={method}", *extra]
        out[f"lite_{method}"] = tiny("litemedsam") + [f"method.name={method}", *extra]
    out["dino_unimatch"] = tiny("dinov2") + ["method.name=unimatch"]
    out["lite_ft_vqseg"] = tiny("litemedsam", "finetune") + ["method.name=vqseg", *METHODS["vqseg"]]
    out["unet_vqseg_pfa"] = UNET + ["method.name=vqseg", "method.codebook_size=64", "method.foundation=litemedsam",
                                    "method.foundation_input=64"]
    out["lite_vqseg_remedies"] = tiny("litemedsam") + ["method.name=vqseg", *METHODS["vqseg"],
                                                       "method.class_thresholds=true", "method.u_class_balance=true",
                                                       "method.anchor_labeled=true"]
    out["lite_native"] = tiny("litemedsam") + ["method.name=supervised", "model.level_strides=[4, 8, 16, 4]",
                                               "model.dpt_strides=[4, 8, 16, 4]"]
    out["unet_pdcr_uafs"] = UNET + [
        "method.name=mean_teacher", "model.uafs_layers=[encoder.downs.1, decoder.ups.3.conv]",
        "pdcr.layers=[{name: encoder.downs.2, num_samples: 8, weight: 0.1}, "
        "{name: decoder.ups.2.conv, num_samples: 4, weight: 0.01}]",
        "pdcr.cross_layer=[encoder.downs.2, decoder.ups.0.conv]", "pdcr.unlabeled=true"]
    return out


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VQSEG_CACHE": str(out / "cache")}
    for name, sets in runs().items():
        folder = out / name
        train = [sys.executable, "-m", "vqseg.cli", "train", "--overwrite"]
        for setting in [*BASE, *sets, f"output_dir={folder}"]:
            train += ["--set", setting]
        for cmd in (train, [sys.executable, "-m", "vqseg.cli", "evaluate", str(folder), "--device", "cpu"]):
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                print(f"{name}: FAILED ({done.stderr.strip().splitlines()[-1]})", flush=True)
                break
        else:
            print(f"{name}: done", flush=True)


def compare(a: Path, b: Path, renames: list[str]) -> None:
    pairs = [r.split("=", 1) for r in renames]

    def records(path: Path) -> list[object]:
        text = path.read_text()
        for new, old in pairs:
            text = text.replace(new, old)
        return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else text.splitlines()

    for name in sorted(p.name for p in a.iterdir() if p.is_dir() and p.name != "cache"):
        differ = []
        for file in ("metrics.jsonl", "eval_test.csv"):
            if not (b / name / file).is_file():
                differ.append(f"{file} missing")
            elif records(a / name / file) != records(b / name / file):
                differ.append(f"{file} differs")
        print(f"{name}: {'identical' if not differ else '; '.join(differ)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    p = sub.add_parser("compare")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--rename", action="append", default=[], metavar="NEW=OLD",
                   help="read NEW as OLD in b's files (a logged key renamed on purpose)")
    args = parser.parse_args()
    run(args.out) if args.command == "run" else compare(args.a, args.b, args.rename)


if __name__ == "__main__":
    main()
