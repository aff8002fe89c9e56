"""The CRF pool: the same labels as in this process, in order, with a bounded number of images in flight."""

from __future__ import annotations

import contextlib

import numpy as np

from ssl_bench.crf import CRFPool, crf_argmax, label_crf
from ssl_bench.ops import softmax


def jobs(n: int, seen: list | None = None):
    rng = np.random.default_rng(0)
    for i in range(n):
        if seen is not None:
            seen.append(i)
        image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        yield image, softmax(rng.normal(size=(4, 24, 32)).astype(np.float32), 0)


def test_the_pool_gives_the_in_process_labels_in_order_and_streams():
    reference = [crf_argmax(*job) for job in jobs(6)]
    seen = []
    stream = CRFPool(2).map(crf_argmax, jobs(6, seen))
    first = next(stream)
    assert len(seen) == 4  # two jobs per worker in flight, not the whole stream
    results = [first, *stream]
    assert len(results) == 6 and all((a == b).all() for a, b in zip(results, reference))


def test_one_worker_runs_in_this_process_and_hard_labels_go_through_too():
    labels = np.zeros((24, 32), dtype=np.int64)
    labels[:, 16:] = 1
    image = np.zeros((24, 32, 3), dtype=np.uint8)
    image[:, 16:] = 255
    [refined] = CRFPool(1).map(label_crf, [(image, labels, 2)])
    np.testing.assert_array_equal(refined, labels)  # edges and labels agree: nothing to move


def test_a_started_pool_serves_several_streams_with_the_same_workers():
    import os

    with CRFPool(2) as pool:
        workers = set(pool._executor._processes)  # started on entering the block
        first = set(pool.map(os.getpid, [()] * 6))
        labels = list(pool.map(crf_argmax, jobs(3)))
        second = set(pool.map(os.getpid, [()] * 6))
        assert len(workers) == 2 and set(pool._executor._processes) == workers  # the same two processes
    assert (first | second) <= workers and os.getpid() not in workers
    assert all((a == b).all() for a, b in zip(labels, [crf_argmax(*job) for job in jobs(3)]))
    assert pool._executor is None  # stopped with the block


def test_head_predictions_refine_in_the_pool_what_predict_refines_in_process():
    # the heads' (STEGO / HP) evaluation CRF runs in the pool: same labels and stream order as predict()
    from types import SimpleNamespace

    from ssl_bench.methods.heads import head_predictions

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(3)]

    class Model:  # two probes of random scores, as TrainedHead.crf_inputs gives them
        def crf_inputs(self, features, size, crf):
            for name, raw_name, scores in (("final", "nocrf", features[0]), ("linear", "linear-nocrf", features[1])):
                yield name, raw_name, scores.argmax(0), softmax(scores, 0) if crf else None

        def predict(self, features, size, image):
            out = {}
            for name, raw_name, raw, probs in self.crf_inputs(features, size, True):
                out[raw_name], out[name] = raw, crf_argmax(image, probs)
            return out

    feats = [rng.normal(size=(2, 3, 24, 32)).astype(np.float32) * 3 for _ in images]
    ctx = SimpleNamespace(features=lambda kind: feats, image=lambda i: images[i], label_size=lambda i: (24, 32),
                          dataset=SimpleNamespace(num_classes=3), label=lambda i: np.zeros((24, 32), np.int64),
                          split="val", timed_stream=lambda stage, items: items,
                          timed=lambda stage: contextlib.nullcontext())
    got = [(p.index, p.stream, p.labels) for p in head_predictions(Model(), ctx, True, {})]
    expected = [(i, name, labels) for i, f in enumerate(feats)
                for name, labels in Model().predict(f, (24, 32), images[i]).items()]
    assert [(i, s) for i, s, _ in got] == [(i, s) for i, s, _ in expected]
    assert all((a == b).all() for (_, _, a), (_, _, b) in zip(got, expected))


def test_kmeans_jobs_carry_patch_scores_and_refine_as_in_process():
    # k-means sends the patch-resolution cosines, upsampled in the worker (not 64x the bytes of probabilities)
    from ssl_bench.methods.kmeans import predict
    from ssl_bench.ops import upsample_scores

    rng = np.random.default_rng(2)
    stream = [(rng.uniform(-1, 1, (5, 3, 4)).astype(np.float32), (24, 32),
               rng.integers(0, 256, (24, 32, 3), dtype=np.uint8), 2.0) for _ in range(4)]
    expected = [crf_argmax(image, softmax(alpha * upsample_scores(scores, size), 0))
                for scores, size, image, alpha in stream]
    with CRFPool(2) as pool:
        got = list(pool.map(predict, stream))
    assert all((a == b).all() for a, b in zip(got, expected))


def test_a_pool_started_for_a_job_loads_its_module_in_each_worker_before_the_stream(monkeypatch):
    # k-means' job needs torch (2-3 s to import): its workers load it while the fit runs, not with the first image
    import subprocess
    import sys

    from ssl_bench import crf
    from ssl_bench.methods.kmeans import predict

    submitted = []
    monkeypatch.setattr(crf.CRFPool, "_submit", lambda self, function, *args: submitted.append((function, args)))
    crf.CRFPool(2).start(predict).close()
    crf.CRFPool(2).start().close()
    assert submitted == [(crf._warm_up, ("ssl_bench.methods.kmeans",))] * 2 + [(crf._warm_up, (None,))] * 2
    check = ("import sys; from ssl_bench.crf import _warm_up; _warm_up({!r}); "
             "print('torch' in sys.modules, 'ssl_bench.methods.kmeans' in sys.modules)")
    run = [subprocess.run([sys.executable, "-c", check.format(module)], capture_output=True, text=True, check=True)
           for module in ("ssl_bench.methods.kmeans", None)]
    assert [r.stdout.split() for r in run] == [["True", "True"], ["False", "False"]]


