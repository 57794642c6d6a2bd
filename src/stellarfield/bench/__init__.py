"""``stellarfield bench``: a trained model measured on held-out spectra against baselines and the
surveys, with the measurements of :mod:`stellarfield.eval`.

* :mod:`.run`: the orchestration (:func:`.run.run_bench`): loads the splits, runs every section,
  writes ``report.json``, ``metrics.json``, ``report.md`` and ``plots/``;
* :mod:`.data`: the test and train spectra (one split of one or several datasets, capped per product);
* :mod:`.model`: the fits of the test and train spectra;
* :mod:`.rv`: the RV comparison in matching frames, per product;
* :mod:`.pairs`: the ``pairs`` section (one star, two instruments; the multi-epoch star);
* :mod:`.sections`: the report as typed data (one dataclass per section, :class:`.sections.BenchReport`
  and its ``to_json()``, the one path to ``report.json``);
* :mod:`.report`: ``metrics.json`` (headline numbers) and ``report.md``, rendered from the typed report.
"""
