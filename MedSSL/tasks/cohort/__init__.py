"""The cohort model: a network that learns from a few painted (or densely labelled) scans of a cohort and
segments the next scans of the same kind.

``medssl finetune`` with several images (or ``--engine network``) comes here. Each painting (a few planes
painted, 255 elsewhere) is first completed into a dense label by the few-shot engine
(:mod:`.completion`), the voxels it completed with low confidence left out of training; dense labels are
used as they are. The network is then fine-tuned on a working grid chosen for the CPU (:mod:`.grid`), from
``--init`` or from scratch, by :func:`MedSSL.tasks.finetune.segment.finetune_segmentation`.
"""
