"""The offloaded runtime: expert access through the native cache, memory planning, generation."""
