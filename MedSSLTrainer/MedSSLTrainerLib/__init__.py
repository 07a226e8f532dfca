"""Slicer-side code of the MedSSLTrainer module (Qt-free): pretraining and few-shot fine-tuning logic and
sparse-annotation extraction. Shared pieces (job runner, node<->file conversion) come from
``MedSSLCommonLib`` (the hidden MedSSLCommon module); see its package docstring for the layout."""
