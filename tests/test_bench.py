"""CI runs a small version of the accuracy benchmark so it never rots."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch

from epd_dev import ROOT
from epd_dev.comfy_harness import NODES as N

pytestmark = [pytest.mark.comfy, pytest.mark.usefixtures("comfy_nodes")]


@pytest.fixture(scope="module", autouse=True)
def key_cache(tmp_path_factory):
    """One answer key per model and noises for the whole module (``EPD_KEY_CACHE``): the quick fixture's, the tests
    that re-run its cells and the diagnosis would otherwise each run the Heun key again (about 20 s each)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EPD_KEY_CACHE", str(tmp_path_factory.mktemp("keys")))
        yield


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``python -m bench.all --quick``: the quick accuracy, carry and neural benchmarks, then the headline."""
    from bench import all as bench_all

    out = tmp_path_factory.mktemp("bench")
    assert bench_all.main(["--quick", "--out", str(out)]) == 0
    return out


def test_quick_accuracy_benchmark(quick):
    tmp_path = quick
    rows = json.loads((tmp_path / "accuracy.json").read_text())
    required = {"model", "sampler", "scheduler", "nfe", "evaluations", "rmse", "right_mode_fraction", "wrong_mode"}
    assert rows and all(required <= set(r) for r in rows)
    builtin = [r for r in rows if not r["sampler"].startswith("epd")]
    assert {r["nfe"] for r in builtin} == {5, 10}
    assert all(r["evaluations"] == r["nfe"] for r in builtin)
    epd = [r for r in rows if r["sampler"] == "epd"]
    assert epd and all(r["evaluations"] > r["nfe"] for r in epd)  # K points count once in NFE
    by_table = {(r["model"], r["scheduler"]): r for r in epd}
    estimates = [r for r in epd if r["scheduler"].endswith("+estimate")]
    assert estimates, "the tables' free final estimate is benchmarked"
    for r in estimates:  # the estimate costs no call; the denoise to 0 costs one
        table = r["scheduler"].removesuffix("+estimate")
        assert r["nfe"] == by_table[r["model"], table]["nfe"] == by_table[r["model"], table + "+final"]["nfe"] - 1
    assert all(r["answer_key_gap"] < 1e-3 for r in rows)
    assert (tmp_path / "accuracy.md").read_text().startswith("| model")
    assert "| analytic-sd15_eps | reference | 5 |" in (tmp_path / "distillation.md").read_text()
    assert all(r["sliced_wasserstein"] >= 0 for r in rows)
    assert (tmp_path / "accuracy.png").stat().st_size > 1000


def test_plot_draws_the_plugin_as_one_line_at_its_best_base():
    from bench.accuracy import PLUGIN_LINE, plot_lines

    row = {"model": "mnist-eps", "mixture": "mnist", "scheduler": "karras"}
    rows = [{**row, "sampler": "deis", "nfe": 6, "rmse": 0.09}, {**row, "sampler": "deis", "nfe": 6, "rmse": 0.07},
            {**row, "sampler": "epd_plugin_deis", "nfe": 6, "rmse": 0.05},
            {**row, "sampler": "epd_plugin_ipndm", "nfe": 6, "rmse": 0.04},
            {**row, "sampler": "epd_plugin_ipndm", "nfe": 7, "rmse": 0.03},
            {**row, "sampler": "exact", "nfe": 200, "rmse": 0.0}]  # fmt: skip
    assert plot_lines(rows) == {("mnist-eps", "mnist"): {"deis": {6: 0.07}, PLUGIN_LINE: {6: 0.04, 7: 0.03}}}


def test_plot_and_summary_compare_only_rows_on_the_same_noises():
    """EPD Plugin's records are on 8,192 noises, the field's on 1,024: drawn in one panel the plugin looked 15x worse
    than the same table under EPD Sampler, and it could be picked as the best EPD run against another noise set."""
    from bench.accuracy import PLUGIN_LINE, plot_lines, summarize

    row = {"model": "analytic-sd15_eps", "mixture": "reference", "scheduler": "karras", "wrong_mode": 0,
           "rmse_right_mode": 0.1}  # fmt: skip
    rows = [{**row, "sampler": "deis", "nfe": 8, "rmse": 0.01, "samples": 1024},
            {**row, "sampler": "euler", "nfe": 8, "rmse": 0.02, "samples": 1024},
            {**row, "sampler": "epd", "nfe": 8, "rmse": 0.0033, "samples": 1024},
            {**row, "sampler": "epd_plugin_euler", "nfe": 8, "rmse": 0.002, "samples": 8192}]  # fmt: skip
    assert PLUGIN_LINE not in plot_lines(rows)["analytic-sd15_eps", "reference"]
    (case,) = summarize(rows)[1]
    assert case["epd"]["sampler"] == "epd" and case["ratio"] == pytest.approx(0.01 / 0.0033)


def test_a_diverged_run_is_never_picked_as_the_best():
    """``min`` over a list whose first RMSE is NaN returned the NaN row: a diverged built-in was the "best built-in"
    of every summary and the headline's ratio read "nanx"."""
    from bench import accuracy, carry, neural, plugin, report

    row = {"model": "mnist-eps", "mixture": "mnist", "nfe": 5, "samples": 10, "wrong_mode": 0, "rmse_ci": [0, 1],
           "accuracy": 1.0, "wrong_mode_rate": 0.0, "wrong_mode_ci": [0, 0.3]}  # fmt: skip
    nan = float("nan")
    rows = [{**row, "sampler": "lms", "scheduler": "karras", "rmse": nan, "fid": nan},
            {**row, "sampler": "euler", "scheduler": "karras", "rmse": 0.2, "fid": 40.0},
            {**row, "sampler": "epd", "scheduler": "table:t+estimate", "rmse": nan, "fid": nan},
            {**row, "sampler": "epd", "scheduler": "table:u+estimate", "rmse": 0.1, "fid": 50.0}]  # fmt: skip
    (case,) = neural.summarize(rows)[1]
    assert case["best_builtin"]["sampler"] == case["best_builtin_fid"]["sampler"] == "euler"
    assert case["epd"]["scheduler"] == "table:u+estimate" and case["ratio"] == pytest.approx(2.0)
    (case,) = accuracy.summarize(rows)[1]
    assert case["best_builtin"]["sampler"] == "euler" and case["ratio"] == pytest.approx(2.0)
    assert "| mnist-eps | mnist | 2.00x |" in report.field_table(rows)
    students = [{**r, "sampler": r["sampler"].replace("epd", "epd_carry")} for r in rows]
    assert report.mixture_ratios(students)["mnist-eps", "mnist", 5]["carry"] == pytest.approx(2.0)
    assert "| euler / karras | 0.2000 |" in carry.summarize(students)
    bases = [{**r, "sampler": "euler" if r["sampler"] != "epd" else "epd_plugin_euler"} for r in rows]
    (case,) = plugin.compare(bases)[1]
    assert case["ratio"] == pytest.approx(2.0)


def test_rerunning_one_case_keeps_every_other_record():
    """``bench.accuracy --forms ... --nfes 5`` rewrote accuracy.json with its own rows only, dropping the other
    models', the MNIST rows and EPD Plugin's; then a run of one NFE dropped the case's other NFEs, its tables' rows
    at NFE + 1 (ended by a model call) counting as re-runs of those cases; ``bench.neural --kinds eps`` dropped
    every other row of neural.json."""
    from bench.accuracy import merge_runs

    def row(model, nfe, sampler, scheduler="karras", rmse=1.0):
        return {"model": model, "mixture": "wide", "nfe": nfe, "sampler": sampler, "scheduler": scheduler,
                "rmse": rmse}  # fmt: skip

    old = [row("a", 5, "euler"), row("a", 5, "epd_plugin_euler"), row("a", 5, "epd", "table:t5"),
           row("a", 6, "epd", "table:t5+1"), row("a", 6, "epd", "table:other"), row("a", 6, "euler"),
           row("a", 10, "euler"), row("b", 5, "euler"), row("mnist-eps", 5, "deis")]  # fmt: skip
    new = [row("a", 5, "euler", rmse=0.5), row("a", 5, "epd", "table:t5", 0.4), row("a", 6, "epd", "table:t5+1", 0.3)]
    merged = merge_runs(new, old)
    kept = [old[1], old[4], old[5], old[6], old[7], old[8]]
    assert sorted(merged, key=json.dumps) == sorted(kept + new, key=json.dumps)


