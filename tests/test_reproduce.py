"""`ssl-bench reproduce`: the recipes' paper values against the papers, and the comparison machinery."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml

from ssl_bench import registry
from ssl_bench import reproduce as rep
from ssl_bench.errors import UserError
from ssl_bench.reproduce import compare, needs
from ssl_bench.reproduce.recipe import Tolerance

PAPERS = Path(os.environ.get("SSL_BENCH_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
              ).parent / "papers"

# (rows, paper values) of every table as printed in the papers (a "–" is no value); counted by hand
EXPECTED_COUNTS = {
    "datus2-table1": (18, 54), "datus2-table2": (18, 36), "datus2-table3": (4, 20), "datus2-table4": (4, 12),
    "datus2-table5": (10, 20), "datus2-table6": (18, 108), "datus2-table7": (13, 39),
    "primaps-table1": (18, 64), "primaps-table2": (20, 75), "primaps-table3": (19, 55), "primaps-table4": (10, 20),
    "primaps-table5": (3, 18), "primaps-table6": (4, 24),
    "dcn-table1": (10, 10), "dcn-table2": (4, 8), "dcn-table3": (3, 3),
    "comus-table1": (3, 3), "comus-table2": (1, 22), "comus-table3": (3, 12), "comus-table4": (2, 44),
    "comus-table5": (5, 5), "comus-table7": (3, 6), "comus-table8": (3, 5),
    "semester-table1": (3, 3), "semester-table2": (4, 4), "semester-table3": (4, 4), "semester-table4": (3, 3),
    "semester-table5": (6, 6),
}

# Where each table sits in its paper's text: (first marker, marker after the table); each occurs once.
TABLE_TEXT = {
    "datus2-table1": ("COMPARATIVE ANALYSIS OF RECENT SELF-SUPERVISED TRAINING SCHEMES FOR SEMANTIC SEGMENTATION ON TRAINING SET OF SUIM", "**SUIM:** In Tables I and II"),
    "datus2-table2": ("COMPARING THE TOTAL NUMBER OF SEGMENTS", "Each valid segment of an image"),
    "datus2-table3": ("ON THE TRAINING SET OF COCO DATASET BASED ON", "### E. Evaluation of Pseudo-mask"),
    "datus2-table4": ("COMPARING THE PERFORMANCE OF DATUS<sup>2</sup>(DINO-B/8)'s", "### F. Comparative Analysis"),
    "datus2-table5": ("COMPARISON WITH STATE-OF-THE-ART UNSUPERVISED SEMANTIC SEGMENTATION METHODS ON THE VALIDATION SET", "### G. Ablation Study"),
    "datus2-table6": ("ABLATION STUDY OF THE PROPOSED METHOD, I.E., DATUS<sup>2</sup> WITH SELF-SUPERVISED VISION TRANSFORMER-BASED AND CNN", "**Overclustering:**"),
    "datus2-table7": ("WITH A DIFFERENT NUMBER OF PSEUDO-CLUSTERS ON THE SUIM DATASET", "## V. DISCUSSION"),
    "primaps-table1": ("Table 1: **Cityscapes", "Evaluation. For inference"),
    "primaps-table2": ("Table 2: **COCO-Stuff", "state-of-the-art performance. Notably"),
    "primaps-table3": ("Table 3: **Potsdam-3", "Table 4: **Ablation"),
    "primaps-table4": ("Table 4: **Ablation", "PriMaPs pseudo-label ablations."),
    "primaps-table5": ("Table 5: **Oracle", "Figure 3: **Qualitative"),
    "primaps-table6": ("Table 6: **Comparing", "Figure 10: **Failure"),
    "dcn-table1": ("Method\tmIoU\nMoCo", "Table 1. **Unsupervised"),
    "dcn-table2": ("$k$\tmIoU\tAcc.", "Table 2.  **$k$ -NN"),
    "dcn-table3": ("Method\tmIoU\nMaskCLIP", "Table 3. **Comparison"),
    "comus-table2": ("Table 2. COMUS performance", "3.2 Unsupervised Iterative"),
    "comus-table3": ("Table 3. Unsupervised semantic segmentation before", "Table 4. Transfer"),
    "comus-table4": ("Table 4. Transfer", "4 Experiments"),
    "comus-table5": ("Table 5. Ablation", "Table 6. Comparison"),
    "comus-table7": ("Table 7. Effect", "Fig. 4. Visualization"),
    "comus-table8": ("Table 8. Over-clustering", "the number of clusters in spectral"),
    "semester-table1": ("Method\tmIoU\nDSM\t25.95", "Table 1: DSM VS ACG"),
    "semester-table2": ("Architecture\tmIoU", "Table 2: Experiments"),
    "semester-table3": ("Min Cluster Size", "Table 3: Experiments"),
    "semester-table4": ("Method\tmIoU\nKMeans\t25.56", "Table 4: Dataset-level"),
    "semester-table5": ("KMeans with L2 distance", "Table 5: OTC"),
}
SIDE_BY_SIDE = {"primaps-table4"}  # (a) and (b) share the paper's lines: row order is per half


def paper_text(recipe) -> str:
    path = PAPERS / recipe.paper["file"]
    if not path.is_file():
        pytest.skip(f"paper text {path} absent (the seed papers live in ../shared/papers)")
    return path.read_text()


def numbers(line: str) -> list[float]:
    """Every number printed in a line of a paper table (Indian/Western digit grouping removed)."""
    return [float(n.replace(",", "")) for n in re.findall(r"\d[\d,]*(?:\.\d+)?", line)
            if re.fullmatch(r"\d{1,3}(,\d{2,3})*(\.\d+)?|\d+(\.\d+)?", n)]


def in_order(wanted: list[float], have: list[float]) -> bool:
    it = iter(have)
    return all(any(abs(w - h) < 1e-9 for h in it) for w in wanted)


def row_values(recipe, row: str) -> list[float]:
    return [c.value for c in recipe.cells if c.row == row]


def value(recipe, row: str, column: str) -> float:
    return next(c.value for c in recipe.cells if c.row == row and c.column == column)


# ---- the recipes against the papers ---------------------------------------------------------------------

def test_every_listed_table_has_a_recipe_with_the_papers_counts_and_ranges():
    names = set(rep.recipe_paths())
    assert set(EXPECTED_COUNTS) <= names, f"missing recipes: {sorted(set(EXPECTED_COUNTS) - names)}"
    for name in sorted(names):
        recipe = rep.load(name)
        assert (len(recipe.rows), len(recipe.cells)) == EXPECTED_COUNTS[name], name
        assert recipe.paper["file"] and recipe.paper["table"] and recipe.paper["document"], name
        for cell in recipe.cells:
            where = f"{name} / {cell.row} / {cell.column}"
            if cell.measure.metric.startswith(("stats.segments.total", "classes_")):
                assert cell.value >= 0 and float(cell.value).is_integer(), where  # counts
            else:
                assert 0 <= cell.value <= 100, where  # percentages
            assert cell.tolerance.amount > 0, where
            if not (cell.measure.not_in_ssl_bench or cell.measure.not_run):
                assert cell.measure.backbone and cell.measure.task and cell.measure.dataset, where


def test_recipe_values_are_the_numbers_printed_in_the_papers_tables():
    """Each row's values appear, in column order, on one line of the table's text, and rows follow the paper."""
    for name, (start, end) in TABLE_TEXT.items():
        recipe = rep.load(name)
        text = paper_text(recipe)
        assert text.count(start) == 1 and end in text, f"{name}: table markers"
        block = text[text.index(start):text.index(end, text.index(start))].splitlines()
        last = -1
        for row in recipe.rows:
            cells = [c for c in recipe.cells if c.row == row and c.source == "table"]
            if not cells:
                continue
            lines = [i for i, line in enumerate(block) if in_order([c.value for c in cells], numbers(line))]
            assert lines, f"{name}: row {row!r} values {[c.value for c in cells]} are on no line of the paper's table"
            after = [i for i in lines if i >= last]
            assert after or name in SIDE_BY_SIDE, f"{name}: row {row!r} is out of the paper's row order"
            last = (after or lines)[0]


def test_recipe_values_agree_with_the_numbers_the_papers_quote_in_their_text():
    t1, t4, t5, t6, t7 = (rep.load(f"datus2-table{i}") for i in (1, 4, 5, 6, 7))
    datus = paper_text(t1)
    for model, row, quoted in [("DINO-b/8", "DatUS^2 (DINO-B/8)", "(23.44 MIoU, 62.18 PA, 31.97 MF1)"),
                               ("DINOv2-G/14", "DatUS^2 (DINOv2-G/14)", "(21.41 MIoU, 55.40 PA, 29.30 MF1)"),
                               ("IBoT-B/16", "DatUS^2 (iBOT-B/16)", "(20.54 MIoU, 41.56 PA, 31.37 MF1)"),
                               ("Mugs-B/16", "DatUS^2 (Mugs-B/16)", "(18.22 MIoU, 43.59 PA, 27.77 MF1)"),
                               ("Unicom-L/14@336", "DatUS^2 (Uni-L/14@336)", "(08.92 MIoU, 43.81 PA, 13.15 MF1)")]:
        assert f"{model} {quoted}" in datus
        assert row_values(t1, row) == [float(n) for n in re.findall(r"\d+\.\d+", quoted)]
    assert "DINOv2-L/14 achieves high MIoU (24.90) and Mean F1-score (36.3), with the third highest pixel accuracy (49.51)" in datus
    assert row_values(t1, "DatUS^2 (DINOv2-L/14)") == [24.90, 49.51, 36.3]
    # the abstract's gains over STEGO ViT-S/8 are relative ones, from Table V
    assert "15.02% MiOU and 21.47% Pixel accuracy" in datus and "37.40 % MiOU and 31.44 %" in datus
    stego = "SUIM: STEGO (ViT-S/8)"
    for row, column, gain in [("SUIM: DatUS^2 (ViT-B/8)", "miou", 15.02), ("SUIM: DatUS^2 (ViT-B/8)", "acc", 21.47),
                              ("SUIM: DatUS^2 + over-clustering K=7 (ViT-B/8)", "miou", 37.40),
                              ("SUIM: DatUS^2 + over-clustering K=7 (ViT-B/8)", "acc", 31.44)]:
        assert round((value(t5, row, column) / value(t5, stego, column) - 1) * 100, 2) == gain
    # tables that repeat each other: VII's K = 6 is I's DINO-B/8, VI's Trans. columns are I, IV's val row is V's
    assert row_values(t7, "K=6") == row_values(t1, "DatUS^2 (DINO-B/8)")
    for row in t1.rows:
        assert [value(t6, row, c) for c in ("miou_vit", "acc_vit", "f1_vit")] == row_values(t1, row)
    assert [value(t4, "Initial masks (val)", c) for c in ("miou", "acc")] == row_values(t5, "SUIM: DatUS^2 (ViT-B/8)")

    p1, p2, p3 = (rep.load(f"primaps-table{i}") for i in (1, 2, 3))
    primaps = paper_text(p1)
    for recipe, quoted, better, base in [
            (p1, "boosts DINO ViT-S/8 by +3.6% and +19.8% in terms of mIoU and Acc", "+ PriMaPs-EM (DINO ViT-S/8)",
             "Baseline (DINO ViT-S/8)"),
            (p2, "leads to +14.0% and +19.1% improvement over the baseline in terms of mIoU and Acc for DINO ViT-B/8",
             "+ STEGO + PriMaPs-EM (DINO ViT-B/8)", "Baseline (DINO ViT-B/8)"),
            (p3, "+17.6% and +14.4% in terms of mIoU and Acc, respectively, for DINO ViT-B/8",
             "+ PriMaPs-EM (DINO ViT-B/8)", "Baseline (DINO ViT-B/8)")]:
        assert quoted in primaps
        miou, acc = (float(n) for n in re.findall(r"\+(\d+\.\d)%", quoted))
        assert round(value(recipe, better, "miou") - value(recipe, base, "miou"), 1) == miou
        assert round(value(recipe, better, "acc") - value(recipe, base, "acc"), 1) == acc

    c1, c3, c5, c7 = (rep.load(f"comus-table{i}") for i in (1, 3, 5, 7))
    comus = paper_text(c1)
    assert "increased the performance from 41.8% IoU to 45.2% IoU" in comus
    assert "further improves the quality to 47.3 mIoU" in comus
    assert [c.value for c in c1.cells] == [41.8, 45.2, 47.3] and all(c.source == "prose" for c in c1.cells)
    assert [c.value for c in c5.cells][1:] == [41.8, 44.5, 45.2, 47.3]
    assert "discovers 34 categories with more than 20% IoU, while obtaining an average IoU of 19.6" in comus
    assert (value(c3, "COMUS", "discovered"), value(c3, "COMUS", "miou")) == (34, 19.6)
    assert "discover 54 categories with more than 2% IoU. Among those categories, we obtained an average IoU of 29.4" in comus
    assert row_values(c3, "COMUS, categories with IoU > 2%") == [54, 29.4]
    assert "(up to +12.2 mIoU over MaskContrast" in comus
    assert round(value(c7, "COMUS (Iteration 2)", "unsupervised") - value(c7, "MaskContrast", "unsupervised"), 1) == 12.2
    for name in ("comus-table2", "comus-table4"):  # per-class tables: the 21 classes average to the mIoU column
        recipe = rep.load(name)
        for row in recipe.rows:
            ious = [c.value for c in recipe.cells if c.row == row and c.column.startswith("iou_")]
            assert len(ious) == 21 and abs(sum(ious) / 21 - value(recipe, row, "miou")) < 0.05

    s = {i: rep.load(f"semester-table{i}") for i in (2, 3, 4, 5)}  # the best ABC and the k-means/OTC repeats
    assert value(s[2], "Attn + MLP", "miou") == value(s[3], "min N/k^2, max N/k^0.5", "miou") == value(s[4], "ABC", "miou")
    assert value(s[4], "KMeans", "miou") == value(s[5], "KMeans with L2 distance", "miou")
    assert value(s[4], "OTC", "miou") == value(s[5], "OTC", "miou")
    ours = [c for c in rep.load("dcn-table1").cells if c.row.startswith("Ours")]
    assert len(ours[0].measure.seeds) == 10  # "we run it for 10 times and report the results by mean +- std"


def test_datus2_table1_rows_map_onto_18_registered_backbones():
    recipe = rep.load("datus2-table1")
    backbones = [next(c.measure.backbone for c in recipe.cells if c.row == row) for row in recipe.rows]
    assert len(set(backbones)) == 18 and set(backbones) <= set(registry.backbones())


# ---- reading recipes --------------------------------------------------------------------------------------

def write_recipe(path: Path, **overrides) -> Path:
    data = {"name": path.stem, "title": "test recipe", "paper": {"file": "none.txt", "document": "Test", "table": "T0"},
            "measure": {"task": "kmeans", "dataset": "synthetic", "options": {"n": 4}, "images": 4, "seeds": [0]},
            "columns": {"miou": {"header": "mIoU", "tolerance": 1.0}, "acc": {"header": "Acc", "tolerance": 1.0}},
            "rows": [{"label": "reference", "backbone": "reference", "paper": {"miou": 50.0, "acc": 60.0}}]}
    data.update(overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_measure_is_refined_by_row_then_column_then_the_rows_column(tmp_path):
    recipe = rep.load(write_recipe(
        tmp_path / "layers.yaml",
        measure={"task": "primaps-em", "params": {"fit_split": "train", "epochs": 5}, "dataset": "synthetic",
                 "protocol": {"resize": 224}},
        columns={"miou": {"header": "mIoU", "tolerance": 2},
                 "sup": {"header": "Sup", "metric": "miou", "tolerance": "5%", "task": "primaps-linear-probe",
                         "params": {"fit_split": "train"}}},
        rows=[{"label": "base", "backbone": "reference", "task": "primaps-baseline", "params": {"baseline_epochs": 5},
               "protocol": {"crop": "none"}, "paper": {"miou": 10, "sup": 20}},
              {"label": "head", "backbone": "reference", "task": "stego", "columns": {"sup": {"task": "stego",
               "stream": "linear"}}, "paper": {"miou": 11, "sup": 21}}]))
    cells = {(c.row, c.column): c.measure for c in recipe.cells}
    assert cells["base", "miou"].task == "primaps-baseline"
    assert dict(cells["base", "miou"].params) == {"baseline_epochs": 5}  # another task: the recipe's params dropped
    assert dict(cells["base", "miou"].protocol) == {"resize": 224, "crop": "none"}  # mappings merge
    assert cells["base", "sup"].task == "primaps-linear-probe"  # the column's meaning wins over the row's task
    assert dict(cells["base", "sup"].params) == {"fit_split": "train"}  # another task: the earlier params dropped
    assert (cells["head", "sup"].task, cells["head", "sup"].stream, cells["head", "sup"].params) == ("stego", "linear", ())
    assert next(c for c in recipe.cells if c.column == "sup").tolerance == Tolerance(5.0, relative=True)


@pytest.mark.parametrize("change, message", [
    ({"rows": [{"label": "a", "backbone": "reference", "paper": {"miou": 1}}, {"label": "a", "paper": {"miou": 2}}]},
     "given twice"),
    ({"columns": {"miou": {"header": "mIoU"}, "acc": {"tolerance": 1}}}, "has no tolerance"),
    ({"columns": {"miou": {"tolerance": 1, "metric": "iou_of_bike"}, "acc": {"tolerance": 1}}}, "unknown metric"),
    ({"rows": [{"label": "a", "backbone": "reference", "paper": {"mIoU": 1}}]}, "unknown column"),
    ({"rows": [{"label": "a", "paper": {"miou": 1}}]}, "no backbone"),
    ({"measure": {"task": "kmeans", "dataset": "synthetic", "view": "pixels"}}, "view 'pixels'"),
    ({"extra": 1}, "unknown key(s) extra"),
])
def test_a_bad_recipe_is_one_line_naming_the_problem(tmp_path, change, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        rep.load(write_recipe(tmp_path / "bad.yaml", **change))
    assert "\n" not in str(err.value) and " -- " in str(err.value)
    with pytest.raises(UserError, match="unknown recipe 'datus2-tabel1' -- did you mean datus2-table1"):
        rep.load("datus2-tabel1")


def test_what_is_not_built_yet_is_one_line_per_cell_not_a_failure(tmp_path):
    recipe = rep.load(write_recipe(tmp_path / "future.yaml", rows=[
        {"label": "future task", "backbone": "reference", "task": "future-task", "paper": {"miou": 1}},
        {"label": "head", "backbone": "reference", "task": "primaps-em", "params": {"future_parameter": "x"},
         "paper": {"miou": 1}},
        {"label": "IIC", "not_in_ssl_bench": True, "paper": {"miou": 1}},
        {"label": "coco", "backbone": "reference", "dataset": "coco81", "paper": {"miou": 1}},
        {"label": "future protocol", "backbone": "reference", "protocol": {"matching_cost": "iou"},
         "paper": {"miou": 1}},
        {"label": "implied protocol", "backbone": "reference", "protocol": {"overclustering": "majority"},
         "paper": {"miou": 1}}]))
    setup = rep.setup(recipe)
    why = {c.row: setup.not_run(c.measure) for c in recipe.cells}
    assert why["future task"] == "not run: task 'future-task' is not registered yet"
    assert why["head"] == "not run: parameter future_parameter of task 'primaps-em' is not registered yet"
    assert why["IIC"] == "not run: method not in ssl-bench"
    assert why["coco"] == "not run: dataset 'coco81' has no reader in ssl-bench"
    assert why["future protocol"] is None and why["implied protocol"] is None  # they run, under the default
    excluded = {c.row: setup.excluded(c.measure) for c in recipe.cells}
    assert excluded["future protocol"] == ["protocol differs: matching_cost=iou (no such protocol setting "
                                           "in this ssl-bench yet)"]
    assert excluded["implied protocol"] == []  # a setting ssl-bench has: run as asked
    assert all(line.count("\n") == 0 for line in rep.describe(setup))


def test_a_recipe_is_loadable_as_sweep_grids_and_expected_values(tmp_path, runner):
    """What a regression suite reads: grid mappings any sweep accepts, each paper cell pointing at its grid."""
    from ssl_bench.sweep import grid_from_mapping, make_plan

    path = write_recipe(tmp_path / "suite.yaml", rows=[
        {"label": "reference", "backbone": "reference", "paper": {"miou": 50.0, "acc": 60.0}},
        {"label": "reference K=2C", "backbone": "reference", "k": "2C", "paper": {"miou": 55.0}},
        {"label": "not built", "backbone": "reference", "task": "future-task", "paper": {"miou": 1.0}}])
    grids, expected = rep.suite(str(path))
    assert [g["k"] for g in grids] == [["C"], ["2C"]]  # the task that is not registered has no grid
    assert [(i, c.row, c.column, c.value) for i, c in expected] == [
        (0, "reference", "miou", 50.0), (0, "reference", "acc", 60.0), (1, "reference K=2C", "miou", 55.0)]
    plan = make_plan([grid_from_mapping(g) for g in grids], runner)
    assert len(plan.todo) == 2 and len(plan.extractions) == 1  # two cells, one shared extraction


# ---- reading our numbers back ---------------------------------------------------------------------------

def stored(miou=40.0, labelled_miou=50.0, random=False, ious=(80.0, 30.0, 10.0, None, 0.0), split="val"):
    metrics = {"miou": miou, "acc": 70.0, "f1": 45.0, "per_class_iou": list(ious), "matching": "hungarian",
               "labelled": {"miou": labelled_miou, "acc": 75.0, "f1": 50.0}}
    return {"config_hash": "x", "dataset": "synthetic", "split": split, "random_weights": random,
            "config": {"protocol": {"resize": 320, "crop": "center"}},
            "metrics": {f"final@{split}": metrics, "initial@train": {**metrics, "miou": 33.0}},
            "stats": {"segments": {"total": 1200, "valid_percent": 25.0}}}


def test_metrics_are_read_from_the_stream_view_and_statistics_a_cell_names():
    r = stored()
    assert compare.metric_value(r, "miou", "final", "headline") == (40.0, None)
    assert compare.metric_value(r, "miou", "final", "labelled") == (50.0, None)
    assert compare.metric_value(r, "miou", "initial@train", "headline") == (33.0, None)
    assert compare.metric_value(r, "stats.segments.total", "final", "headline") == (1200.0, None)
    from ssl_bench.data import DATASETS

    first = DATASETS["synthetic"].class_names[1]  # per-class IoU by the dataset's class names
    assert compare.metric_value(r, f"iou[{first}]", "final", "headline") == (30.0, None)
    assert compare.metric_value(r, "classes_iou>=10", "final", "headline") == (3.0, None)
    assert compare.metric_value(r, "classes_iou>0", "final", "headline") == (3.0, None)
    assert compare.metric_value(r, "miou_of_classes_iou>=30", "final", "headline") == (55.0, None)
    assert compare.metric_value(r, "stats.segments.per_image", "final", "headline")[1] == \
        "the run stored no stats.segments.per_image"
    assert compare.metric_value(r, "miou", "denoised", "headline")[1] == "the run stored no stream denoised@val"


def cell(value=40.0, tolerance=1.0, metric="miou"):
    from ssl_bench.reproduce.recipe import Measure, PaperCell

    return PaperCell("row", metric, "mIoU", value, Tolerance(tolerance), Measure(metric=metric))


def test_a_cell_is_within_or_outside_its_tolerance_and_only_results_are_compared():
    seeds = [stored(miou=40.0), stored(miou=42.0)]  # mean 41
    assert compare.outcome(cell(40.0, 1.0), compare.Observation(seeds)).status == compare.WITHIN
    assert compare.outcome(cell(42.0, 1.0), compare.Observation(seeds)).status == compare.WITHIN
    assert compare.outcome(cell(39.9, 1.0), compare.Observation(seeds)).status == compare.OUTSIDE
    assert compare.outcome(cell(44.0, 5.0), compare.Observation(seeds)).status == compare.WITHIN
    relative = cell(45.0)
    relative = type(relative)(**{**relative.__dict__, "tolerance": Tolerance(10, relative=True)})
    assert compare.outcome(relative, compare.Observation(seeds)).status == compare.WITHIN  # 10% of 45 = 4.5
    random = compare.outcome(cell(0.0), compare.Observation([stored(random=True)]))
    assert (random.status, random.random) == ("not compared: random weights", True)
    subset = compare.outcome(cell(0.0), compare.Observation(seeds, excluded=["subset (8 of 1525 images)"]))
    assert subset.status == "not compared: subset (8 of 1525 images)"
    missing = compare.outcome(cell(0.0), compare.Observation([], missing_seeds=2))
    assert missing.status == "not measured: no stored run (2 seed(s) failed or not run)"
    outcomes = [compare.outcome(cell(41.0), compare.Observation(seeds)), random, subset, missing,
                compare.outcome(cell(0.0), compare.Observation(seeds))]
    assert compare.verdict(outcomes) == (1, 1, 3)


# ---- end to end: a recipe on the reference backbone, its "paper values" set here --------------------------

def invoke(*args):
    from typer.testing import CliRunner

    from ssl_bench.cli import app

    return CliRunner().invoke(app, ["reproduce", *map(str, args)])


TOY = {"task": "kmeans", "dataset": "synthetic", "options": {"n": 4}, "images": 4, "seeds": [0, 1]}


def test_reproduce_holds_a_reference_backbone_recipe_to_the_tolerances_the_test_sets(tmp_path):
    """The verdict and exit status on real runs (k-means on the non-learned reference backbone): the first call
    computes, later calls with other paper values only read the store."""
    common = ["--store", tmp_path / "results.sqlite", "--cache", tmp_path / "cache", "--out-dir", tmp_path / "out"]
    rows = [{"label": "reference", "backbone": "reference", "paper": {"miou": 0.0, "acc": 0.0}},
            {"label": "IIC", "not_in_ssl_bench": True, "paper": {"miou": 6.7}}]
    path = write_recipe(tmp_path / "toy.yaml", rows=rows, measure=TOY)
    first = invoke(path, *common)
    assert first.exit_code == 1, first.output  # ours is far from the paper values 0.0
    from ssl_bench.store import ResultStore

    records = ResultStore(tmp_path / "results.sqlite").query()
    assert sorted(r["seed"] for r in records) == [0, 1]  # one cell per seed, through the sweep machinery
    ours = {m: sum(r[m] for r in records) / 2 for m in ("miou", "acc")}

    rows[0]["paper"] = {"miou": round(ours["miou"] + 0.4, 2), "acc": round(ours["acc"] - 0.4, 2)}  # within 1.0
    inside = invoke(write_recipe(path, rows=rows, measure=TOY), *common)
    assert inside.exit_code == 0, inside.output
    assert "cells: 2 in the grid, 2 already stored, 0 to compute" in inside.output  # resumed: nothing recomputed
    assert "Verdict: 2 cells compared, all within tolerance (2 within); 1 not compared." in inside.output
    assert "not run: method not in ssl-bench" in inside.output
    line = next(line for line in inside.output.splitlines() if line.startswith("| reference | mIoU |"))
    assert f"| {rows[0]['paper']['miou']:.2f} |" in line and "| yes |" in line and "-0.40 |" in line
    for ext in ("md", "tex", "csv"):
        assert (tmp_path / "out" / f"toy.{ext}").is_file()

    rows[0]["paper"]["miou"] = round(ours["miou"] + 1.5, 2)  # outside the 1.0 tolerance
    outside = invoke(write_recipe(path, rows=rows, measure=TOY), "-f", "csv", *common)
    assert outside.exit_code == 1
    assert re.search(r"^reference,mIoU,.*,NO,", outside.output, re.MULTILINE)
    assert "Verdict: 2 cells compared, 1 OUTSIDE tolerance (1 within); 1 not compared." in outside.output


@pytest.mark.slow
def test_random_weights_and_subsets_are_run_but_never_compared(tmp_path):
    common = ["--store", tmp_path / "results.sqlite", "--cache", tmp_path / "cache", "--out-dir", tmp_path / "out"]
    rows = [{"label": "random ViT", "backbone": "dino-vits16", "paper": {"miou": 0.0, "acc": 0.0}},
            {"label": "reference", "backbone": "reference", "paper": {"miou": 0.0, "acc": 0.0}}]
    path = write_recipe(tmp_path / "toy.yaml", rows=rows, measure=TOY)
    smoke = invoke(path, "--weights", "random", "--only", "random", *common)
    assert smoke.exit_code == 0, smoke.output  # far from the paper, but a smoke run is never out of tolerance
    assert "| random ViT† | mIoU | 0.0 |" in smoke.output and "not compared: random weights" in smoke.output
    assert "reference" not in smoke.output.split("**toy")[1]  # --only: that row alone
    assert "random_weights" in (tmp_path / "out" / "toy.csv").read_text()
    limited = invoke(path, "--limit", "2", "--only", "reference", *common)
    assert limited.exit_code == 0, limited.output
    assert "not compared: subset (2 of the paper's 4 images)" in limited.output


def test_a_recipe_without_its_weights_refuses_in_one_line_naming_the_files(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.delenv("SSL_BENCH_DATA", raising=False)
    plan = invoke("datus2-table1", "--plan", "--store", tmp_path / "results.sqlite")
    assert plan.exit_code == 0, plan.output
    files = [w.file for w in needs.weights(rep.load("datus2-table1"))]
    assert len(files) == 18
    for name in files:
        assert re.search(rf"{re.escape(name)}\s+MISSING -- download: https://", plan.output), name
    assert re.search(r"suim:train \(folder 'suim'\): MISSING", plan.output)
    run = invoke("datus2-table1", "--store", tmp_path / "results.sqlite")
    assert isinstance(run.exception, UserError)  # main() prints it as one line and exits 2
    error = str(run.exception)
    assert error.startswith("recipe datus2-table1 needs 18 weight file(s) not found:") and "\n" not in error
    assert all(name in error for name in files) and "suim:train" in error


def test_the_plan_lists_the_weights_a_task_and_its_stages_declare(tmp_path):
    # COMUS reads two files besides its backbone: the de-noiser's encoder (its preset's DINO ResNet-50) and,
    # with the BASNet saliency stage, the released BASNet weights, unless the run names its own file
    from ssl_bench.reproduce.recipe import Measure
    from ssl_bench.stages.segmenters.basnet import WEIGHTS_FILE

    names = {w.backbone: w.file for w in needs.weights(rep.load("comus-table1"))}
    assert names["dino-vits8"] and names["dino-resnet50-os8"] == "dino_resnet50_pretrain.pth"
    measure = Measure(backbone="dino-vits8", task="comus", params=(("segmenter", "saliency-basnet"),),
                      dataset="voc2012")
    assert [getattr(w, "file", w) for w in needs.declared_weights(measure)] == ["dino-resnet50-os8", WEIGHTS_FILE]
    own = tmp_path / "basnet.pth"
    mine = Measure(backbone="dino-vits8", task="comus", dataset="voc2012",
                   params=(("denoise", False), ("segmenter", "saliency-basnet"), ("segmenter.weights", str(own))))
    assert needs.declared_weights(mine) == []


def test_a_refusal_names_only_the_fixes_that_apply(tmp_path, monkeypatch):
    monkeypatch.setenv("SSL_BENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("SSL_BENCH_SHARED_DATA", str(tmp_path / "nowhere"))
    monkeypatch.delenv("SSL_BENCH_DATA", raising=False)
    smoke = rep.cannot_run(rep.setup(rep.load("datus2-table4"), weights_choice="random"))
    assert "data not found: suim" in smoke and "--weights random" not in smoke  # it has random weights already
    full = rep.cannot_run(rep.setup(rep.load("datus2-table4")))
    assert "weight file(s) not found" in full and "; without the weights, --weights random makes a smoke run" in full
    plan = "\n".join(rep.describe(rep.setup(rep.load("datus2-table4"), weights_choice="random", limit=8)))
    assert "MISSING -- download" not in plan and "weights: random (--weights random)" in plan
    assert "work: 1 backbone(s), 8 image passes" in plan  # the limit, not the paper's 110 images
