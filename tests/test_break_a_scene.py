"""Break-A-Scene: per-subject masks, union sampling, masked diffusion loss, cross-attention mask loss,
DDLoss per subject token, the two phases, and outputs a stock pipeline loads (tiny SD, 32 px)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import accord.train as train_module
from accord.config import load_config
from accord.losses import cross_attention_mask_loss
from accord.methods.break_a_scene import BreakAScene

TOKENS = ["<asset0>", "<asset1>"]


def _scene(folder):
    """A 48 px scene: a red square (<asset0>) and a blue disc (<asset1>) on grey; masks from the drawing."""
    from PIL import Image, ImageDraw

    folder.mkdir()
    img = Image.new("RGB", (48, 48), (128, 128, 128))
    m0, m1 = Image.new("L", (48, 48), 0), Image.new("L", (48, 48), 0)
    draw = ImageDraw.Draw(img)
    draw.rectangle((4, 12, 20, 32), fill=(220, 30, 30))
    ImageDraw.Draw(m0).rectangle((4, 12, 20, 32), fill=255)
    draw.ellipse((26, 14, 44, 32), fill=(30, 30, 220))
    ImageDraw.Draw(m1).ellipse((26, 14, 44, 32), fill=255)
    img.save(folder / "scene.png")
    m0.save(folder / "m0.png")
    m1.save(folder / "m1.png")
    line = {"file_name": "scene.png", "general": "wooden table", "masks": {"<asset0>": "m0.png", "<asset1>": "m1.png"}}
    (folder / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    return folder


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    """2 steps of phase 1 and 2 of phase 2 with DDLoss; records each step's loss parts and phase state."""
    root = tmp_path_factory.mktemp("bas")
    refs, out, base = _scene(root / "refs"), root / "out", tiny_model_dir("sd")
    seen: dict = {"parts": [], "phase": [], "method": None}
    mp = pytest.MonkeyPatch()
    real_step, real_hook = train_module.run_step, BreakAScene.before_optimizer_step

    def step(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        seen["parts"].append(set(losses.parts))
        seen["method"] = args[2]
        return losses

    def hook(self, step_index, optimizer):
        real_hook(self, step_index, optimizer)
        unet_grads = [p.grad is not None for p in optimizer.param_groups[1]["params"]]
        seen["phase"].append((step_index, any(unet_grads), optimizer.param_groups[0]["lr"]))

    mp.setattr(train_module, "run_step", step)
    mp.setattr(BreakAScene, "before_optimizer_step", hook)
    overrides = [f"model.pretrained={base}", f"data.instance_dir={refs}", "data.class_noun=object",
                 "data.resolution=32", "method.name=break_a_scene", "method.bas_phase1_steps=2",
                 "method.bas_phase1_lr=5e-3", "method.lora_rank=4", f"train.output_dir={out}", "train.max_steps=4",
                 "train.batch_size=1",
                 "train.checkpoint_every=0", "train.report_to=none", "train.learning_rate=1e-4", "accord.dd_weight=0.2"]
    try:
        train_module.train(load_config(None, overrides), progress=False)
    finally:
        mp.undo()
    return out, base, refs, seen


def test_cross_attention_loss_is_zero_on_the_mask_and_positive_elsewhere():
    masks = torch.zeros(1, 2, 4, 4)
    masks[0, 0, :2, :2] = 1
    masks[0, 1, 2:, 2:] = 1
    chosen = torch.tensor([[True, True]])
    exact, _ = cross_attention_mask_loss(masks * 0.3, masks, chosen)  # the map is normalised by its maximum
    assert exact.tolist() == [0.0]
    off, parts = cross_attention_mask_loss(masks.flip(-1) * 0.3, masks, chosen)
    assert off.item() == pytest.approx(2 * 8 / 16)  # two maps, 8 of 16 pixels wrong by 1 each
    only_first, _ = cross_attention_mask_loss(masks.flip(-1), masks, torch.tensor([[True, False]]))
    assert only_first.item() == pytest.approx(0.5) and parts["per_subject"].shape == (1, 2)


def test_two_phases_train_tokens_then_lora_with_all_losses(run):
    out, _, _, seen = run
    assert all({"diffusion", "attn", "dd"} <= parts for parts in seen["parts"]), seen["parts"]
    # phase 1 (steps 0, 1): no UNet gradient, tokens at bas_phase1_lr; phase 2: both, at train.learning_rate
    assert [(s, g) for s, g, _ in seen["phase"]] == [(0, False), (1, False), (2, True), (3, True)]
    assert [lr for *_, lr in seen["phase"]] == [5e-3, 5e-3, 1e-4, 1e-4]
    manifest = json.loads((out / "break_a_scene.json").read_text())
    assert manifest == {"tokens": TOKENS, "embeddings": "learned_embeds.safetensors",
                        "lora": "pytorch_lora_weights.safetensors"}


def test_union_sampling_names_the_chosen_subjects(run):
    method = run[3]["method"]
    from accord.data.references import ReferenceDataset, collate_references, scan_references

    items = scan_references(run[2], "sks", "object")
    batch = collate_references([ReferenceDataset(items, 32)[0]])
    seen = set()
    for seed in range(12):
        b = method.prepare_batch(batch, torch.Generator().manual_seed(seed))
        names = [t for t in TOKENS if t in b["caption"][0]]
        assert b["bas_chosen"][0].tolist() == [t in names for t in TOKENS]
        assert b["caption"][0].endswith(", wooden table")
        assert [p for _, p, _ in b["bas_dd"]] == [f"a photo of {t}" for t in TOKENS if t in names] or len(names) == 2
        for _, p, g in b["bas_dd"]:  # c_g: the other subjects' tokens and the context, never c_p's own token
            assert p.split()[-1] not in g and g.endswith("wooden table")
        union = method.loss_mask(b)[0, 0]
        assert torch.equal(union, b["subject_masks"][0, b["bas_chosen"][0], 0].amax(0))
        seen.add(tuple(names))
    assert len(seen) == 3  # {0}, {1}, {0, 1}


def test_masked_loss_ignores_pixels_outside_the_union(run, monkeypatch):
    """run_step scores only the union of the chosen subjects' masks (at latent size): a target that
    differs outside it gives the same diffusion loss. (The UNet still sees the whole noisy image, so its
    prediction inside the union depends on the outside, as in Break-A-Scene.)"""
    import torch.nn.functional as F

    from accord.data.references import ReferenceDataset, collate_references, scan_references

    out, _, refs, seen = run
    method = seen["method"]
    config, backbone = method.config, method.backbone
    items = scan_references(refs, "sks", "object")
    batch = collate_references([ReferenceDataset(items, 32)[0]])
    calls = []
    from accord import step as step_module

    real = step_module.diffusion_loss

    def spy(config_, backbone_, pred, target, timesteps, mask=None):
        calls.append((pred.detach(), target.detach(), timesteps, mask))
        return real(config_, backbone_, pred, target, timesteps, mask)

    monkeypatch.setattr(step_module, "diffusion_loss", spy)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        losses = step_module.run_step(config, backbone, method, step_module.TextCache(backbone, False), batch, None,
                                      generator, "object", backward=None)
    chosen = method.prepare_batch(batch, torch.Generator().manual_seed(3))["bas_chosen"][0]  # the same draw
    pred, target, timesteps, mask = calls[-1]
    union = F.interpolate(batch["subject_masks"][:, chosen, 0].amax(1, keepdim=True), size=(16, 16), mode="nearest")
    torch.testing.assert_close(mask, union)
    assert 0 < union.mean() < 1
    reference = real(config, backbone, pred, target, timesteps, mask)
    assert losses.parts["diffusion"].item() == pytest.approx(reference.item())
    outside = real(config, backbone, pred, target + 5 * (union == 0), timesteps, mask)  # soft edges stay scored
    inside = real(config, backbone, pred, target + 5 * (union > 0), timesteps, mask)
    assert torch.equal(outside, reference) and (inside - reference).abs().item() > 1e-3


def test_tokens_and_lora_load_in_the_stock_pipeline(run):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from accord.inference import load_trained

    out, base, _, _ = run
    state = load_file(out / "learned_embeds.safetensors")
    assert list(state) == TOKENS and all(v.shape == (1, 32) for v in state.values())
    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_textual_inversion(list(state.values()), token=list(state))
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    single = StableDiffusionPipeline.from_pretrained(base)
    single.load_textual_inversion(out, weight_name="<asset1>.safetensors")  # one token per file works too
    assert single.tokenizer.convert_tokens_to_ids("<asset1>") == len(single.tokenizer) - 1

    _same_images_as_accord(pipe, load_trained(out))


def test_run_readme_names_the_token_files_and_loads_every_token(run):
    """The run README lists the per-token files, says the multi-token file needs the token list, and its lines,
    executed as written, load every token and the LoRA as accord's loader does."""
    from trainkit import header, run_readme

    from accord.inference import load_trained

    out, _, _, _ = run
    text = (out / "README.md").read_text()
    assert all(f"`{t}.safetensors`" in text for t in TOKENS) and "rejects a file holding several tokens" in text
    assert header(out / "<asset0>.safetensors")["token"] == "<asset0>"
    assert json.loads(header(out / "pytorch_lora_weights.safetensors")["accord"])["method"] == "break_a_scene"
    _same_images_as_accord(run_readme(out)["pipe"], load_trained(out))


@pytest.mark.slow
def test_sdxl_trains_both_encoders_and_loads_in_the_stock_pipeline(tiny_model_dir, tmp_path):
    """SDXL: the tokens train in both text encoders (each row moves), the LoRA trains in phase 2, and stock
    ``StableDiffusionXLPipeline`` loads the embeddings (one call per encoder) and the LoRA."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    from accord.inference import load_trained

    refs, out, base = _scene(tmp_path / "refs"), tmp_path / "out", tiny_model_dir("sdxl")
    overrides = [f"model.pretrained={base}", f"data.instance_dir={refs}", "data.class_noun=object",
                 "data.resolution=32", "method.name=break_a_scene", "method.bas_phase1_steps=1",
                 "method.bas_phase1_lr=5e-2", "method.lora_rank=4", f"train.output_dir={out}", "train.max_steps=2",
                 "train.batch_size=1",
                 "train.checkpoint_every=0", "train.report_to=none", "train.learning_rate=1e-3", "accord.dd_weight=0.2"]
    parts, real_step = [], train_module.run_step

    def step(*args, **kwargs):
        losses = real_step(*args, **kwargs)
        parts.append(set(losses.parts))
        return losses

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module, "run_step", step)
        train_module.train(load_config(None, overrides), progress=False)
    assert len(parts) == 2 and all({"diffusion", "attn"} <= p for p in parts), parts
    state = load_file(out / "learned_embeds.safetensors")
    pipe = StableDiffusionXLPipeline.from_pretrained(base)
    dims = (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size)
    assert {k: tuple(v.shape) for k, v in state.items()} == {"clip_l": (2, dims[0]), "clip_g": (2, dims[1])}
    tokens = json.loads((out / "break_a_scene.json").read_text())["tokens"]
    assert tokens == TOKENS and (out / "pytorch_lora_weights.safetensors").is_file()
    pipe.load_textual_inversion(list(state["clip_l"]), token=tokens, text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(list(state["clip_g"]), token=tokens, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    single = load_file(out / "<asset1>.safetensors")
    assert torch.equal(single["clip_g"], state["clip_g"][1:2])
    # the learned rows moved away from the initializer ("object") in both encoders
    for encoder, tokenizer, key in ((pipe.text_encoder, pipe.tokenizer, "clip_l"),
                                    (pipe.text_encoder_2, pipe.tokenizer_2, "clip_g")):
        init = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("object")]
        assert all((state[key][i] - init).abs().max() > 0 for i in range(2)), key

    _same_images_as_accord(pipe, load_trained(out))


def _same_images_as_accord(stock_pipe, accord_pipe):
    """The stock pipeline with the outputs loaded by hand draws what accord's loader draws (2 steps, 32 px)."""
    def sample(p):
        p.set_progress_bar_config(disable=True)
        return p("a photo of <asset0> and <asset1>", num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images

    stock = sample(stock_pipe)
    assert stock.shape == (1, 32, 32, 3) and np.isfinite(stock).all()
    np.testing.assert_allclose(sample(accord_pipe), stock, atol=1e-5)
