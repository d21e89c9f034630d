"""The GPU fast path: identical latents to the ordinary path (GPU), and a clean fallback where it cannot run."""

from __future__ import annotations

import pytest
import torch
from models import tiny_sd15_unet, tiny_sdxl_unet


def _run(pack, model, pos, latent, seed, steps, guidance, **options):
    """One sampling run through the adapter, as the nodes make it; returns (samples, SamplingStats)."""
    config = pack.core.SamplingConfig(seed=seed, steps=steps, guidance_scale=guidance, progress=False, **options)
    out, stats = pack.comfy.sampler.sample(model, pos, None, latent, config)
    return out["samples"], stats


def _sample(pack, model, pos, fast, guidance, shape=(1, 4, 8, 8)):
    return _run(pack, model, pos, {"samples": torch.zeros(shape)}, 7, 4, guidance, fast=fast)


def _positive(family: str, seed: int) -> list:
    """A batch-1 positive CONDITIONING for the tiny SD1.5 or SDXL UNets (SDXL with pooled text and size ids)."""
    from oracles import diffusers_to_conditioning

    g = torch.Generator().manual_seed(seed)
    if family == "sd15":
        return [[torch.randn(1, 77, 768, generator=g), {}]]
    return diffusers_to_conditioning(torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g),
                                     torch.tensor([[64.0, 64.0, 0, 0, 64.0, 64.0]]))


def _clone(pack, model):
    """The sampling clone LCM Sampler runs ``model`` on (fast path on, timestep_scaling 10)."""
    lcm_sampling = pack.comfy.model_sampling.LCMModelSampling
    return pack.comfy.fastpath.sampling_clone(model, ("lcm", 10.0), lambda mc: lcm_sampling(mc, 10.0), True)


def test_fast_flag_on_cpu_installs_no_graph_wrapper_and_changes_nothing(pack):
    """On a CPU ``fast=True`` and ``fast=False`` run the same code: the fast clone gets no graph wrapper at all, so
    no forward goes through it (neither replayed nor counted as eager). The GPU tests compare the two paths."""
    import comfy.model_management

    if comfy.model_management.get_torch_device().type != "cpu":
        pytest.skip("ComfyUI runs on a GPU here: the fast path's CPU case needs ComfyUI on the CPU")

    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "cpu-fast", "fp32")
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(0)), {}]]
    a, stats = _sample(pack, model, pos, True, 8.0)
    b, _ = _sample(pack, model, pos, False, 8.0)
    assert not _clone(pack, model).model.get_wrappers(pack.comfy.fastpath.DIFFUSION_MODEL, pack.comfy.fastpath.FAST_WRAPPER_KEY)
    assert stats.graph_calls == 0 and stats.eager_calls == 0, stats
    assert torch.equal(a, b)


def test_the_graph_wrapper_makes_no_reference_cycle(pack):
    """The fast clone's graph wrapper (installed on CUDA) sits in the clone's own wrappers: were it to hold the clone
    strongly, a MODEL that sampled would be freed only by Python's cycle collector, and until then ComfyUI kept one
    more loaded-model entry per prompt (seen on an H100: 8, 8, 9, 9, 10, ... over alternating prompts). Installed by
    hand here so that the CPU checks it too: with the collector off, dropping the input MODEL frees the clone."""
    import gc
    import weakref

    fastpath = pack.comfy.fastpath
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "cycle", "fp32")
    clone = _clone(pack, model)
    clone.model.add_wrapper_with_key(fastpath.DIFFUSION_MODEL, fastpath.FAST_WRAPPER_KEY, fastpath._make_fast_wrapper(clone.model, clone))
    patcher = weakref.ref(clone.model)
    gc.collect()
    gc.disable()
    try:
        del clone, model
        assert patcher() is None, "the sampling clone outlived its MODEL: a reference cycle holds it"
    finally:
        gc.enable()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("family,guided", [("sd15", True), ("sd15", False), ("sdxl", True), ("sdxl", False)])
def test_fast_path_equals_ordinary_path_on_gpu(pack, family, guided):
    unet = (tiny_sd15_unet if family == "sd15" else tiny_sdxl_unet)(time_cond_proj_dim=256 if guided else None)
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(unet.state_dict()), f"gpu-{family}", "fp16")
    pos = _positive(family, seed=1)
    for batch in (1, 2):
        eager, _ = _sample(pack, model, pos, False, 8.0 if guided else 1.5, (batch, 4, 8, 8))
        fast, stats = _sample(pack, model, pos, True, 8.0 if guided else 1.5, (batch, 4, 8, 8))
        assert stats.graph_calls == 4 and stats.eager_calls == 0
        assert (fast - eager).abs().max().item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("family,cfg,gamma", [("sd15", 1.0, 0.3), ("sd15", 1.5, 0.0), ("sdxl", 1.0, 0.3), ("sdxl", 1.5, 0.5)])
