"""angel-compile: a graph compiler that makes LLMs and multimodal models cheaper to run.

Public API:
    compile(model, example_inputs, recipe=...)        -> CompiledModel
    export_onnx(model, example_inputs, path, recipe=...)
    ort_session(path)                                  -> onnxruntime.InferenceSession
    Recipe, load_recipe, builtin_recipes, PassManager
and the torch.compile backend "angel".
"""

from angel_compile import ops  # noqa: F401  (registers torch.ops.angel.*)
from angel_compile.lowering import triton as _triton_lowering  # noqa: F401  (CUDA kernels)
from angel_compile.passes import PassContext, PassManager, PipelineReport
from angel_compile.pipeline import CompiledModel, compile, export_onnx
from angel_compile.recipe import Recipe, builtin_recipes, load_recipe

__version__ = "0.1.0"


def __getattr__(name: str):
    # onnxruntime and its extensions load slowly; only ONNX users pay for them.
    if name == "ort_session":
        from angel_compile.lowering.ort import ort_session

        return ort_session
    raise AttributeError(f"module 'angel_compile' has no attribute '{name}'")


__all__ = [
    "CompiledModel",
    "PassContext",
    "PassManager",
    "PipelineReport",
    "Recipe",
    "builtin_recipes",
    "compile",
    "export_onnx",
    "load_recipe",
    "ort_session",
]
