"""The few-shot engine: a structure painted on a few planes -> the whole structure.

Used by ``medssl finetune`` when the label is a painting (planes annotated, 255 elsewhere) and by
``medssl predict --annotation``. The pieces, each in its own module:

* :mod:`.planes`: which planes were painted (any of the three axes, several at once);
* :mod:`.shape`: the shape prior: signed-distance interpolation between painted planes, and its
  tapered continuation past the first and last painted plane;
* :mod:`.appearance`: what the painted voxels look like, learned on this very volume (multi-scale
  image features + a small MLP trained online on the painted planes, after ECONet/ilastik);
* :mod:`.engine`: shape and appearance fused as log-odds, the weight of each chosen per volume by
  leave-one-plane-out on the painting itself, slice-to-slice propagation past the painted range,
  clean-up by connectivity to the painting;
* :mod:`.bundle`: the few-shot bundle (``task: "fewshot"``) that carries the appearance model and the
  calibrated settings from ``finetune`` to ``predict`` and to the next correction round.
"""
