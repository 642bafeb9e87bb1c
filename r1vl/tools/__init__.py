"""Offline command-line tools that prepare files for a run; the trainer imports none of them.

    python -m r1vl.tools.keysteps data.jsonl     # fill a data file's key steps (StepRAR's references)
"""
