"""ssl-bench report: tables, figures, panels and the HTML page.

Table tests use FABRICATED store rows (``fake_record``) with chosen numbers, so the expected marks and
means are known exactly; the panel and CLI tests use a real short run (reference backbone, synthetic).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys

import matplotlib.colors
import numpy as np
import pandas as pd
import pytest

from ssl_bench import registry, report, samples
from ssl_bench.data.protocol import Protocol
from ssl_bench.errors import UserError
from ssl_bench.report import figures
from ssl_bench.report.tables import latex_escape
from ssl_bench.runner import RunConfig
from ssl_bench.store import ResultStore

NUM_CLASSES = {"synthetic": 5, "camvid": 11, "folder": 3}


def fake_record(backbone="reference", task="kmeans", dataset="synthetic", k=None, seed=0, miou=50.0, acc=70.0,
                f1=60.0, random=False, metrics=None, stats=None, params=None, root=None, version=None, options=None,
                images=100, weights_file=None, timings=None) -> dict:
    """A FABRICATED store row (the fields reports read), for tests only; ``root``: a ``folder`` dataset there;
    ``version``: of the task (default: the registered one); ``weights_file``: a user's own checkpoint."""
    classes = NUM_CLASSES[dataset]
    k = k or classes
    split = "val"
    weights = "random:0" if random else f"{abs(hash(weights_file)):064x}"[:64] if weights_file else "none"
    config = {"backbone": backbone, "task": task, "dataset": dataset, "split": split, "k": k, "seed": seed,
              "num_classes": classes, "params": params or {}, "dataset_options": options or {},
              "random_weights": random, "weights": weights, "protocol": None, "images": images}
    if weights_file:
        config.update(weights_file=weights_file, own_weights=True)
    headline = {"miou": miou, "acc": acc, "f1": f1, "labelled_fraction": 1.0, "cluster_to_class": []}
    if root:
        config["dataset_identity"] = {"root": root}
    version = version or registry.tasks()[task].version
    if version != 1:  # as the runner stores it
        config["task_version"] = version
    ident = (f"{backbone}-{task}-{dataset}-{k}-{seed}-{random}-{sorted((params or {}).items())}-{root}-{version}-"
             f"{sorted((options or {}).items())}-{weights}")
    return {"config_hash": ident, "backbone": backbone, "weights": config["weights"], "random_weights": random,
            "task": task, "dataset": dataset, "split": split, "k": k, "seed": seed, "miou": miou, "acc": acc,
            "f1": f1, "config": config, "metrics": metrics or {f"final@{split}": headline}, "stats": stats or {},
            "timings": timings or {}, "environment": {}}


@pytest.fixture
def records():
    return [
        fake_record("reference", seed=0, miou=40.0, acc=60.0, f1=50.0),
        fake_record("reference", seed=1, miou=50.0, acc=70.0, f1=54.0),
        fake_record("dino-vits16", miou=90.0, acc=95.0, f1=91.0, random=True),  # higher, but a smoke run
        fake_record("dino-vitb16", miou=47.0, acc=80.0, f1=52.0),
        fake_record("dino-vitb16", k=10, miou=70.0, acc=85.0, f1=66.0),
        fake_record("dino-vitb16", dataset="camvid", miou=30.0, acc=75.0, f1=40.0),
    ]


