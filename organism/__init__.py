"""How the model organism is built and measured (not part of the installed package).

The runtime that loads the organism lives in :mod:`guardrail.models.organism`; this
folder holds the build pipeline (``build.py``, ``build_organism.py``), the data it
trains on (``data.py``, ``safety_extra.jsonl``), its measurement (``measure.py``) and
the model card (``README.md``).
"""
