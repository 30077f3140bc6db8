"""Every method × backbone on tiny models: two training steps with DDLoss (and PDLoss where c_p is
learned), then the stock diffusers pipeline loads the outputs as documented and samples 32×32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import accord.train as train_module
from accord.config import load_config
from accord.inference import load_trained

TRIGGERS = {"lora": "sks", "dreambooth": "sks", "textual_inversion": "<s*>", "custom_diffusion": "<new1>"}
#: per (method, kind): extra overrides; the SD and SDXL rows cover different options of a method
EXTRA = {
    ("dreambooth", "sd"): ["data.with_prior_preservation=true", "data.num_class_images=1"],
    ("dreambooth", "sdxl"): ["method.train_text_encoder=true"],
    ("textual_inversion", "sd"): ["method.num_vectors=2"],
    ("custom_diffusion", "sd"): ["data.with_prior_preservation=true", "data.num_class_images=1"],
    ("custom_diffusion", "sdxl"): ["method.train_q_out=true"],
}
TABLE = [(m, k) for m in TRIGGERS for k in ("sd", "sdxl")]


def _pipeline_class(kind):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if kind == "sdxl" else diffusers.StableDiffusionPipeline


def _references(root: Path, trigger: str) -> Path:
    from PIL import Image

    folder = root / f"refs-{trigger.strip('<>*')}"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"1 {trigger} backpack, girl, park")
    return folder


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory, monkeypatch_module):
    """(method, kind) -> (output folder, the trained Method object, base model folder); each run once."""
    root = tmp_path_factory.mktemp("methods")
    runs: dict = {}
    captured: list = []
    real_get_method = train_module.get_method

    def recording_get_method(name):
        cls = real_get_method(name)

        def make(*args, **kwargs):
            captured.append(cls(*args, **kwargs))
            return captured[-1]

        return make

    monkeypatch_module.setattr(train_module, "get_method", recording_get_method)

    def get(method: str, kind: str):
        if (method, kind) not in runs:
            trigger = TRIGGERS[method]
            base = tiny_model_dir(kind)
            out = root / f"{method}-{kind}"
            overrides = [
                f"model.pretrained={base}", f"data.instance_dir={_references(root, trigger)}",
                "data.class_noun=backpack",
                f"data.trigger={trigger}", "data.resolution=32", f"method.name={method}", f"train.output_dir={out}",
                "train.max_steps=2", "train.batch_size=1", "train.checkpoint_every=0", "train.report_to=none",
                "train.learning_rate=1e-3", "accord.dd_weight=0.2",
                *(["method.lora_rank=4"] if method == "lora" else []),
                *(["accord.pd_weight=0.002"] if method in ("textual_inversion", "custom_diffusion") else []),
                *EXTRA.get((method, kind), []),
            ]
            if method == "custom_diffusion":
                overrides.append(f"method.modifier_token={trigger}")
            if method == "textual_inversion":
                overrides.append(f"method.placeholder_token={trigger}")
            train_module.train(load_config(None, overrides), progress=False)
            runs[method, kind] = (out, captured[-1], base)
        return runs[method, kind]

    return get


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _stock_load(method: str, kind: str, out: Path, base: Path):
    """Load the outputs exactly as the methods' docs tell users to."""
    from safetensors.torch import load_file

    cls = _pipeline_class(kind)
    if method == "dreambooth":
        return cls.from_pretrained(out)
    pipe = cls.from_pretrained(base)
    if method == "lora":
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    elif method == "textual_inversion" and kind == "sd":
        pipe.load_textual_inversion(out, weight_name="learned_embeds.safetensors")
    elif method == "textual_inversion":
        state = load_file(out / "learned_embeds.safetensors")
        pipe.load_textual_inversion(state["clip_l"], token="<s*>", text_encoder=pipe.text_encoder,
                                    tokenizer=pipe.tokenizer)
        pipe.load_textual_inversion(state["clip_g"], token="<s*>", text_encoder=pipe.text_encoder_2,
                                    tokenizer=pipe.tokenizer_2)
    elif method == "custom_diffusion":
        # _pipeline: diffusers 0.42 installs the processors only when given it (huggingface/diffusers#9320)
        pipe.unet.load_attn_procs(out, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)
        if kind == "sd":
            pipe.load_textual_inversion(out, weight_name="<new1>.safetensors")
        else:
            state = load_file(out / "<new1>.safetensors")
            pipe.load_textual_inversion(state["clip_l"], token="<new1>", text_encoder=pipe.text_encoder,
                                        tokenizer=pipe.tokenizer)
            pipe.load_textual_inversion(state["clip_g"], token="<new1>", text_encoder=pipe.text_encoder_2,
                                        tokenizer=pipe.tokenizer_2)
    return pipe


