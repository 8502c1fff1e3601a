"""TensorRT engines (FP32, FP16, INT8) and the runner that evaluates them: the only package that imports tensorrt.

One job per module (import each name from the module that owns it; this file imports nothing, so that
`quantpipe.deps` can import `version` without pulling in the rest):

- `version`    which TensorRT is installed and what it offers (`tensorrt_status`, `TrtApi`, `api_for_version`,
               `require_tensorrt`, `MIN_VERSION`), and the lazy `trt` module every other module here uses.
- `plan`       how one engine is built on that version (`plan_build`, `resolve_int8_mode`,
               `variant_skip_reason`) and the inputs checked before TensorRT sees them (`check_source_model`,
               `ShapeRange`, `normalize_profiles`, `check_profiles`).
- `metadata`   the GPU (`GpuInfo`, `current_gpu`) and the metadata JSON beside every engine (`EngineInfo`,
               `metadata_path_for`, `read_engine_metadata`, `check_engine_metadata`, `write_engine_metadata`).
- `calibrator` implicit INT8 calibration for TensorRT <= 10 (`CalibrationInput`, `CalibrationFeed`,
               `make_calibrator`: the IInt8EntropyCalibrator2 / IInt8MinMaxCalibrator subclass).
- `build`      `build_engine` and its helpers (the TensorRT logger, the serialized build, the timing cache).
- `runner`     `TensorRTRunner`, which runs an engine by tensor name on one CUDA stream.

CUDA memory, streams and the calibration batcher are not TensorRT: they live in `quantpipe.cuda`.

The installed TensorRT picks the build path:

- **8.6 - 10.x** (weak typing): FP16 and INT8 through builder flags. INT8 either from the explicit Q/DQ
  model quantpipe writes, or through implicit calibration with an `IInt8EntropyCalibrator2` /
  `IInt8MinMaxCalibrator` subclass that feeds batches to device memory and reads quantpipe's own
  calibration cache (so TensorRT skips calibration and uses quantpipe's scales).
- **11.x** (strong typing only; NVIDIA's 10.x -> 11.x migration guide): the precision comes from the
  model. FP16 from the FP16 model, INT8 from the Q/DQ model; the weak-typing names the guide lists as
  removed (BuilderFlag.FP16 / INT8, the IInt8 calibrators, `int8_calibrator`, calibration profiles) are
  never touched on that path.

tensorrt is imported lazily, on first use (`version.trt`): every module here imports (and reports why
TensorRT variants are skipped) on machines without TensorRT, CUDA or a GPU. Every engine is written
atomically with a metadata JSON beside it (TensorRT version, GPU, compute capability, source model hash,
build options); a runner refuses an engine built for another GPU or TensorRT version.
"""
