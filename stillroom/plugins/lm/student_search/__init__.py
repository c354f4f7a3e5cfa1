"""``stillroom search-student``: which student shape to distil, under a latency limit measured on the
runtime the student ships on. ``candidates`` (the shape grid), ``latency`` (export + timed decode,
cached), ``diswot`` and ``autodistil`` (the two strategies), ``command`` (the CLI and its report)."""