def test_tcd_fast_path_equals_ordinary_path_on_gpu(pack, family, cfg, gamma):
    """TCD Sampler takes the same fast path (graphs per step, noise drawn inside the step): identical latents."""
    unet = (tiny_sd15_unet if family == "sd15" else tiny_sdxl_unet)(time_cond_proj_dim=None)
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(unet.state_dict()), f"gpu-tcd-{family}", "fp16")
    pos = _positive(family, seed=3)
    import importlib

    comfy_tcd = importlib.import_module(f"{pack.root}.lcm_comfy.tcd")
    for batch in (1, 2):
        runs = []
        for fast in (False, True):
            config = pack.core.TCDConfig(seed=11, steps=4, guidance_scale=cfg, gamma=gamma, fast=fast, progress=False)
            out, stats = comfy_tcd.sample_tcd(model, pos, None, {"samples": torch.zeros(batch, 4, 8, 8)}, config)
            runs.append((out["samples"], stats))
        (eager, _), (fast_out, stats) = runs
        assert stats.graph_calls == 4 and stats.eager_calls == 0
        assert (fast_out - eager).abs().max().item() == 0.0


def _count_syncs(fn) -> int:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message).lower() for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisation is a GPU matter (run on the device machine)")
@pytest.mark.parametrize("guided", [True, False])
def test_no_host_synchronisation_between_steps_on_gpu(pack, guided):
    """A run's host-device synchronisations do not grow with the number of steps (none inside the loop)."""
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sdxl_unet(time_cond_proj_dim=256 if guided else None).state_dict()), "sync", "fp16")
    pos = _positive("sdxl", seed=2)
    counts = {}
    for steps in (2, 8):
        def run(steps=steps):
            _run(pack, model, pos, {"samples": torch.zeros(1, 4, 8, 8)}, 3, steps, 8.0 if guided else 1.5, fast=True)
        run()  # capture and loading happen outside the count
        counts[steps] = _count_syncs(run)
    assert counts[2] > 0, "the sync detector saw nothing: the comparison below would prove nothing"
    assert counts[8] <= counts[2], f"host synchronisations per run grow with the steps: {counts}"


def test_conditioning_moves_to_the_sampling_device_without_touching_the_users(pack):
    """The per-run copy of the encoded conditioning moves; the CONDITIONING the user passed in does not."""
    import comfy.conds

    user_cond = torch.randn(1, 77, 768)
    shared = comfy.conds.CONDCrossAttn(user_cond)
    entry = {"model_conds": {"c_crossattn": shared, "constant": comfy.conds.CONDConstant(3)}}

    class Guider:
        conds = {"positive": [entry], "negative": []}
        inner_model = None

    import importlib

    importlib.import_module(f"{pack.root}.lcm_comfy.run").inputs_to_device(Guider(), torch.device("meta"))
    moved = entry["model_conds"]["c_crossattn"]
    assert moved.cond.device.type == "meta" and moved is not shared
    assert shared.cond is user_cond and user_cond.device.type == "cpu"
    assert entry["model_conds"]["constant"].cond == 3


def test_weights_watch_sees_replaced_weights_and_rewalks_after_forget():
    from lcm_core.graphs import WeightsWatch

    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    watch = WeightsWatch()
    first = watch(net)
    assert watch(net) == first
    net[0].weight = torch.nn.Parameter(torch.randn(3, 3))  # what a LoRA patch does: a new tensor in the slot
    second = watch(net)
    assert second != first
    net[2] = torch.nn.Linear(3, 2)  # a swapped sub-module is only seen once the tree is walked again
    assert watch(net) == second
    watch.forget()
    third = watch(net)
    assert third != second
    net[0].weight.data = net[0].weight.data.half()  # moved or cast in place (Module.to): same object, new storage
    fourth = watch(net)
    assert fourth != third


