"""The real backends (``kontext``, ``qwen-edit``) on tiny random-weight pipelines: offline, CPU.

The RL path (``encode`` → ``velocity`` → Euler → ``decode``) must reproduce the diffusers pipeline
itself, bit for bit up to float rounding, given the same initial noise.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus
from PIL import Image

from mteditlab.editors.base import EditorError
from mteditlab.editors.hub import EditCondition, resolve_device, resolve_dtype
from mteditlab.editors.kontext import KontextEditor
from mteditlab.editors.qwen_edit import QwenEditEditor
from mteditlab.flow import ode_step
from tests.tiny_pipelines import save_as_published, tiny_kontext, tiny_qwen_edit

STEPS = 3
TEXTS = ["make the sky red", "add a small yellow cat on the left"]
SEEDS = [0, 1]
# Keep Qwen's VL and context images tiny (the pipeline's defaults are 384² and 1024² pixels).
QWEN_AREAS = dict(condition_area=56 * 56, context_area=64 * 64)
KONTEXT_TOKENS = 64  # T5 length (the pipeline's default is 512)


def make_image(seed: int, size=(30, 22)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def kontext_editor() -> KontextEditor:
    return KontextEditor(tiny_kontext(), max_sequence_length=KONTEXT_TOKENS)


def qwen_editor(plus: bool = True) -> QwenEditEditor:
    return QwenEditEditor(tiny_qwen_edit(plus), **QWEN_AREAS)


@pytest.fixture(scope="module")
def small_qwen_pipeline_areas():
    """Make ``QwenImageEditPlusPipeline`` itself use the editor's small areas."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", QWEN_AREAS["condition_area"])
        patch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", QWEN_AREAS["context_area"])
        yield


def call_pipeline(editor, images, texts, noise, cond: EditCondition, **kwargs):
    """The diffusers pipeline on the same inputs and noise, as the editor means it (chain-safe size)."""
    size = dict(height=cond.height, width=cond.width)
    if isinstance(editor, KontextEditor):
        return editor.pipe(image=images, prompt=texts, latents=noise, num_inference_steps=STEPS, **size,
                           max_area=cond.height * cond.width, _auto_resize=False,
                           max_sequence_length=KONTEXT_TOKENS, **kwargs)
    # QwenImageEditPlusPipeline runs one prompt per call
    return editor.pipe(image=images[0], prompt=texts[0], latents=noise, num_inference_steps=STEPS, **size, **kwargs)


@dataclass
class Reference:
    editor: KontextEditor | QwenEditEditor
    images: list
    texts: list
    seeds: list
    cond: EditCondition
    noise: torch.Tensor
    after_first_step: torch.Tensor  # the pipeline's latents after its first scheduler step
    outputs: list  # the pipeline's images
    scheduler: object  # a copy of the pipeline's scheduler, timesteps set by that call


def run_reference(editor, batch: int) -> Reference:
    images, texts, seeds = [make_image(i) for i in range(batch)], TEXTS[:batch], SEEDS[:batch]
    cond = editor.encode(images, texts)
    noise = editor.initial_noise(cond, seeds)
    captured = {}

    def capture(pipe, step, timestep, tensors):
        captured.setdefault("latents", tensors["latents"].clone())
        return {}

    outputs = call_pipeline(editor, images, texts, noise, cond, callback_on_step_end=capture).images
    return Reference(editor, images, texts, seeds, cond, noise, captured["latents"], outputs,
                     copy.deepcopy(editor.pipe.scheduler))


@pytest.fixture(scope="module")
def kontext_reference() -> Reference:
    return run_reference(kontext_editor(), batch=2)


@pytest.fixture(scope="module")
def qwen_reference(small_qwen_pipeline_areas) -> Reference:
    return run_reference(qwen_editor(), batch=1)


@pytest.fixture(params=["kontext", "qwen"])
def reference(request) -> Reference:
    return request.getfixturevalue(f"{request.param}_reference")


