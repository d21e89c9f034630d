"""lcm_tools: the tools a user runs around LCM Nodes, apart from the node pack ComfyUI imports.

- :mod:`lcm_tools.client`     HTTP client of a running ComfyUI (queue, progress, history, images)
- :mod:`lcm_tools.server`     starting and stopping a ComfyUI subprocess with this checkout's pack loaded
- :mod:`lcm_tools.locate`     finding ComfyUI and the pack's cache folder
- :mod:`lcm_tools.workflows`  bundled workflows, API-format loading, overrides, prompt files
- :mod:`lcm_tools.run`        running one prompt or a resumable queue, writing the images
- :mod:`lcm_tools.releases`   the public model files and downloading them
- :mod:`lcm_tools.smoke`      tiny random models for a smoke test without weights
- :mod:`lcm_tools.quickstart` the README's first command
- :mod:`lcm_tools.cli`        ``python -m lcm_tools run | convert | quickstart | workflows``

Nothing here imports ComfyUI or torch at import time (``_smoke_build.py`` imports ComfyUI, in a subprocess of
its own). ComfyUI never imports this package, and it is left out of the Registry archive (``.comfyignore``).
"""
