"""Distributed activation harvester for GPT-J and GPT-NeoX.

Library first: ``harvest.run(load_spec("jobs/demo.yaml"))`` harvests a job;
``harvest.open_store(path)`` gives the stored activations as a lazy xarray Dataset.
"""

from ._version import __version__
from .spec import load_spec, parse_spec
from .store import open_store, provenance


# The runner (torch, transformers, Ray) is imported on the first call, so that reading a spec or
# opening a store does not pay for it: these two are a facade, not a dependency of the core.
def run(spec, **kwargs):
    """Harvest a job spec into its store; see ``harvest.runner.run``."""
    from .runner import run as _run

    return _run(spec, **kwargs)


def prepare(spec):
    """Validate and plan a job without writing anything; see ``harvest.runner.prepare``."""
    from .runner import prepare as _prepare

    return _prepare(spec)


__all__ = ["load_spec", "parse_spec", "open_store", "provenance", "run", "prepare", "__version__"]
