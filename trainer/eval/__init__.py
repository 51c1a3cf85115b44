"""Evaluation: a candidate against the prompted base and production on a sealed split.

:mod:`.run` is ``loraflow eval``; it generates through an OpenAI-compatible endpoint with
:mod:`.client`, scores with :mod:`.scoring` (the scorers training's own end-of-run check in
:mod:`.heldout` uses too), and adds the built-in :mod:`.regression_suite`, the optional
:mod:`.lm_eval_suite` tasks and the optional :mod:`.judge`.
"""
