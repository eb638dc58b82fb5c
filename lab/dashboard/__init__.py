"""The ΔL Lab dashboard (``streamlit run app.py``).

- :mod:`~lab.dashboard.data`: run discovery, incremental loading (RunReader.poll), seed statistics;
- :mod:`~lab.dashboard.colors`: one colour per aggregator label;
- one module per view, each a set of functions from run data to plotly figures (no streamlit):
  :mod:`~lab.dashboard.overview`, :mod:`~lab.dashboard.lengths`, :mod:`~lab.dashboard.noise`,
  :mod:`~lab.dashboard.weights`, :mod:`~lab.dashboard.two_worlds` (the stored 2x2 benchmark),
  :mod:`~lab.dashboard.playground`, :mod:`~lab.dashboard.launch`;
- :mod:`~lab.dashboard.ui`: the streamlit rendering of those views, used by ``app.py``.
"""
