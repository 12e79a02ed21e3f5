"""``autoglm convert``: a Hugging Face directory or GGUF file -> an Orbax checkpoint under checkpoints/.

Owns: the flags of this command; the conversion is ``checkpoint.convert.convert_checkpoint``.
"""

from __future__ import annotations

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Source: Hugging Face directory or .gguf file (default: the embedded SmolLM2).")
flags.DEFINE_string("output", None, "Destination directory (default: checkpoints/<source name>).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Dtype of the stored weights.")
flags.DEFINE_string("quantization", None, "Quantize every decoder linear projection with this scheme (int8, fp8, "
                    "w8a8-int8, w8a8-fp8, int4, int4-g64, int4-g128, q8_0, q4_0, q4_1); scales are stored.")
flags.DEFINE_string("calibration_file", None, "With --quantization: a text file of calibration prompts (one per "
                    "line) run through the float model; weights are quantized by calibration (clipping, GPTQ) "
                    "on its activations instead of round-to-nearest.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from autoglm_jax.checkpoint.convert import convert_checkpoint, read_calibration_prompts

    prompts = read_calibration_prompts(FLAGS.calibration_file) if FLAGS.calibration_file else None
    path = convert_checkpoint(FLAGS.model, FLAGS.output, FLAGS.dtype, FLAGS.quantization, calibration_prompts=prompts)
    print(f"[autoglm] wrote {path}")


if __name__ == "__main__":
    app.run(main)
