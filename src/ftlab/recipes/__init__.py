"""The top floor's recipes: experiments (``ftlab run``), single training runs (``ftlab train``) and the demo.

- ``experiment.py``: the experiment config and ``validate``, which checks every nested mapping first;
- ``trainers.py``: ``TRAINERS``, the objectives a stage can train with;
- ``run.py``: the run loop (base once, arms through stages, evaluation, repair sweep, summary);
- ``train.py``: ``ftlab train`` (one config, one model, one method);
- ``demo.py``: the demo experiment.
"""