def test_a_workers_jobs_run_one_thread_and_this_process_keeps_its_own():
    # the workers are the parallelism: a job's torch / OpenMP threads would spin on the other workers' cores
    import torch

    threads = torch.get_num_threads()
    assert list(CRFPool(2).map(_threads, [()] * 2)) == [(1, "1", "1", {1})] * 2
    assert torch.get_num_threads() == threads and _threads()[0] == threads  # one worker: this process, untouched


def _threads() -> tuple:
    import os

    import torch
    from threadpoolctl import threadpool_info

    return (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"), os.environ.get("NUMBA_NUM_THREADS"),
            {pool["num_threads"] for pool in threadpool_info()})  # numpy's BLAS (loaded first) and OpenMP


def test_the_crf_benchmark_takes_each_way_at_its_best_round_and_compares_every_stream(monkeypatch):
    from ssl_bench import crf

    names = ["serial", "cold", "fit", "early", "warm", "ceiling", "arithmetic_one", "arithmetic_all",
             "memory_one", "memory_all"]
    rounds = iter([dict.fromkeys(names, 4.0) | {"serial": 2.0, "arithmetic_all": 3.0},   # a slow spell of the pool
                   dict.fromkeys(names, 1.0) | {"serial": 3.0, "memory_all": 0.5}])      # a slow spell of serial
    calls = []

    def one_round(function, jobs, count):
        calls.append(len(jobs))
        labels = [function(*job) for job in jobs]
        changed = [label.copy() for label in labels]
        changed[-1][0, 0] += 1  # the second round's started pool returns another label map
        return next(rounds), [labels, labels, labels, changed if len(calls) == 2 else labels]

    monkeypatch.setattr(crf, "_one_round", one_round)
    [row] = crf.benchmark(images=2, labels=(3,), rounds=2, size=32, jobs="probabilities")["rows"]
    assert calls == [2, 2] and row["rounds"] == 2
    assert row["speedup"] == 2.0 / 1.0 and row["serial_s_per_image"] == 1.0  # best serial (2) over best cold (1)
    assert row["speedup_started_before_fit"] == (1.0 + 2.0) / 1.0
    assert row["cores_now_arithmetic"] == 2 * 1.0 / 1.0 and row["cores_now_memory"] == 2 * 1.0 / 0.5
    assert row["identical_labels"] is False and row["job"] == "probabilities"


def test_the_crf_benchmark_refines_the_same_cosines_as_either_job_to_the_same_labels(monkeypatch):
    # k-means' jobs (patch scores, upsampled in the worker) against the probabilities its caller used to make
    from ssl_bench import crf

    def one_round(function, jobs, count):
        labels = [function(*job) for job in jobs]
        return dict.fromkeys(["serial", "cold", "fit", "early", "warm", "ceiling", "arithmetic_one",
                              "arithmetic_all", "memory_one", "memory_all"], 1.0), [labels]

    monkeypatch.setattr(crf, "_one_round", one_round)
    rows = crf.benchmark(images=2, labels=(3,), rounds=1, size=32)["rows"]
    assert [row["job"] for row in rows] == ["probabilities", "scores"]
    assert all(row["identical_labels"] for row in rows)
    assert all(row["caller_s_per_image"] > 0 for row in rows)


def test_the_crf_benchmark_controls_time_a_fixed_workload():
    from ssl_bench.crf import _timed_control

    assert _timed_control("arithmetic") > 0 and _timed_control("memory", 0, 2) > 0


def test_workers_start_without_rerunning_the_callers_script(tmp_path):
    # a training script calling ssl_bench.evaluate has no `if __name__ == "__main__"` guard: spawned workers
    # used to import it again (each re-ran the script, and the pool broke)
    import subprocess
    import sys

    script = tmp_path / "train.py"
    script.write_text(
        "import numpy as np\n"
        "from ssl_bench.crf import CRFPool, crf_argmax\n"
        "print('script body', flush=True)\n"
        "image = np.zeros((8, 8, 3), np.uint8)\n"
        "probs = np.full((2, 8, 8), 0.5, np.float32)\n"
        "print(len(list(CRFPool(2).map(crf_argmax, [(image, probs)] * 3))), 'labels')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.count("script body") == 1 and "3 labels" in out.stdout


def test_a_worker_that_dies_ends_the_stream_in_one_line():
    import os

    import pytest

    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match="CRF worker process died .* SSL_BENCH_CRF_WORKERS=1"):
        list(CRFPool(2).map(os._exit, [(3,)]))
    # dying between jobs: the next submit finds the pool broken (the runner was scoring the previous labels)
    import operator
    import time

    jobs = [(time.sleep, 0), (os._exit, 3)] + [(time.sleep, 0)] * 6
    with pytest.raises(UserError, match="CRF worker process died"):
        for _ in CRFPool(2).map(operator.call, jobs):
            time.sleep(0.5)


def test_a_function_of_the_callers_script_is_refused_in_one_line():
    import pytest

    from ssl_bench.errors import UserError

    def double(x):
        return 2 * x

    double.__module__ = "__main__"  # as if the caller's script defined it
    with pytest.raises(UserError, match="double is defined in the script itself -- move it into a module"):
        list(CRFPool(2).map(double, [(1,)]))


def test_crf_workers_never_outnumber_the_cores(monkeypatch):
    import ssl_bench.crf as crf

    monkeypatch.setattr(crf, "_usable_cores", lambda: 4)
    monkeypatch.setenv("SSL_BENCH_CRF_WORKERS", "999")
    assert crf.default_workers() == 4
    monkeypatch.setenv("SSL_BENCH_CRF_WORKERS", "3")
    assert crf.default_workers() == 3
