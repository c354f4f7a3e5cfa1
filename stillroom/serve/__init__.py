"""Runtimes (torch, onnxruntime, tensorrt), the student-vs-teacher benchmark and the HTTP server.

This module is the ``serve`` plugin: it registers the three runtimes and the ``bench`` and ``serve``
commands. Everything heavy is imported inside the functions.
"""

from stillroom.core.hookspecs import hookimpl


@hookimpl
def register_runtimes(register):
    from stillroom.serve import runtimes

    register("torch", runtimes.torch_runtime)
    register("onnxruntime", runtimes.onnxruntime_runtime)
    register("tensorrt", runtimes.tensorrt_runtime)


@hookimpl
def register_commands(cli):
    from stillroom.serve.commands import bench, serve

    cli.add_command(bench)
    cli.add_command(serve)