def test_weights_watch_sees_empty_slots_filled_and_emptied():
    from lcm_core.graphs import WeightsWatch

    net = torch.nn.Sequential(torch.nn.Linear(3, 3, bias=False), torch.nn.Linear(3, 2))  # a None slot (no bias)
    watch = WeightsWatch()
    first = watch(net)
    assert watch(net) == first
    net[0].bias = torch.nn.Parameter(torch.zeros(3))  # an empty slot filled
    filled = watch(net)
    assert filled != first
    net[0].bias = None
    assert watch(net) == first
    net[1].bias = None  # a tensor slot emptied
    assert watch(net) not in (first, filled)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_keep_graphs_off_frees_the_graph_memory_after_the_run(pack, capsys):
    """keep_graphs=False: same latents, no graph left after a run, and GPU memory flat over repeated runs."""

    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "keep", "fp16")
    clone = _clone(pack, model).model
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(4)), {}]]
    latent = {"samples": torch.zeros(2, 4, 16, 16)}
    a, kept = _run(pack, model, pos, latent, 5, 4, 8.0, fast=True)
    assert kept.graphs == 1 and kept.graph_pool_bytes > 0 and not kept.released_after_run
    assert kept.capture_warmups == [2]  # the first capture of this signature warms up first
    assert len(pack.comfy.fastpath.graph_cache_of(clone)) == 1  # kept for the next run
    pack.comfy.fastpath.release_graphs(clone)
    torch.cuda.synchronize()
    start = torch.cuda.memory_reserved()
    reserved = []
    for seed in range(8):
        b, freed = _run(pack, model, pos, latent, 5 if seed == 0 else seed, 4, 8.0, fast=True, keep_graphs=False)
        assert freed.graph_calls == 4 and freed.released_after_run
        assert freed.capture_warmups[-1] == 0  # captured again without eager warm-up forwards
        assert len(pack.comfy.fastpath.graph_cache_of(clone)) == 0
        if seed == 0:
            assert torch.equal(a, b)  # the capture without warm-up gives the same latents
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    with capsys.disabled():
        print(f"\nreserved GPU memory after release {start >> 20} MiB, after each keep_graphs=False run: {[r >> 20 for r in reserved]}")
    # capture and release again and again: every run gives its graph memory back, nothing piles up
    assert max(reserved) <= start + (1 << 20), (start >> 20, [r >> 20 for r in reserved])


def test_fast_path_blocker_names_each_case_the_capture_cannot_handle(pack):
    """The predicate alone, on stand-ins: each case is named (real runs of the first three are the GPU test below)."""
    from types import SimpleNamespace

    def patcher(lowvram=False, options=None):
        return SimpleNamespace(model=SimpleNamespace(model_lowvram=lowvram), model_options=options or {})

    x = SimpleNamespace(is_cuda=True)
    blocker = pack.comfy.fastpath.fast_path_blocker
    assert blocker(patcher(), x, None, {}, {}) is None
    assert "not on a CUDA device" in blocker(patcher(), SimpleNamespace(is_cuda=False), None, {}, {})
    assert "ControlNet" in blocker(patcher(), x, {"output": []}, {}, {})
    assert "patches" in blocker(patcher(), x, None, {"patches": {"attn1_patch": [len]}}, {})
    assert "extra model inputs ['mask']" in blocker(patcher(), x, None, {}, {"mask": 1})
    assert "low VRAM" in blocker(patcher(lowvram=True), x, None, {}, {})
    assert "torch.compile" in blocker(patcher(options={"torch_compile_kwargs": {"backend": "inductor"}}), x, None, {}, {})


def _tiny_controlnet(model):
    """A ControlNet shaped like ``model``'s UNet (ComfyUI's own cldm ControlNet, seeded random weights), loaded as
    ComfyUI's ControlNetLoader loads a file."""
    import comfy.cldm.cldm
    import comfy.controlnet
    import comfy.ops

    config = dict(model.model.model_config.unet_config)
    config.pop("out_channels")
    shapes = comfy.cldm.cldm.ControlNet(hint_channels=3, device="meta", operations=comfy.ops.disable_weight_init, **config).state_dict()
    g = torch.Generator().manual_seed(5)
    sd = {k: torch.randn(v.shape, generator=g) * (v[0].numel() ** -0.5 if v.ndim > 1 else 0.05) for k, v in shapes.items()}
    return comfy.controlnet.load_controlnet_state_dict(sd)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
