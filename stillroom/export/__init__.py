"""Exporters: ONNX (generators, KV-cache LMs), TensorRT engines, Triton repositories.

This module is the built-in ``export`` plugin; heavy imports happen inside the hooks' functions.
"""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_exporters(register):
    from stillroom.export import command

    register("onnx", command.to_onnx)
    register("tensorrt", command.to_tensorrt)
    register("triton", command.to_triton)


@hookimpl
def register_commands(cli):
    from stillroom.export.command import export
    from stillroom.export.inspect import inspect_artifact

    cli.add_command(export)
    cli.add_command(inspect_artifact)
