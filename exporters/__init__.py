"""Writers of layer-surgery: each turns a planned model into files on disk (or elsewhere).

* :mod:`exporters.staging` — the temporary-directory-then-rename discipline every writer uses;
* :mod:`exporters.safetensors` — sharded safetensors, tensor bytes copied kernel-side;
* :mod:`exporters.card` — the model card (README.md) of every output, updated by validation;
* :mod:`exporters.hub` — push an output to the Hugging Face Hub in one commit (``surgery.push``);
* :mod:`exporters.onnx` — ONNX export with KV cache, validated against PyTorch (``surgery.export_onnx``):
  :mod:`exporters.onnx_model` loads the PyTorch model, :mod:`exporters.onnx_graph` traces and saves the graph,
  :mod:`exporters.onnx_parity` holds it to PyTorch in ONNX Runtime;
* :mod:`exporters.onnx_session` — ONNX Runtime sessions on CPU or CUDA and the decoder loop with its KV cache;
* :mod:`exporters.onnx_runtime` — the runner (``surgery.generate``), exporting into the cache on first use.
"""
