"""Shipped job specs (``jobs/*.yaml``) and the real models' configs (``jobs/configs/``): data only.

A package only so that they install with harvest; the code that runs jobs on a cluster is ``cluster``.
"""
