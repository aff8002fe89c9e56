"""The committed benchmarks run end to end (their figures are read from results/bench, never asserted)."""

import numpy as np
import pytest

from ssl_bench.bench import k_sweep


@pytest.mark.slow
def test_k_sweep_reports_each_k_against_one_extraction(one_thread):
    result = k_sweep(dataset="synthetic", image_counts=(2, 3), ks=("C", "2C"), repeats=1)
    assert [row["images"] for row in result["rows"]] == [2, 3]
    row = result["rows"][-1]
    assert [cell["k"] for cell in row["cells"]] == [5, 10]  # C = 5 synthetic classes
    assert row["extraction_s"] > 0 and row["labels_s"] > 0 and all(c["fit_s"] > 0 for c in row["cells"])
    assert set(row["k_cell_fraction_by_k"]) == {5, 10} and "labels" in row["cells"][0]["stages"]
    assert result["linear_fit"] is None  # two image counts: any line fits them exactly


def test_linear_fit_needs_three_image_counts():
    from ssl_bench.bench import _linear_fit

    fit = _linear_fit([25, 50, 101], [8.0, 15.5, 31.1])
    assert abs(fit["seconds_per_image"] - 0.304) < 0.01 and fit["r2"] > 0.999
    assert _linear_fit([25, 50], [8.0, 15.0]) is None


def test_benchmark_arguments_follow_the_signature():
    import pytest

    from ssl_bench.bench import _as_declared
    from ssl_bench.errors import UserError

    assert _as_declared(k_sweep, {"image_counts": "25,50", "ks": "C,2C", "repeats": 1}) == \
        {"image_counts": (25, 50), "ks": ("C", "2C"), "repeats": 1}
    assert _as_declared(k_sweep, {"image_counts": 101, "ks": ["C"]}) == {"image_counts": (101,), "ks": ("C",)}
    with pytest.raises(UserError, match=r"threads=two is not a number -- e.g. -a threads=1"):
        _as_declared(k_sweep, {"threads": "two"})
    with pytest.raises(UserError, match=r"image_counts=25,x is not a number -- e.g. -a image_counts=25,50,101"):
        _as_declared(k_sweep, {"image_counts": "25,x"})  # before any image is read, not as a dataset option
    with pytest.raises(UserError, match=r"image_counts=25,2.5 must be whole numbers"):
        _as_declared(k_sweep, {"image_counts": "25,2.5"})
    with pytest.raises(UserError, match=r"repeats=0 must be above 0"):
        _as_declared(k_sweep, {"repeats": 0})
    with pytest.raises(UserError, match="unknown argument.*imagecounts.*takes: backbone"):
        _as_declared(k_sweep, {"imagecounts": 3})


def test_benchmarks_refuse_what_they_cannot_measure_in_one_line():
    import pytest

    from ssl_bench.bench_gpu import gpu
    from ssl_bench.crf import benchmark as crf_benchmark
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match="unknown device 'bogus'"):
        gpu("bogus")  # before any check runs
    with pytest.raises(UserError, match=r"workers=\[1\] must each be at least 2"):
        crf_benchmark(workers=1)


def test_kmeans_benchmark_compares_the_bounded_fit_with_the_plain_loop_and_faiss(one_thread):
    import warnings

    from ssl_bench.data.shared import shared_data_dir
    from ssl_bench.methods.kmeans import benchmark

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = benchmark(images=2, ks=(4,), seeds=(0, 1), iterations=5, repeats=1)
    fell_back = [w for w in caught if "measuring the synthetic dataset instead" in str(w.message)]
    has_camvid = shared_data_dir() is not None and (shared_data_dir() / "camvid").is_dir()
    assert len(fell_back) == (0 if has_camvid else 1)  # said once, and only when it happens
    assert result["features"].startswith("camvid/" if has_camvid else "synthetic/")
    assert [(r["k"], r["seed"]) for r in result["rows"]] == [(4, 0), (4, 1)]
    assert result["patches"] == 2 * 400 and result["dim"] == 384  # 20 x 20 patches of dino-vits16 at 320 px
    for row in result["rows"]:
        assert row["labels_differing_from_plain"] == 0
        assert min(row["bounded_s"], row["plain_s"], row["faiss_s"]) > 0
        assert 0 < row["objective"] <= 1 and 0 < row["objective_faiss"] <= 1


def test_the_gpu_script_trains_each_head_on_both_sides_and_fails_a_difference():
    from ssl_bench import bench_gpu

    for check in (bench_gpu.stego_check, bench_gpu.hp_check, bench_gpu.acseg_check):
        row = check("cpu", views=6, steps=2, batch=3)
        assert row["passed"] and row["losses_max_relative"] == 0.0 and row["outputs_max_relative"] == 0.0, row
    outputs = np.ones((2, 3))

    def drifting(where):  # a device whose training ends 1% away from the CPU's
        return [1.0, 0.5], outputs * (1.01 if where != "cpu" else 1.0)

    row = bench_gpu._head_row("drift", drifting, 2, "other")
    assert not row["passed"] and abs(row["outputs_max_relative"] - 0.01) < 1e-9


def test_the_gpu_scripts_runs_are_registered_tasks_with_valid_parameters():
    """.ci/gpu's end-to-end runs name tasks and parameters that exist, one run per method file (a rename, or a
    method without a run there, would otherwise show only on a lent GPU machine)."""
    import re
    import shlex
    from pathlib import Path

    import ssl_bench
    from ssl_bench import registry
    from ssl_bench.cli import parse_pairs

    checkout = Path(ssl_bench.__file__).parents[1]
    script = checkout / ".ci" / "gpu"
    if not script.is_file():
        pytest.skip("an installed ssl-bench without its checkout's .ci/gpu")
    specs = shlex.split(re.search(r"^runs=\((.*?)\)$", script.read_text(), re.S | re.M).group(1))
    for spec in specs:
        task, *args = spec.split()
        params = dict(parse_pairs([value for flag, value in zip(args, args[1:]) if flag == "-p"], "--param"))
        if "--crf" in args:
            params["crf"] = True
        registry.tasks()[task].resolve_params(params)  # an unknown task: KeyError; a bad parameter: UserError
    methods = {path.stem for path in (checkout / "tasks").glob("*.yaml")} - {"segment-cluster"}  # composes the others
    assert {m for m in methods if not any(spec.split()[0].startswith(m) for spec in specs)} == set()
