"""The core every layer builds on: streams and tasks (types), the Strategy base, the engine, metrics, the
registry, errors, file writes (io), progress bars and the device memories (buffer, class_buffer)."""
