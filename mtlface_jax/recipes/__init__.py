"""End-to-end recipes: train in stages, then evaluate on what was held out.

  stages.py       AIFR, then FAS from the trained encoder (both resume)
  heldout.py      the one held-out evaluation (verification, age, FAS) and its report
  demo.py         ``make demo``: the recipe on the embedded procedural faces
  lfw_utkface.py  the recipe on real faces (LFW identities + UTKFace ages)
"""