# ---- the app's face -----------------------------------------------------------------------------
def test_kontext_edit_keeps_the_input_size_across_turns():
    editor = kontext_editor()
    first = editor.edit(make_image(0), TEXTS[0], seed=0, steps=2)
    assert first.size == (28, 20)  # 30×22 rounded down to the tiny VAE's multiple (4)
    assert editor.edit(first, TEXTS[1], seed=1, steps=2).size == (28, 20)
    with pytest.raises(EditorError, match="one image size"):
        editor.encode([make_image(0), make_image(1, size=(32, 32))], TEXTS)


def test_qwen_edit_original_pipeline_runs_end_to_end():
    editor = qwen_editor(plus=False)
    assert not editor.plus
    assert editor.edit(make_image(0), TEXTS[0], seed=0, steps=2).size == (24, 16)  # multiple of 8


# ---- the RL path reproduces the pipeline ------------------------------------------------------
def test_sigmas_are_the_pipelines(reference):
    editor, cond = reference.editor, reference.cond
    torch.testing.assert_close(editor.sigmas(STEPS, cond), reference.scheduler.sigmas, rtol=0, atol=0)
    assert editor.sigmas(STEPS, cond)[-2] > 0  # dynamic shift, not a bare linear grid
    with pytest.raises(EditorError, match="depends on the image size"):
        editor.sigmas(STEPS)


def test_velocity_euler_step_matches_scheduler_step(reference):
    editor, cond, x = reference.editor, reference.cond, reference.noise
    sigmas = editor.sigmas(STEPS, cond)
    with torch.no_grad():
        v = editor.velocity(x, sigmas[0].expand(len(x)), cond)
    assert v.shape == x.shape == (len(reference.images), *editor.latent_shape(cond))
    scheduler = copy.deepcopy(reference.scheduler)
    scheduler._step_index = None  # rewind to the first step, as set_timesteps leaves it
    scheduler.set_begin_index(0)
    expected = scheduler.step(v, scheduler.timesteps[0], x, return_dict=False)[0]
    torch.testing.assert_close(ode_step(x, v, sigmas[0], sigmas[1]), expected, rtol=0, atol=1e-5)
    # ... and the velocity is the pipeline's own prediction: same latents after its first step
    torch.testing.assert_close(ode_step(x, v, sigmas[0], sigmas[1]), reference.after_first_step, rtol=0, atol=1e-5)


def test_edit_batch_equals_the_pipeline_call(reference):
    outputs = reference.editor.edit_batch(reference.images, reference.texts, seeds=reference.seeds, steps=STEPS)
    assert [o.size for o in outputs] == [r.size for r in reference.outputs]
    for ours, theirs in zip(outputs, reference.outputs):
        assert np.abs(pixels(ours) - pixels(theirs)).max() <= 1


def test_encode_images_gives_latents_in_the_velocity_space(reference):
    editor, cond = reference.editor, reference.cond
    x0 = editor.encode_images(reference.images, cond)
    assert x0.shape == reference.noise.shape and x0.dtype == torch.float32
    assert [image.size for image in editor.decode(x0, cond)] == [(cond.width, cond.height)] * len(x0)


# ---- LoRA: ours <-> diffusers --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["kontext", "qwen"])
def test_saved_lora_loads_into_the_pipeline_and_changes_the_output(backend, tmp_path):
    make = kontext_editor if backend == "kontext" else qwen_editor
    editor, image, text = make(), make_image(0), TEXTS[0]
    base = editor.edit(image, text, steps=2)
    editor.add_lora(rank=4, alpha=8)
    with torch.no_grad():  # a fresh adapter is a no-op (B = 0): give it a visible effect
        for param in editor.trainable_parameters():
            param.normal_(0, 0.3)
    tuned = editor.edit(image, text, steps=2)
    with editor.adapter_disabled():
        assert np.array_equal(pixels(editor.edit(image, text, steps=2)), pixels(base))
    assert np.abs(pixels(tuned) - pixels(base)).max() > 8
    editor.save_lora(tmp_path)

    loaded = make()
    loaded.pipe.load_lora_weights(tmp_path)  # diffusers' own loader
    config = loaded.denoiser.peft_config[next(iter(loaded.denoiser.peft_config))]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert np.abs(pixels(loaded.edit(image, text, steps=2)) - pixels(tuned)).max() <= 1

    ours = make()
    ours.load_lora(tmp_path)
    assert np.abs(pixels(ours.edit(image, text, steps=2)) - pixels(tuned)).max() <= 1


