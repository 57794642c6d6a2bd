"""Measurements of a spectrum model on held-out spectra: the parts of ``stellarfield bench`` that do
not depend on the model.

Modules (each takes plain arrays or :class:`~stellarfield.spectrum.Spectrum` records):

* :mod:`.metrics`: chi2_nu, residual statistics, percentile summaries, RV comparisons;
* :mod:`.resample`, :mod:`.common_grid`, :mod:`.normalise`, :mod:`.masks`: putting a product's
  spectra on one grid with their errors, per-spectrum normalisation, observed-frame masks;
* :mod:`.reconstruction`: the scoring chain every method goes through (:func:`.reconstruction.scoring_pixels`:
  masks, then normalisation; a :class:`.reconstruction.Reconstruction` and its chi2_nu / RMS);
* :mod:`.pca` (weighted EM-PCA) and :mod:`.baselines` (PCA baseline per product);
  :mod:`.payne` (The Payne's network, for speed);
* :mod:`.probes`: ridge and k-NN probes from latents to labels, cross-source probes;
* :mod:`.two_sample`: classifier two-sample test (held-out AUC);
* :mod:`.lines`: depths and equivalent widths of strong lines;
* :mod:`.plots`: the figures; :mod:`.report_text`: numbers and tables as text in every report.

``stellarfield bench`` puts them together (:func:`.bench.run_bench`): :mod:`.bench_data` (the test
and train spectra), :mod:`.bench_model` (fits, speed), :mod:`.bench_rv` (frames of the
RV comparison), :mod:`.bench_realism` (generated vs real), :mod:`.bench_report` (metrics.json and
report.md).
"""
