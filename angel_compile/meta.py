"""Every `node.meta` key angel-compile reads or writes, in one place."""

# FakeTensor (or SymInt) describing the node's output; set by torch.export / aot_autograd
# and kept valid by every pass.
VAL = "val"

# transformers / torch.export record the module path a node was traced from.
NN_MODULE_STACK = "nn_module_stack"

# Where an angel-created node came from: {"pass": pass name, "replaces": [original node names],
# "layer": module path of the layer (e.g. "model.layers.0.mlp.up_proj")}.
PROVENANCE = "angel_provenance"
