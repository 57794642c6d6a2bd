"""Convergence plot from a run's metrics.jsonl (synthetic files: no training needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stellarfield.model.convergence import (
    TIME_LABEL,
    convergence_figure,
    convergence_series,
    plot_convergence,
    update_convergence_plot,
)


def loss_record(step, time_s=None, loss=None):
    r = {"step": step, "epoch": step // 10, "loss": 5.0 / step if loss is None else loss, "s_per_step": 0.1,
         "chi2_per_pixel": {"miles": 1.0}}
    if time_s is not None:
        r["time_s"] = time_s
    return r


def val_record(step, medians, time_s=None):
    r = {"step": step, "epoch": step // 10,
         "validation": {p: {"n": 7, "chi2_nu_median": m, "chi2_nu_mean": 2 * m} for p, m in medians.items()}}
    if time_s is not None:
        r["time_s"] = time_s
    return r


def write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def run(tmp_path):
    records = [
        loss_record(10, 30.0), loss_record(20, 60.0),
        val_record(20, {"miles": 8.0, "apogee_aspcapstar": 20.0}, 66.0),
        loss_record(30, 90.0), loss_record(40, 120.0),
        val_record(40, {"miles": 4.0, "apogee_aspcapstar": 10.0}, 126.0),
        loss_record(50, 150.0),
    ]
    # a run killed mid-write: the last line is cut short
    write(tmp_path / "metrics.jsonl", records, tail='{"step": 60, "epoch": 6, "time_s": 18')
    return tmp_path


def test_series_are_the_files_numbers_in_minutes(run):
    s = convergence_series(run)
    assert s.uses_time and s.x_label == TIME_LABEL and s.skipped_lines == 1 and s.n_validations == 2
    assert list(s.validation) == ["apogee_aspcapstar", "miles"]
    np.testing.assert_array_equal(s.validation["miles"][0], [66.0 / 60, 126.0 / 60])
    np.testing.assert_array_equal(s.validation["miles"][1], [8.0, 4.0])
    np.testing.assert_array_equal(s.validation["apogee_aspcapstar"][1], [20.0, 10.0])
    np.testing.assert_array_equal(s.loss[0], np.array([30.0, 60.0, 90.0, 120.0, 150.0]) / 60)
    np.testing.assert_array_equal(s.loss[1], [5.0 / 10, 5.0 / 20, 5.0 / 30, 5.0 / 40, 5.0 / 50])


def test_plot_is_written_atomically_and_draws_the_series(run):
    path = plot_convergence(run)
    assert path == run / "convergence.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    s = convergence_series(run)
    fig = convergence_figure(s)
    top, bottom = fig.axes[:2]
    lines = {line.get_label(): line for line in top.get_lines()}
    assert set(lines) == {"miles", "apogee_aspcapstar"} and top.get_yscale() == "log"
    np.testing.assert_array_equal(lines["miles"].get_xdata(), [66.0 / 60, 126.0 / 60])
    np.testing.assert_array_equal(lines["miles"].get_ydata(), [8.0, 4.0])
    (loss_line,) = bottom.get_lines()
    np.testing.assert_array_equal(loss_line.get_ydata(), s.loss[1])
    assert bottom.get_xlabel() == TIME_LABEL
    legend = top.get_legend()
    assert legend is not None and legend.get_bbox_to_anchor().x0 > top.get_window_extent().x1 - 1  # outside the axes
    other = plot_convergence(run, out=run / "sub" / "c.pdf")
    assert other.read_bytes()[:4] == b"%PDF"
    with pytest.raises(ValueError, match=".png or .pdf"):
        plot_convergence(run, out=run / "c.txt")


def test_missing_time_falls_back_to_steps(tmp_path):
    write(tmp_path / "metrics.jsonl", [loss_record(10, 30.0), val_record(10, {"miles": 3.0}),  # old run: no time_s
                                       loss_record(20, 60.0), val_record(20, {"miles": 2.0})])
    s = convergence_series(tmp_path)
    assert not s.uses_time and "training step" in s.x_label and "time_s" in s.x_label and "validation" in s.x_label
    np.testing.assert_array_equal(s.validation["miles"][0], [10.0, 20.0])
    np.testing.assert_array_equal(s.loss[0], [10.0, 20.0])
    plot_convergence(tmp_path)
    assert convergence_figure(s).axes[1].get_xlabel() == s.x_label


def test_no_validation_plots_the_loss_and_says_so(tmp_path):
    write(tmp_path / "metrics.jsonl", [loss_record(10, 30.0), loss_record(20, 60.0), val_record(20, {}, 61.0)])
    s = convergence_series(tmp_path)
    assert s.validation == {} and s.n_validations == 0 and s.uses_time
    fig = convergence_figure(s)
    assert fig.axes[0].get_lines() == [] and "no validation records" in fig.axes[0].texts[0].get_text()
    np.testing.assert_array_equal(fig.axes[1].get_lines()[0].get_ydata(), [0.5, 0.25])
    assert plot_convergence(tmp_path).is_file()


def test_empty_missing_and_nan(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_convergence(tmp_path)
    assert update_convergence_plot(tmp_path) is None  # the training-loop call: nothing before the first line
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "ep')  # only a cut-short line
    s = convergence_series(tmp_path)
    assert s.skipped_lines == 1 and s.validation == {} and len(s.loss[0]) == 0
    assert update_convergence_plot(tmp_path) == tmp_path / "convergence.png"
    # a product with no finite median (n = 0) gives no points; the others are kept
    write(tmp_path / "metrics.jsonl", [val_record(5, {"miles": float("nan"), "galah_dr3": 2.5}, 10.0)])
    s = convergence_series(tmp_path)
    assert list(s.validation) == ["galah_dr3"] and s.validation["galah_dr3"][1].tolist() == [2.5]


def test_a_resumed_run_supersedes_the_steps_it_redid(tmp_path):
    """Killed after logging step 30 but checkpointed at step 20: the resumed run logs 30 again."""
    write(tmp_path / "metrics.jsonl", [loss_record(10, 30.0), loss_record(20, 60.0), loss_record(30, 90.0, loss=9.0),
                                       loss_record(30, 95.0, loss=1.0), loss_record(40, 125.0)])
    s = convergence_series(tmp_path)
    np.testing.assert_array_equal(s.loss[0], np.array([30.0, 60.0, 95.0, 125.0]) / 60)
    assert s.loss[1][2] == 1.0