def markdown_row(text: str, name: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {name}"))


def test_leaderboard_markdown_marks_random_best_and_seeds(records):
    text = report.to_markdown(report.leaderboard(records))
    ref = markdown_row(text, "reference |")
    assert "45.0 ± 7.1" in ref and "65.0 ± 7.1" in ref  # mean, sample std of (40, 50) and (60, 70)
    assert "| 2 |" in ref  # number of seeds
    dino = markdown_row(text, "dino-vitb16")
    assert "**47.0**" in dino and "**80.0**" in dino and "**52.0**" in ref.replace(" ± 2.8", "")
    assert "ViT" not in dino and "ImageNet-1k" in dino and "85.8" in dino  # family / params / data from registry
    random_row = markdown_row(text, "dino-vits16")
    assert random_row.startswith("| dino-vits16†") and "**" not in random_row  # never "best"
    assert "† random weights: smoke run, not a result." in text
    assert "70.0" not in text  # K = 10 is not in the K = C leaderboard
    assert "| 30.0 |" in dino or "**30.0**" in dino  # the CamVid column of the same row
    assert "Method" not in text  # one method: no method column


def test_leaderboard_k_selection_and_method_column(records):
    text = report.to_markdown(report.leaderboard(records, k=10))
    assert "K = 10" in text and "**70.0**" in text and "reference" not in text
    several = records + [fake_record("reference", task="primaps-em", params={"epochs": 3}, miou=55.0)]
    text = report.to_markdown(report.leaderboard(several))
    assert "| Method |" in text and "primaps-em (epochs=3)" in text
    with pytest.raises(UserError, match="--k must be 'classes'"):
        report.leaderboard(records, k="many")
    double = report.to_markdown(report.leaderboard(records, k="2C"))  # each dataset's own C: 10 on synthetic
    assert "K = 2C (2 x number of classes)" in double and "**70.0**" in double


@pytest.mark.slow
def test_names_with_markup_characters_stay_literal(tmp_path):
    """Folder names are user text: a | must not split a Markdown cell, a $ must not become a formula."""
    rows = [fake_record(dataset="folder", root=f"/data/{name}", miou=m)
            for name, m in (("p|q*b_x*", 50.0), ("m$x$", 60.0), ("m#x#", 65.0), ("bad$\\foo{$", 70.0),
                            ("site.v1", 55.0), ("site.v2", 56.0))]
    md = report.to_markdown(report.leaderboard(rows))
    header, rule = md.splitlines()[2:4]
    assert len(re.findall(r"(?<!\\)\|", header)) == len(re.findall(r"\|", rule))  # cells line up with the rule
    assert r"folder:p\|q\*b\_x\*" in md and r"folder:m\$x\$" in md
    assert r"\textbar{}" in report.to_latex(report.leaderboard(rows))
    rows += [fake_record(dataset="folder", root=r["config"]["dataset_identity"]["root"], k=6, miou=40.0)
             for r in rows]
    report.write_all(rows, tmp_path / "s.sqlite", tmp_path / "out")  # "bad$\foo{$" is not parsed
    curves = sorted(p.name for p in (tmp_path / "out" / "curves").glob("*.png"))  # files, not write calls
    assert len(curves) == 6  # "m$x$" and "m#x#" slug alike: a hash keeps them apart; "site.v1" keeps its dot
    assert "overclustering_folder_site.v1.png" in curves
    kept = samples.RunSamples([0], [np.zeros((8, 8, 3), np.uint8)], [np.zeros((8, 8), np.int16)],
                              [np.zeros((8, 8), np.int16)], np.zeros((3, 3), np.uint8), ["a", "b", "c"])
    title = report.panel_title(rows[-1], "folder:bad$\\foo{$ " + "long " * 40)  # wrapped, not parsed as maths
    assert figures.save_figure(figures.panel_figure(kept, title), tmp_path / "panel", ("png",))


def test_folders_of_the_same_name_get_their_own_columns():
    rows = [fake_record(dataset="folder", root="/a/site", miou=20.0), fake_record(dataset="folder", root="/b/site",
                                                                                 miou=80.0)]
    text = report.to_markdown(report.leaderboard(rows))
    assert "folder:site [a/site] mIoU" in text and "folder:site [b/site] mIoU" in text
    assert "20.0" in text and "80.0" in text and "50.0" not in text  # not averaged into one column


def test_seed_counts_are_short_and_numbers_in_csv(records):
    """The Seeds cell read '- / 2 / - / 2 / 1 / ...' (five lines in HTML, a string in CSV)."""
    records.append(fake_record("dino-vitb16", dataset="camvid", seed=1, miou=32.0))
    records.append(fake_record("dino-vitb16", task="kmeans", dataset="folder", root="/x/f", seed=0))
    text = report.to_markdown(report.leaderboard(records))
    assert "| 1–2 |" in markdown_row(text, "dino-vitb16")  # fewest-most over its datasets
    assert "| 2 |" in markdown_row(text, "reference |")  # ran on one dataset only: one number
    assert "Seeds a–b: the fewest and most seeds over the row's datasets" in text
    frame = pd.read_csv(io.StringIO(report.to_csv(report.leaderboard(records))))
    assert frame.Seeds.dtype.kind == "i" and frame.set_index("Backbone").Seeds.to_dict()["dino-vitb16"] == 2
    assert frame.set_index("Backbone")["camvid mIoU n"].to_dict()["dino-vitb16"] == 2  # per dataset


def test_a_users_own_checkpoint_is_labelled_by_its_file_never_as_the_registry_model():
    rows = [fake_record("dino-vits16", miou=70.0, weights_file="/home/me/ckpt/my.pth"),
            fake_record("dino-vits16", miou=60.0, weights_file="/home/me/ckpt/other.pth"),
            fake_record("dino-vitb16", miou=50.0)]
    text = report.to_markdown(report.leaderboard(rows))
    mine = markdown_row(text, "dino-vits16 [my.pth ")
    assert "own checkpoint" in mine and "ImageNet-1k" not in mine and "dino architecture" in mine
    assert "own checkpoint" in markdown_row(text, "dino-vits16 [other.pth ")  # two files: two rows, by name
    assert "ImageNet-1k" in markdown_row(text, "dino-vitb16")  # the registry's file keeps the registry's data
    assert re.search(r"dino-vits16 \[my\.pth [0-9a-f]{8}\]", mine)  # and its hash, to tell copies apart
    assert "my.pth" in report.panel_title(rows[0])


def test_subset_columns_are_hidden_by_default_and_shown_on_request():
    """Every limit= variant was its own column group (33 columns after an hour)."""
    rows = [fake_record(dataset="camvid", images=101, miou=40.0),
            fake_record(dataset="camvid", options={"limit": 12}, images=12, miou=45.0),
            fake_record(dataset="camvid", options={"limit": 25}, images=25, miou=44.0),
            fake_record(dataset="synthetic", options={"n": 6}, images=6, miou=41.0),  # no full synthetic run: largest
            fake_record(dataset="synthetic", options={"n": 4}, images=4, miou=42.0)]
    text = report.to_markdown(report.leaderboard(rows))
    header = text.splitlines()[2]
    assert "camvid mIoU" in header and "limit" not in header and "synthetic (n=6) mIoU" in header
    assert "(n=4)" not in header and "| 40.0 |" in text or "**40.0**" in text
    assert "Not shown: camvid (limit=12) (1 run), camvid (limit=25) (1 run), synthetic (n=4) (1 run): runs of " \
           "these rows on fewer images" in text
    # a backbone that ran on a subset only keeps that column: a sweep's results never vanish from the report
    smoke = report.to_markdown(report.leaderboard(rows + [fake_record("dino-vitb16", dataset="camvid",
                                                                      options={"limit": 12}, images=12)]))
    assert "camvid (limit=12) mIoU" in smoke.splitlines()[2] and "camvid (limit=25)" not in smoke.splitlines()[2]
    # ... for that backbone only: the row shown on the full split does not show its smoke run beside it
    full_row = markdown_row(smoke, "reference |")
    assert "40.0" in full_row and "45.0" not in full_row and "camvid (limit=12) (1 run)" in smoke
    long = report.to_markdown(report.leaderboard(rows + [fake_record("dino-vitb16", dataset="camvid",
                                                                     options={"limit": 12}, images=12)], layout="long"))
    assert [line.split("|")[1].strip() for line in long.splitlines() if "| camvid" in line].count("reference") == 1
    everything = report.to_markdown(report.leaderboard(rows, subsets="all", layout="wide"))
    assert "camvid (limit=12) mIoU" in everything and "synthetic (n=4) mIoU" in everything
    assert "Not shown" not in everything
    long = report.leaderboard(rows, subsets="all")  # 5 columns: one row per dataset instead
    assert sorted(row[4].text() for row in long.rows) == ["camvid", "camvid (limit=12)", "camvid (limit=25)",
                                                          "synthetic (n=4)", "synthetic (n=6)"]
    with pytest.raises(UserError, match="unknown --subsets 'some'"):
        report.leaderboard(rows, subsets="some")


def test_rows_that_predict_from_ground_truth_are_marked_and_never_best():
    """A supervised probe or an oracle beats every unsupervised row: it is an upper bound, marked, not bold."""
    rows = [fake_record("dino-vitb16", task="primaps-em", miou=30.0),
            fake_record("dino-vitb16", task="primaps-linear-probe", miou=90.0, params={"mode": "linear-probe"}),
            fake_record("dino-vitb16", task="segment-cluster", miou=80.0,
                        stats={"labelled_probe": "LABELLED: regions classified from the ground truth"})]
    text = report.to_markdown(report.leaderboard(rows))
    probe = markdown_row(text, "dino-vitb16‡ | primaps-linear-probe")
    assert "**" not in probe and "90.0" in probe
    assert "**" not in markdown_row(text, "dino-vitb16‡ | segment-cluster")  # marked by what the run stored
    assert "**30.0**" in markdown_row(text, "dino-vitb16 | primaps-em")
    assert "‡ uses ground-truth labels" in text and "among rows not marked ‡" in text
    assert r"$^\ddagger$" in report.to_latex(report.leaderboard(rows))
    assert "uses_labels" in report.to_csv(report.leaderboard(rows)).splitlines()[0]
    per_class = {"final@val": {"miou": 50.0, "acc": 70.0, "f1": 60.0, "per_class_iou": [10.0, 20.0, 30.0, 40.0, 50.0],
                               "cluster_to_class": []}}
    classes = report.build_tables([fake_record(task="primaps-em", metrics=per_class),
                                   fake_record(task="primaps-linear-probe", params={"mode": "linear-probe"},
                                               metrics={"final@val": {**per_class["final@val"], "per_class_iou":
                                                                      [90.0, 90.0, 90.0, 90.0, 90.0]}})])
    text = report.to_markdown(classes["classes_synthetic"])
    assert "**90.0**" not in text and "**10.0**" in text and "‡ uses ground-truth labels" in text  # per class too


def test_many_datasets_make_a_long_leaderboard_with_best_per_dataset():
    rows = [fake_record(b, dataset="folder", root=f"/d/set{i}", miou=m + i)
            for i in range(5) for b, m in (("reference", 40.0), ("dino-vitb16", 50.0))]
    table = report.leaderboard(rows)
    assert [c.header for c in table.columns][:7] == ["Backbone", "Family", "Params (M)", "Pre-training data",
                                                    "Dataset", "Seeds", "mIoU"]
    assert len(table.rows) == 10 and len(table.columns) == 9  # not 5 x 3 metric columns
    best = [row[4].text() for row in table.rows if row[6].best]
    assert best == [f"folder:set{i}" for i in range(5)]  # one best per dataset, not one over all rows
    assert all(row[0].text() == "dino-vitb16" for row in table.rows if row[6].best)
    assert len(report.leaderboard(rows, layout="wide").columns) == 5 + 15
    assert "of each dataset" in report.to_markdown(table)


def test_per_class_iou_and_stage_timings_tables():
    per_class = {"final@val": {"miou": 50.0, "acc": 70.0, "f1": 60.0, "per_class_iou": [10.0, 20.0, None, 40.0, 50.0],
                               "cluster_to_class": []}}
    rows = [fake_record(metrics=per_class, timings={"features": 2.0, "labels": 0.5, "task": 3.0, "evaluate": 0.5}),
            fake_record(seed=1, metrics={"final@val": {**per_class["final@val"],
                                                      "per_class_iou": [30.0, 20.0, None, 40.0, 50.0]}},
                        timings={"features": 4.0, "labels": 0.5, "task": 1.0, "evaluate": 0.5},
                        stats={"kept_seconds": {"segments-val": 8.0}})]  # e.g. read from another cell's keep
    tables = report.build_tables(rows)
    classes = tables["classes_synthetic"]
    assert [c.header for c in classes.columns] == ["Backbone", "Seeds", "calm water", "waves", "grass", "sand",
                                                  "brick", "mIoU"]
    cells = [c.text() for c in classes.rows[0]]
    assert cells[:4] == ["reference", "2", "20.0 ± 14.1", "20.0 ± 0.0"] and cells[4] == "–"  # absent class: a dash
    timing = [c.text() for c in tables["timings"].rows[0]]
    assert timing == ["reference", "kmeans", "synthetic", "5", "2", "100", "3.0", "0.5", "2.0", "0.5", "6.0", "0.060", "-",
                      "segments-val 4.0"]  # the mean over the row's runs, as the stages'
    assert "which the row's own stages do not contain" in report.to_markdown(tables["timings"])
    csv = pd.read_csv(io.StringIO(report.text_report(rows, "csv", "timings")))
    assert csv["Total (s)"].iloc[0] == pytest.approx(6.0) and csv["Runs"].dtype.kind == "i"


def test_no_bold_when_every_row_is_random():
    text = report.to_markdown(report.leaderboard([fake_record("dino-vits16", random=True)]))
    assert "**" not in text.split("\n", 2)[2].split("_")[0] and "No value is bold" in text


def test_latex_is_booktabs_with_escaped_names(records):
    records.append(fake_record("reference", task="primaps-em", params={"max_steps": 3}, miou=41.0))
    tex = report.to_latex(report.leaderboard(records))
    assert tex.count(r"\toprule") == tex.count(r"\midrule") == tex.count(r"\bottomrule") == 1
    assert tex.index(r"\toprule") < tex.index(r"\midrule") < tex.index(r"\bottomrule") < tex.index(r"\end{tabular}")
    assert r"primaps-em (max\_steps=3)" in tex and r"dino-vits16$^\dagger$" in tex and r"$^\dagger$ random" in tex
    assert r"\textbf{47.0}" in tex and r"45.0 $\pm$ 7.1" in tex
    columns = len(re.search(r"\\begin\{tabular\}\{(\w+)\}", tex).group(1))
    body = tex[tex.index(r"\midrule"):tex.index(r"\bottomrule")].splitlines()[1:]
    assert body and all(len(re.findall(r"(?<!\\)&", line)) == columns - 1 for line in body)
    assert tex.count("{") == tex.count("}")
    assert latex_escape("a_b & 50% #1 {x}") == r"a\_b \& 50\% \#1 \{x\}"


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")
def test_latex_compiles(records, tmp_path):
    tex = report.to_latex(report.leaderboard(records))
    doc = tmp_path / "t.tex"
    doc.write_text("\\documentclass{article}\\usepackage{booktabs}\\begin{document}\n" + tex + "\\end{document}\n")
    subprocess.run(["pdflatex", "-interaction=nonstopmode", doc.name], cwd=tmp_path, check=True, capture_output=True)


def test_csv_parses_with_pandas(records):
    frame = pd.read_csv(io.StringIO(report.to_csv(report.leaderboard(records))))
    ref = frame[frame.Backbone == "reference"].iloc[0]
    assert ref["synthetic mIoU"] == pytest.approx(45.0) and ref["synthetic mIoU std"] == pytest.approx(50 ** 0.5)
    assert ref["synthetic mIoU n"] == 2 and not ref["random_weights"]
    assert "camvid mIoU std" in frame and frame["camvid mIoU std"].isna().all()  # one seed: empty, not dropped
    assert pd.isna(ref["Params (M)"])  # not learned: empty, not the tables' dash
    rand = frame[frame.Backbone == "dino-vits16"].iloc[0]
    assert bool(rand["random_weights"]) and "random weights" in rand["note"]


def test_a_single_method_is_named_in_the_title():
    rows = [fake_record(task="kmeans", params={"iterations": 20}), fake_record("dino-vitb16", task="kmeans",
                                                                              params={"iterations": 20})]
    assert report.leaderboard(rows).title.startswith("Leaderboard, kmeans (iterations=20), K = C")
    assert report.leaderboard(rows + [fake_record(task="datus2")]).title.startswith("Leaderboard, K = C")  # a column


def test_results_of_an_earlier_task_version_are_kept_apart_and_labelled():
    rows = [fake_record(miou=40.0, acc=41.0, f1=42.0), fake_record(miou=60.0, acc=61.0, f1=62.0, version=1)]
    frame = pd.read_csv(io.StringIO(report.to_csv(report.leaderboard(rows))))
    old = frame[frame.Method == "kmeans [v1, not current]"]
    assert len(frame) == 2 and len(old) == 1 and old.iloc[0]["synthetic mIoU"] == 60.0  # not averaged together
    assert frame.current_task_version.tolist() == [True, False] and old.iloc[0]["note"].startswith("stored by another")
    text = report.to_markdown(report.leaderboard(rows))
    assert "**6" not in text and "**40.0**" in text  # a superseded result is never "best"
    assert "among rows of the current task versions" in text and "run or sweep again for the current one (kmeans v" in text
    only_old = report.to_markdown(report.leaderboard(rows[1:] + [fake_record("dino-vits16", random=True)]))
    assert "| **" not in only_old and "No value is bold: every row is a random-weight smoke run, from another" in only_old


def test_segment_statistics_table():
    """A FABRICATED DatUS^2-like row following the stats["segments"] schema (tables.SEGMENT_FIELDS)."""
    segments = {"images": 8, "total": 120, "valid": 90, "valid_percent": 75.0, "per_image": 15.0,
                "valid_per_image": 11.25, "patches_per_segment": 33.5}
    rows = [fake_record("dino-vits16", task="datus2", stats={"segments": segments}),
            fake_record("dino-vits16", task="datus2", seed=1, stats={"segments": {**segments, "total": 140}}),
            fake_record("reference")]  # no segments: not in the table
    table = report.segment_table(rows)
    text = report.to_markdown(table)
    assert len(table.rows) == 1 and "reference" not in text
    assert "Valid segments (%)" in text and "75.0" in text and "± 0" not in text
    assert "130 ± 14" in text  # total segments over the two runs
    over_k = rows[:2] + [fake_record("dino-vits16", task="datus2", k=k, seed=seed, stats=r["stats"])
                         for k in (10, 15) for seed, r in enumerate(rows[:2])]  # the K cells share segments
    text = report.to_markdown(report.segment_table(over_k))
    assert "| 6 (2 distinct) |" in text and "130 ± 14" in text  # two samples, not six: the std is not shrunk
    assert report.segment_table([fake_record()]).empty


def test_streams_table_with_unlabelled_pixels():
    def scores(miou, fraction=1.0):
        m = {"miou": miou, "acc": miou + 10, "f1": miou + 5, "labelled_fraction": fraction}
        if fraction < 1:
            m["labelled"] = {"miou": miou + 20, "acc": miou + 30, "f1": miou + 25}
        return m

    metrics = {"final@val": scores(40.0), "initial@train": scores(30.0, 0.8), "denoised@val": scores(35.0)}
    table = report.streams_table([fake_record(task="datus2", metrics=metrics), fake_record()])
    text = report.to_markdown(table)
    lines = [line for line in text.splitlines() if line.startswith("| reference")]
    assert len(lines) == 3 and "final@val (headline)" in lines[0]
    initial = next(line for line in lines if "initial@train" in line)
    assert "| 80.0 |" in initial and "| 50.0 |" in initial  # labelled fraction, labelled-only mIoU
    assert "| – |" in next(line for line in lines if "denoised@val" in line)  # every pixel labelled


def test_curves_written_as_png_and_pdf(records, tmp_path):
    records += [fake_record("dino-vits16", k=8, random=True, miou=20.0),
                fake_record("reference", k=10, miou=60.0), fake_record("reference", k=10, seed=1, miou=64.0)]
    data = figures.curve_data(records)
    assert set(data) == {"synthetic"}  # CamVid has a single K: no curve
    fig = figures.overclustering_figure("synthetic", data["synthetic"])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert any("random weights" in t and "dino-vits16†" in t for t in legend)
    styles = {c.get_label(): c.lines[0].get_linestyle() for c in fig.axes[0].containers}
    assert {label: style for label, style in styles.items() if "random" in label} == {
        "dino-vits16† (random weights)": "--"} and "-" in styles.values()  # random series dashed
    assert [ax.get_ylabel() for ax in fig.axes] == ["mIoU (%)", "Pixel accuracy (%)", "Mean F1 (%)"]
    # one colour per backbone in every figure of a report (it changed from one curve file to the next)
    everything = records + [fake_record("reference", dataset="camvid", miou=35.0),
                            fake_record("reference", dataset="camvid", k=22, miou=35.0)]  # first of its figure
    colours = figures.model_colours(everything)
    curves = figures.curve_data(everything)
    seen = {}
    for column in ("synthetic", "camvid"):
        drawn = figures.overclustering_figure(column, curves[column], colours)
        for container in drawn.axes[0].containers:
            model = container.get_label().split("†")[0].split(" ")[0]
            seen.setdefault(model, set()).add(matplotlib.colors.to_hex(container.lines[0].get_color()))
    assert all(len(c) == 1 for c in seen.values()) and len(seen) == 3
    assert "synthetic" in fig._suptitle.get_text()
    written = figures.save_figure(fig, tmp_path / "curve")
    assert [p.suffix for p in written] == [".png", ".pdf"] and all(p.stat().st_size > 1000 for p in written)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    """One real short run shared by the panel, HTML and CLI tests (small protocol: 96 px)."""
    from ssl_bench.features import FeatureCache
    from ssl_bench.runner import Runner

    folder = tmp_path_factory.mktemp("real_run")
    runner = Runner(ResultStore(folder / "results.sqlite"), FeatureCache(folder / "cache"), "cpu")
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 6),),
                    protocol=Protocol(resize=96))
    return runner, runner.run(cfg).record


