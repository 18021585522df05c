"""Test and run harness: finds or installs a ComfyUI host, builds its Python
environment, generates stand-in checkpoints and drives the server.

Nothing here is imported by the node pack itself."""
