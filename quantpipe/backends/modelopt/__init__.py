"""NVIDIA ModelOpt's INT8 (its own calibration, or quantpipe's scales through its Q/DQ placement) and AutoCast FP16,
built beside quantpipe's variants and judged the same way.

ModelOpt patches onnxruntime when it is imported and pins its own onnx / onnxruntime-gpu, so it never runs in
quantpipe's process: `env` finds an interpreter that has it (pipeline.yaml's `python`, else the venv `quantpipe setup
modelopt` made, see `install`), `worker` is the script that interpreter runs, `build` turns its outputs into variants.
Nothing here imports modelopt.
"""
