"""Entry points run as real multi-process (gloo) jobs by the distributed tests."""
