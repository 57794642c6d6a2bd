"""explain's figures: drawn with matplotlib's object API, from any thread, leaving pyplot alone."""

import subprocess
import sys
import textwrap


def test_figures_are_drawn_in_a_thread_without_pyplot(tmp_path):
    script = textwrap.dedent(f"""
        import sys, threading
        from pathlib import Path
        import numpy as np
        from stellarfield.eval.explain_plots import disentanglement_figure, element_bars_figure, heatmap_figure

        out = Path({str(tmp_path)!r})
        rng = np.random.default_rng(0)
        dis = {{"labels": {{"teff": {{"top_k_cv_r2": [0.5, 0.8, None]}}, "logg": {{}}}},
               "pearson": {{"teff": rng.uniform(-1, 1, 4).tolist(), "logg": rng.uniform(-1, 1, 4).tolist()}},
               "mutual_information_nats": {{"teff": rng.uniform(0, 1, 4).tolist(), "logg": rng.uniform(0, 1, 4).tolist()}}}}
        bars = {{"grid": "apogee_apstar", "per_element_mean_abs_response": {{"teff": {{"Fe": 1.0, "Mg": 0.5}}}}}}

        def draw():
            heatmap_figure(out / "heat.png", rng.normal(size=(3, 5)), list("abc"), list("vwxyz"), "t", "c")
            disentanglement_figure(out / "dis.png", dis)
            element_bars_figure(out / "bars.png", bars)

        thread = threading.Thread(target=draw)
        thread.start()
        thread.join()
        assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
        for name in ("heat.png", "dis.png", "bars.png"):
            assert (out / name).stat().st_size > 1000, name
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