# ---- loading ------------------------------------------------------------------------------------
@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("MTEDITLAB_KONTEXT_ID", "MTEDITLAB_QWEN_EDIT_ID", "MTEDITLAB_DEVICE", "MTEDITLAB_DTYPE",
                 "MTEDITLAB_OFFLOAD"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


@pytest.mark.parametrize("editor_class", [KontextEditor, QwenEditEditor])
def test_missing_weights_raise_promptly_with_the_fix(editor_class, empty_hub_cache, monkeypatch):
    start = time.perf_counter()
    with pytest.raises(EditorError) as default:
        editor_class.from_pretrained()
    message = str(default.value)
    assert editor_class.default_model_id in message and f"hf download {editor_class.default_model_id}" in message
    assert str(empty_hub_cache) in message and editor_class.model_id_env in message

    monkeypatch.setenv(editor_class.model_id_env, "mteditlab-tests/no-such-editor")
    with pytest.raises(EditorError, match="mteditlab-tests/no-such-editor"):
        editor_class.from_pretrained()
    assert time.perf_counter() - start < 5


def test_not_a_pipeline_directory_raises(tmp_path, empty_hub_cache):
    with pytest.raises(EditorError, match="model_index.json"):
        KontextEditor.from_pretrained(str(tmp_path))
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(EditorError, match="StableDiffusionPipeline"):
        KontextEditor.from_pretrained(str(tmp_path))


def test_from_pretrained_reads_a_local_directory_named_by_the_environment(tmp_path, empty_hub_cache, monkeypatch):
    tiny_kontext().save_pretrained(tmp_path)
    monkeypatch.setenv("MTEDITLAB_KONTEXT_ID", str(tmp_path))
    monkeypatch.setenv("MTEDITLAB_DEVICE", "cpu")
    monkeypatch.setenv("MTEDITLAB_DTYPE", "fp16")
    editor = KontextEditor.from_pretrained(max_sequence_length=KONTEXT_TOKENS)
    assert editor.dtype == torch.float16 and editor.device == torch.device("cpu")
    assert isinstance(editor.pipe, FluxKontextPipeline)
    with pytest.raises(EditorError, match="accelerator"):
        KontextEditor.from_pretrained(offload=True)


def test_a_published_qwen_image_edit_directory_loads_without_torchvision(tmp_path):
    """The published repositories declare ``transformers.Qwen2VLProcessor``, whose video processor needs
    torchvision; without it the backend builds the image-only processor and the pipeline edits as built."""
    built = tiny_qwen_edit()
    save_as_published(built, tmp_path)
    editor = QwenEditEditor.from_pretrained(str(tmp_path), device="cpu", **QWEN_AREAS)
    image = Image.new("RGB", (48, 32), (200, 40, 40))
    again = QwenEditEditor(built, device="cpu", **QWEN_AREAS)
    assert np.array_equal(np.asarray(editor.edit(image, "make it blue", seed=3, steps=2)),
                          np.asarray(again.edit(image, "make it blue", seed=3, steps=2)))


def test_dtype_and_device_defaults(monkeypatch):
    monkeypatch.delenv("MTEDITLAB_DTYPE", raising=False)
    assert resolve_dtype(None, torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16  # nothing runs on it
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(EditorError, match="Unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))
    monkeypatch.setenv("MTEDITLAB_DEVICE", "cpu")
    assert resolve_device() == torch.device("cpu")
