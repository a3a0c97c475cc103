"""The demo's organism step: train (once), harvest through the runner, analyse, print.

``show(workdir)`` ensures the translation and addition organisms (trained side by side, one process
each) and the untrained adder under ``workdir``, harvests their stores with ``harvest.runner.run``
and prints the translation-head table and the addition spectrum, trained beside untrained.
"""

from __future__ import annotations

import time
from pathlib import Path

from . import ensure_organisms, harvest_organism, record


def show(workdir: str | Path = Path("build/organisms"), log=print) -> dict:
    from analysis import fourier, translation_heads

    workdir = Path(workdir)
    t0 = time.perf_counter()
    ensure_organisms(["translation", "addition", "addition-untrained"], workdir, log=log)
    log(f"organisms ready in {workdir} ({time.perf_counter() - t0:.1f} s; trained once, both at once, then cached)")

    rec = record("translation", workdir)
    acc = rec["accuracy"]
    log(f"\ntranslation organism: {rec['model']['num_hidden_layers']} layers x {rec['model']['num_attention_heads']} "
        f"heads, accuracy {acc['translation']:.1%} on target words, {acc['induction']:.1%} on repeated words")
    stores = harvest_organism("translation", workdir)
    heads = translation_heads.analyze(stores["translation"], text=stores["text"], repeated=stores["repeated"])
    log(heads.table(top=8))
    log(f"heatmap: {heads.figure}")

    results = {"translation_heads": heads}
    for name in ("addition", "addition-untrained"):
        rec = record(name, workdir)
        stores = harvest_organism(name, workdir)
        res = fourier.analyze(stores["addition"], numbers=stores["numbers"], periods="auto", n_auto=6, n_shuffles=10)
        results[name] = res
        acc = rec["accuracy"]
        log(f"\n{name}: held-out accuracy {acc['test_accuracy']:.1%} (train {acc['train_accuracy']:.1%}); "
            f"top-1 accuracy read from the store {res.accuracy:.1%}")
        log(res.spectrum_table(top=4))
        log(res.helix_table())
    log(f"\nplots: {', '.join(str(p) for p in results['addition'].figures.values())}")
    return results