def _sample(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    return image


@pytest.mark.parametrize("method,kind", TABLE)
@pytest.mark.slow
def test_train_then_stock_pipeline_generates(trained, method, kind):
    out, _, base = trained(method, kind)
    assert (out / "config.yaml").is_file()
    pipe = _stock_load(method, kind, out, base)
    prompt = f"a {TRIGGERS[method]} backpack, girl"
    stock = _sample(pipe, prompt)
    # accord's own loader gives the same pipeline as the documented stock calls
    np.testing.assert_allclose(_sample(load_trained(out), prompt), stock, atol=1e-5)


def _base_pipeline(kind, base):
    return _pipeline_class(kind).from_pretrained(base)


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_textual_inversion_changes_only_the_new_rows(trained, kind):
    out, method, base = trained("textual_inversion", kind)
    original = _base_pipeline(kind, base)
    encoders = [original.text_encoder] + ([original.text_encoder_2] if kind == "sdxl" else [])
    learned = method.learned
    for encoder, weight, ids, initial in zip(encoders, learned.weights, learned.ids, learned._originals):
        before = encoder.get_input_embeddings().weight
        after = weight.detach().cpu()
        n = before.shape[0]
        assert ids == list(range(n, after.shape[0]))  # new rows only at the end
        assert torch.equal(after[:n], before)  # bitwise, despite weight decay and AdamW
        assert not torch.equal(after[n:], initial[n:].cpu())  # the new rows did train
    assert all(rows.shape[0] == len(learned.tokens) for rows in learned.rows())
    if kind == "sd":
        assert method.learned.tokens == ["<s*>", "<s*>_1"]
        assert method.transform_prompt("1 <s*> backpack, girl") == "1 <s*> <s*>_1 backpack, girl"


def test_pd_features_pool_at_end_of_text_with_learned_tokens(trained):
    """PDLoss's f_p is CLIP's end-of-text feature even when the learned token's id is the largest one
    (transformers pools at argmax(input_ids) for configs with eos_token_id=2, as SD 1.x ships)."""
    _, method, _ = trained("textual_inversion", "sd")
    backbone = method.backbone
    encoder, tokenizer = backbone.text_encoders[0], backbone.tokenizers[0]
    # transformers copies config.eos_token_id into the text transformer module at init
    legacy = next(m for m in encoder.modules() if isinstance(getattr(m, "eos_token_id", None), int))
    legacy.eos_token_id = 2  # the legacy setting of SD 1.x's text encoder config
    try:
        with torch.no_grad():
            features = backbone.projected_text_features(["1 <s*> backpack"])
            ids = tokenizer(backbone.prepare_prompts(["1 <s*> backpack"]), padding="max_length",
                            return_tensors="pt").input_ids
            hidden = encoder(ids).last_hidden_state
        stock_pooled = encoder(ids).pooler_output
    finally:
        legacy.eos_token_id = tokenizer.eos_token_id
    eos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
    assert ids[0].argmax() != eos and not torch.allclose(stock_pooled[0], hidden[0, eos])  # the pitfall is real here
    torch.testing.assert_close(features[0], hidden[0, eos])


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_custom_diffusion_changes_only_cross_attention(trained, kind):
    from accelerate.utils import extract_model_from_parallel

    out, method, base = trained("custom_diffusion", kind)
    unet = extract_model_from_parallel(method.backbone.denoiser)
    original = dict(_base_pipeline(kind, base).unet.named_parameters())
    trained_names = {n for n, p in unet.named_parameters() if p.requires_grad}
    allowed = ("to_k_custom_diffusion", "to_v_custom_diffusion")
    if kind == "sdxl":  # this row trains with method.train_q_out=true
        allowed += ("to_q_custom_diffusion", "to_out_custom_diffusion")
    assert trained_names and all(".attn2.processor." in n and n.split(".processor.")[1].startswith(allowed)
                                 for n in trained_names)
    assert {n.split(".processor.")[1].split(".")[0] for n in trained_names} == set(allowed)
    for name, p in unet.named_parameters():
        if ".processor." not in name:
            assert torch.equal(p.detach().cpu(), original[name]), name
    changed = [n for n in trained_names
               if not torch.equal(dict(unet.named_parameters())[n].detach().cpu(),
                                  original[n.replace(".processor.", ".").replace("_custom_diffusion", "")])]
    assert changed


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_stock_load_attn_procs_applies_every_custom_diffusion_tensor(trained, kind):
    """diffusers' own loader, called as its training script's docs say, installs a Custom Diffusion processor on
    every attention layer and carries every trained tensor into the UNet (``_pipeline``: huggingface/diffusers#9320)."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers.models.attention_processor import CustomDiffusionAttnProcessor
    from safetensors.torch import load_file

    out, method, base = trained("custom_diffusion", kind)
    pipe = _base_pipeline(kind, base)
    n_layers = len(pipe.unet.attn_processors)
    pipe.unet.load_attn_procs(out, weight_name="pytorch_custom_diffusion_weights.safetensors", _pipeline=pipe)
    procs = pipe.unet.attn_processors
    assert len(procs) == n_layers and all(isinstance(p, CustomDiffusionAttnProcessor) for p in procs.values())
    loaded = dict(pipe.unet.named_parameters())
    trained_unet = extract_model_from_parallel(method.backbone.denoiser)
    tensors = {n: p for n, p in trained_unet.named_parameters() if "_custom_diffusion" in n}
    assert tensors and set(tensors) <= set(loaded)
    for name, value in tensors.items():
        torch.testing.assert_close(loaded[name], value.detach().cpu(), rtol=0, atol=0, msg=name)
    file_tensors = [k for k, v in load_file(out / "pytorch_custom_diffusion_weights.safetensors").items() if v.numel()]
    assert len(file_tensors) == len(tensors)  # every tensor in the file reached the UNet


@pytest.mark.parametrize("method,kind", [(m, k) for m in ("lora", "textual_inversion", "custom_diffusion")
                                         for k in ("sd", "sdxl")])
def test_run_readme_loads_the_run_as_written(trained, method, kind):
    """Each run folder's README.md names the trigger and base model, and its python lines, executed as
    written, give the pipeline accord's loader gives."""
    from trainkit import run_readme

    out, _, base = trained(method, kind)
    text = (out / "README.md").read_text()
    assert f"`{TRIGGERS[method]}`" in text and str(Path(base).resolve()) in text
    pipe = run_readme(out)["pipe"]
    prompt = f"a {TRIGGERS[method]} backpack, girl"
    np.testing.assert_allclose(_sample(pipe, prompt), _sample(load_trained(out), prompt), atol=1e-5)


def test_every_adapter_file_carries_training_metadata(trained):
    import json

    from trainkit import header

    for method, kind, files in (("lora", "sd", ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]),
                                ("lora", "sdxl", ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]),
                                ("textual_inversion", "sd", ["learned_embeds.safetensors"]),
                                ("custom_diffusion", "sdxl", ["pytorch_custom_diffusion_weights.safetensors",
                                                              "<new1>.safetensors"])):
        out, _, _ = trained(method, kind)
        for name in files:
            meta = header(out / name)
            assert meta["ss_base_model_version"] == {"sd": "sd_v1", "sdxl": "sdxl_base_v1-0"}[kind], name
            assert (meta["ss_steps"], meta["ss_resolution"], meta["ss_output_name"]) == ("2", "(32, 32)", out.name)
            trigger = TRIGGERS[method]
            folder = f"refs-{trigger.strip('<>*')}"
            assert json.loads(meta["ss_tag_frequency"]) == {folder: {f"1 {trigger} backpack": 2, "girl": 2, "park": 2}}
            accord = json.loads(meta["accord"])
            assert accord["trigger"] == trigger and accord["class_noun"] == "backpack" and accord["method"] == method
            assert (accord["dd_weight"], accord["dd_scale"], accord["dd_variant"]) == (0.2, "reference", "paper")
            assert accord["pd_weight"] == (0.002 if method != "lora" else 0.0)
            lora = method == "lora"
            assert ("ss_network_dim" in meta) == lora, name
            if lora:
                assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "4.0")
        if method == "lora":
            assert "lora_adapter_metadata" in header(out / "pytorch_lora_weights.safetensors")  # diffusers' own kept
        if method == "textual_inversion":
            assert header(out / "learned_embeds.safetensors")["token"] == "<s*>"


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_kohya_lora_file(trained, kind):
    from safetensors.torch import load_file

    out, _, base = trained("lora", kind)
    state = load_file(out / "lora_kohya.safetensors")
    modules = {k.split(".")[0] for k in state}
    assert modules and all(m.startswith("lora_unet_") for m in modules)
    for m in modules:
        assert {f"{m}.lora_down.weight", f"{m}.lora_up.weight", f"{m}.alpha"} <= set(state)
        assert state[f"{m}.alpha"].item() == 4.0  # method.lora_rank=4, alpha defaults to the rank
    pipe = _base_pipeline(kind, base)
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors")
    kohya = _sample(pipe, "a sks backpack, girl")
    diffusers_format = _sample(_stock_load("lora", kind, out, base), "a sks backpack, girl")
    np.testing.assert_allclose(kohya, diffusers_format, atol=1e-4)


EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_configs_validate(path, tmp_path):
    config = load_config(path, [f"data.instance_dir={tmp_path}"])
    assert config.data.instance_dir == str(tmp_path)
    assert config.method.name in path.stem.replace("-", "_")


def test_examples_cover_every_method_and_family():
    names = {p.stem for p in EXAMPLES}
    for method in ("lora", "dreambooth", "textual_inversion", "custom_diffusion", "visual_encoder", "ip_adapter",
                   "break_a_scene"):
        for family in ("sd15", "sdxl"):
            assert f"{method.replace('_', '-')}-{family}" in names
    assert "tiny-sd-lora" in names
