"""Stream builders. Importing this package registers every built-in stream.

Each builder is a function ``(**args) -> clbench.Stream`` registered by name,
e.g. ``from streams import teacher_student``.
"""
from streams.teacher_student import teacher_student

__all__ = ["teacher_student"]