def test_every_deterministic_sampler_gets_the_nfe_it_is_run_at():
    """heunpp2's last two steps are Heun's and Euler's (3s - 3 calls, not 3s): its steps were always one short, every
    run was dropped and it never had a row, though the README lists it in the field."""
    import comfy.samplers

    from bench.accuracy import DETERMINISTIC, builtin_sigmas, builtin_steps, run

    model = N["EPDAnalyticModel"].execute("sd15_eps", "reference", 0.0).result[0]
    ms = model.get_model_object("model_sampling")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cases = [(sampler, nfe) for sampler in DETERMINISTIC for nfe in (3, 7)] + [("heunpp2", 6), ("heunpp2", 9)]
    for sampler, nfe in cases:  # NFE 7 is no count of heunpp2's (None); 3 and 7 are of every other sampler's
        steps = builtin_steps(sampler, nfe)
        if steps is None:
            assert (sampler, nfe) == ("heunpp2", 7)
            continue
        sigmas = builtin_sigmas(ms, sampler, "karras", steps)
        _, counter = run(model, comfy.samplers.sampler_object(sampler), sigmas, noise)
        assert counter.rounds == nfe, (sampler, nfe, steps, counter.rounds)


def test_a_stopped_shard_keeps_its_table_rows_and_a_table_from_elsewhere_is_found_again(tmp_path):
    """``--partial`` saved only after each built-in sampler, so a GPU shard stopped while scoring the tables lost their
    rows; a table scored from another folder was looked for among the bundled ones by ``--pair`` and ``diagnose``."""
    import shutil

    from bench import neural

    folder = tmp_path / "tables"
    folder.mkdir()
    shutil.copy(neural.TABLES / "mnist-eps-nfe5-k4scg.safetensors", folder)
    partial = tmp_path / "partial-eps.json"
    rows = neural.bench_kind("eps", [5], 20, ["euler"], ["karras"], log=lambda *a: None, tables=[folder],
                             partial=partial)  # fmt: skip
    saved = json.loads(partial.read_text())
    epd = [r for r in saved if r["sampler"] == "epd"]
    assert saved == json.loads(json.dumps(rows)) and len(epd) == 2
    assert {neural.table_file(r) for r in epd} == {(folder / "mnist-eps-nfe5-k4scg.safetensors").resolve()}
    bundled = {**epd[0], "scheduler": "table:mnist-eps-nfe5-k4scg+final"}
    del bundled["table_file"]
    assert neural.table_file(bundled) == neural.TABLES / "mnist-eps-nfe5-k4scg.safetensors"


def test_rdpo_bench_flags_override_the_preset_even_at_our_defaults():
    """``--preset authors --grouping noise`` ran the authors' grouping: a flag equal to RDPOConfig's default was
    taken for not given, so the single-option ablations could not be run."""
    import argparse

    from bench.rdpo import given_options
    from epd_core.config import RDPOConfig, add_arguments, rdpo_preset

    ap = argparse.ArgumentParser()
    add_arguments(ap, RDPOConfig, skip=("seed",))
    ap.set_defaults(iterations=20, groups=10)
    argv = ["--grouping", "noise", "--no-learn-std", "--minibatch", "16", "--width", "256"]
    config = rdpo_preset("authors", seed=0, **given_options(ap, ap.parse_args(argv), argv))
    assert (config.grouping, config.learn_std, config.minibatch, config.width) == ("noise", False, 16, 256)
    assert (config.iterations, config.groups, config.scale_std) == (20, 10, RDPOConfig.authors().scale_std)


def test_bench_settings_take_the_words_the_docs_show():
    """The documented ``--set points=3 objective=global`` failed with a JSON error: a bare word is now the string."""
    from bench.defaults import parse_settings

    assert parse_settings(["points=3", "objective=global", "learn_grid=false", "grid_lr=0.03", "note=a=b"]) == {
        "points": 3, "objective": "global", "learn_grid": False, "grid_lr": 0.03, "note": "a=b"}  # fmt: skip
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        parse_settings(["points"])


def test_the_field_table_says_the_noise_counts_its_records_have():
    """The intro said '1,024 noises' as fixed text while the MNIST rows of the same table are on 2,050."""
    from bench.report import field_table

    rows = [{"model": m, "mixture": x, "nfe": 5, "sampler": s, "scheduler": "karras", "rmse": e, "samples": n}
            for m, x, n in (("analytic-sd15_eps", "wide", 1024), ("mnist-eps", "mnist", 2050))
            for s, e in (("euler", 0.2), ("epd", 0.1))]  # fmt: skip
    assert "at 1,024 noises (analytic-sd15_eps) and 2,050 noises (mnist-eps)" in field_table(rows)


def test_digit_classes_count_samples_that_change_digit():
    """On the neural model a "wrong mode" is a sample whose nearest training digit has another label than the
    exact solution's."""
    from bench import accuracy

    classes = accuracy.DigitClasses()
    train = classes.train.reshape(-1, 4, 8, 8)
    assert torch.equal(classes.component(train[:50]), classes.labels[:50])
    exact = train[:10]  # labels 0..9
    out = torch.cat([exact[:7] + 0.01, train[11:14]])  # the last three become other digits (1, 2, 3)
    m = accuracy.metrics(classes, out, exact)
    assert m["wrong_mode"] == 3 and abs(m["right_mode_fraction"] - 0.7) < 1e-6
    assert abs(m["rmse_right_mode"] - 0.01) < 1e-9 and m["rmse"] > 0.1