def test_run_keeps_matched_samples_and_panel(real_run, tmp_path):
    runner, record = real_run
    kept = samples.load(runner.store.path, record["config_hash"])
    assert kept is not None and kept.indices == [0, 2, 3, 5]  # spread over the 6 images
    assert kept.class_names[0] == "calm water" and kept.palette.shape == (5, 3)
    for label, pred in zip(kept.labels, kept.predictions):
        assert pred.shape == label.shape and pred.dtype == np.int16 and pred.max() < 5
        assert (pred == label).mean() > 0.5  # classes, not raw cluster ids: the run's matching was applied
    fig = figures.panel_figure(kept, report.panel_title(record))
    assert len(fig.axes) == 3 * samples.SAMPLES_PER_RUN
    gt = fig.axes[1].get_images()[0].get_array()
    palette = figures.display_palette(kept.palette, 5)
    assert np.array_equal(np.asarray(gt), figures.colourise(kept.labels[0], palette))
    assert figures.save_figure(fig, tmp_path / "panel", ("png",))[0].stat().st_size > 1000


def test_figures_leave_the_callers_matplotlib_settings_alone(real_run):
    runner, _ = real_run
    script = (  # a fresh process: the module's import is part of what is checked
        "import matplotlib, sys\n"
        "before = (matplotlib.get_backend(), dict(matplotlib.rcParams))\n"
        "from ssl_bench import report\n"
        "from ssl_bench.store import ResultStore\n"
        f"store = ResultStore({str(runner.store.path)!r})\n"
        "report.html_report(store.query(), store.path)\n"  # curves and panels
        "sys.exit(0 if (matplotlib.get_backend(), dict(matplotlib.rcParams)) == before else 1)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "MPLBACKEND": "svg"})  # e.g. a notebook's own backend
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_failed_sample_write_keeps_the_result(runner, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(samples, "save", broken)
    cfg = RunConfig(backbone="reference", task="kmeans", dataset="synthetic", dataset_options=(("n", 2),),
                    protocol=Protocol(resize=64))
    with pytest.warns(UserWarning, match="is stored, but its sample predictions were not saved"):
        record = runner.run(cfg).record
    assert runner.store.get(record["config_hash"]) is not None
    assert samples.load(runner.store.path, record["config_hash"]) is None

def test_panels_of_other_patch_sizes_show_their_own_crop(runner):
    # the crop rounds down to the patch: 200 px for the /8 backbone, 192 for the /16 one; each its own view
    shapes = {}
    for backbone in ("reference", "reference-p16"):
        cfg = RunConfig(backbone=backbone, task="kmeans", dataset="synthetic", dataset_options=(("n", 2),),
                        protocol=Protocol(resize=200))
        kept = samples.load(runner.store.path, runner.run(cfg).record["config_hash"])
        assert all(image.shape[:2] == label.shape == pred.shape
                   for image, label, pred in zip(kept.images, kept.labels, kept.predictions))
        shapes[backbone] = kept.labels[0].shape
    assert shapes == {"reference": (200, 200), "reference-p16": (192, 192)}



def test_html_is_self_contained(real_run, records):
    runner, record = real_run
    page = report.html_report(runner.store.query() + records, runner.store.path)
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert refs and all(ref.startswith(("data:image/png;base64,", "data:image/jpeg;base64,")) for ref in refs)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert "Leaderboard" in page and "Over-clustering on synthetic" in page and record["config_hash"] in page
    assert "random weights: smoke run, not a result" in page
    assert "<h2>Per-class IoU</h2>" in page and "calm water" in page and "<h2>Stage timings</h2>" in page
    few = report.html_report(runner.store.query(), runner.store.path, max_panels=1)
    assert "Showing the first" not in few  # one run, one panel: nothing left out
    assert "Showing the first 0 of 1 panels" in report.html_report(runner.store.query(), runner.store.path,
                                                                   max_panels=0)


def test_cli_writes_html_and_every_output(real_run, tmp_path):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    runner, _ = real_run
    result = CliRunner().invoke(app, ["report", "--store", str(runner.store.path), "--html", str(tmp_path / "r.html"),
                                      "--out-dir", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.html").stat().st_size > 10_000
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"leaderboard.md", "leaderboard.tex", "leaderboard.csv",
                                                              "panels"}
    panels = [p.name for p in (tmp_path / "out" / "panels").iterdir()]  # readable names, unique by the run hash
    assert panels and all(p.startswith("reference_kmeans_synthetic_K5_seed0_") for p in panels)
    quiet = CliRunner().invoke(app, ["report", "--store", str(runner.store.path), "--html", str(tmp_path / "q.html")])
    assert "Leaderboard" not in quiet.output  # --html alone: the page, not the tables on stdout too
    latex = CliRunner().invoke(app, ["report", "--store", str(runner.store.path), "-f", "latex",
                                     "--html", str(tmp_path / "q.html")])
    assert r"\toprule" in latex.output  # ... unless a format is asked for
    missing = CliRunner().invoke(app, ["report", "--store", str(tmp_path / "typo.sqlite")])
    assert missing.exit_code != 0 and "no results store at" in str(missing.exception or missing.output)
    assert not (tmp_path / "typo.sqlite").exists()  # a mistyped path is not created as an empty store
    with pytest.raises(UserError, match="a CSV file holds one table"):
        report.text_report([fake_record(metrics={"final@val": {}, "initial@val": {}})], "csv", "all")
    with pytest.raises(UserError, match="unknown format"):
        report.text_report([], "docx")


@pytest.mark.parametrize("classes", [6, 8])
def test_a_panel_legend_of_long_class_names_stays_inside_the_figure(classes):
    """SUIM's legend was clipped at both edges (one row of 6 long names, wider than the figure)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from ssl_bench.data.suim import SUIM6_NAMES, SUIM6_PALETTE, SUIM8_NAMES, SUIM8_PALETTE

    names, palette = (SUIM6_NAMES, SUIM6_PALETTE) if classes == 6 else (SUIM8_NAMES, SUIM8_PALETTE)
    label = np.arange(classes * 4, dtype=np.int16).reshape(4, classes) % classes
    kept = samples.RunSamples([0], [np.zeros((4, classes, 3), np.uint8)], [label], [label], palette, names)
    fig = figures.panel_figure(kept, "title")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    box, frame = fig.legends[0].get_window_extent(canvas.get_renderer()), fig.bbox
    assert box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
    shown = [t.get_text().replace("\n", " ") for t in fig.legends[0].get_texts()]
    assert shown == list(names)  # every class, wrapped but whole


def test_display_palette_keeps_dataset_colours_and_separates_repeats():
    from ssl_bench.data.base import display_palette
    from ssl_bench.data.camvid import CamVid
    from ssl_bench.data.synthetic import SyntheticDataset

    assert np.array_equal(display_palette(CamVid.palette, 11), CamVid.palette)
    synthetic = display_palette(SyntheticDataset.palette, 5)  # two colour pairs told apart by texture only
    assert len({tuple(c) for c in synthetic}) == 5 and np.array_equal(synthetic[0], SyntheticDataset.palette[0])
    fallback = display_palette(None, 30)  # no official palette: deterministic, distinct, no black
    assert fallback.shape == (30, 3) and len({tuple(c) for c in fallback}) == 30 and fallback.sum(1).min() > 0
    assert np.array_equal(fallback, display_palette(np.zeros((3, 3)), 30))


def test_samples_kept_beside_another_crop_are_not_drawn(tmp_path):
    store = tmp_path / "results.sqlite"  # runs kept before views told patch sizes apart: 200 px prediction, 192 px view
    config = {"dataset": "synthetic", "split": "val", "ids_sha": "x", "protocol": {}}
    samples.save(store, "p16", config, 16, [0], [np.zeros((192, 192, 3), np.uint8)], [np.zeros((192, 192), np.int16)],
                 [np.zeros((192, 192), np.int16)], [0], None, ["a"])
    samples.save(store, "p8", config, 16, [0], [np.zeros((200, 200, 3), np.uint8)], [np.zeros((200, 200), np.int16)],
                 [np.zeros((200, 200), np.int16)], [0], None, ["a"])  # same key: the view of the first run
    assert samples.load(store, "p16") is not None
    with pytest.warns(UserWarning, match="another crop .* rerun with --force"):
        assert samples.load(store, "p8") is None


def test_damaged_samples_cost_only_the_panel(tmp_path):
    folder = samples.samples_dir(tmp_path / "results.sqlite")
    folder.mkdir()
    (folder / "abc.npz").write_bytes(b"not a zip file")
    with pytest.warns(UserWarning, match="unreadable"):
        assert samples.load(tmp_path / "results.sqlite", "abc") is None