@pytest.mark.parametrize("case", ["ControlNet", "attention patch", "low VRAM"])
def test_fast_path_steps_aside_on_gpu_and_gives_the_ordinary_paths_latents(pack, comfy, monkeypatch, case):
    """Real runs of what the capture cannot handle: a ControlNet attached (ComfyUI's ControlNetApplyAdvanced), an
    attention patch on the MODEL, the UNet only partly on the GPU (ComfyUI's --novram loading). fast=True replays no
    graph, runs every step eagerly through the wrapper, says why, and gives fast=False's latents exactly."""
    import comfy.model_management as mm

    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), f"aside-{case}", "fp16")
    pos = _positive("sd15", seed=5)
    if case == "ControlNet":
        hint = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(6))  # an image at the latent's 8x size
        pos, _ = comfy.ControlNetApplyAdvanced().apply_controlnet(pos, pos, _tiny_controlnet(model), hint, 0.5, 0.0, 1.0)
        why = "ControlNet"
    elif case == "attention patch":
        model = model.clone()
        model.set_model_attn1_patch(lambda q, k, v, extra_options: (q * 0.5, k, v))
        why = "patches"
    else:
        mm.unload_all_models()
        monkeypatch.setattr(mm, "vram_state", mm.VRAMState.NO_VRAM)  # weights stay off the GPU, streamed in per layer
        why = "low VRAM"
    try:
        fast, stats = _sample(pack, model, pos, True, 8.0)
        eager, _ = _sample(pack, model, pos, False, 8.0)
    finally:
        if case == "low VRAM":
            mm.unload_all_models()  # the next test loads its models fully again
    assert stats.graph_calls == 0 and stats.eager_calls == 4, stats
    assert why in (stats.fast_path_off or ""), stats.fast_path_off
    assert fast.isfinite().all() and torch.equal(fast, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_graphs_go_when_comfyui_unloads_the_model(pack):
    """/free (unload_all_models) or ComfyUI making room for another model releases the kept graphs."""
    import comfy.model_management as mm

    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "unload", "fp16")
    clone = _clone(pack, model).model
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(6)), {}]]
    a, stats = _run(pack, model, pos, {"samples": torch.zeros(1, 4, 16, 16)}, 1, 4, 8.0, fast=True)
    assert stats.graphs == 1 and len(pack.comfy.fastpath.graph_cache_of(clone)) == 1
    mm.unload_all_models()
    assert len(pack.comfy.fastpath.graph_cache_of(clone)) == 0
    b, _ = _run(pack, model, pos, {"samples": torch.zeros(1, 4, 16, 16)}, 1, 4, 8.0, fast=True)
    assert torch.equal(a, b)  # reloaded and captured again: the same latents


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_interrupt_stops_the_fast_path_within_one_step(pack):
    """ComfyUI's cancel (what /interrupt sets) stops a graph-replaying run before the next step; the next run is unaffected."""
    import comfy.model_management as mm
    import comfy.utils

    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "cancel", "fp16")
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(8)), {}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    before, stats = _run(pack, model, pos, latent, 11, 8, 8.0, fast=True)
    assert stats.graph_calls == 8

    progress: list[int] = []

    def hook(value, total, preview, node_id=None):
        progress.append(value)
        if value == 2:
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _run(pack, model, pos, latent, 11, 8, 8.0, fast=True)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        mm.interrupt_current_processing(False)
    record = _clone(pack, model).record
    assert progress[-1] == 2 and record.graph_calls == 2, (progress, record)  # cancelled after step 2 of 8

    again, after = _run(pack, model, pos, latent, 11, 8, 8.0, fast=True)
    assert after.graph_calls == 8 and torch.equal(before, again)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_fast_path_follows_lora_shape_and_dtype_changes(pack, tmp_path):
    """The graphs live on ComfyUI's model, shared by its clones: a LoRA patched in or out, a new latent size or another
    weight dtype must never replay a stale graph. Every run below is checked against the ordinary path."""
    from models import random_lora
    from safetensors.torch import save_file

    unet = tiny_sd15_unet(time_cond_proj_dim=None, seed=12)
    base = pack.comfy.loading.load_lcm_unet_state_dict(dict(unet.state_dict()), "swap", "fp16")
    save_file(random_lora(unet, "kohya", scale=1.0), str(tmp_path / "swap-lora.safetensors"))
    lora_model, report = pack.comfy.lora_patch.apply_lcm_lora(base, str(tmp_path / "swap-lora.safetensors"), 1.0)
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(9)), {}]]

    def fast_equals_ordinary(model, shape):
        fast, stats = _sample(pack, model, pos, True, 1.0, shape)
        assert stats.graph_calls == 4 and stats.eager_calls == 0
        eager, _ = _sample(pack, model, pos, False, 1.0, shape)
        assert torch.equal(fast, eager)
        return fast

    plain = fast_equals_ordinary(base, (1, 4, 8, 8))
    with_lora = fast_equals_ordinary(lora_model, (1, 4, 8, 8))
    assert not torch.equal(plain, with_lora)  # the LoRA took effect on the fast path
    assert torch.equal(fast_equals_ordinary(base, (1, 4, 8, 8)), plain)  # and is gone again without it
    fast_equals_ordinary(base, (1, 4, 16, 16))
    fast_equals_ordinary(lora_model, (2, 4, 16, 16))
    fp32 = pack.comfy.loading.load_lcm_unet_state_dict(dict(unet.state_dict()), "swap32", "fp32")
    fast_equals_ordinary(fp32, (1, 4, 8, 8))  # the same weights in fp32: captured for itself
    assert torch.equal(fast_equals_ordinary(base, (1, 4, 8, 8)), plain)  # and back to the fp16 model