def test_cost_benchmark_runs(tmp_path):
    from bench import cost

    assert cost.main(["--reps", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cost.json").read_text())
    assert {r["sampler"] for r in result["wall_time"]} == {"epd", "euler", "dpmpp_2m"}
    assert all(r["seconds_per_image"] > 0 for r in result["wall_time"])
    assert result["overhead"]["microseconds_per_step"] > 0
    assert result["memory"]["ratio"] > 1.0


def test_cost_timings_take_turns_so_a_load_change_reaches_every_sampler():
    """The samplers' repetitions alternate (one warm-up each first): timed one sampler after another, a change of the
    machine's load read as a gap between samplers making the same model calls (dpmpp_2m 1.28x euler in one run)."""
    from bench.cost import median_times

    order: list[str] = []
    fns = {name: (lambda name=name: order.append(name)) for name in ("epd", "euler", "dpmpp_2m")}
    syncs: list[int] = []
    medians = median_times(fns, 3, sync=lambda: syncs.append(1))
    assert order == ["epd", "euler", "dpmpp_2m"] * 4
    assert set(medians) == set(fns) and len(syncs) == 2 * 9


def test_gpu_latency_script_runs_on_the_cpu(tmp_path):
    """The GPU latency script (run where a GPU is lent) as a CPU smoke test on the tiny UNet."""
    from bench import gpu_latency

    args = ["--size", "tiny", "--reps", "1", "--latent", "8", "--nfe", "4", "6", "--out", str(tmp_path)]
    assert gpu_latency.main(args) == 0
    result = json.loads((tmp_path / "gpu_latency.json").read_text())
    names = {"epd", "epd_sequential", "epd_k3", "euler", "dpmpp_2m"}
    runs = sorted((r["sampler"], r["nfe"]) for r in result["wall_time"])
    assert runs == sorted((s, n) for s in names for n in (4, 6))
    assert all(r["seconds_per_image"] > 0 for r in result["wall_time"])
    if not torch.cuda.is_available():  # the smoke test overwrote the GPU's recorded figures
        with pytest.raises(SystemExit):
            gpu_latency.main(args[:-2])


def test_gpu_check_fails_without_reference_trajectories(tmp_path):
    """Without EPD_SHARED's trajectories it printed an empty parity list and exited 0: a pass with no data (and
    gpu_bench.sh wrote it over the recorded gpu_check.json)."""
    env = {**os.environ, "EPD_SHARED": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "scripts.gpu_check"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode != 0 and "no reference trajectories" in run.stderr and run.stdout == ""


def test_quick_neural_benchmark(quick, tmp_path):
    """The MNIST benchmark's small version: the answer key, built-ins with KSampler schedulers and the tuned
    schedules, the bundled EPD table, with intervals; the summary compares EPD with the best built-in."""
    from bench import neural

    rows = json.loads((quick / "neural.json").read_text())
    assert {"AlignYourSteps(SD1)", "GITS(1.2)", "karras"} <= {r["scheduler"] for r in rows}
    for r in rows:
        assert r["rmse_ci"][0] <= r["rmse"] <= r["rmse_ci"][1] and r["fid"] >= 0
        assert r["wrong_mode_ci"][0] <= r["wrong_mode_rate"] <= r["wrong_mode_ci"][1]
    builtin = [r for r in rows if r["sampler"] not in ("epd", "exact")]
    assert builtin and all(r["nfe"] == r["evaluations"] == 5 for r in builtin)
    epd = [r for r in rows if r["sampler"] == "epd"]
    assert epd and {r["nfe"] for r in epd} == {5, 6}  # the free estimate, and one more call to denoise to 0
    assert rows[0]["sampler"] == "exact" and rows[0]["answer_key_gap"] < 0.02
    summary = json.loads((quick / "neural_summary.json").read_text())
    assert summary and summary[0]["ratio"] > 0 and "| mnist-eps | 5 |" in (quick / "neural.md").read_text()

    # a second run that reuses these built-in rows runs only the tables, and reproduces them
    again = tmp_path / "again"
    argv = ["--quick", "--kinds", "eps", "--nfes", "5", "--out", str(again), "--reuse", str(quick / "neural.json")]
    assert neural.main(argv) == 0
    rerun = json.loads((again / "neural.json").read_text())
    assert [r for r in rerun if r["sampler"] != "epd"] == [r for r in rows if r["sampler"] != "epd"]
    assert [r["rmse"] for r in rerun if r["sampler"] == "epd"] == [r["rmse"] for r in epd]


def test_a_neural_run_of_one_kind_keeps_the_others_records(quick, tmp_path):
    """``bench.neural --kinds eps`` (or a one-kind GPU shard through bench.gpu_merge) wrote neural.json with its own
    rows only: the flow model's records were gone, and from accuracy.json every other NFE of the model."""
    from bench import neural

    rows = json.loads((quick / "neural.json").read_text())
    flow = [{**r, "model": "mnist-flow"} for r in rows]
    tens = [{**r, "nfe": r["nfe"] + 5} for r in rows]  # another NFE of the same model
    (tmp_path / "neural.json").write_text(json.dumps(flow + tens))
    (tmp_path / "accuracy.json").write_text(json.dumps(flow + tens))
    neural.record(rows, tmp_path)
    for name in ("neural.json", "accuracy.json"):
        merged = json.loads((tmp_path / name).read_text())
        assert sorted(merged, key=json.dumps) == sorted(flow + tens + rows, key=json.dumps), name
    assert "| mnist-flow |" in (tmp_path / "neural.md").read_text()


def test_pair_gives_the_ratio_a_paired_interval_from_a_re_run_of_both_contenders(quick, tmp_path):
    """``--pair`` re-runs the cell's best built-in and EPD table on the recorded noises, reproduces their rows, and
    the summary and headline show the interval; a row it cannot reproduce is an error, not an interval."""
    import shutil

    from bench import neural, report

    out = tmp_path / "paired"
    shutil.copytree(quick, out)
    assert neural.main(["--pair", "--kinds", "eps", "--nfes", "5", "--out", str(out)]) == 0
    (entry,) = json.loads((out / "neural_paired.json").read_text())
    (cell,) = [s for s in json.loads((out / "neural_summary.json").read_text()) if s["model"] == "mnist-eps"]
    assert (entry["model"], entry["nfe"], entry["samples"]) == ("mnist-eps", 5, 20)
    assert entry["epd"] == f"epd / {cell['epd']['scheduler']}"
    assert entry["ratio"] == pytest.approx(cell["ratio"], rel=1e-9) == entry["recorded_ratio"]
    assert cell["ratio_ci"] == entry["ratio_ci"]
    lo, hi = entry["ratio_ci"]
    assert lo < entry["ratio"] < hi
    assert f"{cell['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]" in (out / "neural.md").read_text()
    assert f" [{lo:.2f}, {hi:.2f}]" in report.neural_table(json.loads((out / "neural.json").read_text()), out)

    rows = json.loads((out / "neural.json").read_text())  # a row scored again: its old interval no longer applies
    best = next(r for r in rows if r["scheduler"] == cell["epd"]["scheduler"] and r["sampler"] == "epd")
    best["rmse"] *= 0.8
    (out / "neural.json").write_text(json.dumps(rows))
    assert neural.summarize(rows, neural.load_paired(out))[1][0]["ratio_ci"] is None
    with pytest.raises(RuntimeError, match="not the same contender, noises or answer key"):
        neural.main(["--pair", "--kinds", "eps", "--nfes", "5", "--out", str(out)])


def test_fresh_scores_both_picks_on_new_noises_with_their_own_answer_key(quick, tmp_path):
    """``--fresh SEED`` runs each cell's best built-in and EPD table (picked on the recorded noises) on as many new
    noises with their own answer key: the ratio without the picks' luck, shown beside the recorded one until a row
    changes; the recorded noises' own seed is refused."""
    import shutil

    from bench import neural, report

    out = tmp_path / "fresh"
    shutil.copytree(quick, out)
    assert neural.main(["--fresh", "5", "--kinds", "eps", "--nfes", "5", "--out", str(out)]) == 0
    (entry,) = json.loads((out / neural.FRESH).read_text())
    (cell,) = [s for s in json.loads((out / "neural_summary.json").read_text()) if s["model"] == "mnist-eps"]
    (exact,) = [r for r in json.loads((out / "neural.json").read_text()) if r["sampler"] == "exact"]
    assert (entry["model"], entry["nfe"], entry["samples"], entry["noise_seed"]) == ("mnist-eps", 5, 20, 5)
    assert (entry["builtin"], entry["epd"]) == (neural.contender_label(cell["best_builtin"]),
                                                neural.contender_label(cell["epd"]))  # fmt: skip
    assert entry["recorded_ratio"] == cell["ratio"] and cell["fresh"] == entry
    assert entry["answer_key_gap"] != exact["answer_key_gap"]  # other noises, their own key
    assert entry["ratio"] != pytest.approx(cell["ratio"], rel=1e-6)
    lo, hi = entry["ratio_ci"]
    assert lo < entry["ratio"] < hi
    text = f"new noises {entry['ratio']:.2f}x [{lo:.2f}, {hi:.2f}]"
    assert text in (out / "neural.md").read_text()
    headline = report.neural_table(json.loads((out / "neural.json").read_text()), out)
    assert text in headline.replace("**", "")  # the headline bolds a ratio that meets its target

    rows = json.loads((out / "neural.json").read_text())  # a pick scored again: the fresh ratio was another pair's
    best = next(r for r in rows if r["scheduler"] == cell["epd"]["scheduler"] and r["sampler"] == "epd")
    best["rmse"] *= 0.8
    assert neural.summarize(rows, [], neural.load_paired(out, neural.FRESH))[1][0]["fresh"] is None
    with pytest.raises(ValueError, match="draws the recorded noises again"):
        neural.main(["--fresh", str(neural.HELD_OUT_SEED), "--kinds", "eps", "--nfes", "5", "--out", str(out)])


def test_mnist_diagnosis_splits_the_error_and_finds_commit_steps(quick, tmp_path):
    """``bench.diagnose --mnist``: both contenders reproduce their rows, the wrong-class shares and commit steps
    account for every wrong sample, and a continuation of a few samples in class slots equals the whole batch's."""
    import shutil

    from bench import diagnose, neural
    from epd_core.files import load_params

    out = tmp_path / "diagnosed"
    shutil.copytree(quick, out)
    assert diagnose.main(["--mnist", "eps:5", "--out", str(out)]) == 0
    (row,) = json.loads((out / "diagnosis_mnist.json").read_text())
    (cell,) = [s for s in json.loads((out / "neural_summary.json").read_text()) if s["model"] == "mnist-eps"]
    assert row["epd_rmse"] == pytest.approx(cell["epd"]["rmse"], rel=1e-6)
    assert row["builtin_rmse"] == pytest.approx(cell["best_builtin"]["rmse"], rel=1e-6)
    assert row["epd_wrong_mode"] == cell["epd"]["wrong_mode"] == sum(row["commit_step"].values())
    assert 0 <= row["epd_wrong_share"] <= 1 and 0 <= row["builtin_wrong_share"] <= 1
    assert row["both_right"] <= row["samples"] - max(row["epd_wrong_mode"], row["builtin_wrong_mode"])
    assert 0 < row["teacher_rmse"] < row["epd_rmse"]  # the M = 3 teacher is far closer to the ODE than the table
    assert f"| mnist-eps | 5 | {row['table']}: " in (out / "diagnosis_mnist.md").read_text()
    assert row["trace_samples"] == 20 and row["error_after_step"][-1] == pytest.approx(row["epd_rmse"], rel=1e-6)
    assert 0 < row["error_after_step"][0] < row["epd_rmse"]  # the first step alone leaves less error than all
    first = row["first_step"]  # the table's own first direction reproduces its trace and end
    assert first["table"]["after_step_1"] == pytest.approx(row["error_after_step"][0], rel=1e-6)
    assert first["table"]["end"] == pytest.approx(row["epd_rmse"], rel=1e-6) and first["table"]["rounds"] == 5
    assert first["exact"]["rounds"] == 6  # the exact first direction is one real model call more
    assert first["exact"]["after_step_1"] != pytest.approx(first["table"]["after_step_1"], rel=1e-3)
    params = load_params(neural.TABLES / f"{row['table']}.safetensors")
    assert params.afs and ("zero_mean" in first) == (params.afs_mean is not None)

    contest = neural.Contest("eps", 20)
    states = []
    sampler, sigmas = neural.contender(contest, cell["epd"])
    neural.run(contest.model, contest.positive, contest.negative, sampler, sigmas, contest.noise,
               lambda i, den, x, total: states.append((float(sigmas[i]), x.clone())))  # fmt: skip
    sigma, x = states[2]
    labels = contest.score.labels
    whole = diagnose.mnist_continuation(contest, x, sigma, labels)
    some = torch.tensor([13, 3, 7, 17, 4])  # two of class 3 and two of class 7, out of order
    part = diagnose.mnist_continuation(contest, x[some], sigma, labels[some])
    assert torch.allclose(part, whole[some], atol=1e-4)
    other = diagnose.mnist_continuation(contest, x[some], sigma, (labels[some] + 1) % 10)
    assert (other - whole[some]).abs().amax() > 0.1  # a sample in another class's slot is drawn as that class
    assert sum(diagnose.mnist_commit_steps(contest, states, some).values()) == len(some)


def test_add_scores_a_new_table_into_the_results_without_rerunning_the_field(quick, tmp_path):
    import shutil

    from bench import neural

    out, tables = tmp_path / "results", tmp_path / "new"
    shutil.copytree(quick, out)
    before = json.loads((out / "neural.json").read_text())
    bundled = next(r for r in before if r["sampler"] == "epd" and r["model"] == "mnist-eps" and r["nfe"] == 5)
    name = bundled["scheduler"].removeprefix("table:").removesuffix("+estimate")
    tables.mkdir()
    shutil.copy(neural.TABLES / f"{name}.safetensors", tables / f"{name}-copy.safetensors")
    argv = ["--quick", "--kinds", "eps", "--nfes", "5", "--samplers", "--out", str(out), "--add"]
    assert neural.main([*argv, "--tables", str(tables / f"{name}-copy.safetensors")]) == 0
    after = json.loads((out / "neural.json").read_text())
    added = [r for r in after if r not in before]
    assert [r["scheduler"] for r in added] == [f"table:new/{name}-copy+final", f"table:new/{name}-copy+estimate"]
    assert [r for r in after if r not in added] == before  # nothing else changed, nothing re-run
    last_eps = max(i for i, r in enumerate(after) if r["model"] == "mnist-eps" and r not in added)
    assert after.index(added[0]) == last_eps + 1  # after the model's own rows
    assert added[1]["rmse"] == bundled["rmse"]  # the same table on the same noises scores the same
    assert [r for r in json.loads((out / "accuracy.json").read_text()) if r in added] == added
    assert neural.main([*argv, "--tables", str(tables / f"{name}-copy.safetensors")]) == 0  # again: replaced
    assert json.loads((out / "neural.json").read_text()) == after
    with pytest.raises(ValueError, match="not the same noises and key"):
        neural.main([*argv, "--samples", "30", "--tables", str(tables / f"{name}-copy.safetensors")])


def test_paired_ratio_interval():
    from bench.neural import paired_ratio_interval, rmse_interval

    g = torch.Generator().manual_seed(0)
    builtin = torch.rand(2000, generator=g, dtype=torch.float64) ** 2 * 4e-3
    assert paired_ratio_interval(builtin, builtin) == (1.0, 1.0)
    epd = builtin / 4 * (1 + 0.3 * torch.rand(2000, generator=g, dtype=torch.float64))  # correlated errors
    ratio = float((builtin.mean() / epd.mean()).sqrt())
    lo, hi = paired_ratio_interval(builtin, epd)
    assert lo < ratio < hi and paired_ratio_interval(builtin, epd) == (lo, hi)
    b_ci = rmse_interval(builtin.sqrt()[:, None], torch.zeros(2000, 1))
    e_ci = rmse_interval(epd.sqrt()[:, None], torch.zeros(2000, 1))
    assert hi - lo < (b_ci[1] / e_ci[0] - b_ci[0] / e_ci[1]) / 3  # pairing: far tighter than the rows' own spans


def test_neural_benchmark_reuses_only_runs_on_the_same_noises():
    from bench.neural import reusable

    base = {"model": "mnist-eps", "samples": 100, "answer_key_gap": 0.01}
    row = {**base, "sampler": "deis", "scheduler": "beta", "nfe": 5, "rmse": 0.09}
    others = [{**row, "samples": 2050}, {**row, "answer_key_gap": 0.011}, {**row, "model": "mnist-flow"},
              {**row, "sampler": "epd"}, {**row, "sampler": "epd_plugin_deis"},
              {**row, "sampler": "exact"}]  # fmt: skip
    assert reusable([row, *others], base) == {("deis", "beta", 5): row}


def test_wilson_interval():
    from bench.neural import wilson

    low, high = wilson(0, 100)
    assert low == 0 and 0.03 < high < 0.04  # the rule of three, roughly
    low, high = wilson(50, 100)
    assert 0.40 < low < 0.41 and 0.59 < high < 0.60
    for n in (100, 2050, 8192):  # the bounds stay inside [0, 1] where round-off would cross them
        assert wilson(0, n)[0] == 0.0 and 1 - 1e-12 < wilson(n, n)[1] <= 1.0


def test_answer_key_cache_is_shared_by_runs_on_the_same_noises(tmp_path, monkeypatch):
    from bench import neural

    calls = []

    def key(model, kind, positive, negative, noise):
        calls.append(kind)
        return noise * 2, 0.125

    monkeypatch.setattr(neural, "answer_key", key)
    noise = torch.randn(20, 4, 14, 14, generator=torch.Generator().manual_seed(0))
    monkeypatch.delenv("EPD_KEY_CACHE", raising=False)
    neural.cached_answer_key(None, "eps", None, None, noise)
    assert calls == ["eps"] and not any(tmp_path.iterdir())  # no cache folder: computed, nothing written
    monkeypatch.setenv("EPD_KEY_CACHE", str(tmp_path / "keys"))
    first = neural.cached_answer_key(None, "eps", None, None, noise)
    again = neural.cached_answer_key(None, "eps", None, None, noise)
    assert calls == ["eps", "eps"]  # the second run read the key back
    assert torch.equal(again[0], first[0]) and again[1] == first[1] == 0.125
    (name,) = [p.name for p in (tmp_path / "keys").iterdir()]  # no temp left
    assert name.startswith("mnist-eps-20-heun100-") and name.endswith(".safetensors")
    neural.cached_answer_key(None, "eps", None, None, noise + 1)  # other noises, same count: not the cached key
    assert calls == ["eps", "eps", "eps"]
    neural.cached_answer_key(None, "eps", None, None, noise)  # and both kept: a --fresh run overwrote the recorded
    assert calls == ["eps", "eps", "eps"]  # noises' key, and the next run paid for it again (55 minutes a model)


def test_answer_key_cache_reads_a_key_summed_under_another_thread_count(tmp_path, monkeypatch):
    """The noises' checksum is a float sum whose last bits follow the thread count that summed it (a key made on a
    16-core machine and read with one thread differed by 6e-14 in 332): such a key is still the same noises'."""
    from safetensors.torch import load_file, save_file

    from bench import neural

    monkeypatch.setattr(neural, "answer_key", lambda model, kind, positive, negative, noise: (noise * 2, 0.125))
    monkeypatch.setenv("EPD_KEY_CACHE", str(tmp_path))
    noise = torch.randn(20, 4, 14, 14, generator=torch.Generator().manual_seed(0))
    neural.cached_answer_key(None, "eps", None, None, noise)
    (path,) = tmp_path.glob("mnist-eps-20-heun100-*.safetensors")
    saved = load_file(path)
    save_file({**saved, "noise_sum": saved["noise_sum"] + 6e-14, "gap": torch.tensor([0.5], dtype=torch.float64)}, path)
    assert neural.cached_answer_key(None, "eps", None, None, noise)[1] == 0.5  # read back, not recomputed


def test_bundled_tables_keep_their_names_by_any_path(monkeypatch):
    from bench import neural
    from epd_dev import ROOT

    monkeypatch.chdir(ROOT)
    names = [name for name, _ in neural.epd_tables("eps", [neural.TABLES.relative_to(ROOT)])]
    assert names == [name for name, _ in neural.epd_tables("eps")] and all("/" not in name for name in names)


def test_gpu_shards_merge_into_one_run(tmp_path):
    from bench import gpu_merge

    common = {"model": "mnist-eps", "samples": 2050, "answer_key_gap": 0.0094}
    exact = {**common, "sampler": "exact", "scheduler": "heun/100", "nfe": 200}
    runs = [{**common, "sampler": s, "scheduler": "beta", "nfe": 5} for s in ("euler", "deis", "ipndm")]
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "neural.json").write_text(json.dumps([exact, runs[0]]))
    (tmp_path / "b").mkdir()  # stopped at its deadline: only the rows it wrote as it went
    (tmp_path / "b" / "partial-eps.json").write_text(json.dumps([exact, *runs[1:]]))
    rows = gpu_merge.neural_rows([tmp_path / "a", tmp_path / "b"])
    assert rows == [exact, *runs]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "neural.json").write_text(json.dumps([{**runs[0], "answer_key_gap": 0.01}]))
    with pytest.raises(ValueError, match="not on the shared answer key"):
        gpu_merge.neural_rows([tmp_path / "a", tmp_path / "c"])


def test_gpu_merge_refuses_stopped_shards_and_rows_of_another_answer_key(tmp_path, capsys):
    """A shard stopped at its deadline was merged as a whole field (the best built-in at eps NFE 10 was among the
    cells it never ran: the ratio went from 1.91x to 2.30x), a plugin job's rows so far were its result, and rows on
    10 noises joined a 2,050-noise neural.json (a 10-noise EPD row against the recorded field: 1.85x)."""
    from bench import gpu_merge, plugin

    common = {"model": "mnist-eps", "samples": 2050, "answer_key_gap": 0.0094}
    exact = {**common, "sampler": "exact", "scheduler": "heun/100", "nfe": 200}
    run = {**common, "sampler": "euler", "scheduler": "beta", "nfe": 5, "rmse": 0.1}
    results, out = tmp_path / "results", tmp_path / "bench"
    for shard, name in (("a", "neural.json"), ("b", "partial-eps.json")):
        (results / "neural" / shard).mkdir(parents=True)
        (results / "neural" / shard / name).write_text(json.dumps([exact, run]))
    (results / "plugin").mkdir()
    stopped = plugin.partial_path(results / "plugin" / "eps0.json")
    stopped.write_text(json.dumps([{**run, "sampler": "epd_plugin_euler"}]))
    assert gpu_merge.main([str(results), "--out", str(out)]) == 1
    assert "neural/b, plugin/eps0.partial.json" in capsys.readouterr().err and not out.exists()
    assert gpu_merge.plugin_shards(results / "plugin", []) == [stopped]
    (results / "plugin" / "eps0.json").write_text("[]")  # the job finished: its result, not its rows so far
    assert gpu_merge.plugin_shards(results / "plugin", []) == [results / "plugin" / "eps0.json"]
    assert gpu_merge.unfinished([results / "neural" / "a"], results / "plugin") == []
    out.mkdir()
    (out / "neural.json").write_text(json.dumps([{**exact, "samples": 10, "answer_key_gap": 0.0049}]))
    with pytest.raises(ValueError, match="2050 noises with key gap 0.0094, but .* holds 10 with 0.0049"):
        gpu_merge.main([str(results), "--out", str(out), "--skip", "b"])
    moved = gpu_merge.relative_tables([{**run, "table_file": "/tmp/epd_gpu/tables/job/t.safetensors"}], results)
    assert moved[0]["table_file"] == str(results / "tables" / "job" / "t.safetensors")


def test_gpu_merge_files_unfinished_jobs_checkpoints(tmp_path):
    """A training job stopped at the GPU call's deadline has its checkpoint filed for the next call; a job that
    finished has its table filed in place of the checkpoint filed earlier (a later call kept the job's line and,
    finding no checkpoint, trained it again from iteration 0); nothing else is touched."""
    from bench import gpu_merge

    tables, into = tmp_path / "tables", tmp_path / "checkpoints"
    (tables / "slow").mkdir(parents=True)
    (tables / "slow" / "mnist-eps-nfe5.epd-checkpoint").write_bytes(b"state at 475")
    (tables / "done").mkdir()
    (tables / "done" / "mnist-flow-nfe5.safetensors").write_bytes(b"table")
    (into / "done").mkdir(parents=True)
    (into / "done" / "mnist-flow-nfe5.epd-checkpoint").write_bytes(b"state at 750")
    (into / "done" / "mnist-flow-nfe10.epd-checkpoint").write_bytes(b"another job's state")
    lines = gpu_merge.file_checkpoints(tables, into)
    assert lines == ["done/mnist-flow-nfe5.safetensors: finished, filed (its checkpoint removed)",
                     "slow/mnist-eps-nfe5.epd-checkpoint: filed, to be continued"]  # fmt: skip
    assert (into / "slow" / "mnist-eps-nfe5.epd-checkpoint").read_bytes() == b"state at 475"
    assert sorted(p.name for p in (into / "done").iterdir()) == ["mnist-flow-nfe10.epd-checkpoint",
                                                                  "mnist-flow-nfe5.safetensors"]  # fmt: skip
    assert (into / "done" / "mnist-flow-nfe5.safetensors").read_bytes() == b"table"
    assert gpu_merge.file_checkpoints(tables, into) == ["slow/mnist-eps-nfe5.epd-checkpoint: filed, to be continued"]
    assert gpu_merge.file_checkpoints(tmp_path / "absent", into) == []
    # the deadline's kill between a table's save and its checkpoint's removal: the table is what is filed, and a
    # stale checkpoint goes even when the table filed earlier has the same bytes (the next call resumed from it)
    (tables / "done" / "mnist-flow-nfe5.epd-checkpoint").write_bytes(b"state at 3200")
    (into / "done" / "mnist-flow-nfe5.epd-checkpoint").write_bytes(b"state at 3100")
    assert gpu_merge.file_checkpoints(tables, into) == ["slow/mnist-eps-nfe5.epd-checkpoint: filed, to be continued"]
    assert sorted(p.name for p in (into / "done").iterdir()) == ["mnist-flow-nfe10.epd-checkpoint",
                                                                  "mnist-flow-nfe5.safetensors"]  # fmt: skip


def test_neural_run_replaces_its_own_rows_and_keeps_the_plugins(tmp_path):
    from bench import neural

    def row(model, sampler, rmse):
        return {"model": model, "sampler": sampler, "scheduler": "beta", "nfe": 5, "rmse": rmse}

    path = tmp_path / "accuracy.json"
    old = [row("mnist-eps", "euler", 0.2), row("mnist-eps", "epd_plugin_euler", 0.1), row("sd15", "euler", 0.3)]
    path.write_text(json.dumps(old))
    new = [row("mnist-eps", "euler", 0.19), row("mnist-eps", "epd", 0.08)]
    neural.merge_into_accuracy(new, path)
    assert sorted(json.loads(path.read_text()), key=json.dumps) == sorted([*old[1:], *new], key=json.dumps)


@contextlib.contextmanager
def file_size_limit(nbytes: int):
    """A full disk, as far as a write is concerned: files may not grow past ``nbytes``."""
    import resource
    import signal

    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_record_write_that_fails_keeps_the_earlier_records(tmp_path, monkeypatch):
    """A write of bench.neural's, bench.plugin's or bench.accuracy's records that failed (a full disk: here a file
    size limit) left the file truncated: every earlier run's records were lost, and the next merge failed on the
    broken JSON."""
    from bench import accuracy, neural, plugin

    old = [{"model": "sd15", "mixture": "m", "sampler": "euler", "scheduler": "beta", "nfe": 5, "rmse": 0.3}]
    for name in ("neural.json", "accuracy.json", "plugin.json"):
        (tmp_path / name).write_text(json.dumps(old))
    with file_size_limit(len(json.dumps(old)) + 10):
        with pytest.raises(OSError):
            neural.merge_into_accuracy([{**old[0], "model": "mnist-eps"}], tmp_path / "accuracy.json")
        with pytest.raises(OSError):
            neural.record([{**old[0], "model": "mnist-eps", "sampler": "epd"}], tmp_path)
        with pytest.raises(OSError):
            plugin.merge_rows([{**old[0], "sampler": "epd_plugin_euler"}], tmp_path / "plugin.json", True)
        monkeypatch.setattr(accuracy, "_bench_job", lambda *job: [{**old[0], "model": "sd15_eps"}])
        with pytest.raises(OSError):
            accuracy.main(["--forms", "sd15_eps", "--mixtures", "reference", "--no-neural", "--workers", "1",
                           "--out", str(tmp_path)])  # fmt: skip
    for name in ("neural.json", "accuracy.json", "plugin.json"):
        assert json.loads((tmp_path / name).read_text()) == old, name
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_write_that_fails_keeps_the_readme_and_the_summaries(tmp_path):
    """bench.report rewrote the summaries and the README with ``write_text``: a full disk (here a file size limit)
    truncated them, the README's prose included."""
    import shutil

    from bench import report

    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copytree(report.RESULTS, results)
    shutil.copyfile(report.README, readme)
    before = {p.name: p.read_bytes() for p in [readme, *results.iterdir()]}
    with file_size_limit(100), pytest.raises(OSError):
        report.main(["--results", str(results), "--readme", str(readme)])
    assert {p.name: p.read_bytes() for p in [readme, *results.iterdir()]} == before


def test_benchmarks_write_their_files_whole_or_not_at_all():
    """A record the benchmarks merge into (carry.json, unseen.json, diagnosis_mnist.json, bench.rdpo --append) or
    rewrite (the summaries, the README) went through ``write_text``, which truncates the file before a write that can
    fail; ``write_atomic`` keeps the old file then."""
    import ast

    found = []
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "write_text":
                found.append(f"{path.name}:{node.lineno}")
    assert not found


def test_plugin_benchmark_compares_each_base_at_equal_nfe_and_replaces_plugin_rows(tmp_path):
    from bench import plugin

    rows = plugin.bench_plugin("sd15_eps", ["dpmpp_2m"], [10], 32, log=lambda m: None)
    bare = [r for r in rows if r["sampler"] == "dpmpp_2m"]
    plug = [r for r in rows if r["sampler"] == "epd_plugin_dpmpp_2m"]
    assert bare and all(r["nfe"] == r["evaluations"] == 10 for r in bare)
    assert {r["scheduler"] for r in plug} >= {"table:analytic-sd15-reference-nfe10",
                                              "table:analytic-sd15-reference-nfe9+final",
                                              "table:analytic-sd15-reference-nfe10-carry+estimate"}  # fmt: skip
    assert all(r["nfe"] == 10 and r["evaluations"] > r["nfe"] for r in plug)  # K points count once in NFE
    table, summary = plugin.compare(rows)
    assert len(summary) == 1 and summary[0]["bare"]["rmse"] == min(r["rmse"] for r in bare)
    assert summary[0]["plugin"]["rmse"] == min(r["rmse"] for r in plug) and "| dpmpp_2m | 10 |" in table
    key = {"model": "analytic-sd15_eps", "mixture": "reference", "nfe": 10}
    old = [{**key, "sampler": "epd_plugin_dpmpp_2m", "rmse": 1.0}, {**key, "sampler": "epd_plugin_ipndm", "rmse": 1.0},
           {**key, "sampler": "dpmpp_2m", "rmse": 0.5}]  # fmt: skip
    (tmp_path / "accuracy.json").write_text(json.dumps(old))
    merged = plugin.merge_rows(rows, tmp_path / "accuracy.json", only_plugin=True)
    assert merged == old[1:] + plug  # the redone plugin row replaced; the other base's and the bare rows kept


def test_carry_benchmark_compares_both_students_with_the_best_builtins(quick):
    """bench.carry's small version: the best built-ins of the quick field against the bundled epd and carry
    tables of one case, each run to its round count."""
    rows = json.loads((quick / "carry.json").read_text())
    field = json.loads((quick / "accuracy.json").read_text())
    assert {r["sampler"] for r in rows} >= {"epd_epd", "epd_carry"} and all(r["nfe"] == 5 for r in rows)
    builtin = [r for r in rows if not r["sampler"].startswith("epd")]
    ranked = sorted((r for r in field if r["nfe"] == 5 and not r["sampler"].startswith("epd")), key=lambda r: r["rmse"])
    assert [(r["sampler"], r["scheduler"]) for r in builtin] == [(r["sampler"], r["scheduler"]) for r in ranked[:2]]
    table = (quick / "carry.md").read_text()
    assert "analytic-sd15-reference-nfe5-carry+estimate" in table and table.count("x |") == 2


def test_carry_benchmark_replaces_only_the_cases_it_reruns(tmp_path):
    from bench.accuracy import merge_cases

    case = {"model": "analytic-sd15_eps", "mixture": "wide", "nfe": 10}
    old = [{**case, "sampler": "uni_pc", "rmse": 0.02}, {**case, "sampler": "epd_carry", "rmse": 0.03},
           {**case, "nfe": 5, "sampler": "epd_carry", "rmse": 0.05}]  # fmt: skip
    (tmp_path / "carry.json").write_text(json.dumps(old))
    new = [{**case, "sampler": "uni_pc", "rmse": 0.02}, {**case, "sampler": "epd_carry", "rmse": 0.01}]
    assert merge_cases(new, tmp_path / "carry.json") == old[2:] + new
    assert merge_cases(new, tmp_path / "none.json") == new


def test_headline_is_rendered_from_the_records(quick):
    """bench.all ends with bench.report: the README copy's block is the three tables of the quick records."""
    from bench import report

    block = (quick / "headline.md").read_text()
    assert "**Analytic mixtures**" in block and "**MNIST models**" in block and "**The whole field" in block
    assert "| analytic SD1.5 | " in block and "| mnist-eps | 5 |" in block
    assert "| analytic-sd15_eps | reference |" in block
    readme = (quick / "README.md").read_text()
    assert f"{report.BEGIN}\n{block}{report.END}" in readme
    assert report.replace_block(readme, "") == report.replace_block(report.README.read_text(), "")  # only the block


def test_mixture_headline_bolds_every_ratio_that_meets_its_target():
    """It says "bold: the target met" but bolded only the carry tables': an `epd` table's 1.84x at NFE 5 (target 1.5x)
    stood plain beside the count that included it."""
    from bench import report

    row = {"model": "analytic-sd3_flow", "mixture": "reference", "nfe": 5, "samples": 64, "scheduler": "karras"}
    rows = [{**row, "sampler": "euler", "rmse": 0.2}, {**row, "sampler": "epd_epd", "rmse": 0.1},
            {**row, "sampler": "epd_carry", "rmse": 0.05}]  # fmt: skip
    table = report.mixtures_table(rows)
    assert "**2.00x** → **4.00x**" in table and "`carry` 1 of 1, `epd` 1 of 1" in table


def test_mnist_headline_says_how_many_noises_each_digit_has(tmp_path):
    """The intro said "ten per digit" whatever the run: the headline's 2,050 noises are 205 per digit."""
    from bench import report

    row = {"model": "mnist-eps", "mixture": "mnist", "nfe": 5, "samples": 2050, "rmse_ci": [0, 1], "fid": 40.0,
           "accuracy": 1.0, "wrong_mode": 0, "wrong_mode_rate": 0.0, "wrong_mode_ci": [0, 0.01]}  # fmt: skip
    rows = [{**row, "sampler": "euler", "scheduler": "karras", "rmse": 0.2},
            {**row, "sampler": "epd", "scheduler": "table:t+estimate", "rmse": 0.1}]  # fmt: skip
    assert "2,050 noises, 205 per digit," in report.neural_table(rows, tmp_path)


def test_plugin_block_is_rendered_from_the_plugin_records(tmp_path):
    """The README's plugin block: per model and NFE, each base's best bare RMSE / its best plugin RMSE."""
    from bench import report

    def row(sampler, scheduler, rmse):
        return {"model": "analytic-sd15_eps", "mixture": "reference", "nfe": 10, "samples": 64, "wrong_mode": 0,
                "sampler": sampler, "scheduler": scheduler, "rmse": rmse}  # fmt: skip

    rows = [row("dpmpp_2m", "karras", 0.1), row("dpmpp_2m", "simple", 0.2), row("epd_plugin_dpmpp_2m", "table:t", 0.05),
            row("ipndm", "beta", 0.06), row("epd_plugin_ipndm", "table:t", 0.055)]  # fmt: skip
    (tmp_path / "plugin.json").write_text(json.dumps(rows))
    readme = report.README.read_text()
    text, _ = report.render(readme, tmp_path)
    block = text.split(report.PLUGIN_BEGIN)[1].split(report.PLUGIN_END)[0]
    assert "| analytic SD1.5 | 10 | t | **2.00x** | 1.09x |" in block and "1 of 2 cells" in block
    blank = lambda t: report.replace_block(report.replace_block(t, ""), "", report.PLUGIN_BEGIN, report.PLUGIN_END)  # noqa: E731
    assert blank(text) == blank(readme)  # only the blocks change


def test_plugin_block_names_the_same_table_in_every_process_when_bases_tie():
    """The block's "most bases" table was the max of a set: where two tables led as many bases, the one named hung on
    the process's string hashing, so bench.report and a later --check could render different READMEs."""
    from bench import report

    def row(sampler, scheduler, rmse):
        return {"model": "analytic-sd15_eps", "mixture": "reference", "nfe": 10, "samples": 64, "wrong_mode": 0,
                "sampler": sampler, "scheduler": scheduler, "rmse": rmse}  # fmt: skip

    # two names this process's hashing puts in a set in the other order (the first base's table listed second)
    pairs = ((f"t{i}", f"u{i}") for i in range(100))
    first, second = next((a, b) for a, b in pairs if list({a, b})[0] == b)
    rows = [row("dpmpp_2m", "karras", 0.1), row("epd_plugin_dpmpp_2m", f"table:{first}", 0.05),
            row("ipndm", "beta", 0.06), row("epd_plugin_ipndm", f"table:{second}", 0.05)]  # fmt: skip
    assert f"| analytic SD1.5 | 10 | {first} |" in report.plugin_table(rows)


def test_readme_headline_matches_the_committed_records():
    """The README's headline is what bench.report renders from bench/results (regenerate, never edit by hand)."""
    from bench import report

    assert report.main(["--check"]) == 0


def test_report_check_fails_on_stale_summaries_and_a_missing_plugin_record(tmp_path):
    """bench.neural and bench.plugin add rows to accuracy.json, and only bench.accuracy rewrote its summaries: they
    lacked the MNIST rows while --check passed; it also passed without plugin.json (its README block unchecked)."""
    import shutil

    from bench import report

    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copytree(report.RESULTS, results)
    shutil.copyfile(report.README, readme)
    check = ["--check", "--results", str(results), "--readme", str(readme)]
    assert report.main(check) == 0
    summary = (results / "accuracy.md").read_text()
    (results / "accuracy.md").write_text("\n".join(line for line in summary.split("\n") if "mnist" not in line))
    assert report.main(check) == 1
    assert report.main(check[1:]) == 0 and (results / "accuracy.md").read_text() == summary  # rewritten
    (results / "plugin.json").unlink()
    assert report.main(check) == 1


def test_report_check_fails_on_a_stale_summary_beside_any_record(tmp_path):
    """carry.md, neural.md, neural_summary.json and plugin.md (the README's "where" for its figures) went unchecked:
    --check passed with any of them out of date with the record it summarises."""
    import shutil

    from bench import report

    results, readme = tmp_path / "results", tmp_path / "README.md"
    shutil.copytree(report.RESULTS, results)
    shutil.copyfile(report.README, readme)
    files = report.derived_files(results)
    for name in ("carry.md", "neural.md", "neural_summary.json", "plugin.md"):
        assert files[name] == (results / name).read_text(), name
    (results / "neural.md").write_text(files["neural.md"].replace("1", "2", 1))
    assert report.main(["--check", "--results", str(results), "--readme", str(readme)]) == 1


def test_neural_scorer_predicts_as_the_classifier():
    """The scorer reuses the FID features for its class predictions: the same classes as the classifier's own pass."""
    from bench.neural import Scorer
    from epd_dev import comfy_harness, mnist_data, mnist_metrics

    images, labels = mnist_data.split("heldout")
    images, labels = images[:200], labels[:200]
    latents = comfy_harness.pack_module("nodes.mnist_model").images_to_latent(images)
    scorer = Scorer(latents, labels)
    row = scorer(latents)
    assert row["wrong_mode"] == 0 and row["rmse"] == 0
    assert row["accuracy"] == mnist_metrics.class_accuracy(scorer.images(latents), labels) > 0.9


def test_plugin_benchmark_on_mnist_scores_bare_and_plugin_runs_at_equal_rounds():
    """The MNIST comparison: each bare run and each plugin run (a carry table ended on its estimate) at the NFE's
    rounds, with the digits FID; a second run reusing the first keeps its bare rows."""
    from bench import plugin

    rows = plugin.bench_plugin_mnist("eps", ["dpmpp_2m"], [6], 10, log=lambda m: None)
    bare = [r for r in rows if r["sampler"] == "dpmpp_2m"]
    plug = [r for r in rows if r["sampler"] == "epd_plugin_dpmpp_2m"]
    assert {r["scheduler"] for r in bare} >= {"karras", "AlignYourSteps(SD1)"}
    assert [r["scheduler"] for r in plug] == ["table:mnist-eps-nfe6+estimate"]
    assert all(r["nfe"] == 6 and r["fid"] > 0 and r["samples"] == 10 for r in rows)
    assert plug[0]["evaluations"] > 6  # the K points count once in the NFE, K times in the evaluations
    table, summary = plugin.compare(rows)
    assert len(summary) == 1 and "| mnist-eps | dpmpp_2m | 6 |" in table
    again = plugin.bench_plugin_mnist("eps", ["dpmpp_2m"], [6], 10, reuse=bare[:1], log=lambda m: None)
    assert again[0] is bare[0] and [r["rmse"] for r in again[1:]] == [r["rmse"] for r in rows[1:]]


def test_defaults_benchmark_fits_with_the_nodes_own_defaults(tmp_path):
    """bench.defaults takes EPD Distill's inputs from the node's schema (so it measures what a user who changes
    nothing gets: the node's defaults, from the core's config), runs both endings at the table's NFE (the last one
    EPD KSampler's defaults), and compares with a built-in only on the same noises."""
    from bench import defaults
    from epd_core.config import DistillConfig
    from epd_dev.comfy_harness import NODES as N

    got = defaults.node_defaults(N["EPDDistill"])
    sampled = {i.id: getattr(i, "default", None) for i in N["EPDKSampler"].define_schema().inputs}
    assert (sampled["final_denoise"], sampled["final_step"]) == defaults.ENDINGS[-1][1:]  # the headline's ending
    names = {"teacher": "teacher", "teacher_steps": "teacher_m", "iterations": "iterations", "batch": "batch",
             "learning_rate": "lr", "seed": "seed", "learn_grid": "learn_grid"}  # fmt: skip
    assert {k: got[k] for k in names} == {k: DistillConfig.node_default(v) for k, v in names.items()}
    assert (got["batch"], got["iterations"], got["learn_grid"]) == (16, 0, True)  # the node's, not the library's
    from epd_core.config import node_iterations

    assert [node_iterations(n) for n in (2, 4, 5, 8, 10, 20)] == [8000, 4000, 3200, 2000, 1600, 1600]  # 0: auto
    assert got["nfe"] == 10 and got["points"] == 3
    assert defaults.main(["--forms", "sd3_flow", "--mixtures", "reference", "--nfes", "5", "--samples", "32",
                          "--set", "iterations=2", "--distill", "grid_lr=0.05", "--out", str(tmp_path),
                          "--keep-tables", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "defaults.json").read_text())
    assert [r["scheduler"] for r in rows] == ["at sigma_min", "+estimate"]
    # --distill reached the node (the table's recorded config), and the node's own defaults are back afterwards
    assert all(r["grid_lr"] == 0.05 for r in rows)
    from epd_dev.comfy_harness import pack_module

    assert pack_module("epd_core.config").DistillConfig.node_default("grid_lr") == DistillConfig.default("grid_lr")
    assert all(r["nfe"] == 5 and r["settings"] == {"iterations": 2} and r["rmse"] > 0 for r in rows)
    assert all(len(r["loss_curve"]) == 2 for r in rows)  # one mean per iteration of a run shorter than ten
    assert all(r["numerics"].startswith(f"torch {torch.__version__}, ") for r in rows)  # what reproduces it
    # bench.diagnose samples the kept table in the core on the same noises: the same error as through ComfyUI, its
    # wrong-component samples each committed at one step, and the training teacher closer to the exact solution
    from bench import diagnose

    assert diagnose.main(["--tables", str(tmp_path), "--samples", "32", "--out", str(tmp_path)]) == 0
    (d,) = json.loads((tmp_path / "diagnosis.json").read_text())
    assert (d["model"], d["mixture"], d["nfe"]) == ("analytic-sd3_flow", "reference", 5)
    assert d["rmse"] == pytest.approx(rows[1]["rmse"], rel=1e-3) and d["wrong_mode"] == rows[1]["wrong_mode"]
    assert sum(d["commit_step"].values()) == d["wrong_mode"]
    assert set(d["commit_step"]) <= {"1", "2", "3", "4", "5", "end"}
    assert d["teacher"] == f"dpm2 M={DistillConfig.node_default('teacher_m')}" and d["teacher_rmse"] < d["rmse"]
    assert not any("ratio" in r for r in rows)  # carry.json's built-ins ran on 8,192 other noises
    case = {"model": "analytic-sd3_flow", "mixture": "reference", "nfe": 5}
    carry = [{**case, "samples": 32, "sampler": "ipndm", "rmse": 0.2}, {**case, "samples": 32, "sampler": "epd_carry",
             "rmse": 0.1}, {**case, "samples": 64, "sampler": "euler", "rmse": 0.15}]  # fmt: skip
    assert defaults.best_builtin(carry, "sd3_flow", "reference", 5, 32)["sampler"] == "ipndm"


def test_defaults_benchmark_pairs_each_ratio_with_the_builtin_run_again_on_the_same_noises(tmp_path):
    """bench.defaults runs the recorded best built-in again on its noises: the ratio gets a paired bootstrap interval,
    and a record the re-run does not reproduce (other noises, another sampler) is refused before any training."""
    import comfy.samplers

    from bench import defaults
    from bench.accuracy import builtin_sigmas, metrics, run
    from bench.carry import held_out

    _, noise, model, gm, exact, _ = held_out("sd3_flow", "reference", 32)
    sigmas = builtin_sigmas(model.get_model_object("model_sampling"), "euler", "beta", 5)
    out, c = run(model, comfy.samplers.sampler_object("euler"), sigmas, noise)
    euler = {"model": "analytic-sd3_flow", "mixture": "reference", "samples": 32, "nfe": c.rounds, "sampler": "euler",
             "scheduler": "beta", **metrics(gm, out, exact)}  # fmt: skip
    carry = tmp_path / "carry.json"
    carry.write_text(json.dumps([euler]))
    args = ["--forms", "sd3_flow", "--mixtures", "reference", "--nfes", "5", "--samples", "32", "--set", "iterations=2",
            "--out", str(tmp_path), "--carry", str(carry)]  # fmt: skip
    assert defaults.main(args) == 0
    rows = json.loads((tmp_path / "defaults.json").read_text())
    assert len(rows) == 2 and all(r["builtin"] == "euler / beta" for r in rows)
    for r in rows:
        lo, hi = r["ratio_ci"]
        assert r["ratio"] == pytest.approx(euler["rmse"] / r["rmse"]) and lo < r["ratio"] < hi
    assert "x [{:.2f}, {:.2f}] |".format(*rows[1]["ratio_ci"]) in (tmp_path / "defaults.md").read_text()
    carry.write_text(json.dumps([{**euler, "rmse": euler["rmse"] * 1.01}]))
    with pytest.raises(RuntimeError, match="carry.json records .*run bench.carry again"):
        defaults.main(args)


def test_unseen_benchmark_fits_with_the_nodes_defaults_against_the_whole_field(tmp_path):
    """bench.unseen: a model the defaults were not chosen on (offset, anisotropic mixture), the whole built-in field
    with the tuned schedules that fit, and the node's fitted table with its ratio to the best of that field."""
    import comfy.samplers

    from bench import unseen
    from bench.accuracy import DETERMINISTIC

    gm = unseen.latent_mixture(2026)
    assert not gm.isotropic and float(gm.means.mean((0, 2, 3)).abs().max()) > 0.2  # not centred
    assert unseen.main(["--models", "latent-sd15", "--nfes", "5", "--samples", "48", "--set", "iterations=2",
                        "start_check=0", "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads((tmp_path / "unseen.json").read_text())
    assert all(r["nfe"] == 5 and r["answer_key_gap"] < 1e-3 for r in rows)
    field = [r for r in rows if r["sampler"] != "epd_defaults"]
    assert {r["sampler"] for r in field} == set(DETERMINISTIC) - {"heunpp2"}  # 3 calls a step: no NFE 5
    assert {"karras", "AlignYourSteps(SD1)", "GITS(1.2)"} <= {r["scheduler"] for r in field}
    assert len(field) > len(comfy.samplers.SCHEDULER_NAMES) * 10
    (epd,) = [r for r in rows if r["sampler"] == "epd_defaults"]
    best = min(field, key=lambda r: r["rmse"])
    assert epd["builtin"] == f"{best['sampler']} / {best['scheduler']}" and epd["settings"]["iterations"] == 2
    assert epd["ratio"] == pytest.approx(best["rmse"] / epd["rmse"]) and epd["ratio_ci"][0] <= epd["ratio_ci"][1]
    table = (tmp_path / "unseen.md").read_text()
    assert "| latent-sd15 | 5 | iterations 2, start_check 0 |" in table
    assert f"| {epd['rmse_right_mode']:.4f} / {best['rmse_right_mode']:.4f} |" in table  # in-mode: EPD / built-in
    # another training seed adds its own EPD row; the built-in field (the same noises) is replaced, not repeated
    assert unseen.main(["--models", "latent-sd15", "--nfes", "5", "--samples", "48", "--set", "iterations=2",
                        "start_check=0", "seed=1", "--out", str(tmp_path)]) == 0  # fmt: skip
    again = json.loads((tmp_path / "unseen.json").read_text())
    assert [r for r in again if r["sampler"] != "epd_defaults"] == field
    assert sorted(r["settings"].get("seed", 0) for r in again if r["sampler"] == "epd_defaults") == [0, 1]
    assert "| latent-sd15 | 5 | iterations 2, seed 1, start_check 0 |" in (tmp_path / "unseen.md").read_text()


def test_defaults_compare_pairs_each_case_and_counts_the_targets(tmp_path, capsys):
    """bench.defaults --compare: each case of the candidate beside the same case of the base (the estimate ending
    only), its gain, and per NFE the cases it was better in, the targets met (1.5x at NFE 5, 1.0x at 10), the
    geometric-mean ratio and the wrong-component samples; runs pair by training seed."""
    from bench import defaults

    def row(mixture, nfe, rmse, wrong, builtin=0.2, ending="+estimate", typical=0.01, sw=0.002):
        return {"model": "analytic-x", "mixture": mixture, "nfe": nfe, "scheduler": ending, "start": "model grid",
                "rmse": rmse, "wrong_mode": wrong, "builtin": "euler / beta", "builtin_rmse": builtin,
                "ratio": builtin / rmse, "rmse_right_mode": typical, "sliced_wasserstein": sw}  # fmt: skip

    base = [row("a", 5, 0.1, 10), row("b", 5, 0.2, 20), row("a", 10, 0.1, 4, builtin=0.1),
            row("a", 5, 0.5, 99, ending="at sigma_min")]  # fmt: skip
    other_seed = {**row("b", 5, 0.01, 0), "settings": {"seed": 1}}  # no base run of seed 1: never paired
    base.append(row("a", 7, 0.1, 3))
    new = [row("a", 5, 0.05, 5, typical=0.04, sw=0.001), row("b", 5, 0.25, 30, typical=0.0025, sw=0.001),
           row("a", 10, 0.2, 8, builtin=0.1), other_seed, row("a", 7, 0.05, 2), row("a", 6, 0.1, 1)]  # fmt: skip
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert defaults.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "new.json")]) == 0
    text = capsys.readouterr().out
    assert "| base | new | gain |" in text
    assert (
        "| analytic-x | a | model grid | euler / beta 0.2000 | 0.1000 (10) **2.00x** | 0.0500 (5) **4.00x** | 2.00x |"
    ) in text
    # NFE 5: a 2.00x -> 4.00x (met both), b 1.00x -> 0.80x (met neither); geometric means sqrt(2) -> sqrt(3.2)
    # and the samples that stay in their component: 0.01 and 0.01 -> 0.04 and 0.0025, geometric mean 0.01 both;
    # the sliced Wasserstein distance halved in both
    assert "2 cases: new better in 1; target (1.5x) met 1 -> 1; geometric-mean ratio 1.41x -> 1.79x; " \
           "wrong-component samples 30 -> 35; samples in their component: RMSE geometric mean 0.0100 -> 0.0100, " \
           "better in 1; sliced Wasserstein distance geometric mean 0.0020 -> 0.0010, better in 2" in text  # fmt: skip
    assert "1 cases: new better in 0; target (1.0x) met 1 -> 0; geometric-mean ratio 1.00x -> 0.50x; " \
           "wrong-component samples 4 -> 8" in text  # fmt: skip
    assert "1 cases: new better in 1; no target; geometric-mean ratio 2.00x -> 4.00x; " in text  # NFE 7: none set
    assert "### NFE 6" not in text  # a candidate's NFE that the base never ran: nothing to pair
    assert "| a (seed 1) |" not in text and "| b (seed 1) |" not in text  # seed 1's run had no base to pair with
    assert "Numerics differ" not in text  # neither side recorded them: nothing to tell apart
    # a base trained on other CPU kernels is paired, with a warning naming both sides' numerics
    (tmp_path / "new.json").write_text(json.dumps([{**r, "numerics": "torch 2.14.1, AVX512"} for r in new]))
    assert defaults.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "new.json")]) == 0
    text = capsys.readouterr().out
    assert "Numerics differ (base: not recorded; new: torch 2.14.1, AVX512)" in text and "| base | new | gain |" in text


