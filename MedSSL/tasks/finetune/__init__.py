"""Supervised fine-tuning of a (pretrained) GenesisUNet: labels, patch sampling, augmentation, losses, training.

* :mod:`.labels`: label maps (0 background, 1..254 classes, 255 not annotated), class names and colours.
* :mod:`.sampling`: class-balanced patch sampling centred on annotated voxels.
* :mod:`.augment`: random flips, small rotations/scalings and intensity jitter on batches (torch).
* :mod:`.losses`: Dice + cross-entropy with the not-annotated voxels masked out.
* :mod:`.segment`: ``medssl finetune --task segment``; :mod:`.classify`: ``--task classify``.
"""
