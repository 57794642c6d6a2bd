"""Measurements of a spectrum model on held-out spectra: the library ``stellarfield bench``,
``stellarfield explain`` and ``benchmarks/`` measure with.

Modules (most take plain arrays or :class:`~stellarfield.spectrum.Spectrum` records):

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
* :mod:`.plots`: the figures; :mod:`.report_text`: numbers and tables as text in every report
  (and JSON-safe numbers);
* :mod:`.realism`: generated vs held-out real spectra (two-sample AUC with the instrument's noise, lines);
* :mod:`.pairs`: one star, two instruments (cross-prediction, latent distances, multi-epoch stability);
* :mod:`.speed`: generation speed against the Payne emulator;
* :mod:`.explain`, :mod:`.explain_plots`: the ``explain`` command's analysis.

Nothing here knows about ``stellarfield bench``: :mod:`stellarfield.bench` puts these measurements
together on a model's test split and writes the report.
"""
