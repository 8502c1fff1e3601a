"""Graph rewrites that run before Q/DQ is written, each exact in float and each in its own module with one
entry point that returns what it touched (the report's "how the INT8 model was built"):

- `smooth.smooth_inputs`: SmoothQuant for MatMul / Gemm inputs with outlier channels;
- `shift.shift_nonnegative`: post-ReLU activations quantized around mid-range;
- `split.split_activations`: a dominant activation quantized in K pieces;
- `bias_correction.correct_biases`: the quantized weights' mean error folded into the biases.

`patterns` holds what they share: activation bounds, bias slots, input sums.
"""
