"""Writers of layer-surgery: each turns a planned model into files on disk (or elsewhere).

* :mod:`exporters.staging` — the temporary-directory-then-rename discipline every writer uses;
* :mod:`exporters.safetensors` — sharded safetensors, tensor bytes copied kernel-side.
"""
