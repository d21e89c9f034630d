"""The ComfyUI adapter of LCM Nodes: the one package that imports ComfyUI, split by concern.

Imported when a node runs or lists its files (the node classes import it inside ``execute``; Load LCM UNet and
Apply LCM-LoRA inside ``define_schema`` for their file lists), never by ``lcm_core``. Each
module takes ComfyUI objects and goes through ComfyUI's machinery (``ModelPatcher`` clones and patches,
``comfy.sd``, ``comfy.lora``, ``comfy.sample.sample_custom``, ``latent_preview``); the maths comes from
``lcm_core``.

- :mod:`.model_sampling`: the family's model sampling (diffusers' schedule, a deterministic sigma -> timestep
  rule; LCM's adds the consistency boundary condition), the guidance embedding wrapper, ``setup_lcm`` (idempotent).
- :mod:`.loading`: the model files Load LCM UNet and Apply LCM-LoRA offer and resolve (ComfyUI's model folders),
  and Load LCM UNet itself (diffusers or ldm layout, the guidance embedding).
- :mod:`.lora_patch`: Apply LCM-LoRA (ComfyUI's key map, the fit check, patching).
- :mod:`.checks`: input checks of MODEL / CONDITIONING / LATENT shared by the samplers.
- :mod:`.run`: the one sampler path and loop skeleton both samplers run (``run_sampler``, ``consistency_loop``).
- :mod:`.sampler`: the LCM sampler: ``sample(model, positive, negative, latent, config)``.
- :mod:`.tcd`: the TCD sampler: ``sample_tcd(model, positive, negative, latent, config)``.
- :mod:`.fastpath`: the CUDA-graph glue: per-MODEL sampling clones, the graph wrapper, keep/release policy.
- :mod:`.compile`: the opt-in compile mode (``torch.compile`` inside the CUDA graph) and its refusals.
- :mod:`.vae`: LCM VAE Decode (one-piece decode, the compiled decoder where it is safe).
- :mod:`.save`: LCM Save Image (atomic PNG writes with the workflow embedded).
"""