def test_defaults_compare_refuses_a_record_with_two_runs_of_one_seed(tmp_path, capsys):
    """A record holding two runs of one case and seed (a budget study: 800, 1,600, 3,200 iterations) is not paired
    silently with the last: --compare names the case and both settings, and --where picks the base's run."""
    from bench import defaults

    def row(rmse, settings):
        return {"model": "analytic-x", "mixture": "a", "nfe": 5, "scheduler": "+estimate", "start": "model grid",
                "rmse": rmse, "wrong_mode": 1, "builtin": "euler / beta", "builtin_rmse": 0.2, "ratio": 0.2 / rmse,
                "settings": settings}  # fmt: skip

    base = [row(0.1, {"iterations": 800, "seed": 1}), row(0.05, {"iterations": 3200, "seed": 1}),
            row(0.2, {"iterations": 1600, "seed": 1})]  # fmt: skip
    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "new.json").write_text(json.dumps([row(0.04, {"seed": 1, "grid_lr": 0.03})]))
    files = ["--compare", str(tmp_path / "base.json"), str(tmp_path / "new.json")]
    with pytest.raises(SystemExit) as stop:
        defaults.main(files)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "base holds two runs of analytic-x / a NFE 5 seed 1" in err and "'iterations': 800" in err
    assert "--where" in err
    assert defaults.main([*files, "--where", "iterations=3200"]) == 0
    text = capsys.readouterr().out
    case_text = "| analytic-x | a (seed 1) | model grid | euler / beta 0.2000 |"
    # the 3,200-iteration run, not the last; the row names its seed
    assert f"{case_text} 0.0500 (1) **4.00x** | 0.0400 (1) **5.00x** | 1.25x |" in text
