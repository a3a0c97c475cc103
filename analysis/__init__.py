"""Offline analyses of harvest stores, one job per module.

- ``source``: what a store holds, from its metadata (arrays, model shape, LayerNorm weights);
- ``reading``: reading a store for the circuit analyses (hook arrays by layer, rows, Dask arrays);
- ``runtime``: where Dask graphs run (threads, sync, a ``dask.distributed`` scheduler);
- ``stats``, ``scan``: per-dimension statistics as chunk / combine / aggregate, in one pass;
- ``outliers``, ``index``, ``query``: outlier dimensions, the per-dimension index, the query by dimension;
- ``translation_heads``, ``fourier``: the circuit analyses;
- ``results``, ``plots``: results written under the store's ``analysis/``, tables, PNGs beside the store;
- ``synthetic``: stores with planted ground truth, for tests and benchmarks;
- ``cli``, ``cli_options``: the ``harvest analyze`` / ``index`` / ``query`` commands and their shared options.

Hook names are resolved by :func:`harvest.hookpoints.resolve`, the same language as ``capture.hooks``;
every error is a :class:`harvest.errors.AnalysisError` (or another ``HarvestError``).
"""
