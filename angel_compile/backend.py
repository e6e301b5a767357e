"""The torch.compile backend "angel" (entry point `torch_dynamo_backends` in pyproject.toml).

    torch.compile(model, backend="angel", options={"recipe": "int8-weight-only"})

Dynamo's graph goes through aot_autograd to ATen; parameters, which arrive as graph inputs,
are frozen into the graph (`capture.freeze_parameters`) so passes can rewrite weights; then
the recipe's PassManager runs. The backend compiles for inference: it traces with autograd
off and assumes parameters do not change after compilation (like inductor's freezing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from functorch.compile import make_boxed_func
from torch import fx
from torch._dynamo.backends.common import aot_autograd
from torch._subclasses.fake_tensor import unset_fake_temporarily

from angel_compile.capture import freeze_parameters, parameter_path
from angel_compile.errors import RecipeError
from angel_compile.passes.base import PassContext
from angel_compile.passes.manager import PassManager
from angel_compile.recipe import load_recipe

OPTION_KEYS = ("recipe", "debug_dir", "disable", "stop_after", "check_numerics")


def angel_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], options: Mapping[str, Any] | None = None) -> Any:
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_KEYS))
    if unknown:
        raise RecipeError(f"backend 'angel': unknown option(s) {unknown}; accepted: {list(OPTION_KEYS)}")
    recipe = load_recipe(options.get("recipe"))
    manager = PassManager(
        recipe.build_passes(),
        debug_dir=options.get("debug_dir"),
        disable=options.get("disable", ()),
        stop_after=options.get("stop_after"),
        check_numerics=options.get("check_numerics"),
    )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    parameters = {
        index: (parameter_path(_source_name(node), node.name), value)
        for index, (node, value) in enumerate(zip(placeholders, example_inputs, strict=True))
        if isinstance(value, torch.nn.Parameter)
    }

    def compile_aten(aten_gm: fx.GraphModule, aot_inputs: Sequence[Any]) -> Any:
        if len(aot_inputs) != len(example_inputs):
            raise RuntimeError(
                f"aot_autograd changed the inputs ({len(example_inputs)} -> {len(aot_inputs)}); "
                "cannot tell which are parameters"
            )
        # aot_autograd calls its compilers inside its fake mode; passes work on real weights.
        with unset_fake_temporarily():
            kept = freeze_parameters(aten_gm, parameters)
            real_inputs = tuple(_concrete(example_inputs[i]) for i in kept)
            rewritten, _ = manager.run(aten_gm, PassContext(example_args=real_inputs, whole_model=False))

        def run(*args: Any) -> Any:
            return rewritten(*[args[i] for i in kept])

        return make_boxed_func(run)

    # With autograd off, and no grad-mode switch inside the graph to turn it back on (transformers'
    # rotary embeddings run under @torch.no_grad()), aot_autograd traces its inference graph.
    _drop_grad_mode_switches(gm)
    with torch.no_grad():
        compiled = aot_autograd(fw_compiler=compile_aten, inference_compiler=compile_aten)(gm, example_inputs)

    def run_without_grad(*args: Any) -> Any:
        with torch.no_grad():
            return compiled(*args)

    return run_without_grad


def _drop_grad_mode_switches(gm: fx.GraphModule) -> None:
    switches = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch._C._set_grad_enabled]
    for node in switches:
        gm.graph.erase_node(node)
    if switches:
        gm.recompile()


def _source_name(node: fx.Node) -> str:
    grapharg = node.meta.get("grapharg")
    return grapharg.source.name if grapharg is not None and grapharg.source is not None else ""


def _concrete(value: Any) -> Any:
    # Dynamo passes symbolic sizes as SymInts; their hint is the size it traced with.
    return int(value.node.hint) if isinstance(value, torch.SymInt) else value