def test_keep_graphs_modes_follow_comfyuis_queue(pack, monkeypatch):
    """'while queued' keeps the graphs only while prompts wait in the server's queue; 'always'/'never' as named;
    a bad value is refused before any model work."""
    import sys
    from types import SimpleNamespace

    import execution  # ComfyUI's own PromptQueue, as the server holds it

    from lcm_core.graphs import GraphCache, keep_graphs_mode

    queue = execution.PromptQueue(SimpleNamespace(queue_updated=lambda: None))
    for number in range(4):
        queue.put((number, f"prompt-{number}", {}, {}, []))
    queue.get()  # the prompt running now; 3 wait behind it

    cache = GraphCache()
    keep = pack.comfy.fastpath.keep_graphs_after_run
    monkeypatch.delitem(sys.modules, "server", raising=False)  # a library call: no server, no queue
    assert pack.comfy.fastpath.prompts_waiting() is None
    assert keep(cache, "while queued") and keep(cache, "always") and not keep(cache, "never")
    server = SimpleNamespace(PromptServer=SimpleNamespace(instance=SimpleNamespace(prompt_queue=queue)))
    monkeypatch.setitem(sys.modules, "server", server)
    assert pack.comfy.fastpath.prompts_waiting() == 3
    assert keep(cache, "while queued") and keep(cache, "always") and not keep(cache, "never")
    for _ in range(3):
        queue.get()  # the rest start (ComfyUI runs one at a time; here they only leave the queue)
    assert pack.comfy.fastpath.prompts_waiting() == 0
    assert not keep(cache, "while queued") and keep(cache, "always") and not keep(cache, "never")

    assert keep_graphs_mode(True) == "always" and keep_graphs_mode(False) == "never"
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "modes", "fp32")
    pos = [[torch.zeros(1, 77, 768), {}]]
    with pytest.raises(pack.core.LCMInputError, match=r"keep_graphs='sometimes' is not one of \['while queued', 'always', 'never'\]"):
        _run(pack, model, pos, {"samples": torch.zeros(1, 4, 8, 8)}, 0, 4, 8.0, keep_graphs="sometimes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device machine)")
def test_while_queued_frees_the_graphs_when_the_queue_is_empty(pack, monkeypatch):
    """The default: graphs stay while another prompt waits, and go after the last one; the latents never change."""
    import sys
    from types import SimpleNamespace

    queue = SimpleNamespace(waiting=2, currently_running={1: "this prompt"})
    queue.get_tasks_remaining = lambda: queue.waiting + len(queue.currently_running)
    monkeypatch.setitem(sys.modules, "server", SimpleNamespace(PromptServer=SimpleNamespace(instance=SimpleNamespace(prompt_queue=queue))))
    model = pack.comfy.loading.load_lcm_unet_state_dict(dict(tiny_sd15_unet(256).state_dict()), "queued", "fp16")
    clone = _clone(pack, model).model
    pos = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(10)), {}]]
    latent = {"samples": torch.zeros(1, 4, 16, 16)}
    results = []
    for waiting in (2, 1, 0):
        queue.waiting = waiting
        samples, stats = _run(pack, model, pos, latent, 3, 4, 8.0, fast=True)
        results.append(samples)
        assert stats.graph_calls == 4
        assert len(pack.comfy.fastpath.graph_cache_of(clone)) == (1 if waiting else 0), waiting
        assert stats.released_after_run == (waiting == 0)
    assert stats.capture_warmups == [2]  # captured once, replayed by the queued prompts
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
